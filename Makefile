# The two commands of the quickstart are `make up` and `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help
LOCAL_DIR ?= $(CURDIR)/.local
export LOCAL_DIR
# Tests are I/O bound (databases, broker); more threads than cores is right.
TEST_THREADS ?= 6
SCALE ?= 100000
DURATION ?= 30s

.PHONY: help up down deps migrate test test-rust test-scripts lint fmt clippy lint-deploy bench chaos

help:
	@echo "make up      start the whole stack (dependencies, migrations, services, gateway); Ctrl-C stops it"
	@echo "make test    run every test against real PostgreSQL, RabbitMQ and Redis"
	@echo "make lint    cargo fmt --check, clippy -D warnings, deploy artifact linters"
	@echo "make bench   seed SCALE records and run the k6 scenarios (SCALE=$(SCALE) DURATION=$(DURATION))"
	@echo "make chaos   fault battery against private instances (CHAOS_SCALE=small for CI)"
	@echo "make down    stop private dependency instances started by make up/test"

up:
	bash deploy/local/up.sh

down:
	bash deploy/local/deps.sh down

# Finds the dependencies (or starts private ones, or installs them) and
# writes $(LOCAL_DIR)/env with the URLs in use.
deps:
	DEPS_NGINX=$${DEPS_NGINX:-0} bash deploy/local/deps.sh up

migrate: deps
	source $(LOCAL_DIR)/env && cargo run -q -p command-api -- migrate && cargo run -q -p projector -- migrate

test: deps
	source $(LOCAL_DIR)/env && bash .ci/test-rust.sh $(TEST_THREADS)
	bash .ci/edge-battery.sh
	bash deploy/local/test-private-instances.sh
	source $(LOCAL_DIR)/env && python3 -m unittest discover -s loadtest -p 'test_*.py'

lint: fmt clippy lint-deploy

fmt:
	cargo fmt --all -- --check

clippy:
	cargo clippy --workspace --all-targets -- -D warnings

lint-deploy:
	bash .ci/lint-deploy.sh

bench:
	SCALE=$(SCALE) DURATION=$(DURATION) bash loadtest/bench.sh

# The fault battery against private PostgreSQL/RabbitMQ/Redis on free ports
# (CHAOS_SCALE=small: ~2 min; default: the issue's 30 s faults, ~8 min).
chaos:
	python3 e2e/chaos/chaos.py

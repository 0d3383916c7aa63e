// Shared configuration and helpers for the k6 scenarios in loadtest/.
//
// Everything is configured from environment variables (k6 -e NAME=value or the
// process environment); see loadtest/README.md for the full list.
import http from 'k6/http';
import exec from 'k6/execution';
import { SharedArray } from 'k6/data';
import { Trend } from 'k6/metrics';

// ---------------------------------------------------------------- env helpers

export function env(name, def) {
  const v = __ENV[name];
  return v === undefined || v === '' ? def : v;
}

export function num(name, def) {
  const v = env(name, undefined);
  if (v === undefined) return def;
  const n = Number(v);
  if (!Number.isFinite(n)) throw new Error(`${name}=${v} is not a number`);
  return n;
}

export function flag(name, def = false) {
  const v = env(name, undefined);
  if (v === undefined) return def;
  return !['0', 'false', 'no', 'off', ''].includes(String(v).toLowerCase());
}

const strip = (u) => String(u).replace(/\/+$/, '');

// ---------------------------------------------------------------- endpoints

// FLOOR=1: the target is the static nginx floor (loadtest/floor): statuses are
// the floor's (201 for POSTs, 200 otherwise) and contract-only checks are skipped.
export const FLOOR = flag('FLOOR');
export const FLOOR_URL = `http://127.0.0.1:${num('FLOOR_PORT', 8099)}`;
// GATEWAY=1: one URL (BASE_URL, else GATEWAY_URL, else :8000) for reads and writes.
export const GATEWAY = flag('GATEWAY');

const BASE =
  env('BASE_URL', undefined) ||
  (GATEWAY ? env('GATEWAY_URL', 'http://127.0.0.1:8000') : undefined) ||
  (FLOOR ? FLOOR_URL : undefined);

export const CMD_URL = strip(BASE || env('CMD_URL', 'http://127.0.0.1:8080'));
export const QUERY_URL = strip(BASE || env('QUERY_URL', 'http://127.0.0.1:8081'));
export const PROJECTOR_URL = strip(env('PROJECTOR_URL', 'http://127.0.0.1:8082'));

// ---------------------------------------------------------------- load shape

export const TARGETS = flag('TARGETS');

// DURATION (k6 syntax: 30s, 5m, 1h), with a per-scenario default.
export function dur(def = '30s') {
  return env('DURATION', def);
}

// Duration and VU pool of a constant-arrival-rate scenario. PRE_VUS/MAX_VUS
// default to what the rate needs at up to 40 ms per request, allocated up
// front: a VU started mid-run costs k6 a JS runtime, and iterations are
// dropped while it starts (idle VUs cost nothing).
export function arrival(rate, execName, extra = {}) {
  const r = Math.max(1, Math.round(rate));
  const pre = num('PRE_VUS', Math.max(5, Math.ceil(r / 25)));
  const max = num('MAX_VUS', Math.max(2 * pre, 50));
  return Object.assign(
    {
      executor: 'constant-arrival-rate',
      exec: execName,
      rate: r,
      timeUnit: '1s',
      duration: dur(),
      preAllocatedVUs: Math.min(pre, max),
      maxVUs: max,
      gracefulStop: env('GRACEFUL_STOP', '5s'),
    },
    extra,
  );
}

// Options shared by every scenario. `eps` lists the endpoint tags (`ep`) the
// scenario uses so each gets its own line in the summary (and in report.md);
// `targets` is an object of extra thresholds applied only with TARGETS=1.
//
// Thresholds:
//   - contract (always): http_req_duration p(99)<500 overall and per ep,
//     http_req_failed rate<1%.
//   - targets (TARGETS=1): keyed by the `target` tag, e.g.
//     'http_req_duration{target:write}': ['p(99)<15'], so they are reported
//     apart from the contract lines.
export function baseOptions(scenarios, eps, targets = {}, extraThresholds = {}) {
  timelines(scenarios, eps);
  const thresholds = {
    http_req_duration: ['p(99)<500'],
    http_req_failed: ['rate<0.01'],
  };
  for (const ep of eps) thresholds[`http_req_duration{ep:${ep}}`] = ['p(99)<500'];
  Object.assign(thresholds, extraThresholds);
  if (TARGETS) {
    for (const [k, v] of Object.entries(targets)) {
      thresholds[k] = (thresholds[k] || []).concat(v);
    }
  }
  return {
    scenarios,
    thresholds,
    discardResponseBodies: true, // requests that need the body ask for it
    summaryTrendStats: ['avg', 'min', 'med', 'p(90)', 'p(95)', 'p(99)', 'p(99.9)', 'max', 'count'],
    // Few, low-cardinality tags: cheaper for k6 and smaller raw output.
    systemTags: ['status', 'method', 'name', 'scenario', 'group', 'expected_response', 'error_code', 'check'],
    setupTimeout: env('SETUP_TIMEOUT', '180s'),
    userAgent: 'cqrs-loadtest/k6',
    insecureSkipTLSVerify: flag('INSECURE'),
    noConnectionReuse: false,
  };
}

// ---------------------------------------------------------------- timelines
//
// Latency over time without k6's raw output: one Trend per key and time
// bucket (tl_<key>_<i>, created here in init context), so handleSummary
// carries p50/p99/max/count per bucket and report.py plots them. Raw output
// (--out csv) writes a dozen rows per request and, at 3,000 requests/s,
// costs k6 enough CPU to add ~10 ms to the p99 it measures (floor p99 3 ms
// without it, 15 ms with it, here); an extra Trend sample costs next to nothing.
// Keys are the `ep` tags of the helpers' requests, plus custom metrics
// registered with timelineKeys(). TIMELINE=0 turns them off.
const TIMELINE = flag('TIMELINE', true);
const TL = { width: 1, n: 0, keys: {} };

function timelines(scenarios, keys) {
  if (!TIMELINE || TL.n > 0) return;
  let total = 0;
  for (const sc of Object.values(scenarios)) {
    total = Math.max(total, parseDuration(sc.duration || dur()) + parseDuration(sc.gracefulStop || '30s'));
  }
  // about 150 buckets: 1 s up to 2.5 minutes, 12 s for a 30 minute soak
  TL.width = Math.max(1, Math.ceil(total / 150));
  TL.n = Math.ceil(total / TL.width) + 1;
  timelineKeys(keys);
}

export function timelineKeys(keys) {
  if (!TIMELINE || TL.n === 0) return;
  for (const k of keys) {
    if (TL.keys[k]) continue;
    const ts = [];
    for (let i = 0; i < TL.n; i++) ts.push(new Trend(`tl_${k}_${i}`, true));
    TL.keys[k] = ts;
  }
}

// Adds `ms` to the bucket of now (since the scenario started) for `key`.
// exec.scenario builds a new object on every access (a measurable share of
// k6's CPU at thousands of requests/s), so each VU reads its start once.
let scenarioStart = 0;
export function timeline(key, ms) {
  const ts = TL.keys[key];
  if (!ts) return;
  if (scenarioStart === 0) {
    scenarioStart = exec.scenario.startTime;
    // report.py puts k6's garbage collections (bench.sh: GODEBUG=gctrace=1,
    // timed from the process's start) on the timeline's clock with this
    if (exec.vu.idInTest === 1) console.log(`scenario_start_ms=${scenarioStart}`);
  }
  const i = Math.floor((Date.now() - scenarioStart) / (1000 * TL.width));
  if (i >= 0 && i < ts.length) ts[i].add(ms);
}

function timed(res, tags) {
  if (tags && tags.ep) timeline(tags.ep, res.timings.duration);
  return res;
}

// A target threshold on http_req_duration for requests tagged target:<name>.
// TARGET_P99_MS overrides the value (useful when running off the target rate).
export function p99Target(name, ms) {
  return { [`http_req_duration{target:${name}}`]: [`p(99)<${num('TARGET_P99_MS', ms)}`] };
}

// At most 1% of the planned iterations may be dropped (k6 had no free VU):
// otherwise the rate was not achieved. Applied with TARGETS=1.
export function droppedTarget(ratePerSec, duration = dur()) {
  const planned = ratePerSec * parseDuration(duration);
  return { dropped_iterations: [`count<=${Math.max(1, Math.floor(planned * 0.01))}`] };
}

export function parseDuration(s) {
  // k6 style: 90s, 5m, 1h30m, 1m30s, 500ms
  let total = 0;
  const re = /(\d+(?:\.\d+)?)(ms|h|m|s)/g;
  let m;
  let matched = false;
  while ((m = re.exec(String(s))) !== null) {
    matched = true;
    const v = Number(m[1]);
    total += m[2] === 'h' ? v * 3600 : m[2] === 'm' ? v * 60 : m[2] === 's' ? v : v / 1000;
  }
  if (!matched) total = Number(s) || 0;
  return total;
}

// ---------------------------------------------------------------- HTTP helpers

const TOKEN = env('TOKEN', '');
const AUTH = TOKEN ? { Authorization: `Bearer ${TOKEN}` } : {};

export const JSON_HEADERS = Object.assign({ 'Content-Type': 'application/json' }, AUTH);
export const GET_HEADERS = Object.assign({ Accept: 'application/json' }, AUTH);
export function headers(extra = {}) {
  return Object.assign({}, JSON_HEADERS, extra);
}

export const ok200or404 = http.expectedStatuses(200, 404);

// Request params for the common case (no per-call option), built once per
// route and tag set: k6 converts every params object from JS on each
// request, and building them afresh (headers, merged tags) cost k6 a
// visible share of a core at thousands of requests/s.
const PARAMS = {};
function params(name, hdrs, tags, opts) {
  if (opts.body || opts.responseCallback || opts.headers) {
    const p = { headers: opts.headers || hdrs, tags: Object.assign({ name }, tags) };
    if (opts.body) p.responseType = 'text';
    if (opts.responseCallback) p.responseCallback = opts.responseCallback;
    return p;
  }
  let key = name;
  for (const t in tags) key += `|${t}=${tags[t]}`;
  return PARAMS[key] || (PARAMS[key] = { headers: hdrs, tags: Object.assign({ name }, tags) });
}

// POST /data with one record (an object, or its JSON text). `opts.body`
// keeps the answer (for id/seq).
export function postRecord(rec, tags, opts = {}) {
  const body = typeof rec === 'string' ? rec : JSON.stringify(rec);
  return timed(http.post(`${CMD_URL}/data`, body, params('POST /data', JSON_HEADERS, tags, opts)), tags);
}

export function getById(id, tags, opts = {}) {
  const q = opts.minSeq !== undefined ? `?min_seq=${opts.minSeq}` : '';
  return timed(http.get(`${QUERY_URL}/data/${id}${q}`, params('GET /data/{id}', GET_HEADERS, tags, opts)), tags);
}

export function listQuery(q) {
  const parts = [];
  for (const [k, v] of Object.entries(q)) {
    if (v !== undefined && v !== null && v !== '') parts.push(`${k}=${encodeURIComponent(v)}`);
  }
  return parts.length ? `?${parts.join('&')}` : '';
}

export function getList(q, tags, opts = {}) {
  return timed(http.get(`${QUERY_URL}/data${listQuery(q)}`, params('GET /data', GET_HEADERS, tags, opts)), tags);
}

// gjson selector on a text body; undefined when the body is not JSON.
export function jget(res, sel) {
  try {
    return res.json(sel);
  } catch (e) {
    return undefined;
  }
}

// ---------------------------------------------------------------- payloads

// PAYLOAD_BYTES: size of the serialized payload object, "N" or "MIN-MAX"
// (uniform). Default 256. The floor's bodies use the same generator shape
// (loadtest/floor/gen.py).
function parseRange(s) {
  const m = String(s).match(/^(\d+)(?:-(\d+))?$/);
  if (!m) throw new Error(`PAYLOAD_BYTES=${s}: expected N or MIN-MAX`);
  const lo = Number(m[1]);
  const hi = m[2] ? Number(m[2]) : lo;
  return [Math.min(lo, hi), Math.max(lo, hi)];
}
export const PAYLOAD_RANGE = parseRange(env('PAYLOAD_BYTES', '256'));
export const KINDS = env('KINDS', 'order,invoice,shipment,customer,event')
  .split(',')
  .map((s) => s.trim())
  .filter(Boolean);

const ALPHA = 'abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789';
function randomString(n) {
  let s = '';
  for (let i = 0; i < n; i++) s += ALPHA[(Math.random() * ALPHA.length) | 0];
  return s;
}
// One random filler per VU (built at init); payloads slice it at a random
// offset, so generating a payload costs almost nothing.
const FILLER_LEN = Math.max(4096, PAYLOAD_RANGE[1] * 2);
const FILLER = randomString(FILLER_LEN);

export function randInt(n) {
  return Math.floor(Math.random() * n);
}
export function pick(arr) {
  return arr[randInt(arr.length)];
}

// {"v":1,"n":<9 digits>,"ts":<13 digits>,"data":"..."} of ~`bytes` characters
// (default: drawn from PAYLOAD_BYTES), as JSON text built by concatenation:
// at 1,500 POSTs/s, building an object and JSON.stringify-ing it cost k6 a
// quarter of a core (goja is an interpreter), which the service under test
// then lacks. FILLER is alphanumeric, so the slice needs no escaping.
const PAYLOAD_OVERHEAD = '{"v":1,"n":123456789,"ts":1732240000000,"data":""}'.length;
export function payloadBody(bytes) {
  const [lo, hi] = PAYLOAD_RANGE;
  const size = bytes !== undefined ? bytes : lo + randInt(hi - lo + 1);
  const n = Math.max(0, size - PAYLOAD_OVERHEAD);
  const off = randInt(FILLER_LEN - n + 1);
  return '{"v":1,"n":' + (100000000 + randInt(900000000)) + ',"ts":' + Date.now() + ',"data":"' + FILLER.substr(off, n) + '"}';
}

// The same payload as an object, for requests a script assembles itself.
export function makePayload(bytes) {
  return JSON.parse(payloadBody(bytes));
}

// One record's JSON text, of `kind` (default: one of KINDS).
const KIND_JSON = {};
for (const k of KINDS) KIND_JSON[k] = JSON.stringify(k);
export function recordBody(kind) {
  const k = kind ? KIND_JSON[kind] || JSON.stringify(kind) : KIND_JSON[pick(KINDS)];
  return '{"kind":' + k + ',"key":"k-' + randInt(1e9) + '","payload":' + payloadBody() + '}';
}

// ---------------------------------------------------------------- id pool

// Pages through GET /data?limit=1000 (newest first) until `want` distinct ids
// (ID_POOL, default 20000) or the end. Runs in setup(); its requests are tagged
// ep:setup so they stay out of the measured figures.
// The id pool from ID_FILE (a JSON array of ids that bench.sh writes once),
// one copy shared by every VU. setup() data, by contrast, is copied into
// each VU: 20,000 ids times a few hundred VUs is seconds of CPU and hundreds
// of MiB at the start of the run, which k6 pays in dropped iterations.
// Call in init context; null without ID_FILE (then fetch in setup()).
export function sharedIds(name) {
  const path = __ENV.ID_FILE;
  if (!path) return null;
  const ids = new SharedArray(name, () => JSON.parse(open(path)));
  return ids.length > 0 ? ids : null;
}

export function fetchIdPool(want) {
  const ids = [];
  const seen = {};
  const kinds = {};
  const keys = {};
  let cursor;
  let pages = 0;
  const t0 = Date.now();
  while (ids.length < want) {
    const q = { limit: Math.min(1000, Math.max(1, want - ids.length)) };
    if (cursor) q.cursor = cursor;
    const res = getList(q, { ep: 'setup' }, { body: true });
    pages++;
    if (res.status !== 200) {
      console.warn(`id pool: GET /data${listQuery(q)} answered ${res.status}; stopping with ${ids.length} ids`);
      break;
    }
    const page = jget(res, 'items.#.id') || [];
    const pageKinds = jget(res, 'items.#.kind') || [];
    let added = 0;
    for (const id of page) {
      if (typeof id === 'string' && !seen[id]) {
        seen[id] = true;
        ids.push(id);
        added++;
      }
    }
    for (const k of pageKinds) if (typeof k === 'string') kinds[k] = true;
    for (const k of jget(res, 'items.#.key') || []) if (typeof k === 'string') keys[k] = true;
    cursor = jget(res, 'next_cursor');
    if (!cursor || added === 0) break; // end of data (or the floor's static page)
  }
  console.log(`id pool: ${ids.length} ids from ${pages} pages in ${Date.now() - t0} ms`);
  return { ids, kinds: Object.keys(kinds), keys: Object.keys(keys) };
}

export function requirePool(pool, what) {
  if (pool.ids.length === 0 && !FLOOR) {
    exec.test.abort(
      `${what}: GET ${QUERY_URL}/data returned no records; seed first ` +
        '(target/release/projector seed --count N) or point QUERY_URL/BASE_URL at a loaded stack',
    );
  }
  if (pool.ids.length === 0) pool.ids.push('00000000-0000-7000-8000-000000000000');
  return pool;
}

// ---------------------------------------------------------------- summary

function fmtVal(contains, v) {
  if (v === undefined || v === null) return '-';
  if (contains === 'time') {
    if (v >= 1000) return `${(v / 1000).toFixed(2)}s`;
    if (v >= 1) return `${v.toFixed(2)}ms`;
    return `${(v * 1000).toFixed(0)}µs`;
  }
  if (contains === 'data') {
    if (v >= 1 << 20) return `${(v / (1 << 20)).toFixed(1)} MiB`;
    if (v >= 1 << 10) return `${(v / (1 << 10)).toFixed(1)} KiB`;
    return `${v} B`;
  }
  return Number.isInteger(v) ? String(v) : v.toFixed(2);
}

// A compact text summary (k6's own is replaced when handleSummary is defined,
// and the jslib textSummary needs network access).
export function textSummary(name, data) {
  const lines = [];
  const st = data.state || {};
  lines.push('');
  lines.push(`=== ${name}  (${(st.testRunDurationMs / 1000 || 0).toFixed(1)}s)  cmd=${CMD_URL}  query=${QUERY_URL}${FLOOR ? '  [FLOOR]' : ''}${TARGETS ? '  [TARGETS]' : ''}`);
  const names = Object.keys(data.metrics).sort();
  let failed = 0;
  for (const m of names) {
    if (m.startsWith('tl_')) continue; // the timelines are for report.py
    const mt = data.metrics[m];
    const v = mt.values || {};
    let desc;
    if (mt.type === 'trend') {
      if (!v.count && m.indexOf('{') < 0 && v.max === 0) continue;
      desc = `count=${v.count ?? '-'} avg=${fmtVal(mt.contains, v.avg)} p50=${fmtVal(mt.contains, v.med)} p95=${fmtVal(mt.contains, v['p(95)'])} p99=${fmtVal(mt.contains, v['p(99)'])} max=${fmtVal(mt.contains, v.max)}`;
    } else if (mt.type === 'counter') {
      desc = `count=${fmtVal(mt.contains, v.count)} rate=${fmtVal('', v.rate)}/s`;
    } else if (mt.type === 'rate') {
      desc = `${(100 * (v.rate || 0)).toFixed(2)}% (${v.passes || 0} of ${(v.passes || 0) + (v.fails || 0)})`;
    } else {
      desc = `value=${fmtVal(mt.contains, v.value)} min=${fmtVal(mt.contains, v.min)} max=${fmtVal(mt.contains, v.max)}`;
    }
    lines.push(`  ${m.padEnd(48)} ${desc}`);
    for (const [expr, res] of Object.entries(mt.thresholds || {})) {
      if (!res.ok) failed++;
      lines.push(`    ${res.ok ? 'PASS' : 'FAIL'}  ${expr}`);
    }
  }
  const checks = [];
  const walk = (g) => {
    for (const c of g.checks || []) checks.push(c);
    for (const sub of g.groups || []) walk(sub);
  };
  if (data.root_group) walk(data.root_group);
  for (const c of checks) {
    if (c.fails > 0) lines.push(`  check FAIL  ${c.name}: ${c.fails} of ${c.passes + c.fails} failed`);
  }
  lines.push(`  thresholds: ${failed === 0 ? 'all passed' : `${failed} FAILED`}`);
  lines.push('');
  return lines.join('\n');
}

// handleSummary helper (SCENARIO_NAME overrides the name): JSON to SUMMARY_PATH (default
// loadtest/results/<name>.json, relative to the working directory) plus the
// text summary to stdout. The JSON gets a `config` member describing the run.
export function summary(name, data, config = {}) {
  name = env('SCENARIO_NAME', name); // e.g. read_id_6k when run at another rate
  const path = env('SUMMARY_PATH', `loadtest/results/${name}.json`);
  data.config = Object.assign(
    {
      scenario: name,
      cmd_url: CMD_URL,
      query_url: QUERY_URL,
      floor: FLOOR,
      gateway: GATEWAY,
      targets: TARGETS,
      duration: dur(),
      payload_bytes: env('PAYLOAD_BYTES', '256'),
      label: env('LABEL', ''),
      timeline: TL.n > 0 ? { width_s: TL.width, buckets: TL.n, keys: Object.keys(TL.keys) } : null,
    },
    config,
  );
  const out = { stdout: textSummary(name, data) };
  out[path] = JSON.stringify(data, null, 1);
  return out;
}

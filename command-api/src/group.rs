//! Group commit for single-record `POST /data`, one committer per HTTP
//! worker (see `startup`).
//!
//! Under load most of the write path's cost is per statement, not per
//! record: a round trip, a plan, a commit and its WAL flush. Requests that
//! arrive while `WRITE_GROUP_IN_FLIGHT` appends are already running wait for
//! one of them and then go in together, in one statement and one commit, so
//! the busier the server the bigger the groups. An idle server appends each
//! request at once, as before.
//!
//! A group commits or fails as a whole: every request in it gets its own
//! answer (201 with its record, or the error). The one exception is bad
//! data that PostgreSQL alone refuses (a 422): then the group is retried one
//! record at a time, so one client's bad record never fails another's.
//! The group hands its committed records to the relay itself, so they are
//! published at once even when a client has gone before its answer.

use std::{sync::Arc, time::Duration};

use shared::{db, ApiError, NewRecord, Record};
use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use crate::{relay::RelayHandle, store};

struct Job {
    record: NewRecord,
    reply: oneshot::Sender<Result<Record, ApiError>>,
}

/// The handlers' end: cheap to clone.
#[derive(Clone)]
pub struct GroupCommitter {
    tx: mpsc::UnboundedSender<Job>,
}

#[derive(Clone)]
struct Sink {
    pool: PgPool,
    relay: RelayHandle,
    timeout: Duration,
}

impl GroupCommitter {
    /// `in_flight` appends at a time, each of up to `max_group` records.
    pub fn start(
        pool: PgPool,
        relay: RelayHandle,
        timeout: Duration,
        in_flight: usize,
        max_group: usize,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let sink = Sink {
            pool,
            relay,
            timeout,
        };
        tokio::spawn(dispatch(
            sink,
            rx,
            Arc::new(Semaphore::new(in_flight.max(1))),
            max_group.max(1),
        ));
        Self { tx }
    }

    /// Appends one record (committed and handed to the relay on `Ok`).
    pub async fn append(&self, record: NewRecord) -> Result<Record, ApiError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Job { record, reply })
            .map_err(|_| ApiError::unavailable("postgres", "the writer has stopped"))?;
        answer
            .await
            .map_err(|_| ApiError::unavailable("postgres", "the append was abandoned"))?
    }
}

/// Takes the first waiting request, waits for a free append slot, then takes
/// everything that queued meanwhile (up to `max_group`) as one group.
async fn dispatch(
    sink: Sink,
    mut rx: mpsc::UnboundedReceiver<Job>,
    slots: Arc<Semaphore>,
    max_group: usize,
) {
    while let Some(first) = rx.recv().await {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut group = Vec::with_capacity(16);
        group.push(first);
        while group.len() < max_group {
            match rx.try_recv() {
                Ok(job) => group.push(job),
                Err(_) => break,
            }
        }
        // A client that gave up (its handler timed out, or it hung up) was
        // told nothing was written: keep it that way when we still can.
        group.retain(|job| !job.reply.is_closed());
        if !group.is_empty() {
            tokio::spawn(commit(sink.clone(), group, slot));
        }
    }
}

async fn commit(sink: Sink, group: Vec<Job>, _slot: OwnedSemaphorePermit) {
    let (records, replies): (Vec<NewRecord>, Vec<_>) =
        group.into_iter().map(|j| (j.record, j.reply)).unzip();
    match append(&sink, records).await {
        Ok(committed) => {
            for (record, reply) in committed.into_iter().zip(replies) {
                let _ = reply.send(Ok(record));
            }
        }
        Err((ApiError::Validation(_), records)) if records.len() > 1 => {
            for (record, reply) in records.into_iter().zip(replies) {
                let answer = match append(&sink, vec![record]).await {
                    Ok(mut one) => one
                        .pop()
                        .ok_or_else(|| ApiError::unavailable("postgres", "no record returned")),
                    Err((e, _)) => Err(e),
                };
                let _ = reply.send(answer);
            }
        }
        Err((e, _)) => {
            for reply in replies {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
}

/// Inserts and hands the committed records to the relay; on an error the
/// commands come back, so a group can be retried one by one.
async fn append(
    sink: &Sink,
    records: Vec<NewRecord>,
) -> Result<Vec<Record>, (ApiError, Vec<NewRecord>)> {
    match db::bounded(sink.timeout, store::insert(&sink.pool, &records, None)).await {
        Ok(Some(inserted)) => {
            let committed = inserted.into_records(records);
            sink.relay.committed(committed.clone());
            Ok(committed)
        }
        Ok(None) => Err((
            ApiError::unavailable("postgres", "insert returned no rows"),
            records,
        )),
        Err(e) => Err((e, records)),
    }
}

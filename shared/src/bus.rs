//! The message format on the bus (documented in the README).
//!
//! One AMQP message carries a batch of committed records, in `seq` order:
//! `{"v": 1, "records": [record, ...]}` with each record exactly as the API
//! serves it. Published persistent (delivery mode 2) to the fanout exchange,
//! `content-type: application/json`, `type: records.v1`.

use serde::{Deserialize, Serialize};

use crate::Record;

pub const MESSAGE_VERSION: u32 = 1;
pub const MESSAGE_TYPE: &str = "records.v1";

#[derive(Debug, Serialize, Deserialize)]
pub struct RecordsMessage {
    pub v: u32,
    pub records: Vec<Record>,
}

/// The same message, serialised from borrowed records (no copy to publish).
#[derive(Debug, Serialize)]
pub struct RecordsMessageRef<'a> {
    pub v: u32,
    pub records: &'a [Record],
}

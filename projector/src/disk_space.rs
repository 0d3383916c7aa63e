//! Will a seed fit on the disk? A PostgreSQL whose disk fills during a COPY
//! stops (a WAL write that fails is a PANIC), and every service with it. So
//! before it writes anything, `projector seed` estimates what its records
//! take on each database server's file system and refuses a seed that does
//! not fit (`--check-disk no` seeds anyway).
//!
//! A server is checked where its data directory is on this machine (reached
//! through a socket or loopback, and the directory is here); one that is not
//! is named in a warning and left unchecked. The sizes were measured by
//! seeds into empty databases on PostgreSQL 15 (loadtest/README.md, "At 100
//! million records").

use std::{
    collections::BTreeMap,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use anyhow::bail;

/// The generator's fixed fields (`{"n":SEQ,"amount":X,"note":""}`) make a
/// payload at least about this long whatever size is asked for: 38-42 bytes
/// for seqs below 10^10, counted at the top so the estimate errs on the safe
/// side.
const PAYLOAD_FLOOR: usize = 42;
/// Bytes per record, tables and indexes, with payloads of `BASE_PAYLOAD`
/// bytes, and per payload byte more: the write log keeps the payload, the
/// read model the whole record as JSON. The key's index leads with the
/// record's range of seqs since session 53: 8.7 bytes more per record,
/// measured at 45 M records (built beside the index it replaced).
const WRITE_BASE: f64 = 203.0;
const WRITE_PER_BYTE: f64 = 0.93;
const READ_BASE: f64 = 428.0;
const READ_PER_BYTE: f64 = 0.90;
const BASE_PAYLOAD: f64 = 44.0;
/// The measured sizes varied by a few percent with the order of the COPY's
/// chunks and the free space PostgreSQL found in the tables' pages.
const MARGIN: f64 = 1.10;

/// The mean stored payload when sizes are drawn uniformly from `lo..=hi`
/// (sizes below the floor are stored at the floor).
fn mean_payload(lo: usize, hi: usize) -> f64 {
    let sizes = (hi - lo + 1) as f64;
    let below = (hi.min(PAYLOAD_FLOOR) + 1).saturating_sub(lo) as f64;
    let top_lo = lo.max(PAYLOAD_FLOOR + 1);
    let above = (hi + 1).saturating_sub(top_lo) as f64;
    (below * PAYLOAD_FLOOR as f64 + above * (top_lo + hi) as f64 / 2.0) / sizes
}

/// Bytes one record takes in the write log and in the read model.
fn bytes_per_record(mean_payload: f64) -> (f64, f64) {
    let extra = mean_payload - BASE_PAYLOAD;
    (
        WRITE_BASE + WRITE_PER_BYTE * extra,
        READ_BASE + READ_PER_BYTE * extra,
    )
}

/// The two databases a seed writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Database {
    WriteLog,
    ReadModel,
}

impl Database {
    fn name(self) -> &'static str {
        match self {
            Database::WriteLog => "write log",
            Database::ReadModel => "read model",
        }
    }
}

/// Where a database server keeps its files, as it says itself.
#[derive(Debug, Clone)]
struct Server {
    data_directory: PathBuf,
    /// `max_wal_size`: the WAL kept between two checkpoints.
    max_wal_bytes: u64,
    /// The file system the data directory is on, when the server is on this
    /// machine (reached through a socket or loopback, and the directory is
    /// here); `None` otherwise.
    device: Option<u64>,
}

/// What one file system must hold.
#[derive(Debug)]
struct Demand {
    /// A directory on the file system, to measure its free space.
    directory: PathBuf,
    bytes: u64,
    holds: Vec<Database>,
}

/// The bytes `count` records need on each file system, the margin included.
/// `servers` are the servers of the databases whose files can be found; one
/// not on this machine is left out. A server's WAL is counted once however
/// many of the databases it holds.
fn demands(count: u64, mean_payload: f64, servers: &[(Database, Server)]) -> Vec<Demand> {
    let (write, read) = bytes_per_record(mean_payload);
    let mut by_device: BTreeMap<u64, (Demand, Vec<&Path>)> = BTreeMap::new();
    for (holds, server) in servers {
        let Some(dev) = server.device else {
            continue;
        };
        let (demand, counted) = by_device.entry(dev).or_insert_with(|| {
            let demand = Demand {
                directory: server.data_directory.clone(),
                bytes: 0,
                holds: Vec::new(),
            };
            (demand, Vec::new())
        });
        let per_record = match holds {
            Database::WriteLog => write,
            Database::ReadModel => read,
        };
        let mut bytes = count as f64 * per_record;
        if !counted.contains(&server.data_directory.as_path()) {
            counted.push(&server.data_directory);
            bytes += 2.0 * server.max_wal_bytes as f64;
        }
        demand.bytes += (bytes * MARGIN) as u64;
        demand.holds.push(*holds);
    }
    by_device.into_values().map(|(d, _)| d).collect()
}

async fn server(pool: &sqlx::PgPool) -> Result<Server, sqlx::Error> {
    let (directory, wal, local): (String, i64, bool) = sqlx::query_as(
        "SELECT current_setting('data_directory'), \
                pg_size_bytes(current_setting('max_wal_size')), \
                coalesce(host(inet_server_addr()) IN ('127.0.0.1', '::1'), true)",
    )
    .fetch_one(pool)
    .await?;
    let data_directory = PathBuf::from(directory);
    let device = local
        .then(|| std::fs::metadata(&data_directory).ok())
        .flatten()
        .map(|m| m.dev());
    Ok(Server {
        data_directory,
        max_wal_bytes: wal.max(0) as u64,
        device,
    })
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// Refuses a seed of `count` records whose payloads are drawn from
/// `payload`'s range when it would not fit on a local server's disk.
pub async fn check(
    write: &sqlx::PgPool,
    read: &sqlx::PgPool,
    count: u64,
    payload: (usize, usize),
) -> anyhow::Result<()> {
    let mut servers = Vec::with_capacity(2);
    for (holds, pool) in [(Database::WriteLog, write), (Database::ReadModel, read)] {
        match server(pool).await {
            Ok(s) => servers.push((holds, s)),
            // data_directory is for superusers and pg_read_all_settings only.
            Err(e) => tracing::warn!(
                database = holds.name(),
                error = %e,
                "cannot ask the server where its data is: its disk is not checked"
            ),
        }
    }
    verdict(count, payload, &servers)
}

fn verdict(
    count: u64,
    (lo, hi): (usize, usize),
    servers: &[(Database, Server)],
) -> anyhow::Result<()> {
    for (holds, s) in servers {
        if s.device.is_none() {
            tracing::warn!(
                database = holds.name(),
                directory = %s.data_directory.display(),
                "the server's data directory is not on this machine: its disk is not checked"
            );
        }
    }
    let payload = mean_payload(lo, hi);
    let mut short = Vec::new();
    for demand in demands(count, payload, servers) {
        let free = match rustix::fs::statvfs(&demand.directory) {
            Ok(st) => st.f_bavail * st.f_frsize,
            Err(e) => {
                tracing::warn!(
                    directory = %demand.directory.display(),
                    error = %e,
                    "cannot read the free space: not checked"
                );
                continue;
            }
        };
        let said = format!(
            "{count} records of ~{payload:.0}-byte payloads ({}) need ~{} under {}, where {} are free",
            demand
                .holds
                .iter()
                .map(|d| d.name())
                .collect::<Vec<_>>()
                .join(" and "),
            gib(demand.bytes),
            demand.directory.display(),
            gib(free),
        );
        if demand.bytes <= free {
            tracing::info!("{said}: the seed fits");
        } else {
            short.push(format!("{said}: {} short", gib(demand.bytes - free)));
        }
    }
    if !short.is_empty() {
        bail!(
            "the seed would not fit on the databases' disk, and a PostgreSQL whose disk fills \
             stops: {}; free space, seed fewer records or smaller payloads \
             (--payload-bytes 16-48), or seed anyway with --check-disk no",
            short.join("; ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(dir: &str, wal_gib: u64, device: Option<u64>) -> Server {
        Server {
            data_directory: dir.into(),
            max_wal_bytes: wal_gib << 30,
            device,
        }
    }

    #[test]
    fn sizes_below_the_fixed_fields_are_stored_at_the_floor() {
        assert_eq!(mean_payload(16, 16), PAYLOAD_FLOOR as f64);
        assert_eq!(mean_payload(16, 42), PAYLOAD_FLOOR as f64);
        assert_eq!(mean_payload(64, 512), 288.0);
        // 16..=48: 27 sizes stored as 42, then 43..=48 as asked.
        let expected = (27.0 * 42.0 + (43..=48).sum::<usize>() as f64) / 33.0;
        assert!((mean_payload(16, 48) - expected).abs() < 1e-9);
    }

    #[test]
    fn the_model_is_within_five_percent_of_what_seeds_took() {
        // Bytes per record in both databases after seeds into empty ones on
        // PostgreSQL 15 (loadtest/README.md, "At 100 million records").
        for ((lo, hi), measured) in [((16, 48), 622.0), ((32, 96), 677.0), ((64, 512), 1065.0)] {
            let (write, read) = bytes_per_record(mean_payload(lo, hi));
            let ratio = (write + read) / measured;
            assert!((0.95..=1.05).contains(&ratio), "{lo}-{hi}: {ratio}");
        }
    }

    #[test]
    fn two_databases_of_one_server_share_its_wal_and_its_file_system() {
        let s = server("/var/lib/pg", 1, Some(7));
        let servers = [(Database::WriteLog, s.clone()), (Database::ReadModel, s)];
        let d = demands(1_000_000, 288.0, &servers);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].holds, [Database::WriteLog, Database::ReadModel]);
        let (w, r) = bytes_per_record(288.0);
        let expected = (1e6 * (w + r) + 2.0 * (1u64 << 30) as f64) * MARGIN;
        assert!((d[0].bytes as f64 / expected - 1.0).abs() < 1e-6, "{d:?}");
    }

    #[test]
    fn servers_on_two_file_systems_are_checked_apart_and_remote_ones_not_at_all() {
        let servers = [
            (Database::WriteLog, server("/disk-a/pg", 1, Some(1))),
            (Database::ReadModel, server("/disk-b/pg", 2, Some(2))),
        ];
        let two = demands(10, 100.0, &servers);
        assert_eq!(two.len(), 2);
        assert_eq!(two[0].holds, [Database::WriteLog]);
        assert!(
            two[1].bytes > two[0].bytes,
            "more WAL and a larger record: {two:?}"
        );
        let servers = [
            servers[0].clone(),
            (Database::ReadModel, server("/disk-b/pg", 2, None)),
        ];
        let one = demands(10, 100.0, &servers);
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].directory, Path::new("/disk-a/pg"));
    }

    #[test]
    fn the_floor_bounds_what_the_generator_writes_for_the_smallest_size() {
        use rand::{rngs::SmallRng, SeedableRng};
        let mut rng = SmallRng::seed_from_u64(1);
        for seq in [10_000_000i64, 99_999_999, 100_000_000, 9_999_999_999] {
            let lengths: Vec<usize> = (0..200)
                .map(|_| crate::seed::payload_of(seq, 16, &mut rng).len())
                .collect();
            let mean = lengths.iter().sum::<usize>() as f64 / lengths.len() as f64;
            assert!(
                lengths.iter().all(|&n| n <= PAYLOAD_FLOOR),
                "{seq}: {lengths:?}"
            );
            assert!(mean >= PAYLOAD_FLOOR as f64 - 3.0, "{seq}: {mean}");
        }
    }

    #[test]
    fn a_seed_larger_than_the_disk_is_refused_and_a_small_one_is_not() {
        // The crate's own directory stands for a local server's (no WAL, so
        // that a nearly full disk still takes the small seed).
        let dir = env!("CARGO_MANIFEST_DIR");
        let here = server(dir, 0, Some(std::fs::metadata(dir).unwrap().dev()));
        let servers = [
            (Database::WriteLog, here.clone()),
            (Database::ReadModel, here.clone()),
        ];
        assert!(verdict(1000, (16, 48), &servers).is_ok());
        let err = verdict(1_000_000_000_000_000, (64, 512), &servers)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("would not fit") && err.contains("--check-disk no"),
            "{err}"
        );
        // A server elsewhere is not checked, whatever the count.
        let remote = Server {
            device: None,
            ..here.clone()
        };
        let servers = [
            (Database::WriteLog, remote.clone()),
            (Database::ReadModel, remote),
        ];
        assert!(verdict(1_000_000_000_000_000, (64, 512), &servers).is_ok());
    }
}

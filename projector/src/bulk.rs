//! Settings for the projector's bulk commands, `seed` and `rebuild`.

use std::time::Duration;

use shared::Settings;

/// The bulk commands' own `statement_timeout`, in place of
/// `DB_STATEMENT_TIMEOUT_MS`. That bound (5 s by default) is the services'
/// answer to a slow query; a bulk statement's time follows the machine and
/// the data (an index build over the whole read model, a chunk's COPY on a
/// busy VM), and one of the seed's ran past 5 s and failed a 10 M seed half
/// way (loadtest/RUNS.md, the thirty-sixth run). Ten minutes still ends a
/// command against a server that stopped answering.
pub const STATEMENT_TIMEOUT: Duration = Duration::from_secs(600);

pub fn settings(settings: &Settings) -> Settings {
    Settings {
        db_statement_timeout: STATEMENT_TIMEOUT,
        ..settings.clone()
    }
}

//! Ordinary diagnostics (SPEC X-2): `tracing`, to the journal through `tracing-journald` when
//! stderr is the journal and the journal socket is the default one, else as text on stderr.
//! Audit events and alerts do not go through here (see `journal.rs`).

use std::path::Path;

use tracing::level_filters::LevelFilter;
use tracing_subscriber::prelude::*;

/// The journal socket tracing-journald writes to (it cannot be changed).
const DEFAULT_JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";

/// Install the global subscriber. `OUTLIVE_LOG` sets the level (error, warn, info, debug,
/// trace; default info). Safe to call once; later calls do nothing.
pub(crate) fn init(journal_socket: &Path) {
    let level = std::env::var("OUTLIVE_LOG")
        .ok()
        .and_then(|l| l.parse::<LevelFilter>().ok())
        .unwrap_or(LevelFilter::INFO);
    if super::journal::stderr_is_journal()
        && journal_socket == Path::new(DEFAULT_JOURNAL_SOCKET)
        && let Ok(layer) = tracing_journald::layer()
    {
        let layer = layer.with_syslog_identifier(crate::audit::SYSLOG_IDENTIFIER.to_string());
        let _ = tracing_subscriber::registry()
            .with(layer.with_filter(level))
            .try_init();
        return;
    }
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(false);
    let _ = tracing_subscriber::registry()
        .with(fmt.with_filter(level))
        .try_init();
}

//! Ordinary diagnostics (SPEC X-2): `tracing`, to the journal through `tracing-journald` when
//! stderr is the journal and the journal socket is the default one, else as text on stderr.
//! Audit events and alerts do not go through here (see `journal.rs`).

use std::path::Path;

use tracing::level_filters::LevelFilter;
use tracing_subscriber::prelude::*;

/// The journal socket tracing-journald writes to (it cannot be changed).
const DEFAULT_JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";

/// Routine diagnostics are info (PRIORITY 6), not notice: tracing-journald's default maps
/// `INFO` to 5, which `journalctl -p notice` would show among the events that need an
/// operator (those go through `journal.rs` with their own priorities).
fn priorities() -> tracing_journald::PriorityMappings {
    use tracing_journald::Priority;
    tracing_journald::PriorityMappings {
        info: Priority::Informational,
        debug: Priority::Debug,
        ..tracing_journald::PriorityMappings::new()
    }
}

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
        let layer = layer
            .with_syslog_identifier(crate::audit::SYSLOG_IDENTIFIER.to_string())
            .with_priority_mappings(priorities());
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

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_journald::Priority;

    /// Issue 15: routine diagnostics at PRIORITY 6, debug at 7; warnings and errors keep
    /// theirs.
    #[test]
    fn x2_routine_diagnostics_are_info_not_notice() {
        let p = priorities();
        // The discriminants are the journal's PRIORITY= digits.
        assert_eq!((p.info, p.info as u8), (Priority::Informational, b'6'));
        assert_eq!((p.debug, p.debug as u8), (Priority::Debug, b'7'));
        assert_eq!((p.warn, p.warn as u8), (Priority::Warning, b'4'));
        assert_eq!((p.error, p.error as u8), (Priority::Error, b'3'));
    }
}

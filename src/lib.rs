//! outlive: a system agent that keeps one promise, that an autonomous run outlives its
//! session. Each module names the rules it implements (`L-4`, `Q-14`, …); every rule is
//! explained, with where it lives, in `docs/behaviour.md`, and the shape of the code (its
//! layers, threads and a request's path) in `docs/architecture.md`.
//!
//! Data flows one way: `facts` → `queue` → `drainer` → `posture` → `publish`; `agent` wires
//! them; `cli` is `outlivectl`.

pub(crate) mod agent;
pub mod audit;
pub mod capture;
pub mod cli;
pub mod clock;
pub mod config;
pub mod drainer;
pub mod facts;
#[cfg(feature = "fault-hooks")]
pub mod faults;
pub mod files;
pub mod posture;
pub mod publish;
pub mod queue;
pub(crate) mod sync;

/// Helpers for the unit tests.
#[cfg(test)]
pub(crate) mod testing {
    /// Whether the test runs as root; a test that needs root and does not have it skips with
    /// a message, except under CI, which must run every test.
    pub(crate) fn root(why: &str) -> bool {
        let root = nix::unistd::geteuid().is_root();
        if !root {
            if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
                panic!("required for this test and missing in CI: root ({why})");
            }
            eprintln!("SKIPPED: root ({why})");
        }
        root
    }
}

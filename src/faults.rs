//! Fault hooks for end-to-end tests (DESIGN §4.5), compiled only with the `fault-hooks`
//! feature: `#[cfg(test)]` does not reach the binary that those tests start. A test asks for a
//! fault by creating a file in the agent's runtime directory:
//!
//! - `fault-wedge-<loop>`: the named loop (e.g. `drainer`) wedges at its next wake;
//! - `fault-persist-fails`: every save of the queue state fails, as on a full disk;
//! - `fault-rename-fails-<name>`, `fault-dir-sync-fails-<name>`: a replace of the file `<name>`
//!   fails at its rename, or after it at the directory fsync (`files`).
//!
//! - `fault-boot-id`: the boot id the agent reads instead of the kernel's (a host restart
//!   where no machine can be rebooted: capture's C-4 without systemd).
//!
//! The release build is checked to lack this module (`.ci/run`).

use std::path::PathBuf;
use std::sync::OnceLock;

static DIR: OnceLock<PathBuf> = OnceLock::new();

/// Where fault request files are looked for (the runtime directory). Call once at start.
pub fn init(runtime_dir: PathBuf) {
    let _ = DIR.set(runtime_dir);
}

/// Whether a wedge of `loop_name` was requested.
pub fn wedged(loop_name: &str) -> bool {
    DIR.get()
        .is_some_and(|d| d.join(format!("fault-wedge-{loop_name}")).exists())
}

/// Whether persisting the queue's state must fail (`fault-persist-fails`).
pub fn persist_fails() -> bool {
    DIR.get()
        .is_some_and(|d| d.join("fault-persist-fails").exists())
}

/// Whether a fault file of this name exists.
pub fn requested(name: &str) -> bool {
    DIR.get().is_some_and(|d| d.join(name).exists())
}

/// The boot id a test asks for (`fault-boot-id` holding a UUID).
pub fn boot_id() -> Option<crate::facts::identity::Id128> {
    let text = std::fs::read_to_string(DIR.get()?.join("fault-boot-id")).ok()?;
    crate::facts::identity::Id128::parse(&text)
}

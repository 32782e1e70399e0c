//! The agent's posture (G-1, G-3, G-4): every built-in guard registered with the read that
//! says whether it is genuinely on (registration is unconditional: a component that failed to
//! start reads `off-runtime-divergent`, never `missing`), and the boot snapshot of what was
//! applied. The reads live next to what they read (`posture::getters`, `publish::watchdog`,
//! `publish::journal`, `publish::metrics`).

use std::sync::Arc;

use super::Agent;
use super::runner::Runner;
use crate::clock::SystemClock;
use crate::config::Mode;
use crate::posture::getters::{self, QueueResume, status};
use crate::posture::{Posture, Settings as PostureSettings};
use crate::publish::watchdog;
use crate::queue::SharedQueue;

impl Agent {
    /// The posture with a read for every built-in guard.
    pub(super) fn posture(&self, runner: &Runner) -> Posture {
        let config = self.config();
        let settings = PostureSettings::from_config(&config, self.opts.no_bus, self.watchdog);
        let owner = if self.mode == Mode::User {
            nix::unistd::getuid().as_raw()
        } else {
            0
        };
        let mut p = Posture::new(
            &self.config_path,
            self.opts.config.is_some(),
            self.paths.clone(),
            (*config).clone(),
            settings,
            owner,
            Arc::clone(&self.attention),
            Arc::new(SystemClock),
        );
        let resume = QueueResume {
            queue: Arc::clone(&self.queue),
            drainer: runner.handle.clone(),
            no_linger: runner.no_linger,
            systemd: runner.systemd.clone(),
        };
        let applied = self.applied();
        p.register(
            "queue.resume",
            Box::new(move || resume.read(&applied.borrow())),
        );
        let q = Arc::clone(&self.queue);
        p.register(
            "queue.lock.auto_heal",
            Box::new(move || getters::auto_heal(&q)),
        );
        // The drainer applies these on start and reload.
        let applied = self.applied();
        p.register(
            "drainer.auto_resume_stale_pause",
            Box::new(move || status(applied.borrow().drainer.auto_resume_stale_pause)),
        );
        let applied = self.applied();
        p.register(
            "drainer.calm_gate",
            Box::new(move || status(applied.borrow().drainer.calm_gate)),
        );
        let (host, dir) = (Arc::clone(&self.host), config.state_dir.clone());
        p.register(
            "state.host_local",
            Box::new(move || getters::state_host_local(&host.facts, &dir)),
        );
        let (capture, applied) = (runner.capture.clone(), self.applied());
        p.register(
            "capture.watch",
            Box::new(move || {
                getters::capture_watch(&capture.health(), capture.booted, &applied.borrow())
            }),
        );
        let (monitor, supervisor) = (Arc::clone(&self.monitor), self.supervisor);
        p.register(
            "watchdog",
            Box::new(move || watchdog::guard_read(&monitor, supervisor)),
        );
        let (out, no_bus) = (Arc::clone(&runner.out), self.opts.no_bus);
        p.register(
            "publish.dbus",
            Box::new(move || status(!no_bus && out.bus.get().is_some_and(|b| b.is_up()))),
        );
        let journal = Arc::clone(&self.journal);
        p.register("publish.journal", Box::new(move || journal.guard_read()));
        let (applied, writes) = (self.applied(), Arc::clone(&runner.metrics));
        p.register(
            "metrics.textfile",
            Box::new(move || writes.guard_read(applied.borrow().metrics_textfile.is_some())),
        );
        p
    }
}

/// `posture-boot.json` (G-4): what was applied, in the state directory while the lock is held
/// (checked to still be ours), else in the runtime directory (L-6).
pub(super) fn write_boot_snapshot(queue: &SharedQueue, p: &Posture) {
    let text = format!(
        "{}\n",
        serde_json::to_string_pretty(&p.boot_snapshot_json()).unwrap_or_default()
    );
    if let Err(e) = queue
        .lock()
        .write_file(None, "posture-boot.json", text.as_bytes())
    {
        tracing::warn!("cannot write posture-boot.json: {e}");
    }
}

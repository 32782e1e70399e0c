//! The facts worker (SPEC H-3): canonicalising paths and statfs(2) run on one persistent
//! thread, each under a timeout, so that a hung network mount never hangs the caller.
//!
//! At most one probe per mount is outstanding; a mount whose probe timed out reads
//! `unknown/timeout` for 60 s without a new probe. A worker stuck in the kernel is abandoned
//! (it exits once the call returns) and a fresh one serves the next request, so one hung mount
//! does not blind the agent to every other path; at most [`MAX_STUCK`] threads may be stuck at
//! once, after which probes read `timeout` until one comes back.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::classify::{FsProbe, StatfsOutcome};
use super::mountinfo::MountEntry;
use crate::clock::boottime_ms;

/// How long a mount that timed out is not probed again.
pub const TIMEOUT_MEMORY_MS: u64 = 60_000;
/// Most worker threads that may be stuck in the kernel at once.
pub const MAX_STUCK: usize = 4;

type Job = Box<dyn FnOnce() + Send>;

/// Identifies a mount across calls.
pub type MountKey = (u32, PathBuf);

#[derive(Default)]
struct State {
    tx: Option<Sender<Job>>,
    stuck: usize,
    outstanding: HashMap<MountKey, ()>,
    timed_out_at: HashMap<MountKey, u64>,
    spawned: u64,
}

/// Outcome of one job on the worker.
#[derive(Debug, PartialEq, Eq)]
pub enum Run<T> {
    Done(T),
    /// No answer in time, or the mount is known to hang (probe not sent).
    Timeout,
}

/// Handle to the worker; cheap to clone, shared by every caller in the process.
#[derive(Clone, Default)]
pub struct FactsWorker {
    state: Arc<Mutex<State>>,
}

impl FactsWorker {
    /// A worker; its thread starts on first use.
    pub fn new() -> FactsWorker {
        FactsWorker::default()
    }

    /// Number of threads spawned over the worker's life (1 unless some got stuck).
    pub fn threads_spawned(&self) -> u64 {
        self.lock().spawned
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the maps inconsistent in a way that
        // matters (they are caches); keep serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The current worker's sender and its generation (the count of threads spawned so far).
    fn sender(&self, st: &mut State) -> Option<(Sender<Job>, u64)> {
        if st.tx.is_none() {
            if st.stuck >= MAX_STUCK {
                return None;
            }
            let (tx, rx): (Sender<Job>, Receiver<Job>) = mpsc::channel();
            let state = Arc::clone(&self.state);
            let spawned = std::thread::Builder::new()
                .name("outlive-facts".into())
                .spawn(move || {
                    for job in rx {
                        job();
                    }
                    // The channel was dropped: this thread was replaced while stuck.
                    let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
                    st.stuck = st.stuck.saturating_sub(1);
                });
            if spawned.is_err() {
                return None;
            }
            st.spawned += 1;
            st.tx = Some(tx);
        }
        st.tx.clone().map(|tx| (tx, st.spawned))
    }

    /// Run `f` on the worker, waiting at most `timeout`. With a `mount` key, refuse at once
    /// while a probe of that mount is outstanding or timed out in the last 60 s.
    pub fn run<T, F>(&self, mount: Option<&MountKey>, timeout: Duration, f: F) -> Run<T>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let now = boottime_ms();
        let (tx, generation) = {
            let mut st = self.lock();
            if let Some(k) = mount {
                if st.outstanding.contains_key(k) {
                    return Run::Timeout;
                }
                if let Some(&t) = st.timed_out_at.get(k) {
                    if now.saturating_sub(t) < TIMEOUT_MEMORY_MS {
                        return Run::Timeout;
                    }
                    st.timed_out_at.remove(k);
                }
                st.outstanding.insert(k.clone(), ());
            }
            match self.sender(&mut st) {
                Some(sender) => sender,
                None => {
                    if let Some(k) = mount {
                        st.outstanding.remove(k);
                    }
                    return Run::Timeout;
                }
            }
        };

        let (reply_tx, reply_rx): (SyncSender<T>, Receiver<T>) = mpsc::sync_channel(1);
        let started = Arc::new(AtomicBool::new(false));
        let started_in_job = Arc::clone(&started);
        let state = Arc::clone(&self.state);
        let key = mount.cloned();
        let job: Job = Box::new(move || {
            started_in_job.store(true, Ordering::SeqCst);
            let out = f();
            if let Some(k) = &key {
                state
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .outstanding
                    .remove(k);
            }
            let _ = reply_tx.send(out);
        });
        if tx.send(job).is_err() {
            if let Some(k) = mount {
                self.lock().outstanding.remove(k);
            }
            return Run::Timeout;
        }
        match reply_rx.recv_timeout(timeout) {
            Ok(v) => Run::Done(v),
            Err(_) => {
                let mut st = self.lock();
                if started.load(Ordering::SeqCst) {
                    // Our job is stuck in the kernel: remember the mount, abandon the thread.
                    if let Some(k) = mount {
                        st.timed_out_at.insert(k.clone(), boottime_ms());
                    }
                    if st.tx.is_some() && st.spawned == generation {
                        st.tx = None;
                        st.stuck += 1;
                    }
                } else if let Some(k) = mount {
                    // Queued behind another stuck job: not this mount's fault.
                    st.outstanding.remove(k);
                }
                Run::Timeout
            }
        }
    }

    /// Resolve a path to its canonical absolute form on the worker.
    pub fn canonicalize(&self, path: &Path, timeout: Duration) -> Run<std::io::Result<PathBuf>> {
        let p = path.to_path_buf();
        self.run(None, timeout, move || std::fs::canonicalize(p))
    }

    /// A [`FsProbe`] over this worker.
    pub fn probe(&self, timeout: Duration) -> WorkerProbe<'_> {
        WorkerProbe {
            worker: self,
            timeout,
        }
    }
}

/// statfs and existence checks through the worker.
pub struct WorkerProbe<'a> {
    worker: &'a FactsWorker,
    timeout: Duration,
}

impl FsProbe for WorkerProbe<'_> {
    fn statfs(&self, path: &Path, mount: &MountEntry) -> StatfsOutcome {
        let key = (mount.mount_id, mount.mount_point.clone());
        let p = path.to_path_buf();
        match self
            .worker
            .run(Some(&key), self.timeout, move || statfs_now(&p))
        {
            Run::Done(o) => o,
            Run::Timeout => StatfsOutcome::Timeout,
        }
    }

    fn exists(&self, path: &Path) -> Option<bool> {
        let p = path.to_path_buf();
        match self
            .worker
            .run(None, self.timeout, move || std::fs::symlink_metadata(&p))
        {
            Run::Done(Ok(_)) => Some(true),
            Run::Done(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => Some(false),
            // EACCES and friends: it may exist; do not claim it does not.
            Run::Done(Err(_)) | Run::Timeout => None,
        }
    }
}

/// statfs(2) now, on the calling thread (the worker).
pub fn statfs_now(path: &Path) -> StatfsOutcome {
    match nix::sys::statfs::statfs(path) {
        Ok(s) => StatfsOutcome::Magic {
            // f_type is a signed word on Linux; the magic numbers are u32 (H-3: compare as u32).
            f_type: s.filesystem_type().0 as u32,
            read_only: statfs_read_only(&s),
        },
        Err(e) => StatfsOutcome::Failed(format!("statfs {}: {e}", path.display())),
    }
}

#[cfg(target_os = "linux")]
fn statfs_read_only(s: &nix::sys::statfs::Statfs) -> bool {
    s.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY)
}

#[cfg(not(target_os = "linux"))]
fn statfs_read_only(_s: &nix::sys::statfs::Statfs) -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::channel;

    #[test]
    fn h3_worker_answers_and_reuses_one_thread() {
        let w = FactsWorker::new();
        for i in 0..5 {
            assert_eq!(
                w.run(None, Duration::from_secs(5), move || i * 2),
                Run::Done(i * 2)
            );
        }
        assert_eq!(w.threads_spawned(), 1);
    }

    #[test]
    fn h3_a_hung_probe_times_out_is_remembered_and_replaced() {
        let w = FactsWorker::new();
        let key: MountKey = (7, "/hung".into());
        let (release_tx, release_rx) = channel::<()>();
        let r = w.run(Some(&key), Duration::from_millis(50), move || {
            let _ = release_rx.recv();
            1
        });
        assert_eq!(r, Run::Timeout);
        // Remembered for 60 s: no new probe is sent (it would return 2 if it ran).
        assert_eq!(
            w.run(Some(&key), Duration::from_secs(5), || 2),
            Run::Timeout
        );
        // Another mount is served by a fresh thread meanwhile.
        let other: MountKey = (8, "/ok".into());
        assert_eq!(
            w.run(Some(&other), Duration::from_secs(5), || 3),
            Run::Done(3)
        );
        assert_eq!(w.threads_spawned(), 2);
        release_tx.send(()).unwrap();
    }

    #[test]
    fn h3_at_most_one_probe_per_mount_outstanding() {
        let w = FactsWorker::new();
        let key: MountKey = (9, "/slow".into());
        let (go_tx, go_rx) = channel::<()>();
        let w2 = w.clone();
        let k2 = key.clone();
        let first = std::thread::spawn(move || {
            w2.run(Some(&k2), Duration::from_secs(10), move || {
                let _ = go_rx.recv();
                1
            })
        });
        // Wait until the first probe is outstanding.
        while !w.lock().outstanding.contains_key(&key) {
            std::thread::yield_now();
        }
        assert_eq!(
            w.run(Some(&key), Duration::from_secs(5), || 2),
            Run::Timeout
        );
        go_tx.send(()).unwrap();
        assert_eq!(first.join().unwrap(), Run::Done(1));
        assert_eq!(
            w.run(Some(&key), Duration::from_secs(5), || 4),
            Run::Done(4)
        );
    }

    #[test]
    fn h3_stuck_threads_are_capped() {
        let w = FactsWorker::new();
        let mut releases = Vec::new();
        for i in 0..MAX_STUCK as u32 {
            let (tx, rx) = channel::<()>();
            releases.push(tx);
            let key: MountKey = (100 + i, format!("/h{i}").into());
            let r = w.run(Some(&key), Duration::from_millis(20), move || {
                let _ = rx.recv();
            });
            assert_eq!(r, Run::Timeout);
        }
        assert_eq!(w.run(None, Duration::from_secs(1), || 1), Run::Timeout);
        drop(releases);
        // Once the stuck threads come back, a new worker can be started.
        let mut ok = false;
        for _ in 0..200 {
            if w.run(None, Duration::from_secs(1), || 1) == Run::Done(1) {
                ok = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(ok, "worker never recovered after stuck threads returned");
    }

    #[test]
    fn h3_statfs_of_proc_is_proc_magic() {
        match statfs_now(Path::new("/proc")) {
            StatfsOutcome::Magic { f_type, .. } => {
                assert_eq!(f_type, super::super::classify::PROC_MAGIC)
            }
            o => panic!("{o:?}"),
        }
    }
}

//! The facts worker (SPEC H-3): canonicalising paths and statfs(2) run on one persistent
//! thread, under a timeout, so that a hung network mount never hangs the caller.
//!
//! A classification is one job on the worker (resolve the path, consult the mount table,
//! decide, statfs where the table allows it), so it costs one handoff. While a job runs statfs
//! it records which mount it is probing; if the caller's timeout expires, that mount is
//! remembered and reads `unknown/timeout` for 60 s without a new probe (so at most one probe per
//! mount is ever outstanding), and the stuck thread is abandoned: it exits when the kernel call
//! returns, and a fresh thread serves the next request. At most [`MAX_STUCK`] threads may be
//! stuck at once; beyond that, requests read `timeout` until one comes back.
//!
//! Handoffs spin briefly before parking (the worker waits for a next job, the caller for its
//! reply): a wakeup across CPUs costs tens of microseconds on virtual machines, a classification
//! itself a few. The spin is bounded ([`WORKER_SPIN`], [`CALLER_SPIN`]), and the worker spins
//! only inside a burst of jobs ([`BURST_GAP`]), so an idle agent, which classifies a few paths
//! a minute, pays at most the caller's short spin per classification.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::classify::{FsProbe, StatfsOutcome};
use super::mountinfo::MountEntry;
use crate::clock::boottime_ms;
use crate::sync::MutexExt;

/// How long a mount that timed out is not probed again.
pub(crate) const TIMEOUT_MEMORY_MS: u64 = 60_000;
/// Most worker threads that may be stuck in the kernel at once.
pub(crate) const MAX_STUCK: usize = 4;
/// How long the worker polls for a next job before parking.
pub(crate) const WORKER_SPIN: Duration = Duration::from_micros(500);
/// A job that arrives within this of the previous one's end is part of a burst: only then
/// does the worker spin for the next.
pub(crate) const BURST_GAP: Duration = Duration::from_millis(2);
/// How long a caller polls for its reply before parking.
pub(crate) const CALLER_SPIN: Duration = Duration::from_micros(200);

type Job = Box<dyn FnOnce() + Send>;

/// Identifies a mount across calls.
pub(crate) type MountKey = (u32, PathBuf);

#[derive(Default)]
struct State {
    tx: Option<Sender<Job>>,
    stuck: usize,
    spawned: u64,
    /// The mount whose statfs is running now, if any.
    probing: Option<MountKey>,
    timed_out_at: HashMap<MountKey, u64>,
}

/// Outcome of one job on the worker.
#[derive(Debug, PartialEq, Eq)]
pub enum Run<T> {
    Done(T),
    /// No answer in time.
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
        self.state.locked().spawned
    }

    /// Whether `mount` timed out within the last 60 s.
    pub fn recently_timed_out(&self, mount: &MountKey) -> bool {
        self.state
            .locked()
            .timed_out_at
            .get(mount)
            .is_some_and(|&t| boottime_ms().saturating_sub(t) < TIMEOUT_MEMORY_MS)
    }

    /// The current worker's sender and its generation (threads spawned so far).
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
                    worker_loop(&rx);
                    // The channel was dropped: this thread was replaced while stuck.
                    let mut st = state.locked();
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

    /// Run `f` on the worker, waiting at most `timeout`. If the job started and did not
    /// finish in time, the mount it was probing (if any) is remembered as hung and the thread
    /// is abandoned.
    pub fn run<T, F>(&self, timeout: Duration, f: F) -> Run<T>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let deadline = Instant::now() + timeout;
        let Some((tx, generation)) = self.sender(&mut self.state.locked()) else {
            return Run::Timeout;
        };
        let (reply_tx, reply_rx): (SyncSender<T>, Receiver<T>) = mpsc::sync_channel(1);
        let started = Arc::new(AtomicBool::new(false));
        let started_in_job = Arc::clone(&started);
        let job: Job = Box::new(move || {
            started_in_job.store(true, Ordering::SeqCst);
            let _ = reply_tx.send(f());
        });
        if tx.send(job).is_err() {
            return Run::Timeout;
        }
        let spin_until = (Instant::now() + CALLER_SPIN).min(deadline);
        loop {
            match reply_rx.try_recv() {
                Ok(v) => return Run::Done(v),
                Err(TryRecvError::Disconnected) => return Run::Timeout,
                Err(TryRecvError::Empty) if Instant::now() < spin_until => std::hint::spin_loop(),
                Err(TryRecvError::Empty) => break,
            }
        }
        match reply_rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(v) => Run::Done(v),
            Err(RecvTimeoutError::Disconnected) => Run::Timeout,
            Err(RecvTimeoutError::Timeout) => {
                let mut st = self.state.locked();
                // A job still queued behind a stuck one is not stuck itself.
                if started.load(Ordering::SeqCst) && st.spawned == generation && st.tx.is_some() {
                    if let Some(m) = st.probing.take() {
                        st.timed_out_at.insert(m, boottime_ms());
                    }
                    st.tx = None;
                    st.stuck += 1;
                }
                Run::Timeout
            }
        }
    }

    /// A probe for use *inside* a job on the worker: statfs inline, with the per-mount
    /// bookkeeping (a mount that timed out recently is not probed again).
    pub fn inline_probe(&self) -> InlineProbe<'_> {
        InlineProbe { worker: self }
    }
}

fn worker_loop(rx: &Receiver<Job>) {
    let mut last_done: Option<Instant> = None;
    loop {
        let job = match rx.recv() {
            Ok(j) => j,
            Err(_) => return,
        };
        // Spin for a next job only inside a burst (this job came soon after the last one): an
        // idle agent classifies a few paths a minute, and a spin after each would be wasted.
        let in_burst = last_done.is_some_and(|t| t.elapsed() < BURST_GAP);
        job();
        last_done = Some(Instant::now());
        if !in_burst {
            continue;
        }
        // Poll briefly for a next job before parking again.
        let until = Instant::now() + WORKER_SPIN;
        loop {
            match rx.try_recv() {
                Ok(j) => {
                    j();
                    last_done = Some(Instant::now());
                }
                Err(TryRecvError::Disconnected) => return,
                Err(TryRecvError::Empty) if Instant::now() < until => std::hint::spin_loop(),
                Err(TryRecvError::Empty) => break,
            }
        }
    }
}

/// statfs and existence checks run inline on the worker thread (see [`FactsWorker::inline_probe`]).
pub struct InlineProbe<'a> {
    worker: &'a FactsWorker,
}

impl FsProbe for InlineProbe<'_> {
    fn statfs(&self, path: &Path, mount: &MountEntry) -> StatfsOutcome {
        let key = (mount.mount_id, mount.mount_point.clone());
        {
            let mut st = self.worker.state.locked();
            if let Some(&t) = st.timed_out_at.get(&key) {
                if boottime_ms().saturating_sub(t) < TIMEOUT_MEMORY_MS {
                    return StatfsOutcome::Timeout;
                }
                st.timed_out_at.remove(&key);
            }
            st.probing = Some(key);
        }
        let out = statfs_now(path);
        self.worker.state.locked().probing = None;
        out
    }

    fn exists(&self, path: &Path) -> Option<bool> {
        match std::fs::symlink_metadata(path) {
            Ok(_) => Some(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some(false),
            // EACCES and friends: it may exist; do not claim it does not.
            Err(_) => None,
        }
    }
}

/// statfs(2) now, on the calling thread (the worker).
pub(crate) fn statfs_now(path: &Path) -> StatfsOutcome {
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

    fn mount(id: u32, mp: &str) -> MountEntry {
        super::super::mountinfo::parse_line(&format!("{id} 1 0:{id} / {mp} rw - nfs4 srv:/x rw"))
            .unwrap()
    }

    #[test]
    fn h3_worker_answers_and_reuses_one_thread() {
        let w = FactsWorker::new();
        for i in 0..5 {
            assert_eq!(
                w.run(Duration::from_secs(5), move || i * 2),
                Run::Done(i * 2)
            );
        }
        assert_eq!(w.threads_spawned(), 1);
    }

    #[test]
    fn h3_a_hung_probe_times_out_is_remembered_and_the_thread_replaced() {
        let w = FactsWorker::new();
        let m = mount(7, "/hung");
        let key: MountKey = (7, "/hung".into());
        let (release_tx, release_rx) = channel::<()>();
        let w2 = w.clone();
        let m2 = m.clone();
        // A job that marks the mount as being probed, then hangs like statfs on a dead server.
        let r = w.run(Duration::from_millis(50), move || {
            w2.state.locked().probing = Some((m2.mount_id, m2.mount_point.clone()));
            let _ = release_rx.recv();
        });
        assert_eq!(r, Run::Timeout);
        assert!(w.recently_timed_out(&key));
        // Remembered for 60 s: the inline probe does not statfs it again.
        let w3 = w.clone();
        let out = w.run(Duration::from_secs(5), move || {
            w3.inline_probe().statfs(Path::new("/hung/x"), &m)
        });
        assert_eq!(out, Run::Done(StatfsOutcome::Timeout));
        assert_eq!(
            w.threads_spawned(),
            2,
            "a fresh thread served the next request"
        );
        release_tx.send(()).unwrap();
    }

    #[test]
    fn h3_a_job_queued_behind_a_stuck_one_does_not_blame_its_mount() {
        let w = FactsWorker::new();
        let (release_tx, release_rx) = channel::<()>();
        let (started_tx, started_rx) = channel::<()>();
        let w1 = w.clone();
        let first = std::thread::spawn(move || {
            w1.run(Duration::from_secs(10), move || {
                started_tx.send(()).unwrap();
                let _ = release_rx.recv();
            })
        });
        started_rx.recv().unwrap();
        // Queued behind the running job: times out without having started.
        assert_eq!(w.run(Duration::from_millis(50), || ()), Run::Timeout);
        assert_eq!(
            w.threads_spawned(),
            1,
            "the running thread is not declared stuck by a queued job"
        );
        release_tx.send(()).unwrap();
        assert_eq!(first.join().unwrap(), Run::Done(()));
    }

    #[test]
    fn h3_stuck_threads_are_capped_and_recover() {
        let w = FactsWorker::new();
        let mut releases = Vec::new();
        for _ in 0..MAX_STUCK {
            let (tx, rx) = channel::<()>();
            releases.push(tx);
            assert_eq!(
                w.run(Duration::from_millis(20), move || {
                    let _ = rx.recv();
                }),
                Run::Timeout
            );
        }
        assert_eq!(
            w.run(Duration::from_secs(1), || 1),
            Run::Timeout,
            "no thread beyond the cap"
        );
        drop(releases);
        let mut ok = false;
        for _ in 0..200 {
            if w.run(Duration::from_secs(1), || 1) == Run::Done(1) {
                ok = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(
            ok,
            "the worker never recovered after the stuck threads returned"
        );
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

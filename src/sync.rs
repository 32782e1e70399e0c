//! One policy for poisoned locks, in one place (as `console-subscriber/src/sync.rs` does).
//!
//! A std lock is poisoned when a thread panicked while holding it. The agent recovers the guard
//! and goes on: every structure it guards is changed by whole assignments or by
//! compare-and-set transitions that are applied to a copy first (the queue's `commit`), so a
//! panic leaves the last consistent value, and a safety agent that keeps running and reports
//! is better than one that aborts into a restart loop over a display cache. A panic is itself
//! visible: the panic hook logs it and a wedged loop stops feeding the watchdog.
//!
//! Use `m.locked()`, `rw.reading()`, `rw.writing()` instead of `lock()`, `read()`, `write()`
//! on `std::sync` locks; nowhere else recovers a poisoned guard by hand.

use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// A std `Mutex` locked under the crate's poisoning policy.
pub(crate) trait MutexExt<T: ?Sized> {
    /// The guard, poisoned or not.
    fn locked(&self) -> MutexGuard<'_, T>;
}

impl<T: ?Sized> MutexExt<T> for Mutex<T> {
    fn locked(&self) -> MutexGuard<'_, T> {
        self.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A std `RwLock` taken under the crate's poisoning policy.
pub(crate) trait RwLockExt<T: ?Sized> {
    /// A read guard, poisoned or not.
    fn reading(&self) -> RwLockReadGuard<'_, T>;
    /// The write guard, poisoned or not.
    fn writing(&self) -> RwLockWriteGuard<'_, T>;
}

impl<T: ?Sized> RwLockExt<T> for RwLock<T> {
    fn reading(&self) -> RwLockReadGuard<'_, T> {
        self.read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn writing(&self) -> RwLockWriteGuard<'_, T> {
        self.write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_poisoned_lock_yields_its_last_value() {
        let m = Arc::new(Mutex::new(1));
        let rw = Arc::new(RwLock::new(2));
        let (m2, rw2) = (Arc::clone(&m), Arc::clone(&rw));
        let _ = std::thread::spawn(move || {
            let _g = m2.lock().unwrap();
            let _w = rw2.write().unwrap();
            panic!("poison both");
        })
        .join();
        assert!(m.is_poisoned() && rw.is_poisoned());
        *m.locked() += 1;
        assert_eq!(*m.locked(), 2);
        *rw.writing() += 1;
        assert_eq!(*rw.reading(), 3);
    }
}

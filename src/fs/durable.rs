//! The durability barrier with group commit.
//!
//! Making committed changes durable costs two device flushes: the packs (`fdatasync`)
//! and then the metadata (sled's flush and `fdatasync` of its log), ~0.5-0.7 ms together
//! on this machine. (An fsync of a file whose only pending changes are logged data
//! flushes needs only the first: see journal.rs.) When
//! many writers fsync at once (four guests, or an NFS server's COMMITs), one barrier
//! covers all of them: a caller needs *a barrier that started after its changes were
//! committed*. The first caller to find no barrier running runs one for everyone who
//! arrived before it started; callers that arrive while it runs wait for it and then run
//! (or join) the next one. So N concurrent fsyncs cost about two barriers, not N.

use std::collections::VecDeque;

use parking_lot::{Condvar, Mutex};

use crate::error::{FsError, Result};

/// Failures remembered for waiters that wake late (a barrier's outcome is looked up by
/// its generation).
const FAILURES_KEPT: usize = 64;

#[derive(Default)]
struct State {
    /// Generation of the last barrier started.
    started: u64,
    /// Generation of the last barrier finished (barriers run one at a time, in order).
    finished: u64,
    running: bool,
    /// Recent failed generations and their error text.
    failures: VecDeque<(u64, String)>,
}

/// Shares barriers between concurrent callers.
#[derive(Default)]
pub(crate) struct GroupSync {
    state: Mutex<State>,
    done: Condvar,
}

impl GroupSync {
    /// Returns once a run of `barrier` that started after this call has finished; runs it
    /// here when no other caller is running one. `barrier` must make durable everything
    /// committed before it starts.
    pub(crate) fn sync(&self, barrier: impl FnOnce() -> Result<()>) -> Result<()> {
        let mut st = self.state.lock();
        let target = st.started + 1;
        let mut barrier = Some(barrier);
        loop {
            if st.finished >= target {
                return match st.failures.iter().find(|(g, _)| *g == target) {
                    Some((_, msg)) => Err(FsError::Meta(format!("sync failed: {msg}"))),
                    None => Ok(()),
                };
            }
            if !st.running {
                // Lead generation `target` (every earlier one has finished).
                st.running = true;
                st.started += 1;
                let generation = st.started;
                drop(st);
                // Finishes the generation even if the barrier panics, so that later
                // callers are not left waiting for it.
                let mut lead = Lead {
                    group: self,
                    generation,
                    failure: Some("the barrier panicked".into()),
                };
                let run = barrier.take().map(|f| f()).unwrap_or(Ok(()));
                lead.failure = run.as_ref().err().map(|e| e.to_string());
                drop(lead);
                return run;
            }
            self.done.wait(&mut st);
        }
    }
}

/// Finishes a led generation when dropped (also on unwinding).
struct Lead<'a> {
    group: &'a GroupSync,
    generation: u64,
    failure: Option<String>,
}

impl Drop for Lead<'_> {
    fn drop(&mut self) {
        let mut st = self.group.state.lock();
        st.running = false;
        st.finished = self.generation;
        if let Some(msg) = self.failure.take() {
            st.failures.push_back((self.generation, msg));
            if st.failures.len() > FAILURES_KEPT {
                st.failures.pop_front();
            }
        }
        drop(st);
        self.group.done.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Barrier};

    #[test]
    fn concurrent_callers_share_barriers() {
        let g = Arc::new(GroupSync::default());
        let runs = Arc::new(AtomicU64::new(0));
        let start = Arc::new(Barrier::new(8));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (g, runs, start) = (g.clone(), runs.clone(), start.clone());
                std::thread::spawn(move || {
                    start.wait();
                    for _ in 0..50 {
                        g.sync(|| {
                            runs.fetch_add(1, Ordering::SeqCst);
                            std::thread::sleep(std::time::Duration::from_millis(1));
                            Ok(())
                        })
                        .unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let n = runs.load(Ordering::SeqCst);
        assert!(n < 400, "{n} barriers for 400 syncs: none shared");
    }

    #[test]
    fn a_caller_waits_for_a_barrier_that_started_after_it() {
        // A barrier already running when a caller arrives does not count for it.
        let g = Arc::new(GroupSync::default());
        let log = Arc::new(Mutex::new(Vec::new()));
        let (entered_tx, entered_rx) = std::sync::mpsc::channel();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let g1 = g.clone();
        let log1 = log.clone();
        let first = std::thread::spawn(move || {
            g1.sync(|| {
                entered_tx.send(()).unwrap();
                release_rx.recv().unwrap();
                log1.lock().push("first");
                Ok(())
            })
        });
        entered_rx.recv().unwrap();
        let g2 = g.clone();
        let log2 = log.clone();
        let second = std::thread::spawn(move || {
            g2.sync(|| {
                log2.lock().push("second");
                Ok(())
            })
        });
        std::thread::sleep(std::time::Duration::from_millis(20));
        release_tx.send(()).unwrap();
        first.join().unwrap().unwrap();
        second.join().unwrap().unwrap();
        assert_eq!(*log.lock(), vec!["first", "second"]);
    }

    #[test]
    fn a_panicking_barrier_does_not_block_later_callers() {
        let g = GroupSync::default();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            g.sync(|| panic!("device gone"))
        }));
        assert!(r.is_err());
        assert!(g.sync(|| Ok(())).is_ok());
    }

    #[test]
    fn failures_reach_the_callers_they_covered() {
        let g = GroupSync::default();
        let err = g.sync(|| Err(FsError::NoSpace("disk full".into())));
        assert!(err.is_err());
        assert!(g.sync(|| Ok(())).is_ok());
    }
}

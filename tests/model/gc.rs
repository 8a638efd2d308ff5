//! Garbage collection in the property test: a plain collection, and one paused at a named
//! step ([`GcAt`]) while another operation runs on the test thread.
//!
//! GC is invisible to the model: whatever ran during it, every byte of the live tree and
//! of every snapshot must read as before. A plain collection must leave exactly the
//! chunks the live tree and the snapshots reach. A collection that raced an operation may
//! keep chunks that operation pinned; a second, quiet collection must then leave exactly
//! the reachable ones.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use thinfs::gc::{self, GcOptions, GcStep};

use super::harness::Harness;
use super::ops::{GcAt, Op};

/// How long a paused collection plus the racing op may take before the test calls it a
/// deadlock (and aborts: a stuck thread cannot be unwound).
const DEADLOCK: Duration = Duration::from_secs(120);

fn options(compact_all: bool) -> GcOptions {
    GcOptions {
        compact_threshold: if compact_all { 1.0 } else { 0.5 },
        ..Default::default()
    }
}

/// Whether `step` is the `at` the op waits for (`seen` counts earlier matches of its kind).
fn hits(at: GcAt, step: GcStep, seen: &AtomicUsize) -> bool {
    let nth = |n: u8| seen.fetch_add(1, Ordering::SeqCst) == n as usize;
    match (at, step) {
        (GcAt::Begun, GcStep::Begun) => true,
        (GcAt::Marked(n), GcStep::Marked(_)) => nth(n),
        (GcAt::MarkDone, GcStep::MarkDone) => true,
        (GcAt::Swept, GcStep::Swept) => nth(0),
        (GcAt::SweepDone, GcStep::SweepDone) => true,
        (GcAt::Copied, GcStep::Copied(_)) => nth(0),
        (GcAt::Repointed, GcStep::Repointed(_)) => nth(0),
        (GcAt::Deleting, GcStep::Deleting(_)) => nth(0),
        (GcAt::Deleted, GcStep::Deleted(_)) => nth(0),
        _ => false,
    }
}

/// Aborts the process unless dropped within [`DEADLOCK`].
struct Watchdog(mpsc::Sender<()>);

impl Watchdog {
    fn arm(what: String) -> Watchdog {
        let (tx, rx) = mpsc::channel::<()>();
        std::thread::spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(DEADLOCK) {
                eprintln!("deadlock: {what} did not finish within {DEADLOCK:?}; aborting");
                std::process::abort();
            }
        });
        Watchdog(tx)
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        let _ = self.0.send(());
    }
}

impl Harness {
    /// A collection with nothing else running.
    pub(super) fn gc(&mut self, compact_all: bool) {
        gc::collect(self.ds(), &options(compact_all), &|_| {})
            .unwrap_or_else(|e| self.fail(format!("gc: {e}")));
        self.last = "ok".into();
        self.check_after_gc(true);
    }

    /// A collection paused at `at` while `op` runs (after it, if the step never comes).
    pub(super) fn gc_with(&mut self, compact_all: bool, at: GcAt, op: &Op) {
        let (outer, step) = (self.op.clone(), self.step);
        let _watchdog = Watchdog::arm(outer.clone());
        // Remounts need the only reference to the store; collections run one at a time.
        let racing = !matches!(
            op,
            Op::Remount | Op::Fsck | Op::Gc { .. } | Op::GcWith { .. }
        );
        let (hit_tx, hit_rx) = mpsc::channel::<()>();
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let hit_tx = Mutex::new(Some(hit_tx));
        let go_rx = Mutex::new(go_rx);
        let seen = AtomicUsize::new(0);
        let mut opts = options(compact_all);
        if racing {
            opts.failpoint = Some(Arc::new(move |step| {
                if hits(at, step, &seen) {
                    if let Some(tx) = hit_tx.lock().unwrap().take() {
                        let _ = tx.send(());
                        let _ = go_rx.lock().unwrap().recv();
                    }
                }
                Ok(())
            }));
        }
        let ds = self.ds.clone().expect("store is open");
        let collector = std::thread::spawn(move || gc::collect(&ds, &opts, &|_| {}));
        // Err: the collection ended (and dropped the failpoint) without reaching `at`.
        let paused = racing && hit_rx.recv().is_ok();
        if paused {
            self.apply(op);
            let _ = go_tx.send(());
        }
        let mut inner_last = std::mem::take(&mut self.last);
        (self.op, self.step) = (outer.clone(), step);
        match collector.join() {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => self.fail(format!("gc: {e}")),
            Err(_) => self.fail("the collector panicked"),
        }
        if !paused {
            self.apply(op);
            inner_last = std::mem::take(&mut self.last);
            (self.op, self.step) = (outer, step);
        }
        let when = if paused { "paused" } else { "after" };
        self.last = format!("{when} (inner {inner_last})");
        self.check_after_gc(false);
        // Chunks the racing op pinned are garbage for the next, quiet collection.
        gc::collect(self.ds(), &options(compact_all), &|_| {})
            .unwrap_or_else(|e| self.fail(format!("quiet gc: {e}")));
        self.check_after_gc(true);
    }
}

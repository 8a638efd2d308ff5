//! Storing dirty blocks ahead of their flush (the write pipeline).
//!
//! A sequential writer fills its inode's write-back buffer; flushing it means hashing
//! every block and appending the new chunks to a pack, ~120 ms per 64 MiB here. Done
//! inline, the writer's FUSE request waits for all of it. Instead, every
//! [`PRESTORE_BATCH`] bytes of new dirty blocks are handed to worker threads that hash
//! them and store the chunks while the writer goes on. The block map does not change: the
//! flush still commits the map under the inode lock, and finds the blocks already hashed
//! (`Dirty::hash`) and stored, so it only checks the index.
//!
//! Nothing here is needed for correctness: a job that fails or is dropped (a full
//! queue) leaves the work to the flush, which stores whatever is missing. A chunk stored
//! ahead for a block that is then overwritten or truncated is garbage for GC. GC safety
//! is the store's usual protocol: the flush calls `put_many`, which pins and re-checks
//! every chunk, so a chunk a collection removed between pre-store and flush is stored
//! again.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, OnceLock, Weak};
use std::thread::JoinHandle;

use parking_lot::Mutex;

use super::Datastore;
use crate::ids::ChunkId;

/// New dirty bytes of one inode that make a pre-store job.
pub(super) const PRESTORE_BATCH: usize = 8 << 20;
/// Jobs waiting at most; when full, writers do not wait (the flush does the work).
const QUEUE: usize = 8;

/// A dirty block: its data, the cell its hash goes into, and for a partly written block
/// what its committed content is (read and merged here first).
pub(super) struct Item {
    pub data: Arc<[u8]>,
    pub hash: Arc<OnceLock<ChunkId>>,
    pub partial: Option<Arc<super::Partial>>,
}

/// The queue of pre-store jobs and its workers.
pub(super) struct Prestore {
    tx: Mutex<Option<SyncSender<Vec<Item>>>>,
    /// Set by [`Prestore::stop`]: workers take no further job (they would otherwise keep
    /// the datastore alive past its shutdown).
    stopped: Arc<AtomicBool>,
    workers: Mutex<Vec<JoinHandle<()>>>,
}

impl Prestore {
    /// A pre-store without workers (jobs are refused until [`Prestore::start`]).
    pub(super) fn idle() -> Self {
        Prestore {
            tx: Mutex::new(None),
            stopped: Arc::default(),
            workers: Mutex::new(Vec::new()),
        }
    }

    /// Starts the worker threads for `ds`.
    pub(super) fn start(ds: &Arc<Datastore>) {
        let workers = super::cpus().min(4);
        let (tx, rx) = sync_channel::<Vec<Item>>(QUEUE);
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..workers {
            let (weak, rx) = (Arc::downgrade(ds), rx.clone());
            let stopped = ds.prestore.stopped.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("thinfs-store-{i}"))
                .spawn(move || work(weak, rx, stopped));
            match spawned {
                Ok(h) => ds.prestore.workers.lock().push(h),
                Err(e) => {
                    tracing::warn!("cannot start a pre-store worker: {e}");
                    return;
                }
            }
        }
        *ds.prestore.tx.lock() = Some(tx);
    }

    /// Queues a job, or drops it when there are no workers or the queue is full.
    pub(super) fn submit(&self, job: Vec<Item>) {
        if let Some(tx) = self.tx.lock().as_ref() {
            let _ = tx.try_send(job);
        }
    }

    /// Stops the workers: queued jobs are dropped, a job in progress finishes; returns
    /// once they have exited (except the calling thread, if it is one).
    pub(super) fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        self.tx.lock().take();
        let me = std::thread::current().id();
        for h in std::mem::take(&mut *self.workers.lock()) {
            if h.thread().id() != me {
                let _ = h.join();
            }
        }
    }
}

fn work(ds: Weak<Datastore>, rx: Arc<Mutex<Receiver<Vec<Item>>>>, stopped: Arc<AtomicBool>) {
    loop {
        let job = match rx.lock().recv() {
            Ok(job) => job,
            Err(_) => return,
        };
        if stopped.load(Ordering::SeqCst) {
            return;
        }
        let Some(ds) = ds.upgrade() else { return };
        // Partly written blocks: read their committed content (in batched reads) and
        // merge; one whose base cannot be read is left to the flush.
        let partial: Vec<(&super::Partial, &[u8])> = job
            .iter()
            .filter_map(|it| Some((&**it.partial.as_ref()?, &it.data[..])))
            .collect();
        if let Err(e) = ds.merge(&partial) {
            tracing::debug!("pre-store: reading partly written blocks: {e}");
        }
        let chunks: Vec<(ChunkId, &[u8])> = job
            .iter()
            .filter_map(|it| {
                let data = match &it.partial {
                    Some(p) => p.merged.get()?,
                    None => &it.data,
                };
                Some((*it.hash.get_or_init(|| ChunkId::of(data)), &data[..]))
            })
            .collect();
        if let Err(e) = ds.chunks.put_many(&chunks) {
            // The flush stores what is missing and reports the error to the writer.
            tracing::debug!("pre-store of {} blocks: {e}", chunks.len());
        }
    }
}

//! Garbage collection: reclaims chunks and block-map nodes that no inode version (live
//! file, clone or snapshot) reaches, and compacts pack files.
//!
//! GC is mark-and-sweep over the versioned inode records: there are no reference counts
//! to keep right on the write path. Safety against concurrent writers comes from
//! [`Pins`]: while a collection runs, every chunk stored or deduplicated against and every
//! block-map node written is pinned, and the sweep never frees a pinned id. A collection
//! starts only after in-flight flushes have committed (the datastore's GC gate), so every
//! chunk a committed record references is either marked by the scan or pinned.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;

use crate::ids::ChunkId;

/// Ids written or reused while a collection runs; the sweep keeps them.
#[derive(Default)]
pub struct Pins {
    active: AtomicBool,
    set: Mutex<HashSet<ChunkId>>,
}

impl Pins {
    /// Records that `id` (a chunk or a node) was just stored or reused.
    pub fn pin(&self, id: &ChunkId) {
        if self.active.load(Ordering::SeqCst) {
            self.set.lock().insert(*id);
        }
    }

    /// Starts pinning (call with the GC gate held exclusively).
    pub fn begin(&self) {
        self.set.lock().clear();
        self.active.store(true, Ordering::SeqCst);
    }

    /// Whether `id` was pinned since [`Pins::begin`].
    pub fn contains(&self, id: &ChunkId) -> bool {
        self.set.lock().contains(id)
    }

    /// Stops pinning and forgets the set.
    pub fn end(&self) {
        self.active.store(false, Ordering::SeqCst);
        self.set.lock().clear();
    }
}

//! Which chunks the index may hold: a Bloom filter in front of the index lookups of the
//! write path.
//!
//! Storing a chunk first asks the index whether the store has it. For new data (almost
//! every write of a VM) the answer is no, and with random chunk names every such lookup
//! is a sled page-cache miss: profiled on random 4 KiB overwrites of a 4 GiB file it was
//! 22% of the daemon's CPU. The filter answers "surely absent" for those from memory.
//!
//! Invariants:
//! - No false "absent" once the filter is ready: every index insertion of a new name sets
//!   its bits first, under the chunk store's append lock ([`Presence::insert`]), and a
//!   rebuild starts collecting those insertions under the same lock before it scans the
//!   index. Until the first build finishes, every name is "maybe" (the index decides).
//! - Removals from the index (GC) leave their bits set: a stale "maybe" costs one index
//!   lookup. GC's rebuild (`ChunkStore::rebuild_filter`) clears them.
//! - Size: 16 bits per expected name (about 0.05% false "maybe" per layer at that load
//!   with 11 probes), rounded up to a power of two, at least 2 MiB; the filter grows by
//!   layers twice as large as the last ([`Bloom`]). The chunk store expects twice the
//!   names its packs would hold in 16 KiB chunks (garbage included): 4 to 8 bytes per
//!   16 KiB stored, twice that while a rebuild runs.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crate::error::Result;
use crate::ids::ChunkId;

/// Probes per name.
const PROBES: u64 = 11;
/// Bits per expected name.
const BITS_PER_NAME: u64 = 16;
/// The smallest filter, in names (2 MiB).
const MIN_NAMES: u64 = 1 << 20;

/// One fixed-size layer of a [`Bloom`] filter.
struct Layer {
    words: Box<[AtomicU64]>,
    /// Bit count minus one (a power of two minus one).
    mask: u64,
    /// How many names the layer was sized for.
    capacity: u64,
    inserted: AtomicU64,
}

impl Layer {
    fn with_capacity(names: u64) -> Layer {
        let capacity = names.max(MIN_NAMES);
        let bits = (capacity * BITS_PER_NAME).next_power_of_two();
        Layer {
            words: (0..bits / 64).map(|_| AtomicU64::new(0)).collect(),
            mask: bits - 1,
            capacity,
            inserted: AtomicU64::new(0),
        }
    }

    /// Bit positions of `id`: double hashing over two independent words of the name.
    fn positions(&self, id: &ChunkId) -> impl Iterator<Item = u64> + '_ {
        let word = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&id.0[i..i + 8]);
            u64::from_le_bytes(b)
        };
        let (h1, h2) = (word(0), word(8) | 1);
        (0..PROBES).map(move |i| h1.wrapping_add(i.wrapping_mul(h2)) & self.mask)
    }

    fn insert(&self, id: &ChunkId) {
        for bit in self.positions(id) {
            self.words[(bit / 64) as usize].fetch_or(1 << (bit % 64), Ordering::Relaxed);
        }
        self.inserted.fetch_add(1, Ordering::Relaxed);
    }

    fn may_contain(&self, id: &ChunkId) -> bool {
        self.positions(id).all(|bit| {
            self.words[(bit / 64) as usize].load(Ordering::Relaxed) & (1 << (bit % 64)) != 0
        })
    }

    fn full(&self) -> bool {
        self.inserted.load(Ordering::Relaxed) >= self.capacity
    }
}

/// A Bloom filter over chunk names (already uniform hashes) that grows without a rescan:
/// when its newest layer is full, a layer twice as large takes the insertions; a name is
/// "maybe" if any layer has it. (Rebuilding by scanning the index instead was measured:
/// each scan of a growing index pulled sled's pages in, +190 MiB RSS at 32 GiB.)
pub struct Bloom {
    layers: RwLock<Vec<Layer>>,
    ready: AtomicBool,
}

impl Bloom {
    /// An empty filter for about `names` names before it grows (not ready).
    pub fn with_capacity(names: u64) -> Bloom {
        Bloom {
            layers: RwLock::new(vec![Layer::with_capacity(names)]),
            ready: AtomicBool::new(false),
        }
    }

    pub fn insert(&self, id: &ChunkId) {
        {
            let layers = self.layers.read().unwrap_or_else(|p| p.into_inner());
            if let Some(last) = layers.last().filter(|l| !l.full()) {
                last.insert(id);
                return;
            }
        }
        let mut layers = self.layers.write().unwrap_or_else(|p| p.into_inner());
        if let Some(last) = layers.last().filter(|l| l.full()) {
            let grown = Layer::with_capacity(last.capacity * 2);
            layers.push(grown);
        }
        if let Some(last) = layers.last() {
            last.insert(id);
        }
    }

    /// False only if `id` was never inserted.
    pub fn may_contain(&self, id: &ChunkId) -> bool {
        let layers = self.layers.read().unwrap_or_else(|p| p.into_inner());
        layers.iter().any(|l| l.may_contain(id))
    }

    /// Names inserted.
    pub fn inserted(&self) -> u64 {
        let layers = self.layers.read().unwrap_or_else(|p| p.into_inner());
        layers
            .iter()
            .map(|l| l.inserted.load(Ordering::Relaxed))
            .sum()
    }

    /// Bytes of memory the bit arrays take.
    pub fn bytes(&self) -> usize {
        let layers = self.layers.read().unwrap_or_else(|p| p.into_inner());
        layers.iter().map(|l| l.words.len() * 8).sum()
    }
}

/// The chunk store's filter, replaceable by a rebuild while writers go on.
pub struct Presence {
    current: RwLock<Arc<Bloom>>,
    /// A filter being built: insertions go to it too.
    next: Mutex<Option<Arc<Bloom>>>,
}

impl Default for Presence {
    fn default() -> Self {
        Presence {
            current: RwLock::new(Arc::new(Bloom::with_capacity(0))),
            next: Mutex::new(None),
        }
    }
}

impl Presence {
    /// False only if the index surely lacks `id`.
    pub fn may_contain(&self, id: &ChunkId) -> bool {
        let cur = self.current.read().unwrap_or_else(|p| p.into_inner());
        !cur.ready.load(Ordering::Acquire) || cur.may_contain(id)
    }

    /// Records that `id` is about to enter the index. The caller holds the append lock.
    /// The filter being built first: a build that finished in between has put itself in
    /// place before it cleared `next`, so the second insertion reaches it.
    pub fn insert(&self, id: &ChunkId) {
        if let Some(next) = self.next.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            next.insert(id);
        }
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id);
    }

    /// Starts collecting insertions into `fresh` (allocate it before taking the lock).
    /// The caller holds the append lock, so every insertion is either in the index
    /// already (and the scan that follows finds it) or goes to `fresh` too.
    pub fn begin_rebuild(&self, fresh: &Arc<Bloom>) {
        *self.next.lock().unwrap_or_else(|p| p.into_inner()) = Some(fresh.clone());
    }

    /// Gives up a build begun with [`Self::begin_rebuild`] (its thread did not start).
    pub fn abandon_rebuild(&self) {
        *self.next.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Fills `fresh` from a scan of the index and puts it in place. Stops early (keeping
    /// the old filter) when `stop` is set or the scan fails. Returns whether it finished
    /// and the number of names scanned.
    pub fn finish_rebuild(
        &self,
        fresh: Arc<Bloom>,
        ids: impl Iterator<Item = Result<ChunkId>>,
        stop: &AtomicBool,
    ) -> Result<Option<u64>> {
        let mut n = 0u64;
        for id in ids {
            if n % 4096 == 0 && stop.load(Ordering::Relaxed) {
                self.abandon_rebuild();
                return Ok(None);
            }
            match id {
                Ok(id) => fresh.insert(&id),
                Err(e) => {
                    self.abandon_rebuild();
                    return Err(e);
                }
            }
            n += 1;
        }
        fresh.ready.store(true, Ordering::Release);
        let old = std::mem::replace(
            &mut *self.current.write().unwrap_or_else(|p| p.into_inner()),
            fresh,
        );
        self.abandon_rebuild();
        drop(old); // freed outside the lock
        Ok(Some(n))
    }

    /// Memory of the filters, in bytes.
    pub fn bytes(&self) -> usize {
        let cur = self
            .current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .bytes();
        let next = self
            .next
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map_or(0, |b| b.bytes());
        cur + next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u64) -> ChunkId {
        ChunkId::of(&n.to_le_bytes())
    }

    #[test]
    fn no_false_absent_and_few_false_maybe() {
        let b = Bloom::with_capacity(100_000);
        for n in 0..100_000 {
            b.insert(&id(n));
        }
        assert!((0..100_000).all(|n| b.may_contain(&id(n))));
        let false_maybe = (100_000..200_000)
            .filter(|&n| b.may_contain(&id(n)))
            .count();
        assert!(
            false_maybe < 100,
            "{false_maybe} false positives in 100,000"
        );
    }

    #[test]
    fn grows_by_layers_without_false_absent() {
        // Cheap distinct names (BLAKE3 output is uniform; so is splitmix).
        let name = |n: u64| {
            let mut z = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
            let mut b = [0u8; 32];
            for c in b.chunks_mut(8) {
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB) ^ (z >> 31);
                c.copy_from_slice(&z.to_le_bytes());
            }
            ChunkId(b)
        };
        let b = Bloom::with_capacity(0);
        let one_layer = b.bytes();
        let n = 3 * MIN_NAMES;
        for i in 0..n {
            b.insert(&name(i));
        }
        assert_eq!(b.inserted(), n);
        assert_eq!(b.bytes(), 3 * one_layer, "layers of 1x and 2x the first");
        assert!((0..n).all(|i| b.may_contain(&name(i))));
        let false_maybe = (n..n + 100_000)
            .filter(|&i| b.may_contain(&name(i)))
            .count();
        assert!(
            false_maybe < 200,
            "{false_maybe} false positives in 100,000"
        );
    }

    #[test]
    fn everything_maybe_until_built_then_exact() {
        let p = Presence::default();
        assert!(p.may_contain(&id(1)), "not built yet: the index decides");
        let fresh = Arc::new(Bloom::with_capacity(10));
        p.begin_rebuild(&fresh);
        p.insert(&id(2)); // an append while the scan runs
        let scanned = p
            .finish_rebuild(fresh, [Ok(id(1))].into_iter(), &AtomicBool::new(false))
            .unwrap();
        assert_eq!(scanned, Some(1));
        assert!(p.may_contain(&id(1)));
        assert!(p.may_contain(&id(2)), "insertions during the scan are kept");
        assert!(!p.may_contain(&id(3)));
    }

    #[test]
    fn stopped_or_failed_rebuild_keeps_the_old_filter() {
        let p = Presence::default();
        let fresh = Arc::new(Bloom::with_capacity(10));
        p.begin_rebuild(&fresh);
        let stop = AtomicBool::new(true);
        assert_eq!(
            p.finish_rebuild(fresh, [Ok(id(1))].into_iter(), &stop)
                .unwrap(),
            None
        );
        assert!(p.may_contain(&id(9)), "still not built");
        let fresh = Arc::new(Bloom::with_capacity(10));
        p.begin_rebuild(&fresh);
        let failing = [Err(crate::error::FsError::Invalid("scan".into()))].into_iter();
        assert!(p
            .finish_rebuild(fresh, failing, &AtomicBool::new(false))
            .is_err());
        assert!(p.may_contain(&id(9)));
        assert_eq!(
            p.bytes(),
            Bloom::with_capacity(0).bytes(),
            "no filter left behind"
        );
    }
}

//! A bounded, approximately least-recently-used map shared by many threads.
//!
//! Two generations: lookups try the young one, then the old one (a hit there moves the
//! entry to the young one); when the young one is full, the old one is dropped and the
//! young one becomes old. Unlike emptying one map when it is full, a working set a
//! little larger than a generation does not miss all at once. Holds at most twice the
//! generation size.

use std::hash::Hash;
use std::sync::atomic::{AtomicUsize, Ordering};

use dashmap::DashMap;

pub struct TwoGenCache<K, V> {
    gens: [DashMap<K, V>; 2],
    /// Entries per generation, approximate under races (DashMap::len locks every shard).
    counts: [AtomicUsize; 2],
    /// Index of the young generation.
    young: AtomicUsize,
    rotate: parking_lot::Mutex<()>,
    generation: usize,
}

impl<K: Eq + Hash + Clone, V: Clone> TwoGenCache<K, V> {
    /// A cache of at most `2 * generation` entries.
    pub fn new(generation: usize) -> Self {
        TwoGenCache {
            gens: [DashMap::new(), DashMap::new()],
            counts: [AtomicUsize::new(0), AtomicUsize::new(0)],
            young: AtomicUsize::new(0),
            rotate: parking_lot::Mutex::new(()),
            generation: generation.max(1),
        }
    }

    fn young(&self) -> usize {
        self.young.load(Ordering::Acquire)
    }

    pub fn get(&self, k: &K) -> Option<V> {
        let y = self.young();
        if let Some(v) = self.gens[y].get(k) {
            return Some(v.clone());
        }
        let (_, v) = self.gens[1 - y].remove(k)?;
        self.counts[1 - y].fetch_sub(1, Ordering::Relaxed);
        self.insert(k.clone(), v.clone());
        Some(v)
    }

    pub fn contains(&self, k: &K) -> bool {
        self.gens.iter().any(|g| g.contains_key(k))
    }

    pub fn insert(&self, k: K, v: V) {
        let mut y = self.young();
        // A count that wrapped below zero (a race with a rotation) also rotates: harmless.
        if self.counts[y].load(Ordering::Relaxed) >= self.generation {
            let _r = self.rotate.lock();
            y = self.young();
            if self.counts[y].load(Ordering::Relaxed) >= self.generation {
                self.gens[1 - y].clear();
                self.counts[1 - y].store(0, Ordering::Relaxed);
                self.young.store(1 - y, Ordering::Release);
                y = 1 - y;
            }
        }
        if self.gens[y].insert(k, v).is_none() {
            self.counts[y].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn remove(&self, k: &K) {
        for (g, n) in self.gens.iter().zip(&self.counts) {
            if g.remove(k).is_some() {
                n.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    /// Entries held now.
    pub fn len(&self) -> usize {
        self.gens.iter().map(|g| g.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_and_keeps_what_is_used() {
        let c = TwoGenCache::new(4);
        for i in 0..4 {
            c.insert(i, i * 10);
        }
        // Fill a new generation while touching 0: 0 moves to the young generation.
        for i in 4..7 {
            c.insert(i, i * 10);
        }
        assert_eq!(c.get(&0), Some(0));
        for i in 7..10 {
            c.insert(i, i * 10);
        }
        assert!(c.len() <= 8, "at most two generations: {}", c.len());
        assert_eq!(c.get(&0), Some(0), "a used entry survives rotations");
        assert_eq!(c.get(&1), None, "an unused old entry is dropped");
        c.remove(&0);
        assert!(!c.contains(&0));
    }
}

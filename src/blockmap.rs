//! File block maps: persistent copy-on-write Merkle trees.
//!
//! A regular file is a sequence of fixed-size logical blocks. Block `i` is either a hole
//! (reads as zeros, stores nothing) or the chunk whose BLAKE3 hash is recorded for it.
//! The map from block index to chunk is a radix tree of fan-out [`FANOUT`] (64):
//!
//! ```text
//!   MapRoot { node, depth = 2, blocks }          (in the inode record)
//!            |
//!        [level 2 node]   slot s covers blocks [s*64, s*64 + 64)
//!         /     \
//!   [level 1]  [level 1]  slot s -> chunk hash of block base + s
//! ```
//!
//! Nodes are sparse (only non-empty slots are stored), immutable, and named by the hash of
//! their encoding, like chunks: a Merkle tree. Each slot of an inner node also records how
//! many data blocks lie below it, so the root knows the file's allocated block count and
//! whole subtrees can be dropped or tested for fullness without reading them.
//!
//! Why this shape:
//! - **O(1) clones.** Two inodes may hold the same root; nothing is ever modified in place,
//!   so sharing a whole map is copying a 41-byte [`MapRoot`].
//! - **Writes touch one path.** Changing a set of blocks rewrites only the nodes on the
//!   paths from those leaves to the root (`update`); untouched subtrees stay shared with
//!   every clone and snapshot that holds them.
//! - **Range operations in O(depth + edges).** Truncate and punch drop covered subtrees by
//!   their slot (`clear_range`); a copy of a range at the same offset in two files grafts
//!   covered subtrees from one tree into the other (`graft`), which is what makes
//!   copy_file_range at equal offsets (coreutils `cp`) metadata-only.
//! - **Content addressing dedups metadata too**: identical subtrees (two copies of one
//!   image) are one node.
//!
//! Nodes live in the packs, like chunks, under their own index (`meta::Index::Nodes`;
//! stores made before format 5 hold theirs in the metadata, still read). A change writes
//! its new nodes (and their index entries) before it returns the new root, so they are
//! in the packs before the inode record that names the root is committed, and durable
//! with the packs at the same barrier. A root that is never committed leaves garbage:
//! nodes no root reaches are reclaimed by GC like chunks, and pack compaction returns
//! their space. (In the metadata store they churned: every overwrite rewrote a ~2.6 KiB
//! leaf there and sled's log kept the old copies: 8% metadata after random overwrites.)

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use crate::cache::TwoGenCache;
use crate::chunk::ChunkStore;
use crate::error::{FsError, Result};
use crate::ids::ChunkId;
use crate::meta::{Index, MapRoot, Meta};

/// Slots per node. 64 rather than 256: a small write rewrites one node per level, and
/// with 64 slots a path of a 32 GiB file is 4 nodes of <= 2.6 KiB (7.7 KiB) instead of
/// 3 nodes of <= 10.5 KiB (20 KiB): less metadata written per fsync, less garbage per
/// overwrite, 4x smaller cached nodes (measured in the issue 6 note).
pub const FANOUT: u64 = 64;
const FANOUT_BITS: u32 = 6;
/// Deepest tree allowed: 64^10 blocks is beyond any file size thinfs accepts.
pub const MAX_DEPTH: u8 = 10;
/// Decoded nodes per generation of the node cache (two generations: at most ~12 MiB, a
/// node of 64 entries decodes to ~3 KiB). 2048 leaves map 2 GiB of 16 KiB blocks; a miss
/// costs a location lookup and a verified read of ~2.6 KiB from the packs. (8192 let RSS
/// grow by ~36 MiB more between 4 and 32 GiB of data: issue 6.)
const NODE_CACHE_GENERATION: usize = 2048;
/// Format byte of a node encoding.
const NODE_V1: u8 = 1;

/// One slot of a node: the child (a chunk at level 1, a node above) and its data blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub slot: u8,
    pub id: ChunkId,
    pub count: u64,
}

type Entries = Vec<Entry>;

/// Nodes a change encoded (name, bytes), stored by [`BlockMaps::write`] before it returns.
type NewNodes = Vec<(ChunkId, Vec<u8>)>;

/// Reads, writes and caches block-map nodes.
pub struct BlockMaps {
    /// Where nodes are stored (the node index of the chunk store).
    chunks: Arc<ChunkStore>,
    /// Nodes of stores made before format 5.
    meta: Arc<Meta>,
    /// Decoded nodes (see [`TwoGenCache`]).
    cache: TwoGenCache<ChunkId, Arc<Entries>>,
}

/// Number of blocks a slot at `level` covers.
fn span(level: u8) -> u64 {
    1u64 << (FANOUT_BITS * (level as u32 - 1))
}

/// Number of blocks a tree of `depth` covers.
fn capacity(depth: u8) -> u64 {
    1u64 << (FANOUT_BITS * depth as u32)
}

fn encode(level: u8, entries: &[Entry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(3 + entries.len() * 41);
    out.push(NODE_V1);
    out.push(level);
    out.extend_from_slice(&(entries.len() as u16).to_be_bytes());
    for e in entries {
        out.push(e.slot);
        out.extend_from_slice(&e.id.0);
        if level > 1 {
            out.extend_from_slice(&e.count.to_be_bytes());
        }
    }
    out
}

fn decode(id: &ChunkId, bytes: &[u8]) -> Result<Entries> {
    let bad = |what: &str| FsError::Meta(format!("block-map node {id}: {what}"));
    if bytes.len() < 4 || bytes[0] != NODE_V1 {
        return Err(bad("unknown format"));
    }
    let level = bytes[1];
    let n = u16::from_be_bytes([bytes[2], bytes[3]]) as usize;
    let width = if level > 1 { 41 } else { 33 };
    if bytes.len() != 4 + n * width {
        return Err(bad("wrong length"));
    }
    let mut out = Vec::with_capacity(n);
    for rec in bytes[4..].chunks_exact(width) {
        if rec[0] as u64 >= FANOUT {
            return Err(bad("slot out of range"));
        }
        let mut h = [0u8; 32];
        h.copy_from_slice(&rec[1..33]);
        let count = if level > 1 {
            u64::from_be_bytes(rec[33..41].try_into().map_err(|_| bad("count"))?)
        } else {
            1
        };
        out.push(Entry {
            slot: rec[0],
            id: ChunkId(h),
            count,
        });
    }
    Ok(out)
}

fn find(entries: &[Entry], slot: u8) -> Option<&Entry> {
    entries
        .binary_search_by_key(&slot, |e| e.slot)
        .ok()
        .map(|i| &entries[i])
}

fn set(entries: &mut Entries, slot: u8, value: Option<(ChunkId, u64)>) {
    match (entries.binary_search_by_key(&slot, |e| e.slot), value) {
        (Ok(i), Some((id, count))) => entries[i] = Entry { slot, id, count },
        (Ok(i), None) => {
            entries.remove(i);
        }
        (Err(i), Some((id, count))) => entries.insert(i, Entry { slot, id, count }),
        (Err(_), None) => {}
    }
}

impl BlockMaps {
    pub fn new(chunks: Arc<ChunkStore>, meta: Arc<Meta>) -> Self {
        BlockMaps {
            chunks,
            meta,
            cache: TwoGenCache::new(NODE_CACHE_GENERATION),
        }
    }

    /// The stored bytes of node `id` (verified against its name), if it is stored.
    pub(crate) fn node_bytes(&self, id: &ChunkId) -> Result<Option<Vec<u8>>> {
        match self.chunks.get_in(Index::Nodes, id)? {
            Some(bytes) => Ok(Some(bytes)),
            None => match self.meta.legacy_node(id)? {
                Some(bytes) if ChunkId::of(&bytes) != *id => Err(FsError::Meta(format!(
                    "block-map node {id}: stored bytes do not match its hash"
                ))),
                other => Ok(other),
            },
        }
    }

    /// The entries of node `id`.
    pub fn load(&self, id: &ChunkId) -> Result<Arc<Entries>> {
        if let Some(e) = self.cache.get(id) {
            return Ok(e);
        }
        let bytes = self
            .node_bytes(id)?
            .ok_or_else(|| FsError::Meta(format!("block-map node {id} is missing")))?;
        let entries = Arc::new(decode(id, &bytes)?);
        self.cache_put(*id, entries.clone());
        Ok(entries)
    }

    /// Drops node `id` from the cache; GC calls it for every node it removes. (A node GC
    /// removed may come back into the cache through a racing lookup; harmless: a node is
    /// named by its content, and [`BlockMaps::write`] stores a node the index lacks even
    /// when it is cached.)
    pub(crate) fn forget(&self, id: &ChunkId) {
        self.cache.remove(id);
    }

    fn cache_put(&self, id: ChunkId, entries: Arc<Entries>) {
        self.cache.insert(id, entries);
    }

    /// Encodes a node (unless empty) into `new` and returns its slot value for the
    /// parent; [`BlockMaps::write`] stores the nodes.
    fn store(&self, level: u8, entries: Entries, new: &mut NewNodes) -> Option<(ChunkId, u64)> {
        if entries.is_empty() {
            return None;
        }
        let bytes = encode(level, &entries);
        let id = ChunkId::of(&bytes);
        let count = entries.iter().map(|e| e.count).sum();
        new.push((id, bytes));
        if !self.cache.contains(&id) {
            self.cache_put(id, Arc::new(entries));
        }
        Some((id, count))
    }

    fn root_of(value: Option<(ChunkId, u64)>, depth: u8) -> Option<MapRoot> {
        value.map(|(node, blocks)| MapRoot {
            node,
            depth,
            blocks,
        })
    }

    /// Grows `root` until it covers block `max_idx`.
    fn grow(
        &self,
        root: Option<MapRoot>,
        max_idx: u64,
        new: &mut NewNodes,
    ) -> Result<Option<MapRoot>> {
        let Some(mut r) = root else { return Ok(None) };
        while max_idx >= capacity(r.depth) {
            if r.depth >= MAX_DEPTH {
                return Err(FsError::TooBig);
            }
            let entries = vec![Entry {
                slot: 0,
                id: r.node,
                count: r.blocks,
            }];
            let (node, blocks) = self
                .store(r.depth + 1, entries, new)
                .unwrap_or((r.node, r.blocks));
            r = MapRoot {
                node,
                depth: r.depth + 1,
                blocks,
            };
        }
        Ok(Some(r))
    }

    fn depth_for(max_idx: u64) -> Result<u8> {
        let mut d = 1;
        while max_idx >= capacity(d) {
            d += 1;
            if d > MAX_DEPTH {
                return Err(FsError::TooBig);
            }
        }
        Ok(d)
    }

    /// The chunk of block `idx` (`None`: a hole).
    pub fn lookup(&self, root: Option<MapRoot>, idx: u64) -> Result<Option<ChunkId>> {
        let Some(r) = root else { return Ok(None) };
        if idx >= capacity(r.depth) {
            return Ok(None);
        }
        let mut node = r.node;
        for level in (1..=r.depth).rev() {
            let entries = self.load(&node)?;
            let slot = ((idx / span(level)) % FANOUT) as u8;
            match find(&entries, slot) {
                None => return Ok(None),
                Some(e) if level == 1 => return Ok(Some(e.id)),
                Some(e) => node = e.id,
            }
        }
        Ok(None)
    }

    /// Applies `changes` (block index -> chunk, or `None` for a hole) and returns the new
    /// root; its new nodes are stored.
    pub fn update(
        &self,
        root: Option<MapRoot>,
        changes: &BTreeMap<u64, Option<ChunkId>>,
    ) -> Result<Option<MapRoot>> {
        let mut new = NewNodes::new();
        let root = self.update_in(root, changes, &mut new)?;
        self.write(new)?;
        Ok(root)
    }

    /// Makes blocks `[start, end)` holes; the new nodes are stored.
    pub fn clear_range(
        &self,
        root: Option<MapRoot>,
        start: u64,
        end: u64,
    ) -> Result<Option<MapRoot>> {
        let mut new = NewNodes::new();
        let root = self.clear_range_in(root, start, end, &mut new)?;
        self.write(new)?;
        Ok(root)
    }

    /// Makes blocks `[start, end)` of `dst` equal to those of `src`, sharing whole
    /// subtrees; the new nodes are stored.
    pub fn graft(
        &self,
        dst: Option<MapRoot>,
        src: Option<MapRoot>,
        start: u64,
        end: u64,
    ) -> Result<Option<MapRoot>> {
        let mut new = NewNodes::new();
        let root = self.graft_in(dst, src, start, end, &mut new)?;
        self.write(new)?;
        Ok(root)
    }

    /// Stores the nodes a change encoded, pinned for a running collection, skipping
    /// those the node index has (a cached node may have been removed by GC: the index,
    /// not the cache, decides).
    fn write(&self, new: NewNodes) -> Result<()> {
        let refs: Vec<(ChunkId, &[u8])> = new.iter().map(|(id, b)| (*id, &b[..])).collect();
        self.chunks.put_nodes(&refs)?;
        Ok(())
    }

    fn update_in(
        &self,
        root: Option<MapRoot>,
        changes: &BTreeMap<u64, Option<ChunkId>>,
        new: &mut NewNodes,
    ) -> Result<Option<MapRoot>> {
        let Some((&max_idx, _)) = changes.iter().next_back() else {
            return Ok(root);
        };
        let changes: Vec<(u64, Option<ChunkId>)> = changes.iter().map(|(k, v)| (*k, *v)).collect();
        let root = self.grow(root, max_idx, new)?;
        let depth = match root {
            Some(r) => r.depth,
            None => Self::depth_for(max_idx)?,
        };
        let value = self.update_node(root.map(|r| r.node), depth, 0, &changes, new)?;
        Ok(Self::root_of(value, depth))
    }

    fn update_node(
        &self,
        node: Option<ChunkId>,
        level: u8,
        base: u64,
        changes: &[(u64, Option<ChunkId>)],
        new: &mut NewNodes,
    ) -> Result<Option<(ChunkId, u64)>> {
        let mut entries: Entries = match node {
            Some(id) => (*self.load(&id)?).clone(),
            None => Vec::new(),
        };
        if level == 1 {
            for &(idx, chunk) in changes {
                set(&mut entries, (idx - base) as u8, chunk.map(|c| (c, 1)));
            }
        } else {
            let sp = span(level);
            let mut rest = changes;
            while let Some(&(first, _)) = rest.first() {
                let slot = (first - base) / sp;
                let child_base = base + slot * sp;
                let n = rest.partition_point(|(i, _)| *i < child_base + sp);
                let (group, tail) = rest.split_at(n);
                rest = tail;
                let child = find(&entries, slot as u8).map(|e| e.id);
                let value = self.update_node(child, level - 1, child_base, group, new)?;
                set(&mut entries, slot as u8, value);
            }
        }
        Ok(self.store(level, entries, new))
    }

    fn clear_range_in(
        &self,
        root: Option<MapRoot>,
        start: u64,
        end: u64,
        new: &mut NewNodes,
    ) -> Result<Option<MapRoot>> {
        let Some(r) = root else { return Ok(None) };
        let end = end.min(capacity(r.depth));
        if start >= end {
            return Ok(root);
        }
        let value = self.clear_node(r.node, r.depth, 0, start, end, new)?;
        Ok(Self::root_of(value, r.depth))
    }

    fn clear_node(
        &self,
        node: ChunkId,
        level: u8,
        base: u64,
        start: u64,
        end: u64,
        new: &mut NewNodes,
    ) -> Result<Option<(ChunkId, u64)>> {
        let old = self.load(&node)?;
        let sp = span(level);
        let mut entries = Vec::with_capacity(old.len());
        let mut changed = false;
        for e in old.iter() {
            let lo = base + e.slot as u64 * sp;
            let hi = lo + sp;
            if hi <= start || lo >= end {
                entries.push(*e);
            } else if start <= lo && hi <= end {
                changed = true;
            } else {
                changed = true;
                if let Some((id, count)) = self.clear_node(e.id, level - 1, lo, start, end, new)? {
                    entries.push(Entry {
                        slot: e.slot,
                        id,
                        count,
                    });
                }
            }
        }
        if !changed {
            return Ok(Some((node, old.iter().map(|e| e.count).sum())));
        }
        Ok(self.store(level, entries, new))
    }

    fn graft_in(
        &self,
        dst: Option<MapRoot>,
        src: Option<MapRoot>,
        start: u64,
        end: u64,
        new: &mut NewNodes,
    ) -> Result<Option<MapRoot>> {
        if start >= end {
            return Ok(dst);
        }
        let Some(s) = src else {
            return self.clear_range_in(dst, start, end, new);
        };
        // Bring both trees to one depth that covers the range.
        let need = Self::depth_for(end - 1)?
            .max(s.depth)
            .max(dst.map(|d| d.depth).unwrap_or(1));
        let s = self.grow(Some(s), capacity(need) - 1, new)?;
        let d = self.grow(dst, capacity(need) - 1, new)?;
        let value = self.graft_node(
            d.map(|r| r.node),
            s.map(|r| (r.node, r.blocks)),
            need,
            0,
            start,
            end,
            new,
        )?;
        Ok(Self::root_of(value, need))
    }

    #[allow(clippy::too_many_arguments)]
    fn graft_node(
        &self,
        dst: Option<ChunkId>,
        src: Option<(ChunkId, u64)>,
        level: u8,
        base: u64,
        start: u64,
        end: u64,
        new: &mut NewNodes,
    ) -> Result<Option<(ChunkId, u64)>> {
        let sp = span(level);
        let node_end = base + sp * FANOUT;
        if start <= base && node_end <= end {
            return Ok(src);
        }
        if dst.is_some() && dst == src.map(|s| s.0) {
            return Ok(src);
        }
        let dst_entries: Arc<Entries> = match dst {
            Some(id) => self.load(&id)?,
            None => Arc::new(Vec::new()),
        };
        let src_entries: Arc<Entries> = match src {
            Some((id, _)) => self.load(&id)?,
            None => Arc::new(Vec::new()),
        };
        let mut entries = Entries::new();
        let mut slots: Vec<u8> = dst_entries
            .iter()
            .chain(src_entries.iter())
            .map(|e| e.slot)
            .collect();
        slots.sort_unstable();
        slots.dedup();
        for slot in slots {
            let lo = base + slot as u64 * sp;
            let hi = lo + sp;
            let d = find(&dst_entries, slot).copied();
            let s = find(&src_entries, slot).copied();
            let value = if hi <= start || lo >= end {
                d.map(|e| (e.id, e.count))
            } else if (start <= lo && hi <= end) || level == 1 {
                s.map(|e| (e.id, e.count))
            } else {
                self.graft_node(
                    d.map(|e| e.id),
                    s.map(|e| (e.id, e.count)),
                    level - 1,
                    lo,
                    start,
                    end,
                    new,
                )?
            };
            if let Some((id, count)) = value {
                entries.push(Entry { slot, id, count });
            }
        }
        Ok(self.store(level, entries, new))
    }

    /// The first data block at or after `from`, if any.
    pub fn next_data(&self, root: Option<MapRoot>, from: u64) -> Result<Option<u64>> {
        let Some(r) = root else { return Ok(None) };
        if from >= capacity(r.depth) {
            return Ok(None);
        }
        self.next_data_node(&r.node, r.depth, 0, from)
    }

    fn next_data_node(
        &self,
        node: &ChunkId,
        level: u8,
        base: u64,
        from: u64,
    ) -> Result<Option<u64>> {
        let entries = self.load(node)?;
        let sp = span(level);
        for e in entries.iter() {
            let lo = base + e.slot as u64 * sp;
            if lo + sp <= from {
                continue;
            }
            if level == 1 {
                return Ok(Some(lo));
            }
            if let Some(x) = self.next_data_node(&e.id, level - 1, lo, from.max(lo))? {
                return Ok(Some(x));
            }
        }
        Ok(None)
    }

    /// The first hole at or after `from` (blocks beyond the tree are holes).
    pub fn next_hole(&self, root: Option<MapRoot>, from: u64) -> Result<u64> {
        let Some(r) = root else { return Ok(from) };
        if from >= capacity(r.depth) {
            return Ok(from);
        }
        Ok(self
            .next_hole_node(&r.node, r.depth, 0, from)?
            .unwrap_or(capacity(r.depth)))
    }

    fn next_hole_node(
        &self,
        node: &ChunkId,
        level: u8,
        base: u64,
        from: u64,
    ) -> Result<Option<u64>> {
        let entries = self.load(node)?;
        let sp = span(level);
        let first = ((from - base) / sp) as usize;
        for slot in first..FANOUT as usize {
            let lo = base + slot as u64 * sp;
            let at = from.max(lo);
            match find(&entries, slot as u8) {
                None => return Ok(Some(at)),
                Some(e) if e.count == sp => continue,
                Some(e) => {
                    if let Some(x) = self.next_hole_node(&e.id, level - 1, lo, at)? {
                        return Ok(Some(x));
                    }
                }
            }
        }
        Ok(None)
    }

    /// Calls `on_chunk(block index, chunk)` for every data block in `[start, end)`.
    pub fn for_each_chunk(
        &self,
        root: Option<MapRoot>,
        start: u64,
        end: u64,
        on_chunk: &mut dyn FnMut(u64, ChunkId) -> Result<()>,
    ) -> Result<()> {
        let Some(r) = root else { return Ok(()) };
        self.each_chunk_node(&r.node, r.depth, 0, start, end, on_chunk)
    }

    fn each_chunk_node(
        &self,
        node: &ChunkId,
        level: u8,
        base: u64,
        start: u64,
        end: u64,
        on_chunk: &mut dyn FnMut(u64, ChunkId) -> Result<()>,
    ) -> Result<()> {
        let entries = self.load(node)?;
        let sp = span(level);
        for e in entries.iter() {
            let lo = base + e.slot as u64 * sp;
            if lo + sp <= start || lo >= end {
                continue;
            }
            if level == 1 {
                on_chunk(lo, e.id)?;
            } else {
                self.each_chunk_node(&e.id, level - 1, lo, start, end, on_chunk)?;
            }
        }
        Ok(())
    }

    /// Visits every node and chunk reachable from `root` once, skipping subtrees whose
    /// node is already in `seen_nodes` (shared with a map visited before).
    pub fn walk(
        &self,
        root: Option<MapRoot>,
        seen_nodes: &mut HashSet<ChunkId>,
        on_chunk: &mut dyn FnMut(&ChunkId),
    ) -> Result<()> {
        let Some(r) = root else { return Ok(()) };
        self.walk_node(&r.node, r.depth, seen_nodes, on_chunk)
    }

    fn walk_node(
        &self,
        node: &ChunkId,
        level: u8,
        seen: &mut HashSet<ChunkId>,
        on_chunk: &mut dyn FnMut(&ChunkId),
    ) -> Result<()> {
        if !seen.insert(*node) {
            return Ok(());
        }
        let entries = self.load(node)?;
        for e in entries.iter() {
            if level == 1 {
                on_chunk(&e.id);
            } else {
                self.walk_node(&e.id, level - 1, seen, on_chunk)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn maps() -> (tempfile::TempDir, BlockMaps) {
        let dir = tempfile::tempdir().unwrap();
        let meta = Arc::new(Meta::open(&dir.path().join("meta")).unwrap());
        let packs = dir.path().join("packs");
        std::fs::create_dir(&packs).unwrap();
        let chunks = Arc::new(ChunkStore::open(&packs, meta.clone(), Arc::default()).unwrap());
        let maps = BlockMaps::new(chunks, meta);
        (dir, maps)
    }

    fn c(n: u64) -> ChunkId {
        ChunkId::of(&n.to_le_bytes())
    }

    fn apply(
        maps: &BlockMaps,
        root: Option<MapRoot>,
        ch: &[(u64, Option<u64>)],
    ) -> Option<MapRoot> {
        let changes: BTreeMap<u64, Option<ChunkId>> =
            ch.iter().map(|(i, v)| (*i, v.map(c))).collect();
        maps.update(root, &changes).unwrap()
    }

    #[test]
    fn sparse_far_blocks_and_counts() {
        let (_d, maps) = maps();
        let far = (16u64 << 40) / 4096 - 1; // last block of a 16 TiB file at 4K
        let r = apply(&maps, None, &[(0, Some(1)), (far, Some(2)), (300, Some(3))]);
        let r2 = r.unwrap();
        assert_eq!(r2.blocks, 3);
        assert_eq!(maps.lookup(r, far).unwrap(), Some(c(2)));
        assert_eq!(maps.lookup(r, 1).unwrap(), None);
        assert_eq!(maps.next_data(r, 1).unwrap(), Some(300));
        assert_eq!(maps.next_data(r, 301).unwrap(), Some(far));
        assert_eq!(maps.next_hole(r, 0).unwrap(), 1);
        assert_eq!(maps.next_hole(r, 300).unwrap(), 301);
        // Clearing a huge range drops subtrees without visiting blocks.
        let r3 = maps.clear_range(r, 1, u64::MAX).unwrap();
        assert_eq!(r3.unwrap().blocks, 1);
        assert_eq!(maps.lookup(r3, far).unwrap(), None);
        // The old root still reads the old map: nothing was modified in place.
        assert_eq!(maps.lookup(r, far).unwrap(), Some(c(2)));
    }

    #[test]
    fn full_leaf_skipped_by_next_hole() {
        let (_d, maps) = maps();
        let ch: Vec<(u64, Option<u64>)> = (0..600).map(|i| (i, Some(i))).collect();
        let r = apply(&maps, None, &ch);
        assert_eq!(maps.next_hole(r, 0).unwrap(), 600);
        assert_eq!(r.unwrap().blocks, 600);
        let r = apply(&maps, r, &[(100, None)]);
        assert_eq!(maps.next_hole(r, 0).unwrap(), 100);
        assert_eq!(r.unwrap().blocks, 599);
    }

    #[test]
    fn graft_shares_subtrees() {
        let (_d, maps) = maps();
        let ch: Vec<(u64, Option<u64>)> = (0..70000).step_by(7).map(|i| (i, Some(i))).collect();
        let src = apply(&maps, None, &ch);
        let dst = apply(&maps, None, &[(5, Some(99999)), (69999, Some(5))]);
        let g = maps.graft(dst, src, 256, 65536).unwrap();
        for i in [0u64, 5, 7, 256, 259, 1000, 65534, 65535, 65536, 69999] {
            let want = if (256..65536).contains(&i) {
                maps.lookup(src, i).unwrap()
            } else {
                maps.lookup(dst, i).unwrap()
            };
            assert_eq!(maps.lookup(g, i).unwrap(), want, "block {i}");
        }
        // A whole-range graft of identical trees is the same root.
        let whole = maps.graft(None, src, 0, 1 << 20).unwrap();
        assert_eq!(
            whole.unwrap().node,
            maps.grow(src, (1 << 20) - 1, &mut Vec::new())
                .unwrap()
                .unwrap()
                .node
        );
    }

    #[test]
    fn identical_content_is_one_node() {
        let (_d, maps) = maps();
        let a = apply(&maps, None, &[(3, Some(1)), (4, Some(2))]);
        let b = apply(&maps, None, &[(4, Some(2)), (3, Some(1))]);
        assert_eq!(a, b);
    }
}

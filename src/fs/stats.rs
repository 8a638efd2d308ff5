//! Space accounting: store-wide statistics and per-path usage (`thinfs du`).

use std::collections::{HashMap, HashSet};

use serde::Serialize;

use super::Datastore;
use crate::error::Result;
use crate::ids::{ChunkId, InodeNo};
use crate::meta::{FileKind, Index, View};

/// Store-wide figures (`thinfs stats`).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Stats {
    pub block_size: u64,
    pub files: u64,
    /// Sum of the sizes of live regular files.
    pub logical_bytes: u64,
    /// Non-hole blocks of live files times the block size.
    pub allocated_bytes: u64,
    /// Bytes of unique chunks in the index.
    pub stored_bytes: u64,
    /// Bytes of pack files on disk (stored bytes plus headers and garbage).
    pub pack_bytes: u64,
    /// Bytes of the metadata store on disk.
    pub meta_bytes: u64,
    /// Bytes of the block-map nodes that files, clones and snapshots reach: metadata, kept in the
    /// packs (format 5 on) and counted in `pack_bytes`, not in `meta_bytes`.
    pub node_bytes: u64,
    pub chunks: u64,
    /// Block-map nodes live maps reach (in the packs, or in the metadata store of a store
    /// made before format 5).
    pub nodes: u64,
    pub packs: u64,
    /// Pack bytes no file, clone or snapshot reaches: what `thinfs gc` would reclaim.
    pub garbage_bytes: u64,
    /// allocated / stored.
    pub dedup_ratio: f64,
}

/// Usage of a set of paths (`thinfs du`).
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Usage {
    pub files: u64,
    pub logical_bytes: u64,
    /// Non-hole blocks times the block size.
    pub stored_bytes: u64,
    /// Stored bytes whose chunks files outside the paths, or snapshots, also use.
    pub shared_bytes: u64,
    /// Bytes that deleting the paths would free.
    pub exclusive_bytes: u64,
}

impl Datastore {
    /// Store-wide statistics. Scans the inode table and the chunk index.
    pub fn stats(&self) -> Result<Stats> {
        self.sync_all()?;
        let bs = self.block_size();
        let (mut files, mut logical, mut allocated) = (0, 0, 0);
        for inode in self.meta.live_inodes() {
            let inode = inode?;
            if inode.kind == FileKind::File {
                files += 1;
                logical += inode.size;
                allocated += inode.data_blocks() * bs;
            }
        }
        let (reachable, reachable_nodes) = self.reachable()?;
        let (mut chunks, mut stored, mut live_pack_bytes) = (0u64, 0u64, 0u64);
        for entry in self.meta.chunk_locs() {
            let (id, loc) = entry?;
            chunks += 1;
            stored += loc.len as u64;
            if reachable.contains(&id) {
                live_pack_bytes += loc.len as u64 + crate::chunk::pack::HEADER_LEN;
            }
        }
        let mut node_bytes = 0u64;
        for entry in self.meta.locs(Index::Nodes) {
            let (id, loc) = entry?;
            if reachable_nodes.contains(&id) {
                node_bytes += loc.len as u64;
                live_pack_bytes += loc.len as u64 + crate::chunk::pack::HEADER_LEN;
            }
        }
        let pack_bytes = self.chunks.packs_bytes();
        let packs = crate::chunk::pack::list_packs(self.chunks.dir())?.len() as u64;
        Ok(Stats {
            block_size: bs,
            files,
            logical_bytes: logical,
            allocated_bytes: allocated,
            stored_bytes: stored,
            pack_bytes,
            garbage_bytes: pack_bytes.saturating_sub(live_pack_bytes),
            meta_bytes: self.meta.size_on_disk(),
            node_bytes,
            chunks,
            nodes: reachable_nodes.len() as u64,
            packs,
            dedup_ratio: if stored == 0 {
                1.0
            } else {
                allocated as f64 / stored as f64
            },
        })
    }

    /// Usage of the trees rooted at `roots`: what they hold, share and alone keep alive.
    pub fn du(&self, roots: &[InodeNo]) -> Result<Usage> {
        self.sync_all()?;
        let bs = self.block_size();
        // The inodes of the trees.
        let mut inside: HashSet<InodeNo> = HashSet::new();
        let mut stack: Vec<InodeNo> = roots.to_vec();
        while let Some(ino) = stack.pop() {
            if !inside.insert(ino) {
                continue;
            }
            if self.inode(ino)?.kind == FileKind::Dir {
                for (_, e) in self.meta.dir_entries(ino, View::Live, None, usize::MAX)? {
                    stack.push(e.ino);
                }
            }
        }
        let mut usage = Usage::default();
        // How many blocks of the paths point at each chunk.
        let mut mine: HashMap<ChunkId, u64> = HashMap::new();
        for ino in &inside {
            let inode = self.inode(*ino)?;
            if inode.kind != FileKind::File {
                continue;
            }
            usage.files += 1;
            usage.logical_bytes += inode.size;
            usage.stored_bytes += inode.data_blocks() * bs;
            self.maps
                .for_each_chunk(inode.map, 0, u64::MAX, &mut |_, c| {
                    *mine.entry(c).or_default() += 1;
                    Ok(())
                })?;
        }
        // Chunks anyone else reaches are shared: other files, and every version a
        // snapshot sees (the paths' own live records included, when a snapshot sees them).
        let snaps: Vec<u64> = self.meta.snapshots()?.iter().map(|r| r.epoch).collect();
        let mut shared: HashSet<ChunkId> = HashSet::new();
        let mut seen_other = HashSet::new();
        for v in self.meta.inode_versions() {
            let v = v?;
            let newer = v.newer.map(|e| e.0).unwrap_or(u64::MAX);
            let seen_by_snapshot = snaps.iter().any(|s| (v.epoch.0..newer).contains(s));
            if inside.contains(&v.inode.ino) && !seen_by_snapshot {
                continue;
            }
            self.maps.walk(v.inode.map, &mut seen_other, &mut |c| {
                if mine.contains_key(c) {
                    shared.insert(*c);
                }
            })?;
        }
        usage.exclusive_bytes = (mine.len() - shared.len()) as u64 * bs;
        usage.shared_bytes = shared.iter().map(|c| mine[c]).sum::<u64>() * bs;
        Ok(usage)
    }
}

//! Scrub: reads and verifies every stored chunk and block-map node of an open (possibly
//! mounted) store, and names the files and offsets that damage makes unreadable.
//!
//! Every normal read already verifies its chunk (`ChunkStore::read_loc`); scrub finds
//! damage before a VM trips over it, including in blocks nobody reads and in snapshots.
//! It runs alongside writers and GC: an index entry that changes under it (compaction
//! moved the chunk, the sweep removed it) is looked up again, never reported as damage.
//!
//! [`locate`] maps damaged chunk and node ids back to `(inode, path, offset)` by walking
//! every inode version's block map; it visits each distinct node once and descends only
//! into subtrees that contain damage. `fsck` uses it too.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Instant;

use serde::Serialize;

use crate::blockmap::FANOUT;
use crate::error::{FsError, Result};
use crate::fs::Datastore;
use crate::gc::Throttle;
use crate::ids::{ChunkId, InodeNo};
use crate::meta::{ChunkLoc, FileKind, Index, MapRoot, View};

/// Most damaged blocks listed in a report (the total is always counted).
pub const MAX_LISTED: usize = 10_000;

/// How a scrub runs.
#[derive(Clone, Debug, Default)]
pub struct ScrubOptions {
    /// Pace: the most chunk bytes read per second (`None`: unbounded).
    pub max_bytes_per_sec: Option<u64>,
}

/// An index entry whose bytes do not verify.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DamagedChunk {
    /// Full hex name of the chunk.
    pub chunk: String,
    pub pack: u32,
    pub offset: u64,
    pub len: u32,
    pub detail: String,
}

/// A block-map node that is missing, does not decode or does not match its name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DamagedNode {
    pub node: String,
    pub detail: String,
}

/// A range of a file that cannot be read because of a damaged chunk or node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DamagedBlock {
    pub ino: u64,
    /// A path of the live file, when it has one.
    pub path: Option<String>,
    /// Byte offset in the file.
    pub offset: u64,
    /// Bytes affected: one block for a chunk, a node's whole span for a node.
    pub length: u64,
    /// The damaged chunk or node (hex).
    pub id: String,
    /// Whether `id` is a block-map node rather than a data chunk.
    pub node: bool,
    /// The live file is affected.
    pub live: bool,
    /// Snapshots whose version of the file is affected.
    pub snapshots: Vec<String>,
}

impl std::fmt::Display for DamagedBlock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.path {
            Some(p) => write!(f, "{p} (inode {})", self.ino)?,
            None => write!(f, "inode {}", self.ino)?,
        }
        write!(
            f,
            " offset {} length {}: {} {} is damaged",
            self.offset,
            self.length,
            if self.node { "block-map node" } else { "chunk" },
            &self.id[..16.min(self.id.len())]
        )?;
        if !self.snapshots.is_empty() {
            write!(f, " (in snapshots {})", self.snapshots.join(", "))?;
        }
        Ok(())
    }
}

/// What a scrub found (`thinfs scrub --json`).
#[derive(Clone, Debug, Default, Serialize)]
pub struct ScrubReport {
    pub chunks_checked: u64,
    pub bytes_checked: u64,
    pub nodes_checked: u64,
    pub damaged_chunks: Vec<DamagedChunk>,
    pub damaged_nodes: Vec<DamagedNode>,
    /// File ranges the damage makes unreadable (at most [`MAX_LISTED`]).
    pub damaged_blocks: Vec<DamagedBlock>,
    pub damaged_blocks_total: u64,
    /// Nothing damaged.
    pub clean: bool,
    pub duration_ms: u64,
}

/// Verifies every chunk and node of `ds`. `progress(done, total)` counts index entries.
pub fn scrub(
    ds: &Datastore,
    opts: &ScrubOptions,
    progress: &dyn Fn(u64, u64),
) -> Result<ScrubReport> {
    let start = Instant::now();
    let meta = ds.meta();
    let mut report = ScrubReport::default();
    let total = meta.chunk_locs().count() as u64;
    let mut throttle = Throttle::new(opts.max_bytes_per_sec);
    let mut bad_chunks = HashSet::new();
    for entry in meta.chunk_locs() {
        let (id, loc) = entry?;
        report.chunks_checked += 1;
        report.bytes_checked += loc.len as u64;
        if let Some(d) = verify_chunk(ds, &id, loc)? {
            tracing::error!(
                "scrub: chunk {id} in pack {} at offset {}: {}",
                d.pack,
                d.offset,
                d.detail
            );
            bad_chunks.insert(id);
            report.damaged_chunks.push(d);
        }
        throttle.account(loc.len as u64);
        if report.chunks_checked % 1024 == 0 || report.chunks_checked == total {
            progress(report.chunks_checked, total);
        }
    }
    let mut bad_nodes = HashSet::new();
    let node_ids = meta.ids(Index::Nodes).chain(meta.legacy_node_ids());
    for id in node_ids {
        let id = id?;
        report.nodes_checked += 1;
        // Missing: removed by a concurrent GC since it was listed.
        if let NodeCheck::Bad(detail) = verify_node(ds, &id)? {
            tracing::error!("scrub: block-map node {id}: {detail}");
            bad_nodes.insert(id);
            report.damaged_nodes.push(DamagedNode {
                node: id.to_hex(),
                detail,
            });
        }
    }
    if !bad_chunks.is_empty() || !bad_nodes.is_empty() {
        let (blocks, total) = locate(ds, &bad_chunks, &bad_nodes)?;
        for b in &blocks {
            tracing::error!("scrub: {b}");
        }
        report.damaged_blocks = blocks;
        report.damaged_blocks_total = total;
    }
    report.clean = report.damaged_chunks.is_empty() && report.damaged_nodes.is_empty();
    report.duration_ms = start.elapsed().as_millis() as u64;
    Ok(report)
}

/// Checks the bytes of one index entry; `None` if they verify or if the entry changed or
/// went away meanwhile (a concurrent GC).
pub(crate) fn verify_chunk(
    ds: &Datastore,
    id: &ChunkId,
    mut loc: ChunkLoc,
) -> Result<Option<DamagedChunk>> {
    loop {
        let err = match ds.chunks().read_loc(id, &loc) {
            Ok(_) => return Ok(None),
            Err(e) => e,
        };
        match ds.meta().chunk_loc(id)? {
            Some(now) if now != loc => loc = now,
            Some(_) => {
                let detail = match err {
                    FsError::Corrupt { detail, .. } => detail,
                    other => other.to_string(),
                };
                return Ok(Some(DamagedChunk {
                    chunk: id.to_hex(),
                    pack: loc.pack,
                    offset: loc.offset,
                    len: loc.len,
                    detail,
                }));
            }
            None => return Ok(None),
        }
    }
}

/// What [`verify_node`] found.
pub(crate) enum NodeCheck {
    Good,
    Missing,
    /// Present but not named by the hash of its bytes, or undecodable.
    Bad(String),
}

/// Checks one stored node: present, named by the hash of its bytes, decodable.
pub(crate) fn verify_node(ds: &Datastore, id: &ChunkId) -> Result<NodeCheck> {
    match ds.maps().node_bytes(id) {
        Ok(None) => return Ok(NodeCheck::Missing),
        Ok(Some(_)) => {}
        Err(FsError::Corrupt { detail, .. }) => return Ok(NodeCheck::Bad(detail)),
        Err(FsError::Meta(detail)) => return Ok(NodeCheck::Bad(detail)),
        Err(e) => return Err(e),
    }
    if let Err(e) = ds.maps().load(id) {
        return Ok(NodeCheck::Bad(e.to_string()));
    }
    Ok(NodeCheck::Good)
}

/// Blocks covered by one slot of a node at `level`.
fn span(level: u8) -> u64 {
    FANOUT.saturating_pow(level as u32 - 1)
}

/// Finds where damaged chunks and nodes sit in files: every inode version (live and
/// snapshot) whose map reaches one. Nodes that cannot be loaded count as damaged too.
/// Returns at most [`MAX_LISTED`] blocks and the total.
pub(crate) fn locate(
    ds: &Datastore,
    chunks: &HashSet<ChunkId>,
    nodes: &HashSet<ChunkId>,
) -> Result<(Vec<DamagedBlock>, u64)> {
    let meta = ds.meta();
    let mut snaps: Vec<(u64, String)> = meta
        .snapshots()?
        .into_iter()
        .map(|r| (r.epoch, r.name))
        .collect();
    snaps.sort();
    let mut finder = Finder {
        ds,
        chunks,
        nodes,
        memo: HashMap::new(),
    };
    // (ino, offset, id) -> block; BTreeMap keeps the report in file order.
    let mut found: BTreeMap<(u64, u64, ChunkId), DamagedBlock> = BTreeMap::new();
    for v in meta.inode_versions() {
        let v = v?;
        if v.inode.kind != FileKind::File {
            continue;
        }
        let Some(root) = v.inode.map else { continue };
        let mut hits = Vec::new();
        finder.hits(root, &mut hits)?;
        if hits.is_empty() {
            continue;
        }
        let live = v.newer.is_none();
        let upper = v.newer.map(|e| e.0).unwrap_or(u64::MAX);
        let in_snaps: Vec<String> = snaps
            .iter()
            .filter(|(e, _)| *e >= v.epoch.0 && *e < upper)
            .map(|(_, n)| n.clone())
            .collect();
        if !live && in_snaps.is_empty() {
            continue; // a version no one sees any more
        }
        let bs = ds.block_size();
        for (block, blocks, id, is_node) in hits {
            let b = found
                .entry((v.inode.ino.0, block, id))
                .or_insert_with(|| DamagedBlock {
                    ino: v.inode.ino.0,
                    path: None,
                    offset: block.saturating_mul(bs),
                    length: blocks.saturating_mul(bs),
                    id: id.to_hex(),
                    node: is_node,
                    live: false,
                    snapshots: Vec::new(),
                });
            b.live |= live;
            b.snapshots.extend(in_snaps.iter().cloned());
        }
    }
    let total = found.len() as u64;
    let mut out: Vec<DamagedBlock> = found.into_values().take(MAX_LISTED).collect();
    let inos: HashSet<InodeNo> = out
        .iter()
        .filter(|b| b.live)
        .map(|b| InodeNo(b.ino))
        .collect();
    let paths = live_paths(ds, &inos)?;
    for b in &mut out {
        if b.live {
            b.path = paths.get(&InodeNo(b.ino)).cloned();
        }
    }
    Ok((out, total))
}

enum Usable {
    Entries(std::sync::Arc<Vec<crate::blockmap::Entry>>),
    Damaged,
    Gone,
}

/// Walks block maps looking for damaged ids, skipping subtrees known to be clean.
struct Finder<'a> {
    ds: &'a Datastore,
    chunks: &'a HashSet<ChunkId>,
    nodes: &'a HashSet<ChunkId>,
    /// Whether the subtree under a node holds damage.
    memo: HashMap<ChunkId, bool>,
}

impl Finder<'_> {
    /// Appends `(first block, blocks, damaged id, is a node)` for every damage under `root`.
    fn hits(&mut self, root: MapRoot, out: &mut Vec<(u64, u64, ChunkId, bool)>) -> Result<()> {
        self.node(root.node, root.depth, 0, out)
    }

    fn node(
        &mut self,
        id: ChunkId,
        level: u8,
        base: u64,
        out: &mut Vec<(u64, u64, ChunkId, bool)>,
    ) -> Result<()> {
        if !self.dirty(id, level)? {
            return Ok(());
        }
        let entries = match self.usable(&id) {
            Usable::Entries(e) => e,
            Usable::Gone => return Ok(()),
            Usable::Damaged => {
                out.push((base, span(level).saturating_mul(FANOUT), id, true));
                return Ok(());
            }
        };
        let sp = span(level);
        for e in entries.iter() {
            let lo = base + e.slot as u64 * sp;
            if level == 1 {
                if self.chunks.contains(&e.id) {
                    out.push((lo, 1, e.id, false));
                }
            } else {
                self.node(e.id, level - 1, lo, out)?;
            }
        }
        Ok(())
    }

    /// The node's entries, unless it is one of the damaged ones. A node that is not but
    /// cannot be loaded went away since the caller listed the damage (a concurrent GC
    /// swept a version dropped meanwhile): nothing to report under it.
    fn usable(&self, id: &ChunkId) -> Usable {
        if self.nodes.contains(id) {
            return Usable::Damaged;
        }
        match self.ds.maps().load(id) {
            Ok(e) => Usable::Entries(e),
            Err(_) => Usable::Gone,
        }
    }

    /// Whether the subtree under node `id` holds a damaged chunk or node.
    fn dirty(&mut self, id: ChunkId, level: u8) -> Result<bool> {
        if let Some(d) = self.memo.get(&id) {
            return Ok(*d);
        }
        let d = match self.usable(&id) {
            Usable::Damaged => true,
            Usable::Gone => false,
            Usable::Entries(entries) if level == 1 => {
                entries.iter().any(|e| self.chunks.contains(&e.id))
            }
            Usable::Entries(entries) => {
                let mut any = false;
                for e in entries.iter() {
                    any |= self.dirty(e.id, level - 1)?;
                }
                any
            }
        };
        self.memo.insert(id, d);
        Ok(d)
    }
}

/// A path of each live inode in `want`, found by walking the live tree from the root.
pub(crate) fn live_paths(
    ds: &Datastore,
    want: &HashSet<InodeNo>,
) -> Result<HashMap<InodeNo, String>> {
    let mut out = HashMap::new();
    if want.is_empty() {
        return Ok(out);
    }
    let mut stack = vec![(InodeNo::ROOT, String::new())];
    let mut seen = HashSet::new();
    while let Some((dir, path)) = stack.pop() {
        if !seen.insert(dir) {
            continue;
        }
        for (name, e) in ds.meta().dir_entries(dir, View::Live, None, usize::MAX)? {
            let p = format!("{path}/{}", String::from_utf8_lossy(&name));
            if want.contains(&e.ino) {
                out.entry(e.ino).or_insert_with(|| p.clone());
                if out.len() == want.len() {
                    return Ok(out);
                }
            }
            if e.kind == FileKind::Dir {
                stack.push((e.ino, p));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::namespace::Creator;
    use crate::fs::OpenOptions;
    use crate::meta::ChunkLoc;

    const WHO: Creator = Creator { uid: 0, gid: 0 };

    #[test]
    fn finds_damage_and_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("s");
        Datastore::mkfs(&store, 4096).unwrap();
        let ds = Datastore::open(
            &store,
            &OpenOptions {
                no_background: true,
                ..Default::default()
            },
        )
        .unwrap();
        let d = ds.mkdir(InodeNo::ROOT, b"vm", 0o755, WHO).unwrap();
        let f = ds.create(d.ino, b"disk.raw", 0o644, WHO).unwrap();
        let mut data = vec![0u8; 4 * 4096];
        for (i, b) in data.iter_mut().enumerate() {
            *b = (i / 4096 + 1) as u8;
        }
        ds.write(f.ino, 0, &data).unwrap();
        ds.sync_all().unwrap();
        let clean = scrub(&ds, &ScrubOptions::default(), &|_, _| {}).unwrap();
        assert!(clean.clean);
        assert_eq!(clean.chunks_checked, 4);
        assert!(clean.nodes_checked >= 1);
        // Damage block 2's chunk.
        let id = ChunkId::of(&data[2 * 4096..3 * 4096]);
        let loc: ChunkLoc = ds.meta().chunk_loc(&id).unwrap().unwrap();
        let path = crate::chunk::pack::pack_path(ds.chunks().dir(), loc.pack);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[loc.offset as usize] ^= 0x80;
        std::fs::write(&path, bytes).unwrap();
        let r = scrub(&ds, &ScrubOptions::default(), &|_, _| {}).unwrap();
        assert!(!r.clean);
        assert_eq!(r.damaged_chunks.len(), 1);
        assert_eq!(r.damaged_chunks[0].chunk, id.to_hex());
        assert_eq!(r.damaged_blocks.len(), 1);
        let b = &r.damaged_blocks[0];
        assert_eq!(b.path.as_deref(), Some("/vm/disk.raw"));
        assert_eq!((b.offset, b.length, b.live), (2 * 4096, 4096, true));
        assert!(b.to_string().contains("/vm/disk.raw"));
    }
}

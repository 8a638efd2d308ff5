//! fsck: an offline consistency check of a store, and a repair of its chunk index.
//!
//! [`fsck`] opens the store itself (taking its lock, so a mounted store is refused) and
//! checks that:
//! - every block-map node of every inode version (live and snapshot) exists, is named by
//!   the hash of its bytes, decodes, has its slots in order and the data-block counts its
//!   parent and the inode record claim;
//! - every chunk a map references has an index entry, and every index entry's bytes are
//!   in their pack and hash to the chunk's name;
//! - every live directory entry points at a live inode of the kind it says, directory
//!   parents and link counts agree with the entries, and every live inode has a name.
//!
//! Unreachable chunks, nodes and inodes, and pack bytes nothing indexes, are leaks: they
//! are reported, they are not errors (GC reclaims chunks and nodes).
//!
//! `--repair` rebuilds index entries from the pack files, whose records are
//! self-describing (`pack::scan_verified`): a referenced chunk that has no entry, or whose
//! entry does not verify, is pointed at a record whose bytes hash right. It only ever
//! replaces a missing or failing entry with a verified one, so it never makes the store
//! worse. Missing nodes cannot be rebuilt (they live only in the metadata store); the
//! report names the files and offsets they, and chunks no pack holds, make unreadable.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::Instant;

use serde::Serialize;

use crate::chunk::pack;
use crate::error::Result;
use crate::fs::{Datastore, OpenOptions};
use crate::ids::{ChunkId, InodeNo};
use crate::meta::{ChunkLoc, FileKind, Index, MapRoot};
use crate::scrub::{self, DamagedBlock, DamagedChunk, DamagedNode, NodeCheck, MAX_LISTED};

/// What one pass of checks found.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Findings {
    pub inode_versions: u64,
    pub live_inodes: u64,
    pub nodes_checked: u64,
    pub chunks_checked: u64,
    pub chunk_bytes_checked: u64,
    pub packs: u64,
    pub pack_bytes: u64,

    /// Errors found (the lists below may be cut at [`MAX_LISTED`]).
    pub errors: u64,
    /// Nodes that are missing, damaged or inconsistent.
    pub bad_nodes: Vec<DamagedNode>,
    /// Referenced chunks without an index entry (hex).
    pub missing_chunks: Vec<String>,
    /// Referenced chunks whose index entry does not verify.
    pub damaged_chunks: Vec<DamagedChunk>,
    /// File ranges the bad nodes and missing or damaged chunks make unreadable.
    pub damaged_blocks: Vec<DamagedBlock>,
    pub damaged_blocks_total: u64,
    /// Inode records whose map root disagrees with the map.
    pub bad_inodes: Vec<String>,
    /// Directory entries, parents and link counts that disagree.
    pub namespace_errors: Vec<String>,

    /// Index entries no inode version reaches (GC reclaims them).
    pub leaked_chunks: u64,
    pub leaked_chunk_bytes: u64,
    /// Of the leaked entries, those whose bytes do not verify either.
    pub leaked_damaged_chunks: u64,
    /// Nodes no inode version reaches (GC reclaims them).
    pub leaked_nodes: u64,
    /// Live inodes that no directory entry names.
    pub unreachable_inodes: Vec<u64>,
    /// Pack bytes that no index entry covers (compaction reclaims them).
    pub garbage_pack_bytes: u64,
}

impl Findings {
    fn error(&mut self) {
        self.errors += 1;
    }
}

/// What `--repair` did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Repair {
    /// Index entries added for referenced chunks that had none.
    pub entries_restored: u64,
    /// Failing index entries replaced by a verified copy.
    pub entries_replaced: u64,
    /// Referenced chunks no pack holds a good copy of.
    pub still_missing: u64,
}

/// The result of `thinfs fsck` (`--json`).
#[derive(Clone, Debug, Default, Serialize)]
pub struct FsckReport {
    /// No error remains (leaks are not errors).
    pub clean: bool,
    /// What the check found.
    pub found: Findings,
    /// What the repair did, if asked for and needed.
    pub repair: Option<Repair>,
    /// The check after the repair.
    pub after_repair: Option<Findings>,
    pub duration_ms: u64,
}

/// Checks the unmounted store at `store`; with `repair`, rebuilds its chunk index from
/// the packs where that helps. Fails with `FsError::Busy` if the store is in use.
pub fn fsck(store: &Path, repair: bool) -> Result<FsckReport> {
    let start = Instant::now();
    let ds = Datastore::open(
        store,
        &OpenOptions {
            no_background: true,
            ..Default::default()
        },
    )?;
    let found = check(&ds)?;
    let mut report = FsckReport {
        clean: found.errors == 0,
        ..Default::default()
    };
    let targets: HashSet<ChunkId> = found
        .missing_chunks
        .iter()
        .chain(found.damaged_chunks.iter().map(|d| &d.chunk))
        .filter_map(|h| parse_hex(h))
        .collect();
    if repair && !targets.is_empty() {
        let r = rebuild_index(&ds, targets)?;
        let after = check(&ds)?;
        report.clean = after.errors == 0;
        report.repair = Some(r);
        report.after_repair = Some(after);
    }
    report.found = found;
    ds.sync_all()?;
    report.duration_ms = start.elapsed().as_millis() as u64;
    Ok(report)
}

fn parse_hex(h: &str) -> Option<ChunkId> {
    if h.len() != 64 {
        return None;
    }
    let mut b = [0u8; 32];
    for (i, out) in b.iter_mut().enumerate() {
        *out = u8::from_str_radix(h.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(ChunkId(b))
}

/// Runs every check on an open store. The lists are complete up to [`MAX_LISTED`]; the
/// error count is exact.
pub(crate) fn check(ds: &Datastore) -> Result<Findings> {
    let meta = ds.meta();
    let mut f = Findings::default();
    // ---- block maps of every inode version ----
    let mut walker = MapCheck {
        ds,
        memo: HashMap::new(),
        chunks: HashSet::new(),
        bad: Vec::new(),
    };
    for v in meta.inode_versions() {
        let v = v?;
        f.inode_versions += 1;
        let Some(root) = v.inode.map else { continue };
        if let Some(blocks) = walker.root(root)? {
            if blocks != root.blocks {
                f.error();
                push(
                    &mut f.bad_inodes,
                    format!(
                        "inode {} (epoch {}): record says {} data blocks, its map holds {blocks}",
                        v.inode.ino, v.epoch.0, root.blocks
                    ),
                );
            }
        }
    }
    f.nodes_checked = walker.memo.len() as u64;
    let bad_nodes: HashSet<ChunkId> = walker.bad.iter().map(|(id, _)| *id).collect();
    for (id, detail) in &walker.bad {
        f.error();
        if f.bad_nodes.len() < MAX_LISTED {
            f.bad_nodes.push(DamagedNode {
                node: id.to_hex(),
                detail: detail.clone(),
            });
        }
    }
    // Nodes in the packs count as live pack bytes whether reachable or not (GC removes
    // the unreachable ones' entries; compaction then their bytes).
    let mut indexed_live: HashMap<u32, u64> = HashMap::new();
    for entry in meta.locs(Index::Nodes) {
        let (id, loc) = entry?;
        *indexed_live.entry(loc.pack).or_default() += loc.len as u64 + pack::HEADER_LEN;
        f.leaked_nodes += !walker.memo.contains_key(&id) as u64;
    }
    for id in meta.legacy_node_ids() {
        f.leaked_nodes += !walker.memo.contains_key(&id?) as u64;
    }
    let referenced = walker.chunks;
    // ---- chunk index ----
    let mut bad_chunks: HashSet<ChunkId> = HashSet::new();
    let mut seen_refs = 0u64;
    for entry in meta.chunk_locs() {
        let (id, loc) = entry?;
        f.chunks_checked += 1;
        f.chunk_bytes_checked += loc.len as u64;
        *indexed_live.entry(loc.pack).or_default() += loc.len as u64 + pack::HEADER_LEN;
        let damage = scrub::verify_chunk(ds, &id, loc)?;
        if referenced.contains(&id) {
            seen_refs += 1;
            if let Some(d) = damage {
                f.error();
                bad_chunks.insert(id);
                if f.damaged_chunks.len() < MAX_LISTED {
                    f.damaged_chunks.push(d);
                }
            }
        } else {
            f.leaked_chunks += 1;
            f.leaked_chunk_bytes += loc.len as u64;
            f.leaked_damaged_chunks += damage.is_some() as u64;
        }
    }
    if seen_refs < referenced.len() as u64 {
        for id in &referenced {
            if meta.chunk_loc(id)?.is_none() {
                f.error();
                bad_chunks.insert(*id);
                push(&mut f.missing_chunks, id.to_hex());
            }
        }
    }
    // ---- packs ----
    for p in pack::list_packs(ds.chunks().dir())? {
        let path = pack::pack_path(ds.chunks().dir(), p);
        let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        f.packs += 1;
        f.pack_bytes += size;
        f.garbage_pack_bytes += size.saturating_sub(indexed_live.get(&p).copied().unwrap_or(0));
    }
    // ---- where the damage is ----
    if !bad_chunks.is_empty() || !bad_nodes.is_empty() {
        let (blocks, total) = scrub::locate(ds, &bad_chunks, &bad_nodes)?;
        f.damaged_blocks = blocks;
        f.damaged_blocks_total = total;
    }
    check_namespace(ds, &mut f)?;
    Ok(f)
}

/// Appends to a report list unless it is full.
fn push(list: &mut Vec<String>, s: String) {
    if list.len() < MAX_LISTED {
        list.push(s);
    }
}

/// Checks every block-map node once, collecting the chunks maps reference.
struct MapCheck<'a> {
    ds: &'a Datastore,
    /// Data blocks under each node visited (`None`: the node is bad).
    memo: HashMap<ChunkId, Option<u64>>,
    chunks: HashSet<ChunkId>,
    bad: Vec<(ChunkId, String)>,
}

impl MapCheck<'_> {
    /// Data blocks under `root`, or `None` if some node of it is bad.
    fn root(&mut self, root: MapRoot) -> Result<Option<u64>> {
        if root.depth == 0 || root.depth > crate::blockmap::MAX_DEPTH {
            self.bad
                .push((root.node, format!("map root claims depth {}", root.depth)));
            return Ok(None);
        }
        self.node(root.node, root.depth)
    }

    fn node(&mut self, id: ChunkId, level: u8) -> Result<Option<u64>> {
        if let Some(m) = self.memo.get(&id) {
            return Ok(*m);
        }
        let result = self.check_node(id, level)?;
        self.memo.insert(id, result);
        Ok(result)
    }

    fn check_node(&mut self, id: ChunkId, level: u8) -> Result<Option<u64>> {
        match scrub::verify_node(self.ds, &id)? {
            NodeCheck::Good => {}
            NodeCheck::Missing => {
                self.bad.push((id, "missing".into()));
                return Ok(None);
            }
            NodeCheck::Bad(problem) => {
                self.bad.push((id, problem));
                return Ok(None);
            }
        }
        let entries = self.ds.maps().load(&id)?;
        if entries.windows(2).any(|w| w[0].slot >= w[1].slot) {
            self.bad.push((id, "slots out of order".into()));
            return Ok(None);
        }
        if level == 1 {
            for e in entries.iter() {
                self.chunks.insert(e.id);
            }
            return Ok(Some(entries.len() as u64));
        }
        let mut total = 0u64;
        let mut ok = true;
        for e in entries.iter() {
            match self.node(e.id, level - 1)? {
                Some(n) if n == e.count => {}
                Some(n) => {
                    ok = false;
                    self.bad.push((
                        id,
                        format!(
                            "slot {} claims {} data blocks, its child holds {n}",
                            e.slot, e.count
                        ),
                    ));
                }
                None => ok = false,
            }
            total += e.count;
        }
        Ok(ok.then_some(total))
    }
}

/// Directory entries, parents, link counts, unreachable inodes (live tree).
fn check_namespace(ds: &Datastore, f: &mut Findings) -> Result<()> {
    let meta = ds.meta();
    struct Seen {
        kind: FileKind,
        nlink: u32,
        parent: InodeNo,
        names: u32,
        subdirs: u32,
    }
    let mut live: HashMap<InodeNo, Seen> = HashMap::new();
    for i in meta.live_inodes() {
        let i = i?;
        live.insert(
            i.ino,
            Seen {
                kind: i.kind,
                nlink: i.nlink,
                parent: i.parent,
                names: 0,
                subdirs: 0,
            },
        );
    }
    f.live_inodes = live.len() as u64;
    let dirs: Vec<InodeNo> = live
        .iter()
        .filter(|(_, s)| s.kind == FileKind::Dir)
        .map(|(i, _)| *i)
        .collect();
    for dir in dirs {
        for (name, e) in meta.dir_entries(dir, crate::meta::View::Live, None, usize::MAX)? {
            let name = String::from_utf8_lossy(&name);
            let Some(t) = live.get_mut(&e.ino) else {
                f.error();
                push(
                    &mut f.namespace_errors,
                    format!(
                        "entry {name:?} of directory {dir} points at missing inode {}",
                        e.ino
                    ),
                );
                continue;
            };
            t.names += 1;
            if t.kind != e.kind {
                f.error();
                push(
                    &mut f.namespace_errors,
                    format!(
                        "entry {name:?} of directory {dir} says {:?}, inode {} is {:?}",
                        e.kind, e.ino, t.kind
                    ),
                );
            }
            if t.kind == FileKind::Dir {
                if t.parent != dir {
                    f.error();
                    push(
                        &mut f.namespace_errors,
                        format!(
                            "directory {} is entry {name:?} of {dir} but records parent {}",
                            e.ino, t.parent
                        ),
                    );
                }
                if let Some(p) = live.get_mut(&dir) {
                    p.subdirs += 1;
                }
            }
        }
    }
    let mut unreachable = Vec::new();
    for (ino, s) in &live {
        if *ino != InodeNo::ROOT && s.names == 0 {
            unreachable.push(ino.0);
            continue;
        }
        let want = match s.kind {
            FileKind::Dir => 2 + s.subdirs,
            _ => s.names,
        };
        if s.nlink != want {
            f.error();
            push(
                &mut f.namespace_errors,
                format!("inode {ino} has link count {} but {want} links", s.nlink),
            );
        }
    }
    unreachable.sort_unstable();
    unreachable.truncate(MAX_LISTED);
    f.unreachable_inodes = unreachable;
    Ok(())
}

/// Points each target chunk at a verified record found in the packs.
fn rebuild_index(ds: &Datastore, mut targets: HashSet<ChunkId>) -> Result<Repair> {
    let meta = ds.meta();
    let mut r = Repair::default();
    for p in pack::list_packs(ds.chunks().dir())? {
        if targets.is_empty() {
            break;
        }
        let path = pack::pack_path(ds.chunks().dir(), p);
        let records = match pack::scan_verified(&path) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("fsck: skipping pack {p}: {e}");
                continue;
            }
        };
        for rec in records {
            if !targets.contains(&rec.id) {
                continue;
            }
            let loc = ChunkLoc {
                pack: p,
                offset: rec.offset,
                len: rec.len,
            };
            // Verified again through the store's own read path before it is trusted.
            if ds.chunks().read_loc(&rec.id, &loc).is_err() {
                continue;
            }
            if meta.chunk_loc(&rec.id)?.is_some() {
                r.entries_replaced += 1;
            } else {
                r.entries_restored += 1;
            }
            ds.chunks().restore_loc(Index::Chunks, &rec.id, &loc)?;
            targets.remove(&rec.id);
        }
    }
    meta.flush()?;
    r.still_missing = targets.len() as u64;
    for id in &targets {
        tracing::error!("fsck: no pack holds a good copy of chunk {id}");
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::testing::{opts, WHO};
    use crate::FsError;

    /// A store with one directory, two files sharing a block, and a deleted file.
    fn store() -> (tempfile::TempDir, std::path::PathBuf, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("s");
        Datastore::mkfs(&store, 4096).unwrap();
        let ds = Datastore::open(&store, &opts()).unwrap();
        let d = ds.mkdir(InodeNo::ROOT, b"d", 0o755, WHO).unwrap();
        let a = ds.create(d.ino, b"a", 0o644, WHO).unwrap();
        let b = ds.create(InodeNo::ROOT, b"b", 0o644, WHO).unwrap();
        let gone = ds.create(InodeNo::ROOT, b"gone", 0o644, WHO).unwrap();
        let data: Vec<u8> = (0..3 * 4096).map(|i| (i % 251) as u8).collect();
        ds.write(a.ino, 0, &data).unwrap();
        ds.write(b.ino, 4096, &data[..4096]).unwrap();
        ds.write(gone.ino, 0, &[9u8; 4096]).unwrap();
        ds.sync_all().unwrap();
        ds.unlink(InodeNo::ROOT, b"gone").unwrap();
        ds.link(a.ino, InodeNo::ROOT, b"a2").unwrap();
        drop(ds);
        (dir, store, data)
    }

    #[test]
    fn clean_store_with_a_leak() {
        let (_d, store, _) = store();
        let r = fsck(&store, false).unwrap();
        assert!(r.clean, "{r:#?}");
        assert_eq!(r.found.errors, 0);
        assert_eq!(r.found.leaked_chunks, 1, "the deleted file's chunk");
        assert!(r.found.leaked_nodes >= 1);
        assert_eq!(r.found.chunks_checked, 4);
        assert!(r.repair.is_none());
    }

    #[test]
    fn refuses_an_open_store() {
        let (_d, store, _) = store();
        let _ds = Datastore::open(&store, &opts()).unwrap();
        assert!(matches!(fsck(&store, false), Err(FsError::Busy(_))));
    }

    #[test]
    fn repair_restores_lost_and_bad_index_entries() {
        let (_d, store, data) = store();
        let lost = ChunkId::of(&data[..4096]); // shared by d/a and b
        let bad = ChunkId::of(&data[4096..8192]);
        {
            let ds = Datastore::open(&store, &opts()).unwrap();
            ds.meta().remove_chunk_loc(&lost).unwrap();
            let mut loc = ds.meta().chunk_loc(&bad).unwrap().unwrap();
            loc.offset += 1;
            ds.meta().put_chunk_loc(&bad, &loc).unwrap();
            ds.meta().flush().unwrap();
        }
        let r = fsck(&store, false).unwrap();
        assert!(!r.clean);
        assert_eq!(r.found.missing_chunks, vec![lost.to_hex()]);
        assert_eq!(r.found.damaged_chunks.len(), 1);
        assert_eq!(r.found.damaged_chunks[0].chunk, bad.to_hex());
        let paths: Vec<(Option<String>, u64)> = r
            .found
            .damaged_blocks
            .iter()
            .map(|b| (b.path.clone(), b.offset))
            .collect();
        assert!(paths.contains(&(Some("/b".into()), 4096)), "{paths:?}");
        assert!(paths.iter().any(|(p, o)| p
            .as_deref()
            .is_some_and(|p| p.ends_with("a") || p.ends_with("a2"))
            && *o == 0));
        assert!(paths.iter().any(|(_, o)| *o == 4096), "{paths:?}");
        let r = fsck(&store, true).unwrap();
        assert!(r.clean, "{r:#?}");
        let rep = r.repair.unwrap();
        assert_eq!(
            (
                rep.entries_restored,
                rep.entries_replaced,
                rep.still_missing
            ),
            (1, 1, 0)
        );
        let ds = Datastore::open(&store, &opts()).unwrap();
        let d = ds.lookup(InodeNo::ROOT, b"d").unwrap();
        let a = ds.lookup(d.ino, b"a").unwrap();
        assert_eq!(ds.read(a.ino, 0, data.len() as u32).unwrap(), data);
    }

    #[test]
    fn repair_reports_what_no_pack_holds() {
        let (_d, store, data) = store();
        let gone = ChunkId::of(&data[8192..]);
        {
            let ds = Datastore::open(&store, &opts()).unwrap();
            let loc = ds.meta().chunk_loc(&gone).unwrap().unwrap();
            ds.meta().remove_chunk_loc(&gone).unwrap();
            ds.meta().flush().unwrap();
            // Destroy the record itself too.
            let path = pack::pack_path(ds.chunks().dir(), loc.pack);
            let mut bytes = std::fs::read(&path).unwrap();
            bytes[loc.offset as usize + 100] ^= 1;
            std::fs::write(&path, bytes).unwrap();
        }
        let r = fsck(&store, true).unwrap();
        assert!(!r.clean);
        let rep = r.repair.as_ref().unwrap();
        assert_eq!(rep.still_missing, 1);
        let after = r.after_repair.as_ref().unwrap();
        assert_eq!(after.missing_chunks, vec![gone.to_hex()]);
        assert!(after
            .damaged_blocks
            .iter()
            .any(|b| b.offset == 8192 && b.live));
    }

    #[test]
    fn missing_node_is_an_error() {
        let (_d, store, _) = store();
        {
            let root = root_of_b(&store);
            let meta = crate::meta::Meta::open(&store.join("meta")).unwrap();
            meta.remove_locs(Index::Nodes, &[root.node]).unwrap();
            meta.flush().unwrap();
        }
        let r = fsck(&store, true).unwrap();
        assert!(!r.clean);
        assert_eq!(r.found.bad_nodes.len(), 1);
        assert!(r
            .found
            .damaged_blocks
            .iter()
            .any(|b| b.node && b.path.as_deref() == Some("/b")));
    }

    /// The map root of `/b` in `store` (closed).
    fn root_of_b(store: &Path) -> MapRoot {
        let ds = Datastore::open(store, &opts()).unwrap();
        let d = ds.lookup(InodeNo::ROOT, b"b").unwrap();
        let inode = ds.meta().inode(d.ino, crate::meta::View::Live).unwrap();
        inode.unwrap().map.unwrap()
    }

    #[test]
    fn damaged_node_record_in_a_pack_is_named() {
        let (_d, store, _) = store();
        let root = root_of_b(&store);
        let loc = {
            let meta = crate::meta::Meta::open(&store.join("meta")).unwrap();
            meta.loc(Index::Nodes, &root.node).unwrap().unwrap()
        };
        let pack = pack::pack_path(&store.join("packs"), loc.pack);
        let mut bytes = std::fs::read(&pack).unwrap();
        bytes[loc.offset as usize + 5] ^= 0x40;
        std::fs::write(&pack, bytes).unwrap();
        let r = fsck(&store, false).unwrap();
        assert!(!r.clean);
        assert_eq!(r.found.bad_nodes.len(), 1, "{r:#?}");
        assert_eq!(r.found.bad_nodes[0].node, root.node.to_hex());
        assert!(
            r.found.bad_nodes[0].detail.contains("hash mismatch"),
            "{r:#?}"
        );
        assert!(r
            .found
            .damaged_blocks
            .iter()
            .any(|b| b.node && b.path.as_deref() == Some("/b")));
    }

    /// A store of format 4 kept its block-map nodes in the metadata store and one sled key
    /// per chunk index entry: this build moves the entries into buckets at open, reads
    /// the nodes, writes new nodes to the packs, and GC removes the old ones once no map
    /// reaches them.
    #[test]
    fn nodes_of_a_format_4_store_are_read_and_collected() {
        let (_d, store, data) = store();
        // Turn the store into what format 4 wrote: every node in the metadata store.
        {
            let ds = Datastore::open(&store, &opts()).unwrap();
            let meta = ds.meta();
            let locs: Vec<_> = meta.locs(Index::Nodes).map(|e| e.unwrap()).collect();
            assert!(locs.len() >= 3, "{locs:?}");
            for (id, loc) in &locs {
                let bytes = ds.chunks().read_loc(id, loc).unwrap();
                meta.put_legacy_node(id, &bytes).unwrap();
            }
            let ids: Vec<ChunkId> = locs.iter().map(|(id, _)| *id).collect();
            meta.remove_locs(Index::Nodes, &ids).unwrap();
            // And the chunk index as formats up to 5 kept it: one sled key per entry.
            let chunks: Vec<_> = meta.chunk_locs().map(|e| e.unwrap()).collect();
            for (id, loc) in &chunks {
                meta.put_entry_form(Index::Chunks, id, loc).unwrap();
            }
            assert_eq!(meta.chunk_locs().count(), 0);
            assert_eq!(meta.entry_form_count(), chunks.len());
            meta.flush().unwrap();
        }
        let toml = store.join(crate::config::CONFIG_FILE);
        let text = std::fs::read_to_string(&toml).unwrap();
        let old = text.replace(
            &format!("format_version = {}", crate::config::FORMAT_VERSION),
            "format_version = 4",
        );
        assert_ne!(old, text);
        std::fs::write(&toml, old).unwrap();
        let ds = Datastore::open(&store, &opts()).unwrap();
        assert_eq!(
            ds.meta().entry_form_count(),
            0,
            "moved into buckets at open"
        );
        assert_eq!(ds.meta().chunk_locs().count(), 4);
        let a = ds.lookup(InodeNo::ROOT, b"a2").unwrap().ino;
        assert_eq!(ds.read(a, 0, data.len() as u32).unwrap(), data);
        let legacy = ds.meta().legacy_node_ids().count();
        assert!(legacy >= 3);
        // A change of `a` writes its new path to the packs; its old path is garbage.
        ds.write(a, 0, &[7u8; 100]).unwrap();
        ds.sync_all().unwrap();
        assert!(ds.meta().locs(Index::Nodes).count() >= 1);
        let r = crate::gc::collect(&ds, &Default::default(), &|_| {}).unwrap();
        assert!(r.nodes_freed >= 1, "{r:?}");
        assert!(ds.meta().legacy_node_ids().count() < legacy);
        let mut want = data.clone();
        want[..100].fill(7);
        assert_eq!(ds.read(a, 0, data.len() as u32).unwrap(), want);
        drop(ds);
        let text = std::fs::read_to_string(&toml).unwrap();
        assert!(text.contains(&format!(
            "format_version = {}",
            crate::config::FORMAT_VERSION
        )));
        let r = fsck(&store, false).unwrap();
        assert!(r.clean, "{r:#?}");
        assert_eq!(r.found.leaked_nodes, 0, "{r:#?}");
    }
}

//! Snapshots: O(1) atomic point-in-time read-only views of the whole datastore.
//!
//! Creating a snapshot freezes the current metadata epoch (see `meta.rs`): the snapshot
//! sees every record version with epoch <= its own, and live writes continue in the next
//! epoch. Nothing is copied, so the cost does not depend on the number or size of files;
//! the only work is flushing write-back buffers so that every acknowledged write is in it.
//!
//! Snapshots appear under `<mount>/<snapdir>/<name>/` (snapdir is `.snapshots` unless set
//! at mkfs or mount time). FUSE node ids tell the trees apart ([`Node`]): live inodes use
//! their own numbers (always below 2^47), the snapshot directory has a fixed id, and a
//! snapshot's inode `i` is `(index + 1) << 48 | i`, where `index` is the snapshot's
//! stable number: ids are distinct from live ones and the same after a remount.

use serde::Serialize;

use super::{attr_from, Attr, Datastore};
use crate::error::{FsError, Result};
use crate::ids::{ChunkId, Epoch, InodeNo};
use crate::meta::{Batch, FileKind, Inode, SnapshotRecord, Timestamp, View};

const SNAP_SHIFT: u32 = 48;
/// Node id of the snapshot directory.
pub const SNAPDIR_ID: u64 = (1 << 47) + 1;

/// What a FUSE node id names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Node {
    Live(InodeNo),
    SnapDir,
    Snap { index: u32, ino: InodeNo },
}

impl Node {
    pub fn from_id(id: u64) -> Node {
        if id == SNAPDIR_ID {
            Node::SnapDir
        } else if id >> SNAP_SHIFT == 0 {
            Node::Live(InodeNo(id))
        } else {
            Node::Snap {
                index: (id >> SNAP_SHIFT) as u32 - 1,
                ino: InodeNo(id & ((1 << SNAP_SHIFT) - 1)),
            }
        }
    }

    pub fn id(self) -> u64 {
        match self {
            Node::Live(i) => i.0,
            Node::SnapDir => SNAPDIR_ID,
            Node::Snap { index, ino } => ((index as u64 + 1) << SNAP_SHIFT) | ino.0,
        }
    }
}

/// A snapshot as `snapshot list` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct SnapshotInfo {
    pub name: String,
    pub created: i64,
    pub epoch: u64,
    pub index: u32,
    /// Bytes only this snapshot keeps alive (freed by delete + GC).
    pub exclusive_bytes: u64,
}

/// Checks a snapshot name.
pub fn check_snapshot_name(name: &str) -> Result<()> {
    if name.len() > 255 {
        return Err(FsError::NameTooLong);
    }
    if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.contains('\0') {
        return Err(FsError::Invalid(format!("bad snapshot name {name:?}")));
    }
    Ok(())
}

impl Datastore {
    /// The name of the snapshot directory at the mount root.
    pub fn snapdir_name(&self) -> &[u8] {
        &self.snapdir
    }

    /// Whether `parent`/`name` is the reserved snapshot directory.
    pub(super) fn is_snapdir(&self, parent: InodeNo, name: &[u8]) -> bool {
        parent == InodeNo::ROOT && name == self.snapdir.as_slice()
    }

    /// Creates snapshot `name` of the whole datastore.
    pub fn snapshot_create(&self, name: &str) -> Result<SnapshotRecord> {
        check_snapshot_name(name)?;
        let _ns = self.ns.lock();
        // Exclude every commit of versioned records: namespace changes wait on `ns`, data
        // flushes on their inode's lock. Then flush what writers acknowledged.
        let inos: Vec<InodeNo> = self.inodes.iter().map(|e| *e.key()).collect();
        let mut locks = Vec::with_capacity(inos.len());
        for ino in inos {
            if let Some(st) = self.inodes.get(&ino).map(|s| s.clone()) {
                let mut g = st.write_arc();
                self.flush_state(&mut g)?;
                locks.push(g);
            }
        }
        let rec = self.meta.create_snapshot(name, Timestamp::now())?;
        drop(locks);
        self.barrier()?;
        Ok(rec)
    }

    /// Every snapshot, oldest first, with the bytes only it holds.
    pub fn snapshot_list(&self) -> Result<Vec<SnapshotInfo>> {
        self.sync_all()?;
        let mut recs = self.meta.snapshots()?;
        recs.sort_by_key(|r| r.epoch);
        // Chunks each view reaches; exclusive = reached by this snapshot and no other view.
        let mut live = std::collections::HashSet::new();
        let mut seen = std::collections::HashSet::new();
        for i in self.meta.live_inodes() {
            self.maps.walk(i?.map, &mut seen, &mut |c| {
                live.insert(*c);
            })?;
        }
        let mut per: Vec<std::collections::HashSet<ChunkId>> = Vec::new();
        for r in &recs {
            let mut set = std::collections::HashSet::new();
            let mut seen = std::collections::HashSet::new();
            for i in self.meta.inodes_at(Epoch(r.epoch))? {
                self.maps.walk(i.map, &mut seen, &mut |c| {
                    set.insert(*c);
                })?;
            }
            per.push(set);
        }
        let bs = self.block_size();
        let mut out = Vec::new();
        for (k, r) in recs.iter().enumerate() {
            let excl = per[k]
                .iter()
                .filter(|c| {
                    !live.contains(*c)
                        && per
                            .iter()
                            .enumerate()
                            .all(|(j, s)| j == k || !s.contains(*c))
                })
                .count() as u64;
            out.push(SnapshotInfo {
                name: r.name.clone(),
                created: r.created.secs,
                epoch: r.epoch,
                index: r.index,
                exclusive_bytes: excl * bs,
            });
        }
        Ok(out)
    }

    /// Deletes a snapshot; what only it held becomes garbage for GC.
    pub fn snapshot_delete(&self, name: &str) -> Result<()> {
        let _ns = self.ns.lock();
        self.meta.delete_snapshot(name.as_bytes())?;
        // A barrier, not a bare metadata flush: flushes committed meanwhile must not
        // become durable before their chunks do.
        self.barrier()
    }

    /// Makes the live tree equal to snapshot `name` (no data is copied). Refuses while
    /// files are open unless `force`. Returns the (directory, name) pairs and inodes
    /// (with an empty name) whose kernel caches are now stale.
    pub fn snapshot_rollback(&self, name: &str, force: bool) -> Result<Vec<(InodeNo, Vec<u8>)>> {
        let _ns = self.ns.lock();
        let rec = self
            .meta
            .snapshot(name.as_bytes())?
            .ok_or(FsError::NotFound)?;
        let open = self
            .inodes
            .iter()
            .filter(|e| e.value().read().open > 0)
            .count();
        if open > 0 && !force {
            return Err(FsError::Busy(format!(
                "{open} files are open; close them or use --force"
            )));
        }
        // Cached states describe the tree being replaced: drop them.
        let inos: Vec<InodeNo> = self.inodes.iter().map(|e| *e.key()).collect();
        let mut locks = Vec::new();
        for ino in &inos {
            if let Some(st) = self.inodes.get(ino).map(|s| s.clone()) {
                let mut g = st.write_arc();
                self.drop_dirty(&mut g);
                g.attr_dirty = false;
                locks.push(g);
            }
        }
        // Names in the root before and after, and every cached inode, go stale.
        let mut stale: Vec<(InodeNo, Vec<u8>)> = self
            .meta
            .dir_entries(InodeNo::ROOT, View::Live, None, usize::MAX)?
            .into_iter()
            .map(|(n, _)| (InodeNo::ROOT, n))
            .collect();
        stale.extend(
            self.meta
                .dir_entries(InodeNo::ROOT, View::At(Epoch(rec.epoch)), None, usize::MAX)?
                .into_iter()
                .map(|(n, _)| (InodeNo::ROOT, n)),
        );
        stale.extend(inos.iter().map(|i| (*i, Vec::new())));
        stale.push((InodeNo::ROOT, Vec::new()));
        let mut batch = Batch::default();
        self.meta.rollback_batch(Epoch(rec.epoch), &mut batch)?;
        self.meta.commit(batch)?;
        for ino in &inos {
            if let Some(fresh) = self.meta.inode(*ino, View::Live)? {
                if let Some(g) = locks.iter_mut().find(|g| g.inode.ino == *ino) {
                    g.inode = fresh;
                }
            } else if let Some(g) = locks.iter_mut().find(|g| g.inode.ino == *ino) {
                g.inode.nlink = 0;
            }
        }
        drop(locks);
        self.evict(&inos);
        self.barrier()?;
        Ok(stale)
    }

    fn snap_record(&self, index: u32) -> Result<SnapshotRecord> {
        self.meta
            .snapshots()?
            .into_iter()
            .find(|r| r.index == index)
            .ok_or(FsError::NotFound)
    }

    fn snapdir_attr(&self) -> Result<Attr> {
        let root = self.inode(InodeNo::ROOT)?;
        let mut a = attr_from(&root, 0, self.cfg.block_size);
        a.ino = InodeNo(SNAPDIR_ID);
        a.perm = 0o555;
        a.nlink = 2;
        Ok(a)
    }

    fn snap_inode(&self, index: u32, ino: InodeNo) -> Result<(Inode, Epoch)> {
        let rec = self.snap_record(index)?;
        let inode = self
            .meta
            .inode(ino, View::At(Epoch(rec.epoch)))?
            .ok_or(FsError::NotFound)?;
        Ok((inode, Epoch(rec.epoch)))
    }

    fn snap_attr(&self, index: u32, inode: &Inode) -> Attr {
        let mut a = attr_from(
            inode,
            inode.data_blocks() * self.block_size() / 512,
            self.cfg.block_size,
        );
        a.ino = InodeNo(
            Node::Snap {
                index,
                ino: inode.ino,
            }
            .id(),
        );
        a
    }

    /// The view and inode a node reads from, for snapshot-aware operations.
    pub fn node_view(&self, id: u64) -> Result<(View, InodeNo)> {
        match Node::from_id(id) {
            Node::Live(ino) => Ok((View::Live, ino)),
            Node::SnapDir => Err(FsError::IsDir),
            Node::Snap { index, ino } => Ok((View::At(Epoch(self.snap_record(index)?.epoch)), ino)),
        }
    }

    /// Attributes of any node.
    pub fn node_getattr(&self, id: u64) -> Result<Attr> {
        match Node::from_id(id) {
            Node::Live(ino) => self.getattr(ino),
            Node::SnapDir => self.snapdir_attr(),
            Node::Snap { index, ino } => Ok(self.snap_attr(index, &self.snap_inode(index, ino)?.0)),
        }
    }

    /// Looks `name` up in any directory node.
    pub fn node_lookup(&self, parent: u64, name: &[u8]) -> Result<Attr> {
        match Node::from_id(parent) {
            Node::Live(p) if self.is_snapdir(p, name) => self.snapdir_attr(),
            Node::Live(p) => self.lookup(p, name),
            Node::SnapDir => match name {
                b"." => self.snapdir_attr(),
                b".." => self.getattr(InodeNo::ROOT),
                _ => {
                    let rec = self.meta.snapshot(name)?.ok_or(FsError::NotFound)?;
                    Ok(self.snap_attr(rec.index, &self.snap_inode(rec.index, InodeNo::ROOT)?.0))
                }
            },
            Node::Snap { index, ino } => {
                let (dir, epoch) = self.snap_inode(index, ino)?;
                if name == b"." {
                    return Ok(self.snap_attr(index, &dir));
                }
                if dir.kind != FileKind::Dir {
                    return Err(FsError::NotDir);
                }
                let child = match name {
                    b".." if ino == InodeNo::ROOT => return self.snapdir_attr(),
                    b".." => dir.parent,
                    _ => {
                        self.meta
                            .dirent(ino, name, View::At(epoch))?
                            .ok_or(FsError::NotFound)?
                            .ino
                    }
                };
                Ok(self.snap_attr(index, &self.snap_inode(index, child)?.0))
            }
        }
    }

    /// Entries of any directory node, with "." and "..", as (name, node id, kind).
    pub fn node_readdir(&self, id: u64) -> Result<Vec<(Vec<u8>, u64, FileKind)>> {
        let mut out = Vec::new();
        match Node::from_id(id) {
            Node::Live(ino) => {
                out.push((b".".to_vec(), id, FileKind::Dir));
                out.push((b"..".to_vec(), self.parent_of(ino)?.0, FileKind::Dir));
                if ino == InodeNo::ROOT && self.snapdir_visible {
                    out.push((self.snapdir.clone(), SNAPDIR_ID, FileKind::Dir));
                }
                for (n, e) in self.readdir(ino)? {
                    out.push((n, e.ino.0, e.kind));
                }
            }
            Node::SnapDir => {
                out.push((b".".to_vec(), id, FileKind::Dir));
                out.push((b"..".to_vec(), InodeNo::ROOT.0, FileKind::Dir));
                let mut recs = self.meta.snapshots()?;
                recs.sort_by(|a, b| a.name.cmp(&b.name));
                for r in recs {
                    out.push((
                        r.name.into_bytes(),
                        Node::Snap {
                            index: r.index,
                            ino: InodeNo::ROOT,
                        }
                        .id(),
                        FileKind::Dir,
                    ));
                }
            }
            Node::Snap { index, ino } => {
                let (dir, epoch) = self.snap_inode(index, ino)?;
                if dir.kind != FileKind::Dir {
                    return Err(FsError::NotDir);
                }
                let parent = if ino == InodeNo::ROOT {
                    SNAPDIR_ID
                } else {
                    Node::Snap {
                        index,
                        ino: dir.parent,
                    }
                    .id()
                };
                out.push((b".".to_vec(), id, FileKind::Dir));
                out.push((b"..".to_vec(), parent, FileKind::Dir));
                for (n, e) in self
                    .meta
                    .dir_entries(ino, View::At(epoch), None, usize::MAX)?
                {
                    out.push((n, Node::Snap { index, ino: e.ino }.id(), e.kind));
                }
            }
        }
        Ok(out)
    }

    /// Reads file data of any node.
    pub fn node_read(&self, id: u64, offset: u64, size: u32) -> Result<Vec<u8>> {
        match Node::from_id(id) {
            Node::Live(ino) => self.read(ino, offset, size),
            Node::SnapDir => Err(FsError::IsDir),
            Node::Snap { index, ino } => {
                let (inode, _) = self.snap_inode(index, ino)?;
                match inode.kind {
                    FileKind::File => {}
                    FileKind::Dir => return Err(FsError::IsDir),
                    _ => return Err(FsError::Invalid("not a regular file".into())),
                }
                let end = offset.saturating_add(size as u64).min(inode.size);
                if offset >= end {
                    return Ok(Vec::new());
                }
                // No read history kept: taken for sequential (backups read front to back).
                let st = super::InodeState::new(inode);
                self.read_range(&st, offset, end, crate::chunk::Access::Sequential)
            }
        }
    }

    /// Resolves a path relative to the mount root, into the live tree or a snapshot
    /// (`<snapdir>/<name>/...`).
    pub fn resolve_view(&self, path: &[u8]) -> Result<(View, InodeNo)> {
        let comps: Vec<&[u8]> = path
            .split(|&b| b == b'/')
            .filter(|c| !c.is_empty() && *c != b".")
            .collect();
        if comps.first() != Some(&self.snapdir.as_slice()) {
            return Ok((View::Live, self.resolve(path)?));
        }
        let Some(name) = comps.get(1) else {
            return Err(FsError::Invalid("the snapshot directory itself".into()));
        };
        let rec = self.meta.snapshot(name)?.ok_or(FsError::NotFound)?;
        let view = View::At(Epoch(rec.epoch));
        let mut ino = InodeNo::ROOT;
        for comp in &comps[2..] {
            let dir = self.meta.inode(ino, view)?.ok_or(FsError::NotFound)?;
            if dir.kind != FileKind::Dir {
                return Err(FsError::NotDir);
            }
            ino = if *comp == b".." {
                dir.parent
            } else {
                self.meta
                    .dirent(ino, comp, view)?
                    .ok_or(FsError::NotFound)?
                    .ino
            };
        }
        Ok((view, ino))
    }

    /// SEEK_DATA / SEEK_HOLE on any node.
    pub fn node_lseek(&self, id: u64, offset: u64, whence: super::Whence) -> Result<u64> {
        match Node::from_id(id) {
            Node::Live(ino) => self.lseek(ino, offset, whence),
            Node::SnapDir => Err(FsError::IsDir),
            Node::Snap { index, ino } => {
                self.seek_in(&self.snap_inode(index, ino)?.0, offset, whence)
            }
        }
    }

    /// The inode record a snapshot node names (for readlink, xattrs, lseek).
    pub fn node_inode(&self, id: u64) -> Result<Inode> {
        match Node::from_id(id) {
            Node::Live(ino) => self.inode(ino),
            Node::SnapDir => {
                let mut root = self.inode(InodeNo::ROOT)?;
                root.ino = InodeNo(SNAPDIR_ID);
                root.perm = 0o555;
                root.xattrs.clear();
                Ok(root)
            }
            Node::Snap { index, ino } => Ok(self.snap_inode(index, ino)?.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids_roundtrip() {
        for n in [
            Node::Live(InodeNo(1)),
            Node::Live(InodeNo(123456789)),
            Node::SnapDir,
            Node::Snap {
                index: 0,
                ino: InodeNo(1),
            },
            Node::Snap {
                index: 7,
                ino: InodeNo(99),
            },
        ] {
            assert_eq!(Node::from_id(n.id()), n);
        }
        assert!(check_snapshot_name("nightly").is_ok());
        for bad in ["", ".", "..", "a/b"] {
            assert!(check_snapshot_name(bad).is_err());
        }
        assert!(check_snapshot_name(&"x".repeat(256)).is_err());
    }
}

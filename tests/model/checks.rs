//! The comparisons: namespace, attributes, bytes and SEEK_DATA/SEEK_HOLE of the live tree
//! and of every snapshot, store-wide stats, `du`, and what GC must leave.
//!
//! Files are addressed by FUSE node id (`node_read`, `node_lseek`, ...), so one routine
//! checks a live file (node id = inode number) and a snapshot's file alike.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use thinfs::fs::snapshot::Node;
use thinfs::fs::Whence;
use thinfs::meta::FileKind;
use thinfs::{FsError, InodeNo};

use super::harness::{first_diff, Harness};
use super::reference::{Ent, Model, Sparse, PAGE};

/// Files up to this size are read completely after every op.
const FULL_READ_LIMIT: u64 = 2 << 20;
/// Read sizes used in turn, so reads start and end everywhere in a block (0: 3 blocks).
const PIECES: [u64; 8] = [65536, 4096, 1, 12289, 131077, 777, 0, 200_000];

/// Which tree a check looks at.
#[derive(Clone, Copy, Debug)]
pub enum Tree {
    Live,
    /// A snapshot, by its stable index.
    Snap(u32),
}

impl Tree {
    pub fn node(self, ino: InodeNo) -> u64 {
        match self {
            Tree::Live => ino.0,
            Tree::Snap(index) => Node::Snap { index, ino }.id(),
        }
    }
}

impl Harness {
    /// Compares the live tree with the model: namespace, attributes, every byte.
    pub fn check(&mut self) {
        let m = self.m.clone();
        self.check_tree(Tree::Live, &m);
        for ino in &self.m.gone {
            match self.ds().getattr(*ino) {
                Err(FsError::NotFound) => {}
                other => self.fail(format!("deleted inode {ino} still answers {other:?}")),
            }
        }
    }

    /// Compares every snapshot with the model copy taken when it was created.
    pub fn check_snapshots(&mut self) {
        let snaps = self.snaps.clone();
        let listed: BTreeMap<String, (u32, u64)> = self
            .ds()
            .snapshot_list()
            .unwrap_or_else(|e| self.fail(format!("snapshot_list: {e}")))
            .into_iter()
            .map(|s| (s.name, (s.index, s.exclusive_bytes)))
            .collect();
        let names: Vec<&String> = snaps.keys().collect();
        if listed.keys().collect::<Vec<_>>() != names {
            self.fail(format!("snapshots listed {listed:?}, model has {names:?}"));
        }
        let op = self.op.clone();
        for (name, snap) in &snaps {
            let (index, sm) = (snap.index, &snap.m);
            self.op = format!("{op}; snapshot {name}");
            self.check_tree(Tree::Snap(index), sm);
            // Exclusive: chunks this snapshot reaches and no other view does.
            let mut others: HashSet<Vec<u8>> = self.m.chunks();
            for (other, o) in &snaps {
                if other != name {
                    others.extend(o.m.chunks());
                }
            }
            let excl = sm.chunks().difference(&others).count() as u64 * self.bs;
            if listed[name] != (index, excl) {
                self.fail(format!(
                    "snapshot {name}: listed (index, exclusive_bytes) {:?}, model {:?}",
                    listed[name],
                    (index, excl)
                ));
            }
        }
        self.op = op;
    }

    fn check_tree(&mut self, tree: Tree, m: &Model) {
        let ds = self.ds.clone().expect("store is open");
        for (d, dir) in m.dirs.iter().enumerate() {
            let node = tree.node(dir.ino);
            let got: BTreeMap<Vec<u8>, (u64, FileKind)> = ds
                .node_readdir(node)
                .unwrap_or_else(|e| self.fail(format!("{tree:?} readdir of {}: {e}", dir.ino)))
                .into_iter()
                .filter(|(n, _, _)| n != b"." && n != b"..")
                .map(|(n, id, kind)| (n, (id, kind)))
                .collect();
            let want: BTreeMap<Vec<u8>, (u64, FileKind)> = m
                .entries
                .iter()
                .filter(|((p, _), _)| *p == d)
                .map(|((_, n), e)| {
                    let v = match e {
                        Ent::File(id) => (tree.node(m.file(*id).ino), FileKind::File),
                        Ent::Dir(c) => (tree.node(m.dirs[*c].ino), FileKind::Dir),
                    };
                    (n.clone(), v)
                })
                .collect();
            if got != want {
                self.fail(format!(
                    "{tree:?} directory {d} (inode {}) lists {got:?}, model {want:?}",
                    dir.ino
                ));
            }
            let a = ds
                .node_getattr(node)
                .unwrap_or_else(|e| self.fail(format!("{tree:?} getattr of dir {}: {e}", dir.ino)));
            if a.kind != FileKind::Dir || a.nlink != m.dir_nlink(d) {
                self.fail(format!(
                    "{tree:?} directory {d}: {a:?}, want nlink {}",
                    m.dir_nlink(d)
                ));
            }
        }
        for (&id, f) in &m.files {
            let node = tree.node(f.ino);
            let a = ds
                .node_getattr(node)
                .unwrap_or_else(|e| self.fail(format!("{tree:?} getattr of {}: {e}", f.ino)));
            let blocks = f.data.data_blocks(self.bs).len() as u64 * self.bs / 512;
            let nlink = m.nlink(id);
            if a.kind != FileKind::File
                || a.size != f.data.size
                || a.blocks != blocks
                || a.nlink != nlink
            {
                self.fail(format!(
                    "{tree:?} inode {}: kind {:?} size {} blocks {} nlink {}; model size {} \
                     blocks {blocks} nlink {nlink}",
                    f.ino, a.kind, a.size, a.blocks, a.nlink, f.data.size
                ));
            }
            let xattrs = ds
                .node_inode(node)
                .unwrap_or_else(|e| self.fail(format!("{tree:?} inode of {}: {e}", f.ino)))
                .xattrs;
            if xattrs != f.xattrs {
                self.fail(format!(
                    "{tree:?} inode {} xattrs {xattrs:?}, model {:?}",
                    f.ino, f.xattrs
                ));
            }
            if let Tree::Live = tree {
                for (n, v) in &f.xattrs {
                    let got = ds.getxattr(f.ino, n);
                    if got.as_ref().ok() != Some(v) {
                        self.fail(format!(
                            "inode {} getxattr {n:?}: {got:?}, model {v:?}",
                            f.ino
                        ));
                    }
                }
                let mut names = ds.listxattr(f.ino).unwrap_or_else(|e| self.fail(e));
                names.sort();
                if !names.iter().eq(f.xattrs.keys()) {
                    self.fail(format!("inode {} listxattr {names:?}", f.ino));
                }
            }
            self.check_bytes(node, &f.data);
        }
    }

    /// Reads `[off, off + len)` of node `node` and compares it with `data`.
    pub fn compare_read(&self, node: u64, data: &Sparse, off: u64, len: u64) {
        let len = len.min(u32::MAX as u64);
        let got = self
            .ds()
            .node_read(node, off, len as u32)
            .unwrap_or_else(|e| self.fail(format!("read node {node:#x} at {off}+{len}: {e}")));
        let want = data.read(off, len);
        if let Some(i) = first_diff(&got, &want) {
            let at = off + i as u64;
            self.fail(format!(
                "node {node:#x} read at {off}+{len}: got {} bytes, want {}; first difference at \
                 file offset {at} (block {}): got {:?}, want {:?} (model size {})",
                got.len(),
                want.len(),
                at / self.bs,
                got.get(i),
                want.get(i),
                data.size
            ));
        }
    }

    /// The ranges of a file to read: all of it when small; around its data, at its ends
    /// and at a few points in between when huge (SEEK_DATA walks cover the rest).
    fn ranges(&self, d: &Sparse) -> Vec<(u64, u64)> {
        let (size, bs) = (d.size, self.bs);
        if size <= FULL_READ_LIMIT {
            return vec![(0, size)];
        }
        let mut v = vec![(0, 2 * bs), (size.saturating_sub(2 * bs), size)];
        for p in [size / 2, size / 3, FULL_READ_LIMIT] {
            v.push((p, p + 3 * PAGE));
        }
        for p in d.data_pages() {
            let b = p * PAGE / bs;
            v.push((b.saturating_sub(1) * bs, (b + 2) * bs));
        }
        let mut v: Vec<(u64, u64)> = v
            .into_iter()
            .map(|(s, e)| (s.min(size), e.min(size)))
            .filter(|(s, e)| s < e)
            .collect();
        v.sort();
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (s, e) in v {
            match out.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => out.push((s, e)),
            }
        }
        out
    }

    fn check_bytes(&mut self, node: u64, d: &Sparse) {
        for (s, e) in self.ranges(d) {
            let mut pos = s;
            while pos < e {
                self.piece = (self.piece + 1) % PIECES.len();
                let n = match PIECES[self.piece] {
                    0 => 3 * self.bs,
                    n => n,
                }
                .min(e - pos);
                self.compare_read(node, d, pos, n);
                pos += n;
            }
        }
        // Reads that cross or start at the end of file.
        self.compare_read(node, d, d.size.saturating_sub(3), 100);
        self.compare_read(node, d, d.size, 100);
    }

    fn lseek(&self, node: u64, off: u64, w: Whence) -> Option<u64> {
        match self.ds().node_lseek(node, off, w) {
            Ok(x) => Some(x),
            Err(FsError::NoData) => None,
            Err(e) => self.fail(format!("lseek({node:#x}, {off}, {w:?}): {e}")),
        }
    }

    /// SEEK_DATA/SEEK_HOLE against the model: the walk over all extents, then probes
    /// around every extent edge and the end of file.
    pub fn check_seek(&self, node: u64, data: &Sparse) {
        let (bs, size) = (self.bs, data.size);
        let mut got = Vec::new();
        let mut pos = 0;
        while let Some(d) = self.lseek(node, pos, Whence::Data) {
            let h = self.lseek(node, d, Whence::Hole).unwrap_or_else(|| {
                self.fail(format!(
                    "SEEK_HOLE from data at {d} says ENXIO (size {size})"
                ))
            });
            if h <= d || got.len() > 10_000 {
                self.fail(format!("SEEK_HOLE from data at {d} returned {h}"));
            }
            got.push((d, h));
            pos = h;
        }
        let want = data.extents(bs);
        if got != want {
            self.fail(format!(
                "node {node:#x} data extents {got:?}, model {want:?} (size {size}, bs {bs})"
            ));
        }
        let mut probes = vec![
            0,
            1,
            bs - 1,
            bs,
            bs + 1,
            size,
            size + 1,
            size.saturating_sub(1),
        ];
        for (s, e) in want.iter().take(16) {
            probes.extend([s.saturating_sub(1), *s, s + 1, e - 1, *e, e + 1]);
        }
        for p in probes {
            let (gd, wd) = (self.lseek(node, p, Whence::Data), data.seek_data(p, bs));
            let (gh, wh) = (self.lseek(node, p, Whence::Hole), data.seek_hole(p, bs));
            if (gd, gh) != (wd, wh) {
                self.fail(format!(
                    "node {node:#x} lseek from {p}: DATA {gd:?} HOLE {gh:?}; model DATA {wd:?} \
                     HOLE {wh:?} (size {size}, bs {bs}, None = ENXIO)"
                ));
            }
        }
    }

    /// SEEK checks of every live file and every snapshot file.
    pub fn check_seek_all(&mut self) {
        for f in self.m.files.values() {
            self.check_seek(f.ino.0, &f.data);
        }
        for snap in self.snaps.values() {
            for f in snap.m.files.values() {
                self.check_seek(Tree::Snap(snap.index).node(f.ino), &f.data);
            }
        }
    }

    pub fn check_stats(&mut self) {
        let st = self
            .ds()
            .stats()
            .unwrap_or_else(|e| self.fail(format!("stats: {e}")));
        let bs = self.bs;
        let files = self.m.files.len() as u64;
        let logical: u64 = self.m.files.values().map(|f| f.data.size).sum();
        let allocated: u64 = self
            .m
            .files
            .values()
            .map(|f| f.data.data_blocks(bs).len() as u64 * bs)
            .sum();
        let want = (bs, files, logical, allocated);
        if (
            st.block_size,
            st.files,
            st.logical_bytes,
            st.allocated_bytes,
        ) != want
        {
            self.fail(format!(
                "stats {st:?}; want (block_size, files, logical, allocated) {want:?}"
            ));
        }
    }

    /// After a GC: the index holds the chunks the live tree and the snapshots reach (and,
    /// if `exact`, no other), and every snapshot still reads right.
    pub fn check_after_gc(&mut self, exact: bool) {
        let mut reach = self.m.chunks();
        for snap in self.snaps.values() {
            reach.extend(snap.m.chunks());
        }
        let st = self
            .ds()
            .stats()
            .unwrap_or_else(|e| self.fail(format!("stats: {e}")));
        let want = (reach.len() as u64, reach.len() as u64 * self.bs);
        let ok = match exact {
            true => (st.chunks, st.stored_bytes) == want,
            false => st.chunks >= want.0 && st.stored_bytes >= want.1,
        };
        if !ok {
            self.fail(format!(
                "after GC: stats {st:?}; want (chunks, stored_bytes) {want:?} (exact: {exact})"
            ));
        }
        self.check_snapshots();
    }

    pub fn check_du(&mut self, target: u8) {
        let nfiles = self.m.files.len();
        let i = target as usize % (nfiles + self.m.dirs.len());
        let (ino, inside) = if i < nfiles {
            let id = *self.m.files.keys().nth(i).expect("in range");
            (self.m.file(id).ino, BTreeSet::from([id]))
        } else {
            let d = i - nfiles;
            (self.m.dirs[d].ino, self.m.files_within(d))
        };
        let snaps: Vec<&Model> = self.snaps.values().map(|s| &s.m).collect();
        let want = self.m.du(&inside, &snaps);
        let got = self
            .ds()
            .du(&[ino])
            .unwrap_or_else(|e| self.fail(format!("du: {e}")));
        let same = got.files == want.files
            && got.logical_bytes == want.logical_bytes
            && got.stored_bytes == want.stored_bytes
            && got.exclusive_bytes == want.exclusive_bytes
            && got.shared_bytes == want.shared_bytes;
        if !same {
            self.fail(format!("du of inode {ino}: store {got:?}, model {want:?}"));
        }
    }
}

//! Runs operation sequences against a real [`Datastore`] and the [`Model`] side by side.
//!
//! Every op runs on both; their answers (value or errno) must agree, and after every op
//! the whole live tree is compared (`checks.rs`): every directory listing, every file's
//! size, allocated blocks and link count, and every byte of every file.
//! SEEK_DATA/SEEK_HOLE are compared on `Seek` ops and at the end, not after every op,
//! because lseek flushes the write-back buffer and the buffered paths need testing too.
//! Snapshots are model copies taken at `Snapshot`; they are compared on `CheckSnapshots`,
//! after GC and at the end. GC is invisible to the model (`gc.rs`). A sequence ends with
//! a full check, an fsck between two opens, and another full check.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::sync::Arc;

use tempfile::TempDir;
use thinfs::fs::namespace::Creator;
use thinfs::fs::{Datastore, OpenOptions, SetAttr, MAX_FILE_SIZE};
use thinfs::ids::Epoch;
use thinfs::meta::{FileKind, View};
use thinfs::FsError;

use super::checks::Tree;

use super::ops::{name, snap_name, xattr_name, xattr_value, Op, Shape};
use super::reference::{Ent, MDir, Model};

/// Live files (named or open) a sequence may hold; creates and clones beyond are skipped.
pub const MAX_FILES: usize = 12;
/// Directories a sequence may hold (the root included).
pub const MAX_DIRS: usize = 8;
/// Ops `run` does before the given ones.
const PRELUDE: usize = 3;
/// Longest copy_range run unless source and destination offsets are equal (only those
/// are metadata-only in the core however long they are).
const COPY_LIMIT: u64 = 4 << 20;

pub fn who() -> Creator {
    // SAFETY: geteuid/getegid have no preconditions.
    unsafe {
        Creator {
            uid: libc::geteuid(),
            gid: libc::getegid(),
        }
    }
}

pub fn open_opts() -> OpenOptions {
    OpenOptions {
        no_background: true,
        ..Default::default()
    }
}

/// A fresh store in a temp dir, opened without the background flusher.
pub fn fresh_store(bs: u32) -> (TempDir, Arc<Datastore>) {
    let dir = tempfile::Builder::new()
        .prefix("thinfs-model-")
        .tempdir()
        .expect("temp dir");
    let path = dir.path().join("store");
    Datastore::mkfs(&path, bs).expect("mkfs");
    let ds = open_store(&path); // mkfs had the metadata store open: see `retry_locked`
    (dir, ds)
}

/// Runs `open` until it does not fail on the metadata store's file lock, for up to 2 s.
///
/// sled 0.34 releases that lock when its flusher thread exits, which can be a moment
/// after the last `Db` handle is dropped (spacejam/sled#1234), so opening a store again
/// in the same process right after closing it may fail with EWOULDBLOCK. Across processes
/// (unmount, then mount) the lock is gone with the process.
pub fn retry_locked<T>(mut open: impl FnMut() -> thinfs::Result<T>) -> thinfs::Result<T> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        match open() {
            // sled wraps the EWOULDBLOCK of its flock in an error of kind Other.
            Err(FsError::Io { source, .. })
                if source.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            other => return other,
        }
    }
}

/// Opens the store at `path` (see [`retry_locked`]).
pub fn open_store(path: &std::path::Path) -> Arc<Datastore> {
    retry_locked(|| Datastore::open(path, &open_opts()))
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

/// Drops `ds` (the only reference) and opens its store again.
pub fn reopen(ds: Arc<Datastore>) -> Arc<Datastore> {
    let path = ds.path().to_path_buf();
    assert_eq!(
        Arc::strong_count(&ds),
        1,
        "the test holds the only reference"
    );
    drop(ds);
    open_store(&path)
}

/// Position of the first difference of two byte strings.
pub fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .or((a.len() != b.len()).then(|| a.len().min(b.len())))
}

/// The store and the model, plus what the failure messages need.
pub struct Harness {
    pub(super) bs: u64,
    _dir: TempDir,
    pub(super) ds: Option<Arc<Datastore>>,
    pub(super) m: Model,
    pub(super) step: usize,
    pub(super) op: String,
    pub(super) piece: usize,
    /// What the last op did: "skip", "ok" or the errno both sides agreed on.
    pub(super) last: String,
    /// Snapshots by name: their stable index and the model as it was at creation.
    pub(super) snaps: BTreeMap<String, Snap>,
}

/// The tree a clone or copy reads from.
pub struct Source {
    pub view: View,
    pub tree: Tree,
    /// A copy of the model of that tree.
    pub m: Model,
}

/// A snapshot: its stable index, its epoch and the model as it was at creation.
#[derive(Clone)]
pub struct Snap {
    pub index: u32,
    pub epoch: u64,
    pub m: Model,
}

impl Harness {
    /// Runs `ops` on a fresh store of block size `bs` holding files /a, /b and directory /c.
    pub fn run(bs: u32, ops: &[Op]) {
        let start = std::time::Instant::now();
        let timing = std::env::var_os("MODEL_TIMING").is_some();
        let trace = std::env::var_os("MODEL_TRACE").is_some();
        let mut h = Harness::new(bs);
        for (i, op) in [
            Op::Create { dir: 0, name: 0 },
            Op::Create { dir: 0, name: 1 },
            Op::Mkdir { dir: 0, name: 2 },
        ]
        .iter()
        .chain(ops)
        .enumerate()
        {
            if i == PRELUDE {
                h.step = 0; // failure messages number the ops of `ops` from 1
            }
            let t = std::time::Instant::now();
            h.apply(op);
            let applied = t.elapsed();
            if trace {
                eprintln!("trace: {op:?} -> {}", h.last);
            }
            h.check();
            if timing && t.elapsed().as_millis() > 100 {
                eprintln!(
                    "slow: {op:?}: apply {applied:?}, check {:?}",
                    t.elapsed() - applied
                );
            }
        }
        h.op = "final check".into();
        h.check_snapshots();
        h.check_seek_all();
        h.apply(&Op::Fsck);
        h.op = "final check after fsck".into();
        h.check();
        h.check_snapshots();
        h.check_seek_all();
        if timing {
            eprintln!("bs {bs}: {} ops in {:?}", ops.len(), start.elapsed());
        }
    }

    pub fn new(bs: u32) -> Harness {
        let (dir, ds) = fresh_store(bs);
        Harness {
            bs: bs as u64,
            _dir: dir,
            ds: Some(ds),
            m: Model::new(bs as u64),
            step: 0,
            op: String::new(),
            piece: 0,
            last: String::new(),
            snaps: BTreeMap::new(),
        }
    }

    /// The live tree (`None`) or the `i`-th snapshot (modulo the count; `None` when there
    /// is no snapshot).
    pub(super) fn source(&self, snap: Option<u8>) -> Option<Source> {
        match snap {
            None => Some(Source {
                view: View::Live,
                tree: Tree::Live,
                m: self.m.clone(),
            }),
            Some(i) => {
                let s = self
                    .snaps
                    .values()
                    .nth(i as usize % self.snaps.len().max(1))?;
                Some(Source {
                    view: View::At(Epoch(s.epoch)),
                    tree: Tree::Snap(s.index),
                    m: s.m.clone(),
                })
            }
        }
    }

    pub(super) fn ds(&self) -> &Datastore {
        self.ds.as_ref().expect("store is open")
    }

    fn remount(&mut self) {
        let ds = self.ds.take().expect("store is open");
        self.ds = Some(reopen(ds));
    }

    #[track_caller]
    pub(super) fn fail(&self, what: impl std::fmt::Display) -> ! {
        panic!("step {} ({}): {what}", self.step, self.op)
    }

    /// Compares the model's answer with the store's; `Some` when both succeeded.
    #[track_caller]
    pub(super) fn outcome<T: Debug, U: Debug>(
        &mut self,
        want: Result<T, i32>,
        got: Result<U, FsError>,
    ) -> Option<(T, U)> {
        match (want, got) {
            (Ok(w), Ok(g)) => {
                self.last = "ok".into();
                Some((w, g))
            }
            (Err(we), Err(ge)) if ge.errno() == we => {
                self.last = format!("errno {we}");
                None
            }
            (w, g) => self.fail(format!("model answers {w:?} (errno), store answers {g:?}")),
        }
    }

    pub fn apply(&mut self, op: &Op) {
        self.step += 1;
        self.op = format!("{op:?}");
        self.last = "skip".into();
        let bs = self.bs;
        match *op {
            Op::Create { dir, name: n } => {
                if self.m.files.len() >= MAX_FILES {
                    return;
                }
                let (d, nm) = (self.m.dir_at(dir), name(n));
                let want = match self.m.entries.contains_key(&(d, nm.to_vec())) {
                    true => Err(libc::EEXIST),
                    false => Ok(()),
                };
                let got = self.ds().create(self.m.dirs[d].ino, nm, 0o644, who());
                if let Some(((), a)) = self.outcome(want, got) {
                    if a.size != 0 || a.nlink != 1 || a.kind != FileKind::File {
                        self.fail(format!("create returned {a:?}"));
                    }
                    let id = self.m.add_file(a.ino, None);
                    self.m.entries.insert((d, nm.to_vec()), Ent::File(id));
                }
            }
            Op::Mkdir { dir, name: n } => {
                if self.m.dirs.len() >= MAX_DIRS {
                    return;
                }
                let (d, nm) = (self.m.dir_at(dir), name(n));
                let want = match self.m.entries.contains_key(&(d, nm.to_vec())) {
                    true => Err(libc::EEXIST),
                    false => Ok(()),
                };
                let got = self.ds().mkdir(self.m.dirs[d].ino, nm, 0o755, who());
                if let Some(((), a)) = self.outcome(want, got) {
                    self.m.dirs.push(MDir {
                        ino: a.ino,
                        parent: d,
                    });
                    let idx = self.m.dirs.len() - 1;
                    self.m.entries.insert((d, nm.to_vec()), Ent::Dir(idx));
                }
            }
            Op::Write {
                file,
                off,
                len,
                fill,
            } => {
                let Some(id) = self.m.file_at(file) else {
                    return;
                };
                let (off, len) = (off.get(bs), len.get(bs));
                let data = fill.bytes(len as usize);
                let want = match off + len > MAX_FILE_SIZE {
                    true => Err(libc::EFBIG),
                    false => Ok(len as u32),
                };
                let got = self.ds().write(self.m.file(id).ino, off, &data);
                if let Some((w, g)) = self.outcome(want, got) {
                    if w != g {
                        self.fail(format!("write returned {g}, wrote {w}"));
                    }
                    self.m.file_mut(id).data.write(off, &data);
                }
            }
            Op::Read { file, off, len } => {
                let Some(id) = self.m.file_at(file) else {
                    return;
                };
                let (off, len) = (off.get(bs), len.get(bs));
                let f = self.m.file(id);
                self.compare_read(f.ino.0, &f.data, off, len);
                self.last = "ok".into();
            }
            Op::Truncate { file, size } => {
                let Some(id) = self.m.file_at(file) else {
                    return;
                };
                let size = size.get(bs);
                let set = SetAttr {
                    size: Some(size),
                    ..Default::default()
                };
                let want = match size > MAX_FILE_SIZE {
                    true => Err(libc::EFBIG),
                    false => Ok(()),
                };
                let got = self.ds().setattr(self.m.file(id).ino, &set);
                if let Some(((), a)) = self.outcome(want, got) {
                    if a.size != size {
                        self.fail(format!("truncate to {size} returned size {}", a.size));
                    }
                    self.m.file_mut(id).data.set_size(size);
                }
            }
            Op::Punch { file, off, len } => {
                let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
                self.fallocate(file, off.get(bs), len.get(bs), mode);
            }
            Op::ZeroRange {
                file,
                off,
                len,
                keep_size,
            } => {
                let keep = if keep_size {
                    libc::FALLOC_FL_KEEP_SIZE
                } else {
                    0
                };
                self.fallocate(
                    file,
                    off.get(bs),
                    len.get(bs),
                    libc::FALLOC_FL_ZERO_RANGE | keep,
                );
            }
            Op::Fallocate {
                file,
                off,
                len,
                keep_size,
            } => {
                let mode = if keep_size {
                    libc::FALLOC_FL_KEEP_SIZE
                } else {
                    0
                };
                self.fallocate(file, off.get(bs), len.get(bs), mode);
            }
            Op::Seek { file } => {
                if let Some(id) = self.m.file_at(file) {
                    let f = self.m.file(id);
                    self.check_seek(f.ino.0, &f.data);
                    self.last = "ok".into();
                }
            }
            Op::Fsync { file } | Op::Flush { file } => {
                let Some(id) = self.m.file_at(file) else {
                    return;
                };
                let ino = self.m.file(id).ino;
                let got = match op {
                    Op::Fsync { .. } => self.ds().fsync(ino),
                    _ => self.ds().flush(ino),
                };
                self.outcome(Ok(()), got);
            }
            Op::Open { file } => {
                let Some(id) = self.m.file_at(file) else {
                    return;
                };
                let got = self.ds().open_file(self.m.file(id).ino);
                if self.outcome(Ok(()), got).is_some() {
                    self.m.file_mut(id).open += 1;
                }
            }
            Op::Close { file } => {
                let open: Vec<u64> = self
                    .m
                    .files
                    .iter()
                    .filter(|(_, f)| f.open > 0)
                    .map(|(id, _)| *id)
                    .collect();
                if open.is_empty() {
                    return;
                }
                let id = open[file as usize % open.len()];
                let got = self.ds().release(self.m.file(id).ino);
                if self.outcome(Ok(()), got).is_some() {
                    self.m.file_mut(id).open -= 1;
                    self.m.reap(id);
                }
            }
            Op::Remount => {
                self.remount();
                self.last = "ok".into();
                self.m.close_all();
            }
            Op::Fsck => {
                let ds = self.ds.take().expect("store is open");
                let path = ds.path().to_path_buf();
                assert_eq!(
                    Arc::strong_count(&ds),
                    1,
                    "the test holds the only reference"
                );
                drop(ds); // Drop flushes; fsck needs the store closed
                let report = retry_locked(|| thinfs::fsck::fsck(&path, false))
                    .unwrap_or_else(|e| self.fail(format!("fsck: {e}")));
                if !report.clean || !report.found.unreachable_inodes.is_empty() {
                    self.fail(format!("fsck: {report:#?}"));
                }
                self.ds = Some(open_store(&path));
                self.last = "ok".into();
                self.m.close_all();
            }
            Op::Gc { compact_all } => self.gc(compact_all),
            Op::GcWith {
                compact_all,
                at,
                ref op,
            } => self.gc_with(compact_all, at, op),
            Op::Snapshot { name: n } => {
                let nm = snap_name(n);
                let want = match self.snaps.contains_key(&nm) {
                    true => Err(libc::EEXIST),
                    false => Ok(()),
                };
                let got = self.ds().snapshot_create(&nm);
                if let Some(((), rec)) = self.outcome(want, got) {
                    let snap = Snap {
                        index: rec.index,
                        epoch: rec.epoch,
                        m: self.m.clone(),
                    };
                    self.snaps.insert(nm, snap);
                }
            }
            Op::SnapshotDelete { name: n } => {
                let nm = snap_name(n);
                let want = match self.snaps.contains_key(&nm) {
                    true => Ok(()),
                    false => Err(libc::ENOENT),
                };
                let got = self.ds().snapshot_delete(&nm);
                if self.outcome(want, got).is_some() {
                    self.snaps.remove(&nm);
                }
            }
            Op::Rollback { name: n } => {
                let nm = snap_name(n);
                let want = match self.snaps.get(&nm) {
                    None => Err(libc::ENOENT),
                    Some(_) if self.m.files.values().any(|f| f.open > 0) => Err(libc::EBUSY),
                    Some(_) => Ok(()),
                };
                let got = self.ds().snapshot_rollback(&nm, false);
                if self.outcome(want, got).is_some() {
                    let mut back = self.snaps[&nm].m.clone();
                    let kept: BTreeSet<_> = back.files.values().map(|f| f.ino).collect();
                    let mut gone: BTreeSet<_> = self.m.gone.iter().copied().collect();
                    gone.extend(self.m.files.values().map(|f| f.ino));
                    back.gone = gone.difference(&kept).copied().collect();
                    // No handle survives into the rolled-back tree: its unlinked-but-open
                    // files have no reason to exist.
                    back.close_all();
                    self.m = back;
                }
            }
            Op::CheckSnapshots => {
                self.check_snapshots();
                self.last = "ok".into();
            }
            Op::Clone {
                snap,
                file,
                dir,
                name: n,
                force,
            } => self.clone_file(snap, file, dir, n, force),
            Op::CloneDir {
                snap,
                dir,
                to,
                name: n,
            } => self.clone_dir(snap, dir, to, n),
            Op::CopyRange {
                snap,
                src,
                src_off,
                dst,
                dst_off,
                len,
                shape,
            } => {
                let Some(from) = self.source(snap) else {
                    return;
                };
                let (Some(s), Some(d)) = (from.m.file_at(src), self.m.file_at(dst)) else {
                    return;
                };
                let same_file = from.m.file(s).ino == self.m.file(d).ino;
                let so = src_off.get(bs);
                let dof = match shape {
                    Shape::Any => dst_off.get(bs),
                    Shape::SameInBlock => {
                        let x = dst_off.get(bs);
                        x - x % bs + so % bs
                    }
                    Shape::SameOffset => so,
                };
                let len = len.get(bs);
                let n = len.min(from.m.file(s).data.size.saturating_sub(so));
                if n > COPY_LIMIT && (so != dof || (same_file && snap.is_none())) {
                    // The core copies such ranges byte by byte or lists every block: O(len).
                    // (Overlapping copies within a file never come from the kernel.)
                    return;
                }
                let want = if n > 0 && dof + n > MAX_FILE_SIZE {
                    Err(libc::EFBIG)
                } else {
                    Ok(n)
                };
                let (node, di) = (from.tree.node(from.m.file(s).ino), self.m.file(d).ino);
                let got = match snap {
                    None => self.ds().copy_range(from.m.file(s).ino, so, di, dof, len),
                    Some(_) => self.ds().copy_range_from(node, so, di, dof, len),
                };
                if let Some((w, g)) = self.outcome(want, got) {
                    if w != g {
                        self.fail(format!("copy_range returned {g}, model copies {w}"));
                    }
                    // `from` is a copy taken before the op: a copy within a file is right.
                    let src = &from.m.file(s).data;
                    self.m.file_mut(d).data.copy_from(src, so, dof, n);
                }
            }
            Op::Unlink { entry } => {
                let Some(((d, nm), e)) = self.m.entry_at(entry, false) else {
                    return;
                };
                self.unlink(d, &nm, Some(e));
            }
            Op::UnlinkName { dir, name: n } => {
                let (d, nm) = (self.m.dir_at(dir), name(n).to_vec());
                let e = self.m.entries.get(&(d, nm.clone())).copied();
                self.unlink(d, &nm, e);
            }
            Op::Rename {
                entry,
                dir,
                name: n,
                mode,
            } => self.rename(entry, dir, n, mode),
            Op::Link { file, dir, name: n } => {
                let Some(id) = self.m.file_at(file) else {
                    return;
                };
                let (d, nm) = (self.m.dir_at(dir), name(n));
                let want = if self.m.nlink(id) == 0 {
                    Err(libc::ENOENT)
                } else if self.m.entries.contains_key(&(d, nm.to_vec())) {
                    Err(libc::EEXIST)
                } else {
                    Ok(())
                };
                let got = self.ds().link(self.m.file(id).ino, self.m.dirs[d].ino, nm);
                if self.outcome(want, got).is_some() {
                    self.m.entries.insert((d, nm.to_vec()), Ent::File(id));
                }
            }
            Op::SetXattr {
                file,
                name: n,
                value,
                flags,
            } => {
                let Some(id) = self.m.file_at(file) else {
                    return;
                };
                let (nm, v) = (xattr_name(n), xattr_value(value));
                let exists = self.m.file(id).xattrs.contains_key(&nm);
                let flags = (flags % 3) as i32; // 0, XATTR_CREATE, XATTR_REPLACE
                let want = match (flags, exists) {
                    (1, true) => Err(libc::EEXIST),
                    (2, false) => Err(libc::ENODATA),
                    _ => Ok(()),
                };
                let got = self.ds().setxattr(self.m.file(id).ino, &nm, &v, flags);
                if self.outcome(want, got).is_some() {
                    self.m.file_mut(id).xattrs.insert(nm, v);
                }
            }
            Op::RemoveXattr { file, name: n } => {
                let Some(id) = self.m.file_at(file) else {
                    return;
                };
                let nm = xattr_name(n);
                let want = match self.m.file(id).xattrs.contains_key(&nm) {
                    true => Ok(()),
                    false => Err(libc::ENODATA),
                };
                let got = self.ds().removexattr(self.m.file(id).ino, &nm);
                if self.outcome(want, got).is_some() {
                    self.m.file_mut(id).xattrs.remove(&nm);
                }
            }
            Op::Stats => {
                self.check_stats();
                self.last = "ok".into();
            }
            Op::Du { target } => {
                self.check_du(target);
                self.last = "ok".into();
            }
        }
    }

    fn fallocate(&mut self, file: u8, off: u64, len: u64, mode: i32) {
        let Some(id) = self.m.file_at(file) else {
            return;
        };
        let keep = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        let want = match off.checked_add(len) {
            None => Err(libc::EFBIG),
            Some(_) if len == 0 => Err(libc::EINVAL),
            Some(end) if end > MAX_FILE_SIZE => Err(libc::EFBIG),
            Some(end) => Ok(end),
        };
        let got = self.ds().fallocate(self.m.file(id).ino, off, len, mode);
        if let Some((end, ())) = self.outcome(want, got) {
            let data = &mut self.m.file_mut(id).data;
            if mode & (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE) != 0 {
                let size = data.size;
                data.zero(off, end.min(size));
            }
            if !keep && end > data.size {
                data.set_size(end);
            }
        }
    }
}

//! The reference model: the only definition of correctness for the property test.
//!
//! A file is a [`Sparse`] byte array (a size plus the 4 KiB pages that hold a non-zero
//! byte; everything else reads as zero), so a file of 1 TiB with a few written pages costs
//! a few pages. The namespace is a map from (directory, name) to an entry; a file's link
//! count is the number of names pointing at it. Clones are plain copies of the model's
//! files. Inode numbers are the store's (the model cannot predict them); everything else
//! is computed here.
//!
//! Block-level rules the store must follow exactly:
//! - a block is data (SEEK_DATA finds it, `blocks` counts it) iff it holds a non-zero
//!   byte: zeros written over a whole block, a punched or truncated-away block are holes;
//! - bytes past the end of file are zero, so a block's stored content (its chunk) is the
//!   zero-padded block, and two blocks with equal bytes are one chunk (dedup).

use std::collections::{BTreeMap, BTreeSet, HashSet};

use thinfs::InodeNo;

/// Granularity of the model's storage; divides every block size thinfs accepts.
pub const PAGE: u64 = 4096;

/// A sparse byte array: `size` plus the pages that hold a non-zero byte.
#[derive(Clone, Debug, Default)]
pub struct Sparse {
    pub size: u64,
    /// Page index -> PAGE bytes. Invariant: no page is all zeros, none lies past `size`.
    pages: BTreeMap<u64, Vec<u8>>,
}

impl Sparse {
    /// Bytes `[off, off + len)` clipped to the size (what read(2) returns).
    pub fn read(&self, off: u64, len: u64) -> Vec<u8> {
        let end = off.saturating_add(len).min(self.size);
        if off >= end {
            return Vec::new();
        }
        self.raw(off, end)
    }

    /// Bytes `[off, end)` regardless of the size (zeros past it).
    fn raw(&self, off: u64, end: u64) -> Vec<u8> {
        let mut out = vec![0u8; (end - off) as usize];
        for (&p, page) in self.pages.range(off / PAGE..=(end - 1) / PAGE) {
            let ps = p * PAGE;
            let (from, to) = (off.max(ps), end.min(ps + PAGE));
            out[(from - off) as usize..(to - off) as usize]
                .copy_from_slice(&page[(from - ps) as usize..(to - ps) as usize]);
        }
        out
    }

    /// write(2): stores `data` at `off`, growing the size.
    pub fn write(&mut self, off: u64, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        let end = off + data.len() as u64;
        let mut pos = off;
        while pos < end {
            let p = pos / PAGE;
            let ps = p * PAGE;
            let to = end.min(ps + PAGE);
            let src = &data[(pos - off) as usize..(to - off) as usize];
            let page = self
                .pages
                .entry(p)
                .or_insert_with(|| vec![0u8; PAGE as usize]);
            page[(pos - ps) as usize..(to - ps) as usize].copy_from_slice(src);
            if page.iter().all(|&b| b == 0) {
                self.pages.remove(&p);
            }
            pos = to;
        }
        self.size = self.size.max(end);
    }

    /// Zeroes bytes `[off, end)`; the size does not change.
    pub fn zero(&mut self, off: u64, end: u64) {
        if off >= end {
            return;
        }
        let keys: Vec<u64> = self
            .pages
            .range(off / PAGE..=(end - 1) / PAGE)
            .map(|(k, _)| *k)
            .collect();
        for p in keys {
            let ps = p * PAGE;
            let (from, to) = (off.max(ps), end.min(ps + PAGE));
            let page = self.pages.get_mut(&p).expect("listed page");
            page[(from - ps) as usize..(to - ps) as usize].fill(0);
            if page.iter().all(|&b| b == 0) {
                self.pages.remove(&p);
            }
        }
    }

    /// copy_file_range: bytes `[so, so + n)` of `src` (a snapshot, so `src` may be this
    /// file) to `dof`, growing the size. Page by page, so huge sparse ranges are cheap.
    pub fn copy_from(&mut self, src: &Sparse, so: u64, dof: u64, n: u64) {
        if n == 0 {
            return;
        }
        self.zero(dof, dof + n);
        for (&p, page) in src.pages.range(so / PAGE..=(so + n - 1) / PAGE) {
            let ps = p * PAGE;
            let (from, to) = (so.max(ps), (so + n).min(ps + PAGE));
            self.write(
                dof + (from - so),
                &page[(from - ps) as usize..(to - ps) as usize],
            );
        }
        self.size = self.size.max(dof + n);
    }

    /// truncate(2).
    pub fn set_size(&mut self, size: u64) {
        if size < self.size {
            self.zero(size, u64::MAX);
        }
        self.size = size;
    }

    /// Indexes of the blocks of `bs` bytes that hold a non-zero byte.
    pub fn data_blocks(&self, bs: u64) -> BTreeSet<u64> {
        self.pages.keys().map(|p| p * PAGE / bs).collect()
    }

    /// Page indexes holding data (to choose which ranges of a huge file to read).
    pub fn data_pages(&self) -> impl Iterator<Item = u64> + '_ {
        self.pages.keys().copied()
    }

    /// The zero-padded content of block `idx`: what the store keeps as its chunk.
    pub fn block(&self, idx: u64, bs: u64) -> Vec<u8> {
        self.raw(idx * bs, idx * bs + bs)
    }

    /// SEEK_DATA from `off` at block granularity; `None` is ENXIO.
    pub fn seek_data(&self, off: u64, bs: u64) -> Option<u64> {
        if off >= self.size {
            return None;
        }
        let b = self.data_blocks(bs).range(off / bs..).next().copied()?;
        let at = (b * bs).max(off);
        (at < self.size).then_some(at)
    }

    /// SEEK_HOLE from `off` at block granularity (the end of file is a hole); `None` is ENXIO.
    pub fn seek_hole(&self, off: u64, bs: u64) -> Option<u64> {
        if off >= self.size {
            return None;
        }
        let data = self.data_blocks(bs);
        let mut b = off / bs;
        while data.contains(&b) {
            b += 1;
        }
        Some((b * bs).max(off).min(self.size))
    }

    /// The data extents `[start, end)` SEEK_DATA/SEEK_HOLE walk out of the file.
    pub fn extents(&self, bs: u64) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for b in self.data_blocks(bs) {
            let (s, e) = (b * bs, ((b + 1) * bs).min(self.size));
            if s >= self.size {
                break;
            }
            match out.last_mut() {
                Some(last) if last.1 == s => last.1 = e,
                _ => out.push((s, e)),
            }
        }
        out
    }
}

/// A file of the model.
#[derive(Clone, Debug)]
pub struct MFile {
    pub ino: InodeNo,
    pub data: Sparse,
    /// Handles opened by `open_file` and not yet released.
    pub open: u32,
    /// Extended attributes (a clone copies them).
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

/// A directory of the model. Directories are never removed.
#[derive(Clone, Debug)]
pub struct MDir {
    pub ino: InodeNo,
    /// Index of the parent directory (the root is its own parent).
    pub parent: usize,
}

/// What a name points at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ent {
    /// A file, by model id.
    File(u64),
    /// A directory, by index.
    Dir(usize),
}

/// What `du` must answer for a set of roots.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelUsage {
    pub files: u64,
    pub logical_bytes: u64,
    pub stored_bytes: u64,
    /// Stored bytes of blocks whose chunk a file outside the set also holds.
    pub shared_bytes: u64,
    /// Chunks only the set holds, times the block size: what deleting it frees.
    pub exclusive_bytes: u64,
}

/// The whole store as the model sees it.
#[derive(Clone, Debug)]
pub struct Model {
    pub bs: u64,
    /// Live files (named or open-but-unlinked), by a model id that never changes.
    pub files: BTreeMap<u64, MFile>,
    next_id: u64,
    /// Directories; index 0 is the root.
    pub dirs: Vec<MDir>,
    pub entries: BTreeMap<(usize, Vec<u8>), Ent>,
    /// Inodes that were deleted: the store must not know them any more.
    pub gone: Vec<InodeNo>,
}

impl Model {
    pub fn new(bs: u64) -> Model {
        Model {
            bs,
            files: BTreeMap::new(),
            next_id: 0,
            dirs: vec![MDir {
                ino: InodeNo::ROOT,
                parent: 0,
            }],
            entries: BTreeMap::new(),
            gone: Vec::new(),
        }
    }

    /// The id of the `i`-th live file (modulo the live count).
    pub fn file_at(&self, i: u8) -> Option<u64> {
        if self.files.is_empty() {
            return None;
        }
        self.files
            .keys()
            .nth(i as usize % self.files.len())
            .copied()
    }

    pub fn dir_at(&self, i: u8) -> usize {
        i as usize % self.dirs.len()
    }

    /// The `i`-th name (modulo the count), with `filter` applied first.
    pub fn entry_at(&self, i: u8, files_only: bool) -> Option<((usize, Vec<u8>), Ent)> {
        let list: Vec<_> = self
            .entries
            .iter()
            .filter(|(_, e)| !files_only || matches!(e, Ent::File(_)))
            .collect();
        if list.is_empty() {
            return None;
        }
        let (k, e) = list[i as usize % list.len()];
        Some((k.clone(), *e))
    }

    pub fn file(&self, id: u64) -> &MFile {
        &self.files[&id]
    }

    pub fn file_mut(&mut self, id: u64) -> &mut MFile {
        self.files.get_mut(&id).expect("live model file")
    }

    /// Adds a file: a new one, or the clone of `like`.
    pub fn add_file(&mut self, ino: InodeNo, like: Option<&MFile>) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        let (data, xattrs) = match like {
            Some(f) => (f.data.clone(), f.xattrs.clone()),
            None => Default::default(),
        };
        let f = MFile {
            ino,
            data,
            open: 0,
            xattrs,
        };
        self.files.insert(id, f);
        id
    }

    /// Names pointing at file `id`.
    pub fn nlink(&self, id: u64) -> u32 {
        self.entries
            .values()
            .filter(|e| **e == Ent::File(id))
            .count() as u32
    }

    /// 2 plus the subdirectories of directory `d`.
    pub fn dir_nlink(&self, d: usize) -> u32 {
        2 + self
            .entries
            .iter()
            .filter(|((p, _), e)| *p == d && matches!(e, Ent::Dir(_)))
            .count() as u32
    }

    /// Deletes file `id` if it has neither a name nor an open handle.
    pub fn reap(&mut self, id: u64) {
        if self.files.contains_key(&id) && self.nlink(id) == 0 && self.files[&id].open == 0 {
            let f = self.files.remove(&id).expect("checked");
            self.gone.push(f.ino);
        }
    }

    /// Every handle closes (the store was closed): unlinked files go away.
    pub fn close_all(&mut self) {
        let ids: Vec<u64> = self.files.keys().copied().collect();
        for id in ids {
            self.file_mut(id).open = 0;
            self.reap(id);
        }
    }

    /// Removes a name; a file without names and handles goes away.
    pub fn drop_name(&mut self, dir: usize, name: &[u8]) {
        if let Some(Ent::File(id)) = self.entries.remove(&(dir, name.to_vec())) {
            self.reap(id);
        }
    }

    /// Whether directory `d` is `ancestor` or lies below it.
    pub fn is_within(&self, mut d: usize, ancestor: usize) -> bool {
        loop {
            if d == ancestor {
                return true;
            }
            if d == 0 {
                return false;
            }
            d = self.dirs[d].parent;
        }
    }

    /// The directories of the tree rooted at `d`, parents first.
    pub fn subtree(&self, d: usize) -> Vec<usize> {
        let mut out = vec![d];
        let mut i = 0;
        while i < out.len() {
            let cur = out[i];
            for ((p, _), e) in &self.entries {
                if let (true, Ent::Dir(c)) = (*p == cur, e) {
                    out.push(*c);
                }
            }
            i += 1;
        }
        out
    }

    /// Files with a name inside the tree rooted at directory `d`.
    pub fn files_within(&self, d: usize) -> BTreeSet<u64> {
        let dirs: BTreeSet<usize> = self.subtree(d).into_iter().collect();
        self.entries
            .iter()
            .filter_map(|((p, _), e)| match e {
                Ent::File(id) if dirs.contains(p) => Some(*id),
                _ => None,
            })
            .collect()
    }

    /// Adds the distinct chunk contents of file `id` to `into`.
    fn chunks_of(&self, id: u64, into: &mut HashSet<Vec<u8>>) {
        let f = &self.files[&id];
        for b in f.data.data_blocks(self.bs) {
            into.insert(f.data.block(b, self.bs));
        }
    }

    /// Distinct chunk contents of every file (named or open) of this tree.
    pub fn chunks(&self) -> HashSet<Vec<u8>> {
        let mut out = HashSet::new();
        for &id in self.files.keys() {
            self.chunks_of(id, &mut out);
        }
        out
    }

    /// `du` of the given live files (each counted once), with `snapshots` holding chunks
    /// too: a chunk a snapshot holds is not freed by deleting the files.
    pub fn du(&self, inside: &BTreeSet<u64>, snapshots: &[&Model]) -> ModelUsage {
        let bs = self.bs;
        let mut mine = HashSet::new();
        for &id in inside {
            self.chunks_of(id, &mut mine);
        }
        let mut others = HashSet::new();
        for &id in self.files.keys().filter(|id| !inside.contains(id)) {
            self.chunks_of(id, &mut others);
        }
        for s in snapshots {
            others.extend(s.chunks());
        }
        let mut u = ModelUsage {
            files: inside.len() as u64,
            logical_bytes: 0,
            stored_bytes: 0,
            shared_bytes: 0,
            exclusive_bytes: mine.difference(&others).count() as u64 * bs,
        };
        for &id in inside {
            let d = &self.files[&id].data;
            u.logical_bytes += d.size;
            for b in d.data_blocks(bs) {
                u.stored_bytes += bs;
                if others.contains(&d.block(b, bs)) {
                    u.shared_bytes += bs;
                }
            }
        }
        u
    }
}

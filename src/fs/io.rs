//! File data: read, write, the write-back buffer, flush/fsync, truncate, fallocate,
//! SEEK_DATA/SEEK_HOLE and copy_file_range.
//!
//! A write lands in the inode's buffer of dirty blocks (whole blocks: a partial write
//! merges with the block's current content). A flush hashes the dirty blocks, stores the
//! new chunks, rewrites the touched paths of the block map, commits the inode record with
//! the new root, and appends the flush's intent-log record to the pack (journal.rs).
//! fsync then syncs the packs, which holds the record; or, when the file has other
//! changes not yet durable, runs the full barrier: packs synced before the metadata that
//! references them is flushed.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{
    prestore, Datastore, Dirty, InodeState, Partial, StateGuard, INODE_DIRTY_LIMIT, MAX_FILE_SIZE,
    PARTIAL_RANGES_MAX, TOTAL_DIRTY_LIMIT,
};
use crate::chunk::Access;
use crate::error::{FsError, Result};
use crate::ids::{ChunkId, InodeNo};
use crate::meta::{Batch, FileKind, Timestamp};

/// Which way `lseek` searches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Whence {
    Data,
    Hole,
}

/// fallocate mode bits this filesystem accepts.
const FALLOC_KEEP_SIZE: i32 = libc::FALLOC_FL_KEEP_SIZE;
const FALLOC_PUNCH_HOLE: i32 = libc::FALLOC_FL_PUNCH_HOLE;
const FALLOC_ZERO_RANGE: i32 = libc::FALLOC_FL_ZERO_RANGE;
/// Reads of the committed blocks under partly written ones one merge has in flight at
/// once, each a random read of the disk (the pre-store workers and a flush may each run a
/// merge). One at a time, the disk sat idle between them and random 4 KiB writes into
/// 16 KiB blocks waited on it: 8.1k IOPS on average, against 9.7k with 8 (issue 6 note).
const MERGE_READERS: usize = 8;

/// A copy of `old` (zeros if `None`, `bs` bytes) with `[off, off + len)` overwritten by
/// `buf` (zeros if `None`).
fn patched(old: Option<&[u8]>, bs: usize, off: usize, buf: Option<&[u8]>, len: usize) -> Vec<u8> {
    let mut block = match old {
        Some(b) => b.to_vec(),
        None => vec![0u8; bs],
    };
    match buf {
        Some(b) => block[off..off + len].copy_from_slice(b),
        None => block[off..off + len].fill(0),
    }
    block
}

pub(super) fn is_zero(data: &[u8]) -> bool {
    let (pre, mid, post) = unsafe { data.align_to::<u128>() };
    pre.iter().all(|&b| b == 0) && mid.iter().all(|&w| w == 0) && post.iter().all(|&b| b == 0)
}

impl Datastore {
    /// Registers an open handle of `ino` (keeps its state cached and an unlinked inode alive).
    pub fn open_file(&self, ino: InodeNo) -> Result<Attr> {
        let mut g = self.lock(ino)?;
        g.open += 1;
        Ok(self.attr_of(&g))
    }

    /// Drops an open handle; the last close of an unlinked inode deletes it.
    pub fn release(&self, ino: InodeNo) -> Result<()> {
        let _ns = self.ns.lock();
        {
            let mut g = self.lock(ino)?;
            g.open = g.open.saturating_sub(1);
            if g.open == 0 {
                if g.inode.nlink == 0 {
                    self.drop_dirty(&mut g);
                    let mut b = Batch::default();
                    self.meta.delete_inode(&mut b, ino)?;
                    self.meta.remove_orphan(&mut b, ino);
                    self.meta.commit(b)?;
                    g.attr_dirty = false;
                } else {
                    self.flush_state(&mut g)?;
                }
            }
        }
        self.evict(&[ino]);
        Ok(())
    }

    /// Flushes `ino`'s write-back buffer (close(2) does this; no durability barrier).
    pub fn flush(&self, ino: InodeNo) -> Result<()> {
        let mut g = self.lock(ino)?;
        self.flush_state(&mut g)
    }

    /// Makes everything written to `ino` durable with one sync of the packs when every
    /// other change to the file is durable already: a log record of the written bytes
    /// when they are few, else the flush's intent-log record and the chunks (see
    /// journal.rs). Otherwise a full barrier.
    pub fn fsync(&self, ino: InodeNo) -> Result<()> {
        // After a failed sync of the packs the file's last log record may never reach
        // the disk, and a record chained from it would not be replayed: until a flush
        // and a barrier have made the file's data durable in the metadata, every fsync
        // of it takes that way.
        let broken = self.log_broken.lock().contains(&ino);
        let logged = {
            let mut g = self.lock(ino)?;
            if broken || !self.log_writes(&mut g)? {
                self.flush_state(&mut g)?;
            }
            g.inode.kind == FileKind::File && self.meta.unlogged_durable(ino) && !broken
        };
        if !logged {
            self.barrier()?;
            if broken {
                self.log_broken.lock().remove(&ino);
            }
            return Ok(());
        }
        let synced = self.chunks.sync();
        if synced.is_err() {
            self.log_broken.lock().insert(ino);
        }
        synced
    }

    pub(super) fn drop_dirty(&self, st: &mut InodeState) {
        self.dirty_total
            .fetch_sub(st.dirty_bytes as i64, Ordering::Relaxed);
        st.dirty.clear();
        st.dirty_bytes = 0;
        st.unqueued_bytes = 0;
        self.logged_writes_settled(st.inode.ino);
    }

    /// Commits the write-back buffer and attributes of a locked inode.
    pub(super) fn flush_state(&self, st: &mut InodeState) -> Result<()> {
        if st.is_clean() {
            return Ok(());
        }
        if st.inode.nlink == 0 && st.open == 0 {
            self.drop_dirty(st);
            st.attr_dirty = false;
            return Ok(());
        }
        let _gate = self.gc_gate.read();
        let changes = match self.store_blocks(&st.dirty) {
            Ok(c) => c,
            Err(e) => {
                self.drop_unmergeable(st, &e);
                return Err(e);
            }
        };
        // Bytes a write record holds (journal.rs) are acknowledged: once this flush's
        // version is durable that record is no longer replayed, so the chunks must be
        // durable first; and the version must become durable with the record, not
        // after it (replayed over a newer record, the write record would take the
        // file's size back). The background flush does this every 2 s at most.
        let settles_log = self.has_logged_writes(st.inode.ino);
        let mut batch = Batch::default();
        // (The new block-map nodes are in the packs too: synced after they are written.)
        let root = self.maps.update(st.inode.map, &changes)?;
        if settles_log {
            self.chunks.sync()?;
        }
        let old_root = st.inode.map;
        st.inode.map = root;
        // A regular file's data flush goes into the intent log (see journal.rs); a
        // change of attributes alone (atime) is written without it.
        let logged = st.inode.kind == FileKind::File && !changes.is_empty();
        let committed = if logged {
            self.meta.file_version(st.inode.ino).and_then(|prev| {
                let version = self.meta.new_version();
                self.meta
                    .put_inode_logged(&mut batch, &st.inode, version)
                    .and_then(|_| match settles_log {
                        true => self.meta.commit(batch),
                        false => self.meta.commit_logged(batch),
                    })
                    .map(|_| Some((prev, version)))
            })
        } else {
            self.meta
                .put_inode(&mut batch, &st.inode)
                .and_then(|_| self.meta.commit(batch))
                .map(|_| None)
        };
        let versions = match committed {
            Ok(v) => v,
            Err(e) => {
                st.inode.map = old_root;
                return Err(e);
            }
        };
        st.attr_dirty = false;
        self.drop_dirty(st);
        if let Some((prev, version)) = versions {
            if let Err(e) = self.log_flush(prev, version, &st.inode, &changes) {
                // Committed but not logged: the next fsync needs a full barrier.
                self.meta.mark_unlogged(st.inode.ino);
                return Err(e);
            }
        }
        Ok(())
    }

    /// After a flush failed on a damaged chunk: drops the partly written blocks over it.
    /// Their writes cannot be merged with the rest of the block; the failed flush (an
    /// fsync or close that returns EIO) reports them lost, and the file's other blocks
    /// flush next time instead of failing with them forever. Reads of the block give EIO,
    /// as before the write.
    fn drop_unmergeable(&self, st: &mut InodeState, e: &FsError) {
        let FsError::Corrupt { chunk, .. } = e else {
            return;
        };
        let bad: Vec<u64> = st
            .dirty
            .iter()
            .filter(|(_, d)| d.unmerged().is_some_and(|p| p.base == *chunk))
            .map(|(idx, _)| *idx)
            .collect();
        for idx in bad {
            tracing::error!(
                "inode {} offset {}: a write into part of this block is lost: the rest of the block (chunk {chunk}) is damaged",
                st.inode.ino,
                idx * self.block_size()
            );
            self.forget_dirty(st, idx);
        }
    }

    /// Removes block `idx` from the write-back buffer.
    fn forget_dirty(&self, st: &mut InodeState, idx: u64) {
        if let Some(d) = st.dirty.remove(&idx) {
            let len = d.data.as_ref().map(|d| d.len()).unwrap_or(0);
            st.dirty_bytes -= len;
            if !d.queued {
                st.unqueued_bytes = st.unqueued_bytes.saturating_sub(len);
            }
            self.dirty_total.fetch_sub(len as i64, Ordering::Relaxed);
        }
    }

    /// Hashes (unless a pre-store worker did) and stores the dirty blocks; returns the
    /// map changes. Hashing runs in parallel when much is left to hash.
    fn store_blocks(&self, dirty: &BTreeMap<u64, Dirty>) -> Result<BTreeMap<u64, Option<ChunkId>>> {
        self.merge_partials(dirty.values())?;
        let unhashed: Vec<&Dirty> = dirty
            .values()
            .filter(|d| d.data.is_some() && d.hash.get().is_none())
            .collect();
        let bytes: usize = unhashed
            .iter()
            .filter_map(|d| d.data.as_ref().map(|d| d.len()))
            .sum();
        let threads = super::cpus().min(4);
        let hash_all = |part: &[&Dirty]| {
            for d in part {
                if let Some(data) = d.content() {
                    d.hash.get_or_init(|| ChunkId::of(data));
                }
            }
        };
        if threads < 2 || bytes < (1 << 20) {
            hash_all(&unhashed);
        } else {
            let per = unhashed.len().div_ceil(threads);
            std::thread::scope(|s| {
                for part in unhashed.chunks(per) {
                    s.spawn(move || hash_all(part));
                }
            });
        }
        let mut changes = BTreeMap::new();
        let mut chunks: Vec<(ChunkId, &[u8])> = Vec::new();
        for (&idx, d) in dirty {
            match d.content() {
                None => {
                    changes.insert(idx, None);
                }
                Some(data) => {
                    let id = *d.hash.get_or_init(|| ChunkId::of(data));
                    chunks.push((id, &data[..]));
                    changes.insert(idx, Some(id));
                }
            }
        }
        self.chunks.put_many(&chunks)?;
        Ok(changes)
    }

    /// Reads the committed content under the partly written blocks among `dirty` that
    /// are not merged yet, and merges them (see [`Datastore::merge`]).
    fn merge_partials<'a>(&self, dirty: impl Iterator<Item = &'a Dirty>) -> Result<()> {
        let pending: Vec<(&Partial, &[u8])> = dirty
            .filter_map(|d| Some((&**d.partial.as_ref()?, d.data.as_deref()?)))
            .collect();
        self.merge(&pending)
    }

    /// Reads the committed blocks under partly written ones (`(partial, written data)`,
    /// merged or not) in batched reads, [`MERGE_READERS`] at once, and merges each.
    pub(super) fn merge(&self, pending: &[(&Partial, &[u8])]) -> Result<()> {
        let pending: Vec<&(&Partial, &[u8])> = pending
            .iter()
            .filter(|(p, _)| p.merged.get().is_none())
            .collect();
        if pending.is_empty() {
            return Ok(());
        }
        let read = |part: &[&(&Partial, &[u8])]| {
            let ids: Vec<ChunkId> = part.iter().map(|(p, _)| p.base).collect();
            // Blocks partly written anywhere: read alone without readahead.
            self.chunks.get_many(&ids, Access::Random, &mut |i, base| {
                let (p, data) = part[i];
                p.merge(data, base);
                Ok(())
            })
        };
        if pending.len() < 2 * MERGE_READERS {
            return read(&pending);
        }
        // In block order, so each part keeps the runs of neighbouring blocks it has.
        let per = pending.len().div_ceil(MERGE_READERS);
        let done: Vec<std::thread::Result<Result<()>>> = std::thread::scope(|s| {
            let mut readers = Vec::new();
            let mut here = Vec::new();
            for part in pending.chunks(per) {
                let spawned = std::thread::Builder::new()
                    .name("thinfs-merge".into())
                    .spawn_scoped(s, move || read(part));
                match spawned {
                    Ok(reader) => readers.push(reader),
                    Err(e) => {
                        tracing::warn!("cannot start a merge reader ({e}); reading inline");
                        here.push(part);
                    }
                }
            }
            let inline: Vec<_> = here.into_iter().map(|part| Ok(read(part))).collect();
            readers
                .into_iter()
                .map(|r| r.join())
                .chain(inline)
                .collect()
        });
        // Every reader joined first: a panic in one is raised as itself, not hidden behind
        // another's error.
        let mut first_err = None;
        for r in done {
            match r {
                Err(panic) => std::panic::resume_unwind(panic),
                Ok(Err(e)) if first_err.is_none() => first_err = Some(e),
                Ok(_) => {}
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// The current content of block `idx` (dirty buffer first), or `None` for a hole.
    fn block(&self, st: &InodeState, idx: u64) -> Result<Option<Arc<[u8]>>> {
        if let Some(d) = st.dirty.get(&idx) {
            self.merge_partials(std::iter::once(d))?;
            return Ok(d.content().cloned());
        }
        match self.maps.lookup(st.inode.map, idx)? {
            None => Ok(None),
            Some(id) => Ok(Some(
                self.chunks
                    .get(&id)
                    .map_err(|e| self.name_damage(st.inode.ino, idx, e))?
                    .into(),
            )),
        }
    }

    /// Adds the file and offset to a corruption error and logs it.
    fn name_damage(&self, ino: InodeNo, idx: u64, e: FsError) -> FsError {
        if let FsError::Corrupt { chunk, detail } = &e {
            tracing::error!(
                "inode {ino} offset {}: chunk {chunk} is damaged ({detail}); returning EIO",
                idx * self.block_size()
            );
        }
        e
    }

    /// Puts a block into the write-back buffer (`partial`: written only in part, see
    /// [`Partial`]).
    fn set_block(
        &self,
        st: &mut InodeState,
        idx: u64,
        data: Option<Arc<[u8]>>,
        partial: Option<Arc<Partial>>,
    ) -> Result<()> {
        let data = data.filter(|d| partial.is_some() || !is_zero(d));
        let len = data.as_ref().map(|d| d.len()).unwrap_or(0);
        let was_data = match st.dirty.get(&idx) {
            Some(d) => {
                let old = d.data.as_ref().map(|d| d.len()).unwrap_or(0);
                if !d.queued {
                    // Rewritten before it was handed to pre-store: count it once, so a
                    // hot region the buffer absorbs is not stored again and again.
                    st.unqueued_bytes = st.unqueued_bytes.saturating_sub(old);
                }
                st.dirty_bytes -= old;
                self.dirty_total.fetch_sub(old as i64, Ordering::Relaxed);
                d.was_data
            }
            // A partly written block lies over committed data (patch_block looked).
            None => partial.is_some() || self.maps.lookup(st.inode.map, idx)?.is_some(),
        };
        st.dirty_bytes += len;
        st.unqueued_bytes += len;
        self.dirty_total.fetch_add(len as i64, Ordering::Relaxed);
        let dirty = Dirty {
            data,
            partial,
            was_data,
            hash: Arc::default(),
            queued: false,
            logged: false,
        };
        st.dirty.insert(idx, dirty);
        Ok(())
    }

    /// Hands the dirty blocks not yet queued to the pre-store workers.
    fn queue_prestore(&self, st: &mut InodeState) {
        let job: Vec<prestore::Item> = st
            .dirty
            .values_mut()
            .filter(|d| !d.queued)
            .filter_map(|d| {
                d.queued = true;
                d.data.clone().map(|data| prestore::Item {
                    data,
                    hash: d.hash.clone(),
                    partial: d.partial.clone(),
                })
            })
            .collect();
        st.unqueued_bytes = 0;
        // A dropped job (full queue) costs nothing: the flush stores those blocks itself.
        self.prestore.submit(job);
    }

    /// Overwrites bytes `[off, off + buf.len())` of block `idx` (`None` buf: zeros).
    fn patch_block(
        &self,
        st: &mut InodeState,
        idx: u64,
        off: usize,
        buf: Option<&[u8]>,
        len: usize,
    ) -> Result<()> {
        let bs = self.block_size() as usize;
        if off == 0 && len == bs {
            let data = buf.map(Arc::<[u8]>::from);
            return self.set_block(st, idx, data, None);
        }
        // Over committed data not read yet: keep only the written bytes (see Partial).
        let base = match st.dirty.get(&idx) {
            Some(d) => d
                .unmerged()
                .map(|p| (p.base, p.ranges.clone(), d.data.clone())),
            None => self
                .maps
                .lookup(st.inode.map, idx)?
                .map(|id| (id, Vec::new(), None)),
        };
        if let Some((base, ranges, data)) = base {
            let ranges = Partial::with_range(&ranges, off, off + len);
            if ranges.len() <= PARTIAL_RANGES_MAX {
                let block = patched(data.as_deref(), bs, off, buf, len);
                if ranges == [(0, bs)] {
                    return self.set_block(st, idx, Some(block.into()), None);
                }
                // Only bytes that are not all zeros: then the merged block is not all
                // zeros either, so it is data (block counts stay exact before the
                // merge). Zeroing part of a block reads it now.
                if ranges.iter().any(|&(a, b)| !is_zero(&block[a..b])) {
                    let partial = Partial {
                        base,
                        ranges,
                        merged: Default::default(),
                    };
                    return self.set_block(st, idx, Some(block.into()), Some(Arc::new(partial)));
                }
            }
        }
        let old = self.block(st, idx)?;
        if old.is_none() && buf.is_none() {
            return Ok(()); // zeroing a hole
        }
        let block = patched(old.as_deref(), bs, off, buf, len);
        self.set_block(st, idx, Some(block.into()), None)
    }

    /// Reads up to `size` bytes at `offset`.
    pub fn read(&self, ino: InodeNo, offset: u64, size: u32) -> Result<Vec<u8>> {
        let st = self.state(ino)?;
        // relatime: bump atime once after each modification, or daily.
        let now = Timestamp::now();
        let stale = |i: &crate::meta::Inode| {
            i.atime <= i.mtime || i.atime <= i.ctime || now.secs - i.atime.secs > 86400
        };
        let (out, bump) = {
            let g = st.read();
            match g.inode.kind {
                FileKind::File => {}
                FileKind::Dir => return Err(FsError::IsDir),
                _ => return Err(FsError::Invalid("not a regular file".into())),
            }
            let end = offset.saturating_add(size as u64).min(g.inode.size);
            if offset >= end {
                return Ok(Vec::new());
            }
            // Near where the last read ended (requests of one stream may come in a little
            // out of order from the dispatch threads): sequential.
            let last_end = g.read_end.swap(end, Ordering::Relaxed);
            let access = if offset.abs_diff(last_end) <= end - offset {
                Access::Sequential
            } else {
                Access::Random
            };
            (self.read_range(&g, offset, end, access)?, stale(&g.inode))
        };
        if bump {
            let mut g = st.write();
            if stale(&g.inode) {
                g.inode.atime = now;
                g.attr_dirty = true;
            }
        }
        Ok(out)
    }

    pub(super) fn read_range(
        &self,
        st: &InodeState,
        offset: u64,
        end: u64,
        access: Access,
    ) -> Result<Vec<u8>> {
        let bs = self.block_size();
        let first = offset / bs;
        let last = (end - 1) / bs;
        let mut chunks: BTreeMap<u64, ChunkId> = BTreeMap::new();
        self.maps
            .for_each_chunk(st.inode.map, first, last + 1, &mut |idx, id| {
                chunks.insert(idx, id);
                Ok(())
            })?;
        let mut out = vec![0u8; (end - offset) as usize];
        // Copies bytes [a, b) of block `idx` that fall in the requested range.
        let mut copy_part = |idx: u64, data: &[u8], a: u64, b: u64| {
            let b_start = idx * bs;
            let from = offset.max(b_start + a);
            let to = end.min(b_start + b);
            if from < to {
                let src_off = (from - b_start) as usize;
                out[(from - offset) as usize..(to - offset) as usize]
                    .copy_from_slice(&data[src_off..src_off + (to - from) as usize]);
            }
        };
        // Committed blocks not shadowed by the write-back buffer (or under a partly
        // written one not merged yet), read in pack runs.
        let stored: Vec<(u64, ChunkId)> = chunks
            .into_iter()
            .filter(|(idx, _)| st.dirty.get(idx).is_none_or(|d| d.unmerged().is_some()))
            .collect();
        let ids: Vec<ChunkId> = stored.iter().map(|(_, id)| *id).collect();
        self.chunks
            .get_many(&ids, access, &mut |i, data| {
                copy_part(stored[i].0, data, 0, bs);
                Ok(())
            })
            .map_err(|e| {
                let idx = match &e {
                    FsError::Corrupt { chunk, .. } => stored
                        .iter()
                        .find(|(_, id)| id == chunk)
                        .map(|(idx, _)| *idx)
                        .unwrap_or(first),
                    _ => first,
                };
                self.name_damage(st.inode.ino, idx, e)
            })?;
        for (idx, d) in st.dirty.range(first..=last) {
            match (d.unmerged(), &d.data) {
                // Only the written bytes, over the committed block read above.
                (Some(p), Some(data)) => {
                    for &(a, b) in &p.ranges {
                        copy_part(*idx, data, a as u64, b as u64);
                    }
                }
                _ => {
                    if let Some(data) = d.content() {
                        copy_part(*idx, data, 0, bs);
                    }
                }
            }
        }
        Ok(out)
    }

    /// Writes `data` at `offset`; returns the bytes written.
    pub fn write(&self, ino: InodeNo, offset: u64, data: &[u8]) -> Result<u32> {
        Ok(self.write_as(ino, offset, data, None)?.0)
    }

    /// [`Datastore::write`] by a writer that may not keep set-ID bits in the file when
    /// `caller_gid` is given (its gid; no CAP_FSETID). Any write drops the file's
    /// capability. Returns the bytes written and whether privileges were dropped (the
    /// mode or xattrs changed).
    pub fn write_as(
        &self,
        ino: InodeNo,
        offset: u64,
        data: &[u8],
        caller_gid: Option<u32>,
    ) -> Result<(u32, bool)> {
        let end = offset
            .checked_add(data.len() as u64)
            .ok_or(FsError::TooBig)?;
        if end > MAX_FILE_SIZE {
            return Err(FsError::TooBig);
        }
        let mut g = self.lock(ino)?;
        match g.inode.kind {
            FileKind::File => {}
            FileKind::Dir => return Err(FsError::IsDir),
            _ => return Err(FsError::Invalid("not a regular file".into())),
        }
        if data.is_empty() {
            return Ok((0, false));
        }
        let dropped = super::drop_privileges(&mut g.inode, caller_gid.is_some(), caller_gid);
        g.attr_dirty |= dropped;
        if !is_zero(data) {
            let pending = self.dirty_total.load(Ordering::Relaxed).max(0) as u64;
            self.space.admit(data.len() as u64, pending)?;
        }
        let bs = self.block_size();
        let mut pos = offset;
        while pos < end {
            let idx = pos / bs;
            let in_off = (pos % bs) as usize;
            let n = ((bs - in_off as u64).min(end - pos)) as usize;
            let src = &data[(pos - offset) as usize..(pos - offset) as usize + n];
            self.patch_block(&mut g, idx, in_off, Some(src), n)?;
            pos += n as u64;
        }
        if g.unqueued_bytes >= prestore::PRESTORE_BATCH {
            self.queue_prestore(&mut g);
        }
        let now = Timestamp::now();
        g.inode.size = g.inode.size.max(end);
        g.inode.mtime = now;
        g.inode.ctime = now;
        g.attr_dirty = true;
        if g.dirty_bytes > INODE_DIRTY_LIMIT
            || self.dirty_total.load(Ordering::Relaxed) > TOTAL_DIRTY_LIMIT
        {
            self.flush_state(&mut g)?;
        }
        Ok((data.len() as u32, dropped))
    }

    /// What a modification of `ino`'s data other than a write (fallocate, a copy into
    /// it) does to its privileges: see [`Datastore::write_as`]. Returns whether any
    /// changed.
    pub fn drop_privileges(&self, ino: InodeNo, caller_gid: Option<u32>) -> Result<bool> {
        let mut g = self.lock(ino)?;
        let dropped = super::drop_privileges(&mut g.inode, caller_gid.is_some(), caller_gid);
        if dropped {
            g.inode.ctime = Timestamp::now();
            g.attr_dirty = true;
        }
        Ok(dropped)
    }

    /// Sets the size of a locked regular file: growing makes a hole, shrinking drops the
    /// blocks past the end and zeroes the tail of the last one.
    pub(super) fn set_size(&self, st: &mut StateGuard, size: u64) -> Result<()> {
        if st.inode.kind != FileKind::File {
            return Err(if st.inode.kind == FileKind::Dir {
                FsError::IsDir
            } else {
                FsError::Invalid("not a regular file".into())
            });
        }
        if size > MAX_FILE_SIZE {
            return Err(FsError::TooBig);
        }
        let bs = self.block_size();
        if size < st.inode.size {
            let keep = size.div_ceil(bs);
            if size % bs != 0 {
                let in_off = (size % bs) as usize;
                self.patch_block(st, size / bs, in_off, None, bs as usize - in_off)?;
            }
            self.clear_blocks(st, keep, u64::MAX)?;
        }
        st.inode.size = size;
        let now = Timestamp::now();
        st.inode.mtime = now;
        st.inode.ctime = now;
        st.attr_dirty = true;
        Ok(())
    }

    /// Makes blocks `[start, end)` of a locked file holes: drops them from the write-back
    /// buffer and clears them from the committed map by whole subtrees.
    fn clear_blocks(&self, st: &mut InodeState, start: u64, end: u64) -> Result<()> {
        let gone: Vec<u64> = st.dirty.range(start..end).map(|(k, _)| *k).collect();
        for idx in gone {
            self.forget_dirty(st, idx);
        }
        st.inode.map = self.maps.clear_range(st.inode.map, start, end)?;
        Ok(())
    }

    /// Zeroes bytes `[offset, end)` of a locked file, dropping whole blocks to holes.
    fn zero_range(&self, st: &mut StateGuard, offset: u64, end: u64) -> Result<()> {
        let end = end.min(st.inode.size.max(offset));
        if offset >= end {
            return Ok(());
        }
        let bs = self.block_size();
        let first_full = offset.div_ceil(bs);
        let last_full = end / bs; // exclusive
        if first_full > last_full {
            // Inside one block.
            return self.patch_block(
                st,
                offset / bs,
                (offset % bs) as usize,
                None,
                (end - offset) as usize,
            );
        }
        if offset % bs != 0 {
            let in_off = (offset % bs) as usize;
            self.patch_block(st, offset / bs, in_off, None, bs as usize - in_off)?;
        }
        if end % bs != 0 {
            self.patch_block(st, end / bs, 0, None, (end % bs) as usize)?;
        }
        if first_full < last_full {
            self.clear_blocks(st, first_full, last_full)?;
        }
        Ok(())
    }

    /// fallocate(2): modes 0, KEEP_SIZE, PUNCH_HOLE|KEEP_SIZE, ZERO_RANGE[|KEEP_SIZE].
    /// Space is never reserved: thinfs is thin, and zeros are holes.
    pub fn fallocate(&self, ino: InodeNo, offset: u64, len: u64, mode: i32) -> Result<()> {
        let end = offset.checked_add(len).ok_or(FsError::TooBig)?;
        if len == 0 {
            return Err(FsError::Invalid("fallocate of length 0".into()));
        }
        if end > MAX_FILE_SIZE {
            return Err(FsError::TooBig);
        }
        let known = FALLOC_KEEP_SIZE | FALLOC_PUNCH_HOLE | FALLOC_ZERO_RANGE;
        if mode & !known != 0 {
            return Err(FsError::NotSupported(format!("fallocate mode {mode:#x}")));
        }
        let keep_size = mode & FALLOC_KEEP_SIZE != 0;
        let mut g = self.lock(ino)?;
        self.settle(&mut g)?;
        if g.inode.kind != FileKind::File {
            return Err(if g.inode.kind == FileKind::Dir {
                FsError::IsDir
            } else {
                FsError::Invalid("not a regular file".into())
            });
        }
        let _gate = self.gc_gate.read(); // new nodes commit before a GC starts
        let mut batch = Batch::default();
        if mode & FALLOC_PUNCH_HOLE != 0 {
            if !keep_size || mode & FALLOC_ZERO_RANGE != 0 {
                return Err(FsError::Invalid("PUNCH_HOLE needs KEEP_SIZE".into()));
            }
            self.zero_range(&mut g, offset, end)?;
        } else if mode & FALLOC_ZERO_RANGE != 0 {
            self.zero_range(&mut g, offset, end)?;
        }
        if !keep_size && end > g.inode.size {
            g.inode.size = end;
        }
        let now = Timestamp::now();
        if mode & (FALLOC_PUNCH_HOLE | FALLOC_ZERO_RANGE) != 0 || !keep_size {
            g.inode.mtime = now;
        }
        g.inode.ctime = now;
        self.put_state(&mut batch, &mut g)?;
        self.meta.commit(batch)
    }

    /// SEEK_DATA / SEEK_HOLE, exact to the block.
    pub fn lseek(&self, ino: InodeNo, offset: u64, whence: Whence) -> Result<u64> {
        let mut g = self.lock(ino)?;
        self.flush_state(&mut g)?;
        self.seek_in(&g.inode, offset, whence)
    }

    /// SEEK_DATA / SEEK_HOLE over a committed inode record.
    pub(super) fn seek_in(
        &self,
        inode: &crate::meta::Inode,
        offset: u64,
        whence: Whence,
    ) -> Result<u64> {
        if inode.kind != FileKind::File {
            return Err(FsError::Invalid("not a regular file".into()));
        }
        let size = inode.size;
        if offset >= size {
            return Err(FsError::NoData);
        }
        let bs = self.block_size();
        match whence {
            Whence::Data => match self.maps.next_data(inode.map, offset / bs)? {
                Some(b) if (b * bs).max(offset) < size => Ok((b * bs).max(offset)),
                _ => Err(FsError::NoData),
            },
            Whence::Hole => {
                let h = self.maps.next_hole(inode.map, offset / bs)?;
                Ok(h.saturating_mul(bs).max(offset).min(size))
            }
        }
    }

    /// copy_file_range: copies `len` bytes; whole blocks at equal in-block offsets are
    /// shared (metadata only), edges are copied. Returns the bytes copied.
    pub fn copy_range(
        &self,
        src: InodeNo,
        src_off: u64,
        dst: InodeNo,
        dst_off: u64,
        len: u64,
    ) -> Result<u64> {
        self.copy_range_from(src.0, src_off, dst, dst_off, len)
    }

    /// [`Datastore::copy_range`] from any node (a snapshot file too) into a live file.
    pub fn copy_range_from(
        &self,
        src_node: u64,
        src_off: u64,
        dst: InodeNo,
        dst_off: u64,
        len: u64,
    ) -> Result<u64> {
        let bs = self.block_size();
        let (view, src) = self.node_view(src_node)?;
        // The source's size, and its writes so far committed (the blocks are shared from
        // its committed map, read below under the GC gate).
        let src_size = match view {
            crate::meta::View::Live => {
                let mut g = self.lock(src)?;
                if g.inode.kind != FileKind::File {
                    return Err(FsError::Invalid("copy source is not a regular file".into()));
                }
                self.flush_state(&mut g)?;
                g.inode.size
            }
            crate::meta::View::At(_) => {
                let i = self.node_inode(src_node)?;
                if i.kind != FileKind::File {
                    return Err(FsError::Invalid("copy source is not a regular file".into()));
                }
                i.size
            }
        };
        #[cfg(test)]
        if let Some(hook) = self.after_copy_source_read.lock().take() {
            hook();
        }
        let src_ino = src;
        let src = src_node;
        let len = len.min(src_size.saturating_sub(src_off));
        if len == 0 {
            return Ok(0);
        }
        let dst_end = dst_off.checked_add(len).ok_or(FsError::TooBig)?;
        if dst_end > MAX_FILE_SIZE {
            return Err(FsError::TooBig);
        }
        let overlap = src == dst.0 && src_off < dst_end && dst_off < src_off + len;
        if src_off % bs != dst_off % bs || overlap {
            return self.copy_bytes(src, src_off, dst, dst_off, len);
        }
        // Edges by bytes, the middle by blocks.
        let first = src_off.div_ceil(bs);
        let last = (src_off + len) / bs;
        if first >= last {
            return self.copy_bytes(src, src_off, dst, dst_off, len);
        }
        let head = first * bs - src_off;
        if head > 0 {
            self.copy_bytes(src, src_off, dst, dst_off, head)?;
        }
        let delta_blocks = (dst_off / bs) as i64 - (src_off / bs) as i64;
        {
            let mut g = self.lock(dst)?;
            if g.inode.kind != FileKind::File {
                return Err(FsError::Invalid("copy target is not a regular file".into()));
            }
            self.flush_state(&mut g)?;
            // New nodes commit before a GC starts. The source's subtrees are shared, not
            // stored, so they are taken from the version committed now, under the gate:
            // no collection can start, and a running one has marked or pinned all that a
            // committed version reaches. (Not read with the size above: the source may
            // have been rewritten and its old blocks freed since.)
            let _gate = self.gc_gate.read();
            let Some(src_root) = self.committed_root(src, src_ino, view)? else {
                return Ok(head); // the source is gone (a deleted snapshot)
            };
            let mut batch = Batch::default();
            let (d_first, d_last) = (
                (first as i64 + delta_blocks) as u64,
                (last as i64 + delta_blocks) as u64,
            );
            g.inode.map = if delta_blocks == 0 {
                self.maps.graft(g.inode.map, src_root, first, last)?
            } else {
                // Clear the target range by subtrees, then set only the source's data
                // blocks: cost follows the data, not the length (holes are free).
                let cleared = self.maps.clear_range(g.inode.map, d_first, d_last)?;
                let mut changes: BTreeMap<u64, Option<ChunkId>> = BTreeMap::new();
                self.maps
                    .for_each_chunk(src_root, first, last, &mut |idx, id| {
                        changes.insert((idx as i64 + delta_blocks) as u64, Some(id));
                        Ok(())
                    })?;
                self.maps.update(cleared, &changes)?
            };
            let now = Timestamp::now();
            g.inode.size = g.inode.size.max(d_last * bs);
            g.inode.mtime = now;
            g.inode.ctime = now;
            self.put_state(&mut batch, &mut g)?;
            self.meta.commit(batch)?;
        }
        let tail_src = last * bs;
        let tail = src_off + len - tail_src;
        if tail > 0 {
            self.copy_bytes(
                src,
                tail_src,
                dst,
                (tail_src as i64 + delta_blocks * bs as i64) as u64,
                tail,
            )?;
        }
        Ok(len)
    }

    /// The block-map root of the committed version of `src` that `view` sees (`None`: no
    /// such version any more).
    fn committed_root(
        &self,
        src_node: u64,
        src: InodeNo,
        view: crate::meta::View,
    ) -> Result<Option<Option<crate::meta::MapRoot>>> {
        Ok(match view {
            crate::meta::View::Live => self.meta.inode(src, view)?.map(|i| i.map),
            crate::meta::View::At(_) => match self.node_inode(src_node) {
                Ok(i) => Some(i.map),
                Err(FsError::NotFound) => None,
                Err(e) => return Err(e),
            },
        })
    }

    fn copy_bytes(
        &self,
        src: u64,
        mut src_off: u64,
        dst: InodeNo,
        mut dst_off: u64,
        len: u64,
    ) -> Result<u64> {
        let mut left = len;
        while left > 0 {
            let n = left.min(4 << 20) as u32;
            let data = self.node_read(src, src_off, n)?;
            if data.is_empty() {
                break;
            }
            self.write(dst, dst_off, &data)?;
            src_off += data.len() as u64;
            dst_off += data.len() as u64;
            left -= data.len() as u64;
        }
        Ok(len - left)
    }
}

use super::Attr;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_ranges_merge() {
        let r = Partial::with_range(&[], 10, 20);
        assert_eq!(r, [(10, 20)]);
        let r = Partial::with_range(&r, 30, 40);
        assert_eq!(r, [(10, 20), (30, 40)]);
        // Adjacent and overlapping ranges join.
        assert_eq!(Partial::with_range(&r, 20, 30), [(10, 40)]);
        assert_eq!(Partial::with_range(&r, 0, 12), [(0, 20), (30, 40)]);
        assert_eq!(Partial::with_range(&r, 5, 50), [(5, 50)]);
        assert_eq!(
            Partial::with_range(&r, 45, 50),
            [(10, 20), (30, 40), (45, 50)]
        );
    }

    /// copy_file_range reads the source's root without the GC gate; if the source is
    /// rewritten and a collection frees its old blocks before the graft, the copy must
    /// not share them: it shares the blocks of the version committed then.
    #[test]
    fn copy_after_the_source_changed_and_gc_ran_shares_nothing_freed() {
        use crate::fs::testing::{opts, WHO};
        const BS: usize = 4096;
        let (_dir, store, ds, src) = crate::fs::testing::store_with_file(BS as u32, "src");
        let dst = ds.create(InodeNo::ROOT, b"dst", 0o644, WHO).unwrap().ino;
        let old: Vec<u8> = (0..8 * BS).map(|i| (i % 251) as u8 + 1).collect();
        let new: Vec<u8> = (0..8 * BS).map(|i| (i % 241) as u8 + 3).collect();
        ds.write(src, 0, &old).unwrap();
        ds.sync_all().unwrap();
        let ds2 = ds.clone();
        let new2 = new.clone();
        *ds.after_copy_source_read.lock() = Some(Box::new(move || {
            ds2.write(src, 0, &new2).unwrap();
            ds2.sync_all().unwrap();
            let r = crate::gc::collect(&ds2, &Default::default(), &|_| {}).unwrap();
            assert!(r.chunks_freed >= 8, "the old blocks are garbage now: {r:?}");
        }));
        assert_eq!(
            ds.copy_range(src, 0, dst, 0, old.len() as u64).unwrap(),
            8 * BS as u64
        );
        assert_eq!(ds.read(dst, 0, 8 * BS as u32).unwrap(), new);
        drop(ds);
        let r = crate::fsck::fsck(&store, false).unwrap();
        assert!(r.clean, "{r:#?}");
        let ds = crate::fs::Datastore::open(&store, &opts()).unwrap();
        let dst = ds.lookup(InodeNo::ROOT, b"dst").unwrap().ino;
        assert_eq!(ds.read(dst, 0, 8 * BS as u32).unwrap(), new);
    }

    /// Partial writes over committed blocks, read before and after the flush, with
    /// zeroing writes and truncation in between, against a plain model.
    #[test]
    fn partial_blocks_read_back_before_and_after_the_flush() {
        let (_dir, store, ds, f) = crate::fs::testing::store_with_file(16384, "img");
        let mut model: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8 + 1).collect();
        ds.write(f, 0, &model).unwrap();
        ds.fsync(f).unwrap();
        let check = |model: &[u8], what: &str| {
            let got = ds.read(f, 0, model.len() as u32 + 100).unwrap();
            assert!(got == model, "{what}");
        };
        let mut x = 7u64;
        for step in 0..300 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let off = (x % 190_000) as usize;
            let len = 1 + (x >> 20) as usize % 5000;
            let byte = if step % 7 == 0 {
                0
            } else {
                (x >> 40) as u8 | 1
            };
            ds.write(f, off as u64, &vec![byte; len]).unwrap();
            if model.len() < off + len {
                model.resize(off + len, 0);
            }
            model[off..off + len].fill(byte);
            if step % 5 == 0 {
                check(&model, &format!("step {step}, before the flush"));
            }
            if step % 50 == 49 {
                ds.flush(f).unwrap();
                check(&model, &format!("step {step}, after the flush"));
            }
            if step == 150 {
                let size = 150_001;
                let set = crate::fs::SetAttr {
                    size: Some(size as u64),
                    ..Default::default()
                };
                ds.setattr(f, &set).unwrap();
                model.truncate(size);
                check(&model, "after truncate");
            }
        }
        ds.fsync(f).unwrap();
        drop(ds);
        let ds = Datastore::open(&store, &crate::fs::testing::opts()).unwrap();
        let got = ds.read(f, 0, model.len() as u32 + 100).unwrap();
        assert!(got == model, "after reopen");
    }

    #[test]
    fn a_write_over_a_damaged_block_fails_one_flush_not_every_flush() {
        let (_dir, store, ds, f) = crate::fs::testing::store_with_file(16384, "img");
        let bs = 16384u64;
        let data: Vec<u8> = (0..3 * bs as usize).map(|i| (i % 251) as u8 + 1).collect();
        ds.write(f, 0, &data).unwrap();
        ds.fsync(f).unwrap();
        // Damage block 1's chunk in its pack.
        let id = damage_block(&ds, &store, f, 1);
        // Partial writes into the damaged block and a healthy one are accepted...
        ds.write(f, bs + 100, &[9u8; 50]).unwrap();
        ds.write(f, 2 * bs + 10, &[7u8; 20]).unwrap();
        // ...the flush that must read the damaged block fails and names it (close(2) or
        // the background flush: an fsync of so few bytes logs them, reading nothing)...
        assert!(matches!(ds.flush(f), Err(FsError::Corrupt { chunk, .. }) if chunk == id));
        // ...and the next one flushes the rest.
        ds.fsync(f).unwrap();
        let mut want = data[2 * bs as usize..].to_vec();
        want[10..30].fill(7);
        assert_eq!(ds.read(f, 2 * bs, bs as u32).unwrap(), want);
        assert!(ds.read(f, bs, bs as u32).is_err());
        assert_eq!(ds.read(f, 0, bs as u32).unwrap(), data[..bs as usize]);
    }

    /// Flips a byte of block `idx`'s chunk in its pack; returns the chunk's name.
    fn damage_block(ds: &Datastore, store: &std::path::Path, f: InodeNo, idx: u64) -> ChunkId {
        let root = ds.inode(f).unwrap().map;
        let id = ds.maps.lookup(root, idx).unwrap().unwrap();
        let loc = ds.meta.chunk_loc(&id).unwrap().unwrap();
        let pack = crate::chunk::pack::pack_path(&store.join("packs"), loc.pack);
        let mut bytes = std::fs::read(&pack).unwrap();
        bytes[loc.offset as usize + 7] ^= 0xff;
        std::fs::write(&pack, &bytes).unwrap();
        id
    }

    /// The same with enough partly written blocks that the merge reads them on several
    /// threads: the flush fails naming the damaged chunk, every other block flushes next.
    #[test]
    fn a_damaged_block_among_many_merged_in_parallel_fails_one_flush() {
        let (_dir, store, ds, f) = crate::fs::testing::store_with_file(16384, "img");
        let (bs, blocks) = (16384usize, 8 * MERGE_READERS);
        let mut model: Vec<u8> = (0..blocks * bs).map(|i| (i % 251) as u8 + 1).collect();
        ds.write(f, 0, &model).unwrap();
        ds.fsync(f).unwrap();
        let bad = 3 * blocks as u64 / 4;
        let id = damage_block(&ds, &store, f, bad);
        for b in 0..blocks {
            let off = b * bs + 100 + b;
            ds.write(f, off as u64, &[0xC3; 40]).unwrap();
            model[off..off + 40].fill(0xC3);
        }
        assert!(matches!(ds.flush(f), Err(FsError::Corrupt { chunk, .. }) if chunk == id));
        ds.fsync(f).unwrap();
        for b in (0..blocks).filter(|&b| b as u64 != bad) {
            let got = ds.read(f, (b * bs) as u64, bs as u32).unwrap();
            assert!(got == model[b * bs..(b + 1) * bs], "block {b}");
        }
        assert!(ds.read(f, bad * bs as u64, bs as u32).is_err());
    }

    /// The same with the pre-store workers on (they merge partly written blocks while
    /// this thread writes and reads them), and one block written in more separate
    /// pieces than a partial block keeps.
    #[test]
    fn partial_blocks_with_pre_store_workers_and_many_pieces() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("s");
        Datastore::mkfs(&store, 16384).unwrap();
        let ds = Datastore::open(&store, &crate::fs::OpenOptions::default()).unwrap();
        let who = crate::fs::testing::WHO;
        let f = ds.create(InodeNo::ROOT, b"img", 0o644, who).unwrap().ino;
        let size = 32usize << 20;
        let mut model: Vec<u8> = (0..size).map(|i| (i % 249) as u8 + 1).collect();
        ds.write(f, 0, &model).unwrap();
        ds.fsync(f).unwrap();
        // 41 pieces of 10 bytes, 20 bytes apart, in block 3.
        for k in 0..41 {
            let off = 3 * 16384 + 100 + k * 30;
            ds.write(f, off as u64, &[0xAB; 10]).unwrap();
            model[off..off + 10].fill(0xAB);
        }
        let mut x = 99u64;
        for step in 0..4000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let off = (x % (size as u64 - 4000)) as usize;
            let len = 100 + (x >> 24) as usize % 3000;
            let byte = (x >> 48) as u8 | 1;
            ds.write(f, off as u64, &vec![byte; len]).unwrap();
            model[off..off + len].fill(byte);
            if step % 16 == 0 {
                let roff = (x >> 8) as usize % (size - 70_000);
                let got = ds.read(f, roff as u64, 65_536).unwrap();
                assert!(got == model[roff..roff + 65_536], "step {step}");
            }
        }
        ds.fsync(f).unwrap();
        assert!(ds.read(f, 0, size as u32).unwrap() == model, "after fsync");
        ds.shutdown().unwrap();
        drop(ds);
        let ds = Datastore::open(&store, &crate::fs::testing::opts()).unwrap();
        assert!(ds.read(f, 0, size as u32).unwrap() == model, "after reopen");
    }

    #[test]
    fn writes_drop_the_file_capability_and_set_id_bits_when_asked() {
        let (_dir, _store, ds, f) = crate::fs::testing::store_with_file(4096, "bin");
        ds.setxattr(f, b"security.capability", b"caps", 0).unwrap();
        let set = crate::fs::SetAttr {
            mode: Some(0o6755),
            ..Default::default()
        };
        ds.setattr(f, &set).unwrap();
        // Root's write (CAP_FSETID) keeps set-ID bits; any write drops the capability.
        assert_eq!(ds.write_as(f, 0, b"x", None).unwrap(), (1, true));
        assert_eq!(ds.getattr(f).unwrap().perm, 0o6755);
        assert!(matches!(
            ds.getxattr(f, b"security.capability"),
            Err(FsError::NoAttr)
        ));
        assert_eq!(ds.write_as(f, 1, b"y", None).unwrap(), (1, false));
        assert_eq!(ds.write_as(f, 2, b"z", Some(0)).unwrap(), (1, true));
        assert_eq!(ds.getattr(f).unwrap().perm, 0o755);
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[0u8; 4097]));
        let mut v = vec![0u8; 4097];
        v[4096] = 1;
        assert!(!is_zero(&v));
        v[4096] = 0;
        v[3] = 1;
        assert!(!is_zero(&v));
    }
}

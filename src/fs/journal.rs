//! The intent log: fsync with one device flush.
//!
//! Without it an fsync costs a barrier: `fdatasync` of the packs, then sled's flush and
//! `fdatasync` of its log — two device flushes and a metadata write that grows with the
//! number of changed keys. With it, every flush of a regular file (the write-back buffer
//! committed into its block map) also appends a small record to the active pack: the
//! file's new record, the block-map changes, and the file version it replaces and the one
//! it writes (see `meta::FileVersions`). The chunks it names are in the packs already, so
//! an fsync is the flush plus one `fdatasync` of the packs. sled is made durable at the
//! next barrier (the background flusher's every 2 s, or any fsync or sync that needs
//! one), which also records where the log's replay starts (the checkpoint). Log records
//! are dead bytes in the packs once a barrier has passed them (fsck counts them as
//! garbage; compaction drops them).
//!
//! At open, the records after the checkpoint are replayed in append order: a record
//! applies only if the durable metadata holds exactly the version it replaced, so it is
//! applied to the base it was made from, never twice and never over a later change.
//! Applying it recomputes the block map from the changes; the resulting root must equal
//! the root the record names (block maps are Merkle trees), a second check that the base
//! is the same. Chunk records after the checkpoint whose index entries did not become
//! durable are indexed again.
//!
//! An fsync takes the fast path only if every write of the file's record that did not
//! go through the log (create, truncate, punch, clone, rename...) is already durable;
//! otherwise it runs a full barrier.
//!
//! # Records of written bytes
//! An fsync of a file with little dirty data (a guest database's 4 KiB write, an NFS
//! COMMIT) does not flush it: it appends the bytes written since the file's last record,
//! as written (for a partly written block only its written ranges), with the file's
//! attributes and a new version, and syncs the pack. No base block is read, nothing is
//! hashed, no metadata is written (ZFS's WR_COPIED). The data stays in the write-back
//! buffer and is flushed as usual later (its flush record chains from that version).
//! Replay applies such a record like a flush record: only over the version it names,
//! reading the committed blocks under partly written ones then.
//!
//! Until the data is flushed the metadata does not hold it, so:
//! - a barrier's checkpoint stays at or before the file's oldest such record
//!   ([`Datastore::checkpoint`]), and GC does not compact packs from there on;
//! - any write of the file's record outside the log first flushes that data
//!   ([`Datastore::settle`]): a durable truncate or chmod whose version does not chain
//!   from the record would otherwise make replay skip it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use super::{Datastore, InodeState};
use crate::chunk::pack::Kind;
use crate::error::Result;
use crate::ids::{ChunkId, InodeNo};
use crate::meta::{records, Batch, ChunkLoc, FileKind, Inode, View};

/// An fsync logs the written bytes themselves (instead of flushing) when at most this
/// many are not logged yet; more is flushed (the data would be written twice).
pub(super) const LOG_WRITES_MAX: usize = 256 << 10;

/// One logged flush of a regular file.
#[derive(Serialize, Deserialize)]
struct LogRecord {
    /// The file version this flush replaced.
    prev: u64,
    /// The version it wrote.
    version: u64,
    /// The record it wrote (its `map` is the new block-map root).
    inode: Inode,
    /// Block index -> new chunk (`None`: a hole).
    changes: Vec<(u64, Option<ChunkId>)>,
}

/// The bytes written to a regular file since its last log record, logged by an fsync.
#[derive(Serialize, Deserialize)]
struct WriteRecord {
    /// The file version this record follows.
    prev: u64,
    /// The version it makes current.
    version: u64,
    /// The file's attributes (size, times); its `map` is not used.
    inode: Inode,
    /// Block index -> what was written there.
    blocks: Vec<(u64, Written)>,
}

/// What a write record holds for one block.
#[derive(Serialize, Deserialize)]
enum Written {
    /// The block became a hole (zeros).
    Hole,
    /// The whole block.
    Whole(ByteBuf),
    /// Byte ranges (offset in the block, bytes) over the block's content at `prev`.
    Ranges(Vec<(u32, ByteBuf)>),
}

/// What a decoded log record asks for.
enum Body {
    /// A flush record's block-map changes.
    Changes(Vec<(u64, Option<ChunkId>)>),
    /// A write record's written bytes.
    Written(Vec<(u64, Written)>),
}

/// What a replay did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Replay {
    /// Log records applied.
    pub applied: u64,
    /// Log records whose base is not the durable metadata (already applied, or made
    /// obsolete by a later durable change).
    pub skipped: u64,
    /// Chunks whose index entries were restored from their pack records.
    pub reindexed: u64,
}

impl Datastore {
    /// Encodes and appends the log record of a flush of regular file `inode`.
    pub(super) fn log_flush(
        &self,
        prev: u64,
        version: u64,
        inode: &Inode,
        changes: &std::collections::BTreeMap<u64, Option<ChunkId>>,
    ) -> Result<()> {
        let rec = LogRecord {
            prev,
            version,
            inode: inode.clone(),
            changes: changes.iter().map(|(k, v)| (*k, *v)).collect(),
        };
        self.chunks.append_log(Kind::Log, &records::encode(&rec))
    }

    /// Logs the dirty data of a locked regular file that no record holds yet (see the
    /// module doc) if it is small; returns whether it did (then a sync of the packs
    /// makes it durable), or `false` when the caller must flush instead.
    pub(super) fn log_writes(&self, st: &mut InodeState) -> Result<bool> {
        let ino = st.inode.ino;
        if st.inode.kind != FileKind::File || !self.meta.unlogged_durable(ino) {
            return Ok(false);
        }
        let mut bytes = 0usize;
        for d in st.dirty.values().filter(|d| !d.logged) {
            bytes += match &d.partial {
                Some(p) => p.ranges.iter().map(|(a, b)| b - a).sum(),
                None => d.data.as_ref().map_or(0, |d| d.len()),
            };
            if bytes > LOG_WRITES_MAX {
                return Ok(false);
            }
        }
        let blocks: Vec<(u64, Written)> = st
            .dirty
            .iter()
            .filter(|(_, d)| !d.logged)
            .map(|(idx, d)| {
                let written = match (&d.partial, &d.data) {
                    (_, None) => Written::Hole,
                    (Some(p), Some(data)) => Written::Ranges(
                        p.ranges
                            .iter()
                            .map(|&(a, b)| (a as u32, ByteBuf::from(&data[a..b])))
                            .collect(),
                    ),
                    (None, Some(data)) => Written::Whole(ByteBuf::from(&data[..])),
                };
                (*idx, written)
            })
            .collect();
        if blocks.is_empty() {
            return Ok(false);
        }
        let rec = WriteRecord {
            prev: self.meta.file_version(ino)?,
            version: self.meta.new_version(),
            inode: st.inode.clone(),
            blocks,
        };
        // Listed before it is appended, so a barrier that could see the record in the
        // pack also sees it here.
        let position = self.chunks.append_position();
        self.log_pending.lock().entry(ino).or_insert(position);
        self.chunks
            .append_log(Kind::Write, &records::encode(&rec))?;
        self.meta.set_logged_version(ino, rec.version);
        for d in st.dirty.values_mut() {
            d.logged = true;
        }
        Ok(true)
    }

    /// Whether a log record of written bytes holds some of `ino`'s unflushed data.
    pub(super) fn has_logged_writes(&self, ino: InodeNo) -> bool {
        self.log_pending.lock().contains_key(&ino)
    }

    /// The file's logged writes are in the metadata now (flushed), or dropped.
    pub(super) fn logged_writes_settled(&self, ino: InodeNo) {
        if self.log_pending.lock().remove(&ino).is_some() {
            self.meta.forget_logged_version(ino);
        }
    }

    /// Flushes a locked file's data if a log record of written bytes holds some of it:
    /// called before its record is written outside the log (see the module doc).
    pub(super) fn settle(&self, st: &mut InodeState) -> Result<()> {
        if self.has_logged_writes(st.inode.ino) {
            self.flush_state(st)?;
        }
        Ok(())
    }

    /// Where a barrier that starts now may put the replay checkpoint: the append
    /// position, or the oldest log record of written bytes whose data is not flushed.
    pub(super) fn checkpoint(&self) -> (u32, u64) {
        let end = self.chunks.append_position();
        let pending = self.log_pending.lock().values().min().copied();
        pending.map_or(end, |p| p.min(end))
    }

    /// The first pack holding a log record of written bytes whose data is not flushed:
    /// GC must not compact it or any later pack.
    pub(crate) fn first_pending_pack(&self) -> Option<u32> {
        self.log_pending.lock().values().map(|(p, _)| *p).min()
    }

    /// Replays the intent log after the checkpoint (at open, before anything else runs).
    pub(super) fn replay_log(&self) -> Result<Replay> {
        let mut done = Replay::default();
        if let Some(from) = self.meta.log_checkpoint()? {
            let records = self.chunks.records_since(from)?;
            // What a killed daemon appended may be only in the page cache: durable before
            // the metadata built from it is.
            self.chunks
                .mark_unsynced(records.iter().map(|(_, _, loc)| loc.pack));
            for (kind, id, loc) in records {
                match kind.index() {
                    Some(index) => {
                        if self.meta.loc(index, &id)?.is_none()
                            && self.chunks.read_loc(&id, &loc).is_ok()
                        {
                            self.chunks.restore_loc(index, &id, &loc)?;
                            done.reindexed += 1;
                        }
                    }
                    None => match self.replay_record(kind, &id, &loc)? {
                        true => done.applied += 1,
                        false => done.skipped += 1,
                    },
                }
            }
            self.chunks.sync()?;
        }
        // Everything before this open's pack is in the metadata made durable here.
        let (pack, offset) = self.chunks.append_position();
        self.meta.set_log_checkpoint(pack, offset)?;
        self.meta.flush()?;
        if done.applied + done.reindexed > 0 {
            tracing::info!(
                "intent log: {} flushes replayed ({} already durable), {} index entries restored",
                done.applied,
                done.skipped,
                done.reindexed
            );
        }
        Ok(done)
    }

    /// Applies one log record if its base is the durable metadata; returns whether it
    /// did. A record that cannot be applied is reported and skipped (the store still
    /// opens, for fsck to judge); only metadata I/O errors are returned.
    fn replay_record(&self, kind: Kind, hash: &ChunkId, loc: &ChunkLoc) -> Result<bool> {
        let at = format!("log record in pack {} at offset {}", loc.pack, loc.offset);
        let payload = match self.chunks.read_loc(hash, loc) {
            Ok(p) => p,
            Err(e) => {
                // A record torn by the crash was never acknowledged (fsync waits for it).
                tracing::warn!("intent log: skipping an unreadable {at}: {e}");
                return Ok(false);
            }
        };
        let decoded = match kind {
            Kind::Write => records::decode::<WriteRecord>(&payload, &at)
                .map(|r| (r.prev, r.version, r.inode, Body::Written(r.blocks))),
            _ => records::decode::<LogRecord>(&payload, &at)
                .map(|r| (r.prev, r.version, r.inode, Body::Changes(r.changes))),
        };
        let (prev, version, inode, body) = match decoded {
            Ok(d) => d,
            Err(e) => {
                tracing::error!("intent log: skipping {at}: {e}");
                return Ok(false);
            }
        };
        let ino = inode.ino;
        if self.meta.file_version(ino)? != prev {
            return Ok(false);
        }
        let Some(current) = self.meta.inode(ino, View::Live)? else {
            return Ok(false);
        };
        let changes = match body {
            Body::Changes(changes) => changes.into_iter().collect(),
            Body::Written(blocks) => self.store_written(&current, blocks, &at)?,
        };
        let mut batch = Batch::default();
        let root = match self.maps.update(current.map, &changes) {
            Ok(root) => root,
            Err(e) => {
                tracing::error!("intent log: {at} (inode {ino}) not applied: {e}");
                return Ok(false);
            }
        };
        let mut inode = inode;
        if kind == Kind::Write {
            inode.map = root;
        } else if root != inode.map {
            tracing::error!(
                "intent log: {at} (inode {ino}) gives another block map than it names; not applied"
            );
            return Ok(false);
        }
        self.meta.put_inode_logged(&mut batch, &inode, version)?;
        self.meta.commit_logged(batch)?;
        Ok(true)
    }

    /// Stores the blocks a write record holds (partly written ones merged over the
    /// blocks of `current`) and returns the block-map changes. A block whose committed
    /// content cannot be read is left as it is (reported).
    fn store_written(
        &self,
        current: &Inode,
        blocks: Vec<(u64, Written)>,
        at: &str,
    ) -> Result<BTreeMap<u64, Option<ChunkId>>> {
        let bs = self.block_size() as usize;
        let mut contents: Vec<(u64, Option<Vec<u8>>)> = Vec::with_capacity(blocks.len());
        for (idx, written) in blocks {
            let content = match written {
                Written::Hole => None,
                Written::Whole(data) => Some(data.into_vec()),
                Written::Ranges(ranges) => {
                    let mut block = match self.maps.lookup(current.map, idx)? {
                        None => vec![0u8; bs],
                        Some(id) => match self.chunks.get(&id) {
                            Ok(b) => b,
                            Err(e) => {
                                tracing::error!(
                                    "intent log: {at}: inode {} offset {}: the written bytes are lost, the rest of the block is damaged: {e}",
                                    current.ino,
                                    idx * bs as u64
                                );
                                continue;
                            }
                        },
                    };
                    block.resize(bs, 0);
                    for (off, bytes) in ranges {
                        let off = off as usize;
                        if let Some(dst) = block.get_mut(off..off + bytes.len()) {
                            dst.copy_from_slice(&bytes);
                        }
                    }
                    Some(block)
                }
            };
            contents.push((idx, content.filter(|d| !super::io::is_zero(d))));
        }
        let mut changes = BTreeMap::new();
        let mut chunks = Vec::new();
        for (idx, content) in &contents {
            let id = content.as_deref().map(ChunkId::of);
            if let (Some(id), Some(data)) = (id, content) {
                chunks.push((id, &data[..]));
            }
            changes.insert(*idx, id);
        }
        self.chunks.put_many(&chunks)?;
        Ok(changes)
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};
    use std::sync::Arc;

    use super::*;
    use crate::fs::testing::{opts, store_with_file};
    use crate::fs::SetAttr;
    use crate::ids::InodeNo;

    /// Copies a directory tree as its files are now.
    fn crash_copy(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            let dst = to.join(e.file_name());
            if e.file_type().unwrap().is_dir() {
                crash_copy(&e.path(), &dst);
            } else if e.file_name() != "lock" {
                std::fs::copy(e.path(), dst).unwrap();
            }
        }
    }

    fn bytes(seed: u8, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect()
    }

    fn read_all(ds: &Datastore, ino: InodeNo) -> Vec<u8> {
        let size = ds.getattr(ino).unwrap().size;
        ds.read(ino, 0, size as u32).unwrap()
    }

    /// Completes a power-cut copy whose metadata was copied earlier: the packs (as the
    /// last sync left them) and the identity file.
    fn copy_packs_and_config(store: &Path, copy: &Path) {
        crash_copy(&store.join("packs"), &copy.join("packs"));
        let config = crate::config::StoreConfig::path;
        std::fs::copy(config(store), config(copy)).unwrap();
    }

    /// Opens `copy` (replaying its log) and checks file `f` against `model`; then again:
    /// the second open replays nothing more and changes nothing.
    fn reopen_twice(copy: &Path, f: InodeNo, model: &[u8]) {
        let ds = Datastore::open(copy, &opts()).unwrap();
        assert_eq!(read_all(&ds, f), model);
        drop(ds);
        let ds = Datastore::open(copy, &opts()).unwrap();
        assert_eq!(read_all(&ds, f), model);
        assert_eq!(ds.replay_log().unwrap(), Replay::default());
    }

    #[test]
    fn fsynced_writes_come_back_from_the_log_alone() {
        let (dir, store, ds, f) = store_with_file(4096, "disk.img");
        ds.fsync(f).unwrap(); // the create is unlogged: a full barrier
        assert!(ds.meta.unlogged_durable(f));
        // What a power cut leaves: the metadata as of the last barrier (sled writes
        // its buffers into the page cache between barriers, which a power cut loses),
        // the packs as fsync left them.
        let copy = dir.path().join("copy");
        crash_copy(&store.join("meta"), &copy.join("meta"));
        let flushes = ds.meta.flushes_started();
        let mut model = vec![0u8; 0];
        for round in 0..20u8 {
            let off = (round as usize * 5000) % 60_000;
            let data = bytes(round, 3000 + round as usize * 100);
            ds.write(f, off as u64, &data).unwrap();
            put(&mut model, off, &data);
            ds.fsync(f).unwrap();
        }
        let flushed = ds.meta.flushes_started();
        assert_eq!(flushed, flushes, "the fsyncs flushed no metadata");
        copy_packs_and_config(&store, &copy);
        drop(ds);
        reopen_twice(&copy, f, &model);
    }

    #[test]
    fn a_record_is_not_replayed_over_a_later_durable_change() {
        let (dir, store, ds, f) = store_with_file(4096, "a");
        ds.fsync(f).unwrap();
        ds.write(f, 0, &bytes(1, 20_000)).unwrap();
        ds.fsync(f).unwrap(); // logged, after the checkpoint

        // Truncate (unlogged) and make the metadata durable without a barrier (as sled
        // may on its own): the checkpoint stays before the record.
        let set = SetAttr {
            size: Some(100),
            ..Default::default()
        };
        ds.setattr(f, &set).unwrap();
        ds.flush(f).unwrap();
        ds.meta.flush().unwrap();
        let copy = dir.path().join("copy");
        crash_copy(&store, &copy);
        drop(ds);
        let ds = Datastore::open(&copy, &opts()).unwrap();
        assert_eq!(read_all(&ds, f), bytes(1, 20_000)[..100].to_vec());
    }

    #[test]
    fn a_rollback_breaks_the_version_chain() {
        let (_dir, _store, ds, f) = store_with_file(4096, "a");
        ds.write(f, 0, &bytes(4, 10_000)).unwrap();
        ds.fsync(f).unwrap();
        ds.snapshot_create("s1").unwrap();
        ds.write(f, 0, &bytes(5, 10_000)).unwrap();
        ds.fsync(f).unwrap();
        let before = ds.meta.file_version(f).unwrap();
        ds.snapshot_rollback("s1", true).unwrap();
        // A log record made after the rollback must not chain onto the version before
        // it (replayed over a pre-rollback base it would be applied to the wrong map).
        assert_ne!(ds.meta.file_version(f).unwrap(), before);
        assert_eq!(read_all(&ds, f), bytes(4, 10_000));
    }

    #[test]
    fn an_fsync_after_an_unlogged_change_is_a_full_barrier() {
        let (dir, store, ds, f) = store_with_file(4096, "a");
        ds.write(f, 0, &bytes(2, 50_000)).unwrap();
        ds.fsync(f).unwrap();
        // Punch a hole (unlogged), then write elsewhere and fsync.
        ds.fallocate(
            f,
            8192,
            8192,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        )
        .unwrap();
        assert!(!ds.meta.unlogged_durable(f));
        ds.write(f, 40_000, &bytes(3, 1000)).unwrap();
        ds.fsync(f).unwrap();
        assert!(ds.meta.unlogged_durable(f));
        let mut model = bytes(2, 50_000);
        model[8192..16384].fill(0);
        model[40_000..41_000].copy_from_slice(&bytes(3, 1000));
        let copy = dir.path().join("copy");
        crash_copy(&store, &copy);
        drop(ds);
        let ds = Datastore::open(&copy, &opts()).unwrap();
        assert_eq!(read_all(&ds, f), model);
    }

    /// Kinds of the records appended since `from`.
    fn kinds_since(ds: &Datastore, from: (u32, u64)) -> Vec<Kind> {
        let records = ds.chunks.records_since(from).unwrap();
        records.into_iter().map(|(k, _, _)| k).collect()
    }

    /// Applies a write to a byte model.
    fn put(model: &mut Vec<u8>, off: usize, data: &[u8]) {
        if model.len() < off + data.len() {
            model.resize(off + data.len(), 0);
        }
        model[off..off + data.len()].copy_from_slice(data);
    }

    /// A store (16 KiB blocks) with a file of 100,000 durable bytes and then 3,000 more
    /// written at 5,000 and not fsync'd yet; `model` holds both.
    fn durable_file_then_a_write() -> (tempfile::TempDir, PathBuf, Arc<Datastore>, InodeNo, Vec<u8>)
    {
        let (dir, store, ds, f) = store_with_file(16384, "a");
        let mut model = bytes(1, 100_000);
        ds.write(f, 0, &model).unwrap();
        ds.fsync(f).unwrap();
        ds.write(f, 5000, &bytes(2, 3000)).unwrap();
        put(&mut model, 5000, &bytes(2, 3000));
        (dir, store, ds, f, model)
    }

    #[test]
    fn small_fsyncs_log_the_written_bytes_and_chain_with_flushes() {
        let (dir, store, ds, f) = store_with_file(16384, "disk.img");
        let mut model = bytes(9, 200_000);
        ds.write(f, 0, &model).unwrap();
        ds.fsync(f).unwrap(); // create + first data: a full barrier
        let copy = dir.path().join("copy");
        crash_copy(&store.join("meta"), &copy.join("meta"));
        let flushes = ds.meta.flushes_started();
        let from = ds.chunks.append_position();
        for round in 0..30u8 {
            // Partly written blocks over committed data, a whole block, zeros, and an
            // extension of the file.
            let (off, data) = match round % 5 {
                0 => (round as usize * 3001 % 150_000, bytes(round, 4096)),
                1 => (16384 * 3, bytes(round, 16384)),
                2 => (16384 * 5, vec![0u8; 16384]),
                3 => (model.len() - 100, bytes(round, 5000)),
                _ => (round as usize * 777, bytes(round, 100)),
            };
            ds.write(f, off as u64, &data).unwrap();
            put(&mut model, off, &data);
            if round % 7 == 6 {
                ds.flush(f).unwrap(); // close(2): a flush record, no barrier
            }
            ds.fsync(f).unwrap();
        }
        // A large write is flushed, not logged as bytes.
        let big = bytes(77, super::LOG_WRITES_MAX + 50_000);
        ds.write(f, 20_000, &big).unwrap();
        put(&mut model, 20_000, &big);
        ds.fsync(f).unwrap();
        ds.write(f, 1, &bytes(78, 10)).unwrap();
        put(&mut model, 1, &bytes(78, 10));
        ds.fsync(f).unwrap();
        assert_eq!(ds.meta.flushes_started(), flushes, "no metadata flushed");
        let kinds = kinds_since(&ds, from);
        let writes = kinds.iter().filter(|k| **k == Kind::Write).count();
        let flushes = kinds.iter().filter(|k| **k == Kind::Log).count();
        assert_eq!(writes, 27, "{kinds:?}"); // not after the 4 closes
        assert_eq!(flushes, 5, "{kinds:?}");
        assert_eq!(read_all(&ds, f), model);
        copy_packs_and_config(&store, &copy);
        drop(ds);
        reopen_twice(&copy, f, &model);
    }

    #[test]
    fn a_barrier_does_not_pass_logged_bytes_that_are_not_flushed() {
        let (dir, store, ds, f, model) = durable_file_then_a_write();
        ds.fsync(f).unwrap(); // logged bytes, not flushed

        // Another file's fsync runs a full barrier (a create is unlogged).
        let g = ds
            .create(InodeNo::ROOT, b"b", 0o644, crate::fs::testing::WHO)
            .unwrap()
            .ino;
        ds.write(g, 0, &bytes(3, 100)).unwrap();
        ds.fsync(g).unwrap();
        let copy = dir.path().join("copy");
        crash_copy(&store, &copy);
        drop(ds);
        let ds = Datastore::open(&copy, &opts()).unwrap();
        assert_eq!(read_all(&ds, f), model);
        assert_eq!(read_all(&ds, g), bytes(3, 100));
    }

    #[test]
    fn a_change_outside_the_log_flushes_logged_bytes_first() {
        let (dir, store, ds, f, mut model) = durable_file_then_a_write();
        ds.fsync(f).unwrap(); // logged bytes, not flushed

        // A truncate (outside the log) made durable by another file's barrier: the
        // logged bytes must be in it, as replay will skip their record.
        let set = SetAttr {
            size: Some(60_000),
            ..Default::default()
        };
        ds.setattr(f, &set).unwrap();
        model.truncate(60_000);
        ds.sync_metadata().unwrap();
        let copy = dir.path().join("copy");
        crash_copy(&store, &copy);
        drop(ds);
        let ds = Datastore::open(&copy, &opts()).unwrap();
        assert_eq!(read_all(&ds, f), model);
    }

    #[test]
    fn logged_bytes_over_a_damaged_block_lose_that_block_only() {
        let (dir, store, ds, f) = store_with_file(16384, "a");
        // Four different blocks (`bytes` repeats every 256 bytes).
        let mut model: Vec<u8> = (0..4u8).flat_map(|b| bytes(b, 16384)).collect();
        ds.write(f, 0, &model).unwrap();
        ds.fsync(f).unwrap();
        let copy = dir.path().join("copy");
        crash_copy(&store.join("meta"), &copy.join("meta"));
        ds.write(f, 100, &bytes(2, 50)).unwrap(); // block 0, partly
        ds.write(f, 40_000, &bytes(3, 50)).unwrap(); // block 2, partly
        put(&mut model, 40_000, &bytes(3, 50));
        ds.fsync(f).unwrap();
        copy_packs_and_config(&store, &copy);
        // Damage block 0's committed chunk in the copy.
        let id = ds
            .maps
            .lookup(ds.inode(f).unwrap().map, 0)
            .unwrap()
            .unwrap();
        let loc = ds.meta.chunk_loc(&id).unwrap().unwrap();
        drop(ds);
        let pack = crate::chunk::pack::pack_path(&copy.join("packs"), loc.pack);
        let mut bytes_of_pack = std::fs::read(&pack).unwrap();
        bytes_of_pack[loc.offset as usize + 10] ^= 0xff;
        std::fs::write(&pack, bytes_of_pack).unwrap();
        let ds = Datastore::open(&copy, &opts()).unwrap();
        // Block 0 reads as damaged (EIO); block 2 has the logged bytes.
        assert!(ds.read(f, 0, 100).is_err());
        assert_eq!(ds.read(f, 32768, 32768).unwrap(), model[32768..65536]);
    }

    #[test]
    fn the_flush_of_logged_bytes_makes_its_chunks_durable_first() {
        // Once the flush's version is durable (the next barrier, GC, or sled writing its
        // log on its own) the write record is no longer replayed: the chunks that now
        // hold its bytes must be durable by then.
        let (_dir, _store, ds, f, _) = durable_file_then_a_write();
        ds.fsync(f).unwrap(); // logged bytes
        ds.write(f, 70_000, &bytes(3, 3000)).unwrap(); // not acknowledged
        let syncs = ds.chunks.syncs();
        ds.flush(f).unwrap();
        assert_eq!(ds.chunks.syncs(), syncs + 1, "the flush synced the packs");
        // A flush with no logged bytes does not.
        ds.write(f, 90_000, &bytes(4, 3000)).unwrap();
        ds.flush(f).unwrap();
        assert_eq!(ds.chunks.syncs(), syncs + 1);
    }

    #[test]
    fn after_a_failed_pack_sync_fsyncs_run_barriers_until_one_succeeds() {
        let (_dir, _store, ds, f, _) = durable_file_then_a_write();
        ds.chunks
            .fail_next_sync
            .store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(ds.fsync(f).is_err());
        // Another barrier (not this file's) must not put it back on the fast path: its
        // lost record's version would be the base of the next one.
        ds.sync_metadata().unwrap();
        let flushes = ds.meta.flushes_started();
        ds.write(f, 9000, &bytes(3, 3000)).unwrap();
        ds.fsync(f).unwrap();
        assert!(ds.meta.flushes_started() > flushes, "a full barrier ran");
        // Then the fast path again.
        let flushes = ds.meta.flushes_started();
        ds.write(f, 20_000, &bytes(4, 3000)).unwrap();
        ds.fsync(f).unwrap();
        assert_eq!(ds.meta.flushes_started(), flushes);
    }
}

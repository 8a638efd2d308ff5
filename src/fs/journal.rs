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

use serde::{Deserialize, Serialize};

use super::Datastore;
use crate::chunk::pack::Kind;
use crate::error::Result;
use crate::ids::ChunkId;
use crate::meta::{records, Batch, ChunkLoc, Inode, View};

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
        self.chunks.append_log(&records::encode(&rec))
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
                match kind {
                    Kind::Chunk => {
                        if self.meta.chunk_loc(&id)?.is_none()
                            && self.chunks.read_loc(&id, &loc).is_ok()
                        {
                            self.chunks.restore_loc(&id, &loc)?;
                            done.reindexed += 1;
                        }
                    }
                    Kind::Log => match self.replay_record(&id, &loc)? {
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
                "intent log: {} flushes replayed ({} already durable), {} chunk index entries restored",
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
    fn replay_record(&self, hash: &ChunkId, loc: &ChunkLoc) -> Result<bool> {
        let at = format!("log record in pack {} at offset {}", loc.pack, loc.offset);
        let payload = match self.chunks.read_loc(hash, loc) {
            Ok(p) => p,
            Err(e) => {
                // A record torn by the crash was never acknowledged (fsync waits for it).
                tracing::warn!("intent log: skipping an unreadable {at}: {e}");
                return Ok(false);
            }
        };
        let rec: LogRecord = match records::decode(&payload, &at) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!("intent log: skipping {at}: {e}");
                return Ok(false);
            }
        };
        let ino = rec.inode.ino;
        if self.meta.file_version(ino)? != rec.prev {
            return Ok(false);
        }
        let Some(current) = self.meta.inode(ino, View::Live)? else {
            return Ok(false);
        };
        let changes = rec.changes.iter().copied().collect();
        let mut batch = Batch::default();
        let root = match self.maps.update(current.map, &changes, &mut batch) {
            Ok(root) => root,
            Err(e) => {
                tracing::error!("intent log: {at} (inode {ino}) not applied: {e}");
                return Ok(false);
            }
        };
        if root != rec.inode.map {
            tracing::error!(
                "intent log: {at} (inode {ino}) gives another block map than it names; not applied"
            );
            return Ok(false);
        }
        self.meta
            .put_inode_logged(&mut batch, &rec.inode, rec.version)?;
        self.meta.commit_logged(batch)?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

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
            if model.len() < off + data.len() {
                model.resize(off + data.len(), 0);
            }
            model[off..off + data.len()].copy_from_slice(&data);
            ds.fsync(f).unwrap();
        }
        let flushed = ds.meta.flushes_started();
        assert_eq!(flushed, flushes, "the fsyncs flushed no metadata");
        crash_copy(&store.join("packs"), &copy.join("packs"));
        std::fs::copy(
            crate::config::StoreConfig::path(&store),
            crate::config::StoreConfig::path(&copy),
        )
        .unwrap();
        drop(ds);
        let ds = Datastore::open(&copy, &opts()).unwrap();
        assert_eq!(read_all(&ds, f), model);
        // A second open replays nothing more and changes nothing.
        drop(ds);
        let ds = Datastore::open(&copy, &opts()).unwrap();
        assert_eq!(read_all(&ds, f), model);
        assert_eq!(ds.replay_log().unwrap(), Replay::default());
    }

    #[test]
    fn a_record_is_not_replayed_over_a_later_durable_change() {
        let (dir, store, ds, f) = store_with_file(4096, "a");
        ds.fsync(f).unwrap();
        ds.write(f, 0, &bytes(1, 20_000)).unwrap();
        ds.fsync(f).unwrap(); // logged, after the checkpoint
                              // Truncate (unlogged) and make the metadata durable without a barrier (as GC
                              // does): the checkpoint stays before the record.
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
}

//! The metadata store: the only module that talks to sled.
//!
//! Everything lives in one sled tree (keys in [`keys`]) so that a set of changes commits
//! atomically through one [`Batch`]. Durability is promised only by [`Meta::flush`]; the
//! callers order it after the pack files they reference are synced, so an index entry or
//! block map never becomes durable before the bytes it points at.
//!
//! Versioned records (inodes, directory entries) implement snapshots: a write in the
//! current epoch `E` adds or replaces the version at `E`; an older version stays only
//! while some snapshot can see it (a snapshot at epoch `S` sees the newest version with
//! epoch <= `S`). Without snapshots a record therefore has exactly one version.

mod buckets;
pub mod keys;
pub mod records;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

pub use records::{ChunkLoc, DirEntry, FileKind, Inode, MapRoot, SnapshotRecord, Timestamp};

use crate::error::{FsError, Result};
use crate::ids::{ChunkId, Epoch, InodeNo};

/// Value byte of a deleted version (a tombstone hides older versions from newer readers).
const TOMBSTONE: u8 = 0;

/// Which version of the tree a read looks at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum View {
    /// The live, writable tree.
    Live,
    /// The tree frozen at a snapshot's epoch.
    At(Epoch),
}

/// The metadata store of one datastore.
pub struct Meta {
    db: sled::Db,
    /// sled's files, synced by [`Meta::flush`] after sled's own flush (see there).
    files: SledFiles,
    /// The epoch live writes go to.
    epoch: AtomicU64,
    /// Epochs frozen by existing snapshots.
    snapshots: RwLock<BTreeSet<u64>>,
    /// Batches with versioned writes hold it shared; snapshot creation exclusively.
    epoch_gate: Arc<parking_lot::RwLock<()>>,
    /// GC support: inode versions dropped while a collection marks (see [`Dropped`]).
    dropped: Dropped,
    /// Versions of regular files, for the intent log (see [`FileVersions`]).
    versions: FileVersions,
    /// Serializes changes of the location indexes (see `buckets.rs`).
    index_writes: parking_lot::Mutex<()>,
    /// The keys of the location indexes' buckets, once loaded ([`Meta::load_directory`]).
    buckets: buckets::Directory,
}

/// Versions of regular files' live records, for the intent log (`fs/journal.rs`).
///
/// Every write of a regular file's live record also writes a new version, unique for the
/// life of the store, under the `v` key. A logged flush (the intent log's record of it
/// names the version it replaces and the one it writes) can be replayed after a crash
/// exactly when the durable metadata holds the version it replaced: the record applies
/// to the base it was made from, never twice, and never over a later change. Any other
/// write of the record ("unlogged": truncate, punch, rename, clone...) breaks the chain,
/// so an fsync after one needs a full barrier, until a metadata flush has covered it.
struct FileVersions {
    /// This open's generation in the high bits: versions never repeat across opens.
    next: AtomicU64,
    /// Metadata flushes started and the highest finished.
    flushes_started: AtomicU64,
    flushes_done: AtomicU64,
    /// Files with an unlogged write committed, and `flushes_started` at that moment: it
    /// is durable once a flush numbered higher has finished.
    unlogged: parking_lot::Mutex<std::collections::HashMap<InodeNo, u64>>,
    /// Versions written by a log record of written bytes alone (an fsync that logged a
    /// file's dirty data without flushing it): not in the metadata until the data is
    /// flushed, yet the next record of the file chains from them. Versions only grow,
    /// so a file's current version is the larger of this and the metadata's.
    logged_only: parking_lot::Mutex<std::collections::HashMap<InodeNo, u64>>,
}

/// GC support: the "snapshot at the beginning" barrier of a collection's mark phase.
///
/// The mark scans the inode table while writers keep committing, so a version it has not
/// reached yet may be dropped before it gets there, after another inode that the scan has
/// passed took over part of its block map (copy_file_range grafts, clones then unlinks).
/// While capturing, every inode version about to be dropped is recorded here, before the
/// batch that drops it commits, and the mark walks these too: so the mark sees every
/// version that existed when capturing started. Only inode versions are recorded.
#[derive(Default)]
struct Dropped {
    capturing: AtomicBool,
    values: parking_lot::Mutex<Vec<sled::IVec>>,
}

/// What [`Meta::flush`] syncs after sled's flush. On Linux sled 0.34 ends a flush with
/// `sync_file_range`, which neither flushes the device's write cache nor commits the
/// file's size and extents, and writes large values ("blobs") to files it never syncs. A
/// power-cut test (the device copied right after fsync returned, then mounted) lost an
/// fsync'd 64 MiB write whose metadata had grown sled's log file; `fdatasync` of the log
/// afterwards closes that.
struct SledFiles {
    /// sled's log (`db`).
    log: std::fs::File,
    blobs: std::path::PathBuf,
    /// Blob files already synced (pruned to those still present).
    synced_blobs: parking_lot::Mutex<std::collections::HashSet<std::ffi::OsString>>,
}

impl SledFiles {
    fn open(dir: &Path) -> Result<SledFiles> {
        let path = dir.join("db");
        let log = std::fs::File::open(&path)
            .map_err(|e| FsError::io(format!("opening {}", path.display()), e))?;
        Ok(SledFiles {
            log,
            blobs: dir.join("blobs"),
            synced_blobs: Default::default(),
        })
    }

    /// Syncs blobs written since the last call, then the log.
    fn sync(&self) -> Result<()> {
        let mut synced = self.synced_blobs.lock();
        let mut present = std::collections::HashSet::new();
        let mut new = false;
        let listing = std::fs::read_dir(&self.blobs)
            .map_err(|e| FsError::io(format!("listing {}", self.blobs.display()), e))?;
        for entry in listing.flatten() {
            let name = entry.file_name();
            if !synced.contains(&name) {
                match std::fs::File::open(entry.path()).and_then(|f| f.sync_data()) {
                    Ok(()) => new = true,
                    // sled removed it meanwhile: nothing to sync.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => {
                        return Err(FsError::io(
                            format!("syncing {}", entry.path().display()),
                            e,
                        ))
                    }
                }
            }
            present.insert(name);
        }
        if new {
            std::fs::File::open(&self.blobs)
                .and_then(|d| d.sync_all())
                .map_err(|e| FsError::io(format!("syncing {}", self.blobs.display()), e))?;
        }
        *synced = present;
        self.log
            .sync_data()
            .map_err(|e| FsError::io("syncing the metadata log (meta/db)", e))
    }
}

/// The two indexes of records in the packs: both map a BLAKE3 name to a [`ChunkLoc`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Index {
    /// File data: a chunk is one block's bytes.
    Chunks,
    /// Block-map nodes (`crate::blockmap`): metadata, kept in the packs so that the
    /// copy-on-write churn of overwrites is compacted with the data instead of growing
    /// the metadata store (format 5).
    Nodes,
}

impl Index {
    pub const ALL: [Index; 2] = [Index::Chunks, Index::Nodes];

    /// Tag of its buckets (`meta/buckets.rs`).
    fn tag(self) -> u8 {
        match self {
            Index::Chunks => keys::CHUNK_BUCKET,
            Index::Nodes => keys::NODE_BUCKET,
        }
    }

    /// Tag of its one-key-per-entry form (formats up to 5), migrated at open.
    fn entry_tag(self) -> u8 {
        match self {
            Index::Chunks => keys::CHUNK,
            Index::Nodes => keys::NODE_LOC,
        }
    }

    /// What its records are, for messages.
    pub fn what(self) -> &'static str {
        match self {
            Index::Chunks => "chunk",
            Index::Nodes => "block-map node",
        }
    }
}

/// A set of changes committed atomically by [`Meta::commit`] (the last change of a key
/// wins).
#[derive(Default)]
pub struct Batch {
    ops: std::collections::BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    /// Held from the first versioned write until commit, so a snapshot cannot freeze the
    /// epoch between choosing a version's epoch and committing it.
    epoch_guard: Option<parking_lot::ArcRwLockReadGuard<parking_lot::RawRwLock, ()>>,
    /// Regular files whose records this batch writes without the intent log.
    unlogged: Vec<InodeNo>,
}

impl Batch {
    fn insert(&mut self, k: Vec<u8>, v: Vec<u8>) {
        self.ops.insert(k, Some(v));
    }
    fn remove(&mut self, k: Vec<u8>) {
        self.ops.insert(k, None);
    }
}

/// One stored version of an inode record (see [`Meta::inode_versions`]).
#[derive(Clone, Debug)]
pub struct InodeVersion {
    pub inode: Inode,
    /// The epoch it was written in.
    pub epoch: Epoch,
    /// The epoch of the next newer version (`None`: this is the live record). Snapshots
    /// with epochs in `[epoch, newer)` see this version.
    pub newer: Option<Epoch>,
}

/// sled's default cache. Its real memory use grows past this setting with the number of
/// keys (measured: with 256 MiB, +22 MiB RSS per GiB of unique data; with 64 MiB,
/// +10 MiB/GiB and flattening), so it is kept small: with 16 MiB (and the smaller node
/// and location caches) RSS grew 88 MiB from 4 to 32 GiB of unique data, with 64 MiB
/// 351 (issue 6; before the location indexes moved into buckets, `buckets.rs`, which
/// took out sled's per-key memory). The hot part of the metadata has caches of its own
/// (block-map nodes, chunk locations). A larger one (mount option `meta_cache=`) speeds
/// random writes to large images: every index key is a hash, so each update pages a
/// random part of the tree in.
pub const DEFAULT_CACHE: u64 = 16 << 20;

impl Meta {
    /// Opens (or creates) the sled database in `dir` with the default cache.
    pub fn open(dir: &Path) -> Result<Meta> {
        Self::open_with_cache(dir, DEFAULT_CACHE)
    }

    /// Opens (or creates) the sled database in `dir`; sled caches `cache` bytes.
    pub fn open_with_cache(dir: &Path, cache: u64) -> Result<Meta> {
        let config = sled::Config::new()
            .path(dir)
            .cache_capacity(cache)
            // No timed flushes of its own: sled persists at thinfs's barriers (every 2 s
            // from the background flusher, and at each fsync), after the packs are
            // synced, so persisted metadata does not get ahead of the pack data it names.
            // (sled still writes full log buffers on its own, unsynced: the order is kept
            // for what is synced, not guaranteed for what the page cache writes back.)
            .flush_every_ms(None);
        // sled 0.34's background thread may still hold the file lock for a moment after
        // a database in this process was dropped (sled#1234): retry briefly.
        let mut tries = 0;
        let opened = loop {
            match config.open() {
                // sled wraps the lock's EWOULDBLOCK in an `Other` error with this text.
                Err(sled::Error::Io(e))
                    if (e.kind() == std::io::ErrorKind::WouldBlock
                        || e.to_string().contains("could not acquire lock"))
                        && tries < 40 =>
                {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                other => break other,
            }
        };
        let db = opened.map_err(|e| match e {
            sled::Error::Io(io) => {
                FsError::io(format!("opening metadata in {}", dir.display()), io)
            }
            other => FsError::Meta(format!("opening metadata in {}: {other}", dir.display())),
        })?;
        let meta = Meta {
            db,
            files: SledFiles::open(dir)?,
            epoch: AtomicU64::new(1),
            snapshots: RwLock::new(BTreeSet::new()),
            epoch_gate: Arc::default(),
            dropped: Dropped::default(),
            versions: FileVersions {
                next: AtomicU64::new(0),
                flushes_started: AtomicU64::new(0),
                flushes_done: AtomicU64::new(0),
                unlogged: Default::default(),
                logged_only: Default::default(),
            },
            index_writes: Default::default(),
            buckets: Default::default(),
        };
        // Versions are (open generation << 40) + n: unique across opens (2^40 flushes per
        // open: 35 years at 1,000 a second).
        let generation = meta.counter("open-generation")? + 1;
        meta.db
            .insert(keys::counter("open-generation"), &generation.to_be_bytes())?;
        meta.versions.next.store(generation << 40, Ordering::SeqCst);
        // Durable before any version of this generation can be (a crash must not give
        // the next open the same generation).
        meta.flush()?;
        let epoch = meta.counter("epoch")?.max(1);
        meta.epoch.store(epoch, Ordering::SeqCst);
        let mut snaps = BTreeSet::new();
        for rec in meta.snapshots()? {
            snaps.insert(rec.epoch);
        }
        *meta.snapshots.write().unwrap_or_else(|p| p.into_inner()) = snaps;
        Ok(meta)
    }

    /// Makes everything committed so far durable.
    pub fn flush(&self) -> Result<()> {
        let v = &self.versions;
        let number = v.flushes_started.fetch_add(1, Ordering::SeqCst) + 1;
        self.db.flush()?;
        self.files.sync()?;
        let done = v
            .flushes_done
            .fetch_max(number, Ordering::SeqCst)
            .max(number);
        v.unlogged.lock().retain(|_, at| *at >= done);
        Ok(())
    }

    /// Whether every write of `ino`'s record not made through the intent log is durable
    /// (then the log alone makes its later, logged writes durable).
    pub fn unlogged_durable(&self, ino: InodeNo) -> bool {
        let v = &self.versions;
        match v.unlogged.lock().get(&ino) {
            None => true,
            Some(at) => v.flushes_done.load(Ordering::SeqCst) > *at,
        }
    }

    /// Treats `ino`'s current record as written without the log (its log record could
    /// not be appended).
    pub fn mark_unlogged(&self, ino: InodeNo) {
        self.note_unlogged(vec![ino]);
    }

    /// Metadata flushes started so far (tests: "this made nothing durable").
    #[cfg(test)]
    pub(crate) fn flushes_started(&self) -> u64 {
        self.versions.flushes_started.load(Ordering::SeqCst)
    }

    /// Adds to `batch` a fresh version of `ino` that no log record names (or its removal
    /// when the record is deleted), and lists `ino` as written without the log: see
    /// [`FileVersions`].
    fn unlogged_write(&self, batch: &mut Batch, ino: InodeNo, exists: bool) {
        if exists {
            batch.insert(
                keys::version(ino),
                self.new_version().to_be_bytes().to_vec(),
            );
        } else {
            batch.remove(keys::version(ino));
        }
        batch.unlogged.push(ino);
    }

    /// A new file version (see [`FileVersions`]).
    pub fn new_version(&self) -> u64 {
        self.versions.next.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// The current version of regular file `ino` (0: none written): its live record's,
    /// or a later one that only a log record of written bytes names.
    pub fn file_version(&self, ino: InodeNo) -> Result<u64> {
        let committed = match self.db.get(keys::version(ino))? {
            Some(v) if v.len() == 8 => u64::from_be_bytes(v.as_ref().try_into().unwrap_or([0; 8])),
            _ => 0,
        };
        let logged = self.versions.logged_only.lock().get(&ino).copied();
        Ok(committed.max(logged.unwrap_or(0)))
    }

    /// Records that a log record of written bytes made `version` the current version
    /// of `ino` (its data is still to be flushed).
    pub fn set_logged_version(&self, ino: InodeNo, version: u64) {
        self.versions.logged_only.lock().insert(ino, version);
    }

    /// Forgets `ino`'s logged-only version (its data was flushed or dropped: the
    /// metadata's version is later).
    pub fn forget_logged_version(&self, ino: InodeNo) {
        self.versions.logged_only.lock().remove(&ino);
    }

    /// Where the intent log's replay starts: (pack, offset) of the append position when
    /// the last barrier began (every logged flush before it is in durable metadata).
    /// `None`: the store has never had one (made before the intent log, or never
    /// mounted), so no pack holds log records.
    pub fn log_checkpoint(&self) -> Result<Option<(u32, u64)>> {
        Ok(match self.db.get(keys::counter("log-checkpoint"))? {
            Some(v) if v.len() == 12 => Some((
                u32::from_be_bytes(v[..4].try_into().unwrap_or([0; 4])),
                u64::from_be_bytes(v[4..].try_into().unwrap_or([0; 8])),
            )),
            _ => None,
        })
    }

    /// Records the intent log's replay start (made durable by the next flush).
    pub fn set_log_checkpoint(&self, pack: u32, offset: u64) -> Result<()> {
        let mut v = pack.to_be_bytes().to_vec();
        v.extend_from_slice(&offset.to_be_bytes());
        self.db.insert(keys::counter("log-checkpoint"), v)?;
        Ok(())
    }

    /// Bytes the metadata takes on disk.
    pub fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }

    /// Commits a batch atomically.
    pub fn commit(&self, batch: Batch) -> Result<()> {
        if !batch.ops.is_empty() {
            let mut b = sled::Batch::default();
            for (k, v) in batch.ops {
                match v {
                    Some(v) => b.insert(k, v),
                    None => b.remove(k),
                }
            }
            self.db.apply_batch(b)?;
        }
        self.note_unlogged(batch.unlogged);
        Ok(())
    }

    /// Commits a logged flush of a regular file (its record and its version: see
    /// [`Meta::put_inode_logged`]) as single writes in an order whose every prefix is
    /// safe after a crash, instead of one atomic batch: a sled batch writes and
    /// `sync_file_range`s its log buffer twice on sled's I/O threads (sled 0.34's
    /// `pin_log`), which was a fifth of the cost of an fsync. sled recovers a prefix of
    /// its log, so the order is what a crash can cut (the new block-map nodes' index
    /// entries were inserted before, by the block-map update):
    /// 1. the new record version (its nodes are named by their content and were
    ///    unreachable until now: garbage if cut before);
    /// 2. removals (older record versions no snapshot needs: the newest version is
    ///    already there);
    /// 3. the file version last. Cut before it, the durable version is still the one
    ///    the flush's log record replaces, so replay applies the record again over the
    ///    new record: its changes are absolute, the block map comes out the same.
    pub fn commit_logged(&self, batch: Batch) -> Result<()> {
        let (mut records, mut removals, mut versions) = (Vec::new(), Vec::new(), Vec::new());
        for (k, v) in batch.ops {
            match (k.first().copied(), v) {
                (_, None) => removals.push(k),
                (Some(keys::VERSION), Some(v)) => versions.push((k, v)),
                (_, Some(v)) => records.push((k, v)),
            }
        }
        for (k, v) in records {
            self.db.insert(k, v)?;
        }
        for k in removals {
            self.db.remove(k)?;
        }
        for (k, v) in versions {
            self.db.insert(k, v)?;
        }
        self.note_unlogged(batch.unlogged);
        Ok(())
    }

    fn note_unlogged(&self, inos: Vec<InodeNo>) {
        if !inos.is_empty() {
            let at = self.versions.flushes_started.load(Ordering::SeqCst);
            let mut unlogged = self.versions.unlogged.lock();
            for ino in inos {
                unlogged.insert(ino, at);
            }
        }
    }

    /// A new, never used inode number.
    pub fn new_ino(&self) -> Result<InodeNo> {
        // sled's ids are unique across restarts (it skips ahead after a crash).
        Ok(InodeNo(self.db.generate_id()? + 2))
    }

    /// The epoch live writes go to.
    pub fn epoch(&self) -> Epoch {
        Epoch(self.epoch.load(Ordering::SeqCst))
    }

    fn counter(&self, name: &str) -> Result<u64> {
        Ok(match self.db.get(keys::counter(name))? {
            Some(v) if v.len() == 8 => u64::from_be_bytes(v.as_ref().try_into().unwrap_or([0; 8])),
            _ => 0,
        })
    }

    // ---- versioned records ----

    /// The version of the record at `prefix` that `view` sees (`None`: absent or deleted).
    fn get_versioned(&self, prefix: &[u8], view: View) -> Result<Option<sled::IVec>> {
        let start = match view {
            View::Live => prefix.to_vec(),
            View::At(e) => keys::versioned(prefix, e),
        };
        let Some(item) = self.db.range(start..).next() else {
            return Ok(None);
        };
        let (k, v) = item?;
        if !k.starts_with(prefix) || k.len() != prefix.len() + keys::EPOCH_LEN {
            return Ok(None);
        }
        Ok(if v.first() == Some(&TOMBSTONE) {
            None
        } else {
            Some(v)
        })
    }

    /// Adds to `batch` the write of `value` (or the deletion, for `None`) of the record at
    /// `prefix` in the current epoch, dropping the previous version unless a snapshot
    /// still sees it.
    fn put_versioned(
        &self,
        batch: &mut Batch,
        prefix: &[u8],
        value: Option<Vec<u8>>,
    ) -> Result<()> {
        if batch.epoch_guard.is_none() {
            batch.epoch_guard = Some(self.epoch_gate.read_arc());
        }
        let now = self.epoch();
        let snaps = self.snapshots.read().unwrap_or_else(|p| p.into_inner());
        let mut older_kept = false;
        let mut seen_older = false;
        for item in self.db.scan_prefix(prefix) {
            let (k, v) = item?;
            if k.len() != prefix.len() + keys::EPOCH_LEN {
                continue;
            }
            let e = keys::epoch_of(&k);
            if e >= now {
                self.note_dropped(&k, v);
                batch.remove(k.to_vec());
                continue;
            }
            if !seen_older {
                seen_older = true;
                // The newest older version is seen by snapshots in [e, now).
                if snaps.range(e.0..now.0).next().is_some() {
                    older_kept = true;
                } else {
                    self.note_dropped(&k, v);
                    batch.remove(k.to_vec());
                }
            } else {
                older_kept = true;
                break;
            }
        }
        let key = keys::versioned(prefix, now);
        match value {
            Some(v) => batch.insert(key, v),
            None if older_kept => batch.insert(key, vec![TOMBSTONE]),
            None => {}
        }
        Ok(())
    }

    // ---- inodes ----

    /// The inode `ino` as `view` sees it.
    pub fn inode(&self, ino: InodeNo, view: View) -> Result<Option<Inode>> {
        match self.get_versioned(&keys::inode_prefix(ino), view)? {
            Some(v) => Ok(Some(records::decode(&v, &format!("inode {ino}"))?)),
            None => Ok(None),
        }
    }

    /// Adds the write of an inode record to `batch` (a regular file's gets a new version
    /// that no intent-log record names: see [`FileVersions`]).
    pub fn put_inode(&self, batch: &mut Batch, inode: &Inode) -> Result<()> {
        if inode.kind == FileKind::File {
            self.unlogged_write(batch, inode.ino, true);
        }
        self.put_inode_record(batch, inode)
    }

    /// Adds the write of a regular file's record at `version`, which an intent-log record
    /// names (the flush path).
    pub fn put_inode_logged(&self, batch: &mut Batch, inode: &Inode, version: u64) -> Result<()> {
        batch.insert(keys::version(inode.ino), version.to_be_bytes().to_vec());
        self.put_inode_record(batch, inode)
    }

    fn put_inode_record(&self, batch: &mut Batch, inode: &Inode) -> Result<()> {
        self.put_versioned(
            batch,
            &keys::inode_prefix(inode.ino),
            Some(records::encode(inode)),
        )
    }

    /// Adds the deletion of an inode record to `batch`.
    pub fn delete_inode(&self, batch: &mut Batch, ino: InodeNo) -> Result<()> {
        self.unlogged_write(batch, ino, false);
        self.put_versioned(batch, &keys::inode_prefix(ino), None)
    }

    /// Every inode record version (all views), for reachability scans.
    pub fn all_inode_versions(&self) -> impl Iterator<Item = Result<Inode>> + '_ {
        self.db
            .scan_prefix([keys::INODE])
            .filter_map(|item| match item {
                Err(e) => Some(Err(e.into())),
                Ok((_, v)) if v.first() == Some(&TOMBSTONE) => None,
                Ok((k, v)) => Some(records::decode(
                    &v,
                    &format!("inode {}", keys::inode_of(&k)),
                )),
            })
    }

    /// Every live inode.
    pub fn live_inodes(&self) -> impl Iterator<Item = Result<Inode>> + '_ {
        let mut last = None;
        self.db.scan_prefix([keys::INODE]).filter_map(move |item| {
            let (k, v) = match item {
                Ok(kv) => kv,
                Err(e) => return Some(Err(e.into())),
            };
            let ino = keys::inode_of(&k);
            if last == Some(ino) {
                return None; // an older version
            }
            last = Some(ino);
            if v.first() == Some(&TOMBSTONE) {
                return None;
            }
            Some(records::decode(&v, &format!("inode {ino}")))
        })
    }

    // ---- directory entries ----

    /// The entry `name` of directory `parent`.
    pub fn dirent(&self, parent: InodeNo, name: &[u8], view: View) -> Result<Option<DirEntry>> {
        match self.get_versioned(&keys::dirent_prefix(parent, name), view)? {
            Some(v) => Ok(Some(records::decode(&v, "directory entry")?)),
            None => Ok(None),
        }
    }

    /// Adds the write (or, for `None`, the removal) of a directory entry to `batch`.
    pub fn put_dirent(
        &self,
        batch: &mut Batch,
        parent: InodeNo,
        name: &[u8],
        entry: Option<&DirEntry>,
    ) -> Result<()> {
        self.put_versioned(
            batch,
            &keys::dirent_prefix(parent, name),
            entry.map(records::encode),
        )
    }

    /// The entries of directory `parent` as `view` sees them, in name order, starting
    /// after the name `after` (for paging).
    pub fn dir_entries(
        &self,
        parent: InodeNo,
        view: View,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, DirEntry)>> {
        let prefix = keys::dir_prefix(parent);
        let start = match after {
            // Skip every version of `after`: the next name sorts after `after\0\xff..`.
            Some(name) => {
                let mut k = keys::dirent_prefix(parent, name);
                k.extend_from_slice(&[0xff; keys::EPOCH_LEN + 1]);
                k
            }
            None => prefix.clone(),
        };
        let mut out = Vec::new();
        let mut current: Option<Vec<u8>> = None;
        let mut done_current = false;
        for item in self.db.range(start..) {
            let (k, v) = item?;
            if !k.starts_with(&prefix) {
                break;
            }
            let name = keys::dirent_name(&k);
            if current.as_deref() != Some(name) {
                if out.len() >= limit {
                    break;
                }
                current = Some(name.to_vec());
                done_current = false;
            }
            if done_current {
                continue;
            }
            if let View::At(e) = view {
                if keys::epoch_of(&k) > e {
                    continue;
                }
            }
            done_current = true;
            if v.first() != Some(&TOMBSTONE) {
                out.push((name.to_vec(), records::decode(&v, "directory entry")?));
            }
        }
        Ok(out)
    }

    /// Whether directory `parent` has any entry in the live view.
    pub fn dir_is_empty(&self, parent: InodeNo) -> Result<bool> {
        Ok(self.dir_entries(parent, View::Live, None, 1)?.is_empty())
    }

    // ---- location indexes (chunks, block-map nodes) and legacy nodes ----

    /// Where record `id` of `index` is stored.
    pub fn loc(&self, index: Index, id: &ChunkId) -> Result<Option<ChunkLoc>> {
        match buckets::get(&self.db, &self.buckets, index.tag(), id)? {
            Some(loc) => Ok(Some(loc)),
            // Absent, or a split raced the lookup: ask again with writers held off.
            None => {
                let _w = self.index_writes.lock();
                buckets::get(&self.db, &self.buckets, index.tag(), id)
            }
        }
    }

    /// Records where each of several records of `index` is stored.
    pub fn put_locs(&self, index: Index, locs: &[(ChunkId, ChunkLoc)]) -> Result<()> {
        let _w = self.index_writes.lock();
        buckets::put_many(&self.db, &self.buckets, index.tag(), locs)
    }

    /// Loads the keys of every index bucket into memory, so lookups read their bucket
    /// directly (see [`buckets::Directory`]). Returns false if `stop` ended it first.
    pub(crate) fn load_directory(&self, stop: &AtomicBool) -> Result<bool> {
        let tags: Vec<u8> = Index::ALL.iter().map(|i| i.tag()).collect();
        self.buckets.load(&self.db, &tags, stop)
    }

    /// Every entry of `index`, in name order.
    pub fn locs(&self, index: Index) -> impl Iterator<Item = Result<(ChunkId, ChunkLoc)>> + '_ {
        buckets::iter(&self.db, index.tag())
    }

    /// Moves the entries of a store written before format 6 (one sled key each) into
    /// buckets, in runs: each run is inserted before its old keys are removed, so a
    /// crash leaves every entry in one form or both, and the next open goes on.
    pub(crate) fn migrate_index_entries(&self) -> Result<u64> {
        let mut moved = 0u64;
        for index in Index::ALL {
            loop {
                let run: Vec<(sled::IVec, sled::IVec)> = self
                    .db
                    .scan_prefix([index.entry_tag()])
                    .take(4096)
                    .collect::<std::result::Result<_, _>>()?;
                if run.is_empty() {
                    break;
                }
                let mut locs = Vec::with_capacity(run.len());
                for (k, v) in &run {
                    let id = keys::hash_of(k);
                    let what = format!("index entry of {} {id}", index.what());
                    locs.push((id, records::decode::<ChunkLoc>(v, &what)?));
                }
                self.put_locs(index, &locs)?;
                let mut b = sled::Batch::default();
                for (k, _) in &run {
                    b.remove(k.clone());
                }
                self.db.apply_batch(b)?;
                moved += run.len() as u64;
            }
        }
        Ok(moved)
    }

    /// Where chunk `id` is stored.
    pub fn chunk_loc(&self, id: &ChunkId) -> Result<Option<ChunkLoc>> {
        self.loc(Index::Chunks, id)
    }

    /// Records where chunk `id` is stored (committed at once; the pack bytes are written).
    pub fn put_chunk_loc(&self, id: &ChunkId, loc: &ChunkLoc) -> Result<()> {
        self.put_locs(Index::Chunks, &[(*id, *loc)])
    }

    /// Removes the index entry of a chunk.
    pub fn remove_chunk_loc(&self, id: &ChunkId) -> Result<()> {
        self.remove_locs(Index::Chunks, &[*id])
    }

    /// Every chunk index entry.
    pub fn chunk_locs(&self) -> impl Iterator<Item = Result<(ChunkId, ChunkLoc)>> + '_ {
        self.locs(Index::Chunks)
    }

    /// Names of every entry of `index`.
    pub fn ids(&self, index: Index) -> impl Iterator<Item = Result<ChunkId>> + '_ {
        self.locs(index).map(|e| e.map(|(id, _)| id))
    }

    /// The bytes of block-map node `id` if the metadata itself holds them (stores made
    /// before format 5; newer nodes are in the packs, see [`Index::Nodes`]).
    pub fn legacy_node(&self, id: &ChunkId) -> Result<Option<Vec<u8>>> {
        Ok(self.db.get(keys::node(id))?.map(|v| v.to_vec()))
    }

    /// Tests: an index entry in its one-key form (formats up to 5), out of the buckets.
    #[cfg(test)]
    pub(crate) fn put_entry_form(&self, index: Index, id: &ChunkId, loc: &ChunkLoc) -> Result<()> {
        self.remove_locs(index, &[*id])?;
        self.db
            .insert(keys::hashed(index.entry_tag(), id), records::encode(loc))?;
        Ok(())
    }

    /// Tests: index entries still in their one-key form.
    #[cfg(test)]
    pub(crate) fn entry_form_count(&self) -> usize {
        Index::ALL
            .iter()
            .map(|i| self.db.scan_prefix([i.entry_tag()]).count())
            .sum()
    }

    /// Tests: stores node bytes in the metadata itself, as formats 2-4 did.
    #[cfg(test)]
    pub(crate) fn put_legacy_node(&self, id: &ChunkId, bytes: &[u8]) -> Result<()> {
        self.db.insert(keys::node(id), bytes)?;
        Ok(())
    }

    /// Every block-map node id held in the metadata itself (before format 5).
    pub fn legacy_node_ids(&self) -> impl Iterator<Item = Result<ChunkId>> + '_ {
        self.db
            .scan_prefix([keys::NODE])
            .keys()
            .map(|k| Ok(keys::hash_of(&k?)))
    }

    /// Names of every entry of both indexes (what the chunk store's presence filter holds).
    pub(crate) fn all_ids(&self) -> impl Iterator<Item = Result<ChunkId>> + '_ {
        self.ids(Index::Chunks).chain(self.ids(Index::Nodes))
    }

    // ---- GC support (crate::gc, crate::fsck) ----

    /// Records an inode version about to be dropped, if a collection is marking.
    fn note_dropped(&self, key: &[u8], value: sled::IVec) {
        if key.first() != Some(&keys::INODE) || value.first() == Some(&TOMBSTONE) {
            return;
        }
        if self.dropped.capturing.load(Ordering::SeqCst) {
            let mut v = self.dropped.values.lock();
            // Checked again under the lock: `take_dropped(true)` may have just stopped.
            if self.dropped.capturing.load(Ordering::SeqCst) {
                v.push(value);
            }
        }
    }

    /// Starts recording dropped inode versions (a collection's mark phase begins).
    pub(crate) fn capture_dropped(&self) {
        self.dropped.values.lock().clear();
        self.dropped.capturing.store(true, Ordering::SeqCst);
    }

    /// The inode versions dropped since the last call; with `stop`, recording ends
    /// atomically with the take, so nothing recorded is lost.
    pub(crate) fn take_dropped(&self, stop: bool) -> Result<Vec<Inode>> {
        let values = {
            let mut v = self.dropped.values.lock();
            if stop {
                self.dropped.capturing.store(false, Ordering::SeqCst);
            }
            std::mem::take(&mut *v)
        };
        values
            .iter()
            .map(|v| records::decode(v, "dropped inode version"))
            .collect()
    }

    /// Every inode version with its epoch and the epoch of the next newer version of the
    /// same inode (`None`: this is the newest, i.e. the live record). Tombstones are
    /// skipped but still count as the newer version of what they hide.
    pub fn inode_versions(&self) -> impl Iterator<Item = Result<InodeVersion>> + '_ {
        let mut last: Option<(InodeNo, Epoch)> = None;
        self.db.scan_prefix([keys::INODE]).filter_map(move |item| {
            let (k, v) = match item {
                Ok(kv) => kv,
                Err(e) => return Some(Err(e.into())),
            };
            let ino = keys::inode_of(&k);
            let epoch = keys::epoch_of(&k);
            let newer = match last {
                Some((i, e)) if i == ino => Some(e),
                _ => None,
            };
            last = Some((ino, epoch));
            if v.first() == Some(&TOMBSTONE) {
                return None;
            }
            Some(
                records::decode(&v, &format!("inode {ino}")).map(|inode| InodeVersion {
                    inode,
                    epoch,
                    newer,
                }),
            )
        })
    }

    /// Removes the entries of `ids` from `index`.
    pub(crate) fn remove_locs(&self, index: Index, ids: &[ChunkId]) -> Result<()> {
        let _w = self.index_writes.lock();
        for id in ids {
            buckets::update(&self.db, &self.buckets, index.tag(), id, |slot| {
                *slot = None
            })?;
        }
        Ok(())
    }

    /// Removes block-map nodes held in the metadata itself, in one atomic batch.
    pub(crate) fn remove_legacy_nodes(&self, ids: &[ChunkId]) -> Result<()> {
        let mut b = sled::Batch::default();
        for id in ids {
            b.remove(keys::node(id));
        }
        self.db.apply_batch(b)?;
        Ok(())
    }

    /// Points entry `id` of `index` at `new` if it still says `old` (compaction moves a
    /// record only if nothing changed it meanwhile). Returns whether it was replaced.
    pub(crate) fn replace_loc(
        &self,
        index: Index,
        id: &ChunkId,
        old: &ChunkLoc,
        new: &ChunkLoc,
    ) -> Result<bool> {
        let _w = self.index_writes.lock();
        buckets::update(&self.db, &self.buckets, index.tag(), id, |slot| {
            let swap = *slot == Some(*old);
            if swap {
                *slot = Some(*new);
            }
            swap
        })
    }

    // ---- orphans (unlinked while open) ----

    pub fn put_orphan(&self, batch: &mut Batch, ino: InodeNo) {
        batch.insert(keys::orphan(ino), Vec::new());
    }

    pub fn remove_orphan(&self, batch: &mut Batch, ino: InodeNo) {
        batch.remove(keys::orphan(ino));
    }

    pub fn orphans(&self) -> Result<Vec<InodeNo>> {
        let mut out = Vec::new();
        for item in self.db.scan_prefix([keys::ORPHAN]) {
            let (k, _) = item?;
            let mut b = [0u8; 8];
            b.copy_from_slice(&k[1..9]);
            out.push(InodeNo(u64::from_be_bytes(b)));
        }
        Ok(out)
    }

    // ---- snapshots ----

    /// Freezes the current epoch as snapshot `name`; live writes continue in the next
    /// epoch. The caller excludes concurrent commits of versioned records.
    pub fn create_snapshot(&self, name: &str, created: Timestamp) -> Result<SnapshotRecord> {
        let _frozen = self.epoch_gate.write();
        if self.db.get(keys::snapshot(name.as_bytes()))?.is_some() {
            return Err(FsError::Exists);
        }
        let epoch = self.epoch();
        let index = self.counter("snapshot_index")? + 1;
        if index >= 1 << 15 {
            return Err(FsError::NoSpace("no snapshot numbers left".into()));
        }
        let rec = SnapshotRecord {
            name: name.to_string(),
            epoch: epoch.0,
            index: index as u32,
            created,
        };
        let mut b = sled::Batch::default();
        b.insert(keys::snapshot(name.as_bytes()), records::encode(&rec));
        b.insert(keys::counter("snapshot_index"), &index.to_be_bytes());
        b.insert(keys::counter("epoch"), &(epoch.0 + 1).to_be_bytes());
        self.db.apply_batch(b)?;
        self.snapshots
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(epoch.0);
        self.epoch.store(epoch.0 + 1, Ordering::SeqCst);
        Ok(rec)
    }

    /// The snapshot called `name`.
    pub fn snapshot(&self, name: &[u8]) -> Result<Option<SnapshotRecord>> {
        match self.db.get(keys::snapshot(name))? {
            Some(v) => Ok(Some(records::decode(&v, "snapshot record")?)),
            None => Ok(None),
        }
    }

    /// Removes snapshot `name` and drops the record versions only it could see.
    pub fn delete_snapshot(&self, name: &[u8]) -> Result<SnapshotRecord> {
        let rec = self.snapshot(name)?.ok_or(FsError::NotFound)?;
        self.db.remove(keys::snapshot(name))?;
        self.snapshots
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&rec.epoch);
        self.sweep_versions()?;
        Ok(rec)
    }

    /// Drops every record version no snapshot and not the live tree can see.
    pub fn sweep_versions(&self) -> Result<u64> {
        let snaps = self
            .snapshots
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let now = self.epoch();
        let mut removed = 0;
        for tag in [keys::INODE, keys::DIRENT] {
            let mut batch = sled::Batch::default();
            // The versions of one record, newest first.
            let mut group: Vec<(sled::IVec, sled::IVec)> = Vec::new();
            let mut flush_group = |group: &mut Vec<(sled::IVec, sled::IVec)>,
                                   batch: &mut sled::Batch| {
                // A version is seen by snapshots s with epoch <= s < the next newer one.
                let mut newer = now.0 + 1;
                let mut keep: Vec<bool> = Vec::with_capacity(group.len());
                for (k, _) in group.iter() {
                    let e = keys::epoch_of(k).0;
                    keep.push(snaps.range(e..newer).next().is_some());
                    newer = e;
                }
                // The newest version is the live one. A live record stays; a live
                // tombstone stays while it still hides an older version someone sees.
                if let Some((_, v)) = group.first() {
                    let older_kept = keep.iter().skip(1).any(|k| *k);
                    keep[0] = v.first() != Some(&TOMBSTONE) || older_kept;
                }
                for ((k, v), kept) in group.drain(..).zip(keep) {
                    if !kept {
                        self.note_dropped(&k, v);
                        batch.remove(k.to_vec());
                        removed += 1;
                    }
                }
            };
            for item in self.db.scan_prefix([tag]) {
                let (k, v) = item?;
                let same = group
                    .first()
                    .map(|(g, _)| {
                        g.len() == k.len()
                            && g[..g.len() - keys::EPOCH_LEN] == k[..k.len() - keys::EPOCH_LEN]
                    })
                    .unwrap_or(true);
                if !same {
                    flush_group(&mut group, &mut batch);
                }
                group.push((k, v));
            }
            flush_group(&mut group, &mut batch);
            self.db.apply_batch(batch)?;
        }
        Ok(removed)
    }

    /// Adds to `batch` what makes the live tree equal to snapshot epoch `at`: every
    /// versioned record takes the value `at` sees (absent records are deleted).
    pub fn rollback_batch(&self, at: Epoch, batch: &mut Batch) -> Result<()> {
        for tag in [keys::INODE, keys::DIRENT] {
            let mut last: Option<Vec<u8>> = None;
            for item in self.db.scan_prefix([tag]) {
                let (k, _) = item?;
                let prefix = k[..k.len() - keys::EPOCH_LEN].to_vec();
                if last.as_ref() == Some(&prefix) {
                    continue;
                }
                let mut then = self.get_versioned(&prefix, View::At(at))?;
                // An inode the snapshot saw unlinked but open has no name and no handle
                // after the rollback: it is not brought back.
                if tag == keys::INODE {
                    if let Some(v) = &then {
                        let inode: Inode = records::decode(v, "inode")?;
                        if inode.nlink == 0 {
                            then = None;
                        }
                    }
                }
                let nowv = self.get_versioned(&prefix, View::Live)?;
                if then != nowv {
                    if tag == keys::INODE {
                        // Not through the intent log: a new version breaks the chain of
                        // the file's log records.
                        self.unlogged_write(batch, keys::inode_of(&k), then.is_some());
                    }
                    self.put_versioned(batch, &prefix, then.map(|v| v.to_vec()))?;
                }
                last = Some(prefix);
            }
        }
        Ok(())
    }

    /// Inode records as snapshot epoch `at` sees them.
    pub fn inodes_at(&self, at: Epoch) -> Result<Vec<Inode>> {
        let mut out = Vec::new();
        let mut last = None;
        for item in self.db.scan_prefix([keys::INODE]) {
            let (k, _) = item?;
            let ino = keys::inode_of(&k);
            if last == Some(ino) {
                continue;
            }
            last = Some(ino);
            if let Some(i) = self.inode(ino, View::At(at))? {
                out.push(i);
            }
        }
        Ok(out)
    }

    /// Every snapshot record, by name.
    pub fn snapshots(&self) -> Result<Vec<SnapshotRecord>> {
        let mut out = Vec::new();
        for item in self.db.scan_prefix([keys::SNAPSHOT]) {
            let (_, v) = item?;
            out.push(records::decode(&v, "snapshot record")?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> (tempfile::TempDir, Meta) {
        let dir = tempfile::tempdir().unwrap();
        let m = Meta::open(&dir.path().join("meta")).unwrap();
        (dir, m)
    }

    #[test]
    fn one_version_without_snapshots() {
        let (_d, m) = meta();
        let mut inode = Inode::new(InodeNo(5), FileKind::File, 0o644, 0, 0, InodeNo::ROOT);
        for size in 0..3 {
            inode.size = size;
            let mut b = Batch::default();
            m.put_inode(&mut b, &inode).unwrap();
            m.commit(b).unwrap();
        }
        assert_eq!(m.inode(InodeNo(5), View::Live).unwrap().unwrap().size, 2);
        assert_eq!(m.all_inode_versions().count(), 1);
        let mut b = Batch::default();
        m.delete_inode(&mut b, InodeNo(5)).unwrap();
        m.commit(b).unwrap();
        assert!(m.inode(InodeNo(5), View::Live).unwrap().is_none());
        assert_eq!(
            m.db.scan_prefix([keys::INODE]).count(),
            0,
            "no tombstone without snapshots"
        );
    }

    #[test]
    fn dir_entries_page_and_skip_deleted() {
        let (_d, m) = meta();
        let e = DirEntry {
            ino: InodeNo(9),
            kind: FileKind::File,
        };
        let mut b = Batch::default();
        for name in ["a", "b", "c", "d"] {
            m.put_dirent(&mut b, InodeNo::ROOT, name.as_bytes(), Some(&e))
                .unwrap();
        }
        m.commit(b).unwrap();
        let mut b = Batch::default();
        m.put_dirent(&mut b, InodeNo::ROOT, b"b", None).unwrap();
        m.commit(b).unwrap();
        let all: Vec<_> = m.dir_entries(InodeNo::ROOT, View::Live, None, 100).unwrap();
        let names: Vec<_> = all.iter().map(|(n, _)| n.clone()).collect();
        assert_eq!(names, vec![b"a".to_vec(), b"c".to_vec(), b"d".to_vec()]);
        let page = m
            .dir_entries(InodeNo::ROOT, View::Live, Some(b"a"), 1)
            .unwrap();
        assert_eq!(page[0].0, b"c".to_vec());
    }
}

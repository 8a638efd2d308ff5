//! The datastore: a POSIX-shaped filesystem over the metadata store, block maps and chunk
//! store, with no FUSE in it. The FUSE adapter, the CLI and the tests all drive it through
//! the `&self` methods of [`Datastore`].
//!
//! # In-memory inode state
//! An inode that is open, or has dirty data, lives in `inodes` as an [`InodeState`]: its
//! latest attributes, its committed block-map root, and a write-back buffer of dirty
//! blocks. While it is there it is the authority over its record; sled holds the last
//! committed version.
//!
//! # Locking
//! - `ns` (a mutex) serializes namespace changes: create, link, unlink, rename, setattr by
//!   path, clone, eviction of cached states. Data operations (read, write, fsync) on open
//!   inodes do not take it, so VMs writing different images never wait on each other.
//! - Each cached inode has a `RwLock`. Any operation that puts an inode record into a batch
//!   holds that inode's write lock until the batch is committed, so a concurrent flush can
//!   never be overwritten by an older record.
//! - Lock order: `ns`, then inode locks in ascending inode number; a data operation holds
//!   at most one inode lock at a time.

mod clone;
mod durable;
mod io;
mod journal;
pub mod namespace;
mod prestore;
pub mod snapshot;
mod stats;

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use dashmap::DashMap;
use parking_lot::{Mutex, RwLock};

use crate::blockmap::BlockMaps;
use crate::chunk::ChunkStore;
use crate::config::StoreConfig;
use crate::error::{FsError, Result};
use crate::gc::Pins;
use crate::ids::{ChunkId, InodeNo};
use crate::meta::{Batch, FileKind, Inode, Meta, Timestamp, View};

pub use io::Whence;
pub use stats::{Stats, Usage};

type StateRef = Arc<RwLock<InodeState>>;
type StateGuard = parking_lot::lock_api::ArcRwLockWriteGuard<parking_lot::RawRwLock, InodeState>;

/// Longest file name accepted.
pub const NAME_MAX: usize = 255;
/// Largest file size accepted (64 PiB): block indexes stay far below the tree's limit.
pub const MAX_FILE_SIZE: u64 = 1 << 56;
/// Dirty bytes one inode may buffer before its writer flushes inline. (128 MiB made
/// random 4 KiB writes ~10% faster, fewer flushes each rewriting most of a large file's
/// map leaves, but raised the daemon's RSS after ingest by ~65 MiB: issue 6 note.)
const INODE_DIRTY_LIMIT: usize = 64 << 20;
/// Dirty bytes all inodes together may buffer.
const TOTAL_DIRTY_LIMIT: i64 = 512 << 20;

/// Options for [`Datastore::open`].
#[derive(Clone, Debug, Default)]
pub struct OpenOptions {
    /// Do not start the background flusher (tests that want full control).
    pub no_background: bool,
    /// Name of the snapshot directory (default: the store's, `.snapshots`).
    pub snapshot_dir: Option<String>,
    /// List the snapshot directory in the root's listing (NFS re-export of snapshots:
    /// the kernel reconnects evicted directories by reading their parent's listing).
    pub snapshot_dir_visible: bool,
    /// Bytes of metadata (sled) cache (default: [`crate::meta::DEFAULT_CACHE`]).
    pub meta_cache: Option<u64>,
}

/// One dirty block in a write-back buffer.
#[derive(Clone)]
struct Dirty {
    /// The block's new content; `None` is a hole. For a block written only in part
    /// (`partial`), the written bytes; the rest is the committed content's.
    data: Option<Arc<[u8]>>,
    /// A block written only in part whose committed content has not been read yet.
    partial: Option<Arc<Partial>>,
    /// Whether the committed map has data at this block.
    was_data: bool,
    /// The data's chunk name, once hashed (by a pre-store worker or the flush).
    hash: Arc<std::sync::OnceLock<ChunkId>>,
    /// Handed to the pre-store workers.
    queued: bool,
    /// Held by a log record of written bytes (journal.rs).
    logged: bool,
}

/// A block written only in part, over committed content that is read later (by a
/// pre-store worker, a read of the block, or the flush), not on the write path: a 4 KiB
/// write into a 16 KiB block does not wait for a read of the other 12 KiB. Some written
/// byte is not zero, so the merged block is data, never a hole.
struct Partial {
    /// The block's committed content.
    base: ChunkId,
    /// Byte ranges of the dirty data that were written: sorted, disjoint, not adjacent.
    ranges: Vec<(usize, usize)>,
    /// The whole new content, once the base has been read.
    merged: std::sync::OnceLock<Arc<[u8]>>,
}

/// Partly written blocks with more separate written ranges than this are merged at once.
const PARTIAL_RANGES_MAX: usize = 32;

impl Partial {
    /// `ranges` plus `[from, to)`, merged.
    fn with_range(ranges: &[(usize, usize)], from: usize, to: usize) -> Vec<(usize, usize)> {
        let mut all = ranges.to_vec();
        all.push((from, to));
        all.sort_unstable();
        let mut out: Vec<(usize, usize)> = Vec::with_capacity(all.len());
        for (a, b) in all {
            match out.last_mut() {
                Some((_, end)) if a <= *end => *end = (*end).max(b),
                _ => out.push((a, b)),
            }
        }
        out
    }

    /// The whole content: `base` (the committed block) with the written ranges of
    /// `data` over it. Stored in `merged` and returned.
    fn merge(&self, data: &[u8], base: &[u8]) -> Arc<[u8]> {
        self.merged
            .get_or_init(|| {
                let mut block = base.to_vec();
                block.resize(data.len(), 0);
                for &(a, b) in &self.ranges {
                    block[a..b].copy_from_slice(&data[a..b]);
                }
                block.into()
            })
            .clone()
    }
}

impl Dirty {
    /// The block's whole new content if it is known without a read (`None`: a hole, or
    /// a partly written block not merged yet).
    fn content(&self) -> Option<&Arc<[u8]>> {
        match &self.partial {
            Some(p) => p.merged.get(),
            None => self.data.as_ref(),
        }
    }

    /// A partly written block whose committed content is still to be read.
    fn unmerged(&self) -> Option<&Arc<Partial>> {
        self.partial.as_ref().filter(|p| p.merged.get().is_none())
    }
}

/// The in-memory state of a cached inode.
pub struct InodeState {
    inode: Inode,
    dirty: BTreeMap<u64, Dirty>,
    dirty_bytes: usize,
    /// Dirty bytes not yet handed to the pre-store workers.
    unqueued_bytes: usize,
    /// Attributes differ from the committed record.
    attr_dirty: bool,
    /// Open file handles.
    open: u32,
    /// Where the last read through the mount ended: a read starting near it is taken for
    /// sequential (`Datastore::read`).
    read_end: AtomicU64,
}

impl InodeState {
    fn new(inode: Inode) -> Self {
        InodeState {
            inode,
            dirty: BTreeMap::new(),
            dirty_bytes: 0,
            unqueued_bytes: 0,
            attr_dirty: false,
            open: 0,
            read_end: AtomicU64::new(0),
        }
    }

    fn is_clean(&self) -> bool {
        self.dirty.is_empty() && !self.attr_dirty
    }

    /// Data blocks counting the write-back buffer.
    fn data_blocks(&self) -> u64 {
        let mut n = self.inode.data_blocks() as i64;
        for d in self.dirty.values() {
            n += d.data.is_some() as i64 - d.was_data as i64;
        }
        n.max(0) as u64
    }
}

/// Attributes of an inode as the adapter reports them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attr {
    pub ino: InodeNo,
    pub kind: FileKind,
    pub perm: u16,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
    pub size: u64,
    /// Allocated 512-byte units: only stored (non-hole) blocks count.
    pub blocks: u64,
    pub atime: Timestamp,
    pub mtime: Timestamp,
    pub ctime: Timestamp,
    pub crtime: Timestamp,
    pub blksize: u32,
}

/// Changes requested by setattr.
#[derive(Clone, Debug, Default)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<Timestamp>,
    pub mtime: Option<Timestamp>,
    pub ctime: Option<Timestamp>,
    /// The caller's gid when it may not keep set-ID bits (no CAP_FSETID): a truncate
    /// clears them.
    pub caller_gid: Option<u32>,
}

/// What a write, truncate, fallocate, copy into or chown of a regular file does to its
/// privileges, as Linux does for local filesystems (the kernel leaves it to the
/// filesystem, see `FUSE_HANDLE_KILLPRIV_V2` in fuse.rs): the file capability goes;
/// when `setid`, set-user-ID goes, and set-group-ID with group execute or when
/// `caller_gid` (a caller without CAP_FSETID) is not the file's group. Returns whether
/// anything changed.
fn drop_privileges(inode: &mut Inode, setid: bool, caller_gid: Option<u32>) -> bool {
    if inode.kind != FileKind::File {
        return false;
    }
    let mut changed = inode.xattrs.remove(&b"security.capability"[..]).is_some();
    if setid {
        let mut clear = libc::S_ISUID as u16;
        if inode.perm & libc::S_IXGRP as u16 != 0 || caller_gid.is_some_and(|g| g != inode.gid) {
            clear |= libc::S_ISGID as u16;
        }
        changed |= inode.perm & clear != 0;
        inode.perm &= !clear;
    }
    changed
}

/// Space figures for statfs.
#[derive(Clone, Debug)]
pub struct FsStat {
    pub block_size: u32,
    pub blocks: u64,
    pub blocks_free: u64,
    pub blocks_avail: u64,
    pub files: u64,
    pub files_free: u64,
}

/// A mounted (or opened) thinfs store.
pub struct Datastore {
    root: PathBuf,
    cfg: StoreConfig,
    meta: Arc<Meta>,
    chunks: Arc<ChunkStore>,
    maps: BlockMaps,
    inodes: DashMap<InodeNo, StateRef>,
    ns: Mutex<()>,
    dirty_total: AtomicI64,
    /// Flushes hold it shared from storing chunks to committing the record that
    /// references them; a garbage collection takes it exclusively to start pinning.
    gc_gate: RwLock<()>,
    /// Keeps the disk from filling up under sled.
    space: crate::space::SpaceGuard,
    /// Name of the snapshot directory at the root.
    snapdir: Vec<u8>,
    /// Whether the root's listing shows it.
    snapdir_visible: bool,
    pins: Arc<Pins>,
    /// Held for the life of the datastore: one daemon per store.
    _lock: File,
    stop: Arc<AtomicBool>,
    /// Concurrent fsyncs share durability barriers.
    group_sync: durable::GroupSync,
    /// Workers that hash and store dirty blocks ahead of their flush.
    prestore: prestore::Prestore,
    /// Files whose dirty data a log record of written bytes holds, with the append
    /// position before their oldest such record (journal.rs).
    log_pending: Mutex<std::collections::HashMap<InodeNo, (u32, u64)>>,
    /// Files whose last log record may be lost (a sync of the packs failed after it):
    /// their fsyncs run a full barrier until one has succeeded (io.rs, fsync).
    log_broken: Mutex<HashSet<InodeNo>>,
    /// Tests: runs once in copy_file_range after the source was flushed and its size read.
    #[cfg(test)]
    after_copy_source_read: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl Datastore {
    /// Creates a new store in `path` (created if missing; must be empty otherwise).
    pub fn mkfs(path: &Path, block_size: u32) -> Result<()> {
        Self::mkfs_with(path, StoreConfig::new(block_size)?)
    }

    /// Creates a new store with the given configuration.
    pub fn mkfs_with(path: &Path, cfg: StoreConfig) -> Result<()> {
        snapshot::check_snapshot_name(&cfg.snapshot_dir)?;
        if StoreConfig::path(path).exists() {
            return Err(FsError::Invalid(format!(
                "{} is already a thinfs store",
                path.display()
            )));
        }
        match std::fs::read_dir(path) {
            Ok(mut rd) => {
                if rd.next().is_some() {
                    return Err(FsError::Invalid(format!(
                        "{} is not empty and not a thinfs store; refusing to touch it",
                        path.display()
                    )));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(path)
                    .map_err(|e| FsError::io(format!("creating {}", path.display()), e))?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => {
                return Err(FsError::Invalid(format!(
                    "{} is not a directory",
                    path.display()
                )));
            }
            Err(e) => return Err(FsError::io(format!("reading {}", path.display()), e)),
        }
        for sub in ["meta", "packs"] {
            let p = path.join(sub);
            std::fs::create_dir(&p)
                .map_err(|e| FsError::io(format!("creating {}", p.display()), e))?;
        }
        {
            let meta = Meta::open(&path.join("meta"))?;
            // SAFETY: geteuid/getegid have no preconditions.
            let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
            let root = Inode::new(InodeNo::ROOT, FileKind::Dir, 0o755, uid, gid, InodeNo::ROOT);
            let mut b = Batch::default();
            meta.put_inode(&mut b, &root)?;
            meta.commit(b)?;
            meta.flush()?;
        }
        // The identity file last: a store is a store only once it is complete.
        cfg.save(path)
    }

    /// Opens the store at `path`, taking its lock.
    pub fn open(path: &Path, opts: &OpenOptions) -> Result<Arc<Datastore>> {
        let cfg = StoreConfig::load(path)?;
        let snapdir = opts
            .snapshot_dir
            .clone()
            .unwrap_or_else(|| cfg.snapshot_dir.clone())
            .into_bytes();
        snapshot::check_snapshot_name(&String::from_utf8_lossy(&snapdir))?;
        let lock = lock_store(path)?;
        let mut cfg = cfg;
        if crate::config::UPGRADES_FROM.contains(&cfg.format_version) {
            // Before anything is written: this build's packs carry log records and
            // block-map nodes that an older build would not read.
            cfg.format_version = crate::config::FORMAT_VERSION;
            cfg.save(path)?;
        }
        let cache = opts.meta_cache.unwrap_or(crate::meta::DEFAULT_CACHE);
        let meta = Arc::new(Meta::open_with_cache(&path.join("meta"), cache)?);
        if meta.inode(InodeNo::ROOT, View::Live)?.is_none() {
            return Err(FsError::Meta(format!(
                "store {} has no root directory",
                path.display()
            )));
        }
        let moved = meta.migrate_index_entries()?;
        if moved > 0 {
            meta.flush()?;
            tracing::info!(
                "moved {moved} index entries of {} into buckets",
                path.display()
            );
        }
        let pins = Arc::new(Pins::default());
        let chunks = Arc::new(ChunkStore::open(
            &path.join("packs"),
            meta.clone(),
            pins.clone(),
        )?);
        let ds = Arc::new(Datastore {
            root: path.to_path_buf(),
            maps: BlockMaps::new(chunks.clone(), meta.clone()),
            gc_gate: RwLock::new(()),
            space: crate::space::SpaceGuard::new(path.to_path_buf()),
            snapdir,
            snapdir_visible: opts.snapshot_dir_visible,
            pins,
            cfg,
            meta,
            chunks,
            inodes: DashMap::new(),
            ns: Mutex::new(()),
            dirty_total: AtomicI64::new(0),
            _lock: lock,
            stop: Arc::new(AtomicBool::new(false)),
            group_sync: durable::GroupSync::default(),
            prestore: prestore::Prestore::idle(),
            log_pending: Mutex::default(),
            log_broken: Mutex::default(),
            #[cfg(test)]
            after_copy_source_read: Mutex::default(),
        });
        ds.replay_log()?;
        ds.drop_orphans()?;
        if !opts.no_background {
            spawn_flusher(&ds);
            prestore::Prestore::start(&ds);
        }
        Ok(ds)
    }

    /// The store's configuration.
    pub fn config(&self) -> &StoreConfig {
        &self.cfg
    }

    /// The store directory.
    pub fn path(&self) -> &Path {
        &self.root
    }

    /// Logical block size.
    pub fn block_size(&self) -> u64 {
        self.cfg.block_size as u64
    }

    pub(crate) fn meta(&self) -> &Meta {
        &self.meta
    }

    pub(crate) fn maps(&self) -> &BlockMaps {
        &self.maps
    }

    pub(crate) fn chunks(&self) -> &ChunkStore {
        &self.chunks
    }

    /// Starts pinning for a garbage collection, after in-flight flushes have committed.
    pub(crate) fn gc_begin(&self) {
        let _gate = self.gc_gate.write();
        self.pins.begin();
    }

    /// Stops pinning.
    pub(crate) fn gc_end(&self) {
        self.pins.end();
    }

    /// Flushes every dirty inode and makes everything durable.
    pub fn sync_all(&self) -> Result<()> {
        let states: Vec<StateRef> = self.inodes.iter().map(|e| e.value().clone()).collect();
        let mut first_err = None;
        for st in states {
            let mut g = st.write();
            if let Err(e) = self.flush_state(&mut g) {
                first_err.get_or_insert(e);
            }
        }
        self.barrier()?;
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Flushes everything and stops background work (unmount).
    pub fn shutdown(&self) -> Result<()> {
        self.stop.store(true, Ordering::SeqCst);
        self.prestore.stop();
        self.sync_all()
    }

    // ---- inode state cache ----

    /// The cached state of `ino`, loading it from the live tree if needed.
    fn state(&self, ino: InodeNo) -> Result<StateRef> {
        if let Some(s) = self.inodes.get(&ino) {
            return Ok(s.clone());
        }
        let inode = self.meta.inode(ino, View::Live)?.ok_or(FsError::NotFound)?;
        Ok(self
            .inodes
            .entry(ino)
            .or_insert_with(|| Arc::new(RwLock::new(InodeState::new(inode))))
            .clone())
    }

    /// The write-locked state of `ino`.
    fn lock(&self, ino: InodeNo) -> Result<StateGuard> {
        Ok(self.state(ino)?.write_arc())
    }

    /// Write-locks several inodes in ascending order (duplicates collapse), for a
    /// namespace change that writes their records: logged writes are flushed first
    /// (see [`Datastore::settle`]).
    fn lock_many(&self, inos: &[InodeNo]) -> Result<BTreeMap<InodeNo, StateGuard>> {
        let set: std::collections::BTreeSet<InodeNo> = inos.iter().copied().collect();
        let mut out = BTreeMap::new();
        for ino in set {
            let mut g = self.lock(ino)?;
            self.settle(&mut g)?;
            out.insert(ino, g);
        }
        Ok(out)
    }

    /// Drops cached states that are closed and clean. Called with `ns` held.
    fn evict(&self, inos: &[InodeNo]) {
        for ino in inos {
            self.inodes.remove_if(ino, |_, st| match st.try_read() {
                Some(g) => g.open == 0 && g.is_clean() && Arc::strong_count(st) == 1,
                None => false,
            });
        }
    }

    /// The latest inode record of `ino` (cached state first).
    fn inode(&self, ino: InodeNo) -> Result<Inode> {
        if let Some(s) = self.inodes.get(&ino).map(|s| s.clone()) {
            return Ok(s.read().inode.clone());
        }
        self.meta.inode(ino, View::Live)?.ok_or(FsError::NotFound)
    }

    fn attr_of(&self, st: &InodeState) -> Attr {
        let i = &st.inode;
        let blocks = st.data_blocks() * self.block_size() / 512;
        attr_from(i, blocks, self.cfg.block_size)
    }

    /// Attributes of `ino`.
    pub fn getattr(&self, ino: InodeNo) -> Result<Attr> {
        if let Some(s) = self.inodes.get(&ino).map(|s| s.clone()) {
            return Ok(self.attr_of(&s.read()));
        }
        let i = self.meta.inode(ino, View::Live)?.ok_or(FsError::NotFound)?;
        Ok(attr_from(
            &i,
            i.data_blocks() * self.block_size() / 512,
            self.cfg.block_size,
        ))
    }

    /// Adds the state's record to `batch` and marks its attributes clean.
    fn put_state(&self, batch: &mut Batch, st: &mut InodeState) -> Result<()> {
        debug_assert!(
            !self.has_logged_writes(st.inode.ino),
            "inode {} has logged writes: settle it before writing its record",
            st.inode.ino
        );
        self.meta.put_inode(batch, &st.inode)?;
        st.attr_dirty = false;
        Ok(())
    }

    /// Removes inodes that were unlinked while open when the daemon died.
    fn drop_orphans(&self) -> Result<()> {
        for ino in self.meta.orphans()? {
            let mut b = Batch::default();
            if let Some(i) = self.meta.inode(ino, View::Live)? {
                if i.nlink == 0 {
                    self.meta.delete_inode(&mut b, ino)?;
                }
            }
            self.meta.remove_orphan(&mut b, ino);
            self.meta.commit(b)?;
        }
        Ok(())
    }

    /// Space figures of the store's disk.
    pub fn statfs(&self) -> Result<FsStat> {
        let st = fs4::statvfs(&self.root)
            .map_err(|e| FsError::io(format!("statvfs {}", self.root.display()), e))?;
        let bs = self.cfg.block_size as u64;
        let used = self.used_bytes();
        let avail = self.space.available();
        Ok(FsStat {
            block_size: self.cfg.block_size,
            blocks: (used + avail) / bs,
            blocks_free: st.free_space() / bs,
            blocks_avail: avail / bs,
            files: u32::MAX as u64,
            files_free: u32::MAX as u64 / 2,
        })
    }

    /// Bytes the store occupies: packs plus metadata.
    pub fn used_bytes(&self) -> u64 {
        dir_bytes(&self.root.join("packs")) + self.meta.size_on_disk()
    }

    /// Every chunk id and node reachable from any inode version (live or snapshot).
    pub fn reachable(&self) -> Result<(HashSet<ChunkId>, HashSet<ChunkId>)> {
        let mut nodes = HashSet::new();
        let mut chunks = HashSet::new();
        for inode in self.meta.all_inode_versions() {
            self.maps.walk(inode?.map, &mut nodes, &mut |c| {
                chunks.insert(*c);
            })?;
        }
        Ok((chunks, nodes))
    }
}

impl Drop for Datastore {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.prestore.stop();
        if let Err(e) = self.sync_all() {
            tracing::error!("flushing {} on close: {e}", self.root.display());
        }
    }
}

fn attr_from(i: &Inode, blocks: u64, blksize: u32) -> Attr {
    Attr {
        ino: i.ino,
        kind: i.kind,
        perm: i.perm,
        nlink: i.nlink,
        uid: i.uid,
        gid: i.gid,
        rdev: i.rdev,
        size: if i.kind == FileKind::Symlink {
            i.target.len() as u64
        } else {
            i.size
        },
        blocks,
        atime: i.atime,
        mtime: i.mtime,
        ctime: i.ctime,
        crtime: i.crtime,
        blksize,
    }
}

/// Takes the store's exclusive lock, or explains who holds it.
fn lock_store(path: &Path) -> Result<File> {
    use fs4::fs_std::FileExt;
    use std::io::{Read, Seek, Write};
    let p = path.join("lock");
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&p)
        .map_err(|e| FsError::io(format!("opening {}", p.display()), e))?;
    match f.try_lock_exclusive() {
        Ok(true) => {}
        Ok(false) => {
            let mut pid = String::new();
            let _ = f.read_to_string(&mut pid);
            return Err(FsError::Busy(format!(
                "store {} is in use by another thinfs process (pid {})",
                path.display(),
                pid.trim()
            )));
        }
        Err(e) => return Err(FsError::io(format!("locking {}", p.display()), e)),
    }
    let _ = f.set_len(0);
    let _ = f.rewind();
    let _ = write!(f, "{}", std::process::id());
    Ok(f)
}

/// CPUs this process may use, looked up once (std reads cgroup files for it: not
/// something to repeat on every flush).
fn cpus() -> usize {
    static CPUS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CPUS.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Total size of the regular files directly in `dir`.
pub fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Flushes dirty inodes in the background (every 2 s) and syncs, so unsynced data is lost
/// only within a short window on a crash.
fn spawn_flusher(ds: &Arc<Datastore>) {
    let weak = Arc::downgrade(ds);
    let stop = ds.stop.clone();
    let spawned = std::thread::Builder::new()
        .name("thinfs-flush".into())
        .spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                for _ in 0..20 {
                    std::thread::sleep(std::time::Duration::from_millis(100));
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                }
                let Some(ds) = weak.upgrade() else { return };
                if let Err(e) = ds.sync_all() {
                    tracing::warn!("background flush: {e}");
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("cannot start the background flusher: {e}");
    }
}

impl Datastore {
    /// Makes committed namespace changes durable (fsyncdir).
    pub fn sync_metadata(&self) -> Result<()> {
        self.barrier()
    }

    /// Makes everything committed so far durable: the packs first, then the metadata
    /// that references them (sled persists only here, see meta.rs). Concurrent callers
    /// share one barrier (group commit). Running the two flushes in parallel was
    /// measured: no gain on this ext4 (both wait for the same journal), so the order is
    /// kept.
    pub(crate) fn barrier(&self) -> Result<()> {
        self.group_sync.sync(|| {
            // Every logged flush before this position is committed: after the metadata
            // flush below it need not be replayed.
            let (pack, offset) = self.checkpoint();
            // Appends wait during the metadata flush (see `sync_then`).
            self.chunks.sync_then(|| {
                self.meta.set_log_checkpoint(pack, offset)?;
                self.meta.flush()
            })
        })
    }
}

/// Helpers for the unit tests of the datastore's modules.
#[cfg(test)]
pub(crate) mod testing {
    use std::path::PathBuf;
    use std::sync::Arc;

    use super::namespace::Creator;
    use super::{Datastore, OpenOptions};
    use crate::ids::InodeNo;

    pub const WHO: Creator = Creator { uid: 0, gid: 0 };

    /// Open options without background threads (tests drive every flush).
    pub fn opts() -> OpenOptions {
        OpenOptions {
            no_background: true,
            ..Default::default()
        }
    }

    /// A fresh store of `block_size` in a temp dir, opened, with one empty regular file
    /// `name` at the root.
    pub fn store_with_file(
        block_size: u32,
        name: &str,
    ) -> (tempfile::TempDir, PathBuf, Arc<Datastore>, InodeNo) {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("s");
        Datastore::mkfs(&store, block_size).unwrap();
        let ds = Datastore::open(&store, &opts()).unwrap();
        let f = ds
            .create(InodeNo::ROOT, name.as_bytes(), 0o644, WHO)
            .unwrap()
            .ino;
        (dir, store, ds, f)
    }
}

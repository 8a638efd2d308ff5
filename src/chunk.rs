//! The content-addressed chunk store.
//!
//! A chunk is one non-zero logical block of some file, named by its BLAKE3 hash and stored
//! once however many files (clones, snapshots) contain it. Bytes go to append-only pack
//! files ([`pack`]); the index `hash -> (pack, offset, len)` lives in the metadata store.
//!
//! Invariants:
//! - An index entry is inserted only after its record is written to the pack. A
//!   durability barrier syncs the packs ([`ChunkStore::sync`]) together with the
//!   metadata flush; sled also persists on its own schedule, so after a power loss an
//!   index entry may name a record that did not reach the disk: the read check below
//!   turns that into EIO (and scrub/fsck name it), never into wrong data.
//! - Every read is verified against the chunk's name; a mismatch is [`FsError::Corrupt`],
//!   never wrong data.

pub mod filter;
pub mod pack;

use std::collections::BTreeSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use dashmap::DashMap;

use crate::cache::TwoGenCache;
use crate::error::{FsError, Result};
use crate::gc::Pins;
use crate::ids::ChunkId;
use crate::meta::{ChunkLoc, Index, Meta};
use filter::Presence;
use pack::ActivePack;

/// Packs are rotated once they reach this size.
pub const PACK_TARGET: u64 = 64 << 20;
/// Longest stretch of a pack [`ChunkStore::get_many`] reads with one `pread`.
const READ_RUN: u64 = 4 << 20;
/// How a reader of [`ChunkStore::get_many`] goes through a file, as far as it can tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Access {
    /// On from where its last read ended: the kernel's readahead of the packs pays.
    Sequential,
    /// Anywhere: a record read alone is read without readahead. Records read back to back
    /// after it (a run) are still read with readahead.
    Random,
}

/// Chunk and node locations per generation of the read-path location cache (two
/// generations, ~60 bytes an entry: at most ~15 MiB; 2^18 entries map 4 GiB of 16 KiB
/// chunks). A miss is one index lookup.
const LOC_CACHE_GENERATION: usize = 1 << 17;

/// The chunk store of one datastore.
pub struct ChunkStore {
    dir: PathBuf,
    meta: Arc<Meta>,
    /// Open packs, one handle per pack and kind of access: the kernel keeps readahead
    /// state per handle, and a `Random` handle has readahead off (`POSIX_FADV_RANDOM`).
    readers: DashMap<(u32, Access), Arc<File>>,
    /// Lock order: `active` before `unsynced`.
    active: Mutex<ActivePack>,
    /// Packs appended to since the last sync.
    unsynced: Mutex<BTreeSet<u32>>,
    /// A pack file was created since the last sync: the directory needs a sync too.
    dir_unsynced: AtomicBool,
    /// Held for the whole of a sync.
    sync_lock: Mutex<()>,
    /// Tests: syncs that made at least one pack durable.
    #[cfg(test)]
    syncs: std::sync::atomic::AtomicU64,
    /// Tests: the next sync fails as a device error would.
    #[cfg(test)]
    pub(crate) fail_next_sync: AtomicBool,
    /// Tests: reads of [`ChunkStore::read_loc`] left to return a flipped byte, as a stale
    /// cached page would.
    #[cfg(test)]
    stale_reads: std::sync::atomic::AtomicU32,
    /// Tests: bytes [`ChunkStore::get_many`] read from packs.
    #[cfg(test)]
    read_bytes: std::sync::atomic::AtomicU64,
    /// Chunks stored or deduplicated against during a garbage collection.
    pins: Arc<Pins>,
    /// Which names the two indexes may hold (spares the index lookup of a new chunk or node).
    presence: Arc<Presence>,
    /// Where chunks were last seen, for reads only: every read is verified and a read
    /// that fails at a cached place asks the index. Never used to decide that the store
    /// has a chunk (a collection may have removed it since).
    locs: TwoGenCache<ChunkId, ChunkLoc>,
    /// The build of `presence` started at open (joined by GC's rebuild and on drop).
    builder: Mutex<Option<JoinHandle<()>>>,
    /// Tells the background build to stop (set on drop).
    stop: Arc<AtomicBool>,
}

impl ChunkStore {
    /// Opens the packs in `dir` and starts a new pack for this session's appends.
    pub fn open(dir: &Path, meta: Arc<Meta>, pins: Arc<Pins>) -> Result<ChunkStore> {
        let next = pack::list_packs(dir)?.last().map(|id| id + 1).unwrap_or(0);
        let active = ActivePack::create(dir, next)?;
        let readers = DashMap::new();
        readers.insert((active.id, Access::Sequential), active.file.clone());
        Ok(ChunkStore {
            dir: dir.to_path_buf(),
            meta,
            readers,
            active: Mutex::new(active),
            unsynced: Mutex::new(BTreeSet::new()),
            dir_unsynced: AtomicBool::new(true),
            sync_lock: Mutex::new(()),
            #[cfg(test)]
            syncs: Default::default(),
            #[cfg(test)]
            fail_next_sync: AtomicBool::new(false),
            #[cfg(test)]
            stale_reads: Default::default(),
            #[cfg(test)]
            read_bytes: Default::default(),
            pins,
            presence: Arc::default(),
            locs: TwoGenCache::new(LOC_CACHE_GENERATION),
            builder: Mutex::new(None),
            stop: Arc::default(),
        })
        .inspect(|cs| cs.build_filter_in_background())
    }

    /// Loads the index's bucket directory and builds the presence filter from the index
    /// on a thread (at open: nothing else builds yet; until it is done every name is
    /// "maybe", and lookups scan for their bucket).
    fn build_filter_in_background(&self) {
        let fresh = self.begin_rebuild();
        let (meta, presence, stop) = (self.meta.clone(), self.presence.clone(), self.stop.clone());
        let spawned = std::thread::Builder::new()
            .name("thinfs-filter".into())
            .spawn(move || {
                if let Err(e) = presence.finish_rebuild(fresh, meta.all_ids(), &stop) {
                    tracing::warn!(
                        "chunk filter: index scan failed ({e}); every store looks the chunk up"
                    );
                }
                // Then the index's bucket keys: from then on a lookup is one point read.
                if let Err(e) = meta.load_directory(&stop) {
                    tracing::warn!("index directory: scan failed ({e}); lookups scan sled");
                }
            });
        match spawned {
            Ok(h) => *self.builder.lock().unwrap_or_else(|p| p.into_inner()) = Some(h),
            Err(e) => {
                self.presence.abandon_rebuild();
                tracing::warn!("cannot start the chunk filter build: {e}");
            }
        }
    }

    /// A fresh filter (allocated before the append lock is taken) that collects
    /// insertions from now on, sized for twice the names the packs would hold in 16 KiB
    /// chunks (it grows by layers beyond that).
    fn begin_rebuild(&self) -> Arc<filter::Bloom> {
        let fresh = Arc::new(filter::Bloom::with_capacity(self.packs_bytes() / 8192));
        let _appends = self.active.lock().unwrap_or_else(|p| p.into_inner());
        self.presence.begin_rebuild(&fresh);
        fresh
    }

    /// Rebuilds the presence filter now (after a collection removed index entries, whose
    /// bits would otherwise stay set).
    pub(crate) fn rebuild_filter(&self) -> Result<()> {
        // One build at a time: a second would take the insertions the first one needs.
        let mut builder = self.builder.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = builder.take() {
            let _ = h.join();
        }
        let fresh = self.begin_rebuild();
        self.presence
            .finish_rebuild(fresh, self.meta.all_ids(), &self.stop)?;
        Ok(())
    }

    /// Memory the presence filter takes, in bytes.
    pub fn filter_bytes(&self) -> usize {
        self.presence.bytes()
    }

    /// Records a found copy of a record of `index` (fsck's repair, intent-log replay).
    pub(crate) fn restore_loc(&self, index: Index, id: &ChunkId, loc: &ChunkLoc) -> Result<()> {
        let _appends = self.active.lock().unwrap_or_else(|p| p.into_inner());
        self.presence.insert(id);
        self.locs.remove(id);
        self.meta.put_locs(index, &[(*id, *loc)])
    }

    /// Drops cached locations of chunks a collection removed or moved.
    pub(crate) fn forget_locs<'a>(&self, ids: impl IntoIterator<Item = &'a ChunkId>) {
        for id in ids {
            self.locs.remove(id);
        }
    }

    /// Where record `id` of `index` is, for a read: the location cache (shared by both
    /// indexes: a name is the hash of the bytes, so any copy it finds is the right one),
    /// else the index.
    fn read_place(&self, index: Index, id: &ChunkId) -> Result<Option<ChunkLoc>> {
        if let Some(loc) = self.locs.get(id) {
            return Ok(Some(loc));
        }
        let loc = self.meta.loc(index, id)?;
        if let Some(loc) = loc {
            self.locs.insert(*id, loc);
        }
        Ok(loc)
    }

    /// Stores `data` unless a chunk of the same content exists; returns its name.
    pub fn put(&self, data: &[u8]) -> Result<ChunkId> {
        let id = ChunkId::of(data);
        self.put_hashed(id, data)?;
        Ok(id)
    }

    /// Stores `data`, already hashed to `id`. Returns whether new bytes were written.
    pub fn put_hashed(&self, id: ChunkId, data: &[u8]) -> Result<bool> {
        Ok(self.put_many(&[(id, data)])? > 0)
    }

    /// Creates the pack after `prev` for appends (taking over its staging buffer); the
    /// next sync also syncs the directory.
    fn new_pack(&self, prev: &mut ActivePack) -> Result<ActivePack> {
        let mut pack = ActivePack::create(&self.dir, prev.id + 1)?;
        pack.take_stage(prev);
        self.dir_unsynced.store(true, Ordering::SeqCst);
        self.readers
            .insert((pack.id, Access::Sequential), pack.file.clone());
        Ok(pack)
    }

    /// Stores several chunks, already hashed, skipping those the store has: the new
    /// records go to the pack in one write per pack and their index entries in one
    /// metadata batch. Returns how many were new.
    pub fn put_many(&self, chunks: &[(ChunkId, &[u8])]) -> Result<usize> {
        self.put_in(Index::Chunks, chunks)
    }

    /// Stores block-map nodes (named by the hash of their encoding) like chunks, under
    /// the node index. Returns how many were new.
    pub(crate) fn put_nodes(&self, nodes: &[(ChunkId, &[u8])]) -> Result<usize> {
        self.put_in(Index::Nodes, nodes)
    }

    /// Whether `index` holds `id` (the presence filter, over the names of both indexes,
    /// spares the lookup of a new name).
    fn maybe_has(&self, index: Index, id: &ChunkId) -> Result<bool> {
        Ok(self.presence.may_contain(id) && self.meta.loc(index, id)?.is_some())
    }

    fn put_in(&self, index: Index, chunks: &[(ChunkId, &[u8])]) -> Result<usize> {
        let mut new: Vec<(ChunkId, &[u8])> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for &(id, data) in chunks {
            // Pinned first: a collection deciding this record's fate now must keep it.
            self.pins.pin(&id);
            if seen.insert(id) && !self.maybe_has(index, &id)? {
                new.push((id, data));
            }
        }
        if new.is_empty() {
            return Ok(0);
        }
        let mut active = self.active.lock().unwrap_or_else(|p| p.into_inner());
        let mut locs = Vec::with_capacity(new.len());
        let mut group: Vec<(ChunkId, &[u8])> = Vec::new();
        let mut group_len = 0u64;
        for (id, data) in new {
            // Checked again under the lock: another writer may have stored it meanwhile
            // (and then set its filter bits under this lock).
            if self.maybe_has(index, &id)? {
                continue;
            }
            let rec_len = pack::HEADER_LEN + data.len() as u64;
            if !group.is_empty() && active.len + group_len + rec_len > PACK_TARGET {
                locs.extend(self.append_group_locked(&mut active, index, &group)?);
                group.clear();
                group_len = 0;
            }
            group.push((id, data));
            group_len += rec_len;
        }
        if !group.is_empty() {
            locs.extend(self.append_group_locked(&mut active, index, &group)?);
        }
        for (id, loc) in &locs {
            self.presence.insert(id);
            self.locs.insert(*id, *loc);
        }
        self.meta.put_locs(index, &locs)?;
        Ok(locs.len())
    }

    /// Appends records to the active pack in one write (rotating it first when full); the
    /// caller holds `active`. The pack is listed for the next [`ChunkStore::sync`].
    fn append_group_locked(
        &self,
        active: &mut ActivePack,
        index: Index,
        group: &[(ChunkId, &[u8])],
    ) -> Result<Vec<(ChunkId, ChunkLoc)>> {
        if active.len >= PACK_TARGET {
            let next = self.new_pack(active)?;
            *active = next;
        }
        let offsets = active.append_many(pack::Kind::of(index), group)?;
        self.unsynced
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(active.id);
        Ok(group
            .iter()
            .zip(offsets)
            .map(|(&(id, data), offset)| {
                let loc = ChunkLoc {
                    pack: active.id,
                    offset,
                    len: data.len() as u32,
                };
                (id, loc)
            })
            .collect())
    }

    /// Reads and verifies chunk `id`.
    pub fn get(&self, id: &ChunkId) -> Result<Vec<u8>> {
        self.get_in(Index::Chunks, id)?
            .ok_or_else(|| FsError::Corrupt {
                chunk: *id,
                detail: "referenced but missing from the index".into(),
            })
    }

    /// Reads and verifies record `id` of `index`; `None` if the index has no entry.
    pub(crate) fn get_in(&self, index: Index, id: &ChunkId) -> Result<Option<Vec<u8>>> {
        let Some(loc) = self.read_place(index, id)? else {
            return Ok(None);
        };
        match self.read_loc(id, &loc) {
            Ok(data) => Ok(Some(data)),
            Err(e) => {
                // GC compaction may have moved the record and deleted its old pack since
                // the location was looked up or cached: retry where the index says, once.
                self.locs.remove(id);
                match self.meta.loc(index, id)? {
                    Some(now) if now != loc => {
                        let data = self.read_loc(id, &now)?;
                        self.locs.insert(*id, now);
                        Ok(Some(data))
                    }
                    _ => Err(e),
                }
            }
        }
    }

    /// Reads and verifies several chunks, calling `visit(i, data)` for `ids[i]` in order.
    ///
    /// The chunks of a sequentially written file lie back to back in one pack, so only the
    /// first of such a run is looked up: the run is read from its header on in growing
    /// windows (up to [`READ_RUN`] bytes each) and walked header by header, and the place of
    /// the record after it is cached for the next request. For [`Access::Random`] the first
    /// record of each run is read without readahead. Each record found is taken only if
    /// its header names the chunk wanted and its bytes hash to that name, so a wrong guess
    /// costs a read, never wrong data. A chunk not found that way is looked up (through the
    /// location cache and index) and read alone with [`Self::get`], which retries at a
    /// location GC compaction moved it to.
    pub fn get_many(
        &self,
        ids: &[ChunkId],
        access: Access,
        visit: &mut dyn FnMut(usize, &[u8]) -> Result<()>,
    ) -> Result<()> {
        let mut i = 0;
        while i < ids.len() {
            let Some(first) = self.read_place(Index::Chunks, &ids[i])? else {
                visit(i, &self.get(&ids[i])?)?;
                i += 1;
                continue;
            };
            // Read from this record's header on in windows of records of this size, 1 at
            // first and doubling while each window holds only records wanted (so a file
            // whose blocks interleave with another's reads at most about twice what it
            // uses), each to the header after its last record.
            let rec = pack::HEADER_LEN + first.len as u64;
            let mut from = first.offset.checked_sub(pack::HEADER_LEN);
            let (start, mut window) = (i, 1u64);
            while let Some(off) = from {
                // A random reader's first record alone, without readahead.
                let handle = if window == 1 {
                    access
                } else {
                    Access::Sequential
                };
                let Ok(f) = self.reader_for(first.pack, handle) else {
                    break;
                };
                let span = (rec * window.min((ids.len() - i) as u64)).min(READ_RUN);
                let run = pack::read_upto(&f, off, (span + pack::HEADER_LEN) as usize)
                    .unwrap_or_default();
                #[cfg(test)]
                self.read_bytes
                    .fetch_add(run.len() as u64, Ordering::Relaxed);
                let (before, mut at) = (i, 0);
                while i < ids.len() {
                    match pack::chunk_record(&run[at..], &ids[i]) {
                        Some(data) if ChunkId::of(data) == ids[i] => {
                            visit(i, data)?;
                            at += pack::HEADER_LEN as usize + data.len();
                            i += 1;
                        }
                        _ => break,
                    }
                }
                if i == ids.len() {
                    // A run, so likely a sequential reader: hint where its next request starts.
                    if i - start > 1 {
                        self.hint_next(first.pack, off + at as u64, &run[at..], first.len);
                    }
                    break;
                }
                // On only if the window ended at a record of the next chunk.
                if i == before || pack::names(&run[at..], &ids[i]).is_none() {
                    break;
                }
                from = Some(off + at as u64);
                window *= 2;
            }
            if i == start {
                // Not where the place said: read where the index says now.
                visit(i, &self.get(&ids[i])?)?;
                i += 1;
            }
        }
        Ok(())
    }

    /// Caches where the chunk record whose header starts `header` (at `offset` of pack
    /// `pack`) is, when a sequential reader's next request likely starts there: the next
    /// request then needs no index lookup either. Only a record no longer than the run's
    /// (`max_len`) and a name not cached already (a cached place came from the index).
    fn hint_next(&self, pack: u32, offset: u64, header: &[u8], max_len: u32) {
        let Some((name, len)) = pack::chunk_header(header) else {
            return;
        };
        if len as u64 <= max_len as u64 && !self.locs.contains(&name) {
            let offset = offset + pack::HEADER_LEN;
            let len = len as u32;
            self.locs.insert(name, ChunkLoc { pack, offset, len });
        }
    }

    /// Reads the bytes at `loc` and checks they hash to `id`. Bytes that do not are read
    /// once more from the disk, past the page cache's copy: a page a reader cached while
    /// a direct write went over it could otherwise fail every read until evicted
    /// (`pack::ActivePack::write_at_end` keeps direct writes off pages holding records).
    pub fn read_loc(&self, id: &ChunkId, loc: &ChunkLoc) -> Result<Vec<u8>> {
        let file = self.reader(loc.pack).map_err(|e| match e {
            // Out of file handles, say: not damage.
            FsError::Io { ref source, .. } if source.kind() != std::io::ErrorKind::NotFound => e,
            e => FsError::Corrupt {
                chunk: *id,
                detail: format!("pack {} unreadable: {e}", loc.pack),
            },
        })?;
        let read = || -> Result<Vec<u8>> {
            let data = pack::read_at(&file, loc.offset, loc.len as usize).map_err(|e| {
                FsError::Corrupt {
                    chunk: *id,
                    detail: format!(
                        "pack {} offset {} length {}: {e}",
                        loc.pack, loc.offset, loc.len
                    ),
                }
            })?;
            #[cfg(test)]
            let data = self.stale(data);
            Ok(data)
        };
        let mut data = read()?;
        if ChunkId::of(&data) != *id {
            // The page cache's clean copy dropped: the next read goes to the disk.
            pack::advise(&file, loc.offset, loc.len as u64, libc::POSIX_FADV_DONTNEED);
            data = read()?;
        }
        if ChunkId::of(&data) != *id {
            return Err(FsError::Corrupt {
                chunk: *id,
                detail: format!(
                    "hash mismatch in pack {} at offset {}",
                    loc.pack, loc.offset
                ),
            });
        }
        Ok(data)
    }

    /// Tests: `data` with its first byte flipped while `stale_reads` counts down.
    #[cfg(test)]
    fn stale(&self, mut data: Vec<u8>) -> Vec<u8> {
        let left = |n: u32| n.checked_sub(1);
        if self
            .stale_reads
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, left)
            .is_ok()
        {
            if let Some(b) = data.first_mut() {
                *b ^= 1;
            }
        }
        data
    }

    fn reader(&self, pack_id: u32) -> Result<Arc<File>> {
        self.reader_for(pack_id, Access::Sequential)
    }

    /// An open handle on pack `pack_id` for reads of kind `access`.
    fn reader_for(&self, pack_id: u32, access: Access) -> Result<Arc<File>> {
        if let Some(f) = self.readers.get(&(pack_id, access)) {
            return Ok(f.clone());
        }
        let path = pack::pack_path(&self.dir, pack_id);
        let f =
            File::open(&path).map_err(|e| FsError::io(format!("opening {}", path.display()), e))?;
        if access == Access::Random {
            // Without it, a read landing next to pages earlier reads left cached looks
            // sequential to the kernel, which then reads ahead (in large folios): 23-24 KiB
            // read from the disk per 16 KiB record instead of 16-17.
            pack::advise(&f, 0, 0, libc::POSIX_FADV_RANDOM);
        }
        let f = Arc::new(f);
        self.readers.insert((pack_id, access), f.clone());
        // A pack deleted (`remove_pack`) between the open and the insert would keep its
        // space allocated through this cached handle: not cached then.
        if !path.exists() {
            self.readers.remove(&(pack_id, access));
        }
        Ok(f)
    }

    /// Closes the cached handles on pack `id`.
    fn forget_readers(&self, id: u32) {
        self.readers.remove(&(id, Access::Sequential));
        self.readers.remove(&(id, Access::Random));
    }

    /// Makes every appended record durable. Callers are serialized, so a sync that
    /// returns has seen every pack appended to before it started become durable (not
    /// merely taken off the list by a concurrent sync still in progress).
    pub fn sync(&self) -> Result<()> {
        let _one_at_a_time = self.sync_lock.lock().unwrap_or_else(|p| p.into_inner());
        self.zero_ahead(&mut self.active.lock().unwrap_or_else(|p| p.into_inner()));
        self.sync_listed()
    }

    /// Makes every appended record durable, then runs `then` (the metadata flush of a
    /// barrier) with appends held off, so that `then` cannot make durable an index entry
    /// or an inode record naming a record appended after the packs were synced: without
    /// it, a flush committing between the two steps of a barrier had its metadata made
    /// durable and its new chunks and block-map nodes not (a power cut then lost a node
    /// a durable root names: the whole file). Appends wait for `then` (one sled flush).
    pub(crate) fn sync_then(&self, then: impl FnOnce() -> Result<()>) -> Result<()> {
        let _one_at_a_time = self.sync_lock.lock().unwrap_or_else(|p| p.into_inner());
        // Sync without blocking appends (twice at most, while appends keep coming), then
        // whatever is left with appends held off: usually nothing.
        for _ in 0..2 {
            if self.all_synced() {
                break;
            }
            self.zero_ahead(&mut self.active.lock().unwrap_or_else(|p| p.into_inner()));
            self.sync_listed()?;
        }
        let mut active = self.active.lock().unwrap_or_else(|p| p.into_inner());
        self.zero_ahead(&mut active);
        self.sync_listed()?;
        then()
    }

    /// Nothing appended since the last sync, and no pack file created.
    fn all_synced(&self) -> bool {
        self.unsynced
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
            && !self.dir_unsynced.load(Ordering::SeqCst)
    }

    /// Zeros ahead of the active pack's end before it is synced (see
    /// [`ActivePack::zero_ahead`]); the caller holds `active`.
    fn zero_ahead(&self, active: &mut ActivePack) {
        let appended = self
            .unsynced
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&active.id);
        if appended {
            active.zero_ahead();
        }
    }

    /// Syncs the packs listed as appended to (and the directory if a pack was created);
    /// the caller holds `sync_lock`.
    fn sync_listed(&self) -> Result<()> {
        let packs: Vec<u32> =
            std::mem::take(&mut *self.unsynced.lock().unwrap_or_else(|p| p.into_inner()))
                .into_iter()
                .collect();
        #[cfg(test)]
        if !packs.is_empty() {
            self.syncs.fetch_add(1, Ordering::Relaxed);
        }
        #[cfg(test)]
        if self.fail_next_sync.swap(false, Ordering::SeqCst) {
            self.unsynced
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(packs.iter().copied());
            return Err(FsError::io(
                "syncing packs (test)".to_string(),
                std::io::Error::from_raw_os_error(libc::EIO),
            ));
        }
        for (i, id) in packs.iter().enumerate() {
            let synced = self.reader(*id).and_then(|f| {
                f.sync_data()
                    .map_err(|e| FsError::io(format!("syncing pack {id}"), e))
            });
            if let Err(e) = synced {
                // Keep this pack and the ones not reached listed: the next sync retries.
                self.unsynced
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .extend(packs[i..].iter().copied());
                return Err(e);
            }
        }
        // New pack files must have durable directory entries too.
        if self.dir_unsynced.swap(false, Ordering::SeqCst) {
            let synced = File::open(&self.dir).and_then(|d| d.sync_all());
            if let Err(e) = synced {
                self.dir_unsynced.store(true, Ordering::SeqCst);
                return Err(FsError::io(format!("syncing {}", self.dir.display()), e));
            }
        }
        Ok(())
    }

    /// Appends an intent-log record of `kind` (`fs/journal.rs`) to the active pack; it is
    /// durable after the next [`ChunkStore::sync`].
    pub(crate) fn append_log(&self, kind: pack::Kind, payload: &[u8]) -> Result<()> {
        let mut active = self.active.lock().unwrap_or_else(|p| p.into_inner());
        if active.len >= PACK_TARGET {
            let next = self.new_pack(&mut active)?;
            *active = next;
        }
        active.append_log(kind, payload)?;
        self.unsynced
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(active.id);
        Ok(())
    }

    /// Where the next record goes: (active pack, offset). Every chunk appended before has
    /// its index entry (inserted under the same lock).
    pub(crate) fn append_position(&self) -> (u32, u64) {
        let active = self.active.lock().unwrap_or_else(|p| p.into_inner());
        (active.id, active.len)
    }

    /// Every well-formed record from `(pack, offset)` on, in append order, as
    /// (kind, hash, location); not verified (see [`ChunkStore::read_loc`]).
    pub(crate) fn records_since(
        &self,
        (from_pack, from_offset): (u32, u64),
    ) -> Result<Vec<(pack::Kind, ChunkId, ChunkLoc)>> {
        let mut out = Vec::new();
        for id in pack::list_packs(&self.dir)? {
            if id < from_pack {
                continue;
            }
            let from = if id == from_pack { from_offset } else { 0 };
            let (entries, _) = pack::scan_entries(&pack::pack_path(&self.dir, id), from)?;
            out.extend(entries.into_iter().map(|(kind, rec)| {
                let loc = ChunkLoc {
                    pack: id,
                    offset: rec.offset,
                    len: rec.len,
                };
                (kind, rec.id, loc)
            }));
        }
        Ok(out)
    }

    /// Syncs so far that made at least one pack durable (tests).
    #[cfg(test)]
    pub(crate) fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::Relaxed)
    }

    /// Makes packs `ids` durable with the next [`ChunkStore::sync`] (records a crashed
    /// daemon appended may be only in the page cache).
    pub(crate) fn mark_unsynced(&self, ids: impl IntoIterator<Item = u32>) {
        self.unsynced
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(ids);
    }

    /// Size of pack `id` in records (the active pack's zeros ahead not counted).
    pub fn pack_size(&self, id: u32) -> std::io::Result<u64> {
        let active = self.active.lock().unwrap_or_else(|p| p.into_inner());
        let size = std::fs::metadata(pack::pack_path(&self.dir, id))?.len();
        Ok(if active.id == id {
            size.saturating_sub(active.zero_tail())
        } else {
            size
        })
    }

    /// Bytes of all pack files (the active pack's zeros ahead not counted).
    pub fn packs_bytes(&self) -> u64 {
        let tail = self
            .active
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .zero_tail();
        crate::fs::dir_bytes(&self.dir).saturating_sub(tail)
    }

    /// The pack directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    // ---- GC support (crate::gc) ----

    /// The pins shared with the block maps and the datastore.
    pub(crate) fn pins(&self) -> &Pins {
        &self.pins
    }

    /// The pack new records go to. It and every later pack are never compacted.
    pub(crate) fn active_pack(&self) -> u32 {
        self.active.lock().unwrap_or_else(|p| p.into_inner()).id
    }

    /// Starts a new active pack so that the current one, `(id, size)`, can be compacted.
    /// `None` if the active pack is empty. Every record in the sealed pack already has its
    /// index entry: `put_hashed` inserts it before releasing the active lock.
    pub(crate) fn seal_active(&self) -> Result<Option<(u32, u64)>> {
        let mut active = self.active.lock().unwrap_or_else(|p| p.into_inner());
        if active.len == 0 {
            return Ok(None);
        }
        let next = self.new_pack(&mut active)?;
        let old = std::mem::replace(&mut *active, next);
        Ok(Some((old.id, old.len)))
    }

    /// Appends a copy of record `id` of `index` (already verified `data`) to the active
    /// pack without touching the index; compaction syncs, then repoints the index entry
    /// ([`Meta::replace_loc`]).
    pub(crate) fn append_copy(&self, index: Index, id: &ChunkId, data: &[u8]) -> Result<ChunkLoc> {
        let mut active = self.active.lock().unwrap_or_else(|p| p.into_inner());
        let mut locs = self.append_group_locked(&mut active, index, &[(*id, data)])?;
        Ok(locs.remove(0).1)
    }

    /// Deletes pack `id` (never the active one); returns its size. The caller has made
    /// durable an index in which no entry points into it. A reader that still holds the
    /// open file keeps reading it; a reader that looks it up again retries ([`ChunkStore::get`]).
    pub(crate) fn remove_pack(&self, id: u32) -> Result<u64> {
        // The active pack id only grows, so a pack below it is never appended to again.
        if id >= self.active_pack() {
            return Err(FsError::Invalid(format!("pack {id} is in use")));
        }
        let path = pack::pack_path(&self.dir, id);
        let size = std::fs::metadata(&path)
            .map_err(|e| FsError::io(format!("stat {}", path.display()), e))?
            .len();
        self.forget_readers(id);
        self.unsynced
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        std::fs::remove_file(&path)
            .map_err(|e| FsError::io(format!("deleting {}", path.display()), e))?;
        // Again: a reader that opened the file just before the unlink may have cached it,
        // and a cached handle would keep the deleted pack's space allocated.
        self.forget_readers(id);
        if let Ok(d) = File::open(&self.dir) {
            let _ = d.sync_all();
        }
        Ok(size)
    }
}

impl Drop for ChunkStore {
    fn drop(&mut self) {
        // The build thread holds the metadata store open: end it before the store closes.
        self.stop.store(true, Ordering::Relaxed);
        let builder = self.builder.get_mut().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = builder.take() {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh store in a temp dir: the dir, its metadata and its chunk store.
    fn new_store() -> (tempfile::TempDir, Arc<Meta>, ChunkStore) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("packs")).unwrap();
        let meta = Arc::new(Meta::open(&dir.path().join("meta")).unwrap());
        let cs = reopen(&dir, &meta);
        (dir, meta, cs)
    }

    /// The chunk store of `dir` opened again (cold caches).
    fn reopen(dir: &tempfile::TempDir, meta: &Arc<Meta>) -> ChunkStore {
        ChunkStore::open(&dir.path().join("packs"), meta.clone(), Arc::default()).unwrap()
    }

    /// Stores `n` distinct 4 KiB blocks back to back with one `put_many`, synced: the
    /// blocks, their names and how many were new.
    fn store_blocks(cs: &ChunkStore, n: u8) -> (Vec<Vec<u8>>, Vec<ChunkId>, usize) {
        let blocks: Vec<Vec<u8>> = (0..n).map(|i| vec![i + 1; 4096]).collect();
        let ids: Vec<ChunkId> = blocks.iter().map(|b| ChunkId::of(b)).collect();
        let recs: Vec<(ChunkId, &[u8])> =
            ids.iter().zip(&blocks).map(|(i, b)| (*i, &b[..])).collect();
        let new = cs.put_many(&recs).unwrap();
        cs.sync().unwrap();
        (blocks, ids, new)
    }

    #[test]
    fn stores_once_and_verifies() {
        let (dir, meta, cs) = new_store();
        let a = vec![7u8; 4096];
        let id = cs.put(&a).unwrap();
        assert!(!cs.put_hashed(id, &a).unwrap(), "second put is a dedup hit");
        assert_eq!(cs.get(&id).unwrap(), a);
        cs.sync().unwrap();
        // Flip a byte of the stored data: reads must fail, naming the chunk.
        let loc = meta.chunk_loc(&id).unwrap().unwrap();
        let path = pack::pack_path(cs.dir(), loc.pack);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[loc.offset as usize + 10] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        let cs2 = ChunkStore::open(&dir.path().join("packs"), meta, Arc::default()).unwrap();
        let err = cs2.get(&id).unwrap_err();
        assert!(matches!(err, FsError::Corrupt { .. }), "{err}");
        let (recs, _) = pack::scan(&path).unwrap();
        assert_eq!(recs.len(), 1);
    }

    /// A random reader's lone records go through the pack handle without readahead, the
    /// rest of a run through the one with it; both give the same bytes as a sequential read.
    #[test]
    fn random_access_reads_lone_records_through_their_own_handle() {
        let (dir, meta, cs) = new_store();
        let (blocks, ids, _) = store_blocks(&cs, 6);
        let read = |cs: &ChunkStore, want: &[usize], access| {
            let mut seen = Vec::new();
            let ask: Vec<ChunkId> = want.iter().map(|&i| ids[i]).collect();
            cs.get_many(&ask, access, &mut |i, d| {
                seen.push((i, d.to_vec()));
                Ok(())
            })
            .unwrap();
            let expect: Vec<(usize, Vec<u8>)> = want
                .iter()
                .enumerate()
                .map(|(k, &i)| (k, blocks[i].clone()))
                .collect();
            assert_eq!(seen, expect, "{want:?} {access:?}");
        };
        let pack = meta.chunk_loc(&ids[0]).unwrap().unwrap().pack;
        let handles = |cs: &ChunkStore| {
            [Access::Sequential, Access::Random].map(|a| cs.readers.contains_key(&(pack, a)))
        };

        let cs1 = reopen(&dir, &meta);
        read(&cs1, &[4], Access::Random);
        assert_eq!(handles(&cs1), [false, true], "a lone record: no readahead");
        read(&cs1, &[1, 2, 3, 5, 0], Access::Random);
        assert_eq!(
            handles(&cs1),
            [true, true],
            "the run after 1: with readahead"
        );
        let cs2 = reopen(&dir, &meta);
        read(&cs2, &[5, 0, 3], Access::Sequential);
        assert_eq!(handles(&cs2), [true, false]);
        // Dropping the pack's handles drops both kinds.
        cs1.forget_readers(pack);
        assert_eq!(handles(&cs1), [false, false]);
    }

    /// A read whose bytes do not verify is read once more past the page cache (a stale
    /// cached page heals); bytes that fail twice are reported, naming the chunk.
    #[test]
    fn a_read_that_fails_verification_once_is_read_again() {
        let (_dir, _meta, cs) = new_store();
        let data = vec![7u8; 10_000];
        let id = cs.put(&data).unwrap();
        cs.sync().unwrap();
        cs.stale_reads.store(1, Ordering::SeqCst);
        assert_eq!(cs.get(&id).unwrap(), data);
        assert_eq!(cs.stale_reads.load(Ordering::SeqCst), 0);
        cs.stale_reads.store(2, Ordering::SeqCst);
        let err = cs.get(&id).unwrap_err();
        assert!(
            matches!(err, FsError::Corrupt { chunk, .. } if chunk == id),
            "{err}"
        );
        assert_eq!(cs.get(&id).unwrap(), data);
    }

    /// Chunks stored back to back are read as one run: only the first is looked up, the
    /// place of the record after the run is cached for the next read, and a record of the
    /// run that does not verify is read where the index says instead.
    #[test]
    fn get_many_reads_runs_and_verifies_each_record() {
        let (dir, meta, cs) = new_store();
        let (blocks, ids, new) = store_blocks(&cs, 8);
        assert_eq!(new, 8);
        let fresh = || reopen(&dir, &meta);
        let read_all = |cs: &ChunkStore, ids: &[ChunkId]| {
            let mut seen = Vec::new();
            cs.get_many(ids, Access::Sequential, &mut |i, d| {
                seen.push((i, d.to_vec()));
                Ok(())
            })
            .map(|()| seen)
        };
        let want = |r: std::ops::Range<usize>| -> Vec<(usize, Vec<u8>)> {
            r.clone()
                .map(|i| (i - r.start, blocks[i].clone()))
                .collect()
        };

        let cs1 = fresh();
        assert_eq!(read_all(&cs1, &ids[..4]).unwrap(), want(0..4));
        assert!(cs1.locs.contains(&ids[0]), "the first is looked up");
        assert!(
            (1..4).all(|i| !cs1.locs.contains(&ids[i])),
            "the rest are not"
        );
        assert!(
            cs1.locs.contains(&ids[4]),
            "the next record's place is cached"
        );
        assert_eq!(read_all(&cs1, &ids[4..]).unwrap(), want(4..8));
        assert!((5..8).all(|i| !cs1.locs.contains(&ids[i])));

        // Damage record 3: the run stops there, and the read of 3 alone names it.
        let loc3 = meta.chunk_loc(&ids[3]).unwrap().unwrap();
        let path = pack::pack_path(cs.dir(), loc3.pack);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[loc3.offset as usize + 100] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        let cs2 = fresh();
        let err = read_all(&cs2, &ids).unwrap_err();
        assert!(
            matches!(err, FsError::Corrupt { chunk, .. } if chunk == ids[3]),
            "{err}"
        );
        // With a good copy elsewhere in the index, every chunk reads right.
        let new = cs.append_copy(Index::Chunks, &ids[3], &blocks[3]).unwrap();
        cs.sync().unwrap();
        assert!(meta
            .replace_loc(Index::Chunks, &ids[3], &loc3, &new)
            .unwrap());
        assert_eq!(read_all(&fresh(), &ids).unwrap(), want(0..8));
    }

    /// Two files whose blocks interleave in the pack two by two: reading one of them
    /// takes runs of two and reads little it does not use. A header after a run that
    /// claims a length longer than the run's records is not cached as a place.
    #[test]
    fn get_many_reads_little_more_than_it_uses_when_files_interleave() {
        let (dir, meta, cs) = new_store();
        let block = |f: u32, i: u32| {
            let mut b = vec![0u8; 4096];
            b[..8].copy_from_slice(&[f.to_le_bytes(), i.to_le_bytes()].concat());
            b
        };
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for i in (0..64).step_by(2) {
            for (f, ids) in [(1, &mut a), (2, &mut b)] {
                let pair = [block(f, i), block(f, i + 1)];
                let recs: Vec<(ChunkId, &[u8])> =
                    pair.iter().map(|d| (ChunkId::of(d), &d[..])).collect();
                cs.put_many(&recs).unwrap();
                ids.extend(recs.iter().map(|r| r.0));
            }
        }
        cs.sync().unwrap();
        let cs = reopen(&dir, &meta);
        let mut n = 0;
        cs.get_many(&a, Access::Sequential, &mut |i, d| {
            assert_eq!(d, &block(1, i as u32)[..]);
            n += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(n, 64);
        let read = cs.read_bytes.load(Ordering::Relaxed);
        assert!(read <= 64 * 4096 * 3, "read {read} bytes for 256 KiB");

        // A run whose next header claims a huge length: no place is cached for it.
        let c: Vec<Vec<u8>> = (0..3).map(|i| block(3, i)).collect();
        let recs: Vec<(ChunkId, &[u8])> = c.iter().map(|d| (ChunkId::of(d), &d[..])).collect();
        cs.put_many(&recs).unwrap();
        cs.sync().unwrap();
        let loc2 = meta.chunk_loc(&recs[2].0).unwrap().unwrap();
        let path = pack::pack_path(cs.dir(), loc2.pack);
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        use std::os::unix::fs::FileExt;
        f.write_all_at(&u32::MAX.to_be_bytes(), loc2.offset - pack::HEADER_LEN + 4)
            .unwrap();
        let cs = reopen(&dir, &meta);
        cs.get_many(&[recs[0].0, recs[1].0], Access::Sequential, &mut |_, _| {
            Ok(())
        })
        .unwrap();
        assert!(
            !cs.locs.contains(&recs[2].0),
            "no place from a header claiming 4 GiB"
        );
    }

    /// A barrier's metadata flush runs with appends held off: a record appended during
    /// it would be named by metadata made durable before the record is.
    #[test]
    fn appends_wait_for_the_flush_after_a_sync() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("packs")).unwrap();
        let meta = Arc::new(Meta::open(&dir.path().join("meta")).unwrap());
        let cs = Arc::new(
            ChunkStore::open(&dir.path().join("packs"), meta.clone(), Arc::default()).unwrap(),
        );
        cs.put(&[1u8; 4096]).unwrap();
        let appended = Arc::new(AtomicBool::new(false));
        let mut writer = None;
        cs.sync_then(|| {
            assert!(cs.all_synced(), "the packs are synced before the flush");
            let (cs2, done) = (cs.clone(), appended.clone());
            writer = Some(std::thread::spawn(move || {
                cs2.put(&[2u8; 4096]).unwrap();
                done.store(true, Ordering::SeqCst);
            }));
            std::thread::sleep(std::time::Duration::from_millis(200));
            assert!(
                !appended.load(Ordering::SeqCst),
                "an append ran during the flush"
            );
            Ok(())
        })
        .unwrap();
        writer.unwrap().join().unwrap();
        assert!(appended.load(Ordering::SeqCst));
        assert!(!cs.all_synced(), "the later append waits for the next sync");
    }

    #[test]
    fn relocation_primitives() {
        let dir = tempfile::tempdir().unwrap();
        let packs = dir.path().join("packs");
        std::fs::create_dir(&packs).unwrap();
        let meta = Arc::new(Meta::open(&dir.path().join("meta")).unwrap());
        let a = vec![1u8; 4096];
        let id = {
            let cs = ChunkStore::open(&packs, meta.clone(), Arc::default()).unwrap();
            let id = cs.put(&a).unwrap();
            cs.sync().unwrap();
            id
        };
        let cs = ChunkStore::open(&packs, meta.clone(), Arc::default()).unwrap();
        assert_eq!(cs.active_pack(), 1);
        assert!(
            cs.remove_pack(1).is_err(),
            "the active pack is never removed"
        );
        let old = meta.chunk_loc(&id).unwrap().unwrap();
        let new = cs
            .append_copy(Index::Chunks, &id, &cs.read_loc(&id, &old).unwrap())
            .unwrap();
        assert_eq!(new.pack, 1);
        cs.sync().unwrap();
        // Only an entry that still points at the old copy is repointed.
        assert!(!meta.replace_loc(Index::Chunks, &id, &new, &old).unwrap());
        assert!(meta.replace_loc(Index::Chunks, &id, &old, &new).unwrap());
        assert_eq!(cs.remove_pack(0).unwrap(), 4096 + pack::HEADER_LEN);
        assert!(cs.read_loc(&id, &old).is_err());
        assert_eq!(cs.get(&id).unwrap(), a);
        // Sealing starts a new active pack; an empty one is not sealed.
        assert_eq!(
            cs.seal_active().unwrap(),
            Some((1, 4096 + pack::HEADER_LEN))
        );
        assert_eq!(cs.active_pack(), 2);
        assert_eq!(cs.seal_active().unwrap(), None);
        assert_eq!(cs.remove_pack(1).unwrap(), 4096 + pack::HEADER_LEN);
        assert_eq!(pack::list_packs(&packs).unwrap(), vec![2]);
    }

    #[test]
    fn filter_and_location_cache_never_change_an_answer() {
        let dir = tempfile::tempdir().unwrap();
        let packs = dir.path().join("packs");
        std::fs::create_dir(&packs).unwrap();
        let meta = Arc::new(Meta::open(&dir.path().join("meta")).unwrap());
        let (a, b, c) = (vec![1u8; 4096], vec![2u8; 4096], vec![3u8; 4096]);
        let (ia, ib) = {
            let cs = ChunkStore::open(&packs, meta.clone(), Arc::default()).unwrap();
            (cs.put(&a).unwrap(), cs.put(&b).unwrap())
        };
        // Reopened: the filter is rebuilt from the index, so stored chunks stay deduplicated.
        let cs = ChunkStore::open(&packs, meta.clone(), Arc::default()).unwrap();
        cs.rebuild_filter().unwrap();
        assert!(!cs.put_hashed(ia, &a).unwrap());
        assert!(!cs.put_hashed(ib, &b).unwrap());
        let ic = cs.put(&c).unwrap();
        assert!(!cs.put_hashed(ic, &c).unwrap());
        assert!(cs.filter_bytes() > 0);
        // A chunk moved behind the cache's back (its old pack deleted) is still read.
        assert_eq!(cs.get(&ia).unwrap(), a, "caches the location");
        let old = meta.chunk_loc(&ia).unwrap().unwrap();
        let new = cs.append_copy(Index::Chunks, &ia, &a).unwrap();
        cs.sync().unwrap();
        assert!(meta.replace_loc(Index::Chunks, &ia, &old, &new).unwrap());
        cs.remove_pack(old.pack).unwrap();
        assert_eq!(
            cs.get(&ia).unwrap(),
            a,
            "stale cached location: the index decides"
        );
        let mut seen = Vec::new();
        cs.get_many(&[ia, ic], Access::Sequential, &mut |i, d| {
            seen.push((i, d.to_vec()));
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, vec![(0, a.clone()), (1, c.clone())]);
        // A chunk removed from the index (as a collection does) is stored again, though
        // its location is cached and its filter bits are set.
        meta.remove_locs(Index::Chunks, &[ic]).unwrap();
        assert!(cs.put_hashed(ic, &c).unwrap(), "stored again");
        assert_eq!(cs.get(&ic).unwrap(), c);
    }
}

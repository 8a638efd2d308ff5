//! Garbage collection: reclaims chunks and block-map nodes that no inode version (live
//! file, clone or snapshot) reaches, and compacts pack files.
//!
//! GC is mark-and-sweep over the versioned inode records: there are no reference counts
//! to keep right on the write path. [`collect`] runs while the store is mounted and
//! writable:
//!
//! 1. **Begin.** Start recording dropped inode versions (`Meta::capture_dropped`), then
//!    take the datastore's GC gate exclusively (in-flight flushes commit first) and start
//!    pinning ([`Pins`]): from now on every chunk stored or deduplicated against and every
//!    block-map node written is pinned.
//! 2. **Mark.** Walk the block map of every inode version in the table, then of every
//!    version dropped while the scan ran. Together with the pins this marks everything
//!    reachable when the collection began plus everything written since ("snapshot at
//!    the beginning"): a subtree that moves from an inode the scan has not reached to one
//!    it has passed (a copy_file_range graft, a clone followed by an unlink) is still
//!    marked through the dropped version that held it.
//! 3. **Sweep.** Remove every index entry and node that is neither marked nor pinned. The
//!    pinned check and the removal happen under the pin set's lock, and a writer pins an
//!    id before it looks the id up, so a write that deduplicates against a chunk while
//!    the sweep decides its fate either pins it first (kept) or finds it gone (stores the
//!    bytes again). Removed nodes leave the node cache too: a cached node is never
//!    rewritten by `BlockMaps::store`. The removals are flushed; pinning stops.
//! 4. **Compact.** Every pack older than the active one whose live share (indexed bytes
//!    plus headers over file size) is below [`GcOptions::compact_threshold`] has its live
//!    chunks copied (verified) to the active pack; the copies are synced, the index
//!    entries repointed only if they still point at the old copy, the index flushed, and
//!    only then the pack deleted. Packs with nothing live are deleted after the flush.
//!    If the active pack itself is that sparse (files written then deleted in this
//!    session), a new active pack is started first so that it can be compacted too.
//!
//! Crash safety: every removal is of garbage, and every step that deletes bytes (a pack)
//! follows a durable index in which nothing points at them, so a crash at any point loses
//! nothing; copies made before a crash, and removals not yet flushed, are garbage the next
//! collection reclaims. One collection runs at a time per store.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, MutexGuard};
use serde::Serialize;

use crate::chunk::pack;
use crate::error::{FsError, Result};
use crate::fs::Datastore;
use crate::ids::{ChunkId, InodeNo};
use crate::meta::{ChunkLoc, Index, Inode};

/// Ids written or reused while a collection runs; the sweep keeps them.
#[derive(Default)]
pub struct Pins {
    active: AtomicBool,
    set: Mutex<HashSet<ChunkId>>,
    /// Held by the running collection: one at a time.
    running: Mutex<()>,
}

impl Pins {
    /// Records that `id` (a chunk or a node) was just stored or reused.
    pub fn pin(&self, id: &ChunkId) {
        if self.active.load(Ordering::SeqCst) {
            self.set.lock().insert(*id);
        }
    }

    /// Starts pinning (call with the GC gate held exclusively).
    pub fn begin(&self) {
        self.set.lock().clear();
        self.active.store(true, Ordering::SeqCst);
    }

    /// Whether `id` was pinned since [`Pins::begin`].
    pub fn contains(&self, id: &ChunkId) -> bool {
        self.set.lock().contains(id)
    }

    /// Stops pinning and forgets the set.
    pub fn end(&self) {
        self.active.store(false, Ordering::SeqCst);
        self.set.lock().clear();
    }

    /// Calls `remove` with the ids of `ids` that are not pinned, holding the pin set's
    /// lock throughout: no id can be pinned between the decision and the removal.
    /// Returns the ids passed to `remove`. `remove` must not pin (it would deadlock).
    pub(crate) fn remove_unpinned(
        &self,
        ids: &[ChunkId],
        remove: impl FnOnce(&[ChunkId]) -> Result<()>,
    ) -> Result<Vec<ChunkId>> {
        let set = self.set.lock();
        let free: Vec<ChunkId> = ids.iter().filter(|id| !set.contains(id)).copied().collect();
        if !free.is_empty() {
            remove(&free)?;
        }
        Ok(free)
    }

    /// The right to run a collection, unless one is running.
    fn try_exclusive(&self) -> Option<MutexGuard<'_, ()>> {
        self.running.try_lock()
    }
}

/// A named point of a collection, passed to [`GcOptions::failpoint`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GcStep {
    /// Pinning and capture have started; the scan of the inode table is next.
    Begun,
    /// The scan walked one version of inode `ino`.
    Marked(InodeNo),
    /// The mark is complete: table and dropped versions.
    MarkDone,
    /// One batch of index entries or nodes was removed (not yet flushed).
    Swept,
    /// The sweep is complete and flushed; pinning has stopped.
    SweepDone,
    /// The live chunks of pack `p` were copied to the active pack and synced; the index
    /// still points at the old copies.
    Copied(u32),
    /// The index entries of pack `p` point at the copies (not yet flushed).
    Repointed(u32),
    /// The index is flushed; pack `p` is about to be deleted.
    Deleting(u32),
    /// Pack `p` was deleted.
    Deleted(u32),
}

/// A test hook called at every [`GcStep`]: it may block (to run a racing operation at an
/// exact point) or return an error, which aborts the collection there like a crash.
pub type Failpoint = Arc<dyn Fn(GcStep) -> Result<()> + Send + Sync>;

/// How a collection runs.
#[derive(Clone)]
pub struct GcOptions {
    /// Packs whose live share is below this fraction (0.0..=1.0) are compacted.
    pub compact_threshold: f64,
    /// Pace: the most bytes per second compaction copies (`None`: unbounded).
    pub max_bytes_per_sec: Option<u64>,
    /// Test hook, see [`Failpoint`].
    pub failpoint: Option<Failpoint>,
}

impl Default for GcOptions {
    fn default() -> Self {
        GcOptions {
            compact_threshold: 0.5,
            max_bytes_per_sec: None,
            failpoint: None,
        }
    }
}

impl std::fmt::Debug for GcOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GcOptions")
            .field("compact_threshold", &self.compact_threshold)
            .field("max_bytes_per_sec", &self.max_bytes_per_sec)
            .field("failpoint", &self.failpoint.is_some())
            .finish()
    }
}

/// Which phase a [`GcProgress`] reports on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GcPhase {
    Mark,
    Sweep,
    Compact,
}

/// Progress of a running collection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct GcProgress {
    pub phase: GcPhase,
    /// Mark: inode versions walked; sweep: candidates decided; compact: bytes copied.
    pub done: u64,
    /// The total for `done`, when known (0 for the mark).
    pub total: u64,
}

/// What a collection did (`thinfs gc --json`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct GcReport {
    /// Index entries removed.
    pub chunks_freed: u64,
    /// Data bytes of the removed chunks (their pack space comes back with compaction).
    pub chunk_bytes_freed: u64,
    /// Block-map nodes removed.
    pub nodes_freed: u64,
    /// Unreachable chunks and nodes kept because a writer used them during the collection.
    pub kept_pinned: u64,
    /// Pack files deleted (compacted or empty).
    pub packs_deleted: u64,
    /// Of those, packs whose live chunks were copied first.
    pub packs_compacted: u64,
    /// Packs below the threshold left alone because a live chunk in them is damaged.
    pub packs_skipped: u64,
    /// Bytes (records) compaction appended to the active pack.
    pub bytes_relocated: u64,
    /// Pack bytes deleted.
    pub pack_bytes_deleted: u64,
    /// Net disk space returned: pack bytes deleted minus bytes relocated.
    pub bytes_freed: u64,
    pub duration_ms: u64,
}

/// Ids removed per sweep batch (one atomic metadata batch, one hold of the pin lock).
const SWEEP_BATCH: usize = 512;

/// Runs one garbage collection on an open (possibly mounted and busy) datastore.
/// Fails with [`FsError::Busy`] if another collection is running.
pub fn collect(
    ds: &Datastore,
    opts: &GcOptions,
    progress: &dyn Fn(GcProgress),
) -> Result<GcReport> {
    let start = Instant::now();
    if !(0.0..=1.0).contains(&opts.compact_threshold) {
        return Err(FsError::Invalid(format!(
            "compaction threshold {} is not within 0..=1",
            opts.compact_threshold
        )));
    }
    let _one = ds
        .chunks()
        .pins()
        .try_exclusive()
        .ok_or_else(|| FsError::Busy("a garbage collection is already running".into()))?;
    let fp = |step: GcStep| match &opts.failpoint {
        Some(f) => f(step),
        None => Ok(()),
    };
    ds.sync_all()?;
    let mut report = GcReport::default();
    {
        let _session = Session::begin(ds);
        fp(GcStep::Begun)?;
        let (chunks, nodes) = mark(ds, &fp, progress)?;
        fp(GcStep::MarkDone)?;
        sweep(ds, &chunks, &nodes, &mut report, &fp, progress)?;
        // A barrier, not a bare metadata flush: flushes committed meanwhile must not
        // become durable before their chunks do.
        ds.barrier()?;
    }
    fp(GcStep::SweepDone)?;
    compact(ds, opts, &mut report, &fp, progress)?;
    ds.barrier()?;
    // The removed names still have their filter bits; clear them (a stale filter only
    // costs index lookups, so a failure is not the collection's).
    if report.chunks_freed + report.nodes_freed > 0 {
        if let Err(e) = ds.chunks().rebuild_filter() {
            tracing::warn!("gc: chunk filter not rebuilt: {e}");
        }
    }
    report.bytes_freed = report
        .pack_bytes_deleted
        .saturating_sub(report.bytes_relocated);
    report.duration_ms = start.elapsed().as_millis() as u64;
    tracing::info!(
        "gc of {}: {} chunks ({} bytes) and {} nodes freed, {} kept for concurrent writers, \
         {} packs deleted ({} compacted), {} bytes returned in {} ms",
        ds.path().display(),
        report.chunks_freed,
        report.chunk_bytes_freed,
        report.nodes_freed,
        report.kept_pinned,
        report.packs_deleted,
        report.packs_compacted,
        report.bytes_freed,
        report.duration_ms
    );
    Ok(report)
}

/// Capture of dropped versions and pinning, ended on drop (also on error).
struct Session<'a> {
    ds: &'a Datastore,
}

impl<'a> Session<'a> {
    fn begin(ds: &'a Datastore) -> Self {
        // Capture first: a version dropped between the two is then recorded.
        ds.meta().capture_dropped();
        ds.gc_begin();
        Session { ds }
    }
}

impl Drop for Session<'_> {
    fn drop(&mut self) {
        let _ = self.ds.meta().take_dropped(true);
        self.ds.gc_end();
    }
}

/// Marks every chunk and node reachable from the inode table and from versions dropped
/// while it was scanned.
fn mark(
    ds: &Datastore,
    fp: &dyn Fn(GcStep) -> Result<()>,
    progress: &dyn Fn(GcProgress),
) -> Result<(HashSet<ChunkId>, HashSet<ChunkId>)> {
    let mut nodes = HashSet::new();
    let mut chunks = HashSet::new();
    let mut walked = 0u64;
    let mut walk = |inode: &Inode, nodes: &mut HashSet<ChunkId>| -> Result<()> {
        ds.maps().walk(inode.map, nodes, &mut |c| {
            chunks.insert(*c);
        })?;
        walked += 1;
        if walked % 4096 == 0 {
            progress(GcProgress {
                phase: GcPhase::Mark,
                done: walked,
                total: 0,
            });
        }
        Ok(())
    };
    for inode in ds.meta().all_inode_versions() {
        let inode = inode?;
        walk(&inode, &mut nodes)?;
        fp(GcStep::Marked(inode.ino))?;
    }
    // Drain until quiet, then stop recording with the last take: a version dropped after
    // that existed when the scan passed it, so the scan saw it.
    loop {
        let dropped = ds.meta().take_dropped(false)?;
        if dropped.is_empty() {
            break;
        }
        for inode in &dropped {
            walk(inode, &mut nodes)?;
        }
    }
    for inode in ds.meta().take_dropped(true)? {
        walk(&inode, &mut nodes)?;
    }
    Ok((chunks, nodes))
}

/// Removes unmarked, unpinned index entries (chunks and nodes) and legacy nodes.
fn sweep(
    ds: &Datastore,
    marked_chunks: &HashSet<ChunkId>,
    marked_nodes: &HashSet<ChunkId>,
    report: &mut GcReport,
    fp: &dyn Fn(GcStep) -> Result<()>,
    progress: &dyn Fn(GcProgress),
) -> Result<()> {
    let meta = ds.meta();
    let pins = ds.chunks().pins();
    // Candidates first: the index is not changed while it is iterated.
    let mut chunk_len: HashMap<ChunkId, u32> = HashMap::new();
    for entry in meta.chunk_locs() {
        let (id, loc) = entry?;
        if !marked_chunks.contains(&id) {
            chunk_len.insert(id, loc.len);
        }
    }
    let unmarked = |ids: &mut dyn Iterator<Item = Result<ChunkId>>| -> Result<Vec<ChunkId>> {
        ids.filter(|id| id.as_ref().map_or(true, |id| !marked_nodes.contains(id)))
            .collect()
    };
    let node_cands = unmarked(&mut meta.ids(Index::Nodes))?;
    let legacy_cands = unmarked(&mut meta.legacy_node_ids())?;
    let chunk_cands: Vec<ChunkId> = chunk_len.keys().copied().collect();
    let total = (chunk_cands.len() + node_cands.len() + legacy_cands.len()) as u64;
    let mut done = 0u64;
    let mut step = |batch_len: usize, freed: usize, report: &mut GcReport| -> Result<()> {
        report.kept_pinned += (batch_len - freed) as u64;
        done += batch_len as u64;
        progress(GcProgress {
            phase: GcPhase::Sweep,
            done,
            total,
        });
        fp(GcStep::Swept)
    };
    for batch in chunk_cands.chunks(SWEEP_BATCH) {
        let freed = pins.remove_unpinned(batch, |free| meta.remove_locs(Index::Chunks, free))?;
        ds.chunks().forget_locs(&freed);
        report.chunks_freed += freed.len() as u64;
        report.chunk_bytes_freed += freed.iter().map(|id| chunk_len[id] as u64).sum::<u64>();
        step(batch.len(), freed.len(), report)?;
    }
    // Nodes leave the node cache with their entry: a cached node is stored again only if
    // the index lacks it, but a removed one must not be taken for present.
    for (cands, legacy) in [(&node_cands, false), (&legacy_cands, true)] {
        for batch in cands.chunks(SWEEP_BATCH) {
            let freed = pins.remove_unpinned(batch, |free| {
                if legacy {
                    meta.remove_legacy_nodes(free)?;
                } else {
                    meta.remove_locs(Index::Nodes, free)?;
                }
                for id in free {
                    ds.maps().forget(id);
                }
                Ok(())
            })?;
            ds.chunks().forget_locs(&freed);
            report.nodes_freed += freed.len() as u64;
            step(batch.len(), freed.len(), report)?;
        }
    }
    Ok(())
}

/// Paces I/O to a byte rate.
pub(crate) struct Throttle {
    rate: Option<u64>,
    start: Instant,
    bytes: u64,
}

impl Throttle {
    pub(crate) fn new(rate: Option<u64>) -> Self {
        Throttle {
            rate: rate.filter(|r| *r > 0),
            start: Instant::now(),
            bytes: 0,
        }
    }

    /// Accounts `n` bytes and sleeps until the rate allows them.
    pub(crate) fn account(&mut self, n: u64) {
        let Some(rate) = self.rate else { return };
        self.bytes += n;
        let due = Duration::from_secs_f64(self.bytes as f64 / rate as f64);
        let elapsed = self.start.elapsed();
        if due > elapsed {
            std::thread::sleep(due - elapsed);
        }
    }
}

/// An index entry that points into a pack: which index, the name, where.
type Live = (Index, ChunkId, ChunkLoc);

/// A pack chosen for deletion, with the index entries that point into it.
struct Doomed {
    pack: u32,
    live: Vec<Live>,
}

/// Index entries (chunks and nodes) per pack, for the packs in `packs` that `want`
/// accepts.
fn live_per_pack(
    ds: &Datastore,
    packs: &[u32],
    want: impl Fn(u32) -> bool,
) -> Result<BTreeMap<u32, Vec<Live>>> {
    let mut live: BTreeMap<u32, Vec<Live>> = packs
        .iter()
        .filter(|p| want(**p))
        .map(|p| (*p, Vec::new()))
        .collect();
    for index in Index::ALL {
        for entry in ds.meta().locs(index) {
            let (id, loc) = entry?;
            if let Some(v) = live.get_mut(&loc.pack) {
                v.push((index, id, loc));
            }
        }
    }
    Ok(live)
}

/// Whether a pack of `size` bytes holding `entries` is due for compaction.
fn sparse(entries: &[Live], size: u64, threshold: f64) -> bool {
    let live_bytes: u64 = entries
        .iter()
        .map(|(_, _, l)| l.len as u64 + pack::HEADER_LEN)
        .sum();
    entries.is_empty() || (live_bytes as f64) < threshold * size as f64
}

/// Copies the live chunks out of sparse packs and deletes packs with nothing live.
fn compact(
    ds: &Datastore,
    opts: &GcOptions,
    report: &mut GcReport,
    fp: &dyn Fn(GcStep) -> Result<()>,
    progress: &dyn Fn(GcProgress),
) -> Result<()> {
    let cs = ds.chunks();
    let meta = ds.meta();
    let size_of = |p: u32| cs.pack_size(p);
    // The active pack and later ones are appended to; older ones never are again.
    let mut active = cs.active_pack();
    let mut live = live_per_pack(ds, &pack::list_packs(cs.dir())?, |p| p <= active)?;
    // A sparse active pack is sealed and compacted too, so that deleting what was just
    // written gives the space back now rather than once the pack fills.
    if let (Some(entries), Ok(size)) = (live.get(&active), size_of(active)) {
        if size > 0 && sparse(entries, size, opts.compact_threshold) && cs.seal_active()?.is_some()
        {
            // Entries may have been added to the sealed pack since the scan: scan again.
            active = cs.active_pack();
            live = live_per_pack(ds, &pack::list_packs(cs.dir())?, |p| p < active)?;
        }
    }
    // A log record of written bytes whose data is not flushed yet must stay (see
    // fs/journal.rs); records appended from here on go to the active pack.
    let keep_from = ds.first_pending_pack().unwrap_or(active).min(active);
    live.retain(|p, _| *p < keep_from);
    let mut doomed = Vec::new();
    for (p, entries) in live {
        let size = match size_of(p) {
            Ok(size) => size,
            Err(e) => {
                tracing::warn!("gc: cannot stat pack {p}: {e}");
                continue;
            }
        };
        if sparse(&entries, size, opts.compact_threshold) {
            doomed.push(Doomed {
                pack: p,
                live: entries,
            });
        }
    }
    let total: u64 = doomed
        .iter()
        .flat_map(|d| d.live.iter())
        .map(|(_, _, l)| l.len as u64 + pack::HEADER_LEN)
        .sum();
    let mut throttle = Throttle::new(opts.max_bytes_per_sec);
    let mut copied_bytes = 0u64;
    'packs: for d in doomed {
        let mut moved = Vec::with_capacity(d.live.len());
        for (index, id, loc) in &d.live {
            let data = match cs.read_loc(id, loc) {
                Ok(data) => data,
                Err(e) => {
                    // Copying would lose it for good: keep the pack; scrub and fsck name it.
                    tracing::error!("gc: not compacting pack {}: {e}", d.pack);
                    report.packs_skipped += 1;
                    continue 'packs;
                }
            };
            let new = cs.append_copy(*index, id, &data)?;
            let n = data.len() as u64 + pack::HEADER_LEN;
            report.bytes_relocated += n;
            copied_bytes += n;
            throttle.account(n);
            progress(GcProgress {
                phase: GcPhase::Compact,
                done: copied_bytes,
                total,
            });
            moved.push((*index, *id, *loc, new));
        }
        if !moved.is_empty() {
            // The copies are durable before any index entry points at them.
            cs.sync()?;
            fp(GcStep::Copied(d.pack))?;
            for (index, id, old, new) in &moved {
                meta.replace_loc(*index, id, old, new)?;
            }
            cs.forget_locs(moved.iter().map(|(_, id, _, _)| id));
            fp(GcStep::Repointed(d.pack))?;
        }
        ds.barrier()?;
        fp(GcStep::Deleting(d.pack))?;
        // Nothing adds entries into an old pack, so the entries seen are the only ones
        // that could still point into it.
        for (index, id, _) in &d.live {
            if meta.loc(*index, id)?.is_some_and(|l| l.pack == d.pack) {
                let what = index.what();
                tracing::warn!("gc: {what} {id} still in pack {}; keeping the pack", d.pack);
                report.packs_skipped += 1;
                continue 'packs;
            }
        }
        report.pack_bytes_deleted += cs.remove_pack(d.pack)?;
        report.packs_deleted += 1;
        if !d.live.is_empty() {
            report.packs_compacted += 1;
        }
        fp(GcStep::Deleted(d.pack))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> ChunkId {
        ChunkId::of(&[n])
    }

    #[test]
    fn pins_only_while_active_and_guard_removal() {
        let pins = Pins::default();
        pins.pin(&id(1));
        pins.begin();
        assert!(!pins.contains(&id(1)), "pins before begin are not kept");
        pins.pin(&id(2));
        let mut removed = Vec::new();
        let freed = pins
            .remove_unpinned(&[id(1), id(2), id(3)], |free| {
                removed.extend_from_slice(free);
                Ok(())
            })
            .unwrap();
        assert_eq!(freed, vec![id(1), id(3)]);
        assert_eq!(removed, freed);
        pins.end();
        assert!(!pins.contains(&id(2)));
        pins.pin(&id(4));
        assert!(!pins.contains(&id(4)), "no pinning after end");
    }

    #[test]
    fn one_collection_at_a_time() {
        let pins = Pins::default();
        let g = pins.try_exclusive();
        assert!(g.is_some());
        assert!(pins.try_exclusive().is_none());
        drop(g);
        assert!(pins.try_exclusive().is_some());
    }

    #[test]
    fn throttle_paces() {
        let mut t = Throttle::new(Some(1 << 20));
        let start = Instant::now();
        t.account(256 << 10);
        assert!(start.elapsed() >= Duration::from_millis(240));
        let mut free = Throttle::new(None);
        let start = Instant::now();
        free.account(1 << 40);
        assert!(start.elapsed() < Duration::from_millis(100));
    }
}

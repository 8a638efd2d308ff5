//! Garbage collection, scrub and fsck driven through the core (no FUSE mount).
//!
//! The races are deterministic: a collection runs on its own thread and stops at an exact
//! named step (`GcOptions::failpoint`) while this thread runs the racing operation, then
//! continues. Crashes are injected by failing the collection at each step in turn.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use thinfs::fs::namespace::Creator;
use thinfs::fs::snapshot::Node;
use thinfs::fs::OpenOptions;
use thinfs::fsck::fsck;
use thinfs::gc::{collect, GcOptions, GcReport, GcStep};
use thinfs::scrub::{scrub, ScrubOptions};
use thinfs::{Datastore, FsError, InodeNo};

const BS: usize = 4096;
const WHO: Creator = Creator { uid: 0, gid: 0 };
const ROOT: InodeNo = InodeNo::ROOT;

fn new_store() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    Datastore::mkfs(&store, BS as u32).unwrap();
    (dir, store)
}

fn open(store: &Path) -> Arc<Datastore> {
    Datastore::open(
        store,
        &OpenOptions {
            no_background: true,
            ..Default::default()
        },
    )
    .unwrap()
}

/// `len` bytes no other seed produces (every block distinct).
fn unique(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Creates `name` in `parent` with `data` and commits it.
fn put(ds: &Datastore, parent: InodeNo, name: &str, data: &[u8]) -> InodeNo {
    let a = ds.create(parent, name.as_bytes(), 0o644, WHO).unwrap();
    ds.write(a.ino, 0, data).unwrap();
    ds.flush(a.ino).unwrap();
    a.ino
}

fn get(ds: &Datastore, name: &str) -> Vec<u8> {
    let a = ds.lookup(ROOT, name.as_bytes()).unwrap();
    ds.read(a.ino, 0, a.size as u32).unwrap()
}

fn gc(ds: &Datastore, threshold: f64) -> GcReport {
    let opts = GcOptions {
        compact_threshold: threshold,
        ..Default::default()
    };
    collect(ds, &opts, &|_| {}).unwrap()
}

/// fsck of a closed store: no errors; with `no_leaks`, no unreachable chunk or node
/// either. Returns the findings.
fn assert_fsck_clean(store: &Path, no_leaks: bool) -> thinfs::fsck::Findings {
    let r = fsck(store, false).unwrap();
    assert!(r.clean, "{r:#?}");
    if no_leaks {
        let f = &r.found;
        assert_eq!((f.leaked_chunks, f.leaked_nodes), (0, 0), "{f:#?}");
    }
    r.found
}

/// A collection on another thread, stopped at the first step `at` accepts.
struct Paused {
    reached: Receiver<GcStep>,
    go: Sender<()>,
    handle: JoinHandle<Result<GcReport, FsError>>,
}

fn gc_paused_at(
    ds: &Arc<Datastore>,
    threshold: f64,
    at: impl Fn(GcStep) -> bool + Send + Sync + 'static,
) -> Paused {
    let (reached_tx, reached) = channel();
    let (go, go_rx) = channel::<()>();
    let (reached_tx, go_rx) = (Mutex::new(reached_tx), Mutex::new(go_rx));
    let fired = AtomicBool::new(false);
    let opts = GcOptions {
        compact_threshold: threshold,
        failpoint: Some(Arc::new(move |step| {
            if !fired.load(Ordering::SeqCst) && at(step) {
                fired.store(true, Ordering::SeqCst);
                reached_tx.lock().unwrap().send(step).unwrap();
                go_rx.lock().unwrap().recv().unwrap();
            }
            Ok(())
        })),
        ..Default::default()
    };
    let ds = ds.clone();
    let handle = std::thread::spawn(move || collect(&ds, &opts, &|_| {}));
    Paused {
        reached,
        go,
        handle,
    }
}

impl Paused {
    /// Waits until the collection stops at its step.
    fn wait(&self) -> GcStep {
        self.reached
            .recv_timeout(Duration::from_secs(120))
            .expect("the collection never reached the step")
    }

    /// Lets it finish.
    fn resume(self) -> GcReport {
        self.go.send(()).unwrap();
        self.handle.join().unwrap().unwrap()
    }
}

// ---- GC against a concurrent dedup hit ----

/// A write that deduplicates against an unreachable chunk after the mark keeps it.
#[test]
fn dedup_hit_between_mark_and_sweep_keeps_the_chunk() {
    let (_d, store) = new_store();
    let ds = open(&store);
    let x = unique(1, 4 * BS);
    put(&ds, ROOT, "old", &x);
    put(&ds, ROOT, "junk", &unique(2, BS));
    ds.sync_all().unwrap();
    ds.unlink(ROOT, b"old").unwrap();
    ds.unlink(ROOT, b"junk").unwrap();

    let p = gc_paused_at(&ds, 0.5, |s| s == GcStep::MarkDone);
    p.wait();
    // old's chunks are unmarked now; this write finds them in the index and reuses them.
    put(&ds, ROOT, "new", &x);
    let r = p.resume();
    assert_eq!(r.chunks_freed, 1, "only junk's chunk: {r:?}");
    assert_eq!(r.kept_pinned, 5, "old's 4 chunks and its leaf node: {r:?}");
    assert_eq!(get(&ds, "new"), x);
    assert_eq!(ds.stats().unwrap().chunks, 4);
    drop(ds);
    assert_fsck_clean(&store, true);
    assert_eq!(get(&open(&store), "new"), x);
}

/// A write that arrives after the sweep removed the chunk (or the node) stores it again.
#[test]
fn dedup_attempt_after_the_sweep_stores_again() {
    // 1st Swept: chunks removed, leaf node not yet; 2nd Swept: both removed.
    for nth in [1usize, 2] {
        let (_d, store) = new_store();
        let ds = open(&store);
        let x = unique(3, 4 * BS);
        let old = put(&ds, ROOT, "old", &x);
        // Cache old's leaf node: a removed node must leave the cache too.
        assert_eq!(ds.read(old, 0, (4 * BS) as u32).unwrap(), x);
        ds.unlink(ROOT, b"old").unwrap();
        let seen = AtomicUsize::new(0);
        let p = gc_paused_at(&ds, 0.5, move |s| {
            s == GcStep::Swept && seen.fetch_add(1, Ordering::SeqCst) + 1 == nth
        });
        p.wait();
        put(&ds, ROOT, "new", &x);
        let r = p.resume();
        assert_eq!(r.chunks_freed, 4, "pass {nth}: {r:?}");
        assert_eq!(
            r.nodes_freed,
            if nth == 1 { 0 } else { 1 },
            "pass {nth}: {r:?}"
        );
        assert_eq!(get(&ds, "new"), x, "pass {nth}");
        drop(ds);
        assert_fsck_clean(&store, true);
        assert_eq!(get(&open(&store), "new"), x, "pass {nth}");
    }
}

// ---- GC against clones, grafts and snapshots ----

/// Clone a file and unlink the source before the scan reaches it.
#[test]
fn clone_then_unlink_during_the_mark_keeps_the_clone() {
    let (_d, store) = new_store();
    let ds = open(&store);
    let first = put(&ds, ROOT, "first", &unique(10, BS));
    let xa = unique(11, 300 * BS);
    let a = put(&ds, ROOT, "a", &xa);
    ds.sync_all().unwrap();

    let p = gc_paused_at(&ds, 0.5, move |s| s == GcStep::Marked(first));
    p.wait();
    ds.clone_path(a, ROOT, b"a2", false).unwrap();
    ds.unlink(ROOT, b"a").unwrap();
    let r = p.resume();
    assert_eq!((r.chunks_freed, r.nodes_freed), (0, 0), "{r:?}");
    assert_eq!(get(&ds, "a2"), xa);
    drop(ds);
    assert_fsck_clean(&store, true);
    assert_eq!(get(&open(&store), "a2"), xa);
}

/// copy_file_range grafts whole subtrees of `late` (not yet scanned) into `early`
/// (already scanned); then `late` goes away. Only the record of dropped versions makes
/// the mark see those subtrees. (Thousands of inodes lie between the two so that the
/// scan's iterator has not yet read the part of the table that holds `late`.)
#[test]
fn graft_then_unlink_during_the_mark_keeps_the_shared_subtrees() {
    let (_d, store) = new_store();
    let ds = open(&store);
    let early = put(&ds, ROOT, "early", &unique(20, BS));
    let fill = ds.mkdir(ROOT, b"fill", 0o755, WHO).unwrap().ino;
    for i in 0..3000 {
        ds.create(fill, format!("f{i}").as_bytes(), 0o644, WHO)
            .unwrap();
    }
    let late_data = unique(21, 512 * BS);
    let late = put(&ds, ROOT, "late", &late_data);
    ds.sync_all().unwrap();

    let p = gc_paused_at(&ds, 0.5, move |s| s == GcStep::Marked(early));
    p.wait();
    let n = ds
        .copy_range(late, 0, early, 0, late_data.len() as u64)
        .unwrap();
    assert_eq!(n, late_data.len() as u64);
    ds.unlink(ROOT, b"late").unwrap();
    let r = p.resume();
    assert_eq!((r.chunks_freed, r.nodes_freed), (0, 0), "{r:?}");
    assert_eq!(get(&ds, "early"), late_data);
    // early's first block is garbage now; the next collection takes it.
    let r = gc(&ds, 0.5);
    assert_eq!(r.chunks_freed, 1, "{r:?}");
    assert_eq!(get(&ds, "early"), late_data);
    drop(ds);
    assert_fsck_clean(&store, true);
    assert_eq!(get(&open(&store), "early"), late_data);
}

/// A snapshot taken in the middle of a collection keeps the version it froze, even when
/// that version was still in a write-back buffer and the file is overwritten and removed
/// right after.
#[test]
fn snapshot_during_the_mark_keeps_what_it_sees() {
    let (_d, store) = new_store();
    let ds = open(&store);
    let small = put(&ds, ROOT, "small", &unique(30, BS));
    let s = put(&ds, ROOT, "s", &unique(31, 8 * BS));
    ds.sync_all().unwrap();
    let v1 = unique(32, 8 * BS);

    let p = gc_paused_at(&ds, 0.5, move |st| st == GcStep::Marked(small));
    p.wait();
    ds.write(s, 0, &v1).unwrap();
    let rec = ds.snapshot_create("snap").unwrap();
    ds.write(s, 0, &unique(33, 8 * BS)).unwrap();
    ds.flush(s).unwrap();
    ds.unlink(ROOT, b"s").unwrap();
    p.resume();

    let snap_s = Node::Snap {
        index: rec.index,
        ino: s,
    }
    .id();
    assert_eq!(ds.node_read(snap_s, 0, (8 * BS) as u32).unwrap(), v1);
    // The versions before and after the snapshot are garbage now.
    let r = gc(&ds, 0.5);
    assert_eq!(r.chunks_freed, 16, "{r:?}");
    assert_eq!(ds.node_read(snap_s, 0, (8 * BS) as u32).unwrap(), v1);
    drop(ds);
    assert_fsck_clean(&store, true);
    let ds = open(&store);
    assert_eq!(ds.node_read(snap_s, 0, (8 * BS) as u32).unwrap(), v1);
    // Deleting the snapshot lets the next collection take v1 too.
    ds.snapshot_delete("snap").unwrap();
    let r = gc(&ds, 0.5);
    assert_eq!(r.chunks_freed, 8, "{r:?}");
    assert_eq!(ds.stats().unwrap().stored_bytes, BS as u64);
    drop(ds);
    assert_fsck_clean(&store, true);
}

// ---- crashes ----

/// The files a crash test must find intact.
struct Expect(Vec<(&'static str, Vec<u8>)>);

impl Expect {
    fn check(&self, ds: &Datastore, when: &str) {
        for (name, data) in &self.0 {
            assert!(get(ds, name) == *data, "{name} differs {when}");
        }
    }
}

/// Three sessions: two old packs with garbage in them and an empty active one.
fn crash_store() -> (tempfile::TempDir, PathBuf, Expect) {
    let (d, store) = new_store();
    let keep1 = unique(40, 64 * BS);
    let keep2 = unique(42, 16 * BS);
    let shared = keep1[..8 * BS].to_vec();
    {
        let ds = open(&store);
        put(&ds, ROOT, "keep1", &keep1);
        put(&ds, ROOT, "gone1", &unique(41, 64 * BS));
    }
    {
        let ds = open(&store);
        put(&ds, ROOT, "keep2", &keep2);
        put(&ds, ROOT, "gone2", &unique(43, 64 * BS));
        put(&ds, ROOT, "shared", &shared);
        ds.unlink(ROOT, b"gone1").unwrap();
        ds.unlink(ROOT, b"gone2").unwrap();
    }
    let expect = Expect(vec![("keep1", keep1), ("keep2", keep2), ("shared", shared)]);
    (d, store, expect)
}

/// A collection failed at each of its steps in turn loses nothing; what it leaves
/// behind is garbage that the next collection reclaims completely.
#[test]
fn crash_at_every_step_loses_nothing_and_leaks_only_garbage() {
    let mut steps_seen: Vec<GcStep> = Vec::new();
    for k in 0.. {
        let (_d, store, expect) = crash_store();
        let ds = open(&store);
        let calls = Arc::new(Mutex::new(Vec::new()));
        let log = calls.clone();
        let opts = GcOptions {
            compact_threshold: 0.75,
            failpoint: Some(Arc::new(move |step| {
                let mut l = log.lock().unwrap();
                l.push(step);
                if l.len() == k + 1 {
                    return Err(FsError::Invalid(format!("injected crash at {step:?}")));
                }
                Ok(())
            })),
            ..Default::default()
        };
        let result = collect(&ds, &opts, &|_| {});
        let crashed_at = calls.lock().unwrap().get(k).copied();
        match (&result, crashed_at) {
            (Err(FsError::Invalid(m)), Some(_)) => assert!(m.contains("injected"), "{m}"),
            (Ok(r), None) => {
                // Ran to the end: every step has been a crash point.
                assert!(r.packs_compacted == 2 && r.packs_deleted == 2, "{r:?}");
                steps_seen = calls.lock().unwrap().clone();
            }
            other => panic!("step {k}: unexpected {other:?}"),
        }
        expect.check(&ds, &format!("after a crash at {crashed_at:?}"));
        drop(ds);
        // Consistent on reopen, whatever the crash point.
        let r = fsck(&store, false).unwrap();
        assert!(r.clean, "crash at {crashed_at:?}: {r:#?}");
        let ds = open(&store);
        expect.check(
            &ds,
            &format!("after reopening from a crash at {crashed_at:?}"),
        );
        // The next collection reclaims whatever the crash left.
        gc(&ds, 1.0);
        expect.check(
            &ds,
            &format!("after the GC following a crash at {crashed_at:?}"),
        );
        assert_eq!(ds.stats().unwrap().stored_bytes, (64 + 16) * BS as u64);
        drop(ds);
        let f = assert_fsck_clean(&store, true);
        assert_eq!(f.garbage_pack_bytes, 0, "crash at {crashed_at:?}: {f:#?}");
        if crashed_at.is_none() {
            break;
        }
    }
    for want in [
        GcStep::Begun,
        GcStep::MarkDone,
        GcStep::Swept,
        GcStep::SweepDone,
        GcStep::Copied(0),
        GcStep::Repointed(0),
        GcStep::Deleting(0),
        GcStep::Deleted(0),
        GcStep::Deleted(1),
    ] {
        assert!(steps_seen.contains(&want), "{want:?} not in {steps_seen:?}");
    }
}

// ---- space ----

#[test]
fn deleted_space_comes_back() {
    let (_d, store) = new_store();
    let ds = open(&store);
    let small = unique(50, BS);
    put(&ds, ROOT, "small", &small);
    put(&ds, ROOT, "big", &unique(51, 8 << 20));
    let before = ds.stats().unwrap();
    assert_eq!(before.stored_bytes, (8 << 20) + BS as u64);
    assert!(before.pack_bytes >= before.stored_bytes);
    ds.unlink(ROOT, b"big").unwrap();
    let r = gc(&ds, 0.5);
    assert_eq!(r.chunks_freed, 2048, "{r:?}");
    assert!(r.bytes_freed >= 8 << 20, "{r:?}");
    let after = ds.stats().unwrap();
    assert_eq!((after.stored_bytes, after.chunks), (BS as u64, 1));
    // Only the small file's records are left in the packs: its chunk and its one-leaf
    // block map (data and header each).
    assert_eq!(after.nodes, 1, "{after:?}");
    assert_eq!(after.pack_bytes, BS as u64 + 40 + after.node_bytes + 40);
    assert_eq!(get(&ds, "small"), small);
    drop(ds);
    assert_eq!(assert_fsck_clean(&store, true).garbage_pack_bytes, 0);
    assert_eq!(get(&open(&store), "small"), small);
}

#[test]
fn one_collection_at_a_time() {
    let (_d, store) = new_store();
    let ds = open(&store);
    put(&ds, ROOT, "f", &unique(60, BS));
    let p = gc_paused_at(&ds, 0.5, |s| s == GcStep::MarkDone);
    p.wait();
    let second = collect(&ds, &GcOptions::default(), &|_| {});
    assert!(matches!(second, Err(FsError::Busy(_))), "{second:?}");
    p.resume();
    gc(&ds, 0.5);
}

#[test]
fn compaction_keeps_its_pace() {
    let (_d, store) = new_store();
    {
        let ds = open(&store);
        put(&ds, ROOT, "keep", &unique(70, 64 * BS));
        put(&ds, ROOT, "gone", &unique(71, 256 * BS));
        ds.unlink(ROOT, b"gone").unwrap();
    }
    let ds = open(&store);
    let opts = GcOptions {
        max_bytes_per_sec: Some(1 << 20),
        ..Default::default()
    };
    let start = Instant::now();
    let r = collect(&ds, &opts, &|_| {}).unwrap();
    assert_eq!(r.packs_compacted, 1, "{r:?}");
    // 64 blocks of 4 KiB plus headers at 1 MiB/s: at least a quarter second.
    assert!(start.elapsed() >= Duration::from_millis(250), "{r:?}");
    assert_eq!(get(&ds, "keep"), unique(70, 64 * BS));
}

// ---- integrity ----

/// Flips one bit of the stored copy of `block` (found by content in the packs).
fn damage_block(store: &Path, block: &[u8]) {
    use std::os::unix::fs::FileExt;
    for entry in std::fs::read_dir(store.join("packs")).unwrap() {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        if let Some(pos) = bytes.windows(block.len()).position(|w| w == block) {
            let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            f.write_all_at(&[bytes[pos + 100] ^ 0x10], (pos + 100) as u64)
                .unwrap();
            return;
        }
    }
    panic!("block not found in any pack");
}

#[test]
fn corruption_is_named_by_read_scrub_and_fsck() {
    let (_d, store) = new_store();
    let ds = open(&store);
    let vm = ds.mkdir(ROOT, b"vm", 0o755, WHO).unwrap().ino;
    let data = unique(80, 16 * BS);
    let disk = put(&ds, vm, "disk.raw", &data);
    ds.sync_all().unwrap();
    damage_block(&store, &data[5 * BS..6 * BS]);

    let err = ds.read(disk, 5 * BS as u64, BS as u32).unwrap_err();
    assert!(matches!(err, FsError::Corrupt { .. }), "{err}");
    assert_eq!(err.errno(), libc::EIO);
    // The other blocks still read.
    assert_eq!(
        ds.read(disk, 6 * BS as u64, BS as u32).unwrap(),
        data[6 * BS..7 * BS]
    );

    let r = scrub(&ds, &ScrubOptions::default(), &|_, _| {}).unwrap();
    assert!(!r.clean);
    assert_eq!((r.chunks_checked, r.damaged_chunks.len()), (16, 1));
    assert_eq!(r.damaged_blocks.len(), 1);
    let b = &r.damaged_blocks[0];
    assert_eq!(b.path.as_deref(), Some("/vm/disk.raw"));
    assert_eq!(
        (b.ino, b.offset, b.length),
        (disk.0, 5 * BS as u64, BS as u64)
    );

    // GC never copies a damaged chunk (that would make it look healthy): its pack stays.
    put(&ds, ROOT, "junk", &unique(81, BS));
    ds.unlink(ROOT, b"junk").unwrap();
    let r = gc(&ds, 1.0);
    assert_eq!(r.packs_skipped, 1, "{r:?}");
    drop(ds);

    let r = fsck(&store, false).unwrap();
    assert!(!r.clean);
    assert_eq!(r.found.damaged_chunks.len(), 1);
    assert!(r
        .found
        .damaged_blocks
        .iter()
        .any(|b| b.path.as_deref() == Some("/vm/disk.raw") && b.offset == 5 * BS as u64));
    // No pack holds a good copy: repair cannot help, and does no harm.
    let r = fsck(&store, true).unwrap();
    assert!(!r.clean);
    assert_eq!(r.repair.as_ref().unwrap().still_missing, 1);
    let ds = open(&store);
    let disk = ds.lookup(vm, b"disk.raw").unwrap().ino;
    assert!(ds.read(disk, 5 * BS as u64, BS as u32).is_err());
    assert_eq!(ds.read(disk, 0, (5 * BS) as u32).unwrap(), data[..5 * BS]);
}

/// Scrub on a live store: a collection that moves chunks and deletes their packs in the
/// middle of the scrub (run from its progress callback) causes no false damage.
#[test]
fn scrub_is_not_fooled_by_a_concurrent_compaction() {
    let (_d, store) = new_store();
    let keep = unique(90, 1500 * BS);
    {
        let ds = open(&store);
        put(&ds, ROOT, "keep", &keep);
        put(&ds, ROOT, "gone", &unique(91, 1500 * BS));
        ds.unlink(ROOT, b"gone").unwrap();
    }
    let ds = open(&store);
    let ran = Mutex::new(None);
    let r = scrub(&ds, &ScrubOptions::default(), &|done, _| {
        let mut ran = ran.lock().unwrap();
        if ran.is_none() {
            assert!(done < 3000);
            *ran = Some(gc(&ds, 0.75));
        }
    })
    .unwrap();
    let g = ran.into_inner().unwrap().expect("the collection ran");
    assert_eq!((g.chunks_freed, g.packs_compacted), (1500, 1), "{g:?}");
    assert!(r.clean, "{r:#?}");
    assert_eq!(get(&ds, "keep"), keep);
}

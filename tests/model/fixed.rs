//! Fixed tests of what a clone costs and of `du` numbers for a known layout.
//!
//! A file clone must be O(1): no chunk stored, no pack byte written, no block-map node
//! created, no data read, whatever the file's size. Node counts are read from the
//! metadata store directly while the datastore is closed.

use std::path::Path;

use thinfs::fs::Datastore;
use thinfs::meta::{Index, Meta};
use thinfs::{FsError, InodeNo};

use super::harness::{first_diff, fresh_store, open_store, reopen, retry_locked, who};

const ROOT: InodeNo = InodeNo::ROOT;

/// splitmix64: deterministic bytes that never dedup by accident.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n + 8);
        while v.len() < n {
            v.extend_from_slice(&self.next().to_le_bytes());
        }
        v.truncate(n);
        v
    }
}

fn create(ds: &Datastore, name: &str) -> InodeNo {
    ds.create(ROOT, name.as_bytes(), 0o644, who())
        .unwrap_or_else(|e| panic!("create {name}: {e}"))
        .ino
}

fn write_all(ds: &Datastore, ino: InodeNo, off: u64, data: &[u8]) {
    for (i, piece) in data.chunks(1 << 20).enumerate() {
        let at = off + (i << 20) as u64;
        let n = ds.write(ino, at, piece).expect("write");
        assert_eq!(n as usize, piece.len());
    }
}

fn read_all(ds: &Datastore, ino: InodeNo) -> Vec<u8> {
    let size = ds.getattr(ino).expect("getattr").size;
    let mut out = Vec::with_capacity(size as usize);
    while (out.len() as u64) < size {
        let got = ds.read(ino, out.len() as u64, 1 << 20).expect("read");
        assert!(!got.is_empty(), "short read at {} of {size}", out.len());
        out.extend_from_slice(&got);
    }
    out
}

#[track_caller]
fn assert_content(ds: &Datastore, ino: InodeNo, want: &[u8], what: &str) {
    let got = read_all(ds, ino);
    if let Some(i) = first_diff(&got, want) {
        panic!(
            "{what}: differs at byte {i} (len {} vs {}): got {:?}, want {:?}",
            got.len(),
            want.len(),
            got.get(i),
            want.get(i)
        );
    }
}

/// Block-map nodes in the node index (the datastore must be closed).
fn node_count(store: &Path) -> usize {
    let meta = retry_locked(|| Meta::open(&store.join("meta"))).expect("open metadata");
    assert_eq!(
        meta.legacy_node_ids().count(),
        0,
        "format 5 writes no node into sled"
    );
    meta.locs(Index::Nodes)
        .inspect(|n| assert!(n.is_ok(), "listing nodes: {n:?}"))
        .count()
}

#[test]
fn clone_of_a_1000_block_file_stores_no_chunk() {
    let (_dir, ds) = fresh_store(4096);
    let a = create(&ds, "A");
    let data = Rng(1).bytes(1000 * 4096);
    write_all(&ds, a, 0, &data);
    ds.fsync(a).unwrap();
    let before = ds.stats().unwrap();
    let (chunks_before, nodes_before) = ds.reachable().unwrap();
    assert_eq!(before.chunks, 1000, "{before:?}");

    let b = ds.clone_path(a, ROOT, b"B", false).unwrap();
    assert_eq!((b.size, b.blocks), (1000 * 4096, 1000 * 8), "{b:?}");
    let after = ds.stats().unwrap();
    assert_eq!(after.chunks, before.chunks, "clone stored chunks");
    assert_eq!(
        after.stored_bytes, before.stored_bytes,
        "clone stored bytes"
    );
    assert_eq!(after.pack_bytes, before.pack_bytes, "clone wrote to packs");
    assert_eq!(after.logical_bytes, 2 * before.logical_bytes);
    assert_eq!(after.allocated_bytes, 2 * before.allocated_bytes);
    assert_eq!(after.files, before.files + 1);
    let (chunks_after, nodes_after) = ds.reachable().unwrap();
    assert_eq!(
        chunks_after, chunks_before,
        "the clone reaches other chunks"
    );
    assert_eq!(nodes_after, nodes_before, "the clone made block-map nodes");
    assert_content(&ds, b.ino, &data, "clone");
}

#[test]
fn clone_reads_no_data() {
    // Destroy every stored byte, then clone: a clone that read (and verified) data fails.
    let (_dir, ds) = fresh_store(4096);
    let a = create(&ds, "A");
    write_all(&ds, a, 0, &Rng(2).bytes(64 * 4096));
    ds.fsync(a).unwrap();
    let store = ds.path().to_path_buf();
    drop(ds);
    for entry in std::fs::read_dir(store.join("packs")).unwrap() {
        let p = entry.unwrap().path();
        let len = std::fs::metadata(&p).unwrap().len();
        std::fs::write(&p, vec![0xA5u8; len as usize]).unwrap();
    }
    let ds = open_store(&store);
    let b = ds
        .clone_path(a, ROOT, b"B", false)
        .expect("clone must not need the data");
    assert_eq!((b.size, b.blocks), (64 * 4096, 64 * 8));
    match ds.read(b.ino, 0, 4096) {
        Err(e @ FsError::Corrupt { .. }) => assert_eq!(e.errno(), libc::EIO),
        other => panic!("the data was destroyed, yet reading the clone gives {other:?}"),
    }
}

#[test]
fn clone_cost_does_not_depend_on_file_size() {
    let (_dir, ds) = fresh_store(4096);
    let small = create(&ds, "small");
    write_all(&ds, small, 0, &Rng(3).bytes(4096));
    // 100,000 blocks, sparse-written: every 997th block and the last one.
    let big = create(&ds, "big");
    let mut rng = Rng(4);
    let mut written = Vec::new();
    for idx in (0..100_000u64).step_by(997).chain([99_999]) {
        let block = rng.bytes(4096);
        write_all(&ds, big, idx * 4096, &block);
        written.push((idx, block));
    }
    ds.fsync(small).unwrap();
    ds.fsync(big).unwrap();
    assert_eq!(ds.getattr(big).unwrap().size, 100_000 * 4096);
    let store = ds.path().to_path_buf();
    drop(ds);

    let mut new_nodes = Vec::new();
    for (src, name) in [(small, &b"small-clone"[..]), (big, &b"big-clone"[..])] {
        let before = node_count(&store);
        let ds = open_store(&store);
        let stats = ds.stats().unwrap();
        let reach = ds.reachable().unwrap();
        let c = ds.clone_path(src, ROOT, name, false).unwrap();
        assert_eq!(ds.getattr(src).unwrap().size, c.size);
        assert_eq!(ds.getattr(src).unwrap().blocks, c.blocks);
        let after = ds.stats().unwrap();
        assert_eq!(
            (after.chunks, after.stored_bytes, after.pack_bytes),
            (stats.chunks, stats.stored_bytes, stats.pack_bytes),
            "clone of {} stored data",
            String::from_utf8_lossy(name)
        );
        assert_eq!(ds.reachable().unwrap(), reach);
        if src == big {
            for (idx, block) in &written {
                let got = ds.read(c.ino, idx * 4096, 4096).unwrap();
                assert!(&got == block, "big clone block {idx} differs");
            }
        }
        drop(ds);
        new_nodes.push(node_count(&store) - before);
    }
    assert_eq!(
        new_nodes[0], new_nodes[1],
        "a 1-block and a 100,000-block clone create different numbers of nodes"
    );
    assert_eq!(new_nodes[0], 0, "a file clone shares the whole map");
}

/// Vec-model of one file for the isolation test.
fn model_write(m: &mut Vec<u8>, off: usize, data: &[u8]) {
    if m.len() < off + data.len() {
        m.resize(off + data.len(), 0);
    }
    m[off..off + data.len()].copy_from_slice(data);
}

#[test]
fn clone_isolation_both_ways() {
    for bs in [4096u32, 16384] {
        let (_dir, mut ds) = fresh_store(bs);
        let mut rng = Rng(5 + bs as u64);
        let a = create(&ds, "A");
        let mut ma = Vec::new();
        for (off, len) in [(0usize, 300 * 1024), (1 << 20, 20_000)] {
            let d = rng.bytes(len);
            write_all(&ds, a, off as u64, &d);
            model_write(&mut ma, off, &d);
        }
        // Half the steps before the first flush of the clone, half after fsyncs.
        let b = ds.clone_path(a, ROOT, b"B", false).unwrap().ino;
        let mut mb = ma.clone();
        for step in 0..40 {
            let (ino, m) = if rng.below(2) == 0 {
                (a, &mut ma)
            } else {
                (b, &mut mb)
            };
            let off = rng.below(1_300_000) as usize;
            let len = 1 + rng.below(20_000) as usize;
            if rng.below(5) == 0 {
                let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
                ds.fallocate(ino, off as u64, len as u64, mode).unwrap();
                let end = (off + len).min(m.len());
                if off < end {
                    m[off..end].fill(0);
                }
            } else {
                let d = rng.bytes(len);
                write_all(&ds, ino, off as u64, &d);
                model_write(m, off, &d);
            }
            if step >= 20 {
                ds.fsync(ino).unwrap();
            }
            assert_content(&ds, a, &ma, &format!("bs {bs} step {step}: A"));
            assert_content(&ds, b, &mb, &format!("bs {bs} step {step}: B"));
        }
        ds = reopen(ds);
        assert_content(&ds, a, &ma, &format!("bs {bs} after remount: A"));
        assert_content(&ds, b, &mb, &format!("bs {bs} after remount: B"));
    }
}

#[test]
fn du_of_a_clone_after_four_block_writes() {
    let bs = 4096u64;
    let (_dir, ds) = fresh_store(bs as u32);
    let mut rng = Rng(6);
    let a = create(&ds, "A");
    write_all(&ds, a, 0, &rng.bytes(64 * bs as usize));
    ds.fsync(a).unwrap();
    let b = ds.clone_path(a, ROOT, b"B", false).unwrap().ino;
    for idx in [0u64, 17, 18, 63] {
        write_all(&ds, b, idx * bs, &rng.bytes(bs as usize));
    }
    ds.fsync(b).unwrap();

    let ub = ds.du(&[b]).unwrap();
    assert_eq!(
        (ub.files, ub.logical_bytes, ub.stored_bytes),
        (1, 64 * bs, 64 * bs),
        "{ub:?}"
    );
    assert_eq!(ub.exclusive_bytes, 4 * bs, "du(B) {ub:?}");
    assert_eq!(ub.shared_bytes, 60 * bs, "du(B) {ub:?}");
    let ua = ds.du(&[a]).unwrap();
    assert_eq!(ua.exclusive_bytes, 4 * bs, "du(A) {ua:?}");
    assert_eq!(ua.shared_bytes, 60 * bs, "du(A) {ua:?}");
    let both = ds.du(&[ROOT]).unwrap();
    assert_eq!(
        (both.files, both.logical_bytes, both.stored_bytes),
        (2, 128 * bs, 128 * bs),
        "{both:?}"
    );
    assert_eq!(both.exclusive_bytes, 68 * bs, "du(/) {both:?}");
    let st = ds.stats().unwrap();
    assert_eq!(
        (st.chunks, st.stored_bytes, st.allocated_bytes),
        (68, 68 * bs, 128 * bs),
        "{st:?}"
    );
}

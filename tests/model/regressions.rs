//! Named regression tests: failures the property test found, reduced to a few calls.
//! Each says what the shrunk op sequence was, what the model expects and what the store
//! did before the fix (all five fixed in 37b15b2).

use thinfs::InodeNo;

use super::harness::{fresh_store, who};

const ROOT: InodeNo = InodeNo::ROOT;
const BS: u64 = 4096;

/// Property-test sequence: write one data block into /a; snapshot s0; write zeros over
/// that block (so /a's block is now a hole, still in the write-back buffer). Only s0
/// holds the chunk now, so deleting s0 would free it: `exclusive_bytes` must be 4096.
/// The store answers 0: `snapshot_list` walks the committed inode records without
/// flushing (where `stats` and `du` call `sync_all` first), so it still sees the old
/// block in the live tree.
#[test]
fn regression_snapshot_list_ignores_unflushed_writes() {
    let (_dir, ds) = fresh_store(BS as u32);
    let a = ds.create(ROOT, b"a", 0o644, who()).unwrap().ino;
    ds.write(a, 0, &[1]).unwrap();
    ds.snapshot_create("s0").unwrap();
    ds.write(a, 0, &[0]).unwrap();
    let listed = ds.snapshot_list().unwrap();
    assert_eq!(
        listed[0].exclusive_bytes, BS,
        "s0 alone holds the block /a no longer has: {listed:?}"
    );
}

/// Property-test sequence: write one block into /a; snapshot s0; du(/). s0 sees /a's
/// record, so deleting / would free nothing: `exclusive_bytes` must be 0 and the block
/// is shared ("stored bytes whose chunks other files or snapshots also use"). The store
/// answers exclusive 4096, shared 0: `du` skips every inode version equal to the live
/// record of a file inside the paths, and for a file unchanged since the snapshot that
/// is exactly the version the snapshot sees.
#[test]
fn regression_du_ignores_snapshots_of_unchanged_files() {
    let (_dir, ds) = fresh_store(BS as u32);
    let a = ds.create(ROOT, b"a", 0o644, who()).unwrap().ino;
    ds.write(a, 0, &[1]).unwrap();
    ds.snapshot_create("s0").unwrap();
    for roots in [[ROOT], [a]] {
        let u = ds.du(&roots).unwrap();
        assert_eq!(
            (u.exclusive_bytes, u.shared_bytes),
            (0, BS),
            "du({roots:?}): s0 holds the only block: {u:?}"
        );
    }
}

/// Found writing the `du` model: /A is 64 random blocks, /B its clone, 4 blocks of B
/// rewritten. Nothing outside {A, B} holds any of their 68 chunks, so du(/) must report
/// shared 0 ("stored bytes whose chunks other files or snapshots also use") and
/// exclusive 68 blocks. The store reports shared 60 blocks: it computes shared as
/// stored - exclusive, which counts blocks duplicated inside the paths as shared. The
/// same holds for one file whose blocks are equal to each other.
#[test]
fn regression_du_shared_counts_duplicates_inside_the_set() {
    let (_dir, ds) = fresh_store(BS as u32);
    let a = ds.create(ROOT, b"A", 0o644, who()).unwrap().ino;
    let data: Vec<u8> = (0..64 * BS)
        .map(|i| (i * 7 % 251) as u8 ^ (i >> 12) as u8)
        .collect();
    ds.write(a, 0, &data).unwrap();
    let b = ds.clone_path(a, ROOT, b"B", false).unwrap().ino;
    for idx in [0, 17, 18, 63] {
        ds.write(b, idx * BS, &vec![idx as u8 + 1; BS as usize])
            .unwrap();
    }
    let u = ds.du(&[ROOT]).unwrap();
    assert_eq!(u.exclusive_bytes, 68 * BS, "{u:?}");
    assert_eq!(u.shared_bytes, 0, "nothing outside / holds a chunk: {u:?}");

    let c = ds.create(ROOT, b"C", 0o644, who()).unwrap().ino;
    ds.write(c, 0, &vec![9u8; 8 * BS as usize]).unwrap();
    let u = ds.du(&[c]).unwrap();
    assert_eq!((u.stored_bytes, u.exclusive_bytes), (8 * BS, BS), "{u:?}");
    assert_eq!(u.shared_bytes, 0, "no other file holds C's chunk: {u:?}");
}

/// Property-test sequence (shrunk): snapshot s0 of /a; snapshot s2; rename /a over /b
/// (tombstones for the name "a" and for the old /b); delete s2. Deleting a snapshot must
/// not change the live tree, yet afterwards the root lists "a" again.
///
/// `Meta::sweep_versions` (run by `delete_snapshot`) drops the tombstone that heads the
/// versions of ("/", "a") because no snapshot sees it, and keeps the older version because
/// s0 sees it: with the tombstone gone that older version is the newest, so the live tree
/// sees it. The same resurrects unlinked files and deleted inodes.
#[test]
fn regression_snapshot_delete_resurrects_removed_names() {
    let (_dir, ds) = fresh_store(BS as u32);
    let a = ds.create(ROOT, b"a", 0o644, who()).unwrap().ino;
    ds.write(a, 0, b"old").unwrap();
    let gone = ds.create(ROOT, b"gone", 0o644, who()).unwrap().ino;
    ds.snapshot_create("s0").unwrap();
    ds.snapshot_create("s1").unwrap();
    ds.unlink(ROOT, b"gone").unwrap();
    ds.rename(ROOT, b"a", ROOT, b"b", 0).unwrap();
    ds.snapshot_delete("s1").unwrap();

    let names: Vec<Vec<u8>> = ds
        .readdir(ROOT)
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(names, vec![b"b".to_vec()], "live root after deleting s1");
    assert!(ds.lookup(ROOT, b"a").is_err(), "/a was renamed away");
    assert!(ds.getattr(gone).is_err(), "/gone was unlinked and closed");
    // s0 still sees the old tree.
    let s0 = ds.resolve_view(b".snapshots/s0/gone");
    assert!(s0.is_ok(), "s0 lost /gone: {s0:?}");
}

/// Property-test sequence (shrunk): open /a; unlink /a (it lives on while open); snapshot
/// s1; close /a (the last handle: the inode is deleted); roll back to s1. s1 saw /a's
/// inode with no name (nlink 0), and after the rollback no handle is open, so the inode
/// must not exist. The store restores it: `getattr` answers nlink 0, `stats` counts it,
/// and nothing will ever delete it (its orphan key went away with the close), so its
/// blocks leak.
#[test]
fn regression_rollback_restores_unlinked_open_files_as_leaks() {
    let (_dir, ds) = fresh_store(BS as u32);
    let a = ds.create(ROOT, b"a", 0o644, who()).unwrap().ino;
    ds.write(a, 0, &vec![7u8; BS as usize]).unwrap();
    ds.open_file(a).unwrap();
    ds.unlink(ROOT, b"a").unwrap();
    ds.snapshot_create("s1").unwrap();
    ds.release(a).unwrap();
    assert!(ds.getattr(a).is_err(), "closed after unlink: deleted");
    ds.snapshot_rollback("s1", false).unwrap();

    let attr = ds.getattr(a);
    assert!(
        attr.is_err(),
        "rollback brought back a nameless inode: {attr:?}"
    );
    let st = ds.stats().unwrap();
    assert_eq!((st.files, st.allocated_bytes), (0, 0), "{st:?}");
}

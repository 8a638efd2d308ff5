//! What survives a daemon crash (SIGKILL) and a clean unmount: every byte that
//! was fsynced, every write before a clean `umount`, stable inode numbers, and
//! the lifetime of unlinked-but-open files.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::common::*;

fn fsync_dir(p: &Path) {
    File::open(p).unwrap().sync_all().unwrap();
}

/// Writes `total` bytes of PRNG data over `files` files in writes of varied
/// size and order (including overwrites and a sparse gap), returning the model.
fn write_random_files(
    root: &Path,
    files: usize,
    total: usize,
    seed: u64,
) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut rng = Rng::new(seed);
    let mut model = BTreeMap::new();
    let per = total / files;
    for i in 0..files {
        let p = root.join(format!("data-{i}.bin"));
        let f = open_rw(&p);
        let mut content = vec![0u8; per];
        // Sequential writes of random sizes.
        let mut off = 0usize;
        while off < per {
            let n = (1 + rng.below(1024 * 1024) as usize).min(per - off);
            let chunk = rng.bytes(n);
            f.write_all_at(&chunk, off as u64).unwrap();
            content[off..off + n].copy_from_slice(&chunk);
            off += n;
        }
        // Overwrites at random unaligned offsets.
        for _ in 0..50 {
            let n = 1 + rng.below(100_000) as usize;
            let at = rng.below((per - n) as u64) as usize;
            let chunk = rng.bytes(n);
            f.write_all_at(&chunk, at as u64).unwrap();
            content[at..at + n].copy_from_slice(&chunk);
        }
        // A zero-filled hole in the middle of one file.
        if i == 0 {
            let at = per / 3;
            let len = 3 * 1024 * 1024 + 17;
            fallocate(
                &f,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                at as u64,
                len as u64,
            )
            .unwrap();
            content[at..at + len].fill(0);
        }
        f.sync_all().unwrap();
        model.insert(p, content);
    }
    fsync_dir(root);
    model
}

fn check_files(model: &BTreeMap<PathBuf, Vec<u8>>) {
    for (p, content) in model {
        let got = fs::read(p).unwrap_or_else(|e| panic!("read {p:?} after remount: {e}"));
        assert_same_bytes(&got, content, &format!("{p:?} after remount"));
    }
}

#[test]
fn fsynced_data_survives_kill9() {
    let mut m = Mount::new();
    let dir = m.path("vm");
    fs::create_dir(&dir).unwrap();
    fsync_dir(&m.mnt);
    let model = write_random_files(&dir, 4, 64 * MIB as usize, 20);
    m.kill9();
    m.remount();
    check_files(&model);
    let names: Vec<_> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(
        names.len(),
        model.len(),
        "directory listing after remount: {names:?}"
    );
    // And once more through a clean cycle.
    m.remount();
    check_files(&model);
}

#[test]
fn fsynced_metadata_survives_kill9() {
    let mut m = Mount::new();
    fs::create_dir_all(m.path("a/b")).unwrap();
    fs::write(m.path("a/b/f"), b"content").unwrap();
    File::open(m.path("a/b/f")).unwrap().sync_all().unwrap();
    fs::rename(m.path("a/b/f"), m.path("a/g")).unwrap();
    std::os::unix::fs::symlink("g", m.path("a/link")).unwrap();
    fs::hard_link(m.path("a/g"), m.path("a/b/hard")).unwrap();
    fs::set_permissions(
        m.path("a/g"),
        std::os::unix::fs::PermissionsExt::from_mode(0o751),
    )
    .unwrap();
    setxattr(&m.path("a/g"), "user.k", b"v", 0).unwrap();
    File::open(m.path("a/g")).unwrap().sync_all().unwrap();
    fsync_dir(&m.path("a/b"));
    fsync_dir(&m.path("a"));
    m.kill9();
    m.remount();
    assert_eq!(fs::read(m.path("a/g")).unwrap(), b"content");
    assert!(
        !m.path("a/b/f").exists(),
        "renamed-away name came back after kill -9"
    );
    assert_eq!(fs::read_link(m.path("a/link")).unwrap(), Path::new("g"));
    let md = fs::metadata(m.path("a/g")).unwrap();
    assert_eq!(md.mode() & 0o7777, 0o751);
    assert_eq!(md.nlink(), 2);
    assert_eq!(md.ino(), fs::metadata(m.path("a/b/hard")).unwrap().ino());
    assert_eq!(getxattr(&m.path("a/g"), "user.k").unwrap(), b"v");
}

#[test]
fn kill9_during_writes_keeps_fsynced_data_and_a_readable_store() {
    let mut m = Mount::new();
    let model = write_random_files(&m.mnt, 2, 16 * MIB as usize, 21);
    // Unsynced writes are in flight when the daemon dies.
    let busy = m.path("busy.bin");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let writer = std::thread::spawn(move || {
        let mut rng = Rng::new(22);
        let Ok(f) = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&busy)
        else {
            return;
        };
        let buf = rng.bytes(256 * 1024);
        let mut off = 0u64;
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            if f.write_all_at(&buf, off).is_err() {
                break;
            }
            off = (off + buf.len() as u64) % (64 * MIB);
        }
    });
    std::thread::sleep(std::time::Duration::from_millis(500));
    m.kill9();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().unwrap();
    m.remount();
    check_files(&model);
    // Whatever of busy.bin made it is readable end to end, without EIO.
    if let Ok(md) = fs::metadata(m.path("busy.bin")) {
        let got = fs::read(m.path("busy.bin")).expect("read half-written file after crash");
        assert_eq!(got.len() as u64, md.len());
    }
    // The store takes new writes after the crash.
    fs::write(m.path("after"), b"after crash").unwrap();
    m.remount();
    assert_eq!(fs::read(m.path("after")).unwrap(), b"after crash");
    check_files(&model);
}

#[test]
fn clean_umount_flushes_unsynced_writes() {
    let mut m = Mount::new();
    let mut rng = Rng::new(23);
    let mut model = BTreeMap::new();
    fs::create_dir(m.path("d")).unwrap();
    for i in 0..5 {
        let p = m.path(&format!("d/f{i}"));
        let data = rng.bytes((i + 1) * 1_700_001);
        fs::write(&p, &data).unwrap(); // no fsync anywhere
        model.insert(p, data);
    }
    fs::write(m.path("small"), b"tiny").unwrap();
    let st = m.unmount();
    assert!(
        st.success(),
        "daemon exit status after umount: {st}; log:\n{}",
        m.daemon_log()
    );
    m.remount();
    check_files(&model);
    assert_eq!(fs::read(m.path("small")).unwrap(), b"tiny");
}

#[test]
fn inode_numbers_stable_across_remount() {
    let mut m = Mount::new();
    fs::create_dir_all(m.path("x/y")).unwrap();
    fs::write(m.path("x/f"), b"f").unwrap();
    fs::write(m.path("x/y/g"), b"g").unwrap();
    fs::hard_link(m.path("x/f"), m.path("h")).unwrap();
    std::os::unix::fs::symlink("x/f", m.path("s")).unwrap();
    // Churn so numbers are not simply 2, 3, 4...
    for i in 0..20 {
        fs::write(m.path(&format!("tmp{i}")), b"").unwrap();
    }
    for i in 0..20 {
        fs::remove_file(m.path(&format!("tmp{i}"))).unwrap();
    }
    fs::write(m.path("late"), b"late").unwrap();
    let names = [".", "x", "x/y", "x/f", "x/y/g", "h", "s", "late"];
    let inos = |m: &Mount| -> Vec<u64> {
        names
            .iter()
            .map(|n| fs::symlink_metadata(m.path(n)).unwrap().ino())
            .collect()
    };
    let before = inos(&m);
    let mut uniq = before.clone();
    uniq.sort();
    uniq.dedup();
    assert_eq!(
        uniq.len(),
        names.len() - 1,
        "inode numbers not unique: {before:?}"
    );
    m.remount();
    assert_eq!(
        inos(&m),
        before,
        "inode numbers changed across clean remount"
    );
    // After fsync + kill -9 too.
    File::open(m.path("late")).unwrap().sync_all().unwrap();
    fsync_dir(&m.mnt);
    m.kill9();
    m.remount();
    assert_eq!(inos(&m), before, "inode numbers changed across kill -9");
    // New files never reuse a number of a live file.
    fs::write(m.path("newer"), b"").unwrap();
    let n = fs::metadata(m.path("newer")).unwrap().ino();
    assert!(!before.contains(&n), "new file got a live inode number {n}");
}

#[test]
fn unlinked_open_file_lives_until_close_then_is_gone_after_remount() {
    let mut m = Mount::new();
    let data = Rng::new(24).bytes(5 * MIB as usize);
    let p = m.path("tmpfile");
    fs::write(&p, &data).unwrap();
    let before = stats(&m.mnt);
    let f = open_rw(&p);
    fs::remove_file(&p).unwrap();
    f.write_all_at(b"still alive", 0).unwrap();
    f.sync_all().unwrap();
    let mut expect = data.clone();
    expect[..11].copy_from_slice(b"still alive");
    assert_same_bytes(
        &read_at(&f, 0, expect.len()),
        &expect,
        "unlinked file via fd",
    );
    drop(f);
    m.remount();
    assert!(
        !p.exists(),
        "unlinked file reappeared after close + remount"
    );
    assert_eq!(fs::read_dir(&m.mnt).unwrap().count(), 0);
    let after = stats(&m.mnt);
    assert_eq!(
        after.logical_bytes, 0,
        "logical bytes still count the removed file"
    );
    assert!(
        before.logical_bytes >= data.len() as u64,
        "stats before did not count the file: {before:?}"
    );
}

#[test]
fn unlinked_open_file_after_kill9_does_not_come_back() {
    let mut m = Mount::new();
    fs::write(m.path("keep"), b"keep").unwrap();
    fs::write(m.path("orphan"), Rng::new(25).bytes(MIB as usize)).unwrap();
    let f = open_rw(&m.path("orphan"));
    fs::remove_file(m.path("orphan")).unwrap();
    File::open(m.path("keep")).unwrap().sync_all().unwrap();
    fsync_dir(&m.mnt);
    m.kill9();
    drop(f);
    m.remount();
    assert!(!m.path("orphan").exists());
    let names: Vec<_> = fs::read_dir(&m.mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, vec!["keep".to_string()]);
}

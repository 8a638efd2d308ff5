//! Metadata-only clones: `thinfs clone` of files and trees, isolation after
//! the clone, copy_file_range (what coreutils `cp` and `qemu-img convert -C`
//! use) sharing blocks, and `thinfs du` accounting of shared bytes.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use super::common::*;

fn clone_ok(src: &Path, dst: &Path) {
    let out = thinfs([OsStr::new("clone"), src.as_os_str(), dst.as_os_str()]);
    assert!(
        out.status.success(),
        "thinfs clone {src:?} {dst:?}: {}",
        describe(&out)
    );
}

const CLONE_OPTS: SnapOpts = SnapOpts {
    mtimes: true,
    dir_mtimes: false,
    owners: true,
    xattrs: true,
};

#[test]
fn clone_file_copies_content_mode_and_xattrs_without_new_data() {
    let m = Mount::new();
    let a = m.path("a.img");
    let data = Rng::new(60).bytes(8 * MIB as usize + 1234);
    fs::write(&a, &data).unwrap();
    fs::set_permissions(&a, fs::Permissions::from_mode(0o640)).unwrap();
    setxattr(&a, "user.vm", b"guest-1", 0).unwrap();
    File::open(&a).unwrap().sync_all().unwrap();
    let before = stats(&m.mnt);
    let b = m.path("b.img");
    clone_ok(&a, &b);
    assert_same_bytes(&fs::read(&b).unwrap(), &data, "clone content");
    let (ma, mb) = (fs::metadata(&a).unwrap(), fs::metadata(&b).unwrap());
    assert_ne!(ma.ino(), mb.ino(), "a clone is a new inode");
    assert_eq!(mb.mode() & 0o7777, 0o640);
    assert_eq!(mb.len(), ma.len());
    assert_eq!(mb.nlink(), 1);
    assert_eq!(getxattr(&b, "user.vm").unwrap(), b"guest-1");
    let after = stats(&m.mnt);
    assert_eq!(
        after.logical_bytes,
        before.logical_bytes + data.len() as u64
    );
    assert!(
        after.stored_bytes <= before.stored_bytes + 64 * KIB,
        "clone stored new data: {} -> {}",
        before.stored_bytes,
        after.stored_bytes
    );
    // Clone of a clone, and clone into a subdirectory.
    fs::create_dir(m.path("sub")).unwrap();
    clone_ok(&b, &m.path("sub/c.img"));
    assert_same_bytes(
        &fs::read(m.path("sub/c.img")).unwrap(),
        &data,
        "clone of a clone",
    );
    // Clones survive a remount.
    let mut m = m;
    m.remount();
    assert_same_bytes(&fs::read(&b).unwrap(), &data, "clone after remount");
}

#[test]
fn clone_directory_tree_keeps_links_modes_xattrs() {
    let m = Mount::new();
    let src = m.path("vm");
    let outside = m.scratch().join("tree");
    make_sample_tree(&outside, 61);
    run_ok(
        Command::new("rsync")
            .arg("-aHX")
            .arg(format!("{}/", outside.display()))
            .arg(&src),
    );
    cvt(unsafe { libc::mkfifo(cpath(&src.join("fifo")).as_ptr(), 0o600) }).unwrap();
    let dst = m.path("vm-clone");
    clone_ok(&src, &dst);
    assert_trees_equal(&src, &dst, CLONE_OPTS);
    assert!(fs::metadata(dst.join("a/b")).unwrap().mode() & 0o7777 == 0o750);
    // Hard links inside the clone stay linked to each other, not to the source.
    let c1 = fs::metadata(dst.join("a/odd.bin")).unwrap();
    let c2 = fs::metadata(dst.join("hard-odd.bin")).unwrap();
    let s1 = fs::metadata(src.join("a/odd.bin")).unwrap();
    assert_eq!(c1.ino(), c2.ino(), "hard link pair split by clone");
    assert_ne!(c1.ino(), s1.ino(), "clone shares an inode with the source");
    assert_eq!(c1.nlink(), 2);
    assert_eq!(s1.nlink(), 2);
    // Writing through one clone name shows through the other, not in the source.
    open_rw(&dst.join("a/odd.bin"))
        .write_all_at(b"CLONE", 0)
        .unwrap();
    assert_eq!(&fs::read(dst.join("hard-odd.bin")).unwrap()[..5], b"CLONE");
    assert_ne!(&fs::read(src.join("hard-odd.bin")).unwrap()[..5], b"CLONE");
    // The clone is an independent namespace.
    fs::write(dst.join("new-in-clone"), b"n").unwrap();
    assert!(!src.join("new-in-clone").exists());
    fs::remove_file(src.join("small.txt")).unwrap();
    assert!(dst.join("small.txt").exists());
    assert_eq!(
        fs::read_link(dst.join("link-rel")).unwrap(),
        Path::new("a/b/c/deep.txt")
    );
    assert!(fs::symlink_metadata(dst.join("fifo"))
        .unwrap()
        .file_type()
        .is_fifo());
    // No inode number in the clone is shared with the source tree.
    let src_inos: std::collections::BTreeSet<u64> = walk_inos(&src).into_iter().collect();
    for ino in walk_inos(&dst) {
        assert!(
            !src_inos.contains(&ino),
            "inode {ino} appears in source and clone"
        );
    }
}

fn walk_inos(root: &Path) -> Vec<u64> {
    let mut v = vec![fs::metadata(root).unwrap().ino()];
    for e in fs::read_dir(root).unwrap() {
        let e = e.unwrap();
        let md = fs::symlink_metadata(e.path()).unwrap();
        v.push(md.ino());
        if md.is_dir() {
            v.extend(walk_inos(&e.path()));
        }
    }
    v
}

#[test]
fn clone_isolation_both_ways() {
    let m = Mount::with_block_size("16K");
    let a = m.path("a.img");
    let b = m.path("b.img");
    let size = 4 * MIB as usize;
    let mut model_a = Rng::new(62).bytes(size);
    fs::write(&a, &model_a).unwrap();
    clone_ok(&a, &b);
    let mut model_b = model_a.clone();
    let fa = open_rw(&a);
    let fb = open_rw(&b);
    let mut rng = Rng::new(63);
    for round in 0..200 {
        let len = 1 + rng.below(40_000) as usize;
        let off = rng.below((size + 100_000) as u64) as usize;
        let data = rng.bytes(len);
        let (f, model) = if round % 2 == 0 {
            (&fb, &mut model_b)
        } else {
            (&fa, &mut model_a)
        };
        f.write_all_at(&data, off as u64).unwrap();
        if model.len() < off + len {
            model.resize(off + len, 0);
        }
        model[off..off + len].copy_from_slice(&data);
        if round % 50 == 49 {
            assert_same_bytes(
                &read_at(&fa, 0, model_a.len() + 10),
                &model_a,
                "source after writes",
            );
            assert_same_bytes(
                &read_at(&fb, 0, model_b.len() + 10),
                &model_b,
                "clone after writes",
            );
        }
    }
    // Truncate and punch on one side only.
    fb.set_len(MIB).unwrap();
    model_b.truncate(MIB as usize);
    fallocate(
        &fa,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        0,
        64 * KIB,
    )
    .unwrap();
    model_a[..64 * 1024].fill(0);
    drop((fa, fb));
    assert_same_bytes(&fs::read(&a).unwrap(), &model_a, "source at end");
    assert_same_bytes(&fs::read(&b).unwrap(), &model_b, "clone at end");
    let mut m = m;
    m.remount();
    assert_same_bytes(&fs::read(&a).unwrap(), &model_a, "source after remount");
    assert_same_bytes(&fs::read(&b).unwrap(), &model_b, "clone after remount");
}

#[test]
fn clone_sees_unflushed_writes() {
    let m = Mount::new();
    let a = m.path("a.img");
    let f = open_rw(&a);
    let data = Rng::new(64).bytes(3 * MIB as usize + 99);
    f.write_all_at(&data, 0).unwrap();
    // No fsync, fd still open: the clone must include what was written.
    let b = m.path("b.img");
    clone_ok(&a, &b);
    assert_same_bytes(
        &fs::read(&b).unwrap(),
        &data,
        "clone of a file with unflushed writes",
    );
    // A directory clone as well.
    fs::create_dir(m.path("d")).unwrap();
    let g = open_rw(&m.path("d/x"));
    g.write_all_at(b"fresh bytes", 0).unwrap();
    clone_ok(&m.path("d"), &m.path("d2"));
    assert_eq!(fs::read(m.path("d2/x")).unwrap(), b"fresh bytes");
    drop((f, g));
}

#[test]
fn clone_refuses_existing_destination_unless_forced() {
    let m = Mount::new();
    fs::write(m.path("a"), b"source").unwrap();
    fs::write(m.path("b"), b"existing").unwrap();
    fs::create_dir(m.path("d")).unwrap();
    let out = thinfs([
        OsStr::new("clone"),
        m.path("a").as_os_str(),
        m.path("b").as_os_str(),
    ]);
    assert_fails_one_line(&out, 1, "clone onto an existing file");
    assert_eq!(fs::read(m.path("b")).unwrap(), b"existing");
    let out = thinfs([
        OsStr::new("clone"),
        m.path("d").as_os_str(),
        m.path("b").as_os_str(),
    ]);
    assert_fails_one_line(&out, 1, "clone a dir onto an existing file");
    let out = thinfs([
        OsStr::new("clone"),
        m.path("missing").as_os_str(),
        m.path("c").as_os_str(),
    ]);
    assert_fails_one_line(&out, 1, "clone of a missing source");
    assert!(!m.path("c").exists());
    // A destination outside any thinfs mount.
    let out = thinfs([
        OsStr::new("clone"),
        m.path("a").as_os_str(),
        m.scratch().join("outside").as_os_str(),
    ]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "clone out of the mount: {}",
        describe(&out)
    );
}

#[test]
fn clone_result_is_visible_at_once() {
    let m = Mount::new();
    fs::write(m.path("a"), b"source").unwrap();
    fs::write(m.path("b"), b"existing").unwrap();
    // The kernel has cached "b" (positive) and "c" (negative) dentries; the clone
    // happens outside the VFS, so the daemon must invalidate them.
    assert_eq!(fs::read(m.path("b")).unwrap(), b"existing");
    assert!(!m.path("c").exists());
    clone_ok(&m.path("a"), &m.path("c"));
    let got = fs::read(m.path("c"));
    assert!(
        matches!(&got, Ok(v) if v == b"source"),
        "new clone not visible right away (stale negative dentry?): {got:?}"
    );
    let out = thinfs([
        OsStr::new("clone"),
        m.path("a").as_os_str(),
        m.path("b").as_os_str(),
        OsStr::new("--force"),
    ]);
    assert!(out.status.success(), "clone --force: {}", describe(&out));
    let got = fs::read(m.path("b"));
    assert!(
        matches!(&got, Ok(v) if v == b"source"),
        "after clone --force, DST does not read as the source right away \
         (stale kernel dentry for the replaced name?): {got:?}"
    );
    // --force of a directory over an existing directory: either it replaces the
    // tree (and the old content is gone at once) or it refuses cleanly and leaves
    // the destination alone.
    fs::create_dir(m.path("d1")).unwrap();
    fs::write(m.path("d1/x"), b"x1").unwrap();
    fs::create_dir(m.path("d2")).unwrap();
    fs::write(m.path("d2/y"), b"y2").unwrap();
    assert_eq!(fs::read(m.path("d2/y")).unwrap(), b"y2");
    let out = thinfs([
        OsStr::new("clone"),
        m.path("d1").as_os_str(),
        m.path("d2").as_os_str(),
        OsStr::new("--force"),
    ]);
    if out.status.success() {
        assert_eq!(fs::read(m.path("d2/x")).unwrap(), b"x1");
        assert!(
            !m.path("d2/y").exists(),
            "old content of a --force-replaced directory still visible"
        );
    } else {
        assert_fails_one_line(&out, 1, "clone --force of a directory over a directory");
        assert_eq!(fs::read(m.path("d2/y")).unwrap(), b"y2");
        assert!(
            !m.path("d2/x").exists(),
            "a refused clone --force changed the destination"
        );
    }
}

#[test]
fn cp_uses_copy_file_range_and_stores_nothing_new() {
    let m = Mount::new();
    let a = m.path("a.img");
    let data = Rng::new(65).bytes(64 * MIB as usize);
    fs::write(&a, &data).unwrap();
    File::open(&a).unwrap().sync_all().unwrap();
    let before = stats(&m.mnt);
    let b = m.path("b.img");
    run_ok(Command::new("cp").arg(&a).arg(&b));
    File::open(&b).unwrap().sync_all().unwrap();
    let after = stats(&m.mnt);
    run_ok(Command::new("cmp").arg(&a).arg(&b));
    assert_eq!(after.logical_bytes, before.logical_bytes + 64 * MIB);
    assert!(
        after.stored_bytes <= before.stored_bytes + 256 * KIB,
        "cp stored new data: {} -> {} (copy_file_range not sharing blocks?)",
        before.stored_bytes,
        after.stored_bytes
    );
    // The copy is independent.
    open_rw(&b).write_all_at(b"diverge", 10 * MIB).unwrap();
    assert_same_bytes(
        &fs::read(&a).unwrap(),
        &data,
        "source after writing the cp copy",
    );
}

#[test]
fn qemu_img_convert_with_copy_offload_shares_blocks() {
    let m = Mount::with_block_size("16K");
    let src = m.path("src.raw");
    let f = open_rw(&src);
    f.set_len(64 * MIB).unwrap();
    let mut rng = Rng::new(66);
    for i in 0..8u64 {
        f.write_all_at(&rng.bytes(2 * MIB as usize), i * 8 * MIB)
            .unwrap();
    }
    f.sync_all().unwrap();
    drop(f);
    let before = stats(&m.mnt);
    let dst = m.path("dst.raw");
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-C", "-f", "raw", "-O", "raw"])
            .arg(&src)
            .arg(&dst),
    );
    run_ok(
        Command::new("qemu-img")
            .args(["compare", "-q"])
            .arg(&src)
            .arg(&dst),
    );
    File::open(&dst).unwrap().sync_all().unwrap();
    let after = stats(&m.mnt);
    assert!(
        after.stored_bytes <= before.stored_bytes + 256 * KIB,
        "qemu-img convert -C stored new data: {} -> {}",
        before.stored_bytes,
        after.stored_bytes
    );
}

#[test]
fn copy_file_range_unaligned_matches_model() {
    let m = Mount::with_block_size("16K");
    let mut rng = Rng::new(67);
    let src_p = m.path("src");
    let dst_p = m.path("dst");
    let mut src_model = rng.bytes(MIB as usize + 777);
    let mut dst_model = rng.bytes(300_001);
    fs::write(&src_p, &src_model).unwrap();
    fs::write(&dst_p, &dst_model).unwrap();
    let src = open_rw(&src_p);
    let dst = open_rw(&dst_p);
    for round in 0..120 {
        // Sometimes copy within the same file (non-overlapping), sometimes across.
        let same = round % 5 == 4;
        let (from, from_model_len) = if same {
            (&dst, dst_model.len())
        } else {
            (&src, src_model.len())
        };
        let mut off_in = rng.below(from_model_len as u64 + 50_000);
        let len = if rng.below(4) == 0 {
            (rng.below(8) + 1) * 16 * 1024
        } else {
            1 + rng.below(200_000)
        } as usize;
        let mut off_out = rng.below(dst_model.len() as u64 + 100_000);
        if round % 7 == 0 {
            // Block-aligned case, where sharing is possible.
            off_in -= off_in % (16 * KIB);
            off_out -= off_out % (16 * KIB);
        }
        if same {
            let (a, b) = (off_in, off_out);
            let overlap = a < b + len as u64 && b < a + len as u64;
            if overlap {
                continue;
            }
        }
        let expect = len.min(from_model_len.saturating_sub(off_in as usize));
        let mut done = 0usize;
        while done < expect {
            let n = copy_file_range(
                from,
                off_in + done as u64,
                &dst,
                off_out + done as u64,
                len - done,
            )
            .unwrap_or_else(|e| {
                panic!("round {round}: copy_file_range({off_in}, {off_out}, {len}): {e}")
            });
            if n == 0 {
                break;
            }
            done += n;
        }
        assert_eq!(
            done, expect,
            "round {round}: copy_file_range({off_in}->{off_out}, {len}) copied {done}, expected {expect}"
        );
        let end = off_out as usize + done;
        if done > 0 {
            let from_model = if same { &dst_model } else { &src_model };
            let chunk = from_model[off_in as usize..off_in as usize + done].to_vec();
            if dst_model.len() < end {
                dst_model.resize(end, 0);
            }
            dst_model[off_out as usize..end].copy_from_slice(&chunk);
        }
        // Occasionally change the source after copying: the copy must not follow.
        if round % 10 == 3 {
            let at = rng.below(src_model.len() as u64 - 100) as usize;
            src.write_all_at(b"MUTATED", at as u64).unwrap();
            let n = 7.min(src_model.len() - at);
            src_model[at..at + n].copy_from_slice(&b"MUTATED"[..n]);
        }
        let got = read_at(&dst, 0, dst_model.len() + 10);
        assert_same_bytes(&got, &dst_model, &format!("dst after round {round}"));
    }
    let got = read_at(&src, 0, src_model.len() + 10);
    assert_same_bytes(&got, &src_model, "src at the end");
    drop((src, dst));
    let mut m = m;
    m.remount();
    assert_same_bytes(&fs::read(&dst_p).unwrap(), &dst_model, "dst after remount");
}

/// `thinfs du PATH... --json`: one JSON object for all the paths together.
#[derive(Debug)]
struct Du {
    logical: u64,
    stored: u64,
    shared: u64,
    exclusive: u64,
}

fn du(paths: &[&Path]) -> Du {
    let mut args = vec![OsStr::new("du")];
    args.extend(paths.iter().map(|p| p.as_os_str()));
    args.push(OsStr::new("--json"));
    let out = thinfs(&args);
    assert!(out.status.success(), "thinfs du: {}", describe(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("du output is not JSON ({e}): {}", describe(&out)));
    let g = |k: &str| {
        v.get(k)
            .and_then(|x| x.as_u64())
            .unwrap_or_else(|| panic!("du JSON lacks {k}: {v}"))
    };
    Du {
        logical: g("logical_bytes"),
        stored: g("stored_bytes"),
        shared: g("shared_bytes"),
        exclusive: g("exclusive_bytes"),
    }
}

#[test]
fn du_reports_shared_and_exclusive_bytes() {
    let m = Mount::with_block_size("16K");
    let a = m.path("A");
    let b = m.path("B");
    fs::write(&a, Rng::new(68).bytes(MIB as usize)).unwrap();
    File::open(&a).unwrap().sync_all().unwrap();
    clone_ok(&a, &b);
    let fb = open_rw(&b);
    fb.write_all_at(&Rng::new(69).bytes(64 * 1024), 256 * KIB)
        .unwrap();
    fb.sync_all().unwrap();
    drop(fb);
    let near = |x: u64, want: u64| x.abs_diff(want) <= 16 * KIB;
    let r = [du(&[&a]), du(&[&b])];
    for (name, d) in ["A", "B"].iter().zip(&r) {
        assert_eq!(d.logical, MIB, "{name}: {d:?}");
        assert!(
            near(d.shared, MIB - 64 * KIB),
            "{name}: shared should be ~960 KiB: {d:?}"
        );
        assert!(
            near(d.exclusive, 64 * KIB),
            "{name}: exclusive should be ~64 KiB: {d:?}"
        );
        assert!(
            near(d.stored, MIB),
            "{name}: stored should be ~1 MiB: {d:?}"
        );
    }
    // Both paths together: logical sizes add up.
    let both = du(&[&a, &b]);
    assert_eq!(both.logical, 2 * MIB, "{both:?}");
    // A fresh file shares nothing.
    fs::write(m.path("C"), Rng::new(70).bytes(200 * 1024)).unwrap();
    File::open(m.path("C")).unwrap().sync_all().unwrap();
    let c = du(&[&m.path("C")]);
    assert_eq!(c.shared, 0, "{c:?}");
    assert!(near(c.exclusive, 200 * KIB), "{c:?}");
    // Plain du output (no --json) works too.
    let out = thinfs([OsStr::new("du"), a.as_os_str()]);
    assert!(
        out.status.success() && !out.stdout.is_empty(),
        "{}",
        describe(&out)
    );
}

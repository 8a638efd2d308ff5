//! Snapshots through a real mount: read-only trees under `<mnt>/.snapshots/NAME`,
//! crash-consistent cuts of live writers, backups of a snapshot with rsync and tar,
//! inode numbers, sparse files, clones from snapshots, rollback, delete + GC, durability
//! across remount and kill -9, name validation, the quiesce hooks and the snapdir name.
//!
//! Every test makes its own store and mountpoint (`common::Mount`); they need root and
//! /dev/fuse, and rsync, tar, attr and diffutils on PATH (`scripts/test.sh` installs them).

#![allow(dead_code)]

#[path = "integration/common.rs"]
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::sleep;
use std::time::{Duration, Instant};

use common::*;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// Every field a backup must preserve.
const ALL: SnapOpts = SnapOpts {
    mtimes: true,
    dir_mtimes: true,
    owners: true,
    xattrs: true,
};

/// Everything but directory mtimes (which tools set in their own order).
const NO_DIR_MTIMES: SnapOpts = SnapOpts {
    mtimes: true,
    dir_mtimes: false,
    owners: true,
    xattrs: true,
};

/// `thinfs snapshot ACTION ARGS... --mount MNT`.
fn snapshot_cmd(m: &Mount, action: &str, args: &[&OsStr]) -> Output {
    let mut v: Vec<OsString> = vec!["snapshot".into(), action.into()];
    v.extend(args.iter().map(|a| a.to_os_string()));
    v.push("--mount".into());
    v.push(m.mnt.clone().into_os_string());
    thinfs(&v)
}

fn create(m: &Mount, name: &str) -> Output {
    snapshot_cmd(m, "create", &[OsStr::new(name)])
}

#[track_caller]
fn create_ok(m: &Mount, name: &str) {
    let out = create(m, name);
    assert!(
        out.status.success(),
        "snapshot create {name:?} failed: {}",
        describe(&out)
    );
}

fn delete(m: &Mount, name: &str) -> Output {
    snapshot_cmd(m, "delete", &[OsStr::new(name)])
}

#[track_caller]
fn delete_ok(m: &Mount, name: &str) {
    let out = delete(m, name);
    assert!(
        out.status.success(),
        "snapshot delete {name:?} failed: {}",
        describe(&out)
    );
}

fn rollback(m: &Mount, name: &str, force: bool) -> Output {
    let mut args = vec![OsStr::new(name), OsStr::new("--yes")];
    if force {
        args.push(OsStr::new("--force"));
    }
    snapshot_cmd(m, "rollback", &args)
}

/// `snapshot list --json`, parsed.
#[track_caller]
fn list(m: &Mount) -> Vec<serde_json::Value> {
    let out = snapshot_cmd(m, "list", &[OsStr::new("--json")]);
    assert!(out.status.success(), "snapshot list: {}", describe(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("snapshot list --json is not JSON ({e}): {}", describe(&out)));
    v.as_array()
        .unwrap_or_else(|| panic!("snapshot list --json is not an array: {v}"))
        .clone()
}

/// Sorted snapshot names from `snapshot list --json`.
#[track_caller]
fn names(m: &Mount) -> Vec<String> {
    let mut n: Vec<String> = list(m)
        .iter()
        .map(|s| {
            s["name"]
                .as_str()
                .unwrap_or_else(|| panic!("snapshot without a name: {s}"))
                .to_string()
        })
        .collect();
    n.sort();
    n
}

/// `MNT/.snapshots/NAME/REL`.
fn sp(m: &Mount, name: &str, rel: &str) -> PathBuf {
    let p = m.mnt.join(".snapshots").join(name);
    if rel.is_empty() {
        p
    } else {
        p.join(rel)
    }
}

/// Sorted entry names of a directory.
fn ls(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read_dir {dir:?}: {e}"))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn write_synced(p: &Path, data: &[u8]) {
    let f = File::create(p).unwrap_or_else(|e| panic!("create {p:?}: {e}"));
    f.write_all_at(data, 0).unwrap();
    f.sync_all().unwrap();
}

fn open_rw(p: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(p)
        .unwrap_or_else(|e| panic!("open {p:?}: {e}"))
}

fn open_flags(p: &Path, flags: i32) -> io::Result<File> {
    let acc = flags & libc::O_ACCMODE;
    OpenOptions::new()
        .read(acc == libc::O_RDONLY || acc == libc::O_RDWR)
        .write(acc == libc::O_WRONLY || acc == libc::O_RDWR)
        .custom_flags(flags & !libc::O_ACCMODE)
        .open(p)
}

fn lchown(p: &Path, uid: u32, gid: u32) -> io::Result<()> {
    cvt(unsafe { libc::lchown(cpath(p).as_ptr(), uid, gid) }).map(|_| ())
}

fn chown(p: &Path, uid: u32, gid: u32) -> io::Result<()> {
    cvt(unsafe { libc::chown(cpath(p).as_ptr(), uid, gid) }).map(|_| ())
}

/// utimensat(AT_FDCWD, p, [atime, mtime], AT_SYMLINK_NOFOLLOW).
fn set_times(p: &Path, atime: (i64, i64), mtime: (i64, i64)) -> io::Result<()> {
    let ts = [
        libc::timespec {
            tv_sec: atime.0,
            tv_nsec: atime.1,
        },
        libc::timespec {
            tv_sec: mtime.0,
            tv_nsec: mtime.1,
        },
    ];
    cvt(unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            cpath(p).as_ptr(),
            ts.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(|_| ())
}

fn truncate(p: &Path, len: u64) -> io::Result<()> {
    cvt(unsafe { libc::truncate(cpath(p).as_ptr(), len as i64) }).map(|_| ())
}

fn mkfifo(p: &Path) -> io::Result<()> {
    cvt(unsafe { libc::mkfifo(cpath(p).as_ptr(), 0o644) }).map(|_| ())
}

fn mknod_reg(p: &Path) -> io::Result<()> {
    cvt(unsafe { libc::mknod(cpath(p).as_ptr(), libc::S_IFREG | 0o644, 0) }).map(|_| ())
}

fn rename_exchange(a: &Path, b: &Path) -> io::Result<()> {
    cvt(unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            cpath(a).as_ptr(),
            libc::AT_FDCWD,
            cpath(b).as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    })
    .map(|_| ())
}

/// Asserts `res` failed with one of `errnos`.
#[track_caller]
fn assert_errno_in<T: std::fmt::Debug>(res: io::Result<T>, errnos: &[i32], what: &str) {
    match res {
        Ok(v) => panic!("{what}: expected one of errnos {errnos:?} but it succeeded ({v:?})"),
        Err(e) => assert!(
            e.raw_os_error().is_some_and(|c| errnos.contains(&c)),
            "{what}: expected one of errnos {errnos:?} ({}), got {e}",
            errnos
                .iter()
                .map(|c| io::Error::from_raw_os_error(*c).to_string())
                .collect::<Vec<_>>()
                .join(" / ")
        ),
    }
}

/// Whether an error message shows exit status `code` of a hook.
fn shows_status(err: &str, code: i32) -> bool {
    [
        format!("status: {code}"),
        format!("status {code}"),
        format!("code {code}"),
        format!("code: {code}"),
        format!("exited with {code}"),
    ]
    .iter()
    .any(|p| err.contains(p.as_str()))
}

/// Relative path -> st_ino of every entry below `root` (not following symlinks).
fn inode_map(root: &Path) -> BTreeMap<PathBuf, u64> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, u64>) {
        for e in fs::read_dir(dir).unwrap_or_else(|e| panic!("read_dir {dir:?}: {e}")) {
            let p = e.unwrap().path();
            let md = fs::symlink_metadata(&p).unwrap();
            out.insert(p.strip_prefix(root).unwrap().to_path_buf(), md.ino());
            if md.is_dir() {
                walk(root, &p, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    out.insert(PathBuf::from("."), fs::metadata(root).unwrap().ino());
    walk(root, root, &mut out);
    out
}

/// The data extents of a file as SEEK_DATA / SEEK_HOLE report them, walking from 0.
fn data_extents(f: &File) -> Vec<(u64, u64)> {
    let size = f.metadata().unwrap().len();
    let mut out = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        let start = match lseek(f, pos, libc::SEEK_DATA) {
            Ok(s) => s,
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => break,
            Err(e) => panic!("SEEK_DATA at {pos}: {e}"),
        };
        let end = lseek(f, start, libc::SEEK_HOLE)
            .unwrap_or_else(|e| panic!("SEEK_HOLE at {start}: {e}"));
        assert!(
            end > start,
            "SEEK_HOLE({start}) = {end} is not past the data"
        );
        out.push((start, end));
        pos = end;
    }
    out
}

/// SEEK_DATA and SEEK_HOLE answers (offset or errno) at each of `probes`.
/// (offset, SEEK_DATA answer, SEEK_HOLE answer); errors as errno.
type SeekAnswer = (u64, Result<u64, i32>, Result<u64, i32>);

fn seek_answers(f: &File, probes: &[u64]) -> Vec<SeekAnswer> {
    probes
        .iter()
        .map(|&p| {
            let d = lseek(f, p, libc::SEEK_DATA).map_err(|e| e.raw_os_error().unwrap_or(-1));
            let h = lseek(f, p, libc::SEEK_HOLE).map_err(|e| e.raw_os_error().unwrap_or(-1));
            (p, d, h)
        })
        .collect()
}

/// FNV-1a 64.
fn fnv(data: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for &b in data {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

// ---------------------------------------------------------------------------
// Read-only snapshots and the snapshot directory
// ---------------------------------------------------------------------------

#[test]
fn every_mutation_inside_a_snapshot_fails_with_erofs() {
    let m = Mount::new();
    let t = m.path("t");
    fs::create_dir_all(t.join("dir/sub")).unwrap();
    fs::create_dir(t.join("empty-dir")).unwrap();
    let data = Rng::new(1).bytes(100_000);
    write_synced(&t.join("file"), &data);
    write_synced(&t.join("dir/inner"), b"inner\n");
    setxattr(&t.join("file"), "user.keep", b"v", 0).unwrap();
    std::os::unix::fs::symlink("file", t.join("link")).unwrap();
    fs::hard_link(t.join("file"), t.join("hard")).unwrap();
    create_ok(&m, "s");

    let s = sp(&m, "s", "t");
    let before = tree_snapshot(&sp(&m, "s", ""), ALL);
    let live_before = tree_snapshot(&m.mnt, ALL);
    assert_eq!(
        tree_snapshot(&s, ALL),
        tree_snapshot(&t, ALL),
        "snapshot differs from the live tree it was taken of"
    );
    let f = s.join("file");
    let d = s.join("dir");
    let e = libc::EROFS;

    // Opens for writing.
    for (flags, what) in [
        (libc::O_WRONLY, "open O_WRONLY"),
        (libc::O_RDWR, "open O_RDWR"),
        (libc::O_WRONLY | libc::O_APPEND, "open O_WRONLY|O_APPEND"),
        (libc::O_WRONLY | libc::O_TRUNC, "open O_WRONLY|O_TRUNC"),
        (libc::O_RDONLY | libc::O_TRUNC, "open O_RDONLY|O_TRUNC"),
        (
            libc::O_RDWR | libc::O_CREAT,
            "open O_RDWR|O_CREAT of an existing file",
        ),
    ] {
        assert_errno(open_flags(&f, flags), e, what);
    }
    // Creation of every kind.
    assert_errno(
        open_flags(&s.join("new"), libc::O_WRONLY | libc::O_CREAT),
        e,
        "create a file",
    );
    assert_errno(
        open_flags(&d.join("new"), libc::O_RDWR | libc::O_CREAT | libc::O_EXCL),
        e,
        "create a file in a subdirectory",
    );
    assert_errno(fs::create_dir(s.join("newdir")), e, "mkdir");
    assert_errno(mkfifo(&s.join("fifo")), e, "mkfifo");
    assert_errno(mknod_reg(&s.join("node")), e, "mknod S_IFREG");
    assert_errno(
        std::os::unix::fs::symlink("file", s.join("newlink")),
        e,
        "symlink",
    );
    assert_errno(
        fs::hard_link(&f, s.join("newhard")),
        e,
        "link inside the snapshot",
    );
    assert_errno(
        fs::hard_link(&f, m.path("live-hard")),
        e,
        "link from a snapshot file into the live tree",
    );
    assert_errno(
        fs::hard_link(m.path("t/file"), s.join("from-live")),
        e,
        "link from the live tree into a snapshot",
    );
    // Removal.
    assert_errno(fs::remove_file(&f), e, "unlink a file");
    assert_errno(fs::remove_file(s.join("link")), e, "unlink a symlink");
    assert_errno(fs::remove_file(s.join("hard")), e, "unlink a hard link");
    assert_errno(fs::remove_dir(s.join("empty-dir")), e, "rmdir an empty dir");
    assert_errno_in(
        fs::remove_dir(&d),
        &[e, libc::ENOTEMPTY],
        "rmdir a non-empty dir",
    );
    // Renames.
    assert_errno(
        fs::rename(&f, s.join("renamed")),
        e,
        "rename in the snapshot",
    );
    assert_errno(
        fs::rename(&f, d.join("file")),
        e,
        "rename across snapshot dirs",
    );
    assert_errno(
        fs::rename(&f, d.join("inner")),
        e,
        "rename over an existing file",
    );
    // Renaming a name over another link of the same inode is a no-op the VFS answers
    // without asking the filesystem (rename(2): "do nothing, return success").
    if let Err(err) = fs::rename(&f, s.join("hard")) {
        assert_eq!(
            err.raw_os_error(),
            Some(e),
            "rename over a hard link of the same inode: {err}"
        );
    }
    assert_errno(fs::rename(&d, s.join("dir2")), e, "rename a directory");
    assert_errno(
        fs::rename(&f, m.path("stolen")),
        e,
        "rename from a snapshot into the live tree",
    );
    assert_errno(
        fs::rename(m.path("t/dir/inner"), d.join("planted")),
        e,
        "rename from the live tree into a snapshot",
    );
    assert_errno(
        rename_exchange(&f, &s.join("link")),
        e,
        "renameat2 RENAME_EXCHANGE",
    );
    // Attributes.
    assert_errno(
        fs::set_permissions(&f, fs::Permissions::from_mode(0o777)),
        e,
        "chmod a file",
    );
    assert_errno(
        fs::set_permissions(&d, fs::Permissions::from_mode(0o700)),
        e,
        "chmod a dir",
    );
    assert_errno(
        fs::set_permissions(sp(&m, "s", ""), fs::Permissions::from_mode(0o700)),
        e,
        "chmod the snapshot's root",
    );
    assert_errno(chown(&f, 1234, 5678), e, "chown");
    assert_errno(lchown(&s.join("link"), 1234, 5678), e, "lchown a symlink");
    assert_errno(set_times(&f, (1, 0), (2, 0)), e, "utimensat");
    assert_errno(
        set_times(&f, (0, libc::UTIME_NOW), (0, libc::UTIME_NOW)),
        e,
        "utimensat(UTIME_NOW) (touch)",
    );
    assert_errno(set_times(&d, (1, 0), (2, 0)), e, "utimensat a dir");
    assert_errno(setxattr(&f, "user.new", b"x", 0), e, "setxattr create");
    assert_errno(
        setxattr(&f, "user.keep", b"changed", 0),
        e,
        "setxattr replace",
    );
    assert_errno(setxattr(&d, "user.new", b"x", 0), e, "setxattr on a dir");
    assert_errno(removexattr(&f, "user.keep"), e, "removexattr");
    assert_errno(truncate(&f, 10), e, "truncate shorter");
    assert_errno(truncate(&f, 10 * MIB), e, "truncate longer");
    assert_errno(
        truncate(&f, data.len() as u64),
        e,
        "truncate to the same size",
    );
    // fallocate and writes need a writable descriptor, which a snapshot never hands out
    // (the open above failed with EROFS); on a read-only one the kernel says EBADF.
    let ro = File::open(&f).unwrap();
    for (mode, what) in [
        (0, "fallocate mode 0"),
        (libc::FALLOC_FL_KEEP_SIZE, "fallocate KEEP_SIZE"),
        (
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            "fallocate PUNCH_HOLE",
        ),
        (libc::FALLOC_FL_ZERO_RANGE, "fallocate ZERO_RANGE"),
    ] {
        assert_errno_in(fallocate(&ro, mode, 0, 64 * KIB), &[e, libc::EBADF], what);
    }
    assert_errno_in(
        ro.write_at(b"x", 0),
        &[e, libc::EBADF],
        "pwrite on a read-only fd",
    );
    assert_errno_in(ro.set_len(1), &[e, libc::EBADF, libc::EINVAL], "ftruncate");
    drop(ro);

    // Reads still work and nothing changed, in the snapshot or the live tree.
    assert_same_bytes(
        &fs::read(&f).unwrap(),
        &data,
        "snapshot file after the attempts",
    );
    assert_eq!(
        tree_snapshot(&sp(&m, "s", ""), ALL),
        before,
        "the snapshot changed"
    );
    assert_eq!(
        tree_snapshot(&m.mnt, ALL),
        live_before,
        "the live tree changed"
    );
    assert!(!m.path("live-hard").exists() && !m.path("stolen").exists());
}

#[test]
fn the_snapshot_directory_is_hidden_read_only_and_reserved() {
    let m = Mount::new();
    write_synced(&m.path("f"), b"data");
    fs::create_dir(m.path("d")).unwrap();
    create_ok(&m, "s1");
    create_ok(&m, "s2");
    let snapdir = m.path(".snapshots");
    let e = libc::EROFS;

    // Hidden from the root's listing, reachable by path.
    assert_eq!(
        ls(&m.mnt),
        ["d", "f"],
        "the root lists the snapshot directory"
    );
    let md = fs::metadata(&snapdir).expect("stat .snapshots");
    assert!(md.is_dir());
    assert_eq!(ls(&snapdir), ["s1", "s2"]);
    assert_eq!(fs::read(snapdir.join("s1/f")).unwrap(), b"data");
    // A later snapshot's tree does not show the snapshot directory either.
    assert_eq!(ls(&sp(&m, "s2", "")), ["d", "f"]);

    // Nothing can be created, renamed or removed in it.
    assert_errno(
        open_flags(&snapdir.join("new"), libc::O_WRONLY | libc::O_CREAT),
        e,
        "create a file in .snapshots",
    );
    assert_errno(
        fs::create_dir(snapdir.join("new")),
        e,
        "mkdir in .snapshots",
    );
    assert_errno(mkfifo(&snapdir.join("fifo")), e, "mkfifo in .snapshots");
    assert_errno(
        std::os::unix::fs::symlink("s1", snapdir.join("ln")),
        e,
        "symlink in .snapshots",
    );
    assert_errno(
        fs::hard_link(m.path("f"), snapdir.join("f")),
        e,
        "link into .snapshots",
    );
    assert_errno(
        fs::rename(snapdir.join("s1"), snapdir.join("s3")),
        e,
        "rename a snapshot inside .snapshots",
    );
    assert_errno(
        fs::rename(snapdir.join("s1"), m.path("s1")),
        e,
        "rename a snapshot out of .snapshots",
    );
    assert_errno(
        fs::rename(m.path("d"), snapdir.join("d")),
        e,
        "rename a live dir into .snapshots",
    );
    assert_errno(fs::remove_dir(snapdir.join("s1")), e, "rmdir a snapshot");
    assert_errno_in(
        fs::remove_dir_all(snapdir.join("s2")),
        &[e],
        "rm -r a snapshot",
    );
    assert_errno(
        fs::set_permissions(&snapdir, fs::Permissions::from_mode(0o777)),
        e,
        "chmod .snapshots",
    );
    assert_errno(chown(&snapdir, 1, 1), e, "chown .snapshots");
    assert_errno(
        setxattr(&snapdir, "user.x", b"1", 0),
        e,
        "setxattr .snapshots",
    );
    assert_errno(
        set_times(&snapdir, (1, 0), (1, 0)),
        e,
        "utimensat .snapshots",
    );

    // The name itself is reserved in the root.
    assert_errno(fs::create_dir(&snapdir), libc::EEXIST, "mkdir .snapshots");
    assert_errno(
        open_flags(&snapdir, libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL),
        libc::EEXIST,
        "create a file called .snapshots",
    );
    assert_errno(
        std::os::unix::fs::symlink("d", &snapdir),
        libc::EEXIST,
        "symlink called .snapshots",
    );
    assert_errno(
        fs::hard_link(m.path("f"), &snapdir),
        libc::EEXIST,
        "hard link called .snapshots",
    );
    assert_errno(fs::remove_dir(&snapdir), e, "rmdir .snapshots");
    assert!(
        fs::remove_file(&snapdir).is_err(),
        "unlink .snapshots succeeded"
    );
    assert_errno(
        fs::rename(&snapdir, m.path("renamed")),
        e,
        "rename .snapshots",
    );
    assert_errno_in(
        fs::rename(m.path("d"), &snapdir),
        &[e, libc::EEXIST, libc::ENOTEMPTY],
        "rename a dir over .snapshots",
    );
    assert_errno_in(
        fs::rename(m.path("f"), &snapdir),
        &[e, libc::EISDIR, libc::EEXIST],
        "rename a file over .snapshots",
    );
    assert_eq!(ls(&snapdir), ["s1", "s2"]);
    assert_eq!(ls(&m.mnt), ["d", "f"]);
    assert_eq!(fs::read(m.path("f")).unwrap(), b"data");

    // ".." of the snapshot directory is the root; ".." of a snapshot is the snapshot dir.
    let root_ino = fs::metadata(&m.mnt).unwrap().ino();
    assert_eq!(fs::metadata(snapdir.join("..")).unwrap().ino(), root_ino);
    assert_eq!(
        fs::metadata(snapdir.join("s1/..")).unwrap().ino(),
        md.ino(),
        ".snapshots/s1/.. is not .snapshots"
    );
    assert_eq!(
        fs::metadata(snapdir.join("s1/d/..")).unwrap().ino(),
        fs::metadata(snapdir.join("s1")).unwrap().ino(),
        ".snapshots/s1/d/.. is not .snapshots/s1"
    );

    // Below the root, ".snapshots" is an ordinary name.
    fs::create_dir(m.path("d/.snapshots")).unwrap();
    write_synced(&m.path("d/.snapshots/x"), b"x");
    assert_eq!(ls(&m.path("d")), [".snapshots"]);
    fs::rename(m.path("d/.snapshots"), m.path("d/plain")).unwrap();
    fs::rename(m.path("d/plain"), m.path("d/.snapshots")).unwrap();
    fs::remove_file(m.path("d/.snapshots/x")).unwrap();
    fs::remove_dir(m.path("d/.snapshots")).unwrap();
}

// ---------------------------------------------------------------------------
// Consistency of a snapshot taken under live writers
// ---------------------------------------------------------------------------

/// Record size: whole pages (the kernel sends a buffered write() that starts or ends
/// inside a page it has not cached as several FUSE requests split at page boundaries, so
/// only page-aligned writes reach the daemon whole, as on a disk only sectors are atomic),
/// but not a divisor of the 16 KiB block size, so records straddle blocks.
const REC: usize = 12288;
const MAGIC: u64 = 0x7468_696e_6673_5245; // "thinfsRE"

/// One record: magic, global sequence number, disk number, the acknowledged watermark
/// when its write started (every seq below it was fsync'd before), payload, checksum.
fn make_record(seq: u64, disk: u64, dep: u64) -> Vec<u8> {
    let mut r = Vec::with_capacity(REC);
    r.extend_from_slice(&MAGIC.to_le_bytes());
    r.extend_from_slice(&seq.to_le_bytes());
    r.extend_from_slice(&disk.to_le_bytes());
    r.extend_from_slice(&dep.to_le_bytes());
    r.extend_from_slice(&Rng::new(seq).bytes(REC - 40));
    let sum = fnv(&r);
    r.extend_from_slice(&sum.to_le_bytes());
    assert_eq!(r.len(), REC);
    r
}

struct Record {
    seq: u64,
    dep: u64,
}

/// Parses a disk image written by one writer; panics on a torn or foreign record.
fn parse_disk(data: &[u8], disk: u64, what: &str) -> Vec<Record> {
    assert_eq!(
        data.len() % REC,
        0,
        "{what}: size {} is not a whole number of {REC}-byte records (torn write)",
        data.len()
    );
    let mut out: Vec<Record> = Vec::new();
    for (n, r) in data.chunks_exact(REC).enumerate() {
        let u = |i: usize| u64::from_le_bytes(r[i * 8..i * 8 + 8].try_into().unwrap());
        let sum = u64::from_le_bytes(r[REC - 8..].try_into().unwrap());
        assert!(
            u(0) == MAGIC && fnv(&r[..REC - 8]) == sum,
            "{what}: record {n} (bytes {}..{}) is torn or garbage (magic {:#x}, seq {})",
            n * REC,
            (n + 1) * REC,
            u(0),
            u(1)
        );
        assert_eq!(u(2), disk, "{what}: record {n} belongs to disk {}", u(2));
        let rec = Record {
            seq: u(1),
            dep: u(3),
        };
        assert_eq!(
            make_record(rec.seq, disk, rec.dep),
            r,
            "{what}: record {n} content"
        );
        if let Some(prev) = out.last() {
            assert!(
                rec.seq > prev.seq,
                "{what}: record {n} has seq {} after seq {}",
                rec.seq,
                prev.seq
            );
        }
        out.push(rec);
    }
    out
}

#[derive(Default)]
struct Acks {
    done: BTreeSet<u64>,
    /// Every seq below this was acknowledged (fsync returned).
    watermark: u64,
}

struct Shared {
    next_seq: AtomicU64,
    stop: AtomicBool,
    acks: Mutex<Acks>,
}

impl Shared {
    fn watermark(&self) -> u64 {
        self.acks.lock().unwrap().watermark
    }
}

/// Appends fsync'd records to `path` until told to stop; `direct`: O_DIRECT writes from
/// an aligned buffer (QEMU cache=none).
fn writer(shared: Arc<Shared>, path: PathBuf, disk: u64, direct: bool) -> u64 {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(if direct { libc::O_DIRECT } else { 0 })
        .open(&path)
        .unwrap_or_else(|e| panic!("open {path:?}: {e}"));
    let mut buf = AlignedBuf::new(REC, 4096);
    let mut n = 0u64;
    while !shared.stop.load(Ordering::SeqCst) {
        let seq = shared.next_seq.fetch_add(1, Ordering::SeqCst);
        let dep = shared.watermark();
        buf.as_mut_slice()
            .copy_from_slice(&make_record(seq, disk, dep));
        f.write_all_at(buf.as_slice(), n * REC as u64)
            .unwrap_or_else(|e| panic!("write record {n} of {path:?}: {e}"));
        f.sync_data()
            .unwrap_or_else(|e| panic!("fdatasync {path:?}: {e}"));
        n += 1;
        let mut guard = shared.acks.lock().unwrap();
        let a = &mut *guard;
        a.done.insert(seq);
        while a.done.remove(&a.watermark) {
            a.watermark += 1;
        }
    }
    n
}

#[test]
fn snapshot_under_two_fsyncing_writers_is_one_consistent_instant() {
    live_writers_snapshot(false);
}

#[test]
fn snapshot_under_two_o_direct_writers_is_one_consistent_instant() {
    live_writers_snapshot(true);
}

/// Two writers (one per disk image of a VM) append fsync'd records with global sequence
/// numbers while snapshots are taken; each snapshot must be one crash-consistent instant.
fn live_writers_snapshot(direct: bool) {
    let mut m = Mount::new();
    fs::create_dir(m.path("vm")).unwrap();
    let shared = Arc::new(Shared {
        next_seq: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        acks: Mutex::new(Acks::default()),
    });
    let threads: Vec<_> = (0..2u64)
        .map(|disk| {
            let sh = shared.clone();
            let p = m.path(&format!("vm/disk{disk}.img"));
            std::thread::spawn(move || writer(sh, p, disk, direct))
        })
        .collect();
    // Cuts: (name, watermark before create started, first seq allocated after it returned).
    let mut cuts = Vec::new();
    let start = Instant::now();
    while shared.watermark() < 20 {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "writers acknowledged only {} records in 2 minutes",
            shared.watermark()
        );
        sleep(Duration::from_millis(20));
    }
    for round in 0..5 {
        let name = format!("live-{round}");
        let before = shared.watermark();
        let t = Instant::now();
        create_ok(&m, &name);
        let took = t.elapsed();
        let after = shared.next_seq.load(Ordering::SeqCst);
        cuts.push((name, before, after, took));
        sleep(Duration::from_millis(100 + 50 * round));
    }
    shared.stop.store(true, Ordering::SeqCst);
    let written: Vec<u64> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(
        written.iter().all(|&n| n > 0),
        "a writer wrote nothing: {written:?}"
    );

    // The live images are whole too.
    for disk in 0..2u64 {
        let data = fs::read(m.path(&format!("vm/disk{disk}.img"))).unwrap();
        let recs = parse_disk(&data, disk, &format!("live disk{disk}"));
        assert_eq!(recs.len() as u64, written[disk as usize]);
    }

    let check = |m: &Mount, when: &str| -> Vec<Vec<u8>> {
        let mut images = Vec::new();
        for (name, before, after, took) in &cuts {
            let mut seqs: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
            let mut max = [None, None];
            for disk in 0..2u64 {
                let p = sp(m, name, &format!("vm/disk{disk}.img"));
                let data = fs::read(&p).unwrap_or_else(|e| panic!("read {p:?} {when}: {e}"));
                for r in parse_disk(&data, disk, &format!("{name}/disk{disk} {when}")) {
                    max[disk as usize] = Some(r.seq);
                    seqs.insert(r.seq, (disk, r.dep));
                }
                images.push(data);
            }
            let ctx = format!(
                "snapshot {name} {when} (create took {took:?}; acked before: seqs < {before}; \
                 allocated after: seqs >= {after}; max seq disk0 {:?}, disk1 {:?}; {} records)",
                max[0],
                max[1],
                seqs.len()
            );
            // Every record acknowledged before create started is in it.
            for s in 0..*before {
                assert!(
                    seqs.contains_key(&s),
                    "{ctx}: record {s} was fsync'd before the snapshot started but is missing"
                );
            }
            // Nothing started after create returned.
            if let Some((&s, _)) = seqs.range(*after..).next() {
                panic!("{ctx}: record {s} was written after create returned but is in it");
            }
            // One instant across both disks: a record in the snapshot implies every
            // record acknowledged before its write started.
            for (&s, &(disk, dep)) in &seqs {
                for d in 0..dep {
                    assert!(
                        seqs.contains_key(&d),
                        "{ctx}: has seq {s} (disk{disk}, started after seqs < {dep} were \
                         acknowledged) but lacks seq {d}: the disks were cut at different instants"
                    );
                }
            }
        }
        images
    };
    let first = check(&m, "while mounted");
    m.remount();
    let again = check(&m, "after remount");
    assert!(first == again, "snapshot images changed across a remount");
}

#[test]
fn snapshot_includes_unflushed_writes_of_open_files() {
    let m = Mount::new();
    let p = m.path("disk.img");
    let f = File::create(&p).unwrap();
    let a = Rng::new(5).bytes(200_000);
    f.write_all_at(&a, 0).unwrap();
    // No fsync, no close: the bytes may sit in the daemon's write-back buffer.
    create_ok(&m, "s1");
    let b = Rng::new(6).bytes(50_000);
    f.write_all_at(&b, 1000).unwrap();
    f.set_len(120_000).unwrap();
    create_ok(&m, "s2");
    let mut expected2 = a.clone();
    expected2[1000..51_000].copy_from_slice(&b);
    expected2.truncate(120_000);
    assert_same_bytes(&fs::read(sp(&m, "s1", "disk.img")).unwrap(), &a, "s1");
    assert_same_bytes(
        &fs::read(sp(&m, "s2", "disk.img")).unwrap(),
        &expected2,
        "s2",
    );
    drop(f);
    assert_same_bytes(&fs::read(&p).unwrap(), &expected2, "live");
}

// ---------------------------------------------------------------------------
// Backups of a snapshot: rsync and tar
// ---------------------------------------------------------------------------

/// Groups of paths that share an inode (hard links), by relative path.
fn hard_link_groups(root: &Path) -> BTreeSet<Vec<PathBuf>> {
    let mut by_ino: BTreeMap<u64, Vec<PathBuf>> = BTreeMap::new();
    for (p, ino) in inode_map(root) {
        if p != Path::new(".") && !fs::symlink_metadata(root.join(&p)).unwrap().is_dir() {
            by_ino.entry(ino).or_default().push(p);
        }
    }
    by_ino.into_values().filter(|v| v.len() > 1).collect()
}

#[test]
fn rsync_and_tar_of_a_snapshot_equal_the_tree_at_the_instant() {
    let m = Mount::new();
    let src = m.path("vms");
    fs::create_dir(&src).unwrap();
    make_sample_tree(&src, 77);
    // Owners and times a backup must keep.
    chown(&src.join("small.txt"), 1234, 5678).unwrap();
    chown(&src.join("a/b"), 1000, 1001).unwrap();
    lchown(&src.join("link-rel"), 42, 43).unwrap();
    set_times(
        &src.join("a/many-03"),
        (1_000_000, 0),
        (1_234_567_890, 123_456_789),
    )
    .unwrap();
    set_times(&src.join("sparse.img"), (5, 0), (946_684_800, 0)).unwrap();
    // Directory mtimes last (creating entries changes them).
    for (i, d) in ["a/b/c", "a/b", "a", "empty-dir", ""].iter().enumerate() {
        set_times(&src.join(d), (1, 0), (1_500_000_000 + i as i64, 500)).unwrap();
    }

    // The tree at the instant: in memory and as a copy on local disk.
    let expected = tree_snapshot(&src, ALL);
    let expected_links = hard_link_groups(&src);
    assert_eq!(
        expected_links.len(),
        1,
        "sample tree should have one hard-link pair"
    );
    let scratch = m.scratch().to_path_buf();
    let exp_dir = scratch.join("expected");
    run_ok(
        Command::new("cp")
            .arg("-a")
            .arg("--sparse=always")
            .arg(&src)
            .arg(&exp_dir),
    );
    assert_eq!(
        tree_snapshot(&exp_dir, ALL),
        expected,
        "cp -a of the source"
    );
    create_ok(&m, "backup");

    // Change everything after the snapshot.
    fs::write(src.join("small.txt"), b"changed after the snapshot").unwrap();
    fs::set_permissions(src.join("a/odd.bin"), fs::Permissions::from_mode(0o600)).unwrap();
    open_rw(&src.join("hard-odd.bin"))
        .write_all_at(b"XXXX", 10)
        .unwrap();
    chown(&src.join("a/b"), 7, 7).unwrap();
    setxattr(&src.join("small.txt"), "user.color", b"red", 0).unwrap();
    removexattr(&src.join("a"), "user.dir-attr").unwrap();
    setxattr(&src.join("empty"), "user.new", b"new", 0).unwrap();
    fs::remove_file(src.join("a/b/c/deep.txt")).unwrap();
    fs::remove_file(src.join("link-dangling")).unwrap();
    std::os::unix::fs::symlink("elsewhere", src.join("link-dangling")).unwrap();
    fs::write(src.join("a/new-file"), b"new").unwrap();
    fs::create_dir(src.join("new-dir")).unwrap();
    open_rw(&src.join("sparse.img"))
        .write_all_at(&[7u8; 20_000], 2 * MIB)
        .unwrap();
    set_times(&src.join("a/many-03"), (1, 0), (2, 0)).unwrap();
    fs::rename(src.join("a/many-07"), src.join("a/many-77")).unwrap();
    assert_ne!(
        tree_snapshot(&src, ALL),
        expected,
        "live tree did not change"
    );

    // The snapshot itself.
    let snap = sp(&m, "backup", "vms");
    let got = tree_snapshot(&snap, ALL);
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>(),
        "snapshot lists other entries than the source had"
    );
    for (k, e) in &expected {
        if &got[k] != e {
            let (mut a, mut b) = (got[k].clone(), e.clone());
            let same = a.content == b.content;
            a.content = None;
            b.content = None;
            panic!(
                "snapshot entry {k:?} differs (content equal: {same}):\n got {a:?}\n want {b:?}"
            );
        }
    }
    assert_eq!(
        hard_link_groups(&snap),
        expected_links,
        "hard links in the snapshot"
    );
    assert_eq!(
        fs::metadata(snap.join("hard-odd.bin")).unwrap().nlink(),
        2,
        "nlink of a hard-linked file in the snapshot"
    );

    // rsync -aHAX --sparse.
    let rs = scratch.join("rsync");
    run_ok(
        Command::new("rsync")
            .arg("-aHAX")
            .arg("--sparse")
            .arg("--numeric-ids")
            .arg(format!("{}/", snap.display()))
            .arg(&rs),
    );
    // tar --sparse with xattrs.
    let archive = scratch.join("backup.tar");
    run_ok(
        Command::new("tar")
            .arg("--sparse")
            .arg("--xattrs")
            .arg("--xattrs-include=user.*")
            .arg("--numeric-owner")
            .arg("-C")
            .arg(&snap)
            .arg("-cf")
            .arg(&archive)
            .arg("."),
    );
    let tx = scratch.join("tar");
    fs::create_dir(&tx).unwrap();
    run_ok(
        Command::new("tar")
            .arg("--xattrs")
            .arg("--xattrs-include=user.*")
            .arg("--numeric-owner")
            .arg("--same-owner")
            .arg("-xpf")
            .arg(&archive)
            .arg("-C")
            .arg(&tx),
    );
    for (dir, tool) in [(&rs, "rsync -aHAX --sparse"), (&tx, "tar --sparse")] {
        run_ok(
            Command::new("diff")
                .arg("-r")
                .arg("--no-dereference")
                .arg(&exp_dir)
                .arg(dir),
        );
        let copy = tree_snapshot(dir, ALL);
        assert_eq!(
            copy.keys().collect::<Vec<_>>(),
            expected.keys().collect::<Vec<_>>(),
            "{tool}: other entries than the source had"
        );
        for (k, e) in &expected {
            let mut c = copy[k].clone();
            let mut w = e.clone();
            if c != w {
                let same = c.content == w.content;
                c.content = None;
                w.content = None;
                panic!(
                    "{tool}: entry {k:?} differs (content equal: {same}):\n got {c:?}\n want {w:?}"
                );
            }
        }
        assert_eq!(hard_link_groups(dir), expected_links, "{tool}: hard links");
        let blocks = fs::metadata(dir.join("sparse.img")).unwrap().blocks() * 512;
        assert!(
            blocks <= 2 * MIB,
            "{tool}: sparse.img occupies {blocks} bytes: holes were not kept"
        );
        for f in ["small.txt", "a/odd.bin", "a/b/one-mib.bin", "sparse.img"] {
            run_ok(Command::new("cmp").arg(exp_dir.join(f)).arg(dir.join(f)));
        }
    }
}

// ---------------------------------------------------------------------------
// Inode numbers, sizes, holes
// ---------------------------------------------------------------------------

#[test]
fn snapshot_inode_numbers_are_distinct_and_stable_across_remount_and_kill9() {
    let mut m = Mount::new();
    make_sample_tree(&m.path("t"), 11);
    create_ok(&m, "s1");
    write_synced(&m.path("t/after-s1"), b"x");
    create_ok(&m, "s2");

    let live = inode_map(&m.mnt);
    let s1 = inode_map(&sp(&m, "s1", ""));
    let s2 = inode_map(&sp(&m, "s2", ""));
    let snapdir_ino = fs::metadata(m.path(".snapshots")).unwrap().ino();
    let live_set: BTreeSet<u64> = live.values().copied().collect();
    for (name, map) in [("s1", &s1), ("s2", &s2)] {
        for (p, ino) in map.iter() {
            assert!(
                !live_set.contains(ino),
                "{name}/{p:?} has inode {ino}, which a live entry also has"
            );
            assert_ne!(
                *ino, snapdir_ino,
                "{name}/{p:?} has the snapshot dir's inode"
            );
        }
        // Distinct paths have distinct inodes, except hard links.
        let mut seen: BTreeMap<u64, &PathBuf> = BTreeMap::new();
        for (p, ino) in map.iter() {
            if let Some(q) = seen.insert(*ino, p) {
                let pair = [q.to_str().unwrap(), p.to_str().unwrap()];
                assert!(
                    pair.contains(&"t/hard-odd.bin") && pair.contains(&"t/a/odd.bin"),
                    "{name}: {q:?} and {p:?} share inode {ino}"
                );
            }
        }
        assert_eq!(
            map[Path::new("t/hard-odd.bin")],
            map[Path::new("t/a/odd.bin")],
            "{name}: hard links have different inodes"
        );
    }
    assert!(!live_set.contains(&snapdir_ino));
    let s1_set: BTreeSet<u64> = s1.values().copied().collect();
    for (p, ino) in &s2 {
        assert!(
            !s1_set.contains(ino),
            "s2/{p:?} has inode {ino}, which s1 also uses"
        );
    }
    // The d_ino readdir reports agrees with stat.
    for e in fs::read_dir(sp(&m, "s1", "t")).unwrap() {
        use std::os::unix::fs::DirEntryExt;
        let e = e.unwrap();
        let ino = fs::symlink_metadata(e.path()).unwrap().ino();
        assert_eq!(
            e.ino(),
            ino,
            "readdir d_ino of {:?} differs from stat",
            e.path()
        );
    }

    m.remount();
    assert_eq!(
        inode_map(&m.mnt),
        live,
        "live inodes changed across a remount"
    );
    assert_eq!(
        inode_map(&sp(&m, "s1", "")),
        s1,
        "s1 inodes changed across a remount"
    );
    assert_eq!(
        inode_map(&sp(&m, "s2", "")),
        s2,
        "s2 inodes changed across a remount"
    );
    assert_eq!(
        fs::metadata(m.path(".snapshots")).unwrap().ino(),
        snapdir_ino
    );

    m.kill9();
    m.remount();
    assert_eq!(
        inode_map(&sp(&m, "s1", "")),
        s1,
        "s1 inodes changed across kill -9"
    );
    assert_eq!(
        inode_map(&sp(&m, "s2", "")),
        s2,
        "s2 inodes changed across kill -9"
    );
}

#[test]
fn sparse_file_in_a_snapshot_has_the_sizes_blocks_and_holes_of_the_source() {
    let m = Mount::new();
    let p = m.path("sparse.img");
    let bs = 16 * KIB;
    {
        let f = File::create(&p).unwrap();
        f.set_len(10 * MIB + 777).unwrap();
        let mut rng = Rng::new(42);
        f.write_all_at(&rng.bytes(100), 0).unwrap();
        f.write_all_at(&rng.bytes(40_000), MIB + 5).unwrap();
        f.write_all_at(&rng.bytes(bs as usize), 5 * MIB).unwrap();
        f.write_all_at(&vec![0u8; 3 * bs as usize], 7 * MIB)
            .unwrap(); // zeros: holes
        f.write_all_at(&rng.bytes(77), 10 * MIB + 700).unwrap();
        f.sync_all().unwrap();
    }
    let size = 10 * MIB + 777;
    let mut probes = vec![
        0,
        1,
        99,
        100,
        bs - 1,
        bs,
        bs + 1,
        MIB,
        MIB + 5,
        MIB + 45_005,
    ];
    for base in [2 * MIB, 5 * MIB, 7 * MIB, 10 * MIB] {
        probes.extend([
            base - 1,
            base,
            base + 1,
            base + bs - 1,
            base + bs,
            base + bs + 1,
        ]);
    }
    probes.extend([size - 78, size - 77, size - 1, size, size + 1, size + MIB]);

    let capture = |p: &Path| {
        let f = File::open(p).unwrap();
        let md = f.metadata().unwrap();
        (
            md.len(),
            md.blocks(),
            data_extents(&f),
            seek_answers(&f, &probes),
            fs::read(p).unwrap(),
        )
    };
    let before = capture(&p);
    assert_eq!(before.0, size);
    assert!(
        before.2.len() >= 4,
        "the source should have several data extents: {:?}",
        before.2
    );
    create_ok(&m, "s");
    let sp_path = sp(&m, "s", "sparse.img");
    let snap_now = capture(&sp_path);

    // Change the live file every way: fill a hole, punch data, extend, shrink the tail.
    {
        let f = open_rw(&p);
        f.write_all_at(&Rng::new(43).bytes(bs as usize), 3 * MIB)
            .unwrap();
        fallocate(
            &f,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            5 * MIB,
            bs,
        )
        .unwrap();
        f.set_len(20 * MIB).unwrap();
        f.write_all_at(b"tail", 20 * MIB - 4).unwrap();
        f.sync_all().unwrap();
    }
    let live_after = capture(&p);
    assert_ne!(
        live_after.2, before.2,
        "the live file's extents did not change"
    );
    let snap_after = capture(&sp_path);

    for (what, got) in [
        ("right after create", &snap_now),
        ("after live changes", &snap_after),
    ] {
        assert_eq!(got.0, before.0, "snapshot size {what}");
        assert_eq!(got.1, before.1, "snapshot st_blocks {what}");
        assert_eq!(
            got.2, before.2,
            "snapshot SEEK_DATA/SEEK_HOLE extents {what}"
        );
        assert_eq!(
            got.3, before.3,
            "snapshot SEEK_DATA/SEEK_HOLE answers {what}"
        );
        assert_same_bytes(&got.4, &before.4, &format!("snapshot content {what}"));
    }
    // The snapshot's holes are reported as such to tools.
    let out = run_ok(
        Command::new("cp")
            .arg("--sparse=always")
            .arg(&sp_path)
            .arg(m.scratch().join("copy.img")),
    );
    drop(out);
    assert_same_bytes(
        &fs::read(m.scratch().join("copy.img")).unwrap(),
        &before.4,
        "cp of the snapshot file",
    );
}

// ---------------------------------------------------------------------------
// Clones from snapshots
// ---------------------------------------------------------------------------

fn clone_cmd(src: &Path, dst: &Path) -> Output {
    thinfs([OsStr::new("clone"), src.as_os_str(), dst.as_os_str()])
}

#[test]
fn clone_from_a_snapshot_is_thin_and_isolated() {
    let m = Mount::new();
    fs::create_dir(m.path("vm")).unwrap();
    let orig = Rng::new(9).bytes(4 * MIB as usize + 333);
    write_synced(&m.path("vm/disk.img"), &orig);
    write_synced(&m.path("vm/vm.conf"), b"memory=2G\n");
    setxattr(&m.path("vm/disk.img"), "user.vm", b"golden", 0).unwrap();
    create_ok(&m, "s");
    // Change the live original after the snapshot: clones must take the snapshot's data.
    let live_patch = Rng::new(10).bytes(64 * KIB as usize);
    {
        let f = open_rw(&m.path("vm/disk.img"));
        f.write_all_at(&live_patch, 0).unwrap();
        f.sync_all().unwrap();
    }
    let mut live_now = orig.clone();
    live_now[..live_patch.len()].copy_from_slice(&live_patch);
    fs::write(m.path("vm/vm.conf"), b"memory=4G\n").unwrap();

    let before = stats(&m.mnt);
    let out = clone_cmd(&sp(&m, "s", "vm/disk.img"), &m.path("restored.img"));
    assert!(
        out.status.success(),
        "clone of a snapshot file: {}",
        describe(&out)
    );
    let out = clone_cmd(&sp(&m, "s", "vm"), &m.path("vm-restored"));
    assert!(
        out.status.success(),
        "clone of a snapshot dir: {}",
        describe(&out)
    );
    let after = stats(&m.mnt);
    assert_eq!(
        after.stored_bytes, before.stored_bytes,
        "cloning from a snapshot stored data: {before:?} -> {after:?}"
    );
    assert_same_bytes(
        &fs::read(m.path("restored.img")).unwrap(),
        &orig,
        "file clone",
    );
    assert_same_bytes(
        &fs::read(m.path("vm-restored/disk.img")).unwrap(),
        &orig,
        "dir clone",
    );
    assert_eq!(
        fs::read(m.path("vm-restored/vm.conf")).unwrap(),
        b"memory=2G\n"
    );
    assert_eq!(
        getxattr(&m.path("restored.img"), "user.vm").unwrap(),
        b"golden"
    );
    assert_trees_equal(&sp(&m, "s", "vm"), &m.path("vm-restored"), NO_DIR_MTIMES);
    // Clones are live, writable files.
    for p in ["restored.img", "vm-restored/disk.img"] {
        let md = fs::metadata(m.path(p)).unwrap();
        assert!(
            md.ino() < 1 << 47,
            "clone {p} has a snapshot inode number {}",
            md.ino()
        );
    }

    // Writes to the clones change neither the snapshot nor the live original.
    let w = Rng::new(11).bytes(100_000);
    for p in ["restored.img", "vm-restored/disk.img"] {
        let f = open_rw(&m.path(p));
        f.write_all_at(&w, 12_345).unwrap();
        f.sync_all().unwrap();
    }
    let mut cloned = orig.clone();
    cloned[12_345..112_345].copy_from_slice(&w);
    assert_same_bytes(
        &fs::read(m.path("restored.img")).unwrap(),
        &cloned,
        "written clone",
    );
    assert_same_bytes(
        &fs::read(sp(&m, "s", "vm/disk.img")).unwrap(),
        &orig,
        "snapshot after writing the clones",
    );
    assert_same_bytes(
        &fs::read(m.path("vm/disk.img")).unwrap(),
        &live_now,
        "live original after writing the clones",
    );
    // And writes to the live original change neither the snapshot nor the clones.
    {
        let f = open_rw(&m.path("vm/disk.img"));
        f.write_all_at(&[0xEE; 50_000], 2 * MIB).unwrap();
        f.set_len(MIB).unwrap();
        f.sync_all().unwrap();
    }
    assert_same_bytes(
        &fs::read(sp(&m, "s", "vm/disk.img")).unwrap(),
        &orig,
        "snapshot after writing the original",
    );
    assert_same_bytes(
        &fs::read(m.path("vm-restored/disk.img")).unwrap(),
        &cloned,
        "dir clone after writing the original",
    );

    // A clone cannot land inside a snapshot.
    let out = clone_cmd(&m.path("vm/vm.conf"), &sp(&m, "s", "vm/planted"));
    assert_eq!(
        out.status.code(),
        Some(1),
        "clone into a snapshot: {}",
        describe(&out)
    );
    assert!(!sp(&m, "s", "vm/planted").exists());
}

// ---------------------------------------------------------------------------
// Rollback
// ---------------------------------------------------------------------------

fn build_rollback_tree(m: &Mount) {
    make_sample_tree(&m.path("t"), 21);
    write_synced(&m.path("root-file"), b"root file\n");
    chown(&m.path("root-file"), 500, 501).unwrap();
    fs::create_dir(m.path("vm")).unwrap();
    write_synced(
        &m.path("vm/disk.img"),
        &Rng::new(22).bytes(3 * MIB as usize),
    );
}

/// Changes everything in the tree `build_rollback_tree` made.
fn mutate_rollback_tree(m: &Mount) {
    write_synced(&m.path("created-after"), b"new");
    fs::create_dir_all(m.path("t/newdir/deeper")).unwrap();
    write_synced(&m.path("t/newdir/deeper/f"), b"f");
    fs::remove_file(m.path("t/small.txt")).unwrap();
    fs::remove_dir_all(m.path("t/a/b")).unwrap();
    fs::remove_file(m.path("root-file")).unwrap();
    {
        let f = open_rw(&m.path("t/a/odd.bin"));
        f.write_all_at(b"modified through a hard link", 500)
            .unwrap();
        f.sync_all().unwrap();
    }
    {
        let f = open_rw(&m.path("vm/disk.img"));
        f.write_all_at(&Rng::new(23).bytes(MIB as usize), MIB)
            .unwrap();
        f.set_len(5 * MIB).unwrap();
        f.sync_all().unwrap();
    }
    truncate(&m.path("t/sparse.img"), 1000).unwrap();
    fs::set_permissions(m.path("t/a"), fs::Permissions::from_mode(0o700)).unwrap();
    chown(&m.path("t/empty"), 9, 9).unwrap();
    setxattr(&m.path("t/a"), "user.dir-attr", b"replaced", 0).unwrap();
    setxattr(&m.path("t/empty"), "user.added", b"1", 0).unwrap();
    fs::rename(m.path("t/empty-dir"), m.path("t/renamed-dir")).unwrap();
    fs::rename(m.path("t/a/many-01"), m.path("moved-to-root")).unwrap();
    fs::remove_file(m.path("t/link-rel")).unwrap();
    std::os::unix::fs::symlink("somewhere/else", m.path("t/link-rel")).unwrap();
    set_times(&m.path("t/a/many-02"), (3, 0), (4, 0)).unwrap();
    fs::remove_file(m.path("t/hard-odd.bin")).unwrap();
}

#[test]
fn rollback_makes_the_live_tree_equal_to_the_snapshot() {
    let mut m = Mount::new();
    build_rollback_tree(&m);
    let expected = tree_snapshot(&m.mnt, ALL);
    let expected_links = hard_link_groups(&m.mnt);
    create_ok(&m, "good");
    mutate_rollback_tree(&m);
    assert_ne!(tree_snapshot(&m.mnt, ALL), expected);

    // A snapshot newer than the rollback target must survive the rollback unchanged.
    assert_eq!(
        fs::metadata(sp(&m, "good", "t/a/odd.bin")).unwrap().nlink(),
        2,
        "nlink in the snapshot after unlinking a hard link in the live tree"
    );
    create_ok(&m, "newer");
    let newer = tree_snapshot(&m.mnt, ALL);
    assert_eq!(tree_snapshot(&sp(&m, "newer", ""), ALL), newer);

    let out = rollback(&m, "good", false);
    assert!(out.status.success(), "rollback: {}", describe(&out));
    // Immediately: the kernel must not serve names or attributes of the replaced tree.
    let immediate = tree_snapshot(&m.mnt, ALL);
    sleep(Duration::from_millis(1500));
    let settled = tree_snapshot(&m.mnt, ALL);
    let diff = |got: &BTreeMap<PathBuf, TreeEntry>| -> Vec<String> {
        let mut v = Vec::new();
        for k in got.keys().chain(expected.keys()).collect::<BTreeSet<_>>() {
            match (got.get(k), expected.get(k)) {
                (Some(_), None) => v.push(format!("{k:?} exists but should not")),
                (None, Some(_)) => v.push(format!("{k:?} is missing")),
                (Some(a), Some(b)) if a != b => {
                    let (mut a, mut b) = (a.clone(), b.clone());
                    let same = a.content == b.content;
                    a.content = None;
                    b.content = None;
                    v.push(format!(
                        "{k:?} differs (content equal: {same}):\n   got {a:?}\n  want {b:?}"
                    ))
                }
                _ => {}
            }
        }
        v
    };
    let d = diff(&settled);
    assert!(
        d.is_empty(),
        "live tree after rollback (1.5 s later) differs from the snapshot:\n{}",
        d.join("\n")
    );
    let d = diff(&immediate);
    assert!(
        d.is_empty(),
        "right after rollback the live tree showed stale kernel-cached state (it was correct \
         1.5 s later):\n{}",
        d.join("\n")
    );
    assert_eq!(
        hard_link_groups(&m.mnt),
        expected_links,
        "hard links after rollback"
    );
    assert!(!m.path("created-after").exists());
    assert!(m.path("t/small.txt").exists());

    // The snapshots are still there and unchanged; the live tree is writable again.
    assert_eq!(names(&m), ["good", "newer"]);
    assert_eq!(
        tree_snapshot(&sp(&m, "newer", ""), ALL),
        newer,
        "rolling back to an older snapshot changed a newer one"
    );
    assert_eq!(tree_snapshot(&sp(&m, "good", ""), ALL), expected);
    {
        let f = open_rw(&m.path("vm/disk.img"));
        f.write_all_at(b"after rollback", 0).unwrap();
        f.sync_all().unwrap();
    }
    write_synced(&m.path("created-after"), b"again");
    assert_eq!(
        tree_snapshot(&sp(&m, "good", ""), ALL),
        expected,
        "snapshot after writes"
    );

    m.remount();
    let mut now = tree_snapshot(&m.mnt, ALL);
    now.remove(Path::new("created-after"));
    let mut e2 = expected.clone();
    let disk = e2.get_mut(Path::new("vm/disk.img")).unwrap();
    disk.content.as_mut().unwrap()[..14].copy_from_slice(b"after rollback");
    let (a, b) = (
        &now[Path::new("vm/disk.img")],
        &e2[Path::new("vm/disk.img")],
    );
    assert_eq!(
        a.content, b.content,
        "vm/disk.img after rollback + write + remount"
    );
    now.remove(Path::new("vm/disk.img"));
    e2.remove(Path::new("vm/disk.img"));
    now.remove(Path::new("vm"));
    e2.remove(Path::new("vm"));
    assert_eq!(now, e2, "live tree after rollback + remount");
    assert_eq!(
        tree_snapshot(&sp(&m, "good", ""), ALL),
        expected,
        "snapshot after remount"
    );
    assert_eq!(
        tree_snapshot(&sp(&m, "newer", ""), ALL),
        newer,
        "newer snapshot after remount"
    );
}

#[test]
fn rollback_is_refused_while_a_file_is_open_unless_forced() {
    let m = Mount::new();
    write_synced(&m.path("keep"), b"v1");
    create_ok(&m, "s");
    write_synced(&m.path("keep"), b"v2");
    write_synced(&m.path("later"), b"later");

    // Without --yes and no terminal: nothing happens.
    let out = snapshot_cmd(&m, "rollback", &[OsStr::new("s")]);
    assert_ne!(
        out.status.code(),
        Some(0),
        "rollback without --yes: {}",
        describe(&out)
    );
    assert_eq!(fs::read(m.path("keep")).unwrap(), b"v2");

    let held = File::open(m.path("later")).unwrap();
    let out = rollback(&m, "s", false);
    assert_eq!(
        out.status.code(),
        Some(1),
        "rollback with an open file must fail with exit 1: {}",
        describe(&out)
    );
    assert!(
        stderr_str(&out).contains("open"),
        "the refusal should say files are open: {}",
        describe(&out)
    );
    assert_eq!(
        fs::read(m.path("keep")).unwrap(),
        b"v2",
        "refused rollback changed data"
    );
    assert!(m.path("later").exists(), "refused rollback removed a file");

    let out = rollback(&m, "s", true);
    assert!(out.status.success(), "rollback --force: {}", describe(&out));
    drop(held);
    assert_eq!(fs::read(m.path("keep")).unwrap(), b"v1");
    assert!(
        !m.path("later").exists(),
        "file created after the snapshot survived --force"
    );

    // Unknown snapshot.
    let out = rollback(&m, "nope", false);
    assert_eq!(
        out.status.code(),
        Some(1),
        "rollback to a missing snapshot: {}",
        describe(&out)
    );
}

// ---------------------------------------------------------------------------
// Durability, delete, GC
// ---------------------------------------------------------------------------

#[test]
fn snapshots_survive_remount_and_kill9() {
    let mut m = Mount::new();
    let one = Rng::new(31).bytes(300_000);
    write_synced(&m.path("f1"), &one);
    create_ok(&m, "s1");
    m.remount();
    assert_eq!(names(&m), ["s1"]);
    assert_same_bytes(
        &fs::read(sp(&m, "s1", "f1")).unwrap(),
        &one,
        "s1 after remount",
    );

    let listed_before = list(&m);
    // Not fsync'd by the writer: the snapshot create acknowledges it.
    let two = Rng::new(32).bytes(500_000);
    fs::write(m.path("f2"), &two).unwrap();
    fs::write(m.path("f1"), b"overwritten").unwrap();
    create_ok(&m, "s2");
    m.kill9();
    m.remount();
    assert_eq!(
        names(&m),
        ["s1", "s2"],
        "an acknowledged snapshot was lost by kill -9"
    );
    assert_same_bytes(
        &fs::read(sp(&m, "s2", "f2")).unwrap(),
        &two,
        "s2/f2 after kill -9",
    );
    assert_eq!(fs::read(sp(&m, "s2", "f1")).unwrap(), b"overwritten");
    assert_same_bytes(
        &fs::read(sp(&m, "s1", "f1")).unwrap(),
        &one,
        "s1 after kill -9",
    );
    assert!(!sp(&m, "s1", "f2").exists());
    let listed = list(&m);
    let s1 = listed.iter().find(|s| s["name"] == "s1").unwrap();
    for k in ["name", "created", "epoch", "index"] {
        assert_eq!(
            s1[k], listed_before[0][k],
            "s1's {k} changed across kill -9"
        );
    }

    // Create immediately followed by kill -9, several times.
    for i in 0..3 {
        let data = Rng::new(100 + i).bytes(70_000);
        fs::write(m.path(&format!("g{i}")), &data).unwrap();
        create_ok(&m, &format!("k{i}"));
        m.kill9();
        m.remount();
        assert!(
            names(&m).contains(&format!("k{i}")),
            "snapshot k{i} lost by kill -9 right after create"
        );
        assert_same_bytes(
            &fs::read(sp(&m, &format!("k{i}"), &format!("g{i}"))).unwrap(),
            &data,
            &format!("k{i}/g{i}"),
        );
    }
}

#[test]
fn snapshot_list_json_describes_each_snapshot() {
    let m = Mount::new();
    assert!(list(&m).is_empty());
    write_synced(&m.path("big"), &Rng::new(40).bytes(2 * MIB as usize));
    let t0 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    create_ok(&m, "a");
    fs::remove_file(m.path("big")).unwrap();
    create_ok(&m, "b");
    let l = list(&m);
    assert_eq!(l.len(), 2, "{l:?}");
    let (a, b) = (
        l.iter().find(|s| s["name"] == "a").expect("a listed"),
        l.iter().find(|s| s["name"] == "b").expect("b listed"),
    );
    for s in [a, b] {
        for k in ["created", "epoch", "index", "exclusive_bytes"] {
            assert!(s[k].is_number(), "field {k} missing in {s}");
        }
        let c = s["created"].as_i64().unwrap();
        assert!((c - t0).abs() < 120, "created {c} is not now ({t0})");
    }
    assert!(a["epoch"].as_u64() < b["epoch"].as_u64(), "epochs: {a} {b}");
    assert_ne!(a["index"], b["index"]);
    assert!(
        a["exclusive_bytes"].as_u64().unwrap() >= 2 * MIB,
        "a alone holds the deleted 2 MiB file: {a}"
    );
    assert_eq!(b["exclusive_bytes"].as_u64(), Some(0), "{b}");
}

#[test]
fn deleting_a_snapshot_leaves_the_others_and_the_live_tree_unchanged() {
    let mut m = Mount::new();
    write_synced(&m.path("f"), b"v1");
    create_ok(&m, "s1");
    write_synced(&m.path("f"), b"v2");
    write_synced(&m.path("g"), &Rng::new(50).bytes(200_000));
    create_ok(&m, "s2");
    write_synced(&m.path("f"), b"v3");
    fs::remove_file(m.path("g")).unwrap();
    fs::create_dir(m.path("d")).unwrap();
    create_ok(&m, "s3");
    write_synced(&m.path("f"), b"v4");

    let t1 = tree_snapshot(&sp(&m, "s1", ""), ALL);
    let t3 = tree_snapshot(&sp(&m, "s3", ""), ALL);
    let live = tree_snapshot(&m.mnt, ALL);
    let i1 = inode_map(&sp(&m, "s1", ""));
    // Look at s2 (the kernel caches its names), then delete it.
    assert_eq!(ls(&sp(&m, "s2", "")), ["f", "g"]);
    delete_ok(&m, "s2");
    assert_eq!(names(&m), ["s1", "s3"]);
    assert_eq!(ls(&m.path(".snapshots")), ["s1", "s3"]);
    assert_errno(
        fs::metadata(sp(&m, "s2", "")),
        libc::ENOENT,
        "stat .snapshots/s2 right after its delete",
    );
    assert_eq!(
        tree_snapshot(&sp(&m, "s1", ""), ALL),
        t1,
        "s1 after deleting s2"
    );
    assert_eq!(
        tree_snapshot(&sp(&m, "s3", ""), ALL),
        t3,
        "s3 after deleting s2"
    );
    assert_eq!(
        tree_snapshot(&m.mnt, ALL),
        live,
        "live tree after deleting s2"
    );
    assert_eq!(inode_map(&sp(&m, "s1", "")), i1);

    let out = delete(&m, "s2");
    assert_eq!(
        out.status.code(),
        Some(1),
        "delete twice: {}",
        describe(&out)
    );
    let out = delete(&m, "never-existed");
    assert_eq!(
        out.status.code(),
        Some(1),
        "delete a missing snapshot: {}",
        describe(&out)
    );

    m.remount();
    assert_eq!(names(&m), ["s1", "s3"]);
    assert_eq!(
        tree_snapshot(&sp(&m, "s1", ""), ALL),
        t1,
        "s1 after remount"
    );
    assert_eq!(
        tree_snapshot(&sp(&m, "s3", ""), ALL),
        t3,
        "s3 after remount"
    );
    assert_eq!(tree_snapshot(&m.mnt, ALL), live, "live tree after remount");
    assert!(!sp(&m, "s2", "").exists());

    // Delete the oldest and the newest too.
    delete_ok(&m, "s1");
    assert_eq!(
        tree_snapshot(&sp(&m, "s3", ""), ALL),
        t3,
        "s3 after deleting s1"
    );
    delete_ok(&m, "s3");
    assert!(names(&m).is_empty());
    assert!(ls(&m.path(".snapshots")).is_empty());
    assert_eq!(
        tree_snapshot(&m.mnt, ALL),
        live,
        "live tree after deleting all"
    );
}

#[test]
fn a_deleted_snapshot_is_gone_at_once() {
    let m = Mount::new();
    write_synced(&m.path("f"), b"kept only by the snapshot");
    create_ok(&m, "s");
    fs::remove_file(m.path("f")).unwrap();
    // Read through the snapshot so the kernel caches its dentries, attributes and pages.
    assert_eq!(
        fs::read(sp(&m, "s", "f")).unwrap(),
        b"kept only by the snapshot"
    );
    delete_ok(&m, "s");
    let stat = fs::metadata(sp(&m, "s", "f")).map(|md| md.len());
    let read = fs::read(sp(&m, "s", "f")).map(|v| String::from_utf8_lossy(&v).into_owned());
    let root = fs::metadata(sp(&m, "s", "")).map(|md| md.ino());
    if !(stat.is_err() && read.is_err() && root.is_err()) {
        sleep(Duration::from_millis(1500));
        let later = fs::read(sp(&m, "s", "f")).map(|v| String::from_utf8_lossy(&v).into_owned());
        panic!(
            "right after 'snapshot delete s', the deleted snapshot is still reachable through \
             kernel caches: stat .snapshots/s/f = {stat:?}, read = {read:?}, \
             stat .snapshots/s = {root:?}; 1.5 s later read = {later:?}"
        );
    }
    assert_errno(
        fs::read(sp(&m, "s", "f")),
        libc::ENOENT,
        "read of a deleted snapshot's file",
    );
}

#[test]
fn a_recreated_snapshot_name_shows_the_new_snapshot_at_once() {
    let m = Mount::new();
    write_synced(&m.path("f"), b"first version");
    create_ok(&m, "nightly");
    // Read through the snapshot so the kernel caches its dentries, attributes and pages.
    assert_eq!(fs::read(sp(&m, "nightly", "f")).unwrap(), b"first version");
    write_synced(&m.path("f"), b"second version, longer");
    write_synced(&m.path("g"), b"new file");
    // The rotation a nightly backup script does.
    delete_ok(&m, "nightly");
    create_ok(&m, "nightly");
    let got = fs::read(sp(&m, "nightly", "f"));
    if !matches!(&got, Ok(v) if v == b"second version, longer") {
        sleep(Duration::from_millis(1500));
        let later = fs::read(sp(&m, "nightly", "f"));
        panic!(
            "right after delete + create of 'nightly', .snapshots/nightly/f gave {:?} \
             (kernel dentries/attributes/pages of the deleted snapshot are still used); \
             1.5 s later it gave {:?}",
            got.as_ref()
                .map(|v| String::from_utf8_lossy(v).into_owned()),
            later
                .as_ref()
                .map(|v| String::from_utf8_lossy(v).into_owned())
        );
    }
    assert_eq!(ls(&sp(&m, "nightly", "")), ["f", "g"]);
}

/// `thinfs gc --mount MNT`, which must succeed.
fn gc_ok(m: &Mount) {
    let out = thinfs([OsStr::new("gc"), OsStr::new("--mount"), m.mnt.as_os_str()]);
    assert!(
        out.status.success(),
        "thinfs gc --mount {:?} failed: {}",
        m.mnt,
        describe(&out)
    );
}

#[test]
fn deleting_a_snapshot_and_gc_frees_its_space() {
    let mut m = Mount::new();
    let keep = Rng::new(60).bytes(2 * MIB as usize);
    let big = Rng::new(61).bytes(8 * MIB as usize);
    write_synced(&m.path("keep.img"), &keep);
    write_synced(&m.path("big.img"), &big);
    create_ok(&m, "old");
    fs::remove_file(m.path("big.img")).unwrap();
    create_ok(&m, "keep");
    fs::remove_file(m.path("keep.img")).unwrap();
    write_synced(&m.path("live.img"), &Rng::new(62).bytes(MIB as usize));
    let s0 = stats(&m.mnt);
    assert!(
        s0.stored_bytes >= 11 * MIB,
        "all 11 MiB should be stored: {s0:?}"
    );

    // GC while the snapshots exist frees nothing they hold.
    gc_ok(&m);
    let s1 = stats(&m.mnt);
    assert!(
        s1.stored_bytes + 64 * KIB >= s0.stored_bytes,
        "gc freed data snapshots still hold: {s0:?} -> {s1:?}"
    );
    assert_same_bytes(
        &fs::read(sp(&m, "old", "big.img")).unwrap(),
        &big,
        "old/big.img after gc",
    );

    delete_ok(&m, "old");
    gc_ok(&m);
    let s2 = stats(&m.mnt);
    assert!(
        s2.stored_bytes + 8 * MIB <= s1.stored_bytes,
        "delete + gc did not free the 8 MiB only the deleted snapshot held: \
         stored {} -> {} ({s1:?} -> {s2:?})",
        s1.stored_bytes,
        s2.stored_bytes
    );
    assert!(
        s2.stored_bytes >= 3 * MIB,
        "gc freed data the other snapshot or the live tree holds: {s2:?}"
    );
    assert_same_bytes(
        &fs::read(sp(&m, "keep", "keep.img")).unwrap(),
        &keep,
        "keep/keep.img after gc",
    );
    m.remount();
    assert_same_bytes(
        &fs::read(sp(&m, "keep", "keep.img")).unwrap(),
        &keep,
        "keep/keep.img after gc + remount",
    );
    assert_eq!(fs::metadata(m.path("live.img")).unwrap().len(), MIB);
    assert_eq!(stats(&m.mnt).stored_bytes, s2.stored_bytes);
}

#[test]
fn data_restored_by_rollback_or_clone_survives_deleting_the_snapshot_and_gc() {
    let mut m = Mount::new();
    let a = Rng::new(70).bytes(3 * MIB as usize + 17);
    let b = Rng::new(71).bytes(2 * MIB as usize);
    write_synced(&m.path("a.img"), &a);
    write_synced(&m.path("b.img"), &b);
    create_ok(&m, "s");
    fs::remove_file(m.path("a.img")).unwrap();
    fs::remove_file(m.path("b.img")).unwrap();
    // b comes back as a clone, a by rollback; then the snapshot goes and GC runs.
    let out = clone_cmd(&sp(&m, "s", "b.img"), &m.path("b-restored.img"));
    assert!(out.status.success(), "clone: {}", describe(&out));
    let out = rollback(&m, "s", false);
    assert!(out.status.success(), "rollback: {}", describe(&out));
    assert_same_bytes(
        &fs::read(m.path("a.img")).unwrap(),
        &a,
        "a.img after rollback",
    );
    assert!(
        !m.path("b-restored.img").exists(),
        "the clone made after the snapshot survived the rollback"
    );
    let out = clone_cmd(&sp(&m, "s", "b.img"), &m.path("b-restored.img"));
    assert!(
        out.status.success(),
        "clone after rollback: {}",
        describe(&out)
    );
    fs::remove_file(m.path("b.img")).unwrap();
    delete_ok(&m, "s");
    gc_ok(&m);
    assert_same_bytes(
        &fs::read(m.path("a.img")).unwrap(),
        &a,
        "rolled-back a.img after gc",
    );
    assert_same_bytes(
        &fs::read(m.path("b-restored.img")).unwrap(),
        &b,
        "b cloned from the snapshot, after delete + gc",
    );
    m.remount();
    assert_same_bytes(
        &fs::read(m.path("a.img")).unwrap(),
        &a,
        "a.img after gc + remount",
    );
    assert_same_bytes(
        &fs::read(m.path("b-restored.img")).unwrap(),
        &b,
        "b-restored.img after gc + remount",
    );
    let st = stats(&m.mnt);
    assert!(
        st.stored_bytes >= 5 * MIB,
        "gc dropped chunks the live tree uses: {st:?}"
    );
}

#[test]
fn snapshot_create_copies_no_data() {
    let m = Mount::new();
    fs::create_dir(m.path("many")).unwrap();
    for i in 0..300 {
        fs::write(m.path(&format!("many/f{i:03}")), format!("file {i}\n")).unwrap();
    }
    {
        let f = File::create(m.path("big.img")).unwrap();
        f.set_len(64 * GIB).unwrap();
        let chunk = Rng::new(80).bytes(4 * MIB as usize);
        for i in 0..8u64 {
            f.write_all_at(&chunk[..], i * 8 * GIB).unwrap();
        }
        f.write_all_at(&Rng::new(81).bytes(8 * MIB as usize), 5 * MIB)
            .unwrap();
        f.sync_all().unwrap();
    }
    let before = stats(&m.mnt);
    let t = Instant::now();
    create_ok(&m, "s1");
    let first = t.elapsed();
    let t = Instant::now();
    create_ok(&m, "s2");
    let second = t.elapsed();
    let after = stats(&m.mnt);
    assert_eq!(
        (after.stored_bytes, after.chunks, after.pack_bytes),
        (before.stored_bytes, before.chunks, before.pack_bytes),
        "snapshot create stored data"
    );
    assert!(
        first < Duration::from_secs(10) && second < Duration::from_secs(10),
        "snapshot create of a 64 GiB file and 300 files took {first:?} / {second:?}"
    );
    assert_eq!(
        fs::metadata(sp(&m, "s2", "big.img")).unwrap().len(),
        64 * GIB
    );
    assert_eq!(ls(&sp(&m, "s1", "many")).len(), 300);
}

// ---------------------------------------------------------------------------
// Names, hooks, the snapshot directory's name
// ---------------------------------------------------------------------------

#[test]
fn snapshot_names_are_validated() {
    let m = Mount::new();
    let long = "x".repeat(256);
    for bad in ["", ".", "..", "a/b", "/abs", "trailing/", long.as_str()] {
        let out = create(&m, bad);
        assert_fails_one_line(&out, 1, &format!("snapshot create {bad:?}"));
        assert!(names(&m).is_empty(), "{bad:?} created a snapshot");
    }
    let max = "y".repeat(255);
    for good in [
        "nightly",
        "2024-01-01T00:00",
        "with space",
        "snäp",
        "..dots",
        max.as_str(),
    ] {
        create_ok(&m, good);
        assert!(
            sp(&m, good, "").is_dir(),
            "snapshot {good:?} is not visible under .snapshots"
        );
    }
    let before = list(&m);
    let out = create(&m, "nightly");
    assert_fails_one_line(&out, 1, "duplicate snapshot name");
    assert_eq!(
        list(&m),
        before,
        "a duplicate create changed the snapshot list"
    );
    for bad in ["", "..", "a/b"] {
        let out = delete(&m, bad);
        assert_eq!(
            out.status.code(),
            Some(1),
            "delete {bad:?}: {}",
            describe(&out)
        );
    }
    assert_eq!(list(&m), before);
}

#[test]
fn exec_before_failure_aborts_the_snapshot() {
    let m = Mount::new();
    write_synced(&m.path("f"), b"x");
    let out = snapshot_cmd(
        &m,
        "create",
        &[
            OsStr::new("s"),
            OsStr::new("--exec-before"),
            OsStr::new("echo freezing; exit 7"),
        ],
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "failing --exec-before: {}",
        describe(&out)
    );
    let err = stderr_str(&out);
    assert!(
        shows_status(&err, 7),
        "the hook's exit status 7 should be shown: {}",
        describe(&out)
    );
    assert!(
        names(&m).is_empty(),
        "a snapshot was taken although --exec-before failed"
    );
    assert!(!sp(&m, "s", "").exists());
}

#[test]
fn exec_hooks_run_in_order_around_the_snapshot() {
    let m = Mount::new();
    let before = m.path("before.txt");
    let after = m.path("after.txt");
    let out = snapshot_cmd(
        &m,
        "create",
        &[
            OsStr::new("s"),
            OsStr::new("--exec-before"),
            OsStr::new(&format!("echo frozen > '{}'", before.display())),
            OsStr::new("--exec-after"),
            OsStr::new(&format!("echo thawed > '{}'", after.display())),
        ],
    );
    assert!(
        out.status.success(),
        "create with hooks: {}",
        describe(&out)
    );
    assert_eq!(fs::read(&before).unwrap(), b"frozen\n");
    assert_eq!(fs::read(&after).unwrap(), b"thawed\n");
    assert_eq!(
        fs::read(sp(&m, "s", "before.txt")).ok(),
        Some(b"frozen\n".to_vec()),
        "what --exec-before wrote is not in the snapshot"
    );
    assert!(
        !sp(&m, "s", "after.txt").exists(),
        "what --exec-after wrote is in the snapshot"
    );
}

#[test]
fn exec_after_runs_even_if_the_snapshot_fails() {
    let m = Mount::new();
    create_ok(&m, "dup");
    let marker = m.scratch().join("thawed");
    let out = snapshot_cmd(
        &m,
        "create",
        &[
            OsStr::new("dup"),
            OsStr::new("--exec-after"),
            OsStr::new(&format!("touch '{}'", marker.display())),
        ],
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "duplicate create: {}",
        describe(&out)
    );
    assert!(
        marker.exists(),
        "--exec-after did not run after a failed create: {}",
        describe(&out)
    );
    assert_eq!(names(&m), ["dup"]);

    // A failing --exec-after after a successful create: the snapshot stays, the failure shows.
    let out = snapshot_cmd(
        &m,
        "create",
        &[
            OsStr::new("ok"),
            OsStr::new("--exec-after"),
            OsStr::new("exit 3"),
        ],
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "failing --exec-after: {}",
        describe(&out)
    );
    assert!(
        shows_status(&stderr_str(&out), 3),
        "the hook's exit status 3 should be shown: {}",
        describe(&out)
    );
    assert_eq!(names(&m), ["dup", "ok"]);
}

#[test]
fn create_without_mount_uses_the_current_directory() {
    let m = Mount::new();
    fs::create_dir(m.path("sub")).unwrap();
    write_synced(&m.path("sub/f"), b"cwd");
    let out = run_timeout(
        Command::new(thinfs_bin())
            .args(["snapshot", "create", "from-cwd"])
            .current_dir(m.path("sub")),
        CMD_TIMEOUT,
    );
    assert!(
        out.status.success(),
        "create from a cwd in the mount: {}",
        describe(&out)
    );
    assert_eq!(fs::read(sp(&m, "from-cwd", "sub/f")).unwrap(), b"cwd");
    let out = run_timeout(
        Command::new(thinfs_bin())
            .args(["snapshot", "create", "outside"])
            .current_dir(m.scratch()),
        CMD_TIMEOUT,
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "create outside a mount: {}",
        describe(&out)
    );
}

#[test]
fn snapdir_mount_option_renames_the_snapshot_directory() {
    let mut m = Mount::with(MountOptions {
        mount_args: vec!["-o".into(), "snapdir=snaps".into()],
        ..MountOptions::default()
    });
    write_synced(&m.path("f"), b"v1");
    create_ok(&m, "s");
    assert_eq!(fs::read(m.path("snaps/s/f")).unwrap(), b"v1");
    assert_eq!(ls(&m.path("snaps")), ["s"]);
    assert_eq!(
        ls(&m.mnt),
        ["f"],
        "the renamed snapshot dir shows in the root listing"
    );
    assert_errno(
        fs::metadata(m.path(".snapshots")),
        libc::ENOENT,
        "stat .snapshots with snapdir=snaps",
    );
    // .snapshots is an ordinary name now; snaps is reserved and read-only.
    fs::create_dir(m.path(".snapshots")).unwrap();
    write_synced(&m.path(".snapshots/plain"), b"plain");
    assert_errno(fs::create_dir(m.path("snaps")), libc::EEXIST, "mkdir snaps");
    assert_errno(
        open_flags(&m.path("snaps/x"), libc::O_WRONLY | libc::O_CREAT),
        libc::EROFS,
        "create in snaps",
    );
    assert_errno(
        open_flags(&m.path("snaps/s/f"), libc::O_WRONLY),
        libc::EROFS,
        "write into snaps/s/f",
    );
    create_ok(&m, "s2");
    assert_eq!(
        fs::read(m.path("snaps/s2/.snapshots/plain")).unwrap(),
        b"plain"
    );
    assert_eq!(ls(&m.path("snaps/s2")), [".snapshots", "f"]);
    m.remount();
    assert_eq!(fs::read(m.path("snaps/s/f")).unwrap(), b"v1");
    assert_eq!(fs::read(m.path(".snapshots/plain")).unwrap(), b"plain");
}

/// A store made with `mkfs --snapshot-dir`, mounted in the background by `thinfs mount`.
struct BgMount {
    _dir: tempfile::TempDir,
    store: PathBuf,
    mnt: PathBuf,
}

impl BgMount {
    fn new(mkfs_extra: &[&str], mount_opts: Option<&str>) -> BgMount {
        let dir = test_dir("snapdir");
        let store = dir.path().join("store");
        let mnt = dir.path().join("mnt");
        fs::create_dir(&mnt).unwrap();
        mkfs(&store, mkfs_extra);
        let mut b = BgMount {
            _dir: dir,
            store,
            mnt,
        };
        b.mount(mount_opts);
        b
    }

    fn mount(&mut self, opts: Option<&str>) {
        let mut args: Vec<&OsStr> = vec![
            OsStr::new("mount"),
            self.store.as_os_str(),
            self.mnt.as_os_str(),
        ];
        if let Some(o) = opts {
            args.push(OsStr::new("-o"));
            args.push(OsStr::new(o));
        }
        let out = thinfs(&args);
        assert!(out.status.success(), "thinfs mount: {}", describe(&out));
        assert!(
            thinfs_mounted_at(&self.mnt),
            "mount returned but is not live"
        );
    }

    fn unmount(&mut self) {
        run_ok(Command::new("umount").arg(&self.mnt));
        assert!(
            wait_no_process_with(self.store.to_str().unwrap(), EXIT_TIMEOUT),
            "daemon of {:?} did not exit after umount",
            self.store
        );
    }
}

impl Drop for BgMount {
    fn drop(&mut self) {
        if mount_at(&self.mnt).is_some() {
            force_unmount(&self.mnt);
            wait_no_process_with(self.store.to_str().unwrap(), EXIT_TIMEOUT);
        }
    }
}

#[test]
fn mkfs_snapshot_dir_sets_the_default_and_the_mount_option_overrides_it() {
    let mut b = BgMount::new(&["--snapshot-dir", ".snap"], None);
    write_synced(&b.mnt.join("f"), b"data");
    let out = thinfs([
        OsStr::new("snapshot"),
        OsStr::new("create"),
        OsStr::new("s"),
        OsStr::new("--mount"),
        b.mnt.as_os_str(),
    ]);
    assert!(out.status.success(), "create: {}", describe(&out));
    assert_eq!(fs::read(b.mnt.join(".snap/s/f")).unwrap(), b"data");
    assert!(!b.mnt.join(".snapshots").exists());
    assert_eq!(ls(&b.mnt), ["f"]);
    b.unmount();

    b.mount(Some("snapdir=other"));
    assert_eq!(fs::read(b.mnt.join("other/s/f")).unwrap(), b"data");
    assert!(
        !b.mnt.join(".snap").exists(),
        "the mkfs default still applies with snapdir="
    );
    b.unmount();

    // A bad snapdir name is refused at mount time.
    let out = thinfs([
        OsStr::new("mount"),
        b.store.as_os_str(),
        b.mnt.as_os_str(),
        OsStr::new("-o"),
        OsStr::new("snapdir=a/b"),
    ]);
    assert!(
        !out.status.success(),
        "snapdir=a/b was accepted: {}",
        describe(&out)
    );
    assert!(!thinfs_mounted_at(&b.mnt));
    let out = thinfs([
        OsStr::new("mkfs"),
        b.mnt.join("../store2").as_os_str(),
        OsStr::new("--snapshot-dir"),
        OsStr::new(".."),
    ]);
    assert!(
        !out.status.success(),
        "mkfs --snapshot-dir .. was accepted: {}",
        describe(&out)
    );
}

// ---------------------------------------------------------------------------
// Permissions and big listings
// ---------------------------------------------------------------------------

#[test]
fn snapshot_files_keep_their_permissions_for_other_users() {
    let m = Mount::with(MountOptions {
        mount_args: vec!["-o".into(), "allow_other".into()],
        ..MountOptions::default()
    });
    fs::set_permissions(&m.mnt, fs::Permissions::from_mode(0o755)).unwrap();
    write_synced(&m.path("public"), b"public\n");
    write_synced(&m.path("secret"), b"secret\n");
    fs::set_permissions(m.path("public"), fs::Permissions::from_mode(0o644)).unwrap();
    fs::set_permissions(m.path("secret"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::create_dir(m.path("private")).unwrap();
    write_synced(&m.path("private/inside"), b"inside\n");
    fs::set_permissions(m.path("private"), fs::Permissions::from_mode(0o700)).unwrap();
    create_ok(&m, "s");
    // Opened up in the live tree after the snapshot: the snapshot keeps the old modes.
    fs::set_permissions(m.path("secret"), fs::Permissions::from_mode(0o644)).unwrap();
    fs::set_permissions(m.path("private"), fs::Permissions::from_mode(0o755)).unwrap();

    let snap = sp(&m, "s", "");
    let out = as_nobody(&format!("cat '{}'", snap.join("public").display()));
    assert!(
        out.status.success() && out.stdout == b"public\n",
        "nobody cannot read a 0644 snapshot file: {}",
        describe(&out)
    );
    for (what, script) in [
        (
            "read a 0600 root file",
            format!("cat '{}'", snap.join("secret").display()),
        ),
        (
            "list a 0700 root dir",
            format!("ls '{}'", snap.join("private").display()),
        ),
        (
            "read inside a 0700 root dir",
            format!("cat '{}'", snap.join("private/inside").display()),
        ),
    ] {
        let out = as_nobody(&script);
        assert!(
            !out.status.success() && stderr_str(&out).contains("Permission denied"),
            "nobody could {what} in a snapshot: {}",
            describe(&out)
        );
    }
    // Live: now readable.
    let out = as_nobody(&format!("cat '{}'", m.path("secret").display()));
    assert!(
        out.status.success(),
        "live secret after chmod: {}",
        describe(&out)
    );
    // And nobody cannot write into a snapshot either (EROFS, or EACCES first).
    let out = as_nobody(&format!("echo x > '{}'", snap.join("public").display()));
    assert!(
        !out.status.success(),
        "nobody wrote into a snapshot: {}",
        describe(&out)
    );
}

#[test]
fn big_directories_and_many_snapshots_list_completely() {
    let m = Mount::new();
    fs::create_dir(m.path("big")).unwrap();
    let mut want = Vec::new();
    for i in 0..1500 {
        // Long names make the listing span many readdir buffers.
        let n = format!("entry-{i:05}-{}", "n".repeat(i % 120));
        File::create(m.path("big").join(&n)).unwrap();
        want.push(n);
    }
    want.sort();
    let mut snaps = Vec::new();
    for i in 0..60 {
        let n = format!("snap-{i:03}-{}", "s".repeat(i * 3));
        create_ok(&m, &n);
        snaps.push(n);
    }
    snaps.sort();
    assert_eq!(ls(&m.path(".snapshots")), snaps, "listing of .snapshots");
    assert_eq!(names(&m), snaps, "snapshot list");
    for s in [&snaps[0], &snaps[59]] {
        assert_eq!(ls(&sp(&m, s, "big")), want, "listing of {s}/big");
    }
    // Live changes do not show in the snapshots' listings.
    for n in want.iter().take(500) {
        fs::remove_file(m.path("big").join(n)).unwrap();
    }
    assert_eq!(ls(&m.path("big")).len(), 1000);
    assert_eq!(ls(&sp(&m, &snaps[30], "big")), want);
    // The `ls -la` path: readdirplus with attributes of every entry.
    let out = run_ok(Command::new("ls").arg("-la").arg(sp(&m, &snaps[10], "big")));
    let lines = stdout_str(&out).lines().count();
    assert_eq!(lines, 1500 + 3, "ls -la of a snapshot directory");
}

// ---------------------------------------------------------------------------
// Atomicity against namespace changes
// ---------------------------------------------------------------------------

/// Content of version `v` of the config file the atomic-replace writer publishes.
fn config_version(v: u64) -> Vec<u8> {
    let mut c = format!("version {v:010}\n").into_bytes();
    c.extend(Rng::new(v).bytes(20_000 + (v % 7) as usize * 1000));
    c
}

#[test]
fn snapshot_is_atomic_with_renames_and_atomic_replaces() {
    let m = Mount::new();
    let (a, b) = (m.path("a"), m.path("b"));
    fs::create_dir(&a).unwrap();
    fs::create_dir(&b).unwrap();
    const TOKENS: u64 = 40;
    for i in 0..TOKENS {
        fs::write(a.join(format!("token-{i:02}")), format!("token {i}")).unwrap();
    }
    write_synced(&m.path("cfg.json"), &config_version(0));
    let stop = Arc::new(AtomicBool::new(false));
    let published = Arc::new(AtomicU64::new(0));

    // Moves tokens between a/ and b/ (each token always exists exactly once).
    let mover = {
        let (a, b, stop) = (a.clone(), b.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut rng = Rng::new(90);
            let mut in_b = [false; TOKENS as usize];
            let mut moves = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let i = rng.below(TOKENS) as usize;
                let n = format!("token-{i:02}");
                let (from, to) = if in_b[i] { (&b, &a) } else { (&a, &b) };
                fs::rename(from.join(&n), to.join(&n))
                    .unwrap_or_else(|e| panic!("rename {n}: {e}"));
                in_b[i] = !in_b[i];
                moves += 1;
            }
            moves
        })
    };
    // Publishes new versions of cfg.json by write tmp + fsync + rename.
    let replacer = {
        let (dir, stop, published) = (m.mnt.clone(), stop.clone(), published.clone());
        std::thread::spawn(move || {
            let mut v = 0;
            while !stop.load(Ordering::SeqCst) {
                v += 1;
                write_synced(&dir.join("cfg.tmp"), &config_version(v));
                fs::rename(dir.join("cfg.tmp"), dir.join("cfg.json")).unwrap();
                published.store(v, Ordering::SeqCst);
            }
            v
        })
    };
    let mut cuts = Vec::new();
    for k in 0..8 {
        sleep(Duration::from_millis(60));
        let before = published.load(Ordering::SeqCst);
        let name = format!("ns-{k}");
        create_ok(&m, &name);
        cuts.push((name, before));
    }
    stop.store(true, Ordering::SeqCst);
    let moves = mover.join().unwrap();
    let versions = replacer.join().unwrap();
    assert!(
        moves > 0 && versions > 0,
        "moves {moves}, versions {versions}"
    );

    for (name, before) in &cuts {
        let in_a: BTreeSet<String> = ls(&sp(&m, name, "a")).into_iter().collect();
        let in_b: BTreeSet<String> = ls(&sp(&m, name, "b")).into_iter().collect();
        for i in 0..TOKENS {
            let n = format!("token-{i:02}");
            let count = in_a.contains(&n) as u32 + in_b.contains(&n) as u32;
            assert_eq!(
                count, 1,
                "snapshot {name}: {n} appears {count} times across a/ and b/ (a rename was cut \
                 in half)"
            );
            let side = if in_a.contains(&n) { "a" } else { "b" };
            assert_eq!(
                fs::read(sp(&m, name, &format!("{side}/{n}"))).unwrap(),
                format!("token {i}").into_bytes()
            );
        }
        assert_eq!(
            in_a.len() + in_b.len(),
            TOKENS as usize,
            "snapshot {name}: extra names"
        );
        let cfg = fs::read(sp(&m, name, "cfg.json")).unwrap_or_else(|e| {
            panic!("snapshot {name}: cfg.json missing during an atomic replace: {e}")
        });
        let head = String::from_utf8_lossy(&cfg[..19.min(cfg.len())]).into_owned();
        let v: u64 = head
            .strip_prefix("version ")
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or_else(|| panic!("snapshot {name}: cfg.json is not a version: {head:?}"));
        assert_same_bytes(
            &cfg,
            &config_version(v),
            &format!("snapshot {name}: cfg.json v{v}"),
        );
        assert!(
            v >= *before,
            "snapshot {name}: cfg.json is version {v}, but version {before} was published \
             before the snapshot started"
        );
    }
}

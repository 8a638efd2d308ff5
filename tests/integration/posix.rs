//! POSIX semantics through a real mount: data at any offset, truncate, the
//! namespace (mkdir, readdir, rename flavours, unlink, links), attributes,
//! timestamps, xattrs, statfs, special files and name limits.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::thread::sleep;
use std::time::Duration;

use super::common::*;

#[test]
fn create_open_read_write_and_errors() {
    let m = Mount::new();
    let p = m.path("f");
    fs::write(&p, b"hello").unwrap();
    assert_eq!(fs::read(&p).unwrap(), b"hello");
    // O_EXCL on an existing name.
    let r = OpenOptions::new().write(true).create_new(true).open(&p);
    assert_errno(r, libc::EEXIST, "O_CREAT|O_EXCL on an existing file");
    // Opening a missing name.
    assert_errno(File::open(m.path("missing")), libc::ENOENT, "open missing");
    // O_TRUNC empties.
    OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&p)
        .unwrap();
    assert_eq!(fs::metadata(&p).unwrap().len(), 0);
    // O_APPEND appends.
    fs::write(&p, b"abc").unwrap();
    let mut f = OpenOptions::new().append(true).open(&p).unwrap();
    f.write_all(b"def").unwrap();
    drop(f);
    assert_eq!(fs::read(&p).unwrap(), b"abcdef");
    // Sequential read/write through one fd, with a seek.
    let mut f = open_rw(&m.path("seq"));
    f.write_all(b"0123456789").unwrap();
    use std::io::Seek;
    f.seek(std::io::SeekFrom::Start(3)).unwrap();
    let mut buf = [0u8; 4];
    f.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"3456");
    // A directory is not a file.
    assert_errno(
        OpenOptions::new().write(true).open(&m.mnt),
        libc::EISDIR,
        "open a directory for writing",
    );
}

#[test]
fn write_and_read_at_any_offset_including_huge_sparse() {
    let m = Mount::new();
    let f = open_rw(&m.path("big"));
    let mut rng = Rng::new(1);
    let offsets = [
        0u64,
        1,
        4095,
        4096 + 17,
        16 * KIB - 3,
        MIB + 3,
        100 * MIB + 12345,
        TIB,
        TIB + 65_536 - 5,
        15 * TIB,
        15 * TIB + 3 * MIB + 1,
    ];
    let mut written = Vec::new();
    for (i, &off) in offsets.iter().enumerate() {
        let data = rng.bytes(1 + (i * 7919) % 70_000);
        f.write_all_at(&data, off).unwrap();
        written.push((off, data));
    }
    f.set_len(16 * TIB).unwrap();
    assert_eq!(f.metadata().unwrap().len(), 16 * TIB);
    assert_eq!(fs::metadata(m.path("big")).unwrap().len(), 16 * TIB);
    // Later writes may overlap earlier ones: build the expected bytes per range.
    for (i, (off, data)) in written.iter().enumerate() {
        let mut expect = data.clone();
        for (off2, data2) in &written[i + 1..] {
            for (j, b) in expect.iter_mut().enumerate() {
                let pos = off + j as u64;
                if pos >= *off2 && pos < off2 + data2.len() as u64 {
                    *b = data2[(pos - off2) as usize];
                }
            }
        }
        let got = read_at(&f, *off, data.len());
        assert_same_bytes(&got, &expect, &format!("read back at offset {off}"));
    }
    // Holes read as zeros, near and far.
    for off in [200 * MIB, 2 * TIB, 15 * TIB - MIB, 16 * TIB - 4096] {
        let got = read_at(&f, off, 4096);
        assert_eq!(got.len(), 4096, "short read inside the file at {off}");
        assert!(
            got.iter().all(|&b| b == 0),
            "hole at {off} does not read as zeros"
        );
    }
    // Reads at and past EOF return nothing.
    assert!(read_at(&f, 16 * TIB, 10).is_empty());
    assert!(read_at(&f, 16 * TIB + MIB, 10).is_empty());
    // A read straddling EOF is short.
    assert_eq!(read_at(&f, 16 * TIB - 10, 100).len(), 10);
    // Writing and reading through a second fd sees the same data.
    let g = File::open(m.path("big")).unwrap();
    assert_same_bytes(
        &read_at(&g, 15 * TIB + 3 * MIB + 1, 100),
        &written[10].1[..100],
        "second fd",
    );
}

#[test]
fn truncate_and_ftruncate_grow_and_shrink() {
    let m = Mount::new();
    let mut rng = Rng::new(2);
    let data = rng.bytes(100 * 1024 + 7);
    let p = m.path("t");
    fs::write(&p, &data).unwrap();
    let f = open_rw(&p);

    // ftruncate grow: the tail reads zeros.
    f.set_len(300 * 1024).unwrap();
    assert_eq!(f.metadata().unwrap().len(), 300 * 1024);
    let got = read_at(&f, 0, 300 * 1024);
    assert_same_bytes(&got[..data.len()], &data, "data before the grown tail");
    assert!(
        got[data.len()..].iter().all(|&b| b == 0),
        "grown tail is not zero"
    );

    // ftruncate shrink to an unaligned size, then grow again: no old data comes back.
    f.set_len(10_001).unwrap();
    assert_eq!(fs::metadata(&p).unwrap().len(), 10_001);
    f.set_len(100 * 1024).unwrap();
    let got = read_at(&f, 0, 100 * 1024);
    assert_same_bytes(&got[..10_001], &data[..10_001], "data kept by the shrink");
    assert!(
        got[10_001..].iter().all(|&b| b == 0),
        "old data reappeared after shrink + grow at byte {:?}",
        got[10_001..]
            .iter()
            .position(|&b| b != 0)
            .map(|i| i + 10_001)
    );

    // truncate(2) by path, shrink and grow, including to zero.
    let cp = cpath(&p);
    cvt(unsafe { libc::truncate(cp.as_ptr(), 5) }).unwrap();
    assert_eq!(fs::read(&p).unwrap(), &data[..5]);
    cvt(unsafe { libc::truncate(cp.as_ptr(), 70_000) }).unwrap();
    let got = fs::read(&p).unwrap();
    assert_eq!(got.len(), 70_000);
    assert_eq!(&got[..5], &data[..5]);
    assert!(got[5..].iter().all(|&b| b == 0));
    cvt(unsafe { libc::truncate(cp.as_ptr(), 0) }).unwrap();
    assert_eq!(fs::metadata(&p).unwrap().len(), 0);
    cvt(unsafe { libc::truncate(cp.as_ptr(), 4096) }).unwrap();
    assert_eq!(fs::read(&p).unwrap(), vec![0u8; 4096]);

    // A write past EOF leaves a zero gap.
    f.write_all_at(b"xyz", 10_000).unwrap();
    let got = fs::read(&p).unwrap();
    assert_eq!(got.len(), 10_003);
    assert!(got[..10_000].iter().all(|&b| b == 0));
    assert_eq!(&got[10_000..], b"xyz");
}

#[test]
fn mkdir_rmdir_and_notempty() {
    let m = Mount::new();
    let d = m.path("d");
    fs::create_dir(&d).unwrap();
    assert!(fs::metadata(&d).unwrap().is_dir());
    assert_errno(fs::create_dir(&d), libc::EEXIST, "mkdir existing");
    fs::create_dir_all(d.join("x/y/z")).unwrap();
    fs::write(d.join("x/file"), b"1").unwrap();
    assert_errno(fs::remove_dir(&d), libc::ENOTEMPTY, "rmdir non-empty");
    assert_errno(
        fs::remove_dir(d.join("x")),
        libc::ENOTEMPTY,
        "rmdir non-empty (file)",
    );
    assert_errno(
        fs::remove_dir(d.join("x/file")),
        libc::ENOTDIR,
        "rmdir a file",
    );
    assert_errno(
        fs::remove_file(d.join("x")),
        libc::EISDIR,
        "unlink a directory",
    );
    assert_errno(
        fs::remove_dir(m.path("missing")),
        libc::ENOENT,
        "rmdir missing",
    );
    assert_errno(
        fs::create_dir(m.path("missing/child")),
        libc::ENOENT,
        "mkdir under missing parent",
    );
    fs::remove_dir(d.join("x/y/z")).unwrap();
    fs::remove_dir(d.join("x/y")).unwrap();
    fs::remove_file(d.join("x/file")).unwrap();
    fs::remove_dir(d.join("x")).unwrap();
    fs::remove_dir(&d).unwrap();
    assert_errno(fs::metadata(&d), libc::ENOENT, "stat removed dir");
    // nlink of a directory counts its subdirectories (2 + n), as on ext4.
    fs::create_dir(&d).unwrap();
    fs::create_dir(d.join("s1")).unwrap();
    fs::create_dir(d.join("s2")).unwrap();
    assert_eq!(
        fs::metadata(&d).unwrap().nlink(),
        4,
        "dir nlink = 2 + subdirs"
    );
}

#[test]
fn readdir_lists_exactly_the_entries() {
    let m = Mount::new();
    let d = m.path("dir");
    fs::create_dir(&d).unwrap();
    let mut expect = std::collections::BTreeMap::new();
    // Enough entries to need several READDIR replies.
    for i in 0..600 {
        let name = format!("entry-{i:04}-{}", "x".repeat(i % 40));
        if i % 10 == 0 {
            fs::create_dir(d.join(&name)).unwrap();
            expect.insert(name, 'd');
        } else if i % 10 == 1 {
            std::os::unix::fs::symlink("target", d.join(&name)).unwrap();
            expect.insert(name, 'l');
        } else {
            fs::write(d.join(&name), b"").unwrap();
            expect.insert(name, 'f');
        }
    }
    let mut got = std::collections::BTreeMap::new();
    for e in fs::read_dir(&d).unwrap() {
        let e = e.unwrap();
        let ft = e.file_type().unwrap();
        let k = if ft.is_dir() {
            'd'
        } else if ft.is_symlink() {
            'l'
        } else {
            'f'
        };
        let name = e.file_name().into_string().unwrap();
        assert!(
            got.insert(name.clone(), k).is_none(),
            "readdir returned {name} twice"
        );
    }
    assert_eq!(got, expect);
    // readdir(3) also yields "." and "..".
    let names = raw_readdir(&d);
    assert!(names.contains(&".".to_string()) && names.contains(&"..".to_string()));
    assert_eq!(names.len(), 602);
    // Removing entries while listing again reflects the change.
    for i in (0..600).step_by(3) {
        let name = format!("entry-{i:04}-{}", "x".repeat(i % 40));
        if expect[&name] == 'd' {
            fs::remove_dir(d.join(&name)).unwrap();
        } else {
            fs::remove_file(d.join(&name)).unwrap();
        }
    }
    assert_eq!(fs::read_dir(&d).unwrap().count(), 400);
    // An empty directory lists nothing.
    fs::create_dir(m.path("empty")).unwrap();
    assert_eq!(fs::read_dir(m.path("empty")).unwrap().count(), 0);
}

fn raw_readdir(d: &Path) -> Vec<String> {
    let mut names = Vec::new();
    unsafe {
        let dir = libc::opendir(cpath(d).as_ptr());
        assert!(!dir.is_null());
        loop {
            let ent = libc::readdir(dir);
            if ent.is_null() {
                break;
            }
            let name = std::ffi::CStr::from_ptr((*ent).d_name.as_ptr());
            names.push(name.to_string_lossy().into_owned());
        }
        libc::closedir(dir);
    }
    names
}

#[test]
fn rename_over_existing_and_across_directories() {
    let m = Mount::new();
    fs::write(m.path("a"), b"AAAA").unwrap();
    fs::write(m.path("b"), b"BB").unwrap();
    let ino_a = fs::metadata(m.path("a")).unwrap().ino();
    fs::rename(m.path("a"), m.path("b")).unwrap();
    assert_errno(
        fs::metadata(m.path("a")),
        libc::ENOENT,
        "old name after rename",
    );
    assert_eq!(fs::read(m.path("b")).unwrap(), b"AAAA");
    assert_eq!(
        fs::metadata(m.path("b")).unwrap().ino(),
        ino_a,
        "rename keeps the inode"
    );
    assert_eq!(fs::read_dir(&m.mnt).unwrap().count(), 1);

    // Across directories, with a file and with a whole directory.
    fs::create_dir_all(m.path("d1/sub")).unwrap();
    fs::create_dir(m.path("d2")).unwrap();
    fs::write(m.path("d1/sub/f"), b"deep").unwrap();
    fs::rename(m.path("b"), m.path("d2/moved")).unwrap();
    assert_eq!(fs::read(m.path("d2/moved")).unwrap(), b"AAAA");
    fs::rename(m.path("d1/sub"), m.path("d2/sub")).unwrap();
    assert_eq!(fs::read(m.path("d2/sub/f")).unwrap(), b"deep");
    assert_errno(
        fs::metadata(m.path("d1/sub")),
        libc::ENOENT,
        "moved dir old name",
    );
    // Directory nlink follows the moved subdirectory.
    assert_eq!(fs::metadata(m.path("d1")).unwrap().nlink(), 2);
    assert_eq!(fs::metadata(m.path("d2")).unwrap().nlink(), 3);
    // ".." of the moved directory is its new parent.
    assert_eq!(
        fs::metadata(m.path("d2/sub/..")).unwrap().ino(),
        fs::metadata(m.path("d2")).unwrap().ino()
    );

    // Directory over an empty directory works; over a non-empty one fails.
    fs::create_dir(m.path("e1")).unwrap();
    fs::create_dir(m.path("e2")).unwrap();
    fs::rename(m.path("e1"), m.path("e2")).unwrap();
    assert_errno(fs::metadata(m.path("e1")), libc::ENOENT, "e1 after rename");
    assert_errno(
        fs::rename(m.path("e2"), m.path("d2")),
        libc::ENOTEMPTY,
        "rename over a non-empty directory",
    );
    // File over directory and directory over file.
    fs::write(m.path("plain"), b"p").unwrap();
    assert_errno(
        fs::rename(m.path("plain"), m.path("e2")),
        libc::EISDIR,
        "file over dir",
    );
    assert_errno(
        fs::rename(m.path("e2"), m.path("plain")),
        libc::ENOTDIR,
        "dir over file",
    );
    // A directory into its own subtree.
    assert_errno(
        fs::rename(m.path("d2"), m.path("d2/sub/inside")),
        libc::EINVAL,
        "dir into itself",
    );
    // Rename to the same name is a no-op.
    fs::rename(m.path("plain"), m.path("plain")).unwrap();
    assert_eq!(fs::read(m.path("plain")).unwrap(), b"p");
}

fn renameat2(from: &Path, to: &Path, flags: u32) -> std::io::Result<()> {
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            cpath(from).as_ptr(),
            libc::AT_FDCWD,
            cpath(to).as_ptr(),
            flags,
        )
    };
    cvt(r).map(|_| ())
}

#[test]
fn rename_noreplace_and_exchange() {
    let m = Mount::new();
    fs::write(m.path("x"), b"xxx").unwrap();
    fs::write(m.path("y"), b"yyyyyy").unwrap();
    let ix = fs::metadata(m.path("x")).unwrap().ino();
    let iy = fs::metadata(m.path("y")).unwrap().ino();
    assert_errno(
        renameat2(&m.path("x"), &m.path("y"), libc::RENAME_NOREPLACE),
        libc::EEXIST,
        "RENAME_NOREPLACE onto an existing name",
    );
    assert_eq!(fs::read(m.path("x")).unwrap(), b"xxx");
    assert_eq!(fs::read(m.path("y")).unwrap(), b"yyyyyy");
    renameat2(&m.path("x"), &m.path("z"), libc::RENAME_NOREPLACE).unwrap();
    assert_eq!(fs::read(m.path("z")).unwrap(), b"xxx");
    assert_errno(
        fs::metadata(m.path("x")),
        libc::ENOENT,
        "x after NOREPLACE rename",
    );

    renameat2(&m.path("z"), &m.path("y"), libc::RENAME_EXCHANGE).unwrap();
    assert_eq!(fs::read(m.path("z")).unwrap(), b"yyyyyy");
    assert_eq!(fs::read(m.path("y")).unwrap(), b"xxx");
    assert_eq!(fs::metadata(m.path("y")).unwrap().ino(), ix);
    assert_eq!(fs::metadata(m.path("z")).unwrap().ino(), iy);

    // Exchange a file with a directory in another directory.
    fs::create_dir_all(m.path("dir/inner")).unwrap();
    fs::write(m.path("dir/inner/f"), b"in").unwrap();
    renameat2(&m.path("z"), &m.path("dir/inner"), libc::RENAME_EXCHANGE).unwrap();
    assert!(fs::metadata(m.path("z")).unwrap().is_dir());
    assert_eq!(fs::read(m.path("z/f")).unwrap(), b"in");
    assert_eq!(fs::read(m.path("dir/inner")).unwrap(), b"yyyyyy");

    assert_errno(
        renameat2(&m.path("y"), &m.path("nothere"), libc::RENAME_EXCHANGE),
        libc::ENOENT,
        "RENAME_EXCHANGE with a missing target",
    );
}

#[test]
fn unlink_of_open_file_keeps_it_readable_until_close() {
    let m = Mount::new();
    let p = m.path("doomed");
    let data = Rng::new(3).bytes(3 * MIB as usize + 5);
    fs::write(&p, &data).unwrap();
    let f = open_rw(&p);
    fs::remove_file(&p).unwrap();
    assert_errno(fs::metadata(&p), libc::ENOENT, "stat after unlink");
    assert_eq!(fs::read_dir(&m.mnt).unwrap().count(), 0);
    assert_same_bytes(
        &read_at(&f, 0, data.len()),
        &data,
        "read via fd after unlink",
    );
    assert_eq!(f.metadata().unwrap().nlink(), 0);
    // Still writable through the fd.
    f.write_all_at(b"after", 10).unwrap();
    assert_eq!(read_at(&f, 10, 5), b"after");
    // A new file with the same name is a different file.
    fs::write(&p, b"new").unwrap();
    assert_eq!(fs::read(&p).unwrap(), b"new");
    assert_eq!(read_at(&f, 0, 10), &data[..10]);
    drop(f);
    assert_eq!(fs::read(&p).unwrap(), b"new");
}

#[test]
fn hard_links_share_inode_and_data() {
    let m = Mount::new();
    fs::create_dir(m.path("d")).unwrap();
    fs::write(m.path("a"), b"original").unwrap();
    fs::hard_link(m.path("a"), m.path("d/b")).unwrap();
    let ma = fs::metadata(m.path("a")).unwrap();
    let mb = fs::metadata(m.path("d/b")).unwrap();
    assert_eq!(ma.ino(), mb.ino());
    assert_eq!(ma.nlink(), 2);
    assert_eq!(mb.nlink(), 2);
    // Writes through one name show through the other.
    let f = open_rw(&m.path("d/b"));
    f.write_all_at(b"CHANGED", 0).unwrap();
    drop(f);
    assert_eq!(fs::read(m.path("a")).unwrap(), b"CHANGEDl");
    // Attributes are shared too.
    fs::set_permissions(m.path("a"), fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(fs::metadata(m.path("d/b")).unwrap().mode() & 0o7777, 0o600);
    // A third link, then unlinks drop nlink.
    fs::hard_link(m.path("d/b"), m.path("c")).unwrap();
    assert_eq!(fs::metadata(m.path("a")).unwrap().nlink(), 3);
    fs::remove_file(m.path("a")).unwrap();
    assert_eq!(fs::metadata(m.path("d/b")).unwrap().nlink(), 2);
    fs::remove_file(m.path("c")).unwrap();
    let mb = fs::metadata(m.path("d/b")).unwrap();
    assert_eq!(mb.nlink(), 1);
    assert_eq!(mb.ino(), ma.ino());
    assert_eq!(fs::read(m.path("d/b")).unwrap(), b"CHANGEDl");
    // Errors: link onto an existing name; link of a directory.
    fs::write(m.path("other"), b"o").unwrap();
    assert_errno(
        fs::hard_link(m.path("d/b"), m.path("other")),
        libc::EEXIST,
        "link onto existing",
    );
    assert_errno(
        fs::hard_link(m.path("d"), m.path("dlink")),
        libc::EPERM,
        "link a directory",
    );
}

#[test]
fn symlinks_and_readlink() {
    use std::os::unix::fs::symlink;
    let m = Mount::new();
    fs::create_dir(m.path("dir")).unwrap();
    fs::write(m.path("dir/target"), b"pointed at").unwrap();
    symlink("dir/target", m.path("rel")).unwrap();
    symlink(m.path("dir/target"), m.path("abs")).unwrap();
    symlink("no/such/thing", m.path("dangling")).unwrap();
    let long = "L".repeat(200) + "/" + &"M".repeat(200) + "/" + &"N".repeat(200);
    symlink(&long, m.path("long")).unwrap();
    assert_eq!(
        fs::read_link(m.path("rel")).unwrap(),
        Path::new("dir/target")
    );
    assert_eq!(fs::read_link(m.path("abs")).unwrap(), m.path("dir/target"));
    assert_eq!(
        fs::read_link(m.path("dangling")).unwrap(),
        Path::new("no/such/thing")
    );
    assert_eq!(fs::read_link(m.path("long")).unwrap(), Path::new(&long));
    let md = fs::symlink_metadata(m.path("rel")).unwrap();
    assert!(md.file_type().is_symlink());
    assert_eq!(md.len(), "dir/target".len() as u64);
    assert_eq!(fs::read(m.path("rel")).unwrap(), b"pointed at");
    assert_eq!(fs::read(m.path("abs")).unwrap(), b"pointed at");
    assert_errno(
        fs::read(m.path("dangling")),
        libc::ENOENT,
        "follow a dangling link",
    );
    assert_errno(
        fs::read_link(m.path("dir/target")),
        libc::EINVAL,
        "readlink of a file",
    );
    // A symlink to a directory is traversable.
    symlink("dir", m.path("dlink")).unwrap();
    assert_eq!(fs::read(m.path("dlink/target")).unwrap(), b"pointed at");
    // Removing the link leaves the target.
    fs::remove_file(m.path("rel")).unwrap();
    assert!(m.path("dir/target").exists());
}

fn utimens(p: &Path, at: (i64, i64), mt: (i64, i64)) -> std::io::Result<()> {
    let ts = [
        libc::timespec {
            tv_sec: at.0,
            tv_nsec: at.1,
        },
        libc::timespec {
            tv_sec: mt.0,
            tv_nsec: mt.1,
        },
    ];
    cvt(unsafe { libc::utimensat(libc::AT_FDCWD, cpath(p).as_ptr(), ts.as_ptr(), 0) }).map(|_| ())
}

#[test]
fn chmod_chown_utimensat_exact() {
    let m = Mount::new();
    let p = m.path("f");
    fs::write(&p, b"x").unwrap();
    for mode in [0o640, 0o4755, 0o2700, 0o1777, 0o000, 0o644] {
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
        let got = fs::metadata(&p).unwrap().mode();
        assert_eq!(got & 0o7777, mode, "chmod {mode:o} read back as {got:o}");
        assert_eq!(got & libc::S_IFMT, libc::S_IFREG);
    }
    cvt(unsafe { libc::chown(cpath(&p).as_ptr(), 1234, 5678) }).unwrap();
    let md = fs::metadata(&p).unwrap();
    assert_eq!((md.uid(), md.gid()), (1234, 5678));
    // chown -1 leaves a field unchanged.
    cvt(unsafe { libc::chown(cpath(&p).as_ptr(), u32::MAX, 42) }).unwrap();
    let md = fs::metadata(&p).unwrap();
    assert_eq!((md.uid(), md.gid()), (1234, 42));

    utimens(
        &p,
        (1_000_000_001, 123_456_789),
        (1_500_000_000, 987_654_321),
    )
    .unwrap();
    let md = fs::metadata(&p).unwrap();
    assert_eq!((md.atime(), md.atime_nsec()), (1_000_000_001, 123_456_789));
    assert_eq!((md.mtime(), md.mtime_nsec()), (1_500_000_000, 987_654_321));
    // Times before the epoch and far in the future.
    utimens(&p, (-1_000, 5), (4_102_444_800, 999_999_999)).unwrap();
    let md = fs::metadata(&p).unwrap();
    assert_eq!(
        (md.atime(), md.atime_nsec()),
        (-1_000, 5),
        "pre-epoch timespec {{-1000 s, 5 ns}} did not round-trip"
    );
    assert_eq!((md.mtime(), md.mtime_nsec()), (4_102_444_800, 999_999_999));
    // UTIME_OMIT keeps one, UTIME_NOW sets the other to about now.
    utimens(&p, (0, libc::UTIME_OMIT), (0, libc::UTIME_NOW)).unwrap();
    let md = fs::metadata(&p).unwrap();
    assert_eq!((md.atime(), md.atime_nsec()), (-1_000, 5));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        (md.mtime() - now).abs() <= 5,
        "UTIME_NOW gave mtime {}",
        md.mtime()
    );
    // On a directory too.
    fs::create_dir(m.path("d")).unwrap();
    utimens(&m.path("d"), (7, 7), (8, 8)).unwrap();
    let md = fs::metadata(m.path("d")).unwrap();
    assert_eq!((md.atime(), md.mtime(), md.mtime_nsec()), (7, 8, 8));
    fs::set_permissions(m.path("d"), fs::Permissions::from_mode(0o711)).unwrap();
    assert_eq!(fs::metadata(m.path("d")).unwrap().mode() & 0o7777, 0o711);
}

fn ctime(p: &Path) -> (i64, i64) {
    let md = fs::metadata(p).unwrap();
    (md.ctime(), md.ctime_nsec())
}

fn mtime(p: &Path) -> (i64, i64) {
    let md = fs::metadata(p).unwrap();
    (md.mtime(), md.mtime_nsec())
}

#[test]
fn timestamps_follow_writes_and_attribute_changes() {
    let m = Mount::new();
    let p = m.path("f");
    fs::write(&p, b"start").unwrap();
    let (m0, c0) = (mtime(&p), ctime(&p));
    sleep(Duration::from_millis(30));
    let f = open_rw(&p);
    f.write_all_at(b"more", 5).unwrap();
    drop(f);
    let (m1, c1) = (mtime(&p), ctime(&p));
    assert!(m1 > m0, "mtime did not advance on write: {m0:?} -> {m1:?}");
    assert!(c1 > c0, "ctime did not advance on write: {c0:?} -> {c1:?}");

    sleep(Duration::from_millis(30));
    fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
    let (m2, c2) = (mtime(&p), ctime(&p));
    assert_eq!(m2, m1, "chmod changed mtime");
    assert!(c2 > c1, "ctime did not advance on chmod: {c1:?} -> {c2:?}");

    sleep(Duration::from_millis(30));
    OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(2)
        .unwrap();
    let (m3, c3) = (mtime(&p), ctime(&p));
    assert!(m3 > m2 && c3 > c2, "truncate did not advance mtime/ctime");

    // Directory mtime/ctime advance on create and unlink inside it.
    let d = m.path("d");
    fs::create_dir(&d).unwrap();
    let (dm0, dc0) = (mtime(&d), ctime(&d));
    sleep(Duration::from_millis(30));
    fs::write(d.join("child"), b"").unwrap();
    let (dm1, dc1) = (mtime(&d), ctime(&d));
    assert!(
        dm1 > dm0 && dc1 > dc0,
        "dir times did not advance on create"
    );
    sleep(Duration::from_millis(30));
    fs::remove_file(d.join("child")).unwrap();
    assert!(mtime(&d) > dm1, "dir mtime did not advance on unlink");

    // Link count changes touch ctime.
    sleep(Duration::from_millis(30));
    let c4 = ctime(&p);
    fs::hard_link(&p, m.path("f2")).unwrap();
    assert!(ctime(&p) > c4, "ctime did not advance on link");
}

#[test]
fn xattrs_user_trusted_security() {
    let m = Mount::new();
    let p = m.path("f");
    fs::write(&p, b"x").unwrap();
    let big = Rng::new(4).bytes(4000);
    let cases: [(&str, &[u8]); 5] = [
        ("user.one", b"1"),
        ("user.empty", b""),
        ("user.binary", b"\x00\xff\x00data\n"),
        ("trusted.t", b"trusted value"),
        ("security.s", &big),
    ];
    for (name, value) in cases {
        setxattr(&p, name, value, 0).unwrap_or_else(|e| panic!("setxattr {name}: {e}"));
    }
    for (name, value) in cases {
        assert_eq!(getxattr(&p, name).unwrap(), value, "getxattr {name}");
    }
    let names = listxattr(&p).unwrap();
    for (name, _) in cases {
        assert!(
            names.contains(&name.to_string()),
            "listxattr lacks {name}: {names:?}"
        );
    }
    assert_errno(
        getxattr(&p, "user.missing"),
        libc::ENODATA,
        "getxattr missing",
    );
    assert_errno(
        removexattr(&p, "user.missing"),
        libc::ENODATA,
        "removexattr missing",
    );
    // Replace, XATTR_CREATE and XATTR_REPLACE.
    setxattr(&p, "user.one", b"uno", 0).unwrap();
    assert_eq!(getxattr(&p, "user.one").unwrap(), b"uno");
    assert_errno(
        setxattr(&p, "user.one", b"x", libc::XATTR_CREATE),
        libc::EEXIST,
        "XATTR_CREATE on existing",
    );
    assert_errno(
        setxattr(&p, "user.nope", b"x", libc::XATTR_REPLACE),
        libc::ENODATA,
        "XATTR_REPLACE on missing",
    );
    setxattr(&p, "user.one", b"eins", libc::XATTR_REPLACE).unwrap();
    assert_eq!(getxattr(&p, "user.one").unwrap(), b"eins");
    // A too-small buffer gives ERANGE.
    let mut small = [0u8; 2];
    let r = unsafe {
        libc::getxattr(
            cpath(&p).as_ptr(),
            cstr("user.one").as_ptr(),
            small.as_mut_ptr().cast(),
            small.len(),
        )
    };
    assert_errno(cvt(r), libc::ERANGE, "getxattr into a small buffer");
    // Remove.
    for (name, _) in cases {
        removexattr(&p, name).unwrap_or_else(|e| panic!("removexattr {name}: {e}"));
        assert_errno(getxattr(&p, name), libc::ENODATA, "getxattr after remove");
    }
    let names = listxattr(&p).unwrap();
    assert!(
        names
            .iter()
            .all(|n| !n.starts_with("user.") && !n.starts_with("trusted.")),
        "xattrs left after remove: {names:?}"
    );
    // On directories too, and xattrs survive a rename.
    fs::create_dir(m.path("d")).unwrap();
    setxattr(&m.path("d"), "user.dir", b"yes", 0).unwrap();
    fs::rename(m.path("d"), m.path("d2")).unwrap();
    assert_eq!(getxattr(&m.path("d2"), "user.dir").unwrap(), b"yes");
    // And on a hard link's other name.
    setxattr(&p, "user.shared", b"s", 0).unwrap();
    fs::hard_link(&p, m.path("link")).unwrap();
    assert_eq!(getxattr(&m.path("link"), "user.shared").unwrap(), b"s");
}

#[test]
fn statfs_reports_space() {
    let m = Mount::new();
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    cvt(unsafe { libc::statvfs(cpath(&m.mnt).as_ptr(), &mut st) }).unwrap();
    assert!(st.f_blocks > 0, "f_blocks = 0");
    assert!(st.f_bavail > 0, "f_bavail = 0");
    assert!(st.f_bfree >= st.f_bavail, "f_bfree < f_bavail");
    assert!(st.f_bsize > 0 && st.f_frsize > 0);
    assert_eq!(st.f_namemax, 255, "f_namemax");
    // `df` works on the mount.
    let out = run_ok(std::process::Command::new("df").arg("-P").arg(&m.mnt));
    assert!(stdout_str(&out).contains(m.mnt.to_str().unwrap()));
}

#[test]
fn mknod_fifo() {
    let m = Mount::new();
    let p = m.path("fifo");
    cvt(unsafe { libc::mknod(cpath(&p).as_ptr(), libc::S_IFIFO | 0o640, 0) }).unwrap();
    let md = fs::symlink_metadata(&p).unwrap();
    assert!(md.file_type().is_fifo(), "not a fifo: mode {:o}", md.mode());
    assert_eq!(md.mode() & 0o7777, 0o640);
    cvt(unsafe { libc::mkfifo(cpath(&m.path("fifo2")).as_ptr(), 0o600) }).unwrap();
    assert!(fs::metadata(m.path("fifo2")).unwrap().file_type().is_fifo());
    // The fifo works as a pipe (the kernel handles the data).
    let p2 = p.clone();
    let writer = std::thread::spawn(move || {
        let mut w = OpenOptions::new().write(true).open(&p2).unwrap();
        w.write_all(b"through the pipe").unwrap();
    });
    let mut r = OpenOptions::new()
        .read(true)
        .custom_flags(0)
        .open(&p)
        .unwrap();
    let mut s = String::new();
    r.read_to_string(&mut s).unwrap();
    writer.join().unwrap();
    assert_eq!(s, "through the pipe");
    fs::remove_file(&p).unwrap();
}

#[test]
fn st_blocks_counts_only_stored_blocks() {
    let m = Mount::with_block_size("16K");
    let p = m.path("sparse");
    let f = open_rw(&p);
    f.set_len(GIB).unwrap();
    f.write_all_at(&Rng::new(5).bytes(4096), 512 * MIB).unwrap();
    f.sync_all().unwrap();
    let md = fs::metadata(&p).unwrap();
    assert_eq!(md.len(), GIB);
    let bytes = md.blocks() * 512;
    assert!(
        bytes > 0,
        "st_blocks = 0 for a file with data (tar would skip it as all-hole)"
    );
    assert!(
        bytes <= 64 * KIB,
        "st_blocks*512 = {bytes} for one 4 KiB write in a sparse 1 GiB file"
    );
    // A fully written 1 MiB file counts about 1 MiB.
    let q = m.path("full");
    fs::write(&q, Rng::new(6).bytes(MIB as usize)).unwrap();
    File::open(&q).unwrap().sync_all().unwrap();
    let bytes = fs::metadata(&q).unwrap().blocks() * 512;
    assert!(
        (MIB..=MIB + 64 * KIB).contains(&bytes),
        "st_blocks*512 = {bytes} for a 1 MiB file"
    );
    // st_blksize is sane.
    assert!(md.blksize() >= 4096);
}

#[test]
fn name_length_limit() {
    let m = Mount::new();
    let ok = "n".repeat(255);
    let too_long = "n".repeat(256);
    fs::write(m.path(&ok), b"fits").unwrap();
    assert_eq!(fs::read(m.path(&ok)).unwrap(), b"fits");
    let names: Vec<_> = fs::read_dir(&m.mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, vec![ok.clone()]);
    assert_errno(
        fs::write(m.path(&too_long), b"x"),
        libc::ENAMETOOLONG,
        "create 256-byte name",
    );
    assert_errno(
        fs::create_dir(m.path(&too_long)),
        libc::ENAMETOOLONG,
        "mkdir 256-byte name",
    );
    assert_errno(
        std::os::unix::fs::symlink("t", m.path(&too_long)),
        libc::ENAMETOOLONG,
        "symlink 256-byte name",
    );
    assert_errno(
        fs::rename(m.path(&ok), m.path(&too_long)),
        libc::ENAMETOOLONG,
        "rename to 256-byte name",
    );
    assert_errno(
        fs::metadata(m.path(&too_long)),
        libc::ENAMETOOLONG,
        "lookup 256-byte name",
    );
    // A 255-byte directory name with a 255-byte child.
    fs::create_dir(m.path(&format!("d{}", "d".repeat(254)))).unwrap();
    fs::write(m.path(&format!("d{}/{}", "d".repeat(254), ok)), b"nested").unwrap();
    // Unicode names are bytes: 85 three-byte characters = 255 bytes.
    let uni = "€".repeat(85);
    assert_eq!(uni.len(), 255);
    fs::write(m.path(&uni), b"u").unwrap();
    assert_eq!(fs::read(m.path(&uni)).unwrap(), b"u");
}

#[test]
fn many_files_and_concurrent_writers() {
    let m = Mount::new();
    let root = m.mnt.clone();
    let handles: Vec<_> = (0..4)
        .map(|t| {
            let root = root.clone();
            std::thread::spawn(move || {
                let mut rng = Rng::new(100 + t);
                let dir = root.join(format!("t{t}"));
                fs::create_dir(&dir).unwrap();
                let mut files = Vec::new();
                for i in 0..50 {
                    let n = rng.below(200_000) as usize;
                    let data = rng.bytes(n);
                    let p = dir.join(format!("f{i}"));
                    fs::write(&p, &data).unwrap();
                    files.push((p, data));
                }
                for (p, data) in &files {
                    assert_same_bytes(&fs::read(p).unwrap(), data, &format!("{p:?}"));
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert_eq!(fs::read_dir(&root).unwrap().count(), 4);
}

/// The kernel leaves dropping privileges to thinfs (FUSE_HANDLE_KILLPRIV_V2, which
/// spares every write a getxattr round trip): a write, truncate or fallocate by a user
/// without CAP_FSETID clears set-user-ID and set-group-ID (with group execute, or when
/// the user is not in the file's group), a chown clears them whoever asks, a write by
/// root keeps them — as on a local filesystem.
#[test]
fn writes_truncates_and_chowns_drop_set_id_bits() {
    let m = Mount::with(MountOptions {
        block_size: None,
        mount_args: vec!["-o".into(), "allow_other".into()],
    });
    let mode = |name: &str| fs::metadata(m.path(name)).unwrap().mode() & 0o7777;
    for name in ["w", "t", "c", "r", "g", "h", "a"] {
        fs::write(m.path(name), b"data").unwrap();
        if name == "g" {
            std::os::unix::fs::chown(m.path(name), None, Some(65534)).unwrap();
        }
        fs::set_permissions(m.path(name), fs::Permissions::from_mode(0o6777)).unwrap();
    }
    for name in ["g", "h"] {
        fs::set_permissions(m.path(name), fs::Permissions::from_mode(0o6766)).unwrap();
    }
    // Runs `cmd FILE` as nobody and returns FILE's mode afterwards.
    let by_nobody = |cmd: &str, name: &str| {
        let out = as_nobody(&format!("{cmd} {}", m.path(name).display()));
        assert!(out.status.success(), "{}", describe(&out));
        mode(name)
    };
    assert_eq!(by_nobody("echo more >>", "w"), 0o777, "write by nobody");
    assert_eq!(by_nobody("truncate -s 1", "t"), 0o777, "truncate by nobody");
    // Without group execute, set-group-ID goes only if the writer is not in the file's
    // group (Linux 6.2 on).
    assert_eq!(
        by_nobody("echo more >>", "g"),
        0o2766,
        "write by nobody in the group, no group execute"
    );
    assert_eq!(
        by_nobody("echo more >>", "h"),
        0o766,
        "write by nobody not in the group"
    );
    assert_eq!(
        by_nobody("fallocate -l 65536", "a"),
        0o777,
        "fallocate by nobody"
    );
    std::os::unix::fs::chown(m.path("c"), Some(0), Some(0)).unwrap();
    assert_eq!(mode("c"), 0o777, "chown by root");
    let mut f = OpenOptions::new().append(true).open(m.path("r")).unwrap();
    f.write_all(b"root").unwrap();
    f.sync_all().unwrap();
    assert_eq!(mode("r"), 0o6777, "write by root");
    // Directories keep theirs (set-group-ID on a directory is inheritance).
    fs::create_dir(m.path("d")).unwrap();
    fs::set_permissions(m.path("d"), fs::Permissions::from_mode(0o2777)).unwrap();
    std::os::unix::fs::chown(m.path("d"), Some(0), Some(0)).unwrap();
    assert_eq!(mode("d"), 0o2777, "chown of a directory");
}

//! What hypervisors need from a datastore file: fallocate in the four modes the
//! kernel forwards, SEEK_DATA/SEEK_HOLE exact to the block, fsync, O_DIRECT,
//! kernel-local OFD and flock locks, shared mmap.
//!
//! The store here uses 16 KiB blocks (`mkfs --block-size 16K`); hole and data
//! boundaries are computed from that.

use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};

use super::common::*;

const BS: u64 = 16 * KIB;

fn mount16k() -> Mount {
    Mount::with_block_size("16K")
}

#[test]
fn fallocate_mode0_grows_size() {
    let m = mount16k();
    let f = open_rw(&m.path("img"));
    fallocate(&f, 0, 0, MIB).unwrap();
    assert_eq!(f.metadata().unwrap().len(), MIB);
    assert!(read_at(&f, 0, MIB as usize).iter().all(|&b| b == 0));
    // Past EOF at an unaligned offset.
    fallocate(&f, 0, 3 * MIB + 5, 1000).unwrap();
    assert_eq!(f.metadata().unwrap().len(), 3 * MIB + 1005);
    // Inside the file: size unchanged, data untouched.
    f.write_all_at(b"keep me", 100).unwrap();
    fallocate(&f, 0, 0, 4096).unwrap();
    assert_eq!(f.metadata().unwrap().len(), 3 * MIB + 1005);
    assert_eq!(read_at(&f, 100, 7), b"keep me");
}

#[test]
fn fallocate_keep_size_leaves_size() {
    let m = mount16k();
    let f = open_rw(&m.path("img"));
    f.write_all_at(&[7u8; 4096], 0).unwrap();
    fallocate(&f, libc::FALLOC_FL_KEEP_SIZE, 0, 2 * MIB).unwrap();
    assert_eq!(f.metadata().unwrap().len(), 4096);
    assert_eq!(read_at(&f, 0, 8192), vec![7u8; 4096]);
    fallocate(&f, libc::FALLOC_FL_KEEP_SIZE, 10 * MIB, MIB).unwrap();
    assert_eq!(f.metadata().unwrap().len(), 4096);
}

#[test]
fn fallocate_punch_hole_reads_zeros_and_is_a_hole() {
    let m = mount16k();
    let f = open_rw(&m.path("img"));
    let data = Rng::new(10).bytes(MIB as usize);
    f.write_all_at(&data, 0).unwrap();
    f.sync_all().unwrap();
    let blocks_before = f.metadata().unwrap().blocks();

    // Block-aligned punch: a real hole.
    let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    fallocate(&f, punch, 256 * KIB, 256 * KIB).unwrap();
    assert_eq!(f.metadata().unwrap().len(), MIB, "punch changed the size");
    let got = read_at(&f, 0, MIB as usize);
    assert_same_bytes(&got[..256 * 1024], &data[..256 * 1024], "before the hole");
    assert!(
        got[256 * 1024..512 * 1024].iter().all(|&b| b == 0),
        "punched range not zero"
    );
    assert_same_bytes(&got[512 * 1024..], &data[512 * 1024..], "after the hole");
    assert_eq!(
        lseek(&f, 0, libc::SEEK_HOLE).unwrap(),
        256 * KIB,
        "SEEK_HOLE from 0"
    );
    assert_eq!(
        lseek(&f, 300 * KIB, libc::SEEK_HOLE).unwrap(),
        300 * KIB,
        "SEEK_HOLE inside the hole"
    );
    assert_eq!(
        lseek(&f, 256 * KIB, libc::SEEK_DATA).unwrap(),
        512 * KIB,
        "SEEK_DATA after the hole"
    );
    f.sync_all().unwrap();
    let blocks_after = f.metadata().unwrap().blocks();
    assert!(
        blocks_after * 512 <= (blocks_before * 512).saturating_sub(256 * KIB),
        "st_blocks did not drop by the punched 256 KiB: {blocks_before} -> {blocks_after}"
    );

    // Unaligned punch: exactly that byte range reads zero.
    fallocate(&f, punch, 700_001, 50_000).unwrap();
    let got = read_at(&f, 0, MIB as usize);
    assert_same_bytes(
        &got[..700_001][512 * 1024..],
        &data[512 * 1024..700_001],
        "before unaligned punch",
    );
    assert!(
        got[700_001..750_001].iter().all(|&b| b == 0),
        "unaligned punch not zero"
    );
    assert_same_bytes(&got[750_001..], &data[750_001..], "after unaligned punch");
    // Whole blocks inside the unaligned range are holes: [704 KiB, 736 KiB).
    let first_whole = 700_001u64.div_ceil(BS) * BS;
    assert_eq!(lseek(&f, 600 * KIB, libc::SEEK_HOLE).unwrap(), first_whole);
    assert_eq!(
        lseek(&f, first_whole, libc::SEEK_DATA).unwrap(),
        (750_001 / BS) * BS
    );

    // Punching beyond EOF is fine and keeps the size.
    fallocate(&f, punch, 2 * MIB, MIB).unwrap();
    assert_eq!(f.metadata().unwrap().len(), MIB);
    // PUNCH_HOLE without KEEP_SIZE is invalid.
    assert_errno(
        fallocate(&f, libc::FALLOC_FL_PUNCH_HOLE, 0, 4096),
        libc::EOPNOTSUPP,
        "PUNCH_HOLE without KEEP_SIZE",
    );
}

#[test]
fn fallocate_zero_range() {
    let m = mount16k();
    let f = open_rw(&m.path("img"));
    let data = Rng::new(11).bytes(256 * 1024);
    f.write_all_at(&data, 0).unwrap();
    fallocate(&f, libc::FALLOC_FL_ZERO_RANGE, 5000, 70_000).unwrap();
    assert_eq!(f.metadata().unwrap().len(), 256 * KIB);
    let got = read_at(&f, 0, 256 * 1024);
    assert_same_bytes(&got[..5000], &data[..5000], "before zero range");
    assert!(
        got[5000..75_000].iter().all(|&b| b == 0),
        "zeroed range not zero"
    );
    assert_same_bytes(&got[75_000..], &data[75_000..], "after zero range");
    // Beyond EOF without KEEP_SIZE extends the file.
    fallocate(&f, libc::FALLOC_FL_ZERO_RANGE, 300 * KIB, 100 * KIB).unwrap();
    assert_eq!(f.metadata().unwrap().len(), 400 * KIB);
    // With KEEP_SIZE it does not.
    fallocate(
        &f,
        libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
        500 * KIB,
        100 * KIB,
    )
    .unwrap();
    assert_eq!(f.metadata().unwrap().len(), 400 * KIB);
    assert!(read_at(&f, 256 * KIB, 144 * 1024).iter().all(|&b| b == 0));
}

#[test]
fn seek_data_and_hole_exact_to_block() {
    let m = mount16k();
    let f = open_rw(&m.path("img"));
    f.set_len(MIB).unwrap();
    // One byte at 100000 makes block 6 = [98304, 114688) data.
    f.write_all_at(b"x", 100_000).unwrap();
    let blk = (100_000 / BS) * BS;
    assert_eq!(blk, 98_304);
    assert_eq!(
        lseek(&f, 0, libc::SEEK_DATA).unwrap(),
        blk,
        "SEEK_DATA from 0"
    );
    assert_eq!(
        lseek(&f, 0, libc::SEEK_HOLE).unwrap(),
        0,
        "SEEK_HOLE from 0"
    );
    assert_eq!(
        lseek(&f, 1234, libc::SEEK_HOLE).unwrap(),
        1234,
        "SEEK_HOLE inside a hole"
    );
    assert_eq!(
        lseek(&f, blk, libc::SEEK_HOLE).unwrap(),
        blk + BS,
        "SEEK_HOLE from data"
    );
    assert_eq!(
        lseek(&f, blk + 5, libc::SEEK_DATA).unwrap(),
        blk + 5,
        "SEEK_DATA inside data"
    );
    assert_errno(
        lseek(&f, blk + BS, libc::SEEK_DATA),
        libc::ENXIO,
        "SEEK_DATA with no more data",
    );
    assert_errno(
        lseek(&f, MIB, libc::SEEK_DATA),
        libc::ENXIO,
        "SEEK_DATA at EOF",
    );
    assert_errno(
        lseek(&f, MIB, libc::SEEK_HOLE),
        libc::ENXIO,
        "SEEK_HOLE at EOF",
    );
    assert_eq!(lseek(&f, MIB - 1, libc::SEEK_HOLE).unwrap(), MIB - 1);

    // Two data runs and data reaching EOF.
    f.write_all_at(&[1u8; 40_000], 5 * BS).unwrap(); // [80 KiB, 121920): blocks 5..=7
    f.write_all_at(b"tail", MIB - 4).unwrap();
    assert_eq!(lseek(&f, 0, libc::SEEK_DATA).unwrap(), 5 * BS);
    // Blocks 5, 6, 7 are contiguous data.
    assert_eq!(lseek(&f, 5 * BS, libc::SEEK_HOLE).unwrap(), 8 * BS);
    assert_eq!(lseek(&f, 8 * BS, libc::SEEK_DATA).unwrap(), MIB - BS);
    // Data up to EOF: the hole is at EOF.
    assert_eq!(lseek(&f, MIB - BS, libc::SEEK_HOLE).unwrap(), MIB);

    // A fully written file has its only hole at EOF.
    let g = open_rw(&m.path("full"));
    g.write_all_at(&Rng::new(12).bytes(100_000), 0).unwrap();
    assert_eq!(lseek(&g, 0, libc::SEEK_DATA).unwrap(), 0);
    assert_eq!(lseek(&g, 0, libc::SEEK_HOLE).unwrap(), 100_000);
    // An empty file has neither.
    let e = open_rw(&m.path("empty"));
    assert_errno(
        lseek(&e, 0, libc::SEEK_DATA),
        libc::ENXIO,
        "SEEK_DATA on empty",
    );
    assert_errno(
        lseek(&e, 0, libc::SEEK_HOLE),
        libc::ENXIO,
        "SEEK_HOLE on empty",
    );
    // A sparse file that never had data: all hole.
    let s = open_rw(&m.path("allhole"));
    s.set_len(10 * MIB).unwrap();
    assert_errno(
        lseek(&s, 0, libc::SEEK_DATA),
        libc::ENXIO,
        "SEEK_DATA on all-hole file",
    );
    assert_eq!(lseek(&s, 0, libc::SEEK_HOLE).unwrap(), 0);

    // The answers hold after the data reached the store and after a remount.
    f.sync_all().unwrap();
    drop((f, g, e, s));
    let mut m = m;
    m.remount();
    let f = File::open(m.path("img")).unwrap();
    assert_eq!(lseek(&f, 0, libc::SEEK_DATA).unwrap(), 5 * BS);
    assert_eq!(lseek(&f, 5 * BS, libc::SEEK_HOLE).unwrap(), 8 * BS);
    assert_eq!(lseek(&f, 8 * BS, libc::SEEK_DATA).unwrap(), MIB - BS);
}

#[test]
fn fsync_and_fdatasync_succeed() {
    let m = mount16k();
    let f = open_rw(&m.path("f"));
    f.write_all_at(b"data", 0).unwrap();
    cvt(unsafe { libc::fsync(f.as_raw_fd()) }).unwrap();
    f.write_all_at(b"more", 4).unwrap();
    cvt(unsafe { libc::fdatasync(f.as_raw_fd()) }).unwrap();
    // fsync with nothing dirty, on a read-only fd, and on a directory.
    cvt(unsafe { libc::fsync(f.as_raw_fd()) }).unwrap();
    let r = File::open(m.path("f")).unwrap();
    cvt(unsafe { libc::fsync(r.as_raw_fd()) }).unwrap();
    let d = File::open(&m.mnt).unwrap();
    cvt(unsafe { libc::fsync(d.as_raw_fd()) }).unwrap();
    fs::create_dir(m.path("sub")).unwrap();
    let d = File::open(m.path("sub")).unwrap();
    cvt(unsafe { libc::fsync(d.as_raw_fd()) }).unwrap();
    // sync(1) / syncfs.
    cvt(unsafe { libc::syncfs(f.as_raw_fd()) }).unwrap();
    assert_eq!(read_at(&f, 0, 8), b"datamore");
}

#[test]
fn o_direct_aligned_io() {
    let m = mount16k();
    let p = m.path("direct.img");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .custom_flags(libc::O_DIRECT)
        .open(&p)
        .expect("open O_DIRECT");
    let mut buf = AlignedBuf::new(64 * 1024, 4096);
    Rng::new(13).fill(buf.as_mut_slice());
    let n = f.write_at(buf.as_slice(), 3 * 4096).unwrap();
    assert_eq!(n, 64 * 1024);
    let mut back = AlignedBuf::new(64 * 1024, 4096);
    let n = f.read_at(back.as_mut_slice(), 3 * 4096).unwrap();
    assert_eq!(n, 64 * 1024);
    assert_same_bytes(back.as_slice(), buf.as_slice(), "O_DIRECT read back");
    // The hole before the data reads zeros through O_DIRECT.
    let mut head = AlignedBuf::new(3 * 4096, 4096);
    head.as_mut_slice().fill(0xAA);
    assert_eq!(f.read_at(head.as_mut_slice(), 0).unwrap(), 3 * 4096);
    assert!(head.as_slice().iter().all(|&b| b == 0));
    // A buffered reader sees the O_DIRECT writes, and O_DIRECT sees buffered writes.
    let b = open_rw(&p);
    assert_same_bytes(
        &read_at(&b, 3 * 4096, 64 * 1024),
        buf.as_slice(),
        "buffered read",
    );
    b.write_all_at(&[0x5A; 4096], 0).unwrap();
    b.sync_all().unwrap();
    let mut first = AlignedBuf::new(4096, 4096);
    f.read_at(first.as_mut_slice(), 0).unwrap();
    assert!(
        first.as_slice().iter().all(|&x| x == 0x5A),
        "O_DIRECT read misses a buffered write"
    );
    assert_eq!(f.metadata().unwrap().len(), 3 * 4096 + 64 * 1024);
    cvt(unsafe { libc::fdatasync(f.as_raw_fd()) }).unwrap();
}

fn ofd_lock(f: &File, cmd: i32, ty: i32) -> std::io::Result<libc::flock> {
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = ty as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = 0;
    fl.l_len = 0;
    fl.l_pid = 0;
    cvt(unsafe { libc::fcntl(f.as_raw_fd(), cmd, &mut fl) })?;
    Ok(fl)
}

#[test]
fn ofd_and_flock_locks_are_exclusive() {
    let m = mount16k();
    let p = m.path("locked.img");
    fs::write(&p, b"disk").unwrap();
    let a = open_rw(&p);
    let b = open_rw(&p);
    ofd_lock(&a, libc::F_OFD_SETLK, libc::F_WRLCK).unwrap();
    assert_errno(
        ofd_lock(&b, libc::F_OFD_SETLK, libc::F_WRLCK),
        libc::EAGAIN,
        "second F_OFD_SETLK write lock",
    );
    assert_errno(
        ofd_lock(&b, libc::F_OFD_SETLK, libc::F_RDLCK),
        libc::EAGAIN,
        "read lock against a write lock",
    );
    let probe = ofd_lock(&b, libc::F_OFD_GETLK, libc::F_WRLCK).unwrap();
    assert_eq!(
        probe.l_type as i32,
        libc::F_WRLCK,
        "F_OFD_GETLK does not see the lock"
    );
    drop(a);
    ofd_lock(&b, libc::F_OFD_SETLK, libc::F_WRLCK).unwrap();
    drop(b);

    // Shared read locks coexist (QEMU takes these for shared images).
    let r1 = open_rw(&p);
    let r2 = open_rw(&p);
    ofd_lock(&r1, libc::F_OFD_SETLK, libc::F_RDLCK).unwrap();
    ofd_lock(&r2, libc::F_OFD_SETLK, libc::F_RDLCK).unwrap();
    drop((r1, r2));

    // flock(2).
    let c = open_rw(&p);
    let d = open_rw(&p);
    cvt(unsafe { libc::flock(c.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) }).unwrap();
    assert_errno(
        cvt(unsafe { libc::flock(d.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) }),
        libc::EWOULDBLOCK,
        "second flock LOCK_EX",
    );
    cvt(unsafe { libc::flock(c.as_raw_fd(), libc::LOCK_UN) }).unwrap();
    cvt(unsafe { libc::flock(d.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) }).unwrap();
}

#[test]
fn shared_mmap_writes_reach_the_file() {
    let m = mount16k();
    let p = m.path("mapped");
    let f = open_rw(&p);
    f.set_len(256 * KIB).unwrap();
    let len = 256 * 1024usize;
    unsafe {
        let addr = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        );
        assert_ne!(
            addr,
            libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        let s = std::slice::from_raw_parts_mut(addr as *mut u8, len);
        s[100..105].copy_from_slice(b"mmap!");
        s[200_000] = 0xEE;
        cvt(libc::msync(addr, len, libc::MS_SYNC)).unwrap();
        libc::munmap(addr, len);
    }
    drop(f);
    let got = fs::read(&p).unwrap();
    assert_eq!(&got[100..105], b"mmap!");
    assert_eq!(got[200_000], 0xEE);
    // And reads through a mapping see written data.
    let g = File::open(&p).unwrap();
    unsafe {
        let addr = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            g.as_raw_fd(),
            0,
        );
        assert_ne!(addr, libc::MAP_FAILED);
        let s = std::slice::from_raw_parts(addr as *const u8, len);
        assert_eq!(&s[100..105], b"mmap!");
        libc::munmap(addr, len);
    }
}

/// A metadata cache far smaller than the image's metadata (sled pages its chunk index and
/// block-map nodes in and out on every write) serves random overwrites byte-exactly,
/// with the chunk filter and location cache in front of it, before and after a remount.
#[test]
fn random_overwrites_with_a_tiny_metadata_cache_match_a_model() {
    const SIZE: usize = 48 << 20;
    let mut m = Mount::with(MountOptions {
        block_size: None,
        mount_args: vec!["-o".into(), "meta_cache=8M".into()],
    });
    let path = m.path("disk.img");
    let mut rng = Rng::new(48);
    let mut model = vec![0u8; SIZE];
    rng.fill(&mut model);
    fs::write(&path, &model).unwrap();
    let f = open_rw(&path);
    let mut buf = [0u8; 4096];
    for i in 0..3000u64 {
        // Mostly 4 KiB-aligned (the VM pattern), some unaligned and straddling blocks.
        let off = if i % 4 == 0 {
            rng.below((SIZE - buf.len()) as u64) as usize
        } else {
            rng.below((SIZE / 4096) as u64) as usize * 4096
        };
        rng.fill(&mut buf);
        f.write_all_at(&buf, off as u64).unwrap();
        model[off..off + buf.len()].copy_from_slice(&buf);
        if i % 500 == 0 {
            f.sync_data().unwrap();
        }
    }
    drop(f);
    assert!(
        fs::read(&path).unwrap() == model,
        "content differs from the model"
    );
    m.remount();
    assert!(
        fs::read(&path).unwrap() == model,
        "content differs from the model after a remount"
    );
}

#[test]
fn meta_cache_out_of_range_refuses_to_mount() {
    let m = Mount::new();
    let mnt2 = m.scratch().join("mnt2");
    fs::create_dir(&mnt2).unwrap();
    let mnt2s = mnt2.to_string_lossy().into_owned();
    let store = m.store.to_string_lossy().into_owned();
    let out = thinfs(["mount", &store, &mnt2s, "-o", "meta_cache=1M"]);
    assert_fails_one_line(&out, 1, "meta_cache=1M");
    assert!(
        stderr_str(&out).contains("meta_cache"),
        "the message names the option: {}",
        describe(&out)
    );
    assert!(!thinfs_mounted_at(&mnt2));
}

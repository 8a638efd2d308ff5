//! Deduplication seen from outside: identical data written through write(2)
//! into many files is stored once, and `thinfs stats` says so.

use std::fs::{self, File};
use std::io::Write;
use std::process::Command;

use super::common::*;

#[test]
fn ten_copies_of_256_mib_store_once() {
    let mut m = Mount::new();
    let src = m.path("f0");
    {
        let mut f = File::create(&src).unwrap();
        let mut rng = Rng::new(30);
        let mut buf = vec![0u8; MIB as usize];
        for _ in 0..256 {
            rng.fill(&mut buf);
            f.write_all(&buf).unwrap();
        }
        f.sync_all().unwrap();
    }
    for i in 1..10 {
        run_ok(
            Command::new("cp")
                .arg("--reflink=never")
                .arg(&src)
                .arg(m.path(&format!("f{i}"))),
        );
    }
    // While mounted, stats on the mountpoint already counts all ten files.
    let live = stats(&m.mnt);
    assert_eq!(live.logical_bytes, 2560 * MIB, "live stats: {live:?}");
    // A spot check that the copies are real.
    let a = read_at(&File::open(&src).unwrap(), 100 * MIB, 4096);
    let b = read_at(&File::open(m.path("f9")).unwrap(), 100 * MIB, 4096);
    assert_eq!(a, b);

    m.unmount_ok();
    let s = stats(&m.store);
    eprintln!("stats after 10 x 256 MiB: {s:?}");
    assert_eq!(s.logical_bytes, 2560 * MIB);
    assert_eq!(s.allocated_bytes, 2560 * MIB);
    assert!(
        s.stored_bytes >= 256 * MIB && s.stored_bytes <= 256 * MIB * 11 / 10,
        "stored_bytes {} not within [256 MiB, 281.6 MiB]",
        s.stored_bytes
    );
    assert!(
        s.pack_bytes >= 256 * MIB,
        "pack_bytes {} below the random data size",
        s.pack_bytes
    );
    assert!(
        s.pack_bytes <= 256 * MIB * 12 / 10,
        "pack_bytes {} far above stored data",
        s.pack_bytes
    );
    assert!(s.chunks > 0 && s.packs > 0 && s.meta_bytes > 0, "{s:?}");
    assert!(
        (9.0..=10.01).contains(&s.dedup_ratio),
        "dedup_ratio {} (allocated/stored) should be about 10",
        s.dedup_ratio
    );
    // Removing nine copies leaves stored bytes for the one that remains.
    m.remount();
    for i in 1..10 {
        fs::remove_file(m.path(&format!("f{i}"))).unwrap();
    }
    let s2 = stats(&m.mnt);
    assert_eq!(s2.logical_bytes, 256 * MIB);
    assert!(
        s2.stored_bytes >= 256 * MIB,
        "the remaining copy lost stored bytes: {s2:?}"
    );
}

#[test]
fn stats_on_an_empty_store_and_small_files() {
    let mut m = Mount::with_block_size("16K");
    let s = stats(&m.mnt);
    assert_eq!(
        (s.logical_bytes, s.allocated_bytes, s.stored_bytes),
        (0, 0, 0),
        "{s:?}"
    );
    // One byte allocates one block; a 1 GiB sparse file allocates nothing.
    fs::write(m.path("one"), b"x").unwrap();
    File::create(m.path("sparse"))
        .unwrap()
        .set_len(GIB)
        .unwrap();
    // Two identical 64 KiB files and one block repeated inside a file.
    let data = Rng::new(31).bytes(64 * 1024);
    fs::write(m.path("a"), &data).unwrap();
    fs::write(m.path("b"), &data).unwrap();
    let block = Rng::new(32).bytes(16 * 1024);
    fs::write(m.path("rep"), block.repeat(8)).unwrap();
    m.unmount_ok();
    let s = stats(&m.store);
    eprintln!("{s:?}");
    assert_eq!(s.logical_bytes, 1 + GIB + 2 * 64 * KIB + 128 * KIB);
    assert_eq!(s.allocated_bytes, 16 * KIB + 2 * 64 * KIB + 128 * KIB);
    // Stored: at most the 1-byte block, 64 KiB once, one 16 KiB block.
    assert!(
        s.stored_bytes <= 16 * KIB + 64 * KIB + 16 * KIB,
        "stored_bytes {} shows missing dedup",
        s.stored_bytes
    );
    assert!(s.stored_bytes > 64 * KIB + 16 * KIB);
    let expect_ratio = s.allocated_bytes as f64 / s.stored_bytes as f64;
    assert!((s.dedup_ratio - expect_ratio).abs() < 0.01, "{s:?}");
}

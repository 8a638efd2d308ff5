//! Power cut: what the disk holds right after fsync returns must be a store that opens
//! and has every fsync'd byte.
//!
//! The store lives on ext4 on a loop device, mounted with `commit=60` so that ext4's own
//! periodic journal commit does not save us within the test: only what thinfs itself made
//! durable is on the device. After the fsyncs the device is copied (the "power cut": what
//! reached the disk, without the page cache and the uncommitted journal), the copy is
//! mounted (ext4 replays its journal) and thinfs must open it with everything there.
//!
//! The last phase is small fsync'd overwrites, which the intent log alone makes durable
//! (src/fs/journal.rs): the copy has them only if the replay at mount works.
//!
//! This test found that sled's flush alone is not durable: it ends with `sync_file_range`,
//! which commits neither the log file's new size nor the device cache, and the copy did
//! not even open ("Read corrupted data") after metadata-heavy work.

#![allow(dead_code)]

#[path = "integration/common.rs"]
mod common;

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{describe, run_ok, test_dir, thinfs, wait_no_process_with};

/// A loop device over an image file, with an ext4 filesystem mounted on `dir`; torn down
/// (unmount, detach) on drop.
struct LoopFs {
    dev: String,
    dir: PathBuf,
}

impl LoopFs {
    /// Attaches `image`, makes ext4 on it if `mkfs`, mounts it on `dir`.
    fn attach(image: &Path, dir: &Path, mkfs: bool) -> LoopFs {
        let out = run_ok(Command::new("losetup").args(["-f", "--show"]).arg(image));
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let fs = LoopFs {
            dev,
            dir: dir.to_path_buf(),
        };
        if mkfs {
            run_ok(Command::new("mkfs.ext4").args(["-q", "-F", &fs.dev]));
        }
        fs::create_dir_all(dir).unwrap();
        run_ok(
            Command::new("mount")
                .args(["-o", "commit=60", &fs.dev])
                .arg(dir),
        );
        fs
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        common::force_unmount(&self.dir);
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
    }
}

/// A daemonized `thinfs mount STORE MNT`; unmounted (and waited for) on drop.
struct Daemon {
    store: PathBuf,
    mnt: PathBuf,
}

impl Daemon {
    fn mount(store: &Path, mnt: &Path) -> Daemon {
        fs::create_dir_all(mnt).unwrap();
        let out = thinfs(["mount".as_ref(), store.as_os_str(), mnt.as_os_str()]);
        assert!(
            out.status.success(),
            "mount of {}: {}",
            store.display(),
            describe(&out)
        );
        Daemon {
            store: store.to_path_buf(),
            mnt: mnt.to_path_buf(),
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        common::force_unmount(&self.mnt);
        let needle = self.store.to_string_lossy().to_string();
        wait_no_process_with(&needle, Duration::from_secs(60));
    }
}

fn file_bytes(i: usize) -> Vec<u8> {
    let mut x = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (0..8 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

const FILES: usize = 4;
const EMPTY_FILES: usize = 4000;
const OVERWRITES: usize = 64;

#[test]
fn fsynced_data_and_names_survive_a_power_cut() {
    let tmp = test_dir("powercut");
    let image = tmp.path().join("disk.img");
    let copy = tmp.path().join("copy.img");
    fs::File::create(&image)
        .and_then(|f| f.set_len(512 << 20))
        .unwrap();
    let (store, mnt) = (tmp.path().join("fs/store"), tmp.path().join("mnt"));
    let expected = {
        let disk = LoopFs::attach(&image, &tmp.path().join("fs"), true);
        let out = thinfs(["mkfs".as_ref(), store.as_os_str()]);
        assert!(out.status.success(), "mkfs: {}", describe(&out));
        let daemon = Daemon::mount(&store, &mnt);
        // Data files, each fsync'd (chunk packs and metadata).
        let mut expected: Vec<Vec<u8>> = (0..FILES).map(file_bytes).collect();
        for i in 0..FILES {
            let f = fs::File::create(mnt.join(format!("vm{i}.img"))).unwrap();
            f.write_all_at(&file_bytes(i), 0).unwrap();
            f.sync_all().unwrap();
        }
        // Metadata only (no pack to sync): thousands of names, then fsync of their
        // directory. Their records are more than one of sled's log segments.
        fs::create_dir(mnt.join("many")).unwrap();
        for i in 0..EMPTY_FILES {
            fs::File::create(mnt.join(format!("many/f{i:05}"))).unwrap();
        }
        fs::File::open(mnt.join("many"))
            .and_then(|d| d.sync_all())
            .unwrap();
        // Small overwrites, each fsync'd: the intent log's path (one sync of the packs,
        // no metadata flush), as a guest's database makes them.
        let mut rng = 0x2545_F491_4F6C_DD1Du64;
        for n in 0..OVERWRITES {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let i = n % FILES;
            let off = (rng % ((8 << 20) - 4096)) as usize;
            let data = vec![(n % 250) as u8 + 1; 4096];
            let f = fs::OpenOptions::new()
                .write(true)
                .open(mnt.join(format!("vm{i}.img")))
                .unwrap();
            f.write_all_at(&data, off as u64).unwrap();
            f.sync_data().unwrap();
            expected[i][off..off + 4096].copy_from_slice(&data);
        }
        // The power cut: the device as it is at this moment.
        let mut from = fs::File::open(&disk.dev).unwrap();
        let mut to = fs::File::create(&copy).unwrap();
        std::io::copy(&mut from, &mut to).unwrap();
        drop(daemon);
        expected
    };
    // Power back on: ext4 replays its journal, thinfs opens what was on the disk.
    let _disk = LoopFs::attach(&copy, &tmp.path().join("fs"), false);
    let _daemon = Daemon::mount(&store, &mnt);
    for (i, want) in expected.iter().enumerate() {
        let p = mnt.join(format!("vm{i}.img"));
        let got = fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        common::assert_same_bytes(&got, want, &p.display().to_string());
    }
    let names = fs::read_dir(mnt.join("many")).unwrap().count();
    assert_eq!(
        names, EMPTY_FILES,
        "fsync'd names present after the power cut"
    );
}

//! Space and integrity through a real mount: a full disk gives ENOSPC and recovers after
//! delete + GC; a flipped byte in a pack gives EIO to readers, is named by scrub and
//! reported by fsck.

#![allow(dead_code)]

#[path = "integration/common.rs"]
mod common;

use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::Command;

use common::{describe, run_ok, test_dir, thinfs, Mount};

/// A tmpfs of `size` mounted for one test; unmounted on drop.
struct Tmpfs(std::path::PathBuf, tempfile::TempDir);

impl Tmpfs {
    fn new(size: &str) -> Tmpfs {
        let dir = test_dir("tmpfs");
        let p = dir.path().join("disk");
        fs::create_dir(&p).unwrap();
        run_ok(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
                .arg(&p),
        );
        Tmpfs(p, dir)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn write_file(path: &std::path::Path, mib: usize, seed: u8) -> std::io::Result<()> {
    let mut f = fs::File::create(path)?;
    let mut block = vec![0u8; 1 << 20];
    for i in 0..mib {
        for (j, b) in block.iter_mut().enumerate() {
            *b = (j as u8)
                .wrapping_mul(31)
                .wrapping_add(i as u8)
                .wrapping_add(seed)
                ^ (j >> 8) as u8
                ^ (i >> 3) as u8;
        }
        block[0..8].copy_from_slice(&(i as u64 * 1000 + seed as u64).to_le_bytes());
        f.write_all(&block)?;
    }
    f.sync_all()
}

/// `thinfs mount STORE MNT -o gc_interval=0`, which must succeed.
fn mount_no_gc(store: &Path, mnt: &Path, what: &str) {
    let out = thinfs([
        "mount",
        store.to_str().unwrap(),
        mnt.to_str().unwrap(),
        "-o",
        "gc_interval=0",
    ]);
    assert!(out.status.success(), "{what}: {}", describe(&out));
}

#[test]
fn full_disk_gives_enospc_and_recovers_after_delete_and_gc() {
    let disk = Tmpfs::new("96m");
    let store = disk.0.join("store");
    common::mkfs(&store, &[]);
    let mnt = disk.1.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    mount_no_gc(&store, &mnt, "mount");
    let big = mnt.join("big");
    let err = write_file(&big, 200, 1).expect_err("200 MiB must not fit on a 96 MiB disk");
    assert_eq!(
        err.raw_os_error(),
        Some(libc::ENOSPC),
        "write on a full disk: {err}"
    );
    // Still usable: metadata operations, reads, a clean unmount and a remount.
    fs::write(mnt.join("small"), b"still writable metadata").unwrap();
    assert!(fs::metadata(&big).unwrap().len() > 0);
    run_ok(Command::new("umount").arg(&mnt));
    common::wait_no_process_with(store.to_str().unwrap(), std::time::Duration::from_secs(30));
    let out = thinfs(["fsck", store.to_str().unwrap(), "--json"]);
    assert!(
        out.status.success(),
        "fsck after ENOSPC: {}",
        describe(&out)
    );
    mount_no_gc(&store, &mnt, "remount after ENOSPC");
    assert_eq!(
        fs::read(mnt.join("small")).unwrap(),
        b"still writable metadata"
    );
    // Space comes back after delete + gc, and writes succeed again.
    fs::remove_file(&big).unwrap();
    let out = thinfs(["gc", "--mount", mnt.to_str().unwrap(), "--json"]);
    assert!(out.status.success(), "gc: {}", describe(&out));
    write_file(&mnt.join("again"), 32, 2).expect("writes succeed after delete + gc");
    run_ok(Command::new("umount").arg(&mnt));
    common::wait_no_process_with(store.to_str().unwrap(), std::time::Duration::from_secs(30));
}

#[test]
fn flipped_pack_byte_gives_eio_scrub_names_file_fsck_reports() {
    let mut m = Mount::new();
    fs::create_dir(m.path("vm")).unwrap();
    write_file(&m.path("vm/disk.raw"), 4, 7).unwrap();
    fs::write(m.path("vm/ok.conf"), b"fine").unwrap();
    m.unmount_ok();
    // Flip one byte in the middle of the first pack with data.
    let packs = m.store.join("packs");
    let mut files: Vec<_> = fs::read_dir(&packs)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter_map(|e| Some((e.path(), e.metadata().ok()?.len())))
        .collect();
    files.sort();
    let pack = files
        .iter()
        .max_by_key(|(_, len)| *len)
        .unwrap_or_else(|| panic!("no pack: {files:?}"))
        .0
        .clone();
    let mut bytes = fs::read(&pack).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x40;
    fs::write(&pack, bytes).unwrap();
    m.remount();
    let err = fs::read(m.path("vm/disk.raw")).expect_err("reading a corrupt chunk must fail");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert_eq!(fs::read(m.path("vm/ok.conf")).unwrap(), b"fine");
    assert!(
        m.daemon_log().contains("damaged"),
        "the daemon logs the damage:\n{}",
        m.daemon_log()
    );
    let out = thinfs(["scrub", m.mnt.to_str().unwrap()]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "scrub exits 1 on damage: {}",
        describe(&out)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("vm/disk.raw") && text.contains("offset"),
        "scrub names the file and offset: {text}"
    );
    m.unmount_ok();
    let out = thinfs(["fsck", m.store.to_str().unwrap()]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "fsck reports the damage: {}",
        describe(&out)
    );
    m.remount();
}

//! SIGTERM and SIGINT unmount, flush everything and make the daemon exit 0.

#![allow(dead_code)]

#[path = "integration/common.rs"]
mod common;

use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{test_dir, thinfs_bin, thinfs_mounted_at};

/// Starts `thinfs mount -f STORE MNT` and waits (30 s at most) until it is mounted.
fn mount_foreground(store: &Path, mnt: &Path, stderr: Stdio, what: &str) -> Child {
    let child = Command::new(thinfs_bin())
        .args(["mount", "-f"])
        .arg(store)
        .arg(mnt)
        .stderr(stderr)
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !thinfs_mounted_at(mnt) {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{what} did not come up"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

fn signal_unmounts(sig: i32) {
    let dir = test_dir("sig");
    let store = dir.path().join("store");
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    common::mkfs(&store, &[]);
    let mut child = mount_foreground(&store, &mnt, Stdio::null(), "mount");
    // Written without fsync: the signal's unmount must flush it.
    fs::write(mnt.join("x"), vec![7u8; 100_000]).unwrap();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, sig) };
    let st = child.wait().unwrap();
    assert!(st.success(), "daemon exit after signal {sig}: {st}");
    assert!(!thinfs_mounted_at(&mnt), "still mounted after signal {sig}");
    let mut child = mount_foreground(&store, &mnt, Stdio::inherit(), "remount");
    assert_eq!(fs::read(mnt.join("x")).unwrap(), vec![7u8; 100_000]);
    let _ = Command::new("umount").arg(&mnt).status();
    assert!(child.wait().unwrap().success());
}

#[test]
fn sigterm_unmounts_flushes_and_exits_zero() {
    signal_unmounts(libc::SIGTERM);
}

#[test]
fn sigint_unmounts_flushes_and_exits_zero() {
    signal_unmounts(libc::SIGINT);
}

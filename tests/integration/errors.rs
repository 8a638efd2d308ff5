//! The CLI contract of `thinfs mkfs`, `thinfs mount` and `thinfs stats`: what
//! they create, how a mount shows in the mount table, and how they fail (exit 1
//! with a one-line message, exit 2 for usage errors).

use std::ffi::OsStr;
use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use super::common::*;

/// Names and contents of every file below `dir`, to prove a command left it alone.
fn fingerprint(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v = Vec::new();
    for (p, e) in tree_snapshot(
        dir,
        SnapOpts {
            mtimes: true,
            dir_mtimes: false,
            owners: true,
            xattrs: false,
        },
    ) {
        v.push((
            format!("{p:?} {:o} {}", e.mode, e.size),
            e.content.unwrap_or_default(),
        ));
    }
    v
}

#[test]
fn mkfs_creates_a_store_layout() {
    let dir = test_dir("mkfs");
    let store = dir.path().join("new/nested/store");
    let out = thinfs([OsStr::new("mkfs"), store.as_os_str()]);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(store.join("thinfs.toml").is_file());
    assert!(store.join("meta").is_dir());
    assert!(store.join("packs").is_dir());
    let toml = fs::read_to_string(store.join("thinfs.toml")).unwrap();
    assert!(
        toml.contains("format_version"),
        "thinfs.toml lacks format_version:\n{toml}"
    );
    // An existing empty directory is fine too, with a block size.
    let empty = dir.path().join("empty");
    fs::create_dir(&empty).unwrap();
    let out = thinfs([
        OsStr::new("mkfs"),
        empty.as_os_str(),
        OsStr::new("--block-size"),
        OsStr::new("16K"),
    ]);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(empty.join("thinfs.toml").is_file());
}

#[test]
fn mkfs_refuses_non_empty_non_store_dir() {
    let dir = test_dir("mkfs-refuse");
    let d = dir.path().join("precious");
    fs::create_dir(&d).unwrap();
    fs::write(d.join("important.txt"), b"do not touch").unwrap();
    fs::create_dir(d.join("sub")).unwrap();
    let before = fingerprint(&d);
    let out = thinfs([OsStr::new("mkfs"), d.as_os_str()]);
    assert_fails_one_line(&out, 1, "mkfs on a non-empty directory");
    assert_eq!(
        fingerprint(&d),
        before,
        "mkfs changed a directory it refused"
    );
}

#[test]
fn mkfs_rejects_a_bad_block_size() {
    let dir = test_dir("mkfs-bs");
    for bs in ["3K", "0", "banana"] {
        let store = dir.path().join(format!("s-{bs}"));
        let out = thinfs([
            OsStr::new("mkfs"),
            store.as_os_str(),
            OsStr::new("--block-size"),
            OsStr::new(bs),
        ]);
        assert!(
            matches!(out.status.code(), Some(1) | Some(2)),
            "mkfs --block-size {bs}: {}",
            describe(&out)
        );
        assert!(
            !store.join("thinfs.toml").exists(),
            "mkfs --block-size {bs} left a store behind"
        );
    }
}

#[test]
fn background_mount_shows_in_mount_table_and_exits_on_umount() {
    let dir = test_dir("bgmount");
    let store = dir.path().join("store");
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    mkfs(&store, &[]);
    let out = thinfs([OsStr::new("mount"), store.as_os_str(), mnt.as_os_str()]);
    assert!(
        out.status.success(),
        "thinfs mount (background): {}",
        describe(&out)
    );
    // The mount is live as soon as the command returns.
    let entry = mount_at(&mnt);
    let cleanup = Unmounter(&mnt);
    let entry = entry.expect("no mount at the mountpoint right after `thinfs mount` returned");
    assert_eq!(entry.fstype, "fuse.thinfs");
    assert_eq!(
        entry.source,
        store.to_str().unwrap(),
        "mount source should be the store path"
    );
    fs::write(mnt.join("hello"), b"world").unwrap();
    assert_eq!(fs::read(mnt.join("hello")).unwrap(), b"world");
    // `findmnt -t fuse.thinfs` lists it.
    let out = run_ok(Command::new("findmnt").args(["-n", "-t", "fuse.thinfs", "-o", "TARGET"]));
    assert!(stdout_str(&out).lines().any(|l| Path::new(l.trim()) == mnt));

    run_ok(Command::new("umount").arg(&mnt));
    std::mem::forget(cleanup);
    assert!(mount_at(&mnt).is_none());
    assert!(
        wait_no_process_with(mnt.to_str().unwrap(), Duration::from_secs(30)),
        "daemon still running 30 s after umount"
    );
    // The data was flushed: mount again in the foreground and read it.
    let mut cmd = Command::new(thinfs_bin());
    cmd.arg("mount").arg(&store).arg(&mnt);
    let out = run_timeout(&mut cmd, CMD_TIMEOUT);
    assert!(out.status.success(), "{}", describe(&out));
    let cleanup = Unmounter(&mnt);
    assert_eq!(fs::read(mnt.join("hello")).unwrap(), b"world");
    // fusermount3 -u works too.
    run_ok(Command::new("fusermount3").arg("-u").arg(&mnt));
    std::mem::forget(cleanup);
    assert!(wait_no_process_with(
        mnt.to_str().unwrap(),
        Duration::from_secs(30)
    ));
}

/// Lazily unmounts on drop, for tests that mount without a [`Mount`].
struct Unmounter<'a>(&'a Path);

impl Drop for Unmounter<'_> {
    fn drop(&mut self) {
        force_unmount(self.0);
    }
}

#[test]
fn foreground_mount_exits_zero_after_umount() {
    let mut m = Mount::new();
    fs::write(m.path("f"), b"x").unwrap();
    let st = m.unmount();
    assert_eq!(
        st.code(),
        Some(0),
        "thinfs mount -f after umount: {st}\n{}",
        m.daemon_log()
    );
}

#[test]
fn mount_with_allow_other_serves_other_users() {
    let m = Mount::with(MountOptions {
        block_size: None,
        mount_args: vec!["-o".into(), "allow_other".into()],
    });
    let entry = mount_at(&m.mnt).unwrap();
    assert!(
        entry.super_options.contains("allow_other"),
        "allow_other missing from the mount options: {entry:?}"
    );
    fs::write(m.path("readable"), b"for everyone").unwrap();
    fs::set_permissions(
        m.path("readable"),
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    fs::write(m.path("private"), b"root only").unwrap();
    fs::set_permissions(
        m.path("private"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let out = as_nobody(&format!("cat {}", m.path("readable").display()));
    assert!(
        out.status.success(),
        "nobody cannot read a 0644 file: {}",
        describe(&out)
    );
    assert_eq!(stdout_str(&out), "for everyone");
    // Permissions are enforced for other users (default_permissions).
    let out = as_nobody(&format!("cat {}", m.path("private").display()));
    assert!(!out.status.success(), "nobody read a 0600 root file");
    let out = as_nobody(&format!("echo x >> {}", m.path("readable").display()));
    assert!(!out.status.success(), "nobody wrote a 0644 root file");
    let out = as_nobody(&format!("touch {}", m.path("newfile").display()));
    assert!(
        !out.status.success(),
        "nobody created a file in a 0755 root dir"
    );
}

#[test]
fn mount_via_mount_fuse3_helper() {
    // fstab and `mount -t fuse.thinfs` run mount.fuse3, which runs
    // `thinfs STORE MNT -o rw,...,dev,suid` through /bin/sh. mount(8) clears
    // PATH for its helpers (sh then searches /usr/local/bin, /usr/bin, ...), so
    // a private PATH only reaches the helper when we call mount.fuse3 directly.
    let dir = test_dir("mount-t");
    let bin = dir.path().join("bin");
    fs::create_dir(&bin).unwrap();
    std::os::unix::fs::symlink(thinfs_bin(), bin.join("thinfs")).unwrap();
    let store = dir.path().join("store");
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    mkfs(&store, &[]);
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = run_timeout(
        Command::new("mount.fuse3")
            .arg(&store)
            .arg(&mnt)
            .args(["-t", "fuse.thinfs", "-o", "rw,allow_other"])
            .env("PATH", path),
        CMD_TIMEOUT,
    );
    let cleanup = Unmounter(&mnt);
    assert!(
        out.status.success(),
        "mount.fuse3 -t fuse.thinfs: {}",
        describe(&out)
    );
    let entry = mount_at(&mnt).expect("mount.fuse3 returned 0 without a mount");
    assert_eq!(entry.fstype, "fuse.thinfs");
    assert_eq!(entry.source, store.to_str().unwrap());
    fs::write(mnt.join("f"), b"via mount(8)").unwrap();
    drop(cleanup);
    assert!(wait_no_process_with(
        mnt.to_str().unwrap(),
        Duration::from_secs(30)
    ));
}

/// Runs `thinfs mount` (background and foreground) and expects a one-line failure.
fn expect_mount_fails(store: &Path, mnt: &Path, what: &str) -> Vec<String> {
    let mut messages = Vec::new();
    for fg in [false, true] {
        let mut args = vec![OsStr::new("mount"), store.as_os_str(), mnt.as_os_str()];
        if fg {
            args.push(OsStr::new("-f"));
        }
        let out = thinfs(&args);
        let _cleanup = Unmounter(mnt);
        let label = format!("{what} ({})", if fg { "-f" } else { "background" });
        assert!(
            !thinfs_mounted_at(mnt) || !out.status.success(),
            "{label}: mounted although it should fail"
        );
        assert_fails_one_line(&out, 1, &label);
        messages.push(stderr_str(&out));
    }
    messages
}

#[test]
fn mount_of_a_non_store_fails() {
    let dir = test_dir("nostore");
    let not_store = dir.path().join("plain");
    fs::create_dir(&not_store).unwrap();
    fs::write(not_store.join("x"), b"x").unwrap();
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    expect_mount_fails(&not_store, &mnt, "mount of a plain directory");
    let empty = dir.path().join("empty");
    fs::create_dir(&empty).unwrap();
    expect_mount_fails(&empty, &mnt, "mount of an empty directory");
    expect_mount_fails(
        &dir.path().join("missing"),
        &mnt,
        "mount of a missing store",
    );
    assert!(!not_store.join("thinfs.toml").exists() && !empty.join("thinfs.toml").exists());
}

#[test]
fn mount_of_unknown_format_version_fails() {
    let dir = test_dir("fmtver");
    let store = dir.path().join("store");
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    mkfs(&store, &[]);
    let cfg = store.join("thinfs.toml");
    let toml = fs::read_to_string(&cfg).unwrap();
    let edited: String = toml
        .lines()
        .map(|l| {
            if l.trim_start().starts_with("format_version") {
                "format_version = 999".to_string()
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n";
    assert_ne!(
        edited, toml,
        "could not find format_version in thinfs.toml:\n{toml}"
    );
    fs::write(&cfg, edited).unwrap();
    for msg in expect_mount_fails(&store, &mnt, "mount with format_version 999") {
        assert!(
            msg.to_lowercase().contains("version") && msg.contains("999"),
            "message does not name the version: {msg:?}"
        );
    }
    // stats refuses it as well.
    let out = thinfs([OsStr::new("stats"), store.as_os_str()]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "stats of a future store: {}",
        describe(&out)
    );
}

#[test]
fn mount_on_a_missing_mountpoint_fails() {
    let dir = test_dir("nomnt");
    let store = dir.path().join("store");
    mkfs(&store, &[]);
    let mnt = dir.path().join("does-not-exist");
    for msg in expect_mount_fails(&store, &mnt, "mount on a missing mountpoint") {
        assert!(
            msg.contains("does-not-exist") || msg.to_lowercase().contains("mountpoint"),
            "message does not name the mountpoint: {msg:?}"
        );
    }
    assert!(!mnt.exists(), "mount created the missing mountpoint");
}

#[test]
fn second_mount_of_the_same_store_fails() {
    let m = Mount::new();
    fs::write(m.path("f"), b"first").unwrap();
    let mnt2 = m.scratch().join("mnt2");
    fs::create_dir(&mnt2).unwrap();
    for msg in expect_mount_fails(&m.store, &mnt2, "second mount of a mounted store") {
        let l = msg.to_lowercase();
        assert!(
            l.contains("mounted")
                || l.contains("in use")
                || l.contains("lock")
                || l.contains("busy"),
            "unclear message for a store in use: {msg:?}"
        );
    }
    // The first mount is unharmed.
    assert_eq!(fs::read(m.path("f")).unwrap(), b"first");
    fs::write(m.path("g"), b"second").unwrap();
    assert_eq!(fs::read(m.path("g")).unwrap(), b"second");
}

#[test]
fn usage_errors_exit_2() {
    let dir = test_dir("usage");
    let store = dir.path().join("store");
    let cases: Vec<Vec<&OsStr>> = vec![
        vec![OsStr::new("--bogus-flag")],
        vec![OsStr::new("frobnicate")],
        vec![
            OsStr::new("mkfs"),
            store.as_os_str(),
            OsStr::new("--bogus-flag"),
        ],
        vec![OsStr::new("mkfs")],
        vec![OsStr::new("mount"), store.as_os_str()],
        vec![
            OsStr::new("mount"),
            store.as_os_str(),
            store.as_os_str(),
            OsStr::new("--nope"),
        ],
        vec![OsStr::new("stats"), store.as_os_str(), OsStr::new("--jsn")],
    ];
    for args in cases {
        let out = thinfs(&args);
        assert_eq!(
            out.status.code(),
            Some(2),
            "thinfs {args:?}: {}",
            describe(&out)
        );
        assert!(
            !out.stderr.is_empty(),
            "thinfs {args:?}: usage error without a message"
        );
    }
    assert!(!store.exists(), "a usage error created the store");
    // --help and --version succeed.
    for flag in ["--help", "--version"] {
        let out = thinfs([flag]);
        assert!(out.status.success(), "thinfs {flag}: {}", describe(&out));
        assert!(!out.stdout.is_empty());
    }
}

#[test]
fn stats_reports_all_fields_on_store_and_mountpoint() {
    let mut m = Mount::new();
    fs::write(m.path("f"), Rng::new(40).bytes(300_000)).unwrap();
    let live = stats(&m.mnt);
    assert_eq!(live.logical_bytes, 300_000);
    // Without --json it prints something human-readable.
    let out = thinfs([OsStr::new("stats"), m.mnt.as_os_str()]);
    assert!(
        out.status.success() && !out.stdout.is_empty(),
        "{}",
        describe(&out)
    );
    m.unmount_ok();
    let cold = stats(&m.store);
    assert_eq!(cold.logical_bytes, 300_000);
    assert!(cold.stored_bytes >= 300_000, "{cold:?}");
    assert!(cold.allocated_bytes >= 300_000, "{cold:?}");
    assert!(cold.chunks > 0 && cold.packs > 0, "{cold:?}");
    // A path that is neither a store nor a thinfs mount.
    let out = thinfs([
        OsStr::new("stats"),
        m.scratch().as_os_str(),
        OsStr::new("--json"),
    ]);
    assert_fails_one_line(&out, 1, "stats of a plain directory");
}

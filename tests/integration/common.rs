//! Shared fixtures: the RAII [`Mount`] guard, a bounded command runner, libc
//! helpers that turn return codes into `io::Result`, a deterministic PRNG and a
//! tree walker that compares whole directory trees.
//!
//! Invariants: every `Mount` owns a fresh temp dir (store + mountpoint + daemon
//! log), so tests never share state; a mount that does not come up within
//! [`MOUNT_TIMEOUT`] fails the test; dropping a `Mount` unmounts it and, unless
//! the test is already failing, asserts the daemon exited 0.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::ffi::{CString, OsStr};
use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// How long a fresh daemon may take until its mount shows in mountinfo.
pub const MOUNT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a daemon may take to flush and exit after its mount went away.
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(120);
/// Default bound for one CLI command.
pub const CMD_TIMEOUT: Duration = Duration::from_secs(300);

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * KIB;
pub const GIB: u64 = 1024 * MIB;
pub const TIB: u64 = 1024 * GIB;

/// The binary under test.
pub fn thinfs_bin() -> &'static str {
    env!("CARGO_BIN_EXE_thinfs")
}

/// A fresh temp dir for a test, world-traversable (tests run commands as `nobody`).
pub fn test_dir(prefix: &str) -> TempDir {
    let base = Path::new("/var/tmp");
    let base = if base.is_dir() {
        base.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    let dir = tempfile::Builder::new()
        .prefix(&format!("thinfs-it-{prefix}-"))
        .tempdir_in(base)
        .expect("create temp dir");
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

// ---------------------------------------------------------------------------
// Running commands with a time bound
// ---------------------------------------------------------------------------

/// Runs `cmd` with stdin closed and stdout/stderr captured in anonymous files
/// (not pipes: a daemon that inherits them must not make us wait for it).
/// Panics if it does not finish within `timeout`.
pub fn run_timeout(cmd: &mut Command, timeout: Duration) -> Output {
    let mut out = tempfile::tempfile().unwrap();
    let mut err = tempfile::tempfile().unwrap();
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(err.try_clone().unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {desc}: {e}"));
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{desc} did not finish within {timeout:?}");
        }
        sleep(Duration::from_millis(10));
    };
    let read_all = |f: &mut File| {
        let mut v = Vec::new();
        f.seek(SeekFrom::Start(0)).unwrap();
        f.read_to_end(&mut v).unwrap();
        v
    };
    Output {
        status,
        stdout: read_all(&mut out),
        stderr: read_all(&mut err),
    }
}

/// Opens `p` for reading and writing, creating it if missing (never truncating).
pub fn open_rw(p: &Path) -> File {
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(p)
        .unwrap_or_else(|e| panic!("open {p:?}: {e}"))
}

/// Whether `cmd` is on PATH.
pub fn have(cmd: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {cmd}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// `sh -c SCRIPT` as user and group nobody (65534).
pub fn as_nobody(script: &str) -> Output {
    run_timeout(
        Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "sh",
                "-c",
            ])
            .arg(script),
        CMD_TIMEOUT,
    )
}

/// Runs the thinfs binary with `args`.
pub fn thinfs<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run_timeout(Command::new(thinfs_bin()).args(args), CMD_TIMEOUT)
}

/// Runs a shell tool and panics with its output unless it exits 0.
pub fn run_ok(cmd: &mut Command) -> Output {
    let desc = format!("{cmd:?}");
    let out = run_timeout(cmd, CMD_TIMEOUT);
    assert!(out.status.success(), "{desc} failed: {}", describe(&out));
    out
}

/// `sh -c SCRIPT`, which must exit 0.
pub fn sh(script: &str) -> Output {
    run_ok(Command::new("sh").arg("-c").arg(script))
}

/// Exit status, stdout and stderr of a finished command, for assertion messages.
pub fn describe(out: &Output) -> String {
    format!(
        "{}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

pub fn stdout_str(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr_str(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts the command failed with exit code `code` and a single-line message on stderr.
pub fn assert_fails_one_line(out: &Output, code: i32, what: &str) {
    assert_eq!(
        out.status.code(),
        Some(code),
        "{what}: expected exit {code}, got {}",
        describe(out)
    );
    let err = stderr_str(out);
    let lines: Vec<&str> = err.trim().lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "{what}: expected a one-line error on stderr, got {}",
        describe(out)
    );
}

/// `thinfs mkfs STORE [extra...]`, which must succeed.
pub fn mkfs(store: &Path, extra: &[&str]) {
    let mut args: Vec<&OsStr> = vec![OsStr::new("mkfs"), store.as_os_str()];
    args.extend(extra.iter().map(OsStr::new));
    let out = thinfs(&args);
    assert!(
        out.status.success(),
        "thinfs mkfs {store:?} {extra:?} failed: {}",
        describe(&out)
    );
}

/// `thinfs stats PATH --json`, parsed.
pub fn stats(path: &Path) -> Stats {
    let out = thinfs([OsStr::new("stats"), path.as_os_str(), OsStr::new("--json")]);
    assert!(
        out.status.success(),
        "thinfs stats {path:?} --json failed: {}",
        describe(&out)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("stats output is not JSON ({e}): {}", describe(&out)));
    Stats::from_json(&v)
}

/// The fields of `thinfs stats --json`.
#[derive(Debug, Clone, PartialEq)]
pub struct Stats {
    pub logical_bytes: u64,
    pub allocated_bytes: u64,
    pub stored_bytes: u64,
    pub pack_bytes: u64,
    pub meta_bytes: u64,
    pub chunks: u64,
    pub packs: u64,
    pub dedup_ratio: f64,
}

impl Stats {
    pub fn from_json(v: &serde_json::Value) -> Stats {
        let int = |k: &str| {
            v.get(k)
                .and_then(|x| x.as_u64())
                .unwrap_or_else(|| panic!("stats JSON lacks unsigned integer {k:?}: {v}"))
        };
        Stats {
            logical_bytes: int("logical_bytes"),
            allocated_bytes: int("allocated_bytes"),
            stored_bytes: int("stored_bytes"),
            pack_bytes: int("pack_bytes"),
            meta_bytes: int("meta_bytes"),
            chunks: int("chunks"),
            packs: int("packs"),
            dedup_ratio: v
                .get("dedup_ratio")
                .and_then(|x| x.as_f64())
                .unwrap_or_else(|| panic!("stats JSON lacks number \"dedup_ratio\": {v}")),
        }
    }
}

// ---------------------------------------------------------------------------
// Mount table
// ---------------------------------------------------------------------------

/// One line of /proc/self/mountinfo.
#[derive(Debug, Clone)]
pub struct MountEntry {
    pub mount_point: PathBuf,
    pub mount_options: String,
    pub fstype: String,
    pub source: String,
    pub super_options: String,
}

fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            let v = u8::from_str_radix(&s[i + 1..i + 4], 8).unwrap_or(b'?');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// All mounts visible to this process.
pub fn mount_table() -> Vec<MountEntry> {
    let text = fs::read_to_string("/proc/self/mountinfo").expect("read mountinfo");
    text.lines()
        .filter_map(|line| {
            let (pre, post) = line.split_once(" - ")?;
            let pre: Vec<&str> = pre.split(' ').collect();
            let post: Vec<&str> = post.split(' ').collect();
            if pre.len() < 6 || post.len() < 3 {
                return None;
            }
            Some(MountEntry {
                mount_point: PathBuf::from(unescape_mountinfo(pre[4])),
                mount_options: pre[5].to_string(),
                fstype: post[0].to_string(),
                source: unescape_mountinfo(post[1]),
                super_options: post[2].to_string(),
            })
        })
        .collect()
}

/// The topmost mount at exactly `path`, if any.
pub fn mount_at(path: &Path) -> Option<MountEntry> {
    mount_table().into_iter().rfind(|m| m.mount_point == path)
}

/// True while a thinfs mount sits at `path`.
pub fn thinfs_mounted_at(path: &Path) -> bool {
    mount_table()
        .iter()
        .any(|m| m.mount_point == path && m.fstype == "fuse.thinfs")
}

/// Unmounts `mnt`: `umount`, retried briefly for EBUSY, then `umount -l`.
pub fn force_unmount(mnt: &Path) {
    for _ in 0..20 {
        if mount_at(mnt).is_none() {
            return;
        }
        let out = run_timeout(Command::new("umount").arg(mnt), Duration::from_secs(60));
        if out.status.success() {
            return;
        }
        sleep(Duration::from_millis(100));
    }
    let _ = run_timeout(
        Command::new("umount").arg("-l").arg(mnt),
        Duration::from_secs(60),
    );
}

/// Waits until no process has both "thinfs" and `needle` on its command line.
pub fn wait_no_process_with(needle: &str, timeout: Duration) -> bool {
    let start = Instant::now();
    loop {
        let mut found = false;
        if let Ok(rd) = fs::read_dir("/proc") {
            for e in rd.flatten() {
                let name = e.file_name();
                let Some(pid) = name.to_str().and_then(|s| s.parse::<u32>().ok()) else {
                    continue;
                };
                if pid == std::process::id() {
                    continue;
                }
                if let Ok(cmdline) = fs::read(e.path().join("cmdline")) {
                    let c = String::from_utf8_lossy(&cmdline).replace('\0', " ");
                    if c.contains("thinfs") && c.contains(needle) {
                        found = true;
                        break;
                    }
                }
            }
        }
        if !found {
            return true;
        }
        if start.elapsed() > timeout {
            return false;
        }
        sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------------------
// The Mount guard
// ---------------------------------------------------------------------------

/// Options for a [`Mount`].
#[derive(Debug, Clone, Default)]
pub struct MountOptions {
    /// `--block-size` for mkfs, e.g. "16K"; None uses the default.
    pub block_size: Option<String>,
    /// Extra arguments for `thinfs mount` (e.g. `-o allow_other`).
    pub mount_args: Vec<String>,
}

/// A live thinfs mount of a fresh store, served by a foreground daemon that is
/// this process's child. Dropping it unmounts and reaps the daemon.
pub struct Mount {
    dir: TempDir,
    pub store: PathBuf,
    pub mnt: PathBuf,
    log: PathBuf,
    opts: MountOptions,
    child: Option<Child>,
    generation: u32,
}

impl Mount {
    /// A fresh store with the default block size, mounted.
    pub fn new() -> Mount {
        Mount::with(MountOptions::default())
    }

    /// A fresh store made with `mkfs --block-size BS`, mounted.
    pub fn with_block_size(bs: &str) -> Mount {
        Mount::with(MountOptions {
            block_size: Some(bs.to_string()),
            ..MountOptions::default()
        })
    }

    pub fn with(opts: MountOptions) -> Mount {
        let dir = test_dir("mnt");
        let store = dir.path().join("store");
        let mnt = dir.path().join("mnt");
        fs::create_dir(&mnt).unwrap();
        let mut extra: Vec<&str> = Vec::new();
        if let Some(bs) = &opts.block_size {
            extra.push("--block-size");
            extra.push(bs);
        }
        mkfs(&store, &extra);
        let log = dir.path().join("daemon.log");
        let mut m = Mount {
            dir,
            store,
            mnt,
            log,
            opts,
            child: None,
            generation: 0,
        };
        m.start();
        m
    }

    /// The process id of the daemon serving the mount.
    pub fn daemon_pid(&self) -> u32 {
        self.child.as_ref().expect("no daemon running").id()
    }

    /// The temp dir that holds store, mountpoint and log (for scratch files
    /// outside the mount).
    pub fn scratch(&self) -> &Path {
        self.dir.path()
    }

    /// `MNT/rel`.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    /// Everything the daemons of this mount wrote to stderr.
    pub fn daemon_log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn is_mounted(&self) -> bool {
        thinfs_mounted_at(&self.mnt)
    }

    /// Starts `thinfs mount -f STORE MNT` and waits until the mount is live.
    fn start(&mut self) {
        assert!(self.child.is_none(), "daemon already running");
        self.generation += 1;
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        use std::io::Write;
        writeln!(&log, "=== daemon start #{} ===", self.generation).unwrap();
        let mut cmd = Command::new(thinfs_bin());
        cmd.arg("mount")
            .arg(&self.store)
            .arg(&self.mnt)
            .arg("-f")
            .args(&self.opts.mount_args)
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        // If the test process dies without dropping us, take the daemon along
        // instead of leaving an orphan serving a deleted temp dir.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = cmd.spawn().expect("spawn thinfs mount -f");
        let start = Instant::now();
        loop {
            if self.is_mounted() {
                break;
            }
            if let Some(st) = child.try_wait().unwrap() {
                panic!(
                    "thinfs mount -f {:?} {:?} exited ({st}) before the mount was live; log:\n{}",
                    self.store,
                    self.mnt,
                    self.daemon_log()
                );
            }
            if start.elapsed() > MOUNT_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                force_unmount(&self.mnt);
                panic!(
                    "mount at {:?} not live after {MOUNT_TIMEOUT:?}; log:\n{}",
                    self.mnt,
                    self.daemon_log()
                );
            }
            sleep(Duration::from_millis(20));
        }
        self.child = Some(child);
    }

    /// Unmounts cleanly (`umount MNT`, `umount -l` as a last resort) and returns
    /// the daemon's exit status.
    pub fn unmount(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("unmount: no daemon running");
        force_unmount(&self.mnt);
        let start = Instant::now();
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st;
            }
            if start.elapsed() > EXIT_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "daemon did not exit within {EXIT_TIMEOUT:?} after unmount; log:\n{}",
                    self.daemon_log()
                );
            }
            sleep(Duration::from_millis(20));
        }
    }

    /// Unmounts and asserts the daemon exited 0.
    pub fn unmount_ok(&mut self) {
        let st = self.unmount();
        assert!(
            st.success(),
            "daemon exited with {st} after a clean unmount; log:\n{}",
            self.daemon_log()
        );
    }

    /// SIGKILLs the daemon, then lazily detaches the dead mount.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("kill9: no daemon running");
        child.kill().expect("SIGKILL daemon");
        let st = child.wait().unwrap();
        assert_eq!(
            st.signal(),
            Some(libc::SIGKILL),
            "daemon was not killed: {st}"
        );
        let out = run_timeout(
            Command::new("umount").arg("-l").arg(&self.mnt),
            Duration::from_secs(60),
        );
        assert!(
            out.status.success() || mount_at(&self.mnt).is_none(),
            "umount -l after kill -9 failed: {}",
            describe(&out)
        );
        assert!(
            !self.is_mounted(),
            "mount still present after kill -9 + umount -l"
        );
    }

    /// Mounts the same store again with a new daemon. A live mount is first
    /// unmounted cleanly (asserting exit 0).
    pub fn remount(&mut self) {
        if self.child.is_some() {
            self.unmount_ok();
        }
        self.start();
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if self.child.is_some() {
            let st = self.unmount();
            if !std::thread::panicking() {
                assert!(
                    st.success(),
                    "daemon exited with {st} after unmount; log:\n{}",
                    self.daemon_log()
                );
            }
        }
        if mount_at(&self.mnt).is_some() {
            let _ = run_timeout(
                Command::new("umount").arg("-l").arg(&self.mnt),
                Duration::from_secs(60),
            );
        }
    }
}

// ---------------------------------------------------------------------------
// libc helpers
// ---------------------------------------------------------------------------

pub fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

pub fn cstr(s: &str) -> CString {
    CString::new(s).unwrap()
}

/// Turns a libc return value into `io::Result` (errno on -1).
pub fn cvt<T: Default + PartialOrd>(ret: T) -> io::Result<T> {
    if ret < T::default() {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Asserts `res` failed with `errno`.
#[track_caller]
pub fn assert_errno<T: std::fmt::Debug>(res: io::Result<T>, errno: i32, what: &str) {
    match res {
        Ok(v) => panic!(
            "{what}: expected {} but it succeeded ({v:?})",
            io::Error::from_raw_os_error(errno)
        ),
        Err(e) => assert_eq!(
            e.raw_os_error(),
            Some(errno),
            "{what}: expected {} but got {e}",
            io::Error::from_raw_os_error(errno)
        ),
    }
}

pub fn setxattr(p: &Path, name: &str, value: &[u8], flags: i32) -> io::Result<()> {
    let r = unsafe {
        libc::setxattr(
            cpath(p).as_ptr(),
            cstr(name).as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    };
    cvt(r).map(|_| ())
}

pub fn lsetxattr(p: &Path, name: &str, value: &[u8], flags: i32) -> io::Result<()> {
    let r = unsafe {
        libc::lsetxattr(
            cpath(p).as_ptr(),
            cstr(name).as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    };
    cvt(r).map(|_| ())
}

pub fn getxattr(p: &Path, name: &str) -> io::Result<Vec<u8>> {
    let (cp, cn) = (cpath(p), cstr(name));
    let size = cvt(unsafe { libc::getxattr(cp.as_ptr(), cn.as_ptr(), std::ptr::null_mut(), 0) })?;
    let mut buf = vec![0u8; size as usize + 16];
    let n = cvt(unsafe {
        libc::getxattr(cp.as_ptr(), cn.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
    })?;
    assert_eq!(
        n, size,
        "getxattr size query disagrees with the value length"
    );
    buf.truncate(n as usize);
    Ok(buf)
}

pub fn lgetxattr(p: &Path, name: &str) -> io::Result<Vec<u8>> {
    let (cp, cn) = (cpath(p), cstr(name));
    let mut buf = vec![0u8; 64 * 1024];
    let n = cvt(unsafe {
        libc::lgetxattr(cp.as_ptr(), cn.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
    })?;
    buf.truncate(n as usize);
    Ok(buf)
}

/// Sorted xattr names of `p` (not following symlinks).
pub fn listxattr(p: &Path) -> io::Result<Vec<String>> {
    let cp = cpath(p);
    let size = cvt(unsafe { libc::llistxattr(cp.as_ptr(), std::ptr::null_mut(), 0) })?;
    let mut buf = vec![0u8; size as usize + 16];
    let n = cvt(unsafe { libc::llistxattr(cp.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) })?;
    assert_eq!(
        n, size,
        "listxattr size query disagrees with the list length"
    );
    buf.truncate(n as usize);
    let mut names: Vec<String> = buf
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect();
    names.sort();
    Ok(names)
}

pub fn removexattr(p: &Path, name: &str) -> io::Result<()> {
    cvt(unsafe { libc::removexattr(cpath(p).as_ptr(), cstr(name).as_ptr()) }).map(|_| ())
}

pub fn fallocate(f: &File, mode: i32, off: u64, len: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    cvt(unsafe { libc::fallocate(f.as_raw_fd(), mode, off as i64, len as i64) }).map(|_| ())
}

pub fn lseek(f: &File, off: u64, whence: i32) -> io::Result<u64> {
    use std::os::fd::AsRawFd;
    cvt(unsafe { libc::lseek(f.as_raw_fd(), off as i64, whence) }).map(|v| v as u64)
}

/// One `copy_file_range` call; returns the count the kernel reports.
pub fn copy_file_range(
    src: &File,
    off_in: u64,
    dst: &File,
    off_out: u64,
    len: usize,
) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    let mut i = off_in as i64;
    let mut o = off_out as i64;
    let r =
        unsafe { libc::copy_file_range(src.as_raw_fd(), &mut i, dst.as_raw_fd(), &mut o, len, 0) };
    cvt(r).map(|v| v as usize)
}

// ---------------------------------------------------------------------------
// Data
// ---------------------------------------------------------------------------

/// splitmix64: deterministic, seedable, fast; good enough to defeat dedup.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        let v = self.next_u64().to_le_bytes();
        let n = rest.len();
        rest.copy_from_slice(&v[..n]);
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.fill(&mut v);
        v
    }
}

/// Index of the first differing byte, for readable assertion messages.
pub fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter()
        .zip(b.iter())
        .position(|(x, y)| x != y)
        .or(if a.len() != b.len() {
            Some(a.len().min(b.len()))
        } else {
            None
        })
}

#[track_caller]
pub fn assert_same_bytes(actual: &[u8], expected: &[u8], what: &str) {
    if let Some(i) = first_diff(actual, expected) {
        panic!(
            "{what}: content differs at byte {i} (actual len {}, expected len {}; actual byte {:?}, expected byte {:?})",
            actual.len(),
            expected.len(),
            actual.get(i),
            expected.get(i)
        );
    }
}

/// Reads exactly `len` bytes at `off` (short reads only at EOF).
pub fn read_at(f: &File, off: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; len];
    let mut done = 0;
    while done < len {
        let n = f
            .read_at(&mut buf[done..], off + done as u64)
            .expect("pread");
        if n == 0 {
            break;
        }
        done += n;
    }
    buf.truncate(done);
    buf
}

/// A heap buffer aligned for O_DIRECT.
pub struct AlignedBuf {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl AlignedBuf {
    pub fn new(len: usize, align: usize) -> AlignedBuf {
        let layout = std::alloc::Layout::from_size_align(len, align).unwrap();
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null());
        AlignedBuf { ptr, layout }
    }

    pub fn as_slice(&self) -> &[u8] {
        unsafe { std::slice::from_raw_parts(self.ptr, self.layout.size()) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

// ---------------------------------------------------------------------------
// Trees
// ---------------------------------------------------------------------------

/// What [`tree_snapshot`] records for one entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeEntry {
    pub kind: char,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime: (i64, i64),
    pub content: Option<Vec<u8>>,
    pub link_target: Option<PathBuf>,
    pub xattrs: BTreeMap<String, Vec<u8>>,
}

/// Options for [`tree_snapshot`]: which fields a comparison cares about.
#[derive(Debug, Clone, Copy)]
pub struct SnapOpts {
    pub mtimes: bool,
    pub dir_mtimes: bool,
    pub owners: bool,
    pub xattrs: bool,
}

/// Every entry below `root` (relative path → metadata and content).
pub fn tree_snapshot(root: &Path, o: SnapOpts) -> BTreeMap<PathBuf, TreeEntry> {
    fn walk(root: &Path, dir: &Path, o: SnapOpts, out: &mut BTreeMap<PathBuf, TreeEntry>) {
        let mut names: Vec<_> = fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("read_dir {dir:?}: {e}"))
            .map(|e| e.unwrap().path())
            .collect();
        names.sort();
        for p in names {
            let md = fs::symlink_metadata(&p).unwrap();
            let ft = md.file_type();
            use std::os::unix::fs::FileTypeExt;
            let kind = if ft.is_dir() {
                'd'
            } else if ft.is_symlink() {
                'l'
            } else if ft.is_fifo() {
                'p'
            } else if ft.is_file() {
                'f'
            } else {
                '?'
            };
            let mut xattrs = BTreeMap::new();
            if o.xattrs && kind != 'l' {
                for n in listxattr(&p).unwrap() {
                    if n.starts_with("user.") {
                        xattrs.insert(n.clone(), lgetxattr(&p, &n).unwrap());
                    }
                }
            }
            let e = TreeEntry {
                kind,
                mode: md.mode(),
                uid: if o.owners { md.uid() } else { 0 },
                gid: if o.owners { md.gid() } else { 0 },
                size: if kind == 'd' { 0 } else { md.len() },
                mtime: if (o.mtimes && kind != 'd' && kind != 'l') || (o.dir_mtimes && kind == 'd')
                {
                    (md.mtime(), md.mtime_nsec())
                } else {
                    (0, 0)
                },
                content: (kind == 'f').then(|| fs::read(&p).unwrap()),
                link_target: (kind == 'l').then(|| fs::read_link(&p).unwrap()),
                xattrs,
            };
            out.insert(p.strip_prefix(root).unwrap().to_path_buf(), e);
            if kind == 'd' {
                walk(root, &p, o, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, o, &mut out);
    out
}

#[track_caller]
pub fn assert_trees_equal(a: &Path, b: &Path, o: SnapOpts) {
    let sa = tree_snapshot(a, o);
    let sb = tree_snapshot(b, o);
    let ka: Vec<_> = sa.keys().collect();
    let kb: Vec<_> = sb.keys().collect();
    assert_eq!(ka, kb, "trees {a:?} and {b:?} list different entries");
    for (k, ea) in &sa {
        let eb = &sb[k];
        if ea != eb {
            let mut ea2 = ea.clone();
            let mut eb2 = eb.clone();
            ea2.content = None;
            eb2.content = None;
            panic!(
                "entry {k:?} differs between {a:?} and {b:?} (content equal: {}):\n{ea2:?}\n{eb2:?}",
                ea.content == eb.content
            );
        }
    }
}

/// A small tree with the shapes datastores meet: nested dirs, empty, small,
/// unaligned and sparse files, modes, symlinks, hard links, user xattrs.
pub fn make_sample_tree(root: &Path, seed: u64) {
    use std::os::unix::fs::symlink;
    let mut rng = Rng::new(seed);
    fs::create_dir_all(root.join("a/b/c")).unwrap();
    fs::create_dir_all(root.join("empty-dir")).unwrap();
    fs::write(root.join("empty"), b"").unwrap();
    fs::write(root.join("small.txt"), b"hello thinfs\n").unwrap();
    fs::write(root.join("a/odd.bin"), rng.bytes(100_003)).unwrap();
    fs::write(root.join("a/b/one-mib.bin"), rng.bytes(MIB as usize)).unwrap();
    fs::write(root.join("a/b/c/deep.txt"), b"deep\n").unwrap();
    for i in 0..20 {
        fs::write(root.join(format!("a/many-{i:02}")), rng.bytes(i * 777)).unwrap();
    }
    {
        use std::os::unix::fs::FileExt;
        let f = File::create(root.join("sparse.img")).unwrap();
        f.set_len(32 * MIB).unwrap();
        f.write_all_at(&rng.bytes(64 * 1024), 8 * MIB).unwrap();
        f.write_all_at(&rng.bytes(5000), 20 * MIB + 123).unwrap();
    }
    fs::set_permissions(root.join("small.txt"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::set_permissions(root.join("a/odd.bin"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(root.join("a/b"), fs::Permissions::from_mode(0o750)).unwrap();
    symlink("a/b/c/deep.txt", root.join("link-rel")).unwrap();
    symlink("/nonexistent/target", root.join("link-dangling")).unwrap();
    symlink("b", root.join("a/link-dir")).unwrap();
    fs::hard_link(root.join("a/odd.bin"), root.join("hard-odd.bin")).unwrap();
    setxattr(&root.join("small.txt"), "user.color", b"blue", 0).unwrap();
    setxattr(&root.join("a"), "user.dir-attr", b"\x00\x01binary\xff", 0).unwrap();
}

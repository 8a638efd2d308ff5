//! Mount setup: option parsing, the daemon's start-up handshake and signal handling.
//!
//! `thinfs mount` (without `-f`) re-executes itself with `-f` in a new session and waits
//! on a pipe: the child writes one byte once the kernel mount is live, or exits with an
//! error that the parent passes on. So `mount -t fuse.thinfs` and fstab see a failure as
//! a failure, and the mount exists when the command returns. Once live, the daemon's
//! stderr goes to `thinfs.log` in the store.

use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use fuser::{Config, SessionACL};

use crate::fs::{Datastore, OpenOptions};

/// Environment variable carrying the readiness pipe's fd to the daemon.
const READY_FD: &str = "THINFS_READY_FD";

/// Parsed `-o` options: mount(2) flags and the kernel's FUSE options.
#[derive(Debug)]
pub struct MountOpts {
    pub acl: SessionACL,
    pub flags: libc::c_ulong,
    /// `snapdir=NAME`: the snapshot directory's name for this mount.
    pub snapdir: Option<String>,
    /// `snapdir_visible`: list it in the root (needed to NFS-export snapshot directories).
    pub snapdir_visible: bool,
    /// `gc_interval=SECS`: background GC period (0 turns it off).
    pub gc_interval: u64,
    /// `gc_rate=BYTES`: background GC compaction I/O limit per second.
    pub gc_rate: Option<u64>,
    /// `meta_cache=BYTES`: the metadata store's cache.
    pub meta_cache: Option<u64>,
}

impl Default for MountOpts {
    fn default() -> Self {
        MountOpts {
            acl: SessionACL::Owner,
            flags: libc::MS_NOSUID | libc::MS_NODEV,
            snapdir: None,
            snapdir_visible: false,
            gc_interval: 600,
            gc_rate: Some(64 << 20),
            meta_cache: None,
        }
    }
}

/// Parses `-o a,b,c` lists as mount(8) and mount.fuse3 pass them.
pub fn parse_options(lists: &[String]) -> Result<MountOpts> {
    let mut o = MountOpts::default();
    for opt in lists
        .iter()
        .flat_map(|l| l.split(','))
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        let (key, value) = opt.split_once('=').unwrap_or((opt, ""));
        match key {
            "snapdir" => o.snapdir = Some(value.to_string()),
            "snapdir_visible" => o.snapdir_visible = true,
            "gc_interval" => {
                o.gc_interval = value
                    .parse()
                    .with_context(|| format!("gc_interval={value}: seconds expected"))?
            }
            "gc_rate" => {
                o.gc_rate = Some(crate::config::parse_size(value).map_err(anyhow::Error::msg)?)
            }
            "meta_cache" => {
                let bytes = crate::config::parse_size(value).map_err(anyhow::Error::msg)?;
                if !(8 << 20..=64 << 30).contains(&bytes) {
                    bail!("meta_cache={value}: between 8M and 64G expected");
                }
                o.meta_cache = Some(bytes)
            }
            "allow_other" => o.acl = SessionACL::All,
            "allow_root" => o.acl = SessionACL::RootAndOwner,
            "ro" => o.flags |= libc::MS_RDONLY,
            "rw" => o.flags &= !libc::MS_RDONLY,
            "dev" => o.flags &= !libc::MS_NODEV,
            "nodev" => o.flags |= libc::MS_NODEV,
            "suid" => o.flags &= !libc::MS_NOSUID,
            "nosuid" => o.flags |= libc::MS_NOSUID,
            "exec" => o.flags &= !libc::MS_NOEXEC,
            "noexec" => o.flags |= libc::MS_NOEXEC,
            "atime" => o.flags &= !libc::MS_NOATIME,
            "noatime" => o.flags |= libc::MS_NOATIME,
            "sync" => o.flags |= libc::MS_SYNCHRONOUS,
            "async" => o.flags &= !libc::MS_SYNCHRONOUS,
            "dirsync" => o.flags |= libc::MS_DIRSYNC,
            // Always on, or meaningful only to mount(8), fstab and systemd.
            "default_permissions"
            | "defaults"
            | "auto"
            | "noauto"
            | "user"
            | "users"
            | "nouser"
            | "nofail"
            | "_netdev"
            | "relatime"
            | "strictatime"
            | "lazytime"
            | "fsname"
            | "subtype" => {}
            k if k.starts_with("x-") || k.starts_with("comment") => {}
            other => bail!("unknown mount option `{other}`"),
        }
    }
    Ok(o)
}

/// `thinfs mount`: mounts and serves until unmounted.
pub fn run(
    store: &Path,
    mountpoint: &Path,
    foreground: bool,
    options: &[String],
    threads: usize,
) -> Result<()> {
    let opts = parse_options(options)?;
    let store =
        std::fs::canonicalize(store).with_context(|| format!("store {}", store.display()))?;
    crate::config::StoreConfig::load(&store)?;
    let meta = std::fs::metadata(mountpoint)
        .with_context(|| format!("mountpoint {} does not exist", mountpoint.display()))?;
    if !meta.is_dir() {
        bail!("mountpoint {} is not a directory", mountpoint.display());
    }
    let mountpoint = std::fs::canonicalize(mountpoint)?;
    if crate::control::mounts()
        .iter()
        .any(|m| m.mountpoint == mountpoint)
    {
        bail!(
            "{} is already a thinfs mountpoint (busy)",
            mountpoint.display()
        );
    }
    if !foreground && std::env::var_os(READY_FD).is_none() {
        return spawn_daemon();
    }
    serve(&store, &mountpoint, opts, threads)
}

/// Re-executes this command with `-f` in the background and waits until it is mounted.
fn spawn_daemon() -> Result<()> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two fds we then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        bail!("pipe: {}", std::io::Error::last_os_error());
    }
    // SAFETY: fresh fds from pipe2, owned once each.
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let exe = std::env::current_exe().context("finding the thinfs executable")?;
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    args.push("--foreground".into());
    let write_raw = fds[1];
    let mut cmd = std::process::Command::new(exe);
    cmd.args(&args)
        .env(READY_FD, write_raw.to_string())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null());
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            libc::setsid();
            // Keep the readiness pipe open across exec.
            let flags = libc::fcntl(write_raw, libc::F_GETFD);
            libc::fcntl(write_raw, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("starting the thinfs daemon")?;
    drop(write_end);
    let mut buf = [0u8; 1];
    let mut reader = std::fs::File::from(read_end);
    match reader.read(&mut buf) {
        Ok(1) => Ok(()),
        _ => {
            let status = child.wait()?;
            std::process::exit(status.code().unwrap_or(1).max(1));
        }
    }
}

/// Mounts /dev/fuse at `mountpoint` with mount(2) as type `fuse.thinfs`, so that
/// /proc/mounts and `findmnt -t fuse.thinfs` show it with the store as its source.
fn kernel_mount(store: &Path, mountpoint: &Path, opts: &MountOpts) -> Result<OwnedFd> {
    use std::ffi::CString;
    use std::os::fd::AsRawFd;
    use std::os::unix::ffi::OsStrExt;
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .context("opening /dev/fuse")?;
    let fd: OwnedFd = dev.into();
    let mode = std::fs::metadata(mountpoint)?.permissions();
    use std::os::unix::fs::PermissionsExt;
    // SAFETY: getuid/getgid have no preconditions.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let mut data = format!(
        "fd={},rootmode={:o},user_id={uid},group_id={gid},default_permissions",
        fd.as_raw_fd(),
        mode.mode() & libc::S_IFMT
    );
    if opts.acl != SessionACL::Owner {
        data.push_str(",allow_other");
    }
    let c = |b: &[u8]| CString::new(b).map_err(|_| anyhow::anyhow!("path contains a NUL byte"));
    let source = c(store.as_os_str().as_bytes())?;
    let target = c(mountpoint.as_os_str().as_bytes())?;
    let fstype = c(b"fuse.thinfs")?;
    let data = c(data.as_bytes())?;
    // SAFETY: all pointers are valid NUL-terminated strings for the call's duration.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            opts.flags,
            data.as_ptr().cast(),
        )
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        bail!("cannot mount at {}: {e}", mountpoint.display());
    }
    Ok(fd)
}

/// Detaches the mount (the session then ends and everything is flushed).
fn unmount(mountpoint: &Path) {
    use std::os::unix::ffi::OsStrExt;
    if let Ok(target) = std::ffi::CString::new(mountpoint.as_os_str().as_bytes()) {
        // SAFETY: a valid NUL-terminated path.
        if unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) } != 0 {
            tracing::error!(
                "unmounting {}: {}",
                mountpoint.display(),
                std::io::Error::last_os_error()
            );
        }
    }
}

/// Opens the store, mounts, signals readiness and serves until unmounted.
fn serve(store: &Path, mountpoint: &Path, opts: MountOpts, threads: usize) -> Result<()> {
    block_signals();
    raise_open_file_limit();
    let ds = Datastore::open(
        store,
        &OpenOptions {
            snapshot_dir: opts.snapdir.clone(),
            snapshot_dir_visible: opts.snapdir_visible,
            meta_cache: opts.meta_cache,
            ..Default::default()
        },
    )?;
    let fs = crate::fuse::ThinFuse::new(ds.clone());
    let slot = fs.notifier_slot();
    let notifier = slot.clone();
    let invalidate: crate::control::Invalidator = Arc::new(move |parent, name| {
        use std::os::unix::ffi::OsStrExt;
        // Nothing to invalidate before the session exists: the kernel has cached nothing.
        let Some(notifier) = notifier.get() else {
            return;
        };
        let done = if name.is_empty() {
            notifier.inval_inode(fuser::INodeNo(parent), 0, 0)
        } else {
            notifier.inval_entry(fuser::INodeNo(parent), std::ffi::OsStr::from_bytes(name))
        };
        if let Err(e) = done {
            if e.raw_os_error() != Some(libc::ENOENT) {
                tracing::debug!("kernel cache invalidation of {parent}: {e}");
            }
        }
    });
    // The control socket is up before the mount shows in the mount table, so that a
    // `thinfs stats MNT` right after the mount appears (`mount -f` has no readiness
    // signal) finds the daemon.
    crate::control::serve(ds.clone(), invalidate)?;
    let socket = store.join(crate::control::SOCKET);
    let fd = kernel_mount(store, mountpoint, &opts).inspect_err(|_| {
        let _ = std::fs::remove_file(&socket);
    })?;
    let mut config = Config::default();
    config.acl = opts.acl;
    config.n_threads = Some(threads.max(1));
    config.clone_fd = true;
    let session = match fuser::Session::from_fd(fs, fd, opts.acl, config) {
        Ok(s) => s,
        Err(e) => {
            unmount(mountpoint);
            let _ = std::fs::remove_file(&socket);
            return Err(e).with_context(|| format!("starting FUSE at {}", mountpoint.display()));
        }
    };
    let _ = slot.set(session.notifier());
    spawn_readahead_raise(mountpoint.to_path_buf());
    spawn_signal_thread(mountpoint.to_path_buf());
    spawn_background_gc(&ds, opts.gc_interval, opts.gc_rate);
    notify_ready(store);
    tracing::info!("mounted {} at {}", store.display(), mountpoint.display());
    let served = session.run();
    let flushed = ds.shutdown();
    let _ = std::fs::remove_file(&socket);
    served.context("serving FUSE requests")?;
    flushed.context("flushing at unmount")?;
    tracing::info!("unmounted {}", mountpoint.display());
    Ok(())
}

/// Raises the mount's readahead to the one negotiated in INIT. The kernel takes the
/// smaller of that and its bdi default (128 KiB), so a sequential reader had one or two
/// 128-256 KiB requests in flight; at 1 MiB a cold 4 GiB read ran ~790 -> ~1,000 MB/s.
/// On a thread: the mountpoint's device number is known once the session answers.
/// Unprivileged daemons cannot write sysfs and keep the default.
fn spawn_readahead_raise(mountpoint: PathBuf) {
    let raise = move || {
        use std::os::unix::fs::MetadataExt;
        let dev = std::fs::metadata(&mountpoint)?.dev();
        let path = format!(
            "/sys/class/bdi/{}:{}/read_ahead_kb",
            libc::major(dev),
            libc::minor(dev)
        );
        let want = crate::fuse::MAX_READAHEAD / 1024;
        let now: u32 = std::fs::read_to_string(&path)?.trim().parse().unwrap_or(0);
        if now < want {
            std::fs::write(&path, want.to_string())?;
        }
        std::io::Result::Ok(())
    };
    let spawned = std::thread::Builder::new()
        .name("thinfs-readahead".into())
        .spawn(move || {
            if let Err(e) = raise() {
                tracing::debug!("readahead left at the kernel's default: {e}");
            }
        });
    if let Err(e) = spawned {
        tracing::debug!("readahead left at the kernel's default: {e}");
    }
}

/// Raises the soft limit on open files to the hard one: the chunk store keeps up to two
/// handles open per 64 MiB pack it has read (about 1,000 at 32 GiB), and a soft limit of
/// 1024, common by default, would fail reads of a larger store with EMFILE.
fn raise_open_file_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid rlimit for the kernel to fill and then read.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                tracing::warn!("could not raise the open-file limit to {}", lim.rlim_max);
            }
        }
    }
}

/// Tells a waiting parent that the mount is live, and moves stderr to the store's log.
fn notify_ready(store: &Path) {
    let Some(fd) = std::env::var_os(READY_FD).and_then(|v| v.to_str()?.parse::<i32>().ok()) else {
        return;
    };
    // SAFETY: the fd was passed to us by the parent for this one write.
    let mut pipe = unsafe { std::fs::File::from_raw_fd(fd) };
    let log = store.join("thinfs.log");
    if let Ok(f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
    {
        use std::os::fd::AsRawFd;
        // SAFETY: dup2 onto stderr; both fds are valid.
        unsafe { libc::dup2(f.as_raw_fd(), 2) };
    }
    let _ = pipe.write_all(b"1");
}

/// Collects garbage every `interval` seconds at a bounded pace, on one thread.
fn spawn_background_gc(ds: &Arc<Datastore>, interval: u64, rate: Option<u64>) {
    if interval == 0 {
        return;
    }
    let weak = Arc::downgrade(ds);
    let _ = std::thread::Builder::new()
        .name("thinfs-gc".into())
        .spawn(move || loop {
            for _ in 0..interval {
                std::thread::sleep(std::time::Duration::from_secs(1));
                if weak.strong_count() == 0 {
                    return;
                }
            }
            let Some(ds) = weak.upgrade() else { return };
            let opts = crate::gc::GcOptions {
                max_bytes_per_sec: rate,
                ..Default::default()
            };
            match crate::gc::collect(&ds, &opts, &|_| {}) {
                Ok(r) if r.bytes_freed > 0 => {
                    tracing::info!("background gc freed {} bytes", r.bytes_freed)
                }
                Ok(_) => {}
                Err(crate::error::FsError::Busy(_)) => {}
                Err(e) => tracing::warn!("background gc: {e}"),
            }
        });
}

fn signal_set() -> libc::sigset_t {
    // SAFETY: sigset manipulation on a local set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGHUP);
        set
    }
}

/// Blocks SIGTERM/SIGINT/SIGHUP in this thread and every thread started after.
fn block_signals() {
    let set = signal_set();
    // SAFETY: set is a valid signal set.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
}

/// Unmounts (which ends the session, flushing everything) when a signal arrives.
fn spawn_signal_thread(mountpoint: PathBuf) {
    let _ = std::thread::Builder::new()
        .name("thinfs-signals".into())
        .spawn(move || {
            let set = signal_set();
            let mut sig = 0;
            // SAFETY: waits on a valid, blocked set.
            unsafe { libc::sigwait(&set, &mut sig) };
            tracing::info!("signal {sig}: unmounting {}", mountpoint.display());
            unmount(&mountpoint);
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_helper_options() {
        let o = parse_options(&[
            "rw,allow_other,dev,suid".into(),
            "noatime,x-systemd.automount".into(),
        ])
        .unwrap();
        assert_eq!(o.acl, SessionACL::All);
        assert!(o.flags & libc::MS_NOATIME != 0);
        assert!(o.flags & libc::MS_NODEV == 0, "dev was asked for");
        assert!(parse_options(&["bogus".into()]).is_err());
        assert_eq!(o.meta_cache, None);
        let o = parse_options(&["meta_cache=256M".into()]).unwrap();
        assert_eq!(o.meta_cache, Some(256 << 20));
        for bad in ["meta_cache=1M", "meta_cache=lots", "meta_cache=100G"] {
            let e = parse_options(&[bad.into()]).unwrap_err().to_string();
            assert!(e.contains("meta_cache") || e.contains("size"), "{bad}: {e}");
        }
    }
}

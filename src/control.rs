//! The control channel between the CLI and a running daemon.
//!
//! The daemon listens on a Unix socket `control.sock` in the store directory (mode 0600:
//! only root and the mounting user may clone or read statistics). The CLI finds the store
//! of a path through /proc/self/mountinfo (a thinfs mount's source is its store path),
//! connects, sends one JSON request line and reads one JSON reply line. Paths in requests
//! are relative to the mount root, as bytes, and are resolved by the daemon in its own
//! namespace, so a clone never depends on the kernel's caches.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::{FsError, Result};
use crate::fs::Datastore;

/// File name of the control socket inside a store.
pub const SOCKET: &str = "control.sock";

/// A request from the CLI.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Stats,
    Clone {
        src: Vec<u8>,
        dst: Vec<u8>,
        force: bool,
    },
    Du {
        paths: Vec<Vec<u8>>,
    },
    SnapshotCreate {
        name: String,
    },
    SnapshotList,
    SnapshotDelete {
        name: String,
    },
    SnapshotRollback {
        name: String,
        force: bool,
    },
    Gc {
        compact_threshold: Option<f64>,
        max_bytes_per_sec: Option<u64>,
    },
    Scrub {
        max_bytes_per_sec: Option<u64>,
    },
}

/// A progress line the daemon streams before its reply to long requests.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Progress {
    pub progress: String,
    pub done: u64,
    pub total: u64,
}

/// The daemon's answer: a JSON value, or an error with its errno.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(default)]
    pub value: serde_json::Value,
    #[serde(default)]
    pub error: String,
    #[serde(default)]
    pub errno: i32,
}

/// Tells the kernel to forget a cached name (`parent`, `name`), or, with an empty name,
/// everything cached about inode `parent`. Set by the FUSE mount.
pub type Invalidator = Arc<dyn Fn(u64, &[u8]) + Send + Sync>;

/// Answers one request against the datastore, invalidating kernel caches of what it
/// replaced and reporting progress of long requests through `progress`.
pub fn handle_streaming(
    ds: &Datastore,
    req: Request,
    invalidate: &dyn Fn(u64, &[u8]),
    progress: &dyn Fn(Progress),
) -> Result<serde_json::Value> {
    match req {
        Request::Gc {
            compact_threshold,
            max_bytes_per_sec,
        } => {
            let mut opts = crate::gc::GcOptions::default();
            if let Some(t) = compact_threshold {
                opts.compact_threshold = t;
            }
            opts.max_bytes_per_sec = max_bytes_per_sec;
            let report = crate::gc::collect(ds, &opts, &|p| {
                progress(Progress {
                    progress: format!("{:?}", p.phase).to_lowercase(),
                    done: p.done,
                    total: p.total,
                })
            })?;
            Ok(json(&report))
        }
        Request::Scrub { max_bytes_per_sec } => {
            let opts = crate::scrub::ScrubOptions { max_bytes_per_sec };
            let report = crate::scrub::scrub(ds, &opts, &|done, total| {
                progress(Progress {
                    progress: "verify".into(),
                    done,
                    total,
                })
            })?;
            Ok(json(&report))
        }
        Request::Stats => Ok(json(&ds.stats()?)),
        Request::Clone { src, dst, force } => {
            let (view, src_ino) = ds.resolve_view(&src)?;
            let (parent, name) = ds.resolve_parent(&dst)?;
            let attr = ds.clone_from(view, src_ino, parent, name, force)?;
            invalidate(parent.0, name);
            Ok(serde_json::json!({ "ino": attr.ino.0 }))
        }
        Request::Du { paths } => {
            let mut inos = Vec::new();
            for p in &paths {
                inos.push(ds.resolve(p)?);
            }
            Ok(json(&ds.du(&inos)?))
        }
        Request::SnapshotCreate { name } => {
            let rec = ds.snapshot_create(&name)?;
            // A cached negative or old entry for this name must not hide the new tree.
            invalidate(crate::fs::snapshot::SNAPDIR_ID, name.as_bytes());
            Ok(json(&rec))
        }
        Request::SnapshotList => Ok(json(&ds.snapshot_list()?)),
        Request::SnapshotDelete { name } => {
            ds.snapshot_delete(&name)?;
            invalidate(crate::fs::snapshot::SNAPDIR_ID, name.as_bytes());
            Ok(serde_json::Value::Null)
        }
        Request::SnapshotRollback { name, force } => {
            let touched = ds.snapshot_rollback(&name, force)?;
            for (parent, name) in touched {
                invalidate(parent.0, &name);
            }
            Ok(serde_json::Value::Null)
        }
    }
}

fn json<T: Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).unwrap_or(serde_json::Value::Null)
}

/// Starts serving the control socket of `ds` on a background thread.
pub fn serve(ds: Arc<Datastore>, invalidate: Invalidator) -> Result<PathBuf> {
    let path = ds.path().join(SOCKET);
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)
        .map_err(|e| FsError::io(format!("binding {}", path.display()), e))?;
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
    }
    let weak = Arc::downgrade(&ds);
    drop(ds);
    std::thread::Builder::new()
        .name("thinfs-control".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let Some(ds) = weak.upgrade() else { return };
                let invalidate = invalidate.clone();
                let _ = std::thread::Builder::new()
                    .name("thinfs-control-conn".into())
                    .spawn(move || {
                        if let Err(e) = answer(&ds, conn, &*invalidate) {
                            tracing::warn!("control connection: {e}");
                        }
                    });
            }
        })
        .map_err(|e| FsError::io("starting the control thread", e))?;
    Ok(path)
}

fn answer(
    ds: &Datastore,
    conn: UnixStream,
    invalidate: &dyn Fn(u64, &[u8]),
) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let progress_conn = std::sync::Mutex::new(conn.try_clone()?);
    let last = std::sync::Mutex::new(std::time::Instant::now());
    let progress = |p: Progress| {
        // At most ten lines a second; a client that went away just stops getting them.
        let mut last = last.lock().unwrap_or_else(|e| e.into_inner());
        if last.elapsed() < std::time::Duration::from_millis(100) && p.done < p.total {
            return;
        }
        *last = std::time::Instant::now();
        if let Ok(mut out) = serde_json::to_vec(&p) {
            out.push(b'\n');
            let _ = progress_conn
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .write_all(&out);
        }
    };
    let reply = match serde_json::from_str::<Request>(&line) {
        Err(e) => Reply {
            ok: false,
            value: serde_json::Value::Null,
            error: format!("bad request: {e}"),
            errno: libc::EINVAL,
        },
        Ok(req) => match handle_streaming(ds, req, invalidate, &progress) {
            Ok(value) => Reply {
                ok: true,
                value,
                error: String::new(),
                errno: 0,
            },
            Err(e) => Reply {
                ok: false,
                value: serde_json::Value::Null,
                error: e.to_string(),
                errno: e.errno(),
            },
        },
    };
    let mut out = serde_json::to_vec(&reply).unwrap_or_default();
    out.push(b'\n');
    let mut conn = conn;
    conn.write_all(&out)
}

/// Sends a request to the daemon serving `store`.
pub fn call(store: &Path, req: &Request) -> std::result::Result<Reply, String> {
    call_with_progress(store, req, &|_| {})
}

/// Like [`call`], passing the daemon's progress lines to `progress`.
pub fn call_with_progress(
    store: &Path,
    req: &Request,
    progress: &dyn Fn(Progress),
) -> std::result::Result<Reply, String> {
    let path = store.join(SOCKET);
    let mut conn = UnixStream::connect(&path).map_err(|e| {
        format!(
            "cannot reach the thinfs daemon of {} at {}: {e}",
            store.display(),
            path.display()
        )
    })?;
    let mut line = serde_json::to_vec(req).map_err(|e| e.to_string())?;
    line.push(b'\n');
    conn.write_all(&line)
        .map_err(|e| format!("sending to {}: {e}", path.display()))?;
    let mut reader = BufReader::new(conn);
    loop {
        let mut reply = String::new();
        let n = reader
            .read_line(&mut reply)
            .map_err(|e| format!("reading from {}: {e}", path.display()))?;
        if n == 0 {
            return Err(format!(
                "the daemon at {} closed the connection without a reply",
                path.display()
            ));
        }
        if let Ok(p) = serde_json::from_str::<Progress>(&reply) {
            progress(p);
            continue;
        }
        return serde_json::from_str(&reply)
            .map_err(|e| format!("bad reply from {}: {e}", path.display()));
    }
}

/// A thinfs mount found in /proc/self/mountinfo.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountInfo {
    pub mountpoint: PathBuf,
    pub store: PathBuf,
}

fn unescape(s: &str) -> String {
    let mut out = String::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v as char);
            i += 4;
        } else {
            out.push(b[i] as char);
            i += 1;
        }
    }
    out
}

/// Every thinfs mount of this mount namespace.
pub fn mounts() -> Vec<MountInfo> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut out = Vec::new();
    for line in text.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let l: Vec<&str> = left.split(' ').collect();
        let r: Vec<&str> = right.split(' ').collect();
        if l.len() < 5 || r.len() < 2 || r[0] != "fuse.thinfs" {
            continue;
        }
        out.push(MountInfo {
            mountpoint: PathBuf::from(unescape(l[4])),
            store: PathBuf::from(unescape(r[1])),
        });
    }
    out
}

/// The thinfs mount holding `path` (which must exist) and the path relative to its root.
pub fn mount_of(path: &Path) -> std::result::Result<(MountInfo, PathBuf), String> {
    let abs = std::fs::canonicalize(path).map_err(|e| format!("{}: {e}", path.display()))?;
    mounts()
        .into_iter()
        .filter(|m| abs.starts_with(&m.mountpoint))
        .max_by_key(|m| m.mountpoint.as_os_str().len())
        .map(|m| {
            let rel = abs
                .strip_prefix(&m.mountpoint)
                .map(Path::to_path_buf)
                .unwrap_or_default();
            (m, rel)
        })
        .ok_or_else(|| format!("{} is not inside a mounted thinfs", path.display()))
}

/// Like [`mount_of`] for a path that need not exist yet (its parent must).
pub fn mount_of_new(path: &Path) -> std::result::Result<(MountInfo, PathBuf), String> {
    let name = path
        .file_name()
        .ok_or_else(|| format!("{}: no file name", path.display()))?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let (m, rel) = mount_of(&parent)?;
    Ok((m, rel.join(name)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape("/mnt/a\\040b"), "/mnt/a b");
        assert_eq!(unescape("/plain"), "/plain");
    }

    #[test]
    fn requests_roundtrip() {
        let r = Request::Clone {
            src: b"a".to_vec(),
            dst: b"b".to_vec(),
            force: false,
        };
        let s = serde_json::to_string(&r).unwrap();
        assert!(s.contains("\"op\":\"clone\""), "{s}");
        let back: Request = serde_json::from_str(&s).unwrap();
        assert!(matches!(back, Request::Clone { force: false, .. }));
    }
}

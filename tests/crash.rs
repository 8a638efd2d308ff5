//! Crash safety under load: SIGKILL the daemon at random moments while writers write and
//! fsync, clones, snapshots and GC run; after every remount each fsync-acknowledged byte
//! must be there, every file and clone must read without error, and fsck must be clean.
//!
//! `CRASH_KILLS` sets the number of kills (CI: 5; scripts/crash.sh: 25); `CRASH_SEED`
//! replays a run.

#![allow(dead_code)]

#[path = "integration/common.rs"]
mod common;

use std::fs::{self, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{describe, thinfs, Mount};

const FILE_SPAN: u64 = 8 << 20;
const WRITERS: usize = 3;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// What a writer knows about its file: the bytes fsync acknowledged, and the range of a
/// write that was in flight when the daemon died (unknown until read back).
struct Model {
    bytes: Vec<u8>,
    len: u64,
    inflight: Option<(u64, u64)>,
}

fn pattern(writer: usize, seq: u64, len: usize) -> Vec<u8> {
    let mut r = Rng((writer as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (seq + 1));
    (0..len).map(|_| r.next() as u8).collect()
}

fn writer(path: PathBuf, w: usize, model: Arc<Mutex<Model>>, stop: Arc<AtomicBool>, seed: u64) {
    let mut rng = Rng(seed | 1);
    let Ok(mut f) = OpenOptions::new().read(true).write(true).open(&path) else {
        return;
    };
    let mut seq = 0u64;
    while !stop.load(Ordering::SeqCst) {
        seq += 1;
        let len = if rng.below(4) == 0 {
            1 + rng.below(65536)
        } else {
            4096 * (1 + rng.below(16))
        };
        let off = if rng.below(2) == 0 {
            rng.below(FILE_SPAN - len)
        } else {
            rng.below((FILE_SPAN - len) / 4096) * 4096
        };
        let data = pattern(w, seq, len as usize);
        model.lock().unwrap().inflight = Some((off, len));
        if f.write_all_at(&data, off).is_err() || f.sync_all().is_err() {
            return; // the daemon died mid-write: the range stays unknown
        }
        let mut m = model.lock().unwrap();
        let end = (off + len) as usize;
        if m.bytes.len() < end {
            m.bytes.resize(end, 0);
        }
        m.bytes[off as usize..end].copy_from_slice(&data);
        m.len = m.len.max(off + len);
        m.inflight = None;
    }
    let _ = f.seek(SeekFrom::End(0));
}

fn check(m: &Mount, models: &[Arc<Mutex<Model>>]) {
    for (w, model) in models.iter().enumerate() {
        let path = m.path(&format!("w{w}"));
        let mut actual = Vec::new();
        fs::File::open(&path)
            .and_then(|mut f| f.read_to_end(&mut actual))
            .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        let mut md = model.lock().unwrap();
        assert!(
            actual.len() as u64 >= md.len,
            "w{w}: {} bytes after crash, {} acknowledged",
            actual.len(),
            md.len
        );
        let skip = md.inflight;
        for (i, (&want, &got)) in md.bytes.iter().zip(actual.iter()).enumerate() {
            let i = i as u64;
            if let Some((o, l)) = skip {
                if i >= o && i < o + l {
                    continue;
                }
            }
            assert_eq!(
                got, want,
                "w{w}: fsync-acknowledged byte at offset {i} lost after kill -9"
            );
        }
        // Adopt what the crash left in the unknown range.
        let n = actual.len();
        md.bytes = actual;
        md.len = n as u64;
        md.inflight = None;
    }
    // Every other file (clones) reads without error.
    for e in fs::read_dir(&m.mnt).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() {
            fs::read(&p).unwrap_or_else(|e| panic!("reading {} after crash: {e}", p.display()));
        }
    }
}

#[test]
fn sigkill_under_load_keeps_every_fsynced_byte() {
    let kills: usize = std::env::var("CRASH_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let seed: u64 = std::env::var("CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(7)
        });
    eprintln!("crash test: {kills} kills, CRASH_SEED={seed}");
    let mut rng = Rng(seed | 1);
    let mut m = Mount::new();
    let models: Vec<Arc<Mutex<Model>>> = (0..WRITERS)
        .map(|w| {
            fs::write(m.path(&format!("w{w}")), b"").unwrap();
            Arc::new(Mutex::new(Model {
                bytes: Vec::new(),
                len: 0,
                inflight: None,
            }))
        })
        .collect();
    for round in 0..kills {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for (w, model) in models.iter().enumerate() {
            let (p, model, stop, s) = (
                m.path(&format!("w{w}")),
                model.clone(),
                stop.clone(),
                rng.next(),
            );
            threads.push(std::thread::spawn(move || writer(p, w, model, stop, s)));
        }
        let churner = {
            let stop = stop.clone();
            let s = rng.next();
            // The churn thread only runs CLI commands against paths.
            let mnt = m.mnt.clone();
            std::thread::spawn(move || {
                let shadow = ShadowMount { mnt };
                shadow.churn(round, stop, s)
            })
        };
        std::thread::sleep(Duration::from_millis(300 + rng.below(1500)));
        m.kill9();
        stop.store(true, Ordering::SeqCst);
        for t in threads {
            t.join().unwrap();
        }
        churner.join().unwrap();
        m.remount();
        check(&m, &models);
        let st = m.unmount();
        assert!(st.success(), "clean unmount after recovery: {st}");
        let out = thinfs(["fsck", m.store.to_str().unwrap(), "--json"]);
        assert!(
            out.status.success(),
            "fsck after kill {round}: {}",
            describe(&out)
        );
        m.remount();
        eprintln!("kill {}/{kills}: ok", round + 1);
    }
}

/// The paths the churn thread needs (the `Mount` itself stays with the test thread).
struct ShadowMount {
    mnt: PathBuf,
}

impl ShadowMount {
    fn churn(&self, round: usize, stop: Arc<AtomicBool>, seed: u64) {
        let mut rng = Rng(seed | 1);
        let mut k = 0;
        let mnt = self.mnt.to_str().unwrap().to_string();
        while !stop.load(Ordering::SeqCst) {
            k += 1;
            let w = rng.below(WRITERS as u64);
            let src = format!("{mnt}/w{w}");
            let _ = match rng.below(3) {
                0 => thinfs(["clone", src.as_str(), &format!("{mnt}/clone-{round}-{k}")]),
                1 => thinfs([
                    "snapshot",
                    "create",
                    &format!("s{round}-{k}"),
                    "--mount",
                    mnt.as_str(),
                ]),
                _ => thinfs(["gc", "--mount", mnt.as_str(), "--json"]),
            };
            std::thread::sleep(Duration::from_millis(20 + rng.below(80)));
        }
    }
}

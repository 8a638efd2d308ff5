//! The fast paths under concurrency, through the mount: 8 threads writing and reading
//! shared and private files (unaligned ranges that share blocks, large writes that go
//! through the pre-store pipeline, truncates, fsyncs), compared byte for byte with a
//! model; a write through one descriptor seen at once by a read through another; cold
//! sequential reads of files whose blocks interleave in the packs.

use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Barrier};

use super::common::*;

const THREADS: u64 = 8;

/// A shared file split into stripes; thread `t` owns the stripes `s` with
/// `s % THREADS == t`, so writers never touch the same byte but do share blocks.
struct Shared {
    path: PathBuf,
    stripe: u64,
    len: u64,
}

impl Shared {
    /// A random range inside one of `t`'s stripes.
    fn owned_range(&self, t: u64, rng: &mut Rng, max_len: u64) -> (u64, u64) {
        let stripes = self.len / self.stripe;
        let k = rng.below(stripes / THREADS);
        let s = k * THREADS + t;
        let start = s * self.stripe + rng.below(self.stripe);
        let end_max = (s + 1) * self.stripe;
        let len = 1 + rng.below((end_max - start).min(max_len));
        (start, len)
    }
}

#[test]
fn eight_threads_shared_and_private_files_match_a_model() {
    let m = Mount::new();
    // A: small unaligned stripes (every 16 KiB block has several writers).
    // B: stripes of 1 MiB + 7 bytes written in large pieces (the pre-store pipeline).
    let shared = Arc::new(vec![
        Shared {
            path: m.path("a.img"),
            stripe: 4099,
            len: 4099 * 8 * 400,
        },
        Shared {
            path: m.path("b.img"),
            stripe: MIB + 7,
            len: (MIB + 7) * 8 * 6,
        },
    ]);
    for s in shared.iter() {
        open_rw(&s.path).set_len(s.len).unwrap();
    }
    let start = Arc::new(Barrier::new(THREADS as usize));
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let (shared, start, root) = (shared.clone(), start.clone(), m.mnt.clone());
            std::thread::spawn(move || {
                let mut rng = Rng::new(7000 + t);
                let files: Vec<File> = shared.iter().map(|s| open_rw(&s.path)).collect();
                // This thread's view of the shared files (only its stripes matter).
                let mut mirrors: Vec<Vec<u8>> =
                    shared.iter().map(|s| vec![0u8; s.len as usize]).collect();
                let private_path = root.join(format!("private-{t}"));
                let private = open_rw(&private_path);
                let mut model: Vec<u8> = Vec::new();
                start.wait();
                for step in 0..400 {
                    match rng.below(10) {
                        0..=2 => {
                            let (i, max) = (0, 3 * 4099);
                            let (off, len) = shared[i].owned_range(t, &mut rng, max);
                            let data = rng.bytes(len as usize);
                            files[i].write_all_at(&data, off).unwrap();
                            mirrors[i][off as usize..(off + len) as usize].copy_from_slice(&data);
                        }
                        3 => {
                            let (off, len) = shared[1].owned_range(t, &mut rng, 3 * MIB);
                            let data = rng.bytes(len as usize);
                            files[1].write_all_at(&data, off).unwrap();
                            mirrors[1][off as usize..(off + len) as usize].copy_from_slice(&data);
                        }
                        4 | 5 => {
                            // Read back one of this thread's ranges of a shared file.
                            let i = rng.below(2) as usize;
                            let (off, len) = shared[i].owned_range(t, &mut rng, 64 * KIB);
                            let mut buf = vec![0u8; len as usize];
                            files[i].read_exact_at(&mut buf, off).unwrap();
                            assert_same_bytes(
                                &buf,
                                &mirrors[i][off as usize..(off + len) as usize],
                                &format!("thread {t} step {step}: {:?} at {off}", shared[i].path),
                            );
                        }
                        6 | 7 => {
                            let off = rng.below(24 * MIB);
                            let len = 1 + rng.below(2 * MIB);
                            let data = rng.bytes(len as usize);
                            private.write_all_at(&data, off).unwrap();
                            let end = (off + len) as usize;
                            if model.len() < end {
                                model.resize(end, 0);
                            }
                            model[off as usize..end].copy_from_slice(&data);
                        }
                        8 => {
                            let size = rng.below(model.len() as u64 + MIB);
                            private.set_len(size).unwrap();
                            model.resize(size as usize, 0);
                        }
                        _ => {
                            if rng.below(2) == 0 {
                                private.sync_all().unwrap();
                            } else {
                                files[rng.below(2) as usize].sync_data().unwrap();
                            }
                            let got = fs::read(&private_path).unwrap();
                            assert_same_bytes(
                                &got,
                                &model,
                                &format!("thread {t} step {step}: private file"),
                            );
                        }
                    }
                }
                (mirrors, model)
            })
        })
        .collect();
    let mut expected: Vec<Vec<u8>> = shared.iter().map(|s| vec![0u8; s.len as usize]).collect();
    for (t, h) in handles.into_iter().enumerate() {
        let (mirrors, model) = h.join().expect("writer thread panicked");
        let t = t as u64;
        for (i, s) in shared.iter().enumerate() {
            let mut st = t;
            while st * s.stripe < s.len {
                let (a, b) = ((st * s.stripe) as usize, ((st + 1) * s.stripe) as usize);
                expected[i][a..b].copy_from_slice(&mirrors[i][a..b]);
                st += THREADS;
            }
        }
        let got = fs::read(m.path(&format!("private-{t}"))).unwrap();
        assert_same_bytes(&got, &model, &format!("private-{t} after all threads"));
    }
    for (i, s) in shared.iter().enumerate() {
        assert_same_bytes(
            &fs::read(&s.path).unwrap(),
            &expected[i],
            &format!("{:?}", s.path),
        );
    }
    // And after the daemon flushed everything and came back.
    let mut m = m;
    m.remount();
    for (i, s) in shared.iter().enumerate() {
        assert_same_bytes(
            &fs::read(&s.path).unwrap(),
            &expected[i],
            &format!("{:?} after remount", s.path),
        );
    }
}

#[test]
fn a_write_through_one_fd_is_read_at_once_through_another() {
    let m = Mount::new();
    let p = m.path("disk.raw");
    let writer = open_rw(&p);
    writer.set_len(8 * MIB).unwrap();
    let reader = File::open(&p).unwrap();
    // Warm the reader's page cache, so a stale cached page would show.
    let mut whole = vec![0u8; 8 * MIB as usize];
    reader.read_exact_at(&mut whole, 0).unwrap();
    let mut rng = Rng::new(99);
    let mut model = vec![0u8; 8 * MIB as usize];
    for step in 0..300 {
        let off = rng.below(8 * MIB - 1);
        let len = 1 + rng.below((256 * KIB).min(8 * MIB - off));
        let data = rng.bytes(len as usize);
        writer.write_all_at(&data, off).unwrap();
        model[off as usize..(off + len) as usize].copy_from_slice(&data);
        // The written range and its neighbourhood, through the other descriptor.
        let a = off.saturating_sub(5000);
        let b = (off + len + 5000).min(8 * MIB);
        let mut buf = vec![0u8; (b - a) as usize];
        reader.read_exact_at(&mut buf, a).unwrap();
        assert_same_bytes(
            &buf,
            &model[a as usize..b as usize],
            &format!("step {step}: read via the second fd after a write at {off}+{len}"),
        );
        // And through a descriptor opened now.
        if step % 50 == 0 {
            assert_same_bytes(
                &fs::read(&p).unwrap(),
                &model,
                &format!("step {step}: fresh open"),
            );
        }
    }
}

/// Sequential reads take whole runs of a pack and guess where the next request starts
/// (`ChunkStore::get_many`): files whose blocks interleave in the packs, a clone sharing
/// some of them and patched in the middle, all read back cold in 1 MiB requests after a
/// remount, match the model. And the mount raised its readahead to 1 MiB.
#[test]
fn cold_sequential_reads_of_interleaved_and_cloned_files_match() {
    let mut m = Mount::new();
    let (a, b, c) = (m.path("a.img"), m.path("b.img"), m.path("c.img"));
    let (fa, fb) = (open_rw(&a), open_rw(&b));
    let mut rng = Rng::new(7);
    let len = 6 * MIB;
    let (mut ma, mut mb) = (rng.bytes(len as usize), rng.bytes(len as usize));
    // 64 KiB at a time, alternately: the two files' blocks interleave in the pack.
    for off in (0..len).step_by(64 * KIB as usize) {
        let r = off as usize..(off + 64 * KIB) as usize;
        fa.write_all_at(&ma[r.clone()], off).unwrap();
        fb.write_all_at(&mb[r], off).unwrap();
    }
    fa.sync_all().unwrap();
    fb.sync_all().unwrap();
    let fc = open_rw(&c);
    assert_eq!(
        copy_file_range(&fa, 0, &fc, 0, len as usize).unwrap(),
        len as usize
    );
    let mut mc = ma.clone();
    for _ in 0..20 {
        let off = rng.below(len - 40_000);
        let n = 1 + rng.below(40_000) as usize;
        let data = rng.bytes(n);
        fc.write_all_at(&data, off).unwrap();
        mc[off as usize..off as usize + data.len()].copy_from_slice(&data);
    }
    // And rewrite a stretch of `a` in the middle, in order.
    let patch = rng.bytes(MIB as usize);
    fa.write_all_at(&patch, 2 * MIB).unwrap();
    ma[2 * MIB as usize..3 * MIB as usize].copy_from_slice(&patch);
    mb.truncate(len as usize - 1000);
    fb.set_len(len - 1000).unwrap();
    drop((fa, fb, fc));
    m.remount();
    let ra = fs::metadata(&m.mnt).map(|md| {
        use std::os::unix::fs::MetadataExt;
        let dev = md.dev();
        format!(
            "/sys/class/bdi/{}:{}/read_ahead_kb",
            libc::major(dev),
            libc::minor(dev)
        )
    });
    for (path, model) in [(&a, &ma), (&b, &mb), (&c, &mc)] {
        let f = File::open(path).unwrap();
        let mut got = Vec::new();
        let mut buf = vec![0u8; MIB as usize];
        let mut off = 0;
        loop {
            let n = f.read_at(&mut buf, off).unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
            off += n as u64;
        }
        assert_same_bytes(&got, model, &format!("cold sequential read of {path:?}"));
    }
    let ra = ra.unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let kb = fs::read_to_string(&ra).unwrap();
        if kb.trim().parse::<u32>().unwrap() >= 1024 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{ra}: {kb}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// The daemon keeps a handle open per pack it reads (two for packs read both ways), so
/// it raises its soft open-file limit to the hard one: started with a soft limit of 512,
/// it runs with the hard limit.
#[test]
fn daemon_raises_its_soft_open_file_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
    let hard = lim.rlim_max;
    assert!(hard > 512, "hard open-file limit {hard}: nothing to raise");
    // Inherited by the daemon this test starts (nextest runs each test in its own process).
    lim.rlim_cur = 512;
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) }, 0);
    let m = Mount::new();
    let limits = fs::read_to_string(format!("/proc/{}/limits", m.daemon_pid())).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let soft: Vec<&str> = line.split_whitespace().skip(3).take(2).collect();
    let want = if hard == libc::RLIM_INFINITY {
        "unlimited".to_string()
    } else {
        hard.to_string()
    };
    assert_eq!(soft, [want.as_str(), want.as_str()], "{line}");
}

//! The fast paths under concurrency, through the mount: 8 threads writing and reading
//! shared and private files (unaligned ranges that share blocks, large writes that go
//! through the pre-store pipeline, truncates, fsyncs), compared byte for byte with a
//! model; and a write through one descriptor seen at once by a read through another.

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

//! QEMU on a real thinfs mount: qemu-img (create, info, check, convert,
//! compare, map) on raw and qcow2, copy offload (`qemu-img convert -C`) as a
//! thin copy, holes seen as holes, qcow2 backing chains, qemu-io with
//! `-t none` (O_DIRECT) and `-t writeback` verified by pattern, discard reaching
//! the file as a punched hole, flush, and QEMU's image locking.
//!
//! Needs root, /dev/fuse and qemu-utils (scripts/test.sh installs it); strace
//! is installed here when missing. Nothing skips: a missing tool fails.

#![allow(dead_code)]

#[path = "integration/common.rs"]
mod common;

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::thread::sleep;
use std::time::{Duration, Instant};

use common::*;

/// qemu-utils and strace, installed with apt-get if missing.
fn ensure_tools() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        if have("qemu-img") && have("qemu-io") && have("strace") {
            return;
        }
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open("/run/thinfs-test-apt.lock")
            .unwrap();
        unsafe {
            use std::os::fd::AsRawFd;
            libc::flock(lock.as_raw_fd(), libc::LOCK_EX);
        }
        let mut pkgs = Vec::new();
        if !have("qemu-img") || !have("qemu-io") {
            pkgs.push("qemu-utils");
        }
        if !have("strace") {
            pkgs.push("strace");
        }
        if pkgs.is_empty() {
            return;
        }
        let script = format!(
            "export DEBIAN_FRONTEND=noninteractive; \
             apt-get -o Acquire::Retries=3 -o DPkg::Lock::Timeout=600 update -qq && \
             apt-get -o Acquire::Retries=3 -o DPkg::Lock::Timeout=600 install -y -qq \
               --no-install-recommends {}",
            pkgs.join(" ")
        );
        let out = run_timeout(
            Command::new("sh").arg("-c").arg(script),
            Duration::from_secs(900),
        );
        assert!(
            out.status.success(),
            "installing {pkgs:?} failed: {}",
            describe(&out)
        );
    });
}

fn mount() -> Mount {
    ensure_tools();
    Mount::new()
}

/// Runs a QEMU tool; panics (with the daemon log) unless it exits 0 and
/// printed no "failed" (qemu-io reports a failed pattern check that way).
#[track_caller]
fn q(m: &Mount, args: &[&str]) -> Output {
    let (cmd, rest) = args.split_first().unwrap();
    let out = run_timeout(Command::new(cmd).args(rest), CMD_TIMEOUT);
    let all = format!("{}{}", stdout_str(&out), stderr_str(&out));
    if !out.status.success() || all.contains("failed") || all.contains("Failed") {
        panic!(
            "{args:?} failed: {}\n--- thinfs daemon log ---\n{}",
            describe(&out),
            m.daemon_log()
        );
    }
    out
}

fn p(m: &Mount, rel: &str) -> String {
    m.path(rel).to_str().unwrap().to_string()
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", describe(out)))
}

/// Data ranges [start, end) of `qemu-img map --output=json`, merged.
fn map_data_ranges(m: &Mount, fmt: &str, img: &str) -> Vec<(u64, u64)> {
    let v = json(&q(m, &["qemu-img", "map", "-f", fmt, "--output=json", img]));
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut covered = 0u64;
    for e in v.as_array().expect("map JSON is an array") {
        let start = e["start"].as_u64().unwrap();
        let len = e["length"].as_u64().unwrap();
        assert_eq!(start, covered, "map entries not contiguous: {v}");
        covered = start + len;
        if e["data"].as_bool().unwrap() {
            match out.last_mut() {
                Some(last) if last.1 == start => last.1 = start + len,
                _ => out.push((start, start + len)),
            }
        }
    }
    out
}

/// Writes random bytes at each (offset, len) of a file on the FUSE side.
fn write_regions(path: &Path, size: u64, regions: &[(u64, u64)], seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .unwrap();
    f.set_len(size).unwrap();
    let mut model = vec![0u8; size as usize];
    for &(off, len) in regions {
        let buf = rng.bytes(len as usize);
        f.write_all_at(&buf, off).unwrap();
        model[off as usize..(off + len) as usize].copy_from_slice(&buf);
    }
    f.sync_all().unwrap();
    model
}

// ---------------------------------------------------------------------------

/// create, info, check, convert (both ways), compare, map on raw and qcow2
/// images that live in the mount.
#[test]
fn qemu_img_raw_and_qcow2() {
    let m = mount();
    let raw = p(&m, "vm/disk.raw");
    let qc = p(&m, "vm/disk.qcow2");
    fs::create_dir(m.path("vm")).unwrap();

    q(&m, &["qemu-img", "create", "-f", "raw", &raw, "64M"]);
    q(&m, &["qemu-img", "create", "-f", "qcow2", &qc, "1G"]);
    let info = json(&q(&m, &["qemu-img", "info", "--output=json", &qc]));
    assert_eq!(info["format"], "qcow2", "{info}");
    assert_eq!(info["virtual-size"].as_u64(), Some(1 << 30), "{info}");
    let info = json(&q(
        &m,
        &["qemu-img", "info", "-f", "raw", "--output=json", &raw],
    ));
    assert_eq!(info["virtual-size"].as_u64(), Some(64 << 20), "{info}");
    assert_eq!(fs::metadata(m.path("vm/disk.raw")).unwrap().blocks(), 0);

    // Guest-like data through qemu-io into both.
    for (fmt, img) in [("raw", &raw), ("qcow2", &qc)] {
        q(
            &m,
            &[
                "qemu-io",
                "-f",
                fmt,
                "-c",
                "write -P 0x11 0 1M",
                "-c",
                "write -P 0x22 5M 300k",
                "-c",
                "write -P 0x33 33M 7k",
                "-c",
                "write -z 5M 4k",
                img,
            ],
        );
    }
    q(&m, &["qemu-img", "check", "-f", "qcow2", &qc]);
    let chk = json(&q(
        &m,
        &["qemu-img", "check", "-f", "qcow2", "--output=json", &qc],
    ));
    assert_eq!(chk["corruptions"].as_u64().unwrap_or(0), 0, "{chk}");
    assert_eq!(chk["leaks"].as_u64().unwrap_or(0), 0, "{chk}");

    // raw 64M vs qcow2 1G: compare the first 64M via a resized copy.
    q(
        &m,
        &["qemu-img", "resize", "-f", "qcow2", "--shrink", &qc, "64M"],
    );
    q(
        &m,
        &["qemu-img", "compare", "-f", "raw", "-F", "qcow2", &raw, &qc],
    );

    // convert both ways, then compare and check again.
    let raw2 = p(&m, "vm/from-qcow2.raw");
    let qc2 = p(&m, "vm/from-raw.qcow2");
    q(
        &m,
        &[
            "qemu-img", "convert", "-f", "qcow2", "-O", "raw", &qc, &raw2,
        ],
    );
    q(
        &m,
        &[
            "qemu-img", "convert", "-f", "raw", "-O", "qcow2", &raw, &qc2,
        ],
    );
    q(
        &m,
        &["qemu-img", "compare", "-f", "raw", "-F", "raw", &raw, &raw2],
    );
    q(
        &m,
        &[
            "qemu-img", "compare", "-f", "raw", "-F", "qcow2", &raw, &qc2,
        ],
    );
    q(&m, &["qemu-img", "check", "-f", "qcow2", &qc2]);
    assert_eq!(
        fs::read(m.path("vm/disk.raw")).unwrap(),
        fs::read(m.path("vm/from-qcow2.raw")).unwrap()
    );
    // A changed byte is noticed by compare (exit 1).
    let f = OpenOptions::new().write(true).open(&raw2).unwrap();
    f.write_all_at(b"X", 40 << 20).unwrap();
    drop(f);
    let out = run_timeout(
        Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw", &raw, &raw2]),
        CMD_TIMEOUT,
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "compare of differing images: {}",
        describe(&out)
    );

    // The converted raw keeps holes where the guest never wrote.
    let ranges = map_data_ranges(&m, "raw", &raw2);
    let data: u64 = ranges.iter().map(|r| r.1 - r.0).sum();
    assert!(data < 4 << 20, "converted raw lost its holes: {ranges:?}");
    // qcow2 map: allocated clusters only where written.
    let v = json(&q(
        &m,
        &["qemu-img", "map", "-f", "qcow2", "--output=json", &qc],
    ));
    let alloc: u64 = v
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"].as_bool() == Some(true))
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    assert!(
        ((1 << 20) + 300 * 1024..3 << 20).contains(&alloc),
        "qcow2 data mapping: {v}"
    );
}

/// `qemu-img map` reports holes as holes: SEEK_DATA/SEEK_HOLE are exact to the
/// block (16 KiB here), so data ranges are exactly the written blocks.
#[test]
fn qemu_img_map_reports_holes() {
    ensure_tools();
    let m = Mount::with_block_size("16K");
    let img = m.path("sparse.raw");
    let regions = [
        (1 << 20, 64 << 10),
        ((8 << 20) + (16 << 10), 32 << 10),
        ((20 << 20) - (16 << 10), 16 << 10),
        (13 << 20, 100), // partial block: the whole 16 KiB block is data
    ];
    write_regions(&img, 20 << 20, &regions, 1);
    let got = map_data_ranges(&m, "raw", img.to_str().unwrap());
    let want = vec![
        (1 << 20, (1 << 20) + (64 << 10)),
        ((8 << 20) + (16 << 10), (8 << 20) + (48 << 10)),
        (13 << 20, (13 << 20) + (16 << 10)),
        ((20 << 20) - (16 << 10), 20 << 20),
    ];
    assert_eq!(got, want, "qemu-img map data ranges");
    // After a punch the map shows the new hole.
    let f = OpenOptions::new().write(true).open(&img).unwrap();
    fallocate(
        &f,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        (1 << 20) + (16 << 10),
        16 << 10,
    )
    .unwrap();
    drop(f);
    let got = map_data_ranges(&m, "raw", img.to_str().unwrap());
    assert_eq!(got[0], (1 << 20, (1 << 20) + (16 << 10)), "{got:?}");
    assert_eq!(
        got[1],
        ((1 << 20) + (32 << 10), (1 << 20) + (64 << 10)),
        "{got:?}"
    );
}

/// `qemu-img convert -C -f raw -O raw` sends copy_file_range in 2 MiB pieces;
/// thinfs shares the blocks, so the copy is thin: stored bytes and pack bytes
/// do not grow by the image's data, and the copy is identical.
#[test]
fn qemu_img_convert_copy_offload_is_thin() {
    let m = mount();
    let src = m.path("golden.raw");
    // 24 MiB of random data spread over a 256 MiB image (holes between).
    let regions: Vec<(u64, u64)> = (0..12).map(|i| (i * (21 << 20) + 4096, 2 << 20)).collect();
    let data_bytes: u64 = regions.iter().map(|r| r.1).sum();
    let model = write_regions(&src, 256 << 20, &regions, 2);
    let before = stats(&m.mnt);

    let trace = m.scratch().join("convert.strace");
    let dst = p(&m, "clone.raw");
    q(
        &m,
        &[
            "strace",
            "-f",
            "-e",
            "trace=copy_file_range",
            "-o",
            trace.to_str().unwrap(),
            "qemu-img",
            "convert",
            "-C",
            "-f",
            "raw",
            "-O",
            "raw",
            src.to_str().unwrap(),
            &dst,
        ],
    );
    let after = stats(&m.mnt);

    // The copy went through copy_file_range, and every call succeeded.
    let text = fs::read_to_string(&trace).unwrap();
    let mut copied = 0u64;
    let mut calls = 0;
    for line in text.lines().filter(|l| l.contains("copy_file_range(")) {
        let ret = line
            .rsplit("= ")
            .next()
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap();
        let n: i64 = ret
            .parse()
            .unwrap_or_else(|_| panic!("copy_file_range failed: {line}"));
        assert!(n >= 0, "copy_file_range failed: {line}");
        copied += n as u64;
        calls += 1;
    }
    assert!(
        copied >= data_bytes,
        "copy_file_range copied {copied} bytes in {calls} calls, expected >= {data_bytes}:\n{text}"
    );

    q(
        &m,
        &[
            "qemu-img",
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            src.to_str().unwrap(),
            &dst,
        ],
    );
    assert_same_bytes(&fs::read(&dst).unwrap(), &model, "copy content");
    assert_eq!(fs::metadata(&dst).unwrap().len(), 256 << 20);
    let grew = after.stored_bytes.saturating_sub(before.stored_bytes);
    assert!(
        grew < data_bytes / 16,
        "stored bytes grew by {grew} for a copy of {data_bytes} data bytes: {before:?} -> {after:?}"
    );
    let packs_grew = after.pack_bytes.saturating_sub(before.pack_bytes);
    assert!(
        packs_grew < data_bytes / 16,
        "pack bytes grew by {packs_grew}: {before:?} -> {after:?}"
    );
    assert_eq!(
        after.allocated_bytes,
        2 * before.allocated_bytes,
        "the copy allocates the same blocks as the source (holes stay holes)"
    );
    // The copy is independent: writing it leaves the source alone.
    q(
        &m,
        &["qemu-io", "-f", "raw", "-c", "write -P 0x5a 4096 1M", &dst],
    );
    assert_same_bytes(
        &fs::read(&src).unwrap(),
        &model,
        "source after writing the copy",
    );
}

/// qcow2 overlay on the mount: writes land in the overlay, reads fall through
/// to the base, the base is unchanged.
#[test]
fn qcow2_overlay_on_mount() {
    let m = mount();
    let base = p(&m, "base.qcow2");
    let ov = p(&m, "ov.qcow2");
    q(&m, &["qemu-img", "create", "-f", "qcow2", &base, "256M"]);
    q(
        &m,
        &[
            "qemu-io",
            "-f",
            "qcow2",
            "-c",
            "write -P 0xb0 0 2M",
            "-c",
            "write -P 0xb1 10M 64k",
            &base,
        ],
    );
    let base_before = fs::read(&base).unwrap();
    q(
        &m,
        &[
            "qemu-img", "create", "-f", "qcow2", "-b", &base, "-F", "qcow2", &ov,
        ],
    );
    let info = json(&q(
        &m,
        &["qemu-img", "info", "--output=json", "--backing-chain", &ov],
    ));
    assert_eq!(
        info.as_array().map(|a| a.len()),
        Some(2),
        "backing chain: {info}"
    );
    for cache in ["none", "writeback"] {
        q(
            &m,
            &[
                "qemu-io",
                "-f",
                "qcow2",
                "-t",
                cache,
                "-c",
                "write -P 0xc0 1M 4k",
                "-c",
                "write -P 0xc1 20M 3000",
                "-c",
                "flush",
                "-c",
                "read -P 0xb0 0 1M",
                "-c",
                "read -P 0xc0 1M 4k",
                "-c",
                "read -P 0xb0 1052672 1044480",
                "-c",
                "read -P 0xb1 10M 64k",
                "-c",
                "read -P 0xc1 20M 3000",
                "-c",
                "read -P 0 30M 1M",
                &ov,
            ],
        );
    }
    // Fresh process: same view; the base alone still has its old data.
    q(
        &m,
        &[
            "qemu-io",
            "-r",
            "-f",
            "qcow2",
            "-c",
            "read -P 0xc0 1M 4k",
            "-c",
            "read -P 0xc1 20M 3000",
            &ov,
        ],
    );
    q(
        &m,
        &[
            "qemu-io",
            "-r",
            "-f",
            "qcow2",
            "-c",
            "read -P 0xb0 0 2M",
            "-c",
            "read -P 0 20M 3000",
            &base,
        ],
    );
    assert!(
        fs::read(&base).unwrap() == base_before,
        "the base image file changed while only the overlay was written"
    );
    q(&m, &["qemu-img", "check", "-f", "qcow2", &ov]);
    q(&m, &["qemu-img", "check", "-f", "qcow2", &base]);
    // Commit the overlay into the base: the base then has the new data.
    q(&m, &["qemu-img", "commit", "-f", "qcow2", &ov]);
    q(
        &m,
        &[
            "qemu-io",
            "-r",
            "-f",
            "qcow2",
            "-c",
            "read -P 0xc0 1M 4k",
            "-c",
            "read -P 0xc1 20M 3000",
            &base,
        ],
    );
}

/// Random aligned and unaligned writes through qemu-io with O_DIRECT and with
/// the page cache, verified by pattern in a fresh qemu-io and byte for byte on
/// the FUSE side.
#[test]
fn qemu_io_patterns_cache_none_and_writeback() {
    let m = mount();
    for (k, cache) in ["none", "writeback"].into_iter().enumerate() {
        let img = p(&m, &format!("img-{cache}.raw"));
        let size: u64 = 64 << 20;
        q(&m, &["qemu-img", "create", "-f", "raw", &img, "64M"]);
        let mut rng = Rng::new(100 + k as u64);
        let mut model = vec![0u8; size as usize];
        let mut writes = Vec::new();
        for i in 0..120u64 {
            let (off, len) = if i % 2 == 0 {
                // aligned to 4 KiB
                (
                    rng.below(size / 4096 - 64) * 4096,
                    (1 + rng.below(64)) * 4096,
                )
            } else {
                (rng.below(size - 300_000), 1 + rng.below(200_000))
            };
            let pat = (1 + i % 255) as u8;
            model[off as usize..(off + len) as usize].fill(pat);
            writes.push((off, len, pat));
        }
        let mut args: Vec<String> = vec![
            "qemu-io".into(),
            "-f".into(),
            "raw".into(),
            "-t".into(),
            cache.into(),
        ];
        for &(off, len, pat) in &writes {
            args.push("-c".into());
            args.push(format!("write -P {pat:#x} {off} {len}"));
        }
        args.push("-c".into());
        args.push("flush".into());
        args.push(img.clone());
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        q(&m, &refs);

        // Pattern reads in a fresh process, for every write still intact.
        let mut args: Vec<String> = vec![
            "qemu-io".into(),
            "-r".into(),
            "-f".into(),
            "raw".into(),
            "-t".into(),
            cache.into(),
        ];
        let mut checked = 0;
        for &(off, len, pat) in &writes {
            if model[off as usize..(off + len) as usize]
                .iter()
                .all(|&b| b == pat)
            {
                args.push("-c".into());
                args.push(format!("read -P {pat:#x} {off} {len}"));
                checked += 1;
            }
        }
        // And a range nobody wrote, if any.
        if let Some(z) = (0..size / 65536).find(|&b| {
            model[(b * 65536) as usize..((b + 1) * 65536) as usize]
                .iter()
                .all(|&x| x == 0)
        }) {
            args.push("-c".into());
            args.push(format!("read -P 0 {} 65536", z * 65536));
        }
        args.push(img.clone());
        assert!(checked > 60, "too few intact regions to check ({checked})");
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = q(&m, &refs);
        assert_eq!(
            stdout_str(&out).matches("read ").count(),
            args.iter().filter(|a| a.starts_with("read ")).count(),
            "not every read ran: {}",
            describe(&out)
        );
        assert_same_bytes(
            &fs::read(&img).unwrap(),
            &model,
            &format!("{cache}: file vs model"),
        );
    }
}

/// `discard` reaches the file as fallocate(PUNCH_HOLE) with discard=unmap
/// (`qemu-io -d unmap` and `--image-opts ... discard=unmap`): SEEK_HOLE finds
/// the hole, st_blocks drops, the range reads zeros.
#[test]
fn qemu_io_discard_punches_holes() {
    let m = mount();
    let img = p(&m, "trim.raw");
    q(&m, &["qemu-img", "create", "-f", "raw", &img, "8M"]);
    q(
        &m,
        &[
            "qemu-io",
            "-f",
            "raw",
            "-c",
            "write -P 0x77 0 8M",
            "-c",
            "flush",
            &img,
        ],
    );
    let blocks0 = fs::metadata(&img).unwrap().blocks();
    assert!(
        blocks0 * 512 >= 8 << 20,
        "st_blocks {blocks0} for 8 MiB of data"
    );

    q(
        &m,
        &[
            "qemu-io",
            "-f",
            "raw",
            "-t",
            "none",
            "-d",
            "unmap",
            "-c",
            "discard 1M 1M",
            "-c",
            "flush",
            &img,
        ],
    );
    let f = File::open(&img).unwrap();
    assert_eq!(
        lseek(&f, 0, libc::SEEK_HOLE).unwrap(),
        1 << 20,
        "SEEK_HOLE after discard"
    );
    assert_eq!(
        lseek(&f, 1 << 20, libc::SEEK_DATA).unwrap(),
        2 << 20,
        "SEEK_DATA after the hole"
    );
    let blocks1 = f.metadata().unwrap().blocks();
    assert!(
        blocks1 * 512 <= blocks0 * 512 - (1 << 20),
        "st_blocks did not drop by 1 MiB: {blocks0} -> {blocks1}"
    );

    let opts =
        format!("driver=raw,file.driver=file,file.filename={img},discard=unmap,cache.direct=on");
    q(
        &m,
        &[
            "qemu-io",
            "--image-opts",
            &opts,
            "-c",
            "discard 4M 2M",
            "-c",
            "flush",
        ],
    );
    assert_eq!(lseek(&f, 3 << 20, libc::SEEK_HOLE).unwrap(), 4 << 20);
    assert_eq!(lseek(&f, 4 << 20, libc::SEEK_DATA).unwrap(), 6 << 20);
    let blocks2 = f.metadata().unwrap().blocks();
    assert!(
        blocks2 * 512 <= blocks1 * 512 - (2 << 20),
        "{blocks1} -> {blocks2}"
    );

    q(
        &m,
        &[
            "qemu-io",
            "-r",
            "-f",
            "raw",
            "-c",
            "read -P 0x77 0 1M",
            "-c",
            "read -P 0 1M 1M",
            "-c",
            "read -P 0x77 2M 2M",
            "-c",
            "read -P 0 4M 2M",
            "-c",
            "read -P 0x77 6M 2M",
            &img,
        ],
    );
    let v = json(&q(
        &m,
        &["qemu-img", "map", "-f", "raw", "--output=json", &img],
    ));
    let holes: Vec<(u64, u64)> = v
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"].as_bool() == Some(false))
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        holes,
        vec![(1 << 20, 1 << 20), (4 << 20, 2 << 20)],
        "map holes: {v}"
    );
}

/// OFD lock ranges (start, end) on the file `path`, from /proc/locks. Lines
/// name the file as MAJOR:MINOR:INODE (hex device numbers); the device must be
/// matched too, since fresh stores of parallel tests reuse inode numbers.
fn ofd_locks(path: &Path) -> Vec<(u64, u64)> {
    let md = fs::metadata(path).unwrap();
    let dev = md.dev();
    let key = format!(
        "{:02x}:{:02x}:{}",
        libc::major(dev),
        libc::minor(dev),
        md.ino()
    );
    let mut out: Vec<(u64, u64)> = fs::read_to_string("/proc/locks")
        .unwrap()
        .lines()
        .filter(|l| l.contains("OFDLCK"))
        .filter_map(|l| {
            let t: Vec<&str> = l.split_whitespace().collect();
            let i = t.iter().position(|x| *x == key)?;
            Some((t.get(i + 1)?.parse().ok()?, t.get(i + 2)?.parse().ok()?))
        })
        .collect();
    out.sort();
    out
}

/// QEMU's lock bytes: 100 + perm = "I use perm", 200 + perm = "I do not share
/// perm" (perm 0 consistent read, 1 write, 3 resize).
fn holds_byte(locks: &[(u64, u64)], b: u64) -> bool {
    locks.iter().any(|&(s, e)| s <= b && b <= e)
}

/// Waits until the OFD locks on `path` cover byte `b`; panics if `child` exits.
fn wait_lock_byte(path: &Path, b: u64, child: &mut Child, log: &Path) {
    let start = Instant::now();
    while !holds_byte(&ofd_locks(path), b) {
        if let Some(st) = child.try_wait().unwrap() {
            panic!(
                "lock holder exited early ({st}): {}",
                fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "lock byte {b} never showed in /proc/locks:\n{}",
            fs::read_to_string("/proc/locks").unwrap()
        );
        sleep(Duration::from_millis(20));
    }
}

/// Kills a child on drop.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_logged(args: &[&str], log: &Path, stdin: Stdio) -> KillOnDrop {
    let logf = File::create(log).unwrap();
    let mut cmd = Command::new(args[0]);
    cmd.args(&args[1..])
        .stdin(stdin)
        .stdout(logf.try_clone().unwrap())
        .stderr(logf);
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    KillOnDrop(
        cmd.spawn()
            .unwrap_or_else(|e| panic!("spawn {args:?}: {e}")),
    )
}

/// QEMU image locking on the mount (OFD locks, enforced by the kernel):
///
/// 1. A writer that does not share "write" (as a running VM's disk, here the
///    source of a rate-limited `qemu-img convert`, which QEMU opens the same
///    way) makes a second `qemu-io` writer fail with `Failed to get "write"
///    lock`; once the holder is gone, the second writer succeeds.
/// 2. A `qemu-io` that holds the image open for writing (commands from a pipe
///    kept open) takes the "write" permission lock, so a consistent reader
///    that refuses to share write (`qemu-img convert` from it) fails with
///    `Failed to get shared "write" lock`. (qemu-io itself shares every
///    permission, so two qemu-io writers do not exclude each other, on ext4
///    exactly as here.)
#[test]
fn qemu_image_locking_refuses_second_writer() {
    let m = mount();
    let img = p(&m, "locked.raw");
    let imgp = PathBuf::from(&img);
    q(&m, &["qemu-img", "create", "-f", "raw", &img, "64M"]);
    q(
        &m,
        &["qemu-io", "-f", "raw", "-c", "write -P 0x11 0 64M", &img],
    );

    // 1. The holder unshares write: byte 201.
    let copy = p(&m, "copy.raw");
    let log = m.scratch().join("convert.log");
    let mut holder = spawn_logged(
        &[
            "qemu-img", "convert", "-r", "1M", "-f", "raw", "-O", "raw", &img, &copy,
        ],
        &log,
        Stdio::null(),
    );
    wait_lock_byte(&imgp, 201, &mut holder.0, &log);
    let out = run_timeout(
        Command::new("qemu-io").args(["-f", "raw", &img, "-c", "write 0 4k"]),
        CMD_TIMEOUT,
    );
    assert!(
        !out.status.success() && stderr_str(&out).contains("Failed to get \"write\" lock"),
        "second writer was not refused with a lock error while the image is held; locks {:?}: {}",
        ofd_locks(&imgp),
        describe(&out)
    );
    // A reader that shares (-U) still reads.
    q(
        &m,
        &[
            "qemu-io",
            "-U",
            "-r",
            "-f",
            "raw",
            "-c",
            "read -P 0x11 0 4k",
            &img,
        ],
    );
    drop(holder);
    let start = Instant::now();
    while !ofd_locks(&imgp).is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "locks left after the holder was killed: {:?}",
            ofd_locks(&imgp)
        );
        sleep(Duration::from_millis(20));
    }
    q(
        &m,
        &["qemu-io", "-f", "raw", "-c", "write -P 0x22 0 4k", &img],
    );

    // 2. A qemu-io holder fed from a pipe: it uses write (byte 101).
    let log = m.scratch().join("holder.log");
    let mut holder = spawn_logged(&["qemu-io", "-f", "raw", &img], &log, Stdio::piped());
    wait_lock_byte(&imgp, 101, &mut holder.0, &log);
    holder
        .0
        .stdin
        .as_mut()
        .unwrap()
        .write_all(b"write -P 0x42 0 4k\n")
        .unwrap();
    let out = run_timeout(
        Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "raw", &img, &copy]),
        CMD_TIMEOUT,
    );
    assert!(
        !out.status.success() && stderr_str(&out).contains("Failed to get shared \"write\" lock"),
        "a consistent reader was not refused while qemu-io writes; locks {:?}: {}",
        ofd_locks(&imgp),
        describe(&out)
    );
    // The holder quits: its write is there, and the locks are gone.
    holder
        .0
        .stdin
        .as_mut()
        .unwrap()
        .write_all(b"quit\n")
        .unwrap();
    drop(holder.0.stdin.take());
    let start = Instant::now();
    loop {
        if let Some(st) = holder.0.try_wait().unwrap() {
            assert!(
                st.success(),
                "holder: {st}: {}",
                fs::read_to_string(&log).unwrap()
            );
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "holder did not exit"
        );
        sleep(Duration::from_millis(50));
    }
    assert!(
        ofd_locks(&imgp).is_empty(),
        "locks left: {:?}",
        ofd_locks(&imgp)
    );
    q(
        &m,
        &[
            "qemu-io",
            "-r",
            "-f",
            "raw",
            "-c",
            "read -P 0x42 0 4k",
            &img,
        ],
    );
    q(
        &m,
        &["qemu-img", "convert", "-f", "raw", "-O", "raw", &img, &copy],
    );
}

/// The short version of `scripts/vm-boot.sh`: boots a real guest (TCG,
/// microvm, virtio-blk with cache=none and discard=unmap) from an ext4 image on
/// a thinfs mount, clones the image once with `thinfs clone`, boots the clone
/// (while it runs a second writer must be refused by QEMU's image locking), and
/// verifies on the host that each image holds exactly its own history. The
/// script fetches the kernel, busybox and qemu-system-x86 with apt-get download
/// (cached in /var/tmp/thinfs-vm).
#[test]
fn vm_boot_golden_and_one_clone() {
    ensure_tools();
    let work = test_dir("vmboot");
    let out = run_timeout(
        Command::new("bash")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/vm-boot.sh"))
            .args(["--clones", "1"])
            .env("THINFS", thinfs_bin())
            .env("WORK", work.path()),
        Duration::from_secs(540),
    );
    let text = format!("{}{}", stdout_str(&out), stderr_str(&out));
    assert!(
        out.status.success() && text.contains("== vm-boot summary"),
        "scripts/vm-boot.sh --clones 1 failed: {}",
        describe(&out)
    );
    for want in [
        "[verify] golden.raw: history 'golden-payload golden'",
        "[verify] clone1.raw: history 'golden-payload golden clone1'",
        "Failed to get \"write\" lock",
        "bytes trimmed",
    ] {
        assert!(
            text.contains(want),
            "vm-boot output lacks {want:?}:\n{text}"
        );
    }
    eprintln!("{text}");
}

/// Preallocation modes (raw: off/falloc/full, qcow2: off/metadata/falloc/full)
/// cost no space on thinfs (zeros are holes) and give working images; the
/// aio engines threads/native/io_uring with O_DIRECT; write-zeroes with and
/// without unmap leave holes that `qemu-img map` reports.
#[test]
fn qemu_preallocation_aio_engines_write_zeroes() {
    let m = mount();
    for pa in ["off", "falloc", "full"] {
        let img = p(&m, &format!("r-{pa}.raw"));
        q(
            &m,
            &[
                "qemu-img",
                "create",
                "-q",
                "-f",
                "raw",
                "-o",
                &format!("preallocation={pa}"),
                &img,
                "64M",
            ],
        );
        let md = fs::metadata(&img).unwrap();
        assert_eq!(md.len(), 64 << 20, "raw preallocation={pa}: size");
        assert_eq!(
            md.blocks(),
            0,
            "raw preallocation={pa}: zeros must cost nothing"
        );
    }
    for pa in ["off", "metadata", "falloc", "full"] {
        let img = p(&m, &format!("q-{pa}.qcow2"));
        q(
            &m,
            &[
                "qemu-img",
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                &format!("preallocation={pa}"),
                &img,
                "64M",
            ],
        );
        q(&m, &["qemu-img", "check", "-q", "-f", "qcow2", &img]);
        q(
            &m,
            &[
                "qemu-io",
                "-f",
                "qcow2",
                "-c",
                "write -P 3 1M 1M",
                "-c",
                "read -P 3 1M 1M",
                "-c",
                "read -P 0 8M 1M",
                &img,
            ],
        );
        assert!(
            fs::metadata(&img).unwrap().blocks() * 512 < 8 << 20,
            "qcow2 preallocation={pa} stored more than its metadata and 1 MiB of data"
        );
    }
    let img = p(&m, "r-off.raw");
    for aio in ["threads", "native", "io_uring"] {
        q(
            &m,
            &[
                "qemu-io",
                "-f",
                "raw",
                "-t",
                "none",
                "-i",
                aio,
                "-c",
                "write -P 0x71 12345 100000",
                "-c",
                "write -P 0x72 4096 65536",
                "-c",
                "read -P 0x72 4096 65536",
                "-c",
                "read -P 0x71 69632 42713",
                "-c",
                "flush",
                &img,
            ],
        );
    }
    let img = p(&m, "r-full.raw");
    q(
        &m,
        &[
            "qemu-io",
            "-f",
            "raw",
            "-c",
            "write -P 9 0 4M",
            "-c",
            "write -z -u 1M 1M",
            "-c",
            "write -z 2M 1M",
            "-c",
            "read -P 0 1M 2M",
            "-c",
            "read -P 9 0 1M",
            "-c",
            "read -P 9 3M 1M",
            &img,
        ],
    );
    let data = map_data_ranges(&m, "raw", &img);
    assert_eq!(
        data,
        vec![(0, 1 << 20), (3 << 20, 4 << 20)],
        "write-zeroes left data behind"
    );
}

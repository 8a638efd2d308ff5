//! The tools a datastore meets, end to end on a real mount: qemu-img (create,
//! convert, compare, check, info, map), cp, dd, cmp, rsync, tar, diff.

use std::fs::{self, File};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::process::Command;

use super::common::*;

fn qemu_img(args: &[&str], paths: &[&Path]) -> std::process::Output {
    let mut c = Command::new("qemu-img");
    c.args(args);
    for p in paths {
        c.arg(p);
    }
    run_ok(&mut c)
}

#[test]
fn qemu_img_create_check_info() {
    let m = Mount::with_block_size("16K");
    let q = m.path("disk.qcow2");
    let r = m.path("disk.raw");
    run_ok(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&q)
            .arg("10G"),
    );
    run_ok(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "raw"])
            .arg(&r)
            .arg("10G"),
    );
    qemu_img(&["check", "-q"], &[&q]);
    let info: serde_json::Value =
        serde_json::from_slice(&qemu_img(&["info", "--output=json"], &[&q]).stdout).unwrap();
    assert_eq!(info["format"], "qcow2");
    assert_eq!(info["virtual-size"], 10 * GIB);
    let info: serde_json::Value =
        serde_json::from_slice(&qemu_img(&["info", "--output=json"], &[&r]).stdout).unwrap();
    assert_eq!(info["format"], "raw");
    assert_eq!(info["virtual-size"], 10 * GIB);
    let md = fs::metadata(&r).unwrap();
    assert_eq!(md.len(), 10 * GIB);
    assert!(
        md.blocks() * 512 <= MIB,
        "a new 10 GiB raw image allocates {} bytes",
        md.blocks() * 512
    );
    // qemu-io writes into the qcow2 and reads back.
    run_ok(
        Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", "write -P 0xab 1M 3M"])
            .arg(&q),
    );
    let out = run_ok(
        Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", "read -P 0xab 1M 3M"])
            .arg(&q),
    );
    assert!(
        !stdout_str(&out).contains("Pattern verification failed"),
        "{}",
        describe(&out)
    );
    qemu_img(&["check", "-q"], &[&q]);
    // Resize grows the raw image.
    run_ok(
        Command::new("qemu-img")
            .args(["resize", "-q", "-f", "raw"])
            .arg(&r)
            .arg("12G"),
    );
    assert_eq!(fs::metadata(&r).unwrap().len(), 12 * GIB);
}

#[test]
fn qemu_img_convert_roundtrip_and_compare() {
    let m = Mount::with_block_size("16K");
    let raw = m.path("src.raw");
    run_ok(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "raw"])
            .arg(&raw)
            .arg("256M"),
    );
    let f = fs::OpenOptions::new().write(true).open(&raw).unwrap();
    let mut rng = Rng::new(50);
    for off in [0, 7 * MIB + 4096, 100 * MIB, 255 * MIB] {
        f.write_all_at(&rng.bytes(MIB as usize), off).unwrap();
    }
    drop(f);
    let q = m.path("mid.qcow2");
    let back = m.path("back.raw");
    qemu_img(&["convert", "-f", "raw", "-O", "qcow2"], &[&raw, &q]);
    qemu_img(&["check", "-q"], &[&q]);
    qemu_img(&["convert", "-f", "qcow2", "-O", "raw"], &[&q, &back]);
    qemu_img(&["compare", "-q"], &[&raw, &back]);
    qemu_img(&["compare", "-q", "-f", "raw", "-F", "qcow2"], &[&raw, &q]);
    run_ok(Command::new("cmp").arg(&raw).arg(&back));
    // The round trip stays sparse.
    let md = fs::metadata(&back).unwrap();
    assert_eq!(md.len(), 256 * MIB);
    assert!(
        md.blocks() * 512 <= 8 * MIB,
        "converted raw allocates {} bytes",
        md.blocks() * 512
    );
    // compare notices a difference.
    let g = fs::OpenOptions::new().write(true).open(&back).unwrap();
    g.write_all_at(b"!", 200 * MIB).unwrap();
    drop(g);
    let out = run_timeout(
        Command::new("qemu-img")
            .args(["compare", "-q"])
            .arg(&raw)
            .arg(&back),
        CMD_TIMEOUT,
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "qemu-img compare missed a change: {}",
        describe(&out)
    );
}

#[derive(Debug, PartialEq)]
struct Extent {
    start: u64,
    length: u64,
    data: bool,
}

fn qemu_map(p: &Path) -> Vec<Extent> {
    let out = qemu_img(&["map", "--output=json", "-f", "raw"], &[p]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut ext: Vec<Extent> = Vec::new();
    for e in v.as_array().unwrap() {
        let data = e["data"].as_bool().unwrap();
        if !data {
            assert_eq!(e["zero"], true, "a hole that does not read as zero: {e}");
        }
        let start = e["start"].as_u64().unwrap();
        let length = e["length"].as_u64().unwrap();
        // Merge neighbours of the same kind: qemu may split them.
        match ext.last_mut() {
            Some(last) if last.data == data && last.start + last.length == start => {
                last.length += length
            }
            _ => ext.push(Extent {
                start,
                length,
                data,
            }),
        }
    }
    ext
}

#[test]
fn qemu_img_map_reports_holes() {
    let m = Mount::with_block_size("16K");
    let raw = m.path("sparse.raw");
    run_ok(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "raw"])
            .arg(&raw)
            .arg("64M"),
    );
    let pattern = m.scratch().join("pattern");
    fs::write(&pattern, Rng::new(51).bytes(64 * 1024)).unwrap();
    // 64 KiB at 0, 10 MiB and 40 MiB + 16 KiB (all block-aligned).
    for seek in [0, 10 * MIB, 40 * MIB + 16 * KIB] {
        run_ok(
            Command::new("dd")
                .arg(format!("if={}", pattern.display()))
                .arg(format!("of={}", raw.display()))
                .args(["bs=64K", "conv=notrunc", "oflag=seek_bytes", "status=none"])
                .arg(format!("seek={seek}")),
        );
    }
    let map = qemu_map(&raw);
    let want = vec![
        Extent {
            start: 0,
            length: 64 * KIB,
            data: true,
        },
        Extent {
            start: 64 * KIB,
            length: 10 * MIB - 64 * KIB,
            data: false,
        },
        Extent {
            start: 10 * MIB,
            length: 64 * KIB,
            data: true,
        },
        Extent {
            start: 10 * MIB + 64 * KIB,
            length: 30 * MIB - 48 * KIB,
            data: false,
        },
        Extent {
            start: 40 * MIB + 16 * KIB,
            length: 64 * KIB,
            data: true,
        },
        Extent {
            start: 40 * MIB + 80 * KIB,
            length: 24 * MIB - 80 * KIB,
            data: false,
        },
    ];
    assert_eq!(map, want, "qemu-img map of a sparse raw image");
    // Sanity: the pattern is where dd put it.
    let f = File::open(&raw).unwrap();
    assert_eq!(
        read_at(&f, 40 * MIB + 16 * KIB, 64 * 1024),
        fs::read(&pattern).unwrap()
    );
}

#[test]
fn cp_dd_cmp_in_and_out() {
    let m = Mount::new();
    let outside = m.scratch().join("outside.bin");
    fs::write(&outside, Rng::new(52).bytes(20 * MIB as usize + 333)).unwrap();
    run_ok(Command::new("cp").arg(&outside).arg(m.path("cp.bin")));
    run_ok(Command::new("cmp").arg(&outside).arg(m.path("cp.bin")));
    run_ok(
        Command::new("dd")
            .arg(format!("if={}", outside.display()))
            .arg(format!("of={}", m.path("dd.bin").display()))
            .args(["bs=1M", "status=none", "conv=fsync"]),
    );
    run_ok(Command::new("cmp").arg(&outside).arg(m.path("dd.bin")));
    // Odd block sizes, in and out.
    run_ok(
        Command::new("dd")
            .arg(format!("if={}", m.path("dd.bin").display()))
            .arg(format!("of={}", m.path("dd2.bin").display()))
            .args(["bs=12345", "status=none"]),
    );
    let back = m.scratch().join("back.bin");
    run_ok(Command::new("cp").arg(m.path("dd2.bin")).arg(&back));
    run_ok(Command::new("cmp").arg(&outside).arg(&back));
    // cp --sparse=always keeps a sparse file sparse inside the mount.
    let sparse = m.path("sparse.img");
    let f = File::create(&sparse).unwrap();
    f.set_len(512 * MIB).unwrap();
    f.write_all_at(b"island", 300 * MIB).unwrap();
    drop(f);
    run_ok(
        Command::new("cp")
            .arg("--sparse=always")
            .arg(&sparse)
            .arg(m.path("sparse2.img")),
    );
    run_ok(Command::new("cmp").arg(&sparse).arg(m.path("sparse2.img")));
    let md = fs::metadata(m.path("sparse2.img")).unwrap();
    assert!(
        md.blocks() * 512 <= 2 * MIB,
        "sparse copy allocates {} bytes",
        md.blocks() * 512
    );
    // cmp detects a difference (the tools really read the mount).
    let g = fs::OpenOptions::new()
        .write(true)
        .open(m.path("cp.bin"))
        .unwrap();
    g.write_all_at(b"X", 5 * MIB).unwrap();
    drop(g);
    let out = run_timeout(
        Command::new("cmp").arg(&outside).arg(m.path("cp.bin")),
        CMD_TIMEOUT,
    );
    assert_eq!(out.status.code(), Some(1));
}

const TREE_OPTS: SnapOpts = SnapOpts {
    mtimes: true,
    dir_mtimes: false,
    owners: true,
    xattrs: true,
};

#[test]
fn rsync_tree_in_and_out() {
    let m = Mount::new();
    let src = m.scratch().join("src");
    make_sample_tree(&src, 53);
    run_ok(
        Command::new("rsync")
            .arg("-aHX")
            .arg(format!("{}/", src.display()))
            .arg(m.path("tree")),
    );
    run_ok(
        Command::new("diff")
            .arg("-r")
            .arg("--no-dereference")
            .arg(&src)
            .arg(m.path("tree")),
    );
    assert_trees_equal(&src, &m.path("tree"), TREE_OPTS);
    // Hard links made it as hard links.
    assert_eq!(
        fs::metadata(m.path("tree/a/odd.bin")).unwrap().ino(),
        fs::metadata(m.path("tree/hard-odd.bin")).unwrap().ino()
    );
    let out = m.scratch().join("out");
    run_ok(
        Command::new("rsync")
            .arg("-aHX")
            .arg(format!("{}/", m.path("tree").display()))
            .arg(&out),
    );
    run_ok(
        Command::new("diff")
            .arg("-r")
            .arg("--no-dereference")
            .arg(&src)
            .arg(&out),
    );
    assert_trees_equal(&src, &out, TREE_OPTS);
    // A second rsync finds nothing to do (metadata round-trips exactly).
    let o = run_ok(
        Command::new("rsync")
            .arg("-aHXi")
            .arg(format!("{}/", src.display()))
            .arg(m.path("tree")),
    );
    assert!(
        stdout_str(&o).trim().is_empty(),
        "rsync wants to re-sync:\n{}",
        stdout_str(&o)
    );
    // And an in-mount to in-mount rsync.
    run_ok(
        Command::new("rsync")
            .arg("-aHX")
            .arg(format!("{}/", m.path("tree").display()))
            .arg(m.path("tree2")),
    );
    assert_trees_equal(&src, &m.path("tree2"), TREE_OPTS);
}

#[test]
fn tar_tree_in_and_out() {
    let m = Mount::new();
    let src = m.scratch().join("src");
    make_sample_tree(&src, 54);
    fs::create_dir(m.path("tree")).unwrap();
    // Archive stored in the mount, extracted in the mount.
    sh(&format!(
        "tar --xattrs -C {} -cf {} . && tar --xattrs --xattrs-include='user.*' -C {} -xpf {}",
        src.display(),
        m.path("tree.tar").display(),
        m.path("tree").display(),
        m.path("tree.tar").display()
    ));
    run_ok(
        Command::new("diff")
            .arg("-r")
            .arg("--no-dereference")
            .arg(&src)
            .arg(m.path("tree")),
    );
    assert_trees_equal(&src, &m.path("tree"), TREE_OPTS);
    // Out again through a pipe, with --sparse (SEEK_HOLE on the mount).
    let out = m.scratch().join("out");
    fs::create_dir(&out).unwrap();
    sh(&format!(
        "tar --sparse --xattrs -C {} -cf - . | tar --xattrs --xattrs-include='user.*' -C {} -xpf -",
        m.path("tree").display(),
        out.display()
    ));
    run_ok(
        Command::new("diff")
            .arg("-r")
            .arg("--no-dereference")
            .arg(&src)
            .arg(&out),
    );
    assert_trees_equal(&src, &out, TREE_OPTS);
    // A --sparse archive of the sparse image is small: tar found the holes.
    sh(&format!(
        "tar --sparse -C {} -cf {} sparse.img",
        m.path("tree").display(),
        m.scratch().join("sparse.tar").display()
    ));
    let size = fs::metadata(m.scratch().join("sparse.tar")).unwrap().len();
    assert!(
        size < 2 * MIB,
        "tar --sparse archive is {size} bytes: holes not found"
    );
}

#!/usr/bin/env python3
"""Metadata micro-benchmark for scripts/bench.sh: create, stat or unlink N small files.

Files live in DIR/dNNNN/fNNNNNN, PER_DIR files per directory (default 1000), one process,
one file at a time, so every operation waits for the filesystem (like `tar x` or `rm -r`).

  create: mkdir the directories, then for each file open(O_CREAT|O_EXCL|O_WRONLY),
          write SIZE bytes (default 4096; 0 for empty files), close.
  stat:   os.stat() of every file (bench.sh drops the caches before this phase).
  unlink: os.unlink() of every file, then rmdir of the directories.

Prints one JSON object: {"op": ..., "files": N, "seconds": s, "ops_per_s": r}.
"""
import argparse
import json
import os
import time


def paths(root, n, per_dir):
    for i in range(n):
        yield os.path.join(root, "d%04d" % (i // per_dir), "f%06d" % i)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("op", choices=["create", "stat", "unlink"])
    ap.add_argument("dir")
    ap.add_argument("-n", type=int, default=100000)
    ap.add_argument("--per-dir", type=int, default=1000)
    ap.add_argument("--size", type=int, default=4096)
    a = ap.parse_args()
    ndirs = (a.n + a.per_dir - 1) // a.per_dir
    dirs = [os.path.join(a.dir, "d%04d" % d) for d in range(ndirs)]
    data = (b"thinfs-bench-small-file\n" * (a.size // 24 + 1))[:a.size]
    t0 = time.perf_counter()
    if a.op == "create":
        os.makedirs(a.dir, exist_ok=True)
        for d in dirs:
            os.mkdir(d)
        flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY
        for i, p in enumerate(paths(a.dir, a.n, a.per_dir)):
            fd = os.open(p, flags, 0o644)
            if data:
                # Distinct content per file (its index), so a dedup store cannot fold them.
                os.write(fd, b"%08d" % i + data[8:])
            os.close(fd)
    elif a.op == "stat":
        for p in paths(a.dir, a.n, a.per_dir):
            os.stat(p)
    else:
        for p in paths(a.dir, a.n, a.per_dir):
            os.unlink(p)
        for d in dirs:
            os.rmdir(d)
    dt = time.perf_counter() - t0
    print(json.dumps({"op": a.op, "files": a.n, "seconds": round(dt, 3),
                      "ops_per_s": round(a.n / dt, 1) if dt > 0 else None}))


if __name__ == "__main__":
    main()

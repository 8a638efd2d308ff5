#!/usr/bin/env python3
"""Generate a deterministic "VM fleet" for scripts/bench.sh and compute its ideal dedup size.

The fleet is one base image plus COPIES derived images:
  * base: EXTENT-sized extents (1 MiB), exactly round(RANDOM_FRAC * n) of them filled with
    pseudo-random bytes and the rest with zeros (zeros come in whole extents, as in a real
    image: unused areas, not isolated zero blocks);
  * copy i: the base with round(CHANGE_FRAC * nblocks) distinct 4 KiB blocks overwritten
    with fresh pseudo-random data (positions and data from a per-copy seeded PRNG).

All bytes come from random.Random(seed) (no os.urandom), so the same parameters always
give the same files. The files are written fully (zeros are written, not left as holes),
so every filesystem under test receives every byte.

While writing, the script hashes the data at each requested block size and counts the
distinct non-zero blocks across all files: ideal_bytes[bs] = distinct_nonzero_blocks * bs is
what a perfect fixed-block deduplicating store (zero blocks free, no metadata) would keep.

The result is DIR/manifest.json; if it exists with the same parameters and the files are
present with the right sizes, nothing is regenerated.

Usage: fleet.py --dir DIR --base-mib 2048 --copies 10 --seed 42 --block-sizes 16384,65536,131072
"""
import argparse
import hashlib
import json
import os
import random
import sys
import time

BLK = 4096  # granularity of the per-copy changes


def file_names(copies):
    return ["base.img"] + ["vm%02d.img" % i for i in range(1, copies + 1)]


class Ideal:
    """Distinct non-zero blocks at several block sizes."""

    def __init__(self, block_sizes):
        self.bss = block_sizes
        self.sets = {bs: set() for bs in block_sizes}
        self.zero = {bs: bytes(bs) for bs in block_sizes}

    def add_blocks(self, buf, bs, indices=None):
        """Hash blocks of size bs in buf (all, or only the given block indices)."""
        zero = self.zero[bs]
        s = self.sets[bs]
        mv = memoryview(buf)
        rng = range(len(buf) // bs) if indices is None else indices
        for i in rng:
            blk = mv[i * bs:(i + 1) * bs]
            if blk == zero:
                continue
            s.add(hashlib.blake2b(blk, digest_size=16).digest())

    def result(self):
        return {str(bs): len(self.sets[bs]) * bs for bs in self.bss}, \
               {str(bs): len(self.sets[bs]) for bs in self.bss}


def generate(args):
    extent = args.extent_kib * 1024
    base_size = args.base_mib * 1024 * 1024
    if base_size % extent:
        sys.exit("base size must be a multiple of the extent size")
    for bs in args.block_sizes:
        if extent % bs or bs % BLK:
            sys.exit("block size %d must divide the extent and be a multiple of 4 KiB" % bs)
    n_ext = base_size // extent
    nblocks = base_size // BLK
    rng = random.Random(args.seed)
    n_random = round(args.random_frac * n_ext)
    random_ext = set(rng.sample(range(n_ext), n_random))
    ideal = Ideal(args.block_sizes)
    os.makedirs(args.dir, exist_ok=True)
    names = file_names(args.copies)
    zero_ext = bytes(extent)
    t0 = time.time()

    # Base image.
    base_path = os.path.join(args.dir, names[0])
    with open(base_path + ".tmp", "wb") as f:
        for e in range(n_ext):
            if e in random_ext:
                buf = rng.randbytes(extent)
                for bs in args.block_sizes:
                    ideal.add_blocks(buf, bs)
            else:
                buf = zero_ext
            f.write(buf)
        f.flush()
        os.fsync(f.fileno())
    os.replace(base_path + ".tmp", base_path)

    # Copies: stream the base, patch the changed 4 KiB blocks.
    per_ext = extent // BLK
    n_change = round(args.change_frac * nblocks)
    for c in range(1, args.copies + 1):
        crng = random.Random("%s-copy-%d" % (args.seed, c))
        changed = sorted(crng.sample(range(nblocks), n_change))
        by_ext = {}
        for b in changed:
            by_ext.setdefault(b // per_ext, []).append(b % per_ext)
        path = os.path.join(args.dir, names[c])
        with open(base_path, "rb") as src, open(path + ".tmp", "wb") as dst:
            for e in range(n_ext):
                buf = src.read(extent)
                if len(buf) != extent:
                    sys.exit("short read from base image")
                blocks = by_ext.get(e)
                if blocks:
                    buf = bytearray(buf)
                    for b in blocks:
                        buf[b * BLK:(b + 1) * BLK] = crng.randbytes(BLK)
                    for bs in args.block_sizes:
                        k = bs // BLK
                        ideal.add_blocks(buf, bs, sorted({b // k for b in blocks}))
                dst.write(buf)
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(path + ".tmp", path)

    ideal_bytes, ideal_blocks = ideal.result()
    return {
        "files": names,
        "logical_bytes": base_size * len(names),
        "ideal_bytes": ideal_bytes,
        "ideal_blocks": ideal_blocks,
        "random_extents": n_random,
        "extents": n_ext,
        "changed_blocks_per_copy": n_change,
        "generate_seconds": round(time.time() - t0, 1),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", required=True)
    ap.add_argument("--base-mib", type=int, default=2048)
    ap.add_argument("--copies", type=int, default=10)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--extent-kib", type=int, default=1024)
    ap.add_argument("--random-frac", type=float, default=0.6)
    ap.add_argument("--change-frac", type=float, default=0.02)
    ap.add_argument("--block-sizes", default="16384,65536,131072",
                    help="comma-separated block sizes in bytes for the ideal computation")
    args = ap.parse_args()
    args.block_sizes = sorted({int(x) for x in args.block_sizes.split(",") if x})

    params = {k: getattr(args, k) for k in
              ("base_mib", "copies", "seed", "extent_kib", "random_frac", "change_frac", "block_sizes")}
    params["version"] = 1
    manifest_path = os.path.join(args.dir, "manifest.json")
    try:
        with open(manifest_path) as f:
            old = json.load(f)
        size = args.base_mib * 1024 * 1024
        if old.get("params") == params and all(
                os.path.getsize(os.path.join(args.dir, n)) == size for n in old["files"]):
            print(json.dumps(old))
            return
    except (OSError, ValueError, KeyError):
        pass
    try:
        os.unlink(manifest_path)
    except OSError:
        pass
    res = generate(args)
    res["params"] = params
    with open(manifest_path + ".tmp", "w") as f:
        json.dump(res, f)
    os.replace(manifest_path + ".tmp", manifest_path)
    print(json.dumps(res))


if __name__ == "__main__":
    main()

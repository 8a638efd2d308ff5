//! Integration tests that really mount thinfs through FUSE and drive it with
//! std::fs, raw libc calls and the tools a datastore meets (qemu-img, cp, dd,
//! rsync, tar).
//!
//! Every test makes its own store and mountpoint (see `common::Mount`), so the
//! tests run in parallel. They need root and /dev/fuse: a test that cannot mount
//! fails, it never skips. `scripts/test.sh` installs the tools they call.

mod integration {
    mod common;

    mod clone;
    mod concurrency;
    mod dedup;
    mod durability;
    mod errors;
    mod posix;
    mod tools;
    mod vmimage;
}

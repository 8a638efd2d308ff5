//! The reference-model property test of the thinfs core (no FUSE): random operation
//! sequences run against a [`thinfs::fs::Datastore`] and against `model/reference.rs`, the
//! only definition of correctness, compared after every operation. Next to it: fixed
//! tests of clone cost and `du` numbers, and one `regression_*` test per bug the property
//! test found.
//!
//! `PROPTEST_CASES` sets the budget (CI uses 64). Failures are not persisted: a shrunk
//! failure becomes a named test in `model/regressions.rs`. `MODEL_TRACE=1` prints every
//! op with its outcome, `MODEL_TIMING=1` each case's time and every op over 100 ms.
//! `TMPDIR=/dev/shm` roughly halves the run time (the stores fsync).

mod model {
    pub mod checks;
    pub mod harness;
    pub mod ops;
    pub mod reference;

    mod fixed;
    mod gc;
    mod namespace;
    mod props;
    mod regressions;
}

//! The reference-model property test of the thinfs core (no FUSE): random operation
//! sequences run against a [`thinfs::fs::Datastore`] and against `model/reference.rs`, the
//! only definition of correctness, compared after every operation. Next to it: fixed
//! tests of clone cost and `du` numbers, and one `regression_*` test per bug the property
//! test found.
//!
//! `PROPTEST_CASES` sets the budget (CI uses 64). Failures are not persisted: a shrunk
//! failure becomes a named test in `model/regressions.rs`.

mod model {
    pub mod harness;
    pub mod ops;
    pub mod reference;

    pub mod checks;
    mod fixed;
    mod namespace;
    mod props;
    mod regressions;
}

//! The property tests: random op sequences at 4 KiB blocks (most cases), 16 KiB and 64 KiB.

use proptest::prelude::*;
use proptest::test_runner::Config;

use super::harness::Harness;
use super::ops::op;

/// `PROPTEST_CASES` (default 256) divided by `divisor`, no failure file, room to shrink.
fn config(divisor: u32) -> Config {
    let base = Config::default();
    Config {
        cases: (base.cases / divisor).max(1),
        failure_persistence: None,
        max_shrink_iters: 4096,
        ..base
    }
}

fn ops() -> impl Strategy<Value = Vec<super::ops::Op>> {
    prop::collection::vec(op(), 1..48)
}

proptest! {
    #![proptest_config(config(1))]
    #[test]
    fn model_4k(ops in ops()) {
        Harness::run(4096, &ops);
    }
}

proptest! {
    #![proptest_config(config(4))]
    #[test]
    fn model_16k(ops in ops()) {
        Harness::run(16 * 1024, &ops);
    }

    #[test]
    fn model_64k(ops in ops()) {
        Harness::run(64 * 1024, &ops);
    }
}

//! The operations the property test draws, and their strategies.
//!
//! Targets are small integers taken modulo the live count when the op runs (so every
//! shrunk sequence still means something), names come from a four-letter alphabet (so
//! creates, renames and clones collide), and offsets and lengths are symbolic
//! ([`Off`], [`Len`]) so that one sequence hits block boundaries at any block size.

use proptest::prelude::*;
use thinfs::fs::MAX_FILE_SIZE;

/// Far offsets start here: 1 TiB, deep in a sparse tree.
pub const FAR: u64 = 1 << 40;
/// "Copy to the end" / "punch to the end" length: 1 PiB, far past any data yet a legal
/// file size.
pub const HUGE: u64 = 1 << 50;
/// A length whose end is past the largest file size (EFBIG).
pub const TOO_BIG: u64 = 1 << 62;

/// The tiny name alphabet.
pub const NAMES: [&[u8]; 4] = [b"a", b"b", b"c", b"d"];

pub fn name(i: u8) -> &'static [u8] {
    NAMES[i as usize % NAMES.len()]
}

/// A file offset, resolved against the block size when the op runs.
#[derive(Clone, Copy, Debug)]
pub enum Off {
    /// A byte offset.
    At(u32),
    /// `k` × 4 KiB.
    Page(u8),
    /// `k` blocks plus a small signed delta (boundary cases).
    Block(u8, i16),
    /// 1 TiB plus a byte offset.
    Far(u32),
    /// The largest file size minus 8 KiB plus a byte offset (some of them past it).
    NearMax(u16),
}

impl Off {
    pub fn get(self, bs: u64) -> u64 {
        match self {
            Off::At(x) => x as u64,
            Off::Page(k) => k as u64 * 4096,
            Off::Block(k, d) => (k as u64 * bs).saturating_add_signed(d as i64),
            Off::Far(x) => FAR + x as u64,
            Off::NearMax(x) => MAX_FILE_SIZE - 8192 + x as u64,
        }
    }
}

/// Extended attribute names: two.
pub fn xattr_name(i: u8) -> Vec<u8> {
    format!("user.x{}", i % 2).into_bytes()
}

/// An attribute value of `len % 40` bytes (empty values are legal).
pub fn xattr_value(len: u8) -> Vec<u8> {
    (0..len % 40).map(|i| len ^ i).collect()
}

/// Snapshot names: three, so creates collide.
pub fn snap_name(i: u8) -> String {
    format!("s{}", i % 3)
}

/// A length, resolved against the block size when the op runs.
#[derive(Clone, Copy, Debug)]
pub enum Len {
    Bytes(u32),
    /// `k` blocks plus a small signed delta.
    Blocks(u8, i16),
    /// 1 MiB plus a byte count: enough dirty data for the parallel hashing of a flush.
    Mib(u32),
    /// Far past any end of file (range ops only).
    Huge,
    /// Past the largest file size (range ops only).
    TooBig,
}

impl Len {
    pub fn get(self, bs: u64) -> u64 {
        match self {
            Len::Bytes(x) => x as u64,
            Len::Blocks(k, d) => (k as u64 * bs).saturating_add_signed(d as i64),
            Len::Mib(x) => (1 << 20) + x as u64,
            Len::Huge => HUGE,
            Len::TooBig => TOO_BIG,
        }
    }
}

/// What a write stores.
#[derive(Clone, Copy, Debug)]
pub enum Fill {
    /// Zeros: whole zero blocks must become holes.
    Zero,
    /// One repeated non-zero byte: equal blocks across files dedup.
    Byte(u8),
    /// Pseudo-random bytes from a seed.
    Noise(u16),
    /// Zeros with a non-zero byte every 5003 bytes: some blocks data, some not.
    Sprinkle(u16),
}

impl Fill {
    pub fn bytes(self, len: usize) -> Vec<u8> {
        match self {
            Fill::Zero => vec![0; len],
            Fill::Byte(b) => vec![b; len],
            Fill::Noise(seed) => {
                let mut s = seed as u64 ^ 0x9E37_79B9_7F4A_7C15;
                let mut v = Vec::with_capacity(len + 8);
                while v.len() < len {
                    s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
                    let mut z = s;
                    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                    v.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
                }
                v.truncate(len);
                v
            }
            Fill::Sprinkle(seed) => (0..len)
                .map(|i| {
                    if (i + seed as usize) % 5003 == 0 {
                        (seed as u8) | 1
                    } else {
                        0
                    }
                })
                .collect(),
        }
    }
}

/// Where a racing op pauses a collection (the `n`-th inode version marked; the first
/// sweep batch, pack copied, repointed, deleted...).
#[derive(Clone, Copy, Debug)]
pub enum GcAt {
    Begun,
    Marked(u8),
    MarkDone,
    Swept,
    SweepDone,
    Copied,
    Repointed,
    Deleting,
    Deleted,
}

/// How a copy_range's destination offset relates to its source offset.
#[derive(Clone, Copy, Debug)]
pub enum Shape {
    /// Independent offsets (mostly a byte copy).
    Any,
    /// Same offset within the block: whole blocks are shared, with a shift.
    SameInBlock,
    /// The same offset: whole blocks are grafted subtree by subtree.
    SameOffset,
}

/// rename(2) flags.
#[derive(Clone, Copy, Debug)]
pub enum RenameMode {
    Plain,
    NoReplace,
    Exchange,
}

/// One operation. `file`, `dir`, `entry` and `target` are indexes modulo the live count.
#[derive(Clone, Debug)]
pub enum Op {
    Create {
        dir: u8,
        name: u8,
    },
    Mkdir {
        dir: u8,
        name: u8,
    },
    Write {
        file: u8,
        off: Off,
        len: Len,
        fill: Fill,
    },
    Read {
        file: u8,
        off: Off,
        len: Len,
    },
    Truncate {
        file: u8,
        size: Off,
    },
    /// fallocate(PUNCH_HOLE | KEEP_SIZE).
    Punch {
        file: u8,
        off: Off,
        len: Len,
    },
    /// fallocate(ZERO_RANGE [| KEEP_SIZE]).
    ZeroRange {
        file: u8,
        off: Off,
        len: Len,
        keep_size: bool,
    },
    /// fallocate(0 | KEEP_SIZE).
    Fallocate {
        file: u8,
        off: Off,
        len: Len,
        keep_size: bool,
    },
    /// SEEK_DATA/SEEK_HOLE against the model (flushes the file).
    Seek {
        file: u8,
    },
    Fsync {
        file: u8,
    },
    Flush {
        file: u8,
    },
    Open {
        file: u8,
    },
    /// Release a handle of the `file`-th open file.
    Close {
        file: u8,
    },
    /// Drop the store (Drop flushes) and open it again.
    Remount,
    /// Clone the `file`-th file of the live tree, or of the `snap`-th snapshot.
    Clone {
        snap: Option<u8>,
        file: u8,
        dir: u8,
        name: u8,
        force: bool,
    },
    /// Clone the `dir`-th directory of the live tree other than the root (cloning the
    /// root into itself always fails with EINVAL), or of the `snap`-th snapshot.
    CloneDir {
        snap: Option<u8>,
        dir: u8,
        to: u8,
        name: u8,
    },
    /// copy_file_range from the `src`-th file of the live tree or of the `snap`-th
    /// snapshot into the `dst`-th live file.
    CopyRange {
        snap: Option<u8>,
        src: u8,
        src_off: Off,
        dst: u8,
        dst_off: Off,
        len: Len,
        shape: Shape,
    },
    /// Unlink the `entry`-th name (a directory name must fail with EISDIR).
    Unlink {
        entry: u8,
    },
    /// Unlink by name (may not exist).
    UnlinkName {
        dir: u8,
        name: u8,
    },
    /// Rename the `entry`-th file name.
    Rename {
        entry: u8,
        dir: u8,
        name: u8,
        mode: RenameMode,
    },
    Link {
        file: u8,
        dir: u8,
        name: u8,
    },
    /// Close the store, run fsck on it (must be clean), open it again.
    Fsck,
    /// Garbage collection; `compact_all` compacts every pack with any garbage.
    Gc {
        compact_all: bool,
    },
    /// Garbage collection paused at `at` while `op` runs (after it, for ops that close
    /// the store or collect themselves).
    GcWith {
        compact_all: bool,
        at: GcAt,
        op: Box<Op>,
    },
    Snapshot {
        name: u8,
    },
    SnapshotDelete {
        name: u8,
    },
    /// Roll the live tree back to a snapshot (EBUSY while a file is open).
    Rollback {
        name: u8,
    },
    /// Compare every snapshot with its model copy.
    CheckSnapshots,
    /// setxattr of the `name`-th of two user attributes; `flags` 0, XATTR_CREATE or
    /// XATTR_REPLACE (modulo 3).
    SetXattr {
        file: u8,
        name: u8,
        value: u8,
        flags: u8,
    },
    RemoveXattr {
        file: u8,
        name: u8,
    },
    /// Store-wide stats against the model.
    Stats,
    /// du of the `target`-th of (files, then directories).
    Du {
        target: u8,
    },
}

fn off() -> impl Strategy<Value = Off> {
    prop_oneof![
        5 => (0u32..400_000).prop_map(Off::At),
        3 => (0u8..100).prop_map(Off::Page),
        3 => (0u8..=12, prop_oneof![Just(0i16), -2i16..=2]).prop_map(|(k, d)| Off::Block(k, d)),
        1 => (0u32..300_000).prop_map(Off::Far),
        1 => (0u16..16384).prop_map(Off::NearMax),
    ]
}

fn data_len() -> impl Strategy<Value = Len> {
    prop_oneof![
        3 => (0u32..300).prop_map(Len::Bytes),
        4 => (0u32..200_000).prop_map(Len::Bytes),
        3 => (1u8..=6, prop_oneof![Just(0i16), -2i16..=2]).prop_map(|(k, d)| Len::Blocks(k, d)),
        1 => (0u32..1_000_000).prop_map(Len::Mib),
    ]
}

fn range_len() -> impl Strategy<Value = Len> {
    prop_oneof![18 => data_len(), 2 => Just(Len::Huge), 1 => Just(Len::TooBig)]
}

fn fill() -> impl Strategy<Value = Fill> {
    prop_oneof![
        1 => Just(Fill::Zero),
        2 => (1u8..=255).prop_map(Fill::Byte),
        6 => any::<u16>().prop_map(Fill::Noise),
        1 => any::<u16>().prop_map(Fill::Sprinkle),
    ]
}

fn shape() -> impl Strategy<Value = Shape> {
    prop_oneof![
        Just(Shape::Any),
        Just(Shape::SameInBlock),
        Just(Shape::SameOffset)
    ]
}

fn rename_mode() -> impl Strategy<Value = RenameMode> {
    prop_oneof![
        4 => Just(RenameMode::Plain),
        1 => Just(RenameMode::NoReplace),
        1 => Just(RenameMode::Exchange),
    ]
}

/// Mostly the live tree; sometimes a snapshot (skipped while there is none).
fn snap() -> impl Strategy<Value = Option<u8>> {
    prop::option::weighted(0.25, any::<u8>())
}

fn gc_at() -> impl Strategy<Value = GcAt> {
    prop_oneof![
        Just(GcAt::Begun),
        (0u8..8).prop_map(GcAt::Marked),
        Just(GcAt::MarkDone),
        Just(GcAt::Swept),
        Just(GcAt::SweepDone),
        Just(GcAt::Copied),
        Just(GcAt::Repointed),
        Just(GcAt::Deleting),
        Just(GcAt::Deleted),
    ]
}

/// One random operation, weighted towards data operations; now and then a garbage
/// collection with another op racing it.
pub fn op() -> BoxedStrategy<Op> {
    prop_oneof![
        60 => base_op(),
        1 => (any::<bool>(), gc_at(), base_op()).prop_map(|(compact_all, at, op)| Op::GcWith {
            compact_all,
            at,
            op: Box::new(op),
        }),
    ]
    .boxed()
}

fn base_op() -> impl Strategy<Value = Op> {
    let i = || any::<u8>();
    let n = || 0u8..NAMES.len() as u8;
    prop_oneof![
        22 => (i(), off(), data_len(), fill())
            .prop_map(|(file, off, len, fill)| Op::Write { file, off, len, fill }),
        4 => (i(), off(), data_len()).prop_map(|(file, off, len)| Op::Read { file, off, len }),
        6 => (i(), off()).prop_map(|(file, size)| Op::Truncate { file, size }),
        5 => (i(), off(), range_len()).prop_map(|(file, off, len)| Op::Punch { file, off, len }),
        4 => (i(), off(), range_len(), any::<bool>())
            .prop_map(|(file, off, len, keep_size)| Op::ZeroRange { file, off, len, keep_size }),
        3 => (i(), off(), range_len(), any::<bool>())
            .prop_map(|(file, off, len, keep_size)| Op::Fallocate { file, off, len, keep_size }),
        5 => i().prop_map(|file| Op::Seek { file }),
        2 => i().prop_map(|file| Op::Fsync { file }),
        3 => i().prop_map(|file| Op::Flush { file }),
        3 => i().prop_map(|file| Op::Open { file }),
        3 => i().prop_map(|file| Op::Close { file }),
        3 => Just(Op::Remount),
        7 => (snap(), i(), i(), n(), any::<bool>()).prop_map(|(snap, file, dir, name, force)| {
            Op::Clone { snap, file, dir, name, force }
        }),
        3 => (snap(), i(), i(), n())
            .prop_map(|(snap, dir, to, name)| Op::CloneDir { snap, dir, to, name }),
        8 => (snap(), i(), off(), i(), off(), range_len(), shape()).prop_map(
            |(snap, src, src_off, dst, dst_off, len, shape)| Op::CopyRange {
                snap, src, src_off, dst, dst_off, len, shape
            }
        ),
        5 => (i(), n()).prop_map(|(dir, name)| Op::Create { dir, name }),
        3 => (i(), n()).prop_map(|(dir, name)| Op::Mkdir { dir, name }),
        4 => i().prop_map(|entry| Op::Unlink { entry }),
        1 => (i(), n()).prop_map(|(dir, name)| Op::UnlinkName { dir, name }),
        5 => (i(), i(), n(), rename_mode())
            .prop_map(|(entry, dir, name, mode)| Op::Rename { entry, dir, name, mode }),
        2 => (i(), i(), n()).prop_map(|(file, dir, name)| Op::Link { file, dir, name }),
        1 => Just(Op::Stats),
        3 => (i(), 0u8..2, any::<u8>(), 0u8..3).prop_map(|(file, name, value, flags)| {
            Op::SetXattr { file, name, value, flags }
        }),
        1 => (i(), 0u8..2).prop_map(|(file, name)| Op::RemoveXattr { file, name }),
        1 => Just(Op::Fsck),
        2 => any::<bool>().prop_map(|compact_all| Op::Gc { compact_all }),
        3 => (0u8..3).prop_map(|name| Op::Snapshot { name }),
        1 => (0u8..3).prop_map(|name| Op::SnapshotDelete { name }),
        2 => (0u8..3).prop_map(|name| Op::Rollback { name }),
        2 => Just(Op::CheckSnapshots),
        2 => i().prop_map(|target| Op::Du { target }),
    ]
}

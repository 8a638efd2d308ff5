//! Every key of the metadata store, in one place.
//!
//! thinfs keeps all metadata in one sled tree so that any set of changes commits in one
//! atomic batch. Integers are big-endian so that byte order is numeric order. Records that
//! snapshots must see are versioned: their key ends in the bitwise-inverted epoch, so the
//! newest version of a record sorts first and "the version a snapshot at epoch S sees" is
//! the first key at or after `prefix + !S`.
//!
//! | tag   | key                                         | value                  | scanned by             |
//! |-------|---------------------------------------------|------------------------|------------------------|
//! | `c`   | `c` name                                    | u64 BE counter         | -                      |
//! | `i`   | `i` ino:u64 !epoch:u64                      | versioned [`Inode`]    | GC mark, fsck, stats   |
//! | `d`   | `d` parent:u64 name 0x00 !epoch:u64         | versioned [`DirEntry`] | readdir                |
//! | `K`   | `K` lowest name:[u8;8]                      | bucket of locations    | GC sweep, fsck, stats  |
//! | `M`   | `M` lowest name:[u8;8]                      | bucket of locations    | GC sweep, fsck, stats  |
//! | `k`   | `k` chunk:[u8;32]                           | [`ChunkLoc`]           | migration (format < 6) |
//! | `m`   | `m` node:[u8;32]                            | [`ChunkLoc`]           | migration (format 5)   |
//! | `n`   | `n` node:[u8;32]                            | block-map node bytes   | GC sweep, fsck         |
//! | `s`   | `s` name                                    | [`SnapshotRecord`]     | snapshot list          |
//! | `o`   | `o` ino:u64                                 | empty (orphan marker)  | mount-time cleanup     |
//! | `v`   | `v` ino:u64                                 | u64 BE file version    | intent-log replay      |
//!
//! `K` and `M` are the chunk and block-map node location indexes, many entries per key
//! (`meta/buckets.rs`, format 6); `k` and `m` held one entry per key before and are moved
//! into buckets at open. `n` holds a node's bytes in the metadata itself (formats 2-4:
//! still read, never written, removed by GC once unreachable).
//!
//! File names never contain 0x00, so the separator keeps `d` keys of one directory
//! contiguous and unambiguous.
//!
//! [`Inode`]: super::Inode
//! [`DirEntry`]: super::DirEntry
//! [`ChunkLoc`]: super::ChunkLoc
//! [`SnapshotRecord`]: super::SnapshotRecord

use crate::ids::{ChunkId, Epoch, InodeNo};

pub const COUNTER: u8 = b'c';
pub const INODE: u8 = b'i';
pub const DIRENT: u8 = b'd';
pub const CHUNK: u8 = b'k';
pub const NODE: u8 = b'n';
pub const NODE_LOC: u8 = b'm';
pub const CHUNK_BUCKET: u8 = b'K';
pub const NODE_BUCKET: u8 = b'M';
pub const SNAPSHOT: u8 = b's';
pub const ORPHAN: u8 = b'o';
pub const VERSION: u8 = b'v';

/// Length of the epoch suffix of versioned keys.
pub const EPOCH_LEN: usize = 8;

pub fn counter(name: &str) -> Vec<u8> {
    let mut k = vec![COUNTER];
    k.extend_from_slice(name.as_bytes());
    k
}

/// Prefix shared by all versions of one inode record.
pub fn inode_prefix(ino: InodeNo) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + 8 + EPOCH_LEN);
    k.push(INODE);
    k.extend_from_slice(&ino.0.to_be_bytes());
    k
}

/// Prefix shared by all entries of one directory.
pub fn dir_prefix(parent: InodeNo) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + 8 + 32);
    k.push(DIRENT);
    k.extend_from_slice(&parent.0.to_be_bytes());
    k
}

/// Prefix shared by all versions of one directory entry.
pub fn dirent_prefix(parent: InodeNo, name: &[u8]) -> Vec<u8> {
    let mut k = dir_prefix(parent);
    k.extend_from_slice(name);
    k.push(0);
    k
}

/// Appends the inverted epoch to a versioned prefix.
pub fn versioned(prefix: &[u8], epoch: Epoch) -> Vec<u8> {
    let mut k = Vec::with_capacity(prefix.len() + EPOCH_LEN);
    k.extend_from_slice(prefix);
    k.extend_from_slice(&(!epoch.0).to_be_bytes());
    k
}

/// The epoch of a versioned key.
pub fn epoch_of(key: &[u8]) -> Epoch {
    let mut b = [0u8; 8];
    b.copy_from_slice(&key[key.len() - EPOCH_LEN..]);
    Epoch(!u64::from_be_bytes(b))
}

/// Splits a `d` key (without its epoch) into the entry name.
pub fn dirent_name(key: &[u8]) -> &[u8] {
    // tag(1) + parent(8) ... name ... 0x00 + epoch(8)
    &key[9..key.len() - EPOCH_LEN - 1]
}

/// The inode number of an `i` key.
pub fn inode_of(key: &[u8]) -> InodeNo {
    let mut b = [0u8; 8];
    b.copy_from_slice(&key[1..9]);
    InodeNo(u64::from_be_bytes(b))
}

/// The key of hash `id` under `tag` (`k`, `m` or `n`).
pub fn hashed(tag: u8, id: &ChunkId) -> Vec<u8> {
    let mut k = Vec::with_capacity(33);
    k.push(tag);
    k.extend_from_slice(&id.0);
    k
}

pub fn chunk(id: &ChunkId) -> Vec<u8> {
    hashed(CHUNK, id)
}

pub fn node(id: &ChunkId) -> Vec<u8> {
    hashed(NODE, id)
}

/// The hash in a `k`, `m` or `n` key.
pub fn hash_of(key: &[u8]) -> ChunkId {
    let mut b = [0u8; 32];
    b.copy_from_slice(&key[1..33]);
    ChunkId(b)
}

pub fn snapshot(name: &[u8]) -> Vec<u8> {
    let mut k = vec![SNAPSHOT];
    k.extend_from_slice(name);
    k
}

/// The version of a regular file's live record (see `Meta::put_inode`).
pub fn version(ino: InodeNo) -> Vec<u8> {
    let mut k = vec![VERSION];
    k.extend_from_slice(&ino.0.to_be_bytes());
    k
}

pub fn orphan(ino: InodeNo) -> Vec<u8> {
    let mut k = vec![ORPHAN];
    k.extend_from_slice(&ino.0.to_be_bytes());
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newer_versions_sort_first() {
        let p = inode_prefix(InodeNo(7));
        assert!(versioned(&p, Epoch(5)) < versioned(&p, Epoch(4)));
        assert_eq!(epoch_of(&versioned(&p, Epoch(42))), Epoch(42));
        assert_eq!(inode_of(&versioned(&p, Epoch(1))), InodeNo(7));
    }

    #[test]
    fn dirent_keys_split() {
        let k = versioned(&dirent_prefix(InodeNo(1), b"disk.raw"), Epoch(3));
        assert_eq!(dirent_name(&k), b"disk.raw");
        // a name that is a prefix of another stays separate
        assert!(dirent_prefix(InodeNo(1), b"a") < dirent_prefix(InodeNo(1), b"a\x01"));
    }
}

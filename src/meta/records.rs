//! The records stored in the metadata store and their encoding.
//!
//! Every stored value starts with a format byte ([`RECORD_V1`]) so that a later format can
//! be told apart; the rest is postcard.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::error::{FsError, Result};
use crate::ids::{ChunkId, InodeNo};

/// Format byte of every record of this version.
pub const RECORD_V1: u8 = 1;

/// The kind of an inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDev,
    BlockDev,
}

impl FileKind {
    /// The `S_IFMT` bits of this kind.
    pub fn mode_bits(self) -> u32 {
        match self {
            FileKind::File => libc::S_IFREG,
            FileKind::Dir => libc::S_IFDIR,
            FileKind::Symlink => libc::S_IFLNK,
            FileKind::Fifo => libc::S_IFIFO,
            FileKind::Socket => libc::S_IFSOCK,
            FileKind::CharDev => libc::S_IFCHR,
            FileKind::BlockDev => libc::S_IFBLK,
        }
    }

    /// The kind named by the `S_IFMT` bits of `mode`.
    pub fn from_mode(mode: u32) -> Option<FileKind> {
        Some(match mode & libc::S_IFMT {
            libc::S_IFREG | 0 => FileKind::File,
            libc::S_IFDIR => FileKind::Dir,
            libc::S_IFLNK => FileKind::Symlink,
            libc::S_IFIFO => FileKind::Fifo,
            libc::S_IFSOCK => FileKind::Socket,
            libc::S_IFCHR => FileKind::CharDev,
            libc::S_IFBLK => FileKind::BlockDev,
            _ => return None,
        })
    }
}

/// A point in time with nanoseconds, as stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, Default)]
pub struct Timestamp {
    pub secs: i64,
    pub nsecs: u32,
}

impl Timestamp {
    pub fn now() -> Self {
        Self::from_system(SystemTime::now())
    }

    pub fn from_system(t: SystemTime) -> Self {
        match t.duration_since(UNIX_EPOCH) {
            Ok(d) => Timestamp {
                secs: d.as_secs() as i64,
                nsecs: d.subsec_nanos(),
            },
            Err(e) => {
                let d = e.duration();
                let mut secs = -(d.as_secs() as i64);
                let mut nsecs = d.subsec_nanos();
                if nsecs > 0 {
                    secs -= 1;
                    nsecs = 1_000_000_000 - nsecs;
                }
                Timestamp { secs, nsecs }
            }
        }
    }

    pub fn to_system(self) -> SystemTime {
        if self.secs >= 0 {
            UNIX_EPOCH + Duration::new(self.secs as u64, self.nsecs)
        } else {
            UNIX_EPOCH - Duration::from_secs(self.secs.unsigned_abs())
                + Duration::from_nanos(self.nsecs as u64)
        }
    }
}

/// Root of a file's block map: the hash of the top node, the tree's depth and the number
/// of data (non-hole) blocks below it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapRoot {
    pub node: ChunkId,
    pub depth: u8,
    pub blocks: u64,
}

/// An inode record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inode {
    pub ino: InodeNo,
    pub kind: FileKind,
    /// Permission bits (07777).
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub rdev: u32,
    pub size: u64,
    pub atime: Timestamp,
    pub mtime: Timestamp,
    pub ctime: Timestamp,
    pub crtime: Timestamp,
    /// Parent directory (directories only; files may have several names).
    pub parent: InodeNo,
    /// Block map of a regular file; `None` is an empty (all-hole) map.
    pub map: Option<MapRoot>,
    /// Target of a symlink.
    pub target: Vec<u8>,
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl Inode {
    /// A fresh inode of `kind` with all times set to now.
    pub fn new(
        ino: InodeNo,
        kind: FileKind,
        perm: u16,
        uid: u32,
        gid: u32,
        parent: InodeNo,
    ) -> Self {
        let now = Timestamp::now();
        Inode {
            ino,
            kind,
            perm: perm & 0o7777,
            uid,
            gid,
            nlink: if kind == FileKind::Dir { 2 } else { 1 },
            rdev: 0,
            size: 0,
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
            parent,
            map: None,
            target: Vec::new(),
            xattrs: BTreeMap::new(),
        }
    }

    /// Number of data (non-hole) blocks.
    pub fn data_blocks(&self) -> u64 {
        self.map.map(|m| m.blocks).unwrap_or(0)
    }
}

/// A directory entry: the inode a name points at, and its kind (for readdir).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntry {
    pub ino: InodeNo,
    pub kind: FileKind,
}

/// Where a chunk's bytes live: pack number, offset of the data, length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkLoc {
    pub pack: u32,
    pub offset: u64,
    pub len: u32,
}

/// A snapshot: the epoch it froze, when, and its stable index (for inode numbers).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    pub name: String,
    pub epoch: u64,
    pub index: u32,
    pub created: Timestamp,
}

/// Encodes a record with its format byte.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = vec![RECORD_V1];
    // postcard only fails on writer errors, which a Vec cannot have.
    out.extend(postcard::to_allocvec(value).unwrap_or_default());
    out
}

/// Decodes a record written by [`encode`]; `what` names it in the error.
pub fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8], what: &str) -> Result<T> {
    match bytes.split_first() {
        Some((&RECORD_V1, rest)) => postcard::from_bytes(rest)
            .map_err(|e| FsError::Meta(format!("cannot decode {what}: {e}"))),
        Some((v, _)) => Err(FsError::Meta(format!(
            "{what} has unknown record format {v}"
        ))),
        None => Err(FsError::Meta(format!("{what} is empty"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inode_roundtrip() {
        let mut i = Inode::new(InodeNo(9), FileKind::File, 0o644, 1, 2, InodeNo::ROOT);
        i.xattrs.insert(b"user.a".to_vec(), b"b".to_vec());
        i.map = Some(MapRoot {
            node: ChunkId::of(b"x"),
            depth: 2,
            blocks: 3,
        });
        let back: Inode = decode(&encode(&i), "inode").unwrap();
        assert_eq!(back, i);
        assert!(decode::<Inode>(&[9, 1, 2], "inode").is_err());
    }

    #[test]
    fn timestamps_before_epoch() {
        let t = UNIX_EPOCH - Duration::from_millis(1500);
        assert_eq!(Timestamp::from_system(t).to_system(), t);
    }
}

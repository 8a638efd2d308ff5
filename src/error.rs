//! Errors of the thinfs core.
//!
//! Rules:
//! - The core returns [`FsError`], a POSIX-shaped error: every variant maps to exactly one
//!   errno in [`FsError::errno`], so the FUSE adapter never has to guess.
//! - Corruption and I/O failures carry their context (the chunk, the pack, the offset) in
//!   the message, because the log line is what an operator reads when a VM gets EIO.
//! - `anyhow` is used only at the edges (CLI, mount setup), never in the core.

use std::io;

use crate::ids::{ChunkId, InodeNo};

/// Result of a core operation.
pub type Result<T, E = FsError> = std::result::Result<T, E>;

/// An error of the core, shaped after POSIX.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("no such file or directory")]
    NotFound,
    #[error("file exists")]
    Exists,
    #[error("not a directory")]
    NotDir,
    #[error("is a directory")]
    IsDir,
    #[error("directory not empty")]
    NotEmpty,
    #[error("name longer than 255 bytes")]
    NameTooLong,
    #[error("invalid argument: {0}")]
    Invalid(String),
    #[error("no such attribute")]
    NoAttr,
    #[error("attribute buffer too small")]
    Range,
    #[error("operation not supported: {0}")]
    NotSupported(String),
    #[error("read-only file system")]
    ReadOnly,
    #[error("operation not permitted")]
    Permission,
    #[error("file too large")]
    TooBig,
    #[error("no space left on device: {0}")]
    NoSpace(String),
    #[error("cross-device link: {0}")]
    CrossDevice(String),
    #[error("no data or hole past offset")]
    NoData,
    #[error("busy: {0}")]
    Busy(String),
    #[error("chunk {chunk} is corrupt ({detail})")]
    Corrupt { chunk: ChunkId, detail: String },
    #[error("damaged block map of inode {ino}: {detail}")]
    BadMap { ino: InodeNo, detail: String },
    #[error("metadata store: {0}")]
    Meta(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

impl FsError {
    /// Wraps an I/O error with what was being done; ENOSPC/EDQUOT become [`FsError::NoSpace`].
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        let context = context.into();
        match source.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => FsError::NoSpace(context),
            _ => FsError::Io { context, source },
        }
    }

    /// The errno the FUSE adapter answers with.
    pub fn errno(&self) -> i32 {
        match self {
            FsError::NotFound => libc::ENOENT,
            FsError::Exists => libc::EEXIST,
            FsError::NotDir => libc::ENOTDIR,
            FsError::IsDir => libc::EISDIR,
            FsError::NotEmpty => libc::ENOTEMPTY,
            FsError::NameTooLong => libc::ENAMETOOLONG,
            FsError::Invalid(_) => libc::EINVAL,
            FsError::NoAttr => libc::ENODATA,
            FsError::Range => libc::ERANGE,
            FsError::NotSupported(_) => libc::EOPNOTSUPP,
            FsError::ReadOnly => libc::EROFS,
            FsError::Permission => libc::EPERM,
            FsError::TooBig => libc::EFBIG,
            FsError::NoSpace(_) => libc::ENOSPC,
            FsError::CrossDevice(_) => libc::EXDEV,
            FsError::NoData => libc::ENXIO,
            FsError::Busy(_) => libc::EBUSY,
            FsError::Corrupt { .. } | FsError::BadMap { .. } | FsError::Meta(_) => libc::EIO,
            FsError::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
        }
    }

    /// Whether this error is an expected answer (ENOENT on lookup) rather than a fault
    /// worth an error-level log line.
    pub fn is_expected(&self) -> bool {
        !matches!(
            self,
            FsError::Corrupt { .. }
                | FsError::BadMap { .. }
                | FsError::Meta(_)
                | FsError::Io { .. }
                | FsError::NoSpace(_)
        )
    }
}

impl From<sled::Error> for FsError {
    fn from(e: sled::Error) -> Self {
        match e {
            sled::Error::Io(io) => FsError::io("metadata store", io),
            other => FsError::Meta(other.to_string()),
        }
    }
}

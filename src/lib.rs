//! thinfs: a datastore for virtual machines.
//!
//! Every VM file is an ordinary file whose blocks live in a content-addressed, deduplicated
//! chunk store; a clone shares a file's whole block map in O(1); snapshots freeze the
//! whole namespace by epoch. This crate is the core ([`fs::Datastore`], no FUSE in it), the
//! FUSE adapter ([`fuse`]) and the control channel the CLI uses ([`control`]).

pub mod blockmap;
pub mod cache;
pub mod chunk;
pub mod cli;
pub mod config;
pub mod control;
pub mod error;
pub mod fs;
pub mod fsck;
pub mod fuse;
pub mod gc;
pub mod ids;
pub mod meta;
pub mod mount;
pub mod scrub;
pub mod space;

pub use error::{FsError, Result};
pub use fs::{Attr, Datastore, OpenOptions, SetAttr};
pub use ids::{ChunkId, InodeNo};

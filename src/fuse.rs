//! The FUSE adapter: translates kernel requests into [`Datastore`] calls and errors into
//! errno. No filesystem logic lives here.
//!
//! Choices made at INIT: FUSE_EXPORT_SUPPORT (NFS servers may look up "." and ".." of any
//! node id we ever handed out; ids are inode numbers, never reused), READDIRPLUS, 1 MiB
//! writes. POSIX/OFD/flock locks are left to the kernel on purpose: QEMU's image locking
//! works with kernel-local locks, and forwarding them broke QEMU on other FUSE filesystems.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use dashmap::DashMap;
use fuser::{
    FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus,
    ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request,
    TimeOrNow,
};

use crate::error::FsError;
use crate::fs::namespace::Creator;
use crate::fs::snapshot::Node;
use crate::fs::{Attr, Datastore, SetAttr, Whence};
use crate::ids::InodeNo;
use crate::meta::{FileKind, Timestamp};

/// How long the kernel may cache attributes and names.
const TTL: Duration = Duration::from_secs(1);
/// Readahead asked of the kernel (the mount also raises its bdi's to it: `crate::mount`).
pub const MAX_READAHEAD: u32 = 1 << 20;
/// Generation of every node id: ids are never reused, so it never changes.
const GENERATION: Generation = Generation(0);

/// A directory listing: (name, node id, kind), "." and ".." first.
type Listing = Arc<Vec<(Vec<u8>, InodeNo, FileKind)>>;

/// The FUSE filesystem over one datastore.
pub struct ThinFuse {
    ds: Arc<Datastore>,
    /// Directory listings taken at opendir, by handle.
    listings: DashMap<u64, Listing>,
    next_fh: AtomicU64,
    /// Tells the kernel about attribute changes it did not ask for (set once the
    /// session exists: see [`ThinFuse::notifier_slot`]).
    notifier: Arc<std::sync::OnceLock<fuser::Notifier>>,
}

impl ThinFuse {
    pub fn new(ds: Arc<Datastore>) -> Self {
        ThinFuse {
            ds,
            listings: DashMap::new(),
            next_fh: AtomicU64::new(1),
            notifier: Arc::default(),
        }
    }

    /// Tells the kernel that `ino`'s attributes changed under it (its mode or xattrs,
    /// when a write dropped privileges): attributes only (offset -1), so no page of the
    /// file waits on a write in progress. Called after the reply.
    fn attrs_changed(&self, ino: InodeNo) {
        if let Some(notifier) = self.notifier.get() {
            if let Err(e) = notifier.inval_inode(fuser::INodeNo(ino.0), -1, 0) {
                tracing::debug!("attribute invalidation of inode {ino}: {e}");
            }
        }
    }

    /// Where the mount puts the session's notifier.
    pub fn notifier_slot(&self) -> Arc<std::sync::OnceLock<fuser::Notifier>> {
        self.notifier.clone()
    }

    fn listing(&self, ino: InodeNo, fh: u64) -> Result<Listing, FsError> {
        if let Some(l) = self.listings.get(&fh) {
            return Ok(l.clone());
        }
        let l = Arc::new(self.take_listing(ino)?);
        self.listings.insert(fh, l.clone());
        Ok(l)
    }

    fn take_listing(&self, ino: InodeNo) -> Result<Vec<(Vec<u8>, InodeNo, FileKind)>, FsError> {
        Ok(self
            .ds
            .node_readdir(ino.0)?
            .into_iter()
            .map(|(n, id, k)| (n, InodeNo(id), k))
            .collect())
    }
}

fn errno(op: &str, e: FsError) -> fuser::Errno {
    if e.is_expected() {
        tracing::debug!("{op}: {e}");
    } else {
        tracing::error!("{op}: {e}");
    }
    fuser::Errno::from_i32(e.errno())
}

fn file_type(k: FileKind) -> FileType {
    match k {
        FileKind::File => FileType::RegularFile,
        FileKind::Dir => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
        FileKind::Fifo => FileType::NamedPipe,
        FileKind::Socket => FileType::Socket,
        FileKind::CharDev => FileType::CharDevice,
        FileKind::BlockDev => FileType::BlockDevice,
    }
}

fn fuse_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino.0),
        size: a.size,
        blocks: a.blocks,
        atime: a.atime.to_system(),
        mtime: a.mtime.to_system(),
        ctime: a.ctime.to_system(),
        crtime: a.crtime.to_system(),
        kind: file_type(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: a.blksize,
        flags: 0,
    }
}

fn time_of(t: TimeOrNow) -> Timestamp {
    match t {
        TimeOrNow::SpecificTime(t) => kernel_time(t),
        TimeOrNow::Now => Timestamp::now(),
    }
}

/// A time the kernel sent, as fuser decoded it. fuser 0.18 decodes a pre-1970 time
/// (secs < 0, nsecs) as `EPOCH - (|secs| + nsecs)` instead of `EPOCH - |secs| + nsecs`;
/// undo that here so utimensat round-trips exactly.
fn kernel_time(t: SystemTime) -> Timestamp {
    match t.duration_since(std::time::UNIX_EPOCH) {
        Ok(_) => Timestamp::from_system(t),
        Err(e) => {
            let d = e.duration();
            Timestamp {
                secs: -(d.as_secs() as i64),
                nsecs: d.subsec_nanos(),
            }
        }
    }
}

fn ino(i: INodeNo) -> InodeNo {
    InodeNo(i.0)
}

/// The live inode a mutation targets; snapshot nodes are read-only.
fn live(i: INodeNo) -> Result<InodeNo, fuser::Errno> {
    match Node::from_id(i.0) {
        Node::Live(ino) => Ok(ino),
        _ => Err(fuser::Errno::EROFS),
    }
}

/// Runs a mutation on live nodes only.
macro_rules! live {
    ($reply:expr, $($i:expr),+) => {
        ($(match live($i) { Ok(v) => v, Err(e) => return $reply.error(e) }),+)
    };
}

fn who(req: &Request) -> Creator {
    Creator {
        uid: req.uid(),
        gid: req.gid(),
    }
}

/// The caller's gid if it may not keep set-ID bits in a file it modifies (see
/// `drop_privileges` in fs.rs): the kernel's test is CAP_FSETID, which a request does
/// not carry; root stands for it.
fn without_fsetid(req: &Request) -> Option<u32> {
    (req.uid() != 0).then_some(req.gid())
}

impl Filesystem for ThinFuse {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        for cap in [
            InitFlags::FUSE_EXPORT_SUPPORT,
            InitFlags::FUSE_DO_READDIRPLUS,
            InitFlags::FUSE_READDIRPLUS_AUTO,
            InitFlags::FUSE_PARALLEL_DIROPS,
            // The kernel then marks inodes S_NOSEC and stops asking for
            // security.capability before every write (a round trip each: 4 KiB
            // write+fdatasync 2,818 -> 3,508 IOPS); the filesystem drops privileges on
            // write, truncate and chown itself (Datastore::write_as, setattr).
            InitFlags::FUSE_HANDLE_KILLPRIV_V2,
        ] {
            if let Err(missing) = config.add_capabilities(cap) {
                tracing::warn!("kernel lacks FUSE capability {missing:?}");
            }
        }
        let _ = config.set_max_write(1 << 20);
        let _ = config.set_max_readahead(MAX_READAHEAD);
        let _ = config.set_max_background(64);
        Ok(())
    }

    fn destroy(&mut self) {
        if let Err(e) = self.ds.sync_all() {
            tracing::error!("flush at unmount: {e}");
        }
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.ds.node_lookup(parent.0, name.as_bytes()) {
            Ok(a) => reply.entry(&TTL, &fuse_attr(&a), GENERATION),
            Err(e) => reply.error(errno("lookup", e)),
        }
    }

    fn getattr(&self, _req: &Request, i: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.ds.node_getattr(i.0) {
            Ok(a) => reply.attr(&TTL, &fuse_attr(&a)),
            Err(e) => reply.error(errno("getattr", e)),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        i: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let set = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: atime.map(time_of),
            mtime: mtime.map(time_of),
            ctime: ctime.map(kernel_time),
            caller_gid: without_fsetid(req),
        };
        let i = live!(reply, i);
        match self.ds.setattr(i, &set) {
            Ok(a) => reply.attr(&TTL, &fuse_attr(&a)),
            Err(e) => reply.error(errno("setattr", e)),
        }
    }

    fn readlink(&self, _req: &Request, i: INodeNo, reply: ReplyData) {
        match self.ds.node_inode(i.0) {
            Ok(t) if t.kind == FileKind::Symlink => reply.data(&t.target),
            Ok(_) => reply.error(fuser::Errno::EINVAL),
            Err(e) => reply.error(errno("readlink", e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let Some(kind) = FileKind::from_mode(mode) else {
            return reply.error(fuser::Errno::EINVAL);
        };
        let parent = live!(reply, parent);
        match self
            .ds
            .mknod(parent, name.as_bytes(), kind, mode & 0o7777, rdev, who(req))
        {
            Ok(a) => reply.entry(&TTL, &fuse_attr(&a), GENERATION),
            Err(e) => reply.error(errno("mknod", e)),
        }
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let parent = live!(reply, parent);
        match self
            .ds
            .mkdir(parent, name.as_bytes(), mode & 0o7777, who(req))
        {
            Ok(a) => reply.entry(&TTL, &fuse_attr(&a), GENERATION),
            Err(e) => reply.error(errno("mkdir", e)),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let parent = live!(reply, parent);
        match self.ds.unlink(parent, name.as_bytes()) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno("unlink", e)),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let parent = live!(reply, parent);
        match self.ds.rmdir(parent, name.as_bytes()) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno("rmdir", e)),
        }
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &std::path::Path,
        reply: ReplyEntry,
    ) {
        let parent = live!(reply, parent);
        match self.ds.symlink(
            parent,
            link_name.as_bytes(),
            target.as_os_str().as_bytes(),
            who(req),
        ) {
            Ok(a) => reply.entry(&TTL, &fuse_attr(&a), GENERATION),
            Err(e) => reply.error(errno("symlink", e)),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: fuser::RenameFlags,
        reply: ReplyEmpty,
    ) {
        let (parent, newparent) = live!(reply, parent, newparent);
        match self.ds.rename(
            parent,
            name.as_bytes(),
            newparent,
            newname.as_bytes(),
            flags.bits(),
        ) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno("rename", e)),
        }
    }

    fn link(
        &self,
        _req: &Request,
        i: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let (i, newparent) = live!(reply, i, newparent);
        match self.ds.link(i, newparent, newname.as_bytes()) {
            Ok(a) => reply.entry(&TTL, &fuse_attr(&a), GENERATION),
            Err(e) => reply.error(errno("link", e)),
        }
    }

    fn open(&self, _req: &Request, i: INodeNo, flags: fuser::OpenFlags, reply: ReplyOpen) {
        if !matches!(Node::from_id(i.0), Node::Live(_)) {
            // A deleted snapshot's nodes are gone, whatever the kernel still caches.
            if let Err(e) = self.ds.node_getattr(i.0) {
                return reply.error(errno("open", e));
            }
            // Snapshot files are immutable and need no open count.
            return if flags.0 & libc::O_ACCMODE != libc::O_RDONLY || flags.0 & libc::O_TRUNC != 0 {
                reply.error(fuser::Errno::EROFS)
            } else {
                reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE)
            };
        }
        match self.ds.open_file(ino(i)) {
            Ok(_) => reply.opened(FileHandle(0), FopenFlags::empty()),
            Err(e) => reply.error(errno("open", e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        i: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: fuser::OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        match self.ds.node_read(i.0, offset, size) {
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(errno("read", e)),
        }
    }

    fn write(
        &self,
        req: &Request,
        i: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: fuser::WriteFlags,
        _flags: fuser::OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyWrite,
    ) {
        let i = live!(reply, i);
        let caller = write_flags
            .contains(fuser::WriteFlags::FUSE_WRITE_KILL_SUIDGID)
            .then_some(req.gid());
        match self.ds.write_as(i, offset, data, caller) {
            Ok((n, dropped)) => {
                reply.written(n);
                if dropped {
                    self.attrs_changed(i);
                }
            }
            Err(e) => reply.error(errno("write", e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        i: INodeNo,
        _fh: FileHandle,
        _lock_owner: fuser::LockOwner,
        reply: ReplyEmpty,
    ) {
        let Node::Live(i) = Node::from_id(i.0) else {
            return reply.ok();
        };
        match self.ds.flush(i) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno("flush", e)),
        }
    }

    fn release(
        &self,
        _req: &Request,
        i: INodeNo,
        _fh: FileHandle,
        _flags: fuser::OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let Node::Live(i) = Node::from_id(i.0) else {
            return reply.ok();
        };
        match self.ds.release(i) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno("release", e)),
        }
    }

    fn fsync(
        &self,
        _req: &Request,
        i: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let Node::Live(i) = Node::from_id(i.0) else {
            return reply.ok();
        };
        match self.ds.fsync(i) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno("fsync", e)),
        }
    }

    fn opendir(&self, _req: &Request, i: INodeNo, _flags: fuser::OpenFlags, reply: ReplyOpen) {
        match self.take_listing(ino(i)) {
            Ok(l) => {
                let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
                self.listings.insert(fh, Arc::new(l));
                reply.opened(FileHandle(fh), FopenFlags::empty())
            }
            Err(e) => reply.error(errno("opendir", e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        i: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let listing = match self.listing(ino(i), fh.0) {
            Ok(l) => l,
            Err(e) => return reply.error(errno("readdir", e)),
        };
        for (idx, (name, child, kind)) in listing.iter().enumerate().skip(offset as usize) {
            if reply.add(
                INodeNo(child.0),
                idx as u64 + 1,
                file_type(*kind),
                OsStr::from_bytes(name),
            ) {
                break;
            }
        }
        reply.ok()
    }

    fn readdirplus(
        &self,
        _req: &Request,
        i: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let listing = match self.listing(ino(i), fh.0) {
            Ok(l) => l,
            Err(e) => return reply.error(errno("readdirplus", e)),
        };
        for (idx, (name, child, _)) in listing.iter().enumerate().skip(offset as usize) {
            let attr = match self.ds.node_getattr(child.0) {
                Ok(a) => a,
                Err(FsError::NotFound) => continue, // removed since opendir
                Err(e) => return reply.error(errno("readdirplus", e)),
            };
            if reply.add(
                INodeNo(child.0),
                idx as u64 + 1,
                OsStr::from_bytes(name),
                &TTL,
                &fuse_attr(&attr),
                GENERATION,
            ) {
                break;
            }
        }
        reply.ok()
    }

    fn releasedir(
        &self,
        _req: &Request,
        _i: INodeNo,
        fh: FileHandle,
        _flags: fuser::OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.listings.remove(&fh.0);
        reply.ok()
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _i: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.ds.sync_metadata() {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno("fsyncdir", e)),
        }
    }

    fn statfs(&self, _req: &Request, _i: INodeNo, reply: ReplyStatfs) {
        match self.ds.statfs() {
            Ok(s) => reply.statfs(
                s.blocks,
                s.blocks_free,
                s.blocks_avail,
                s.files,
                s.files_free,
                s.block_size,
                crate::fs::NAME_MAX as u32,
                s.block_size,
            ),
            Err(e) => reply.error(errno("statfs", e)),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        i: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let i = live!(reply, i);
        match self.ds.setxattr(i, name.as_bytes(), value, flags) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno("setxattr", e)),
        }
    }

    fn getxattr(&self, _req: &Request, i: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let got = self.ds.node_inode(i.0).and_then(|n| {
            n.xattrs
                .get(name.as_bytes())
                .cloned()
                .ok_or(FsError::NoAttr)
        });
        match got {
            Ok(v) if size == 0 => reply.size(v.len() as u32),
            Ok(v) if v.len() > size as usize => reply.error(fuser::Errno::ERANGE),
            Ok(v) => reply.data(&v),
            Err(e) => reply.error(errno("getxattr", e)),
        }
    }

    fn listxattr(&self, _req: &Request, i: INodeNo, size: u32, reply: ReplyXattr) {
        match self
            .ds
            .node_inode(i.0)
            .map(|n| n.xattrs.into_keys().collect::<Vec<_>>())
        {
            Ok(names) => {
                let mut buf = Vec::new();
                for n in names {
                    buf.extend_from_slice(&n);
                    buf.push(0);
                }
                if size == 0 {
                    reply.size(buf.len() as u32)
                } else if buf.len() > size as usize {
                    reply.error(fuser::Errno::ERANGE)
                } else {
                    reply.data(&buf)
                }
            }
            Err(e) => reply.error(errno("listxattr", e)),
        }
    }

    fn removexattr(&self, _req: &Request, i: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let i = live!(reply, i);
        match self.ds.removexattr(i, name.as_bytes()) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno("removexattr", e)),
        }
    }

    fn access(&self, _req: &Request, _i: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        // default_permissions: the kernel checks modes itself.
        reply.ok()
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let parent = live!(reply, parent);
        let made = self
            .ds
            .create(parent, name.as_bytes(), mode & 0o7777, who(req))
            .and_then(|a| self.ds.open_file(a.ino));
        match made {
            Ok(a) => reply.created(
                &TTL,
                &fuse_attr(&a),
                GENERATION,
                FileHandle(0),
                FopenFlags::empty(),
            ),
            Err(e) => reply.error(errno("create", e)),
        }
    }

    fn fallocate(
        &self,
        req: &Request,
        i: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let i = live!(reply, i);
        let done = self
            .ds
            .fallocate(i, offset, length, mode)
            .and_then(|_| self.ds.drop_privileges(i, without_fsetid(req)));
        match done {
            Ok(dropped) => {
                reply.ok();
                if dropped {
                    self.attrs_changed(i);
                }
            }
            Err(e) => reply.error(errno("fallocate", e)),
        }
    }

    fn lseek(
        &self,
        _req: &Request,
        i: INodeNo,
        _fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let whence = match whence {
            libc::SEEK_DATA => Whence::Data,
            libc::SEEK_HOLE => Whence::Hole,
            _ => return reply.error(fuser::Errno::EINVAL),
        };
        if offset < 0 {
            return reply.error(fuser::Errno::ENXIO);
        }
        match self.ds.node_lseek(i.0, offset as u64, whence) {
            Ok(pos) => reply.offset(pos as i64),
            Err(e) => reply.error(errno("lseek", e)),
        }
    }

    fn copy_file_range(
        &self,
        req: &Request,
        ino_in: INodeNo,
        _fh_in: FileHandle,
        offset_in: u64,
        ino_out: INodeNo,
        _fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        _flags: fuser::CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        let len = len.min(u32::MAX as u64 & !0xfff);
        let out = live!(reply, ino_out);
        let done = self
            .ds
            .copy_range_from(ino_in.0, offset_in, out, offset_out, len)
            .and_then(|n| Ok((n, self.ds.drop_privileges(out, without_fsetid(req))?)));
        match done {
            Ok((n, dropped)) => {
                reply.written(n as u32);
                if dropped {
                    self.attrs_changed(out);
                }
            }
            Err(e) => reply.error(errno("copy_file_range", e)),
        }
    }
}

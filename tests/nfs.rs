//! NFS re-export of a thinfs mount, the way hypervisors such as ESXi reach a
//! datastore: NFS-Ganesha (FSAL VFS, NFSv3 on 127.0.0.1) serves a thinfs mount
//! made with `-o allow_other`; clients are the libnfs-utils tools (nfs-cp,
//! nfs-cat, nfs-ls) and a minimal NFSv3 client below ([`nfs3`]) that keeps raw
//! file handles, so a test can use a handle long after it was looked up: across
//! `echo 2 > /proc/sys/vm/drop_caches` (the kernel evicts the FUSE inode; the
//! server must reopen it by handle, which needs FUSE_EXPORT_SUPPORT and LOOKUP
//! of "." for any node id), across a ganesha restart and across a remount of
//! the same store.
//!
//! Ganesha, rpcbind and the NFS client tools are installed with apt-get when
//! missing (CI machines are fresh); anything that cannot be set up fails the
//! test, nothing skips. Tests take a machine-wide lock (one ganesha and one
//! rpcbind at a time) and the [`Ganesha`] guard kills both at the end.
//! bindfs (a FUSE passthrough without export support) is the control: its
//! handles go stale after drop_caches.

#![allow(dead_code)]

#[path = "integration/common.rs"]
mod common;

use std::fs::{self, File, OpenOptions};
use std::io;
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirEntryExt, MetadataExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::thread::sleep;
use std::time::{Duration, Instant};

use common::*;

/// Ports of the test server: not the standard ones, so a host NFS service (if
/// any) is left alone. Every test uses the same ones under [`NfsLock`].
const NFS_PORT: u16 = 12049;
const MNT_PORT: u16 = 12048;

// ---------------------------------------------------------------------------
// A minimal NFSv3 / MOUNTv3 client (ONC RPC over TCP, AUTH_UNIX as root)
// ---------------------------------------------------------------------------

pub mod nfs3 {
    use std::io::{self, Read, Write};
    use std::net::TcpStream;
    use std::time::Duration;

    pub const NFS_PROG: u32 = 100003;
    pub const MOUNT_PROG: u32 = 100005;

    pub const NFS3_OK: u32 = 0;
    pub const NFS3ERR_NOENT: u32 = 2;
    pub const NFS3ERR_EXIST: u32 = 17;
    pub const NFS3ERR_NOTEMPTY: u32 = 66;
    pub const NFS3ERR_STALE: u32 = 70;
    pub const NFS3ERR_BADHANDLE: u32 = 10001;

    /// An NFS status other than NFS3_OK, or a transport / protocol failure.
    #[derive(Debug)]
    pub enum Error {
        Status(u32),
        Io(io::Error),
        Rpc(String),
    }

    impl Error {
        pub fn status(&self) -> Option<u32> {
            match self {
                Error::Status(s) => Some(*s),
                _ => None,
            }
        }
    }

    impl From<io::Error> for Error {
        fn from(e: io::Error) -> Error {
            Error::Io(e)
        }
    }

    impl std::fmt::Display for Error {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            match self {
                Error::Status(s) => write!(f, "NFS3 status {s} ({})", status_name(*s)),
                Error::Io(e) => write!(f, "transport: {e}"),
                Error::Rpc(m) => write!(f, "rpc: {m}"),
            }
        }
    }

    pub fn status_name(s: u32) -> &'static str {
        match s {
            0 => "NFS3_OK",
            1 => "NFS3ERR_PERM",
            2 => "NFS3ERR_NOENT",
            5 => "NFS3ERR_IO",
            13 => "NFS3ERR_ACCES",
            17 => "NFS3ERR_EXIST",
            18 => "NFS3ERR_XDEV",
            20 => "NFS3ERR_NOTDIR",
            21 => "NFS3ERR_ISDIR",
            22 => "NFS3ERR_INVAL",
            27 => "NFS3ERR_FBIG",
            28 => "NFS3ERR_NOSPC",
            30 => "NFS3ERR_ROFS",
            63 => "NFS3ERR_NAMETOOLONG",
            66 => "NFS3ERR_NOTEMPTY",
            70 => "NFS3ERR_STALE",
            10001 => "NFS3ERR_BADHANDLE",
            10004 => "NFS3ERR_NOTSUPP",
            10006 => "NFS3ERR_SERVERFAULT",
            10008 => "NFS3ERR_JUKEBOX",
            _ => "?",
        }
    }

    pub type Result<T> = std::result::Result<T, Error>;

    /// The parts of fattr3 the tests look at.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Attr {
        pub ftype: u32,
        pub mode: u32,
        pub nlink: u32,
        pub uid: u32,
        pub gid: u32,
        pub size: u64,
        pub used: u64,
        pub fsid: u64,
        pub fileid: u64,
        pub mtime: (u32, u32),
        pub ctime: (u32, u32),
    }

    pub const NF3REG: u32 = 1;
    pub const NF3DIR: u32 = 2;
    pub const NF3LNK: u32 = 5;

    // --- XDR ---------------------------------------------------------------

    #[derive(Default)]
    pub struct Enc(pub Vec<u8>);

    impl Enc {
        pub fn u32(&mut self, v: u32) -> &mut Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        pub fn u64(&mut self, v: u64) -> &mut Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        pub fn opaque(&mut self, b: &[u8]) -> &mut Self {
            self.u32(b.len() as u32);
            self.fixed(b)
        }
        pub fn fixed(&mut self, b: &[u8]) -> &mut Self {
            self.0.extend_from_slice(b);
            while self.0.len() % 4 != 0 {
                self.0.push(0);
            }
            self
        }
        pub fn str(&mut self, s: &str) -> &mut Self {
            self.opaque(s.as_bytes())
        }
    }

    pub struct Dec<'a> {
        b: &'a [u8],
        pos: usize,
    }

    impl<'a> Dec<'a> {
        pub fn new(b: &'a [u8]) -> Dec<'a> {
            Dec { b, pos: 0 }
        }
        fn take(&mut self, n: usize) -> Result<&'a [u8]> {
            if self.pos + n > self.b.len() {
                return Err(Error::Rpc(format!(
                    "reply too short: need {n} bytes at {} of {}",
                    self.pos,
                    self.b.len()
                )));
            }
            let s = &self.b[self.pos..self.pos + n];
            self.pos += n;
            Ok(s)
        }
        pub fn u32(&mut self) -> Result<u32> {
            Ok(u32::from_be_bytes(self.take(4)?.try_into().unwrap()))
        }
        pub fn u64(&mut self) -> Result<u64> {
            Ok(u64::from_be_bytes(self.take(8)?.try_into().unwrap()))
        }
        pub fn bool(&mut self) -> Result<bool> {
            Ok(self.u32()? != 0)
        }
        pub fn fixed(&mut self, n: usize) -> Result<&'a [u8]> {
            let s = self.take(n)?;
            let pad = (4 - n % 4) % 4;
            self.take(pad)?;
            Ok(s)
        }
        pub fn opaque(&mut self) -> Result<&'a [u8]> {
            let n = self.u32()? as usize;
            self.fixed(n)
        }
        pub fn fattr(&mut self) -> Result<Attr> {
            let ftype = self.u32()?;
            let mode = self.u32()?;
            let nlink = self.u32()?;
            let uid = self.u32()?;
            let gid = self.u32()?;
            let size = self.u64()?;
            let used = self.u64()?;
            let _rdev = self.u64()?;
            let fsid = self.u64()?;
            let fileid = self.u64()?;
            let _atime = (self.u32()?, self.u32()?);
            let mtime = (self.u32()?, self.u32()?);
            let ctime = (self.u32()?, self.u32()?);
            Ok(Attr {
                ftype,
                mode,
                nlink,
                uid,
                gid,
                size,
                used,
                fsid,
                fileid,
                mtime,
                ctime,
            })
        }
        pub fn post_op_attr(&mut self) -> Result<Option<Attr>> {
            if self.bool()? {
                Ok(Some(self.fattr()?))
            } else {
                Ok(None)
            }
        }
        pub fn wcc_data(&mut self) -> Result<Option<Attr>> {
            if self.bool()? {
                self.take(24)?; // pre_op_attr: size, mtime, ctime
            }
            self.post_op_attr()
        }
        pub fn post_op_fh(&mut self) -> Result<Option<Vec<u8>>> {
            if self.bool()? {
                Ok(Some(self.opaque()?.to_vec()))
            } else {
                Ok(None)
            }
        }
    }

    /// An empty sattr3 (change nothing), or one that sets mode and/or size.
    pub fn sattr(e: &mut Enc, mode: Option<u32>, size: Option<u64>) {
        match mode {
            Some(m) => e.u32(1).u32(m),
            None => e.u32(0),
        };
        e.u32(0); // uid
        e.u32(0); // gid
        match size {
            Some(s) => e.u32(1).u64(s),
            None => e.u32(0),
        };
        e.u32(0); // atime: DONT_CHANGE
        e.u32(0); // mtime: DONT_CHANGE
    }

    // --- RPC ---------------------------------------------------------------

    pub struct Conn {
        s: TcpStream,
        xid: u32,
        prog: u32,
        vers: u32,
    }

    impl Conn {
        pub fn connect(port: u16, prog: u32, vers: u32) -> io::Result<Conn> {
            let s = TcpStream::connect(("127.0.0.1", port))?;
            s.set_read_timeout(Some(Duration::from_secs(60)))?;
            s.set_write_timeout(Some(Duration::from_secs(60)))?;
            s.set_nodelay(true)?;
            Ok(Conn {
                s,
                xid: std::process::id().wrapping_mul(7919),
                prog,
                vers,
            })
        }

        /// One call; returns the procedure's result bytes (after accept_stat).
        pub fn call(&mut self, proc_: u32, args: &[u8]) -> Result<Vec<u8>> {
            self.xid = self.xid.wrapping_add(1);
            let mut e = Enc::default();
            e.u32(self.xid)
                .u32(0)
                .u32(2)
                .u32(self.prog)
                .u32(self.vers)
                .u32(proc_);
            // AUTH_UNIX as root.
            let mut cred = Enc::default();
            cred.u32(0).str("thinfs-test").u32(0).u32(0).u32(0);
            e.u32(1).opaque(&cred.0);
            e.u32(0).u32(0); // verifier AUTH_NONE
            e.0.extend_from_slice(args);
            let mut msg = ((e.0.len() as u32) | 0x8000_0000).to_be_bytes().to_vec();
            msg.extend_from_slice(&e.0);
            self.s.write_all(&msg)?;
            loop {
                let reply = self.read_record()?;
                let mut d = Dec::new(&reply);
                let xid = d.u32()?;
                if xid != self.xid {
                    continue; // a late reply to an earlier call
                }
                if d.u32()? != 1 {
                    return Err(Error::Rpc("not a reply".into()));
                }
                let reply_stat = d.u32()?;
                if reply_stat != 0 {
                    return Err(Error::Rpc(format!("call denied ({reply_stat})")));
                }
                let _vflavor = d.u32()?;
                let _vbody = d.opaque()?;
                let accept = d.u32()?;
                if accept != 0 {
                    return Err(Error::Rpc(format!("accept_stat {accept}")));
                }
                return Ok(reply[d.pos..].to_vec());
            }
        }

        fn read_record(&mut self) -> Result<Vec<u8>> {
            let mut out = Vec::new();
            loop {
                let mut h = [0u8; 4];
                self.s.read_exact(&mut h)?;
                let h = u32::from_be_bytes(h);
                let len = (h & 0x7fff_ffff) as usize;
                let start = out.len();
                out.resize(start + len, 0);
                self.s.read_exact(&mut out[start..])?;
                if h & 0x8000_0000 != 0 {
                    return Ok(out);
                }
            }
        }
    }

    /// MOUNT3 MNT: the root handle of the export at `path`.
    pub fn mount(port: u16, path: &str) -> Result<Vec<u8>> {
        let mut c = Conn::connect(port, MOUNT_PROG, 3)?;
        let mut e = Enc::default();
        e.str(path);
        let r = c.call(1, &e.0)?;
        let mut d = Dec::new(&r);
        let st = d.u32()?;
        if st != 0 {
            return Err(Error::Status(st));
        }
        Ok(d.opaque()?.to_vec())
    }

    /// An NFSv3 client connection.
    pub struct Nfs {
        c: Conn,
    }

    fn check(d: &mut Dec) -> Result<u32> {
        d.u32()
    }

    impl Nfs {
        pub fn connect(port: u16) -> Result<Nfs> {
            Ok(Nfs {
                c: Conn::connect(port, NFS_PROG, 3)?,
            })
        }

        pub fn getattr(&mut self, fh: &[u8]) -> Result<Attr> {
            let mut e = Enc::default();
            e.opaque(fh);
            let r = self.c.call(1, &e.0)?;
            let mut d = Dec::new(&r);
            match check(&mut d)? {
                0 => d.fattr(),
                s => Err(Error::Status(s)),
            }
        }

        /// SETATTR with the given mode and/or size (truncate).
        pub fn setattr(&mut self, fh: &[u8], mode: Option<u32>, size: Option<u64>) -> Result<()> {
            let mut e = Enc::default();
            e.opaque(fh);
            sattr(&mut e, mode, size);
            e.u32(0); // no guard
            let r = self.c.call(2, &e.0)?;
            let mut d = Dec::new(&r);
            match check(&mut d)? {
                0 => Ok(()),
                s => Err(Error::Status(s)),
            }
        }

        pub fn lookup(&mut self, dir: &[u8], name: &str) -> Result<(Vec<u8>, Option<Attr>)> {
            let mut e = Enc::default();
            e.opaque(dir).str(name);
            let r = self.c.call(3, &e.0)?;
            let mut d = Dec::new(&r);
            match check(&mut d)? {
                0 => {
                    let fh = d.opaque()?.to_vec();
                    let a = d.post_op_attr()?;
                    Ok((fh, a))
                }
                s => Err(Error::Status(s)),
            }
        }

        /// LOOKUP along a '/'-separated relative path.
        pub fn walk(&mut self, root: &[u8], rel: &str) -> Result<Vec<u8>> {
            let mut fh = root.to_vec();
            for part in rel.split('/').filter(|p| !p.is_empty()) {
                fh = self.lookup(&fh, part)?.0;
            }
            Ok(fh)
        }

        pub fn readlink(&mut self, fh: &[u8]) -> Result<String> {
            let mut e = Enc::default();
            e.opaque(fh);
            let r = self.c.call(5, &e.0)?;
            let mut d = Dec::new(&r);
            match check(&mut d)? {
                0 => {
                    d.post_op_attr()?;
                    Ok(String::from_utf8_lossy(d.opaque()?).into_owned())
                }
                s => Err(Error::Status(s)),
            }
        }

        /// One READ: (data, eof).
        pub fn read(&mut self, fh: &[u8], off: u64, count: u32) -> Result<(Vec<u8>, bool)> {
            let mut e = Enc::default();
            e.opaque(fh).u64(off).u32(count);
            let r = self.c.call(6, &e.0)?;
            let mut d = Dec::new(&r);
            match check(&mut d)? {
                0 => {
                    d.post_op_attr()?;
                    let _count = d.u32()?;
                    let eof = d.bool()?;
                    Ok((d.opaque()?.to_vec(), eof))
                }
                s => Err(Error::Status(s)),
            }
        }

        /// The whole file, in 64 KiB READs.
        pub fn read_all(&mut self, fh: &[u8]) -> Result<Vec<u8>> {
            let mut out = Vec::new();
            loop {
                let (data, eof) = self.read(fh, out.len() as u64, 65536)?;
                out.extend_from_slice(&data);
                if eof || data.is_empty() {
                    return Ok(out);
                }
            }
        }

        /// WRITE with FILE_SYNC, in pieces of at most 64 KiB.
        pub fn write(&mut self, fh: &[u8], off: u64, data: &[u8]) -> Result<()> {
            self.write_stable(fh, off, data, 2)
        }

        /// WRITE with the given stable_how (0 UNSTABLE, 1 DATA_SYNC, 2 FILE_SYNC).
        pub fn write_stable(&mut self, fh: &[u8], off: u64, data: &[u8], how: u32) -> Result<()> {
            let mut done = 0usize;
            while done < data.len() {
                let piece = &data[done..(done + 65536).min(data.len())];
                let mut e = Enc::default();
                e.opaque(fh)
                    .u64(off + done as u64)
                    .u32(piece.len() as u32)
                    .u32(how)
                    .opaque(piece);
                let r = self.c.call(7, &e.0)?;
                let mut d = Dec::new(&r);
                match check(&mut d)? {
                    0 => {
                        d.wcc_data()?;
                        let n = d.u32()? as usize;
                        if n == 0 {
                            return Err(Error::Rpc("WRITE wrote 0 bytes".into()));
                        }
                        done += n;
                    }
                    s => return Err(Error::Status(s)),
                }
            }
            Ok(())
        }

        fn new_object(
            &mut self,
            proc_: u32,
            args: &[u8],
            dir: &[u8],
            name: &str,
        ) -> Result<Vec<u8>> {
            let r = self.c.call(proc_, args)?;
            let mut d = Dec::new(&r);
            match check(&mut d)? {
                0 => match d.post_op_fh()? {
                    Some(fh) => Ok(fh),
                    None => Ok(self.lookup(dir, name)?.0),
                },
                s => Err(Error::Status(s)),
            }
        }

        /// COMMIT of the whole file.
        pub fn commit(&mut self, fh: &[u8]) -> Result<()> {
            let mut e = Enc::default();
            e.opaque(fh).u64(0).u32(0);
            self.status_only(21, &e.0)
        }

        /// CREATE EXCLUSIVE with a verifier (a retry with the same verifier succeeds).
        pub fn create_exclusive(
            &mut self,
            dir: &[u8],
            name: &str,
            verf: [u8; 8],
        ) -> Result<Vec<u8>> {
            let mut e = Enc::default();
            e.opaque(dir).str(name).u32(2).fixed(&verf);
            self.new_object(8, &e.0, dir, name)
        }

        /// SETATTR of mtime and atime to the given seconds (SET_TO_CLIENT_TIME).
        pub fn set_times(&mut self, fh: &[u8], atime: u32, mtime: u32) -> Result<()> {
            let mut e = Enc::default();
            e.opaque(fh);
            e.u32(0).u32(0).u32(0).u32(0); // mode uid gid size
            e.u32(2).u32(atime).u32(0);
            e.u32(2).u32(mtime).u32(0);
            e.u32(0);
            self.status_only(2, &e.0)
        }

        /// CREATE (GUARDED: fails with EXIST if present).
        pub fn create(&mut self, dir: &[u8], name: &str, mode: u32) -> Result<Vec<u8>> {
            let mut e = Enc::default();
            e.opaque(dir).str(name).u32(1);
            sattr(&mut e, Some(mode), None);
            self.new_object(8, &e.0, dir, name)
        }

        pub fn mkdir(&mut self, dir: &[u8], name: &str, mode: u32) -> Result<Vec<u8>> {
            let mut e = Enc::default();
            e.opaque(dir).str(name);
            sattr(&mut e, Some(mode), None);
            self.new_object(9, &e.0, dir, name)
        }

        pub fn symlink(&mut self, dir: &[u8], name: &str, target: &str) -> Result<Vec<u8>> {
            let mut e = Enc::default();
            e.opaque(dir).str(name);
            sattr(&mut e, None, None);
            e.str(target);
            self.new_object(10, &e.0, dir, name)
        }

        fn status_only(&mut self, proc_: u32, args: &[u8]) -> Result<()> {
            let r = self.c.call(proc_, args)?;
            let mut d = Dec::new(&r);
            match check(&mut d)? {
                0 => Ok(()),
                s => Err(Error::Status(s)),
            }
        }

        pub fn remove(&mut self, dir: &[u8], name: &str) -> Result<()> {
            let mut e = Enc::default();
            e.opaque(dir).str(name);
            self.status_only(12, &e.0)
        }

        pub fn rmdir(&mut self, dir: &[u8], name: &str) -> Result<()> {
            let mut e = Enc::default();
            e.opaque(dir).str(name);
            self.status_only(13, &e.0)
        }

        pub fn rename(&mut self, fdir: &[u8], from: &str, tdir: &[u8], to: &str) -> Result<()> {
            let mut e = Enc::default();
            e.opaque(fdir).str(from).opaque(tdir).str(to);
            self.status_only(14, &e.0)
        }

        pub fn link(&mut self, file: &[u8], dir: &[u8], name: &str) -> Result<()> {
            let mut e = Enc::default();
            e.opaque(file).opaque(dir).str(name);
            self.status_only(15, &e.0)
        }

        /// READDIR: every (name, fileid), without "." and "..".
        pub fn readdir(&mut self, dir: &[u8]) -> Result<Vec<(String, u64)>> {
            self.readdir_count(dir, 32768)
        }

        /// READDIR with `count` bytes per reply (small counts force many calls
        /// continued by cookie).
        pub fn readdir_count(&mut self, dir: &[u8], count: u32) -> Result<Vec<(String, u64)>> {
            let mut out = Vec::new();
            let mut cookie = 0u64;
            let mut verf = [0u8; 8];
            loop {
                let mut e = Enc::default();
                e.opaque(dir).u64(cookie).fixed(&verf).u32(count);
                let r = self.c.call(16, &e.0)?;
                let mut d = Dec::new(&r);
                match check(&mut d)? {
                    0 => {}
                    s => return Err(Error::Status(s)),
                }
                d.post_op_attr()?;
                verf.copy_from_slice(d.fixed(8)?);
                let mut any = false;
                while d.bool()? {
                    any = true;
                    let fileid = d.u64()?;
                    let name = String::from_utf8_lossy(d.opaque()?).into_owned();
                    cookie = d.u64()?;
                    if name != "." && name != ".." {
                        out.push((name, fileid));
                    }
                }
                let eof = d.bool()?;
                if eof || !any {
                    out.sort();
                    return Ok(out);
                }
            }
        }
    }
}

use nfs3::Nfs;

// ---------------------------------------------------------------------------
// Setup: packages, the machine-wide lock, rpcbind + ganesha guard
// ---------------------------------------------------------------------------

/// Installs nfs-ganesha, its VFS FSAL, rpcbind, libnfs-utils and bindfs if any
/// is missing (apt-get update first: fresh machines have no or old lists).
fn ensure_packages() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let vfs_fsal = Path::new("/usr/lib/x86_64-linux-gnu/ganesha/libfsalvfs.so");
        let missing = !have("ganesha.nfsd")
            || !vfs_fsal.exists()
            || !have("rpcbind")
            || !have("nfs-cp")
            || !have("nfs-ls")
            || !have("nfs-cat")
            || !have("bindfs");
        if !missing {
            return;
        }
        // Serialize with other test processes that may install at the same time.
        let _lock = FileLock::take("/run/thinfs-test-apt.lock");
        let script = "export DEBIAN_FRONTEND=noninteractive; \
            apt-get -o Acquire::Retries=3 -o DPkg::Lock::Timeout=600 update -qq && \
            apt-get -o Acquire::Retries=3 -o DPkg::Lock::Timeout=600 install -y -qq \
              --no-install-recommends nfs-ganesha nfs-ganesha-vfs rpcbind libnfs-utils bindfs";
        let out = run_timeout(
            Command::new("sh").arg("-c").arg(script),
            Duration::from_secs(900),
        );
        assert!(
            out.status.success(),
            "installing nfs-ganesha, rpcbind, libnfs-utils, bindfs failed: {}",
            describe(&out)
        );
        assert!(
            have("ganesha.nfsd") && vfs_fsal.exists() && have("rpcbind") && have("nfs-cp"),
            "packages installed but ganesha.nfsd / libfsalvfs.so / rpcbind / nfs-cp still missing"
        );
    });
}

/// An exclusive flock on a file, held until dropped.
struct FileLock(File);

impl FileLock {
    fn take(path: &str) -> FileLock {
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .unwrap_or_else(|e| panic!("open lock file {path}: {e}"));
        let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
        assert_eq!(r, 0, "flock {path}: {}", io::Error::last_os_error());
        FileLock(f)
    }
}

/// Only one test process at a time runs rpcbind + ganesha on this machine.
fn nfs_lock() -> FileLock {
    FileLock::take("/run/thinfs-nfs-tests.lock")
}

fn port_open(port: u16) -> bool {
    TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(300))
        .map(|s| {
            let _ = s.shutdown(Shutdown::Both);
        })
        .is_ok()
}

fn spawn_with_pdeathsig(cmd: &mut Command) -> io::Result<Child> {
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    cmd.spawn()
}

fn kill_child(child: &mut Child, grace: Duration) {
    if child.try_wait().ok().flatten().is_some() {
        return;
    }
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let start = Instant::now();
    while start.elapsed() < grace {
        if child.try_wait().ok().flatten().is_some() {
            return;
        }
        sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// One export of a [`Ganesha`] server.
#[derive(Clone, Debug)]
struct Export {
    id: u32,
    path: PathBuf,
    /// How FSAL VFS derives the filesystem id that every NFS handle carries.
    /// FUSE reports f_fsid 0, so "Device" (st_dev) is the unique choice, but
    /// st_dev of a FUSE mount changes when a remount gets another anonymous
    /// device number; "Major64" (the major number only: 0 for every FUSE
    /// mount) stays the same across remounts but cannot tell two FUSE exports
    /// of one server apart.
    fsid_type: &'static str,
}

impl Export {
    fn new(id: u32, path: &Path) -> Export {
        Export {
            id,
            path: path.to_path_buf(),
            fsid_type: "Device",
        }
    }
}

/// rpcbind (if none runs yet) and one ganesha.nfsd in the foreground, both
/// children of this test; dropping the guard kills both.
struct Ganesha {
    dir: PathBuf,
    exports: Vec<Export>,
    ganesha: Option<Child>,
    rpcbind: Option<Child>,
    _lock: FileLock,
}

impl Ganesha {
    /// Starts rpcbind and ganesha exporting `exports` (NFSv3, TCP, 127.0.0.1).
    /// `dir` holds the config and the logs.
    fn start(dir: &Path, exports: &[Export]) -> Ganesha {
        ensure_packages();
        let lock = nfs_lock();
        fs::create_dir_all(dir).unwrap();
        let mut g = Ganesha {
            dir: dir.to_path_buf(),
            exports: exports.to_vec(),
            ganesha: None,
            rpcbind: None,
            _lock: lock,
        };
        g.start_rpcbind();
        g.start_ganesha();
        g
    }

    fn start_rpcbind(&mut self) {
        if port_open(111) {
            return; // someone else's rpcbind: use it, leave it alone
        }
        // `rpcbind -h 127.0.0.1` crashes on Debian 12: run it plain, in the foreground.
        let log = File::create(self.dir.join("rpcbind.log")).unwrap();
        let child = spawn_with_pdeathsig(
            Command::new("rpcbind")
                .arg("-f")
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log),
        )
        .unwrap_or_else(|e| panic!("spawn rpcbind: {e}"));
        self.rpcbind = Some(child);
        let start = Instant::now();
        while !port_open(111) {
            if let Some(st) = self.rpcbind.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "rpcbind exited ({st}) before listening on 111: {}",
                    fs::read_to_string(self.dir.join("rpcbind.log")).unwrap_or_default()
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "rpcbind not listening on 127.0.0.1:111 after 20 s"
            );
            sleep(Duration::from_millis(50));
        }
    }

    fn config(&self) -> String {
        let mut c = format!(
            "NFS_CORE_PARAM {{
    Bind_addr = 127.0.0.1;
    NFS_Port = {NFS_PORT};
    MNT_Port = {MNT_PORT};
    Enable_NLM = false;
    Enable_RQUOTA = false;
    Enable_UDP = false;
    Protocols = 3;
    Plugins_Dir = /usr/lib/x86_64-linux-gnu/ganesha;
}}
NFSv4 {{ Graceless = true; }}
NFS_KRB5 {{ Active_krb5 = false; }}
LOG {{ Default_Log_Level = EVENT; }}
"
        );
        for e in &self.exports {
            // Attr_Expiration_Time = 0: ganesha asks the filesystem (by handle)
            // for every GETATTR instead of answering from its own cache.
            c.push_str(&format!(
                "EXPORT {{
    Export_Id = {};
    Path = {};
    Pseudo = {};
    Access_Type = RW;
    Squash = No_Root_Squash;
    PrivilegedPort = false;
    Protocols = 3;
    Transports = TCP;
    SecType = sys;
    Attr_Expiration_Time = 0;
    FSAL {{ Name = VFS; fsid_type = {}; }}
}}
",
                e.id,
                e.path.display(),
                e.path.display(),
                e.fsid_type
            ));
        }
        c
    }

    fn log(&self) -> String {
        let mut s = fs::read_to_string(self.dir.join("ganesha.log")).unwrap_or_default();
        s.push_str(&fs::read_to_string(self.dir.join("ganesha.out")).unwrap_or_default());
        // Only the tail matters; the start-up chatter (dbus, krb5) is long.
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }

    fn start_ganesha(&mut self) {
        assert!(self.ganesha.is_none());
        assert!(
            !port_open(NFS_PORT),
            "something already listens on 127.0.0.1:{NFS_PORT}"
        );
        let conf = self.dir.join("ganesha.conf");
        fs::write(&conf, self.config()).unwrap();
        let out = File::options()
            .create(true)
            .append(true)
            .open(self.dir.join("ganesha.out"))
            .unwrap();
        let child = spawn_with_pdeathsig(
            Command::new("ganesha.nfsd")
                .arg("-F")
                .arg("-f")
                .arg(&conf)
                .arg("-L")
                .arg(self.dir.join("ganesha.log"))
                .arg("-p")
                .arg(self.dir.join("ganesha.pid"))
                .arg("-N")
                .arg("NIV_EVENT")
                .stdin(Stdio::null())
                .stdout(out.try_clone().unwrap())
                .stderr(out),
        )
        .unwrap_or_else(|e| panic!("spawn ganesha.nfsd: {e}"));
        self.ganesha = Some(child);
        // Ready when every export answers MNT.
        let start = Instant::now();
        loop {
            if let Some(st) = self.ganesha.as_mut().unwrap().try_wait().unwrap() {
                self.ganesha = None;
                panic!(
                    "ganesha.nfsd exited ({st}) during start-up; log:\n{}",
                    self.log()
                );
            }
            let ready = port_open(NFS_PORT)
                && self
                    .exports
                    .iter()
                    .all(|e| nfs3::mount(MNT_PORT, e.path.to_str().unwrap()).is_ok());
            if ready {
                return;
            }
            if start.elapsed() > Duration::from_secs(60) {
                panic!(
                    "ganesha not serving the exports after 60 s; log:\n{}",
                    self.log()
                );
            }
            sleep(Duration::from_millis(200));
        }
    }

    /// Stops ganesha (the exported mounts are then no longer busy).
    fn stop_ganesha(&mut self) {
        if let Some(mut c) = self.ganesha.take() {
            kill_child(&mut c, Duration::from_secs(10));
        }
        let start = Instant::now();
        while port_open(NFS_PORT) && start.elapsed() < Duration::from_secs(10) {
            sleep(Duration::from_millis(50));
        }
    }

    fn restart_ganesha(&mut self) {
        self.stop_ganesha();
        self.start_ganesha();
    }

    /// Files ganesha holds open (from /proc/PID/fd).
    fn open_files(&self) -> Vec<PathBuf> {
        let pid = self.ganesha.as_ref().expect("ganesha not running").id();
        fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| fs::read_link(e.path()).ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The root handle of export `path` (MOUNT3 MNT).
    fn root(&self, path: &Path) -> Vec<u8> {
        nfs3::mount(MNT_PORT, path.to_str().unwrap())
            .unwrap_or_else(|e| panic!("MNT {path:?}: {e}; ganesha log:\n{}", self.log()))
    }

    fn client(&self) -> Nfs {
        Nfs::connect(NFS_PORT)
            .unwrap_or_else(|e| panic!("connect to ganesha: {e}; log:\n{}", self.log()))
    }

    /// `nfs://127.0.0.1/EXPORT/rel?version=3&...` for the libnfs tools.
    fn url(&self, export: &Path, rel: &str) -> String {
        let mut p = export.to_str().unwrap().to_string();
        if !rel.is_empty() {
            p.push('/');
            p.push_str(rel);
        }
        format!("nfs://127.0.0.1{p}?version=3&nfsport={NFS_PORT}&mountport={MNT_PORT}")
    }
}

impl Drop for Ganesha {
    fn drop(&mut self) {
        self.stop_ganesha();
        if let Some(mut c) = self.rpcbind.take() {
            kill_child(&mut c, Duration::from_secs(5));
        }
    }
}

/// A thinfs mount with `-o allow_other` (as a datastore is mounted for NFS
/// servers and QEMU running as other users).
fn datastore() -> Mount {
    Mount::with(MountOptions {
        block_size: None,
        mount_args: vec!["-o".into(), "allow_other".into()],
    })
}

fn drop_caches() {
    unsafe { libc::sync() };
    fs::write("/proc/sys/vm/drop_caches", "2\n").expect("write /proc/sys/vm/drop_caches");
}

#[track_caller]
fn ok<T>(r: nfs3::Result<T>, what: &str, g: &Ganesha, m: &Mount) -> T {
    r.unwrap_or_else(|e| {
        panic!(
            "{what}: {e}\n--- ganesha log (tail) ---\n{}\n--- thinfs daemon log ---\n{}",
            g.log(),
            m.daemon_log()
        )
    })
}

fn nfs_tool(args: &[&str]) -> std::process::Output {
    let (cmd, rest) = args.split_first().unwrap();
    run_timeout(Command::new(cmd).args(rest), Duration::from_secs(120))
}

/// A bindfs (FUSE passthrough, no export support) mount of `src` at `mnt`;
/// unmounted on drop.
struct Bindfs {
    mnt: PathBuf,
}

impl Bindfs {
    fn new(src: &Path, mnt: &Path) -> Bindfs {
        fs::create_dir_all(src).unwrap();
        fs::create_dir_all(mnt).unwrap();
        run_ok(
            Command::new("bindfs")
                .arg("-o")
                .arg("allow_other")
                .arg(src)
                .arg(mnt),
        );
        Bindfs {
            mnt: mnt.to_path_buf(),
        }
    }
}

impl Drop for Bindfs {
    fn drop(&mut self) {
        force_unmount(&self.mnt);
    }
}

// ---------------------------------------------------------------------------
// Kernel handles without NFS: what every NFS server relies on
// ---------------------------------------------------------------------------

#[repr(C)]
struct FileHandle {
    bytes: u32,
    htype: i32,
    h: [u8; 128],
}

fn name_to_handle(p: &Path) -> io::Result<FileHandle> {
    let mut fh = FileHandle {
        bytes: 128,
        htype: 0,
        h: [0; 128],
    };
    let mut mount_id: i32 = 0;
    let r = unsafe {
        libc::syscall(
            libc::SYS_name_to_handle_at,
            libc::AT_FDCWD,
            cpath(p).as_ptr(),
            &mut fh as *mut FileHandle,
            &mut mount_id as *mut i32,
            0,
        )
    };
    cvt(r).map(|_| fh)
}

fn open_by_handle(mount_fd: &File, fh: &FileHandle) -> io::Result<File> {
    use std::os::fd::FromRawFd;
    let r = unsafe {
        libc::syscall(
            libc::SYS_open_by_handle_at,
            mount_fd.as_raw_fd(),
            fh as *const FileHandle,
            libc::O_RDONLY,
        )
    };
    cvt(r).map(|fd| unsafe { File::from_raw_fd(fd as i32) })
}

/// drop_caches until open_by_handle_at of `h` on the bindfs mount fails with
/// ESTALE (the inode is evicted; a dirty inode under writeback may survive one
/// drop). A successful probe opens and closes the file, pinning nothing.
fn evicted_from_bindfs(mnt: &Path, h: &FileHandle) -> bool {
    let mount_fd = File::open(mnt).unwrap();
    for _ in 0..20 {
        drop_caches();
        match open_by_handle(&mount_fd, h) {
            Err(e) if e.raw_os_error() == Some(libc::ESTALE) => return true,
            Err(e) => panic!("open_by_handle_at on bindfs: unexpected {e}"),
            Ok(_) => sleep(Duration::from_millis(100)),
        }
    }
    false
}

/// name_to_handle_at on a thinfs file, the inode evicted, open_by_handle_at
/// still works (FUSE_EXPORT_SUPPORT + LOOKUP "." by node id); also after a
/// remount of the same store (node ids are persistent). bindfs: ESTALE.
#[test]
fn kernel_handles_survive_eviction_and_remount() {
    let mut m = datastore();
    fs::create_dir_all(m.path("d/e")).unwrap();
    fs::write(m.path("d/e/f.txt"), b"by handle\n").unwrap();
    fs::write(m.path("top.txt"), b"top\n").unwrap();
    let paths = ["d", "d/e", "d/e/f.txt", "top.txt"];
    let handles: Vec<FileHandle> = paths
        .iter()
        .map(|p| {
            name_to_handle(&m.path(p))
                .unwrap_or_else(|e| panic!("name_to_handle_at {p}: {e} (FUSE_EXPORT_SUPPORT?)"))
        })
        .collect();
    let inos: Vec<u64> = paths
        .iter()
        .map(|p| fs::metadata(m.path(p)).unwrap().ino())
        .collect();
    let check = |m: &Mount, round: &str| {
        let mount_fd = File::open(&m.mnt).unwrap();
        for (i, p) in paths.iter().enumerate() {
            drop_caches();
            let f = open_by_handle(&mount_fd, &handles[i]).unwrap_or_else(|e| {
                panic!(
                    "{round}: open_by_handle_at({p}) after drop_caches: {e}\ndaemon log:\n{}",
                    m.daemon_log()
                )
            });
            assert_eq!(
                f.metadata().unwrap().ino(),
                inos[i],
                "{round}: handle of {p} opened another inode"
            );
            if p.ends_with(".txt") {
                let want = fs::read(m.path(p)).unwrap();
                assert_eq!(
                    read_at(&f, 0, 100),
                    want,
                    "{round}: content of {p} by handle"
                );
            }
        }
    };
    check(&m, "same mount");
    m.remount();
    check(&m, "after remount");

    // A deleted file's handle is stale, not another file.
    fs::remove_file(m.path("top.txt")).unwrap();
    fs::write(m.path("new.txt"), b"new\n").unwrap();
    drop_caches();
    let mount_fd = File::open(&m.mnt).unwrap();
    assert_errno(
        open_by_handle(&mount_fd, &handles[3]).map(|_| ()),
        libc::ESTALE,
        "open_by_handle_at of a deleted file",
    );

    // Control: bindfs has no export support, so the evicted inode is gone.
    let b = Bindfs::new(&m.scratch().join("bsrc"), &m.scratch().join("bmnt"));
    fs::write(b.mnt.join("x.txt"), b"x").unwrap();
    let h = name_to_handle(&b.mnt.join("x.txt")).unwrap();
    assert!(
        evicted_from_bindfs(&b.mnt, &h),
        "control: bindfs open_by_handle_at never failed with ESTALE after drop_caches"
    );
}

/// After `kill -9` of the daemon, a handle handed out before the crash either
/// resolves to the same file or is stale: node ids of files whose creation was
/// lost are never given to new files (NFS handles carry a constant generation,
/// so a reused node id would silently name another file).
#[test]
fn kernel_handles_after_kill9_never_name_another_file() {
    let mut m = datastore();
    fs::write(m.path("durable.txt"), b"durable\n").unwrap();
    File::open(m.path("durable.txt"))
        .unwrap()
        .sync_all()
        .unwrap();
    let hd = name_to_handle(&m.path("durable.txt")).unwrap();
    let mut volatile = Vec::new();
    for i in 0..20 {
        let p = m.path(&format!("volatile-{i}"));
        fs::write(&p, format!("volatile {i}\n")).unwrap();
        volatile.push((
            name_to_handle(&p).unwrap(),
            fs::metadata(&p).unwrap().ino(),
            i,
        ));
    }
    m.kill9();
    m.remount();
    let mut new_inos = std::collections::HashMap::new();
    for i in 0..40 {
        let p = m.path(&format!("after-{i}"));
        fs::write(&p, format!("after the crash {i}\n")).unwrap();
        new_inos.insert(fs::metadata(&p).unwrap().ino(), i);
    }
    drop_caches();
    let mount_fd = File::open(&m.mnt).unwrap();
    let f = open_by_handle(&mount_fd, &hd).expect("fsynced file by handle after kill -9");
    assert_eq!(read_at(&f, 0, 100), b"durable\n");
    for (h, ino, i) in &volatile {
        assert!(
            !new_inos.contains_key(ino),
            "inode number {ino} of volatile-{i} (lost or not) was given to after-{} after kill -9",
            new_inos[ino]
        );
        match open_by_handle(&mount_fd, h) {
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::ESTALE), "volatile-{i}: {e}"),
            Ok(f) => {
                let md = f.metadata().unwrap();
                assert_eq!(
                    md.ino(),
                    *ino,
                    "handle of volatile-{i} opened another inode"
                );
                let got = read_at(&f, 0, 100);
                assert!(
                    got.is_empty() || got == format!("volatile {i}\n").as_bytes(),
                    "handle of volatile-{i} reads {got:?}"
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Through ganesha
// ---------------------------------------------------------------------------

/// nfs-cp into the export and read back on the FUSE side; the reverse; nfs-cat,
/// nfs-ls; unaligned WRITEs and READs at offsets.
#[test]
fn nfs_data_both_ways() {
    let m = datastore();
    let g = Ganesha::start(&m.scratch().join("ganesha"), &[Export::new(1, &m.mnt)]);
    let mut rng = Rng::new(0x4e46_5301);
    let local = m.scratch().join("local");
    fs::create_dir(&local).unwrap();

    // local -> NFS -> FUSE
    let data_in = rng.bytes(5 * MIB as usize + 123);
    fs::write(local.join("in.bin"), &data_in).unwrap();
    let out = nfs_tool(&[
        "nfs-cp",
        local.join("in.bin").to_str().unwrap(),
        &g.url(&m.mnt, "in.bin"),
    ]);
    assert!(out.status.success(), "nfs-cp to NFS: {}", describe(&out));
    assert_same_bytes(
        &fs::read(m.path("in.bin")).unwrap(),
        &data_in,
        "nfs-cp'd file on FUSE side",
    );

    // FUSE -> NFS -> local
    let data_out = rng.bytes(3 * MIB as usize + 7);
    fs::write(m.path("out.bin"), &data_out).unwrap();
    fs::write(m.path("note.txt"), b"written on the FUSE side\n").unwrap();
    let out = nfs_tool(&[
        "nfs-cp",
        &g.url(&m.mnt, "out.bin"),
        local.join("out.bin").to_str().unwrap(),
    ]);
    assert!(out.status.success(), "nfs-cp from NFS: {}", describe(&out));
    assert_same_bytes(
        &fs::read(local.join("out.bin")).unwrap(),
        &data_out,
        "nfs-cp'd file from NFS",
    );
    let out = nfs_tool(&["nfs-cat", &g.url(&m.mnt, "note.txt")]);
    assert!(out.status.success(), "nfs-cat: {}", describe(&out));
    assert_eq!(out.stdout, b"written on the FUSE side\n");

    // Readdir through nfs-ls.
    fs::create_dir(m.path("dir")).unwrap();
    for i in 0..50 {
        fs::write(m.path(&format!("dir/f{i:03}")), format!("{i}")).unwrap();
    }
    let out = nfs_tool(&["nfs-ls", &g.url(&m.mnt, "dir")]);
    assert!(out.status.success(), "nfs-ls: {}", describe(&out));
    let mut listed: Vec<String> = stdout_str(&out)
        .lines()
        .filter_map(|l| l.split_whitespace().last().map(str::to_string))
        .filter(|n| n != "." && n != "..")
        .collect();
    listed.sort();
    let want: Vec<String> = (0..50).map(|i| format!("f{i:03}")).collect();
    assert_eq!(listed, want, "nfs-ls of dir");

    // Unaligned WRITEs at offsets through the raw client; the FUSE side sees them.
    let mut c = g.client();
    let root = g.root(&m.mnt);
    let fh = ok(c.walk(&root, "in.bin"), "LOOKUP in.bin", &g, &m);
    let mut model = data_in.clone();
    for _ in 0..40 {
        let off = rng.below(6 * MIB) as usize;
        let len = 1 + rng.below(200_000) as usize;
        let buf = rng.bytes(len);
        ok(c.write(&fh, off as u64, &buf), "WRITE", &g, &m);
        if model.len() < off + len {
            model.resize(off + len, 0);
        }
        model[off..off + len].copy_from_slice(&buf);
    }
    let attr = ok(c.getattr(&fh), "GETATTR", &g, &m);
    assert_eq!(attr.size, model.len() as u64, "size over NFS after WRITEs");
    assert_same_bytes(
        &fs::read(m.path("in.bin")).unwrap(),
        &model,
        "FUSE side after NFS WRITEs",
    );
    assert_same_bytes(
        &ok(c.read_all(&fh), "READ", &g, &m),
        &model,
        "NFS READ after NFS WRITEs",
    );
    // A FUSE-side overwrite is seen by the next NFS READ.
    {
        use std::os::unix::fs::FileExt;
        let f = OpenOptions::new()
            .write(true)
            .open(m.path("in.bin"))
            .unwrap();
        f.write_all_at(b"FUSE WAS HERE", 4097).unwrap();
        f.sync_all().unwrap();
        model[4097..4097 + 13].copy_from_slice(b"FUSE WAS HERE");
    }
    let (got, _) = ok(c.read(&fh, 4000, 200), "READ after FUSE write", &g, &m);
    assert_same_bytes(&got, &model[4000..4200], "NFS READ after a FUSE-side write");
    drop(g);
}

/// CREATE, MKDIR, RENAME, LINK, SYMLINK/READLINK, SETATTR (truncate, chmod),
/// READDIR, REMOVE, RMDIR through NFS, each checked on the FUSE side.
#[test]
fn nfs_namespace_ops() {
    let m = datastore();
    let g = Ganesha::start(&m.scratch().join("ganesha"), &[Export::new(1, &m.mnt)]);
    let mut c = g.client();
    let root = g.root(&m.mnt);
    let data = Rng::new(77).bytes(300_000);

    let d = ok(c.mkdir(&root, "vm1", 0o755), "MKDIR vm1", &g, &m);
    assert!(m.path("vm1").is_dir(), "MKDIR not visible on FUSE side");
    let f = ok(
        c.create(&d, "disk.raw", 0o644),
        "CREATE vm1/disk.raw",
        &g,
        &m,
    );
    ok(c.write(&f, 0, &data), "WRITE", &g, &m);
    assert_eq!(fs::read(m.path("vm1/disk.raw")).unwrap(), data);
    assert_eq!(
        fs::metadata(m.path("vm1/disk.raw")).unwrap().mode() & 0o7777,
        0o644
    );
    match c.create(&d, "disk.raw", 0o644) {
        Err(e) if e.status() == Some(nfs3::NFS3ERR_EXIST) => {}
        other => panic!("GUARDED CREATE of an existing name: {other:?}"),
    }

    // RENAME within a dir and across dirs; the handle stays valid.
    ok(c.rename(&d, "disk.raw", &d, "disk0.raw"), "RENAME", &g, &m);
    assert!(!m.path("vm1/disk.raw").exists());
    assert_eq!(fs::read(m.path("vm1/disk0.raw")).unwrap(), data);
    let d2 = ok(c.mkdir(&root, "vm2", 0o750), "MKDIR vm2", &g, &m);
    ok(
        c.rename(&d, "disk0.raw", &d2, "moved.raw"),
        "RENAME across dirs",
        &g,
        &m,
    );
    assert_eq!(fs::read(m.path("vm2/moved.raw")).unwrap(), data);
    assert_eq!(
        ok(c.getattr(&f), "GETATTR after rename", &g, &m).size,
        data.len() as u64
    );
    // RENAME over an existing file replaces it.
    fs::write(m.path("vm2/victim"), b"old").unwrap();
    ok(
        c.rename(&d2, "moved.raw", &d2, "victim"),
        "RENAME over a file",
        &g,
        &m,
    );
    assert_eq!(fs::read(m.path("vm2/victim")).unwrap(), data);
    assert!(!m.path("vm2/moved.raw").exists());

    // LINK: same inode, nlink 2 on both sides.
    ok(c.link(&f, &d, "hard"), "LINK", &g, &m);
    let a = fs::metadata(m.path("vm1/hard")).unwrap();
    let b = fs::metadata(m.path("vm2/victim")).unwrap();
    assert_eq!(a.ino(), b.ino(), "hard link has another inode on FUSE side");
    assert_eq!(a.nlink(), 2, "nlink on FUSE side after NFS LINK");
    assert_eq!(
        ok(c.getattr(&f), "GETATTR", &g, &m).nlink,
        2,
        "nlink over NFS"
    );

    // SYMLINK + READLINK, both directions.
    ok(c.symlink(&d, "lnk", "../vm2/victim"), "SYMLINK", &g, &m);
    assert_eq!(
        fs::read_link(m.path("vm1/lnk")).unwrap(),
        PathBuf::from("../vm2/victim")
    );
    assert_eq!(
        fs::read(m.path("vm1/lnk")).unwrap(),
        data,
        "through the symlink"
    );
    std::os::unix::fs::symlink("/some/where", m.path("vm1/fuselink")).unwrap();
    let lf = ok(c.walk(&root, "vm1/fuselink"), "LOOKUP fuselink", &g, &m);
    assert_eq!(ok(c.readlink(&lf), "READLINK", &g, &m), "/some/where");

    // SETATTR: truncate down, up, chmod.
    ok(c.setattr(&f, None, Some(1000)), "SETATTR size 1000", &g, &m);
    assert_eq!(fs::read(m.path("vm1/hard")).unwrap(), &data[..1000]);
    ok(
        c.setattr(&f, None, Some(5 * MIB)),
        "SETATTR size 5 MiB",
        &g,
        &m,
    );
    let got = fs::read(m.path("vm1/hard")).unwrap();
    assert_eq!(got.len() as u64, 5 * MIB);
    assert_eq!(&got[..1000], &data[..1000]);
    assert!(
        got[1000..].iter().all(|&x| x == 0),
        "extension is not zeros"
    );
    ok(c.setattr(&f, Some(0o600), None), "SETATTR mode", &g, &m);
    assert_eq!(
        fs::metadata(m.path("vm1/hard")).unwrap().mode() & 0o7777,
        0o600
    );

    // READDIR agrees with the FUSE side, names and inode numbers.
    for i in 0..300 {
        fs::write(m.path(&format!("vm1/n{i:04}")), b"").unwrap();
    }
    let mut fuse_side: Vec<(String, u64)> = fs::read_dir(m.path("vm1"))
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (e.file_name().to_string_lossy().into_owned(), e.ino())
        })
        .collect();
    fuse_side.sort();
    let nfs_side = ok(c.readdir(&d), "READDIR", &g, &m);
    assert_eq!(
        nfs_side.iter().map(|x| &x.0).collect::<Vec<_>>(),
        fuse_side.iter().map(|x| &x.0).collect::<Vec<_>>(),
        "READDIR names"
    );
    assert_eq!(nfs_side, fuse_side, "READDIR fileids vs FUSE inode numbers");

    // READDIR in small replies, continued by cookie.
    let small = ok(c.readdir_count(&d, 1024), "READDIR count 1024", &g, &m);
    assert_eq!(small, fuse_side, "READDIR with cookies");

    // UNSTABLE writes + COMMIT; DATA_SYNC.
    let u = ok(
        c.create(&d2, "unstable.bin", 0o644),
        "CREATE unstable",
        &g,
        &m,
    );
    let udata = Rng::new(78).bytes(1_000_003);
    ok(c.write_stable(&u, 0, &udata, 0), "WRITE UNSTABLE", &g, &m);
    ok(c.commit(&u), "COMMIT", &g, &m);
    ok(
        c.write_stable(&u, 5, b"data-sync", 1),
        "WRITE DATA_SYNC",
        &g,
        &m,
    );
    let mut want = udata.clone();
    want[5..14].copy_from_slice(b"data-sync");
    assert_same_bytes(
        &fs::read(m.path("vm2/unstable.bin")).unwrap(),
        &want,
        "after COMMIT",
    );

    // SETATTR times (what `touch -d` and cp -p do over NFS).
    ok(
        c.set_times(&u, 1_000_000_000, 1_234_567_890),
        "SETATTR times",
        &g,
        &m,
    );
    let md = fs::metadata(m.path("vm2/unstable.bin")).unwrap();
    assert_eq!(
        (md.atime(), md.mtime()),
        (1_000_000_000, 1_234_567_890),
        "times on FUSE side"
    );
    assert_eq!(ok(c.getattr(&u), "GETATTR", &g, &m).mtime.0, 1_234_567_890);

    // EXCLUSIVE CREATE: the retry with the same verifier succeeds (same
    // file), another verifier gets EXIST.
    let v1 = *b"verifier";
    let x1 = ok(
        c.create_exclusive(&d2, "excl", v1),
        "CREATE EXCLUSIVE",
        &g,
        &m,
    );
    let x2 = ok(
        c.create_exclusive(&d2, "excl", v1),
        "CREATE EXCLUSIVE retry",
        &g,
        &m,
    );
    assert_eq!(
        ok(c.getattr(&x1), "GETATTR", &g, &m).fileid,
        ok(c.getattr(&x2), "GETATTR", &g, &m).fileid
    );
    match c.create_exclusive(&d2, "excl", *b"other-vf") {
        Err(e) if e.status() == Some(nfs3::NFS3ERR_EXIST) => {}
        other => panic!("EXCLUSIVE CREATE with another verifier: {other:?}"),
    }
    ok(
        c.write(&x1, 0, b"x"),
        "WRITE to exclusive-created file",
        &g,
        &m,
    );
    assert_eq!(fs::read(m.path("vm2/excl")).unwrap(), b"x");

    // RENAME of a directory, then its old handle still works.
    let sub = ok(c.mkdir(&d2, "sub", 0o755), "MKDIR sub", &g, &m);
    ok(c.create(&sub, "inner", 0o644), "CREATE inner", &g, &m);
    ok(
        c.rename(&d2, "sub", &root, "sub-moved"),
        "RENAME dir",
        &g,
        &m,
    );
    assert!(m.path("sub-moved/inner").exists());
    let (inner, _) = ok(
        c.lookup(&sub, "inner"),
        "LOOKUP in renamed dir by old handle",
        &g,
        &m,
    );
    drop_caches();
    ok(
        c.getattr(&inner),
        "GETATTR after dir rename + drop_caches",
        &g,
        &m,
    );
    ok(
        c.readdir(&sub),
        "READDIR renamed dir after drop_caches",
        &g,
        &m,
    );

    // REMOVE and RMDIR (NOTEMPTY first).
    match c.rmdir(&root, "vm1") {
        Err(e) if e.status() == Some(nfs3::NFS3ERR_NOTEMPTY) => {}
        other => panic!("RMDIR of a non-empty dir: {other:?}"),
    }
    for (n, _) in &nfs_side {
        ok(c.remove(&d, n), &format!("REMOVE vm1/{n}"), &g, &m);
    }
    assert_eq!(fs::read_dir(m.path("vm1")).unwrap().count(), 0);
    assert_eq!(fs::metadata(m.path("vm2/victim")).unwrap().nlink(), 1);
    ok(c.rmdir(&root, "vm1"), "RMDIR", &g, &m);
    assert!(!m.path("vm1").exists());
    match c.getattr(&d) {
        Err(e) if e.status() == Some(nfs3::NFS3ERR_STALE) => {}
        other => panic!("GETATTR of a removed dir's handle: expected STALE, got {other:?}"),
    }
    match c.lookup(&root, "vm1") {
        Err(e) if e.status() == Some(nfs3::NFS3ERR_NOENT) => {}
        other => panic!("LOOKUP of a removed dir: {other:?}"),
    }
    drop(g);
}

/// Handles looked up once keep working after the kernel evicted the FUSE
/// inodes (drop_caches), for files ganesha never opened, for directories
/// (LOOKUP and READDIR through an evicted dir) and for a file being read in
/// pieces with a drop_caches between pieces. bindfs, exported from the same
/// server, is the control: its handle goes stale.
#[test]
fn nfs_handles_survive_drop_caches() {
    let m = datastore();
    let bsrc = m.scratch().join("bsrc");
    let b = Bindfs::new(&bsrc, &m.scratch().join("bmnt"));
    let mut rng = Rng::new(0x4e46_5303);
    fs::create_dir_all(m.path("a/b")).unwrap();
    let big = rng.bytes(2 * MIB as usize + 5);
    fs::write(m.path("a/b/big.bin"), &big).unwrap();
    for i in 0..10 {
        fs::write(m.path(&format!("a/f{i}")), format!("file {i}\n")).unwrap();
    }
    fs::write(b.mnt.join("ctl.txt"), b"control\n").unwrap();

    let g = Ganesha::start(
        &m.scratch().join("ganesha"),
        &[Export::new(1, &m.mnt), Export::new(2, &b.mnt)],
    );
    let mut c = g.client();
    let root = g.root(&m.mnt);
    let a = ok(c.walk(&root, "a"), "LOOKUP a", &g, &m);
    let ab = ok(c.walk(&root, "a/b"), "LOOKUP a/b", &g, &m);
    let bigf = ok(c.walk(&root, "a/b/big.bin"), "LOOKUP big.bin", &g, &m);
    // LOOKUP only (no GETATTR, no READ): ganesha opens no fd on these files,
    // so nothing pins their kernel inodes.
    let looked: Vec<(Vec<u8>, nfs3::Attr)> = (0..10)
        .map(|i| {
            let (fh, at) = ok(c.lookup(&a, &format!("f{i}")), "LOOKUP f", &g, &m);
            (fh, at.expect("LOOKUP returned no attributes"))
        })
        .collect();
    let open = g.open_files();
    assert!(
        !open.iter().any(|p| p.starts_with(m.path("a"))),
        "ganesha holds files under a/ open, so eviction would not be tested: {open:?}"
    );

    for round in 0..3 {
        drop_caches();
        // GETATTR: ganesha must reopen the files by handle.
        for (i, (fh, at0)) in looked.iter().enumerate() {
            let at = ok(
                c.getattr(fh),
                &format!("round {round}: GETATTR a/f{i} after drop_caches"),
                &g,
                &m,
            );
            assert_eq!(at.fileid, at0.fileid);
            assert_eq!(at.size, at0.size);
        }
        drop_caches();
        // LOOKUP and READDIR in evicted directories.
        let (fh, _) = ok(c.lookup(&ab, "big.bin"), "LOOKUP in evicted a/b", &g, &m);
        assert_eq!(
            ok(c.getattr(&fh), "GETATTR", &g, &m).fileid,
            ok(c.getattr(&bigf), "GETATTR", &g, &m).fileid
        );
        drop_caches();
        let names: Vec<String> = ok(c.readdir(&a), "READDIR evicted a", &g, &m)
            .into_iter()
            .map(|x| x.0)
            .collect();
        assert_eq!(names.len(), 11, "READDIR a: {names:?}");
        // Contents after eviction (round 0: the first READ ever of each file).
        drop_caches();
        for (i, (fh, _)) in looked.iter().enumerate() {
            let got = ok(c.read_all(fh), "READ after drop_caches", &g, &m);
            assert_eq!(got, format!("file {i}\n").as_bytes());
        }
    }
    // Keep reading a big file across drop_caches.
    let mut got = Vec::new();
    let mut n = 0;
    loop {
        let (data, eof) = ok(c.read(&bigf, got.len() as u64, 65536), "READ piece", &g, &m);
        got.extend_from_slice(&data);
        n += 1;
        if n % 4 == 0 {
            drop_caches();
        }
        if eof || data.is_empty() {
            break;
        }
    }
    assert_same_bytes(&got, &big, "big.bin read in pieces across drop_caches");
    // New files through NFS, then eviction, then their handles.
    let nf = ok(c.create(&ab, "new.txt", 0o644), "CREATE", &g, &m);
    ok(c.write(&nf, 0, b"created over NFS\n"), "WRITE", &g, &m);
    drop_caches();
    assert_eq!(
        ok(c.read_all(&nf), "READ new after drop", &g, &m),
        b"created over NFS\n"
    );

    // Control: the bindfs export's handle is stale once its inode is evicted.
    let broot = g.root(&b.mnt);
    let ctl = ok(c.walk(&broot, "ctl.txt"), "LOOKUP bindfs ctl.txt", &g, &m);
    // Evicted for sure (a kernel probe by handle says ESTALE), then over NFS.
    let kh = name_to_handle(&b.mnt.join("ctl.txt")).unwrap();
    assert!(
        evicted_from_bindfs(&b.mnt, &kh),
        "control: the bindfs inode was never evicted"
    );
    match c.getattr(&ctl) {
        Err(e) if e.status() == Some(nfs3::NFS3ERR_STALE) => {}
        other => panic!(
            "control: bindfs handle after drop_caches: expected NFS3ERR_STALE, got {other:?}"
        ),
    }
    drop(c);
    drop(g);
    drop(b);
}

/// Handles from before a remount of the same store: ganesha must let go of the
/// mount first (a busy FUSE mount cannot be unmounted), so the server is
/// stopped, thinfs remounted and ganesha started again; the client keeps its
/// old handles (as an NFS client does across a server reboot). The remount
/// gets a new st_dev on purpose; the export uses fsid_type = Major64 so that
/// ganesha's part of the handle does not depend on it (with "Device" every old
/// handle is NFS3ERR_STALE after such a remount, whatever the filesystem does);
/// thinfs's part (node id + generation) must resolve in the new daemon.
#[test]
fn nfs_handles_survive_remount() {
    let mut m = datastore();
    fs::create_dir_all(m.path("vm/sub")).unwrap();
    let data = Rng::new(5).bytes(700_001);
    fs::write(m.path("vm/disk.raw"), &data).unwrap();
    fs::write(m.path("vm/sub/cfg"), b"cfg\n").unwrap();
    let mut g = Ganesha::start(
        &m.scratch().join("ganesha"),
        &[Export {
            fsid_type: "Major64",
            ..Export::new(1, &m.mnt)
        }],
    );
    let root = g.root(&m.mnt);
    let (vm, disk, sub, cfg, attr_before) = {
        let mut c = g.client();
        let vm = ok(c.walk(&root, "vm"), "LOOKUP vm", &g, &m);
        let disk = ok(c.walk(&root, "vm/disk.raw"), "LOOKUP disk", &g, &m);
        let sub = ok(c.walk(&root, "vm/sub"), "LOOKUP sub", &g, &m);
        let cfg = ok(c.walk(&root, "vm/sub/cfg"), "LOOKUP cfg", &g, &m);
        let a = ok(c.getattr(&disk), "GETATTR", &g, &m);
        (vm, disk, sub, cfg, a)
    };
    g.stop_ganesha();
    let dev_before = fs::metadata(&m.mnt).unwrap().dev();
    m.unmount_ok();
    // Another FUSE mount takes the freed anonymous device number, so the
    // remounted store gets a new st_dev, as happens on a busy host.
    let _other = datastore();
    m.remount();
    let dev_after = fs::metadata(&m.mnt).unwrap().dev();
    if dev_before == dev_after {
        eprintln!("note: the remount got its old device number back ({dev_after})");
    }
    g.start_ganesha();
    let mut c = g.client();
    let root2 = g.root(&m.mnt);
    if root2 != root {
        eprintln!("note: the export's root handle changed across the remount");
    }
    for (name, fh) in [
        ("root", &root),
        ("vm", &vm),
        ("sub", &sub),
        ("disk", &disk),
        ("cfg", &cfg),
    ] {
        ok(
            c.getattr(fh),
            &format!("GETATTR of the pre-remount handle of {name}"),
            &g,
            &m,
        );
    }
    let a = ok(c.getattr(&disk), "GETATTR disk", &g, &m);
    assert_eq!(
        a.fileid, attr_before.fileid,
        "fileid changed across remount"
    );
    assert_eq!(a.size, attr_before.size);
    assert_eq!(
        ok(c.read_all(&disk), "READ disk by old handle", &g, &m),
        data
    );
    assert_eq!(
        ok(c.read_all(&cfg), "READ cfg by old handle", &g, &m),
        b"cfg\n"
    );
    let (fh, _) = ok(
        c.lookup(&sub, "cfg"),
        "LOOKUP through old dir handle",
        &g,
        &m,
    );
    assert_eq!(
        ok(c.getattr(&fh), "GETATTR", &g, &m).fileid,
        ok(c.getattr(&cfg), "GETATTR", &g, &m).fileid
    );
    ok(
        c.write(&disk, 10, b"after remount"),
        "WRITE by old handle",
        &g,
        &m,
    );
    let got = fs::read(m.path("vm/disk.raw")).unwrap();
    assert_eq!(&got[10..23], b"after remount");
    drop(c);
    drop(g);
}

/// Directory handles inside the snapshot tree stay valid once the kernel evicted their
/// inodes, when the mount lists `.snapshots` in the root (`-o snapdir_visible`):
/// exportfs reconnects directories by LOOKUP ".." and then finds the child's name by
/// reading the parent directory, so a hidden `.snapshots` cannot be reconnected (ESTALE,
/// NFS3ERR_STALE). The README tells NFS exporters of snapshots to mount with it.
#[test]
fn snapshot_dir_handles_survive_eviction() {
    let m = Mount::with(MountOptions {
        block_size: None,
        mount_args: vec!["-o".into(), "allow_other,snapdir_visible".into()],
    });
    fs::create_dir_all(m.path("vm/sub")).unwrap();
    fs::write(m.path("vm/sub/f"), b"in snapshot\n").unwrap();
    let out = thinfs([
        "snapshot".as_ref(),
        "create".as_ref(),
        "s1".as_ref(),
        "--mount".as_ref(),
        m.mnt.as_os_str(),
    ]);
    assert!(out.status.success(), "snapshot create: {}", describe(&out));

    // Kernel handles, no NFS.
    let paths = [
        ".snapshots/s1/vm/sub/f",
        ".snapshots",
        ".snapshots/s1",
        ".snapshots/s1/vm",
        ".snapshots/s1/vm/sub",
    ];
    let mut failures = Vec::new();
    for p in paths {
        let h = name_to_handle(&m.path(p)).unwrap();
        drop_caches();
        let mount_fd = File::open(&m.mnt).unwrap();
        if let Err(e) = open_by_handle(&mount_fd, &h) {
            failures.push(format!("open_by_handle_at({p}) after drop_caches: {e}"));
        }
    }

    // The same through ganesha.
    let g = Ganesha::start(&m.scratch().join("ganesha"), &[Export::new(1, &m.mnt)]);
    let mut c = g.client();
    let root = g.root(&m.mnt);
    let snapdir = ok(c.walk(&root, ".snapshots/s1/vm"), "LOOKUP", &g, &m);
    drop_caches();
    if let Err(e) = c.readdir(&snapdir) {
        failures.push(format!(
            "NFS READDIR .snapshots/s1/vm after drop_caches: {e}"
        ));
    }
    drop(g);
    assert!(
        failures.is_empty(),
        "snapshot handles after eviction:\n{}\ndaemon log:\n{}",
        failures.join("\n"),
        m.daemon_log()
    );
}

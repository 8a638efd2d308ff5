//! Names and attributes: lookup, create, mkdir, mknod, symlink, link, unlink, rmdir,
//! rename (with NOREPLACE and EXCHANGE), readdir, setattr and extended attributes.
//!
//! Every operation here holds `ns` and write-locks each inode it changes until its batch
//! is committed (see the locking rules in `fs.rs`).

use super::{Attr, Datastore, SetAttr, StateGuard, NAME_MAX};
use crate::error::{FsError, Result};
use crate::ids::InodeNo;
use crate::meta::{Batch, DirEntry, FileKind, Inode, Timestamp, View};

/// rename(2) flags.
pub const RENAME_NOREPLACE: u32 = libc::RENAME_NOREPLACE;
pub const RENAME_EXCHANGE: u32 = libc::RENAME_EXCHANGE;

/// setxattr(2) flags.
const XATTR_CREATE: i32 = 1;
const XATTR_REPLACE: i32 = 2;

/// Who creates a node and with which mode.
#[derive(Clone, Copy, Debug)]
pub struct Creator {
    pub uid: u32,
    pub gid: u32,
}

pub(super) fn check_name(name: &[u8]) -> Result<()> {
    if name.len() > NAME_MAX {
        return Err(FsError::NameTooLong);
    }
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0)
    {
        return Err(FsError::Invalid(format!(
            "bad file name {:?}",
            String::from_utf8_lossy(name)
        )));
    }
    Ok(())
}

impl Datastore {
    /// Looks up `name` in directory `parent` ("." and ".." included).
    pub fn lookup(&self, parent: InodeNo, name: &[u8]) -> Result<Attr> {
        if name.len() > NAME_MAX {
            return Err(FsError::NameTooLong);
        }
        // NFS re-export looks up "." of any node id (files too) to revalidate a handle.
        if name == b"." {
            return self.getattr(parent);
        }
        let dir = self.inode(parent)?;
        if dir.kind != FileKind::Dir {
            return Err(FsError::NotDir);
        }
        let ino = match name {
            b".." => dir.parent,
            _ => {
                self.meta
                    .dirent(parent, name, View::Live)?
                    .ok_or(FsError::NotFound)?
                    .ino
            }
        };
        self.getattr(ino)
    }

    /// Creates a node of `kind` named `name` in `parent`.
    pub fn mknod(
        &self,
        parent: InodeNo,
        name: &[u8],
        kind: FileKind,
        perm: u32,
        rdev: u32,
        who: Creator,
    ) -> Result<Attr> {
        self.make(parent, name, who, |ino| {
            let mut i = Inode::new(ino, kind, perm as u16, who.uid, who.gid, parent);
            i.rdev = rdev;
            i
        })
    }

    /// Creates a regular file.
    pub fn create(&self, parent: InodeNo, name: &[u8], perm: u32, who: Creator) -> Result<Attr> {
        self.mknod(parent, name, FileKind::File, perm, 0, who)
    }

    /// Creates a directory.
    pub fn mkdir(&self, parent: InodeNo, name: &[u8], perm: u32, who: Creator) -> Result<Attr> {
        self.mknod(parent, name, FileKind::Dir, perm, 0, who)
    }

    /// Creates a symlink to `target`.
    pub fn symlink(
        &self,
        parent: InodeNo,
        name: &[u8],
        target: &[u8],
        who: Creator,
    ) -> Result<Attr> {
        if target.len() > 4095 {
            return Err(FsError::NameTooLong);
        }
        self.make(parent, name, who, |ino| {
            let mut i = Inode::new(ino, FileKind::Symlink, 0o777, who.uid, who.gid, parent);
            i.target = target.to_vec();
            i
        })
    }

    fn make(
        &self,
        parent: InodeNo,
        name: &[u8],
        _who: Creator,
        build: impl FnOnce(InodeNo) -> Inode,
    ) -> Result<Attr> {
        check_name(name)?;
        if self.is_snapdir(parent, name) {
            return Err(FsError::Exists);
        }
        let _ns = self.ns.lock();
        let mut p = self.lock(parent)?;
        if p.inode.kind != FileKind::Dir {
            return Err(FsError::NotDir);
        }
        if p.inode.nlink == 0 {
            return Err(FsError::NotFound);
        }
        if self.meta.dirent(parent, name, View::Live)?.is_some() {
            return Err(FsError::Exists);
        }
        let ino = self.meta.new_ino()?;
        let mut inode = build(ino);
        // setgid directories pass their group on.
        if p.inode.perm & libc::S_ISGID as u16 != 0 {
            inode.gid = p.inode.gid;
            if inode.kind == FileKind::Dir {
                inode.perm |= libc::S_ISGID as u16;
            }
        }
        let mut batch = Batch::default();
        self.meta.put_inode(&mut batch, &inode)?;
        self.meta.put_dirent(
            &mut batch,
            parent,
            name,
            Some(&DirEntry {
                ino,
                kind: inode.kind,
            }),
        )?;
        let now = inode.ctime;
        p.inode.mtime = now;
        p.inode.ctime = now;
        if inode.kind == FileKind::Dir {
            p.inode.nlink += 1;
        }
        self.put_state(&mut batch, &mut p)?;
        self.meta.commit(batch)?;
        drop(p);
        self.evict(&[parent]);
        Ok(super::attr_from(&inode, 0, self.cfg.block_size))
    }

    /// Adds the name `name` in `parent` for the existing inode `ino`.
    pub fn link(&self, ino: InodeNo, parent: InodeNo, name: &[u8]) -> Result<Attr> {
        check_name(name)?;
        if self.is_snapdir(parent, name) {
            return Err(FsError::Exists);
        }
        let _ns = self.ns.lock();
        let mut locks = self.lock_many(&[ino, parent])?;
        if locks[&parent].inode.kind != FileKind::Dir {
            return Err(FsError::NotDir);
        }
        if locks[&ino].inode.kind == FileKind::Dir {
            return Err(FsError::Permission);
        }
        if locks[&ino].inode.nlink == 0 {
            return Err(FsError::NotFound);
        }
        if self.meta.dirent(parent, name, View::Live)?.is_some() {
            return Err(FsError::Exists);
        }
        let now = Timestamp::now();
        let mut batch = Batch::default();
        let kind = locks[&ino].inode.kind;
        self.meta
            .put_dirent(&mut batch, parent, name, Some(&DirEntry { ino, kind }))?;
        {
            let f = locks.get_mut(&ino).ok_or(FsError::NotFound)?;
            f.inode.nlink += 1;
            f.inode.ctime = now;
            self.put_state(&mut batch, f)?;
        }
        {
            let p = locks.get_mut(&parent).ok_or(FsError::NotFound)?;
            p.inode.mtime = now;
            p.inode.ctime = now;
            self.put_state(&mut batch, p)?;
        }
        self.meta.commit(batch)?;
        let attr = self.attr_of(&locks[&ino]);
        drop(locks);
        self.evict(&[ino, parent]);
        Ok(attr)
    }

    /// Removes a non-directory name.
    pub fn unlink(&self, parent: InodeNo, name: &[u8]) -> Result<()> {
        self.remove(parent, name, false)
    }

    /// Removes an empty directory.
    pub fn rmdir(&self, parent: InodeNo, name: &[u8]) -> Result<()> {
        self.remove(parent, name, true)
    }

    fn remove(&self, parent: InodeNo, name: &[u8], dir: bool) -> Result<()> {
        if name.len() > NAME_MAX {
            return Err(FsError::NameTooLong);
        }
        if name == b"." {
            return Err(FsError::Invalid("cannot remove .".into()));
        }
        if name == b".." {
            return Err(FsError::NotEmpty);
        }
        if self.is_snapdir(parent, name) {
            return Err(FsError::ReadOnly);
        }
        let _ns = self.ns.lock();
        let entry = self
            .meta
            .dirent(parent, name, View::Live)?
            .ok_or(FsError::NotFound)?;
        match (dir, entry.kind == FileKind::Dir) {
            (true, false) => return Err(FsError::NotDir),
            (false, true) => return Err(FsError::IsDir),
            _ => {}
        }
        if dir && !self.meta.dir_is_empty(entry.ino)? {
            return Err(FsError::NotEmpty);
        }
        let mut locks = self.lock_many(&[parent, entry.ino])?;
        let mut batch = Batch::default();
        let now = Timestamp::now();
        self.meta.put_dirent(&mut batch, parent, name, None)?;
        self.drop_link(
            &mut batch,
            locks.get_mut(&entry.ino).ok_or(FsError::NotFound)?,
            now,
        )?;
        {
            let p = locks.get_mut(&parent).ok_or(FsError::NotFound)?;
            p.inode.mtime = now;
            p.inode.ctime = now;
            if dir {
                p.inode.nlink = p.inode.nlink.saturating_sub(1);
            }
            self.put_state(&mut batch, p)?;
        }
        self.meta.commit(batch)?;
        drop(locks);
        self.evict(&[parent, entry.ino]);
        Ok(())
    }

    /// Drops one name of a locked inode: deletes it when no name and no handle is left,
    /// keeps it as an orphan while it is open.
    pub(super) fn drop_link(
        &self,
        batch: &mut Batch,
        st: &mut StateGuard,
        now: Timestamp,
    ) -> Result<()> {
        if st.inode.kind == FileKind::Dir {
            st.inode.nlink = 0;
        } else {
            st.inode.nlink = st.inode.nlink.saturating_sub(1);
        }
        st.inode.ctime = now;
        if st.inode.nlink > 0 {
            return self.put_state(batch, st);
        }
        if st.open > 0 {
            self.meta.put_orphan(batch, st.inode.ino);
            return self.put_state(batch, st);
        }
        self.drop_dirty(st);
        st.attr_dirty = false;
        self.meta.delete_inode(batch, st.inode.ino)
    }

    /// Whether `ino` is `ancestor` or lies below it.
    pub(super) fn is_within(&self, mut ino: InodeNo, ancestor: InodeNo) -> Result<bool> {
        loop {
            if ino == ancestor {
                return Ok(true);
            }
            if ino == InodeNo::ROOT {
                return Ok(false);
            }
            ino = self.inode(ino)?.parent;
        }
    }

    /// rename(2) with flags 0, RENAME_NOREPLACE or RENAME_EXCHANGE.
    pub fn rename(
        &self,
        parent: InodeNo,
        name: &[u8],
        new_parent: InodeNo,
        new_name: &[u8],
        flags: u32,
    ) -> Result<()> {
        check_name(name).map_err(|e| {
            if name.len() > NAME_MAX {
                e
            } else {
                FsError::Invalid("cannot rename . or ..".into())
            }
        })?;
        check_name(new_name)?;
        if flags & !(RENAME_NOREPLACE | RENAME_EXCHANGE) != 0 {
            return Err(FsError::Invalid(format!("rename flags {flags:#x}")));
        }
        if flags & RENAME_NOREPLACE != 0 && flags & RENAME_EXCHANGE != 0 {
            return Err(FsError::Invalid("NOREPLACE with EXCHANGE".into()));
        }
        if self.is_snapdir(parent, name) || self.is_snapdir(new_parent, new_name) {
            return Err(FsError::ReadOnly);
        }
        let _ns = self.ns.lock();
        let src = self
            .meta
            .dirent(parent, name, View::Live)?
            .ok_or(FsError::NotFound)?;
        let dst = self.meta.dirent(new_parent, new_name, View::Live)?;
        if self.inode(new_parent)?.kind != FileKind::Dir {
            return Err(FsError::NotDir);
        }
        if flags & RENAME_NOREPLACE != 0 && dst.is_some() {
            return Err(FsError::Exists);
        }
        let now = Timestamp::now();
        if flags & RENAME_EXCHANGE != 0 {
            let dst = dst.ok_or(FsError::NotFound)?;
            if src.kind == FileKind::Dir
                && self.is_within(new_parent, src.ino)?
                && parent != new_parent
            {
                return Err(FsError::Invalid(
                    "cannot move a directory into itself".into(),
                ));
            }
            if dst.kind == FileKind::Dir && self.is_within(parent, dst.ino)? && parent != new_parent
            {
                return Err(FsError::Invalid(
                    "cannot move a directory into itself".into(),
                ));
            }
            let mut locks = self.lock_many(&[parent, new_parent, src.ino, dst.ino])?;
            let mut batch = Batch::default();
            self.meta.put_dirent(&mut batch, parent, name, Some(&dst))?;
            self.meta
                .put_dirent(&mut batch, new_parent, new_name, Some(&src))?;
            if parent != new_parent {
                let moved = [(src, new_parent, parent), (dst, parent, new_parent)];
                for (e, to, from) in moved {
                    if e.kind == FileKind::Dir {
                        locks.get_mut(&e.ino).ok_or(FsError::NotFound)?.inode.parent = to;
                        locks.get_mut(&to).ok_or(FsError::NotFound)?.inode.nlink += 1;
                        let f = locks.get_mut(&from).ok_or(FsError::NotFound)?;
                        f.inode.nlink = f.inode.nlink.saturating_sub(1);
                    }
                }
            }
            for ino in [src.ino, dst.ino] {
                locks.get_mut(&ino).ok_or(FsError::NotFound)?.inode.ctime = now;
            }
            for ino in [parent, new_parent] {
                let p = locks.get_mut(&ino).ok_or(FsError::NotFound)?;
                p.inode.mtime = now;
                p.inode.ctime = now;
            }
            for st in locks.values_mut() {
                self.put_state(&mut batch, st)?;
            }
            self.meta.commit(batch)?;
            drop(locks);
            self.evict(&[parent, new_parent, src.ino, dst.ino]);
            return Ok(());
        }
        if let Some(d) = dst {
            if d.ino == src.ino {
                return Ok(()); // two names of one inode: nothing to do
            }
        }
        if src.kind == FileKind::Dir && self.is_within(new_parent, src.ino)? {
            return Err(FsError::Invalid(
                "cannot move a directory into itself".into(),
            ));
        }
        if let Some(d) = dst {
            match (src.kind == FileKind::Dir, d.kind == FileKind::Dir) {
                (true, false) => return Err(FsError::NotDir),
                (false, true) => return Err(FsError::IsDir),
                (true, true) if !self.meta.dir_is_empty(d.ino)? => return Err(FsError::NotEmpty),
                _ => {}
            }
        }
        let mut inos = vec![parent, new_parent, src.ino];
        if let Some(d) = dst {
            inos.push(d.ino);
        }
        let mut locks = self.lock_many(&inos)?;
        let mut batch = Batch::default();
        if let Some(d) = dst {
            self.drop_link(
                &mut batch,
                locks.get_mut(&d.ino).ok_or(FsError::NotFound)?,
                now,
            )?;
            if d.kind == FileKind::Dir {
                let p = locks.get_mut(&new_parent).ok_or(FsError::NotFound)?;
                p.inode.nlink = p.inode.nlink.saturating_sub(1);
            }
        }
        self.meta.put_dirent(&mut batch, parent, name, None)?;
        self.meta
            .put_dirent(&mut batch, new_parent, new_name, Some(&src))?;
        {
            let s = locks.get_mut(&src.ino).ok_or(FsError::NotFound)?;
            s.inode.ctime = now;
            if src.kind == FileKind::Dir {
                s.inode.parent = new_parent;
            }
        }
        if src.kind == FileKind::Dir && parent != new_parent {
            let p = locks.get_mut(&parent).ok_or(FsError::NotFound)?;
            p.inode.nlink = p.inode.nlink.saturating_sub(1);
            locks
                .get_mut(&new_parent)
                .ok_or(FsError::NotFound)?
                .inode
                .nlink += 1;
        }
        for ino in [parent, new_parent] {
            let p = locks.get_mut(&ino).ok_or(FsError::NotFound)?;
            p.inode.mtime = now;
            p.inode.ctime = now;
        }
        for (ino, st) in locks.iter_mut() {
            if Some(*ino) == dst.map(|d| d.ino) {
                continue; // drop_link wrote (or deleted) it
            }
            self.put_state(&mut batch, st)?;
        }
        self.meta.commit(batch)?;
        drop(locks);
        self.evict(&inos);
        Ok(())
    }

    /// The entries of a directory (without "." and "..").
    pub fn readdir(&self, ino: InodeNo) -> Result<Vec<(Vec<u8>, DirEntry)>> {
        let dir = self.inode(ino)?;
        if dir.kind != FileKind::Dir {
            return Err(FsError::NotDir);
        }
        self.meta.dir_entries(ino, View::Live, None, usize::MAX)
    }

    /// The parent of a directory.
    pub fn parent_of(&self, ino: InodeNo) -> Result<InodeNo> {
        Ok(self.inode(ino)?.parent)
    }

    /// The target of a symlink.
    pub fn readlink(&self, ino: InodeNo) -> Result<Vec<u8>> {
        let i = self.inode(ino)?;
        if i.kind != FileKind::Symlink {
            return Err(FsError::Invalid("not a symlink".into()));
        }
        Ok(i.target)
    }

    /// chmod, chown, truncate, utimens.
    pub fn setattr(&self, ino: InodeNo, set: &SetAttr) -> Result<Attr> {
        let _ns = self.ns.lock();
        let mut g = self.lock(ino)?;
        self.settle(&mut g)?;
        // New block-map nodes must be committed before a GC can start (see gc.rs).
        let _gate = self.gc_gate.read();
        let mut batch = Batch::default();
        let now = Timestamp::now();
        if let Some(size) = set.size {
            self.set_size(&mut g, size)?;
        }
        if let Some(mode) = set.mode {
            g.inode.perm = (mode & 0o7777) as u16;
        }
        // A chown drops set-ID bits whoever asks (a chmod in the same call wins); a
        // truncate, when the caller may not keep them.
        let chown = set.uid.is_some() || set.gid.is_some();
        if set.size.is_some() || chown {
            let setid = set.mode.is_none() && (chown || set.caller_gid.is_some());
            super::drop_privileges(&mut g.inode, setid, set.caller_gid);
        }
        if let Some(uid) = set.uid {
            g.inode.uid = uid;
        }
        if let Some(gid) = set.gid {
            g.inode.gid = gid;
        }
        if let Some(t) = set.atime {
            g.inode.atime = t;
        }
        if let Some(t) = set.mtime {
            g.inode.mtime = t;
        }
        g.inode.ctime = set.ctime.unwrap_or(now);
        self.put_state(&mut batch, &mut g)?;
        self.meta.commit(batch)?;
        let attr = self.attr_of(&g);
        drop(g);
        self.evict(&[ino]);
        Ok(attr)
    }

    // ---- extended attributes ----

    fn check_xattr_name(name: &[u8]) -> Result<()> {
        if name.is_empty() || name.len() > 255 {
            return Err(FsError::Range);
        }
        let ok = [&b"user."[..], b"trusted.", b"security."]
            .iter()
            .any(|p| name.starts_with(p) && name.len() > p.len());
        if !ok {
            return Err(FsError::NotSupported(format!(
                "xattr namespace of {}",
                String::from_utf8_lossy(name)
            )));
        }
        Ok(())
    }

    /// Sets an extended attribute (flags: XATTR_CREATE, XATTR_REPLACE).
    pub fn setxattr(&self, ino: InodeNo, name: &[u8], value: &[u8], flags: i32) -> Result<()> {
        Self::check_xattr_name(name)?;
        if value.len() > 65536 {
            return Err(FsError::Range);
        }
        let _ns = self.ns.lock();
        let mut g = self.lock(ino)?;
        self.settle(&mut g)?;
        let exists = g.inode.xattrs.contains_key(name);
        if flags & XATTR_CREATE != 0 && exists {
            return Err(FsError::Exists);
        }
        if flags & XATTR_REPLACE != 0 && !exists {
            return Err(FsError::NoAttr);
        }
        g.inode.xattrs.insert(name.to_vec(), value.to_vec());
        g.inode.ctime = Timestamp::now();
        let mut batch = Batch::default();
        self.put_state(&mut batch, &mut g)?;
        self.meta.commit(batch)?;
        drop(g);
        self.evict(&[ino]);
        Ok(())
    }

    /// The value of an extended attribute.
    pub fn getxattr(&self, ino: InodeNo, name: &[u8]) -> Result<Vec<u8>> {
        if name.starts_with(b"system.") {
            return Err(FsError::NoAttr);
        }
        self.inode(ino)?
            .xattrs
            .get(name)
            .cloned()
            .ok_or(FsError::NoAttr)
    }

    /// The names of all extended attributes.
    pub fn listxattr(&self, ino: InodeNo) -> Result<Vec<Vec<u8>>> {
        Ok(self.inode(ino)?.xattrs.keys().cloned().collect())
    }

    /// Removes an extended attribute.
    pub fn removexattr(&self, ino: InodeNo, name: &[u8]) -> Result<()> {
        let _ns = self.ns.lock();
        let mut g = self.lock(ino)?;
        self.settle(&mut g)?;
        if g.inode.xattrs.remove(name).is_none() {
            return Err(FsError::NoAttr);
        }
        g.inode.ctime = Timestamp::now();
        let mut batch = Batch::default();
        self.put_state(&mut batch, &mut g)?;
        self.meta.commit(batch)?;
        drop(g);
        self.evict(&[ino]);
        Ok(())
    }

    /// Resolves a path relative to the root ("a/b/c"); symlinks are not followed.
    pub fn resolve(&self, path: &[u8]) -> Result<InodeNo> {
        let mut ino = InodeNo::ROOT;
        for comp in path
            .split(|&b| b == b'/')
            .filter(|c| !c.is_empty() && *c != b".")
        {
            let attr = self.lookup(ino, comp)?;
            ino = attr.ino;
        }
        Ok(ino)
    }

    /// Resolves the parent directory and final name of a path.
    pub fn resolve_parent<'a>(&self, path: &'a [u8]) -> Result<(InodeNo, &'a [u8])> {
        let trimmed = path.strip_suffix(b"/").unwrap_or(path);
        let (dir, name) = match trimmed.iter().rposition(|&b| b == b'/') {
            Some(i) => (&trimmed[..i], &trimmed[i + 1..]),
            None => (&b""[..], trimmed),
        };
        check_name(name)?;
        let parent = self.resolve(dir)?;
        if self.inode(parent)?.kind != FileKind::Dir {
            return Err(FsError::NotDir);
        }
        Ok((parent, name))
    }
}

//! Thin clones of files and directory trees.
//!
//! A file clone is a new inode holding the source's block-map root: O(1) in the file's
//! size, no data written. A directory clone copies the tree's inodes and entries: O(number
//! of entries). Hard links inside the tree stay linked in the clone.
//!
//! Live clones: the clone write-locks every inode of the source tree at once (in inode
//! order, under `ns`), flushes their write-back buffers and reads their roots while holding
//! all the locks. Every write acknowledged before the clone is therefore in it, none that
//! starts after it returns is, and all files of a tree are cloned at one instant. Writers
//! wait only for this metadata switch (and the hashing of their own dirty blocks).

use std::collections::HashMap;

use super::{Attr, Datastore};
use crate::error::{FsError, Result};
use crate::ids::InodeNo;
use crate::meta::{Batch, DirEntry, FileKind, Inode, Timestamp, View};

/// One node of the source tree, in creation order (parents before children).
struct Node {
    src: InodeNo,
    kind: FileKind,
    /// Index of the parent node in the list (`None`: the clone's top).
    parent: Option<usize>,
    name: Vec<u8>,
}

impl Datastore {
    /// Clones `src` (a file or a directory tree) to the new name `name` in `dst_parent`.
    /// With `force`, an existing regular file at the destination is replaced.
    pub fn clone_path(
        &self,
        src: InodeNo,
        dst_parent: InodeNo,
        name: &[u8],
        force: bool,
    ) -> Result<Attr> {
        self.clone_from(View::Live, src, dst_parent, name, force)
    }

    /// Clones `src` as `view` sees it (the live tree or a snapshot) into the live tree.
    pub fn clone_from(
        &self,
        view: View,
        src: InodeNo,
        dst_parent: InodeNo,
        name: &[u8],
        force: bool,
    ) -> Result<Attr> {
        super::namespace::check_name(name)?;
        if self.is_snapdir(dst_parent, name) {
            return Err(FsError::Exists);
        }
        let _ns = self.ns.lock();
        let src_inode = match view {
            View::Live => self.inode(src)?,
            View::At(_) => self.meta.inode(src, view)?.ok_or(FsError::NotFound)?,
        };
        if self.inode(dst_parent)?.kind != FileKind::Dir {
            return Err(FsError::NotDir);
        }
        if let Some(existing) = self.meta.dirent(dst_parent, name, View::Live)? {
            if !(force && existing.kind == FileKind::File && src_inode.kind == FileKind::File) {
                return Err(FsError::Exists);
            }
        }
        if view == View::Live
            && src_inode.kind == FileKind::Dir
            && self.is_within(dst_parent, src)?
        {
            return Err(FsError::Invalid(
                "cannot clone a directory into itself".into(),
            ));
        }
        // The source tree, parents first.
        let mut nodes = vec![Node {
            src,
            kind: src_inode.kind,
            parent: None,
            name: name.to_vec(),
        }];
        let mut i = 0;
        while i < nodes.len() {
            if nodes[i].kind == FileKind::Dir {
                for (child_name, e) in
                    self.meta
                        .dir_entries(nodes[i].src, view, None, usize::MAX)?
                {
                    nodes.push(Node {
                        src: e.ino,
                        kind: e.kind,
                        parent: Some(i),
                        name: child_name,
                    });
                }
            }
            i += 1;
        }
        // One instant for the whole tree: lock all, flush, read.
        // A snapshot is immutable: only live sources need locking.
        let mut inos: Vec<InodeNo> = match view {
            View::Live => nodes.iter().map(|n| n.src).collect(),
            View::At(_) => Vec::new(),
        };
        inos.push(dst_parent);
        let replaced = self.meta.dirent(dst_parent, name, View::Live)?;
        if let Some(r) = replaced {
            inos.push(r.ino);
        }
        let mut locks = self.lock_many(&inos)?;
        if view == View::Live {
            for n in &nodes {
                if n.kind == FileKind::File {
                    let g = locks.get_mut(&n.src).ok_or(FsError::NotFound)?;
                    self.flush_state(g)?;
                }
            }
        }
        let now = Timestamp::now();
        let mut batch = Batch::default();
        let mut new_ino: HashMap<InodeNo, InodeNo> = HashMap::new();
        let mut links: HashMap<InodeNo, u32> = HashMap::new();
        let mut created: Vec<Inode> = Vec::with_capacity(nodes.len());
        let mut index_of: HashMap<InodeNo, usize> = HashMap::new();
        let mut node_ino = Vec::with_capacity(nodes.len());
        for n in &nodes {
            let fresh = match new_ino.get(&n.src) {
                Some(&ino) => ino,
                None => {
                    let ino = self.meta.new_ino()?;
                    new_ino.insert(n.src, ino);
                    let mut inode = match view {
                        View::Live => locks.get(&n.src).ok_or(FsError::NotFound)?.inode.clone(),
                        View::At(_) => self.meta.inode(n.src, view)?.ok_or(FsError::NotFound)?,
                    };
                    inode.ino = ino;
                    inode.ctime = now;
                    inode.nlink = if n.kind == FileKind::Dir { 2 } else { 0 };
                    index_of.insert(ino, created.len());
                    created.push(inode);
                    ino
                }
            };
            node_ino.push(fresh);
            if n.kind != FileKind::Dir {
                *links.entry(fresh).or_default() += 1;
            }
        }
        for (k, n) in nodes.iter().enumerate() {
            let ino = node_ino[k];
            let parent = match n.parent {
                Some(p) => node_ino[p],
                None => dst_parent,
            };
            if n.parent.is_some() {
                self.meta.put_dirent(
                    &mut batch,
                    parent,
                    &n.name,
                    Some(&DirEntry { ino, kind: n.kind }),
                )?;
            }
            if n.kind == FileKind::Dir {
                created[index_of[&ino]].parent = parent;
                if let Some(&pi) = index_of.get(&parent) {
                    created[pi].nlink += 1;
                }
            }
        }
        for inode in &mut created {
            if inode.kind != FileKind::Dir {
                inode.nlink = links[&inode.ino];
            }
            self.meta.put_inode(&mut batch, inode)?;
        }
        let top = created[0].clone();
        // Replace an existing file with --force.
        if let Some(r) = replaced {
            let g = locks.get_mut(&r.ino).ok_or(FsError::NotFound)?;
            self.drop_link(&mut batch, g, now)?;
        }
        self.meta.put_dirent(
            &mut batch,
            dst_parent,
            name,
            Some(&DirEntry {
                ino: top.ino,
                kind: top.kind,
            }),
        )?;
        {
            let p = locks.get_mut(&dst_parent).ok_or(FsError::NotFound)?;
            p.inode.mtime = now;
            p.inode.ctime = now;
            if top.kind == FileKind::Dir {
                p.inode.nlink += 1;
            }
            self.put_state(&mut batch, p)?;
        }
        self.meta.commit(batch)?;
        drop(locks);
        self.evict(&inos);
        Ok(super::attr_from(
            &top,
            top.data_blocks() * self.block_size() / 512,
            self.cfg.block_size,
        ))
    }
}

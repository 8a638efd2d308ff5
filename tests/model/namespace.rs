//! Namespace operations of the property test whose model side is more than a line or
//! two: file and tree clones, unlink, rename with its flags.

use std::collections::BTreeMap;

use thinfs::fs::namespace::{RENAME_EXCHANGE, RENAME_NOREPLACE};
use thinfs::meta::FileKind;

use super::harness::{Harness, MAX_DIRS, MAX_FILES};
use super::ops::{name, RenameMode};
use super::reference::{Ent, MDir};

impl Harness {
    pub(super) fn clone_file(&mut self, snap: Option<u8>, file: u8, dir: u8, n: u8, force: bool) {
        let Some(from) = self.source(snap) else {
            return;
        };
        let Some(src) = from.m.file_at(file) else {
            return;
        };
        if self.m.files.len() >= MAX_FILES {
            return;
        }
        let (d, nm) = (self.m.dir_at(dir), name(n).to_vec());
        let existing = self.m.entries.get(&(d, nm.clone())).copied();
        let want = match existing {
            None => Ok(()),
            Some(Ent::File(_)) if force => Ok(()),
            Some(_) => Err(libc::EEXIST),
        };
        let got = self.ds().clone_from(
            from.view,
            from.m.file(src).ino,
            self.m.dirs[d].ino,
            &nm,
            force,
        );
        if let Some(((), a)) = self.outcome(want, got) {
            let data = from.m.file(src).data.clone();
            let blocks = data.data_blocks(self.bs).len() as u64 * self.bs / 512;
            if a.size != data.size || a.blocks != blocks || a.nlink != 1 {
                self.fail(format!(
                    "clone returned {a:?}; want size {} blocks {blocks} nlink 1",
                    data.size
                ));
            }
            let id = self.m.add_file(a.ino, Some(from.m.file(src)));
            if let Some(Ent::File(old)) = self.m.entries.insert((d, nm), Ent::File(id)) {
                self.m.reap(old);
            }
        }
    }

    pub(super) fn clone_dir(&mut self, snap: Option<u8>, dir: u8, to: u8, n: u8) {
        let Some(from) = self.source(snap) else {
            return;
        };
        let src_m = &from.m;
        let s = match snap {
            // The live root always contains the destination: cloning it fails (EINVAL).
            None if src_m.dirs.len() < 2 => return,
            None => 1 + dir as usize % (src_m.dirs.len() - 1),
            Some(_) => src_m.dir_at(dir),
        };
        let (t, nm) = (self.m.dir_at(to), name(n).to_vec());
        if self.m.dirs.len() + src_m.subtree(s).len() > MAX_DIRS
            || self.m.files.len() + src_m.files_within(s).len() > MAX_FILES
        {
            return;
        }
        let want = if self.m.entries.contains_key(&(t, nm.clone())) {
            Err(libc::EEXIST)
        } else if snap.is_none() && self.m.is_within(t, s) {
            Err(libc::EINVAL)
        } else {
            Ok(())
        };
        let got =
            self.ds()
                .clone_from(from.view, src_m.dirs[s].ino, self.m.dirs[t].ino, &nm, false);
        let Some(((), a)) = self.outcome(want, got) else {
            return;
        };
        if a.kind != FileKind::Dir {
            self.fail(format!("directory clone returned {a:?}"));
        }
        // Learn the store's new inode numbers by name; the full check compares the rest.
        self.m.dirs.push(MDir {
            ino: a.ino,
            parent: t,
        });
        let top = self.m.dirs.len() - 1;
        self.m.entries.insert((t, nm), Ent::Dir(top));
        let mut files: BTreeMap<u64, u64> = BTreeMap::new();
        let mut queue = vec![(s, top)];
        while let Some((old, new)) = queue.pop() {
            let children: Vec<(Vec<u8>, Ent)> = src_m
                .entries
                .iter()
                .filter(|((p, _), _)| *p == old)
                .map(|((_, n), e)| (n.clone(), *e))
                .collect();
            for (child, e) in children {
                let got = self.ds().lookup(self.m.dirs[new].ino, &child);
                let a = got.unwrap_or_else(|e| {
                    self.fail(format!("lookup of {child:?} in the clone: {e}"))
                });
                let ent = match e {
                    Ent::Dir(c) => {
                        self.m.dirs.push(MDir {
                            ino: a.ino,
                            parent: new,
                        });
                        let nd = self.m.dirs.len() - 1;
                        queue.push((c, nd));
                        Ent::Dir(nd)
                    }
                    Ent::File(f) => match files.get(&f) {
                        Some(&nf) => Ent::File(nf),
                        None => {
                            let nf = self.m.add_file(a.ino, Some(src_m.file(f)));
                            files.insert(f, nf);
                            Ent::File(nf)
                        }
                    },
                };
                self.m.entries.insert((new, child), ent);
            }
        }
    }

    pub(super) fn unlink(&mut self, d: usize, nm: &[u8], e: Option<Ent>) {
        let want = match e {
            None => Err(libc::ENOENT),
            Some(Ent::Dir(_)) => Err(libc::EISDIR),
            Some(Ent::File(_)) => Ok(()),
        };
        let got = self.ds().unlink(self.m.dirs[d].ino, nm);
        if self.outcome(want, got).is_some() {
            self.m.drop_name(d, nm);
        }
    }

    pub(super) fn rename(&mut self, entry: u8, dir: u8, n: u8, mode: RenameMode) {
        let Some(((sd, sn), Ent::File(sid))) = self.m.entry_at(entry, true) else {
            return;
        };
        let (t, tn) = (self.m.dir_at(dir), name(n).to_vec());
        let dst = self.m.entries.get(&(t, tn.clone())).copied();
        let (flags, want) = match mode {
            RenameMode::NoReplace if dst.is_some() => (RENAME_NOREPLACE, Err(libc::EEXIST)),
            RenameMode::Exchange => (
                RENAME_EXCHANGE,
                match dst {
                    None => Err(libc::ENOENT),
                    Some(Ent::Dir(dd)) if self.m.is_within(sd, dd) && sd != t => Err(libc::EINVAL),
                    _ => Ok(()),
                },
            ),
            _ => (
                if matches!(mode, RenameMode::NoReplace) {
                    RENAME_NOREPLACE
                } else {
                    0
                },
                match dst {
                    Some(Ent::Dir(_)) => Err(libc::EISDIR),
                    _ => Ok(()),
                },
            ),
        };
        let got = self
            .ds()
            .rename(self.m.dirs[sd].ino, &sn, self.m.dirs[t].ino, &tn, flags);
        if self.outcome(want, got).is_none() {
            return;
        }
        let src_key = (sd, sn);
        if matches!(mode, RenameMode::Exchange) {
            let d = dst.expect("exchange needs a target");
            self.m.entries.insert(src_key, d);
            self.m.entries.insert((t, tn), Ent::File(sid));
            if let Ent::Dir(dd) = d {
                self.m.dirs[dd].parent = sd;
            }
        } else if dst != Some(Ent::File(sid)) {
            self.m.entries.remove(&src_key);
            if let Some(Ent::File(old)) = self.m.entries.insert((t, tn), Ent::File(sid)) {
                self.m.reap(old);
            }
        }
    }
}

//! Pack files: append-only files of chunk records.
//!
//! A record is a 40-byte header (`MAGIC`, data length u32 BE, BLAKE3 hash of the data)
//! followed by the data. The header makes a pack self-describing, so `fsck --repair` can
//! rebuild the chunk index by scanning packs. A pack is only ever appended to by the
//! daemon that created it; each mount starts a new pack, so a torn tail left by a crash is
//! never written after (it is garbage that GC compaction drops).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::error::{FsError, Result};
use crate::ids::ChunkId;
use crate::meta::Index;

/// Magic bytes at the start of every chunk record.
pub const MAGIC: &[u8; 4] = b"TFC1";
/// Magic bytes of an intent-log record (`fs/journal.rs`): the same header, with the
/// BLAKE3 hash of its payload in place of a chunk name. Packs carry both, so an fsync
/// makes a write durable with one `fdatasync` of the pack.
pub const LOG_MAGIC: &[u8; 4] = b"TFL1";
/// Magic bytes of an intent-log record of written bytes (an fsync that logs a file's
/// dirty data itself instead of flushing it: `fs/journal.rs`). Same header.
pub const WRITE_MAGIC: &[u8; 4] = b"TFW1";
/// Magic bytes of a block-map node record (`crate::blockmap`; format 5 on): the same
/// header, named by the hash of the node's encoding.
pub const NODE_MAGIC: &[u8; 4] = b"TFN1";
/// Length of a record header.
pub const HEADER_LEN: u64 = 40;

/// File name of pack `id`.
pub fn pack_path(dir: &Path, id: u32) -> PathBuf {
    dir.join(format!("{id:08}.pack"))
}

/// The pack ids present in `dir`, sorted.
pub fn list_packs(dir: &Path) -> Result<Vec<u32>> {
    let mut ids = Vec::new();
    let rd =
        std::fs::read_dir(dir).map_err(|e| FsError::io(format!("listing {}", dir.display()), e))?;
    for entry in rd {
        let entry = entry.map_err(|e| FsError::io(format!("listing {}", dir.display()), e))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if let Some(num) = name.strip_suffix(".pack") {
            if let Ok(id) = num.parse::<u32>() {
                ids.push(id);
            }
        }
    }
    ids.sort_unstable();
    Ok(ids)
}

/// Encodes a record header.
pub fn header(id: &ChunkId, len: u32) -> [u8; HEADER_LEN as usize] {
    header_with(MAGIC, id, len)
}

fn header_with(magic: &[u8; 4], id: &ChunkId, len: u32) -> [u8; HEADER_LEN as usize] {
    let mut h = [0u8; HEADER_LEN as usize];
    h[..4].copy_from_slice(magic);
    h[4..8].copy_from_slice(&len.to_be_bytes());
    h[8..].copy_from_slice(&id.0);
    h
}

/// Zeros kept written ahead of the active pack's end once it is being synced.
const ZERO_AHEAD: u64 = 1 << 20;
/// Pages written with `O_DIRECT` are this size and alignment.
const PAGE: u64 = 4096;
/// Appends whose whole pages come to at least this many bytes write those pages with
/// `O_DIRECT` (see [`ActivePack::write_at_end`]).
const DIRECT_MIN: u64 = 64 << 10;
/// Bytes staged for one `O_DIRECT` write (the staging buffer holds this and a page, for
/// alignment).
const DIRECT_MAX: u64 = 4 << 20;

/// The pack being appended to.
pub struct ActivePack {
    pub id: u32,
    pub file: std::sync::Arc<File>,
    /// Bytes written so far (the next record's offset).
    pub len: u64,
    /// The file holds written zeros up to here (see [`ActivePack::zero_ahead`]).
    zeroed_to: u64,
    /// The pack opened with `O_DIRECT`, for the whole pages of large appends; `None` where
    /// the filesystem refuses it.
    direct: Option<File>,
    /// Page-aligned staging for direct writes (allocated at the first, then reused).
    stage: Vec<u8>,
}

impl ActivePack {
    /// Creates pack `id` in `dir`; it must not exist.
    pub fn create(dir: &Path, id: u32) -> Result<ActivePack> {
        let path = pack_path(dir, id);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| FsError::io(format!("creating pack {}", path.display()), e))?;
        let direct = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&path)
            .ok();
        Ok(ActivePack {
            id,
            file: std::sync::Arc::new(file),
            len: 0,
            zeroed_to: 0,
            direct,
            stage: Vec::new(),
        })
    }

    /// Takes over `prev`'s staging buffer (its pages are resident already).
    pub fn take_stage(&mut self, prev: &mut ActivePack) {
        self.stage = std::mem::take(&mut prev.stage);
    }

    /// Bytes of written zeros past the last record.
    pub fn zero_tail(&self) -> u64 {
        self.zeroed_to.saturating_sub(self.len)
    }

    /// Keeps written zeros ahead of the end, so the small appends of an fsync-heavy
    /// writer overwrite allocated blocks: ext4's fdatasync of an append must commit the
    /// new size and blocks to its journal, an overwrite does not (measured: 4 KiB
    /// write+fdatasync 1287 -> 1533 IOPS). Called before a sync, which then makes the
    /// zeros durable; costs one 1 MiB write per MiB of synced appends, none for writers
    /// that do not sync. The tail is cut off when the pack is sealed (dropped); after a
    /// crash it stays as zeros that no record names (garbage for compaction).
    pub fn zero_ahead(&mut self) {
        if self.len + ZERO_AHEAD / 4 <= self.zeroed_to {
            return;
        }
        let from = self.len.max(self.zeroed_to);
        let to = self.len + ZERO_AHEAD;
        match self
            .file
            .write_all_at(&vec![0u8; (to - from) as usize], from)
        {
            Ok(()) => self.zeroed_to = to,
            // A full disk: leave no partial tail (the reserve in space.rs covers this).
            Err(_) => {
                let _ = self.file.set_len(self.len.max(self.zeroed_to));
            }
        }
    }

    /// Appends records with vectored writes (headers and data in place, no copy);
    /// returns the offsets of their data. On failure the pack is cut back to its previous
    /// length (no torn record is left).
    pub fn append_many(&mut self, kind: Kind, records: &[(ChunkId, &[u8])]) -> Result<Vec<u64>> {
        let headers: Vec<[u8; HEADER_LEN as usize]> = records
            .iter()
            .map(|(id, data)| header_with(kind.magic(), id, data.len() as u32))
            .collect();
        let mut parts: Vec<&[u8]> = Vec::with_capacity(records.len() * 2);
        let mut offsets = Vec::with_capacity(records.len());
        let mut at = self.len;
        for ((_, data), h) in records.iter().zip(&headers) {
            parts.push(h);
            parts.push(data);
            offsets.push(at + HEADER_LEN);
            at += HEADER_LEN + data.len() as u64;
        }
        let first = records
            .first()
            .map(|(id, _)| id.to_string())
            .unwrap_or_default();
        self.append_parts(&parts, || {
            format!("{} records of {kind:?} ({first}...)", records.len())
        })?;
        debug_assert_eq!(self.len, at);
        Ok(offsets)
    }

    /// Appends an intent-log record of `kind` (`Log` or `Write`); returns the offset of
    /// its payload. On failure the pack is cut back (no torn record is left).
    pub fn append_log(&mut self, kind: Kind, payload: &[u8]) -> Result<u64> {
        let h = header_with(kind.magic(), &ChunkId::of(payload), payload.len() as u32);
        self.append_parts(&[&h, payload], || "a log record".to_string())?;
        Ok(self.len - payload.len() as u64)
    }

    /// Writes `parts` back to back at the end; on failure cuts the pack back to its
    /// previous length, so no torn record is left (`what` names them in the error).
    fn append_parts(&mut self, parts: &[&[u8]], what: impl FnOnce() -> String) -> Result<()> {
        if let Err(e) = self.write_at_end(parts) {
            let _ = self.file.set_len(self.len);
            self.zeroed_to = self.len;
            return Err(FsError::io(
                format!(
                    "appending {} to pack {} at offset {}",
                    what(),
                    self.id,
                    self.len
                ),
                e,
            ));
        }
        self.len += parts.iter().map(|p| p.len() as u64).sum::<u64>();
        Ok(())
    }

    /// Writes `parts` back to back at the end. The whole pages of a large append go with
    /// `O_DIRECT` from a reused staging buffer: through the page cache they cost a copy
    /// into freshly allocated pages, about 0.5 s of CPU per GiB on this kind of VM (free
    /// pages go back to the host), against 0.06 s for the staging copy; and no writeback
    /// later. The partial pages at either end go through the page cache as before, so a
    /// direct write never covers a page that holds earlier records (the kernel writes back
    /// and drops cached pages of the range it writes; a read that fails verification is
    /// read again past the cache, `ChunkStore::read_loc`). Written pages leave the page
    /// cache, so a read soon after a large write goes to the disk.
    fn write_at_end(&mut self, parts: &[&[u8]]) -> io::Result<()> {
        let total: u64 = parts.iter().map(|p| p.len() as u64).sum();
        let (start, end) = (self.len, self.len + total);
        let a = start.div_ceil(PAGE) * PAGE;
        let b = end / PAGE * PAGE;
        let Some(direct) = self.direct.as_ref().filter(|_| b >= a + DIRECT_MIN) else {
            return write_all_vectored_at(&self.file, parts, start);
        };
        write_all_vectored_at(&self.file, &byte_range(parts, 0, a - start), start)?;
        let mut at = a;
        while at < b {
            let n = (b - at).min(DIRECT_MAX);
            let pages = byte_range(parts, at - start, at + n - start);
            match write_direct(direct, &mut self.stage, &pages, at) {
                Ok(()) => at += n,
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    // Alignment the filesystem will not take: the page cache from now on.
                    self.direct = None;
                    let rest = byte_range(parts, at - start, b - start);
                    write_all_vectored_at(&self.file, &rest, at)?;
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        write_all_vectored_at(&self.file, &byte_range(parts, b - start, total), b)
    }
}

/// Copies `parts` (whole pages in all) into `stage` (allocated at the first use) and
/// writes them at `offset` (page-aligned) through `direct`, opened with `O_DIRECT`.
fn write_direct(
    direct: &File,
    stage: &mut Vec<u8>,
    parts: &[&[u8]],
    offset: u64,
) -> io::Result<()> {
    let n: usize = parts.iter().map(|p| p.len()).sum();
    if stage.len() < (DIRECT_MAX + PAGE) as usize {
        *stage = vec![0u8; (DIRECT_MAX + PAGE) as usize];
    }
    let at = stage.as_ptr().align_offset(PAGE as usize);
    let buf = &mut stage[at..at + n];
    let mut o = 0;
    for p in parts {
        buf[o..o + p.len()].copy_from_slice(p);
        o += p.len();
    }
    direct.write_all_at(buf, offset)
}

/// The bytes `[from, to)` of `parts` taken back to back, as slices of them.
fn byte_range<'a>(parts: &[&'a [u8]], from: u64, to: u64) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    let mut at = 0u64;
    for p in parts {
        let (s, e) = (at, at + p.len() as u64);
        at = e;
        if s >= to {
            break;
        }
        let (a, b) = (from.max(s), to.min(e));
        if a < b {
            out.push(&p[(a - s) as usize..(b - s) as usize]);
        }
    }
    out
}

impl Drop for ActivePack {
    fn drop(&mut self) {
        if self.zeroed_to > self.len {
            let _ = self.file.set_len(self.len);
        }
    }
}

/// Writes all of `parts`, back to back, at `offset` (pwritev, resuming after short
/// writes; at most `IOV_MAX` parts per call).
fn write_all_vectored_at(file: &File, parts: &[&[u8]], mut offset: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    const IOV_MAX: usize = 1024;
    let mut idx = 0;
    let mut skip = 0usize; // bytes of parts[idx] already written
    while idx < parts.len() {
        let iov: Vec<libc::iovec> = parts[idx..parts.len().min(idx + IOV_MAX)]
            .iter()
            .enumerate()
            .map(|(n, p)| {
                let p = if n == 0 { &p[skip..] } else { p };
                libc::iovec {
                    iov_base: p.as_ptr() as *mut libc::c_void,
                    iov_len: p.len(),
                }
            })
            .collect();
        // SAFETY: every iovec points into a live slice of `parts` for the whole call.
        let n = unsafe {
            libc::pwritev(
                file.as_raw_fd(),
                iov.as_ptr(),
                iov.len() as libc::c_int,
                offset as libc::off_t,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "pwritev wrote nothing",
            ));
        }
        offset += n as u64;
        let mut left = n as usize;
        while left > 0 {
            let rest = parts[idx].len() - skip;
            if left >= rest {
                left -= rest;
                idx += 1;
                skip = 0;
            } else {
                skip += left;
                left = 0;
            }
        }
        // Skip empty parts so the next iovec list starts at real bytes.
        while idx < parts.len() && parts[idx].len() == skip {
            idx += 1;
            skip = 0;
        }
    }
    Ok(())
}

/// Gives the kernel `advice` (`POSIX_FADV_*`) on bytes `[offset, offset + len)` of
/// `file` (len 0: to the end). Only advice: a kernel that does not take it goes on as before.
pub fn advise(file: &File, offset: u64, len: u64, advice: libc::c_int) {
    use std::os::fd::AsRawFd;
    // SAFETY: plain syscall on a descriptor `file` keeps open; no memory is passed.
    unsafe {
        libc::posix_fadvise(
            file.as_raw_fd(),
            offset as libc::off_t,
            len as libc::off_t,
            advice,
        )
    };
}

/// Reads exactly `len` bytes at `offset` of an open pack.
pub fn read_at(file: &File, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, offset)?;
    Ok(buf)
}

/// Reads up to `len` bytes at `offset` of an open pack: fewer at its end.
pub fn read_upto(file: &File, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let mut done = 0;
    while done < len {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(done);
    Ok(buf)
}

/// The name and data length of the chunk record whose header starts `buf`.
pub fn chunk_header(buf: &[u8]) -> Option<(ChunkId, usize)> {
    let h = buf.get(..HEADER_LEN as usize)?;
    if &h[..4] != MAGIC {
        return None;
    }
    let len = u32::from_be_bytes(h[4..8].try_into().ok()?) as usize;
    Some((ChunkId(h[8..].try_into().ok()?), len))
}

/// The data length of the chunk record whose header starts `buf`, if it names `id`.
pub fn names(buf: &[u8], id: &ChunkId) -> Option<usize> {
    chunk_header(buf).and_then(|(name, len)| (name == *id).then_some(len))
}

/// The data of the chunk record at the start of `buf` if its header names `id` and the
/// whole record is in `buf` (the data is not verified).
pub fn chunk_record<'a>(buf: &'a [u8], id: &ChunkId) -> Option<&'a [u8]> {
    let len = names(buf, id)?;
    buf.get(HEADER_LEN as usize..HEADER_LEN as usize + len)
}

/// One record found by [`scan`].
pub struct Record {
    pub id: ChunkId,
    pub offset: u64,
    pub len: u32,
}

/// Reads every well-formed chunk record of a pack, stopping at the first torn or foreign
/// one. Returns the records and the offset where scanning stopped.
pub fn scan(path: &Path) -> Result<(Vec<Record>, u64)> {
    let (entries, end) = scan_entries(path, 0)?;
    let chunks = entries
        .into_iter()
        .filter_map(|(kind, rec)| (kind == Kind::Chunk).then_some(rec))
        .collect();
    Ok((chunks, end))
}

/// What a record holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Chunk,
    /// A block-map node; its `id` is the hash of the node's encoding.
    Node,
    /// An intent-log record of a flush; its `id` is the hash of its payload.
    Log,
    /// An intent-log record of written bytes; its `id` is the hash of its payload.
    Write,
}

impl Kind {
    const ALL: [Kind; 4] = [Kind::Chunk, Kind::Node, Kind::Log, Kind::Write];

    /// The magic bytes its records start with.
    pub fn magic(self) -> &'static [u8; 4] {
        match self {
            Kind::Chunk => MAGIC,
            Kind::Node => NODE_MAGIC,
            Kind::Log => LOG_MAGIC,
            Kind::Write => WRITE_MAGIC,
        }
    }

    /// The kind of the records of `index`.
    pub fn of(index: Index) -> Kind {
        match index {
            Index::Chunks => Kind::Chunk,
            Index::Nodes => Kind::Node,
        }
    }

    /// The index that locates records of this kind (`None`: log records, not indexed).
    pub fn index(self) -> Option<Index> {
        match self {
            Kind::Chunk => Some(Index::Chunks),
            Kind::Node => Some(Index::Nodes),
            Kind::Log | Kind::Write => None,
        }
    }
}

/// Reads every well-formed record (chunks and log records) from `from` on, stopping at
/// the first torn or foreign one; the data is not read (not verified). Returns them
/// and the offset where scanning stopped.
pub fn scan_entries(path: &Path, from: u64) -> Result<(Vec<(Kind, Record)>, u64)> {
    let file =
        File::open(path).map_err(|e| FsError::io(format!("opening {}", path.display()), e))?;
    let size = file
        .metadata()
        .map_err(|e| FsError::io(format!("stat {}", path.display()), e))?
        .len();
    let mut out = Vec::new();
    let mut pos = from;
    let mut h = [0u8; HEADER_LEN as usize];
    while pos + HEADER_LEN <= size {
        if file.read_exact_at(&mut h, pos).is_err() {
            break;
        }
        let Some(kind) = Kind::ALL.into_iter().find(|k| h[..4] == k.magic()[..]) else {
            break;
        };
        let len = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
        if pos + HEADER_LEN + len as u64 > size {
            break;
        }
        let mut id = [0u8; 32];
        id.copy_from_slice(&h[8..]);
        let rec = Record {
            id: ChunkId(id),
            offset: pos + HEADER_LEN,
            len,
        };
        out.push((kind, rec));
        pos += HEADER_LEN + len as u64;
    }
    Ok((out, pos))
}

/// Every record of a pack whose data hashes to its name, for `fsck --repair`.
///
/// Unlike [`scan`] it does not stop at damage: after a bad header or data that does not
/// match its hash it searches forward for the next [`MAGIC`] and resumes there, so one
/// damaged record does not hide the ones after it. A candidate header is accepted only if
/// its data verifies, so a `MAGIC` inside chunk data cannot produce a false record. Reads
/// the whole pack into memory (packs are bounded by the rotation size).
pub fn scan_verified(path: &Path) -> Result<Vec<Record>> {
    let bytes =
        std::fs::read(path).map_err(|e| FsError::io(format!("reading {}", path.display()), e))?;
    let mut out = Vec::new();
    let mut pos = 0usize;
    let hl = HEADER_LEN as usize;
    while pos + hl <= bytes.len() {
        let h = &bytes[pos..pos + hl];
        if &h[..4] == MAGIC {
            let len = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
            let end = pos + hl + len as usize;
            if end <= bytes.len() {
                let mut id = [0u8; 32];
                id.copy_from_slice(&h[8..]);
                let id = ChunkId(id);
                if ChunkId::of(&bytes[pos + hl..end]) == id {
                    out.push(Record {
                        id,
                        offset: (pos + hl) as u64,
                        len,
                    });
                    pos = end;
                    continue;
                }
            }
        }
        // Damaged or foreign: resume at the next magic.
        match bytes[pos + 1..].windows(4).position(|w| w == MAGIC) {
            Some(skip) => pos += 1 + skip,
            None => break,
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn append_many_writes_every_record_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = ActivePack::create(dir.path(), 3).unwrap();
        // More parts than one pwritev takes (IOV_MAX), of varied lengths (one empty).
        let datas: Vec<Vec<u8>> = (0..700u32)
            .map(|i| vec![(i % 251) as u8 + 1; (i as usize * 37) % 5000])
            .collect();
        let recs: Vec<(ChunkId, &[u8])> = datas.iter().map(|d| (ChunkId::of(d), &d[..])).collect();
        let offs = p.append_many(Kind::Chunk, &recs).unwrap();
        let (found, end) = scan(&pack_path(dir.path(), 3)).unwrap();
        assert_eq!(end, p.len);
        assert_eq!(found.len(), datas.len());
        for ((rec, off), d) in found.iter().zip(&offs).zip(&datas) {
            assert_eq!(
                (rec.offset, rec.len as usize, rec.id),
                (*off, d.len(), ChunkId::of(d))
            );
            assert_eq!(read_at(&p.file, *off, d.len()).unwrap(), *d);
        }
    }

    /// Appends of every size, starting at any offset, leave the pack holding exactly the
    /// bytes appended: the whole pages of large ones go with O_DIRECT (in pieces of at most
    /// DIRECT_MAX), the partial pages around them through the page cache. A reader that
    /// cached the pack's last page, or zeros written ahead of the end (`zero_ahead`),
    /// before a large append reads the new records right.
    #[test]
    fn appends_large_and_small_write_exactly_their_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = ActivePack::create(dir.path(), 5).unwrap();
        assert!(p.direct.is_some(), "this filesystem takes O_DIRECT");
        let reader = File::open(pack_path(dir.path(), 5)).unwrap();
        let mut rng = 0x9e3779b97f4a7c15u64;
        let mut want = Vec::new();
        let mut recs_at = Vec::new();
        for (round, size) in [100, 70_000, 3, 5 << 20, 4096, 200_000, 1, 9 << 20, 17]
            .into_iter()
            .enumerate()
        {
            // A few records making up `size` bytes of data, of pseudo-random content.
            let datas: Vec<Vec<u8>> = [size / 3, size - size / 3]
                .iter()
                .map(|&n| {
                    (0..n)
                        .map(|_| {
                            rng ^= rng << 13;
                            rng ^= rng >> 7;
                            rng ^= rng << 17;
                            rng as u8
                        })
                        .collect()
                })
                .collect();
            let recs: Vec<(ChunkId, &[u8])> =
                datas.iter().map(|d| (ChunkId::of(d), &d[..])).collect();
            // Cache the current last page, as a reader of the last record would.
            if p.len > 0 {
                read_at(&reader, p.len - 1, 1).unwrap();
            }
            if round % 3 == 1 {
                // Dirty zeros ahead, and a reader caching some of them.
                p.zero_ahead();
                assert!(p.zero_tail() > 0);
                assert!(read_upto(&reader, p.len, 256 << 10)
                    .unwrap()
                    .iter()
                    .all(|&b| b == 0));
            }
            let offs = p.append_many(Kind::Chunk, &recs).unwrap();
            for ((id, d), off) in recs.iter().zip(&offs) {
                want.extend_from_slice(&header(id, d.len() as u32));
                want.extend_from_slice(d);
                recs_at.push((*off, d.to_vec(), round));
            }
            assert_eq!(p.len, want.len() as u64);
            for (off, d, r) in &recs_at {
                assert!(
                    read_at(&reader, *off, d.len()).unwrap() == *d,
                    "record of round {r} at {off} after round {round}"
                );
            }
        }
        let bytes = std::fs::read(pack_path(dir.path(), 5)).unwrap();
        assert!(bytes[..want.len()] == want[..]);
        assert!(bytes[want.len()..].iter().all(|&b| b == 0), "zeros ahead");
        let (found, end) = scan(&pack_path(dir.path(), 5)).unwrap();
        assert_eq!((found.len(), end), (recs_at.len(), p.len));
    }

    #[test]
    fn byte_range_slices_across_parts() {
        let parts: Vec<&[u8]> = vec![b"abc", b"", b"defg", b"h"];
        let cat = |v: Vec<&[u8]>| v.concat();
        assert_eq!(cat(byte_range(&parts, 0, 8)), b"abcdefgh");
        assert_eq!(cat(byte_range(&parts, 2, 5)), b"cde");
        assert_eq!(cat(byte_range(&parts, 3, 7)), b"defg");
        assert_eq!(byte_range(&parts, 3, 7).len(), 1);
        assert!(byte_range(&parts, 4, 4).is_empty());
        assert_eq!(cat(byte_range(&parts, 7, 8)), b"h");
    }

    #[test]
    fn scan_verified_skips_damage() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = ActivePack::create(dir.path(), 1).unwrap();
        let datas: Vec<Vec<u8>> = (0..3u8).map(|i| vec![i + 1; 1000]).collect();
        let mut offs = Vec::new();
        for d in &datas {
            offs.extend(
                p.append_many(Kind::Chunk, &[(ChunkId::of(d), &d[..])])
                    .unwrap(),
            );
        }
        let path = pack_path(dir.path(), 1);
        // Damage the first record's header and the second record's data.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[(offs[0] - HEADER_LEN) as usize + 5] ^= 0xff;
        bytes[offs[1] as usize + 7] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let (plain, _) = scan(&path).unwrap();
        assert!(plain.is_empty(), "scan stops at the first damage");
        let recs = scan_verified(&path).unwrap();
        assert_eq!(recs.len(), 1);
        assert_eq!(recs[0].id, ChunkId::of(&datas[2]));
        assert_eq!(recs[0].offset, offs[2]);
    }
}

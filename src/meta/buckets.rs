//! The location indexes (chunk and block-map node name -> place in the packs), packed
//! many entries to a sled key.
//!
//! One sled key per entry cost ~200 bytes of disk and ~37 bytes of memory outside sled's
//! cache per entry (measured standalone: 2M random 33-byte keys with 11-byte values took
//! 383 MiB on disk, and 91 MiB of RSS with a 64 KiB cache against 25 MiB for 262k keys),
//! so the index grew the metadata to 2.3% of the data and the daemon's memory with the
//! store (issue 6). Here a bucket holds up to [`BUCKET_MAX`] entries sorted by name, under
//! the key `tag` + the first 8 bytes of the lowest name it covers: bucket `lo` holds the
//! names from `lo` up to the next bucket's `lo`. A lookup is the last key at or below the
//! name's prefix. The first bucket of an index has `lo` 0.
//!
//! A full bucket splits in two steps: first its upper part is written as new buckets
//! (halved until each is within the limit; one atomic sled write each, the highest
//! first), then the old one is rewritten without it. A reader in between is routed to
//! the new buckets written so far and finds every entry either way: each covers up to
//! the next one already written, so it holds every entry of its range, and the old
//! bucket still holds the rest. A crash in between (sled recovers a prefix of its
//! writes) leaves copies in the old bucket that no lookup reaches and that iteration
//! skips (it keeps only the names within each bucket's range) and the bucket's next
//! split drops. (Lowest first, a crash after the first new bucket would leave it
//! covering names it does not hold.)
//!
//! A bucket is never removed, even empty: its range would fall to the bucket below,
//! which may still hold copies from a split a crash cut short. (Names are uniform
//! hashes, so an emptied range fills again.)
//!
//! Writers are serialized by the caller's lock ([`super::Meta`] holds it); readers take
//! no lock.
//!
//! Finding a bucket is a reverse range scan in sled, which clones the whole leaf it
//! reads. Once a [`Directory`] of every bucket key is loaded (in the background at open),
//! a lookup finds the key in memory and reads the bucket with one point `get` instead.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::{FsError, Result};
use crate::ids::ChunkId;
use crate::meta::ChunkLoc;

/// Entries per bucket before it splits (a bucket of n entries takes 48n bytes). Measured
/// with scale.sh (32 GiB of unique data, 2 GiB of random 4 KiB overwrites): metadata
/// 2.20% / 2.06% / 1.93% of the data with 8 / 16 / 32, RSS growth from 4 to 32 GiB
/// +83 / +47 / +31 MiB, overwrites 5,635 / 6,396 / 5,645 IOPS; bench random 4 KiB writes
/// 11,198 (16) and 9,871 (32) IOPS. sled keeps superseded versions of a bucket until
/// their log segment is half garbage, so fewer, larger values leave less behind.
pub const BUCKET_MAX: usize = 32;
/// Bytes of one encoded entry: name, pack, offset, length.
const ENTRY: usize = 32 + 4 + 8 + 4;

/// The 8-byte prefix of a name that buckets are keyed by.
fn prefix(id: &ChunkId) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&id.0[..8]);
    u64::from_be_bytes(b)
}

fn key(tag: u8, lo: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = tag;
    k[1..].copy_from_slice(&lo.to_be_bytes());
    k
}

fn lo_of(key: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&key[1..9]);
    u64::from_be_bytes(b)
}

type Entries = Vec<(ChunkId, ChunkLoc)>;

fn encode(entries: &Entries) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.len() * ENTRY);
    for (id, loc) in entries {
        out.extend_from_slice(&id.0);
        out.extend_from_slice(&loc.pack.to_be_bytes());
        out.extend_from_slice(&loc.offset.to_be_bytes());
        out.extend_from_slice(&loc.len.to_be_bytes());
    }
    out
}

fn decode(key: &[u8], bytes: &[u8]) -> Result<Entries> {
    if key.len() != 9 || bytes.len() % ENTRY != 0 {
        return Err(FsError::Meta(format!(
            "index bucket {:02x?}: {} bytes is not a whole number of entries",
            key,
            bytes.len()
        )));
    }
    Ok(bytes
        .chunks_exact(ENTRY)
        .map(|e| {
            let mut id = [0u8; 32];
            id.copy_from_slice(&e[..32]);
            let be4 = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
            let mut off = [0u8; 8];
            off.copy_from_slice(&e[36..44]);
            let loc = ChunkLoc {
                pack: be4(&e[32..36]),
                offset: u64::from_be_bytes(off),
                len: be4(&e[44..48]),
            };
            (ChunkId(id), loc)
        })
        .collect())
}

/// The keys of every bucket, in memory, so that finding a name's bucket needs no scan.
///
/// Buckets are never removed, so the set only grows: [`Directory::load`] adds the keys
/// it scans, and a split adds its new key right after writing the new bucket (before
/// rewriting the old one), so once loaded the set holds every key in sled. A lock-free
/// reader may miss a key being added: it then reads the old bucket, which holds every
/// entry until the split's last write, and after it answers absent for the moved part,
/// which callers ask again holding the writers' lock. ~15 bytes of memory a bucket
/// (under 1 byte per indexed name).
#[derive(Default)]
pub struct Directory {
    keys: parking_lot::RwLock<BTreeSet<[u8; 9]>>,
    loaded: AtomicBool,
}

impl Directory {
    /// Adds the key of every bucket of the `tags` indexes; lookups use the directory from
    /// then on. Returns false if `stop` was set first (the directory stays unused).
    pub fn load(&self, db: &sled::Db, tags: &[u8], stop: &AtomicBool) -> Result<bool> {
        // In runs, so lookups are not held off by one long write lock.
        let mut run = Vec::with_capacity(4096);
        for &tag in tags {
            for item in db.scan_prefix([tag]) {
                let (k, _) = item?;
                run.push(<[u8; 9]>::try_from(&k[..]).map_err(|_| {
                    FsError::Meta(format!("index bucket key {:02x?} is not 9 bytes", &k[..]))
                })?);
                if run.len() == run.capacity() {
                    if stop.load(Ordering::Relaxed) {
                        return Ok(false);
                    }
                    self.keys.write().extend(run.drain(..));
                }
            }
        }
        self.keys.write().extend(run);
        self.loaded.store(true, Ordering::Release);
        Ok(true)
    }

    fn add(&self, key: [u8; 9]) {
        self.keys.write().insert(key);
    }

    /// The `lo` of the bucket after bucket `lo`: `None` while not loaded, `Some(None)` if
    /// it is the last.
    fn next_lo(&self, tag: u8, lo: u64) -> Option<Option<u64>> {
        use std::ops::Bound::{Excluded, Unbounded};
        if !self.loaded.load(Ordering::Acquire) {
            return None;
        }
        let keys = self.keys.read();
        let next = keys.range((Excluded(key(tag, lo)), Unbounded)).next();
        Some(next.filter(|k| k[0] == tag).map(|k| lo_of(k)))
    }

    /// The key of the bucket covering `id`: `None` while not loaded, `Some(None)` if the
    /// index has no bucket.
    fn find(&self, tag: u8, id: &ChunkId) -> Option<Option<[u8; 9]>> {
        if !self.loaded.load(Ordering::Acquire) {
            return None;
        }
        let keys = self.keys.read();
        let k = keys.range(..=key(tag, prefix(id))).next_back();
        Some(k.filter(|k| k[0] == tag).copied())
    }
}

/// The bucket that covers `id` (its `lo` and entries), if the index has any bucket.
fn bucket_of(
    db: &sled::Db,
    dir: &Directory,
    tag: u8,
    id: &ChunkId,
) -> Result<Option<(u64, Entries)>> {
    if let Some(found) = dir.find(tag, id) {
        let Some(k) = found else {
            return Ok(None);
        };
        if let Some(v) = db.get(k)? {
            return Ok(Some((lo_of(&k), decode(&k, &v)?)));
        }
        // Unreachable (buckets are never removed); the scan below decides.
    }
    let Some((k, v)) = db.range(..=key(tag, prefix(id))).next_back().transpose()? else {
        return Ok(None);
    };
    if k.first() != Some(&tag) {
        return Ok(None);
    }
    Ok(Some((lo_of(&k), decode(&k, &v)?)))
}

/// Where `id` is, if indexed. A lookup that finds nothing may have raced a split (sled's
/// reverse iteration reads one leaf at a time, so it can see the old bucket after its
/// upper half moved out; a directory lookup may miss the new bucket's key): the caller
/// repeats it holding the writers' lock.
pub fn get(db: &sled::Db, dir: &Directory, tag: u8, id: &ChunkId) -> Result<Option<ChunkLoc>> {
    let Some((_, entries)) = bucket_of(db, dir, tag, id)? else {
        return Ok(None);
    };
    Ok(entries
        .binary_search_by(|(e, _)| e.0.cmp(&id.0))
        .ok()
        .map(|i| entries[i].1))
}

/// The `lo` of the bucket after bucket `lo`, if any.
fn next_lo(db: &sled::Db, tag: u8, lo: u64) -> Result<Option<u64>> {
    use std::ops::Bound::{Excluded, Unbounded};
    let next = db
        .range::<&[u8], _>((Excluded(&key(tag, lo)[..]), Unbounded))
        .next()
        .transpose()?;
    Ok(next
        .filter(|(k, _)| k.first() == Some(&tag))
        .map(|(k, _)| lo_of(&k)))
}

/// Applies `change` to the entry of `id` (`None`: absent) and writes the bucket back,
/// splitting it when full. Returns what `change` returned. The caller holds the writers'
/// lock.
pub fn update<T>(
    db: &sled::Db,
    dir: &Directory,
    tag: u8,
    id: &ChunkId,
    change: impl FnOnce(&mut Option<ChunkLoc>) -> T,
) -> Result<T> {
    let found = bucket_of(db, dir, tag, id)?;
    let first = found.is_none();
    let (lo, mut entries) = found.unwrap_or((0, Vec::new()));
    let at = entries.binary_search_by(|(e, _)| e.0.cmp(&id.0));
    let mut slot = at.ok().map(|i| entries[i].1);
    let before = slot;
    let out = change(&mut slot);
    if slot == before {
        return Ok(out);
    }
    match (at, slot) {
        (Ok(i), Some(loc)) => entries[i].1 = loc,
        (Ok(i), None) => {
            entries.remove(i);
        }
        (Err(i), Some(loc)) => entries.insert(i, (*id, loc)),
        (Err(_), None) => {}
    }
    let hi = if entries.len() > BUCKET_MAX {
        next_lo(db, tag, lo)?
    } else {
        None
    };
    write_back(db, dir, tag, lo, hi, first, entries)?;
    Ok(out)
}

/// Sets the entries of many names (the chunks or nodes one write stored) with one
/// rewrite of each bucket they fall in, not one per name. A flush of 4096 random 16 KiB
/// blocks stores ~2600 new block-map nodes, spread over a few hundred buckets; one at a
/// time that was ~40 ms of the flush. The caller holds the writers' lock.
pub fn put_many(
    db: &sled::Db,
    dir: &Directory,
    tag: u8,
    locs: &[(ChunkId, ChunkLoc)],
) -> Result<()> {
    let mut locs = locs.to_vec();
    // Stable: of a name given twice, the later place wins, as one at a time.
    locs.sort_by_key(|a| a.0 .0);
    let mut rest = &locs[..];
    while let Some((id, _)) = rest.first() {
        let found = bucket_of(db, dir, tag, id)?;
        let first = found.is_none();
        let (lo, mut entries) = found.unwrap_or((0, Vec::new()));
        let hi = match dir.next_lo(tag, lo) {
            Some(hi) => hi,
            None => next_lo(db, tag, lo)?,
        };
        let n = rest.partition_point(|(id, _)| hi.is_none_or(|h| prefix(id) < h));
        if n == 0 {
            return Err(FsError::Meta(format!(
                "index bucket {lo:016x} found for {id} ends below it at {hi:016x?}"
            )));
        }
        let (mine, tail) = rest.split_at(n);
        rest = tail;
        let mut changed = false;
        for &(id, loc) in mine {
            match entries.binary_search_by(|(e, _)| e.0.cmp(&id.0)) {
                Ok(i) if entries[i].1 == loc => {}
                Ok(i) => {
                    entries[i].1 = loc;
                    changed = true;
                }
                Err(i) => {
                    entries.insert(i, (id, loc));
                    changed = true;
                }
            }
        }
        if changed {
            write_back(db, dir, tag, lo, hi, first, entries)?;
        }
    }
    Ok(())
}

/// Writes bucket `lo` with `entries`, splitting it while over [`BUCKET_MAX`] (`first`:
/// the index had no bucket; `hi`: the next bucket's `lo`, needed only when `entries` are
/// over the limit). The new upper buckets are written first, the highest first, each one
/// atomic sled write, then bucket `lo` without them: see the module comment for why a
/// crash in between loses nothing.
fn write_back(
    db: &sled::Db,
    dir: &Directory,
    tag: u8,
    lo: u64,
    hi: Option<u64>,
    first: bool,
    mut entries: Entries,
) -> Result<()> {
    if entries.len() > BUCKET_MAX {
        // Copies left outside the range by a split a crash cut short go first: no lookup
        // reaches them here, but split off again they would overwrite the bucket above.
        entries.retain(|(e, _)| prefix(e) >= lo && hi.is_none_or(|h| prefix(e) < h));
    }
    let mut parts = split(entries).into_iter();
    let lowest = parts.next().unwrap_or_default();
    for upper in parts.rev() {
        let k = key(tag, prefix(&upper[0].0));
        #[cfg(test)]
        tests::crash_point()?;
        db.insert(k, encode(&upper))?;
        dir.add(k);
    }
    #[cfg(test)]
    tests::crash_point()?;
    db.insert(key(tag, lo), encode(&lowest))?;
    if first {
        dir.add(key(tag, lo));
    }
    Ok(())
}

/// `entries` (sorted) cut into buckets of at most [`BUCKET_MAX`], in order: halved where
/// the prefix changes nearest the middle (names sharing an 8-byte prefix stay together:
/// a bucket only outgrows the limit in that case). The first part keeps the lowest names.
fn split(entries: Entries) -> Vec<Entries> {
    let mut done = Vec::new();
    let mut todo = vec![entries];
    while let Some(mut part) = todo.pop() {
        let mid = part.len() / 2;
        let cut = (part.len() > BUCKET_MAX)
            .then(|| {
                (mid..part.len())
                    .chain((1..mid).rev())
                    .find(|&i| prefix(&part[i].0) != prefix(&part[i - 1].0))
            })
            .flatten();
        match cut {
            Some(cut) => {
                let upper = part.split_off(cut);
                // Lower half next (a stack): parts come out in name order.
                todo.push(upper);
                todo.push(part);
            }
            _ => done.push(part),
        }
    }
    done
}

/// Every entry of the index, in name order. Entries a bucket holds outside its range (a
/// crash in the middle of a split) are skipped.
pub fn iter(db: &sled::Db, tag: u8) -> impl Iterator<Item = Result<(ChunkId, ChunkLoc)>> + '_ {
    let mut buckets = db.scan_prefix([tag]).peekable();
    let mut pending: std::vec::IntoIter<(ChunkId, ChunkLoc)> = Vec::new().into_iter();
    std::iter::from_fn(move || loop {
        if let Some(e) = pending.next() {
            return Some(Ok(e));
        }
        let (k, v) = match buckets.next()? {
            Ok(kv) => kv,
            Err(e) => return Some(Err(e.into())),
        };
        let hi = match buckets.peek() {
            Some(Ok((next, _))) => Some(lo_of(next)),
            // The error comes next; yield nothing of a bucket whose range is unknown.
            Some(Err(_)) => continue,
            None => None,
        };
        let lo = lo_of(&k);
        match decode(&k, &v) {
            Ok(entries) => {
                let inside = move |(id, _): &(ChunkId, ChunkLoc)| {
                    let p = prefix(id);
                    p >= lo && hi.is_none_or(|h| p < h)
                };
                pending = entries
                    .into_iter()
                    .filter(inside)
                    .collect::<Vec<_>>()
                    .into_iter();
            }
            Err(e) => return Some(Err(e)),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    thread_local! {
        /// Bucket writes [`write_back`] makes on this thread before it fails as if the
        /// daemon died there (`None`: no crash).
        static WRITES_LEFT: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
    }

    pub(super) fn crash_point() -> Result<()> {
        match WRITES_LEFT.get() {
            Some(0) => Err(FsError::Meta("crashed here (test)".into())),
            left => {
                WRITES_LEFT.set(left.map(|n| n - 1));
                Ok(())
            }
        }
    }

    /// A batch that splits buckets into many parts, cut short after every possible number
    /// of bucket writes (what sled recovers after a crash is a prefix of its writes):
    /// every entry stored before is still found, iteration yields each name once, and the
    /// batch given again afterwards leaves every entry findable.
    #[test]
    fn a_batch_cut_short_anywhere_loses_no_entry_stored_before() {
        let name = |n: u64| ChunkId::of(&n.to_le_bytes());
        let before: Vec<(ChunkId, ChunkLoc)> = (0..100).map(|n| (name(n), loc(n))).collect();
        let batch: Vec<(ChunkId, ChunkLoc)> = (100..700).map(|n| (name(n), loc(n))).collect();
        for k in 0.. {
            let dir = tempfile::tempdir().unwrap();
            let db = sled::open(dir.path()).unwrap();
            let d = directory(&db, true);
            put_many(&db, &d, b'X', &before).unwrap();
            WRITES_LEFT.set(Some(k));
            let done = put_many(&db, &d, b'X', &batch).is_ok();
            WRITES_LEFT.set(None);
            // The daemon starts again: the directory is loaded from what sled holds.
            let d = directory(&db, true);
            for (id, l) in &before {
                assert_eq!(get(&db, &d, b'X', id).unwrap(), Some(*l), "cut after {k}");
            }
            let all: Vec<_> = iter(&db, b'X').map(|e| e.unwrap()).collect();
            assert!(
                all.windows(2).all(|w| w[0].0 .0 < w[1].0 .0),
                "cut after {k}"
            );
            put_many(&db, &d, b'X', &batch).unwrap();
            for (id, l) in before.iter().chain(&batch) {
                assert_eq!(get(&db, &d, b'X', id).unwrap(), Some(*l), "cut after {k}");
            }
            assert_eq!(iter(&db, b'X').count(), 700, "cut after {k}");
            if done {
                assert!(k > 20, "the batch split buckets into many parts");
                break;
            }
        }
    }

    fn loc(n: u64) -> ChunkLoc {
        ChunkLoc {
            pack: n as u32,
            offset: n * 7,
            len: n as u32 + 1,
        }
    }

    /// A db whose bucket 0 holds `n` entries (returned sorted) and where only the first
    /// step of a split at `cut` happened (a crash between the two writes).
    fn torn(n: u64, cut: usize) -> (tempfile::TempDir, sled::Db, Entries) {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let mut entries: Entries = (0..n)
            .map(|n| (ChunkId::of(&n.to_le_bytes()), loc(n)))
            .collect();
        entries.sort_by_key(|e| e.0 .0);
        db.insert(key(b'X', 0), encode(&entries)).unwrap();
        let upper = entries[cut..].to_vec();
        db.insert(key(b'X', prefix(&upper[0].0)), encode(&upper))
            .unwrap();
        (dir, db, entries)
    }

    /// A directory for `db`: loaded (lookups use it) or not (lookups scan).
    fn directory(db: &sled::Db, loaded: bool) -> Directory {
        let d = Directory::default();
        if loaded {
            assert!(d.load(db, b"X", &AtomicBool::new(false)).unwrap());
        }
        d
    }

    #[test]
    fn many_entries_split_and_stay_findable() {
        for loaded in [false, true] {
            many_entries(loaded);
        }
    }

    fn many_entries(loaded: bool) {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let d = directory(&db, loaded);
        let ids: Vec<ChunkId> = (0..2000u64)
            .map(|n| ChunkId::of(&n.to_le_bytes()))
            .collect();
        for (n, id) in ids.iter().enumerate() {
            update(&db, &d, b'X', id, |s| *s = Some(loc(n as u64))).unwrap();
        }
        for (n, id) in ids.iter().enumerate() {
            assert_eq!(get(&db, &d, b'X', id).unwrap(), Some(loc(n as u64)));
        }
        assert!(get(&db, &d, b'X', &ChunkId::of(b"absent"))
            .unwrap()
            .is_none());
        let buckets = db.scan_prefix([b'X']).count();
        assert!(
            (2000 / BUCKET_MAX..=2000 * 2 / BUCKET_MAX + 1).contains(&buckets),
            "{buckets}"
        );
        let all: Vec<_> = iter(&db, b'X').map(|e| e.unwrap()).collect();
        assert_eq!(all.len(), 2000);
        assert!(all.windows(2).all(|w| w[0].0 .0 < w[1].0 .0), "name order");
        // Replace, then remove every other entry.
        for (n, id) in ids.iter().enumerate() {
            let was = update(&db, &d, b'X', id, |s| {
                let was = *s;
                *s = if n % 2 == 0 { None } else { Some(loc(5)) };
                was
            })
            .unwrap();
            assert_eq!(was, Some(loc(n as u64)));
        }
        for (n, id) in ids.iter().enumerate() {
            let want = (n % 2 == 1).then(|| loc(5));
            assert_eq!(get(&db, &d, b'X', id).unwrap(), want);
        }
        assert_eq!(iter(&db, b'X').count(), 1000);
        for id in &ids {
            update(&db, &d, b'X', id, |s| *s = None).unwrap();
        }
        assert_eq!(iter(&db, b'X').count(), 0);
        assert_eq!(db.scan_prefix([b'X']).count(), buckets, "buckets stay");
    }

    /// Batches of every size, into an empty index and into one that has buckets, some
    /// replacing entries: every entry is found with its latest place, iteration is in
    /// name order without copies, and no bucket is over the limit.
    #[test]
    fn put_many_in_batches_keeps_each_latest_place() {
        for loaded in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let db = sled::open(dir.path()).unwrap();
            let d = directory(&db, loaded);
            let mut model = std::collections::BTreeMap::new();
            let mut next = 0u64;
            for (round, size) in [1usize, 7, 3000, 1, 40, 500, 2].into_iter().enumerate() {
                let start = next;
                let batch: Vec<(ChunkId, ChunkLoc)> = (0..size)
                    .map(|k| {
                        // Every third name of a later batch is an earlier one, most of
                        // them stored before (a batch holds each name once, as callers
                        // give).
                        let old = (k / 3) as u64;
                        let n = match k % 3 == 0 && old < start {
                            true => old,
                            false => next,
                        };
                        next += 1;
                        (ChunkId::of(&n.to_le_bytes()), loc(next + round as u64))
                    })
                    .collect();
                put_many(&db, &d, b'X', &batch).unwrap();
                model.extend(batch.iter().map(|(id, l)| (id.0, *l)));
                for (id, l) in &model {
                    assert_eq!(get(&db, &d, b'X', &ChunkId(*id)).unwrap(), Some(*l));
                }
                let all: Vec<_> = iter(&db, b'X').map(|e| e.unwrap()).collect();
                let want: Vec<_> = model.iter().map(|(id, l)| (ChunkId(*id), *l)).collect();
                assert_eq!(all, want, "round {round}");
                for item in db.scan_prefix([b'X']) {
                    let (k, v) = item.unwrap();
                    assert!(decode(&k, &v).unwrap().len() <= BUCKET_MAX, "round {round}");
                }
            }
        }
    }

    /// A crash between the two writes of a split leaves the upper half in both buckets:
    /// lookups and iteration see each entry once.
    #[test]
    fn a_torn_split_is_read_right() {
        for loaded in [false, true] {
            torn_split_read(loaded);
        }
    }

    fn torn_split_read(loaded: bool) {
        let (_dir, db, mut entries) = torn(10, 5);
        let d = directory(&db, loaded);
        for (id, l) in &entries {
            assert_eq!(get(&db, &d, b'X', id).unwrap(), Some(*l));
        }
        let all: Vec<_> = iter(&db, b'X').map(|e| e.unwrap()).collect();
        assert_eq!(all, entries);
        // Inserting into the old bucket until it splits again must not write its stale
        // copies over the new bucket.
        let more: Vec<ChunkId> = (100..140u64)
            .map(|n| ChunkId::of(&n.to_le_bytes()))
            .filter(|id| prefix(id) < prefix(&entries[5].0))
            .take(12)
            .collect();
        update(&db, &d, b'X', &entries[6].0, |s| *s = Some(loc(66))).unwrap();
        for id in &more {
            update(&db, &d, b'X', id, |s| *s = Some(loc(1))).unwrap();
        }
        assert_eq!(get(&db, &d, b'X', &entries[6].0).unwrap(), Some(loc(66)));
        for id in &more {
            assert_eq!(get(&db, &d, b'X', id).unwrap(), Some(loc(1)));
        }
        entries[6].1 = loc(66);
        // Emptying the new bucket must not bring back the old copies below it.
        for (id, _) in &entries[5..] {
            update(&db, &d, b'X', id, |s| *s = None).unwrap();
            assert_eq!(get(&db, &d, b'X', id).unwrap(), None);
        }
        assert_eq!(iter(&db, b'X').count(), 5 + more.len());
    }

    /// The split after a torn one must not write the old bucket's stale copies over the
    /// bucket the torn split created (changed since).
    #[test]
    fn the_split_after_a_torn_split_keeps_the_newer_bucket() {
        for loaded in [false, true] {
            split_after_torn_split(loaded);
        }
    }

    fn split_after_torn_split(loaded: bool) {
        // 17 entries in bucket 0; the first step of its split wrote 8..17 as bucket P.
        let (_dir, db, entries) = torn(17, 8);
        let d = directory(&db, loaded);
        let p = prefix(&entries[8].0);
        // After the crash: a change in bucket P, then an insert below P.
        update(&db, &d, b'X', &entries[10].0, |s| *s = Some(loc(999))).unwrap();
        let below = (1000..5000u64)
            .map(|n| (ChunkId::of(&n.to_le_bytes()), loc(n)))
            .find(|(id, _)| prefix(id) < p && !entries.iter().any(|(e, _)| e == id))
            .unwrap();
        update(&db, &d, b'X', &below.0, |s| *s = Some(below.1)).unwrap();
        assert_eq!(get(&db, &d, b'X', &entries[10].0).unwrap(), Some(loc(999)));
        assert_eq!(get(&db, &d, b'X', &below.0).unwrap(), Some(below.1));
        assert_eq!(iter(&db, b'X').count(), 18);
    }

    /// Lock-free lookups while a writer splits buckets and the directory loads: every
    /// entry written before a lookup starts is found, by the first lookup or by the one
    /// repeated under the writers' lock (as `Meta::loc` does), never with another place.
    #[test]
    fn lookups_during_splits_and_the_directory_load_find_every_entry() {
        use std::sync::atomic::AtomicUsize;
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let d = Directory::default();
        let writes = parking_lot::Mutex::new(());
        let ids: Vec<ChunkId> = (0..4000u64)
            .map(|n| ChunkId::of(&n.to_le_bytes()))
            .collect();
        let written = AtomicUsize::new(0);
        let retried = AtomicUsize::new(0);
        std::thread::scope(|s| {
            s.spawn(|| {
                for (n, id) in ids.iter().enumerate() {
                    let _w = writes.lock();
                    update(&db, &d, b'X', id, |s| *s = Some(loc(n as u64))).unwrap();
                    drop(_w);
                    written.store(n + 1, Ordering::Release);
                    if n == 1500 {
                        // Loads while the writer goes on.
                        s.spawn(|| assert!(d.load(&db, b"X", &AtomicBool::new(false)).unwrap()));
                    }
                }
            });
            for reader in 0..2u64 {
                let (db, d, ids, written, retried, writes) =
                    (&db, &d, &ids, &written, &retried, &writes);
                s.spawn(move || {
                    let mut state = reader;
                    while written.load(Ordering::Acquire) < ids.len() {
                        let upto = written.load(Ordering::Acquire);
                        if upto == 0 {
                            continue;
                        }
                        state = state
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        let n = (state >> 33) % upto as u64;
                        let id = &ids[n as usize];
                        let got = match get(db, d, b'X', id).unwrap() {
                            Some(l) => Some(l),
                            None => {
                                retried.fetch_add(1, Ordering::Relaxed);
                                let _w = writes.lock();
                                get(db, d, b'X', id).unwrap()
                            }
                        };
                        assert_eq!(got, Some(loc(n)), "entry {n}");
                    }
                });
            }
        });
        assert!(d.loaded.load(Ordering::Acquire));
        let keys = d.keys.read().len();
        assert_eq!(
            keys,
            db.scan_prefix([b'X']).count(),
            "every bucket key, once each"
        );
        for (n, id) in ids.iter().enumerate() {
            assert_eq!(get(&db, &d, b'X', id).unwrap(), Some(loc(n as u64)));
        }
    }
}

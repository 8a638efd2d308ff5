//! Free-space guard of the store's disk.
//!
//! sled turns an ENOSPC into a permanent I/O error of the whole database and cannot even
//! open a store on a full disk, so thinfs never lets data fill the disk: writes of new
//! data fail with ENOSPC while the disk's free space is below a reserve kept for metadata
//! (5% of the disk, at least 8 MiB, at most 1 GiB). Deleting files, truncating and
//! unmounting keep working, and once GC returns pack space writes succeed again.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::error::{FsError, Result};

const MIN_RESERVE: u64 = 8 << 20;
const MAX_RESERVE: u64 = 1 << 30;
/// How long a free-space reading is trusted.
const REFRESH: Duration = Duration::from_millis(200);

/// Watches the free space of the disk holding a store.
pub struct SpaceGuard {
    path: PathBuf,
    state: Mutex<(Instant, u64, u64)>, // (read at, available bytes, total bytes)
    /// Bytes promised since the last reading (buffered writes not yet in packs).
    since: AtomicU64,
}

impl SpaceGuard {
    pub fn new(path: PathBuf) -> Self {
        let g = SpaceGuard {
            path,
            state: Mutex::new((Instant::now() - REFRESH * 2, 0, 0)),
            since: AtomicU64::new(0),
        };
        let _ = g.reading();
        g
    }

    fn reading(&self) -> Result<(u64, u64)> {
        let mut st = self.state.lock();
        if st.0.elapsed() >= REFRESH {
            let v = fs4::statvfs(&self.path)
                .map_err(|e| FsError::io(format!("statvfs {}", self.path.display()), e))?;
            *st = (Instant::now(), v.available_space(), v.total_space());
            self.since.store(0, Ordering::Relaxed);
        }
        Ok((st.1, st.2))
    }

    /// Bytes kept free for metadata.
    pub fn reserve(&self) -> u64 {
        let total = self.state.lock().2;
        (total / 20).clamp(MIN_RESERVE, MAX_RESERVE)
    }

    /// Available bytes for data after the reserve.
    pub fn available(&self) -> u64 {
        match self.reading() {
            Ok((avail, _)) => avail.saturating_sub(self.reserve()),
            Err(_) => 0,
        }
    }

    /// Admits `bytes` of new data plus `pending` buffered bytes, or answers ENOSPC.
    pub fn admit(&self, bytes: u64, pending: u64) -> Result<()> {
        let (avail, _) = self.reading()?;
        let since = self.since.fetch_add(bytes, Ordering::Relaxed) + bytes;
        if avail < self.reserve() + pending + since {
            self.since.fetch_sub(bytes, Ordering::Relaxed);
            return Err(FsError::NoSpace(format!(
                "{} has {} MiB free, below the {} MiB kept for metadata",
                self.path.display(),
                avail >> 20,
                self.reserve() >> 20
            )));
        }
        Ok(())
    }
}

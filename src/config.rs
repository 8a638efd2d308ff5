//! The store's identity file `thinfs.toml`: format version, block size, uuid, options.
//!
//! It is written once by `mkfs` and read at every open. A store whose format version this
//! build does not know is refused before anything else is touched.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{FsError, Result};

/// The on-disk format this build writes. 3: packs also hold intent-log records; 4: also
/// log records of written bytes (`TFW1`, which a format-3 build would take for a torn
/// tail and stop its replay at); 5: block-map nodes are records in the packs (`TFN1`)
/// under their own index, no longer values in the metadata store (a format-4 build
/// would find them missing); 6: the location indexes keep many entries per sled key
/// (`meta/buckets.rs`; entries of older formats are moved at open).
pub const FORMAT_VERSION: u32 = 6;
/// Older formats this build opens (and upgrades at the first read-write open: each is
/// format 5 without some kinds of pack record; their nodes in the metadata store are
/// still read, and removed by GC once unreachable).
pub const UPGRADES_FROM: [u32; 4] = [2, 3, 4, 5];
/// Name of the identity file inside a store.
pub const CONFIG_FILE: &str = "thinfs.toml";
/// Default logical block size (see the fleet benchmark in scripts/bench.sh).
pub const DEFAULT_BLOCK_SIZE: u32 = 16 * 1024;
/// Smallest and largest block sizes accepted by mkfs.
pub const MIN_BLOCK_SIZE: u32 = 4 * 1024;
pub const MAX_BLOCK_SIZE: u32 = 1024 * 1024;

/// What `thinfs.toml` holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreConfig {
    pub format_version: u32,
    pub block_size: u32,
    pub uuid: String,
    /// Name of the read-only directory at the mount root that shows snapshots.
    pub snapshot_dir: String,
}

impl StoreConfig {
    /// A new configuration for mkfs.
    pub fn new(block_size: u32) -> Result<Self> {
        check_block_size(block_size)?;
        Ok(StoreConfig {
            format_version: FORMAT_VERSION,
            block_size,
            uuid: new_uuid(),
            snapshot_dir: ".snapshots".to_string(),
        })
    }

    /// Path of the identity file of the store at `store`.
    pub fn path(store: &Path) -> PathBuf {
        store.join(CONFIG_FILE)
    }

    /// Reads and validates the identity file.
    pub fn load(store: &Path) -> Result<Self> {
        let path = Self::path(store);
        let text = fs::read_to_string(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                FsError::Invalid(format!(
                    "{} is not a thinfs store (no {CONFIG_FILE}; create one with `thinfs mkfs`)",
                    store.display()
                ))
            } else {
                FsError::io(format!("reading {}", path.display()), e)
            }
        })?;
        let mut version = None;
        let mut block_size = None;
        let mut uuid = None;
        let mut snapshot_dir = None;
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = || {
                FsError::Invalid(format!(
                    "{}:{}: cannot parse `{line}`",
                    path.display(),
                    n + 1
                ))
            };
            let (key, value) = line.split_once('=').ok_or_else(bad)?;
            let value = value.trim();
            let unquoted = value.trim_matches('"').to_string();
            match key.trim() {
                "format_version" => version = Some(value.parse::<u32>().map_err(|_| bad())?),
                "block_size" => block_size = Some(value.parse::<u32>().map_err(|_| bad())?),
                "uuid" => uuid = Some(unquoted),
                "snapshot_dir" => snapshot_dir = Some(unquoted),
                _ => {}
            }
        }
        let version = version
            .ok_or_else(|| FsError::Invalid(format!("{}: no format_version", path.display())))?;
        if version != FORMAT_VERSION && !UPGRADES_FROM.contains(&version) {
            return Err(FsError::Invalid(format!(
                "store {} has format version {version}; this thinfs reads version {FORMAT_VERSION}",
                store.display()
            )));
        }
        let block_size = block_size
            .ok_or_else(|| FsError::Invalid(format!("{}: no block_size", path.display())))?;
        check_block_size(block_size)?;
        Ok(StoreConfig {
            format_version: version,
            block_size,
            uuid: uuid.unwrap_or_default(),
            snapshot_dir: snapshot_dir.unwrap_or_else(|| ".snapshots".to_string()),
        })
    }

    /// Writes the identity file durably (write to a temp name, fsync, rename).
    pub fn save(&self, store: &Path) -> Result<()> {
        let path = Self::path(store);
        let tmp = store.join(format!("{CONFIG_FILE}.tmp"));
        let text = format!(
            "# thinfs store identity; do not edit\nformat_version = {}\nblock_size = {}\nuuid = \"{}\"\nsnapshot_dir = \"{}\"\n",
            self.format_version, self.block_size, self.uuid, self.snapshot_dir
        );
        let ctx = |what: &str| format!("{what} {}", tmp.display());
        let mut f = fs::File::create(&tmp).map_err(|e| FsError::io(ctx("creating"), e))?;
        f.write_all(text.as_bytes())
            .map_err(|e| FsError::io(ctx("writing"), e))?;
        f.sync_all().map_err(|e| FsError::io(ctx("syncing"), e))?;
        fs::rename(&tmp, &path).map_err(|e| FsError::io(ctx("renaming"), e))?;
        fs::File::open(store)
            .and_then(|d| d.sync_all())
            .map_err(|e| FsError::io(format!("syncing {}", store.display()), e))
    }
}

/// Checks that a block size is a power of two within the accepted range.
pub fn check_block_size(bs: u32) -> Result<()> {
    if !bs.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&bs) {
        return Err(FsError::Invalid(format!(
            "block size {bs} must be a power of two between 4K and 1M"
        )));
    }
    Ok(())
}

/// Parses sizes such as `16K`, `1M`, `65536`.
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        None => (s, 1u64),
        Some((i, _)) => {
            let mult = match s[i..]
                .to_ascii_uppercase()
                .trim_end_matches("IB")
                .trim_end_matches('B')
            {
                "" => 1,
                "K" => 1 << 10,
                "M" => 1 << 20,
                "G" => 1 << 30,
                "T" => 1 << 40,
                other => return Err(format!("unknown size suffix `{other}` in `{s}`")),
            };
            (&s[..i], mult)
        }
    };
    let n: u64 = num.parse().map_err(|_| format!("not a size: `{s}`"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("size too large: `{s}`"))
}

fn new_uuid() -> String {
    let mut seed = [0u8; 16];
    if let Ok(mut f) = fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut seed);
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let h = blake3::Hasher::new()
        .update(&seed)
        .update(&now.to_le_bytes())
        .update(&std::process::id().to_le_bytes())
        .finalize();
    let b = h.as_bytes();
    format!(
        "{}-{}-{}-{}-{}",
        hex(&b[0..4]),
        hex(&b[4..6]),
        hex(&b[6..8]),
        hex(&b[8..10]),
        hex(&b[10..16])
    )
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("16K"), Ok(16384));
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert_eq!(parse_size("65536"), Ok(65536));
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert!(parse_size("12Q").is_err());
    }

    #[test]
    fn block_size_bounds() {
        assert!(check_block_size(4096).is_ok());
        assert!(check_block_size(1 << 20).is_ok());
        assert!(check_block_size(2048).is_err());
        assert!(check_block_size(3 * 4096).is_err());
        assert!(check_block_size(2 << 20).is_err());
    }

    #[test]
    fn roundtrip_and_version_check() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = StoreConfig::new(65536).unwrap();
        cfg.save(dir.path()).unwrap();
        assert_eq!(StoreConfig::load(dir.path()).unwrap(), cfg);
        let text = fs::read_to_string(StoreConfig::path(dir.path())).unwrap();
        fs::write(
            StoreConfig::path(dir.path()),
            text.replace(
                &format!("format_version = {FORMAT_VERSION}"),
                "format_version = 999",
            ),
        )
        .unwrap();
        let err = StoreConfig::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("format version 999"), "{err}");
        // The formats before the intent log and before write records still open.
        for old in UPGRADES_FROM {
            fs::write(
                StoreConfig::path(dir.path()),
                text.replace(
                    &format!("format_version = {FORMAT_VERSION}"),
                    &format!("format_version = {old}"),
                ),
            )
            .unwrap();
            assert_eq!(StoreConfig::load(dir.path()).unwrap().format_version, old);
        }
    }
}

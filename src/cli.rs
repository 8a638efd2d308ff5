//! The command line: clap definitions only (parsing; `main.rs` calls the library).
//! Kept in the library so that man pages and completions are generated from it.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// thinfs: a FUSE datastore for virtual machines with thin clones, snapshots and
/// deduplication.
#[derive(Debug, Parser)]
#[command(name = "thinfs", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a new, empty store in STORE (created if missing; refuses a non-empty
    /// directory that is not a store).
    Mkfs {
        store: PathBuf,
        /// Logical block size: a power of two from 4K to 1M.
        #[arg(long, default_value = "16K", value_parser = parse_block_size)]
        block_size: u32,
        /// Name of the read-only snapshot directory at the mount root.
        #[arg(long, default_value = ".snapshots")]
        snapshot_dir: String,
    },
    /// Mount STORE at MOUNTPOINT. Returns once the mount is live; the daemon keeps running
    /// in the background until unmounted (umount, fusermount3 -u, SIGTERM).
    Mount {
        store: PathBuf,
        mountpoint: PathBuf,
        /// Stay in the foreground.
        #[arg(short, long)]
        foreground: bool,
        /// Mount options, comma separated: allow_other, allow_root, ro, noatime, ...
        #[arg(short = 'o', value_name = "OPTIONS", action = clap::ArgAction::Append)]
        options: Vec<String>,
        /// FUSE worker threads.
        #[arg(long, default_value_t = 4)]
        threads: usize,
    },
    /// Show logical vs stored bytes, chunks, packs and the dedup ratio of a store
    /// (STORE directory or a mountpoint).
    Stats {
        target: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Thin-clone a file or a directory tree inside a mounted thinfs (metadata only).
    Clone {
        src: PathBuf,
        dst: PathBuf,
        /// Replace an existing destination file.
        #[arg(long)]
        force: bool,
    },
    /// Show logical, stored, shared and exclusive bytes of paths inside a mounted thinfs.
    Du {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Reclaim chunks and block-map nodes no file, clone or snapshot reaches, and compact
    /// pack files (also runs in the background of a mount).
    Gc {
        /// A store directory (unmounted) or a mountpoint.
        target: Option<PathBuf>,
        /// The thinfs mountpoint (default: the mount holding the current directory).
        #[arg(long, conflicts_with = "target")]
        mount: Option<PathBuf>,
        /// Rewrite packs whose live share is below this fraction.
        #[arg(long, default_value_t = 0.5)]
        threshold: f64,
        /// Limit compaction I/O (bytes per second, e.g. 64M).
        #[arg(long, value_parser = parse_rate)]
        max_rate: Option<u64>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Verify every chunk against its BLAKE3 name; list damaged files and offsets (exit 1
    /// if any). Runs on a mounted store without stopping it.
    Scrub {
        /// A store directory (unmounted) or a mountpoint.
        target: PathBuf,
        /// Limit verification I/O (bytes per second, e.g. 200M).
        #[arg(long, value_parser = parse_rate)]
        max_rate: Option<u64>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check an unmounted store: references, index, reachability, leaks (exit 1 if not
    /// clean). --repair rebuilds the chunk index from the pack files.
    Fsck {
        store: PathBuf,
        #[arg(long)]
        repair: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write the man pages generated from these definitions into DIR.
    #[command(hide = true)]
    Man { dir: PathBuf },
    /// Create, list, delete or roll back to snapshots of a whole mounted datastore.
    Snapshot {
        #[command(subcommand)]
        action: SnapshotCmd,
    },
}

#[derive(Debug, Subcommand)]
pub enum SnapshotCmd {
    /// Freeze the whole datastore now (atomic, O(1)); readable under <mount>/.snapshots/NAME.
    Create {
        name: String,
        /// The thinfs mountpoint (default: the mount holding the current directory).
        #[arg(long)]
        mount: Option<PathBuf>,
        /// Shell command run just before the snapshot (e.g. a guest fs freeze); if it
        /// fails, no snapshot is taken.
        #[arg(long)]
        exec_before: Option<String>,
        /// Shell command run after the snapshot, even if it failed (e.g. a thaw).
        #[arg(long)]
        exec_after: Option<String>,
    },
    /// List snapshots: name, creation time, bytes only the snapshot holds.
    List {
        #[arg(long)]
        mount: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete a snapshot (GC reclaims what only it held).
    Delete {
        name: String,
        #[arg(long)]
        mount: Option<PathBuf>,
    },
    /// Make the live tree equal to a snapshot (no data copied). Asks unless --yes.
    Rollback {
        name: String,
        #[arg(long)]
        mount: Option<PathBuf>,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
        /// Roll back even while files are open.
        #[arg(long)]
        force: bool,
    },
}

fn parse_rate(s: &str) -> Result<u64, String> {
    crate::config::parse_size(s)
}

fn parse_block_size(s: &str) -> Result<u32, String> {
    let n = crate::config::parse_size(s)?;
    let n = u32::try_from(n).map_err(|_| format!("block size {s} is too large"))?;
    crate::config::check_block_size(n).map_err(|e| e.to_string())?;
    Ok(n)
}

/// Whether `word` names a subcommand (else `thinfs STORE MNT -o ...` is the mount helper
/// form).
pub fn is_subcommand(word: &str) -> bool {
    use clap::CommandFactory;
    word == "help"
        || Cli::command()
            .get_subcommands()
            .any(|c| c.get_name() == word)
}

/// The man pages generated from the clap definitions: `thinfs.8` and one
/// `thinfs-<subcommand>.8` per visible subcommand (nested ones too), as (file name, roff).
pub fn man_pages() -> Vec<(String, Vec<u8>)> {
    use clap::CommandFactory;
    let mut out = Vec::new();
    let cmd = Cli::command();
    render(&cmd, "thinfs", &mut out);
    out
}

fn render(cmd: &clap::Command, name: &str, out: &mut Vec<(String, Vec<u8>)>) {
    let cmd = cmd.clone().name(name.to_string());
    let mut buf = Vec::new();
    // Rendering into a Vec cannot fail.
    let _ = clap_mangen::Man::new(cmd.clone())
        .section("8")
        .render(&mut buf);
    out.push((format!("{name}.8"), buf));
    for sub in cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
    {
        render(sub, &format!("{name}-{}", sub.get_name()), out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// man/ is generated: this fails when a flag changes without `thinfs man man/`.
    #[test]
    fn man_pages_are_current() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("man");
        for (name, want) in man_pages() {
            let have = std::fs::read(dir.join(&name)).unwrap_or_default();
            assert!(
                have == want,
                "man/{name} is stale: run `cargo run -- man man/`"
            );
        }
    }

    #[test]
    fn cli_definitions_are_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}

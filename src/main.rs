//! The `thinfs` command: parses arguments and calls the library. Exit codes: 0 ok,
//! 1 failure, 2 usage.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use thinfs::cli::{is_subcommand, Cli, Command, SnapshotCmd};
use thinfs::control::{self, Request};
use thinfs::fs::{Datastore, OpenOptions};

/// mimalloc instead of glibc's malloc: the daemon allocates and frees a block-sized
/// buffer per write, and glibc spent ~16% of its CPU under random writes in its bins
/// (perf: _int_malloc, unlink_chunk, _int_free, malloc_consolidate).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_env("THINFS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,fuser=error,sled=warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(false)
        .init();
    let cli = Cli::parse_from(helper_form(std::env::args().collect()));
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("thinfs: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// mount.fuse3 runs `thinfs STORE MNT -o opts`: that is `thinfs mount STORE MNT -o opts`.
fn helper_form(mut args: Vec<String>) -> Vec<String> {
    if let Some(first) = args.get(1) {
        if !first.starts_with('-') && !is_subcommand(first) && args.len() >= 3 {
            args.insert(1, "mount".into());
        }
    }
    args
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Mkfs {
            store,
            block_size,
            snapshot_dir,
        } => {
            let mut cfg = thinfs::config::StoreConfig::new(block_size)?;
            cfg.snapshot_dir = snapshot_dir;
            Datastore::mkfs_with(&store, cfg)?;
            println!(
                "created thinfs store {} (block size {} KiB)",
                store.display(),
                block_size / 1024
            );
            Ok(())
        }
        Command::Mount {
            store,
            mountpoint,
            foreground,
            options,
            threads,
        } => thinfs::mount::run(&store, &mountpoint, foreground, &options, threads),
        Command::Stats { target, json } => {
            let (store, mounted) = store_of(&target)?;
            let value = request(&store, mounted, Request::Stats, true, "stats")?;
            print_stats(&value, json);
            Ok(())
        }
        Command::Clone { src, dst, force } => {
            let (m1, src_rel) = control::mount_of(&src).map_err(|e| anyhow!(e))?;
            let (m2, dst_rel) = control::mount_of_new(&dst).map_err(|e| anyhow!(e))?;
            if m1 != m2 {
                bail!(
                    "{} and {} are not in the same thinfs mount (EXDEV): clone works inside one datastore",
                    src.display(),
                    dst.display()
                );
            }
            call(
                &m1.store,
                &Request::Clone {
                    src: bytes(&src_rel),
                    dst: bytes(&dst_rel),
                    force,
                },
            )
            .with_context(|| format!("clone {} -> {}", src.display(), dst.display()))?;
            Ok(())
        }
        Command::Snapshot { action } => snapshot(action),
        Command::Gc {
            target,
            mount,
            threshold,
            max_rate,
            json,
        } => {
            let (store, mounted) = match (target, mount) {
                (Some(t), _) => store_of(&t)?,
                (None, m) => (mount_store(m)?, true),
            };
            let req = Request::Gc {
                compact_threshold: Some(threshold),
                max_bytes_per_sec: max_rate,
            };
            let report = request(&store, mounted, req, json, "gc")?;
            if json {
                println!("{report}");
            } else {
                let g = |k: &str| report.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
                println!(
                    "freed {} ({} chunks, {} nodes, {} packs deleted, {} compacted, {} relocated) in {} ms",
                    human(g("bytes_freed")),
                    g("chunks_freed"),
                    g("nodes_freed"),
                    g("packs_deleted"),
                    g("packs_compacted"),
                    human(g("bytes_relocated")),
                    g("duration_ms")
                );
            }
            Ok(())
        }
        Command::Scrub {
            target,
            max_rate,
            json,
        } => {
            let (store, mounted) = store_of(&target)?;
            let req = Request::Scrub {
                max_bytes_per_sec: max_rate,
            };
            let report = request(&store, mounted, req, json, "scrub")?;
            let clean = report
                .get("clean")
                .and_then(|c| c.as_bool())
                .unwrap_or(false);
            if json {
                println!("{report}");
            } else {
                let g = |k: &str| report.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
                println!(
                    "verified {} chunks ({}), {} nodes",
                    g("chunks_checked"),
                    human(g("bytes_checked")),
                    g("nodes_checked")
                );
                for b in report["damaged_blocks"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                {
                    let path = b["path"]
                        .as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| format!("inode {}", b["ino"]));
                    println!(
                        "DAMAGED {path} offset {} length {} ({})",
                        b["offset"],
                        b["length"],
                        b["id"].as_str().unwrap_or("")
                    );
                }
            }
            if !clean {
                bail!("scrub found damaged data");
            }
            Ok(())
        }
        Command::Fsck {
            store,
            repair,
            json,
        } => {
            let report = thinfs::fsck::fsck(&store, repair)?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                println!("{}", serde_json::to_string_pretty(&report)?);
            }
            if !report.clean {
                bail!(
                    "{} is not clean{}",
                    store.display(),
                    if repair { " after repair" } else { "" }
                );
            }
            Ok(())
        }
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "thinfs", &mut std::io::stdout());
            Ok(())
        }
        Command::Man { dir } => {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            for (name, page) in thinfs::cli::man_pages() {
                let path = dir.join(name);
                std::fs::write(&path, page)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            Ok(())
        }
        Command::Du { paths, json } => {
            let mut store = None;
            let mut rels = Vec::new();
            for p in &paths {
                let (m, rel) = control::mount_of(p).map_err(|e| anyhow!(e))?;
                if store.get_or_insert(m.store.clone()) != &m.store {
                    bail!(
                        "{} is in another thinfs mount than {}",
                        p.display(),
                        paths[0].display()
                    );
                }
                rels.push(bytes(&rel));
            }
            let store = store.ok_or_else(|| anyhow!("no path given"))?;
            let v = call(&store, &Request::Du { paths: rels })?;
            if json {
                println!("{v}");
            } else {
                let g = |k: &str| v.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
                println!("files      {}", g("files"));
                for k in [
                    "logical_bytes",
                    "stored_bytes",
                    "shared_bytes",
                    "exclusive_bytes",
                ] {
                    println!("{:<10} {}", k.trim_end_matches("_bytes"), human(g(k)));
                }
            }
            Ok(())
        }
    }
}

/// The store of `--mount`, or of the mount holding the current directory.
fn mount_point(mount: Option<&Path>) -> Result<PathBuf> {
    let p = mount.unwrap_or(Path::new("."));
    let (m, _) = control::mount_of(p).map_err(|e| anyhow!(e))?;
    Ok(m.mountpoint)
}

fn mount_store(mount: Option<PathBuf>) -> Result<PathBuf> {
    let p = mount.unwrap_or_else(|| PathBuf::from("."));
    let (m, _) = control::mount_of(&p).map_err(|e| anyhow!(e))?;
    Ok(m.store)
}

/// Runs a quiesce hook through the shell; fails with its exit status.
fn run_hook(what: &str, cmd: &str) -> Result<()> {
    let status = std::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(cmd)
        .status()
        .with_context(|| format!("running {what} command `{cmd}`"))?;
    if !status.success() {
        bail!("{what} command `{cmd}` failed with {status}");
    }
    Ok(())
}

fn snapshot(action: SnapshotCmd) -> Result<()> {
    match action {
        SnapshotCmd::Create {
            name,
            mount,
            exec_before,
            exec_after,
        } => {
            thinfs::fs::snapshot::check_snapshot_name(&name)?;
            let mount_hint = mount.clone();
            let store = mount_store(mount)?;
            if let Some(cmd) = &exec_before {
                run_hook("--exec-before", cmd)?;
            }
            syncfs(&mount_point(mount_hint.as_deref())?);
            let made = call(&store, &Request::SnapshotCreate { name: name.clone() });
            let after = exec_after
                .as_deref()
                .map(|cmd| run_hook("--exec-after", cmd));
            made.with_context(|| format!("snapshot {name}"))?;
            if let Some(r) = after {
                r?;
            }
            println!("created snapshot {name}");
            Ok(())
        }
        SnapshotCmd::List { mount, json } => {
            let v = call(&mount_store(mount)?, &Request::SnapshotList)?;
            if json {
                println!("{v}");
                return Ok(());
            }
            println!("{:<24} {:<12} {:>16}", "NAME", "CREATED", "EXCLUSIVE");
            for s in v.as_array().cloned().unwrap_or_default() {
                println!(
                    "{:<24} {:<12} {:>16}",
                    s["name"].as_str().unwrap_or(""),
                    s["created"].as_i64().unwrap_or(0),
                    human(s["exclusive_bytes"].as_u64().unwrap_or(0))
                );
            }
            Ok(())
        }
        SnapshotCmd::Delete { name, mount } => {
            call(
                &mount_store(mount)?,
                &Request::SnapshotDelete { name: name.clone() },
            )
            .with_context(|| format!("delete snapshot {name}"))?;
            Ok(())
        }
        SnapshotCmd::Rollback {
            name,
            mount,
            yes,
            force,
        } => {
            let store = mount_store(mount)?;
            if !yes {
                eprint!("Roll the live tree back to snapshot {name}? Changes since then are lost. [y/N] ");
                let mut line = String::new();
                std::io::stdin().read_line(&mut line)?;
                if !matches!(line.trim(), "y" | "Y" | "yes") {
                    bail!("not confirmed");
                }
            }
            call(
                &store,
                &Request::SnapshotRollback {
                    name: name.clone(),
                    force,
                },
            )
            .with_context(|| format!("rollback to {name}"))?;
            Ok(())
        }
    }
}

/// Pushes writes the kernel still caches for the filesystem holding `path` to the daemon
/// (with `-o writeback_cache` they would otherwise miss a clone or snapshot).
fn syncfs(path: &Path) {
    if let Ok(f) = std::fs::File::open(path) {
        use std::os::fd::AsRawFd;
        // SAFETY: a valid open fd.
        unsafe { libc::syncfs(f.as_raw_fd()) };
    }
}

fn bytes(p: &Path) -> Vec<u8> {
    use std::os::unix::ffi::OsStrExt;
    p.as_os_str().as_bytes().to_vec()
}

/// The store a STORE-or-mountpoint argument names, and whether a daemon serves it.
fn store_of(target: &Path) -> Result<(PathBuf, bool)> {
    let abs = std::fs::canonicalize(target).with_context(|| format!("{}", target.display()))?;
    if let Some(m) = control::mounts().into_iter().find(|m| m.mountpoint == abs) {
        return Ok((m.store, true));
    }
    let mounted = control::mounts().iter().any(|m| m.store == abs);
    Ok((abs, mounted))
}

/// Answers `req` through the daemon serving `store`, or, for an unmounted store, by
/// opening it here: one code path (control::handle_streaming) either way.
fn request(
    store: &Path,
    mounted: bool,
    req: Request,
    quiet: bool,
    what: &str,
) -> Result<serde_json::Value> {
    if mounted {
        return with_bar(quiet, what, |cb| call_progress(store, &req, cb));
    }
    let opts = OpenOptions {
        no_background: true,
        ..Default::default()
    };
    let ds = Datastore::open(store, &opts)?;
    with_bar(quiet, what, |cb| {
        Ok(control::handle_streaming(&ds, req, &|_, _| {}, cb)?)
    })
}

/// Runs `work`, showing its progress as a bar on stderr unless printing JSON.
fn with_bar(
    quiet: bool,
    what: &str,
    work: impl FnOnce(&dyn Fn(control::Progress)) -> Result<serde_json::Value>,
) -> Result<serde_json::Value> {
    let bar = if quiet || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(0)
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{prefix} {msg:8} [{bar:40}] {pos}/{len} {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_prefix(what.to_string());
    let out = work(&|p| {
        bar.set_message(p.progress.clone());
        bar.set_length(p.total);
        bar.set_position(p.done);
    });
    bar.finish_and_clear();
    out
}

fn call_progress(
    store: &Path,
    req: &Request,
    progress: &dyn Fn(control::Progress),
) -> Result<serde_json::Value> {
    let reply = control::call_with_progress(store, req, progress).map_err(|e| anyhow!(e))?;
    if !reply.ok {
        bail!("{} (errno {})", reply.error, reply.errno);
    }
    Ok(reply.value)
}

fn call(store: &Path, req: &Request) -> Result<serde_json::Value> {
    let reply = control::call(store, req).map_err(|e| anyhow!(e))?;
    if !reply.ok {
        bail!("{} (errno {})", reply.error, reply.errno);
    }
    Ok(reply.value)
}

fn human(n: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < units.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {} ({n} bytes)", units[u])
    }
}

fn print_stats(v: &serde_json::Value, json: bool) {
    if json {
        println!("{v}");
        return;
    }
    let g = |k: &str| v.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
    println!("block size   {}", human(g("block_size")));
    println!("files        {}", g("files"));
    println!("logical      {}", human(g("logical_bytes")));
    println!("allocated    {}", human(g("allocated_bytes")));
    println!("stored       {}", human(g("stored_bytes")));
    println!("packs        {} ({})", g("packs"), human(g("pack_bytes")));
    println!(
        "metadata     {} (+ {} of block-map nodes in the packs)",
        human(g("meta_bytes")),
        human(g("node_bytes"))
    );
    println!("chunks       {}", g("chunks"));
    println!("map nodes    {}", g("nodes"));
    println!(
        "garbage      {} (reclaimable by thinfs gc)",
        human(g("garbage_bytes"))
    );
    println!(
        "dedup ratio  {:.2}x",
        v.get("dedup_ratio").and_then(|x| x.as_f64()).unwrap_or(1.0)
    );
}

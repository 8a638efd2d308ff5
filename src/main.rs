//! The `thinfs` command: parses arguments and calls the library. Exit codes: 0 ok,
//! 1 failure, 2 usage.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use thinfs::cli::{Cli, Command, SUBCOMMANDS};
use thinfs::control::{self, Request};
use thinfs::fs::{Datastore, OpenOptions};

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
        if !first.starts_with('-') && !SUBCOMMANDS.contains(&first.as_str()) && args.len() >= 3 {
            args.insert(1, "mount".into());
        }
    }
    args
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Mkfs { store, block_size } => {
            Datastore::mkfs(&store, block_size)?;
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
            let value = match store_of(&target)? {
                (store, true) => call(&store, &Request::Stats)?,
                (store, false) => {
                    let ds = Datastore::open(
                        &store,
                        &OpenOptions {
                            no_background: true,
                        },
                    )?;
                    serde_json::to_value(ds.stats()?)?
                }
            };
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
    println!("metadata     {}", human(g("meta_bytes")));
    println!("chunks       {}", g("chunks"));
    println!(
        "dedup ratio  {:.2}x",
        v.get("dedup_ratio").and_then(|x| x.as_f64()).unwrap_or(1.0)
    );
}

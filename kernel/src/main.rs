//! `moelab-kernel`: run the Jupyter kernel (`run --connection-file F`, as the kernelspec
//! says), install the kernelspec (`install [--user|--sys-prefix|--prefix P]`, which also
//! warms the compiled-moelab cache), or only warm the cache (`warm`).

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use moelab_kernel::{connection, engine, install, outbox, server, wire, workdir};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

#[derive(Parser)]
#[command(name = "moelab-kernel", version, about = "Jupyter kernel for Rust on evcxr with moelab preloaded")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve one kernel session (Jupyter starts this through the kernelspec).
    Run {
        /// The connection file Jupyter wrote.
        #[arg(long = "connection-file", short = 'f')]
        connection_file: PathBuf,
    },
    /// Write the kernelspec so Jupyter finds the kernel, then warm the build cache.
    Install {
        /// Into the user's Jupyter data directory (the default).
        #[arg(long, conflicts_with_all = ["sys_prefix", "prefix"])]
        user: bool,
        /// Into the active Python environment (`sys.prefix` of python3 on PATH).
        #[arg(long = "sys-prefix", conflicts_with = "prefix")]
        sys_prefix: bool,
        /// Into PREFIX/share/jupyter.
        #[arg(long)]
        prefix: Option<PathBuf>,
        /// Skip compiling moelab into the evcxr cache (the first Rust cell then takes minutes).
        #[arg(long = "no-warm")]
        no_warm: bool,
    },
    /// Compile moelab into the evcxr cache of the first free work slot and time a cell.
    Warm,
}

fn main() -> Result<()> {
    // evcxr runs cells in a child process that is this same binary: hand over first.
    evcxr::runtime_hook();
    match Cli::parse().command {
        Command::Run { connection_file } => run(connection_file),
        Command::Install { user: _, sys_prefix, prefix, no_warm } => {
            let target = match (sys_prefix, prefix) {
                (true, _) => install::Target::SysPrefix,
                (false, Some(p)) => install::Target::Prefix(p),
                (false, None) => install::Target::User,
            };
            let exe = std::env::current_exe().context("locating this executable")?;
            let exe = exe.canonicalize().unwrap_or(exe);
            let dir = install::install(&target, &exe)?;
            println!("installed kernelspec {} in {}", install::KERNEL_NAME, dir.display());
            if no_warm {
                Ok(())
            } else {
                warm()
            }
        }
        Command::Warm => warm(),
    }
}

/// Take a work slot and point evcxr at it. Must run before any other thread starts.
fn use_slot() -> Result<workdir::Workdir> {
    let root = workdir::cache_root();
    let wd = workdir::acquire(&root).with_context(|| format!("taking a work slot under {}", root.display()))?;
    std::env::set_var("EVCXR_TMPDIR", &wd.crate_dir);
    if let Some(lib) = workdir::rust_std_lib_dir() {
        let var = if cfg!(target_os = "macos") { "DYLD_LIBRARY_PATH" } else { "LD_LIBRARY_PATH" };
        let mut paths = vec![lib];
        paths.extend(std::env::var_os(var).map(|v| std::env::split_paths(&v).collect::<Vec<_>>()).unwrap_or_default());
        std::env::set_var(var, std::env::join_paths(paths)?);
    }
    Ok(wd)
}

fn warm() -> Result<()> {
    let wd = use_slot()?;
    let source = workdir::moelab_source();
    println!("warming slot {} ({}): compiling moelab from {} ...", wd.slot, wd.crate_dir.display(), source.display());
    let t0 = Instant::now();
    let (mut ctx, _outputs) = evcxr::CommandContext::new().map_err(|e| anyhow::anyhow!("starting evcxr: {e}"))?;
    let t_ctx = t0.elapsed().as_secs_f64();
    ctx.execute(&workdir::prelude(&source)).map_err(|e| anyhow::anyhow!("loading the moelab prelude: {e}"))?;
    let t_prelude = t0.elapsed().as_secs_f64() - t_ctx;
    let t1 = Instant::now();
    ctx.execute("let warm_check = Experiment::from_toml(\"name = \\\"w\\\"\\nvariant = \\\"topk\\\"\").is_ok();")
        .map_err(|e| anyhow::anyhow!("running a cell that uses moelab: {e}"))?;
    println!(
        "warm: evcxr context {t_ctx:.1} s, moelab prelude {t_prelude:.1} s, a cell using moelab {:.1} s",
        t1.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Ends the kernel when the process that started it (the Jupyter client or its kernel
/// manager) is gone and the kernel was handed to another parent: nobody can shut it down
/// then, and it would hold its evcxr work slot. A kernel started without a parent (already
/// re-parented at start) is left alone.
fn watch_parent() {
    #[cfg(unix)]
    {
        let first = std::os::unix::process::parent_id();
        if first == 1 {
            return;
        }
        let _ = std::thread::Builder::new().name("parent-watch".into()).spawn(move || loop {
            std::thread::sleep(std::time::Duration::from_secs(2));
            if std::os::unix::process::parent_id() != first {
                eprintln!("moelab-kernel: the process that started it (pid {first}) is gone; exiting");
                std::process::exit(0);
            }
        });
    }
}

fn run(connection_file: PathBuf) -> Result<()> {
    let info = connection::ConnectionInfo::load(&connection_file)?;
    let wd = use_slot()?;
    eprintln!("moelab-kernel: evcxr work slot {} ({})", wd.slot, wd.crate_dir.display());
    let signer = wire::Signer::new(&info.key);
    let (out_tx, out_rx) = tokio::sync::mpsc::unbounded_channel();
    let outbox = outbox::Outbox::new(out_tx);
    let interrupter = Arc::new(engine::Interrupter::default());
    let (engine_tx, engine_rx) = std::sync::mpsc::channel();
    let runs_root = moelab::run::default_runs_root();
    // MOELAB_KERNEL_PRELUDE=off gives plain Rust cells without moelab (no moelab compile).
    let prelude = if std::env::var("MOELAB_KERNEL_PRELUDE").is_ok_and(|v| v == "off") { String::new() } else { workdir::prelude(&workdir::moelab_source()) };
    let eng = engine::Engine::new(outbox.clone(), prelude, interrupter.clone(), runs_root);
    std::thread::Builder::new().name("engine".into()).spawn(move || eng.serve(engine_rx))?;
    watch_parent();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(server::serve(info, signer, outbox, out_rx, engine_tx, interrupter))?;
    drop(wd);
    // The engine thread may be inside a long cell: end the process (the evcxr child exits
    // when its stdin closes).
    std::process::exit(0)
}

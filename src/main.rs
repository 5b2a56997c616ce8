//! The `moelab` command line: run, validate and inspect MoE experiments.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use moelab::plan::memory::predict;
use moelab::plan::Plan;
use moelab::run::{self, RunHooks};
use moelab::spec::{self, ExperimentSpec};
use moelab::taxonomy::MemCategory;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// Set once stdout's reader has gone (`moelab run ... | head`): later output is dropped while
/// the work goes on (a run still completes and writes its directory).
static STDOUT_GONE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Writes to stdout and flushes (a piped run shows its steps as they happen); a closed pipe
/// sets [`STDOUT_GONE`] instead of panicking as `print!` would.
fn write_out(args: std::fmt::Arguments) {
    use std::io::Write;
    if STDOUT_GONE.load(Ordering::Relaxed) {
        return;
    }
    let mut o = std::io::stdout().lock();
    if let Err(e) = o.write_fmt(args).and_then(|_| o.flush()) {
        STDOUT_GONE.store(true, Ordering::Relaxed);
        // A closed pipe is the reader having seen enough; anything else is worth saying.
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            eprintln!("moelab: stdout: {e}; the rest of the output is dropped");
        }
    }
}

/// `print!` through [`write_out`].
macro_rules! out {
    ($($t:tt)*) => { write_out(format_args!($($t)*)) };
}

/// `println!` through [`write_out`].
macro_rules! outln {
    () => { write_out(format_args!("\n")) };
    ($($t:tt)*) => { write_out(format_args!("{}\n", format_args!($($t)*))) };
}

/// moelab: compose, run and measure distributed Mixture-of-Experts training.
///
/// An experiment file (TOML) names a model, an MoE variant, a parallel layout and a backend.
/// `moelab run` plans it per rank, executes it, and prints where the time and memory went.
#[derive(Parser)]
#[command(name = "moelab", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Override a field of every experiment file read, before it is checked, e.g.
    /// `--set run.backend=cuda --set model.dtype=bf16 --set layout.ep=2` (repeatable); an
    /// empty value removes the field (`--set run.profile=`).
    #[arg(long = "set", value_name = "KEY=VALUE", global = true)]
    sets: Vec<String>,
}

/// The parsed `--set` overrides, applied by [`load`].
static OVERRIDES: std::sync::OnceLock<Vec<spec::overrides::Override>> = std::sync::OnceLock::new();

#[derive(Subcommand)]
enum Command {
    /// Run an experiment: print the stage table, overlap and memory breakdown, and write
    /// runs/<timestamp>-<name>/ (resolved spec, run.log, trace.json for Perfetto, tables as
    /// Parquet and CSV, summary.json).
    Run {
        /// Experiment file (TOML), e.g. experiments/quickstart.toml.
        file: PathBuf,
        /// Directory that receives the run directory.
        #[arg(long, env = "MOELAB_RUNS_DIR", default_value = "runs")]
        runs_dir: PathBuf,
        /// Print only the final tables (no progress bar or step lines).
        #[arg(long, short)]
        quiet: bool,
        /// Override the spec's `run.backend` (cpu, cuda, sim, auto); wins over `--set run.backend=...`.
        #[arg(long, value_parser = ["cpu", "cuda", "sim", "auto"])]
        backend: Option<String>,
    },
    /// Run several experiments and print one comparison table (step time, exposed
    /// communication, overlap, peak memory with its activations and comm buffers); also
    /// written, with every memory category, as Parquet and CSV to runs/<timestamp>-compare/.
    Compare {
        /// Experiment files, e.g. experiments/*.toml.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Directory that receives the run directories.
        #[arg(long, env = "MOELAB_RUNS_DIR", default_value = "runs")]
        runs_dir: PathBuf,
    },
    /// Predict completed runs on the sim backend and compare: for each run directory, run its
    /// spec.toml on the sim (same warmup and steps) and print measured vs predicted step time
    /// (target 15%) and time per step of every stage (target 25%; stages under 2% of the step
    /// marked small). `--set` overrides apply to the sim runs' specs. Reads the run directories
    /// only; exits non-zero when one cannot be read or simulated.
    Predict {
        /// Run directories written by `moelab run` (normally cuda runs), e.g. runs/20261123-*;
        /// a folder of run directories (such as runs/) stands for the run directories in it.
        #[arg(required = true)]
        dirs: Vec<PathBuf>,
        /// Sim profile: a built-in name (h200, h100, ...) or a profile TOML; default: the
        /// built-in profile of the GPU each run recorded.
        #[arg(long)]
        profile: Option<String>,
        /// Keep the sim runs here (default: a temporary directory, removed).
        #[arg(long)]
        runs_dir: Option<PathBuf>,
        /// Also write every comparison as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Print the rows of docs/benchmarks.md's predicted-vs-measured table instead of the
        /// per-stage blocks.
        #[arg(long)]
        markdown: bool,
    },
    /// Check experiment files without running them; exits non-zero if any is invalid.
    Validate {
        /// Experiment files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Show the plan of an experiment: ops, collectives and FLOPs per rank, and the predicted
    /// peak memory with its categories.
    Plan {
        /// Experiment file.
        file: PathBuf,
    },
    /// Run experiments on the cpu reference and on the cuda backend and compare every step's
    /// loss and every final parameter and gradient (f32: relative error below 1e-4).
    Crosscheck {
        /// Experiment files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Directory that receives the cuda run directories.
        #[arg(long, env = "MOELAB_RUNS_DIR", default_value = "runs")]
        runs_dir: PathBuf,
        /// Also write the results as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Also compare every transient buffer (activations, saved tensors, comm buffers,
        /// activation gradients) of the one-step grad pass, listed in op order with the first
        /// and the worst diverging ones. f32 plans then also fail when an op's output is apart
        /// by more than 1e-4 (an op-level check); for bf16 plans it is diagnostics. Every
        /// buffer stays in memory to the end of the step: for small experiments.
        #[arg(long)]
        buffers: bool,
    },
    /// Benchmark one MoE layer's forward + backward in bf16 on one GPU: expert GEMM TFLOP/s
    /// and its ratio to a dense 8192^3 bf16 GEMM measured in the same run, plus the time per
    /// stage (configs: mixtral-ish, fine-grained, small-tokens; dropless and capacity 1.25).
    Bench {
        /// Configurations to run (default: all).
        #[arg(long = "config")]
        configs: Vec<String>,
        /// Timed repetitions per configuration.
        #[arg(long, default_value_t = 10)]
        reps: usize,
        /// GPU ordinal.
        #[arg(long, default_value_t = 0)]
        device: usize,
        /// How expert GEMMs are issued: one cuBLAS call per expert (on one stream or two),
        /// one grouped call per stage, cuBLASLt per expert with tuned algorithms (optionally
        /// with GELU fused), or all of them (`both`); a comma list measures several in the
        /// same run (e.g. `per-expert,two-streams`).
        #[arg(long, value_enum, value_delimiter = ',', default_value = "both")]
        gemm: Vec<GemmChoice>,
        /// Write the report as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Measure the GPUs present (cuBLAS GEMM sweep in bf16 and f32, kernel gap, copy
    /// bandwidth, NCCL collectives over all visible GPUs) and write a sim profile from them.
    Calibrate {
        /// Profile that supplies what is not measured (datasheet peaks, inter-node link,
        /// topology): a built-in name or a TOML path; default: by device name
        /// (h100-datasheet, h200-datasheet).
        #[arg(long)]
        base: Option<String>,
        /// Name of the written profile (default: `<base>-measured`).
        #[arg(long)]
        name: Option<String>,
        /// Where to write the profile (default: profiles/<name>.toml).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Timed repetitions per measurement (median kept).
        #[arg(long, default_value_t = 5)]
        reps: usize,
        /// Also write the raw measurements and fits as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Refit from the measurements of an earlier run's `--json` file instead of measuring
        /// (no GPU needed).
        #[arg(long)]
        from: Option<PathBuf>,
    },
    /// Internal: one cuda worker process (started by `moelab run` with backend cuda, one per
    /// GPU; under torchrun/srun `moelab run` itself runs one rank instead).
    #[command(hide = true)]
    CudaWorker {
        /// The run directory (holds spec.toml; receives rank-<r>.json).
        dir: PathBuf,
    },
    /// Open the terminal workbench (the moelab-workbench binary next to this one): compose,
    /// run and inspect experiments. Arguments go to it, e.g. `moelab workbench experiments/quickstart.toml`.
    Workbench {
        /// Arguments for moelab-workbench (an experiment file, --runs-dir DIR, --help).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

/// Under torchrun/srun a rank may leave its GPU thread inside a collective whose peer died;
/// if process exit then stalls in the CUDA/NCCL libraries' teardown, abort after 10 s so no
/// rank outlives its job. Called just before exiting; a normal exit ends the thread first.
fn arm_exit_watchdog() {
    if moelab::backend::cuda::external::detect_from_env().ok().flatten().is_none() {
        return;
    }
    std::thread::spawn(|| {
        std::thread::sleep(Duration::from_secs(10));
        eprintln!("moelab: exit stalled in the GPU libraries' teardown for 10 s; aborting");
        std::process::abort();
    });
}

/// Start `moelab-workbench` from this executable's directory. The workbench crate depends on
/// this one, so it is a separate binary rather than a library call.
fn cmd_workbench(args: &[String], sets: &[String]) -> Result<bool> {
    let exe = std::env::current_exe().context("locating the moelab executable")?;
    let name = format!("moelab-workbench{}", std::env::consts::EXE_SUFFIX);
    let bin = exe.parent().map(|d| d.join(&name)).filter(|p| p.is_file()).with_context(|| {
        format!("{name} is not next to {}: build it with `cargo build --release -p moelab-workbench` (same profile as moelab)", exe.display())
    })?;
    // The global `--set`s were parsed here; the workbench applies them to the file it opens.
    let mut cmd = std::process::Command::new(&bin);
    for s in sets {
        cmd.arg("--set").arg(s);
    }
    let status = cmd.args(args).status().with_context(|| format!("starting {}", bin.display()))?;
    Ok(status.success())
}

fn load(file: &Path) -> Result<ExperimentSpec> {
    Ok(load_with_backend(file, None)?)
}

fn mib(b: u64) -> String {
    format!("{:.2} MiB", b as f64 / (1024.0 * 1024.0))
}

fn cmd_validate(files: &[PathBuf]) -> Result<bool> {
    let mut ok = true;
    let line = |f: &Path, s: &ExperimentSpec, backend: &str, note: &str| {
        outln!(
            "ok: {} (variant {}, world {}, {} MoE layers, {} tokens per rank, backend {backend}){note}",
            f.display(), s.variant.as_str(), s.world(), s.model.n_layers, s.tokens_per_rank()
        )
    };
    for f in files {
        match load_with_backend(f, None) {
            Ok(s) => line(f, &s, s.run.backend.as_str(), ""),
            // A cuda spec on a machine without its GPUs: every other rule is checked (as on
            // the cpu backend), and the missing GPUs are a note, not a failure.
            Err(spec::SpecError::Invalid { problems, .. }) if problems.iter().all(|p| p.is_missing_gpus()) => {
                match load_with_backend(f, Some("cpu")) {
                    Ok(s) => line(f, &s, "cuda", &format!("; note: {}, so `moelab run` refuses it on this machine", problems[0].message)),
                    Err(e) => {
                        ok = false;
                        eprintln!("{e:#}");
                    }
                }
            }
            Err(e) => {
                ok = false;
                eprintln!("{e:#}");
            }
        }
    }
    Ok(ok)
}

fn cmd_plan(file: &Path) -> Result<()> {
    let s = load(file)?;
    let plan = Plan::build(&s)?;
    outln!("{}: variant {}, world {}, {} ops in all", s.name, s.variant.as_str(), plan.world(), plan.op_count());
    if let Some(note) = moelab::plan::builders::auto_stand_in(&s) {
        outln!("note: {note}");
    }
    for rp in &plan.ranks {
        let p = predict(rp);
        let flops: u64 = rp.ops.iter().map(|o| o.flops).sum();
        let comm = rp.ops.iter().filter(|o| o.stage.is_comm()).count();
        outln!(
            "rank {}: {} ops ({} collectives), {:.3} GFLOP per step, predicted peak {}{}{}",
            rp.rank, rp.ops.len(), comm, flops as f64 / 1e9, mib(p.peak_total), if p.upper_bound { " (upper bound: dropless)" } else { "" },
            if mib(p.interleaved_peak) != mib(p.peak_total) { format!(", up to {} as its streams interleave", mib(p.interleaved_peak)) } else { String::new() }
        );
        let cats: Vec<String> = MemCategory::ALL.iter().map(|c| format!("{} {}", c, mib(p.at_peak[c.index()]))).collect();
        outln!("  at peak: {}", cats.join(", "));
    }
    Ok(())
}

/// The spec in `file` with the `--set` overrides and, when given, `--backend` (the same as
/// `--set run.backend=...`, applied last).
fn load_with_backend(file: &Path, backend: Option<&str>) -> Result<ExperimentSpec, spec::SpecError> {
    let mut overrides = OVERRIDES.get().cloned().unwrap_or_default();
    if let Some(b) = backend {
        overrides.push(spec::overrides::Override { key: vec!["run".into(), "backend".into()], value: Some(toml::Value::String(b.into())) });
    }
    spec::load_file_with(file, &overrides)
}

fn cmd_run(file: &Path, runs_dir: &Path, quiet: bool, backend: Option<&str>) -> Result<()> {
    let s = load_with_backend(file, backend)?;
    // Under torchrun/srun every rank runs `moelab run`; rank 0 writes the run directory and
    // the others join it.
    if s.run.backend == spec::BackendKind::Cuda {
        if let Some(ext) = moelab::backend::cuda::external::detect_from_env()?.filter(|e| e.rank != 0) {
            // What rank 0 refuses before the rendezvous, this rank refuses too.
            run::refuse_external_tutel_auto(&s)?;
            moelab::backend::cuda::launch::run_peer(&s, &ext, &mut |l| outln!("{l}"))?;
            outln!("rank {}: finished; the run directory is on rank 0", ext.rank);
            return Ok(());
        }
    }
    let mut hooks = RunHooks::default();
    // Fault injection for testing failure handling: MOELAB_INJECT_FAILURE=RANK:OP_NAME makes
    // that rank fail at that op (e.g. 1:L0.expert_gemm1).
    if let Ok(v) = std::env::var("MOELAB_INJECT_FAILURE") {
        let (rank, op) = v.split_once(':').context("MOELAB_INJECT_FAILURE must be RANK:OP_NAME")?;
        hooks.exec.fail_at = Some((rank.parse().context("MOELAB_INJECT_FAILURE rank")?, op.to_string()));
    }
    let cancel = hooks.exec.cancel.clone();
    ctrlc::set_handler(move || cancel.store(true, Ordering::SeqCst)).context("installing the Ctrl-C handler")?;
    let total = (s.run.warmup + s.run.steps) as u64;
    let bar = if quiet { ProgressBar::hidden() } else { ProgressBar::new(total) };
    bar.set_style(ProgressStyle::with_template("{spinner} step {pos}/{len} [{elapsed_precise}] {msg}").expect("valid template"));
    let b2 = bar.clone();
    hooks.on_step = Some(Arc::new(move |r| {
        // Each step's line as it ends (a batch log, or a cancelled run, keeps the steps it
        // saw), above the progress bar when there is one.
        if !quiet {
            if b2.is_hidden() {
                outln!("{}", run::step_line(r));
            } else {
                b2.suspend(|| outln!("{}", run::step_line(r)));
            }
        }
        b2.set_message(format!("loss {:.5} aux {:.3} dropped {}/{}", r.loss, r.aux_loss, r.dropped, r.routed));
        b2.inc(1);
    }));
    if !quiet {
        let l = &s.layout;
        let mut degrees = format!("dp {} x ep {}", l.dp, l.ep);
        if l.tp > 1 || l.pp > 1 {
            degrees = format!("pp {} x dp {} x ep {} x tp {}", l.pp, l.dp, l.ep, l.tp);
        }
        let pipeline = match (&s.ppmoe, l.pp > 1) {
            (Some(o), true) => format!(", {} micro-batches {}", o.micro(), o.schedule.as_str()),
            (Some(o), false) if o.micro() > 1 => format!(", {} micro-batches", o.micro()),
            _ => String::new(),
        };
        outln!(
            "running {} ({}): variant {}, world {} ({degrees}{pipeline}), backend {}, {} warmup + {} measured steps",
            s.name, file.display(), s.variant.as_str(), s.world(), s.run.backend.as_str(), s.run.warmup, s.run.steps
        );
    }
    let outcome = run::run(&s, runs_dir, &hooks);
    bar.finish_and_clear();
    let outcome = outcome?;
    if !quiet {
        outln!();
    }
    if (outcome.analysis.world as usize) < s.world() {
        // The header counts the trace's ranks; say what they stand for.
        outln!(
            "The trace holds {} of the {} ranks: a symmetric plan, simulated once for rank 0, whose figures stand for every rank.",
            outcome.analysis.world, s.world()
        );
    }
    outln!("{}", outcome.analysis.render_text());
    if let Some(a) = &outcome.mpmoe_auto {
        outln!("{}\n", a.render_text());
    }
    if let Some(a) = &outcome.auto_degree {
        outln!("tutel auto: {}\n", a.reason);
    }
    for w in &outcome.warnings {
        eprintln!("warning: {w}");
    }
    let worst = outcome.predicted.iter().zip(&outcome.tracked).map(|(p, t)| (p.peak_total, t.0, p.upper_bound, p.interleaved_peak)).max_by_key(|x| x.1);
    if let Some((pred, tracked, bound, interleaved)) = worst {
        // The plan replays its ops in issue order; concurrent streams can hold more at once,
        // up to the interleaved bound (docs/ARCHITECTURE.md, invariants).
        let diff = match tracked.cmp(&pred) {
            _ if tracked == 0 => " (not tracked: no rank reported its memory)".to_string(),
            std::cmp::Ordering::Equal => String::new(),
            _ => format!(" ({:+.2}%)", (tracked as f64 / pred.max(1) as f64 - 1.0) * 100.0),
        };
        let range = if mib(interleaved) != mib(pred) { format!(", up to {} as its streams interleave", mib(interleaved)) } else { String::new() };
        outln!(
            "peak memory: plan predicts {}{}{range}, {} backend tracked {}{diff}",
            mib(pred), if bound { " (upper bound: routing-dependent buffers)" } else { "" }, outcome.trace.backend, mib(tracked)
        );
    }
    outln!("run directory: {}", outcome.dir.display());
    if !outcome.unsaved.is_empty() {
        anyhow::bail!(
            "could not write {} in {} (the figures printed above are what is left of them; free space and run again)",
            outcome.unsaved.join("; "), outcome.dir.display()
        );
    }
    Ok(())
}

fn cmd_compare(files: &[PathBuf], runs_dir: &Path) -> Result<()> {
    // Validate everything before running anything.
    let specs: Vec<ExperimentSpec> = files.iter().map(|f| load(f)).collect::<Result<_>>()?;
    let hooks = RunHooks::default();
    let cancel = hooks.exec.cancel.clone();
    ctrlc::set_handler(move || cancel.store(true, Ordering::SeqCst)).context("installing the Ctrl-C handler")?;
    let mut rows = Vec::new();
    let mut failed = Vec::new();
    let mut cancelled = None;
    for (s, f) in specs.iter().zip(files) {
        eprintln!("running {} ({})", s.name, f.display());
        match run::run(s, runs_dir, &hooks) {
            Ok(o) => rows.push(run::compare::CompareRow::from_outcome(&s.name, s.variant.as_str(), s.world(), &o)),
            // Ctrl-C stops the comparison (exit 130) after the rows already measured.
            Err(e) if e.is_cancelled() => {
                cancelled = Some(e);
                break;
            }
            // The others still run and are compared.
            Err(e) => {
                eprintln!("failed: {} ({}): {e}", s.name, f.display());
                failed.push(format!("{} ({})", s.name, f.display()));
            }
        }
    }
    if !rows.is_empty() {
        out!("{}", run::compare::render(&rows));
        let stamp = chrono::Local::now().format("%Y%m%d-%H%M%S");
        let dir = runs_dir.join(format!("{stamp}-compare"));
        let written = run::compare::write(&rows, &dir)?;
        outln!("comparison tables: {}", written.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "));
    }
    if let Some(e) = cancelled {
        return Err(e.into());
    }
    if !failed.is_empty() {
        anyhow::bail!("{} of {} experiments failed (each error is above): {}", failed.len(), specs.len(), failed.join(", "));
    }
    Ok(())
}

fn cmd_calibrate(base: Option<&str>, name: Option<&str>, out: Option<&Path>, reps: usize, json: Option<&Path>, from: Option<&Path>) -> Result<bool> {
    use moelab::backend::sim::{calibration, profile};
    // Check the base before any GPU work.
    if let Some(b) = base {
        profile::resolve(b).with_context(|| format!("--base {b}"))?;
    }
    let cal: calibration::Calibration = match from {
        Some(p) => {
            let text = std::fs::read_to_string(p).with_context(|| format!("reading --from {}", p.display()))?;
            let doc: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("--from {}: not JSON", p.display()))?;
            serde_json::from_value(doc.get("calibration").cloned().unwrap_or(doc))
                .with_context(|| format!("--from {}: not a `moelab calibrate --json` file", p.display()))?
        }
        None => {
            if moelab::backend::cuda::visible_gpus() == 0 {
                outln!("skipped: no CUDA device visible (moelab calibrate measures GPUs; --from refits saved measurements)");
                return Ok(true);
            }
            moelab::backend::cuda::calibrate::measure(reps.max(1), &mut |l| outln!("{l}"))?
        }
    };
    let base = match base {
        Some(b) => b.to_string(),
        None => match profile::builtin_for_device(&cal.device) {
            Some(p) => format!("{p}-datasheet"),
            None => anyhow::bail!("no built-in profile for {}: pass --base <profile.toml> with its datasheet numbers", cal.device),
        },
    };
    let base_text = match profile::builtin_text(&base) {
        Some(t) => t.to_string(),
        None => std::fs::read_to_string(&base).with_context(|| format!("reading --base {base}"))?,
    };
    let name = name.map(str::to_string).unwrap_or_else(|| format!("{}-measured", base.trim_end_matches(".toml").trim_end_matches("-datasheet")));
    let out = out.map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from(format!("profiles/{name}.toml")));
    let rendered = calibration::render(&base_text, &base, &name, &cal);
    // The raw measurements first, whatever the fit makes of them: a profile that does not fit
    // or cannot be written loses nothing measured (`--from` refits the file).
    if let Some(p) = json {
        let fits = rendered.as_ref().map(|(_, f)| f.clone()).unwrap_or_default();
        let doc = serde_json::json!({ "calibration": cal, "fits": fits, "profile": out });
        write_output(p, serde_json::to_string_pretty(&doc)?)?;
    }
    let (text, fits) = rendered.with_context(|| match json {
        Some(p) => format!("the raw measurements are in {} (refit them with --from)", p.display()),
        None => "pass --json to keep the raw measurements".to_string(),
    })?;
    for f in &fits {
        outln!("fit {}: latency {:.1} us, bandwidth share {:.3} (worst rel err {:.1}%)", f.kind.as_str(), f.latency_us, f.efficiency, 100.0 * f.worst_rel_err);
    }
    write_output(&out, &text)?;
    outln!("wrote {} ({} GEMM points, {} collective fits)", out.display(), cal.gemms.len(), fits.len());
    Ok(true)
}

/// `moelab bench --gemm`: which expert-GEMM paths to measure.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum GemmChoice {
    /// One cuBLAS call per expert.
    PerExpert,
    /// One cuBLAS call per expert, experts alternating between two streams.
    TwoStreams,
    /// One grouped cuBLAS call per stage.
    Grouped,
    /// Per expert through cuBLASLt with per-shape algorithm tuning.
    LtTuned,
    /// As lt-tuned, with GELU and its gradient fused into GEMM epilogues.
    FusedGelu,
    /// Every mode, in the same run.
    Both,
}

impl GemmChoice {
    /// The modes of every choice, each once, in the benchmark's order.
    fn all_modes(choices: &[GemmChoice]) -> Vec<moelab::backend::cuda::bench::ExpertGemm> {
        use moelab::backend::cuda::bench::ExpertGemm;
        ExpertGemm::ALL.into_iter().filter(|m| choices.iter().any(|c| c.modes().contains(m))).collect()
    }

    fn modes(self) -> &'static [moelab::backend::cuda::bench::ExpertGemm] {
        use moelab::backend::cuda::bench::ExpertGemm;
        match self {
            GemmChoice::PerExpert => &[ExpertGemm::PerExpert],
            GemmChoice::TwoStreams => &[ExpertGemm::TwoStreams],
            GemmChoice::Grouped => &[ExpertGemm::Grouped],
            GemmChoice::LtTuned => &[ExpertGemm::LtTuned],
            GemmChoice::FusedGelu => &[ExpertGemm::FusedGelu],
            GemmChoice::Both => &ExpertGemm::ALL,
        }
    }
}

fn cmd_bench(configs: &[String], modes: &[moelab::backend::cuda::bench::ExpertGemm], reps: usize, device: usize, json: Option<&Path>) -> Result<bool> {
    use moelab::backend::cuda::bench;
    for c in configs {
        if !bench::CONFIGS.iter().any(|b| b.name == c) {
            let names: Vec<_> = bench::CONFIGS.iter().map(|b| b.name).collect();
            anyhow::bail!("--config {c}: unknown configuration (use one of {})", names.join(", "));
        }
    }
    if moelab::backend::cuda::visible_gpus() == 0 {
        outln!("skipped: no CUDA device visible (moelab bench measures GPUs only)");
        return Ok(true);
    }
    outln!("{:<13} {:>9} {:>10} {:>7} {:>8} {:>10} {:>9} {:>9} {:>7}", "config", "capacity", "gemm", "rows", "dropped", "layer ms", "TFLOP/s", "dense", "ratio");
    let report = bench::run(device, configs, modes, reps.max(1), &mut |r| {
        outln!(
            "{:<13} {:>9} {:>10} {:>7} {:>8} {:>10.3} {:>9.1} {:>9.1} {:>6.1}%",
            r.config.name, r.capacity, r.gemm.name(), r.rows, r.dropped, r.layer_ms, r.tflops, r.dense_tflops, 100.0 * r.ratio
        );
        let stages: Vec<String> = r.stages_ms.iter().map(|(n, v)| format!("{n} {v:.3}")).collect();
        outln!("    stages (ms): {}", stages.join(", "));
    })?;
    outln!("dense bf16 8192^3 GEMM at the start: {:.1} TFLOP/s on {} ({}); each row is held against the higher of it and a dense GEMM measured right before the row", report.dense_tflops, report.device, report.date);
    for f in &report.failures {
        outln!("    not measured: {f}");
    }
    let failed: Vec<_> = report.kernel_checks.iter().filter(|c| !c.passed).collect();
    let worst = report.kernel_checks.iter().map(|c| c.rel_err).fold(0.0, f64::max);
    outln!("bf16 kernels vs cpu: {} checked, {} failed, worst rel err {worst:.2e}", report.kernel_checks.len(), failed.len());
    for c in &failed {
        outln!("    FAIL {} rel err {:.2e}", c.name, c.rel_err);
    }
    if let Some(p) = json {
        write_output(p, serde_json::to_string_pretty(&report)?)?;
    }
    Ok(failed.is_empty())
}

fn cmd_predict(dirs: &[PathBuf], profile: Option<&str>, runs_dir: Option<&Path>, json: Option<&Path>, markdown: bool) -> Result<()> {
    use moelab::run::predict::{self, render, MeasuredRun, PredictOptions};
    if let Some(p) = profile {
        moelab::backend::sim::profile::resolve(p).with_context(|| format!("--profile {p}"))?;
    }
    // Read every run directory before simulating any; one that cannot be read (a cancelled
    // or failed run in a folder of runs) is skipped with the reason, unless none can be.
    let mut runs: Vec<MeasuredRun> = Vec::new();
    let mut skipped = Vec::new();
    for d in predict::expand_run_dirs(dirs) {
        match MeasuredRun::load(&d) {
            Ok(r) => runs.push(r),
            Err(e) => skipped.push(e),
        }
    }
    if runs.is_empty() {
        if let Some(e) = skipped.into_iter().next() {
            return Err(e.into());
        }
        anyhow::bail!("no run directories given");
    }
    for e in &skipped {
        eprintln!("skipped: {e}");
    }
    let skipped = skipped.len();
    let opts = PredictOptions {
        profile: profile.map(str::to_string),
        runs_dir: runs_dir.map(Path::to_path_buf),
        overrides: OVERRIDES.get().cloned().unwrap_or_default(),
    };
    let mut all = Vec::new();
    if markdown {
        out!("{}", render::markdown_header());
    }
    let mut failed = Vec::new();
    for r in &runs {
        let p = match predict::predict(r, &opts) {
            Ok(p) => p,
            Err(e) if runs.len() > 1 => {
                eprintln!("skipped: {e}");
                failed.push(e);
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        if markdown {
            out!("{}", render::markdown_row(&p));
        } else {
            outln!("{}", render::render_text(&p));
        }
        all.push(p);
    }
    if let Some(path) = json {
        write_output(path, serde_json::to_string_pretty(&all)?)?;
    }
    let missed = skipped + failed.len();
    if all.is_empty() {
        if let Some(e) = failed.into_iter().next() {
            return Err(e.into());
        }
    }
    // The rest was predicted, but a script must see that some runs were not.
    if missed > 0 {
        anyhow::bail!("{missed} run(s) skipped (the reasons are above); {} predicted", all.len());
    }
    Ok(())
}

fn cmd_crosscheck(files: &[PathBuf], runs_dir: &Path, json: Option<&Path>, buffers: bool) -> Result<bool> {
    let opts = moelab::run::crosscheck::CrossCheckOptions { buffers };
    let mut all = Vec::new();
    let mut ok = true;
    for f in files {
        let spec = load(f)?;
        // The cuda side's checks (a GPU per rank, the launch environment) before any work.
        load_with_backend(f, Some("cuda")).context("the cuda side of the cross-check")?;
        let c = moelab::run::crosscheck::crosscheck(&spec, runs_dir, &opts)?;
        let failed: Vec<_> = c.items.iter().filter(|i| !i.passed).collect();
        outln!(
            "{} {} ({}, world {}): {} compared, worst rel err {:.2e}{}{}",
            if c.passed { "PASS" } else { "FAIL" }, f.display(), c.variant, c.world, c.items.len(), c.worst,
            c.route_flips.map(|(d, t)| format!(", cuda routing replayed on the cpu ({d} of {t} choices differed)")).unwrap_or_default(),
            c.error.as_ref().map(|e| format!(", error: {e}")).unwrap_or_default()
        );
        for i in failed.iter().take(10) {
            outln!("    {} rel err {:.2e}", i.name, i.rel_err);
        }
        if let Some(why) = &c.training_skipped {
            outln!("    training steps not compared: {why}");
        }
        if let Some(b) = &c.buffers {
            out!("{}", moelab::run::crosscheck::buffers::render(b));
        } else if buffers {
            outln!("  per-buffer comparison: none (the cuda grad pass did not complete)");
        }
        ok &= c.passed;
        all.push(c);
    }
    if let Some(p) = json {
        write_output(p, serde_json::to_string_pretty(&all)?)?;
    }
    Ok(ok)
}

fn main() {
    // An empty MOELAB_RUNS_DIR means unset (as for notebooks), not an empty --runs-dir.
    if std::env::var_os("MOELAB_RUNS_DIR").is_some_and(|v| v.is_empty()) {
        std::env::remove_var("MOELAB_RUNS_DIR");
    }
    let cli = Cli::parse();
    match cli.sets.iter().map(|s| spec::overrides::Override::parse(s)).collect::<Result<Vec<_>, _>>() {
        Ok(o) => {
            let _ = OVERRIDES.set(o);
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    }
    let result = match &cli.command {
        Command::Run { file, runs_dir, quiet, backend } => cmd_run(file, runs_dir, *quiet, backend.as_deref()).map(|_| true),
        Command::Compare { files, runs_dir } => cmd_compare(files, runs_dir).map(|_| true),
        Command::Predict { dirs, profile, runs_dir, json, markdown } => {
            cmd_predict(dirs, profile.as_deref(), runs_dir.as_deref(), json.as_deref(), *markdown).map(|_| true)
        }
        Command::Validate { files } => cmd_validate(files),
        Command::Plan { file } => cmd_plan(file).map(|_| true),
        Command::Crosscheck { files, runs_dir, json, buffers } => cmd_crosscheck(files, runs_dir, json.as_deref(), *buffers),
        Command::Bench { configs, reps, device, gemm, json } => cmd_bench(configs, &GemmChoice::all_modes(gemm), *reps, *device, json.as_deref()),
        Command::Calibrate { base, name, out, reps, json, from } => {
            cmd_calibrate(base.as_deref(), name.as_deref(), out.as_deref(), *reps, json.as_deref(), from.as_deref())
        }
        Command::CudaWorker { dir } => std::process::exit(moelab::backend::cuda::launch::worker_main(dir)),
        Command::Workbench { args } => cmd_workbench(args, &cli.sets),
    };
    if matches!(cli.command, Command::Run { .. }) {
        arm_exit_watchdog();
    }
    match result {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("error: {}", chain_text(&e));
            // A cancelled run exits like a process stopped by Ctrl-C, so scripts can tell it
            // from a failure.
            let cancelled = e.downcast_ref::<run::RunError>().is_some_and(run::RunError::is_cancelled);
            std::process::exit(if cancelled { 130 } else { 1 });
        }
    }
}

/// An error and its causes, each cause left out when the message before it already says it
/// (the library's errors name their source in their own message).
fn chain_text(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    let mut prev = out.clone();
    for cause in e.chain().skip(1) {
        let text = cause.to_string();
        if !prev.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        prev = text;
    }
    out
}

/// Writes a file the user named (`--out`, `--json`), creating its missing parent folders.
fn write_output(path: &Path, contents: impl AsRef<[u8]>) -> anyhow::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(path, contents).with_context(|| format!("writing {}", path.display()))
}

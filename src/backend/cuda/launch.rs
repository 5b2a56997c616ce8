//! Multi-process launch: one worker process per GPU (`moelab cuda-worker`), NCCL bootstrapped
//! from a unique id the launcher creates and hands over in the environment, progress and
//! errors as JSON lines on each worker's stdout, traces written by each worker into the run
//! directory and merged here. A worker that dies, fails or stalls ends the job within
//! seconds: the launcher kills the others and reports that rank's error; a worker whose
//! launcher disappears (stdin closes) exits on its own.

use super::comm::{new_unique_id_hex, parse_unique_id, Comms};
use super::gpu::Gpu;
use super::rank::GpuRank;
use crate::backend::{BackendError, ExecOptions, StepReport};
use crate::plan::Plan;
use crate::taxonomy::Stage;
use crate::trace::{MemEvent, OpEvent, StepSpan, Trace};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// One line a worker prints on stdout.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum WorkerLine {
    /// The worker opened its GPU and joined the communicators.
    Ready {
        /// Global rank.
        rank: u32,
        /// GPU name.
        device: String,
    },
    /// A step finished on this rank.
    Step {
        /// Global rank.
        rank: u32,
        /// Step index (warmup included).
        step: usize,
        /// Whether it was traced.
        measured: bool,
        /// This rank's loss contribution.
        loss: f64,
        /// Aux loss (rank 0's is reported).
        aux: f64,
        /// Dropped assignments.
        dropped: usize,
        /// Routed assignments.
        routed: usize,
        /// Capacity of each MoE layer's routing, in execution order.
        #[serde(default)]
        capacity: Vec<usize>,
        /// Wall seconds on this rank.
        wall_s: f64,
        /// Ops that ran on the host.
        host_ops: usize,
    },
    /// The worker failed.
    Error {
        /// Global rank.
        rank: u32,
        /// The error as [`BackendError`] prints it.
        message: String,
        /// The error itself, when it is one of the backend's.
        error: Option<WireError>,
    },
    /// The worker finished all steps and wrote its trace.
    Done {
        /// Global rank.
        rank: u32,
    },
}

/// [`BackendError`] on the wire.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum WireError {
    /// An op failed.
    OpFailed {
        /// Rank.
        rank: u32,
        /// Op.
        op: String,
        /// Message.
        message: String,
    },
    /// A panic.
    Crashed {
        /// Rank.
        rank: u32,
        /// Message.
        message: String,
    },
    /// Stopped because another stream failed.
    Aborted {
        /// Rank.
        rank: u32,
    },
    /// Cancelled.
    Cancelled,
}

impl From<&BackendError> for WireError {
    fn from(e: &BackendError) -> Self {
        match e {
            BackendError::OpFailed { rank, op, message } => WireError::OpFailed { rank: *rank, op: op.clone(), message: message.clone() },
            BackendError::Crashed { rank, message } => WireError::Crashed { rank: *rank, message: message.clone() },
            BackendError::Timeout { rank, op, missing, secs } => {
                WireError::OpFailed { rank: *rank, op: op.clone(), message: format!("timed out after {secs} s; missing {missing:?}") }
            }
            BackendError::Aborted { rank, .. } => WireError::Aborted { rank: *rank },
            BackendError::Cancelled => WireError::Cancelled,
        }
    }
}

impl WireError {
    fn into_backend(self) -> BackendError {
        match self {
            WireError::OpFailed { rank, op, message } => BackendError::OpFailed { rank, op, message },
            WireError::Crashed { rank, message } => BackendError::Crashed { rank, message },
            WireError::Aborted { rank } => BackendError::Aborted { rank, by: rank },
            WireError::Cancelled => BackendError::Cancelled,
        }
    }
}

/// What a worker leaves in the run directory (`rank-<r>.json`), also after a failure.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RankRecord {
    /// Global rank.
    pub rank: u32,
    /// GPU name.
    pub device: String,
    /// Traced ops.
    pub ops: Vec<OpEvent>,
    /// Memory events.
    pub memory: Vec<MemEvent>,
    /// Measured step spans.
    pub steps: Vec<StepSpan>,
    /// Highest bytes held, and the bytes per category at that moment.
    pub tracked_peak: (u64, [u64; 7]),
    /// The device pool's high-water mark: every byte the rank's allocations really took,
    /// scratch included.
    #[serde(default)]
    pub pool_peak_bytes: u64,
}

/// The merged result of a job.
#[derive(Debug, Default)]
pub struct JobResult {
    /// One report per step (all ranks summed), warmup included.
    pub steps: Vec<StepReport>,
    /// Every rank's trace.
    pub trace: Trace,
    /// Tracked peak per rank.
    pub tracked: Vec<(u64, [u64; 7])>,
    /// Why the job stopped early.
    pub failure: Option<BackendError>,
    /// Log lines for the run log (device names, pids, host-op counts).
    pub notes: Vec<String>,
}

/// The `moelab` binary that runs workers: `MOELAB_BIN`, or this executable when it is the
/// CLI, or a `moelab` next to it or one directory up (test binaries live in `target/*/deps`).
pub fn worker_binary() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("MOELAB_BIN") {
        return Some(PathBuf::from(p));
    }
    let exe = std::env::current_exe().ok()?;
    if exe.file_stem().is_some_and(|s| s == "moelab") {
        return Some(exe);
    }
    let dir = exe.parent()?;
    [dir.join("moelab"), dir.parent()?.join("moelab")].into_iter().find(|p| p.is_file())
}

/// Runs the plan's ranks as worker processes, one per GPU, and merges what they report.
/// `on_step` sees every merged step as it completes.
pub fn run_job(plan: &Plan, dir: &Path, opts: &ExecOptions, on_step: &mut dyn FnMut(&StepReport)) -> JobResult {
    let world = plan.world();
    let mut res = JobResult::default();
    let Some(bin) = worker_binary() else {
        res.failure = Some(BackendError::Crashed { rank: 0, message: "cannot find the moelab binary to start cuda workers (set MOELAB_BIN)".into() });
        return res;
    };
    let id = if world > 1 {
        match new_unique_id_hex() {
            Ok(id) => Some(id),
            Err(e) => {
                res.failure = Some(BackendError::Crashed { rank: 0, message: format!("NCCL bootstrap: {e}") });
                return res;
            }
        }
    } else {
        None
    };
    let epoch_ns = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    let mut children: Vec<Child> = Vec::new();
    let (tx, rx) = mpsc::channel::<(u32, Option<WorkerLine>, String)>();
    for r in 0..world {
        let mut cmd = Command::new(&bin);
        cmd.arg("cuda-worker")
            .arg(dir)
            .env("RANK", r.to_string())
            .env("WORLD_SIZE", world.to_string())
            .env("LOCAL_RANK", r.to_string())
            .env("MOELAB_EPOCH_UNIX_NS", epoch_ns.to_string())
            .env("MOELAB_TIMEOUT_S", opts.collective_timeout.as_secs().to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(id) = &id {
            cmd.env("MOELAB_NCCL_ID", id);
        }
        if let Some((rank, op)) = &opts.fail_at {
            cmd.env("MOELAB_INJECT_FAILURE", format!("{rank}:{op}"));
        }
        if opts.skip_optimizer {
            cmd.env("MOELAB_SKIP_OPTIMIZER", "1");
        }
        match cmd.spawn() {
            Ok(mut child) => {
                res.notes.push(format!("rank {r}: worker pid {}", child.id()));
                let out = child.stdout.take().expect("piped");
                let err = child.stderr.take().expect("piped");
                let txo = tx.clone();
                std::thread::spawn(move || {
                    for line in BufReader::new(out).lines().map_while(Result::ok) {
                        let parsed = serde_json::from_str::<WorkerLine>(&line).ok();
                        if txo.send((r as u32, parsed, line)).is_err() {
                            break;
                        }
                    }
                });
                let txe = tx.clone();
                std::thread::spawn(move || {
                    let mut s = String::new();
                    let _ = BufReader::new(err).read_to_string(&mut s);
                    for line in s.lines() {
                        let _ = txe.send((r as u32, None, format!("stderr: {line}")));
                    }
                });
                children.push(child);
            }
            Err(e) => {
                res.failure = Some(BackendError::Crashed { rank: r as u32, message: format!("cannot start worker {}: {e}", bin.display()) });
                break;
            }
        }
    }
    drop(tx);
    let total = plan.spec.run.warmup + plan.spec.run.steps;
    let mut per_step: Vec<Vec<Option<WorkerLine>>> = vec![vec![None; world]; total];
    let mut done = vec![false; world];
    let mut exited = vec![false; world];
    let mut errors: Vec<BackendError> = Vec::new();
    let mut last_progress = Instant::now();
    // The first step includes NCCL setup and kernel compilation.
    let mut stall_limit = opts.collective_timeout.max(Duration::from_secs(120));
    let mut merged = 0usize;
    while res.failure.is_none() && !done.iter().all(|d| *d) {
        if opts.cancel.load(Ordering::Relaxed) {
            res.failure = Some(BackendError::Cancelled);
            break;
        }
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok((r, Some(line), _)) => {
                last_progress = Instant::now();
                match line {
                    WorkerLine::Ready { rank, device } => res.notes.push(format!("rank {rank}: {device}")),
                    WorkerLine::Step { step, .. } if step < total => {
                        per_step[step][r as usize] = Some(line.clone());
                        stall_limit = opts.collective_timeout;
                    }
                    WorkerLine::Step { .. } => {}
                    WorkerLine::Error { error, message, rank } => {
                        let e = error.map(WireError::into_backend).unwrap_or(BackendError::Crashed { rank, message });
                        errors.push(e);
                    }
                    WorkerLine::Done { rank } => done[rank as usize] = true,
                }
            }
            Ok((r, None, raw)) => res.notes.push(format!("rank {r}: {raw}")),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {}
        }
        while merged < total && per_step[merged].iter().all(Option::is_some) {
            let rep = merge_step(merged, &per_step[merged]);
            on_step(&rep);
            res.steps.push(rep);
            merged += 1;
        }
        if let Some(e) = pick_error(&errors) {
            res.failure = Some(e);
            break;
        }
        for (r, c) in children.iter_mut().enumerate() {
            if exited[r] {
                continue;
            }
            if let Ok(Some(status)) = c.try_wait() {
                exited[r] = true;
                if !status.success() && !done[r] {
                    // Give its error line a moment to arrive before calling it a crash.
                    let deadline = Instant::now() + Duration::from_millis(500);
                    while Instant::now() < deadline {
                        if let Ok((_, Some(WorkerLine::Error { error, message, rank }), _)) = rx.recv_timeout(Duration::from_millis(50)) {
                            errors.push(error.map(WireError::into_backend).unwrap_or(BackendError::Crashed { rank, message }));
                        }
                    }
                    res.failure = pick_error(&errors)
                        .or_else(|| Some(BackendError::Crashed { rank: r as u32, message: format!("worker process exited: {}", describe(status)) }));
                } else if status.success() {
                    done[r] = true;
                }
            }
        }
        if res.failure.is_none() && last_progress.elapsed() > stall_limit {
            res.failure = Some(BackendError::Timeout { rank: 0, op: "(step)".into(), missing: waiting_ranks(&per_step, merged), secs: stall_limit.as_secs() });
        }
    }
    for c in children.iter_mut() {
        if res.failure.is_some() {
            let _ = c.kill();
        }
        let _ = c.wait();
    }
    while let Ok((r, _, raw)) = rx.try_recv() {
        if raw.starts_with("stderr: ") {
            res.notes.push(format!("rank {r}: {raw}"));
        }
    }
    res.trace = Trace { backend: "cuda".into(), world: world as u32, ..Default::default() };
    for r in 0..world {
        let path = dir.join(format!("rank-{r}.json"));
        match std::fs::read_to_string(&path).ok().and_then(|s| serde_json::from_str::<RankRecord>(&s).ok()) {
            Some(rec) => {
                let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
                let plan_peak = crate::plan::memory::predict(&plan.ranks[r]).peak_total;
                res.notes.push(format!(
                    "rank {r}: memory peak: plan {:.3} MiB, tracked {:.3} MiB, device pool {:.3} MiB (pool/plan {:.3})",
                    mib(plan_peak), mib(rec.tracked_peak.0), mib(rec.pool_peak_bytes), rec.pool_peak_bytes as f64 / plan_peak.max(1) as f64
                ));
                res.trace.ops.extend(rec.ops);
                res.trace.memory.extend(rec.memory);
                res.trace.steps.extend(rec.steps);
                res.tracked.push(rec.tracked_peak);
            }
            None => res.tracked.push((0, [0; 7])),
        }
    }
    res
}

fn describe(status: std::process::ExitStatus) -> String {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(sig) = status.signal() {
            return format!("killed by signal {sig}");
        }
    }
    format!("{status}")
}

fn waiting_ranks(per_step: &[Vec<Option<WorkerLine>>], merged: usize) -> Vec<u32> {
    per_step.get(merged).map(|s| s.iter().enumerate().filter(|(_, l)| l.is_none()).map(|(r, _)| r as u32).collect()).unwrap_or_default()
}

/// The root cause among the workers' errors: a real failure beats "aborted because of another".
fn pick_error(errors: &[BackendError]) -> Option<BackendError> {
    errors.iter().find(|e| !matches!(e, BackendError::Aborted { .. })).or(errors.first()).cloned()
}

fn merge_step(step: usize, lines: &[Option<WorkerLine>]) -> StepReport {
    let mut rep = StepReport { step, measured: false, loss: 0.0, aux_loss: 0.0, dropped: 0, routed: 0, capacity: Vec::new(), wall_s: 0.0 };
    for l in lines {
        if let Some(WorkerLine::Step { measured, loss, aux, dropped, routed, capacity, wall_s, .. }) = l {
            rep.measured = *measured;
            rep.loss += loss;
            rep.wall_s = rep.wall_s.max(*wall_s);
            // Each layer's routing figures come from the one rank that reports it.
            rep.aux_loss += *aux;
            rep.dropped += *dropped;
            rep.routed += *routed;
            rep.capacity.extend(capacity.iter().copied());
        }
    }
    rep
}

fn emit(line: &WorkerLine) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}", serde_json::to_string(line).expect("worker lines serialize"));
    let _ = out.flush();
}

fn env_usize(names: &[&str]) -> Option<usize> {
    names.iter().find_map(|n| std::env::var(n).ok()?.parse().ok())
}

/// The worker process: `moelab cuda-worker <run dir>` with RANK, WORLD_SIZE and LOCAL_RANK
/// (as torchrun and srun set them) and MOELAB_NCCL_ID. Returns the exit code.
pub fn worker_main(dir: &Path) -> i32 {
    let rank = env_usize(&["RANK", "SLURM_PROCID"]).unwrap_or(0);
    let world = env_usize(&["WORLD_SIZE", "SLURM_NTASKS"]).unwrap_or(1);
    let device = env_usize(&["LOCAL_RANK", "SLURM_LOCALID"]).unwrap_or(rank);
    // The launcher holds our stdin; when it goes away, so do we (no orphaned GPU jobs).
    std::thread::spawn(|| {
        let mut sink = Vec::new();
        let _ = std::io::stdin().read_to_end(&mut sink);
        std::process::exit(3);
    });
    let fail = |message: String, error: Option<WireError>| {
        emit(&WorkerLine::Error { rank: rank as u32, message, error });
        1
    };
    let spec = match crate::spec::load_file(&dir.join("spec.toml")) {
        Ok(s) => s,
        Err(e) => return fail(format!("rank {rank}: spec: {e}"), None),
    };
    let plan = match Plan::build(&spec) {
        Ok(p) => p,
        Err(e) => return fail(format!("rank {rank}: plan: {e}"), None),
    };
    if plan.world() != world || rank >= world {
        return fail(format!("rank {rank}: the plan has {} ranks but WORLD_SIZE={world}", plan.world()), None);
    }
    let gpu = match Gpu::open(device) {
        Ok(g) => g,
        Err(e) => return fail(format!("rank {rank}: GPU {device}: {e}"), None),
    };
    let device_name = gpu.info.name.clone();
    let id = std::env::var("MOELAB_NCCL_ID").ok().and_then(|h| parse_unique_id(&h));
    if let Err(e) = gpu.ctx.bind_to_thread() {
        return fail(format!("rank {rank}: {e:?}"), None);
    }
    let comms = match Comms::new(rank as u32, world, id, &plan.groups) {
        Ok(c) => c,
        Err(e) => return fail(format!("rank {rank}: communicators: {e}"), None),
    };
    let epoch_ns: u64 = std::env::var("MOELAB_EPOCH_UNIX_NS").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
    let now_ns = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    let offset_ns = now_ns.saturating_sub(epoch_ns) as i64;
    let mut opts = ExecOptions::default();
    if let Some(s) = std::env::var("MOELAB_TIMEOUT_S").ok().and_then(|v| v.parse().ok()) {
        opts.collective_timeout = Duration::from_secs(s);
    }
    opts.skip_optimizer = std::env::var_os("MOELAB_SKIP_OPTIMIZER").is_some();
    if let Ok(v) = std::env::var("MOELAB_INJECT_FAILURE") {
        if let Some((r, op)) = v.split_once(':') {
            if let Ok(r) = r.parse() {
                opts.fail_at = Some((r, op.to_string()));
            }
        }
    }
    // Cross-checks of bf16 plans replay this run's routing on the cpu: keep every layer's
    // choices (`*route.idx`) past their last use so they can be written out below.
    let route_names: Vec<String> = if std::env::var_os("MOELAB_DUMP_PARAMS").is_some() {
        plan.ranks[rank].buffers.iter().filter(|b| b.name.ends_with("route.idx")).map(|b| b.name.clone()).collect()
    } else {
        Vec::new()
    };
    let mut gr = match GpuRank::new(plan, rank, gpu, comms, &route_names, offset_ns) {
        Ok(g) => g,
        Err(e) => return fail(format!("rank {rank}: setup: {e}"), None),
    };
    emit(&WorkerLine::Ready { rank: rank as u32, device: device_name.clone() });
    let spec = &gr.plan().spec;
    let (warmup, steps) = (spec.run.warmup, spec.run.steps);
    let mut code = 0;
    for i in 0..warmup + steps {
        let measured = i >= warmup;
        match gr.step(measured, &opts) {
            Ok(s) => {
                // This rank's loss share and the routing figures of the layers it reports.
                let mine = crate::backend::reported_layers(gr.plan(), rank);
                let loss: f64 = s.obs.iter().filter(|o| o.0 == Stage::Loss).map(|o| o.3.loss).sum();
                let routing: Vec<_> = s.obs.iter().filter(|o| o.0 != Stage::Loss && mine.contains(&o.1)).map(|o| (o.1, o.2, o.3)).collect();
                let (aux, dropped, routed, capacity) = crate::backend::routing_figures(&routing);
                emit(&WorkerLine::Step { rank: rank as u32, step: i, measured, loss, aux, dropped, routed, capacity, wall_s: s.wall_s, host_ops: s.host_ops });
            }
            Err(e) => {
                code = fail(e.to_string(), Some(WireError::from(&e)));
                break;
            }
        }
    }
    let rec = RankRecord {
        rank: rank as u32, device: device_name, ops: gr.ops.clone(), memory: gr.memory_events(), steps: gr.steps.clone(),
        tracked_peak: gr.tracked_peak(),
        pool_peak_bytes: gr.pool_peak_bytes(),
    };
    if let Err(e) = std::fs::write(dir.join(format!("rank-{rank}.json")), serde_json::to_string(&rec).expect("record serializes")) {
        return fail(format!("rank {rank}: writing its trace: {e}"), None);
    }
    if code == 0 && std::env::var_os("MOELAB_DUMP_PARAMS").is_some() {
        let rp = &gr.plan().ranks[rank];
        let names: Vec<String> = rp.params.iter().flat_map(|p| std::iter::once(p.value).chain(p.grad)).map(|b| rp.buffer(b).name.clone()).collect();
        let dump: std::collections::BTreeMap<String, Vec<f32>> = names.into_iter().filter_map(|n| Some((n.clone(), gr.read(&n)?))).collect();
        if let Err(e) = std::fs::write(dir.join(format!("params-rank{rank}.json")), serde_json::to_string(&dump).expect("floats serialize")) {
            return fail(format!("rank {rank}: writing its parameters: {e}"), None);
        }
        let routes: std::collections::BTreeMap<String, Vec<i32>> =
            route_names.iter().filter_map(|n| Some((n.clone(), gr.read(n)?.into_iter().map(|x| x as i32).collect()))).collect();
        if let Err(e) = std::fs::write(dir.join(format!("routes-rank{rank}.json")), serde_json::to_string(&routes).expect("ints serialize")) {
            return fail(format!("rank {rank}: writing its routing: {e}"), None);
        }
    }
    if code == 0 {
        emit(&WorkerLine::Done { rank: rank as u32 });
    }
    code
}

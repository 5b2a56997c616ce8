//! Multi-process launch: one worker process per GPU (`moelab cuda-worker`), NCCL bootstrapped
//! from a unique id the launcher creates and hands over in the environment, progress and
//! errors as JSON lines on each worker's stdout, traces written by each worker into the run
//! directory and merged here. A worker that dies, fails or stalls ends the job within
//! seconds: the launcher kills the others and reports that rank's error; a worker whose
//! launcher disappears (stdin closes) exits on its own.
//!
//! Under torchrun or srun ([`super::external`]) there is no launcher process: rank 0
//! ([`run_external`]) holds a TCP rendezvous ([`super::rendezvous`]) and gathers the other
//! ranks' ([`run_peer`]) lines and records over their sockets, through the same [`gather`]
//! loop that reads local workers' stdout.

use super::comm::{new_unique_id_hex, parse_unique_id, Comms};
use super::external::ExternalRank;
use super::gpu::Gpu;
use super::rank::GpuRank;
use super::rendezvous::{self, FromRoot, Hello, Hub, RendezvousError, RootEvent, ToRoot, Welcome};
use crate::backend::{BackendError, ExecOptions, StepReport};
use crate::plan::Plan;
use crate::spec::ExperimentSpec;
use crate::taxonomy::Stage;
use crate::trace::{MemEvent, OpEvent, StepSpan, Trace};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::Arc;
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
        /// This rank's loss contribution (JSON writes a NaN or infinite loss as null, read
        /// back as NaN, so a diverged step still arrives).
        #[serde(deserialize_with = "f64_or_nan")]
        loss: f64,
        /// Aux loss (rank 0's is reported); null read as NaN.
        #[serde(deserialize_with = "f64_or_nan")]
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

/// An f64 that JSON may carry as null (serde_json writes NaN and infinities so): NaN.
fn f64_or_nan<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
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
            // Workers do not raise it (the launcher checks the losses), but keep its words.
            e @ BackendError::Diverged { .. } => WireError::Crashed { rank: 0, message: e.to_string() },
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
    /// The executor kept host copies of the routing tables it read (`MOELAB_HOST_COPIES`):
    /// `moelab predict` simulates the run's executor. Absent (false) in records written
    /// before 2026-11-24, whose executors copied and synchronised at every read.
    #[serde(default)]
    pub host_copies: bool,
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

/// What the gatherer hears about one rank, from a worker's stdout, a peer's socket or rank
/// 0's own thread.
#[derive(Debug)]
pub enum RankEvent {
    /// A progress line.
    Line(WorkerLine),
    /// Anything else the rank said (stderr, an unreadable line), kept for the log.
    Note(String),
    /// The rank's trace and memory record.
    Record(Box<RankRecord>),
    /// The rank is gone (process exited, connection closed or silent): what happened.
    Gone(String),
}

/// What [`gather`] collected.
#[derive(Debug, Default)]
pub struct Gathered {
    /// Merged step reports, in order.
    pub steps: Vec<StepReport>,
    /// Why the job stopped early.
    pub failure: Option<BackendError>,
    /// Log lines.
    pub notes: Vec<String>,
    /// Each rank's record, where it arrived.
    pub records: Vec<Option<RankRecord>>,
}

/// How far ahead of the steps reported a cancel's stop step is placed, in time: the lag of
/// the launcher's view behind the fastest rank that it covers.
pub const STOP_MARGIN: Duration = Duration::from_millis(250);

/// How long a cancelled job's ranks get to finish their step and write their records before
/// they are killed.
pub const CANCEL_GRACE: Duration = Duration::from_secs(60);

/// How long [`gather`] waits after a rank's error for a lost rank that caused it.
pub const ERROR_GRACE: Duration = Duration::from_millis(300);

/// A rank exit seen by [`gather`]'s poll: `(rank, exited successfully, how)`.
pub type Exit = (u32, bool, String);

/// How long after a clean exit a worker's remaining output (its last step line, its record)
/// may take to come through its pipe before the rank counts as done anyway.
const EXITED_READ_GRACE: Duration = Duration::from_secs(5);

/// The one gathering loop of local and external launches: reads `(rank, event)`s from `rx`
/// until every rank is done, merging steps (passed to `on_step`) and records; ends early
/// with the root cause when a rank fails, goes away (an event or `poll_exits`), the job is
/// cancelled, or no step completes within the stall limit.
pub fn gather(
    world: usize, total: usize, rx: &Receiver<(u32, RankEvent)>, opts: &ExecOptions, poll_exits: &mut dyn FnMut() -> Vec<Exit>,
    on_step: &mut dyn FnMut(&StepReport),
) -> Gathered {
    gather_with_stop(world, total, rx, opts, poll_exits, on_step, None)
}

/// [`gather`], where a cancel asks the ranks, through `stop`, to stop before step K (a step
/// no rank can have started: two past the highest reported, plus the steps that fit in
/// [`STOP_MARGIN`]), so every rank ends at the same
/// step boundary with its collectives matched and writes its record; the gathering goes on
/// (merging the steps finished meanwhile) until every rank has exited or [`CANCEL_GRACE`]
/// passed, and ends as cancelled. Without `stop` a cancel ends it at once.
pub fn gather_with_stop(
    world: usize, total: usize, rx: &Receiver<(u32, RankEvent)>, opts: &ExecOptions, poll_exits: &mut dyn FnMut() -> Vec<Exit>,
    on_step: &mut dyn FnMut(&StepReport), mut stop: Option<&mut dyn FnMut(usize)>,
) -> Gathered {
    // After a cancel with `stop`: when the ranks were asked to stop, and the highest step
    // line seen.
    let mut stopping: Option<Instant> = None;
    let mut highest: Option<usize> = None;
    let mut last_wall_s: f64 = 1.0;
    let mut g = Gathered { records: (0..world).map(|_| None).collect(), ..Default::default() };
    let mut per_step: Vec<Vec<Option<WorkerLine>>> = vec![vec![None; world]; total];
    let mut done = vec![false; world];
    // When a worker was seen to exit cleanly: it is done once its `Done` line arrives, or
    // its output has been read to the end (the readers drop their senders) or a moment
    // passed, so the last step's line still in the pipe is not lost.
    let mut exited_ok: Vec<Option<Instant>> = vec![None; world];
    // (the rank that reported it, the error); the first error's arrival time.
    let mut errors: Vec<(u32, BackendError)> = Vec::new();
    let mut first_error: Option<Instant> = None;
    let mut last_progress = Instant::now();
    // The first step includes NCCL setup and kernel compilation.
    let mut stall_limit = opts.collective_timeout.max(Duration::from_secs(120));
    let mut merged = 0usize;
    let valid = |r: u32| (r as usize) < world;
    while g.failure.is_none() && !done.iter().all(|d| *d) {
        if opts.cancel.load(Ordering::Relaxed) {
            match (stop.as_mut(), stopping) {
                (Some(f), None) => {
                    // Two past the highest step reported, plus the steps the fastest rank may
                    // finish while the request travels (lines still in the pipes): those of
                    // STOP_MARGIN at the last step's wall time.
                    let ahead = (STOP_MARGIN.as_secs_f64() / last_wall_s.max(1e-4)).ceil().min(1e4) as usize;
                    f(highest.map_or(1, |h| h + 2 + ahead));
                    stopping = Some(Instant::now());
                }
                (Some(_), Some(t)) if t.elapsed() < CANCEL_GRACE && !done.iter().all(|d| *d) => {}
                _ => {
                    g.failure = Some(BackendError::Cancelled);
                    break;
                }
            }
        }
        let mut gone: Vec<(u32, String)> = Vec::new();
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok((r, _)) if !valid(r) => {}
            Ok((r, RankEvent::Line(line))) => {
                last_progress = Instant::now();
                match line {
                    WorkerLine::Ready { rank, device } => g.notes.push(format!("rank {rank}: {device}")),
                    WorkerLine::Step { step, wall_s, .. } if step < total => {
                        highest = highest.max(Some(step));
                        last_wall_s = wall_s;
                        per_step[step][r as usize] = Some(line.clone());
                        stall_limit = opts.collective_timeout;
                    }
                    WorkerLine::Step { .. } => {}
                    // A rank stopping on request says so, writes its record and exits: its
                    // exit (polled) makes it done, so it is not killed before the record.
                    WorkerLine::Error { error: Some(WireError::Cancelled), .. } if stopping.is_some() => {}
                    WorkerLine::Error { error, message, rank } => {
                        errors.push((r, error.map(WireError::into_backend).unwrap_or(BackendError::Crashed { rank, message })));
                        first_error.get_or_insert_with(Instant::now);
                    }
                    WorkerLine::Done { .. } => done[r as usize] = true,
                }
            }
            Ok((r, RankEvent::Note(n))) => g.notes.push(format!("rank {r}: {n}")),
            Ok((r, RankEvent::Record(rec))) => g.records[r as usize] = Some(*rec),
            Ok((r, RankEvent::Gone(how))) => gone.push((r, how)),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            // Every sender is gone (workers exited, their output read): polling and the stall
            // limit decide.
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                for (d, e) in done.iter_mut().zip(&exited_ok) {
                    *d |= e.is_some();
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        for (d, e) in done.iter_mut().zip(&exited_ok) {
            *d |= e.is_some_and(|t| t.elapsed() > EXITED_READ_GRACE);
        }
        while merged < total && per_step[merged].iter().all(Option::is_some) {
            let rep = merge_step(merged, &per_step[merged]);
            on_step(&rep);
            g.steps.push(rep);
            merged += 1;
        }
        for (r, ok, how) in poll_exits() {
            // Asked to stop, a rank exits with status 1 after its record: as good as clean.
            if valid(r) && (ok || stopping.is_some()) {
                exited_ok[r as usize].get_or_insert_with(Instant::now);
            } else if valid(r) {
                gone.push((r, how));
            }
        }
        if let Some((r, how)) = gone.into_iter().find(|(r, _)| !done[*r as usize]) {
            // Give its own error line a moment to arrive before calling it a crash; another
            // rank's error in the meantime (a collective failing because of it) is an effect.
            let deadline = Instant::now() + Duration::from_millis(500);
            let mut own = pick_error(&errors.iter().filter(|e| e.0 == r).map(|e| e.1.clone()).collect::<Vec<_>>());
            while own.is_none() && Instant::now() < deadline {
                match rx.recv_timeout(Duration::from_millis(50)) {
                    Ok((q, RankEvent::Line(WorkerLine::Error { error, message, rank }))) if q == r => {
                        own = Some(error.map(WireError::into_backend).unwrap_or(BackendError::Crashed { rank, message }));
                    }
                    Ok((q, RankEvent::Record(rec))) if valid(q) => g.records[q as usize] = Some(*rec),
                    Ok((q, RankEvent::Note(n))) => g.notes.push(format!("rank {q}: {n}")),
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                    _ => {}
                }
            }
            g.failure = Some(own.unwrap_or(BackendError::Crashed { rank: r, message: how }));
            break;
        }
        // An error ends the job after a short grace, in which a rank that went away (the
        // likelier root cause: a peer's collective fails because it died) takes precedence.
        if first_error.is_some_and(|t| t.elapsed() >= ERROR_GRACE) {
            g.failure = pick_error(&errors.iter().map(|e| e.1.clone()).collect::<Vec<_>>());
            break;
        }
        if g.failure.is_none() && last_progress.elapsed() > stall_limit {
            g.failure = Some(BackendError::Timeout { rank: 0, op: "(step)".into(), missing: waiting_ranks(&per_step, merged), secs: stall_limit.as_secs() });
        }
    }
    // A cancelled job ends as cancelled unless a rank failed meanwhile: that error is kept.
    if stopping.is_some() {
        let failed = g.failure.take().filter(|f| !matches!(f, BackendError::Cancelled));
        g.failure = failed.or_else(|| pick_error(&errors.iter().map(|e| e.1.clone()).collect::<Vec<_>>())).or(Some(BackendError::Cancelled));
    }
    // Every rank finished yet a step is missing: say so rather than report fewer steps.
    if g.failure.is_none() && merged < total {
        let rank = waiting_ranks(&per_step, merged).first().copied().unwrap_or(0);
        g.failure = Some(BackendError::Crashed { rank, message: format!("the worker ended without reporting step {merged} of {total}") });
    }
    g
}

/// Collects records and notes arriving on `rx` until `until` (after a failure, from ranks
/// still able to send them).
fn drain(rx: &Receiver<(u32, RankEvent)>, g: &mut Gathered, until: Instant) {
    while let Some(left) = until.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left.min(Duration::from_millis(50))) {
            Ok((r, RankEvent::Record(rec))) if (r as usize) < g.records.len() => g.records[r as usize] = Some(*rec),
            Ok((r, RankEvent::Note(n))) => g.notes.push(format!("rank {r}: {n}")),
            Ok(_) => {}
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
        if g.records.iter().all(Option::is_some) {
            return;
        }
    }
}

/// The job result from what was gathered: the merged trace and each rank's memory peaks.
fn finish(plan: &Plan, g: Gathered) -> JobResult {
    let world = plan.world();
    let mut res = JobResult { steps: g.steps, failure: g.failure, notes: g.notes, ..Default::default() };
    res.trace = Trace { backend: "cuda".into(), world: world as u32, group_sizes: plan.group_sizes(), ..Default::default() };
    for (r, rec) in g.records.into_iter().enumerate() {
        match rec {
            Some(rec) => {
                let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
                let predicted = crate::plan::memory::predict(&plan.ranks[r]);
                let plan_peak = predicted.peak_total;
                // Where the two streams may overlap, the most their interleaving can hold.
                let interleaved = if predicted.interleaved_peak > plan_peak { format!(" (up to {:.3} MiB interleaved)", mib(predicted.interleaved_peak)) } else { String::new() };
                res.notes.push(format!(
                    "rank {r}: memory peak: plan {:.3} MiB{interleaved}, tracked {:.3} MiB, device pool {:.3} MiB (pool/plan {:.3})",
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

/// Wall-clock now, Unix nanoseconds (the shared time base of a job's rank processes).
pub(crate) fn now_unix_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

/// Runs the plan's ranks as worker processes, one per GPU, and merges what they report.
/// The workers read their spec from `dir/spec.toml`, which this writes from the plan's own
/// spec, so they run exactly this plan. `on_step` sees every merged step as it completes.
pub fn run_job(plan: &Plan, dir: &Path, opts: &ExecOptions, on_step: &mut dyn FnMut(&StepReport)) -> JobResult {
    let world = plan.world();
    let fail = |e: BackendError| JobResult { failure: Some(e), ..Default::default() };
    if let Err(e) = std::fs::write(dir.join("spec.toml"), plan.spec.to_toml()) {
        return fail(BackendError::Crashed { rank: 0, message: format!("writing {}: {e}", dir.join("spec.toml").display()) });
    }
    let Some(bin) = worker_binary() else {
        return fail(BackendError::Crashed { rank: 0, message: "cannot find the moelab binary to start cuda workers (set MOELAB_BIN)".into() });
    };
    let id = if world > 1 {
        match new_unique_id_hex() {
            Ok(id) => Some(id),
            Err(e) => return fail(BackendError::Crashed { rank: 0, message: format!("NCCL bootstrap: {e}") }),
        }
    } else {
        None
    };
    let epoch_ns = now_unix_ns();
    let mut children: Vec<Child> = Vec::new();
    let mut notes = Vec::new();
    let mut start_failure = None;
    let (tx, rx) = mpsc::channel::<(u32, RankEvent)>();
    for r in 0..world {
        let mut cmd = Command::new(&bin);
        cmd.arg("cuda-worker")
            .arg(dir)
            .env("MOELAB_LAUNCH", "local")
            .env("RANK", r.to_string())
            .env("WORLD_SIZE", world.to_string())
            .env("LOCAL_RANK", r.to_string())
            .env("MOELAB_EPOCH_UNIX_NS", epoch_ns.to_string())
            .env("MOELAB_TIMEOUT_S", opts.collective_timeout.as_secs().to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // Its own process group: a Ctrl-C in the terminal reaches the launcher only, which
        // stops the workers at a step boundary (they keep what they measured).
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        if let Some(id) = &id {
            cmd.env("MOELAB_NCCL_ID", id);
        }
        if let Some((rank, op)) = &opts.fail_at {
            cmd.env("MOELAB_INJECT_FAILURE", format!("{rank}:{op}"));
        }
        if opts.skip_optimizer {
            cmd.env("MOELAB_SKIP_OPTIMIZER", "1");
        }
        if opts.dump_params {
            cmd.env("MOELAB_DUMP_PARAMS", "1");
        }
        if opts.dump_buffers {
            cmd.env(crate::backend::dump::DUMP_BUFFERS_ENV, "1");
        }
        match cmd.spawn() {
            Ok(mut child) => {
                notes.push(format!("rank {r}: worker pid {}", child.id()));
                let out = child.stdout.take().expect("piped");
                let err = child.stderr.take().expect("piped");
                let txo = tx.clone();
                std::thread::spawn(move || {
                    for line in BufReader::new(out).lines().map_while(Result::ok) {
                        let ev = match serde_json::from_str::<WorkerLine>(&line) {
                            Ok(l) => RankEvent::Line(l),
                            Err(_) => RankEvent::Note(line),
                        };
                        if txo.send((r as u32, ev)).is_err() {
                            break;
                        }
                    }
                });
                let txe = tx.clone();
                std::thread::spawn(move || {
                    let mut s = String::new();
                    let _ = BufReader::new(err).read_to_string(&mut s);
                    for line in s.lines() {
                        let _ = txe.send((r as u32, RankEvent::Note(format!("stderr: {line}"))));
                    }
                });
                children.push(child);
            }
            Err(e) => {
                start_failure = Some(BackendError::Crashed { rank: r as u32, message: format!("cannot start worker {}: {e}", bin.display()) });
                break;
            }
        }
    }
    drop(tx);
    let total = plan.spec.run.warmup + plan.spec.run.steps;
    // The workers' stdin pipes: how a cancel reaches them (`stop K`).
    let mut stdins: Vec<_> = children.iter_mut().map(|c| c.stdin.take()).collect();
    let mut exited = vec![false; children.len()];
    let mut poll = || {
        let mut out = Vec::new();
        for (r, c) in children.iter_mut().enumerate() {
            if !exited[r] {
                if let Ok(Some(status)) = c.try_wait() {
                    exited[r] = true;
                    out.push((r as u32, status.success(), format!("worker process exited: {}", describe(status))));
                }
            }
        }
        out
    };
    let mut g = match start_failure {
        Some(e) => Gathered { failure: Some(e), records: (0..world).map(|_| None).collect(), ..Default::default() },
        None => {
            let mut stop = |k: usize| {
                for w in stdins.iter_mut().flatten() {
                    let _ = writeln!(w, "stop {k}");
                    let _ = w.flush();
                }
            };
            let g = gather_with_stop(world, total, &rx, opts, &mut poll, on_step, Some(&mut stop));
            // Keep the pipes open until here: a worker whose stdin closes exits at once.
            drop(stdins);
            g
        }
    };
    for c in children.iter_mut() {
        if g.failure.is_some() {
            let _ = c.kill();
        }
        let _ = c.wait();
    }
    while let Ok((r, ev)) = rx.try_recv() {
        if let RankEvent::Note(n) = ev {
            if n.starts_with("stderr: ") {
                g.notes.push(format!("rank {r}: {n}"));
            }
        }
    }
    for (r, rec) in g.records.iter_mut().enumerate() {
        if rec.is_none() {
            *rec = std::fs::read_to_string(dir.join(format!("rank-{r}.json"))).ok().and_then(|s| serde_json::from_str::<RankRecord>(&s).ok());
        }
    }
    notes.append(&mut g.notes);
    g.notes = notes;
    finish(plan, g)
}

/// Starts the thread that runs this process's GPU rank (with the main thread's stack size:
/// a local worker runs its rank on its main thread).
fn spawn_rank_thread(f: impl FnOnce() + Send + 'static) {
    std::thread::Builder::new().name("moelab-rank".into()).stack_size(8 << 20).spawn(f).expect("spawning the rank thread");
}

/// Rank 0 of an externally launched job (torchrun, srun): holds the rendezvous on
/// `ext.port`, hands the peers the NCCL id and the resolved spec, runs its own rank on a
/// thread, and gathers every rank's progress and record the way [`run_job`] gathers its
/// workers'. A peer that fails or goes away ends the job with its error; every peer is then
/// told to stop.
pub fn run_external(plan: &Plan, opts: &ExecOptions, ext: &ExternalRank, spec_hash: &str, on_step: &mut dyn FnMut(&StepReport)) -> JobResult {
    let world = plan.world();
    let fail = |e: BackendError| JobResult { failure: Some(e), ..Default::default() };
    let device = match ext.device(super::visible_gpus()) {
        Ok(d) => d,
        Err(e) => return fail(BackendError::Crashed { rank: 0, message: e.to_string() }),
    };
    let (tx, rx) = mpsc::channel::<(u32, RankEvent)>();
    let epoch_ns = now_unix_ns();
    let mut notes = vec![format!("external launch ({:?}): rank 0 of {world} on GPU {device}, rendezvous on port {}", ext.launcher, ext.port)];
    let mut id = None;
    let mut hub = None;
    if world > 1 {
        let listener = match rendezvous::listen(ext.port) {
            Ok(l) => l,
            Err(e) => return fail(BackendError::OpFailed { rank: 0, op: "rendezvous".into(), message: e.to_string() }),
        };
        id = match new_unique_id_hex() {
            Ok(i) => Some(i),
            Err(e) => return fail(BackendError::OpFailed { rank: 0, op: "ncclGetUniqueId".into(), message: e.to_string() }),
        };
        let peers = match rendezvous::serve_until(&listener, world, spec_hash, ext.timeout, Some(&opts.cancel)) {
            Ok(p) => p,
            Err(rendezvous::RendezvousError::Cancelled) => return fail(BackendError::Cancelled),
            Err(e) => return fail(BackendError::OpFailed { rank: 0, op: "rendezvous".into(), message: e.to_string() }),
        };
        for p in &peers {
            notes.push(format!("rank {}: joined from {}", p.rank, p.host));
        }
        let welcome = Welcome {
            nccl_id: id.clone(), epoch_unix_ns: epoch_ns, timeout_s: opts.collective_timeout.as_secs(), spec_toml: plan.spec.to_toml(),
            fail_at: opts.fail_at.clone(), skip_optimizer: opts.skip_optimizer,
        };
        hub = Some(Hub::start(peers, &welcome, tx.clone(), rendezvous::SILENCE_LIMIT));
    }
    // Rank 0's own GPU work runs beside the gathering; it is never joined after a failure
    // (it may sit in a collective whose peer died: the process exit ends it).
    let own_cancel = Arc::new(AtomicBool::new(false));
    let setup = RankSetup {
        rank: 0, world, device, nccl_id: id, epoch_ns,
        opts: ExecOptions { cancel: own_cancel.clone(), dump_buffers: false, ..opts.clone() },
    };
    let own_plan = plan.clone();
    let txr = tx.clone();
    spawn_rank_thread(move || {
        let mut emit = |l: WorkerLine| {
            let _ = txr.send((0, RankEvent::Line(l)));
        };
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_rank(own_plan, &setup, &mut emit, None)));
        match outcome {
            Ok((code, rec)) => {
                if let Some(rec) = rec {
                    let _ = txr.send((0, RankEvent::Record(Box::new(rec))));
                }
                if code == 0 {
                    emit(WorkerLine::Done { rank: 0 });
                }
            }
            Err(p) => {
                let message = p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default();
                emit(WorkerLine::Error { rank: 0, message: format!("rank 0 crashed: {message}"), error: Some(WireError::Crashed { rank: 0, message }) });
            }
        }
    });
    drop(tx);
    let total = plan.spec.run.warmup + plan.spec.run.steps;
    let mut g = gather(world, total, &rx, opts, &mut Vec::new, on_step);
    if let Some(e) = &g.failure {
        own_cancel.store(true, Ordering::SeqCst);
        if let Some(h) = &hub {
            h.send_all(&FromRoot::Stop { reason: e.to_string() });
        }
        drain(&rx, &mut g, Instant::now() + Duration::from_secs(1));
    }
    if let Some(h) = &hub {
        h.send_all(&FromRoot::End { ok: g.failure.is_none(), message: g.failure.as_ref().map(|e| e.to_string()) });
    }
    drop(hub);
    notes.append(&mut g.notes);
    g.notes = notes;
    finish(plan, g)
}

/// Why a non-zero rank of an external launch stopped.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// The rendezvous with rank 0 failed.
    #[error("rank {rank}: {source}")]
    Rendezvous {
        /// This rank.
        rank: usize,
        /// The cause.
        source: RendezvousError,
    },
    /// Rank 0's spec does not load or plan here.
    #[error("rank {rank}: rank 0's spec: {message}")]
    Spec {
        /// This rank.
        rank: usize,
        /// The error.
        message: String,
    },
    /// This rank failed (the error was also sent to rank 0).
    #[error("rank {rank} failed: {message}")]
    Failed {
        /// This rank.
        rank: usize,
        /// The error.
        message: String,
    },
    /// Rank 0 ended the job, or went away.
    #[error("rank {rank} stopped: {message}")]
    Stopped {
        /// This rank.
        rank: usize,
        /// Rank 0's reason, or how the connection was lost.
        message: String,
    },
}

/// A non-zero rank of an externally launched job: joins rank 0's rendezvous with `spec`'s
/// hash, runs rank 0's resolved spec as `ext.rank` on its GPU, streams progress and its
/// record to rank 0, and returns once rank 0 ends the job. Writes nothing to disk; `say`
/// gets a line when the rank joined. Returns early (the GPU thread left behind) when rank
/// 0 stops the job or goes away.
pub fn run_peer(spec: &ExperimentSpec, ext: &ExternalRank, say: &mut dyn FnMut(&str)) -> Result<(), PeerError> {
    let rank = ext.rank;
    let rv = |source| PeerError::Rendezvous { rank, source };
    // The GPU choice is made first, so a rank 0 that never answers does not hide it; it is
    // reported once connected.
    let device = ext.device(super::visible_gpus());
    let hello = Hello::new(rank as u32, ext.world as u32, rendezvous::spec_hash(spec));
    let (client, welcome, root) = rendezvous::connect(&ext.address(), &hello, ext.timeout).map_err(rv)?;
    // From here on every failure also goes to rank 0, which then ends the job with this
    // rank's reason instead of waiting for a rank that will not run.
    let setup_failed = |err: PeerError| {
        let message = err.to_string();
        let error = WireError::OpFailed { rank: rank as u32, op: "setup".into(), message: message.clone() };
        let _ = client.send(&ToRoot::Line { line: WorkerLine::Error { rank: rank as u32, message, error: Some(error) } });
        err
    };
    let device = device.map_err(|e| setup_failed(PeerError::Failed { rank, message: e.to_string() }))?;
    let spec_err = |message: String| setup_failed(PeerError::Spec { rank, message });
    let resolved = crate::spec::from_toml_str(&welcome.spec_toml).map_err(|e| spec_err(e.to_string()))?;
    let plan = Plan::build(&resolved).map_err(|e| spec_err(e.to_string()))?;
    say(&format!("rank {rank} of {}: joined rank 0 at {}, GPU {device}; rank 0 writes the run directory", ext.world, ext.address()));
    let mut opts = ExecOptions { collective_timeout: Duration::from_secs(welcome.timeout_s), skip_optimizer: welcome.skip_optimizer, ..Default::default() };
    opts.fail_at = welcome.fail_at.clone();
    let setup = RankSetup { rank, world: ext.world, device, nccl_id: welcome.nccl_id.clone(), epoch_ns: welcome.epoch_unix_ns, opts };
    let sender = client.sender();
    let (done_tx, done_rx) = mpsc::channel::<Option<String>>();
    spawn_rank_thread(move || {
        let mut failed = None;
        let mut emit = |l: WorkerLine| {
            if let WorkerLine::Error { message, .. } = &l {
                failed = Some(message.clone());
            }
            let _ = sender.send(&ToRoot::Line { line: l });
        };
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_rank(plan, &setup, &mut emit, None)));
        let (code, rec) = match outcome {
            Ok(x) => x,
            Err(_) => {
                let message = format!("rank {rank} crashed (panic)");
                emit(WorkerLine::Error { rank: rank as u32, message: message.clone(), error: Some(WireError::Crashed { rank: rank as u32, message }) });
                (1, None)
            }
        };
        if let Some(rec) = rec {
            let _ = sender.send(&ToRoot::Record { record: Box::new(rec) });
        }
        if code == 0 {
            let _ = sender.send(&ToRoot::Line { line: WorkerLine::Done { rank: rank as u32 } });
        }
        let _ = done_tx.send(failed.or((code != 0).then(|| format!("exit code {code}"))));
    });
    let mut own: Option<Option<String>> = None;
    loop {
        if own.is_none() {
            if let Ok(r) = done_rx.try_recv() {
                own = Some(r);
            }
        }
        match root.recv_timeout(Duration::from_millis(50)) {
            Ok(RootEvent::End(ok, message)) => {
                return match (own.flatten(), ok) {
                    (Some(m), _) => Err(PeerError::Failed { rank, message: m }),
                    (None, true) => Ok(()),
                    (None, false) => Err(PeerError::Stopped { rank, message: message.unwrap_or_else(|| "the job failed".into()) }),
                };
            }
            Ok(RootEvent::Stop(reason)) => {
                // Our own failure, when there is one, is what rank 0 reports too.
                let own = own.flatten().or_else(|| done_rx.recv_timeout(Duration::from_millis(200)).ok().flatten());
                return Err(match own {
                    Some(m) => PeerError::Failed { rank, message: m },
                    None => PeerError::Stopped { rank, message: format!("rank 0 ended the job: {reason}") },
                });
            }
            Ok(RootEvent::Lost(how)) => {
                return Err(match own.flatten() {
                    Some(m) => PeerError::Failed { rank, message: m },
                    None => PeerError::Stopped { rank, message: how },
                })
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(PeerError::Stopped { rank, message: "lost rank 0's connection".into() });
            }
        }
    }
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

/// Where one rank runs and how it joins the others.
#[derive(Clone)]
pub struct RankSetup {
    /// Global rank.
    pub rank: usize,
    /// Ranks in the job.
    pub world: usize,
    /// GPU ordinal.
    pub device: usize,
    /// NCCL unique id as hex (required when world > 1).
    pub nccl_id: Option<String>,
    /// The job's wall-clock time base, Unix nanoseconds (0: this rank's own start).
    pub epoch_ns: u64,
    /// Collective timeout, fault injection, optimizer skipping, cancel flag; with a dump
    /// directory, `dump_buffers` keeps every non-persistent buffer past its last use and dumps
    /// them all at the end ([`crate::backend::dump`]; small experiments only: every
    /// activation stays in device memory).
    pub opts: ExecOptions,
}

/// Runs one rank of `plan` on its GPU: opens it, joins the communicators, runs every step,
/// reporting through `emit` (`Ready`, `Step`s, an `Error` on failure; `Done` is the
/// caller's, after it has stored the record). Returns the exit code (0 or 1) and the rank's
/// record once the GPU was set up, also after a failed step. With `dump`, the final
/// parameters and gradients of a completed run go to `dump/params-rank<r>.json`, and with
/// `ExecOptions::dump_buffers` in [`RankSetup::opts`] every non-persistent buffer to `dump/buffers-rank<r>.*`.
pub fn run_rank(plan: Plan, s: &RankSetup, emit: &mut dyn FnMut(WorkerLine), dump: Option<&Path>) -> (i32, Option<RankRecord>) {
    let rank = s.rank;
    let mut fail = |message: String, error: Option<WireError>| {
        emit(WorkerLine::Error { rank: rank as u32, message, error });
        1
    };
    if plan.world() != s.world || rank >= s.world {
        return (fail(format!("rank {rank}: the plan has {} ranks but WORLD_SIZE={}", plan.world(), s.world), None), None);
    }
    let gpu = match Gpu::open(s.device) {
        Ok(g) => g,
        Err(e) => return (fail(format!("rank {rank}: GPU {}: {e}", s.device), None), None),
    };
    let device_name = gpu.info.name.clone();
    let id = s.nccl_id.as_deref().and_then(parse_unique_id);
    if let Err(e) = gpu.ctx.bind_to_thread() {
        return (fail(format!("rank {rank}: {e:?}"), None), None);
    }
    // A plan whose predicted peak cannot fit is refused before NCCL and the first op, with
    // what to change (an upper bound, a dropless plan's, may fit: it runs).
    let need = crate::plan::memory::predict(&plan.ranks[rank]);
    if let (false, Ok((free, _))) = (need.upper_bound, cudarc::driver::result::mem_get_info()) {
        if need.peak_total as usize > free {
            let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
            return (fail(format!(
                "rank {rank}: the plan's predicted peak is {:.2} GiB but {device_name} has {:.2} GiB free (fix: lower model.tokens_per_rank or model.batch, raise layout.ep or layout.tp, or use model.dtype = \"bf16\"; `moelab plan` shows the peak per rank)",
                gib(need.peak_total as usize), gib(free)
            ), None), None);
        }
    }
    let comms = match Comms::new(rank as u32, s.world, id, &plan.groups) {
        Ok(c) => c,
        Err(e) => return (fail(format!("rank {rank}: communicators: {e}"), None), None),
    };
    // Cross-checks of bf16 plans replay this run's routing on the cpu: keep every layer's
    // choices (`*route.idx`) past their last use so they can be written out with the dump.
    let route_names: Vec<String> = if dump.is_some() {
        plan.ranks[rank].buffers.iter().filter(|b| b.name.ends_with("route.idx")).map(|b| b.name.clone()).collect()
    } else {
        Vec::new()
    };
    // Per-buffer cross-checks: every non-persistent buffer is kept to the end of the run.
    let transient: Vec<String> = if dump.is_some() && s.opts.dump_buffers {
        plan.ranks[rank].buffers.iter().filter(|b| !b.persistent).map(|b| b.name.clone()).collect()
    } else {
        Vec::new()
    };
    let retain: Vec<String> = route_names.iter().chain(&transient).cloned().collect();
    let mut gr = match GpuRank::new(plan, rank, gpu, comms, &retain, s.epoch_ns, need.peak_total) {
        Ok(g) => g,
        Err(e) => return (fail(format!("rank {rank}: setup: {e}"), None), None),
    };
    emit(WorkerLine::Ready { rank: rank as u32, device: device_name.clone() });
    let spec = &gr.plan().spec;
    let (warmup, steps) = (spec.run.warmup, spec.run.steps);
    let mut code = 0;
    for i in 0..warmup + steps {
        if i >= STOP_BEFORE_STEP.load(Ordering::SeqCst) {
            let e = BackendError::Cancelled;
            emit(WorkerLine::Error { rank: rank as u32, message: e.to_string(), error: Some(WireError::from(&e)) });
            code = 1;
            break;
        }
        let measured = i >= warmup;
        match gr.step(measured, &s.opts) {
            Ok(st) => {
                // This rank's loss share and the routing figures of the layers it reports.
                let mine = crate::backend::reported_layers(gr.plan(), rank);
                let loss: f64 = st.obs.iter().filter(|o| o.0 == Stage::Loss).map(|o| o.3.loss).sum();
                let routing: Vec<_> = st.obs.iter().filter(|o| o.0 != Stage::Loss && mine.contains(&o.1)).map(|o| (o.1, o.2, o.3)).collect();
                let (aux, dropped, routed, capacity) = crate::backend::routing_figures(&routing);
                emit(WorkerLine::Step { rank: rank as u32, step: i, measured, loss, aux, dropped, routed, capacity, wall_s: st.wall_s, host_ops: st.host_ops });
            }
            Err(e) => {
                emit(WorkerLine::Error { rank: rank as u32, message: e.to_string(), error: Some(WireError::from(&e)) });
                code = 1;
                break;
            }
        }
    }
    let rec = RankRecord {
        rank: rank as u32, device: device_name, ops: gr.ops.clone(), memory: gr.memory_events(), steps: gr.steps.clone(),
        tracked_peak: gr.tracked_peak(),
        pool_peak_bytes: gr.pool_peak_bytes(),
        host_copies: super::exec::host_copies(),
    };
    if let (0, Some(dir)) = (code, dump) {
        let rp = &gr.plan().ranks[rank];
        let names: Vec<String> = rp.params.iter().flat_map(|p| std::iter::once(p.value).chain(p.grad)).map(|b| rp.buffer(b).name.clone()).collect();
        let dump: std::collections::BTreeMap<String, Vec<f32>> = names.into_iter().filter_map(|n| Some((n.clone(), gr.read(&n)?))).collect();
        if let Err(e) = std::fs::write(dir.join(format!("params-rank{rank}.json")), serde_json::to_string(&dump).expect("floats serialize")) {
            emit(WorkerLine::Error { rank: rank as u32, message: format!("rank {rank}: writing its parameters: {e}"), error: None });
            code = 1;
        }
        let routes: std::collections::BTreeMap<String, Vec<i32>> =
            route_names.iter().filter_map(|n| Some((n.clone(), gr.read(n)?.into_iter().map(|x| x as i32).collect()))).collect();
        if let Err(e) = std::fs::write(dir.join(format!("routes-rank{rank}.json")), serde_json::to_string(&routes).expect("ints serialize")) {
            emit(WorkerLine::Error { rank: rank as u32, message: format!("rank {rank}: writing its routing: {e}"), error: None });
            code = 1;
        }
        if s.opts.dump_buffers {
            let held: Vec<_> = transient.iter().filter_map(|n| Some((n.clone(), gr.read_data(n)?))).collect();
            if let Err(e) = crate::backend::dump::write(dir, rank, &held) {
                emit(WorkerLine::Error { rank: rank as u32, message: format!("rank {rank}: writing its buffers: {e}"), error: None });
                code = 1;
            }
        }
    }
    (code, Some(rec))
}

/// The step before which this worker process stops (a cancel from the launcher, through its
/// stdin); never by default.
static STOP_BEFORE_STEP: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(usize::MAX);

/// The local launcher's worker process: `moelab cuda-worker <run dir>` with RANK,
/// WORLD_SIZE, LOCAL_RANK and MOELAB_NCCL_ID set by [`run_job`]; progress as JSON lines on
/// stdout, its record in `rank-<r>.json`. Returns the exit code.
pub fn worker_main(dir: &Path) -> i32 {
    let rank = env_usize(&["RANK"]).unwrap_or(0);
    let world = env_usize(&["WORLD_SIZE"]).unwrap_or(1);
    let device = env_usize(&["LOCAL_RANK"]).unwrap_or(rank);
    // The launcher holds our stdin: `stop K` asks this rank to stop before step K (a cancel);
    // when the launcher goes away, so do we (no orphaned GPU jobs).
    std::thread::spawn(|| {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if let Some(k) = line.trim().strip_prefix("stop ").and_then(|k| k.parse().ok()) {
                STOP_BEFORE_STEP.store(k, Ordering::SeqCst);
            }
        }
        std::process::exit(3);
    });
    let fail = |message: String| {
        emit(&WorkerLine::Error { rank: rank as u32, message, error: None });
        1
    };
    let spec = match crate::spec::load_file(&dir.join("spec.toml")) {
        Ok(s) => s,
        Err(e) => return fail(format!("rank {rank}: spec: {e}")),
    };
    let plan = match Plan::build(&spec) {
        Ok(p) => p,
        Err(e) => return fail(format!("rank {rank}: plan: {e}")),
    };
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
    let epoch_ns = std::env::var("MOELAB_EPOCH_UNIX_NS").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
    opts.dump_buffers = std::env::var_os(crate::backend::dump::DUMP_BUFFERS_ENV).is_some();
    let setup = RankSetup { rank, world, device, nccl_id: std::env::var("MOELAB_NCCL_ID").ok(), epoch_ns, opts };
    let dump = std::env::var_os("MOELAB_DUMP_PARAMS").is_some().then_some(dir);
    let (code, rec) = run_rank(plan, &setup, &mut |l| emit(&l), dump);
    if let Some(rec) = rec {
        if let Err(e) = std::fs::write(dir.join(format!("rank-{rank}.json")), serde_json::to_string(&rec).expect("record serializes")) {
            return fail(format!("rank {rank}: writing its trace: {e}"));
        }
    }
    if code == 0 {
        emit(&WorkerLine::Done { rank: rank as u32 });
    }
    code
}

//! One rank's plan on one GPU: a host thread and a CUDA stream per plan stream, ops enqueued
//! in plan order per stream, cross-stream dependencies as CUDA events, every op bracketed by
//! timing events, buffers freed (stream-ordered) after their last user was enqueued.

use super::comm::Comms;
use super::exec::{ExecError, GpuOutcome, LossPending, StreamExec};
use super::gpu::{Gpu, GpuStream};
use super::store::DevStore;
use crate::backend::cpu::exec::RouteObs;
use crate::backend::cpu::fabric::Fabric;
use crate::backend::cpu::initial_values;
use crate::backend::cpu::store::Data;
use crate::backend::{BackendError, ExecOptions};
use crate::plan::{Plan, RankPlan};
use crate::taxonomy::{Stage, Stream};
use crate::trace::{MemEvent, OpEvent, StepSpan};
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::CudaEvent;
use moelab_kernels::error::GpuError;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Whether `MOELAB_RELEASE_WAITS_TAIL=1` asks for the old release wait: a buffer freed on
/// one stream waits for everything queued on the other streams that used it (for A/B runs).
fn release_waits_tail() -> bool {
    static TAIL: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *TAIL.get_or_init(|| std::env::var("MOELAB_RELEASE_WAITS_TAIL").is_ok_and(|v| v == "1"))
}

/// Per buffer and stream, the last active op of that stream (in its issue order) that touches
/// the buffer: what a release on another stream must wait for.
fn last_use_per_stream(rp: &RankPlan, active: &[bool], touched: &[Vec<crate::plan::BufId>], streams: usize) -> Vec<Vec<Option<usize>>> {
    let mut last = vec![vec![None; streams]; rp.buffers.len()];
    for (i, op) in rp.ops.iter().enumerate().filter(|(i, _)| active[*i]) {
        let si = stream_index(op.stream);
        for b in &touched[i] {
            if let Some(slot) = last[b.0 as usize].get_mut(si) {
                *slot = Some(i);
            }
        }
    }
    last
}

fn stream_index(s: Stream) -> usize {
    match s {
        Stream::Compute => 0,
        Stream::Comm => 1,
    }
}

/// One timed op of a step: its index, start and end (ns after the step's base event), the
/// bytes it reports, its host time after the first sync, its issue time and its cuBLAS GEMM
/// calls.
type TimedOp = (usize, u64, u64, Option<u64>, Option<u64>, u64, u32);

/// What one rank measured in one step.
#[derive(Debug, Default, Clone)]
pub struct RankStep {
    /// Routing and loss observations by stage, layer and chunk (micro-batch).
    pub obs: Vec<(Stage, Option<u32>, Option<u32>, RouteObs)>,
    /// Wall time of the step on this rank, seconds.
    pub wall_s: f64,
    /// Ops that ran on the host (cpu implementation).
    pub host_ops: usize,
}

/// A rank's plan loaded on a GPU.
pub struct GpuRank {
    gpu: Gpu,
    streams: Vec<GpuStream>,
    store: Mutex<DevStore>,
    comms: Comms,
    plan: Plan,
    rank: usize,
    retain: Vec<bool>,
    /// Traced ops so far.
    pub ops: Vec<OpEvent>,
    /// Measured step spans so far.
    pub steps: Vec<StepSpan>,
    epoch: Instant,
    /// Nanoseconds added to `epoch`-relative times so ranks in different processes share a
    /// time base (the launcher's wall-clock epoch).
    offset_ns: i64,
    steps_done: usize,
}

impl GpuRank {
    /// Opens the GPU, joins the communicators, uploads the initial parameters. `epoch_unix_ns`
    /// is the job's wall-clock time base (0: this rank's own start).
    /// `peak_bytes` is the rank's predicted peak (`plan::memory::predict`), reserved up front.
    pub fn new(plan: Plan, rank: usize, gpu: Gpu, comms: Comms, retain: &[String], epoch_unix_ns: u64, peak_bytes: u64) -> Result<GpuRank, ExecError> {
        gpu.ctx.bind_to_thread().map_err(GpuError::driver("cuCtxSetCurrent"))?;
        gpu.configure_pool()?;
        // Stream order follows taxonomy::Stream: compute, then comm. The comm stream runs at
        // high priority unless MOELAB_COMM_PRIORITY=normal (for A/B measurements).
        let comm_high = std::env::var("MOELAB_COMM_PRIORITY").map_or(true, |v| v != "normal");
        let streams = vec![gpu.new_stream(false)?, gpu.new_stream(comm_high)?];
        let rp = &plan.ranks[rank];
        // The plan's peak in one piece up front: a pool grown allocation by allocation spent
        // about 1 ms per GB in every step's large allocations, though it no longer grew
        // (MOELAB_POOL_RESERVE=0 turns this off, for A/B measurements).
        if std::env::var("MOELAB_POOL_RESERVE").map_or(true, |v| v != "0") {
            let peak = peak_bytes as usize;
            gpu.reserve_pool(&streams[0], peak + peak / 16)?;
        }
        // The offset to the job's time base is read at the same instant as `epoch`: read before
        // the pool reservation above (tens of ms, different per rank), it shifted the ranks'
        // timelines apart by 1-29 ms in the session-13 2-GPU traces.
        let epoch = Instant::now();
        let offset_ns = if epoch_unix_ns == 0 { 0 } else { super::launch::now_unix_ns().saturating_sub(epoch_unix_ns) as i64 };
        let store = DevStore::new(rp.rank, rp.buffers.clone(), epoch);
        let retain: std::collections::HashSet<&str> = retain.iter().map(String::as_str).collect();
        let retain = rp.buffers.iter().map(|b| retain.contains(b.name.as_str())).collect();
        let me = GpuRank {
            gpu, streams, store: Mutex::new(store), comms, rank, retain, ops: Vec::new(), steps: Vec::new(), epoch, offset_ns,
            steps_done: 0, plan,
        };
        let rp = &me.plan.ranks[rank];
        let fabric = Fabric::new(Duration::from_secs(1));
        let ex = me.exec(0, 0, 0, &fabric);
        for (id, v) in initial_values(rp, me.plan.spec.run.seed) {
            // bf16 plans: a GEMM-read parameter's shadow starts as its master, rounded.
            if let Some(h) = rp.params.iter().find(|p| p.value == id).and_then(|p| p.half) {
                ex.upload(h, &Data::F32(v.clone()))?;
            }
            ex.upload(id, &Data::F32(v))?;
        }
        // Every per-expert GEMM shape a dropless plan can meet, before the first step.
        let warm = Instant::now();
        let warmed = ex.warm_expert_shapes(crate::backend::sim::expected_dynamic_load(&me.plan.spec))?;
        if warmed > 0 {
            eprintln!("rank {}: {warmed} expert GEMM shapes warmed in {:.0} ms (MOELAB_WARM_SHAPES=0 skips)", rp.rank, warm.elapsed().as_secs_f64() * 1e3);
        }
        me.streams[0].stream.synchronize().map_err(GpuError::driver("cuStreamSynchronize"))?;
        Ok(me)
    }

    fn exec<'a>(&'a self, si: usize, step: u64, adam_step: u64, fabric: &'a Fabric) -> StreamExec<'a> {
        StreamExec {
            gpu: &self.gpu, s: &self.streams[si], si, store: &self.store, comms: &self.comms, rp: &self.plan.ranks[self.rank],
            groups: &self.plan.groups, seed: self.plan.spec.run.seed, step, adam_step, fabric,
            bf16: self.plan.spec.model.dtype == crate::spec::DType::Bf16,
            first_sync: std::cell::Cell::new(None),
            gemm_calls: std::cell::Cell::new(0),
        }
    }

    /// The plan.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// Highest bytes held and the per-category bytes at that moment.
    pub fn tracked_peak(&self) -> (u64, [u64; 7]) {
        let st = lock(&self.store);
        (st.peak_total, st.at_peak)
    }

    /// The most bytes the device pool handed out at once (plan buffers plus scratch).
    pub fn pool_peak_bytes(&self) -> u64 {
        self.gpu.pool_peak_bytes().unwrap_or(0)
    }

    /// Memory events so far (time-shifted to the shared base).
    pub fn memory_events(&self) -> Vec<MemEvent> {
        lock(&self.store).events.iter().map(|e| MemEvent { t_ns: self.shift(e.t_ns), ..e.clone() }).collect()
    }

    fn shift(&self, t: u64) -> u64 {
        (t as i64 + self.offset_ns).max(0) as u64
    }

    /// A buffer's contents (parameters, gradients, retained activations), as f32.
    pub fn read(&self, name: &str) -> Option<Vec<f32>> {
        match self.read_data(name)? {
            Data::F32(v) => Some(v),
            Data::I32(v) => Some(v.into_iter().map(|x| x as f32).collect()),
        }
    }

    /// A live buffer's contents in its element type (bf16 storage widened to f32); `None`
    /// for an unknown name or a buffer not held now.
    pub fn read_data(&self, name: &str) -> Option<Data> {
        let id = self.plan.ranks[self.rank].buffer_id(name)?;
        let fabric = Fabric::new(Duration::from_secs(1));
        self.exec(0, 0, 0, &fabric).download(id).ok()
    }

    /// Runs one step; `measured` steps are traced.
    pub fn step(&mut self, measured: bool, opts: &ExecOptions) -> Result<RankStep, BackendError> {
        let rank = self.plan.ranks[self.rank].rank;
        let data_step = self.steps_done as u64;
        let adam_step = (self.steps_done + 1) as u64;
        let t0 = Instant::now();
        let start_ns = self.epoch.elapsed().as_nanos() as u64;
        let out = self.run_step(data_step, adam_step, opts).map_err(|e| match e {
            StepError::Backend(b) => b,
            StepError::Op { op, err } => BackendError::OpFailed { rank, op, message: err.to_string() },
        })?;
        let (mut result, events, base_host_ns) = out;
        result.wall_s = t0.elapsed().as_secs_f64();
        if measured {
            // The run's step number (warmup included), as run.log and summary.json count them.
            let step = self.steps_done as u32;
            for (op_index, t_start, t_end, bytes, host_ns, issue_ns, gemm_calls) in events {
                let op = &self.plan.ranks[self.rank].ops[op_index];
                let s = self.shift(base_host_ns + t_start);
                let e = self.shift(base_host_ns + t_end).max(s + 1);
                self.ops.push(OpEvent {
                    rank, step, stream: op.stream, stage: op.stage, pass: op.pass, name: op.name.clone(), layer: op.layer, chunk: op.chunk,
                    start_ns: s, end_ns: e, flops: op.flops, bytes: bytes.unwrap_or(op.bytes), collective: op.collective,
                    host_ns: host_ns.map(|h| h.min(e - s)),
                    issue_ns: Some(issue_ns),
                    gemm_calls: (gemm_calls > 0).then_some(gemm_calls),
                });
            }
            let end = self.epoch.elapsed().as_nanos() as u64;
            self.steps.push(StepSpan { rank, step, start_ns: self.shift(start_ns), end_ns: self.shift(end) });
        }
        self.steps_done += 1;
        Ok(result)
    }

    fn run_step(&self, data_step: u64, adam_step: u64, opts: &ExecOptions) -> Result<(RankStep, Vec<TimedOp>, u64), StepError> {
        let rp: &RankPlan = &self.plan.ranks[self.rank];
        let gpu_err = |e: GpuError| StepError::Backend(BackendError::OpFailed { rank: rp.rank, op: "(step)".into(), message: e.to_string() });
        let n = rp.ops.len();
        let (active, touched, uses) = crate::backend::buffer_uses(rp, opts.skip_optimizer);
        let last_use = last_use_per_stream(rp, &active, &touched, self.streams.len());
        let new_event = || self.gpu.ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(GpuError::driver("cuEventCreate"));
        let mut evs: Vec<(CudaEvent, CudaEvent)> = Vec::with_capacity(n);
        for _ in 0..n {
            evs.push((new_event().map_err(gpu_err)?, new_event().map_err(gpu_err)?));
        }
        // Base event: every stream waits for it, so every op's time is after it.
        let base = new_event().map_err(gpu_err)?;
        base.record(&self.streams[0].stream).map_err(|e| gpu_err(GpuError::driver("cuEventRecord")(e)))?;
        let base_host_ns = self.epoch.elapsed().as_nanos() as u64;
        for s in &self.streams[1..] {
            s.stream.wait(&base).map_err(|e| gpu_err(GpuError::driver("cuStreamWaitEvent")(e)))?;
        }
        let enqueued: Vec<AtomicBool> = (0..n).map(|_| AtomicBool::new(false)).collect();
        let cv = (Mutex::new(()), Condvar::new());
        let failed = AtomicBool::new(false);
        let fabric = Fabric::new(opts.collective_timeout);
        let outcomes: Mutex<Vec<(usize, GpuOutcome, Option<u64>, u64, u32)>> = Mutex::new(Vec::new());

        let run_stream = |si: usize| -> Result<(), StepError> {
            self.gpu.ctx.bind_to_thread().map_err(|e| gpu_err(GpuError::driver("cuCtxSetCurrent")(e)))?;
            let ex = self.exec(si, data_step, adam_step, &fabric);
            for op in rp.ops.iter().filter(|o| stream_index(o.stream) == si) {
                let i = op.id.0 as usize;
                let finish = || {
                    enqueued[i].store(true, Ordering::SeqCst);
                    let _g = lock(&cv.0);
                    cv.1.notify_all();
                };
                if !active[i] {
                    finish();
                    continue;
                }
                if opts.cancel.load(Ordering::Relaxed) {
                    return Err(StepError::Backend(BackendError::Cancelled));
                }
                if let Some((r, name)) = &opts.fail_at {
                    if *r == rp.rank && *name == op.name {
                        return Err(StepError::Op { op: op.name.clone(), err: ExecError::Plan("injected failure".into()) });
                    }
                }
                for d in &op.deps {
                    let di = d.0 as usize;
                    let mut g = lock(&cv.0);
                    while !enqueued[di].load(Ordering::SeqCst) {
                        if failed.load(Ordering::SeqCst) {
                            return Err(StepError::Backend(BackendError::Aborted { rank: rp.rank, by: rp.rank }));
                        }
                        g = cv.1.wait_timeout(g, Duration::from_millis(20)).unwrap_or_else(|p| p.into_inner()).0;
                    }
                    drop(g);
                    if stream_index(rp.ops[di].stream) != si {
                        ex.s.stream.wait(&evs[di].1).map_err(|e| gpu_err(GpuError::driver("cuStreamWaitEvent")(e)))?;
                    }
                }
                evs[i].0.record(&ex.s.stream).map_err(|e| gpu_err(GpuError::driver("cuEventRecord")(e)))?;
                ex.first_sync.set(None);
                ex.gemm_calls.set(0);
                let issued = Instant::now();
                let out = ex.execute(op).map_err(|err| StepError::Op { op: op.name.clone(), err })?;
                let host_ns = ex.first_sync.get().map(|t| t.elapsed().as_nanos() as u64);
                let issue_ns = issued.elapsed().as_nanos() as u64;
                evs[i].1.record(&ex.s.stream).map_err(|e| gpu_err(GpuError::driver("cuEventRecord")(e)))?;
                lock(&outcomes).push((i, out, host_ns, issue_ns, ex.gemm_calls.get()));
                // Release buffers whose last user this was: the freeing stream first waits for
                // every other stream that used them, at the end of that stream's last op on the
                // buffer (whose end event is recorded: its use count fell first). Waiting for
                // all the other stream had queued made a compute stream wait for an all-to-all's
                // count exchange, so for the peer rank (2x H200, session 13); the old wait stays
                // for A/B (`MOELAB_RELEASE_WAITS_TAIL=1`) and for a use outside the plan's ops.
                for b in &touched[i] {
                    let last = uses[b.0 as usize].fetch_sub(1, Ordering::SeqCst) == 1;
                    if last && !rp.buffer(*b).persistent && !self.retain[b.0 as usize] {
                        let mut st = lock(&self.store);
                        if let Some(buf) = st.get(*b) {
                            for (oi, other) in self.streams.iter().enumerate() {
                                if oi != si && buf.used_by & (1 << oi) != 0 {
                                    let tail;
                                    let waited = match last_use[b.0 as usize].get(oi).copied().flatten().filter(|_| !release_waits_tail()) {
                                        Some(j) => &evs[j].1,
                                        None => {
                                            tail = new_event().map_err(gpu_err)?;
                                            tail.record(&other.stream).map_err(|e| gpu_err(GpuError::driver("cuEventRecord")(e)))?;
                                            &tail
                                        }
                                    };
                                    ex.s.stream.wait(waited).map_err(|e| gpu_err(GpuError::driver("cuStreamWaitEvent")(e)))?;
                                }
                            }
                        }
                        st.release(*b, ex.s.stream.cu_stream()).map_err(gpu_err)?;
                    }
                }
                finish();
            }
            Ok(())
        };
        let results: Vec<Result<(), StepError>> = std::thread::scope(|sc| {
            let hs: Vec<_> = (0..self.streams.len())
                .map(|si| {
                    let (run_stream, failed, cv) = (&run_stream, &failed, &cv);
                    sc.spawn(move || {
                        let r = catch_unwind(AssertUnwindSafe(|| run_stream(si))).unwrap_or_else(|p| {
                            Err(StepError::Backend(BackendError::Crashed { rank: rp.rank, message: panic_message(&p) }))
                        });
                        if r.is_err() {
                            failed.store(true, Ordering::SeqCst);
                            let _g = lock(&cv.0);
                            cv.1.notify_all();
                        }
                        r
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().expect("stream threads catch their panics")).collect()
        });
        let mut first = None;
        for r in results {
            match r {
                Err(e @ StepError::Backend(BackendError::Aborted { .. })) => {
                    first.get_or_insert(e);
                }
                Err(e) => {
                    first = Some(e);
                    break;
                }
                Ok(()) => {}
            }
        }
        if let Some(e) = first {
            return Err(e);
        }
        for s in &self.streams {
            s.stream.synchronize().map_err(|e| gpu_err(GpuError::driver("cuStreamSynchronize")(e)))?;
        }
        let mut result = RankStep::default();
        let mut timed = Vec::new();
        let ex = self.exec(0, data_step, adam_step, &fabric);
        for (i, out, host_ns, issue_ns, gemm_calls) in lock(&outcomes).drain(..) {
            let ms0 = base.elapsed_ms(&evs[i].0).map_err(|e| gpu_err(GpuError::driver("cuEventElapsedTime")(e)))?;
            let ms1 = base.elapsed_ms(&evs[i].1).map_err(|e| gpu_err(GpuError::driver("cuEventElapsedTime")(e)))?;
            timed.push((i, (ms0.max(0.0) as f64 * 1e6) as u64, (ms1.max(0.0) as f64 * 1e6) as u64, out.bytes, host_ns, issue_ns, gemm_calls));
            if out.host {
                result.host_ops += 1;
            }
            // Routing recomputed in backward (activation checkpointing) is counted once.
            if let Some(o) = out.obs.filter(|_| rp.ops[i].pass != crate::taxonomy::Pass::Backward) {
                result.obs.push((rp.ops[i].stage, rp.ops[i].layer, rp.ops[i].chunk, o));
            }
            if let Some(l) = out.loss {
                let value = finish_loss(&ex, l).map_err(|err| StepError::Op { op: rp.ops[i].name.clone(), err })?;
                if l.observed {
                    result.obs.push((Stage::Loss, None, None, RouteObs { loss: value, ..Default::default() }));
                }
            }
        }
        for s in &self.streams {
            s.stream.synchronize().map_err(|e| gpu_err(GpuError::driver("cuStreamSynchronize")(e)))?;
        }
        Ok((result, timed, base_host_ns))
    }
}

/// Sums a loss op's partials and writes the value into its loss buffer.
fn finish_loss(ex: &StreamExec, l: LossPending) -> Result<f64, ExecError> {
    let mut parts = vec![0.0f64; l.blocks];
    // SAFETY: partial holds `blocks` f64 written by the mse kernel; this thread has the context.
    unsafe { super::pinned::download(&mut parts, l.partial, &ex.s.stream) }?;
    ex.scratch_free(l.partial)?;
    let value = parts.iter().sum::<f64>() / (2.0 * l.denom);
    if ex.rp.buffer(l.loss).persistent || lock(ex.store).get(l.loss).is_some() {
        ex.upload(l.loss, &Data::F32(vec![value as f32]))?;
    }
    Ok(value)
}

enum StepError {
    Backend(BackendError),
    Op { op: String, err: ExecError },
}

fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned()).unwrap_or_else(|| "panic".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_release_waits_for_the_other_streams_last_use_of_the_buffer_only() {
        // MPMoE at ep = 2: each chunk's backward all-to-all (comm) fills a buffer that the
        // chunk's expert layout (compute) reads last. Released on the compute stream, it waits
        // for that all-to-all, not for the later chunks' all-to-alls queued behind it.
        let spec = crate::spec::load_file_with(std::path::Path::new("experiments/mixtral-ish/mpmoe-2gpu.toml"), &[crate::spec::overrides::Override::parse("run.backend=sim").unwrap()]).expect("spec");
        let plan = Plan::build(&spec).expect("plans");
        let rp = &plan.ranks[0];
        let (active, touched, _) = crate::backend::buffer_uses(rp, false);
        let last = last_use_per_stream(rp, &active, &touched, 2);
        let op = |name: &str| rp.ops.iter().position(|o| o.name == name).unwrap_or_else(|| panic!("{name}"));
        let a2a = op("L1.c4.combine_a2a_bwd");
        let layout = op("L1.c4.expert_layout_bwd");
        let recv = *rp.ops[layout].reads.iter().find(|b| rp.buffer(**b).name == "L1.moe.c4.dback_recv").expect("the layout reads the all-to-all's rows");
        assert_eq!(last[recv.0 as usize], [Some(layout), Some(a2a)]);
        assert!(rp.ops.iter().skip(a2a + 1).any(|o| o.stream == Stream::Comm), "later comm ops exist");
        // A buffer one stream never touches has no last use there.
        let w = rp.ops[op("L1.c4.expert_gemm2_bwd")].reads[1];
        assert_eq!(last[w.0 as usize][1], None, "{}", rp.buffer(w).name);
    }
}

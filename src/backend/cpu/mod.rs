//! The reference backend: real f32 math, one thread per rank and stream, collectives
//! through an in-process [`fabric::Fabric`] with NCCL's semantics, every op timed with a
//! wall clock. Streams of a rank run concurrently: an op waits only for its dependencies,
//! computes on snapshots of its inputs outside the store's lock, and a buffer is released
//! when its last user completes.

pub mod exec;
pub mod fabric;
pub mod store;

use super::{BackendError, ExecOptions, StepReport};
use crate::math::rng;
use crate::plan::{BufId, Plan, RankPlan};
use crate::taxonomy::Stage;
use crate::trace::{OpEvent, StepSpan, Trace};
use exec::{OpCtx, RouteObs};
use fabric::Fabric;
use std::panic::{catch_unwind, AssertUnwindSafe};
use crate::taxonomy::Stream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};
use store::Store;

/// One rank's live state across steps.
struct RankState {
    store: Mutex<Store>,
    ops: Vec<OpEvent>,
    steps: Vec<StepSpan>,
    retain: Vec<bool>,
}

/// A plan loaded onto simulated ranks, ready to run steps.
pub struct CpuRuntime {
    plan: Plan,
    ranks: Vec<RankState>,
    opts: ExecOptions,
    epoch: Instant,
    steps_done: usize,
}

impl CpuRuntime {
    /// Allocate and initialise every rank's parameters (deterministic from the seed).
    pub fn new(plan: Plan, opts: ExecOptions) -> Self {
        let epoch = Instant::now();
        let seed = plan.spec.run.seed;
        let wanted: std::collections::HashSet<&str> = opts.retain.iter().map(String::as_str).collect();
        let ranks = plan
            .ranks
            .iter()
            .map(|rp| {
                let mut store = Store::new(rp.rank, rp.buffers.clone(), epoch);
                init_params(rp, &mut store, seed);
                let retain = rp.buffers.iter().map(|b| wanted.contains(b.name.as_str())).collect();
                RankState { store: Mutex::new(store), ops: Vec::new(), steps: Vec::new(), retain }
            })
            .collect();
        CpuRuntime { plan, ranks, opts, epoch, steps_done: 0 }
    }

    /// The plan being executed.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// Run one step on every rank; `measured` steps are traced. `data_step` picks the batch
    /// (defaults to the running step count).
    pub fn step(&mut self, measured: bool, data_step: Option<u64>) -> Result<StepReport, BackendError> {
        let fabric = Fabric::new(self.opts.collective_timeout);
        let step = self.steps_done;
        let data_step = data_step.unwrap_or(step as u64);
        let adam_step = (step + 1) as u64;
        // Traced steps carry the run's step number (warmup included), as run.log and
        // summary.json count them.
        let measured_idx = step as u32;
        let (plan, opts, epoch) = (&self.plan, &self.opts, self.epoch);
        let t0 = Instant::now();
        let results: Vec<Result<Vec<Observed>, BackendError>> = std::thread::scope(|s| {
            let handles: Vec<_> = self
                .ranks
                .iter_mut()
                .zip(&plan.ranks)
                .map(|(state, rp)| {
                    let fabric = &fabric;
                    s.spawn(move || {
                        let r = catch_unwind(AssertUnwindSafe(|| {
                            run_rank(rp, state, plan, opts, fabric, epoch, data_step, adam_step, measured.then_some(measured_idx))
                        }));
                        let r = match r {
                            Ok(r) => r,
                            Err(p) => Err(BackendError::Crashed { rank: rp.rank, message: panic_message(&p) }),
                        };
                        if r.is_err() {
                            fabric.abort(rp.rank);
                        }
                        r
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("rank threads catch their panics")).collect()
        });
        let mut first_cause = None;
        let mut any_err = None;
        let mut report = StepReport { step, measured, loss: 0.0, aux_loss: 0.0, dropped: 0, routed: 0, capacity: Vec::new(), wall_s: t0.elapsed().as_secs_f64() };
        // Routing figures are global to a layer: one rank reports each layer's.
        let mut routing = Vec::new();
        for (rank, r) in results.into_iter().enumerate() {
            match r {
                Ok(obs) => {
                    let mine = super::reported_layers(plan, rank);
                    for (stage, layer, chunk, o) in obs {
                        if stage == Stage::Loss {
                            report.loss += o.loss;
                        } else if mine.contains(&layer) {
                            routing.push((layer, chunk, o));
                        }
                    }
                }
                Err(e @ BackendError::Aborted { .. }) => {
                    any_err.get_or_insert(e);
                }
                Err(e) => {
                    first_cause.get_or_insert(e);
                }
            }
        }
        (report.aux_loss, report.dropped, report.routed, report.capacity) = super::routing_figures(&routing);
        if let Some(e) = first_cause.or(any_err) {
            return Err(e);
        }
        self.steps_done += 1;
        Ok(report)
    }

    /// Contents of a buffer on a rank (params, grads, retained activations).
    pub fn read(&self, rank: usize, name: &str) -> Option<Vec<f32>> {
        let id = self.plan.ranks[rank].buffer_id(name)?;
        lock(&self.ranks[rank].store).f32(id).ok()
    }

    /// Contents of an index buffer on a rank (routing choices, slots).
    pub fn read_i32(&self, rank: usize, name: &str) -> Option<Vec<i32>> {
        let id = self.plan.ranks[rank].buffer_id(name)?;
        lock(&self.ranks[rank].store).i32(id).ok()
    }

    /// Overwrite a parameter's values on a rank (finite-difference checks).
    pub fn write(&mut self, rank: usize, name: &str, values: Vec<f32>) -> bool {
        match self.plan.ranks[rank].buffer_id(name) {
            Some(id) => lock(&self.ranks[rank].store).put_f32(id, values).is_ok(),
            None => false,
        }
    }

    /// Highest bytes in use per rank, and the per-category bytes at that moment.
    pub fn tracked_peaks(&self) -> Vec<(u64, [u64; 7])> {
        self.ranks.iter().map(|r| {
            let st = lock(&r.store);
            (st.peak_total, st.at_peak)
        }).collect()
    }

    /// Everything measured so far, as the common trace format.
    pub fn trace(&self) -> Trace {
        let mut t = Trace { backend: "cpu".into(), world: self.ranks.len() as u32, group_sizes: self.plan.group_sizes(), ..Default::default() };
        for r in &self.ranks {
            t.ops.extend(r.ops.iter().cloned());
            t.memory.extend(lock(&r.store).events.iter().cloned());
            t.steps.extend(r.steps.iter().cloned());
        }
        t
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned()).unwrap_or_else(|| "panic".into())
}

fn init_params(rp: &RankPlan, store: &mut Store, seed: u64) {
    for (id, v) in initial_values(rp, seed) {
        store.put_f32(id, v).expect("planned param size");
    }
    refresh_shadows(rp, store);
}

/// bf16 plans: every parameter's bf16 copy ([`crate::plan::ParamDesc::half`]) set to its
/// master rounded, as the cuda executor keeps it (at start and after every Adam step).
fn refresh_shadows(rp: &RankPlan, store: &mut Store) {
    for p in &rp.params {
        if let Some(h) = p.half {
            let v = store.f32(p.value).expect("parameter is live");
            store.put_f32(h, crate::math::bf16::rounded(&v)).expect("shadow has the parameter's size");
        }
    }
}

/// Every rank-local parameter's initial values, then zeros for its gradient and Adam moments:
/// a deterministic stream per (seed, tag, layer, expert), so any layout and any backend
/// starts from the same global weights.
pub fn initial_values(rp: &RankPlan, seed: u64) -> Vec<(BufId, Vec<f32>)> {
    let mut out = Vec::new();
    for p in &rp.params {
        let desc = rp.buffer(p.value);
        let mut v = vec![0.0f32; desc.elems];
        let tag = &p.init.tag;
        match p.init.experts {
            Some((first, count)) => {
                let per = desc.elems / count as usize;
                for (i, chunk) in v.chunks_mut(per).enumerate() {
                    let (layer, expert) = (p.init.layer as u64, first as u64 + i as u64);
                    match &p.slice {
                        // Draw the expert's whole tensor, keep this rank's part.
                        Some(s) => {
                            let mut full = vec![0.0f32; s.full_len()];
                            rng::fill_normal_par(seed, tag, layer, expert, &mut full, p.init.std);
                            let mut kept = Vec::with_capacity(chunk.len());
                            s.take(&full, &mut kept);
                            chunk.copy_from_slice(&kept);
                        }
                        None => rng::fill_normal_par(seed, tag, layer, expert, chunk, p.init.std),
                    }
                }
            }
            None => match &p.slice {
                // A tensor-parallel slice of a dense weight: draw it whole, keep this rank's part.
                Some(s) => {
                    let mut full = vec![0.0f32; s.full_len()];
                    rng::fill_normal_par(seed, tag, p.init.layer as u64, u64::MAX, &mut full, p.init.std);
                    v.clear();
                    s.take(&full, &mut v);
                    assert_eq!(v.len(), desc.elems, "slice of {} matches its buffer", desc.name);
                }
                None => rng::fill_normal_par(seed, tag, p.init.layer as u64, u64::MAX, &mut v, p.init.std),
            },
        }
        for x in v.iter_mut() {
            *x += p.init.mean;
        }
        out.push((p.value, v));
        for b in p.grad.iter().chain(p.moments.iter().flat_map(|(m, v)| [m, v])) {
            out.push((*b, vec![0.0; desc.elems]));
        }
    }
    out
}

/// Completion flags of one rank's ops in one step, with a wake-up for waiters.
struct Progress {
    done: Mutex<Vec<bool>>,
    cv: Condvar,
    failed: AtomicBool,
}

impl Progress {
    fn wait_for(&self, op: usize, fabric: &Fabric) -> bool {
        let mut d = lock(&self.done);
        while !d[op] {
            if self.failed.load(Ordering::SeqCst) || fabric.is_aborted() {
                return false;
            }
            d = self.cv.wait_timeout(d, Duration::from_millis(20)).unwrap_or_else(|p| p.into_inner()).0;
        }
        true
    }
    fn finish(&self, op: usize) {
        lock(&self.done)[op] = true;
        self.cv.notify_all();
    }
}

/// An op's observation: its stage, its layer and what it saw.
type Observed = (Stage, Option<u32>, Option<u32>, RouteObs);

#[allow(clippy::too_many_arguments)]
fn run_rank(
    rp: &RankPlan,
    state: &mut RankState,
    plan: &Plan,
    opts: &ExecOptions,
    fabric: &Fabric,
    epoch: Instant,
    data_step: u64,
    adam_step: u64,
    measured: Option<u32>,
) -> Result<Vec<Observed>, BackendError> {
    let start = epoch.elapsed().as_nanos() as u64;
    // A buffer is released when the last op that touches it completes.
    let (active, touched, uses) = super::buffer_uses(rp, opts.skip_optimizer);
    let mut shadow_of: Vec<Option<BufId>> = vec![None; rp.buffers.len()];
    for p in &rp.params {
        shadow_of[p.value.0 as usize] = p.half;
    }
    let progress = Progress { done: Mutex::new(vec![false; rp.ops.len()]), cv: Condvar::new(), failed: AtomicBool::new(false) };
    let events = Mutex::new(Vec::new());
    let obs = Mutex::new(Vec::new());
    let mut streams: Vec<Stream> = rp.ops.iter().map(|o| o.stream).collect();
    streams.sort();
    streams.dedup();
    let (store, retain) = (&state.store, &state.retain);
    let run_stream = |stream: Stream| -> Result<(), BackendError> {
        for op in rp.ops.iter().filter(|o| o.stream == stream) {
            let i = op.id.0 as usize;
            if !active[i] {
                progress.finish(i);
                continue;
            }
            if opts.cancel.load(Ordering::Relaxed) {
                return Err(BackendError::Cancelled);
            }
            if let Some((r, name)) = &opts.fail_at {
                if *r == rp.rank && *name == op.name {
                    return Err(BackendError::OpFailed { rank: rp.rank, op: op.name.clone(), message: "injected failure".into() });
                }
            }
            for d in &op.deps {
                if !progress.wait_for(d.0 as usize, fabric) {
                    return Err(BackendError::Aborted { rank: rp.rank, by: rp.rank });
                }
            }
            let forced_idx = match (&op.kind, &opts.replay_routes) {
                (crate::plan::OpKind::Route { idx, .. }, Some(r)) => {
                    let name = &rp.buffer(*idx).name;
                    match r.get(&(rp.rank, name.clone())) {
                        Some(v) => Some(v.as_slice()),
                        None => return Err(BackendError::OpFailed { rank: rp.rank, op: op.name.clone(),
                            message: format!("routing replay has no choices for {name}") }),
                    }
                }
                _ => None,
            };
            let ctx = OpCtx { rank: rp.rank, seed: plan.spec.run.seed, step: data_step, adam_step, fabric, groups: &plan.groups, op_name: &op.name,
                forced_idx, buffers: Some(&rp.buffers) };
            // bf16 plans: ops other than Adam read a parameter through its bf16 copy, as the
            // cuda executor's GEMMs and sends do.
            let shadowed: Vec<(BufId, BufId)> = if matches!(op.kind, crate::plan::OpKind::Adam { .. }) {
                Vec::new()
            } else {
                op.reads.iter().filter_map(|r| shadow_of[r.0 as usize].map(|h| (*r, h))).collect()
            };
            let mut view = lock(store).view_through(&op.reads, &op.writes, &shadowed);
            let t0 = epoch.elapsed().as_nanos() as u64;
            let out = exec::execute(&op.kind, &mut view, &ctx)?;
            let t1 = epoch.elapsed().as_nanos() as u64;
            {
                let mut st = lock(store);
                st.apply(view).map_err(|e| BackendError::OpFailed { rank: rp.rank, op: op.name.clone(), message: e.0 })?;
                // bf16 plans: what the op stored in a bf16 buffer is rounded to bf16 (f32
                // arithmetic inside the op, bf16 storage between ops, as on the GPU).
                for w in op.writes.iter().filter(|w| rp.buffer(**w).is_bf16()) {
                    st.round_bf16(*w);
                }
                // The GPU draws the target from the stored (bf16) batch: so does the cpu.
                if let crate::plan::OpKind::LoadBatch { x, target, .. } = &op.kind {
                    if rp.buffer(*x).is_bf16() {
                        st.round_bf16(*target);
                    }
                }
                if matches!(op.kind, crate::plan::OpKind::Adam { .. }) {
                    refresh_shadows(rp, &mut st);
                }
                for b in &touched[i] {
                    let last = uses[b.0 as usize].fetch_sub(1, Ordering::SeqCst) == 1;
                    if last && !rp.buffer(*b).persistent && !retain[b.0 as usize] {
                        st.free(*b);
                    }
                }
            }
            // Routing recomputed in backward (activation checkpointing) repeats the forward's
            // observations: count each layer's routing once.
            if let Some(o) = out.obs.filter(|_| op.pass != crate::taxonomy::Pass::Backward) {
                lock(&obs).push((op.stage, op.layer, op.chunk, o));
            }
            if let Some(step) = measured {
                lock(&events).push(OpEvent {
                    rank: rp.rank, step, stream: op.stream, stage: op.stage, pass: op.pass, name: op.name.clone(),
                    layer: op.layer, chunk: op.chunk, start_ns: t0, end_ns: t1.max(t0 + 1), flops: op.flops,
                    bytes: out.bytes.unwrap_or(op.bytes), collective: op.collective, host_ns: None, issue_ns: None, gemm_calls: None,
                });
            }
            progress.finish(i);
        }
        Ok(())
    };
    let results: Vec<Result<(), BackendError>> = std::thread::scope(|s| {
        let handles: Vec<_> = streams
            .iter()
            .map(|&stream| {
                let (run_stream, progress) = (&run_stream, &progress);
                s.spawn(move || {
                    let r = catch_unwind(AssertUnwindSafe(|| run_stream(stream)))
                        .unwrap_or_else(|p| Err(BackendError::Crashed { rank: rp.rank, message: panic_message(&p) }));
                    if r.is_err() {
                        progress.failed.store(true, Ordering::SeqCst);
                        progress.cv.notify_all();
                        fabric.abort(rp.rank);
                    }
                    r
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("stream threads catch their panics")).collect()
    });
    let mut first_err = None;
    for r in results {
        match r {
            Err(e @ BackendError::Aborted { .. }) => {
                first_err.get_or_insert(e);
            }
            Err(e) => {
                first_err = Some(e);
                break;
            }
            Ok(()) => {}
        }
    }
    let mut evs = events.into_inner().unwrap_or_else(|p| p.into_inner());
    evs.sort_by_key(|e| e.start_ns);
    state.ops.extend(evs);
    if let Some(e) = first_err {
        return Err(e);
    }
    if let Some(step) = measured {
        let end = epoch.elapsed().as_nanos() as u64;
        state.steps.push(StepSpan { rank: rp.rank, step, start_ns: start, end_ns: end });
    }
    Ok(obs.into_inner().unwrap_or_else(|p| p.into_inner()))
}

/// Buffer id helper for tests and tools.
pub fn buffer_named(plan: &RankPlan, name: &str) -> Option<BufId> {
    plan.buffer_id(name)
}

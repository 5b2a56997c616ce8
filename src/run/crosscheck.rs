//! Backend cross-check: one experiment on the cpu reference and on the cuda backend, then
//! every step's loss, aux loss and drop count, and every rank's final parameters and
//! gradients, compared with `||cuda - cpu|| / ||cpu||` (NaN never passes), held to
//! [`F32_TOL`] or, for `model.dtype = "bf16"` (both in bf16: the cpu computes in f32 and
//! rounds every value a bf16 buffer stores, as the GPU does), [`BF16_TOL`]. In bf16 the grad
//! pass's cpu run replays the cuda run's routing choices (a near tie that the two backends'
//! rounding decides differently would move a whole token between experts) and the number of
//! such flips is reported beside the comparison. In f32 such a flip is rare but happens on
//! fresh inputs: then the grad pass replays cuda's choices too, each flipped choice must be a
//! near tie (the cpu's router probabilities of the two experts within [`F32_TIE`]), and the
//! training steps, whose trajectories the flip makes differ, are not compared. The cuda side
//! runs through the real launcher (one worker process per GPU), whose workers dump the
//! tensors into its run directory ([`ExecOptions::dump_params`], passed to the workers
//! only, not set in this process's environment). With
//! [`CrossCheckOptions::buffers`], the grad pass also compares every transient buffer
//! ([`buffers`]): for f32 plans each op's output must agree within [`F32_TOL`] as well (an
//! op-level check of every cuda op the plan runs, on its inputs), for bf16 it is diagnostics.

pub mod buffers;

use super::{run, RunHooks};
use crate::backend::cpu::store::Data;
use crate::backend::dump;
use crate::backend::cpu::CpuRuntime;
use crate::backend::{ExecOptions, StepReport};
use crate::plan::{ElemType, Plan};
use crate::spec::{BackendKind, DType, ExperimentSpec};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::path::Path;

/// Why a cross-check could not be carried out (a cuda run that fails is reported in
/// [`CrossCheck::error`] instead).
#[derive(Debug, thiserror::Error)]
pub enum CrossCheckError {
    /// The cpu side's plan could not be built.
    #[error("building the cpu plan: {0}")]
    Plan(#[from] crate::plan::builders::PlanError),
    /// A cpu step failed.
    #[error("cpu step: {0}")]
    Step(#[from] crate::backend::BackendError),
    /// A file the cuda run wrote could not be read.
    #[error("{}: {source}", path.display())]
    Read {
        /// The file.
        path: std::path::PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A file the cuda run wrote is not the JSON expected.
    #[error("{}: {source}", path.display())]
    Json {
        /// The file.
        path: std::path::PathBuf,
        /// What serde said.
        source: serde_json::Error,
    },
}

/// Relative tolerance for f32 plans.
pub const F32_TOL: f64 = 1e-4;
/// Largest gap between the cpu router's probabilities of its own choice and cuda's at an f32
/// routing flip for the flip to count as a near tie (f32 rounding moves them by ~1e-7).
pub const F32_TIE: f64 = 1e-5;
/// Relative tolerance for bf16 plans (against the cpu's bf16-storage run of the same plan).
pub const BF16_TOL: f64 = crate::backend::cuda::check::BF16_TOL;

/// The tolerance a cuda run of `spec` is held to: its storage type's.
pub fn tolerance(spec: &ExperimentSpec) -> f64 {
    match spec.model.dtype {
        DType::F32 => F32_TOL,
        DType::Bf16 => BF16_TOL,
    }
}

/// One compared quantity.
#[derive(Debug, Clone, Serialize)]
pub struct Compared {
    /// `rank/buffer` or `step N loss`.
    pub name: String,
    /// Relative error (NaN when the cuda value has NaN or is missing).
    pub rel_err: f64,
    /// Within tolerance and finite.
    pub passed: bool,
}

/// The cross-check of one experiment.
#[derive(Debug, Clone, Serialize)]
pub struct CrossCheck {
    /// Experiment name.
    pub name: String,
    /// Variant.
    pub variant: String,
    /// Ranks.
    pub world: usize,
    /// Every compared quantity.
    pub items: Vec<Compared>,
    /// Worst relative error.
    pub worst: f64,
    /// Everything passed.
    pub passed: bool,
    /// The cuda run's error, if it failed.
    pub error: Option<String>,
    /// Routing choices of the grad pass where the cuda run's choice (replayed on the cpu)
    /// differs from the cpu's own, and all choices: always for bf16 plans, for f32 plans
    /// when any differ.
    pub route_flips: Option<(usize, usize)>,
    /// Why the training steps were not compared (an f32 routing flip at a near tie).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub training_skipped: Option<String>,
    /// With [`CrossCheckOptions::buffers`] and a completed cuda grad pass: every transient
    /// buffer of that pass compared (diagnostics only, never part of `passed`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub buffers: Option<buffers::BufferReport>,
}

/// What a cross-check compares beyond losses, parameters and gradients.
#[derive(Debug, Clone, Default)]
pub struct CrossCheckOptions {
    /// Keep and compare every non-persistent buffer of the grad pass on both backends
    /// (every activation stays in memory to the end of the step: small experiments only).
    pub buffers: bool,
}

/// `||a - b|| / ||b||` (absolute norm when b is zero); NaN if `a` has NaN or lengths differ.
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    if a.len() != b.len() || a.iter().any(|x| !x.is_finite()) {
        return f64::NAN;
    }
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum::<f64>().sqrt();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum::<f64>().sqrt();
    if den > 0.0 { num / den } else { num }
}

/// Runs `spec` on cpu and on cuda and compares them, in two passes: one step without the
/// optimizer (loss, aux loss, drops and every gradient of every rank), then the full run
/// (every step's loss, aux loss and drops, so Adam's updates are checked through the losses
/// they lead to). Parameters after Adam are not compared element-wise: where a gradient is
/// exactly zero in theory (e.g. the key bias under softmax), Adam turns rounding noise into
/// full-size steps on both backends.
pub fn crosscheck(spec: &ExperimentSpec, runs_root: &Path, opts: &CrossCheckOptions) -> Result<CrossCheck, CrossCheckError> {
    let tol = tolerance(spec);
    let mut items = Vec::new();
    let mut error = None;
    let mut one = spec.clone();
    one.run.warmup = 0;
    one.run.steps = 1;
    let world = spec.world();
    let bf16 = spec.model.dtype == DType::Bf16;
    // The grad pass is one step, so what both sides keep is that step's.
    let (dir, cuda_steps) = cuda_run(&one, runs_root, true, opts.buffers, &mut error);
    // The cuda run's routing choices against the cpu's own. bf16: the cpu replays them (near
    // ties that the two backends' different rounding decides differently would otherwise move
    // whole tokens between experts) and the flips are counted on their own. f32: flips are
    // rare; when one happens it must be a near tie, and it is replayed the same way.
    let routes = if error.is_none() { dir.as_deref().map(|d| read_routes(d, world)).transpose()? } else { None };
    let flips = match &routes {
        Some(r) => Some(count_flips(&one, r)?),
        None => None,
    };
    let flipped = flips.as_ref().is_some_and(|f| f.differ > 0);
    let replay = if bf16 || flipped { routes } else { None };
    let route_flips = flips.as_ref().filter(|_| bf16 || flipped).map(|f| (f.differ, f.total));
    let mut training_skipped = None;
    if let (false, true, Some(f)) = (bf16, flipped, &flips) {
        items.push(Compared { name: "grad pass routing flips (probability gap at the flip)".into(), rel_err: f.max_gap, passed: f.max_gap <= F32_TIE });
        training_skipped = Some(format!(
            "{} of {} routing choices flipped at near ties (probability gap up to {:.1e}), so the training steps' trajectories differ; rerun with another run.seed to compare them",
            f.differ, f.total, f.max_gap
        ));
    }
    let (plan, cpu_rt, cpu_steps) = cpu_run(&one, true, replay, opts.buffers)?;
    compare_steps(&cpu_steps, &cuda_steps, "grad pass", tol, true, &mut items);
    if let Some(dir) = &dir {
        for r in 0..world {
            let path = dir.join(format!("params-rank{r}.json"));
            let dumped: BTreeMap<String, Vec<f32>> = match std::fs::read_to_string(&path) {
                Ok(s) => serde_json::from_str(&s).map_err(|source| CrossCheckError::Json { path: path.clone(), source })?,
                Err(e) => {
                    error.get_or_insert(format!("{}: {e}", path.display()));
                    BTreeMap::new()
                }
            };
            let rp = &plan.ranks[r];
            for name in rp.params.iter().filter_map(|p| p.grad).map(|b| rp.buffer(b).name.clone()) {
                let want = cpu_rt.read(r, &name).unwrap_or_default();
                let rel = dumped.get(&name).map_or(f64::NAN, |got| rel_err(got, &want));
                items.push(Compared { name: format!("rank {r} {name}"), rel_err: rel, passed: rel <= tol });
            }
        }
    }
    let buffers = match (&dir, opts.buffers && error.is_none()) {
        (Some(d), true) => Some(compare_buffers(&plan, &cpu_rt, d)),
        _ => None,
    };
    // f32: every op's output agrees too, an op-level check on the plan's own (fresh-seed)
    // inputs; routing-sized buffers, whose padding rows may differ, are left out. bf16
    // roundings compound along the pass, so there the buffers stay diagnostics.
    if let (false, Some(b)) = (bf16, &buffers) {
        let checked: Vec<_> = b.buffers.iter().filter(|x| !x.dynamic && !matches!(x.diff, buffers::Diff::Missing { .. })).collect();
        let apart: Vec<_> = checked.iter().filter(|x| x.diverged(tol)).collect();
        let worst = checked.iter().filter_map(|x| x.rel_err()).fold(0.0, |a: f64, e| if e.is_nan() || a.is_nan() { f64::NAN } else { a.max(e) });
        let first = apart.first().map(|x| format!(", first apart: rank {} {} <- {}", x.rank, x.name, x.op)).unwrap_or_default();
        items.push(Compared { name: format!("grad pass: every op's output ({} buffers, {} apart{first})", checked.len(), apart.len()), rel_err: worst, passed: apart.is_empty() });
    }
    drop(cpu_rt);
    let (cpu_full, cuda_full) = if training_skipped.is_none() {
        let (_, _, cpu_full) = cpu_run(spec, false, None, false)?;
        let (_, cuda_full) = cuda_run(spec, runs_root, false, false, &mut error);
        (cpu_full, cuda_full)
    } else {
        (Vec::new(), Vec::new())
    };
    // Drop counts over the training steps are compared for f32 plans; a bf16 run's own
    // choices may flip near ties (the grad pass replays them and counts the flips).
    compare_steps(&cpu_full, &cuda_full, "training", tol, !bf16, &mut items);
    let complete = cuda_steps.len() == cpu_steps.len() && cuda_full.len() == cpu_full.len();
    let worst = items.iter().map(|i| i.rel_err).fold(0.0, |a: f64, b| if b.is_nan() || a.is_nan() { f64::NAN } else { a.max(b) });
    let passed = error.is_none() && complete && !items.is_empty() && items.iter().all(|i| i.passed);
    Ok(CrossCheck { name: spec.name.clone(), variant: spec.variant.as_str().into(), world, items, worst, passed, error, route_flips, training_skipped, buffers })
}

/// The grad pass's transient buffers: the cpu runtime's against the cuda workers' dumps in
/// `dir` (a rank whose dump cannot be read shows its buffers missing on cuda).
fn compare_buffers(plan: &Plan, cpu: &CpuRuntime, dir: &Path) -> buffers::BufferReport {
    let mut problems = Vec::new();
    let cuda: Vec<HashMap<String, Data>> = (0..plan.world())
        .map(|r| match dump::read(dir, r) {
            Ok(v) => v.into_iter().collect(),
            Err(e) => {
                problems.push(e.to_string());
                HashMap::new()
            }
        })
        .collect();
    let read = |r: usize, d: &crate::plan::BufferDesc| match d.elem {
        ElemType::F32 => cpu.read(r, &d.name).map(Data::F32),
        ElemType::I32 => cpu.read_i32(r, &d.name).map(Data::I32),
    };
    let mut report = buffers::compare(plan, &read, &cuda);
    report.problems = problems;
    report
}

/// Every rank's routing choices from a cuda run directory (`routes-rank{r}.json`).
fn read_routes(dir: &Path, world: usize) -> Result<Routes, CrossCheckError> {
    let mut out = HashMap::new();
    for r in 0..world {
        let path = dir.join(format!("routes-rank{r}.json"));
        let text = std::fs::read_to_string(&path).map_err(|source| CrossCheckError::Read { path: path.clone(), source })?;
        let m: BTreeMap<String, Vec<i32>> = serde_json::from_str(&text).map_err(|source| CrossCheckError::Json { path: path.clone(), source })?;
        out.extend(m.into_iter().map(|(name, v)| ((r as u32, name), v)));
    }
    Ok(Arc::new(out))
}

/// The cuda run's routing choices against the cpu's own in the grad-pass step.
struct Flips {
    /// Choices that differ.
    differ: usize,
    /// All choices.
    total: usize,
    /// The largest gap, over the differing choices, between the cpu router's probability of
    /// its own expert and of cuda's (infinite for a choice the cpu's router does not know).
    max_gap: f64,
}

/// How many of `routes`' choices differ from the cpu's own in the grad-pass step, and how
/// far from a tie the cpu's router was at each. The cpu runs with cuda's choices replayed, so
/// every router sees the inputs cuda's did (a flip in layer 0 would otherwise change layer
/// 1's inputs and count its choices as flips too); each router's own choice is then its top-k
/// of the probabilities it computed, held against cuda's position by position.
fn count_flips(spec: &ExperimentSpec, routes: &Routes) -> Result<Flips, CrossCheckError> {
    let mut cpu_spec = spec.clone();
    cpu_spec.run.backend = BackendKind::Cpu;
    let plan = Plan::build(&cpu_spec)?;
    // Each routing choice's router: (rank, idx name) -> (probs name, experts, k).
    let mut routers = HashMap::new();
    for rp in &plan.ranks {
        for op in &rp.ops {
            if let crate::plan::OpKind::Route { probs, idx, n_experts, top_k, .. } = &op.kind {
                routers.insert((rp.rank, rp.buffer(*idx).name.clone()), (rp.buffer(*probs).name.clone(), *n_experts, *top_k));
            }
        }
    }
    // A choice that is no expert of its router is no tie, and cannot be replayed.
    let outside: usize = routes.iter().map(|((r, name), v)| {
        let e = routers.get(&(*r, name.clone())).map_or(0, |x| x.1);
        v.iter().filter(|&&c| c < 0 || c as usize >= e).count()
    }).sum();
    if outside > 0 {
        return Ok(Flips { differ: outside, total: routes.values().map(Vec::len).sum(), max_gap: f64::INFINITY });
    }
    let retain: Vec<String> = routers.values().map(|(p, _, _)| p.clone()).collect();
    let mut rt = CpuRuntime::new(plan, ExecOptions { skip_optimizer: true, retain, replay_routes: Some(routes.clone()), ..Default::default() });
    rt.step(true, None)?;
    let mut f = Flips { differ: 0, total: 0, max_gap: 0.0 };
    for ((r, name), theirs) in routes.iter() {
        f.total += theirs.len();
        let Some((probs, e, k)) = routers.get(&(*r, name.clone())).and_then(|(p, e, k)| Some((rt.read(*r as usize, p)?, *e, *k))) else {
            // A choice no cpu router made cannot be a near tie.
            f.differ += theirs.len();
            f.max_gap = f64::INFINITY;
            continue;
        };
        if k == 0 || e == 0 || probs.len() / e != theirs.len() / k {
            f.differ += theirs.len();
            f.max_gap = f64::INFINITY;
            continue;
        }
        // The cpu router's own top-k of the probabilities it computed (the cpu's own rule).
        let (mut mine, mut w) = (vec![0i32; theirs.len()], vec![0f32; theirs.len()]);
        crate::math::routing::top_k(&probs, e, k, false, &mut mine, &mut w);
        for (i, (&c, &m)) in theirs.iter().zip(&mine).enumerate().filter(|(_, (c, m))| c != m) {
            f.differ += 1;
            let p = &probs[i / k * e..(i / k + 1) * e];
            let gap = usize::try_from(c).ok().filter(|c| *c < e).map_or(f64::INFINITY, |c| (p[m as usize] - p[c]).abs() as f64);
            f.max_gap = f.max_gap.max(gap);
        }
    }
    Ok(f)
}

/// Routing choices by (rank, `idx` buffer name).
type Routes = Arc<HashMap<(u32, String), Vec<i32>>>;

/// Runs `spec` on the cpu; `keep_transient` keeps every non-persistent buffer to the end.
fn cpu_run(spec: &ExperimentSpec, skip_optimizer: bool, replay: Option<Routes>, keep_transient: bool) -> Result<(Plan, CpuRuntime, Vec<StepReport>), CrossCheckError> {
    let mut cpu_spec = spec.clone();
    cpu_spec.run.backend = BackendKind::Cpu;
    // bf16 plans: the cpu rounds what bf16 buffers store (math::bf16), so both sides round
    // where values are stored, and, inside an op, where the GPU stores bf16 on the way (a
    // GEMM's product before its bias, attention probabilities before the context, score
    // gradients before dq/dk: cpu::exec::OpCtx::stored_bf16).
    let plan = Plan::build(&cpu_spec)?;
    let retain = if keep_transient { buffers::transient_names(&plan) } else { Vec::new() };
    let mut rt = CpuRuntime::new(plan.clone(), ExecOptions { skip_optimizer, replay_routes: replay, retain, ..Default::default() });
    let mut steps = Vec::new();
    for i in 0..spec.run.warmup + spec.run.steps {
        steps.push(rt.step(i >= spec.run.warmup, None)?);
    }
    Ok((plan, rt, steps))
}

fn cuda_run(spec: &ExperimentSpec, runs_root: &Path, skip_optimizer: bool, dump_buffers: bool, error: &mut Option<String>) -> (Option<std::path::PathBuf>, Vec<StepReport>) {
    let mut cuda_spec = spec.clone();
    cuda_spec.run.backend = BackendKind::Cuda;
    let exec = ExecOptions { skip_optimizer, dump_params: true, dump_buffers, ..Default::default() };
    let hooks = RunHooks { exec, ..Default::default() };
    match run(&cuda_spec, runs_root, &hooks) {
        Ok(o) => (Some(o.dir), o.steps),
        Err(e) => {
            error.get_or_insert(e.to_string());
            (None, Vec::new())
        }
    }
}

fn compare_steps(cpu: &[StepReport], cuda: &[StepReport], pass: &str, tol: f64, drops: bool, items: &mut Vec<Compared>) {
    for (c, g) in cpu.iter().zip(cuda) {
        let pairs = [("loss", g.loss, c.loss), ("aux", g.aux_loss, c.aux_loss), ("dropped", g.dropped as f64, c.dropped as f64)];
        for (what, got, want) in pairs.into_iter().filter(|p| drops || p.0 != "dropped") {
            let rel = rel_err(&[got as f32], &[want as f32]);
            // Drops are counts decided by the same routing (bf16: the cpu replays cuda's
            // choices), so they must agree exactly: 150 against 151 is a capacity bug.
            let passed = if what == "dropped" { got == want } else { rel <= tol };
            items.push(Compared { name: format!("{pass} step {} {what}", c.step), rel_err: rel, passed });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC: &str = "name = \"x\"\n[model]\nd_model = 16\nd_ffn = 16\nn_experts = 4\ntop_k = 2\ntokens_per_rank = 32\nn_layers = 1\n[run]\nbackend = \"cpu\"\nsteps = 1\nwarmup = 0\n";

    #[test]
    fn a_flip_is_measured_by_the_cpu_routers_probability_gap() {
        let spec = crate::spec::from_toml_str(SPEC).expect("spec");
        let plan = Plan::build(&spec).expect("plan");
        let route = plan.ranks[0].ops.iter().find_map(|o| match &o.kind {
            crate::plan::OpKind::Route { probs, idx, .. } => Some((plan.ranks[0].buffer(*probs).name.clone(), plan.ranks[0].buffer(*idx).name.clone())),
            _ => None,
        });
        let (probs, idx) = route.expect("a router");
        let mut rt = CpuRuntime::new(plan, ExecOptions { skip_optimizer: true, retain: vec![probs.clone(), idx.clone()], ..Default::default() });
        rt.step(true, None).expect("step");
        let (p, mine) = (rt.read(0, &probs).expect("probs"), rt.read_i32(0, &idx).expect("idx"));
        let routes = |v: Vec<i32>| -> Routes { Arc::new(HashMap::from([((0u32, idx.clone()), v)])) };
        let same = count_flips(&spec, &routes(mine.clone())).expect("flips");
        assert_eq!((same.differ, same.total, same.max_gap), (0, mine.len(), 0.0));
        // Token 0's second choice swapped for an expert it did not pick: a gap of their
        // probabilities, far from a tie.
        let mut other = mine.clone();
        let unused = (0..4).find(|e| !mine[..2].contains(e)).expect("an unpicked expert");
        other[1] = unused;
        let f = count_flips(&spec, &routes(other)).expect("flips");
        let want = (p[mine[1] as usize] - p[unused as usize]) as f64;
        assert_eq!(f.differ, 1);
        assert!((f.max_gap - want.abs()).abs() < 1e-7 && f.max_gap > F32_TIE, "{} vs {want}", f.max_gap);
        // A choice outside the router's experts is no tie at all.
        let mut bad = mine;
        bad[0] = 99;
        assert!(count_flips(&spec, &routes(bad)).expect("flips").max_gap.is_infinite());
    }
}

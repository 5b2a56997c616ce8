//! Backend cross-check: one experiment on the cpu reference and on the cuda backend, then
//! every step's loss, aux loss and drop count, and every rank's final parameters and
//! gradients, compared with `||cuda - cpu|| / ||cpu||` (NaN never passes), held to
//! [`F32_TOL`] or, for `model.dtype = "bf16"` (both in bf16: the cpu computes in f32 and
//! rounds every value a bf16 buffer stores, as the GPU does), [`BF16_TOL`]. The cuda side
//! runs through the real launcher (one worker process per GPU), which dumps the tensors
//! into its run directory when `MOELAB_DUMP_PARAMS` is set.

use super::{run, RunHooks};
use crate::backend::cpu::CpuRuntime;
use crate::backend::{ExecOptions, StepReport};
use crate::plan::Plan;
use crate::spec::{BackendKind, DType, ExperimentSpec};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;

/// Relative tolerance for f32 plans.
pub const F32_TOL: f64 = 1e-4;
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
pub fn crosscheck(spec: &ExperimentSpec, runs_root: &Path) -> anyhow::Result<CrossCheck> {
    let tol = tolerance(spec);
    let mut items = Vec::new();
    let mut error = None;
    let mut one = spec.clone();
    one.run.warmup = 0;
    one.run.steps = 1;
    let world = spec.world();
    let (plan, cpu_rt, cpu_steps) = cpu_run(&one, true)?;
    let (dir, cuda_steps) = cuda_run(&one, runs_root, true, &mut error);
    compare_steps(&cpu_steps, &cuda_steps, "grad pass", tol, &mut items);
    if let Some(dir) = &dir {
        for r in 0..world {
            let path = dir.join(format!("params-rank{r}.json"));
            let dumped: BTreeMap<String, Vec<f32>> = match std::fs::read_to_string(&path) {
                Ok(s) => serde_json::from_str(&s)?,
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
    let (_, _, cpu_full) = cpu_run(spec, false)?;
    let (_, cuda_full) = cuda_run(spec, runs_root, false, &mut error);
    compare_steps(&cpu_full, &cuda_full, "training", tol, &mut items);
    let complete = cuda_steps.len() == cpu_steps.len() && cuda_full.len() == cpu_full.len();
    let worst = items.iter().map(|i| i.rel_err).fold(0.0, |a: f64, b| if b.is_nan() || a.is_nan() { f64::NAN } else { a.max(b) });
    let passed = error.is_none() && complete && !items.is_empty() && items.iter().all(|i| i.passed);
    Ok(CrossCheck { name: spec.name.clone(), variant: spec.variant.as_str().into(), world, items, worst, passed, error })
}

fn cpu_run(spec: &ExperimentSpec, skip_optimizer: bool) -> anyhow::Result<(Plan, CpuRuntime, Vec<StepReport>)> {
    let mut cpu_spec = spec.clone();
    cpu_spec.run.backend = BackendKind::Cpu;
    // bf16 plans: the cpu rounds what bf16 buffers store (math::bf16), so both sides round
    // at the same places and the comparison measures the executor, not bf16 itself.
    let plan = Plan::build(&cpu_spec)?;
    let mut rt = CpuRuntime::new(plan.clone(), ExecOptions { skip_optimizer, ..Default::default() });
    let mut steps = Vec::new();
    for i in 0..spec.run.warmup + spec.run.steps {
        steps.push(rt.step(i >= spec.run.warmup, None)?);
    }
    Ok((plan, rt, steps))
}

fn cuda_run(spec: &ExperimentSpec, runs_root: &Path, skip_optimizer: bool, error: &mut Option<String>) -> (Option<std::path::PathBuf>, Vec<StepReport>) {
    let mut cuda_spec = spec.clone();
    cuda_spec.run.backend = BackendKind::Cuda;
    std::env::set_var("MOELAB_DUMP_PARAMS", "1");
    let hooks = RunHooks { exec: ExecOptions { skip_optimizer, ..Default::default() }, ..Default::default() };
    match run(&cuda_spec, runs_root, &hooks) {
        Ok(o) => (Some(o.dir), o.steps),
        Err(e) => {
            error.get_or_insert(e.to_string());
            (None, Vec::new())
        }
    }
}

fn compare_steps(cpu: &[StepReport], cuda: &[StepReport], pass: &str, tol: f64, items: &mut Vec<Compared>) {
    for (c, g) in cpu.iter().zip(cuda) {
        let pairs = [("loss", g.loss, c.loss), ("aux", g.aux_loss, c.aux_loss), ("dropped", g.dropped as f64, c.dropped as f64)];
        for (what, got, want) in pairs {
            let rel = rel_err(&[got as f32], &[want as f32]);
            items.push(Compared { name: format!("{pass} step {} {what}", c.step), rel_err: rel, passed: rel <= tol });
        }
    }
}

//! MPMoE's automatic configuration (`[mpmoe] chunks = "auto"` and/or `reuse = "auto"`): a
//! performance model fitted on profiled op times picks the pipelining degree n and the
//! memory-reuse strategy, within an optional memory budget, and its prediction is reported
//! next to the measurement.
//!
//! 1. [`Setup::new`] (before the run directory exists): build the plan of every candidate
//!    (n in {1, 2, 4, 8} up to `tokens_per_rank`, or the fixed n; every strategy, or the
//!    fixed one) and its predicted peak memory per rank (exact, from the plan). When a budget
//!    is set and no candidate fits, the run is refused with [`crate::run::RunError::Choice`].
//! 2. [`Setup::profile`]: run two profiling configurations on the run's in-process backend
//!    (cpu, or the sim's predicted times; cuda runs are refused at step 1) (the smallest
//!    n with the lightest strategy and the largest n with the heaviest, so that every op class
//!    is seen at two chunk sizes), each in a fresh runtime for one untimed and
//!    [`PROFILE_STEPS`] traced steps; fit [`model::CostModel`] on the traced op times,
//!    calibrate its step overhead on the two measured step times, predict every candidate's
//!    step time, and keep the fastest predicted one that fits the budget (ties: fewer chunks,
//!    then less memory).
//! 3. The measured steps run the chosen configuration from the same initial weights;
//!    [`MpmoeAuto::record_measurement`] puts its mean step time next to the prediction.
//!
//! `run.log` gets the fitted cost laws and one line per candidate; `summary.json` gets
//! [`MpmoeAuto`] as `mpmoe_auto`.

pub mod model;

use crate::backend::{BackendError, StepReport};
use crate::plan::memory::predict;
use crate::plan::Plan;
use crate::spec::{Degree, ExperimentSpec, MpmoeSpec, Reuse, Variant};
use model::{ChunkStages, CostModel, OpClass, Sample, StageCost};
use serde::Serialize;
use std::collections::HashMap;

use super::{RunError, RunHooks, RunLog};

/// Chunk counts `chunks = "auto"` considers (those up to `tokens_per_rank`); MPMoE's own
/// search tries 2 to 8.
pub const CHUNK_CANDIDATES: [usize; 4] = [1, 2, 4, 8];

/// Traced steps per profiling configuration (after one untimed step).
pub const PROFILE_STEPS: usize = 2;

/// One configuration the model predicted.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Candidate {
    /// Pipelining degree n.
    pub chunks: usize,
    /// Memory-reuse strategy.
    pub reuse: Reuse,
    /// Predicted peak memory of the most loaded rank, bytes (exact for static capacity, an
    /// upper bound when dropless).
    pub peak_bytes: u64,
    /// Whether the peak is within the budget (always true without one).
    pub fits_budget: bool,
    /// Predicted step time, seconds (0 until profiled).
    pub predicted_s: f64,
    /// Measured mean step time, seconds, when this configuration was run (a profiling
    /// configuration, or the chosen one in the measured steps).
    pub measured_s: Option<f64>,
    /// Whether it was one of the profiling configurations.
    pub profiled: bool,
}

/// How `chunks`/`reuse` = `"auto"` were resolved: the fitted model, every candidate's
/// prediction, and the choice.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MpmoeAuto {
    /// Chosen pipelining degree.
    pub chosen_chunks: usize,
    /// Chosen strategy.
    pub chosen_reuse: Reuse,
    /// Predicted step time of the choice, seconds.
    pub chosen_predicted_s: f64,
    /// Mean measured step time of the choice in the measured steps, seconds.
    pub chosen_measured_s: Option<f64>,
    /// The memory budget, MiB, if any.
    pub memory_budget_mib: Option<f64>,
    /// Every candidate, in (reuse, chunks) order.
    pub candidates: Vec<Candidate>,
    /// The fitted cost laws.
    pub costs: Vec<StageCost>,
    /// Calibrated per-step overhead, seconds.
    pub step_overhead_s: f64,
    /// The chosen plan's per-chunk stage times (t_S, t_C, t_R, fixed overhead) on rank 0.
    pub chosen_stages: Option<ChunkStages>,
    /// Traced steps per profiling configuration.
    pub profile_steps: usize,
    /// Why this candidate: one sentence.
    pub reason: String,
}

/// Candidates and their plans, built before the run starts.
pub struct Setup {
    base: ExperimentSpec,
    opts: MpmoeSpec,
    entries: Vec<(Candidate, ExperimentSpec, Plan)>,
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

/// The spec with a fixed (chunks, reuse), without the budget that only limits an automatic
/// choice (so the run directory's `spec.toml` runs again unchanged).
fn fixed(spec: &ExperimentSpec, chunks: usize, reuse: Reuse) -> ExperimentSpec {
    let mut s = spec.clone();
    s.mpmoe = Some(MpmoeSpec { chunks: Degree::Fixed(chunks), reuse, memory_budget_mib: None });
    s
}

impl Setup {
    /// `None` unless the spec is MPMoE with `chunks` or `reuse` = `"auto"`. Builds every
    /// candidate's plan and predicted peak; refuses a budget that no candidate fits.
    pub fn new(spec: &ExperimentSpec) -> Result<Option<Setup>, RunError> {
        let Some(opts) = spec.mpmoe.filter(|o| spec.variant == Variant::Mpmoe && (o.chunks == Degree::Auto || o.reuse == Reuse::Auto)) else {
            return Ok(None);
        };
        if spec.run.backend == crate::spec::BackendKind::Cuda {
            let field = if opts.chunks == Degree::Auto { "mpmoe.chunks" } else { "mpmoe.reuse" };
            return Err(RunError::Choice {
                field: field.into(),
                message: "the performance model profiles its candidates in-process (cpu or sim backend); it cannot profile on the cuda backend yet".into(),
                fix: "run this spec once with backend = \"cpu\" (or \"sim\") and set the chosen chunks and reuse for the cuda run".into(),
            });
        }
        let chunks: Vec<usize> = match opts.chunks {
            Degree::Fixed(n) => vec![n],
            Degree::Auto => CHUNK_CANDIDATES.into_iter().filter(|n| *n <= spec.tokens_per_rank()).collect(),
        };
        let reuses: Vec<Reuse> = if opts.reuse == Reuse::Auto { Reuse::ALL.to_vec() } else { vec![opts.reuse] };
        let budget = opts.memory_budget_mib;
        let mut entries = Vec::new();
        for &reuse in &reuses {
            for &n in &chunks {
                let s = fixed(spec, n, reuse);
                let plan = Plan::build(&s)?;
                let peak_bytes = plan.ranks.iter().map(|rp| predict(rp).peak_total).max().unwrap_or(0);
                let fits_budget = budget.is_none_or(|b| mib(peak_bytes) <= b);
                let c = Candidate { chunks: n, reuse, peak_bytes, fits_budget, predicted_s: 0.0, measured_s: None, profiled: false };
                entries.push((c, s, plan));
            }
        }
        if let Some(b) = budget {
            if !entries.iter().any(|e| e.0.fits_budget) {
                let least = entries.iter().min_by_key(|e| e.0.peak_bytes).map(|e| &e.0).expect("at least one candidate");
                return Err(RunError::Choice {
                    field: "mpmoe.memory_budget_mib".into(),
                    message: format!(
                        "memory_budget_mib={b} is below every candidate's predicted peak per rank; the smallest is {:.2} MiB (chunks={}, reuse={})",
                        mib(least.peak_bytes), least.chunks, least.reuse.as_str()
                    ),
                    fix: format!(
                        "raise memory_budget_mib to at least {:.2}{}, or remove it",
                        mib(least.peak_bytes),
                        match (opts.chunks, opts.reuse) {
                            (Degree::Fixed(_), Reuse::Auto) => ", allow more chunk counts (chunks = \"auto\")",
                            (Degree::Auto, r) if r != Reuse::Auto => ", allow the memory-reuse strategies (reuse = \"auto\")",
                            _ => "",
                        }
                    ),
                });
            }
        }
        Ok(Some(Setup { base: spec.clone(), opts, entries }))
    }

    /// Profile, fit, predict and choose (see the module docs). Returns the spec with the
    /// chosen (chunks, reuse) fixed and the record of the choice.
    /// Each profiled configuration is also pushed on `timed` as it finishes.
    pub fn profile(mut self, hooks: &RunHooks, log: &mut RunLog, timed: &mut Vec<super::AutoTrial>) -> Result<(ExperimentSpec, MpmoeAuto), BackendError> {
        let n_min = self.entries.iter().map(|e| e.0.chunks).min().expect("candidates");
        let n_max = self.entries.iter().map(|e| e.0.chunks).max().expect("candidates");
        let reuses: Vec<Reuse> = {
            let mut r: Vec<Reuse> = self.entries.iter().map(|e| e.0.reuse).collect();
            r.dedup();
            r
        };
        let (light, heavy) = (reuses[0], *reuses.last().expect("a strategy"));
        let mut configs = vec![(n_min, light), (n_max, heavy)];
        configs.dedup();
        log.line(&format!(
            "mpmoe auto: {} candidates (chunks {:?} x reuse {:?}); profiling {} configurations for {PROFILE_STEPS} traced steps each",
            self.entries.len(),
            { let mut c: Vec<usize> = self.entries.iter().map(|e| e.0.chunks).collect(); c.sort(); c.dedup(); c },
            reuses.iter().map(|r| r.as_str()).collect::<Vec<_>>(),
            configs.len()
        ));
        let mut samples = Vec::new();
        let mut measured: Vec<(usize, f64)> = Vec::new();
        for (n, reuse) in configs {
            let i = self.entries.iter().position(|e| e.0.chunks == n && e.0.reuse == reuse).expect("profiled config is a candidate");
            let plan = self.entries[i].2.clone();
            let (mean, s) = profile_plan(plan, hooks)?;
            log.line(&format!("mpmoe auto: profiled chunks={n} reuse={}: {:.3} ms per step, {} op samples", reuse.as_str(), mean * 1e3, s.len()));
            timed.push(super::AutoTrial { config: format!("mpmoe chunks={n} reuse={}", reuse.as_str()), step_ms: mean * 1e3 });
            samples.extend(s);
            self.entries[i].0.measured_s = Some(mean);
            self.entries[i].0.profiled = true;
            measured.push((i, mean));
        }
        let mut model = CostModel::fit(&samples);
        let pairs: Vec<(&Plan, f64)> = measured.iter().map(|(i, m)| (&self.entries[*i].2, *m)).collect();
        model.calibrate(&pairs);
        for law in &model.costs {
            log.line(&format!("mpmoe auto: cost {}", describe_law(law)));
        }
        log.line(&format!("mpmoe auto: step overhead {:.3} ms (measured minus simulated, mean over the profiled configurations)", model.step_overhead_s * 1e3));
        for e in &mut self.entries {
            e.0.predicted_s = model.predict_step(&e.2);
        }
        let best = choose(&self.entries.iter().map(|e| e.0.clone()).collect::<Vec<_>>()).expect("Setup::new ensured a candidate fits");
        let chosen = self.entries[best].0.clone();
        let reason = reason(&chosen, &self.entries.iter().map(|e| e.0.clone()).collect::<Vec<_>>(), self.opts.memory_budget_mib);
        let stages = model.chunk_stages(&self.entries[best].2.ranks[0]);
        let auto = MpmoeAuto {
            chosen_chunks: chosen.chunks,
            chosen_reuse: chosen.reuse,
            chosen_predicted_s: chosen.predicted_s,
            chosen_measured_s: None,
            memory_budget_mib: self.opts.memory_budget_mib,
            candidates: self.entries.iter().map(|e| e.0.clone()).collect(),
            costs: model.costs.clone(),
            step_overhead_s: model.step_overhead_s,
            chosen_stages: stages,
            profile_steps: PROFILE_STEPS,
            reason,
        };
        for line in auto.render_text().lines() {
            log.line(&format!("mpmoe auto: {line}"));
        }
        Ok((fixed(&self.base, chosen.chunks, chosen.reuse), auto))
    }
}

/// Run a plan for one untimed and [`PROFILE_STEPS`] traced steps in a fresh runtime of the
/// run's backend: mean step seconds and one sample per traced op.
fn profile_plan(plan: Plan, hooks: &RunHooks) -> Result<(f64, Vec<Sample>), BackendError> {
    let index: Vec<HashMap<String, usize>> =
        plan.ranks.iter().map(|rp| rp.ops.iter().enumerate().map(|(i, o)| (o.name.clone(), i)).collect()).collect();
    let mut rt = crate::backend::runtime(plan.clone(), hooks.exec.clone());
    rt.step(false, Some(0))?;
    let mut total = 0.0;
    for i in 0..PROFILE_STEPS {
        total += rt.step(true, Some(1 + i as u64))?.wall_s;
    }
    let samples = rt
        .trace()
        .ops
        .iter()
        .filter_map(|ev| {
            let rp = &plan.ranks[ev.rank as usize];
            let op = &rp.ops[*index[ev.rank as usize].get(&ev.name)?];
            let (class, work) = OpClass::of(op);
            Some(Sample { class, work, seconds: ev.dur_ns() as f64 * 1e-9 })
        })
        .collect();
    Ok((total / PROFILE_STEPS as f64, samples))
}

/// The fastest predicted candidate within the budget; ties go to fewer chunks, then less
/// memory. `None` when none fits.
pub fn choose(candidates: &[Candidate]) -> Option<usize> {
    candidates
        .iter()
        .enumerate()
        .filter(|(_, c)| c.fits_budget)
        .min_by(|(_, a), (_, b)| {
            a.predicted_s.total_cmp(&b.predicted_s).then(a.chunks.cmp(&b.chunks)).then(a.peak_bytes.cmp(&b.peak_bytes))
        })
        .map(|(i, _)| i)
}

fn reason(chosen: &Candidate, all: &[Candidate], budget: Option<f64>) -> String {
    let excluded = all.iter().filter(|c| !c.fits_budget).count();
    let faster_excluded = all.iter().filter(|c| !c.fits_budget && c.predicted_s < chosen.predicted_s).count();
    let mut s = format!(
        "chunks={} reuse={} has the lowest predicted step time ({:.3} ms)",
        chosen.chunks, chosen.reuse.as_str(), chosen.predicted_s * 1e3
    );
    if let Some(b) = budget {
        s.push_str(&format!(
            " among the {} of {} candidates whose predicted peak fits memory_budget_mib={b} ({faster_excluded} faster ones do not fit)",
            all.len() - excluded, all.len()
        ));
    } else {
        s.push_str(&format!(" of {} candidates (no memory budget)", all.len()));
    }
    s
}

fn describe_law(l: &StageCost) -> String {
    let unit = match l.class.work {
        model::Work::Flops => format!("{:.3} ns/kFLOP", l.per_unit_s * 1e12),
        model::Work::Bytes => format!("{:.3} ns/kB", l.per_unit_s * 1e12),
    };
    format!(
        "{:?}/{:?}: {:.1} us per op + {unit} ({} samples, {} sizes)",
        l.class.stage, l.class.stream, l.fixed_s * 1e6, l.samples, l.sizes
    )
}

impl MpmoeAuto {
    /// Record the mean step time of the measured steps (which ran the chosen configuration)
    /// next to its prediction, and log it.
    pub fn record_measurement(&mut self, steps: &[StepReport], log: &mut RunLog) {
        let times: Vec<f64> = steps.iter().filter(|s| s.measured).map(|s| s.wall_s).collect();
        if times.is_empty() {
            return;
        }
        let mean = times.iter().sum::<f64>() / times.len() as f64;
        self.chosen_measured_s = Some(mean);
        let (n, r) = (self.chosen_chunks, self.chosen_reuse);
        if let Some(c) = self.candidates.iter_mut().find(|c| c.chunks == n && c.reuse == r) {
            c.measured_s = Some(mean);
        }
        log.line(&format!(
            "mpmoe auto: chunks={n} reuse={}: predicted {:.3} ms per step, measured {:.3} ms ({:+.1}%)",
            r.as_str(), self.chosen_predicted_s * 1e3, mean * 1e3, (self.chosen_predicted_s / mean - 1.0) * 100.0
        ));
    }

    /// The candidate table and the choice, as text.
    pub fn render_text(&self) -> String {
        let mut out = String::from("MPMoE performance model: candidates (predicted vs measured step time, predicted peak per rank)\n");
        out.push_str(&format!("{:>6} {:>14} {:>13} {:>13} {:>10} {:>8}\n", "chunks", "reuse", "predicted ms", "measured ms", "peak MiB", "budget"));
        for c in &self.candidates {
            let mark = if c.chunks == self.chosen_chunks && c.reuse == self.chosen_reuse { " <- chosen" } else if c.profiled { " (profiled)" } else { "" };
            out.push_str(&format!(
                "{:>6} {:>14} {:>13.3} {:>13} {:>10.2} {:>8}{mark}\n",
                c.chunks, c.reuse.as_str(), c.predicted_s * 1e3,
                c.measured_s.map_or("-".to_string(), |m| format!("{:.3}", m * 1e3)),
                mib(c.peak_bytes), if c.fits_budget { "ok" } else { "over" }
            ));
        }
        if let Some(st) = &self.chosen_stages {
            out.push_str(&format!(
                "chosen per-chunk stages (layer 0 forward, rank 0): dispatch a2a {:.3} ms, experts {:.3} ms, combine a2a {:.3} ms, fixed overhead {:.3} ms per chunk\n",
                st.dispatch_s * 1e3, st.expert_s * 1e3, st.combine_s * 1e3, st.fixed_per_chunk_s * 1e3
            ));
        }
        out.push_str(&format!("choice: {}", self.reason));
        if let Some(m) = self.chosen_measured_s {
            out.push_str(&format!("; measured {:.3} ms per step ({:+.1}% predicted vs measured)", m * 1e3, (self.chosen_predicted_s / m - 1.0) * 100.0));
        }
        out
    }
}

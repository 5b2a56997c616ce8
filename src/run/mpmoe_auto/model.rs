//! MPMoE's performance model: per-op linear cost laws fitted on profiled op times, and a
//! two-stream list schedule of a candidate plan that turns them into a predicted step time.
//!
//! Cost law. Every op belongs to a class (its stage and stream, and whether its work is
//! counted in FLOPs or in bytes) and costs `fixed_s + per_unit_s * work`. `fixed_s` is the
//! per-op overhead (launch, collective latency, synchronisation): the term that makes many
//! small chunks slower than a few large ones; `per_unit_s` is the inverse throughput. Both are
//! fitted by least squares on the op times of profiled steps of at least two configurations
//! with different chunk sizes, so each class is seen at two or more sizes.
//!
//! Schedule. MPMoE's pipeline time is the fill (chunk 0's dispatch all-to-all), the steady
//! state where each chunk slot costs the slower of its communication (the next chunk's
//! dispatch and the previous chunk's combine) and its expert compute, and the drain (the last
//! combine): about `t_S + (n-1)·max(t_S + t_R, t_C) + t_C + t_R` per layer and pass, plus each
//! strategy's restore cost in backward. Instead of the closed form, [`CostModel::simulate`]
//! replays the candidate plan itself: ops in issue order, each stream (compute, comm) running
//! its ops one at a time in that order, every op starting when its stream is free and its
//! dependencies have finished. This gives the closed form's fill, steady state and drain for
//! the chunked layers, and also counts everything the closed form leaves out (the rest of the
//! step, the re-communication and recomputation ops of each reuse strategy, the per-chunk
//! slicing and merging). A constant per-step overhead (what the op times do not cover: step
//! start, thread wake-ups, gaps between ops) is calibrated as the mean difference between the
//! measured and the simulated step time of the profiled configurations.
//!
//! Memory is not modelled here: the plan predicts each candidate's peak exactly
//! ([`crate::plan::memory::predict`]).

use crate::plan::{Op, Plan, RankPlan};
use crate::taxonomy::{Stage, Stream};
use serde::Serialize;

/// What an op's cost grows with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Work {
    /// Floating-point operations (GEMMs, activations, attention: ops whose plan counts FLOPs).
    Flops,
    /// Bytes moved (permutes, collectives, and ops whose plan counts no FLOPs).
    Bytes,
}

/// A class of ops that share one cost law.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct OpClass {
    /// What the op does.
    pub stage: Stage,
    /// Where it runs.
    pub stream: Stream,
    /// What its work is counted in.
    pub work: Work,
}

impl OpClass {
    /// The class of a plan op and its amount of work (FLOPs when the plan counts any, else
    /// bytes).
    pub fn of(op: &Op) -> (OpClass, f64) {
        let (work, amount) = if op.flops > 0 { (Work::Flops, op.flops as f64) } else { (Work::Bytes, op.bytes as f64) };
        (OpClass { stage: op.stage, stream: op.stream, work }, amount)
    }
}

/// One profiled op execution: its class, its work and how long it took.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// The op's class.
    pub class: OpClass,
    /// FLOPs or bytes, as the class says.
    pub work: f64,
    /// Measured duration in seconds.
    pub seconds: f64,
}

/// The fitted cost law of one class: `seconds = fixed_s + per_unit_s * work`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct StageCost {
    /// The class.
    pub class: OpClass,
    /// Per-op overhead in seconds (>= 0).
    pub fixed_s: f64,
    /// Seconds per FLOP or per byte (>= 0).
    pub per_unit_s: f64,
    /// Samples the fit used.
    pub samples: usize,
    /// Distinct work sizes among them; with one, `fixed_s` and `per_unit_s` cannot be told
    /// apart and the whole time is put on `per_unit_s` (or on `fixed_s` when the work is 0).
    pub sizes: usize,
}

impl StageCost {
    /// Predicted seconds for `work`.
    pub fn seconds(&self, work: f64) -> f64 {
        self.fixed_s + self.per_unit_s * work
    }
}

/// Least squares of `y = a + b x` with a, b >= 0 (a constrained fit when the free one gives
/// a negative coefficient).
fn fit_line(points: &[(f64, f64)]) -> (f64, f64, usize) {
    let n = points.len() as f64;
    let mut xs: Vec<f64> = points.iter().map(|p| p.0).collect();
    xs.sort_by(f64::total_cmp);
    xs.dedup_by(|a, b| (*a - *b).abs() <= 1e-9 * b.abs().max(1.0));
    let sizes = xs.len();
    let mean_x = points.iter().map(|p| p.0).sum::<f64>() / n;
    let mean_y = points.iter().map(|p| p.1).sum::<f64>() / n;
    let through_origin = || {
        let sxx: f64 = points.iter().map(|p| p.0 * p.0).sum();
        let sxy: f64 = points.iter().map(|p| p.0 * p.1).sum();
        if sxx > 0.0 { (0.0, (sxy / sxx).max(0.0)) } else { (mean_y.max(0.0), 0.0) }
    };
    if sizes < 2 {
        let (a, b) = through_origin();
        return (a, b, sizes);
    }
    let sxx: f64 = points.iter().map(|p| (p.0 - mean_x).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mean_x) * (p.1 - mean_y)).sum();
    let b = sxy / sxx;
    let a = mean_y - b * mean_x;
    let (a, b) = if b < 0.0 {
        (mean_y.max(0.0), 0.0)
    } else if a < 0.0 {
        through_origin()
    } else {
        (a, b)
    };
    (a, b, sizes)
}

/// Cost laws for every profiled class and the per-step overhead.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CostModel {
    /// One law per class seen in the profile, sorted by class.
    pub costs: Vec<StageCost>,
    /// Seconds added to every simulated step (calibrated; 0 until [`CostModel::calibrate`]).
    pub step_overhead_s: f64,
}

/// The result of replaying one rank's plan with a cost model.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Schedule {
    /// When the last op ends (seconds from the step's start).
    pub makespan_s: f64,
    /// Busy seconds of the compute stream.
    pub compute_s: f64,
    /// Busy seconds of the comm stream.
    pub comm_s: f64,
    /// Ops whose class the profile never saw (costed 0).
    pub unmodelled_ops: usize,
}

impl CostModel {
    /// Fit one cost law per class from profiled samples.
    pub fn fit(samples: &[Sample]) -> CostModel {
        let mut classes: Vec<OpClass> = samples.iter().map(|s| s.class).collect();
        classes.sort();
        classes.dedup();
        let costs = classes
            .into_iter()
            .map(|class| {
                let pts: Vec<(f64, f64)> = samples.iter().filter(|s| s.class == class).map(|s| (s.work, s.seconds)).collect();
                let (fixed_s, per_unit_s, sizes) = fit_line(&pts);
                StageCost { class, fixed_s, per_unit_s, samples: pts.len(), sizes }
            })
            .collect();
        CostModel { costs, step_overhead_s: 0.0 }
    }

    /// The law of a class, if the profile saw it.
    pub fn law(&self, class: OpClass) -> Option<&StageCost> {
        self.costs.iter().find(|c| c.class == class)
    }

    /// Predicted seconds of one op; `None` when its class was never profiled.
    pub fn op_seconds(&self, op: &Op) -> Option<f64> {
        let (class, work) = OpClass::of(op);
        self.law(class).map(|l| l.seconds(work))
    }

    /// Replay one rank's ops: issue order per stream, each op starting when its stream is free
    /// and its dependencies have finished (the executor's rules), with modelled durations.
    pub fn simulate(&self, rp: &RankPlan) -> Schedule {
        let mut end = vec![0.0f64; rp.ops.len()];
        let (mut compute_free, mut comm_free) = (0.0f64, 0.0f64);
        let (mut compute_s, mut comm_s, mut unmodelled) = (0.0, 0.0, 0);
        for op in &rp.ops {
            let dur = self.op_seconds(op).unwrap_or_else(|| {
                unmodelled += 1;
                0.0
            });
            let ready = op.deps.iter().map(|d| end[d.0 as usize]).fold(0.0, f64::max);
            let free = match op.stream {
                Stream::Compute => &mut compute_free,
                Stream::Comm => &mut comm_free,
            };
            let start = ready.max(*free);
            *free = start + dur;
            end[op.id.0 as usize] = start + dur;
            match op.stream {
                Stream::Compute => compute_s += dur,
                Stream::Comm => comm_s += dur,
            }
        }
        Schedule { makespan_s: end.iter().copied().fold(0.0, f64::max), compute_s, comm_s, unmodelled_ops: unmodelled }
    }

    /// Predicted step time of a plan: the slowest rank's simulated makespan plus the step
    /// overhead.
    pub fn predict_step(&self, plan: &Plan) -> f64 {
        self.simulated_step(plan) + self.step_overhead_s
    }

    /// The slowest rank's simulated makespan, without the step overhead.
    pub fn simulated_step(&self, plan: &Plan) -> f64 {
        plan.ranks.iter().map(|rp| self.simulate(rp).makespan_s).fold(0.0, f64::max)
    }

    /// Set the step overhead to the mean of (measured − simulated) over `(plan, measured
    /// seconds)` pairs, floored at 0.
    pub fn calibrate(&mut self, measured: &[(&Plan, f64)]) {
        if measured.is_empty() {
            return;
        }
        let diff: f64 = measured.iter().map(|(p, m)| m - self.simulated_step(p)).sum::<f64>() / measured.len() as f64;
        self.step_overhead_s = diff.max(0.0);
    }

    /// MPMoE's per-chunk stage times of one MoE layer's forward pipeline on one rank: the
    /// mean modelled time per chunk of the dispatch all-to-all (t_S), the expert compute with
    /// its layout and unlayout (t_C) and the combine all-to-all (t_R), and the per-chunk fixed
    /// overhead (the sum of the `fixed_s` of one chunk's forward ops). `None` when the plan
    /// has no chunked layer 0.
    pub fn chunk_stages(&self, rp: &RankPlan) -> Option<ChunkStages> {
        use crate::taxonomy::Pass;
        let ops: Vec<&Op> = rp.ops.iter().filter(|o| o.layer == Some(0) && o.chunk.is_some() && o.pass == Pass::Forward).collect();
        let n = ops.iter().filter_map(|o| o.chunk).max()? as usize + 1;
        let (mut s, mut c, mut r, mut fixed) = (0.0, 0.0, 0.0, 0.0);
        for op in &ops {
            let t = self.op_seconds(op).unwrap_or(0.0);
            let name = op.name.rsplit('.').next().unwrap_or("");
            match name {
                "dispatch_a2a" => s += t,
                "combine_a2a" => r += t,
                "expert_layout" | "expert_gemm1" | "expert_act" | "expert_gemm2" | "expert_unlayout" => c += t,
                _ => {}
            }
            fixed += self.law(OpClass::of(op).0).map_or(0.0, |l| l.fixed_s);
        }
        let nf = n as f64;
        Some(ChunkStages { chunks: n, dispatch_s: s / nf, expert_s: c / nf, combine_s: r / nf, fixed_per_chunk_s: fixed / nf })
    }
}

/// Per-chunk stage times of a chunked MoE layer's forward pipeline (see
/// [`CostModel::chunk_stages`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ChunkStages {
    /// Chunks n.
    pub chunks: usize,
    /// t_S: dispatch all-to-all per chunk, seconds.
    pub dispatch_s: f64,
    /// t_C: expert compute per chunk (layout, fc1, activation, fc2, unlayout), seconds.
    pub expert_s: f64,
    /// t_R: combine all-to-all per chunk, seconds.
    pub combine_s: f64,
    /// Sum of the per-op fixed overheads of one chunk's forward ops, seconds.
    pub fixed_per_chunk_s: f64,
}

impl ChunkStages {
    /// The closed-form pipeline time of the layer's forward chunks on two streams:
    /// `t_S + (n-1)·max(t_S + t_R, t_C) + t_C + t_R`.
    pub fn closed_form_s(&self) -> f64 {
        let n = self.chunks as f64;
        self.dispatch_s + (n - 1.0) * (self.dispatch_s + self.combine_s).max(self.expert_s) + self.expert_s + self.combine_s
    }
}

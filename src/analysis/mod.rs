//! Trace analysis: turns a [`Trace`] into a stage table, per-rank compute/communication
//! overlap (Holistic Trace Analysis definitions) and a per-rank memory breakdown, with text
//! ([`Analysis::render_text`]) and DataFrame/file ([`tables`]) outputs.

pub mod charts;
pub mod memory;
pub mod overlap;
pub mod prediction;
pub mod stages;
pub mod tables;
pub mod text;
pub mod waits;

pub use memory::{MemoryBreakdown, RankMemory};
pub use overlap::RankOverlap;
pub use stages::StageRow;
pub use waits::WaitRow;

use crate::trace::{MemEvent, OpEvent, StepSpan, Trace};
use std::collections::{BTreeMap, BTreeSet};

/// Everything the analysis derives from one trace.
#[derive(Debug, Clone, PartialEq)]
pub struct Analysis {
    /// Number of ranks, as recorded in the trace.
    pub world: u32,
    /// Backend that produced the trace.
    pub backend: String,
    /// Number of distinct measured step indices (from step spans and ops).
    pub steps: u32,
    /// Mean wall time of a step in ns: from the first rank's start to the last rank's end
    /// (the step spans' window), so ranks that finish early (pipeline stages) do not shorten
    /// it; 0 without spans.
    pub step_time_ns: f64,
    /// Op events left out because their (rank, step) has no step span while the rank has
    /// others: the unfinished step of a cancelled or failed run (kept in the trace).
    pub unfinished_ops: u64,
    /// One row per (stage, pass) present, in [`crate::taxonomy::Stage::ALL`] then pass order.
    pub stages: Vec<StageRow>,
    /// One overlap row per rank, in rank order.
    pub overlap: Vec<RankOverlap>,
    /// Memory replay per rank.
    pub memory: MemoryBreakdown,
    /// Collective time split into waiting for the group's last member and the transfer
    /// after it, per (stage, pass).
    pub waits: Vec<WaitRow>,
}

impl Analysis {
    /// Overlapped over communication time summed over ranks: the share of comm hidden by
    /// compute, 0.0 when no rank communicates.
    pub fn overall_overlap(&self) -> f64 {
        self.summed_ratio(|r| (r.overlapped_ns, r.comm_ns))
    }

    /// Share of all-to-all time hidden by compute, summed over ranks (the figure MoE overlap
    /// schedules are judged by); 0.0 when no rank runs an all-to-all.
    pub fn a2a_overlap(&self) -> f64 {
        self.summed_ratio(|r| (r.a2a_overlapped_ns, r.a2a_ns))
    }

    /// Sum over ranks of a (part, whole) pair, as part / whole; 0.0 for an empty whole.
    fn summed_ratio(&self, f: impl Fn(&RankOverlap) -> (u64, u64)) -> f64 {
        let (part, whole) = self.overlap.iter().map(f).fold((0u64, 0u64), |(p, w), (a, b)| (p + a, w + b));
        if whole == 0 {
            0.0
        } else {
            part as f64 / whole as f64
        }
    }

    /// Communication-stream time in ns, summed over ranks.
    pub fn comm_ns(&self) -> u64 {
        self.overlap.iter().map(|r| r.comm_ns).sum()
    }

    /// The rank whose memory peaked highest (the one that decides whether a plan fits).
    pub fn peak_memory_rank(&self) -> Option<&RankMemory> {
        self.memory.ranks.iter().max_by_key(|r| r.peak_total)
    }

    /// Exposed (not overlapped) communication in ns, summed over ranks.
    pub fn exposed_comm_ns(&self) -> u64 {
        self.overlap.iter().map(|r| r.exposed_comm_ns).sum()
    }

    /// A total over ranks and steps (ns) as the mean per rank and step: the unit of
    /// `step_time_ns`, so the two can be read side by side.
    pub fn per_rank_step(&self, total_ns: u64) -> f64 {
        total_ns as f64 / ((self.overlap.len().max(1) * self.steps.max(1) as usize) as f64)
    }
}

/// Every rank the trace mentions: `0..world` plus any rank seen in ops, memory or spans.
fn all_ranks(trace: &Trace) -> BTreeSet<u32> {
    let mut ranks: BTreeSet<u32> = (0..trace.world).collect();
    ranks.extend(trace.ops.iter().map(|o| o.rank));
    ranks.extend(trace.memory.iter().map(|m| m.rank));
    ranks.extend(trace.steps.iter().map(|s| s.rank));
    ranks
}

/// The overlap row of each of `ranks` from the trace's ops and step spans.
pub fn overlap_by_rank(trace: &Trace, ranks: &BTreeSet<u32>) -> Vec<overlap::RankOverlap> {
    let mut ops_by_rank: BTreeMap<u32, Vec<&OpEvent>> = BTreeMap::new();
    for op in &trace.ops {
        ops_by_rank.entry(op.rank).or_default().push(op);
    }
    let mut spans_by_rank: BTreeMap<u32, Vec<&StepSpan>> = BTreeMap::new();
    for s in &trace.steps {
        spans_by_rank.entry(s.rank).or_default().push(s);
    }
    ranks
        .iter()
        .map(|&r| {
            let ops = ops_by_rank.get(&r).map(Vec::as_slice).unwrap_or(&[]);
            let spans = spans_by_rank.get(&r).map(Vec::as_slice).unwrap_or(&[]);
            overlap::rank_overlap(r, ops, spans)
        })
        .collect()
}

/// `trace` without the ops of unfinished steps (a (rank, step) with no step span on a rank
/// that has spans: where a cancelled or failed run stopped) and with every step span widened
/// to its step's window over all ranks (first start to last end, one span per (rank, step)),
/// so a rank's idle time includes waiting for the others; and how many ops were left out.
fn finished_steps(trace: &Trace) -> (Trace, u64) {
    let ranks_with_spans: BTreeSet<u32> = trace.steps.iter().map(|s| s.rank).collect();
    let spanned: BTreeSet<(u32, u32)> = trace.steps.iter().map(|s| (s.rank, s.step)).collect();
    let keep = |o: &OpEvent| !ranks_with_spans.contains(&o.rank) || spanned.contains(&(o.rank, o.step));
    let ops: Vec<OpEvent> = trace.ops.iter().filter(|o| keep(o)).cloned().collect();
    let unfinished = (trace.ops.len() - ops.len()) as u64;
    let mut window: BTreeMap<u32, (u64, u64)> = BTreeMap::new();
    for s in &trace.steps {
        let w = window.entry(s.step).or_insert((s.start_ns, s.end_ns));
        w.0 = w.0.min(s.start_ns);
        w.1 = w.1.max(s.end_ns);
    }
    let steps = spanned.iter().map(|&(rank, step)| {
        let (start_ns, end_ns) = window[&step];
        StepSpan { rank, step, start_ns, end_ns }
    });
    (Trace { ops, steps: steps.collect(), ..trace.clone() }, unfinished)
}

/// Analyzes a trace: stage table, per-rank overlap, memory breakdown and step statistics.
/// Never panics, including on an empty trace.
pub fn analyze(trace: &Trace) -> Analysis {
    let (finished, unfinished_ops) = finished_steps(trace);
    let trace = &finished;
    let ranks = all_ranks(trace);

    let overlap = overlap_by_rank(trace, &ranks);
    let mut mem_by_rank: BTreeMap<u32, Vec<&MemEvent>> = BTreeMap::new();
    for m in &trace.memory {
        mem_by_rank.entry(m.rank).or_default().push(m);
    }

    let memory = MemoryBreakdown {
        ranks: ranks
            .iter()
            .map(|&r| {
                let evs = mem_by_rank.get(&r).map(Vec::as_slice).unwrap_or(&[]);
                memory::replay_rank(r, evs)
            })
            .collect(),
    };

    let step_ids: BTreeSet<u32> = trace
        .steps
        .iter()
        .map(|s| s.step)
        .chain(trace.ops.iter().map(|o| o.step))
        .collect();

    // Every span of a step now is the step's window: its wall time.
    let windows: BTreeMap<u32, u64> = trace.steps.iter().map(|s| (s.step, s.end_ns.saturating_sub(s.start_ns))).collect();
    let step_time_ns = if windows.is_empty() { 0.0 } else { windows.values().map(|v| *v as f64).sum::<f64>() / windows.len() as f64 };

    Analysis {
        world: trace.world,
        backend: trace.backend.clone(),
        steps: u32::try_from(step_ids.len()).unwrap_or(u32::MAX),
        step_time_ns,
        unfinished_ops,
        stages: stages::stage_rows(trace),
        overlap,
        memory,
        waits: waits::collective_waits(trace, &|g| trace.group_sizes.get(g as usize).map(|&n| n as usize)),
    }
}

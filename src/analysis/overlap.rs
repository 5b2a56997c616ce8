//! Compute/communication overlap per rank, with Holistic Trace Analysis definitions: each
//! stream set's op intervals are merged into a union, and overlap is the intersection of the
//! compute union with the communication union.

use crate::taxonomy::{Stage, Stream};
use crate::trace::{OpEvent, StepSpan};

/// A half-open time interval `[start, end)` in ns.
pub type Interval = (u64, u64);

/// Overlap figures of one rank over all its measured ops; all durations in ns.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct RankOverlap {
    /// Global rank.
    pub rank: u32,
    /// Sum of the rank's step spans; without spans, last op end minus first op start.
    pub span_ns: u64,
    /// Length of the union of all the rank's op intervals.
    pub busy_ns: u64,
    /// `span_ns - busy_ns`, clamped at 0.
    pub idle_ns: u64,
    /// Length of the union of compute-stream ops.
    pub compute_ns: u64,
    /// Length of the union of comm-stream ops.
    pub comm_ns: u64,
    /// Length of the intersection of the compute union and the comm union.
    pub overlapped_ns: u64,
    /// Communication not hidden behind compute: `comm_ns - overlapped_ns`.
    pub exposed_comm_ns: u64,
    /// `overlapped_ns / comm_ns`, 0.0 when there is no communication.
    pub overlap_ratio: f64,
    /// Length of the union of the all-to-all ops alone (dispatch and combine, forward and
    /// backward): the communication that MoE overlap schedules set out to hide.
    pub a2a_ns: u64,
    /// Part of `a2a_ns` covered by compute.
    pub a2a_overlapped_ns: u64,
}

impl RankOverlap {
    /// `a2a_overlapped_ns / a2a_ns`, 0.0 without all-to-all.
    pub fn a2a_ratio(&self) -> f64 {
        if self.a2a_ns == 0 {
            0.0
        } else {
            self.a2a_overlapped_ns as f64 / self.a2a_ns as f64
        }
    }
}

/// Sorts and merges intervals into disjoint, ordered ones; empty or inverted ones are dropped.
pub fn merge_intervals(mut intervals: Vec<Interval>) -> Vec<Interval> {
    intervals.retain(|(s, e)| e > s);
    intervals.sort_unstable();
    let mut merged: Vec<Interval> = Vec::with_capacity(intervals.len());
    for (s, e) in intervals {
        match merged.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    merged
}

/// Total length of already merged (disjoint) intervals.
pub fn total_len(merged: &[Interval]) -> u64 {
    merged.iter().map(|(s, e)| e - s).sum()
}

/// Length of the intersection of two merged interval lists (two-pointer sweep).
pub fn intersection_len(a: &[Interval], b: &[Interval]) -> u64 {
    let (mut i, mut j, mut acc) = (0usize, 0usize, 0u64);
    while i < a.len() && j < b.len() {
        let lo = a[i].0.max(b[j].0);
        let hi = a[i].1.min(b[j].1);
        if hi > lo {
            acc += hi - lo;
        }
        if a[i].1 <= b[j].1 {
            i += 1;
        } else {
            j += 1;
        }
    }
    acc
}

/// Computes the overlap row of one rank from its ops and step spans (already filtered to it).
pub fn rank_overlap(rank: u32, ops: &[&OpEvent], spans: &[&StepSpan]) -> RankOverlap {
    let pick = |stream: Option<Stream>| -> Vec<Interval> {
        ops.iter()
            .filter(|o| stream.is_none_or(|s| o.stream == s))
            .map(|o| (o.start_ns, o.end_ns))
            .collect()
    };
    let all = merge_intervals(pick(None));
    let compute = merge_intervals(pick(Some(Stream::Compute)));
    let comm = merge_intervals(pick(Some(Stream::Comm)));
    let a2a = merge_intervals(
        ops.iter().filter(|o| o.stream == Stream::Comm && o.stage == Stage::AllToAll).map(|o| (o.start_ns, o.end_ns)).collect(),
    );

    let span_ns = if spans.is_empty() {
        let first = ops.iter().map(|o| o.start_ns).min();
        let last = ops.iter().map(|o| o.end_ns).max();
        match (first, last) {
            (Some(f), Some(l)) => l.saturating_sub(f),
            _ => 0,
        }
    } else {
        spans
            .iter()
            .map(|s| s.end_ns.saturating_sub(s.start_ns))
            .sum()
    };
    let busy_ns = total_len(&all);
    let compute_ns = total_len(&compute);
    let comm_ns = total_len(&comm);
    let overlapped_ns = intersection_len(&compute, &comm);
    RankOverlap {
        rank,
        span_ns,
        busy_ns,
        idle_ns: span_ns.saturating_sub(busy_ns),
        compute_ns,
        comm_ns,
        overlapped_ns,
        exposed_comm_ns: comm_ns.saturating_sub(overlapped_ns),
        overlap_ratio: if comm_ns == 0 {
            0.0
        } else {
            overlapped_ns as f64 / comm_ns as f64
        },
        a2a_ns: total_len(&a2a),
        a2a_overlapped_ns: intersection_len(&compute, &a2a),
    }
}

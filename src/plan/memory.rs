//! Memory prediction from a plan alone: replay allocations (first write) and frees (after
//! last use) in issue order, with persistent buffers resident from the start.

use super::RankPlan;
use crate::taxonomy::MemCategory;

/// Predicted memory of one rank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryPrediction {
    /// Peak bytes in use.
    pub peak_total: u64,
    /// Bytes per category at the moment the total first peaks (index = MemCategory::index()).
    pub at_peak: [u64; 7],
    /// Each category's own maximum.
    pub max_per_category: [u64; 7],
    /// Whether routing-dependent buffers were counted at their upper bound.
    pub upper_bound: bool,
}

/// Replay a rank's plan and report its predicted peak memory per category.
pub fn predict(plan: &RankPlan) -> MemoryPrediction {
    let mut live = vec![false; plan.buffers.len()];
    let mut cur = [0u64; 7];
    let mut total = 0u64;
    let mut best = MemoryPrediction { peak_total: 0, at_peak: [0; 7], max_per_category: [0; 7], upper_bound: false };
    let note = |cur: &[u64; 7], total: u64, best: &mut MemoryPrediction| {
        if total > best.peak_total {
            best.peak_total = total;
            best.at_peak = *cur;
        }
        for (m, c) in best.max_per_category.iter_mut().zip(cur) {
            *m = (*m).max(*c);
        }
    };
    for (i, b) in plan.buffers.iter().enumerate() {
        if b.persistent {
            live[i] = true;
            cur[b.category.index()] += b.bytes();
            total += b.bytes();
            note(&cur, total, &mut best);
        }
    }
    for op in &plan.ops {
        for w in &op.writes {
            let b = &plan.buffers[w.0 as usize];
            if !live[w.0 as usize] {
                live[w.0 as usize] = true;
                cur[b.category.index()] += b.bytes();
                total += b.bytes();
                best.upper_bound |= b.dynamic;
                note(&cur, total, &mut best);
            }
        }
        for f in &op.frees {
            let b = &plan.buffers[f.0 as usize];
            if live[f.0 as usize] {
                live[f.0 as usize] = false;
                cur[b.category.index()] -= b.bytes();
                total -= b.bytes();
            }
        }
    }
    best
}

/// Category name and bytes pairs, for printing.
pub fn named(bytes: &[u64; 7]) -> Vec<(MemCategory, u64)> {
    MemCategory::ALL.iter().map(|c| (*c, bytes[c.index()])).collect()
}

//! Memory breakdown per rank: replays the signed memory deltas of a trace and records the
//! peak total, what each category held at that peak, and each category's own maximum.

use crate::taxonomy::MemCategory;
use crate::trace::MemEvent;

/// Number of memory categories (length of [`MemCategory::ALL`]).
pub const N_CATEGORIES: usize = MemCategory::ALL.len();

/// Memory figures of one rank, in bytes; arrays are indexed by [`MemCategory::index`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RankMemory {
    /// Global rank.
    pub rank: u32,
    /// Highest total bytes in use, over all categories, after any event.
    pub peak_total: u64,
    /// Bytes per category at the moment the total first reached `peak_total`.
    pub at_peak: [u64; N_CATEGORIES],
    /// Each category's own maximum over time (may occur at different times).
    pub max_per_category: [u64; N_CATEGORIES],
}

/// Memory figures of every rank, in rank order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MemoryBreakdown {
    /// One entry per rank.
    pub ranks: Vec<RankMemory>,
}

impl MemoryBreakdown {
    /// Largest peak total over ranks: the memory the busiest device needs.
    pub fn max_peak(&self) -> u64 {
        self.ranks.iter().map(|r| r.peak_total).max().unwrap_or(0)
    }
}

/// Replays one rank's events (sorted stably by time here) into its [`RankMemory`].
/// Bytes in use that a malformed trace drives below zero are reported as 0.
pub fn replay_rank(rank: u32, events: &[&MemEvent]) -> RankMemory {
    let mut sorted: Vec<&MemEvent> = events.to_vec();
    sorted.sort_by_key(|e| e.t_ns);
    let mut in_use = [0i64; N_CATEGORIES];
    let mut out = RankMemory {
        rank,
        ..RankMemory::default()
    };
    let clamp = |v: i64| -> u64 { u64::try_from(v).unwrap_or(0) };
    for ev in sorted {
        let idx = ev.category.index();
        in_use[idx] = in_use[idx].saturating_add(ev.delta);
        let cat = clamp(in_use[idx]);
        if cat > out.max_per_category[idx] {
            out.max_per_category[idx] = cat;
        }
        let total: u64 = in_use.iter().map(|v| clamp(*v)).sum();
        if total > out.peak_total {
            out.peak_total = total;
            for (slot, v) in out.at_peak.iter_mut().zip(in_use.iter()) {
                *slot = clamp(*v);
            }
        }
    }
    out
}

/// Running bytes in use per category after each event of one rank, as `(t_ns, bytes)`.
/// Shared with the Chrome exporter so both replay deltas the same way.
pub fn replay_series(events: &[&MemEvent]) -> Vec<(u64, [u64; N_CATEGORIES])> {
    let mut sorted: Vec<&MemEvent> = events.to_vec();
    sorted.sort_by_key(|e| e.t_ns);
    let mut in_use = [0i64; N_CATEGORIES];
    sorted
        .into_iter()
        .map(|ev| {
            let idx = ev.category.index();
            in_use[idx] = in_use[idx].saturating_add(ev.delta);
            let mut snap = [0u64; N_CATEGORIES];
            for (slot, v) in snap.iter_mut().zip(in_use.iter()) {
                *slot = u64::try_from(*v).unwrap_or(0);
            }
            (ev.t_ns, snap)
        })
        .collect()
}

//! Waiting inside collectives. A rank that reaches a collective before the group's last
//! member spends the difference waiting; only after the last arrival do bytes move. Each
//! collective's time is split into that wait and the transfer after it, by lining up the
//! members' events of one collective (same step and [`crate::trace::CollectiveRef`]). A
//! backend's traced collective time mixes the two; a cost model that has its ranks arrive
//! together predicts the transfer, so the split is what to hold it against.

use crate::taxonomy::{stage_label, Pass, Stage};
use crate::trace::{CollectiveRef, Trace};
use std::collections::{BTreeMap, HashMap};

/// Collective time of one (stage, pass), summed over ranks and steps.
#[derive(Debug, Clone, PartialEq)]
pub struct WaitRow {
    /// The stage.
    pub stage: Stage,
    /// The pass.
    pub pass: Pass,
    /// Label such as `all_to_all_bwd`.
    pub label: String,
    /// Collective op events.
    pub count: u64,
    /// Summed durations, ns.
    pub total_ns: u64,
    /// Of `total_ns`, the time before the group's last member arrived, ns.
    pub wait_ns: u64,
    /// Events whose collective does not line up as exactly its group's members (no wait
    /// counted for them): a single-member group has no peer, and a symmetric simulation
    /// traces rank 0 alone or copies of it that all carry rank 0's groups.
    pub unmatched: u64,
}

impl WaitRow {
    /// `total_ns - wait_ns`: the time after the last member arrived.
    pub fn transfer_ns(&self) -> u64 {
        self.total_ns.saturating_sub(self.wait_ns)
    }
}

/// One row per (stage, pass) of the collectives that carry a [`CollectiveRef`], in stage order.
/// `members` gives each group's size (the plan's groups), so an event whose peers are
/// missing from the trace is counted as unmatched instead of as not waiting.
pub fn collective_waits(trace: &Trace, members: &dyn Fn(u32) -> Option<usize>) -> Vec<WaitRow> {
    let mut instances: HashMap<(u32, CollectiveRef), Vec<usize>> = HashMap::new();
    for (i, op) in trace.ops.iter().enumerate() {
        if let Some(c) = op.collective {
            instances.entry((op.step, c)).or_default().push(i);
        }
    }
    let mut rows: BTreeMap<(usize, Pass), WaitRow> = BTreeMap::new();
    let order = |s: Stage| Stage::ALL.iter().position(|x| *x == s).unwrap_or(usize::MAX);
    for ((_, c), evs) in instances {
        let complete = members(c.group).is_some_and(|n| n == evs.len()) && evs.len() > 1;
        let last = evs.iter().map(|&i| trace.ops[i].start_ns).max().unwrap_or(0);
        for i in evs {
            let op = &trace.ops[i];
            let row = rows.entry((order(op.stage), op.pass)).or_insert_with(|| WaitRow {
                stage: op.stage,
                pass: op.pass,
                label: stage_label(op.stage, op.pass),
                count: 0,
                total_ns: 0,
                wait_ns: 0,
                unmatched: 0,
            });
            row.count += 1;
            row.total_ns += op.dur_ns();
            if complete {
                row.wait_ns += last.saturating_sub(op.start_ns).min(op.dur_ns());
            } else {
                row.unmatched += 1;
            }
        }
    }
    rows.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::taxonomy::Stream;
    use crate::trace::OpEvent;

    fn ev(rank: u32, step: u32, seq: u32, start: u64, end: u64) -> OpEvent {
        OpEvent {
            rank, step, stream: Stream::Comm, stage: Stage::AllToAll, pass: Pass::Forward, name: "L0.a2a".into(), layer: Some(0), chunk: None,
            start_ns: start, end_ns: end, flops: 0, bytes: 0, collective: Some(CollectiveRef { group: 0, seq }), host_ns: None, issue_ns: None, gemm_calls: None,
        }
    }

    #[test]
    fn the_early_member_waits_for_the_last_and_both_then_transfer() {
        // Step 0: rank 0 arrives at 100, rank 1 at 400, both end at 500: rank 0 waited 300.
        // Step 1 (second collective): rank 1 is early by 50.
        let trace = Trace {
            backend: "cpu".into(),
            world: 2,
            ops: vec![ev(0, 0, 0, 100, 500), ev(1, 0, 0, 400, 500), ev(0, 1, 1, 1000, 1200), ev(1, 1, 1, 950, 1200)],
            ..Default::default()
        };
        let rows = collective_waits(&trace, &|_| Some(2));
        assert_eq!(rows.len(), 1);
        let r = &rows[0];
        assert_eq!((r.count, r.total_ns, r.wait_ns, r.unmatched), (4, 400 + 100 + 200 + 250, 300 + 50, 0));
        assert_eq!(r.transfer_ns(), 100 + 100 + 200 + 200);
        assert_eq!(r.label, "all_to_all");
    }

    #[test]
    fn a_collective_without_all_its_members_counts_no_wait() {
        let trace = Trace { backend: "sim".into(), world: 2, ops: vec![ev(0, 0, 0, 100, 500)], ..Default::default() };
        let rows = collective_waits(&trace, &|_| Some(2));
        assert_eq!((rows[0].wait_ns, rows[0].unmatched), (0, 1));
        // Unknown group size: the same.
        let rows = collective_waits(&trace, &|_| None);
        assert_eq!(rows[0].unmatched, 1);
    }
}

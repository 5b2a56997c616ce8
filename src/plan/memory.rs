//! Memory prediction from a plan alone: replay allocations (first write) and frees (after
//! last use) in issue order, with persistent buffers resident from the start; and the most
//! that any order of the rank's two streams allowed by its dependencies can hold at once
//! ([`interleaved_peak`]), which bounds what a backend running them concurrently tracks.

use super::RankPlan;
use crate::taxonomy::{MemCategory, Stream};

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
    /// The highest total over every order of the compute and comm streams' ops that the
    /// dependencies allow ([`interleaved_peak`]); equals `peak_total` when one stream holds
    /// every op that allocates or frees.
    pub interleaved_peak: u64,
}

/// A buffer event of the issue-order replay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Event {
    /// The buffer becomes live.
    Alloc,
    /// The buffer is released.
    Free,
}

/// The issue-order replay both predictions share: persistent buffers first (no op), then per
/// op its writes of buffers not live (allocated on first write) and its frees of live ones.
fn replay(plan: &RankPlan, mut on: impl FnMut(Option<usize>, &super::BufferDesc, Event)) {
    let mut live = vec![false; plan.buffers.len()];
    for (i, b) in plan.buffers.iter().enumerate() {
        if b.persistent {
            live[i] = true;
            on(None, b, Event::Alloc);
        }
    }
    for (k, op) in plan.ops.iter().enumerate() {
        for w in &op.writes {
            if !std::mem::replace(&mut live[w.0 as usize], true) {
                on(Some(k), &plan.buffers[w.0 as usize], Event::Alloc);
            }
        }
        for f in &op.frees {
            if std::mem::replace(&mut live[f.0 as usize], false) {
                on(Some(k), &plan.buffers[f.0 as usize], Event::Free);
            }
        }
    }
}

/// The predicted peak bytes of a rank in issue order alone ([`predict`]'s `peak_total`,
/// without the categories or the interleaved bound): cheap enough to compare every rank.
pub fn issue_order_peak(plan: &RankPlan) -> u64 {
    let (mut total, mut peak) = (0u64, 0u64);
    replay(plan, |_, b, event| match event {
        Event::Alloc => {
            total += b.bytes();
            peak = peak.max(total);
        }
        Event::Free => total -= b.bytes(),
    });
    peak
}

/// Replay a rank's plan and report its predicted peak memory per category.
pub fn predict(plan: &RankPlan) -> MemoryPrediction {
    let mut cur = [0u64; 7];
    let mut total = 0u64;
    let mut best = MemoryPrediction { peak_total: 0, at_peak: [0; 7], max_per_category: [0; 7], upper_bound: false, interleaved_peak: 0 };
    replay(plan, |_, b, event| match event {
        Event::Alloc => {
            cur[b.category.index()] += b.bytes();
            total += b.bytes();
            best.upper_bound |= b.dynamic;
            if total > best.peak_total {
                best.peak_total = total;
                best.at_peak = cur;
            }
            for (m, c) in best.max_per_category.iter_mut().zip(&cur) {
                *m = (*m).max(*c);
            }
        }
        Event::Free => {
            cur[b.category.index()] -= b.bytes();
            total -= b.bytes();
        }
    });
    best.interleaved_peak = interleaved_peak(plan).max(best.peak_total);
    best
}

/// The highest bytes in use over every interleaving of the rank's compute and comm streams
/// that its dependencies allow, at op granularity: an op's first writes are live from its
/// start, its frees end with it, and the two streams may each be inside an op. A state is
/// (ops done on each stream, whether each runs its next op); it is reachable when every done
/// or running op's dependencies on the other stream are done. The allocations and frees are
/// the issue-order replay's ([`predict`]: each op allocates what it first writes while not
/// live and frees what it lists), moved with their ops, so live bytes are a sum of one term
/// per stream and the maximum over reachable states is a range maximum per state of one
/// stream: O(n log n). Persistent buffers are resident throughout.
pub fn interleaved_peak(plan: &RankPlan) -> u64 {
    // The replay's events, per op; persistent buffers resident throughout.
    let (mut persistent, mut op_alloc, mut op_free) = (0u64, vec![0u64; plan.ops.len()], vec![0u64; plan.ops.len()]);
    replay(plan, |op, b, event| match (op, event) {
        (None, _) => persistent += b.bytes(),
        (Some(k), Event::Alloc) => op_alloc[k] += b.bytes(),
        (Some(k), Event::Free) => op_free[k] += b.bytes(),
    });
    let side = |s: Stream| if s == Stream::Comm { 1usize } else { 0 };
    // Each op's place on its stream (1-based count of that stream's ops up to it).
    let mut count = [0usize; 2];
    let mut place = vec![0usize; plan.ops.len()];
    for (i, op) in plan.ops.iter().enumerate() {
        count[side(op.stream)] += 1;
        place[i] = count[side(op.stream)];
    }
    // Per stream, in order: bytes the op allocates and frees in the replay, and how many of
    // the other stream's ops it needs done.
    let mut alloc: [Vec<u64>; 2] = [Vec::new(), Vec::new()];
    let mut freed: [Vec<u64>; 2] = [Vec::new(), Vec::new()];
    let mut need: [Vec<usize>; 2] = [Vec::new(), Vec::new()];
    for (k, op) in plan.ops.iter().enumerate() {
        let s = side(op.stream);
        let n = op.deps.iter().map(|d| d.0 as usize).filter(|&d| d < plan.ops.len() && side(plan.ops[d].stream) != s).map(|d| place[d]).max().unwrap_or(0);
        alloc[s].push(op_alloc[k]);
        freed[s].push(op_free[k]);
        need[s].push(n);
    }
    // net[s][k]: bytes live from stream s after k ops done; run[s][k]: with op k+1 running.
    // pre[s][k]: other-stream ops needed by s's first k ops (prefix maximum).
    let mut net: [Vec<i64>; 2] = [vec![0], vec![0]];
    let mut run: [Vec<i64>; 2] = [Vec::new(), Vec::new()];
    let mut pre: [Vec<usize>; 2] = [vec![0], vec![0]];
    for s in 0..2 {
        for k in 0..alloc[s].len() {
            let done = net[s][k];
            run[s].push(done + alloc[s][k] as i64);
            net[s].push(done + alloc[s][k] as i64 - freed[s][k] as i64);
            pre[s].push(pre[s][k].max(need[s][k]));
        }
    }
    // States of stream 1 (comm) as (value, ops of stream 0 they need done), by ops done.
    let (n1, runs1) = (net[1].len(), run[1].len());
    let idle1 = SparseMax::new(&net[1]);
    let run1 = SparseMax::new(&run[1]);
    // Highest j with pre[1][j] <= i: stream-1 ops done that stream 0's i done ops allow.
    let most_done_1 = |i: usize| pre[1].partition_point(|&p| p <= i) - 1;
    let mut best = i64::MIN;
    for i in 0..net[0].len() {
        // Stream 0 idle after i ops, or running op i+1; each needs some stream-1 ops done.
        let states = [(net[0][i], pre[0][i]), (run[0].get(i).copied().unwrap_or(i64::MIN), pre[0].get(i + 1).copied().unwrap_or(usize::MAX))];
        let hi = most_done_1(i);
        for (v0, lo) in states {
            if v0 == i64::MIN || lo > hi {
                continue;
            }
            // Stream 1 idle after j in [lo, hi] ops, or running op j+1 (needs pre[1][j+1] <= i).
            let mut v1 = idle1.max(lo, hi.min(n1 - 1));
            if hi >= 1 && lo < runs1 {
                v1 = v1.max(run1.max(lo, (hi - 1).min(runs1 - 1)));
            }
            best = best.max(v0 + v1);
        }
    }
    persistent + best.max(0) as u64
}

/// Range maxima of a fixed array in O(1) after O(n log n) preparation.
struct SparseMax {
    levels: Vec<Vec<i64>>,
}

impl SparseMax {
    fn new(v: &[i64]) -> SparseMax {
        let mut levels = vec![v.to_vec()];
        let mut w = 1;
        while 2 * w <= v.len() {
            let prev = levels.last().expect("a level");
            levels.push((0..=v.len() - 2 * w).map(|i| prev[i].max(prev[i + w])).collect());
            w *= 2;
        }
        SparseMax { levels }
    }

    /// Maximum of `v[lo..=hi]`; `i64::MIN` for an empty range.
    fn max(&self, lo: usize, hi: usize) -> i64 {
        if lo > hi || self.levels[0].is_empty() || hi >= self.levels[0].len() {
            return i64::MIN;
        }
        let k = (usize::BITS - 1 - (hi - lo + 1).leading_zeros()) as usize;
        self.levels[k][lo].max(self.levels[k][hi + 1 - (1 << k)])
    }
}

/// Category name and bytes pairs, for printing.
pub fn named(bytes: &[u64; 7]) -> Vec<(MemCategory, u64)> {
    MemCategory::ALL.iter().map(|c| (*c, bytes[c.index()])).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{BufId, BufferDesc, ElemType, Op, OpId, OpKind};
    use crate::taxonomy::{Pass, Stage};

    fn buf(bytes: usize) -> BufferDesc {
        BufferDesc { name: "b".into(), elems: bytes, elem: ElemType::F32, elem_bytes: 1, category: MemCategory::Activations, persistent: false, dynamic: false }
    }

    /// An op on `stream` that writes `w` and frees `f` (a buffer it alone uses), after `deps`.
    fn op(id: u32, stream: Stream, w: u32, deps: &[u32]) -> Op {
        Op {
            id: OpId(id), name: format!("op{id}"), stage: Stage::Act, pass: Pass::Forward, stream, layer: None, chunk: None,
            deps: deps.iter().map(|&d| OpId(d)).collect(),
            kind: OpKind::Act { h: BufId(w), a: BufId(w), act: crate::spec::Activation::Relu },
            reads: Vec::new(), writes: vec![BufId(w)], frees: vec![BufId(w)], flops: 0, bytes: 0, collective: None,
        }
    }

    fn plan(ops: Vec<Op>, bytes: &[usize]) -> RankPlan {
        RankPlan { rank: 0, buffers: bytes.iter().map(|&b| buf(b)).collect(), ops, params: Vec::new() }
    }

    #[test]
    fn independent_streams_can_hold_both_ops_buffers_at_once_and_a_dependency_forbids_it() {
        // Compute: 10 bytes then 30; comm: 20, independent. Issue order holds one at a time
        // (peak 30); interleaved, the comm op can run beside the 30-byte op: 50.
        let ops = vec![op(0, Stream::Compute, 0, &[]), op(1, Stream::Comm, 1, &[]), op(2, Stream::Compute, 2, &[])];
        let p = predict(&plan(ops, &[10, 20, 30]));
        assert_eq!((p.peak_total, p.interleaved_peak), (30, 50));
        // The comm op waits for the 30-byte op: never beside it; beside the 10-byte one? No:
        // op 2 follows op 0 on compute, so the comm op (after op 2) runs alone.
        let ops = vec![op(0, Stream::Compute, 0, &[]), op(1, Stream::Compute, 2, &[]), op(2, Stream::Comm, 1, &[1])];
        let p = predict(&plan(ops, &[10, 20, 30]));
        assert_eq!((p.peak_total, p.interleaved_peak), (30, 30));
        // The 30-byte op waits for the comm op, which may run beside the 10-byte op: 30.
        let ops = vec![op(0, Stream::Compute, 0, &[]), op(1, Stream::Comm, 1, &[]), op(2, Stream::Compute, 2, &[1])];
        let p = predict(&plan(ops, &[10, 20, 30]));
        assert_eq!((p.peak_total, p.interleaved_peak), (30, 30));
        // One stream: the issue order is the only order.
        let ops = vec![op(0, Stream::Compute, 0, &[]), op(1, Stream::Compute, 1, &[]), op(2, Stream::Compute, 2, &[])];
        let p = predict(&plan(ops, &[10, 20, 30]));
        assert_eq!((p.peak_total, p.interleaved_peak), (30, 30));
    }

    /// The bound against a search over every order of the ops' start and end events that the
    /// streams and dependencies allow, on random small two-stream plans.
    #[test]
    fn the_bound_is_the_maximum_over_every_allowed_order() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for _ in 0..3000 {
            let n_ops = 1 + rnd(9) as usize;
            let n_bufs = 1 + rnd(6) as usize;
            let bytes: Vec<usize> = (0..n_bufs).map(|_| 1 + rnd(50) as usize).collect();
            let mut ops = Vec::new();
            for i in 0..n_ops {
                let stream = if rnd(2) == 0 { Stream::Compute } else { Stream::Comm };
                let mut o = op(i as u32, stream, rnd(n_bufs as u64) as u32, &[]);
                o.deps = (0..i).filter(|_| rnd(4) == 0).map(|d| OpId(d as u32)).collect();
                if rnd(3) == 0 {
                    o.writes.push(BufId(rnd(n_bufs as u64) as u32));
                }
                o.frees = (0..n_bufs).filter(|_| rnd(3) == 0).map(|b| BufId(b as u32)).collect();
                ops.push(o);
            }
            let p = plan(ops, &bytes);
            // The replay's events per op, as interleaved_peak takes them.
            let mut live = vec![false; n_bufs];
            let (mut alloc, mut free) = (vec![0i64; n_ops], vec![0i64; n_ops]);
            for (i, o) in p.ops.iter().enumerate() {
                for w in &o.writes {
                    if !std::mem::replace(&mut live[w.0 as usize], true) {
                        alloc[i] += bytes[w.0 as usize] as i64;
                    }
                }
                for f in &o.frees {
                    if std::mem::replace(&mut live[f.0 as usize], false) {
                        free[i] += bytes[f.0 as usize] as i64;
                    }
                }
            }
            // Search: state = per op not started / running / done.
            let mut best = 0i64;
            let mut stack = vec![vec![0u8; n_ops]];
            let mut visited = std::collections::HashSet::new();
            while let Some(st) = stack.pop() {
                if !visited.insert(st.clone()) {
                    continue;
                }
                let bytes_now: i64 = (0..n_ops).map(|i| match st[i] { 1 => alloc[i], 2 => alloc[i] - free[i], _ => 0 }).sum();
                best = best.max(bytes_now);
                for i in 0..n_ops {
                    let o = &p.ops[i];
                    // Start: the stream's previous op done, every dependency done.
                    let prev_done = (0..i).filter(|&j| p.ops[j].stream == o.stream).all(|j| st[j] == 2);
                    if st[i] == 0 && prev_done && o.deps.iter().all(|d| st[d.0 as usize] == 2) {
                        let mut next = st.clone();
                        next[i] = 1;
                        stack.push(next);
                    }
                    if st[i] == 1 {
                        let mut next = st.clone();
                        next[i] = 2;
                        stack.push(next);
                    }
                }
            }
            assert_eq!(interleaved_peak(&p) as i64, best.max(0), "{:?}", p.ops.iter().map(|o| (o.stream, &o.deps, &o.writes, &o.frees)).collect::<Vec<_>>());
        }
    }

    #[test]
    fn a_buffer_freed_on_the_other_stream_stays_live_until_that_op_ends() {
        // Compute writes A (40) and keeps it; comm reads it and frees it (after compute's op
        // 0); compute then writes B (25), which may come before the comm op ends: 65.
        let mut ops = vec![op(0, Stream::Compute, 0, &[]), op(1, Stream::Comm, 1, &[0]), op(2, Stream::Compute, 2, &[])];
        ops[0].frees.clear();
        ops[1].writes.clear();
        ops[1].frees = vec![BufId(0)];
        let p = predict(&plan(ops, &[40, 5, 25]));
        assert_eq!((p.peak_total, p.interleaved_peak), (40, 65));
    }
}

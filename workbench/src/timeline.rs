//! The timeline's data and view state: ops indexed per (rank, stream) lane in time order,
//! the exposed (not overlapped by compute) part of every rank's communication, and the
//! window, selection and filter the user moves with the keyboard. Drawing is in
//! `ui::timeline`; everything here is plain data, tested without a terminal.

use crate::loaded::LoadedRun;
use moelab::analysis::overlap::{intersection_len, merge_intervals, Interval};
use moelab::taxonomy::{stage_label, Stream};
use moelab::trace::{OpEvent, Trace};
use std::collections::BTreeMap;

/// The ops of one rank on one stream.
#[derive(Debug, Clone, PartialEq)]
pub struct Lane {
    /// Global rank.
    pub rank: u32,
    /// Stream.
    pub stream: Stream,
    /// Indices into `trace.ops`, sorted by start time.
    pub ops: Vec<usize>,
    /// Running maximum of the ops' end times (monotone, for binary search by time).
    max_end: Vec<u64>,
    /// Merged intervals of this lane's ops not covered by the rank's compute stream
    /// (empty on compute lanes): the exposed communication.
    pub exposed: Vec<Interval>,
}

/// Every lane of a trace, rank-major, compute before comm.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TimelineIndex {
    /// Lanes in display order.
    pub lanes: Vec<Lane>,
    /// Earliest op start.
    pub t_min: u64,
    /// Latest op end.
    pub t_max: u64,
}

/// `a` minus `b`, both merged and sorted.
fn subtract(a: &[Interval], b: &[Interval]) -> Vec<Interval> {
    let mut out = Vec::new();
    let mut j = 0;
    for &(s, e) in a {
        let mut cur = s;
        while j < b.len() && b[j].1 <= cur {
            j += 1;
        }
        let mut k = j;
        while k < b.len() && b[k].0 < e {
            if b[k].0 > cur {
                out.push((cur, b[k].0));
            }
            cur = cur.max(b[k].1);
            k += 1;
        }
        if cur < e {
            out.push((cur, e));
        }
    }
    out
}

impl TimelineIndex {
    /// Index a trace. Linear in the number of ops after one sort.
    pub fn build(trace: &Trace) -> Self {
        let mut by_lane: BTreeMap<(u32, u32), Vec<usize>> = BTreeMap::new();
        for (i, op) in trace.ops.iter().enumerate() {
            by_lane.entry((op.rank, op.stream.index())).or_default().push(i);
        }
        let mut compute: BTreeMap<u32, Vec<Interval>> = BTreeMap::new();
        for op in trace.ops.iter().filter(|o| o.stream == Stream::Compute) {
            compute.entry(op.rank).or_default().push((op.start_ns, op.end_ns));
        }
        let compute: BTreeMap<u32, Vec<Interval>> = compute.into_iter().map(|(r, v)| (r, merge_intervals(v))).collect();
        let lanes = by_lane
            .into_iter()
            .map(|((rank, _), mut ops)| {
                ops.sort_by_key(|&i| (trace.ops[i].start_ns, trace.ops[i].end_ns));
                let stream = trace.ops[ops[0]].stream;
                let mut m = 0;
                let max_end = ops.iter().map(|&i| { m = m.max(trace.ops[i].end_ns); m }).collect();
                let exposed = if stream == Stream::Comm {
                    let comm = merge_intervals(ops.iter().map(|&i| (trace.ops[i].start_ns, trace.ops[i].end_ns)).collect());
                    subtract(&comm, compute.get(&rank).map(Vec::as_slice).unwrap_or(&[]))
                } else {
                    Vec::new()
                };
                Lane { rank, stream, ops, max_end, exposed }
            })
            .collect();
        let t_min = trace.ops.iter().map(|o| o.start_ns).min().unwrap_or(0);
        let t_max = trace.ops.iter().map(|o| o.end_ns).max().unwrap_or(0).max(t_min);
        TimelineIndex { lanes, t_min, t_max }
    }

    /// Positions (into `lane.ops`) of the ops of `lane` that intersect `[t0, t1)`.
    pub fn ops_in(&self, trace: &Trace, lane: usize, t0: u64, t1: u64) -> std::ops::Range<usize> {
        let Some(l) = self.lanes.get(lane) else { return 0..0 };
        let first = l.max_end.partition_point(|&e| e <= t0);
        let last = l.ops.partition_point(|&i| trace.ops[i].start_ns < t1);
        first..last.max(first)
    }

    /// Position (into `lane.ops`) of the op of `lane` covering time `t` (the latest-starting
    /// one when several do), else of the op nearest to `t`; `None` on an empty lane.
    pub fn op_at(&self, trace: &Trace, lane: usize, t: u64) -> Option<usize> {
        let l = self.lanes.get(lane).filter(|l| !l.ops.is_empty())?;
        // Ops starting at or before t; the last of them that ends after t covers it.
        let after = l.ops.partition_point(|&i| trace.ops[i].start_ns <= t);
        if after > 0 && l.max_end[after - 1] > t {
            return (0..after).rev().find(|&p| trace.ops[l.ops[p]].end_ns > t);
        }
        // Nothing covers t: the op ending last before it, or the first starting after it.
        let before = (after > 0).then(|| {
            let end = l.max_end[after - 1];
            let p = (0..after).rev().find(|&p| trace.ops[l.ops[p]].end_ns == end).unwrap_or(after - 1);
            (t - end, p)
        });
        let next = l.ops.get(after).map(|&i| (trace.ops[i].start_ns - t, after));
        match (before, next) {
            (Some(b), Some(n)) => Some(if n.0 < b.0 { n.1 } else { b.1 }),
            (b, n) => b.or(n).map(|x| x.1),
        }
    }

    /// Exposed ns of an op: the part of it on a comm lane that no compute op of its rank
    /// covers (0 for compute ops).
    pub fn exposed_ns(&self, lane: usize, op: &OpEvent) -> u64 {
        self.lanes.get(lane).map_or(0, |l| intersection_len(&l.exposed, &[(op.start_ns, op.end_ns)]))
    }

    /// Exposed ns of `lane` inside `[s, e)`. Cost: the exposed intervals it meets.
    pub fn exposed_ns_between(&self, lane: usize, s: u64, e: u64) -> u64 {
        let Some(l) = self.lanes.get(lane) else { return 0 };
        let k = l.exposed.partition_point(|iv| iv.1 <= s);
        l.exposed[k..].iter().take_while(|iv| iv.0 < e).map(|iv| iv.1.min(e).saturating_sub(iv.0.max(s))).sum()
    }

    /// Ops of the same rank on other lanes that run while `op` runs, with the overlap in ns,
    /// longest overlap first.
    pub fn overlapping(&self, trace: &Trace, lane: usize, op: &OpEvent) -> Vec<(usize, u64)> {
        let mut out = Vec::new();
        for (li, l) in self.lanes.iter().enumerate() {
            if li == lane || l.rank != op.rank {
                continue;
            }
            for p in self.ops_in(trace, li, op.start_ns, op.end_ns) {
                let i = l.ops[p];
                let o = &trace.ops[i];
                let ov = o.end_ns.min(op.end_ns).saturating_sub(o.start_ns.max(op.start_ns));
                if ov > 0 {
                    out.push((i, ov));
                }
            }
        }
        out.sort_by(|a, b| b.1.cmp(&a.1));
        out
    }

    /// The lane of (rank, stream), if the trace has one.
    pub fn lane_of(&self, rank: u32, stream: Stream) -> Option<usize> {
        self.lanes.iter().position(|l| l.rank == rank && l.stream == stream)
    }
}

/// What one character cell of a lane shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CellOp {
    /// Index into `trace.ops` of the op covering most of the cell.
    pub op: usize,
    /// Position of that op in its lane.
    pub pos: usize,
    /// The cell holds mostly exposed communication: at least half of the time its op
    /// covers in the cell is exposed.
    pub exposed: bool,
}

/// Paint one lane into `width` cells over `[t0, t0 + span)`: each cell gets the op covering
/// most of it (an op narrower than a cell still claims an empty cell). Cost: the visible ops
/// plus the cells they cover.
pub fn paint_lane(run: &LoadedRun, lane: usize, t0: u64, span: u64, width: usize) -> Vec<Option<CellOp>> {
    let mut cells: Vec<Option<CellOp>> = vec![None; width];
    if width == 0 || span == 0 {
        return cells;
    }
    let mut best = vec![0u64; width];
    let (w, sp) = (width as u128, span as u128);
    let cell_start = |c: usize| t0 + ((c as u128 * sp) / w) as u64;
    let l = &run.index.lanes[lane];
    for p in run.index.ops_in(&run.trace, lane, t0, t0.saturating_add(span)) {
        let i = l.ops[p];
        let o = &run.trace.ops[i];
        let rel_s = o.start_ns.saturating_sub(t0) as u128;
        let rel_e = o.end_ns.saturating_sub(t0) as u128;
        let c0 = ((rel_s * w) / sp).min(w - 1) as usize;
        let c1 = (rel_e * w).div_ceil(sp).clamp(c0 as u128 + 1, w) as usize;
        for c in c0..c1 {
            let (cs, ce) = (cell_start(c), cell_start(c + 1));
            let cover = o.end_ns.min(ce).saturating_sub(o.start_ns.max(cs)).max(1);
            if cells[c].is_none() || cover > best[c] {
                best[c] = cover;
                let exposed = l.stream == Stream::Comm && mostly_exposed(run, lane, cs.max(o.start_ns), ce.min(o.end_ns));
                cells[c] = Some(CellOp { op: i, pos: p, exposed });
            }
        }
    }
    cells
}

/// Whether at least half of `[s, e)` (an op's part of a cell; at least 1 ns) is exposed
/// communication on `lane`: a sliver of exposure does not shade a mostly hidden cell.
fn mostly_exposed(run: &LoadedRun, lane: usize, s: u64, e: u64) -> bool {
    let e = e.max(s + 1);
    2 * run.index.exposed_ns_between(lane, s, e) >= e - s
}

/// Whether an op passes a (lowercase) filter on its name or stage label.
pub fn matches_filter(op: &OpEvent, filter: &str) -> bool {
    filter.is_empty() || op.name.to_lowercase().contains(filter) || stage_label(op.stage, op.pass).contains(filter)
}

/// Smallest window: 1 µs.
const MIN_SPAN: u64 = 1_000;

/// Where the user is looking: the window, the selected lane and op, and the filter.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TimelineView {
    /// Selected lane.
    pub lane: usize,
    /// Selected op (position in the lane), if any.
    pub pos: Option<usize>,
    /// Window start, ns.
    pub t0: u64,
    /// Window length, ns (0 until fitted to a run).
    pub span: u64,
    /// Lowercase substring; ops not matching are drawn dimmed and skipped by moves.
    pub filter: String,
    /// The time ↑↓ keep while moving between lanes (the start of the op selected before
    /// the first of them), so moving down and back up returns to the same op.
    pub lane_cursor: Option<u64>,
}

impl TimelineView {
    /// Show the whole run and select its first op.
    pub fn fit(&mut self, run: &LoadedRun) {
        self.t0 = run.index.t_min;
        self.span = (run.index.t_max - run.index.t_min).max(MIN_SPAN);
        if self.lane >= run.index.lanes.len() {
            self.lane = 0;
        }
        if self.pos.is_none() && !run.index.lanes.is_empty() {
            self.pos = Some(0);
        }
    }

    /// Reset for a newly opened run.
    pub fn reset(&mut self, run: &LoadedRun) {
        *self = TimelineView { filter: std::mem::take(&mut self.filter), ..TimelineView::default() };
        self.fit(run);
    }

    /// The selected op's index into `trace.ops`.
    pub fn selected_op(&self, run: &LoadedRun) -> Option<usize> {
        let l = run.index.lanes.get(self.lane)?;
        l.ops.get(self.pos?).copied()
    }

    fn full_span(run: &LoadedRun) -> u64 {
        (run.index.t_max - run.index.t_min).max(MIN_SPAN)
    }

    /// Keep the window inside the run.
    fn clamp(&mut self, run: &LoadedRun) {
        let full = Self::full_span(run);
        self.span = self.span.clamp(MIN_SPAN, full);
        let max_t0 = run.index.t_min + (full - self.span);
        self.t0 = self.t0.clamp(run.index.t_min, max_t0);
    }

    /// Zoom by `factor` (< 1 zooms in) around the selected op, or the window's centre.
    pub fn zoom(&mut self, run: &LoadedRun, factor: f64) {
        let centre = match self.selected_op(run) {
            Some(i) => {
                let o = &run.trace.ops[i];
                o.start_ns / 2 + o.end_ns / 2
            }
            None => self.t0 + self.span / 2,
        };
        self.span = ((self.span as f64 * factor).round() as u64).max(MIN_SPAN);
        self.t0 = centre.saturating_sub(self.span / 2);
        self.clamp(run);
    }

    /// Move the window by `frac` of its width (negative: left).
    pub fn pan(&mut self, run: &LoadedRun, frac: f64) {
        let d = (self.span as f64 * frac.abs()).round() as u64;
        self.t0 = if frac < 0.0 { self.t0.saturating_sub(d) } else { self.t0.saturating_add(d) };
        self.clamp(run);
    }

    /// Move the window so that the selected op is visible.
    pub fn ensure_visible(&mut self, run: &LoadedRun) {
        if let Some(i) = self.selected_op(run) {
            let o = &run.trace.ops[i];
            if o.start_ns < self.t0 || o.start_ns >= self.t0 + self.span {
                self.t0 = o.start_ns.saturating_sub(self.span / 4);
                self.clamp(run);
            }
        }
    }

    /// Select the next (`+1`) or previous (`-1`) op in the lane that passes the filter.
    pub fn step_op(&mut self, run: &LoadedRun, dir: isize) {
        let Some(l) = run.index.lanes.get(self.lane) else { return };
        let mut p = self.pos.unwrap_or(0) as isize;
        loop {
            p += dir;
            if p < 0 || p >= l.ops.len() as isize {
                return;
            }
            if matches_filter(&run.trace.ops[l.ops[p as usize]], &self.filter) {
                self.pos = Some(p as usize);
                self.lane_cursor = None;
                self.ensure_visible(run);
                return;
            }
        }
    }

    /// Move to another lane, selecting the op that covers the cursor time there, else the
    /// one nearest to it. The cursor is the start of the op selected before the first lane
    /// move, kept over consecutive moves so that they do not drift.
    pub fn step_lane(&mut self, run: &LoadedRun, dir: isize) {
        let n = run.index.lanes.len() as isize;
        if n == 0 {
            return;
        }
        let t = self.lane_cursor.unwrap_or_else(|| self.selected_op(run).map_or(self.t0, |i| run.trace.ops[i].start_ns));
        self.lane = (self.lane as isize + dir).clamp(0, n - 1) as usize;
        self.pos = run.index.op_at(&run.trace, self.lane, t);
        self.lane_cursor = Some(t);
        self.ensure_visible(run);
    }

    /// Jump to the next communication op of the selected rank that starts after the
    /// selection (`exposed_only`: the next one with exposed time). Returns whether it moved.
    pub fn next_comm(&mut self, run: &LoadedRun, exposed_only: bool) -> bool {
        let Some(lane) = run.index.lanes.get(self.lane) else { return false };
        let t = self.selected_op(run).map_or(self.t0, |i| run.trace.ops[i].start_ns);
        let mut best: Option<(u64, usize, usize)> = None;
        for (li, l) in run.index.lanes.iter().enumerate() {
            if l.rank != lane.rank || l.stream != Stream::Comm {
                continue;
            }
            let from = l.ops.partition_point(|&i| run.trace.ops[i].start_ns <= t);
            let found = (from..l.ops.len()).find(|&p| {
                let o = &run.trace.ops[l.ops[p]];
                matches_filter(o, &self.filter) && (!exposed_only || run.index.exposed_ns(li, o) > 0)
            });
            if let Some(p) = found {
                let s = run.trace.ops[l.ops[p]].start_ns;
                if best.is_none_or(|b| s < b.0) {
                    best = Some((s, li, p));
                }
            }
        }
        match best {
            Some((_, li, p)) => {
                self.lane = li;
                self.pos = Some(p);
                self.lane_cursor = None;
                self.ensure_visible(run);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runs::RunSummary;
    use moelab::taxonomy::{Pass, Stage};

    fn op(rank: u32, stream: Stream, stage: Stage, s: u64, e: u64, name: &str) -> OpEvent {
        OpEvent { rank, step: 0, stream, stage, pass: Pass::Forward, name: name.into(), layer: None, chunk: None, start_ns: s, end_ns: e, flops: 0, bytes: 0, collective: None, host_ns: None, issue_ns: None, gemm_calls: None }
    }

    /// A cpu run of `world` ranks whose trace holds `ops`, loaded as the timeline sees it.
    fn loaded(world: u32, ops: Vec<OpEvent>) -> LoadedRun {
        LoadedRun::new("t".into(), None, RunSummary::default(), Trace { backend: "cpu".into(), world, ops, ..Trace::default() })
    }

    fn run() -> LoadedRun {
        loaded(1, vec![
            op(0, Stream::Compute, Stage::Gate, 0, 10_000, "gate"),
            op(0, Stream::Comm, Stage::AllToAll, 5_000, 20_000, "a2a.0"),
            op(0, Stream::Compute, Stage::ExpertGemm1, 30_000, 40_000, "gemm"),
            op(0, Stream::Comm, Stage::AllToAll, 32_000, 38_000, "a2a.1"),
            op(0, Stream::Comm, Stage::AllReduce, 50_000, 60_000, "ar"),
        ])
    }

    #[test]
    fn exposed_comm_is_comm_minus_compute() {
        let r = run();
        let comm = r.index.lane_of(0, Stream::Comm).expect("comm lane");
        assert_eq!(r.index.lanes[comm].exposed, vec![(10_000, 20_000), (50_000, 60_000)]);
        assert_eq!(r.index.exposed_ns(comm, &r.trace.ops[1]), 10_000);
        assert_eq!(r.index.exposed_ns(comm, &r.trace.ops[3]), 0);
        let over = r.index.overlapping(&r.trace, comm, &r.trace.ops[1]);
        assert_eq!(over, vec![(0, 5_000)]);
    }

    #[test]
    fn subtract_handles_holes_and_edges() {
        assert_eq!(subtract(&[(0, 100)], &[(10, 20), (50, 60)]), vec![(0, 10), (20, 50), (60, 100)]);
        assert_eq!(subtract(&[(0, 10), (20, 30)], &[(0, 30)]), Vec::<Interval>::new());
        assert_eq!(subtract(&[(5, 10)], &[]), vec![(5, 10)]);
    }

    #[test]
    fn next_comm_walks_comm_ops_in_time_order_and_can_skip_hidden_ones() {
        let r = run();
        let mut v = TimelineView::default();
        v.fit(&r);
        assert_eq!(v.selected_op(&r), Some(0));
        assert!(v.next_comm(&r, false));
        assert_eq!(v.selected_op(&r), Some(1));
        assert!(v.next_comm(&r, false));
        assert_eq!(v.selected_op(&r), Some(3));
        let mut w = v.clone();
        assert!(w.next_comm(&r, true));
        assert_eq!(w.selected_op(&r), Some(4), "a2a.1 is hidden behind gemm, so the exposed jump skips to ar");
        assert!(v.next_comm(&r, false));
        assert!(!v.next_comm(&r, false), "no comm op after the last");
    }

    #[test]
    fn zoom_and_pan_stay_inside_the_run() {
        let r = run();
        let mut v = TimelineView::default();
        v.fit(&r);
        assert_eq!((v.t0, v.span), (0, 60_000));
        v.zoom(&r, 0.25);
        assert_eq!(v.span, 15_000);
        v.pan(&r, -10.0);
        assert_eq!(v.t0, 0);
        v.pan(&r, 10.0);
        assert_eq!(v.t0, 45_000);
        v.zoom(&r, 100.0);
        assert_eq!((v.t0, v.span), (0, 60_000));
    }

    #[test]
    fn painting_gives_every_op_a_cell_and_marks_exposure() {
        let r = run();
        let comm = r.index.lane_of(0, Stream::Comm).expect("comm lane");
        let cells = paint_lane(&r, comm, 0, 60_000, 12);
        let ops: Vec<Option<usize>> = cells.iter().map(|c| c.map(|c| c.op)).collect();
        assert_eq!(ops, vec![None, Some(1), Some(1), Some(1), None, None, Some(3), Some(3), None, None, Some(4), Some(4)]);
        assert!(!cells[1].expect("op").exposed, "5-10 µs is under the gate");
        assert!(cells[2].expect("op").exposed);
        assert!(!cells[6].expect("op").exposed);
        assert!(cells[10].expect("op").exposed);
        // A 1-cell-wide view still shows something.
        assert!(paint_lane(&r, comm, 0, 60_000, 1)[0].is_some());
    }

    #[test]
    fn a_cell_is_shaded_exposed_only_when_most_of_its_comm_is() {
        let r = loaded(1, vec![
            // Cell 0 (0-10 µs): comm 73% hidden. Cell 1 (10-20 µs): comm 60% exposed.
            op(0, Stream::Compute, Stage::Gate, 0, 7_300, "gate"),
            op(0, Stream::Comm, Stage::AllToAll, 0, 20_000, "a2a"),
            op(0, Stream::Compute, Stage::ExpertGemm1, 10_000, 14_000, "gemm"),
            // Cell 2 (20-30 µs): a narrow, fully exposed op still shows as exposed.
            op(0, Stream::Comm, Stage::AllReduce, 22_000, 23_000, "ar"),
        ]);
        let comm = r.index.lane_of(0, Stream::Comm).expect("comm lane");
        assert_eq!(r.index.exposed_ns_between(comm, 0, 20_000), 2_700 + 6_000);
        let cells = paint_lane(&r, comm, 0, 30_000, 3);
        let exposed: Vec<bool> = cells.iter().map(|c| c.expect("op").exposed).collect();
        assert_eq!(exposed, vec![false, true, true]);
    }

    #[test]
    fn moving_between_lanes_picks_the_op_covering_the_cursor_time() {
        let r = loaded(2, vec![
            op(0, Stream::Compute, Stage::Gate, 0, 8_000, "w"),
            op(0, Stream::Compute, Stage::ExpertGemm1, 10_000, 20_000, "x"),
            op(0, Stream::Comm, Stage::AllToAll, 5_000, 15_000, "c1"),
            op(0, Stream::Comm, Stage::AllToAll, 16_000, 30_000, "c2"),
            op(1, Stream::Compute, Stage::Gate, 0, 2_000, "early"),
            op(1, Stream::Compute, Stage::Gate, 40_000, 41_000, "late"),
        ]);
        let mut v = TimelineView::default();
        v.fit(&r);
        v.step_op(&r, 1);
        assert_eq!(v.selected_op(&r), Some(1), "x");
        v.step_lane(&r, 1);
        assert_eq!(v.selected_op(&r), Some(2), "c1 covers x's start; c2 only starts after it");
        v.step_lane(&r, -1);
        assert_eq!(v.selected_op(&r), Some(1), "back up lands on x again, not on w (which covers c1's start)");
        v.step_lane(&r, 1);
        v.step_lane(&r, 1);
        assert_eq!(v.selected_op(&r), Some(4), "nothing covers 10 µs on rank 1: early ends 8 µs before it, late starts 30 µs after");
        v.step_op(&r, 1);
        v.step_lane(&r, -1);
        assert_eq!(v.selected_op(&r), Some(3), "from late (40 µs) the nearest comm op is c2, which ends at 30 µs");
    }

    #[test]
    fn filter_limits_moves() {
        let r = run();
        let mut v = TimelineView { filter: "a2a".into(), ..TimelineView::default() };
        v.fit(&r);
        v.step_lane(&r, 1);
        assert_eq!(v.selected_op(&r), Some(1));
        v.step_op(&r, 1);
        assert_eq!(v.selected_op(&r), Some(3));
        v.step_op(&r, 1);
        assert_eq!(v.selected_op(&r), Some(3), "ar does not match the filter");
    }
}

//! Pictures of a run as SVG, written into every run directory (`timeline.svg`,
//! `stages.svg`, `memory.svg`) and shown by the notebooks: a Gantt chart of one step, the
//! stage times as bars, memory at peak per category, and a line chart for sweeps. Plain SVG
//! text, so they open in any browser and need no plotting dependency.

use super::memory::N_CATEGORIES;
use super::Analysis;
use crate::taxonomy::{MemCategory, Stage, Stream};
use crate::trace::Trace;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Escape text for HTML and SVG.
pub fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

/// Most ranks drawn as bars in `memory.svg` (the busiest rank is always among them).
pub const MAX_MEMORY_BARS: usize = 16;

const PALETTE: [&str; 19] = [
    "#8c8c8c", "#bcbd22", "#17becf", "#2ca02c", "#9467bd", "#c5b0d5", "#e377c2", "#1f77b4", "#aec7e8", "#393b79", "#98df8a",
    "#7f7f7f", "#d62728", "#ff7f0e", "#ff9896", "#ffbb78", "#8c564b", "#f7b6d2", "#c7c7c7",
];

fn stage_colour(s: Stage) -> &'static str {
    PALETTE[Stage::ALL.iter().position(|x| *x == s).unwrap_or(0)]
}

/// The first measured step of `trace` as a Gantt chart: one row per (rank, stream), ops as
/// bars coloured by stage (communication in reds and oranges), hover titles with name and
/// duration; the title gives the step's window over ranks. At most 8 ranks are drawn.
pub fn timeline_svg(trace: &Trace, title: &str) -> String {
    let Some(step) = trace.ops.iter().map(|o| o.step).min() else {
        return format!("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"400\" height=\"30\"><text x=\"4\" y=\"20\">{}: no ops traced</text></svg>", esc(title));
    };
    let ops: Vec<_> = trace.ops.iter().filter(|o| o.step == step && o.rank < 8).collect();
    // The step's window over ranks (what summary.json's step time averages) when the trace
    // has step spans, else its ops' extent; the chart spans both.
    let spans: Vec<_> = trace.steps.iter().filter(|sp| sp.step == step).collect();
    let op_t0 = ops.iter().map(|o| o.start_ns).min().unwrap_or(0);
    let op_t1 = ops.iter().map(|o| o.end_ns).max().unwrap_or(1);
    let t0 = spans.iter().filter(|sp| sp.rank < 8).map(|sp| sp.start_ns).min().map_or(op_t0, |s| s.min(op_t0));
    let t1 = spans.iter().filter(|sp| sp.rank < 8).map(|sp| sp.end_ns).max().map_or(op_t1, |e| e.max(op_t1)).max(t0 + 1);
    let step_ns = match (spans.iter().map(|sp| sp.start_ns).min(), spans.iter().map(|sp| sp.end_ns).max()) {
        (Some(a), Some(b)) => b.saturating_sub(a),
        _ => op_t1.saturating_sub(op_t0),
    };
    let mut rows: Vec<(u32, Stream)> = ops.iter().map(|o| (o.rank, o.stream)).collect();
    rows.sort();
    rows.dedup();
    let (left, width, row_h, top) = (110.0, 820.0, 16.0, 24.0);
    let mut stages: Vec<Stage> = ops.iter().map(|o| o.stage).collect();
    stages.sort();
    stages.dedup();
    let legend_rows = stages.len().div_ceil(6) as f64;
    let height = top + rows.len() as f64 * row_h + 28.0 + legend_rows * 16.0;
    let mut s = String::new();
    let _ = write!(
        s,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" class=\"moelab-timeline\" width=\"{}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"11\"><text x=\"4\" y=\"14\" font-weight=\"bold\">{} (step {step}, {:.3} ms)</text>",
        left + width + 10.0, esc(title), step_ns as f64 / 1e6
    );
    for (i, (rank, stream)) in rows.iter().enumerate() {
        let y = top + i as f64 * row_h;
        let _ = write!(s, "<text x=\"4\" y=\"{}\">rank {rank} {}</text>", y + 11.0, stream.as_str());
    }
    let scale = width / (t1 - t0) as f64;
    for o in &ops {
        let row = rows.iter().position(|r| *r == (o.rank, o.stream)).unwrap_or(0);
        let x = left + (o.start_ns - t0) as f64 * scale;
        let w = (o.dur_ns() as f64 * scale).max(0.5);
        let _ = write!(
            s,
            "<rect x=\"{x:.2}\" y=\"{:.1}\" width=\"{w:.2}\" height=\"{:.1}\" fill=\"{}\"><title>{} ({}) {:.1} us</title></rect>",
            top + row as f64 * row_h + 1.0, row_h - 2.0, stage_colour(o.stage), esc(&o.name), o.stage, o.dur_ns() as f64 / 1e3
        );
    }
    let axis_y = top + rows.len() as f64 * row_h + 12.0;
    let _ = write!(s, "<text x=\"{left}\" y=\"{axis_y}\">0 ms</text><text x=\"{}\" y=\"{axis_y}\" text-anchor=\"end\">{:.3} ms</text>", left + width, (t1 - t0) as f64 / 1e6);
    for (i, st) in stages.iter().enumerate() {
        let x = 4.0 + (i % 6) as f64 * 150.0;
        let y = axis_y + 8.0 + (i / 6) as f64 * 16.0;
        let _ = write!(s, "<rect x=\"{x}\" y=\"{y}\" width=\"10\" height=\"10\" fill=\"{}\"/><text x=\"{}\" y=\"{}\">{st}{}</text>", stage_colour(*st), x + 14.0, y + 9.0, if st.is_comm() { " (comm)" } else { "" });
    }
    s.push_str("</svg>");
    s
}

const MEM_COLOURS: [&str; N_CATEGORIES] = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#d62728", "#8c564b", "#e377c2"];

/// Horizontal stacked bars of bytes at peak per memory category, one bar per label.
pub fn memory_bars_svg(bars: &[(String, [u64; N_CATEGORIES])]) -> String {
    let (left, width, bar_h, top) = (220.0, 600.0, 18.0, 24.0);
    let max = bars.iter().map(|(_, b)| b.iter().sum::<u64>()).max().unwrap_or(1).max(1) as f64;
    let height = top + bars.len() as f64 * (bar_h + 4.0) + 40.0;
    let mut s = String::new();
    let _ = write!(s, "<svg xmlns=\"http://www.w3.org/2000/svg\" class=\"moelab-memory\" width=\"{}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"11\"><text x=\"4\" y=\"14\" font-weight=\"bold\">memory at peak per category (MiB)</text>", left + width + 80.0);
    for (i, (label, cats)) in bars.iter().enumerate() {
        let y = top + i as f64 * (bar_h + 4.0);
        let _ = write!(s, "<text x=\"4\" y=\"{}\">{}</text>", y + 13.0, esc(label));
        let mut x = left;
        for c in MemCategory::ALL {
            let b = cats[c.index()];
            let w = b as f64 / max * width;
            if w > 0.0 {
                let _ = write!(s, "<rect x=\"{x:.2}\" y=\"{y}\" width=\"{w:.2}\" height=\"{bar_h}\" fill=\"{}\"><title>{}: {:.3} MiB</title></rect>", MEM_COLOURS[c.index()], c.as_str(), mib(b));
            }
            x += w;
        }
        let _ = write!(s, "<text x=\"{:.2}\" y=\"{}\">{:.2}</text>", x + 4.0, y + 13.0, mib(cats.iter().sum()));
    }
    let ly = top + bars.len() as f64 * (bar_h + 4.0) + 12.0;
    for c in MemCategory::ALL {
        let x = 4.0 + c.index() as f64 * 120.0;
        let _ = write!(s, "<rect x=\"{x}\" y=\"{ly}\" width=\"10\" height=\"10\" fill=\"{}\"/><text x=\"{}\" y=\"{}\">{}</text>", MEM_COLOURS[c.index()], x + 14.0, ly + 9.0, c.as_str());
    }
    s.push_str("</svg>");
    s
}

/// A line chart over categorical x labels: one polyline with markers per series.
pub fn line_chart_svg(title: &str, labels: &[String], series: &[(&str, &str, Vec<f64>)]) -> String {
    let (left, top, width, height) = (60.0, 30.0, 600.0, 220.0);
    let max = series.iter().flat_map(|(_, _, v)| v.iter().copied()).filter(|v| v.is_finite()).fold(0.0f64, f64::max).max(1e-9) * 1.1;
    let n = labels.len().max(1);
    let x_of = |i: usize| if n == 1 { left + width / 2.0 } else { left + i as f64 * width / (n - 1) as f64 };
    let y_of = |v: f64| top + height - v / max * height;
    let mut s = String::new();
    let _ = write!(s, "<svg xmlns=\"http://www.w3.org/2000/svg\" class=\"moelab-sweep\" width=\"{}\" height=\"{}\" font-family=\"sans-serif\" font-size=\"11\"><text x=\"4\" y=\"14\" font-weight=\"bold\">{}</text>", left + width + 180.0, top + height + 50.0, esc(title));
    let _ = write!(s, "<line x1=\"{left}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"#444\"/><line x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{}\" stroke=\"#444\"/>", top + height, left + width, top + height, top + height);
    for k in 0..=4 {
        let v = max * k as f64 / 4.0;
        let _ = write!(s, "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{v:.3}</text>", left - 4.0, y_of(v) + 4.0);
    }
    for (i, l) in labels.iter().enumerate() {
        let _ = write!(s, "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>", x_of(i), top + height + 16.0, esc(l));
    }
    for (j, (name, colour, values)) in series.iter().enumerate() {
        let pts: Vec<String> = values.iter().enumerate().filter(|(_, v)| v.is_finite()).map(|(i, v)| format!("{:.1},{:.1}", x_of(i), y_of(*v))).collect();
        let _ = write!(s, "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\" points=\"{}\"/>", pts.join(" "));
        for (i, v) in values.iter().enumerate().filter(|(_, v)| v.is_finite()) {
            let _ = write!(s, "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{colour}\"><title>{}: {v:.3}</title></circle>", x_of(i), y_of(*v), esc(name));
        }
        let ly = top + 10.0 + j as f64 * 16.0;
        let _ = write!(s, "<rect x=\"{}\" y=\"{ly}\" width=\"10\" height=\"10\" fill=\"{colour}\"/><text x=\"{}\" y=\"{}\">{}</text>", left + width + 20.0, left + width + 34.0, ly + 9.0, esc(name));
    }
    s.push_str("</svg>");
    s
}

/// The stages as horizontal bars of time per rank and step, longest first, communication
/// stages hatched; each bar labelled with its milliseconds and share of the step.
pub fn stages_svg(a: &Analysis, title: &str) -> String {
    let mut stages: Vec<_> = a.stages.iter().filter(|s| s.total_ns > 0).collect();
    stages.sort_by(|x, y| y.total_ns.cmp(&x.total_ns));
    let (left, width, bar_h, top) = (130.0, 560.0, 14.0, 40.0);
    let per = |ns: u64| a.per_rank_step(ns) / 1e6;
    let max = stages.first().map_or(1e-9, |s| per(s.total_ns)).max(1e-9);
    let height = top + stages.len() as f64 * (bar_h + 3.0) + 30.0;
    let mut s = String::new();
    let _ = write!(
        s,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" class=\"moelab-stage-bars\" width=\"{}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"11\"><defs><pattern id=\"comm\" width=\"4\" height=\"4\" patternUnits=\"userSpaceOnUse\"><path d=\"M0,4 L4,0\" stroke=\"#fff\" stroke-width=\"1\"/></pattern></defs><text x=\"4\" y=\"14\" font-weight=\"bold\">{}</text><text x=\"4\" y=\"30\">ms per rank and step (step {:.3} ms, {} ranks x {} steps); hatched: communication</text>",
        left + width + 130.0, esc(title), a.step_time_ns / 1e6, a.overlap.len(), a.steps
    );
    for (i, st) in stages.iter().enumerate() {
        let y = top + i as f64 * (bar_h + 3.0);
        let ms = per(st.total_ns);
        let w = (ms / max * width).max(0.5);
        let _ = write!(s, "<text x=\"4\" y=\"{}\">{}</text>", y + 11.0, esc(&st.label));
        let _ = write!(s, "<rect x=\"{left}\" y=\"{y}\" width=\"{w:.2}\" height=\"{bar_h}\" fill=\"{}\"><title>{}: {} ops, {ms:.3} ms per rank and step</title></rect>", stage_colour(st.stage), esc(&st.label), st.count);
        if st.stage.is_comm() {
            let _ = write!(s, "<rect x=\"{left}\" y=\"{y}\" width=\"{w:.2}\" height=\"{bar_h}\" fill=\"url(#comm)\"/>");
        }
        let share = if st.share > 0.0 { format!(" ({:.1}%)", 100.0 * st.share) } else { String::new() };
        let _ = write!(s, "<text x=\"{:.2}\" y=\"{}\">{ms:.3} ms{share}</text>", left + w + 4.0, y + 11.0);
    }
    s.push_str("</svg>");
    s
}

/// Write the run's pictures into `dir`: `timeline.svg` (first traced step, up to 8 ranks),
/// `stages.svg` and `memory.svg` (memory at peak, up to [`MAX_MEMORY_BARS`] ranks: the
/// busiest and the lowest-numbered others). Returns the files written.
pub fn write_charts(a: &Analysis, trace: &Trace, title: &str, dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut ranks: Vec<_> = a.memory.ranks.iter().collect();
    if ranks.len() > MAX_MEMORY_BARS {
        let busiest = ranks.iter().max_by_key(|r| r.peak_total).map(|r| r.rank);
        let mut kept: Vec<_> = ranks.iter().copied().filter(|r| Some(r.rank) != busiest).take(MAX_MEMORY_BARS - 1).collect();
        kept.extend(ranks.iter().copied().filter(|r| Some(r.rank) == busiest));
        kept.sort_by_key(|r| r.rank);
        ranks = kept;
    }
    let bars: Vec<(String, [u64; N_CATEGORIES])> = ranks.iter().map(|r| (format!("rank {}", r.rank), r.at_peak)).collect();
    let files = [
        ("timeline.svg", timeline_svg(trace, title)),
        ("stages.svg", stages_svg(a, title)),
        ("memory.svg", memory_bars_svg(&bars)),
    ];
    let mut written = Vec::new();
    for (name, svg) in files {
        let path = dir.join(name);
        std::fs::write(&path, svg)?;
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::MemEvent;

    #[test]
    fn memory_chart_keeps_the_busiest_rank_among_at_most_sixteen() {
        let mut trace = Trace { backend: "cpu".into(), world: 20, ..Trace::default() };
        for rank in 0..20u32 {
            let delta = if rank == 17 { 9 << 20 } else { 1 << 20 };
            trace.memory.push(MemEvent { rank, t_ns: 0, category: MemCategory::Params, delta });
        }
        let a = super::super::analyze(&trace);
        let dir = tempfile::tempdir().expect("tempdir");
        let files = write_charts(&a, &trace, "t", dir.path()).expect("written");
        assert_eq!(files.len(), 3);
        let memory = std::fs::read_to_string(dir.path().join("memory.svg")).expect("memory.svg");
        assert_eq!(memory.matches(">rank ").count(), MAX_MEMORY_BARS, "{memory}");
        assert!(memory.contains(">rank 17<") && memory.contains(">rank 0<") && !memory.contains(">rank 16<"), "{memory}");
        // Without ops the timeline says so instead of drawing an empty chart.
        assert!(std::fs::read_to_string(dir.path().join("timeline.svg")).expect("timeline").contains("no ops traced"));
    }

    #[test]
    fn the_timeline_title_gives_the_step_window_over_ranks() {
        use crate::taxonomy::{Pass, Stage, Stream};
        use crate::trace::{OpEvent, StepSpan};
        let op = |rank: u32, start_ns: u64, end_ns: u64| OpEvent {
            rank, step: 1, stream: Stream::Compute, stage: Stage::ExpertGemm1, pass: Pass::Forward, name: "g".into(), layer: None, chunk: None,
            start_ns, end_ns, flops: 0, bytes: 0, collective: None, host_ns: None, issue_ns: None, gemm_calls: None,
        };
        let mut trace = Trace { backend: "cpu".into(), world: 2, ops: vec![op(0, 1_000_000, 2_000_000), op(1, 1_500_000, 3_000_000)], ..Trace::default() };
        // Ops alone: their extent, 2 ms.
        assert!(timeline_svg(&trace, "t").contains("(step 1, 2.000 ms)"));
        // Step spans (a rank idles after its ops): the window over ranks, 4 ms.
        trace.steps = vec![StepSpan { rank: 0, step: 1, start_ns: 500_000, end_ns: 4_500_000 }, StepSpan { rank: 1, step: 1, start_ns: 1_000_000, end_ns: 3_500_000 }];
        assert!(timeline_svg(&trace, "t").contains("(step 1, 4.000 ms)"));
    }
}

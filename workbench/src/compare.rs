//! The ablation view's numbers: the same headline figures for two runs, normalised per rank
//! and step so that runs of different world sizes compare, with the relative difference and
//! whether it is an improvement.

use crate::loaded::LoadedRun;
use crate::units::mib;
use moelab::taxonomy::MemCategory;

/// Whether a larger value of a metric is better or worse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Better {
    /// Time, bytes: lower is better.
    Lower,
    /// Overlap: higher is better.
    Higher,
}

/// One compared metric.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricRow {
    /// What is measured, with its unit.
    pub label: String,
    /// Value in run A.
    pub a: f64,
    /// Value in run B.
    pub b: f64,
    /// Which direction is an improvement.
    pub better: Better,
}

/// How a difference reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Within [`SIGNIFICANT`] of each other.
    Same,
    /// B improves on A.
    Better,
    /// B is worse than A.
    Worse,
}

/// Relative difference below which two values count as the same (5%).
pub const SIGNIFICANT: f64 = 0.05;

impl MetricRow {
    /// (B - A) / A, or `None` when A is 0.
    pub fn relative(&self) -> Option<f64> {
        (self.a.abs() > f64::EPSILON).then(|| (self.b - self.a) / self.a.abs())
    }

    /// Whether B is better, worse or about the same as A.
    pub fn verdict(&self) -> Verdict {
        let d = match self.relative() {
            Some(d) => d,
            None if self.b.abs() <= f64::EPSILON => 0.0,
            None => 1.0,
        };
        if d.abs() < SIGNIFICANT {
            Verdict::Same
        } else if (d < 0.0) == (self.better == Better::Lower) {
            Verdict::Better
        } else {
            Verdict::Worse
        }
    }
}

/// Whether A and B are the same run: the same run directory, or (neither having one) the
/// same label.
pub fn same_run(a: &LoadedRun, b: &LoadedRun) -> bool {
    let canon = |d: &std::path::PathBuf| std::fs::canonicalize(d).unwrap_or_else(|_| d.clone());
    match (&a.dir, &b.dir) {
        (Some(x), Some(y)) => canon(x) == canon(y),
        (None, None) => a.label == b.label,
        _ => false,
    }
}

/// The backend, world and model sizes in which A and B differ (fields either run leaves
/// unknown are skipped), e.g. `["backend sim vs cpu", "world 16 vs 4"]`.
pub fn differences(a: &LoadedRun, b: &LoadedRun) -> Vec<String> {
    let mut out = Vec::new();
    let (sa, sb) = (&a.summary, &b.summary);
    if !sa.backend.is_empty() && !sb.backend.is_empty() && sa.backend != sb.backend {
        out.push(format!("backend {} vs {}", sa.backend, sb.backend));
    }
    if sa.world > 0 && sb.world > 0 && sa.world != sb.world {
        out.push(format!("world {} vs {}", sa.world, sb.world));
    }
    if let (Some(ma), Some(mb)) = (&a.model, &b.model) {
        let sizes = [
            ("d_model", ma.d_model, mb.d_model),
            ("d_ffn", ma.d_ffn, mb.d_ffn),
            ("n_experts", ma.n_experts, mb.n_experts),
            ("top_k", ma.top_k, mb.top_k),
            ("n_layers", ma.n_layers, mb.n_layers),
        ];
        out.extend(sizes.iter().filter(|(_, x, y)| x != y).map(|(name, x, y)| format!("{name} {x} vs {y}")));
    }
    out
}

/// A one-line warning when A and B differ in backend, world or model sizes, e.g. "runs
/// differ: backend sim vs cpu, world 16 vs 4: the figures are not like for like".
pub fn mismatch_warning(a: &LoadedRun, b: &LoadedRun) -> Option<String> {
    let d = differences(a, b);
    (!d.is_empty()).then(|| format!("runs differ: {}: the figures are not like for like", d.join(", ")))
}

/// Comm time, exposed comm (ms per rank and step) and overlap of a run.
fn comm_figures(r: &LoadedRun) -> (f64, f64, f64) {
    let a = &r.analysis;
    (a.per_rank_step(a.comm_ns()) / 1e6, a.per_rank_step(a.exposed_comm_ns()) / 1e6, a.overall_overlap())
}

/// The metrics of A and B side by side: step time, communication, overlap, peak memory and
/// its categories, then every stage's time per rank and step.
pub fn compare(a: &LoadedRun, b: &LoadedRun) -> Vec<MetricRow> {
    let row = |label: &str, a: f64, b: f64, better| MetricRow { label: label.to_string(), a, b, better };
    let (ca, ea, oa) = comm_figures(a);
    let (cb, eb, ob) = comm_figures(b);
    let worst = |r: &LoadedRun| r.analysis.peak_memory_rank().copied().unwrap_or_default();
    let (ma, mb) = (worst(a), worst(b));
    let mut rows = vec![
        row("step time (ms)", a.step_time_ms(), b.step_time_ms(), Better::Lower),
        row("comm / rank / step (ms)", ca, cb, Better::Lower),
        row("exposed comm (ms)", ea, eb, Better::Lower),
        row("overlap (%)", 100.0 * oa, 100.0 * ob, Better::Higher),
        row("peak memory (MiB)", mib(ma.peak_total), mib(mb.peak_total), Better::Lower),
    ];
    for c in MemCategory::ALL {
        let (x, y) = (ma.at_peak[c.index()], mb.at_peak[c.index()]);
        if x > 0 || y > 0 {
            rows.push(row(&format!("  {} (MiB)", c.as_str()), mib(x), mib(y), Better::Lower));
        }
    }
    let per = |r: &LoadedRun| (r.analysis.overlap.len().max(1) as f64) * (r.analysis.steps.max(1) as f64) * 1e6;
    let (pa, pb) = (per(a), per(b));
    let mut labels: Vec<(usize, String)> = Vec::new();
    for (k, s) in a.analysis.stages.iter().chain(&b.analysis.stages).enumerate() {
        if !labels.iter().any(|(_, l)| *l == s.label) {
            labels.push((k, s.label.clone()));
        }
    }
    for (_, label) in labels {
        let t = |r: &LoadedRun, p: f64| r.analysis.stages.iter().find(|s| s.label == label).map_or(0.0, |s| s.total_ns as f64 / p);
        rows.push(row(&format!("stage {label} (ms)"), t(a, pa), t(b, pb), Better::Lower));
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_follow_the_direction_of_improvement() {
        let r = |a, b, better| MetricRow { label: String::new(), a, b, better };
        assert_eq!(r(10.0, 8.0, Better::Lower).verdict(), Verdict::Better);
        assert_eq!(r(10.0, 12.0, Better::Lower).verdict(), Verdict::Worse);
        assert_eq!(r(10.0, 10.3, Better::Lower).verdict(), Verdict::Same);
        assert_eq!(r(40.0, 60.0, Better::Higher).verdict(), Verdict::Better);
        assert_eq!(r(0.0, 0.0, Better::Lower).verdict(), Verdict::Same);
        assert_eq!(r(0.0, 1.0, Better::Lower).verdict(), Verdict::Worse);
        assert_eq!(r(10.0, 8.0, Better::Lower).relative(), Some(-0.2));
    }

    fn run(label: &str, backend: &str, world: usize) -> LoadedRun {
        let summary = crate::runs::RunSummary { backend: backend.into(), world, ..Default::default() };
        LoadedRun::new(label.into(), None, summary, moelab::trace::Trace::default())
    }

    #[test]
    fn runs_of_other_backends_worlds_or_model_sizes_are_flagged() {
        let (a, b) = (run("a", "sim", 16), run("b", "cpu", 4));
        let w = mismatch_warning(&a, &b).expect("a warning");
        assert_eq!(w, "runs differ: backend sim vs cpu, world 16 vs 4: the figures are not like for like");
        assert_eq!(mismatch_warning(&run("a", "cpu", 4), &run("b", "cpu", 4)), None);
        // Unknown fields (older summaries) are not a difference.
        assert_eq!(mismatch_warning(&run("a", "", 0), &run("b", "cpu", 4)), None);
        let spec: moelab::spec::ExperimentSpec = toml::from_str(&crate::composer::templates::template_toml("topk")).expect("template");
        let (mut a, mut b) = (run("a", "cpu", 4), run("b", "cpu", 4));
        a.model = Some(spec.model.clone());
        b.model = Some(moelab::spec::ModelSpec { d_model: spec.model.d_model * 2, ..spec.model });
        let w = mismatch_warning(&a, &b).expect("a warning");
        assert!(w.starts_with("runs differ: d_model ") && w.contains(" vs "), "{w}");
    }

    #[test]
    fn a_run_is_the_same_as_itself_only() {
        assert!(same_run(&run("a", "cpu", 4), &run("a", "cpu", 4)));
        assert!(!same_run(&run("a", "cpu", 4), &run("b", "cpu", 4)));
        let (mut a, mut b) = (run("x", "cpu", 4), run("y", "cpu", 4));
        a.dir = Some("runs/20260101-a".into());
        b.dir = Some("runs/20260101-a".into());
        assert!(same_run(&a, &b), "one directory, whatever the labels");
        b.dir = Some("runs/20260102-b".into());
        assert!(!same_run(&a, &b));
    }
}

//! Text for `moelab predict`: one block per run (step line, then one line per stage) and
//! the rows of the predicted-vs-measured table of `docs/benchmarks.md`.

use super::RunPrediction;
use crate::analysis::prediction::{StageComparison, SMALL_SHARE, STAGE_TARGET, STEP_TARGET};
use std::fmt::Write;

fn pct(x: f64) -> String {
    format!("{:+.1}%", 100.0 * x)
}

fn met(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "not met"
    }
}

fn opt_ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_string(), |x| format!("{x:.3}"))
}

/// `name (device, profile p)`: how a run is named in reports.
fn run_title(p: &RunPrediction) -> String {
    let device = p.device.clone().unwrap_or_else(|| format!("{}, no GPU recorded", p.comparison.measured_backend));
    let imbalance = p.dropless_imbalance.map(|i| format!(", dropless imbalance {i:.3}")).unwrap_or_default();
    let kept = p.kept_share.filter(|k| *k < 0.9995).map(|k| format!(", kept {k:.3} of assignments")).unwrap_or_default();
    let ranks = p.rank_loads.as_ref().map(|l| format!(", rank loads {}", l.iter().map(|x| format!("{x:.3}")).collect::<Vec<_>>().join("/"))).unwrap_or_default();
    format!("{} ({device}, profile {}{imbalance}{kept}{ranks})", p.name, p.profile)
}

/// The block for one run: step time with the 15% target, one line per stage with the 25%
/// target and the small-stage mark, stages present on one side only, the counts, and with
/// several ranks each rank's stream times and the overlap.
pub fn render_text(p: &RunPrediction) -> String {
    let c = &p.comparison;
    let (mb, pb) = (&c.measured_backend, &c.predicted_backend);
    let mut s = String::new();
    let _ = writeln!(s, "{}: {}", p.dir.display(), run_title(p));
    let _ = writeln!(
        s,
        "  {mb} {:.3} ms, {pb} {:.3} ms, error {} (target {:.0}%: {}); step times from {}",
        c.measured_step_ms, c.predicted_step_ms, pct(c.step_error), 100.0 * STEP_TARGET, met(c.step_within), c.step_source.as_str()
    );
    let (mh, ph) = (format!("{mb} ms/step"), format!("{pb} ms/step"));
    let _ = writeln!(s, "  {:<18} {:>14} {:>14} {:>9} {:>7}", "stage", mh, ph, "error", "share");
    for st in &c.stages {
        let _ = writeln!(s, "  {}", stage_line(st, mb, pb));
    }
    let only = |it: &mut dyn Iterator<Item = &StageComparison>| it.map(|x| x.label.clone()).collect::<Vec<_>>();
    let (m_only, p_only) = (only(&mut c.measured_only()), only(&mut c.predicted_only()));
    if !m_only.is_empty() {
        let _ = writeln!(s, "  only in {mb}: {}", m_only.join(", "));
    }
    if !p_only.is_empty() {
        let _ = writeln!(s, "  only in {pb}: {}", p_only.join(", "));
    }
    let _ = writeln!(
        s,
        "  stages >= {:.0}% of step within {:.0}%: {}/{}; small stages (< {:.0}%) within {:.0}%: {}/{}",
        100.0 * SMALL_SHARE, 100.0 * STAGE_TARGET, c.big.within, c.big.compared, 100.0 * SMALL_SHARE, 100.0 * STAGE_TARGET, c.small.within, c.small.compared
    );
    if !c.ranks.is_empty() {
        let busy = |m: f64, p: Option<f64>| format!("{m:.3} / {}", opt_ms(p));
        let _ = writeln!(s, "  per rank, stream busy ms/step ({mb} / {pb}):");
        for r in &c.ranks {
            let _ = writeln!(s, "    rank {:<3} compute {:<22} comm {}", r.rank, busy(r.measured_compute_ms, r.predicted_compute_ms), busy(r.measured_comm_ms, r.predicted_comm_ms));
        }
    }
    if let Some(o) = &c.overlap {
        let (m, q) = (&o.measured, &o.predicted);
        let pair = |a: f64, b: f64| format!("{a:.3} / {b:.3}");
        let share = |a: f64, b: f64| format!("{:.0}% / {:.0}%", 100.0 * a, 100.0 * b);
        let _ = writeln!(s, "  overlap, ms/step averaged over ranks ({mb} / {pb}):");
        let _ = writeln!(
            s,
            "    comm {}, hidden under compute {} ({}), exposed {}{}",
            pair(m.comm_ms, q.comm_ms),
            pair(m.hidden_ms, q.hidden_ms),
            share(m.hidden_share(), q.hidden_share()),
            pair(m.exposed_ms, q.exposed_ms),
            o.exposed_error().map(|e| format!(" (error {})", pct(e))).unwrap_or_default()
        );
        if m.a2a_ms > 0.0 {
            let _ = writeln!(s, "    all-to-all {}, hidden {} ({})", pair(m.a2a_ms, q.a2a_ms), pair(m.a2a_hidden_ms, q.a2a_hidden_ms), share(m.a2a_hidden_share(), q.a2a_hidden_share()));
        }
    }
    if let Some(dir) = &p.sim_dir {
        let _ = writeln!(s, "  sim run directory: {}", dir.display());
    }
    s
}

/// One stage line: label, measured and predicted ms per step, error, share, marks.
fn stage_line(st: &StageComparison, mb: &str, pb: &str) -> String {
    let error = match (st.error, st.measured_ms, st.predicted_ms) {
        (Some(e), _, _) => pct(e),
        (None, Some(_), Some(_)) => "n/a".into(),
        _ => "-".into(),
    };
    let mut marks = Vec::new();
    if st.small {
        marks.push("small".to_string());
    }
    match (st.within, st.measured_ms, st.predicted_ms) {
        (Some(false), _, _) => marks.push(format!("OUTSIDE {:.0}%", 100.0 * STAGE_TARGET)),
        (_, None, _) => marks.push(format!("only in {pb}")),
        (_, _, None) => marks.push(format!("only in {mb}")),
        _ => {}
    }
    if let (Some(w), Some(t)) = (st.measured_wait_ms, st.transfer_error) {
        marks.push(format!("({mb} waits {w:.3} ms for the last member; transfer alone {})", pct(t)));
    }
    format!(
        "{:<18} {:>14} {:>14} {:>9} {:>6.1}%  {}",
        st.label, opt_ms(st.measured_ms), opt_ms(st.predicted_ms), error, 100.0 * st.share, marks.join("  ")
    )
    .trim_end()
    .to_string()
}

/// Milliseconds as the docs tables write them: thousands separators and no decimals from
/// 100 ms, two decimals below.
fn ms_docs(x: f64) -> String {
    if x.abs() < 100.0 {
        return format!("{x:.2}");
    }
    let digits = format!("{:.0}", x.abs());
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    if x < 0.0 {
        format!("-{out}")
    } else {
        out
    }
}

/// The header and separator of the docs table.
pub fn markdown_header() -> String {
    format!(
        "| run | measured step (ms) | sim step (ms) | error | exposed comm ms/step (measured / sim) | worst stage >= {share:.0}% of step | small stages within {t:.0}% | small stages outside {t:.0}% |\n| --- | --- | --- | --- | --- | --- | --- | --- |\n",
        share = 100.0 * SMALL_SHARE,
        t = 100.0 * STAGE_TARGET
    )
}

/// One row of the docs table for `p`.
pub fn markdown_row(p: &RunPrediction) -> String {
    let c = &p.comparison;
    let worst = c.worst_big().map_or_else(|| "none".to_string(), |w| format!("{} {}", w.label, pct(w.error.unwrap_or(0.0))));
    let outside: Vec<String> = c.small_outside().map(|s| format!("{} {:+.0}%", s.label, 100.0 * s.error.unwrap_or(0.0))).collect();
    let exposed = c.overlap.map_or_else(|| "-".to_string(), |o| format!("{} / {}", ms_docs(o.measured.exposed_ms), ms_docs(o.predicted.exposed_ms)));
    format!(
        "| {} | {} | {} | {} | {} | {} | {}/{} | {} |\n",
        run_title(p),
        ms_docs(c.measured_step_ms),
        ms_docs(c.predicted_step_ms),
        pct(c.step_error),
        exposed,
        worst,
        c.small.within,
        c.small.compared,
        if outside.is_empty() { "none".to_string() } else { outside.join(", ") }
    )
}

#[cfg(test)]
mod tests {
    use super::ms_docs;

    #[test]
    fn docs_milliseconds_group_thousands_from_100_ms() {
        assert_eq!(ms_docs(1966.4), "1,966");
        assert_eq!(ms_docs(123.6), "124");
        assert_eq!(ms_docs(1_234_567.0), "1,234,567");
        assert_eq!(ms_docs(64.2), "64.20");
    }
}

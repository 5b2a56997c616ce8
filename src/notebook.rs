//! The notebook API: build an experiment from TOML, sweep its fields, run every point and
//! show the results as HTML tables and SVG charts (timeline Gantt, memory bars, sweep curve).
//!
//! ```no_run
//! use moelab::notebook::Experiment;
//! let exp = Experiment::from_file("experiments/seeds/mpmoe.toml")?.sweep("chunks", [1, 2, 4]);
//! let runs = exp.run()?;
//! println!("{runs}");          // plain-text table
//! let html = runs.to_html();   // tables and charts, as a notebook shows them
//! # Ok::<(), moelab::notebook::NotebookError>(())
//! ```
//!
//! In the moelab Jupyter kernel a `Runs` value at the end of a cell displays itself through
//! evcxr's display protocol ([`Runs::evcxr_display`]). The kernel's `%%experiment` magic
//! uses the same renderers. Nothing here knows about Jupyter messages.

use crate::analysis::memory::N_CATEGORIES;
/// The charts, shared with every run directory (`timeline.svg`, `memory.svg`, ...).
pub use crate::analysis::charts::{esc, line_chart_svg, memory_bars_svg, timeline_svg};
use crate::run::compare::{self, CompareRow};
use crate::run::{RunError, RunHooks, RunOutcome};
use crate::spec::SpecError;
use crate::spec::ExperimentSpec;
use crate::taxonomy::{MemCategory, Stage};
use std::fmt::{self, Write as _};

/// polars' DataFrame, as [`Runs::frame`] returns it (nameable in cells without a polars dep).
pub use polars::prelude::DataFrame;
use std::path::{Path, PathBuf};

/// Why a notebook experiment could not be built or run.
#[derive(Debug, thiserror::Error)]
pub enum NotebookError {
    /// The TOML does not parse, or a resulting spec does not validate.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// A sweep or override names a field that is not there or not unique.
    #[error("sweep key {key:?}: {message}")]
    Key {
        /// The key as given.
        key: String,
        /// What is wrong and how to fix it.
        message: String,
    },
    /// A run failed (its run directory keeps what was measured).
    #[error("run {label}: {source}")]
    Run {
        /// The sweep point's label.
        label: String,
        /// The run error.
        source: RunError,
    },
    /// A file could not be read.
    #[error("cannot read {path}: {message}")]
    Io {
        /// Path.
        path: String,
        /// OS error.
        message: String,
    },
}

/// An experiment with optional overrides and sweeps; [`Experiment::run`] runs every point.
#[derive(Debug, Clone)]
pub struct Experiment {
    base: toml::Table,
    overrides: Vec<(String, toml::Value)>,
    sweeps: Vec<(String, Vec<toml::Value>)>,
    runs_root: PathBuf,
}

/// One point of a sweep: its settings and the validated spec.
#[derive(Debug, Clone)]
pub struct Point {
    /// `key=value` pairs joined by spaces; the experiment name when nothing is swept.
    pub label: String,
    /// (resolved dotted key, value as TOML) per swept field.
    pub settings: Vec<(String, String)>,
    /// The spec to run.
    pub spec: ExperimentSpec,
}

impl Experiment {
    /// An experiment from spec TOML text (validated now, so errors show at once).
    pub fn from_toml(text: &str) -> Result<Experiment, NotebookError> {
        crate::spec::from_toml_str(text)?;
        let base: toml::Table = text.parse().map_err(|e: toml::de::Error| SpecError::Parse {
            message: e.message().to_string(),
            location: None,
            file: None,
        })?;
        Ok(Experiment { base, overrides: Vec::new(), sweeps: Vec::new(), runs_root: crate::run::default_runs_root() })
    }

    /// An experiment from a spec file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Experiment, NotebookError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| NotebookError::Io { path: path.display().to_string(), message: e.to_string() })?;
        Experiment::from_toml(&text).map_err(|e| match e {
            NotebookError::Spec(s) => NotebookError::Spec(s.in_file(path)),
            other => other,
        })
    }

    /// Set one field for every point. `key` is dotted (`layout.ep`, `ted.duplicate_dropping`) or
    /// a bare field name found in exactly one section (`ep`, `chunks`).
    pub fn set(mut self, key: &str, value: impl Into<toml::Value>) -> Experiment {
        self.overrides.push((key.to_string(), value.into()));
        self
    }

    /// Run once per value of `key` (several sweeps multiply).
    pub fn sweep<V: Into<toml::Value>>(mut self, key: &str, values: impl IntoIterator<Item = V>) -> Experiment {
        self.sweeps.push((key.to_string(), values.into_iter().map(Into::into).collect()));
        self
    }

    /// Where run directories go (default `$MOELAB_RUNS_DIR`, else `runs/` under the working
    /// directory).
    pub fn runs_root(mut self, dir: impl Into<PathBuf>) -> Experiment {
        self.runs_root = dir.into();
        self
    }

    /// The keys swept, in order.
    pub fn sweep_keys(&self) -> Vec<String> {
        self.sweeps.iter().map(|(k, _)| k.clone()).collect()
    }

    /// Every point of the sweep (one when nothing is swept), validated.
    pub fn points(&self) -> Result<Vec<Point>, NotebookError> {
        let mut base = self.base.clone();
        for (key, value) in &self.overrides {
            let path = self.resolve_key(key)?;
            set_path(&mut base, &path, value.clone());
        }
        let mut combos: Vec<Vec<(Vec<String>, toml::Value)>> = vec![Vec::new()];
        for (key, values) in &self.sweeps {
            let path = self.resolve_key(key)?;
            if values.is_empty() {
                return Err(NotebookError::Key { key: key.clone(), message: "no values to sweep (fix: give at least one)".into() });
            }
            combos = combos
                .into_iter()
                .flat_map(|c| {
                    let path = &path;
                    values.iter().map(move |v| {
                        let mut c = c.clone();
                        c.push((path.clone(), v.clone()));
                        c
                    })
                })
                .collect();
        }
        let name = base.get("name").and_then(toml::Value::as_str).unwrap_or("experiment").to_string();
        combos
            .into_iter()
            .map(|combo| {
                let mut table = base.clone();
                let mut settings = Vec::new();
                let mut suffix = String::new();
                for (path, value) in combo {
                    let shown = value_text(&value);
                    let _ = write!(suffix, "-{}{}", path.last().map_or("", String::as_str), shown.replace(['"', ' '], ""));
                    settings.push((path.join("."), shown));
                    set_path(&mut table, &path, value);
                }
                table.insert("name".into(), toml::Value::String(format!("{name}{suffix}")));
                let text = toml::to_string(&table).expect("a TOML table serializes");
                let spec = crate::spec::from_toml_str(&text)?;
                let label = if settings.is_empty() {
                    name.clone()
                } else {
                    settings.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ")
                };
                Ok(Point { label, settings, spec })
            })
            .collect()
    }

    /// The dotted path of `key` in the spec: as given when dotted, else the one section of
    /// the resolved spec (defaults filled in) that has a field of that name.
    fn resolve_key(&self, key: &str) -> Result<Vec<String>, NotebookError> {
        if key.contains('.') {
            return Ok(key.split('.').map(str::to_string).collect());
        }
        if self.base.contains_key(key) {
            return Ok(vec![key.to_string()]);
        }
        let text = toml::to_string(&self.base).expect("a TOML table serializes");
        let resolved: toml::Table = crate::spec::from_toml_str(&text)?
            .to_toml()
            .parse()
            .expect("a resolved spec is valid TOML");
        let mut found = Vec::new();
        collect_paths(&resolved, &mut Vec::new(), key, &mut found);
        for (k, v) in &self.base {
            if let toml::Value::Table(t) = v {
                if t.contains_key(key) && !found.iter().any(|p: &Vec<String>| p[0] == *k) {
                    found.push(vec![k.clone(), key.to_string()]);
                }
            }
        }
        match found.len() {
            1 => Ok(found.remove(0)),
            0 => Err(NotebookError::Key { key: key.into(), message: "no field of that name in the spec (fix: use a dotted key such as layout.ep)".into() }),
            _ => Err(NotebookError::Key {
                key: key.into(),
                message: format!("ambiguous, found at {} (fix: use one of these dotted keys)", found.iter().map(|p| p.join(".")).collect::<Vec<_>>().join(", ")),
            }),
        }
    }

    /// Predict every point on the sim backend with hardware profile `profile` (`h100`,
    /// `h200`, a `-datasheet` profile or a TOML path): the same tables and pictures as
    /// [`Experiment::run`], from the cost model, in milliseconds; re-run after each edit.
    pub fn predict(&self, profile: &str) -> Result<Runs, NotebookError> {
        self.clone().set("run.backend", "sim").set("run.profile", profile).run()
    }

    /// Run every point with default hooks.
    pub fn run(&self) -> Result<Runs, NotebookError> {
        self.run_with(&RunHooks::default(), |_, _, _| {})
    }

    /// Run every point with `hooks` (cancel flag, per-step callback); `before(point, i, n)`
    /// is called before point `i` of `n` starts. Stops at the first failure.
    pub fn run_with(&self, hooks: &RunHooks, mut before: impl FnMut(&Point, usize, usize)) -> Result<Runs, NotebookError> {
        let points = self.points()?;
        let n = points.len();
        let mut results = Vec::with_capacity(n);
        for (i, point) in points.into_iter().enumerate() {
            before(&point, i, n);
            let outcome = crate::run::run(&point.spec, &self.runs_root, hooks)
                .map_err(|source| NotebookError::Run { label: point.label.clone(), source })?;
            results.push(RunResult::new(point, outcome));
        }
        Ok(Runs { sweep_keys: self.sweep_keys(), results })
    }
}

fn value_text(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn set_path(table: &mut toml::Table, path: &[String], value: toml::Value) {
    let (last, parents) = path.split_last().expect("a key has at least one part");
    let mut t = table;
    for p in parents {
        let entry = t.entry(p.clone()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if !entry.is_table() {
            *entry = toml::Value::Table(toml::Table::new());
        }
        t = entry.as_table_mut().expect("just made a table");
    }
    t.insert(last.clone(), value);
}

fn collect_paths(t: &toml::Table, prefix: &mut Vec<String>, key: &str, out: &mut Vec<Vec<String>>) {
    for (k, v) in t {
        prefix.push(k.clone());
        if k == key && !prefix.is_empty() && prefix.len() > 1 {
            out.push(prefix.clone());
        }
        if let toml::Value::Table(sub) = v {
            collect_paths(sub, prefix, key, out);
        }
        prefix.pop();
    }
}

/// One completed point: its settings, the run's outcome and its headline row.
#[derive(Debug)]
pub struct RunResult {
    /// Settings and spec.
    pub point: Point,
    /// Everything the run produced.
    pub outcome: RunOutcome,
    /// Headline numbers (as `moelab compare` prints them).
    pub row: CompareRow,
    /// Bytes sent by all-to-all ops per rank and measured step.
    pub a2a_bytes: f64,
}

impl RunResult {
    /// Summarise a completed run of `point`.
    pub fn new(point: Point, outcome: RunOutcome) -> RunResult {
        let s = &point.spec;
        let row = CompareRow::from_outcome(&s.name, s.variant.as_str(), s.world(), &outcome);
        let a = &outcome.analysis;
        let per = (a.overlap.len().max(1) as f64) * (a.steps.max(1) as f64);
        let a2a: u64 = a.stages.iter().filter(|r| r.stage == Stage::AllToAll).map(|r| r.bytes).sum();
        RunResult { point, outcome, row, a2a_bytes: a2a as f64 / per }
    }
}

/// The results of [`Experiment::run`], one per point, in sweep order.
#[derive(Debug)]
pub struct Runs {
    /// Keys swept (empty for a single run).
    pub sweep_keys: Vec<String>,
    /// One result per point.
    pub results: Vec<RunResult>,
}

impl Runs {
    /// The comparison as a polars DataFrame (one row per point).
    pub fn frame(&self) -> polars::prelude::PolarsResult<polars::prelude::DataFrame> {
        compare::frame(&self.results.iter().map(|r| r.row.clone()).collect::<Vec<_>>())
    }

    /// Everything a notebook shows: the comparison table, the stage table and its bars (single
    /// run), the sweep curve (several points), memory bars and the first point's timeline.
    pub fn to_html(&self) -> String {
        let mut html = String::from("<div class=\"moelab-runs\">");
        html.push_str(&self.table_html());
        if let [only] = self.results.as_slice() {
            html.push_str(&stages_html(&only.outcome));
            html.push_str(&crate::analysis::charts::stages_svg(&only.outcome.analysis, &only.point.label));
        } else {
            html.push_str(&self.sweep_svg());
        }
        html.push_str(&self.memory_svg());
        if let Some(first) = self.results.first() {
            html.push_str(&timeline_svg(&first.outcome.trace, &format!("timeline: {}", first.point.label)));
        }
        html.push_str("</div>");
        html
    }

    /// The headline table: one row per point.
    pub fn table_html(&self) -> String {
        let mut h = String::from("<table class=\"moelab-compare\"><thead><tr><th>run</th><th>variant</th><th>world</th><th>step ms</th><th>comm ms</th><th>exposed comm ms</th><th>overlap</th><th>all-to-all MB</th><th>peak MiB</th>");
        for c in MemCategory::ALL {
            let _ = write!(h, "<th>{} MiB</th>", c.as_str());
        }
        h.push_str("<th>loss</th></tr></thead><tbody>");
        for r in &self.results {
            let w = &r.row;
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{:.3}</td><td>{:.3}</td><td>{:.3}</td><td>{:.1}%</td><td>{:.3}</td><td>{:.2}</td>",
                esc(&r.point.label), esc(&w.variant), w.world, w.step_ms, w.comm_ms, w.exposed_ms, 100.0 * w.overlap, r.a2a_bytes / 1e6, mib(w.peak_bytes)
            );
            for c in MemCategory::ALL {
                let _ = write!(h, "<td>{:.2}</td>", mib(w.at_peak[c.index()]));
            }
            let _ = write!(h, "<td>{:.5}</td></tr>", w.loss);
        }
        h.push_str("</tbody></table>");
        h
    }

    /// Memory at peak per category: one bar per rank for a single run, per point otherwise.
    pub fn memory_svg(&self) -> String {
        let bars: Vec<(String, [u64; N_CATEGORIES])> = if self.results.len() == 1 {
            self.results[0].outcome.analysis.memory.ranks.iter().map(|r| (format!("rank {}", r.rank), r.at_peak)).collect()
        } else {
            self.results.iter().map(|r| (r.point.label.clone(), r.row.at_peak)).collect()
        };
        memory_bars_svg(&bars)
    }

    /// Step time and exposed communication per sweep point.
    pub fn sweep_svg(&self) -> String {
        let labels: Vec<String> = self.results.iter().map(|r| r.point.label.clone()).collect();
        let series = [
            ("step ms", "#1f77b4", self.results.iter().map(|r| r.row.step_ms).collect::<Vec<_>>()),
            ("exposed comm ms", "#d62728", self.results.iter().map(|r| r.row.exposed_ms).collect()),
        ];
        let title = if self.sweep_keys.is_empty() { "step time and exposed communication per run".to_string() } else { format!("sweep over {}", self.sweep_keys.join(" x ")) };
        line_chart_svg(&title, &labels, &series)
    }

    /// Print the display blocks evcxr turns into rich output: HTML (tables and charts) and
    /// the first point's timeline as `image/svg+xml`.
    pub fn evcxr_display(&self) {
        println!("EVCXR_BEGIN_CONTENT text/html\n{}\nEVCXR_END_CONTENT", self.to_html());
        if let Some(first) = self.results.first() {
            println!("EVCXR_BEGIN_CONTENT image/svg+xml\n{}\nEVCXR_END_CONTENT", timeline_svg(&first.outcome.trace, &first.point.label));
        }
    }
}

impl fmt::Display for Runs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rows: Vec<CompareRow> = self.results.iter().map(|r| r.row.clone()).collect();
        f.write_str(&compare::render(&rows))?;
        for r in &self.results {
            writeln!(f, "{}: all-to-all {:.3} MB per rank and step", r.point.label, r.a2a_bytes / 1e6)?;
        }
        if let [only] = self.results.as_slice() {
            f.write_str(&only.outcome.analysis.render_text())?;
        }
        Ok(())
    }
}

/// Rich display of a polars DataFrame in the moelab kernel: brought into scope by the
/// prelude, it makes a DataFrame at the end of a cell show as an HTML table.
pub trait FrameDisplay {
    /// Print the evcxr display blocks (HTML table, plain-text fallback).
    fn evcxr_display(&self);
}

impl FrameDisplay for polars::prelude::DataFrame {
    fn evcxr_display(&self) {
        println!("EVCXR_BEGIN_CONTENT text/html\n{}\nEVCXR_END_CONTENT", frame_html(self, 50));
        println!("EVCXR_BEGIN_CONTENT text/plain\n{self}\nEVCXR_END_CONTENT");
    }
}

/// The first `max_rows` rows of a DataFrame as an HTML table.
pub fn frame_html(df: &polars::prelude::DataFrame, max_rows: usize) -> String {
    let mut h = String::from("<table class=\"moelab-frame\"><thead><tr>");
    for c in df.columns() {
        let _ = write!(h, "<th>{}</th>", esc(c.name().as_str()));
    }
    h.push_str("</tr></thead><tbody>");
    for i in 0..df.height().min(max_rows) {
        h.push_str("<tr>");
        for c in df.columns() {
            let v = c.get(i).map(|v| v.to_string()).unwrap_or_default();
            let _ = write!(h, "<td>{}</td>", esc(&v));
        }
        h.push_str("</tr>");
    }
    let _ = write!(h, "</tbody></table><p>{} rows x {} columns</p>", df.height(), df.width());
    h
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}


/// The stage table of one run as HTML.
pub fn stages_html(o: &RunOutcome) -> String {
    let mut h = String::from("<table class=\"moelab-stages\"><thead><tr><th>stage</th><th>count</th><th>total ms</th><th>mean us</th><th>share</th><th>GFLOP</th><th>MB</th></tr></thead><tbody>");
    for r in &o.analysis.stages {
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{:.3}</td><td>{:.1}</td><td>{:.1}%</td><td>{:.3}</td><td>{:.3}</td></tr>",
            esc(&r.label), r.count, r.total_ns as f64 / 1e6, r.mean_ns / 1e3, 100.0 * r.share, r.flops as f64 / 1e9, r.bytes as f64 / 1e6
        );
    }
    h.push_str("</tbody></table>");
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC: &str = r#"
name = "nb"
variant = "mpmoe"
[model]
d_model = 16
d_ffn = 32
n_experts = 4
top_k = 2
n_layers = 1
tokens_per_rank = 16
[layout]
ep = 2
[run]
backend = "cpu"
steps = 1
warmup = 0
[mpmoe]
chunks = 2
"#;

    #[test]
    fn bare_keys_resolve_to_their_one_section_and_sweeps_multiply() {
        let exp = Experiment::from_toml(SPEC).unwrap().sweep("ep", [1, 2]).sweep("chunks", [1, 2, 4]);
        let points = exp.points().unwrap();
        assert_eq!(points.len(), 6);
        assert_eq!(points[5].settings, vec![("layout.ep".to_string(), "2".to_string()), ("mpmoe.chunks".to_string(), "4".to_string())]);
        assert_eq!(points[5].spec.layout.ep, 2);
        assert_eq!(points[0].spec.world(), 1);
        assert_eq!(points[5].label, "layout.ep=2 mpmoe.chunks=4");
    }

    #[test]
    fn unknown_and_invalid_sweep_values_are_errors_naming_the_field() {
        let e = Experiment::from_toml(SPEC).unwrap().sweep("no_such_field", [1]).points().unwrap_err();
        assert!(e.to_string().contains("no_such_field"), "{e}");
        let e = Experiment::from_toml(SPEC).unwrap().sweep("ep", [3]).points().unwrap_err();
        assert!(e.to_string().contains("layout.ep"), "{e}");
    }

    #[test]
    fn a_run_renders_tables_and_charts() {
        let dir = std::env::temp_dir().join(format!("moelab-notebook-test-{}", std::process::id()));
        let runs = Experiment::from_toml(SPEC).unwrap().runs_root(&dir).sweep("chunks", [1, 2]).run().unwrap();
        let html = runs.to_html();
        assert!(html.contains("<table class=\"moelab-compare\">"));
        assert_eq!(html.matches("<svg").count(), 3, "sweep curve, memory bars, timeline");
        assert!(html.contains("mpmoe.chunks=2"));
        assert!(runs.to_string().contains("nb-chunks2"));
        // One run: its stage table and stage bars instead of the sweep curve.
        let one = Experiment::from_toml(SPEC).unwrap().runs_root(&dir).run().unwrap().to_html();
        assert!(one.contains("<table class=\"moelab-stages\">") && one.contains("class=\"moelab-stage-bars\""));
        assert_eq!(one.matches("<svg").count(), 3, "stage bars, memory bars, timeline");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn predictions_run_on_the_sim_with_the_named_profile_and_follow_the_profile() {
        let dir = std::env::temp_dir().join(format!("moelab-notebook-predict-{}", std::process::id()));
        let exp = Experiment::from_toml(SPEC).unwrap().runs_root(&dir).set("steps", 2);
        let (h100, h200) = (exp.predict("h100").unwrap(), exp.predict("h200").unwrap());
        for runs in [&h100, &h200] {
            assert_eq!(runs.results[0].outcome.analysis.backend, "sim");
            assert!(runs.results[0].row.step_ms > 0.0);
        }
        assert_ne!(h100.results[0].row.step_ms, h200.results[0].row.step_ms, "the profile changes the prediction");
        assert!(exp.predict("no-such-profile").is_err());
        let _ = std::fs::remove_dir_all(dir);
    }
}

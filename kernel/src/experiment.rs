//! The `%%experiment` cell magic: the cell's TOML runs as a moelab experiment in the kernel
//! process (no Rust compile), streaming one progress line per step, stoppable by an
//! interrupt, and showing the comparison table (HTML), the sweep curve, the memory bars and
//! a timeline per run (SVG).
//!
//! ```text
//! %%experiment sweep=chunks:1,2,4 set=run.steps:2
//! name = "mpmoe"
//! ...
//! ```
//!
//! `predict=PROFILE` runs the same cell on the sim backend with that hardware profile
//! (`h100`, `h200`, a `-datasheet` one or a TOML path): predicted step time, overlap and
//! peak memory in a fraction of a second, so editing the TOML and re-running is live.
//!
//! ```text
//! %%experiment predict=h200 sweep=chunks:1,2,4,8
//! name = "mpmoe"
//! ...
//! ---
//! name = "another spec, run after the first and shown in the same table"
//! ```

use moelab::notebook::{self, Experiment, NotebookError, Runs};
use moelab::run::RunHooks;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Why a magic cell failed.
#[derive(Debug, thiserror::Error)]
pub enum MagicError {
    /// An argument on the `%%experiment` line is not understood.
    #[error("%%experiment: bad argument {arg:?}: {message}")]
    Arg {
        /// The argument.
        arg: String,
        /// What is wrong and the fix.
        message: String,
    },
    /// The cell has no TOML.
    #[error("%%experiment: the cell has no experiment TOML below the magic line")]
    Empty,
    /// Building or running the experiment failed.
    #[error(transparent)]
    Notebook(#[from] NotebookError),
    /// The run was interrupted.
    #[error("interrupted: the run was cancelled (what it measured is in its run directory)")]
    Interrupted,
}

impl MagicError {
    /// The `ename` of the error message.
    pub fn ename(&self) -> &'static str {
        match self {
            MagicError::Interrupted => "KeyboardInterrupt",
            MagicError::Notebook(NotebookError::Spec(_)) => "SpecError",
            MagicError::Notebook(NotebookError::Run { .. }) => "RunError",
            _ => "ExperimentError",
        }
    }
}

/// Parsed magic-line arguments.
#[derive(Debug, Default, PartialEq)]
pub struct MagicArgs {
    /// `sweep=key:v1,v2,...`
    pub sweeps: Vec<(String, Vec<toml::Value>)>,
    /// `set=key:value`
    pub sets: Vec<(String, toml::Value)>,
    /// `runs=DIR`
    pub runs_root: Option<PathBuf>,
}

/// A value as TOML when it parses as one (`2`, `true`, `1.5`, `"x"`), else a string.
fn toml_value(text: &str) -> toml::Value {
    format!("v = {text}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(text.to_string()))
}

/// Parse `sweep=key:v1,v2`, `set=key:value` and `runs=DIR` arguments.
pub fn parse_args(args: &[&str]) -> Result<MagicArgs, MagicError> {
    let mut out = MagicArgs::default();
    for arg in args {
        let bad = |message: &str| MagicError::Arg { arg: arg.to_string(), message: message.to_string() };
        let (kind, rest) = arg.split_once('=').ok_or_else(|| bad("expected sweep=KEY:V1,V2, set=KEY:VALUE, predict=PROFILE or runs=DIR"))?;
        match kind {
            "sweep" => {
                let (key, values) = rest.split_once(':').ok_or_else(|| bad("expected sweep=KEY:V1,V2,..."))?;
                out.sweeps.push((key.to_string(), values.split(',').filter(|v| !v.is_empty()).map(toml_value).collect()));
            }
            "set" => {
                let (key, value) = rest.split_once(':').ok_or_else(|| bad("expected set=KEY:VALUE"))?;
                out.sets.push((key.to_string(), toml_value(value)));
            }
            "runs" => out.runs_root = Some(PathBuf::from(rest)),
            "predict" => {
                if rest.is_empty() {
                    return Err(bad("expected predict=PROFILE, e.g. predict=h200"));
                }
                out.sets.push(("run.backend".into(), toml::Value::String("sim".into())));
                out.sets.push(("run.profile".into(), toml::Value::String(rest.into())));
            }
            _ => return Err(bad("unknown argument (use sweep=, set=, predict= or runs=)")),
        }
    }
    Ok(out)
}

/// The experiments of a cell body: TOML documents separated by lines of `---`.
pub fn experiments(body: &str, args: &MagicArgs, default_root: &std::path::Path) -> Result<Vec<Experiment>, MagicError> {
    let mut docs = vec![String::new()];
    for line in body.lines() {
        if line.trim() == "---" {
            docs.push(String::new());
        } else {
            let d = docs.last_mut().expect("one document at least");
            d.push_str(line);
            d.push('\n');
        }
    }
    let docs: Vec<String> = docs.into_iter().filter(|d| d.lines().any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))).collect();
    if docs.is_empty() {
        return Err(MagicError::Empty);
    }
    docs.iter()
        .map(|d| {
            let mut e = Experiment::from_toml(d)?.runs_root(args.runs_root.clone().unwrap_or_else(|| default_root.to_path_buf()));
            for (k, v) in &args.sets {
                e = e.set(k, v.clone());
            }
            for (k, vs) in &args.sweeps {
                e = e.sweep(k, vs.clone());
            }
            // Surface bad keys and invalid points before anything runs.
            e.points()?;
            Ok(e)
        })
        .collect()
}

/// Run every experiment of the cell. `progress` receives one line per point and per step.
pub fn run(experiments: &[Experiment], cancel: Arc<AtomicBool>, progress: Arc<dyn Fn(String) + Send + Sync>) -> Result<Runs, MagicError> {
    let total: usize = experiments.iter().map(|e| e.points().map_or(0, |p| p.len())).sum();
    let mut all = Runs { sweep_keys: experiments.first().map(Experiment::sweep_keys).unwrap_or_default(), results: Vec::new() };
    let mut done = 0;
    for exp in experiments {
        let steps_progress = progress.clone();
        let hooks = RunHooks {
            exec: moelab::backend::ExecOptions { cancel: cancel.clone(), ..Default::default() },
            // The run log's own line, as the CLI prints it.
            on_step: Some(Arc::new(move |r: &moelab::backend::StepReport| steps_progress(format!("  {}\n", moelab::run::step_line(r))))),
        };
        let result = exp.run_with(&hooks, |p, _, _| {
            done += 1;
            progress(format!(
                "[{done}/{total}] {} ({}, {} ranks, backend {})\n",
                p.label, p.spec.variant.as_str(), p.spec.world(), p.spec.run.backend.as_str()
            ));
        });
        match result {
            Ok(runs) => all.results.extend(runs.results),
            Err(_) if cancel.load(Ordering::SeqCst) => return Err(MagicError::Interrupted),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(all)
}

/// The display bundles of a finished cell: the table (HTML with text fallback), then the
/// stage bars (one run) or the sweep curve, memory bars and timelines (SVG), each a separate
/// output.
pub fn displays(runs: &Runs) -> Vec<Value> {
    let mut out = Vec::new();
    let mut html = runs.table_html();
    if let [only] = runs.results.as_slice() {
        html.push_str(&notebook::stages_html(&only.outcome));
    }
    out.push(json!({ "text/html": html, "text/plain": runs.to_string() }));
    match runs.results.as_slice() {
        [only] => out.push(json!({
            "image/svg+xml": moelab::analysis::charts::stages_svg(&only.outcome.analysis, &only.point.label),
            "text/plain": "stage times per rank and step",
        })),
        _ => out.push(json!({ "image/svg+xml": runs.sweep_svg(), "text/plain": "sweep curve: step time and exposed communication per run" })),
    }
    out.push(json!({ "image/svg+xml": runs.memory_svg(), "text/plain": "memory at peak per category" }));
    for r in runs.results.iter().take(4) {
        out.push(json!({
            "image/svg+xml": notebook::timeline_svg(&r.outcome.trace, &format!("timeline: {}", r.point.label)),
            "text/plain": format!("timeline of {} (first measured step)", r.point.label),
        }));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_parse_sweeps_sets_and_typed_values() {
        let a = parse_args(&["sweep=chunks:1,2,4", "set=ted.drop_duplicates:false", "set=mpmoe.reuse:reuse_buffers", "runs=/tmp/r"]).unwrap();
        assert_eq!(a.sweeps, vec![("chunks".to_string(), vec![toml::Value::Integer(1), toml::Value::Integer(2), toml::Value::Integer(4)])]);
        assert_eq!(a.sets[0].1, toml::Value::Boolean(false));
        assert_eq!(a.sets[1].1, toml::Value::String("reuse_buffers".into()));
        assert_eq!(a.runs_root, Some(PathBuf::from("/tmp/r")));
        assert!(parse_args(&["chunks=1"]).is_err());
        assert!(parse_args(&["sweep=chunks"]).is_err());
        let p = parse_args(&["predict=h100"]).unwrap();
        assert_eq!(p.sets, vec![("run.backend".to_string(), toml::Value::from("sim")), ("run.profile".to_string(), toml::Value::from("h100"))]);
        assert!(parse_args(&["predict="]).is_err());
    }

    #[test]
    fn documents_split_on_dashes_and_bad_specs_fail_before_running() {
        let spec = "name = \"a\"\nvariant = \"topk\"\n[model]\nd_model = 16\nd_ffn = 16\nn_experts = 2\ntop_k = 1\nn_layers = 1\ntokens_per_rank = 8\n[run]\nbackend = \"cpu\"\nsteps = 1\nwarmup = 0\n";
        let body = format!("{spec}---\n{}", spec.replace("\"a\"", "\"b\""));
        let exps = experiments(&body, &MagicArgs::default(), std::path::Path::new("runs")).unwrap();
        assert_eq!(exps.len(), 2);
        let bad = experiments(&spec.replace("n_experts = 2", "n_experts = 0"), &MagicArgs::default(), std::path::Path::new("runs"));
        assert!(matches!(bad, Err(MagicError::Notebook(NotebookError::Spec(_)))), "{bad:?}");
        assert!(matches!(experiments("# only a comment\n", &MagicArgs::default(), std::path::Path::new("runs")), Err(MagicError::Empty)));
    }
}

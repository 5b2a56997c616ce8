//! The composer's state: the experiment being edited (a TOML table, as the file will say it,
//! before derived defaults are filled), its file, and the result of validating and planning
//! it after every change: the problems naming their fields, or the plan's predicted peak
//! memory per category.

pub mod fields;
pub mod templates;

use crate::error::WorkbenchError;
use fields::Field;
use moelab::plan::memory::predict;
use moelab::plan::Plan;
use moelab::spec::{ExperimentSpec, Problem, SpecError};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use toml::{Table, Value};

/// The plan's prediction for the busiest rank.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    /// Ranks.
    pub world: usize,
    /// Ops per step on the rank with the most.
    pub max_ops: usize,
    /// The rank with the highest predicted peak.
    pub worst_rank: usize,
    /// Its predicted peak, bytes.
    pub peak_total: u64,
    /// Its bytes per category at that peak (index = `MemCategory::index`).
    pub at_peak: [u64; 7],
    /// Dropless buffers counted at their upper bound.
    pub upper_bound: bool,
    /// That rank's peak over every order of its two streams the plan allows (at least
    /// `peak_total`).
    pub interleaved_peak: u64,
    /// The sim backend's prediction on a hardware profile, or why there is none.
    pub step: Result<SimPrediction, String>,
}

/// One simulated step of the draft on a hardware profile.
#[derive(Debug, Clone, PartialEq)]
pub struct SimPrediction {
    /// Step time, seconds.
    pub seconds: f64,
    /// Share of all communication time hidden behind compute.
    pub overlap: f64,
    /// Share of all-to-all time hidden behind compute (0 without all-to-all).
    pub a2a_overlap: f64,
    /// The profile's name.
    pub profile: String,
    /// What the sim warns of (a predicted peak above the profile's GPU memory, settings that
    /// cannot change the prediction).
    pub warnings: Vec<String>,
}

/// Profiles the composer cycles through for its prediction (`P`): the measured ones first.
pub const PREDICTION_PROFILES: [&str; 4] = ["h100", "h200", "h100-datasheet", "h200-datasheet"];

/// Largest world the composer simulates on every change (larger plans take noticeable time).
pub const MAX_LIVE_SIM_WORLD: usize = 256;

/// One simulated step of `plan`: on `profile` when given (the composer's choice), else on
/// the spec's hardware profile (the default one when the spec is not a sim run).
fn simulate_step(resolved: &ExperimentSpec, plan: &Plan, profile: Option<&str>) -> Result<SimPrediction, String> {
    use moelab::backend::sim;
    if plan.world() > MAX_LIVE_SIM_WORLD {
        return Err(format!("not simulated live above {MAX_LIVE_SIM_WORLD} ranks"));
    }
    let profile = match profile {
        Some(name) => sim::profile_for(resolved, name),
        None => sim::spec_profile(resolved),
    }
    .map_err(|e| e.to_string())?;
    let mut rt = sim::SimRuntime::with_profile(plan.clone(), &profile, Default::default());
    let report = rt.step(true, Some(0)).map_err(|e| e.to_string())?;
    let a = moelab::analysis::analyze(&rt.trace());
    // An automatic choice is made by the run: say which configuration this predicts.
    let warnings = moelab::plan::builders::auto_stand_in(resolved).into_iter().chain(rt.warnings()).collect();
    Ok(SimPrediction { seconds: report.wall_s, overlap: a.overall_overlap(), a2a_overlap: a.a2a_overlap(), profile: profile.name.clone(), warnings })
}

/// What validation says about the draft.
#[derive(Debug, Clone, PartialEq)]
pub enum Check {
    /// Valid: the resolved spec (defaults filled) and the plan's prediction (or why the
    /// plan could not be built).
    Valid {
        /// What `moelab run` would run.
        resolved: Box<ExperimentSpec>,
        /// The prediction, or the plan builder's error.
        prediction: Result<Prediction, String>,
        /// Why `moelab run` would still refuse it on this machine (a cuda spec without its
        /// GPUs here, checked and predicted as `moelab validate` does), if so.
        note: Option<String>,
    },
    /// Rejected: every violated rule, naming its field.
    Invalid {
        /// The problems.
        problems: Vec<Problem>,
    },
}

/// The experiment being composed.
#[derive(Debug, Clone)]
pub struct Composer {
    /// The spec as written (optional fields unset stay unset, so saving keeps intent).
    pub draft: Table,
    /// The file it came from or was last saved to.
    pub path: Option<PathBuf>,
    /// Changed since opened or saved.
    pub dirty: bool,
    /// Selected row among [`Composer::visible_fields`].
    pub selected: usize,
    /// Lowercase substring the field keys must contain.
    pub filter: String,
    /// Validation of the draft, refreshed on every change.
    pub check: Check,
    /// Earlier drafts, for undo.
    history: Vec<(Table, Option<PathBuf>)>,
    /// The hardware profile of the live prediction (`None`: the spec's own, or the default).
    pub profile: Option<String>,
    /// Options tables (`[mpmoe]`, `[tutel]`, `[ted]`, `[ppmoe]`) of variants switched away from, so
    /// stepping through the variants and back keeps what was set.
    stashed_options: Table,
}

/// The TOML text of a draft, in the library's field order when it reads as a spec.
pub fn spec_text(draft: &Table) -> String {
    match ExperimentSpec::deserialize(Value::Table(draft.clone())) {
        Ok(spec) => spec.to_toml(),
        Err(_) => toml::to_string(draft).unwrap_or_default(),
    }
}

/// Validate and plan a draft; predict on `profile` (or the spec's own).
pub fn check(draft: &Table, profile: Option<&str>) -> Check {
    match moelab::spec::from_toml_str(&spec_text(draft)) {
        Ok(resolved) => valid(resolved, profile, None),
        // As `moelab validate`: a cuda spec on a machine without its GPUs is checked as on the
        // cpu backend and predicted; the missing GPUs are a note, not a failure.
        Err(SpecError::Invalid { problems, .. }) if !problems.is_empty() && problems.iter().all(|p| p.is_missing_gpus()) => {
            let mut on_cpu = draft.clone();
            fields::store(&mut on_cpu, "run.backend", Some(toml::Value::String("cpu".into())));
            match moelab::spec::from_toml_str(&spec_text(&on_cpu)) {
                Ok(mut resolved) => {
                    resolved.run.backend = moelab::spec::BackendKind::Cuda;
                    valid(resolved, profile, Some(format!("{}: `moelab run` refuses it on this machine; the predictions stand", problems[0].message)))
                }
                Err(SpecError::Invalid { problems, .. }) => Check::Invalid { problems },
                Err(other) => Check::Invalid { problems: vec![Problem { field: "(spec)".into(), message: other.to_string(), fix: "undo the last change (u)".into() }] },
            }
        }
        Err(SpecError::Invalid { problems, .. }) => Check::Invalid { problems },
        // A draft built from typed fields always parses; keep any surprise visible anyway.
        Err(other) => Check::Invalid { problems: vec![Problem { field: "(spec)".into(), message: other.to_string(), fix: "undo the last change (u)".into() }] },
    }
}

/// A valid draft's check: its plan's memory prediction and simulated step.
fn valid(resolved: ExperimentSpec, profile: Option<&str>, note: Option<String>) -> Check {
    let prediction = Plan::build(&resolved).map_err(|e| e.to_string()).map(|plan| {
        let preds: Vec<_> = plan.ranks.iter().map(predict).collect();
        let worst = preds.iter().enumerate().max_by_key(|(_, p)| p.peak_total).map_or(0, |(i, _)| i);
        let p = preds.get(worst);
        Prediction {
            world: plan.world(),
            max_ops: plan.ranks.iter().map(|r| r.ops.len()).max().unwrap_or(0),
            worst_rank: worst,
            peak_total: p.map_or(0, |p| p.peak_total),
            at_peak: p.map_or([0; 7], |p| p.at_peak),
            upper_bound: preds.iter().any(|p| p.upper_bound),
            interleaved_peak: p.map_or(0, |p| p.interleaved_peak),
            step: simulate_step(&resolved, &plan, profile),
        }
    });
    Check::Valid { resolved: Box::new(resolved), prediction, note }
}

/// Whether a problem about `problem_field` concerns the field `key` (a problem about a
/// table, e.g. `model.backbone` or `mpmoe`, concerns every field inside it).
pub fn concerns(problem_field: &str, key: &str) -> bool {
    key == problem_field || key.strip_prefix(problem_field).is_some_and(|rest| rest.starts_with('.'))
}

impl Composer {
    /// A composer over `draft`.
    pub fn new(draft: Table, path: Option<PathBuf>) -> Self {
        let check = check(&draft, None);
        Composer { draft, path, dirty: false, selected: 0, filter: String::new(), check, history: Vec::new(), profile: None, stashed_options: Table::new() }
    }

    /// A composer over the template of `variant` (a TOML spelling such as `"topk"`), with no
    /// file yet; `None` for a variant the library does not know.
    pub fn from_template(variant: &str) -> Option<Self> {
        Some(Composer::new(templates::template(variant)?, None))
    }

    /// The experiment's name.
    pub fn name(&self) -> &str {
        self.draft.get("name").and_then(Value::as_str).unwrap_or("")
    }

    /// The experiment's variant spelling.
    pub fn variant(&self) -> &str {
        fields::variant_of(&self.draft)
    }

    /// Open an experiment file. A file that does not parse is an error (and the caller keeps
    /// its current draft); a file that parses but breaks rules opens with its problems shown.
    pub fn open(path: &Path) -> Result<Self, WorkbenchError> {
        Self::open_with(path, &[])
    }

    /// [`Composer::open`] with `--set KEY=VALUE` overrides applied to the file's text first
    /// (the draft then differs from the file, so it opens as unsaved).
    pub fn open_with(path: &Path, overrides: &[moelab::spec::overrides::Override]) -> Result<Self, WorkbenchError> {
        let text = std::fs::read_to_string(path).map_err(|e| WorkbenchError::io(path, e))?;
        let text = moelab::spec::overrides::apply(&text, overrides).map_err(|e| WorkbenchError::from(e.in_file(path)))?;
        let mut opened = Self::from_text(path, &text, overrides)?;
        opened.dirty = !overrides.is_empty();
        Ok(opened)
    }

    /// The composer over `text`, the file at `path` after `overrides`.
    fn from_text(path: &Path, text: &str, overrides: &[moelab::spec::overrides::Override]) -> Result<Self, WorkbenchError> {
        match moelab::spec::from_toml_str(text) {
            // A value an override made unreadable is named as the override, as `moelab run` does.
            Err(e @ SpecError::Parse { .. }) => return Err(moelab::spec::blame_overrides(e, overrides).in_file(path).into()),
            Err(SpecError::Io { .. }) | Err(SpecError::Invalid { .. }) | Ok(_) => {}
        }
        // Read through the spec type (which rejects unknown fields and fills serde defaults)
        // and keep the result as a table: every field explicit, optional ones left unset.
        let spec: ExperimentSpec = toml::from_str(text).map_err(|e| WorkbenchError::format(path, e.message().to_string()))?;
        let draft = Value::try_from(&spec).ok().and_then(|v| v.as_table().cloned()).unwrap_or_default();
        Ok(Composer::new(draft, Some(path.to_path_buf())))
    }

    /// Replace this composer's experiment by another (undo brings the old one back).
    pub fn replace(&mut self, other: Composer) {
        self.history.push((self.draft.clone(), self.path.clone()));
        let history = std::mem::take(&mut self.history);
        let filter = std::mem::take(&mut self.filter);
        *self = Composer { history, filter, ..other };
    }

    /// The TOML that [`Composer::save`] writes: what `moelab run` accepts unchanged.
    pub fn toml(&self) -> String {
        format!("# moelab experiment, written by moelab-workbench; run it with `moelab run <this file>`\n{}", spec_text(&self.draft))
    }

    /// Write the draft to `path` and make it the composer's file.
    pub fn save(&mut self, path: &Path) -> Result<(), WorkbenchError> {
        std::fs::write(path, self.toml()).map_err(|e| WorkbenchError::io(path, e))?;
        self.path = Some(path.to_path_buf());
        self.dirty = false;
        Ok(())
    }

    /// The fields that apply to the draft and pass the filter, in order.
    pub fn visible_fields(&self) -> Vec<&'static Field> {
        fields::FIELDS.iter().filter(|f| f.applies(&self.draft) && f.key.contains(&self.filter)).collect()
    }

    /// The selected field.
    pub fn selected_field(&self) -> Option<&'static Field> {
        self.visible_fields().get(self.selected).copied()
    }

    /// Move the selection by `delta` rows, clamped.
    pub fn move_selection(&mut self, delta: isize) {
        let n = self.visible_fields().len() as isize;
        self.selected = if n == 0 { 0 } else { (self.selected as isize + delta).clamp(0, n - 1) as usize };
    }

    /// Select the field with this key, when visible.
    pub fn select_key(&mut self, key: &str) -> bool {
        match self.visible_fields().iter().position(|f| f.key == key) {
            Some(i) => {
                self.selected = i;
                true
            }
            None => false,
        }
    }

    /// Set the filter; the selected field stays selected while it passes (so clearing the
    /// filter keeps it), else the selection moves to the first match.
    pub fn set_filter(&mut self, filter: &str) {
        let keep = self.selected_field().map(|f| f.key);
        self.filter = filter.to_lowercase();
        self.selected = keep.and_then(|k| self.visible_fields().iter().position(|f| f.key == k)).unwrap_or(0);
    }

    /// Apply an edit to the draft through `f`; on success revalidate, on error change nothing.
    fn edit(&mut self, f: impl FnOnce(&mut Table) -> Result<(), String>) -> Result<(), String> {
        let mut next = self.draft.clone();
        f(&mut next)?;
        if fields::variant_of(&next) != fields::variant_of(&self.draft) {
            self.carry_options(&mut next);
        }
        if next != self.draft {
            self.history.push((std::mem::replace(&mut self.draft, next), self.path.clone()));
            self.dirty = true;
            self.check = check(&self.draft, self.profile.as_deref());
            // A variant change can hide fields; keep the selection on the list.
            self.move_selection(0);
        }
        Ok(())
    }

    /// On a variant change to `next`: stash the options tables it dropped and bring back the
    /// new variant's, when one was stashed and `next` has none.
    fn carry_options(&mut self, next: &mut Table) {
        for (key, value) in &self.draft {
            if fields::OPTION_TABLES.contains(&key.as_str()) && !next.contains_key(key) {
                self.stashed_options.insert(key.clone(), value.clone());
            }
        }
        let variant = fields::variant_of(next).to_string();
        if !next.contains_key(&variant) {
            if let Some(options) = self.stashed_options.remove(&variant) {
                next.insert(variant, options);
            }
        }
    }

    /// Set the selected field from typed text.
    pub fn set_selected(&mut self, text: &str) -> Result<(), String> {
        let f = self.selected_field().ok_or("no field selected")?;
        self.edit(|d| f.set(d, text))
    }

    /// Step the selected field with left (`dir < 0`) or right; an unset number steps from
    /// the value the resolved spec gives it (the error says so when the draft is invalid).
    pub fn adjust(&mut self, dir: i32) -> Result<(), String> {
        let f = self.selected_field().ok_or("no field selected")?;
        let resolved = self.resolved().and_then(|r| Value::try_from(r).ok()).and_then(|v| match v {
            Value::Table(t) => Some(t),
            _ => None,
        });
        let next = f.stepped(&self.draft, resolved.as_ref(), dir)?;
        self.edit(|d| f.set(d, &next))
    }

    /// Predict on the next profile of [`PREDICTION_PROFILES`] (after the last one, the spec's
    /// own again); returns the name now used.
    pub fn cycle_profile(&mut self) -> String {
        let next = match self.profile.as_deref() {
            None => Some(PREDICTION_PROFILES[0]),
            Some(p) => PREDICTION_PROFILES.iter().position(|q| *q == p).and_then(|i| PREDICTION_PROFILES.get(i + 1)).copied(),
        };
        self.profile = next.map(str::to_string);
        self.check = check(&self.draft, self.profile.as_deref());
        self.profile.clone().unwrap_or_else(|| "the spec's own".into())
    }

    /// Go back to the draft before the last change; false when there is none.
    pub fn undo(&mut self) -> bool {
        match self.history.pop() {
            Some((prev, path)) => {
                // The file goes back with its draft, so a save cannot write one file's draft
                // into another.
                self.draft = prev;
                self.path = path;
                self.dirty = true;
                self.check = check(&self.draft, self.profile.as_deref());
                self.move_selection(0);
                true
            }
            None => false,
        }
    }

    /// The problems that concern field `key`.
    pub fn problems_for(&self, key: &str) -> Vec<&Problem> {
        match &self.check {
            Check::Invalid { problems } => problems.iter().filter(|p| concerns(&p.field, key)).collect(),
            Check::Valid { .. } => Vec::new(),
        }
    }

    /// The resolved spec, when the draft is valid.
    pub fn resolved(&self) -> Option<&ExperimentSpec> {
        match &self.check {
            Check::Valid { resolved, .. } => Some(resolved),
            Check::Invalid { .. } => None,
        }
    }

    /// Where a save goes when the user has not chosen: the opened file, else
    /// `experiments/<name>.toml`.
    pub fn default_save_path(&self) -> PathBuf {
        self.path.clone().unwrap_or_else(|| PathBuf::from("experiments").join(format!("{}.toml", self.name())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_draft_that_outgrows_the_gpu_is_predicted_with_a_warning() {
        let path = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../experiments/quickstart.toml"));
        let warnings = |c: &Composer| match &c.check {
            Check::Valid { prediction: Ok(p), .. } => p.step.as_ref().expect("simulated").warnings.clone(),
            other => panic!("{other:?}"),
        };
        assert!(warnings(&Composer::open(path).expect("opens")).is_empty());
        let big = moelab::spec::overrides::Override::parse("model.d_model=131072").expect("parses");
        let w = warnings(&Composer::open_with(path, &[big]).expect("opens"));
        assert!(w.iter().any(|w| w.contains("exceeds")), "{w:?}");
    }

    #[test]
    fn an_automatic_choice_says_which_configuration_is_predicted() {
        let path = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../experiments/mpmoe-auto.toml"));
        match &Composer::open(path).expect("opens").check {
            Check::Valid { prediction: Ok(p), .. } => {
                let w = &p.step.as_ref().expect("simulated").warnings;
                assert!(w.iter().any(|w| w.starts_with("mpmoe auto: planned with chunks=2")), "{w:?}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_gpu_experiment_without_its_gpus_here_is_checked_and_predicted_with_a_note() {
        // As `moelab validate`: the missing GPUs are a note, every other rule is checked and
        // the predictions are shown (this machine has no GPU, or fewer than the file's two).
        let path = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../experiments/mixtral-ish/topk-2gpu.toml"));
        let c = Composer::open(path).expect("opens");
        match &c.check {
            Check::Valid { resolved, prediction: Ok(p), note } => {
                assert_eq!(resolved.run.backend, moelab::spec::BackendKind::Cuda);
                assert!(p.peak_total > 0 && p.step.as_ref().is_ok_and(|s| s.seconds > 0.0), "{p:?}");
                if moelab::spec::from_toml_str(&spec_text(&c.draft)).is_err() {
                    assert!(note.as_deref().is_some_and(|n| n.contains("refuses it on this machine")), "{note:?}");
                }
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn undo_brings_back_the_file_with_its_draft() {
        let root = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../experiments"));
        let (quick, scmoe) = (root.join("quickstart.toml"), root.join("scmoe.toml"));
        let mut c = Composer::open(&quick).expect("opens");
        c.replace(Composer::open(&scmoe).expect("opens"));
        assert_eq!(c.path.as_deref(), Some(scmoe.as_path()));
        assert!(c.undo());
        // A save now goes to the file this draft came from, not to scmoe.toml.
        assert_eq!(c.path.as_deref(), Some(quick.as_path()));
        assert_eq!(c.default_save_path(), quick);
    }

    #[test]
    fn set_overrides_apply_to_the_opened_file_and_mark_it_unsaved() {
        let path = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../experiments/quickstart.toml"));
        let plain = Composer::open(path).expect("opens");
        assert_eq!(fields::by_key("layout.ep").expect("f").get(&plain.draft), "4");
        assert!(!plain.dirty);
        let o = moelab::spec::overrides::Override::parse("layout.ep=3").expect("parses");
        let c = Composer::open_with(path, &[o]).expect("opens");
        assert_eq!(fields::by_key("layout.ep").expect("f").get(&c.draft), "3");
        assert!(c.dirty, "the draft differs from the file");
        assert!(c.problems_for("layout.ep").iter().any(|p| p.message.contains("ep=3 does not divide n_experts=8")), "{:?}", c.check);
        // An override that makes a value unreadable is named as the override.
        let o = moelab::spec::overrides::Override::parse("model.d_model=wide").expect("parses");
        let e = Composer::open_with(path, &[o]).expect_err("a string d_model");
        assert!(e.to_string().contains("--set model.d_model") && e.to_string().contains("quickstart.toml"), "{e}");
    }

    #[test]
    fn an_invalid_ep_names_the_field_and_undo_restores() {
        let mut c = Composer::from_template("topk").expect("template");
        assert!(c.resolved().is_some());
        assert!(c.select_key("layout.ep"));
        c.adjust(-1).expect("adjust");
        assert_eq!(fields::by_key("layout.ep").expect("f").get(&c.draft), "3");
        let ps = c.problems_for("layout.ep");
        assert_eq!(ps.len(), 1, "{:?}", c.check);
        assert!(ps[0].message.contains("ep=3 does not divide n_experts=8"), "{}", ps[0].message);
        assert!(c.problems_for("layout.dp").is_empty());
        assert!(c.undo());
        assert_eq!(fields::by_key("layout.ep").expect("f").get(&c.draft), "4");
        assert!(c.resolved().is_some());
    }

    #[test]
    fn stepping_an_unset_number_starts_from_the_resolved_value() {
        let value = |c: &Composer, key: &str| fields::lookup(&c.draft, key).cloned();
        // tokens_per_rank unset: batch 4 x seq_len 64 resolve it to 256.
        let mut c = Composer::from_template("topk").expect("template");
        assert_eq!(value(&c, "model.tokens_per_rank"), None);
        assert!(c.select_key("model.tokens_per_rank"));
        c.adjust(1).expect("adjust");
        assert_eq!(value(&c, "model.tokens_per_rank"), Some(Value::Integer(512)));
        assert!(c.resolved().is_some(), "{:?}", c.check);
        assert_eq!(c.resolved().expect("valid").model.batch, Some(8));
        // world unset: the degrees resolve it to 4.
        let mut c = Composer::from_template("topk").expect("template");
        assert!(c.select_key("layout.world"));
        c.adjust(1).expect("adjust");
        assert_eq!(value(&c, "layout.world"), Some(Value::Integer(5)));
        assert!(c.undo());
        c.adjust(-1).expect("adjust");
        assert_eq!(value(&c, "layout.world"), Some(Value::Integer(3)));
        // An invalid draft has no resolved value: nothing changes and the message says why.
        assert!(c.select_key("layout.ep"));
        c.set_selected("3").expect("set");
        assert!(c.resolved().is_none());
        assert!(c.select_key("model.tokens_per_rank"));
        let before = c.draft.clone();
        let e = c.adjust(1).expect_err("no value to step from");
        assert!(e.contains("model.tokens_per_rank") && e.contains("Enter"), "{e}");
        assert_eq!(c.draft, before);
    }

    #[test]
    fn every_field_a_problem_names_can_be_found_and_edited() {
        // sim-2048 at dp = 4: 256 ranks fill 32 nodes of 8, not the 256 the file says.
        let path = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../experiments/sim-2048.toml"));
        let mut c = Composer::open(path).expect("opens");
        assert!(c.select_key("layout.dp"));
        c.set_selected("4").expect("dp");
        assert!(!c.problems_for("run.nodes").is_empty(), "{:?}", c.check);
        c.set_filter("nodes");
        let keys: Vec<_> = c.visible_fields().iter().map(|f| f.key).collect();
        assert!(keys.contains(&"run.nodes"), "{keys:?}");
        assert!(c.select_key("run.nodes"));
        assert_eq!(c.selected_field().expect("field").get(&c.draft), "256");
        c.set_selected("32").expect("nodes");
        assert!(c.resolved().is_some(), "{:?}", c.check);
        c.set_filter("");
        // The other sim-only settings, each parsed like its kind.
        for (key, shown, typed, bad) in [
            ("run.profile", "h100", "h200", None),
            ("run.gpus_per_node", "8", "4", Some("four")),
            ("run.kept_share", "auto", "0.9", Some("most")),
            ("run.host_copies", "auto", "false", Some("maybe")),
        ] {
            assert!(c.select_key(key), "{key} is listed for a sim experiment");
            assert_eq!(c.selected_field().expect("field").get(&c.draft), shown, "{key}");
            if let Some(bad) = bad {
                assert!(c.set_selected(bad).unwrap_err().contains(key), "{key} refuses {bad:?}");
            }
            c.set_selected(typed).expect(key);
            assert_eq!(c.selected_field().expect("field").get(&c.draft), typed, "{key}");
            c.set_selected("auto").expect(key);
            assert_eq!(fields::lookup(&c.draft, key), None, "auto unsets {key}");
        }
        // An unset imbalance steps from the library's 1 (balanced routing).
        assert!(c.select_key("run.dropless_imbalance"));
        c.adjust(1).expect("step");
        assert_eq!(fields::lookup(&c.draft, "run.dropless_imbalance").and_then(Value::as_float), Some(1.1));
        // Not on a cpu run, unless the file sets them (then validation names them).
        let mut c = Composer::from_template("topk").expect("template");
        assert!(!c.select_key("run.nodes"));
        assert!(c.select_key("description"));
        c.set_selected("a note").expect("description");
        assert!(c.select_key("layout.ep"));
        let mut draft = c.draft.clone();
        fields::store(&mut draft, "run.nodes", Some(Value::Integer(2)));
        let c = Composer::new(draft, None);
        assert!(!c.problems_for("run.nodes").is_empty(), "{:?}", c.check);
        assert!(c.visible_fields().iter().any(|f| f.key == "run.nodes"));
        assert!(spec_text(&c.draft).contains("description = \"a note\""));
        // MPMoE's budget for its automatic choices.
        let mut c = Composer::from_template("mpmoe").expect("template");
        assert!(c.select_key("mpmoe.memory_budget_mib"));
        assert!(c.adjust(1).unwrap_err().contains("Enter"), "no limit: nothing to step from");
        c.set_selected("512").expect("budget");
        c.adjust(1).expect("step");
        assert_eq!(fields::lookup(&c.draft, "mpmoe.memory_budget_mib").and_then(Value::as_float), Some(1024.0));
    }

    #[test]
    fn the_prediction_follows_the_chosen_profile_and_shows_overlap() {
        let mut c = Composer::from_template("mpmoe").expect("template");
        let step = |c: &Composer| match &c.check {
            Check::Valid { prediction: Ok(p), .. } => p.step.clone().expect("predicted"),
            other => panic!("{other:?}"),
        };
        let own = step(&c);
        let mut seen = vec![own.profile.clone()];
        for name in PREDICTION_PROFILES {
            assert_eq!(c.cycle_profile(), name);
            let sp = step(&c);
            assert_eq!(sp.profile, name);
            assert!(sp.seconds > 0.0 && (0.0..=1.0).contains(&sp.a2a_overlap) && sp.a2a_overlap > 0.0, "{sp:?}");
            seen.push(sp.profile);
        }
        // Datasheet and measured H100 differ in what they predict.
        let (h100, h100_ds) = (step(&{ let mut d = c.clone(); d.profile = None; d.cycle_profile(); d }), {
            let mut d = c.clone();
            d.profile = Some("h200".into());
            d.cycle_profile();
            step(&d)
        });
        assert_eq!((h100.profile.as_str(), h100_ds.profile.as_str()), ("h100", "h100-datasheet"));
        assert_ne!(h100.seconds, h100_ds.seconds);
        // After the last one, the spec's own profile again.
        assert_eq!(c.cycle_profile(), "the spec's own");
        assert_eq!(step(&c), own);
        assert_eq!(seen.len(), 5);
    }

    #[test]
    fn an_overlapped_design_shows_what_its_interleaved_streams_can_hold() {
        let c = Composer::from_template("scmoe").expect("template");
        let Check::Valid { prediction: Ok(p), .. } = &c.check else { panic!("{:?}", c.check) };
        assert!(p.interleaved_peak > p.peak_total, "{} vs {}", p.interleaved_peak, p.peak_total);
    }

    #[test]
    fn prediction_has_every_category_of_a_training_run() {
        let c = Composer::from_template("mpmoe").expect("template");
        let Check::Valid { prediction: Ok(p), .. } = &c.check else { panic!("{:?}", c.check) };
        assert_eq!(p.world, 4);
        assert!(p.peak_total > 0 && p.max_ops > 0);
        assert_eq!(p.at_peak.iter().sum::<u64>(), p.peak_total);
        let sp = p.step.as_ref().expect("the sim backend predicts a step time");
        assert!(sp.seconds > 0.0 && !sp.profile.is_empty() && (0.0..=1.0).contains(&sp.overlap));
        assert!(p.at_peak[moelab::taxonomy::MemCategory::Params.index()] > 0);
    }

    #[test]
    fn saved_toml_loads_unchanged_and_a_broken_file_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut c = Composer::from_template("tutel").expect("template");
        c.select_key("tutel.degree");
        c.adjust(1).expect("adjust");
        let path = dir.path().join("t.toml");
        c.save(&path).expect("save");
        let loaded = moelab::spec::load_file(&path).expect("moelab accepts the saved file");
        assert_eq!(c.resolved(), Some(&loaded));
        let back = Composer::open(&path).expect("reopen");
        assert_eq!(back.draft, c.draft);

        let broken = dir.path().join("broken.toml");
        std::fs::write(&broken, "name = \"x\"\n[model\nd_model = 3").expect("write");
        let e = Composer::open(&broken).expect_err("broken");
        assert!(e.to_string().contains("broken.toml"), "{e}");
        let invalid = dir.path().join("invalid.toml");
        std::fs::write(&invalid, "name = \"x\"\n[model]\nd_model = 8\nd_ffn = 8\nn_experts = 8\ntokens_per_rank = 8\n[layout]\nep = 3\n").expect("write");
        let c = Composer::open(&invalid).expect("invalid files open with their problems");
        assert_eq!(c.problems_for("layout.ep").len(), 1);
    }

    #[test]
    fn changing_the_variant_drops_the_old_options_table() {
        let mut c = Composer::from_template("mpmoe").expect("template");
        c.select_key("variant");
        c.set_selected("topk").expect("set");
        assert!(!c.draft.contains_key("mpmoe"));
        assert!(c.resolved().is_some(), "{:?}", c.check);
        assert!(!c.visible_fields().iter().any(|f| f.key.starts_with("mpmoe")));
    }

    #[test]
    fn switching_back_to_a_variant_restores_its_options() {
        let mut c = Composer::from_template("mpmoe").expect("template");
        c.select_key("mpmoe.chunks");
        c.set_selected("2").expect("chunks");
        let chunks = |c: &Composer| fields::lookup(&c.draft, "mpmoe.chunks").cloned();
        assert_eq!(chunks(&c), Some(Value::Integer(2)));
        c.select_key("variant");
        c.set_selected("topk").expect("topk");
        assert_eq!(chunks(&c), None);
        c.select_key("variant");
        c.set_selected("mpmoe").expect("mpmoe");
        assert_eq!(chunks(&c), Some(Value::Integer(2)), "{:?}", c.draft);
        assert!(c.resolved().is_some(), "{:?}", c.check);
        // PPMoE's table goes too (it would make a topk spec invalid).
        let mut c = Composer::from_template("ppmoe").expect("template");
        c.select_key("variant");
        c.set_selected("topk").expect("topk");
        assert!(!c.draft.contains_key("ppmoe"), "{:?}", c.draft);
        assert!(c.problems_for("ppmoe").is_empty());
    }
}

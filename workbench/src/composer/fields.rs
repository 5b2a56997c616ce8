//! The composer's editable fields. The draft is kept as a TOML table (what the file says),
//! and each field is a dotted key with a kind that says how to show, parse and step it, so
//! the composer follows the library's spec as it grows: fields it does not list are kept
//! untouched, and defaults are read from the library rather than copied here.
//!
//! Setters keep derived fields in step (world follows the degrees, tokens_per_rank follows
//! batch x seq_len) when they agreed before the edit, so one change does not create a
//! second, unrelated error.

use moelab::spec::ExperimentSpec;
use std::sync::LazyLock;
use toml::{Table, Value};

/// What a field holds and how the left/right keys change it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    /// Free text (names); only typed.
    Text,
    /// Optional free text (`auto` or nothing unsets it); only typed.
    OptText,
    /// Whole number; arrows add or subtract one.
    Step,
    /// Whole number; arrows double or halve (sizes).
    Double,
    /// Optional whole number (`auto` unsets it); arrows double or halve.
    OptDouble,
    /// Optional whole number (`auto` unsets it); arrows add or subtract one.
    OptStep,
    /// Number; arrows add or subtract this amount.
    Add(f64),
    /// Optional number (`auto` unsets it); arrows add or subtract this amount.
    OptAdd(f64),
    /// Number; arrows multiply or divide by this factor.
    Scale(f64),
    /// Optional number (`auto` unsets it); arrows multiply or divide by this factor.
    OptScale(f64),
    /// true / false.
    Bool,
    /// Optional true / false (`auto` unsets it); arrows cycle auto, true, false.
    OptBool,
    /// One of these spellings (a typed value outside the list is left to validation).
    Choice(&'static [&'static str]),
    /// A whole number or `"auto"`; arrows move through these spellings.
    NumberOrAuto(&'static [&'static str]),
    /// Whether a sub-table is present (e.g. `[model.backbone]`).
    Table,
}

/// One editable field.
#[derive(Debug)]
pub struct Field {
    /// Dotted TOML key, as validation problems name it (e.g. `layout.ep`).
    pub key: &'static str,
    /// One line on what it means.
    pub help: &'static str,
    /// What it holds.
    pub kind: Kind,
    /// Shown only for this variant (its options table), or for every variant.
    pub variant: Option<&'static str>,
}

/// Shown for an unset optional value; typing it (or nothing) unsets the value.
pub const UNSET: &str = "auto";

const VARIANTS: &[&str] = &["topk", "ppmoe", "ted", "tutel", "mpmoe", "scmoe", "dgmoe"];
const BACKENDS: &[&str] = &["auto", "cpu", "cuda", "sim"];
const MODES: &[&str] = &["training", "inference"];
const ACTIVATIONS: &[&str] = &["gelu", "relu"];
const DTYPES: &[&str] = &["f32", "bf16"];
const REUSES: &[&str] = &["none", "recompute", "recomm", "reuse_buffers", "auto"];
const CHECKPOINTS: &[&str] = &["none", "full", "comm_aware"];
const A2AS: &[&str] = &["flat", "2d"];
const DEGREES: &[&str] = &["1", "2", "4", "8", "auto"];
const PARALLELISMS: &[&str] = &["fixed", "auto"];
const SCHEDULES: &[&str] = &["1f1b", "gpipe"];

const fn f(key: &'static str, kind: Kind, help: &'static str) -> Field {
    Field { key, help, kind, variant: None }
}

const fn v(variant: &'static str, key: &'static str, kind: Kind, help: &'static str) -> Field {
    Field { key, help, kind, variant: Some(variant) }
}

/// Every field, in the order the composer lists them.
pub static FIELDS: &[Field] = &[
    f("name", Kind::Text, "short name; names the run directory (letters, digits, - _ .)"),
    f("description", Kind::Text, "free text for the researcher (empty: none)"),
    f("variant", Kind::Choice(VARIANTS), "MoE design: selects the plan builder"),
    f("model.d_model", Kind::Double, "hidden size M"),
    f("model.d_ffn", Kind::Double, "expert hidden size H (fc1 [M,H], fc2 [H,M])"),
    f("model.n_experts", Kind::Double, "experts E per MoE layer"),
    f("model.top_k", Kind::Step, "experts chosen per token"),
    f("model.capacity_factor", Kind::OptAdd(0.25), "capacity ceil(cf*k*T/E) per expert; < 0: at most the real max load; auto = 1.25"),
    f("model.dropless", Kind::Bool, "no token dropped: capacity = the largest expert load"),
    f("model.renormalize", Kind::Bool, "renormalize the k gate probabilities to sum to one"),
    f("model.aux_loss_coef", Kind::Add(0.01), "weight of the load-balancing loss"),
    f("model.activation", Kind::Choice(ACTIVATIONS), "expert activation"),
    f("model.n_layers", Kind::Step, "MoE blocks (backbone + MoE layer each)"),
    f("model.tokens_per_rank", Kind::OptDouble, "tokens per data-parallel rank (= batch x seq_len)"),
    f("model.batch", Kind::OptDouble, "sequences per rank"),
    f("model.seq_len", Kind::OptDouble, "tokens per sequence (attention is causal within one)"),
    f("model.dtype", Kind::Choice(DTYPES), "storage precision (the cpu emulates bf16 storage over f32 math)"),
    f("model.backbone", Kind::Table, "dense part of each block: attention and/or an MLP"),
    f("model.backbone.n_heads", Kind::Double, "attention heads (divides d_model); 0 = none"),
    f("model.backbone.d_mlp", Kind::Double, "dense MLP hidden size; 0 = none"),
    f("layout.world", Kind::OptStep, "total ranks; auto = dp*ep*tp*pp"),
    f("layout.dp", Kind::Step, "data-parallel replicas of each expert"),
    f("layout.ep", Kind::Step, "expert parallelism: experts split over this many ranks"),
    f("layout.tp", Kind::Step, "tensor parallelism (ted, ppmoe: experts and backbone)"),
    f("layout.pp", Kind::Step, "pipeline stages (ppmoe; divides n_layers)"),
    v("mpmoe", "mpmoe.chunks", Kind::NumberOrAuto(DEGREES), "pipelining degree: a2a/expert chunks per layer"),
    v("mpmoe", "mpmoe.reuse", Kind::Choice(REUSES), "what backward restores instead of keeping buffers"),
    v("mpmoe", "mpmoe.memory_budget_mib", Kind::OptScale(2.0), "largest predicted peak per rank (MiB) an auto chunks/reuse may pick; auto = no limit"),
    v("tutel", "tutel.degree", Kind::NumberOrAuto(DEGREES), "pipelining degree; auto times 1, 2, 4"),
    v("tutel", "tutel.a2a", Kind::Choice(A2AS), "all-to-all: flat or 2d hierarchical"),
    v("tutel", "tutel.gpus_per_node", Kind::Double, "ranks per node for the 2d all-to-all"),
    v("tutel", "tutel.r", Kind::Step, "1 = expert parallel, 0 = data parallel; ep > E: copies of each token (r | ep/E)"),
    v("tutel", "tutel.parallelism", Kind::Choice(PARALLELISMS), "fixed uses r; auto times r = 0 and 1"),
    v("ted", "ted.duplicate_dropping", Kind::Bool, "TP ranks send only their 1/tp slice"),
    v("ppmoe", "ppmoe.micro_batches", Kind::OptStep, "micro-batches per step (divides batch); auto = enough for pp"),
    v("ppmoe", "ppmoe.schedule", Kind::Choice(SCHEDULES), "pipeline order: 1f1b (less memory) or gpipe"),
    v("ted", "ted.checkpoint", Kind::Choice(CHECKPOINTS), "MoE activation checkpointing: none, full, comm_aware"),
    f("run.backend", Kind::Choice(BACKENDS), "executor: auto (cuda if a GPU is visible, else cpu)"),
    f("run.steps", Kind::Step, "measured steps"),
    f("run.warmup", Kind::Step, "unmeasured steps before them"),
    f("run.seed", Kind::Step, "seed for weights and data"),
    f("run.mode", Kind::Choice(MODES), "training (fwd + bwd + Adam) or inference"),
    f("run.lr", Kind::Scale(10.0), "Adam learning rate"),
    f("run.profile", Kind::OptText, "sim hardware profile: a built-in name (h100, h200, ...) or a profile TOML's path; auto = h100"),
    f("run.gpus_per_node", Kind::OptDouble, "sim: GPUs per node of the simulated cluster; auto = the profile's"),
    f("run.nodes", Kind::OptStep, "sim: nodes of the simulated cluster; auto = enough for the world"),
    f("run.dropless_imbalance", Kind::OptAdd(0.1), "sim, dropless: fullest expert's load over the mean (>= 1); auto = 1"),
    f("run.kept_share", Kind::OptAdd(0.05), "sim, capacity: share of routed assignments kept, in (0, 1]; auto = 1"),
    f("run.host_copies", Kind::OptBool, "sim: the executor keeps host copies of routing tables; auto = true"),
];

/// Settings of the sim backend only: listed for a sim run, or when the draft sets them
/// (validation then names them, with the fix to remove them).
const SIM_ONLY: &[&str] = &["run.profile", "run.gpus_per_node", "run.nodes", "run.dropless_imbalance", "run.kept_share", "run.host_copies"];

/// What an optional field means when unset and the resolved spec leaves it unset too (the
/// library's documented value), to step from.
fn unset_means(key: &str) -> Option<Value> {
    match key {
        "run.dropless_imbalance" | "run.kept_share" => Some(Value::Float(1.0)),
        "run.host_copies" => Some(Value::Boolean(true)),
        _ => None,
    }
}

/// Look a field up by key.
pub fn by_key(key: &str) -> Option<&'static Field> {
    FIELDS.iter().find(|f| f.key == key)
}

/// The library's defaults as a table: a minimal spec with every options table, deserialized
/// (which fills serde defaults) and written back.
fn defaults() -> &'static Table {
    static D: LazyLock<Table> = LazyLock::new(|| {
        let minimal = "name = \"x\"\n[model]\nd_model = 1\nd_ffn = 1\nn_experts = 1\n[mpmoe]\n[tutel]\n[ted]\n[ppmoe]\n";
        toml::from_str::<ExperimentSpec>(minimal)
            .ok()
            .and_then(|s| Value::try_from(&s).ok())
            .and_then(|v| v.as_table().cloned())
            .unwrap_or_default()
    });
    &D
}

/// The value at a dotted key.
pub fn lookup<'a>(t: &'a Table, key: &str) -> Option<&'a Value> {
    let mut parts = key.split('.');
    let mut cur = t.get(parts.next()?)?;
    for p in parts {
        cur = cur.as_table()?.get(p)?;
    }
    Some(cur)
}

/// Set (or with `None` remove) the value at a dotted key, creating tables on the way.
pub fn store(t: &mut Table, key: &str, value: Option<Value>) {
    let parts: Vec<&str> = key.split('.').collect();
    let (last, path) = parts.split_last().expect("keys are not empty");
    let mut cur = t;
    for p in path {
        if !cur.get(*p).is_some_and(Value::is_table) {
            if value.is_none() {
                return;
            }
            cur.insert(p.to_string(), Value::Table(Table::new()));
        }
        cur = cur.get_mut(*p).and_then(Value::as_table_mut).expect("just made a table");
    }
    match value {
        Some(v) => {
            cur.insert(last.to_string(), v);
        }
        None => {
            cur.remove(*last);
        }
    }
}

/// A value as the composer shows it (strings without quotes).
fn shown(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Float(x) => format!("{x}"),
        other => other.to_string(),
    }
}

fn int_at(t: &Table, key: &str) -> Option<i64> {
    lookup(t, key).or_else(|| lookup(defaults(), key)).and_then(Value::as_integer)
}

/// The draft's variant spelling.
pub fn variant_of(t: &Table) -> &str {
    t.get("variant").and_then(Value::as_str).unwrap_or("topk")
}

impl Field {
    /// Whether the field exists for this draft (variant options, backbone sizes, the
    /// capacity factor without dropless).
    pub fn applies(&self, t: &Table) -> bool {
        if let Some(v) = self.variant {
            return variant_of(t) == v;
        }
        if SIM_ONLY.contains(&self.key) {
            return lookup(t, "run.backend").and_then(Value::as_str) == Some("sim") || lookup(t, self.key).is_some();
        }
        match self.key {
            "model.backbone.n_heads" | "model.backbone.d_mlp" => lookup(t, "model.backbone").is_some(),
            "model.capacity_factor" => !lookup(t, "model.dropless").and_then(Value::as_bool).unwrap_or(false),
            _ => true,
        }
    }

    /// The value as shown and as edited (the library default when the file leaves it out).
    pub fn get(&self, t: &Table) -> String {
        if self.kind == Kind::Table {
            return lookup(t, self.key).is_some().to_string();
        }
        if self.kind == Kind::Text && lookup(t, self.key).is_none() {
            // Text the file leaves out (a description) reads empty, and writes back as such.
            return String::new();
        }
        lookup(t, self.key).or_else(|| lookup(defaults(), self.key)).map_or_else(|| UNSET.to_string(), shown)
    }

    /// Parse typed text into the draft; the error says what was expected.
    pub fn set(&self, t: &mut Table, text: &str) -> Result<(), String> {
        let s = text.trim();
        let unset = s.is_empty() || s == UNSET;
        let int = |s: &str| s.parse::<i64>().ok().filter(|x| *x >= 0).ok_or_else(|| format!("{}: expected a whole number, got {s:?}", self.key));
        let float = |s: &str| s.parse::<f64>().map_err(|_| format!("{}: expected a number, got {s:?}", self.key));
        let value = match self.kind {
            Kind::Text => Some(Value::String(s.to_string())),
            Kind::OptText if unset => None,
            Kind::OptText => Some(Value::String(s.to_string())),
            Kind::Step | Kind::Double => Some(Value::Integer(int(s)?)),
            Kind::OptStep | Kind::OptDouble if unset => None,
            Kind::OptStep | Kind::OptDouble => Some(Value::Integer(int(s)?)),
            Kind::Add(_) | Kind::Scale(_) => Some(Value::Float(float(s)?)),
            Kind::OptAdd(_) | Kind::OptScale(_) if unset => None,
            Kind::OptAdd(_) | Kind::OptScale(_) => Some(Value::Float(float(s)?)),
            Kind::OptBool if unset => None,
            Kind::Bool | Kind::Table | Kind::OptBool => Some(Value::Boolean(match s {
                "true" | "yes" | "on" => true,
                "false" | "no" | "off" => false,
                _ => return Err(format!("{}: expected true or false, got {s:?}", self.key)),
            })),
            Kind::Choice(_) => Some(Value::String(s.to_string())),
            Kind::NumberOrAuto(_) if s == "auto" => Some(Value::String("auto".into())),
            Kind::NumberOrAuto(_) => Some(Value::Integer(int(s)?)),
        };
        let before = t.clone();
        if self.kind == Kind::Table {
            if value == Some(Value::Boolean(true)) {
                if lookup(t, self.key).is_none() {
                    let d_model = int_at(t, "model.d_model").unwrap_or(1);
                    let heads = [4, 2, 1].into_iter().find(|h| d_model % h == 0).unwrap_or(1);
                    let mut bb = Table::new();
                    bb.insert("n_heads".into(), Value::Integer(heads));
                    bb.insert("d_mlp".into(), Value::Integer(int_at(t, "model.d_ffn").unwrap_or(1).max(1)));
                    store(t, self.key, Some(Value::Table(bb)));
                }
            } else {
                store(t, self.key, None);
            }
            return Ok(());
        }
        store(t, self.key, value);
        keep_in_step(self.key, &before, t);
        Ok(())
    }

    /// Whether the arrows change the value arithmetically (as opposed to cycling or toggling).
    fn is_numeric(&self) -> bool {
        matches!(self.kind, Kind::Step | Kind::Double | Kind::OptDouble | Kind::OptStep | Kind::Add(_) | Kind::OptAdd(_) | Kind::Scale(_) | Kind::OptScale(_))
    }

    /// The text one press of left (`dir < 0`) or right would set. A number the draft leaves
    /// unset steps from its value in `resolved` (the validated spec as a table, with derived
    /// values such as `layout.world` filled); the error says why there is nothing to step
    /// (a typed-only field, or an unset number the draft does not resolve).
    pub fn stepped(&self, t: &Table, resolved: Option<&Table>, dir: i32) -> Result<String, String> {
        let mut cur = self.get(t);
        if self.is_numeric() && cur == UNSET {
            let value = resolved.and_then(|r| lookup(r, self.key)).cloned().or_else(|| unset_means(self.key));
            cur = value.as_ref().map(shown).ok_or_else(|| {
                let why = if resolved.is_some() { "has no value to step from" } else { "has no value until the experiment is valid" };
                format!("{} is {UNSET} and {why}: press Enter to type a value", self.key)
            })?;
        }
        let up = dir > 0;
        let cycle = |list: &[&str]| {
            let n = list.len();
            let i = list.iter().position(|c| *c == cur);
            list[match (i, up) {
                (Some(i), true) => (i + 1) % n,
                (Some(i), false) => (i + n - 1) % n,
                (None, _) => 0,
            }]
            .to_string()
        };
        let not_a_number = || format!("{}: cannot step {cur:?}, not a number: press Enter to type a value", self.key);
        let int = || cur.parse::<i64>().map_err(|_| not_a_number());
        let float = || cur.parse::<f64>().map_err(|_| not_a_number());
        Ok(match self.kind {
            Kind::Text | Kind::OptText => return Err(format!("{} is typed: press Enter to edit it", self.key)),
            Kind::Bool | Kind::Table => (cur != "true").to_string(),
            Kind::OptBool => cycle(&[UNSET, "true", "false"]),
            Kind::Choice(list) | Kind::NumberOrAuto(list) => cycle(list),
            Kind::Step | Kind::OptStep => {
                let v = int()?;
                (if up { v.saturating_add(1) } else { (v - 1).max(0) }).to_string()
            }
            Kind::Double | Kind::OptDouble => {
                let v = int()?;
                (if up { v.saturating_mul(2).max(1) } else { (v / 2).max(1) }).to_string()
            }
            Kind::Add(d) | Kind::OptAdd(d) => {
                let v = float()?;
                let x = if up { v + d } else { (v - d).max(0.0) };
                format!("{}", (x * 1e6).round() / 1e6)
            }
            Kind::Scale(k) => {
                let v = float()?;
                format!("{:e}", if up { v * k } else { v / k })
            }
            Kind::OptScale(k) => {
                let v = float()?;
                format!("{}", if up { v * k } else { v / k })
            }
        })
    }
}

/// The variants' own options tables, each named like its variant.
pub const OPTION_TABLES: [&str; 4] = ["mpmoe", "tutel", "ted", "ppmoe"];

/// After `key` changed from `before` to `t`: drop options tables of other variants, let
/// world follow the degrees and tokens_per_rank follow batch x seq_len when they agreed.
fn keep_in_step(key: &str, before: &Table, t: &mut Table) {
    let product = |t: &Table| ["layout.dp", "layout.ep", "layout.tp", "layout.pp"].iter().map(|k| int_at(t, k).unwrap_or(1)).product::<i64>();
    match key {
        "variant" => {
            let v = variant_of(t).to_string();
            for table in OPTION_TABLES {
                if table != v {
                    t.remove(table);
                }
            }
        }
        "layout.dp" | "layout.ep" | "layout.tp" | "layout.pp" => {
            if lookup(t, "layout.world").and_then(Value::as_integer) == Some(product(before)) {
                store(t, "layout.world", Some(Value::Integer(product(t))));
            }
        }
        "model.batch" | "model.seq_len" => {
            let bs = |t: &Table| Some(lookup(t, "model.batch")?.as_integer()? * lookup(t, "model.seq_len")?.as_integer()?);
            let tokens = lookup(t, "model.tokens_per_rank").and_then(Value::as_integer);
            if tokens.is_some() && tokens == bs(before) {
                store(t, "model.tokens_per_rank", bs(t).map(Value::Integer));
            }
        }
        // Keep seq_len and let validation derive the batch from the new count.
        "model.tokens_per_rank" if lookup(t, "model.tokens_per_rank").is_some() && lookup(t, "model.seq_len").is_some() => {
            store(t, "model.batch", None);
        }
        "model.dropless" if lookup(t, "model.dropless").and_then(Value::as_bool) == Some(true) => {
            store(t, "model.capacity_factor", None);
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::composer::templates::template;

    #[test]
    fn every_field_reads_back_what_it_writes() {
        for name in VARIANTS {
            let mut t = template(name).expect("template");
            let orig = t.clone();
            for f in FIELDS {
                if !f.applies(&t) {
                    continue;
                }
                let shown = f.get(&t);
                f.set(&mut t, &shown).unwrap_or_else(|e| panic!("{name} {}: {e}", f.key));
                assert_eq!(f.get(&t), shown, "{name} {}", f.key);
            }
            let spec = |t: &Table| toml::from_str::<ExperimentSpec>(&toml::to_string(t).expect("ser")).expect("de");
            assert_eq!(spec(&t), spec(&orig), "{name}: writing every shown value back changes nothing");
        }
        // The sim-only settings and MPMoE's budget, set and unset, with no description.
        let text = "name = \"s\"\nvariant = \"mpmoe\"\n[model]\nd_model = 8\nd_ffn = 8\nn_experts = 2\n[run]\nbackend = \"sim\"\nprofile = \"h200\"\nnodes = 1\nkept_share = 0.9\nhost_copies = false\n[mpmoe]\nmemory_budget_mib = 512.5\n";
        let mut t: Table = toml::from_str(text).expect("toml");
        let orig = t.clone();
        let applied: Vec<_> = FIELDS.iter().filter(|f| f.applies(&t)).map(|f| f.key).collect();
        for key in SIM_ONLY.iter().chain(&["description", "mpmoe.memory_budget_mib"]) {
            assert!(applied.contains(key), "{key} listed: {applied:?}");
        }
        for f in FIELDS.iter().filter(|f| f.applies(&orig)) {
            let shown = f.get(&t);
            f.set(&mut t, &shown).unwrap_or_else(|e| panic!("{}: {e}", f.key));
            assert_eq!(f.get(&t), shown, "{}", f.key);
        }
        let spec = |t: &Table| toml::from_str::<ExperimentSpec>(&toml::to_string(t).expect("ser")).expect("de");
        assert_eq!(spec(&t), spec(&orig), "sim: writing every shown value back changes nothing");
    }

    #[test]
    fn world_and_tokens_follow_their_parts_when_they_agreed() {
        let mut t = template("topk").expect("template");
        store(&mut t, "layout.world", Some(Value::Integer(4)));
        by_key("layout.ep").expect("field").set(&mut t, "2").expect("set");
        assert_eq!(lookup(&t, "layout.world"), Some(&Value::Integer(2)));
        store(&mut t, "layout.world", Some(Value::Integer(7)));
        by_key("layout.ep").expect("field").set(&mut t, "4").expect("set");
        assert_eq!(lookup(&t, "layout.world"), Some(&Value::Integer(7)), "a world that disagreed is left for validation");
        store(&mut t, "model.tokens_per_rank", Some(Value::Integer(256)));
        by_key("model.batch").expect("field").set(&mut t, "8").expect("set");
        assert_eq!(lookup(&t, "model.tokens_per_rank"), Some(&Value::Integer(512)));
    }

    #[test]
    fn steps_cycle_double_toggle_and_refuse_text() {
        let mut t = template("dgmoe").expect("template");
        assert_eq!(by_key("variant").expect("f").stepped(&t, None, 1).as_deref(), Ok("topk"));
        assert_eq!(by_key("variant").expect("f").stepped(&t, None, -1).as_deref(), Ok("scmoe"));
        assert_eq!(by_key("model.d_model").expect("f").stepped(&t, None, 1).as_deref(), Ok("128"));
        assert_eq!(by_key("model.backbone").expect("f").stepped(&t, None, 1).as_deref(), Ok("false"));
        assert_eq!(by_key("model.capacity_factor").expect("f").stepped(&t, None, 1).as_deref(), Ok("1.5"));
        assert!(by_key("name").expect("f").stepped(&t, None, 1).unwrap_err().contains("typed"));
        let e = by_key("model.d_model").expect("f").set(&mut t, "abc").unwrap_err();
        assert!(e.contains("model.d_model") && e.contains("whole number"), "{e}");
        by_key("model.backbone").expect("f").set(&mut t, "false").expect("set");
        assert!(!by_key("model.backbone.n_heads").expect("f").applies(&t));
    }

    #[test]
    fn library_defaults_show_for_keys_the_file_leaves_out() {
        let t: Table = toml::from_str("name = \"x\"\nvariant = \"mpmoe\"\n[model]\nd_model = 8\nd_ffn = 8\nn_experts = 2\n").expect("toml");
        assert_eq!(by_key("run.steps").expect("f").get(&t), "3");
        assert_eq!(by_key("layout.ep").expect("f").get(&t), "1");
        assert_eq!(by_key("mpmoe.chunks").expect("f").get(&t), "2");
        assert_eq!(by_key("layout.world").expect("f").get(&t), UNSET);
    }
}

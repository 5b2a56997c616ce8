//! Experiment specs: the shipped experiment files, defaults, the TOML round trip, and the
//! error for every kind of bad input (which field, which value, and how to fix it).
//!
//! The regression section pins defects found while these tests were written (overflow,
//! quadratic divisor listing, unnamed fields in type errors, invented values in messages).

use moelab::spec::{
    from_toml_str, load_file, Activation, BackendKind, Capacity, DType, ExperimentSpec, Mode, Problem,
    SpecError, Variant,
};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// The smallest spec that resolves: name, model sizes and a token count.
const MINIMAL: &str = r#"name = "t"

[model]
d_model = 64
d_ffn = 128
n_experts = 8
tokens_per_rank = 256
"#;

/// `MINIMAL` with `from` replaced by `to`; panics if `from` is not there (so a typo in a
/// test cannot silently test the minimal spec instead).
fn edit(from: &str, to: &str) -> String {
    assert!(MINIMAL.contains(from), "test bug: {from:?} is not in the minimal spec");
    MINIMAL.replacen(from, to, 1)
}

/// `MINIMAL` with extra lines appended to `[model]` and then extra sections.
fn with(model_lines: &str, sections: &str) -> String {
    format!("{MINIMAL}{model_lines}\n{sections}\n")
}

fn ok(text: &str) -> ExperimentSpec {
    match from_toml_str(text) {
        Ok(spec) => spec,
        Err(e) => panic!("expected the spec to be accepted, got:\n{e}\n--- spec ---\n{text}"),
    }
}

fn err(text: &str) -> SpecError {
    match from_toml_str(text) {
        Ok(spec) => panic!("expected the spec to be rejected, it resolved to {spec:#?}\n--- spec ---\n{text}"),
        Err(e) => e,
    }
}

/// Rejected as malformed / unknown field / wrong type; returns (message, location, Display).
fn parse_err(text: &str) -> (String, Option<(usize, usize)>, String) {
    let e = err(text);
    let shown = e.to_string();
    assert!(e.problems().is_empty(), "parse errors carry no problems");
    match e {
        SpecError::Parse { message, location, file } => {
            assert_eq!(file, None, "from_toml_str has no file");
            (message, location, shown)
        }
        other => panic!("expected SpecError::Parse, got {other:?}"),
    }
}

/// Rejected as inconsistent; returns every problem and the Display text.
fn invalid(text: &str) -> (Vec<Problem>, String) {
    let e = err(text);
    let shown = e.to_string();
    match e {
        SpecError::Invalid { problems, file } => {
            assert_eq!(file, None, "from_toml_str has no file");
            assert!(!problems.is_empty(), "Invalid with no problems");
            (problems, shown)
        }
        other => panic!("expected SpecError::Invalid, got {other:?}\n{shown}"),
    }
}

/// Rejected with exactly one problem, on `field`; returns it and the Display text.
fn one_problem(text: &str, field: &str) -> (Problem, String) {
    let (problems, shown) = invalid(text);
    assert_eq!(problems.len(), 1, "expected exactly one problem (on {field}), got:\n{shown}");
    assert_eq!(problems[0].field, field, "wrong field in:\n{shown}");
    assert!(!problems[0].fix.trim().is_empty(), "problem has no fix:\n{shown}");
    assert!(shown.contains(&format!("{field}: ")), "Display does not name the field {field}:\n{shown}");
    assert!(shown.contains("(fix: "), "Display does not show the fix:\n{shown}");
    (problems.into_iter().next().unwrap(), shown)
}

#[track_caller]
fn assert_mentions(shown: &str, needles: &[&str]) {
    for n in needles {
        assert!(shown.contains(n), "expected the message to mention {n:?}; it says:\n{shown}");
    }
}

fn experiments_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments")
}

fn experiment_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(experiments_dir())
        .expect("experiments/ exists")
        .map(|e| e.expect("readable directory entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    files
}

/// Runs `f` on a helper thread; fails if it panics or takes longer than `limit`.
/// (A runaway thread is left behind; the test binary ends it when it exits.)
fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)));
    });
    match rx.recv_timeout(limit) {
        Ok(Ok(v)) => v,
        Ok(Err(_)) => panic!("panicked instead of returning an error (see the panic message above)"),
        Err(_) => panic!("did not finish within {limit:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Shipped experiment files
// ---------------------------------------------------------------------------------------------

#[test]
fn every_experiment_file_parses_and_validates() {
    let files = experiment_files();
    for required in ["quickstart.toml", "topk-ep4.toml", "topk-dp2-ep2.toml", "topk-dropless.toml"] {
        assert!(
            files.iter().any(|p| p.file_name().is_some_and(|n| n == required)),
            "experiments/{required} is missing"
        );
    }
    let mut failures = Vec::new();
    for path in &files {
        match load_file(path) {
            Ok(spec) => {
                // The file is resolved: the accessors that need resolution work.
                assert!(spec.tokens_per_rank() > 0 && spec.seq_len() > 0 && spec.world() > 0);
            }
            Err(e) => failures.push(format!("{e}")),
        }
    }
    assert!(failures.is_empty(), "experiment files that do not load:\n{}", failures.join("\n"));
}

#[test]
fn every_experiment_file_round_trips() {
    for path in experiment_files() {
        let spec = load_file(&path).unwrap_or_else(|e| panic!("{e}"));
        let text = spec.to_toml();
        let back = from_toml_str(&text)
            .unwrap_or_else(|e| panic!("{}: the serialized spec does not parse back: {e}\n{text}", path.display()));
        assert_eq!(back, spec, "{}: round trip changed the spec\n{text}", path.display());
    }
}

#[test]
fn quickstart_resolves_to_the_documented_run() {
    let spec = load_file(&experiments_dir().join("quickstart.toml")).unwrap();
    assert_eq!(spec.name, "quickstart");
    assert_eq!(spec.variant, Variant::Topk);
    let m = &spec.model;
    assert_eq!((m.d_model, m.d_ffn, m.n_experts, m.top_k, m.n_layers), (64, 128, 8, 2, 2));
    assert_eq!(m.capacity_factor, Some(1.25));
    assert!(!m.dropless);
    assert_eq!((m.batch, m.seq_len, m.tokens_per_rank), (Some(4), Some(64), Some(256)));
    let bb = m.backbone.as_ref().expect("quickstart has a backbone");
    assert_eq!((bb.n_heads, bb.d_mlp), (4, 128));
    assert_eq!((spec.layout.dp, spec.layout.ep, spec.layout.tp, spec.layout.pp), (1, 4, 1, 1));
    assert_eq!(spec.world(), 4);
    assert_eq!(spec.run.backend, BackendKind::Cpu, "auto resolves to cpu in this build");
    assert_eq!((spec.run.steps, spec.run.warmup, spec.run.seed), (5, 1, 0));
    assert_eq!(spec.run.mode, Mode::Training);
}

#[test]
fn quickstart_comments_every_field() {
    // Users copy this file: every `key = value` line carries a `#` comment.
    let text = std::fs::read_to_string(experiments_dir().join("quickstart.toml")).unwrap();
    for line in text.lines() {
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') || t.starts_with('[') {
            continue;
        }
        assert!(t.contains(" # "), "quickstart.toml: field without a comment: {line}");
    }
}

#[test]
fn shipped_layouts_are_what_their_names_say() {
    let load = |f: &str| load_file(&experiments_dir().join(f)).unwrap();
    let ep4 = load("topk-ep4.toml");
    assert_eq!((ep4.layout.dp, ep4.layout.ep, ep4.world()), (1, 4, 4));
    let dp2 = load("topk-dp2-ep2.toml");
    assert_eq!((dp2.layout.dp, dp2.layout.ep, dp2.world()), (2, 2, 4));
    let dropless = load("topk-dropless.toml");
    assert!(dropless.model.dropless);
    assert_eq!(dropless.model.capacity_factor, None);
    assert_eq!(dropless.capacity(), Capacity::Dropless);
}

// ---------------------------------------------------------------------------------------------
// Defaults and round trip
// ---------------------------------------------------------------------------------------------

#[test]
fn minimal_spec_gets_the_documented_defaults() {
    let s = ok(MINIMAL);
    assert_eq!(s.name, "t");
    assert_eq!(s.description, "");
    assert_eq!(s.variant, Variant::Topk);
    let m = &s.model;
    assert_eq!((m.d_model, m.d_ffn, m.n_experts), (64, 128, 8));
    assert_eq!(m.top_k, 2);
    assert_eq!(m.capacity_factor, Some(1.25));
    assert_eq!(s.capacity(), Capacity::Factor(1.25));
    assert!(!m.dropless);
    assert!(!m.renormalize);
    assert_eq!(m.aux_loss_coef, 0.01);
    assert_eq!(m.activation, Activation::Gelu);
    assert_eq!(m.n_layers, 1);
    assert_eq!(m.tokens_per_rank, Some(256));
    assert_eq!((m.batch, m.seq_len), (Some(1), Some(256)), "tokens_per_rank alone is one sequence");
    assert_eq!(m.dtype, DType::F32);
    assert_eq!(m.backbone, None);
    let l = &s.layout;
    assert_eq!((l.world, l.dp, l.tp, l.ep, l.pp), (Some(1), 1, 1, 1, 1));
    assert_eq!(s.world(), 1);
    let r = &s.run;
    assert_eq!(r.backend, BackendKind::Cpu, "auto resolves to cpu");
    assert_eq!((r.steps, r.warmup, r.seed), (3, 1, 0));
    assert_eq!(r.mode, Mode::Training);
    assert_eq!(r.lr, 1e-3);
}

#[test]
fn token_count_can_be_given_as_batch_and_seq_len() {
    let s = ok(&edit("tokens_per_rank = 256", "batch = 4\nseq_len = 64"));
    assert_eq!((s.model.tokens_per_rank, s.model.batch, s.model.seq_len), (Some(256), Some(4), Some(64)));
    // All three, consistent.
    let s = ok(&with("batch = 4\nseq_len = 64", ""));
    assert_eq!((s.tokens_per_rank(), s.seq_len()), (256, 64));
    // tokens_per_rank and one of the others: the other is derived.
    let s = ok(&with("batch = 2", ""));
    assert_eq!((s.model.batch, s.model.seq_len), (Some(2), Some(128)));
    let s = ok(&with("seq_len = 32", ""));
    assert_eq!((s.model.batch, s.model.seq_len), (Some(8), Some(32)));
}

#[test]
fn world_defaults_to_the_product_of_the_degrees() {
    let s = ok(&with("", "[layout]\ndp = 2\nep = 4"));
    assert_eq!((s.layout.world, s.world()), (Some(8), 8));
    let s = ok(&with("", "[layout]\ndp = 2\nep = 4\nworld = 8"));
    assert_eq!(s.world(), 8);
}

#[test]
fn explicit_cpu_backend_and_f32_are_accepted() {
    let s = ok(&with("dtype = \"f32\"", "[run]\nbackend = \"cpu\"\nmode = \"inference\""));
    assert_eq!(s.run.backend, BackendKind::Cpu);
    assert_eq!(s.run.mode, Mode::Inference);
}

#[test]
fn dropless_resolves_without_a_capacity_factor() {
    let s = ok(&with("dropless = true", ""));
    assert_eq!(s.model.capacity_factor, None);
    assert_eq!(s.capacity(), Capacity::Dropless);
}

#[test]
fn resolved_spec_round_trips_through_to_toml() {
    let full = r#"
name = "full.spec_1"
description = "every field set"
variant = "topk"

[model]
d_model = 96
d_ffn = 200
n_experts = 12
top_k = 3
dropless = true
renormalize = true
aux_loss_coef = 0.02
activation = "relu"
n_layers = 3
batch = 3
seq_len = 10
dtype = "f32"

[model.backbone]
n_heads = 6
d_mlp = 50

[layout]
dp = 2
ep = 6

[run]
backend = "cpu"
steps = 7
warmup = 0
seed = 12345
mode = "inference"
lr = 0.0003
"#;
    for text in [MINIMAL.to_string(), full.to_string(), with("capacity_factor = 0.75", "[layout]\nep = 8")] {
        let spec = ok(&text);
        let toml = spec.to_toml();
        let back = from_toml_str(&toml).unwrap_or_else(|e| panic!("does not parse back: {e}\n{toml}"));
        assert_eq!(back, spec, "round trip changed the spec:\n{toml}");
        // Serializing again gives the same text: to_toml is a fixed point after resolution.
        assert_eq!(back.to_toml(), toml);
    }
}

#[test]
fn load_file_names_the_file_in_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.toml");
    match load_file(&missing) {
        Err(SpecError::Io { path, message }) => {
            assert!(path.ends_with("nope.toml"));
            assert!(!message.is_empty());
        }
        other => panic!("expected Io, got {other:?}"),
    }

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "name = \"x\"\n[model\n").unwrap();
    let e = load_file(&bad).unwrap_err();
    assert!(matches!(e, SpecError::Parse { file: Some(_), location: Some((2, _)), .. }), "{e:?}");
    assert_mentions(&e.to_string(), &["bad.toml:2:"]);

    let inconsistent = dir.path().join("inconsistent.toml");
    std::fs::write(&inconsistent, with("top_k = 9", "")).unwrap();
    let e = load_file(&inconsistent).unwrap_err();
    assert!(matches!(e, SpecError::Invalid { file: Some(_), .. }), "{e:?}");
    assert_eq!(e.problems().len(), 1);
    assert_mentions(&e.to_string(), &["inconsistent.toml: invalid experiment", "top_k=9"]);
}

// ---------------------------------------------------------------------------------------------
// Bad specs: TOML-level errors (SpecError::Parse)
// ---------------------------------------------------------------------------------------------

#[test]
fn malformed_toml_reports_the_line() {
    // Unclosed table header on line 3.
    let (message, location, shown) = parse_err("name = \"t\"\n\n[model\nd_model = 64\n");
    assert_eq!(location.map(|l| l.0), Some(3), "{shown}");
    assert!(message.contains(']'), "{message}");
    assert_mentions(&shown, &["line 3, column", "invalid TOML", "expected `]`"]);

    // Unterminated string on line 1.
    let (_, location, shown) = parse_err("name = \"t\n[model]\n");
    assert_eq!(location.map(|l| l.0), Some(1), "{shown}");
    assert_mentions(&shown, &["line 1, column"]);
}

#[test]
fn unknown_top_level_field_is_rejected() {
    let text = edit("name = \"t\"\n", "name = \"t\"\nd_modle = 64\n");
    let (_, location, shown) = parse_err(&text);
    assert_eq!(location, Some((2, 1)), "points at the unknown key: {shown}");
    // The offending key, and the fix: the fields that are allowed there.
    assert_mentions(&shown, &["unknown field `d_modle`", "expected one of", "`name`", "`model`", "`run`"]);
}

#[test]
fn a_capacity_factor_far_beyond_every_token_is_rejected_with_the_largest_useful_one() {
    // quickstart-like: 8 experts, top-2: 4.0 already gives every expert a slot per token.
    let base = "name = \"t\"\n[model]\nd_model = 8\nd_ffn = 8\nn_experts = 8\ntop_k = 2\ntokens_per_rank = 16\n";
    // Up to 16 slots per token is allowed (wasteful, not wrong); beyond, a mistake.
    ok(&format!("{base}capacity_factor = 64.0\n"));
    // A negative factor is bounded by the step's largest load: any size is safe.
    ok(&format!("{base}capacity_factor = -1e300\n"));
    for cf in ["1e300", "64.5"] {
        let e = err(&format!("{base}capacity_factor = {cf}\n"));
        let shown = e.to_string();
        assert_mentions(&shown, &["model.capacity_factor", "more slots than there are tokens", "capacity_factor <= 4", "dropless = true"]);
        assert!(!shown.contains("000000000"), "the factor is written short: {shown}");
    }
}

#[test]
fn a_misspelled_or_misplaced_field_is_named_with_the_one_meant() {
    let text = "name = \"t\"\n[model]\nd_model = 8\nd_ffn = 8\nn_experts = 2\ntop_kk = 2\n";
    let (_, _, shown) = parse_err(text);
    assert_mentions(&shown, &["unknown field `top_kk` (did you mean `top_k`?)", "expected one of"]);
    // A field of another table says which.
    let (_, _, shown) = parse_err("name = \"t\"\n[model]\nd_model = 8\nd_ffn = 8\nn_experts = 2\nn_heads = 2\n");
    assert_mentions(&shown, &["unknown field `n_heads` (`n_heads` belongs in [model.backbone])"]);
    let (_, _, shown) = parse_err("name = \"t\"\n[model]\nd_model = 8\nd_ffn = 8\nn_experts = 2\n[layout]\nsteps = 2\n");
    assert_mentions(&shown, &["`steps` belongs in [run]"]);
    // A field of several tables names them all.
    let (_, _, shown) = parse_err("name = \"t\"\n[model]\nd_model = 8\nd_ffn = 8\nn_experts = 2\ngpus_per_node = 2\n");
    assert_mentions(&shown, &["`gpus_per_node` belongs in [run] or [tutel]"]);
    // Far from every field: the list only.
    let (_, _, shown) = parse_err("name = \"t\"\n[model]\nd_model = 8\nd_ffn = 8\nn_experts = 2\nzebra = 2\n");
    assert!(shown.contains("unknown field `zebra`, expected one of") && !shown.contains("did you mean") && !shown.contains("belongs"), "{shown}");
    // A negative count says what to write.
    let (_, _, shown) = parse_err("name = \"t\"\n[model]\nd_model = -64\nd_ffn = 8\nn_experts = 2\n");
    assert_mentions(&shown, &["model.d_model", "-64", "a whole number, 0 or more"]);
    // A missing field says where every field is shown.
    let (_, _, shown) = parse_err("name = \"t\"\n[model]\nd_ffn = 8\nn_experts = 2\n");
    assert_mentions(&shown, &["missing field `d_model`", "experiments/quickstart.toml"]);
}

#[test]
fn a_misspelled_table_is_named_with_the_one_meant() {
    // Without the check serde first misses `[model]`'s fields ("missing field d_model",
    // pointing at `[model.backbone]`) and never names `modle`.
    let text = "name = \"t\"\n[modle]\nd_model = 8\nd_ffn = 8\nn_experts = 2\n[model.backbone]\nn_heads = 2\n";
    let (_, location, shown) = parse_err(text);
    assert_eq!(location, Some((2, 1)), "points at the misspelled table: {shown}");
    assert_mentions(&shown, &["unknown field `modle`", "did you mean `model`?", "expected one of"]);
    // A key far from every table gets the list, not a wrong guess (`seed` is not `ted`).
    let (_, _, shown) = parse_err("name = \"t\"\nseed = 3\n[model]\nd_model = 8\nd_ffn = 8\nn_experts = 2\n");
    assert!(shown.contains("unknown field `seed`") && !shown.contains("did you mean"), "{shown}");
    // Every field of the spec type is a known top-level key.
    let full = ok(&format!("{}\n[mpmoe]\n", edit("name = \"t\"\n", "name = \"t\"\ndescription = \"d\"\nvariant = \"mpmoe\"\n")));
    let written: toml::Table = toml::from_str(&full.to_toml()).expect("toml");
    for key in written.keys() {
        assert!(moelab::spec::ExperimentSpec::TOP_LEVEL_KEYS.contains(&key.as_str()), "{key}");
    }
}

#[test]
fn unknown_model_field_is_rejected() {
    let text = edit("d_model = 64", "d_modle = 64");
    let (_, location, shown) = parse_err(&text);
    assert_eq!(location, Some((4, 1)), "points at the unknown key: {shown}");
    assert_mentions(&shown, &["unknown field `d_modle`", "expected one of", "`d_model`", "`tokens_per_rank`"]);
}

#[test]
fn unknown_layout_run_and_backbone_fields_are_rejected() {
    let cases = [
        (with("", "[layout]\nexperts_parallel = 2"), "experts_parallel", "`ep`"),
        (with("", "[run]\nstep = 2"), "step", "`steps`"),
        (with("", "[model.backbone]\nheads = 4"), "heads", "`n_heads`"),
    ];
    for (text, key, allowed) in cases {
        let (_, location, shown) = parse_err(&text);
        assert!(location.is_some(), "{shown}");
        assert_mentions(&shown, &[&format!("unknown field `{key}`"), allowed]);
    }
}

#[test]
fn missing_required_fields_are_named() {
    let (_, _, shown) = parse_err("name = \"t\"\n");
    assert_mentions(&shown, &["missing field `model`"]);
    let (_, _, shown) = parse_err(&edit("d_ffn = 128\n", ""));
    assert_mentions(&shown, &["missing field `d_ffn`"]);
    let (_, _, shown) = parse_err(&edit("name = \"t\"\n", ""));
    assert_mentions(&shown, &["missing field `name`"]);
}

#[test]
fn wrong_type_for_d_model_is_rejected() {
    let (_, location, shown) = parse_err(&edit("d_model = 64", "d_model = \"64\""));
    assert_eq!(location, Some((4, 11)), "points at the value: {shown}");
    // The offending value and what is expected instead.
    assert_mentions(&shown, &["invalid type", "string \"64\"", "expected usize", "line 4"]);
}

#[test]
fn wrong_type_error_names_the_field() {
    // `line 4, column 11: invalid TOML: invalid type: string "64", expected usize` does not
    // say which field; a reader has to count lines. The message should name `d_model`.
    let (_, _, shown) = parse_err(&edit("d_model = 64", "d_model = \"64\""));
    assert_mentions(&shown, &["d_model"]);
}

#[test]
fn negative_size_is_rejected() {
    // usize fields cannot hold -4: it is a TOML type error, not a validation problem.
    let (_, location, shown) = parse_err(&edit("d_model = 64", "d_model = -4"));
    assert_eq!(location, Some((4, 11)), "points at the value: {shown}");
    assert_mentions(&shown, &["-4", "expected usize", "line 4"]);
}

#[test]
fn negative_size_error_names_the_field() {
    let (_, _, shown) = parse_err(&edit("d_model = 64", "d_model = -4"));
    assert_mentions(&shown, &["d_model", "-4"]);
    let (_, _, shown) = parse_err(&with("", "[layout]\nep = -2"));
    assert_mentions(&shown, &["ep", "-2"]);
}

#[test]
fn float_for_integer_field_is_rejected() {
    let (_, _, shown) = parse_err(&edit("n_experts = 8", "n_experts = 8.0"));
    assert_mentions(&shown, &["floating point `8.0`", "expected usize"]);
}

#[test]
fn unknown_variant_name_is_rejected() {
    let (_, location, shown) = parse_err(&edit("name = \"t\"\n", "name = \"t\"\nvariant = \"switch\"\n"));
    assert_eq!(location.map(|l| l.0), Some(2), "{shown}");
    // The offending value, and every valid spelling.
    assert_mentions(&shown, &["unknown variant `switch`", "expected one of"]);
    for v in Variant::ALL {
        assert_mentions(&shown, &[&format!("`{}`", v.as_str())]);
    }
}

#[test]
fn unknown_backend_activation_dtype_and_mode_names_are_rejected() {
    let cases = [
        (with("", "[run]\nbackend = \"tpu\""), "`tpu`", "`cpu`"),
        (with("activation = \"swish\"", ""), "`swish`", "`gelu`"),
        (with("dtype = \"fp16\"", ""), "`fp16`", "`bf16`"),
        (with("", "[run]\nmode = \"train\""), "`train`", "`training`"),
    ];
    for (text, bad, good) in cases {
        let (_, _, shown) = parse_err(&text);
        assert_mentions(&shown, &["unknown variant", bad, good]);
    }
}

// ---------------------------------------------------------------------------------------------
// Bad specs: validation problems (SpecError::Invalid)
// ---------------------------------------------------------------------------------------------

#[test]
fn zero_d_model_is_rejected() {
    let (p, shown) = one_problem(&edit("d_model = 64", "d_model = 0"), "model.d_model");
    assert_mentions(&p.message, &["d_model=0"]);
    assert_mentions(&p.fix, &["positive"]);
    assert_mentions(&shown, &["model.d_model=0 must be at least 1"]);
}

#[test]
fn zero_sizes_are_each_rejected_on_their_field() {
    let cases = [
        (edit("d_ffn = 128", "d_ffn = 0"), "model.d_ffn"),
        (edit("n_experts = 8", "n_experts = 0"), "model.n_experts"),
        (with("top_k = 0", ""), "model.top_k"),
        (with("n_layers = 0", ""), "model.n_layers"),
        (edit("tokens_per_rank = 256", "tokens_per_rank = 0"), "model.tokens_per_rank"),
        (with("", "[layout]\nworld = 0"), "layout.world"),
        (with("", "[layout]\nep = 0"), "layout.ep"),
    ];
    for (text, field) in cases {
        let (p, _) = one_problem(&text, field);
        assert_mentions(&p.message, &["=0"]);
    }
}

#[test]
fn top_k_exceeding_n_experts_is_rejected() {
    let (p, shown) = one_problem(&with("top_k = 9", ""), "model.top_k");
    assert_eq!(p.message, "top_k=9 exceeds n_experts=8");
    assert_mentions(&p.fix, &["between 1 and 8"]);
    assert_mentions(&shown, &["top_k=9 exceeds n_experts=8"]);
    // top_k == n_experts is fine.
    assert_eq!(ok(&with("top_k = 8", "")).model.top_k, 8);
}

#[test]
fn ep_not_dividing_n_experts_is_rejected() {
    let (p, shown) = one_problem(&with("", "[layout]\nep = 3"), "layout.ep");
    assert_eq!(p.message, "ep=3 does not divide n_experts=8");
    assert_mentions(&p.fix, &["1, 2, 4, 8"]);
    assert_mentions(&shown, &["ep=3 does not divide n_experts=8"]);
}

#[test]
fn world_inconsistent_with_degrees_is_rejected() {
    let (p, shown) = one_problem(&with("", "[layout]\ndp = 2\nep = 2\nworld = 8"), "layout.world");
    assert_mentions(&p.message, &["world=8", "2*2*1*1 = 4"]);
    assert_mentions(&p.fix, &["world = 4"]);
    assert_mentions(&shown, &["world=8"]);
}

#[test]
fn tensor_parallelism_with_topk_is_rejected() {
    let (p, shown) = one_problem(&with("", "[layout]\ntp = 2"), "layout.tp");
    assert_mentions(&p.message, &["topk", "tp=2"]);
    assert_mentions(&p.fix, &["tp = 1"]);
    assert_mentions(&shown, &["tp=2"]);
}

#[test]
fn pipeline_stages_with_topk_are_rejected() {
    let (p, _) = one_problem(&with("", "[layout]\npp = 2"), "layout.pp");
    assert_mentions(&p.message, &["topk", "pp=2"]);
    assert_mentions(&p.fix, &["pp = 1"]);
}

#[test]
fn dropless_with_capacity_factor_is_rejected() {
    let (p, shown) = one_problem(&with("dropless = true\ncapacity_factor = 1.5", ""), "model.capacity_factor");
    assert_mentions(&p.message, &["capacity_factor=1.5", "dropless=true"]);
    assert_mentions(&p.fix, &["remove capacity_factor"]);
    assert_mentions(&shown, &["capacity_factor=1.5 conflicts with dropless=true"]);
}

#[test]
fn non_finite_capacity_factor_is_rejected() {
    for (value, shown_as) in [("nan", "=NaN"), ("inf", "=inf"), ("-inf", "=-inf")] {
        let (p, shown) = one_problem(&with(&format!("capacity_factor = {value}"), ""), "model.capacity_factor");
        assert_mentions(&p.message, &[&format!("capacity_factor{shown_as}"), "finite"]);
        assert_mentions(&shown, &["fix: use e.g. 1.0 or 1.25"]);
    }
}

#[test]
fn zero_capacity_factor_is_dropless_and_negative_is_bounded() {
    // Tutel's convention (tests/capacity.rs checks the routing).
    let s = ok(&with("capacity_factor = 0.0", ""));
    assert!(s.model.dropless && s.model.capacity_factor.is_none());
    assert_eq!(ok(&with("capacity_factor = -1.25", "")).capacity(), moelab::spec::Capacity::Bounded(1.25));
}

#[test]
fn tokens_per_rank_must_equal_batch_times_seq_len() {
    let (p, shown) = one_problem(&with("batch = 3\nseq_len = 64", ""), "model.tokens_per_rank");
    assert_eq!(p.message, "tokens_per_rank=256 is not batch=3 x seq_len=64");
    assert_mentions(&p.fix, &["tokens_per_rank = batch * seq_len"]);
    assert_mentions(&shown, &["tokens_per_rank=256"]);
}

#[test]
fn missing_token_count_is_rejected() {
    let no_tokens = edit("tokens_per_rank = 256\n", "");
    let (p, shown) = one_problem(&no_tokens, "model.tokens_per_rank");
    assert_mentions(&p.message, &["not given"]);
    assert_mentions(&p.fix, &["tokens_per_rank", "batch", "seq_len"]);
    assert_mentions(&shown, &["token count"]);
    // batch alone or seq_len alone is not enough either.
    one_problem(&edit("tokens_per_rank = 256", "batch = 4"), "model.tokens_per_rank");
    one_problem(&edit("tokens_per_rank = 256", "seq_len = 64"), "model.tokens_per_rank");
}

#[test]
fn n_heads_not_dividing_d_model_is_rejected() {
    let (p, shown) = one_problem(&with("", "[model.backbone]\nn_heads = 5\nd_mlp = 64"), "model.backbone.n_heads");
    assert_eq!(p.message, "n_heads=5 does not divide d_model=64");
    assert_mentions(&p.fix, &["1, 2, 4, 8, 16, 32, 64"]);
    assert_mentions(&shown, &["n_heads=5"]);
}

#[test]
fn empty_backbone_is_rejected() {
    let (p, _) = one_problem(&with("", "[model.backbone]\nn_heads = 0\nd_mlp = 0"), "model.backbone");
    assert_mentions(&p.fix, &["remove [model.backbone]"]);
}

#[test]
fn every_known_variant_resolves_or_is_rejected_naming_itself() {
    // Every known variant either resolves or is rejected on `variant` naming itself (since
    // ppmoe and ted arrived, every variant has a builder).
    for v in Variant::ALL {
        let text = edit("name = \"t\"\n", &format!("name = \"t\"\nvariant = \"{}\"\n", v.as_str()));
        if v.is_implemented() {
            // With a full backbone: scmoe and dgmoe require attention (scmoe a dense MLP too).
            assert_eq!(ok(&format!("{text}\n[model.backbone]\nn_heads = 4\nd_mlp = 128\n")).variant, v);
        } else {
            let (p, _) = one_problem(&text, "variant");
            assert_mentions(&p.message, &[&format!("{:?}", v.as_str())]);
        }
    }
}

#[test]
fn cuda_backend_needs_one_gpu_per_rank() {
    // More ranks than any machine here has GPUs: refused before any GPU work, naming the field.
    let gpus = moelab::backend::cuda::visible_gpus();
    let (p, shown) = one_problem(&with("", "[layout]\ndp = 4096\n[run]\nbackend = \"cuda\""), "run.backend");
    assert_mentions(&p.message, &["\"cuda\"", "world=4096", &format!("{gpus} GPU(s)")]);
    assert_mentions(&p.fix, &["\"cpu\""]);
    assert_mentions(&shown, &["cuda"]);
}

#[test]
fn auto_backend_picks_cpu_without_enough_gpus() {
    let spec = ok(&with("", "[layout]\ndp = 4096\n[run]\nbackend = \"auto\""));
    assert_eq!(spec.run.backend.as_str(), "cpu");
}

#[test]
fn bf16_on_cpu_is_accepted_as_bf16_storage() {
    // The cpu runs bf16 plans as f32 arithmetic with bf16 storage (math::bf16), the reference
    // of the cuda backend's bf16 runs; "auto" without GPUs picks it too.
    for run in ["", "[run]\nbackend = \"cpu\""] {
        let s = ok(&with("dtype = \"bf16\"", run));
        assert_eq!(s.model.dtype, moelab::spec::DType::Bf16);
    }
}

#[test]
fn zero_steps_is_rejected() {
    let (p, shown) = one_problem(&with("", "[run]\nsteps = 0"), "run.steps");
    assert_mentions(&p.message, &["steps=0"]);
    assert_mentions(&p.fix, &["positive"]);
    assert_mentions(&shown, &["run.steps=0 must be at least 1"]);
}

#[test]
fn non_positive_lr_is_rejected() {
    let (p, _) = one_problem(&with("", "[run]\nlr = 0.0"), "run.lr");
    assert_mentions(&p.message, &["lr=0"]);
    let (p, _) = one_problem(&with("", "[run]\nlr = -0.1"), "run.lr");
    assert_mentions(&p.message, &["lr=-0.1"]);
}

#[test]
fn negative_aux_loss_coef_is_rejected() {
    let (p, _) = one_problem(&with("aux_loss_coef = -0.5", ""), "model.aux_loss_coef");
    assert_mentions(&p.message, &["aux_loss_coef=-0.5"]);
}

#[test]
fn empty_name_is_rejected() {
    for name in ["", "   "] {
        let (p, shown) = one_problem(&edit("name = \"t\"", &format!("name = \"{name}\"")), "name");
        assert_mentions(&p.message, &["empty"]);
        assert_mentions(&p.fix, &["name = \"quickstart\""]);
        assert_mentions(&shown, &["name: name is empty"]);
    }
}

#[test]
fn unsafe_name_is_rejected() {
    let (p, _) = one_problem(&edit("name = \"t\"", "name = \"runs/../x y\""), "name");
    assert_mentions(&p.message, &["\"runs/../x y\""]);
    assert_mentions(&p.fix, &["file-name-safe"]);
}

#[test]
fn two_problems_are_both_reported() {
    let (problems, shown) = invalid(&with("top_k = 9", "[layout]\nep = 3"));
    let fields: Vec<&str> = problems.iter().map(|p| p.field.as_str()).collect();
    assert_eq!(fields, ["model.top_k", "layout.ep"], "{shown}");
    assert_mentions(&shown, &["top_k=9 exceeds n_experts=8", "ep=3 does not divide n_experts=8"]);
    assert_eq!(shown.lines().filter(|l| l.starts_with("  - ")).count(), 2, "one line per problem:\n{shown}");
}

#[test]
fn problems_in_every_section_are_reported_together() {
    let text = r#"name = ""
variant = "scmoe"

[model]
d_model = 64
d_ffn = 128
n_experts = 8
top_k = 9
dtype = "bf16"

[layout]
ep = 3
world = 2

[run]
steps = 0
"#;
    let (problems, shown) = invalid(text);
    let mut fields: Vec<&str> = problems.iter().map(|p| p.field.as_str()).collect();
    fields.sort();
    assert_eq!(
        fields,
        [
            "layout.ep",
            "layout.world",
            "model.backbone",
            "model.tokens_per_rank",
            "model.top_k",
            "name",
            "run.steps"
        ],
        "{shown}"
    );
    for p in &problems {
        assert!(!p.message.is_empty() && !p.fix.is_empty(), "{p}");
    }
}

// ---------------------------------------------------------------------------------------------
// Regressions: defects found while writing these tests, now fixed
// ---------------------------------------------------------------------------------------------

#[test]
fn overflowing_batch_times_seq_len_is_an_error_not_a_panic() {
    // validate.rs computes `b * s` unchecked: debug builds panic ("attempt to multiply with
    // overflow"), release builds wrap 2^32 * 2^32 to tokens_per_rank = 0 and accept the spec.
    let text = edit("tokens_per_rank = 256", "batch = 4294967296\nseq_len = 4294967296");
    let result = within(Duration::from_secs(10), move || from_toml_str(&text).map(|s| s.model.tokens_per_rank));
    match result {
        Err(SpecError::Invalid { problems, .. }) => {
            assert!(problems.iter().any(|p| p.field.starts_with("model.")), "{problems:?}")
        }
        other => panic!("expected Invalid, got {other:?}"),
    }
}

#[test]
fn overflowing_layout_degrees_are_an_error_not_a_panic() {
    // LayoutSpec::product multiplies unchecked: 2^62 * 4 overflows (panics in debug, wraps to
    // world = 0 and is accepted in release).
    let text = with("", "[layout]\ndp = 4611686018427387904\nep = 4");
    let result = within(Duration::from_secs(10), move || from_toml_str(&text).map(|s| s.layout.world));
    match result {
        Err(SpecError::Invalid { problems, .. }) => {
            assert!(problems.iter().any(|p| p.field.starts_with("layout.")), "{problems:?}")
        }
        other => panic!("expected Invalid, got {other:?}"),
    }
}

#[test]
fn huge_n_experts_with_bad_ep_is_rejected_quickly() {
    // `divisors(n)` tries every d in 1..=n to build the fix text: O(n). With n_experts = 10^12
    // validation runs for many minutes instead of failing at once.
    let text = edit("n_experts = 8", "n_experts = 1000000000000").replacen("[model]", "[layout]\nep = 7\n\n[model]", 1);
    let result = within(Duration::from_secs(10), move || from_toml_str(&text).map(|_| ()));
    match result {
        Err(e) => assert_eq!(e.problems().iter().map(|p| p.field.as_str()).collect::<Vec<_>>(), ["model.n_experts", "layout.ep"]),
        Ok(()) => panic!("ep=7 does not divide 10^12 and must be rejected"),
    }
}

#[test]
fn huge_d_model_with_bad_n_heads_is_rejected_quickly() {
    let text = with("", "[model.backbone]\nn_heads = 7").replacen("d_model = 64", "d_model = 1000000000000", 1);
    let result = within(Duration::from_secs(10), move || from_toml_str(&text).map(|_| ()));
    match result {
        Err(e) => assert_eq!(
            e.problems().iter().map(|p| p.field.as_str()).collect::<Vec<_>>(),
            ["model.d_model", "model.backbone.n_heads"]
        ),
        Ok(()) => panic!("n_heads=7 does not divide 10^12 and must be rejected"),
    }
}

#[test]
fn tokens_not_divisible_by_batch_does_not_invent_a_seq_len() {
    // tokens_per_rank=256 with batch=3 and no seq_len says
    // "tokens_per_rank=256 is not batch=3 x seq_len=85": seq_len=85 was never written, it is
    // 256/3 rounded down. The message should say that batch does not divide tokens_per_rank.
    let (p, _) = one_problem(&with("batch = 3", ""), "model.tokens_per_rank");
    assert_mentions(&p.message, &["tokens_per_rank=256", "batch=3"]);
    assert!(!p.message.contains("seq_len=85"), "message cites a seq_len the user never gave: {}", p.message);
}

#[test]
fn zero_batch_is_reported_once() {
    // batch=0 with tokens_per_rank=256 gives a second, misleading problem
    // "tokens_per_rank=256 is not batch=0 x seq_len=0" (seq_len=0 was never written).
    let (p, _) = one_problem(&with("batch = 0", ""), "model.batch");
    assert_mentions(&p.message, &["batch=0"]);
}

#[test]
fn zero_degree_does_not_suggest_world_zero() {
    // dp=0 with world=4 also reports layout.world with the fix "set world = 0, ...", which is
    // itself invalid. The zero degree should be the only problem.
    let (problems, shown) = invalid(&with("", "[layout]\ndp = 0\nworld = 4"));
    assert!(problems.iter().any(|p| p.field == "layout.dp"), "{shown}");
    assert!(!shown.contains("world = 0"), "suggests an invalid world:\n{shown}");
}

// ---------------------------------------------------------------------------------------------
// Property: any valid combination of sizes and degrees resolves and round-trips
// ---------------------------------------------------------------------------------------------

mod props {
    use super::*;
    use proptest::prelude::*;

    fn valid_spec() -> impl Strategy<Value = String> {
        (
            1usize..=4,    // log2 n_experts
            1usize..=8,    // d_model / 8
            1usize..=64,   // d_ffn
            1usize..=4,    // batch
            1usize..=32,   // seq_len
            0usize..=3,    // how tokens are given
            any::<bool>(), // dropless
            0usize..=4,    // log2 ep (capped)
            1usize..=3,    // dp
            0u32..=1000,   // seed
        )
            .prop_map(|(le, dm8, d_ffn, batch, seq_len, tokens, dropless, lep, dp, seed)| {
                let n_experts = 1usize << le;
                let ep = 1usize << lep.min(le);
                let d_model = dm8 * 8;
                let tokens = match tokens {
                    0 => format!("tokens_per_rank = {}", batch * seq_len),
                    1 => format!("batch = {batch}\nseq_len = {seq_len}"),
                    2 => format!("tokens_per_rank = {}\nbatch = {batch}", batch * seq_len),
                    _ => format!("tokens_per_rank = {}\nbatch = {batch}\nseq_len = {seq_len}", batch * seq_len),
                };
                let routing = if dropless { "dropless = true".to_string() } else { "capacity_factor = 1.5".to_string() };
                format!(
                    "name = \"p\"\n[model]\nd_model = {d_model}\nd_ffn = {d_ffn}\nn_experts = {n_experts}\n\
                     top_k = {}\n{routing}\n{tokens}\n[model.backbone]\nn_heads = 4\nd_mlp = 16\n\
                     [layout]\ndp = {dp}\nep = {ep}\n[run]\nseed = {seed}\n",
                    n_experts.min(2)
                )
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]
        #[test]
        fn valid_specs_resolve_and_round_trip(text in valid_spec()) {
            let spec = from_toml_str(&text).map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
            prop_assert_eq!(spec.tokens_per_rank(), spec.model.batch.unwrap() * spec.seq_len());
            prop_assert_eq!(spec.world(), spec.layout.dp * spec.layout.ep);
            let back = from_toml_str(&spec.to_toml()).map_err(|e| TestCaseError::fail(format!("{e}")))?;
            prop_assert_eq!(back, spec);
        }
    }
}

#[test]
fn sizes_that_would_wrap_or_exceed_any_memory_are_refused_quickly_naming_the_field() {
    // A dimension past the planned range, and dimensions each in range whose product is a
    // tensor larger than any machine: refused before planning (which would overflow), fast.
    let (p, shown) = within(Duration::from_secs(2), || invalid(&edit("d_model = 64", "d_model = 1099511627776")));
    assert_eq!(p[0].field, "model.d_model", "{shown}");
    assert_mentions(&shown, &["16777216"]);
    let (_, shown) = within(Duration::from_secs(2), || invalid(&edit("d_model = 64", "d_model = 999999999999999999")));
    assert_mentions(&shown, &["model.d_model"]);
    let (p, shown) = one_problem(&edit("d_model = 64", "d_model = 16777216").replace("d_ffn = 128", "d_ffn = 16777216"), "model.d_ffn");
    assert_mentions(&shown, &["expert weights", "elements"]);
    assert!(p.message.contains("2251799813685248"), "{}", p.message);
    // The largest shipped experiments stay well inside.
    ok(&edit("d_model = 64", "d_model = 4096").replace("d_ffn = 128", "d_ffn = 14336"));
}

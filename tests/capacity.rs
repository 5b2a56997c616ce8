//! Capacity factors as Tutel reads them: cf > 0 fixed, cf = 0 dropless, cf < 0 bounded:
//! C = min(ceil(|cf| k T / E), the step's largest expert load agreed over the data ranks).
//! A large |cf| equals dropless, a small one equals the fixed factor, in top-k, Tutel (both
//! r) and DeepSpeed-TED layouts; the chosen capacity is reported per layer and step.

mod common;
use common::*;
use moelab::backend::cpu::CpuRuntime;
use moelab::backend::StepReport;
use moelab::spec::{from_toml_str, Capacity, ExperimentSpec};

const OUT: &str = "L1.moe.out";
const TOKENS: usize = 16;

/// Layouts under test: (what, variant line, layout lines, options table, world).
const LAYOUTS: [(&str, &str, &str, &str, usize); 5] = [
    ("topk dp2 ep2", "", "dp = 2\nep = 2", "", 4),
    ("tutel ep4 degree 2", "variant = \"tutel\"", "ep = 4", "[tutel]\ndegree = 2", 4),
    ("tutel dp2 ep2 r0", "variant = \"tutel\"", "dp = 2\nep = 2", "[tutel]\nr = 0", 4),
    ("ted ep2 tp2", "variant = \"ted\"", "ep = 2\ntp = 2", "[ted]\nduplicate_dropping = true", 4),
    ("ted ep2 tp2 comm_aware", "variant = \"ted\"", "ep = 2\ntp = 2", "[ted]\ncheckpoint = \"comm_aware\"", 4),
];

fn layout_spec(l: &(&str, &str, &str, &str, usize), capacity: &str) -> ExperimentSpec {
    sized_spec(l, capacity, TOKENS)
}

/// [`layout_spec`] with `tokens` tokens per data shard.
fn sized_spec(l: &(&str, &str, &str, &str, usize), capacity: &str, tokens: usize) -> ExperimentSpec {
    let text = format!(
        "name = \"t\"\n{}\n[model]\nd_model = 16\nd_ffn = 24\nn_experts = 8\ntop_k = 2\ntokens_per_rank = {tokens}\nseq_len = 8\nn_layers = 2\n{capacity}\n[layout]\n{}\n[run]\nbackend = \"cpu\"\nseed = 5\n{}\n",
        l.1, l.2, l.3
    );
    from_toml_str(&text).unwrap_or_else(|e| panic!("test spec invalid: {e}\n{text}"))
}

fn run(s: &ExperimentSpec) -> (CpuRuntime, StepReport) {
    step_retaining(s, &[OUT])
}

/// Same loss, aux loss, drops and capacities, the same outputs and every gradient on every rank.
fn assert_same(what: &str, (a_rt, a): &(CpuRuntime, StepReport), (b_rt, b): &(CpuRuntime, StepReport)) {
    assert!(((a.loss - b.loss) / b.loss).abs() < 1e-6, "{what}: loss {} vs {}", a.loss, b.loss);
    assert!((a.aux_loss - b.aux_loss).abs() < 1e-6, "{what}: aux {} vs {}", a.aux_loss, b.aux_loss);
    assert_eq!((a.dropped, &a.capacity), (b.dropped, &b.capacity), "{what}: drops and capacities");
    for r in 0..a_rt.plan().world() {
        let err = rel_err(&a_rt.read(r, OUT).unwrap(), &b_rt.read(r, OUT).unwrap());
        assert!(err < 1e-6, "{what}: output on rank {r}: rel err {err}");
        let rp = &a_rt.plan().ranks[r];
        for p in &rp.params {
            let g = format!("{}.grad", rp.buffer(p.value).name);
            let err = rel_err(&a_rt.read(r, &g).unwrap(), &b_rt.read(r, &g).unwrap());
            assert!(err < 1e-6, "{what}: {g} on rank {r}: rel err {err}");
        }
    }
}

/// ceil(cf k N / E) for the test model (k = 2, E = 8) on `world` data shards.
fn fixed(cf: f64, shards: usize) -> usize {
    (cf * (2 * TOKENS * shards) as f64 / 8.0).ceil() as usize
}

#[test]
fn negative_factor_resolves_to_bounded_capacity_and_zero_to_dropless() {
    let l = &LAYOUTS[0];
    assert_eq!(layout_spec(l, "capacity_factor = -1.5").capacity(), Capacity::Bounded(1.5));
    let zero = layout_spec(l, "capacity_factor = 0");
    assert_eq!(zero.capacity(), Capacity::Dropless);
    assert!(zero.model.dropless && zero.model.capacity_factor.is_none(), "cf = 0 resolves to dropless = true");
    let bounded = layout_spec(l, "capacity_factor = -1.5");
    assert_eq!(from_toml_str(&bounded.to_toml()).expect("round trip"), bounded);
}

#[test]
fn large_negative_factor_drops_nothing_and_equals_dropless() {
    for l in &LAYOUTS {
        let dropless = run(&layout_spec(l, "dropless = true"));
        let bounded = run(&layout_spec(l, "capacity_factor = -100.0"));
        assert_eq!(bounded.1.dropped, 0, "{}: nothing dropped", l.0);
        assert_eq!(bounded.1.capacity.len(), 2, "{}: one capacity per MoE layer", l.0);
        // The bound is far above the real load, so C is the largest load (dropless's C).
        assert!(bounded.1.capacity.iter().all(|&c| c < fixed(100.0, 2)), "{}: {:?}", l.0, bounded.1.capacity);
        assert_same(&format!("{} cf=-100 vs dropless", l.0), &bounded, &dropless);
    }
}

#[test]
fn small_negative_factor_equals_the_fixed_factor() {
    for l in &LAYOUTS {
        // TED's capacity world is the dp*ep data shards (its TP ranks share tokens).
        let shards = if l.1.contains("ted") { 2 } else { l.4 };
        let fixed_run = run(&layout_spec(l, "capacity_factor = 0.5"));
        let bounded = run(&layout_spec(l, "capacity_factor = -0.5"));
        assert!(bounded.1.dropped > 0, "{}: a small capacity drops tokens", l.0);
        assert_eq!(bounded.1.capacity, vec![fixed(0.5, shards); 2], "{}: C = ceil(0.5 k N / E)", l.0);
        assert_same(&format!("{} cf=-0.5 vs cf=0.5", l.0), &bounded, &fixed_run);
    }
}

#[test]
fn bounded_capacity_is_the_smaller_of_the_bound_and_the_real_load_and_matches_single_rank_topk() {
    let l = &LAYOUTS[1];
    let loads = run(&layout_spec(l, "dropless = true")).1.capacity;
    // A bound one under the largest load: that layer is capped, a layer with a smaller load
    // (when the layers differ) keeps its own.
    let hi = *loads.iter().max().unwrap();
    let cf = -((hi as f64 - 1.5) * 8.0 / (2 * TOKENS * 4) as f64);
    let dist_spec = layout_spec(l, &format!("capacity_factor = {cf}"));
    let bound = fixed(-cf, 4);
    let (dist, a) = run(&dist_spec);
    let want: Vec<usize> = loads.iter().map(|&x| x.min(bound)).collect();
    assert_eq!(bound, hi - 1);
    assert_eq!(a.capacity, want, "C = min({bound}, loads {loads:?})");
    assert!(a.dropped > 0);
    let single_spec = sized_spec(&("topk 1 rank", "", "", "", 1), &format!("capacity_factor = {cf}"), TOKENS * 4);
    let (single, b) = run(&single_spec);
    assert_eq!(a.capacity, b.capacity, "the same capacity as the single-rank run");
    assert_matches_single_rank(&dist, &a, &single, &b, &[OUT], 4, "tutel ep4 bounded");
}

#[test]
fn non_finite_and_conflicting_factors_are_rejected() {
    let base = "name = \"t\"\n[model]\nd_model = 16\nd_ffn = 24\nn_experts = 4\ntokens_per_rank = 16\n";
    for (extra, needle) in [("capacity_factor = nan", "finite"), ("capacity_factor = -inf", "finite"),
        ("capacity_factor = -1.0\ndropless = true", "conflicts with dropless")] {
        let err = from_toml_str(&format!("{base}{extra}\n")).expect_err(extra);
        let p = err.problems();
        assert!(p.iter().any(|p| p.field == "model.capacity_factor" && p.message.contains(needle)), "{extra}: {p:?}");
    }
}

#[test]
fn the_run_log_shows_the_capacity() {
    assert_eq!(moelab::run::capacity_text(&[12, 12]), " capacity 12");
    assert_eq!(moelab::run::capacity_text(&[12, 9]), " capacity 12,9");
    assert_eq!(moelab::run::capacity_text(&[]), "");
}

#[test]
fn run_summary_and_log_carry_each_steps_capacities() {
    let root = tempfile::tempdir().unwrap();
    let s = layout_spec(&LAYOUTS[1], "capacity_factor = -0.5");
    let s = ExperimentSpec { run: moelab::spec::RunSpec { steps: 1, warmup: 0, ..s.run.clone() }, ..s };
    let out = moelab::run::run(&s, root.path(), &Default::default()).expect("run");
    let c = out.steps[0].capacity.clone();
    assert_eq!(c, vec![fixed(0.5, 4); 2]);
    let summary: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.dir.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["steps"][0]["capacity"], serde_json::json!(c));
    let log = std::fs::read_to_string(out.dir.join("run.log")).unwrap();
    assert!(log.contains(&format!("capacity {}", c[0])), "{log}");
}

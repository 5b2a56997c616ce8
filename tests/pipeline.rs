//! PPMoE pipeline stages: with `layout.pp` stages, micro-batches and the GPipe or 1F1B
//! schedule, the loss, the model's outputs and every gradient of every rank equal the
//! single-rank top-k run on the same weights and batch; the trace shows the exchanges, the
//! bubble and 1F1B's lower activation peak.
//!
//! Every micro-batch is routed on its own (as GPipe does), so with a capacity factor its
//! drops would differ from the full-batch reference, and so would the load-balancing loss
//! (a mean over micro-batches is not the full batch's): the equivalence tests route dropless
//! with `aux_loss_coef = 0`.

mod common;
use common::*;
use moelab::backend::cpu::CpuRuntime;
use moelab::backend::StepReport;
use moelab::plan::Plan;
use moelab::spec::{from_toml_str, ExperimentSpec};
use moelab::taxonomy::{MemCategory, Pass, Stage, Stream};

const MODEL: &str = "tokens_per_rank = 32\nseq_len = 8\nn_layers = 2\ndropless = true\naux_loss_coef = 0.0\n";
const BACKBONE: &str = "[model.backbone]\nn_heads = 2\nd_mlp = 20\n";

/// A PPMoE spec (`d_model = 16`, `d_ffn = 24`, 4 experts, 4 sequences of 8 tokens per shard).
fn pp_spec(dp: usize, tp: usize, pp: usize, ppmoe: &str, extra_model: &str) -> ExperimentSpec {
    let text = format!(
        "name = \"t\"\nvariant = \"ppmoe\"\n[model]\nd_model = 16\nd_ffn = 24\nn_experts = 4\n{MODEL}{extra_model}{BACKBONE}[layout]\ndp = {dp}\ntp = {tp}\npp = {pp}\n[ppmoe]\n{ppmoe}\n[run]\nbackend = \"cpu\"\n"
    );
    from_toml_str(&text).unwrap_or_else(|e| panic!("test spec invalid: {e}\n{text}"))
}

fn reference(dp: usize) -> (CpuRuntime, StepReport) {
    let text = format!(
        "name = \"t\"\n[model]\nd_model = 16\nd_ffn = 24\nn_experts = 4\ntokens_per_rank = {}\nseq_len = 8\nn_layers = 2\ndropless = true\naux_loss_coef = 0.0\n{BACKBONE}[run]\nbackend = \"cpu\"\n",
        32 * dp
    );
    let s = from_toml_str(&text).unwrap();
    let mut rt = runtime(&s, &["L1.moe.out"], true);
    let r = rt.step(true, Some(0)).expect("reference step");
    (rt, r)
}

/// Runs the pipeline and checks it against the single-rank reference.
fn check(dp: usize, tp: usize, pp: usize, micro: usize, schedule: &str) -> (CpuRuntime, StepReport) {
    let what = format!("dp={dp} tp={tp} pp={pp} micro={micro} {schedule}");
    let s = pp_spec(dp, tp, pp, &format!("micro_batches = {micro}\nschedule = \"{schedule}\""), "");
    let prefix = |j: usize| if micro > 1 { format!("mb{j}.") } else { String::new() };
    let outs: Vec<String> = (0..micro).map(|j| format!("{}L1.moe.out", prefix(j))).collect();
    let retain: Vec<&str> = outs.iter().map(String::as_str).collect();
    let mut dist = runtime(&s, &retain, true);
    let a = dist.step(true, Some(0)).expect("pipeline step");
    let (single, b) = reference(dp);
    assert!(((a.loss - b.loss) / b.loss).abs() < 1e-5, "{what}: loss {} vs {}", a.loss, b.loss);
    assert_eq!(a.dropped, 0, "{what}: dropless");
    assert_eq!(a.routed, b.routed, "{what}: every assignment routed");
    if micro == 1 {
        // One rank reports each layer's routing, wherever its stage is.
        assert!((a.aux_loss - b.aux_loss).abs() < 1e-5, "{what}: aux {} vs {}", a.aux_loss, b.aux_loss);
    }
    // The output of the last block lives on the last stage: shards in order, micro-batches within.
    let per_stage = dp * tp;
    let last = (pp - 1) * per_stage;
    let mut got: Vec<f32> = Vec::new();
    for s in 0..dp {
        for o in &outs {
            got.extend(dist.read(last + s * tp, o).unwrap_or_else(|| panic!("{o} on rank {}", last + s * tp)));
        }
    }
    let err = rel_err(&got, &single.read(0, "L1.moe.out").unwrap());
    assert!(err < 1e-5, "{what}: output rel err {err}");
    // Every parameter of the reference, from the stage that holds it, on every shard's TP group.
    let mut checked = 0;
    for p in &single.plan().ranks[0].params {
        let pname = single.plan().ranks[0].buffer(p.value).name.clone();
        let want = single.read(0, &format!("{pname}.grad")).unwrap();
        let stage = (0..pp)
            .find(|st| dist.plan().ranks[st * per_stage].params.iter().any(|q| dist.plan().ranks[st * per_stage].buffer(q.value).name == pname))
            .unwrap_or_else(|| panic!("{what}: no stage holds {pname}"));
        for s in 0..dp {
            let group: Vec<usize> = (0..tp).map(|i| stage * per_stage + s * tp + i).collect();
            let err = rel_err(&assemble_grad(&dist, &group, &pname), &want);
            assert!(err < 1e-5, "{what}: {pname}.grad on stage {stage} shard {s}: rel err {err}");
            checked += 1;
        }
    }
    assert!(checked >= 2 * 14 * dp, "{what}: only {checked} gradients checked");
    (dist, a)
}

#[test]
fn tp2_backbone_matches_single_rank() {
    check(1, 2, 1, 1, "1f1b");
}

#[test]
fn pp2_gpipe_matches_single_rank() {
    check(1, 1, 2, 4, "gpipe");
}

#[test]
fn pp2_1f1b_matches_single_rank() {
    check(1, 1, 2, 4, "1f1b");
}

#[test]
fn pp2_tp2_matches_single_rank() {
    let (rt, _) = check(1, 2, 2, 2, "1f1b");
    let plan = rt.plan();
    // No all-to-all; per stage, per micro-batch: one all-reduce per MoE layer plus one per
    // backbone sublayer forward, and the mirrored ones of the input gradients backward.
    assert!(plan.ranks.iter().flat_map(|r| &r.ops).all(|o| o.stage != Stage::AllToAll));
    let fwd: Vec<&str> = plan.ranks[0].ops.iter().filter(|o| o.stage == Stage::AllReduce && o.pass == Pass::Forward).map(|o| o.name.as_str()).collect();
    assert_eq!(fwd.iter().filter(|n| n.ends_with("moe_allreduce")).count(), 2, "one per MoE layer and micro-batch: {fwd:?}");
    assert_eq!(fwd.len(), 2 * 3, "plus attention's and the MLP's: {fwd:?}");
    let bwd = plan.ranks[0].ops.iter().filter(|o| o.stage == Stage::AllReduce && o.pass == Pass::Backward).count();
    // dweights + dx of the MoE layer, the attention's and the MLP's input gradients.
    assert_eq!(bwd, 2 * 4);
}

#[test]
fn pp2_dp2_matches_single_rank() {
    check(2, 1, 2, 1, "1f1b");
    check(2, 1, 2, 2, "gpipe");
    check(2, 1, 2, 4, "1f1b");
}

#[test]
fn three_stages_and_training_steps_stay_in_lockstep() {
    // pp = 3 over 3 layers, 1F1B with 3 micro-batches, several Adam steps.
    let text = "name = \"t\"\nvariant = \"ppmoe\"\n[model]\nd_model = 16\nd_ffn = 24\nn_experts = 4\ntokens_per_rank = 24\nseq_len = 8\nn_layers = 3\ndropless = true\naux_loss_coef = 0.0\n[layout]\npp = 3\n[ppmoe]\nmicro_batches = 3\n[run]\nbackend = \"cpu\"\nlr = 0.01\n";
    let reft = "name = \"t\"\n[model]\nd_model = 16\nd_ffn = 24\nn_experts = 4\ntokens_per_rank = 24\nseq_len = 8\nn_layers = 3\ndropless = true\naux_loss_coef = 0.0\n[run]\nbackend = \"cpu\"\nlr = 0.01\n";
    let mut dist = runtime(&from_toml_str(text).unwrap(), &[], false);
    let mut single = runtime(&from_toml_str(reft).unwrap(), &[], false);
    for s in 0..3 {
        let a = dist.step(true, Some(s)).unwrap();
        let b = single.step(true, Some(s)).unwrap();
        assert!(((a.loss - b.loss) / b.loss).abs() < 1e-4, "step {s}: {} vs {}", a.loss, b.loss);
    }
    for (rank, name) in [(0, "L0.gate.w"), (1, "L1.expert.w1"), (2, "L2.ln_moe.gamma")] {
        let err = rel_err(&dist.read(rank, name).unwrap(), &single.read(0, name).unwrap());
        assert!(err < 1e-4, "{name} drifted apart: {err}");
    }
}

/// Activation bytes: the plan's prediction and the cpu backend's tracked maximum, on rank 0
/// (the first stage, which holds the most micro-batches).
fn activation_peaks(schedule: &str, micro: usize) -> (u64, u64) {
    let s = pp_spec(1, 1, 2, &format!("micro_batches = {micro}\nschedule = \"{schedule}\""), "");
    let plan = Plan::build(&s).unwrap();
    let act = MemCategory::Activations.index();
    let predicted = moelab::plan::memory::predict(&plan.ranks[0]).max_per_category[act];
    let mut rt = runtime(&s, &[], true);
    rt.step(true, Some(0)).unwrap();
    let a = moelab::analysis::analyze(&rt.trace());
    (predicted, a.memory.ranks[0].max_per_category[act])
}

#[test]
fn one_f_one_b_holds_fewer_activations_than_gpipe() {
    let (gp, gt) = activation_peaks("gpipe", 4);
    let (fp, ft) = activation_peaks("1f1b", 4);
    // Stage 0 of 2 keeps 4 micro-batches' activations under GPipe, at most 2 under 1F1B.
    assert!(fp < gp, "predicted activation peak: 1f1b {fp} vs gpipe {gp}");
    assert!(ft < gt, "tracked activation peak: 1f1b {ft} vs gpipe {gt}");
    assert!((fp as f64) < 0.75 * gp as f64, "1f1b should hold about half: {fp} vs {gp}");
}

#[test]
fn trace_shows_the_exchanges_and_the_bubble() {
    let s = pp_spec(1, 1, 2, "micro_batches = 4\nschedule = \"gpipe\"", "");
    let mut rt = runtime(&s, &[], true);
    rt.step(true, Some(0)).unwrap();
    let t = rt.trace();
    // Four activations down and four gradients up, on the comm stream of both stages.
    for rank in 0..2u32 {
        let ex: Vec<_> = t.ops.iter().filter(|o| o.rank == rank && o.stage == Stage::SendRecv).collect();
        assert_eq!(ex.len(), 8, "rank {rank}: {:?}", ex.iter().map(|o| &o.name).collect::<Vec<_>>());
        assert!(ex.iter().all(|o| o.stream == Stream::Comm));
        assert_eq!(ex.iter().filter(|o| o.pass == Pass::Forward).count(), 4);
    }
    // GPipe's bubble: stage 0 idles after its last forward until stage 1 has run the first
    // micro-batch's backward and sent its gradient back.
    let compute = |rank: u32, pass: Pass| t.ops.iter().filter(move |o| o.rank == rank && o.stream == Stream::Compute && o.pass == pass);
    let fwd_end = compute(0, Pass::Forward).map(|o| o.end_ns).max().unwrap();
    let bwd_start = compute(0, Pass::Backward).map(|o| o.start_ns).min().unwrap();
    assert!(bwd_start > fwd_end, "stage 0 waits between its forwards and its backwards");
    let stage1_b0: Vec<_> = compute(1, Pass::Backward).filter(|o| o.chunk == Some(0)).collect();
    assert!(!stage1_b0.is_empty());
    assert!(stage1_b0.iter().all(|o| o.start_ns >= fwd_end && o.end_ns <= bwd_start), "stage 1's first backward fills stage 0's bubble");
}

/// The share of the step that stage 0's compute stream idles in the sim (the bubble).
fn sim_bubble(micro: usize, schedule: &str) -> f64 {
    let text = format!(
        "name = \"t\"\nvariant = \"ppmoe\"\n[model]\nd_model = 1024\nd_ffn = 4096\nn_experts = 8\nbatch = 16\nseq_len = 512\nn_layers = 4\n[model.backbone]\nn_heads = 16\nd_mlp = 4096\n[layout]\ntp = 2\npp = 2\n[ppmoe]\nmicro_batches = {micro}\nschedule = \"{schedule}\"\n[run]\nbackend = \"sim\"\n"
    );
    let s = from_toml_str(&text).unwrap();
    let mut rt = moelab::backend::runtime(Plan::build(&s).unwrap(), moelab::backend::ExecOptions::default());
    rt.step(true, Some(0)).unwrap();
    let t = rt.trace();
    let span = t.steps.iter().find(|x| x.rank == 0).unwrap();
    let busy: u64 = t.ops.iter().filter(|o| o.rank == 0 && o.stream == Stream::Compute).map(|o| o.end_ns - o.start_ns).sum();
    1.0 - busy as f64 / (span.end_ns - span.start_ns) as f64
}

#[test]
fn sim_runs_the_pipeline_and_more_micro_batches_shrink_the_bubble() {
    let one = sim_bubble(1, "1f1b");
    let eight = sim_bubble(8, "1f1b");
    let gpipe = sim_bubble(8, "gpipe");
    // With 2 stages and m micro-batches the ideal bubble is (p - 1) / (m + p - 1): 1/2, then 1/9.
    assert!(one > 0.35, "one micro-batch: stage 0 idles about half the step ({one})");
    assert!(eight < 0.5 * one, "eight micro-batches: bubble {eight} vs {one}");
    assert!((gpipe - eight).abs() < 0.1, "GPipe and 1F1B have the same bubble: {gpipe} vs {eight}");
}

#[test]
fn tensor_parallel_backbone_shrinks_the_parameters() {
    let params = |tp: usize| {
        let s = pp_spec(1, tp, 1, "", "");
        let plan = Plan::build(&s).unwrap();
        let qkv = plan.ranks[0].buffer(plan.ranks[0].buffer_id("L0.attn.qkv.w").unwrap()).elems;
        (qkv, moelab::plan::memory::predict(&plan.ranks[0]).at_peak[MemCategory::Params.index()])
    };
    let (q1, p1) = params(1);
    let (q2, p2) = params(2);
    assert_eq!(q1, 16 * 48);
    assert_eq!(q2, q1 / 2, "QKV is column-parallel");
    // Everything but the LayerNorms, the gate and one copy of each row-parallel bias halves.
    assert!((p2 as f64) < 0.6 * p1 as f64, "params per rank: tp=2 {p2} vs tp=1 {p1}");
}

fn problems(text: &str) -> Vec<(String, String)> {
    match from_toml_str(text) {
        Ok(_) => panic!("should be rejected:\n{text}"),
        Err(e) => e.problems().iter().map(|p| (p.field.clone(), format!("{}: {}", p.message, p.fix))).collect(),
    }
}

#[test]
fn validation_names_the_fields_and_the_fix() {
    let base = "name = \"t\"\nvariant = \"ppmoe\"\n[model]\nd_model = 16\nd_ffn = 24\nn_experts = 6\ntokens_per_rank = 32\nseq_len = 8\nn_layers = 3\n";
    let has = |ps: &[(String, String)], field: &str, text: &str| {
        assert!(ps.iter().any(|(f, m)| f == field && m.contains(text)), "expected {field} with {text:?} in {ps:?}");
    };
    let ps = problems(&format!("{base}[model.backbone]\nn_heads = 8\nd_mlp = 20\n[layout]\ntp = 3\n"));
    has(&ps, "layout.tp", "layout.tp=3 does not divide model.backbone.n_heads=8");
    let ps = problems(&format!("{base}[model.backbone]\nn_heads = 6\nd_mlp = 20\n[layout]\ntp = 3\n"));
    has(&ps, "layout.tp", "layout.tp=3 does not divide model.backbone.d_mlp=20");
    let ps = problems(&format!("{base}[layout]\npp = 2\n"));
    has(&ps, "layout.pp", "layout.pp=2 does not divide model.n_layers=3");
    has(&ps, "layout.pp", "choose pp from {1, 3}");
    let ps = problems(&format!("{base}[ppmoe]\nmicro_batches = 3\n"));
    has(&ps, "ppmoe.micro_batches", "ppmoe.micro_batches=3 does not divide model.batch=4");
    let ps = problems(&format!("{base}[ppmoe]\nmicro_batches = 0\n"));
    has(&ps, "ppmoe.micro_batches", "at least 1");
    let ps = problems(&format!("{base}[ppmoe]\nschedule = \"zb\"\n"));
    assert!(ps.is_empty() || ps.iter().any(|p| p.0.contains("schedule")));
    let ps = problems("name = \"t\"\n[model]\nd_model = 16\nd_ffn = 24\nn_experts = 4\ntokens_per_rank = 8\n[ppmoe]\nmicro_batches = 2\n");
    has(&ps, "ppmoe", "applies to variant \"ppmoe\" only");
    let ps = problems(&format!("{base}[layout]\npp = 3\n[run]\nbackend = \"cuda\"\n"));
    // The cuda backend runs pipeline stages (checked against cpu on 2 GPUs); only the GPU
    // count can refuse this spec.
    assert!(!ps.iter().any(|p| p.0 == "layout.pp"), "{ps:?}");
    // Defaults: enough micro-batches to fill the pipeline, 1F1B.
    let s = from_toml_str(&format!("{base}[layout]\npp = 3\n[run]\nbackend = \"cpu\"\n")).unwrap();
    let o = s.ppmoe.unwrap();
    assert_eq!((o.micro_batches, o.schedule.as_str()), (Some(4), "1f1b"));
}

#[test]
fn micro_batch_aux_loss_gradient_matches_finite_differences() {
    // The load-balancing loss of a step is the mean over micro-batches (each routed on its
    // own), so each micro-batch's backward carries 1/micro of its coefficient; a large
    // coefficient makes that term dominate the gate's gradient. Two stages: the gradient of
    // stage 0's parameters comes back through the exchanges.
    let text = "name = \"t\"\nvariant = \"ppmoe\"\n[model]\nd_model = 16\nd_ffn = 24\nn_experts = 4\ntokens_per_rank = 32\nseq_len = 8\nn_layers = 2\ndropless = true\naux_loss_coef = 20.0\n[layout]\npp = 2\n[ppmoe]\nmicro_batches = 2\n[run]\nbackend = \"cpu\"\n";
    let s = from_toml_str(text).unwrap();
    let routes: Vec<String> = (0..2).map(|j| format!("mb{j}.L0.route.idx")).collect();
    let retain: Vec<&str> = routes.iter().map(String::as_str).collect();
    let mut rt = runtime(&s, &retain, true);
    for name in ["L0.gate.w", "L0.ln_moe.gamma", "L0.expert.w1"] {
        check_finite_differences(&mut rt, 20.0, &routes, name, 6);
    }
}

/// A 4-layer spec over `pp` stages with `micro` micro-batches (8 sequences of 8 tokens).
fn deep(pp: usize, micro: usize, schedule: &str, backend: &str, mode: &str) -> ExperimentSpec {
    let ppmoe = if pp > 1 || micro > 1 { "variant = \"ppmoe\"\n".to_string() } else { String::new() };
    let table = if ppmoe.is_empty() { String::new() } else { format!("[layout]\npp = {pp}\n[ppmoe]\nmicro_batches = {micro}\nschedule = \"{schedule}\"\n") };
    let text = format!(
        "name = \"t\"\n{ppmoe}[model]\nd_model = 16\nd_ffn = 24\nn_experts = 4\ntokens_per_rank = 64\nseq_len = 8\nn_layers = 4\ndropless = true\naux_loss_coef = 0.0\n[model.backbone]\nn_heads = 2\n{table}[run]\nbackend = \"{backend}\"\nmode = \"{mode}\"\n"
    );
    from_toml_str(&text).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

#[test]
fn four_stages_run_both_schedules_without_deadlock() {
    let (single, want) = {
        let mut rt = runtime(&deep(1, 1, "", "cpu", "training"), &[], true);
        let r = rt.step(true, Some(0)).unwrap();
        (rt, r)
    };
    for (schedule, micro) in [("gpipe", 2), ("1f1b", 8), ("1f1b", 2), ("gpipe", 8)] {
        let mut rt = runtime(&deep(4, micro, schedule, "cpu", "training"), &[], true);
        let got = rt.step(true, Some(0)).unwrap();
        assert!(((got.loss - want.loss) / want.loss).abs() < 1e-5, "{schedule} x{micro}: loss {} vs {}", got.loss, want.loss);
        // Every gradient, from the stage that holds its parameter: the backward through four
        // stages, not only the forward's loss.
        let mut checked = 0;
        for p in &single.plan().ranks[0].params {
            let name = single.plan().ranks[0].buffer(p.value).name.clone();
            let stage = (0..4).find(|&r| rt.plan().ranks[r].params.iter().any(|q| rt.plan().ranks[r].buffer(q.value).name == name))
                .unwrap_or_else(|| panic!("{schedule} x{micro}: no stage holds {name}"));
            let err = rel_err(&rt.read(stage, &format!("{name}.grad")).expect("grad"), &single.read(0, &format!("{name}.grad")).expect("grad"));
            assert!(err < 1e-5, "{schedule} x{micro}: {name}.grad on stage {stage}: rel err {err}");
            checked += 1;
        }
        assert!(checked >= 4 * 12, "{schedule} x{micro}: only {checked} gradients checked");
        // The sim pairs the same exchanges (a mismatch would leave it stuck).
        let mut sim = moelab::backend::runtime(Plan::build(&deep(4, micro, schedule, "sim", "training")).unwrap(), Default::default());
        sim.step(true, Some(0)).unwrap_or_else(|e| panic!("sim {schedule} x{micro}: {e}"));
    }
}

#[test]
fn inference_runs_the_forwards_only() {
    let mut single = runtime(&deep(1, 1, "", "cpu", "inference"), &[], true);
    let want = single.step(true, Some(0)).unwrap();
    let s = deep(2, 4, "1f1b", "cpu", "inference");
    let plan = Plan::build(&s).unwrap();
    for r in &plan.ranks {
        assert!(r.ops.iter().all(|o| o.pass == Pass::Forward), "rank {}: forward ops only", r.rank);
        assert_eq!(r.ops.iter().filter(|o| o.stage == Stage::SendRecv).count(), 4, "one activation per micro-batch");
    }
    let mut rt = runtime(&s, &[], true);
    let got = rt.step(true, Some(0)).unwrap();
    assert!(((got.loss - want.loss) / want.loss).abs() < 1e-5, "inference loss {} vs {}", got.loss, want.loss);
}

//! Deterministic fixtures for the rendering tests: a synthetic trace shaped like a chunked
//! expert-parallel MoE step (fixed times, so snapshots never change by themselves) and an
//! app wired to the fixture runs directory.

#![allow(dead_code)]

use moelab::taxonomy::{MemCategory, Pass, Stage, Stream};
use moelab::trace::{MemEvent, OpEvent, StepSpan, Trace};
use moelab_workbench::app::App;
use moelab_workbench::composer::{Check, Composer};
use moelab_workbench::loaded::LoadedRun;
use moelab_workbench::runs::summary::{MemSummary, RunSummary};
use ratatui::backend::TestBackend;
use ratatui::Terminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// The runs directory committed next to the tests.
pub const FIXTURE_RUNS: &str = "tests/fixtures/runs";

struct Rank {
    rank: u32,
    compute: u64,
    comm: u64,
    ops: Vec<OpEvent>,
}

impl Rank {
    fn push(&mut self, stream: Stream, stage: Stage, name: String, layer: u32, chunk: Option<u32>, after: u64, dur: u64) -> u64 {
        let free = if stream == Stream::Compute { self.compute } else { self.comm };
        let start = free.max(after);
        let end = start + dur;
        if stream == Stream::Compute {
            self.compute = end;
        } else {
            self.comm = end;
        }
        let flops = if stage.is_comm() { 0 } else { dur * 2_000 };
        let bytes = dur * 300;
        self.ops.push(OpEvent { rank: self.rank, step: 0, stream, stage, pass: Pass::Forward, name, layer: Some(layer), chunk, start_ns: start, end_ns: end, flops, bytes, collective: None, host_ns: None, issue_ns: None, gemm_calls: None });
        end
    }
}

/// One forward step of `ranks` ranks x `layers` MoE blocks with `chunks` pipelined
/// all-to-all chunks, then a gradient all-reduce (exposed) and the optimizer. `slow` adds
/// that many ns to every all-to-all (to make a slower variant for comparisons).
pub fn synthetic_trace(ranks: u32, layers: u32, chunks: u32, slow: u64) -> Trace {
    let mut trace = Trace { backend: "cpu".into(), world: ranks, ..Trace::default() };
    for r in 0..ranks {
        let mut k = Rank { rank: r, compute: 1_000, comm: 1_000, ops: Vec::new() };
        let a2a = 6_000 + 1_000 * (r as u64 % 3) + slow;
        let expert = 5_000 + 500 * (r as u64 % 2);
        for l in 0..layers {
            let p = |s: &str| format!("L{l}.{s}");
            k.push(Stream::Compute, Stage::Layernorm, p("ln1"), l, None, 0, 1_500);
            k.push(Stream::Compute, Stage::Attention, p("attention"), l, None, 0, 18_000);
            k.push(Stream::Compute, Stage::DenseMlp, p("dense_mlp"), l, None, 0, 12_000);
            k.push(Stream::Compute, Stage::Gate, p("gate"), l, None, 0, 2_500);
            k.push(Stream::Compute, Stage::Topk, p("topk"), l, None, 0, 1_500);
            let permuted = k.push(Stream::Compute, Stage::Permute, p("permute"), l, None, 0, 3_000);
            let mut combined = 0;
            let mut dispatched = Vec::new();
            for c in 0..chunks {
                dispatched.push(k.push(Stream::Comm, Stage::AllToAll, p(&format!("dispatch.c{c}")), l, Some(c), permuted, a2a / chunks as u64));
            }
            for (c, d) in dispatched.into_iter().enumerate() {
                let c = c as u32;
                k.push(Stream::Compute, Stage::ExpertGemm1, p(&format!("expert_gemm1.c{c}")), l, Some(c), d, expert);
                k.push(Stream::Compute, Stage::Act, p(&format!("act.c{c}")), l, Some(c), 0, 800);
                let e = k.push(Stream::Compute, Stage::ExpertGemm2, p(&format!("expert_gemm2.c{c}")), l, Some(c), 0, expert);
                combined = k.push(Stream::Comm, Stage::AllToAll, p(&format!("combine.c{c}")), l, Some(c), e, a2a / chunks as u64);
            }
            k.push(Stream::Compute, Stage::Combine, p("combine"), l, None, combined, 2_000);
        }
        let done = k.compute;
        let reduced = k.push(Stream::Comm, Stage::AllReduce, "grad_allreduce".into(), 0, None, done, 9_000 + 500 * r as u64);
        let end = k.push(Stream::Compute, Stage::Optimizer, "adam".into(), 0, None, reduced, 4_000);
        trace.steps.push(StepSpan { rank: r, step: 0, start_ns: 1_000, end_ns: end });
        let mem = |t_ns, category, delta| MemEvent { rank: r, t_ns, category, delta };
        trace.memory.extend([
            mem(0, MemCategory::Params, 4 << 20),
            mem(0, MemCategory::Grads, 4 << 20),
            mem(0, MemCategory::OptimizerState, 8 << 20),
            mem(500, MemCategory::Inputs, 1 << 20),
            mem(2_000, MemCategory::Activations, (3 << 20) + (r as i64) * (256 << 10)),
            mem(3_000, MemCategory::CommBuffers, 2 << 20),
            mem(4_000, MemCategory::Temporaries, 512 << 10),
            mem(5_000, MemCategory::Temporaries, -(512 << 10)),
            mem(end, MemCategory::CommBuffers, -(2 << 20)),
        ]);
        trace.ops.extend(k.ops);
    }
    trace
}

/// A loaded run over [`synthetic_trace`], with a summary like `summary.json`'s.
pub fn synthetic_run(label: &str, ranks: u32, layers: u32, chunks: u32, slow: u64) -> LoadedRun {
    let trace = synthetic_trace(ranks, layers, chunks, slow);
    let a = moelab::analysis::analyze(&trace);
    let summary = RunSummary {
        name: label.into(),
        variant: if chunks > 1 { "mpmoe".into() } else { "topk".into() },
        backend: "cpu".into(),
        world: ranks as usize,
        status: "completed".into(),
        step_time_ms: a.step_time_ns / 1e6,
        overlap: a.overall_overlap(),
        memory: a.memory.ranks.iter().map(|m| MemSummary { rank: m.rank as usize, predicted_peak: m.peak_total + (1 << 20), ..MemSummary::default() }).collect(),
        ..RunSummary::default()
    };
    LoadedRun::new(label.into(), None, summary, trace)
}

/// An app editing the topk template, listing the fixture runs, with no job worker. The
/// plan's prediction is pinned to fixed numbers: the snapshots test the rendering, while the
/// plan builders and the sim's cost model (other modules, tested there) may move.
pub fn app() -> App {
    let mut composer = Composer::from_template("topk").expect("template");
    pin_prediction(&mut composer);
    App::new(composer, FIXTURE_RUNS.into(), None)
}

/// Replace a valid composer's prediction by fixed numbers (see [`app`]).
pub fn pin_prediction(c: &mut Composer) {
    if let Check::Valid { prediction: Ok(p), .. } = &mut c.check {
        p.max_ops = 86;
        p.worst_rank = 3;
        p.at_peak = [525 << 10, 525 << 10, 1050 << 10, 64 << 10, 3940 << 10, 480 << 10, 129 << 10];
        p.peak_total = p.at_peak.iter().sum();
        p.upper_bound = false;
        p.step = Ok(moelab_workbench::composer::SimPrediction { seconds: 1.5e-3, overlap: 0.25, a2a_overlap: 0.5, profile: "h100".into(), warnings: Vec::new() });
    }
}

/// Render the app at `w` x `h` and return the terminal.
pub fn render(app: &App, w: u16, h: u16) -> Terminal<TestBackend> {
    let mut t = Terminal::new(TestBackend::new(w, h)).expect("test terminal");
    t.draw(|f| moelab_workbench::ui::draw(f, app)).expect("draw");
    t
}

/// A real cpu run of the topk template (one block, two warmup steps, one measured) under
/// `root`, cancelled after its first warmup step: no measured step ran. Returns its run
/// directory, as the library's `RunError::Backend` names it.
pub fn cancelled_in_warmup(root: &Path) -> PathBuf {
    let text = moelab_workbench::composer::templates::template_toml("topk")
        .replace("n_layers = 2", "n_layers = 1")
        .replace("steps = 3", "steps = 1")
        .replace("warmup = 1", "warmup = 2");
    let spec = moelab::spec::from_toml_str(&text).expect("valid");
    let mut hooks = moelab::run::RunHooks::default();
    let cancel = hooks.exec.cancel.clone();
    hooks.on_step = Some(Arc::new(move |_| cancel.store(true, Ordering::SeqCst)));
    match moelab::run::run(&spec, root, &hooks) {
        Err(moelab::run::RunError::Backend { source, dir }) => {
            assert_eq!(source, moelab::backend::BackendError::Cancelled);
            PathBuf::from(dir)
        }
        other => panic!("expected a cancelled run, got {:?}", other.map(|o| o.dir)),
    }
}

//! Integration tests for trace analysis, table export and Chrome trace export, on small
//! hand-built traces whose answers are computed by hand in the comments.

use moelab::analysis::{analyze, tables, Analysis};
use moelab::taxonomy::{MemCategory, Pass, Stage, Stream};
use moelab::trace::chrome::{to_chrome_json, write_chrome_trace};
use moelab::trace::{MemEvent, OpEvent, StepSpan, Trace};

fn op(
    rank: u32,
    step: u32,
    stream: Stream,
    stage: Stage,
    pass: Pass,
    start: u64,
    end: u64,
) -> OpEvent {
    OpEvent {
        rank,
        step,
        stream,
        stage,
        pass,
        name: format!("L0.{}", stage.as_str()),
        layer: Some(0),
        chunk: None,
        start_ns: start,
        end_ns: end,
        flops: 0,
        bytes: 0,
        collective: None,
        host_ns: None, issue_ns: None, gemm_calls: None,
    }
}

fn compute(rank: u32, start: u64, end: u64) -> OpEvent {
    op(
        rank,
        0,
        Stream::Compute,
        Stage::ExpertGemm1,
        Pass::Forward,
        start,
        end,
    )
}

fn comm(rank: u32, start: u64, end: u64) -> OpEvent {
    op(
        rank,
        0,
        Stream::Comm,
        Stage::AllToAll,
        Pass::Forward,
        start,
        end,
    )
}

fn span(rank: u32, step: u32, start: u64, end: u64) -> StepSpan {
    StepSpan {
        rank,
        step,
        start_ns: start,
        end_ns: end,
    }
}

fn mem(rank: u32, t: u64, category: MemCategory, delta: i64) -> MemEvent {
    MemEvent {
        rank,
        t_ns: t,
        category,
        delta,
    }
}

fn trace(world: u32, ops: Vec<OpEvent>, memory: Vec<MemEvent>, steps: Vec<StepSpan>) -> Trace {
    Trace {
        backend: "test".into(),
        world,
        ops,
        memory,
        steps,
        group_sizes: Vec::new(),
    }
}

fn approx(a: f64, b: f64) {
    assert!((a - b).abs() < 1e-12, "{a} != {b}");
}

/// (a) compute [0,100] then comm [100,150]: nothing overlaps, all comm is exposed.
#[test]
fn serial_chain_has_no_overlap() {
    let t = trace(
        1,
        vec![compute(0, 0, 100), comm(0, 100, 150)],
        vec![],
        vec![span(0, 0, 0, 200)],
    );
    let a = analyze(&t);
    assert_eq!(a.overlap.len(), 1);
    let r = &a.overlap[0];
    assert_eq!(r.rank, 0);
    assert_eq!(r.compute_ns, 100);
    assert_eq!(r.comm_ns, 50);
    assert_eq!(r.overlapped_ns, 0);
    assert_eq!(r.exposed_comm_ns, 50);
    approx(r.overlap_ratio, 0.0);
    assert_eq!(r.span_ns, 200);
    assert_eq!(r.busy_ns, 150);
    assert_eq!(r.idle_ns, 50);
    approx(a.overall_overlap(), 0.0);
    assert_eq!(a.exposed_comm_ns(), 50);
}

/// (b) comm [20,60] inside compute [0,100]: fully overlapped.
#[test]
fn comm_inside_compute_is_fully_overlapped() {
    let t = trace(1, vec![compute(0, 0, 100), comm(0, 20, 60)], vec![], vec![]);
    let a = analyze(&t);
    let r = &a.overlap[0];
    assert_eq!(r.comm_ns, 40);
    assert_eq!(r.overlapped_ns, 40);
    assert_eq!(r.exposed_comm_ns, 0);
    approx(r.overlap_ratio, 1.0);
    // No step spans: span = last end - first start.
    assert_eq!(r.span_ns, 100);
    assert_eq!(r.busy_ns, 100);
    assert_eq!(r.idle_ns, 0);
    approx(a.overall_overlap(), 1.0);
}

/// (c) compute [0,10],[5,20],[6,8] (nested),[30,40] -> U = [0,20]+[30,40] = 30; comm [15,35] -> 20;
/// intersection [15,20]+[30,35] = 10; ratio 0.5. Comm also has two overlapping pieces
/// [15,25],[20,35] which must merge to the same [15,35].
#[test]
fn partial_overlap_merges_same_stream_intervals() {
    let ops = vec![
        compute(0, 0, 10),
        compute(0, 5, 20),
        compute(0, 6, 8),
        compute(0, 30, 40),
        comm(0, 15, 25),
        comm(0, 20, 35),
    ];
    let a = analyze(&trace(1, ops, vec![], vec![span(0, 0, 0, 50)]));
    let r = &a.overlap[0];
    assert_eq!(r.compute_ns, 30);
    assert_eq!(r.comm_ns, 20);
    assert_eq!(r.overlapped_ns, 10);
    assert_eq!(r.exposed_comm_ns, 10);
    approx(r.overlap_ratio, 0.5);
    // Union of everything: [0,40] = 40; span 50 -> idle 10.
    assert_eq!(r.busy_ns, 40);
    assert_eq!(r.idle_ns, 10);
}

/// (d) rank 0: comm 40 fully hidden; rank 1: comm [0,30] with compute [20,100] -> overlap 10.
/// Overall = (40 + 10) / (40 + 30) = 5/7.
#[test]
fn two_ranks_per_rank_rows_and_overall() {
    let ops = vec![
        compute(0, 0, 100),
        comm(0, 20, 60),
        comm(1, 0, 30),
        compute(1, 20, 100),
    ];
    let steps = vec![span(0, 0, 0, 120), span(1, 0, 0, 110)];
    let a = analyze(&trace(2, ops, vec![], steps));
    assert_eq!(
        a.overlap.iter().map(|r| r.rank).collect::<Vec<_>>(),
        vec![0, 1]
    );
    let (r0, r1) = (&a.overlap[0], &a.overlap[1]);
    assert_eq!(
        (r0.comm_ns, r0.overlapped_ns, r0.exposed_comm_ns),
        (40, 40, 0)
    );
    assert_eq!(
        (r1.comm_ns, r1.overlapped_ns, r1.exposed_comm_ns),
        (30, 10, 20)
    );
    assert_eq!((r0.compute_ns, r1.compute_ns), (100, 80));
    // Rank 1 ended at 110 but the step at 120: it waits 10 more.
    assert_eq!((r0.idle_ns, r1.idle_ns), (20, 20));
    approx(r1.overlap_ratio, 10.0 / 30.0);
    approx(a.overall_overlap(), 50.0 / 70.0);
    assert_eq!(a.exposed_comm_ns(), 20);
    approx(a.step_time_ns, 120.0);
}

/// All-to-all overlap counts only all-to-all ops: rank 0 has compute [0,100], an all-to-all
/// [50,90] (hidden 40 of 40) and an all-gather [100,160] waiting on a slow peer (exposed);
/// rank 1 an all-to-all [0,40] with compute [30,100] (hidden 10 of 40). All comm: (40 + 10) /
/// (100 + 40); all-to-all: (40 + 10) / (40 + 40).
#[test]
fn all_to_all_overlap_ignores_other_collectives() {
    let gather = op(0, 0, Stream::Comm, Stage::AllGather, Pass::Forward, 100, 160);
    let ops = vec![compute(0, 0, 100), comm(0, 50, 90), gather, comm(1, 0, 40), compute(1, 30, 100)];
    let a = analyze(&trace(2, ops, vec![], vec![span(0, 0, 0, 160), span(1, 0, 0, 160)]));
    let (r0, r1) = (&a.overlap[0], &a.overlap[1]);
    assert_eq!((r0.comm_ns, r0.a2a_ns, r0.a2a_overlapped_ns), (100, 40, 40));
    assert_eq!((r1.a2a_ns, r1.a2a_overlapped_ns), (40, 10));
    approx(r0.a2a_ratio(), 1.0);
    approx(a.overall_overlap(), 50.0 / 140.0);
    approx(a.a2a_overlap(), 50.0 / 80.0);
    assert!(a.render_text().contains("a2a hid %"));
}

/// (e) 2 ranks x 2 steps. Per (rank, step): attention fwd 10 ns, attention bwd 20 ns,
/// all_reduce upd 5 ns (flops/bytes set). Step spans: rank 0 steps 100 and 100, rank 1 steps
/// 100 and 200 -> denominator 500.
#[test]
fn stage_table_over_ranks_and_steps() {
    let mut ops = Vec::new();
    let mut steps = Vec::new();
    for rank in 0..2u32 {
        for step in 0..2u32 {
            let base = u64::from(step) * 1000;
            let mut f = op(
                rank,
                step,
                Stream::Compute,
                Stage::Attention,
                Pass::Forward,
                base,
                base + 10,
            );
            f.flops = 1_000;
            f.bytes = 64;
            let b = op(
                rank,
                step,
                Stream::Compute,
                Stage::Attention,
                Pass::Backward,
                base + 10,
                base + 30,
            );
            let mut u = op(
                rank,
                step,
                Stream::Comm,
                Stage::AllReduce,
                Pass::Update,
                base + 30,
                base + 35,
            );
            u.bytes = 4096;
            // Push in scrambled order: the table must sort by Stage::ALL then Pass.
            ops.extend([u, b, f]);
            let len = if rank == 1 && step == 1 { 200 } else { 100 };
            steps.push(span(rank, step, base, base + len));
        }
    }
    // A data op on rank 0 only, stage earlier than attention.
    ops.push(op(
        0,
        0,
        Stream::Compute,
        Stage::Data,
        Pass::Forward,
        40,
        45,
    ));

    let a = analyze(&trace(2, ops, vec![], steps));
    assert_eq!(a.steps, 2);
    assert_eq!(a.world, 2);
    assert_eq!(a.backend, "test");
    // Step 1's wall is rank 1's 200 ns: every rank's span is its step's window (600 ns of
    // rank time in all), so rank 0's shorter step 1 counts as waiting.
    approx(a.step_time_ns, (100.0 + 200.0) / 2.0);
    let labels: Vec<&str> = a.stages.iter().map(|r| r.label.as_str()).collect();
    assert_eq!(
        labels,
        vec!["data", "attention", "attention_bwd", "all_reduce_upd"]
    );

    let data = &a.stages[0];
    assert_eq!((data.count, data.total_ns), (1, 5));
    approx(data.share, 5.0 / 600.0);

    let fwd = &a.stages[1];
    assert_eq!((fwd.stage, fwd.pass), (Stage::Attention, Pass::Forward));
    assert_eq!(
        (fwd.count, fwd.total_ns, fwd.flops, fwd.bytes),
        (4, 40, 4_000, 256)
    );
    approx(fwd.mean_ns, 10.0);
    approx(fwd.share, 40.0 / 600.0);

    let bwd = &a.stages[2];
    assert_eq!((bwd.count, bwd.total_ns), (4, 80));
    approx(bwd.mean_ns, 20.0);
    approx(bwd.share, 80.0 / 600.0);

    let upd = &a.stages[3];
    assert_eq!((upd.count, upd.total_ns, upd.bytes), (4, 20, 16_384));
    approx(upd.mean_ns, 5.0);
    approx(upd.share, 20.0 / 600.0);

    let text = a.render_text();
    assert!(text.contains("attention_bwd"));
    assert!(text.lines().all(|l| l.chars().count() <= 100), "{text}");
}

/// (f) rank 0, bytes in use after each event (P params, G grads, A activations,
/// T temporaries, C comm buffers):
///   t0 P+100 -> 100; t1 A+300 -> 400; t2 T+250 -> 650 (peak); t3 T-250 -> 400;
///   t4 A-300 -> 100, G+100 -> 200; t5 C+400 -> 600; t6 T+40 -> 640, T-40 -> 600.
/// Peak 650 at t2 with P100 A300 T250; maxima P100 G100 A300 T250 C400 (G and C peak later).
/// Rank 1 (listed out of time order) is described inline.
#[test]
fn memory_peak_and_category_maxima() {
    use MemCategory::*;
    let events = vec![
        mem(0, 0, Params, 100),
        mem(0, 1, Activations, 300),
        mem(0, 2, Temporaries, 250),
        mem(0, 3, Temporaries, -250),
        mem(0, 4, Activations, -300),
        mem(0, 4, Grads, 100),
        mem(0, 5, CommBuffers, 400),
        mem(0, 6, Temporaries, 40),
        mem(0, 6, Temporaries, -40),
        // Rank 1, deliberately out of time order: sorted, t=5 inputs +300 (total 300, peak),
        // t=7 inputs -300, t=9 optimizer_state +300 (300 again: not a new peak), t=10
        // optimizer_state +10 at t=10 -> 310, new peak with inputs 0.
        mem(1, 9, OptimizerState, 300),
        mem(1, 5, Inputs, 300),
        mem(1, 7, Inputs, -300),
        mem(1, 10, OptimizerState, 10),
    ];
    let a = analyze(&trace(2, vec![], events, vec![]));
    let m0 = &a.memory.ranks[0];
    assert_eq!(m0.rank, 0);
    assert_eq!(m0.peak_total, 650);
    let mut expect = [0u64; 7];
    expect[Params.index()] = 100;
    expect[Activations.index()] = 300;
    expect[Temporaries.index()] = 250;
    assert_eq!(m0.at_peak, expect);
    let mut maxima = expect;
    maxima[Grads.index()] = 100;
    maxima[CommBuffers.index()] = 400;
    assert_eq!(m0.max_per_category, maxima);

    let m1 = &a.memory.ranks[1];
    assert_eq!(m1.peak_total, 310);
    let mut expect1 = [0u64; 7];
    expect1[OptimizerState.index()] = 310;
    assert_eq!(m1.at_peak, expect1);
    let mut maxima1 = expect1;
    maxima1[Inputs.index()] = 300;
    assert_eq!(m1.max_per_category, maxima1);
    assert_eq!(a.memory.max_peak(), 650);
}

/// Same-time events are applied in order and the peak is checked after each one.
#[test]
fn memory_same_time_events_peak_after_each() {
    use MemCategory::*;
    let events = vec![
        mem(0, 1, Temporaries, 500),
        mem(0, 1, Temporaries, -500),
        mem(0, 1, Params, 10),
    ];
    let a = analyze(&trace(1, vec![], events, vec![]));
    assert_eq!(a.memory.ranks[0].peak_total, 500);
    assert_eq!(a.memory.ranks[0].at_peak[Temporaries.index()], 500);
    assert_eq!(a.memory.ranks[0].at_peak[Params.index()], 0);
}

fn chrome_fixture() -> Trace {
    let mut g = op(
        1,
        0,
        Stream::Compute,
        Stage::ExpertGemm1,
        Pass::Backward,
        1_500,
        4_000,
    );
    g.name = "L3.expert_gemm1".into();
    g.layer = Some(3);
    g.flops = 7;
    g.gemm_calls = Some(8);
    trace(
        2,
        vec![compute(0, 0, 1_000), comm(0, 500, 2_500), g],
        vec![
            mem(0, 0, MemCategory::Params, 1024),
            mem(0, 100, MemCategory::Activations, 2048),
            mem(1, 0, MemCategory::Params, 1024),
        ],
        vec![span(0, 0, 0, 5_000), span(1, 0, 0, 5_000)],
    )
}

/// (g) Chrome JSON round trip: event counts, µs times, pid/tid, metadata and counters.
#[test]
fn chrome_json_structure() {
    let t = chrome_fixture();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("trace.json");
    write_chrome_trace(&t, &path).expect("write");
    let text = std::fs::read_to_string(&path).expect("read");
    let v: serde_json::Value = serde_json::from_str(&text).expect("parse");
    assert_eq!(v, to_chrome_json(&t));
    assert_eq!(v["displayTimeUnit"], "ms");
    let evs = v["traceEvents"].as_array().expect("array");

    // Ops are complete events on the stream threads; step spans are on the steps thread.
    let xs: Vec<_> = evs.iter().filter(|e| e["ph"] == "X" && e["cat"] != "step").collect();
    assert_eq!(xs.len(), 3);
    let spans: Vec<_> = evs.iter().filter(|e| e["ph"] == "X" && e["cat"] == "step").collect();
    assert_eq!(spans.len(), t.steps.len());
    assert!(spans.iter().all(|e| e["tid"] == moelab::trace::chrome::STEPS_TID && e["args"]["step"].is_u64()));
    let g = xs
        .iter()
        .find(|e| e["name"] == "L3.expert_gemm1")
        .expect("gemm event");
    assert_eq!(g["ts"].as_f64(), Some(1.5));
    assert_eq!(g["dur"].as_f64(), Some(2.5));
    assert_eq!(g["pid"], 1);
    assert_eq!(g["tid"], 0);
    assert_eq!(g["cat"], "expert_gemm1_bwd");
    assert_eq!(g["args"]["stage"], "expert_gemm1");
    assert_eq!(g["args"]["pass"], "backward");
    assert_eq!(g["args"]["layer"], 3);
    assert!(g["args"]["chunk"].is_null());
    assert_eq!(g["args"]["flops"], 7);
    assert_eq!(g["args"]["gemm_calls"], 8);
    let c = xs
        .iter()
        .find(|e| e["cat"] == "all_to_all")
        .expect("comm event");
    assert_eq!(c["tid"], 1);
    assert_eq!(c["pid"], 0);
    assert_eq!(c["ts"].as_f64(), Some(0.5));
    assert_eq!(c["dur"].as_f64(), Some(2.0));
    assert!(c["args"].get("gemm_calls").is_none(), "an op without GEMM calls has no gemm_calls");
    // Read back (predict, the workbench): the GEMM calls survive.
    let back = moelab::trace::chrome_import::trace_from_chrome(&text, "cuda").expect("import");
    let gemm_calls: Vec<_> = back.ops.iter().map(|o| (o.name.as_str(), o.gemm_calls)).filter(|(_, n)| n.is_some()).collect();
    assert_eq!(gemm_calls, vec![("L3.expert_gemm1", Some(8))]);

    let meta: Vec<_> = evs.iter().filter(|e| e["ph"] == "M").collect();
    let procs: Vec<&str> = meta
        .iter()
        .filter(|e| e["name"] == "process_name")
        .map(|e| e["args"]["name"].as_str().expect("name"))
        .collect();
    assert_eq!(procs, vec!["rank 0", "rank 1"]);
    let threads: Vec<(u64, u64, &str)> = meta
        .iter()
        .filter(|e| e["name"] == "thread_name")
        .map(|e| {
            (
                e["pid"].as_u64().expect("pid"),
                e["tid"].as_u64().expect("tid"),
                e["args"]["name"].as_str().expect("n"),
            )
        })
        .collect();
    assert_eq!(
        threads,
        vec![
            (0, 0, "compute"),
            (0, 1, "comm"),
            (0, 2, "steps"),
            (1, 0, "compute"),
            (1, 1, "comm"),
            (1, 2, "steps"),
        ]
    );

    let counters: Vec<_> = evs.iter().filter(|e| e["ph"] == "C").collect();
    assert_eq!(counters.len(), 3);
    assert!(counters.iter().all(|e| e["name"] == "memory"));
    let last0 = counters
        .iter()
        .rfind(|e| e["pid"] == 0)
        .expect("rank 0 counter");
    assert_eq!(last0["ts"].as_f64(), Some(0.1));
    let args = last0["args"].as_object().expect("args");
    assert_eq!(args.len(), 7);
    assert_eq!(args["params"], 1024);
    assert_eq!(args["activations"], 2048);
    assert_eq!(args["comm_buffers"], 0);
}

/// (h) write_tables writes six files; the overlap CSV has the expected rank-0 row.
#[test]
fn write_tables_roundtrip_csv() {
    let a = analyze(&chrome_fixture());
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("tables");
    let paths = tables::write_tables(&a, &out).expect("write tables");
    let mut names: Vec<String> = paths
        .iter()
        .map(|p| p.file_name().expect("name").to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        vec![
            "memory.csv",
            "memory.parquet",
            "overlap.csv",
            "overlap.parquet",
            "stages.csv",
            "stages.parquet",
            "waits.csv",
            "waits.parquet"
        ]
    );
    assert!(paths
        .iter()
        .all(|p| p.exists() && std::fs::metadata(p).expect("meta").len() > 0));

    // Rank 0: compute [0,1000], comm [500,2500] -> comm 2000, overlapped 500, exposed 1500,
    // busy 2500, span 5000, idle 2500.
    let csv = std::fs::read_to_string(out.join("overlap.csv")).expect("csv");
    let mut lines = csv.lines();
    assert_eq!(
        lines.next(),
        Some("rank,span_ns,busy_ns,idle_ns,compute_ns,comm_ns,overlapped_ns,exposed_comm_ns,overlap_ratio,a2a_ns,a2a_overlapped_ns,a2a_overlap_ratio")
    );
    assert_eq!(
        lines.next(),
        Some("0,5000,2500,2500,1000,2000,500,1500,0.25,2000,500,0.25")
    );

    let mem_csv = std::fs::read_to_string(out.join("memory.csv")).expect("csv");
    assert_eq!(mem_csv.lines().count(), 1 + 2 * 7);
    assert!(mem_csv.lines().any(|l| l == "0,activations,2048,2048"));

    let stages_csv = std::fs::read_to_string(out.join("stages.csv")).expect("csv");
    assert!(stages_csv
        .lines()
        .any(|l| l == "expert_gemm1,backward,expert_gemm1_bwd,1,2500,2500.0,0.25,7,0"));
}

/// (i) An empty trace analyzes, renders and exports without panicking.
#[test]
fn empty_trace_is_fine() {
    let t = Trace::default();
    let a: Analysis = analyze(&t);
    assert!(a.stages.is_empty());
    assert!(a.overlap.is_empty());
    assert!(a.memory.ranks.is_empty());
    assert_eq!(a.steps, 0);
    approx(a.step_time_ns, 0.0);
    approx(a.overall_overlap(), 0.0);
    assert_eq!(a.exposed_comm_ns(), 0);
    assert_eq!(a.memory.max_peak(), 0);
    assert!(!a.render_text().is_empty());
    let dir = tempfile::tempdir().expect("tempdir");
    assert_eq!(
        tables::write_tables(&a, dir.path()).expect("write").len(),
        8
    );
    let v = to_chrome_json(&t);
    assert_eq!(v["traceEvents"].as_array().map(Vec::len), Some(0));

    // A world with ranks but no events still gets one zeroed row per rank.
    let a = analyze(&Trace {
        world: 2,
        ..Trace::default()
    });
    assert_eq!(a.overlap.len(), 2);
    assert_eq!(a.memory.ranks.len(), 2);
    assert_eq!(a.overlap[1].span_ns, 0);
}

/// A cancelled run's trace: rank 0 finished step 0 and stopped inside step 1 (ops, no
/// span). The tables hold step 0 only and say how many ops they left out.
#[test]
fn ops_of_an_unfinished_step_are_left_out_and_counted() {
    let mut late = compute(0, 200, 260);
    late.step = 1;
    let mut late_comm = comm(0, 260, 300);
    late_comm.step = 1;
    let a = analyze(&trace(1, vec![compute(0, 0, 100), comm(0, 100, 150), late, late_comm], vec![], vec![span(0, 0, 0, 150)]));
    assert_eq!((a.steps, a.unfinished_ops), (1, 2));
    let counted: u64 = a.stages.iter().map(|r| r.count).sum();
    assert_eq!(counted, 2, "{:?}", a.stages);
    let r0 = &a.overlap[0];
    assert!(r0.span_ns >= r0.compute_ns + r0.comm_ns - r0.overlapped_ns, "busy within span: {r0:?}");
    assert!(a.render_text().contains("2 ops of the unfinished last step"));
    // A trace without step spans (an imported one) keeps every op.
    assert_eq!(analyze(&trace(1, vec![compute(0, 0, 100)], vec![], vec![])).unfinished_ops, 0);
}

//! Compute and comm streams of a rank run concurrently on the cpu backend, so overlap in a
//! trace is measured, not assumed.

mod common;
use common::*;
use moelab::analysis::analyze;
use moelab::backend::cpu::CpuRuntime;
use moelab::backend::ExecOptions;
use moelab::plan::{GroupId, Group, OpKind, Plan, RankBuilder};
use moelab::taxonomy::{MemCategory, Pass, Stage, Stream};

/// Rank 0: an all-gather with no dependencies and 12 independent GEMMs. Rank 1: 40 GEMMs
/// whose output it all-gathers. Rank 0's all-gather waits for rank 1's GEMMs while its own
/// GEMMs run, so rank 0's communication is overlapped.
fn two_rank_plan() -> Plan {
    let s = spec("tokens_per_rank = 256\nn_layers = 1", "ep = 2", "mode = \"inference\"");
    let (t, m, n) = (256usize, 16usize, 256usize);
    // t * m == m * n so that both ranks' all-gather contributions have the same size.
    let ranks = (0..2u32)
        .map(|r| {
            let mut b = RankBuilder::new(r, false, 4);
            let x = b.buf("x", t * m, MemCategory::Inputs);
            let tgt = b.buf("target", t * m, MemCategory::Inputs);
            b.op("load", Stage::Data, Pass::Forward, OpKind::LoadBatch { x, target: tgt, shard: r as usize, batch: 1, seq: t, d_model: m }, 0, 0);
            let w = b.param("w", m * n, moelab::plan::ParamInit { tag: "w".into(), layer: 0, experts: None, mean: 0.0, std: 0.1 }, false);
            let gemm = |b: &mut RankBuilder, name: &str, input, count: usize| {
                let mut y = input;
                for i in 0..count {
                    let (d_in, d_out) = if i % 2 == 0 { (m, n) } else { (n, m) };
                    let out = b.buf(format!("{name}{i}"), t * d_out, MemCategory::Activations);
                    let w2 = if i % 2 == 0 { w } else { b.param(&format!("{name}w{i}"), n * m, moelab::plan::ParamInit { tag: format!("w{i}"), layer: 0, experts: None, mean: 0.0, std: 0.1 }, false) };
                    b.op(format!("{name}{i}"), Stage::ExpertGemm1, Pass::Forward, OpKind::Linear { x: y, w: w2, bias: None, residual: None, y: out, rows: t, d_in, d_out }, 0, 0);
                    y = out;
                }
                y
            };
            // A tiny all-gather first: both compute streams start with an op that reads its
            // result, so when it completes the comm thread is running and enters the second
            // all-gather at once while the cores are free for compute.
            let p = b.param("p", 8, moelab::plan::ParamInit { tag: "p".into(), layer: 0, experts: None, mean: 0.0, std: 1.0 }, false);
            let g1 = b.buf("g1", 16, MemCategory::CommBuffers);
            b.op("allgather_gate", Stage::AllGather, Pass::Forward, OpKind::AllGather { group: GroupId(0), send: p, recv: g1 }, 0, 0);
            let a1 = b.buf("a1", 16, MemCategory::Activations);
            b.op("after_gate", Stage::Act, Pass::Forward, OpKind::Act { h: g1, a: a1, act: moelab::spec::Activation::Relu }, 0, 0);
            // Rank 0 then all-gathers a parameter (no dependency) and runs 12 GEMMs; rank 1
            // runs 40 GEMMs and all-gathers their output, so rank 0's all-gather waits.
            let send = if r == 0 { w } else { gemm(&mut b, "g", x, 40) };
            let len = if r == 0 { m * n } else { t * m };
            assert_eq!(len, m * n, "both ranks send the same size");
            let recv = b.buf("gathered", 2 * len, MemCategory::CommBuffers);
            b.op("allgather", Stage::AllGather, Pass::Forward, OpKind::AllGather { group: GroupId(0), send, recv }, 0, 0);
            if r == 0 {
                gemm(&mut b, "g", tgt, 12);
            }
            b.finish()
        })
        .collect();
    Plan { spec: s, groups: vec![Group { name: "world".into(), ranks: vec![0, 1] }], ranks }
}

#[test]
fn comm_runs_while_independent_compute_runs() {
    let plan = two_rank_plan();
    assert_eq!(plan.ranks[0].ops.iter().find(|o| o.name == "allgather").unwrap().stream, Stream::Comm);
    let mut rt = CpuRuntime::new(plan, ExecOptions::default());
    for i in 0..3 {
        rt.step(i > 0, None).expect("step");
    }
    let a = analyze(&rt.trace());
    let r0 = &a.overlap[0];
    assert!(r0.comm_ns > 0 && r0.compute_ns > 0);
    // A serial executor gives exactly zero here; timing under load decides how much more.
    assert!(r0.overlapped_ns > 0, "rank 0's all-gather should run during its own GEMMs: {r0:?}");
}

#[test]
fn the_rank_that_arrives_first_at_a_collective_waits_for_the_last() {
    // Rank 0 reaches the second all-gather at once; rank 1 only after its 40 GEMMs. The
    // analysis lines the two events up: rank 0's all-gather is mostly waiting, and its wait
    // ends where rank 1's event starts.
    let mut rt = CpuRuntime::new(two_rank_plan(), ExecOptions::default());
    for i in 0..3 {
        rt.step(i > 0, None).expect("step");
    }
    let trace = rt.trace();
    assert_eq!(trace.group_sizes, vec![2]);
    // The first measured step is step 1 (step 0 was the unmeasured one), as run.log counts.
    let ag: Vec<_> = trace.ops.iter().filter(|o| o.name == "allgather" && o.step == 1).collect();
    assert_eq!(ag.len(), 2);
    assert_eq!(ag[0].collective, ag[1].collective, "the two members' events are one collective");
    assert_eq!(ag[0].collective.unwrap().seq, 1, "the second collective of the group");
    let (r0, r1) = if ag[0].rank == 0 { (ag[0], ag[1]) } else { (ag[1], ag[0]) };
    assert!(r1.start_ns > r0.start_ns, "rank 1 arrives later");
    let a = analyze(&trace);
    let row = a.waits.iter().find(|w| w.stage == Stage::AllGather).expect("all-gather row");
    let stage_total = a.stages.iter().find(|s| s.stage == Stage::AllGather).unwrap().total_ns;
    assert_eq!((row.count, row.unmatched, row.total_ns), (8, 0, stage_total));
    // Over both measured steps, the waits are at least rank 0's lead at this all-gather
    // in step 0 (positive) and at most the collectives' time.
    let lead = (r1.start_ns - r0.start_ns).min(r0.dur_ns());
    assert!(row.wait_ns >= lead && row.wait_ns <= row.total_ns, "{row:?}, lead {lead}");
    assert!(a.render_text().contains("waiting for the group's last member"));
}

//! A failing or cancelled rank ends the run quickly with that rank's error; no rank hangs.

mod common;
use common::*;
use moelab::backend::cpu::CpuRuntime;
use moelab::backend::{BackendError, ExecOptions};
use moelab::plan::Plan;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

#[test]
fn a_failing_rank_releases_its_peers_with_its_error() {
    let s = spec("tokens_per_rank = 32\nn_layers = 2", "ep = 4", "");
    let plan = Plan::build(&s).unwrap();
    let opts = ExecOptions { fail_at: Some((2, "L1.expert_gemm1".into())), collective_timeout: Duration::from_secs(30), ..Default::default() };
    let mut rt = CpuRuntime::new(plan, opts);
    let t0 = Instant::now();
    let err = rt.step(true, None).unwrap_err();
    assert!(t0.elapsed() < Duration::from_secs(5), "took {:?}", t0.elapsed());
    match err {
        BackendError::OpFailed { rank, op, .. } => {
            assert_eq!(rank, 2);
            assert_eq!(op, "L1.expert_gemm1");
        }
        other => panic!("expected the root cause, got {other}"),
    }
    // What was measured before the failure is kept in the trace.
    assert!(!rt.trace().ops.is_empty());
}

#[test]
fn a_missing_peer_times_out_naming_it() {
    // Rank 1 fails before its first collective but the abort is suppressed by running only
    // the fabric: simulate with a short timeout and a rank that never arrives.
    let f = moelab::backend::cpu::fabric::Fabric::new(Duration::from_millis(200));
    let t0 = Instant::now();
    let err = f.collective(7, &[0, 1], 0, "test_allreduce", vec![vec![1.0]], |_, _| ()).unwrap_err();
    assert!(t0.elapsed() < Duration::from_secs(2));
    assert_eq!(err, BackendError::Timeout { rank: 0, op: "test_allreduce".into(), missing: vec![1], secs: 0 });
}

#[test]
fn cancel_stops_the_run() {
    let s = spec("tokens_per_rank = 32", "ep = 2", "");
    let opts = ExecOptions::default();
    let cancel = opts.cancel.clone();
    let mut rt = CpuRuntime::new(Plan::build(&s).unwrap(), opts);
    rt.step(false, None).expect("runs before cancel");
    cancel.store(true, Ordering::SeqCst);
    assert_eq!(rt.step(true, None).unwrap_err(), BackendError::Cancelled);
}

#[test]
fn collectives_sum_and_exchange_like_nccl() {
    let f = moelab::backend::cpu::fabric::Fabric::new(Duration::from_secs(5));
    let out: Vec<(Vec<f32>, Vec<f32>)> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..3u32)
            .map(|r| {
                let f = &f;
                s.spawn(move || {
                    let sum = f.collective(1, &[0, 1, 2], r, "ar", vec![vec![r as f32, 1.0]], |d, _| {
                        let mut acc = vec![0.0; 2];
                        for x in d {
                            acc[0] += x[0][0];
                            acc[1] += x[0][1];
                        }
                        acc
                    }).unwrap();
                    // all-to-all: rank r sends [r*10 + p] to peer p.
                    let parts = (0..3).map(|p| vec![(r * 10 + p) as f32]).collect();
                    let got = f.collective(1, &[0, 1, 2], r, "a2a", parts, |d, my| d.iter().map(|x| x[my][0]).collect()).unwrap();
                    (sum, got)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (r, (sum, got)) in out.iter().enumerate() {
        assert_eq!(sum, &vec![3.0, 3.0]);
        assert_eq!(got, &(0..3).map(|p| (p * 10 + r) as f32).collect::<Vec<_>>());
    }
}

#[test]
fn a_cpu_run_larger_than_the_hosts_memory_is_refused_before_it_starts() {
    // Every rank of a cpu run lives in this process: a predicted peak above the host's memory
    // is refused naming the backend and the fix, instead of the allocation aborting.
    let s = spec("tokens_per_rank = 32", "ep = 2", "");
    let plan = Plan::build(&s).unwrap();
    match moelab::run::refuse_cpu_beyond_host_memory(&plan, Some(1 << 10)) {
        Err(moelab::run::RunError::Choice { field, message, fix }) => {
            assert_eq!(field, "run.backend");
            assert!(message.contains("2 rank(s)") && fix.contains("sim"), "{message} / {fix}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(moelab::run::refuse_cpu_beyond_host_memory(&plan, Some(1 << 40)).is_ok());
    assert!(moelab::run::refuse_cpu_beyond_host_memory(&plan, None).is_ok(), "unknown host memory: runs");
    let mut sim = s.clone();
    sim.run.backend = moelab::spec::BackendKind::Sim;
    sim.run.profile = Some("h100".into());
    assert!(moelab::run::refuse_cpu_beyond_host_memory(&Plan::build(&sim).unwrap(), Some(1 << 10)).is_ok(), "the sim holds no tensors");
    assert!(moelab::run::host_memory_bytes().is_none_or(|b| b > 1 << 28), "this machine has some memory");
}

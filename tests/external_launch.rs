//! External launch (torchrun, srun) without a GPU: the environment rules, the TCP rendezvous
//! and the gathering on rank 0 over localhost with threads as fake ranks, and the
//! WORLD_SIZE-vs-layout check through the CLI.

mod common;

use common::moelab;
use moelab::backend::cuda::external::{detect, Launcher};
use moelab::backend::cuda::launch::{gather, gather_with_stop, RankEvent, RankRecord, WorkerLine};
use moelab::backend::cuda::rendezvous::{self, connect, listen, serve, serve_until, FromRoot, Hello, Hub, RendezvousError, RootEvent, ToRoot, Welcome};
use moelab::backend::{BackendError, ExecOptions};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::sync::mpsc;
use std::time::{Duration, Instant};

fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let m: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    move |k| m.get(k).cloned()
}

const TORCH: &[(&str, &str)] = &[("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "1"), ("MASTER_ADDR", "10.0.0.1"), ("MASTER_PORT", "29533")];

fn with(base: &[(&'static str, &'static str)], extra: &[(&'static str, &'static str)]) -> Vec<(&'static str, &'static str)> {
    let mut v: Vec<_> = base.iter().filter(|(k, _)| !extra.iter().any(|(e, _)| e == k)).copied().collect();
    v.extend(extra.iter().copied().filter(|(_, v)| !v.is_empty()));
    v
}

#[test]
fn torchrun_variables_give_the_rank() {
    let e = detect(&env(TORCH)).unwrap().expect("external");
    assert_eq!((e.launcher, e.rank, e.world, e.local_rank, e.port), (Launcher::Torchrun, 1, 2, 1, 29533));
    assert_eq!(e.address(), "10.0.0.1:29533");
    assert_eq!(e.timeout, Duration::from_secs(60));
    // torchrun's agent store holds MASTER_PORT: the rendezvous takes the next one...
    let e = detect(&env(&with(TORCH, &[("TORCHELASTIC_USE_AGENT_STORE", "True")]))).unwrap().unwrap();
    assert_eq!(e.port, 29534);
    // ...unless told otherwise.
    let e = detect(&env(&with(TORCH, &[("MOELAB_RENDEZVOUS_PORT", "4000"), ("MOELAB_RENDEZVOUS_TIMEOUT_S", "2.5")]))).unwrap().unwrap();
    assert_eq!((e.port, e.timeout), (4000, Duration::from_millis(2500)));
}

#[test]
fn srun_variables_give_the_rank_and_need_master_addr() {
    let srun = [("SLURM_PROCID", "3"), ("SLURM_NTASKS", "4"), ("SLURM_LOCALID", "1"), ("MASTER_ADDR", "node7"), ("MASTER_PORT", "29500")];
    let e = detect(&env(&srun)).unwrap().unwrap();
    assert_eq!((e.launcher, e.rank, e.world, e.local_rank, e.port), (Launcher::Slurm, 3, 4, 1, 29500));
    let e = detect(&env(&srun[..3])).unwrap_err();
    assert_eq!(e.var, "MASTER_ADDR, MASTER_PORT");
    assert!(e.fix.contains("export MASTER_ADDR") && e.fix.contains("srun"), "{e}");
    // A one-task step (an sbatch script, salloc) launches locally.
    assert_eq!(detect(&env(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "1"), ("SLURM_LOCALID", "0")])).unwrap(), None);
}

#[test]
fn no_variables_or_moelab_launch_local_is_a_local_launch() {
    assert_eq!(detect(&env(&[])).unwrap(), None);
    assert_eq!(detect(&env(&with(TORCH, &[("MOELAB_LAUNCH", "local")]))).unwrap(), None);
    let e = detect(&env(&with(TORCH, &[("MOELAB_LAUNCH", "remote")]))).unwrap_err();
    assert_eq!(e.var, "MOELAB_LAUNCH");
}

#[test]
fn environment_mistakes_name_the_variable_and_the_fix() {
    type Case<'a> = (&'a [(&'a str, &'a str)], &'a str, &'a str);
    let cases: &[Case] = &[
        (&[("RANK", "")], "RANK", "torchrun"),
        (&[("RANK", "one")], "RANK", "number"),
        (&[("RANK", "2")], "RANK", "0 to 1"),
        (&[("WORLD_SIZE", "0")], "WORLD_SIZE", "world size"),
        (&[("MASTER_PORT", "70000")], "MASTER_PORT", "free port"),
        (&[("MASTER_ADDR", "")], "MASTER_ADDR", "MASTER_ADDR"),
        (&[("MOELAB_RENDEZVOUS_TIMEOUT_S", "-1")], "MOELAB_RENDEZVOUS_TIMEOUT_S", "120"),
        (&[("MOELAB_RENDEZVOUS_PORT", "x")], "MOELAB_RENDEZVOUS_PORT", "free port"),
    ];
    for (edit, var, fix) in cases {
        let e = detect(&env(&with(TORCH, edit))).unwrap_err();
        assert_eq!(&e.var, var, "{edit:?}: {e}");
        assert!(e.fix.contains(fix) || e.message.contains(fix), "{edit:?}: {e}");
    }
}

#[test]
fn layout_and_gpu_problems_name_both_sides() {
    let e = detect(&env(TORCH)).unwrap().unwrap();
    assert!(e.problems(2, 2).is_empty());
    let p = e.problems(4, 2);
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].0, "layout");
    assert!(p[0].1.contains("WORLD_SIZE=2") && p[0].1.contains("world=4"), "{p:?}");
    // LOCAL_RANK picks the GPU; one bound GPU per task is GPU 0; otherwise too few is an error.
    assert_eq!(e.device(2), Ok(1));
    assert_eq!(e.device(1), Ok(0));
    let err = e.device(0).unwrap_err();
    assert!(err.var == "LOCAL_RANK" && err.message.contains("0 GPU(s)"), "{err}");
}

fn welcome() -> Welcome {
    Welcome { nccl_id: Some("ab".repeat(128)), epoch_unix_ns: 1, timeout_s: 60, spec_toml: "name = \"x\"".into(), fail_at: None, skip_optimizer: false }
}

fn step(rank: u32, step: usize) -> WorkerLine {
    WorkerLine::Step { rank, step, measured: step > 0, loss: 1.0 + rank as f64, aux: 0.0, dropped: 0, routed: 8, capacity: vec![], wall_s: 0.01, host_ops: 0 }
}

fn record(rank: u32) -> Box<RankRecord> {
    Box::new(RankRecord { rank, device: "fake".into(), tracked_peak: (100 * rank as u64, [0; 7]), ..Default::default() })
}

fn addr(l: &std::net::TcpListener) -> String {
    format!("127.0.0.1:{}", l.local_addr().unwrap().port())
}

#[test]
fn three_fake_ranks_rendezvous_and_gather_on_rank_0() {
    let listener = listen(0).unwrap();
    let a = addr(&listener);
    let peers: Vec<_> = (1..3u32)
        .map(|r| {
            let a = a.clone();
            std::thread::spawn(move || {
                let (client, w, root) = connect(&a, &Hello::new(r, 3, "h1".into()), Duration::from_secs(10)).unwrap();
                assert_eq!(w, welcome());
                client.send(&ToRoot::Line { line: WorkerLine::Ready { rank: r, device: "fake".into() } }).unwrap();
                for s in 0..2 {
                    client.send(&ToRoot::Line { line: step(r, s) }).unwrap();
                }
                client.send(&ToRoot::Record { record: record(r) }).unwrap();
                client.send(&ToRoot::Line { line: WorkerLine::Done { rank: r } }).unwrap();
                root.recv_timeout(Duration::from_secs(10)).unwrap()
            })
        })
        .collect();
    let joined = serve(&listener, 3, "h1", Duration::from_secs(10)).unwrap();
    assert_eq!(joined.iter().map(|p| p.rank).collect::<Vec<_>>(), vec![1, 2]);
    let (tx, rx) = mpsc::channel();
    let hub = Hub::start(joined, &welcome(), tx.clone(), Duration::from_secs(5));
    for s in 0..2 {
        tx.send((0, RankEvent::Line(step(0, s)))).unwrap();
    }
    tx.send((0, RankEvent::Record(record(0)))).unwrap();
    tx.send((0, RankEvent::Line(WorkerLine::Done { rank: 0 }))).unwrap();
    let mut seen = Vec::new();
    let g = gather(3, 2, &rx, &ExecOptions::default(), &mut Vec::new, &mut |s| seen.push(s.step));
    assert_eq!(g.failure, None);
    assert_eq!(seen, vec![0, 1]);
    assert_eq!(g.steps[1].loss, 1.0 + 2.0 + 3.0);
    assert!(g.steps[1].measured && !g.steps[0].measured);
    assert_eq!(g.records.iter().map(|r| r.as_ref().map(|r| r.tracked_peak.0)).collect::<Vec<_>>(), vec![Some(0), Some(100), Some(200)]);
    hub.send_all(&FromRoot::End { ok: true, message: None });
    for p in peers {
        assert_eq!(p.join().unwrap(), RootEvent::End(true, None));
    }
}

fn refused(h: std::thread::JoinHandle<Result<(), RendezvousError>>) -> String {
    match h.join().unwrap() {
        Err(RendezvousError::Refused(reason)) => reason,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn peer(a: &str, hello: Hello) -> std::thread::JoinHandle<Result<(), RendezvousError>> {
    let a = a.to_string();
    std::thread::spawn(move || connect(&a, &hello, Duration::from_secs(10)).map(|_| ()))
}

#[test]
fn a_different_spec_is_refused_on_both_sides() {
    let listener = listen(0).unwrap();
    let p = peer(&addr(&listener), Hello::new(1, 2, "other".into()));
    let e = serve(&listener, 2, "mine", Duration::from_secs(10)).unwrap_err();
    assert!(matches!(&e, RendezvousError::SpecMismatch { rank: 1, .. }), "{e}");
    assert!(e.to_string().contains("different spec") && e.to_string().contains("mine") && e.to_string().contains("other"), "{e}");
    assert!(refused(p).contains("different spec"));
}

#[test]
fn a_duplicate_rank_is_refused_and_everyone_told() {
    let listener = listen(0).unwrap();
    let a = addr(&listener);
    let first = peer(&a, Hello::new(1, 3, "h".into()));
    std::thread::sleep(Duration::from_millis(300));
    let second = peer(&a, Hello::new(1, 3, "h".into()));
    let e = serve(&listener, 3, "h", Duration::from_secs(10)).unwrap_err();
    assert!(matches!(e, RendezvousError::DuplicateRank { rank: 1, .. }), "{e}");
    assert!(refused(first).contains("connected twice"));
    assert!(refused(second).contains("connected twice"));
}

#[test]
fn wrong_world_or_rank_is_refused_and_strangers_ignored() {
    let listener = listen(0).unwrap();
    let a = addr(&listener);
    // A stray connection (no magic) is dropped; the rendezvous goes on.
    let mut stray = std::net::TcpStream::connect(&a).unwrap();
    stray.write_all(b"GET / HTTP/1.0\n").unwrap();
    let p = peer(&a, Hello::new(1, 4, "h".into()));
    let e = serve(&listener, 2, "h", Duration::from_secs(10)).unwrap_err();
    assert!(e.to_string().contains("world size 4") && e.to_string().contains("with 2"), "{e}");
    assert!(refused(p).contains("world size"));
    let listener = listen(0).unwrap();
    let p = peer(&addr(&listener), Hello::new(5, 2, "h".into()));
    let e = serve(&listener, 2, "h", Duration::from_secs(10)).unwrap_err();
    assert!(e.to_string().contains("rank 5"), "{e}");
    assert!(refused(p).contains("rank 5"));
}

#[test]
fn a_cancel_ends_the_wait_for_the_ranks_at_once_and_refuses_those_that_joined() {
    // Rank 0's Ctrl-C while rank 2 has not come: it ends the wait long before the timeout.
    let listener = listen(0).unwrap();
    let p = peer(&addr(&listener), Hello::new(1, 3, "h".into()));
    let cancel = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let c = cancel.clone();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        c.store(true, std::sync::atomic::Ordering::SeqCst);
    });
    let t = Instant::now();
    let e = serve_until(&listener, 3, "h", Duration::from_secs(60), Some(&cancel)).unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert_eq!(e, RendezvousError::Cancelled);
    assert!(refused(p).contains("cancelled"));
}

#[test]
fn a_rank_that_never_comes_times_out_naming_it() {
    let listener = listen(0).unwrap();
    let p = peer(&addr(&listener), Hello::new(1, 3, "h".into()));
    let t = Instant::now();
    let e = serve(&listener, 3, "h", Duration::from_secs(1)).unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(3));
    assert!(matches!(&e, RendezvousError::Timeout { missing, .. } if missing == &vec![2]), "{e}");
    assert!(e.to_string().contains("MOELAB_RENDEZVOUS_TIMEOUT_S"), "{e}");
    assert!(refused(p).contains("never connected"));
}

#[test]
fn a_peer_without_rank_0_gives_up_after_its_timeout() {
    // A port nobody listens on: bind, note it, close.
    let port = listen(0).unwrap().local_addr().unwrap().port();
    let t = Instant::now();
    let e = connect(&format!("127.0.0.1:{port}"), &Hello::new(1, 2, "h".into()), Duration::from_millis(800)).err().unwrap();
    assert!(t.elapsed() < Duration::from_secs(4));
    assert!(matches!(e, RendezvousError::Unreachable { .. }), "{e}");
    assert!(e.to_string().contains("MASTER_ADDR"), "{e}");
}

type Events = (mpsc::Sender<(u32, RankEvent)>, mpsc::Receiver<(u32, RankEvent)>);

/// One peer through the rendezvous; returns its client side and rank 0's hub and events.
fn pair() -> (rendezvous::Client, mpsc::Receiver<RootEvent>, Hub, Events) {
    let listener = listen(0).unwrap();
    let a = addr(&listener);
    let h = std::thread::spawn(move || connect(&a, &Hello::new(1, 2, "h".into()), Duration::from_secs(10)).unwrap());
    let joined = serve(&listener, 2, "h", Duration::from_secs(10)).unwrap();
    let (tx, rx) = mpsc::channel();
    let hub = Hub::start(joined, &welcome(), tx.clone(), Duration::from_secs(5));
    let (client, _, root) = h.join().unwrap();
    (client, root, hub, (tx, rx))
}

#[test]
fn a_rank_that_disconnects_mid_run_ends_the_job_within_seconds() {
    let (client, _root, _hub, (tx, rx)) = pair();
    client.send(&ToRoot::Line { line: step(1, 0) }).unwrap();
    tx.send((0, RankEvent::Line(step(0, 0)))).unwrap();
    let t = Instant::now();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        drop(client); // the process dies: its socket closes
    });
    let mut steps = 0;
    let g = gather(2, 3, &rx, &ExecOptions::default(), &mut Vec::new, &mut |_| steps += 1);
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert_eq!(steps, 1);
    match g.failure {
        Some(BackendError::Crashed { rank: 1, message }) => assert!(message.contains("closed"), "{message}"),
        other => panic!("{other:?}"),
    }
    drop(tx);
}

#[test]
fn a_rank_error_is_the_reported_cause() {
    let (client, _root, _hub, (_tx, rx)) = pair();
    let error = WorkerLine::Error { rank: 1, message: "rank 1 failed in op L0.gate: CUDA error".into(), error: None };
    client.send(&ToRoot::Line { line: error }).unwrap();
    let g = gather(2, 3, &rx, &ExecOptions::default(), &mut Vec::new, &mut |_| {});
    assert!(matches!(&g.failure, Some(BackendError::Crashed { rank: 1, message }) if message.contains("CUDA error")), "{:?}", g.failure);
}

#[test]
fn a_peer_that_cannot_set_up_tells_rank_0_why() {
    // Rank 1 of 2 on a node without GPUs: it joins, then cannot pick its GPU. Rank 0 must end
    // the job with that reason, not wait for a rank that will never run.
    use moelab::backend::cuda::external::ExternalRank;
    use moelab::backend::cuda::launch::{run_peer, PeerError};
    let over = [moelab::spec::overrides::Override::parse("run.backend=cpu").unwrap()];
    let spec = moelab::spec::load_file_with(std::path::Path::new("experiments/gpu/topk-2gpu.toml"), &over).unwrap();
    let hash = rendezvous::spec_hash(&spec);
    let listener = listen(0).unwrap();
    let port = listener.local_addr().unwrap().port();
    let ext = ExternalRank { launcher: Launcher::Torchrun, rank: 1, world: 2, local_rank: 1, master_addr: "127.0.0.1".into(), port, timeout: Duration::from_secs(10) };
    let peer = std::thread::spawn(move || run_peer(&spec, &ext, &mut |_| {}));
    let joined = serve(&listener, 2, &hash, Duration::from_secs(10)).unwrap();
    let (tx, rx) = mpsc::channel();
    let _hub = Hub::start(joined, &welcome(), tx.clone(), Duration::from_secs(5));
    let t = Instant::now();
    let g = gather(2, 3, &rx, &ExecOptions::default(), &mut Vec::new, &mut |_| {});
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    match &g.failure {
        Some(BackendError::OpFailed { rank: 1, op, message }) => {
            assert_eq!(op, "setup");
            assert!(message.contains("LOCAL_RANK=1") && message.contains("GPU(s) are visible"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(peer.join().unwrap(), Err(PeerError::Failed { rank: 1, .. })));
    drop(tx);
}

#[test]
fn a_silent_rank_is_lost_after_the_silence_limit() {
    let listener = listen(0).unwrap();
    let a = addr(&listener);
    // A peer that says hello, then hangs without pinging (its host froze).
    let h = std::thread::spawn(move || {
        let mut s = std::net::TcpStream::connect(&a).unwrap();
        let hello = serde_json::to_string(&ToRoot::Hello(Hello::new(1, 2, "h".into()))).unwrap();
        s.write_all(format!("{hello}\n").as_bytes()).unwrap();
        let mut line = String::new();
        BufReader::new(s.try_clone().unwrap()).read_line(&mut line).unwrap();
        std::thread::sleep(Duration::from_secs(4));
        drop(s);
    });
    let joined = serve(&listener, 2, "h", Duration::from_secs(10)).unwrap();
    let (tx, rx) = mpsc::channel();
    let _hub = Hub::start(joined, &welcome(), tx.clone(), Duration::from_secs(1));
    let t = Instant::now();
    let g = gather(2, 3, &rx, &ExecOptions::default(), &mut Vec::new, &mut |_| {});
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert!(matches!(&g.failure, Some(BackendError::Crashed { rank: 1, message }) if message.contains("sent nothing")), "{:?}", g.failure);
    h.join().unwrap();
}

#[test]
fn peers_learn_of_a_stop_and_of_rank_0_dying() {
    let (_client, root, hub, _events) = pair();
    hub.send_all(&FromRoot::Stop { reason: "rank 1 failed".into() });
    assert_eq!(root.recv_timeout(Duration::from_secs(5)).unwrap(), RootEvent::Stop("rank 1 failed".into()));
    let (_client, root, hub, _events) = pair();
    let t = Instant::now();
    drop(hub); // rank 0's process dies: its sockets close
    match root.recv_timeout(Duration::from_secs(5)).unwrap() {
        RootEvent::Lost(how) => assert!(how.contains("closed"), "{how}"),
        other => panic!("{other:?}"),
    }
    assert!(t.elapsed() < Duration::from_secs(3));
}


#[test]
fn cli_refuses_a_world_size_other_than_the_layout_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().join("runs");
    let vars = [("RANK", "0"), ("WORLD_SIZE", "3"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29533")];
    let (code, _, err) = moelab(&["run", "experiments/gpu/topk-2gpu.toml", "--runs-dir", runs.to_str().unwrap()], &vars);
    assert_ne!(code, 0);
    assert!(err.contains("WORLD_SIZE=3") && err.contains("world=2") && err.contains("layout"), "{err}");
    assert!(!runs.exists(), "a refused spec writes nothing");
    // --backend cuda on a cpu spec goes through the same check.
    let (code, _, err) = moelab(&["validate", "experiments/quickstart.toml"], &vars);
    assert_eq!(code, 0, "cpu specs ignore the launch variables: {err}");
    let (code, _, err) = moelab(&["run", "experiments/quickstart.toml", "--backend", "cuda", "--runs-dir", runs.to_str().unwrap()], &vars);
    assert_ne!(code, 0);
    assert!(err.contains("WORLD_SIZE=3") && err.contains("world=4"), "{err}");
}

#[test]
fn cli_under_srun_without_master_addr_says_what_to_export() {
    let vars = [("SLURM_PROCID", "1"), ("SLURM_NTASKS", "2"), ("SLURM_LOCALID", "1")];
    let (code, _, err) = moelab(&["validate", "experiments/gpu/topk-2gpu.toml"], &vars);
    assert_ne!(code, 0);
    assert!(err.contains("MASTER_ADDR, MASTER_PORT") && err.contains("export MASTER_ADDR"), "{err}");
}

#[test]
fn local_worker_exits_reach_the_same_gathering() {
    // The local launcher's path: progress on a channel, exits from polling the children.
    let (tx, rx) = mpsc::channel();
    for r in 0..2 {
        tx.send((r, RankEvent::Line(step(r, 0)))).unwrap();
        tx.send((r, RankEvent::Line(WorkerLine::Done { rank: r }))).unwrap();
    }
    let mut polls = 0;
    let g = gather(2, 1, &rx, &ExecOptions::default(), &mut || { polls += 1; vec![(0, true, "exited: 0".into())] }, &mut |_| {});
    assert_eq!((g.failure, g.steps.len()), (None, 1));
    assert!(polls >= 1);
    // A worker killed before its Done is that rank's crash, with how it exited.
    tx.send((0, RankEvent::Line(step(0, 0)))).unwrap();
    let t = Instant::now();
    let g = gather(2, 2, &rx, &ExecOptions::default(), &mut || vec![(1, false, "worker process exited: killed by signal 9".into())], &mut |_| {});
    assert!(t.elapsed() < Duration::from_secs(2));
    assert!(matches!(&g.failure, Some(BackendError::Crashed { rank: 1, message }) if message.contains("signal 9")), "{:?}", g.failure);
}

#[test]
fn a_clean_exit_seen_before_the_last_step_line_keeps_that_step() {
    // Both workers exit cleanly (polling sees it at once) while their last step's line and
    // Done are still in their pipes: the step is merged, not dropped.
    let (tx, rx) = mpsc::channel();
    for r in 0..2 {
        tx.send((r, RankEvent::Line(step(r, 0)))).unwrap();
    }
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        for r in 0..2 {
            tx.send((r, RankEvent::Line(step(r, 1)))).unwrap();
            tx.send((r, RankEvent::Line(WorkerLine::Done { rank: r }))).unwrap();
        }
    });
    let g = gather(2, 2, &rx, &ExecOptions::default(), &mut || vec![(0, true, "exited: 0".into()), (1, true, "exited: 0".into())], &mut |_| {});
    assert_eq!((g.failure.is_none(), g.steps.len()), (true, 2), "{:?}", g.failure);
    // A worker that ends cleanly without ever reporting a step fails the job, naming it.
    let (tx, rx) = mpsc::channel::<(u32, RankEvent)>();
    tx.send((0, RankEvent::Line(step(0, 0)))).unwrap();
    tx.send((0, RankEvent::Line(WorkerLine::Done { rank: 0 }))).unwrap();
    tx.send((1, RankEvent::Line(WorkerLine::Done { rank: 1 }))).unwrap();
    drop(tx);
    let g = gather(2, 1, &rx, &ExecOptions::default(), &mut Vec::new, &mut |_| {});
    assert!(matches!(&g.failure, Some(BackendError::Crashed { rank: 1, message }) if message.contains("step 0")), "{:?}", g.failure);
}

#[test]
fn a_cancel_stops_every_rank_at_one_step_boundary_and_keeps_the_steps_finished_meanwhile() {
    // Both ranks reported step 0 when the user cancels: they are asked to stop a margin past
    // step 1 (which may have started somewhere), finish their steps, say they stopped, write their
    // records and exit; only their exits end the gathering (a kill before would lose them).
    let (tx, rx) = mpsc::channel();
    for r in 0..2 {
        tx.send((r, RankEvent::Line(step(r, 0)))).unwrap();
    }
    let opts = ExecOptions::default();
    let cancel = opts.cancel.clone();
    let asked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let exited = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (seen, gone, tx2) = (asked.clone(), exited.clone(), tx.clone());
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        cancel.store(true, std::sync::atomic::Ordering::SeqCst);
        // The workers' side, once asked: step 1, the cancelled error line, later the exit.
        while seen.lock().unwrap().is_empty() {
            std::thread::sleep(Duration::from_millis(10));
        }
        for r in 0..2u32 {
            tx2.send((r, RankEvent::Line(step(r, 1)))).unwrap();
            let error = Some(serde_json::from_value(serde_json::json!({"type": "cancelled"})).expect("a wire error"));
            tx2.send((r, RankEvent::Line(WorkerLine::Error { rank: r, message: "cancelled".into(), error }))).unwrap();
        }
        std::thread::sleep(Duration::from_millis(300));
        gone.store(true, std::sync::atomic::Ordering::SeqCst);
    });
    drop(tx);
    let mut stop = |k: usize| asked.lock().unwrap().push(k);
    let mut poll = || if exited.load(std::sync::atomic::Ordering::SeqCst) { vec![(0, false, "exited: 1".into()), (1, false, "exited: 1".into())] } else { Vec::new() };
    let t = Instant::now();
    let g = gather_with_stop(2, 5, &rx, &opts, &mut poll, &mut |_| {}, Some(&mut stop));
    assert!(t.elapsed() >= Duration::from_millis(350), "not done before the workers exit");
    assert!(t.elapsed() < Duration::from_secs(10), "done when both ranks exited");
    // Two past step 0, plus the steps of 10 ms that fit in the 250 ms margin.
    assert_eq!(*asked.lock().unwrap(), vec![2 + 25], "asked once, to stop before step 27");
    assert!(matches!(g.failure, Some(BackendError::Cancelled)), "{:?}", g.failure);
    assert_eq!(g.steps.len(), 2, "the step finished after the cancel is kept");

    // A rank that fails while the job stops is reported as that failure, not as a cancel.
    let (tx, rx) = mpsc::channel();
    tx.send((0, RankEvent::Line(step(0, 0)))).unwrap();
    tx.send((1, RankEvent::Line(step(1, 0)))).unwrap();
    let opts = ExecOptions::default();
    opts.cancel.store(true, std::sync::atomic::Ordering::SeqCst);
    let tx2 = tx.clone();
    let mut stop = |_k: usize| {
        let error = Some(serde_json::from_value(serde_json::json!({"type": "cancelled"})).expect("a wire error"));
        tx2.send((0, RankEvent::Line(WorkerLine::Error { rank: 0, message: "cancelled".into(), error }))).unwrap();
        tx2.send((1, RankEvent::Line(WorkerLine::Error { rank: 1, message: "rank 1 failed in op L0.a2a: NCCL error".into(), error: None }))).unwrap();
    };
    drop(tx);
    let mut poll = || vec![(0, false, "exited: 1".into()), (1, false, "exited: 1".into())];
    let g = gather_with_stop(2, 5, &rx, &opts, &mut poll, &mut |_| {}, Some(&mut stop));
    assert!(matches!(&g.failure, Some(BackendError::Crashed { rank: 1, message }) if message.contains("NCCL")), "{:?}", g.failure);
}

#[test]
fn a_lost_rank_beats_the_collective_error_it_caused() {
    // Rank 1 is killed: rank 0's collective fails a moment before rank 1's socket closes.
    let (tx, rx) = mpsc::channel();
    let nccl = WorkerLine::Error { rank: 0, message: "rank 0 failed in op L0.a2a: NCCL remote error".into(), error: None };
    tx.send((0, RankEvent::Line(nccl))).unwrap();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        let _ = tx.send((1, RankEvent::Gone("its connection to rank 0 closed".into())));
        std::thread::sleep(Duration::from_secs(1));
    });
    let g = gather(2, 2, &rx, &ExecOptions::default(), &mut Vec::new, &mut |_| {});
    assert!(matches!(&g.failure, Some(BackendError::Crashed { rank: 1, message }) if message.contains("closed")), "{:?}", g.failure);
}

#[test]
fn a_diverged_step_line_survives_the_json_round_trip() {
    // serde_json writes a NaN loss as null; the launcher must still read the step (and fail
    // the run as diverged), not drop it as an unreadable line.
    let mut line = step(0, 3);
    if let WorkerLine::Step { loss, aux, .. } = &mut line {
        (*loss, *aux) = (f64::NAN, f64::INFINITY);
    }
    let text = serde_json::to_string(&line).unwrap();
    assert!(text.contains("\"loss\":null"), "{text}");
    let back: WorkerLine = serde_json::from_str(&text).expect("reads back");
    assert!(matches!(back, WorkerLine::Step { loss, aux, step: 3, .. } if loss.is_nan() && aux.is_nan()), "{back:?}");
}

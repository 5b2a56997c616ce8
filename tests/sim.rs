//! The sim backend: the engine pinned on hand-built plans with known answers (serial chain,
//! perfect overlap, a collective waiting for the slowest rank, shared-link contention),
//! profile errors that name their field, spec rules for the sim fields, the symmetry
//! reduction against a full simulation, and a seed variant run end to end on the sim.

use moelab::backend::sim::cost::{CollectivePart, Cost};
use moelab::backend::sim::engine::{self, Coupling, HostWork, SimError, SimInput, SimOp, SimRankInput};
use moelab::backend::sim::profile::{self, CollectiveKind, Profile};
use moelab::backend::sim::{self, Symmetry};
use moelab::plan::{GroupId, Plan};
use moelab::run::{self, RunHooks};
use moelab::spec::{self, from_toml_str};
use moelab::taxonomy::Stream;

/// A profile with round numbers: no latencies, full efficiency, NVLink 100 GB/s per GPU,
/// the inter-node link 10 GB/s per NIC.
fn simple_profile(gpus_per_node: usize, nics_per_node: usize) -> Profile {
    let coll = "latency_us = 0.0\nstep_us = 0.0\nefficiency = 1.0\n";
    let link = |name: &str, gbps: f64| {
        let mut s = format!("[links.{name}]\nbandwidth_gbps = {gbps}\n");
        for k in CollectiveKind::ALL {
            s.push_str(&format!("[links.{name}.{}]\n{coll}", k.as_str()));
        }
        s
    };
    let text = format!(
        "name = \"test\"\ndevice = \"test\"\ncalibrated = false\ndate = \"2026-11-23\"\n\
         [gpu]\nmemory_gib = 80.0\nsms = 132\nlaunch_us = 0.0\nhbm_tbps = 1.0\nhbm_efficiency = 1.0\nvector_tflops = 10.0\n\
         [gpu.gemm]\ntile_m = 128\ntile_n = 128\nk_half = 0.0\n\
         [gpu.gemm.bf16]\npeak_tflops = 100.0\nefficiency = 1.0\n\
         [gpu.gemm.f32]\npeak_tflops = 10.0\nefficiency = 1.0\n\
         [topology]\ngpus_per_node = {gpus_per_node}\nnodes = 2\nintra_node = \"nvlink\"\ninter_node = \"infiniband\"\nnics_per_node = {nics_per_node}\n\
         {}{}",
        link("nvlink", 100.0),
        link("infiniband", 10.0)
    );
    profile::parse(&text, "test").expect("the test profile parses")
}

fn compute(secs: f64, deps: &[u32]) -> SimOp {
    SimOp { stream: Stream::Compute, deps: deps.to_vec(), cost: Cost::Compute(secs), host: HostWork::default(), kernels: 1 }
}

fn all_reduce(group: u32, bytes: f64, deps: &[u32]) -> SimOp {
    SimOp { stream: Stream::Comm, deps: deps.to_vec(), cost: Cost::Collective(vec![CollectivePart { group: GroupId(group), kind: CollectiveKind::AllReduce, bytes, host_s: 0.0 }]), host: HostWork::default(), kernels: 1 }
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * b.abs().max(1e-3)
}

#[test]
fn a_serial_chain_takes_the_sum_of_its_ops() {
    let p = simple_profile(8, 8);
    let ops = vec![compute(1e-3, &[]), compute(2e-3, &[0]), compute(3e-3, &[1])];
    let input = SimInput { ranks: vec![SimRankInput { rank: 0, ops }], groups: vec![], profile: &p, coupling: Coupling::Full };
    let t = engine::simulate(&input).expect("simulates");
    assert!(close(t.makespan, 6e-3), "{}", t.makespan);
    let ends: Vec<f64> = t.times[0].iter().map(|o| o.end).collect();
    assert!(close(ends[0], 1e-3) && close(ends[1], 3e-3) && close(ends[2], 6e-3), "{ends:?}");
    assert!(close(t.times[0][2].start, 3e-3));
}

#[test]
fn host_work_hides_behind_queued_gpu_work_unless_it_waits_for_the_stream() {
    // A 1 ms GEMM, then a layout whose host part takes 0.5 ms and whose kernel 0.1 ms. Run
    // ahead (a host copy of the routing table): the host is done at 0.5 ms, the layout
    // starts when the GEMM ends, 1.1 ms in all. Waiting for the stream first (a
    // synchronising copy): the host work starts at 1 ms and the stream idles through it.
    let p = simple_profile(8, 8);
    let layout = |sync: bool| SimOp { host: HostWork { seconds: 0.5e-3, sync }, ..compute(0.1e-3, &[0]) };
    for (sync, start, end) in [(false, 1.0e-3, 1.1e-3), (true, 1.0e-3, 1.6e-3)] {
        let ops = vec![compute(1e-3, &[]), layout(sync)];
        let input = SimInput { ranks: vec![SimRankInput { rank: 0, ops }], groups: vec![], profile: &p, coupling: Coupling::Full };
        let t = engine::simulate(&input).expect("simulates");
        assert!(close(t.times[0][1].start, start) && close(t.times[0][1].end, end), "sync {sync}: {:?}", t.times[0][1]);
        assert!(close(t.makespan, end), "sync {sync}: {}", t.makespan);
    }
    // A host that falls behind delays the launch: after a 0.1 ms kernel the stream waits for
    // the host until 0.5 ms; the host's work adds up over ops that do not wait.
    let ops = vec![compute(0.1e-3, &[]), layout(false), layout(false)];
    let input = SimInput { ranks: vec![SimRankInput { rank: 0, ops }], groups: vec![], profile: &p, coupling: Coupling::Full };
    let t = engine::simulate(&input).expect("simulates");
    assert!(close(t.times[0][1].start, 0.5e-3) && close(t.times[0][2].start, 1.0e-3), "{:?}", t.times[0]);
    assert!(close(t.makespan, 1.1e-3), "{}", t.makespan);
}

#[test]
fn ops_on_one_stream_run_in_order_even_without_dependencies() {
    let p = simple_profile(8, 8);
    let ops = vec![compute(1e-3, &[]), compute(1e-3, &[])];
    let input = SimInput { ranks: vec![SimRankInput { rank: 0, ops }], groups: vec![], profile: &p, coupling: Coupling::Full };
    let t = engine::simulate(&input).expect("simulates");
    assert!(close(t.makespan, 2e-3), "{}", t.makespan);
}

/// Two ranks on one node: a 10 ms GEMM on the compute stream and an independent all-reduce
/// of 0.5 GB (0.5 GB on the wire per member at 100 GB/s: 5 ms) on the comm stream.
fn overlap_input(p: &Profile, comm_waits_for_compute: bool) -> SimInput<'_> {
    let deps: &[u32] = if comm_waits_for_compute { &[0] } else { &[] };
    let ranks = (0..2).map(|r| SimRankInput { rank: r, ops: vec![compute(10e-3, &[]), all_reduce(0, 0.5e9, deps)] }).collect();
    SimInput { ranks, groups: vec![vec![0, 1]], profile: p, coupling: Coupling::Full }
}

#[test]
fn independent_compute_and_communication_overlap_perfectly() {
    let p = simple_profile(8, 8);
    assert!(close(engine::alone_seconds(&p, &[0, 1], CollectiveKind::AllReduce, 0.5e9), 5e-3));
    let t = engine::simulate(&overlap_input(&p, false)).expect("simulates");
    assert!(close(t.makespan, 10e-3), "overlapped: {}", t.makespan);
    assert!(close(t.times[0][1].start, 0.0) && close(t.times[0][1].end, 5e-3));
    let serial = engine::simulate(&overlap_input(&p, true)).expect("simulates");
    assert!(close(serial.makespan, 15e-3), "serialised by the dependency: {}", serial.makespan);
}

#[test]
fn a_collective_launched_beside_a_running_gemm_transfers_only_once_the_gemm_ends() {
    // Two ranks: a 10 ms GEMM on the compute stream; on the comm stream a 1 ms kernel, then a
    // 5 ms all-reduce. Launched at 1 ms, the all-reduce gets the GPU when the GEMM ends (10
    // ms) and ends at 15 ms, its op spanning 1-15 ms as in a trace. A collective launched
    // at the instant a GEMM begins comes first and overlaps it; a group of one waits for
    // nothing.
    let p = simple_profile(8, 8);
    let comm_kernel = |secs: f64| SimOp { stream: Stream::Comm, ..compute(secs, &[]) };
    let run = |ops: Vec<SimOp>, groups: Vec<Vec<u32>>, world: u32| {
        let ranks = (0..world).map(|r| SimRankInput { rank: r, ops: ops.clone() }).collect();
        engine::simulate(&SimInput { ranks, groups, profile: &p, coupling: Coupling::Full }).expect("simulates")
    };
    let t = run(vec![compute(10e-3, &[]), comm_kernel(1e-3), all_reduce(0, 0.5e9, &[1])], vec![vec![0, 1]], 2);
    for r in 0..2 {
        assert!(close(t.times[r][2].start, 1e-3) && close(t.times[r][2].end, 15e-3), "rank {r}: {:?}", t.times[r][2]);
    }
    assert!(close(t.makespan, 15e-3), "{}", t.makespan);
    // Launched at 10 ms, when the first GEMM ends and a second begins: 10-15 ms, beside it.
    let t = run(vec![compute(10e-3, &[]), compute(10e-3, &[0]), comm_kernel(10e-3), all_reduce(0, 0.5e9, &[2])], vec![vec![0, 1]], 2);
    assert!(close(t.times[0][3].end, 15e-3) && close(t.makespan, 20e-3), "{:?} {}", t.times[0][3], t.makespan);
    // A group of one: nothing crosses a link, so nothing waits for the GEMM.
    let t = run(vec![compute(10e-3, &[]), comm_kernel(1e-3), all_reduce(0, 0.5e9, &[1])], vec![vec![0]], 1);
    assert!(close(t.times[0][2].end, 1e-3), "{:?}", t.times[0][2]);
}

/// What the rule above rests on, as measured by `moelab calibrate`'s beside-GEMM probe
/// (`docs/device-runs/calibration/*-beside-gemm.json`, 1x H100 and 1x H200, 2026-11-24): an
/// NCCL all-to-all launched 300 us into a running cuBLAS GEMM on a lower-priority stream ends
/// with the GEMM, within 50 us, though alone it takes about 30 us; launched first it runs at
/// its own speed and leaves the GEMM's time as it was.
#[test]
fn the_stored_probes_show_a_collective_launched_beside_a_gemm_ending_with_it() {
    let dir = format!("{}/docs/device-runs/calibration", env!("CARGO_MANIFEST_DIR"));
    let mut files: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).filter(|p| p.to_string_lossy().ends_with("-beside-gemm.json")).collect();
    files.sort();
    assert_eq!(files.len(), 2, "{files:?}");
    for f in &files {
        let doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(f).unwrap()).unwrap();
        let cal: sim::calibration::Calibration = serde_json::from_value(doc["calibration"].clone()).unwrap();
        assert_eq!(cal.beside_gemm.len(), 2, "{f:?}");
        for m in &cal.beside_gemm {
            assert!(m.late_end_after_gemm_us.abs() < 50.0 && m.a2a_late_us > 10.0 * m.a2a_alone_us, "{f:?}: {m:?}");
            assert!((m.offset_us + m.a2a_late_us - m.gemm_us).abs() < 100.0, "{f:?}: {m:?}");
            assert!(m.a2a_first_us < 2.0 * m.a2a_alone_us && m.gemm_with_a2a_us < 1.05 * m.gemm_us, "{f:?}: {m:?}");
        }
    }
}

/// The zero-rows probes of session 14 (H200 09:50, H100 09:52 UTC; 150 ms lead and 100 ms
/// windows per kept share): every pass of every layer runs faster over zero rows than over
/// whole ones, and refitting them gives the shipped profiles' `kernels.zero_row_gain`. The
/// first probes' files (08:22/08:25 UTC, forward only, single timed calls one kept share
/// after another) still read, as forward passes.
#[test]
fn the_stored_zero_rows_probes_give_the_profiles_zero_row_gains() {
    let dir = format!("{}/docs/device-runs/calibration", env!("CARGO_MANIFEST_DIR"));
    let read = |f: &str| -> sim::calibration::Calibration {
        let doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(format!("{dir}/{f}")).unwrap()).unwrap();
        serde_json::from_value(doc["calibration"].clone()).unwrap()
    };
    for (file, profile) in [("calibration-h200-20261124-0950-zero-rows.json", "h200"), ("calibration-h100-20261124-0952-zero-rows.json", "h100")] {
        let cal = read(file);
        assert_eq!(cal.zero_rows.len(), 36, "{file}");
        for m in cal.zero_rows.iter().filter(|m| m.kept == 0.0) {
            let whole = cal.zero_rows.iter().find(|w| w.kept == 1.0 && (w.pass, w.experts, w.rows, w.d_in) == (m.pass, m.experts, m.rows, m.d_in)).unwrap();
            assert!(m.tflops > 1.05 * whole.tflops, "{file}: {m:?} vs {whole:?}");
        }
        let fitted = sim::calibration::zero_row_gain(&cal.zero_rows).expect("fitted");
        let shipped = sim::profile::resolve(profile).unwrap().gpu.kernels.zero_row_gain;
        for pass in sim::profile::GemmPass::ALL {
            let (f, s) = (fitted.of(pass), shipped.of(pass));
            assert!((f - s).abs() < 1e-4 && (0.1..0.3).contains(&s), "{profile} {pass:?}: fitted {f}, shipped {s}");
        }
    }
    let first = read("calibration-h200-20261124-0825-zero-rows.json");
    assert!(first.zero_rows.len() == 8 && first.zero_rows.iter().all(|m| m.pass == sim::profile::GemmPass::Forward), "{:?}", first.zero_rows);
    assert_eq!((first.zero_rows[0].experts, first.zero_rows[0].rows, first.zero_rows[0].d_in, first.zero_rows[0].d_out), (4, 1280, 14336, 4096));
}

/// The host-copy probe (H200, 2026-11-24 10:54 UTC): while another host thread sits in a
/// pageable download behind queued GEMMs, a pageable download on an idle stream waits for it
/// (milliseconds), a pinned one, a launch and either upload do not: why the cuda executor
/// stages its downloads in pinned memory (`backend::cuda::pinned`).
#[test]
fn the_stored_host_copy_probe_shows_pageable_downloads_waiting_for_another_threads() {
    let f = format!("{}/docs/device-runs/calibration/calibration-h200-20261124-1054-host-copy.json", env!("CARGO_MANIFEST_DIR"));
    let doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(f).unwrap()).unwrap();
    let cal: sim::calibration::Calibration = serde_json::from_value(doc["calibration"].clone()).unwrap();
    use sim::calibration::HostCall;
    assert_eq!(cal.host_copies.len(), HostCall::ALL.len());
    for m in &cal.host_copies {
        assert!(m.other_blocked_us > 3000.0 && m.alone_us < 100.0, "{m:?}");
        if m.call == HostCall::PageableDownload {
            assert!(m.blocked_us > 0.8 * m.other_blocked_us - 1000.0 && m.blocked_us > 3000.0, "{m:?}");
        } else {
            assert!(m.blocked_us < 100.0, "{m:?}");
        }
    }
}

#[test]
fn a_collective_waits_for_its_slowest_member_and_ends_together() {
    let p = simple_profile(8, 8);
    let ranks = vec![
        SimRankInput { rank: 0, ops: vec![compute(1e-3, &[]), all_reduce(0, 0.5e9, &[0])] },
        SimRankInput { rank: 1, ops: vec![compute(4e-3, &[]), all_reduce(0, 0.5e9, &[0])] },
    ];
    let t = engine::simulate(&SimInput { ranks, groups: vec![vec![0, 1]], profile: &p, coupling: Coupling::Full }).expect("simulates");
    // Rank 0 reaches the all-reduce at 1 ms and waits inside it; both end at 4 + 5 ms.
    assert!(close(t.times[0][1].start, 1e-3), "{:?}", t.times[0][1]);
    assert!(close(t.times[1][1].start, 4e-3));
    assert!(close(t.times[0][1].end, 9e-3) && close(t.times[1][1].end, 9e-3), "{:?} {:?}", t.times[0][1], t.times[1][1]);
}

#[test]
fn a_collective_runs_at_the_largest_payload_its_members_bring() {
    // A dropless all-to-all's busier rank receives more rows: every member's transfer lasts
    // as long as the largest payload's (0.8 GB at 100 GB/s), whichever arrives last.
    let p = simple_profile(8, 8);
    for (first, second) in [(0.8e9, 0.4e9), (0.4e9, 0.8e9)] {
        let ranks = vec![
            SimRankInput { rank: 0, ops: vec![compute(1e-3, &[]), all_reduce(0, first, &[0])] },
            SimRankInput { rank: 1, ops: vec![compute(2e-3, &[]), all_reduce(0, second, &[0])] },
        ];
        let alone = engine::alone_seconds(&p, &[0, 1], CollectiveKind::AllReduce, 0.8e9);
        let t = engine::simulate(&SimInput { ranks, groups: vec![vec![0, 1]], profile: &p, coupling: Coupling::Full }).expect("simulates");
        assert!(close(t.times[0][1].end, 2e-3 + alone) && close(t.times[1][1].end, 2e-3 + alone), "{first} {second}: {:?} {:?}", t.times[0][1], t.times[1][1]);
    }
}

/// Four ranks on two nodes of two GPUs; groups {0, 2} and {1, 3} each span both nodes.
/// Each all-reduce of 0.1 GB puts 0.1 GB per member through the member's NIC (10 GB/s).
fn contention_input(p: &Profile, both: bool) -> SimInput<'_> {
    let ranks = (0..4u32)
        .filter(|r| both || r % 2 == 0)
        .map(|r| SimRankInput { rank: r, ops: vec![all_reduce(r % 2, 0.1e9, &[])] })
        .collect();
    SimInput { ranks, groups: vec![vec![0, 2], vec![1, 3]], profile: p, coupling: Coupling::Full }
}

#[test]
fn two_collectives_sharing_a_link_each_take_longer_than_one_alone() {
    let shared = simple_profile(2, 1);
    let one = engine::simulate(&contention_input(&shared, false)).expect("simulates");
    assert!(close(one.makespan, 10e-3), "alone: {}", one.makespan);
    let two = engine::simulate(&contention_input(&shared, true)).expect("simulates");
    assert!(close(two.makespan, 20e-3), "sharing one NIC per node: {}", two.makespan);
    // With a NIC per GPU nothing is shared.
    let own = simple_profile(2, 2);
    let apart = engine::simulate(&contention_input(&own, true)).expect("simulates");
    assert!(close(apart.makespan, 10e-3), "one NIC each: {}", apart.makespan);
}

#[test]
fn a_flow_speeds_up_when_the_flow_sharing_its_link_finishes() {
    // Group {1, 3} moves half as much: both share the NICs until it is done (at 10 ms, having
    // moved 0.05 GB at 5 GB/s), then {0, 2} has the NIC alone for its remaining 0.05 GB (5 ms).
    let p = simple_profile(2, 1);
    let ranks = (0..4u32).map(|r| SimRankInput { rank: r, ops: vec![all_reduce(r % 2, if r % 2 == 0 { 0.1e9 } else { 0.05e9 }, &[])] }).collect();
    let t = engine::simulate(&SimInput { ranks, groups: vec![vec![0, 2], vec![1, 3]], profile: &p, coupling: Coupling::Full }).expect("simulates");
    assert!(close(t.times[1][0].end, 10e-3), "{:?}", t.times[1][0]);
    assert!(close(t.times[0][0].end, 15e-3), "{:?}", t.times[0][0]);
}

#[test]
fn symmetric_images_load_the_links_they_share() {
    // Rank 0 alone stands for the four ranks; the image group {1, 3} shares its NIC.
    let p = simple_profile(2, 1);
    let ranks = vec![SimRankInput { rank: 0, ops: vec![all_reduce(0, 0.1e9, &[])] }];
    let images = vec![vec![vec![vec![GroupId(0), GroupId(1)]]]];
    let t = engine::simulate(&SimInput { ranks, groups: vec![vec![0, 2], vec![1, 3]], profile: &p, coupling: Coupling::Symmetric { images } })
        .expect("simulates");
    assert!(close(t.makespan, 20e-3), "{}", t.makespan);
}

#[test]
fn a_collective_whose_members_never_arrive_is_reported_not_hung() {
    let p = simple_profile(8, 8);
    // Rank 1 calls the two groups in the opposite order: each waits for the other.
    let ranks = vec![
        SimRankInput { rank: 0, ops: vec![all_reduce(0, 1e6, &[]), all_reduce(1, 1e6, &[])] },
        SimRankInput { rank: 1, ops: vec![all_reduce(1, 1e6, &[]), all_reduce(0, 1e6, &[])] },
    ];
    let err = engine::simulate(&SimInput { ranks, groups: vec![vec![0, 1], vec![0, 1]], profile: &p, coupling: Coupling::Full }).unwrap_err();
    assert!(matches!(err, SimError::Stuck { .. }), "{err}");
}

fn field_of(text: &str) -> String {
    let err = profile::parse(text, "bad.toml").unwrap_err();
    err.field().unwrap_or_else(|| panic!("no field in {err}")).to_string()
}

#[test]
fn profile_errors_name_the_field() {
    let good = std::fs::read_to_string("profiles/h100-datasheet.toml").expect("profile file");
    assert!(profile::parse(&good, "h100.toml").is_ok());
    let bad_type = good.replace("hbm_tbps = 3.35", "hbm_tbps = \"fast\"");
    assert_eq!(field_of(&bad_type), "gpu.hbm_tbps");
    let negative = good.replacen("efficiency = 0.75", "efficiency = -1.0", 1);
    assert_eq!(field_of(&negative), "links.nvlink.all_to_all.efficiency");
    let no_link = good.replace("inter_node = \"infiniband\"", "inter_node = \"ethernet\"");
    assert_eq!(field_of(&no_link), "topology.inter_node");
    let unknown = good.replace("sms = 132", "sms = 132\nsm_count = 132");
    let err = profile::parse(&unknown, "bad.toml").unwrap_err();
    assert!(err.to_string().contains("sm_count"), "{err}");
    assert_eq!(err.field(), Some("gpu.sm_count"));
    let impossible = good.replace("tflops = 774.7", "tflops = 2000.0");
    assert_eq!(field_of(&impossible), "gpu.gemm.bf16.points[0].tflops");
    let no_numbers = good.replace("efficiency = 0.85          # [ASSUME] SGEMM", "# SGEMM");
    assert_eq!(field_of(&no_numbers), "gpu.gemm.f32");
}

fn seed_text(name: &str) -> String {
    std::fs::read_to_string(format!("experiments/seeds/{name}.toml")).expect("seed file").replace("backend = \"auto\"", "backend = \"sim\"")
}

#[test]
fn sim_fields_are_checked_and_filled_by_spec_validation() {
    let text = seed_text("topk");
    let s = from_toml_str(&text).expect("valid");
    assert_eq!(s.run.profile.as_deref(), Some("h100"));
    assert_eq!((s.run.gpus_per_node, s.run.nodes), (Some(8), Some(1)));
    let problems = |t: &str| -> Vec<String> { spec::from_toml_str(t).unwrap_err().problems().iter().map(|p| p.field.clone()).collect() };
    let on_cpu = text.replace("backend = \"sim\"", "backend = \"cpu\"\nprofile = \"h200\"");
    assert_eq!(problems(&on_cpu), ["run.profile"]);
    let unknown = text.replace("backend = \"sim\"", "backend = \"sim\"\nprofile = \"b300\"");
    assert_eq!(problems(&unknown), ["run.profile"]);
    let small = text.replace("backend = \"sim\"", "backend = \"sim\"\ngpus_per_node = 1\nnodes = 2");
    let err = spec::from_toml_str(&small).unwrap_err();
    assert_eq!(err.problems()[0].field, "run.nodes", "{err}");
    assert!(err.problems()[0].fix.contains("nodes = 4"), "{err}");
    // Nodes the ranks do not reach would change nothing: refused, with the spreading fix.
    let idle = text.replace("backend = \"sim\"", "backend = \"sim\"\nnodes = 2");
    let err = spec::from_toml_str(&idle).unwrap_err();
    assert_eq!(err.problems()[0].field, "run.nodes", "{err}");
    assert!(err.problems()[0].fix.contains("nodes = 1") && err.problems()[0].fix.contains("gpus_per_node = 2"), "{err}");
    let zero = text.replace("backend = \"sim\"", "backend = \"sim\"\ngpus_per_node = 0");
    assert_eq!(problems(&zero), ["run.gpus_per_node"]);
    // The dropless imbalance: sim only, dropless plans only, at least 1.
    let dropless = std::fs::read_to_string("experiments/bench-sim/fine-grained-dropless.toml").expect("bench file");
    let with = |t: &str, line: &str| t.replace("backend = \"sim\"", &format!("backend = \"sim\"\n{line}"));
    assert_eq!(from_toml_str(&with(&dropless, "dropless_imbalance = 1.3")).expect("valid").run.dropless_imbalance, Some(1.3));
    assert_eq!(problems(&with(&dropless, "dropless_imbalance = 0.5")), ["run.dropless_imbalance"]);
    assert_eq!(problems(&with(&text, "dropless_imbalance = 1.3")), ["run.dropless_imbalance"]);
    let on_cpu = with(&dropless, "dropless_imbalance = 1.3").replace("backend = \"sim\"", "backend = \"cpu\"");
    assert_eq!(problems(&on_cpu), ["run.profile", "run.dropless_imbalance"]);
    // The kept share: sim only, capacity plans only, in (0, 1].
    assert_eq!(from_toml_str(&with(&text, "kept_share = 0.4")).expect("valid").run.kept_share, Some(0.4));
    for bad in ["kept_share = 0", "kept_share = 1.5", "kept_share = nan"] {
        assert_eq!(problems(&with(&text, bad)), ["run.kept_share"], "{bad}");
    }
    let err = spec::from_toml_str(&with(&dropless, "kept_share = 0.9")).unwrap_err();
    assert_eq!(err.problems()[0].field, "run.kept_share", "{err}");
    assert!(err.problems()[0].fix.contains("model.dropless = false"), "{err}");
    let on_cpu = with(&text, "kept_share = 0.9").replace("backend = \"sim\"", "backend = \"cpu\"");
    assert_eq!(problems(&on_cpu), ["run.kept_share"]);
    // The rank loads: sim only, one positive number per expert-parallel rank (dropless and
    // capacity plans).
    let ep2 = |t: &str| format!("{t}\n[layout]\nworld = 2\ndp = 1\ntp = 1\nep = 2\npp = 1\n");
    let dropless2 = ep2(&dropless);
    assert_eq!(from_toml_str(&with(&dropless2, "rank_loads = [1.1, 0.9]")).expect("valid").run.rank_loads, Some(vec![1.1, 0.9]));
    let err = spec::from_toml_str(&with(&dropless2, "rank_loads = [1.1, 0.9, 1.0]")).unwrap_err();
    assert_eq!(err.problems()[0].field, "run.rank_loads", "{err}");
    assert!(err.problems()[0].message.contains("layout.ep=2"), "{err}");
    assert_eq!(problems(&with(&dropless2, "rank_loads = [1.1, 0.0]")), ["run.rank_loads"]);
    let capacity2 = ep2(&std::fs::read_to_string("experiments/bench-sim/fine-grained-cf125.toml").expect("bench file"));
    assert_eq!(from_toml_str(&with(&capacity2, "rank_loads = [1.1, 0.9]")).expect("valid").run.rank_loads, Some(vec![1.1, 0.9]));
    assert_eq!(problems(&with(&capacity2, "rank_loads = [1.1]")), ["run.rank_loads"]);
    let on_cpu = with(&dropless2, "rank_loads = [1.1, 0.9]").replace("backend = \"sim\"", "backend = \"cpu\"");
    assert!(problems(&on_cpu).contains(&"run.rank_loads".to_string()), "{:?}", problems(&on_cpu));
    // Tutel's 2D all-to-all groups by tutel.gpus_per_node: a group larger than the node is
    // refused, naming the node size; a divisor of it is a choice.
    let tutel = seed_text("tutel").replace("a2a = \"flat\"", "a2a = \"2d\"\ngpus_per_node = 4");
    let err = spec::from_toml_str(&with(&tutel, "gpus_per_node = 2")).unwrap_err();
    assert_eq!(err.problems()[0].field, "tutel.gpus_per_node", "{err}");
    assert!(err.problems()[0].message.contains("run.gpus_per_node=2") && err.problems()[0].fix.contains("tutel.gpus_per_node = 2"), "{err}");
    assert_eq!(from_toml_str(&with(&tutel, "gpus_per_node = 8")).expect("valid").run.gpus_per_node, Some(8));
    assert_eq!(from_toml_str(&tutel).expect("valid").run.gpus_per_node, Some(4), "the node size from [tutel]");
    // The executor's host copies: sim only.
    assert_eq!(from_toml_str(&with(&text, "host_copies = false")).expect("valid").run.host_copies, Some(false));
    let on_cpu = with(&text, "host_copies = true").replace("backend = \"sim\"", "backend = \"cpu\"");
    assert_eq!(problems(&on_cpu), ["run.host_copies"]);
}

#[test]
fn with_host_copies_only_the_first_reader_of_a_routing_table_waits_for_the_stream() {
    // MPMoE's chunk layouts read the routing table again and again: an executor that keeps
    // its host copy waits for the stream once per table, the earlier executor at every read.
    let text = std::fs::read_to_string("experiments/bench-sim/mixtral-ish-cf125.toml").expect("bench file").replace("variant = \"topk\"", "variant = \"mpmoe\"") + "\n[mpmoe]\nchunks = 4\n";
    let run = |copies: bool| {
        let s = from_toml_str(&text.replace("backend = \"sim\"", &format!("backend = \"sim\"\nhost_copies = {copies}"))).expect("valid");
        let plan = Plan::build(&s).expect("plans");
        let out = sim::simulate_plan(&plan, &sim::spec_profile(&s).expect("profile"), Symmetry::Exploit).expect("simulates");
        let rp = &plan.ranks[0];
        let layout_ms: f64 = rp.ops.iter().enumerate().filter(|(_, o)| o.stage == moelab::taxonomy::Stage::Permute).map(|(i, _)| {
            let t = out.timeline.times[0][i];
            t.end - t.start
        }).sum::<f64>() * 1e3;
        (out.timeline.makespan, layout_ms)
    };
    let (every, every_layout) = run(false);
    let (once, once_layout) = run(true);
    // Forward and backward, four chunks of four layout ops each: 32 reads of the table, 2 of
    // them first reads; each synchronising read costs a round trip and its host work.
    assert!(once < every, "host copies: {once} s vs {every} s");
    assert!(once_layout < 0.8 * every_layout, "layout ops {once_layout} ms vs {every_layout} ms");
}

/// A bench plan at ep = 2 with `extra` in its `[run]` on the sim: whether it was simulated
/// symmetrically, the step, and L0's first expert GEMM and return all-to-all on each rank.
fn ep2_spans(bench: &str, extra: &str) -> (bool, f64, [f64; 2], [engine::OpTime; 2]) {
    let text = std::fs::read_to_string(format!("experiments/bench-sim/{bench}.toml")).expect("bench file") + "\n[layout]\nworld = 2\ndp = 1\ntp = 1\nep = 2\npp = 1\n";
    let s = from_toml_str(&text.replace("backend = \"sim\"", &format!("backend = \"sim\"\n{extra}"))).expect("valid");
    let plan = Plan::build(&s).expect("plans");
    let out = sim::simulate_plan(&plan, &sim::spec_profile(&s).expect("profile"), Symmetry::Exploit).expect("simulates");
    let span = |rank: usize, name: &str| {
        let i = plan.ranks[rank].ops.iter().position(|o| o.name == name).unwrap_or_else(|| panic!("{name}"));
        out.timeline.times[if out.symmetric { 0 } else { rank }][i]
    };
    let gemm = |r| { let t = span(r, "L0.expert_gemm1"); t.end - t.start };
    (out.symmetric, out.timeline.makespan, [gemm(0), gemm(1)], [span(0, "L0.combine_a2a"), span(1, "L0.combine_a2a")])
}

#[test]
fn the_busier_expert_parallel_rank_sets_the_step_and_the_other_waits_for_it() {
    // Dropless at ep = 2: the rank whose experts took 20% more rows runs longer expert GEMMs;
    // the all-to-all after them runs at its payload on both ranks, the other rank waiting.
    let run = |loads: &str| {
        let (symmetric, step, [g0, g1], [b0, b1]) = ep2_spans("mixtral-ish-dropless", loads);
        (symmetric, step, g0, g1, b0, b1)
    };
    let balanced = run("");
    let (symmetric, step, busy, idle, back0, back1) = run("rank_loads = [1.2, 0.8]");
    assert!(balanced.0 && !symmetric, "unequal loads simulate every rank");
    // Rows 1.2 : 0.8 of the mean (the GEMMs' efficiency and launches do not scale).
    assert!(busy > 1.1 * balanced.2 && idle < 0.95 * balanced.3 && busy > 1.25 * idle, "{busy} {idle} vs {}", balanced.2);
    assert!(step > balanced.1, "{step} vs {}", balanced.1);
    // Both ranks leave the return all-to-all together; the idle rank entered it earlier.
    assert!(close(back0.end, back1.end), "{back0:?} {back1:?}");
    assert!(back1.end - back1.start > back0.end - back0.start, "{back0:?} {back1:?}");
    // The busier rank's payload: the transfer is longer than at balance.
    assert!(back0.end - back0.start > balanced.4.end - balanced.4.start, "{back0:?} vs {:?}", balanced.4);
}

#[test]
fn in_a_capacity_plan_the_rank_whose_experts_took_more_rows_runs_slower_expert_gemms() {
    // Capacity blocks are as long on every rank, but the rank whose experts took 1.6x the
    // mean kept rows has fewer zero rows, so its bf16 expert GEMMs run closer to whole-rows
    // speed (`kernels.zero_row_gain`); the other rank waits for it in the next all-to-all.
    let run = |loads: &str| {
        let (symmetric, step, [g0, g1], [b0, b1]) = ep2_spans("mixtral-ish-cf125", &format!("kept_share = 0.5\n{loads}"));
        (symmetric, step, g0, g1, b0.end - b0.start, b1.end - b1.start)
    };
    let balanced = run("");
    let (symmetric, step, busy, idle, back0, back1) = run("rank_loads = [1.6, 0.4]");
    assert!(balanced.0 && !symmetric, "unequal loads simulate every rank");
    // Zero rows 1 - 0.5 x 0.8 x load: 0.36 on the busy rank, 0.84 on the other, 0.6 at balance.
    let g = sim::profile::resolve("h200").unwrap().gpu.kernels.zero_row_gain.forward;
    let speed = |z: f64| 1.0 + g * z;
    assert!((busy / balanced.2 - speed(0.6) / speed(0.36)).abs() < 0.01, "{busy} vs {}", balanced.2);
    assert!((idle / balanced.3 - speed(0.6) / speed(0.84)).abs() < 0.01, "{idle} vs {}", balanced.3);
    assert!(step > balanced.1, "{step} vs {}", balanced.1);
    // The faster rank enters the return all-to-all first and waits there.
    assert!(back1 > back0 + 0.5 * (busy - idle), "{back0} {back1} ({busy} {idle})");
}

#[test]
fn a_capacity_plans_all_to_alls_carry_the_kept_rows_not_the_padded_blocks() {
    // The executors exchange the real counts: the return all-to-all carries what the dispatch
    // delivered, not the capacity blocks (1.25 x the token rows here, 2.5 x at dp = 2, where
    // each replica's blocks hold the whole capacity), dropped rows are not sent, and a rank
    // whose experts took more rows than it sent receives more.
    let a2a = |layout: &str, extra: &str| {
        let text = std::fs::read_to_string("experiments/bench-sim/mixtral-ish-cf125.toml").expect("bench file") + &format!("\n[layout]\n{layout}\n");
        let s = from_toml_str(&text.replace("backend = \"sim\"", &format!("backend = \"sim\"\n{extra}"))).expect("valid");
        let plan = Plan::build(&s).expect("plans");
        let out = sim::simulate_plan(&plan, &sim::spec_profile(&s).expect("profile"), Symmetry::Exploit).expect("simulates");
        let span = |name: &str| {
            let i = plan.ranks[0].ops.iter().position(|o| o.name == name).unwrap_or_else(|| panic!("{name}"));
            // Both members arrive together at balance; with loads, the span holds the wait.
            let t = out.timeline.times[0][i];
            t.end - t.start
        };
        (span("L0.dispatch_a2a"), span("L0.combine_a2a"))
    };
    let (dispatch, combine) = a2a("ep = 2", "");
    assert!((combine / dispatch - 1.0).abs() < 0.02, "dispatch {dispatch} s, combine {combine} s");
    let (dispatch_dp2, combine_dp2) = a2a("ep = 2\ndp = 2", "");
    assert!((dispatch_dp2 / dispatch - 1.0).abs() < 0.05 && (combine_dp2 / combine - 1.0).abs() < 0.05, "dp 2: {dispatch_dp2} {combine_dp2} vs {dispatch} {combine}");
    let (half, _) = a2a("ep = 2", "kept_share = 0.5");
    assert!(half < 0.7 * dispatch && half > 0.4 * dispatch, "kept 0.5: {half} vs {dispatch}");
    // Rank 0's experts took 1.6 x the mean rows, but its blocks hold at most 1.25 x (the
    // capacity factor): the exchange carries that much, not more.
    let (busy, busy_back) = a2a("ep = 2", "rank_loads = [1.6, 0.4]");
    assert!(busy > 1.15 * dispatch && busy < 1.3 * dispatch && busy_back > 1.15 * combine && busy_back < 1.3 * combine, "loads 1.6/0.4: {busy} {busy_back} vs {dispatch} {combine}");
}

#[test]
fn dropped_assignments_shorten_the_routed_row_ops_and_the_expert_gemms_only() {
    // A capacity plan that dropped assignments reads only the kept rows in its dispatch,
    // expert layouts and combine (their outputs are written whole), and its expert GEMMs run
    // faster over the zero rows of the capacity blocks (0.2 of them at kept 1, 1 - 0.3 x 0.8
    // = 0.76 at kept 0.3; `kernels.zero_row_gain`); attention, dense GEMMs and the router are
    // unaffected.
    let text = std::fs::read_to_string("experiments/bench-sim/mixtral-ish-cf125.toml").expect("bench file");
    let times = |kept: f64| {
        let s = from_toml_str(&text.replace("backend = \"sim\"", &format!("backend = \"sim\"\nkept_share = {kept}"))).expect("valid");
        let plan = Plan::build(&s).expect("plans");
        let out = sim::simulate_plan(&plan, &sim::spec_profile(&s).expect("profile"), Symmetry::Exploit).expect("simulates");
        let rp = &plan.ranks[0];
        assert!((sim::expected_zero_rows(&s, rp) - (1.0 - 0.8 * kept)).abs() < 1e-9);
        let ops: Vec<(String, f64)> = rp.ops.iter().zip(&out.timeline.times[0]).map(|(o, t)| (o.name.clone(), t.end - t.start)).collect();
        (ops, out.timeline.makespan)
    };
    let ((all, all_step), (third, third_step)) = (times(1.0), times(0.3));
    let gain = sim::profile::resolve("h200").unwrap().gpu.kernels.zero_row_gain;
    let routed = ["dispatch", "expert_layout", "expert_unlayout", "combine"];
    let is = |name: &str, ops: &[&str]| ops.iter().any(|r| name.strip_prefix("L0.").is_some_and(|n| n.starts_with(r)));
    for ((name, a), (_, t)) in all.iter().zip(&third) {
        if is(name, &routed) {
            // 0.4 of the bytes scale: 1 - 0.4 * 0.7 = 0.72 of the memory time, less where
            // launches and host round trips stay.
            assert!(*t < 0.85 * a && *t > 0.7 * a, "{name}: {a} -> {t}");
        } else if is(name, &["expert_gemm"]) {
            // The math at (1 + g x 0.2) / (1 + g x 0.76) of its time, g the passes' gains.
            let (lo, hi) = (gain.forward.min(gain.input_grad).min(gain.weight_grad), gain.forward.max(gain.input_grad).max(gain.weight_grad));
            let ratio = t / a;
            let at = |g: f64| (1.0 + 0.2 * g) / (1.0 + 0.76 * g);
            assert!(ratio > at(hi) - 0.01 && ratio < at(lo) + 0.02 && ratio < 0.95, "{name}: {a} -> {t}");
        } else {
            assert!(close(*t, *a), "{name}: {a} -> {t}");
        }
    }
    assert!(third_step < all_step, "{all_step} -> {third_step}");
    assert_eq!(all.iter().filter(|(n, _)| is(n, &routed)).count(), 8, "forward and backward of each routed-row op");
    assert_eq!(all.iter().filter(|(n, _)| is(n, &["expert_gemm"])).count(), 4, "forward and backward of each expert GEMM");
}

#[test]
fn a_dropless_imbalance_lengthens_the_passes_over_whole_expert_blocks_only() {
    // Every expert block is as long as the fullest expert: the activation between the expert
    // GEMMs runs over all of it, and so do batched expert GEMMs (fine-grained's 64 small
    // experts); per-expert GEMMs (small-tokens' 8 large ones) run over each expert's rows,
    // padded by half a row bucket on average once loads are uneven, after zeroing the block.
    let times = |file: &str, imbalance: f64| {
        let text = std::fs::read_to_string(format!("experiments/bench-sim/{file}.toml")).expect("bench file");
        let s = from_toml_str(&text.replace("backend = \"sim\"", &format!("backend = \"sim\"\ndropless_imbalance = {imbalance}"))).expect("valid");
        let plan = Plan::build(&s).expect("plans");
        let out = sim::simulate_plan(&plan, &sim::spec_profile(&s).expect("profile"), Symmetry::Exploit).expect("simulates");
        let rp = &plan.ranks[0];
        let of = |name: &str| {
            let i = rp.ops.iter().position(|o| o.name == name).unwrap_or_else(|| panic!("{name}"));
            let t = out.timeline.times[0][i];
            t.end - t.start
        };
        (of("L0.expert_act"), of("L0.expert_act_bwd"), of("L0.expert_gemm1"), of("L0.expert_gemm2_bwd"))
    };
    let (balanced, skewed) = (times("small-tokens-dropless", 1.0), times("small-tokens-dropless", 1.5));
    // The activation's bytes grow 1.5x (its launch does not).
    for (b, s) in [(balanced.0, skewed.0), (balanced.1, skewed.1)] {
        assert!(s > 1.4 * b && s <= 1.5 * b, "{balanced:?} {skewed:?}");
    }
    for (b, s) in [(balanced.2, skewed.2), (balanced.3, skewed.3)] {
        assert!(s > 1.02 * b && s < 1.2 * b, "{balanced:?} {skewed:?}");
    }
    let (balanced, skewed) = (times("fine-grained-dropless", 1.0), times("fine-grained-dropless", 1.5));
    assert!(skewed.2 > 1.3 * balanced.2 && skewed.3 > 1.3 * balanced.3, "{balanced:?} {skewed:?}");
}

#[test]
fn the_representative_rank_predicts_what_simulating_every_rank_does() {
    for seed in ["topk", "scmoe", "dgmoe", "mpmoe", "ted", "ppmoe"] {
        let s = from_toml_str(&seed_text(seed)).expect("valid");
        let plan = Plan::build(&s).expect("plans");
        let p = sim::spec_profile(&s).expect("profile");
        let full = sim::simulate_plan(&plan, &p, Symmetry::Ignore).expect("full simulation");
        let reduced = sim::simulate_plan(&plan, &p, Symmetry::Exploit).expect("reduced simulation");
        assert_eq!(full.simulated.len(), plan.world(), "{seed}");
        if reduced.symmetric {
            assert_eq!(reduced.simulated, [0], "{seed}");
        }
        let rel = (full.timeline.makespan - reduced.timeline.makespan).abs() / full.timeline.makespan;
        assert!(rel < 1e-9, "{seed}: full {} vs reduced {}", full.timeline.makespan, reduced.timeline.makespan);
        assert!(full.timeline.makespan > 0.0);
    }
}

#[test]
fn a_faster_link_or_gpu_shortens_the_predicted_step() {
    let s = from_toml_str(&seed_text("topk")).expect("valid");
    let plan = Plan::build(&s).expect("plans");
    // The datasheet profiles: same compute peak, faster HBM on the H200.
    let h100 = profile::resolve("h100-datasheet").expect("h100").with_cluster(8, 1);
    let h100 = sim::simulate_plan(&plan, &h100, Symmetry::Exploit).expect("simulates");
    let h200 = profile::resolve("h200-datasheet").expect("h200").with_cluster(8, 1);
    let faster = sim::simulate_plan(&plan, &h200, Symmetry::Exploit).expect("simulates");
    // Same compute peak, faster HBM: the memory-bound ops of this small model speed up.
    assert!(faster.timeline.makespan < h100.timeline.makespan, "{} vs {}", faster.timeline.makespan, h100.timeline.makespan);
}

#[test]
fn a_seed_variant_runs_on_the_sim_and_its_trace_analyses_like_any_other() {
    let s = from_toml_str(&seed_text("scmoe")).expect("valid");
    let root = tempfile::tempdir().expect("tempdir");
    let out = run::run(&s, root.path(), &RunHooks::default()).expect("sim run completes");
    let a = &out.analysis;
    assert_eq!(a.backend, "sim");
    assert_eq!(a.world as usize, s.world());
    assert_eq!(a.steps as usize, s.run.steps);
    let labels: Vec<&str> = a.stages.iter().map(|r| r.label.as_str()).collect();
    for want in ["attention", "dense_mlp", "gate", "topk", "permute", "expert_gemm1", "act", "expert_gemm2", "combine", "loss",
        "all_to_all", "all_gather", "expert_gemm1_bwd", "all_to_all_bwd", "all_reduce_upd", "optimizer_upd"] {
        assert!(labels.contains(&want), "missing stage {want} in {labels:?}");
    }
    // ScMoE overlaps its all-to-alls with the dense branch; the sim must show some overlap.
    assert!(a.overall_overlap() > 0.0, "overlap {}", a.overall_overlap());
    assert!(a.step_time_ns > 0.0);
    // Memory comes from the plan: the replayed peak is at most the plan's issue-order bound
    // plus what overlap keeps alive, and at least the persistent state.
    let persistent: u64 = out.predicted.iter().map(|p| p.at_peak[0] + p.at_peak[1] + p.at_peak[2]).max().unwrap_or(0);
    assert!(a.memory.max_peak() >= persistent && a.memory.max_peak() > 0);
    assert_eq!(out.tracked.len(), s.world());
    for f in ["trace.json", "summary.json", "stages.csv", "spec.toml", "run.log"] {
        assert!(out.dir.join(f).exists(), "{f} missing");
    }
    let summary = std::fs::read_to_string(out.dir.join("summary.json")).expect("summary");
    assert!(summary.contains("\"backend\": \"sim\""), "{summary}");
}

#[test]
fn the_sim_2048_experiment_is_valid_with_its_cluster() {
    let s = spec::load_file(std::path::Path::new("experiments/sim-2048.toml")).expect("valid");
    assert_eq!(s.world(), 2048);
    assert_eq!((s.run.gpus_per_node, s.run.nodes), (Some(8), Some(256)));
}

#[test]
fn a_two_phase_all_to_all_runs_its_phases_in_order() {
    // Tutel's 2D all-to-all on 2 nodes x 2 GPUs: within the node ({0, 1}, {2, 3}: 0.05 GB
    // per member over NVLink at 100 GB/s = 0.5 ms), then across nodes ({0, 2}, {1, 3}:
    // 0.05 GB per member through the NIC at 10 GB/s = 5 ms, or 10 ms when two GPUs share it).
    let two_d = |r: u32| SimOp {
        stream: Stream::Comm,
        deps: vec![],
        cost: Cost::Collective(vec![
            CollectivePart { group: GroupId(r / 2), kind: CollectiveKind::AllToAll, bytes: 0.1e9, host_s: 0.0 },
            CollectivePart { group: GroupId(2 + r % 2), kind: CollectiveKind::AllToAll, bytes: 0.1e9, host_s: 0.0 },
        ]),
        host: HostWork::default(),
        kernels: 1,
    };
    let groups = vec![vec![0, 1], vec![2, 3], vec![0, 2], vec![1, 3]];
    for (nics, want) in [(2, 5.5e-3), (1, 10.5e-3)] {
        let p = simple_profile(2, nics);
        let ranks = (0..4).map(|r| SimRankInput { rank: r, ops: vec![two_d(r)] }).collect();
        let t = engine::simulate(&SimInput { ranks, groups: groups.clone(), profile: &p, coupling: Coupling::Full }).expect("simulates");
        assert!(close(t.makespan, want), "{nics} NIC(s) per node: {}", t.makespan);
    }
}

#[test]
fn a_serial_plan_on_the_sim_peaks_exactly_where_the_plan_predicts() {
    // topk issues every op after the previous one, so replaying the simulated times gives
    // the plan's issue-order prediction exactly.
    let s = from_toml_str(&seed_text("topk")).expect("valid");
    let plan = Plan::build(&s).expect("plans");
    let predicted: Vec<u64> = plan.ranks.iter().map(|r| moelab::plan::memory::predict(r).peak_total).collect();
    let rt = sim::SimRuntime::new(plan, Default::default());
    let tracked: Vec<u64> = rt.tracked_peaks().iter().map(|t| t.0).collect();
    assert_eq!(tracked, predicted);
}

/// Regression: with seconds of simulated time, a flow whose remaining transfer time fell
/// below the clock's resolution re-armed its wake-up at the same instant forever (ScMoE and
/// Tutel at mixtral-ish size hung). Each must now finish, well within the bound.
#[test]
fn long_simulations_do_not_stall_on_clock_resolution() {
    for name in ["scmoe-ep4", "tutel-ep8", "tutel2d-ep8"] {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("experiments/scaling/{name}.toml"));
        let spec = moelab::spec::load_file(&path).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let tmp = tempfile::tempdir().unwrap();
            let r = moelab::run::run(&spec, tmp.path(), &moelab::run::RunHooks::default()).map(|o| o.analysis.step_time_ns);
            let _ = tx.send(r.map_err(|e| e.to_string()));
        });
        let step = rx.recv_timeout(std::time::Duration::from_secs(60)).unwrap_or_else(|_| panic!("{name}: the simulation did not finish in 60 s"));
        let step = step.unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(step > 0.0, "{name}: step time {step}");
    }
}

/// The calibrate kernel sweep's byte counts (`calibration::kernel_bytes`) are the plan's own
/// `op.bytes` for the ops of each class in a mixtral-ish layer, so a measured time becomes the
/// bandwidth share the sim divides those bytes by.
#[test]
fn the_kernel_sweep_counts_bytes_as_the_plan_does() {
    use moelab::backend::sim::calibration::{kernel_bytes, KERNEL_PARAMS};
    use moelab::backend::sim::cost::kernel_class;
    use moelab::backend::sim::profile::KernelClass;
    use moelab::plan::OpKind;
    let text = include_str!("../experiments/mixtral-ish/topk-1gpu.toml").replace("backend = \"cuda\"", "backend = \"sim\"");
    let plan = Plan::build(&from_toml_str(&text).expect("valid")).expect("plans");
    let rank = &plan.ranks[0];
    let op = |name: &str| rank.ops.iter().find(|o| o.name == name).unwrap_or_else(|| panic!("{name} planned"));
    for (name, class) in [
        ("L0.ln_attn", KernelClass::Layernorm),
        ("L0.ln_attn_bwd", KernelClass::LayernormBwd),
        ("L0.expert_act", KernelClass::Act),
        ("L0.expert_act_bwd", KernelClass::ActBwd),
        ("L0.expert_layout", KernelClass::Layout),
        ("L0.combine", KernelClass::Combine),
        ("L0.combine_bwd", KernelClass::CombineBwd),
        ("loss", KernelClass::Loss),
        ("load_batch", KernelClass::Data),
    ] {
        let o = op(name);
        assert_eq!(kernel_class(&o.kind), class, "{name}");
        assert_eq!(o.bytes as f64, kernel_bytes(class).expect("timed"), "{name}");
    }
    let adam = op("adam");
    assert_eq!(kernel_class(&adam.kind), KernelClass::Optimizer);
    let OpKind::Adam { params, .. } = &adam.kind else { panic!("adam") };
    let n: usize = params.iter().map(|(p, ..)| rank.buffer(*p).elems).sum();
    assert_eq!(adam.bytes as f64 / n as f64, kernel_bytes(KernelClass::Optimizer).expect("timed") / KERNEL_PARAMS as f64);
}

/// A Tutel layer (bf16, M 2048, H 4096, top-2 of E experts, 4,096 tokens per rank) on the
/// h100 profile at `ep` ranks of 8 per node, with `extra` TOML lines appended to the
/// `[tutel]` or `[model]` tables as given; the simulation of one step.
fn tutel_at_scale(ep: usize, a2a: &str, model_extra: &str) -> (Plan, sim::PlanSimulation) {
    let text = format!(
        "name = \"t\"\nvariant = \"tutel\"\n[model]\nd_model = 2048\nd_ffn = 4096\nn_experts = {ep}\ntop_k = 2\nn_layers = 1\nbatch = 4\nseq_len = 1024\ndtype = \"bf16\"\n{model_extra}\n\
         [layout]\nep = {ep}\n[tutel]\ndegree = 1\na2a = \"{a2a}\"\ngpus_per_node = 8\n[run]\nbackend = \"sim\"\nprofile = \"h100\"\ngpus_per_node = 8\nnodes = {}\nsteps = 1\nwarmup = 0\n",
        ep / 8
    );
    let s = from_toml_str(&text).expect("valid");
    let plan = Plan::build(&s).expect("plans");
    let out = sim::simulate_plan(&plan, &sim::spec_profile(&s).expect("profile"), Symmetry::Exploit).expect("simulates");
    (plan, out)
}

/// Seconds rank 0 (or its stand-in) spends in ops of `stage` in a simulated step.
fn stage_seconds(plan: &Plan, out: &sim::PlanSimulation, stage: moelab::taxonomy::Stage) -> f64 {
    let i = out.simulated.iter().position(|r| *r == 0).expect("rank 0 simulated");
    plan.ranks[0].ops.iter().zip(&out.timeline.times[i]).filter(|(o, _)| o.stage == stage).map(|(_, t)| t.end - t.start).sum()
}

#[test]
fn tutels_2d_all_to_all_beats_the_flat_one_across_many_nodes_and_prices_each_phase_once() {
    use moelab::taxonomy::Stage::AllToAll;
    // Each 2D phase carries the whole payload once (the plan counts both phases in the op's
    // bytes): over 32 nodes the inter-node phase has 32 peers instead of 256, so fewer, larger
    // messages; Tutel's reason for the 2D algorithm (arXiv 2206.03382).
    let (pf, flat) = tutel_at_scale(256, "flat", "capacity_factor = 1.25");
    let (p2, two) = tutel_at_scale(256, "2d", "capacity_factor = 1.25");
    let (f, t) = (stage_seconds(&pf, &flat, AllToAll), stage_seconds(&p2, &two, AllToAll));
    assert!(t < 0.85 * f, "2d {t} s vs flat {f} s");
    let a2a = p2.ranks[0].ops.iter().find(|o| o.stage == AllToAll).expect("an all-to-all");
    let parts = sim::cost::collective(a2a).expect("a collective");
    assert_eq!(parts.len(), 2);
    assert!(parts.iter().all(|p| p.bytes == a2a.bytes as f64 / 2.0), "{parts:?} of {} bytes", a2a.bytes);
}

#[test]
fn a_bounded_capacity_is_priced_at_most_at_its_cap_and_never_above_dropless() {
    use moelab::taxonomy::Stage::{AllToAll, ExpertGemm1};
    // capacity_factor < 0 keeps at most |cf| times the mean load per expert: sized like dropless
    // (at run time), it fills its blocks like dropless up to that cap.
    let (pd, dropless) = tutel_at_scale(16, "flat", "dropless = true");
    let (pb, bounded) = tutel_at_scale(16, "flat", "capacity_factor = -1.25");
    let (pc, capped) = tutel_at_scale(16, "flat", "capacity_factor = -0.5");
    for stage in [ExpertGemm1, AllToAll] {
        let (d, b, c) = (stage_seconds(&pd, &dropless, stage), stage_seconds(&pb, &bounded, stage), stage_seconds(&pc, &capped, stage));
        assert!(b <= d * 1.001, "{stage:?}: bounded {b} s vs dropless {d} s");
        // A cap below the mean load halves the expert rows; the dispatch all-to-all is priced
        // at what a rank sends, every assignment, so it does not shrink.
        let (want, of) = if stage == ExpertGemm1 { (0.75 * b, "0.75 x") } else { (b * 1.001, "at most") };
        assert!(c < want, "{stage:?}: |cf| 0.5 {c} s, want {of} 1.25's {b} s");
    }
    assert!(bounded.timeline.makespan <= dropless.timeline.makespan * 1.001);
}

#[test]
fn a_predicted_peak_above_the_gpus_memory_is_a_warning_in_the_run() {
    let mut s = from_toml_str(&seed_text("topk")).expect("valid");
    let tmp = tempfile::tempdir().unwrap();
    let fits = run::run(&s, tmp.path(), &RunHooks::default()).expect("runs");
    assert!(fits.warnings.is_empty(), "{:?}", fits.warnings);
    // The same plan on a 1 MiB GPU.
    let p = tmp.path().join("tiny.toml");
    let prof = profile::builtin_text("h100").expect("built in").replace("memory_gib = 80.0", "memory_gib = 0.001");
    assert_ne!(prof, profile::builtin_text("h100").unwrap(), "the profile states memory_gib = 80");
    std::fs::write(&p, prof).unwrap();
    s.run.profile = Some(p.display().to_string());
    let out = run::run(&s, tmp.path(), &RunHooks::default()).expect("runs");
    assert!(out.warnings.iter().any(|w| w.contains("exceeds") && w.contains("GiB")), "{:?}", out.warnings);
    let summary = std::fs::read_to_string(out.dir.join("summary.json")).unwrap();
    assert!(summary.contains("\"warnings\"") && summary.contains("run out of memory"), "{summary}");
}

/// `run.rank_loads` in a capacity plan only moves zero rows, which only bf16 expert GEMMs on
/// a profile with `kernels.zero_row_gain` price: elsewhere the run says it changes nothing.
#[test]
fn uneven_rank_loads_that_cannot_matter_are_named_in_a_warning() {
    let warnings = |dtype: &str, extra: &str| {
        let text = format!(
            "name = \"t\"\n[model]\nd_model = 64\nd_ffn = 128\nn_experts = 4\ntop_k = 2\nn_layers = 1\ntokens_per_rank = 64\nseq_len = 16\ndtype = \"{dtype}\"\n{extra}[layout]\nep = 2\n[run]\nbackend = \"sim\"\nprofile = \"h200\"\nsteps = 1\nwarmup = 0\nrank_loads = [0.5, 1.5]\n"
        );
        let plan = Plan::build(&from_toml_str(&text).expect("valid")).expect("plan");
        sim::SimRuntime::new(plan, Default::default()).warnings()
    };
    let f32 = warnings("f32", "");
    assert!(f32.iter().any(|w| w.contains("run.rank_loads changes nothing") && w.contains("f32")), "{f32:?}");
    // bf16 on a profile with zero-row gains, and dropless plans (loads size the blocks): no warning.
    assert!(warnings("bf16", "").iter().all(|w| !w.contains("rank_loads")));
    assert!(warnings("f32", "dropless = true\n").iter().all(|w| !w.contains("rank_loads")));
}

#[test]
fn tutels_2d_all_to_all_pays_its_copies_and_wins_only_across_many_nodes() {
    // The 2D all-to-all stride-copies its rows before each phase and reads counts back between
    // them: on 2 nodes of 8 GPUs it is slower than the flat one; across 32 nodes, where the
    // flat one pays a latency per peer, it is faster (the Tutel paper's crossover).
    let a2a_us = |ep: usize, a2a: &str| {
        let text = format!(
            "name = \"t\"\nvariant = \"tutel\"\n[model]\nd_model = 2048\nd_ffn = 4096\nn_experts = 256\ntop_k = 2\ncapacity_factor = 1.0\nn_layers = 1\nbatch = 1\nseq_len = 256\ndtype = \"bf16\"\n[layout]\nep = {ep}\n[tutel]\ndegree = 1\na2a = \"{a2a}\"\ngpus_per_node = 8\n[run]\nbackend = \"sim\"\nprofile = \"h100\"\ngpus_per_node = 8\nsteps = 1\nwarmup = 0\n"
        );
        let s = from_toml_str(&text).expect("valid");
        let plan = Plan::build(&s).expect("plans");
        let out = sim::simulate_plan(&plan, &sim::spec_profile(&s).expect("profile"), Symmetry::Exploit).expect("simulates");
        let i = plan.ranks[0].ops.iter().position(|o| o.stage == moelab::taxonomy::Stage::AllToAll).expect("an all-to-all");
        let t = out.timeline.times[0][i];
        (t.end - t.start) * 1e6
    };
    let (flat2, two_d2) = (a2a_us(16, "flat"), a2a_us(16, "2d"));
    assert!(two_d2 > flat2, "2 nodes: 2D {two_d2} us, flat {flat2} us");
    let (flat32, two_d32) = (a2a_us(256, "flat"), a2a_us(256, "2d"));
    assert!(two_d32 < 0.7 * flat32, "32 nodes: 2D {two_d32} us, flat {flat32} us");
}

#[test]
fn ted_and_ppmoe_plans_whose_ranks_do_the_same_work_are_simulated_once() {
    // TED's TP index 0 alone holds the experts' output bias (its gradient, Adam state and
    // all-reduce share), PPMoE's adds the residual: a sliver of the work, so in large plans the
    // other ranks still count as images of rank 0 and 2,048-rank TED and PPMoE plans simulate
    // in seconds.
    let base = "name = \"t\"\n[model]\nd_model = 64\nd_ffn = 128\nn_experts = 8\ntop_k = 2\ntokens_per_rank = 64\nn_layers = 1\ncapacity_factor = 1.25\n[model.backbone]\nn_heads = 4\nd_mlp = 128\n[run]\nbackend = \"sim\"\nprofile = \"h100\"\nsteps = 1\nwarmup = 0\n";
    // Above 64 ranks only (smaller plans are reduced only when exact, so every rank's
    // figures, memory included, stay its own).
    for (variant, layout, small) in [("ted", "dp = 24\nep = 2\ntp = 2", "dp = 2\nep = 2\ntp = 2"), ("ppmoe", "dp = 48\ntp = 2", "dp = 2\ntp = 2")] {
        let few = from_toml_str(&format!("variant = \"{variant}\"\n{base}[layout]\n{small}\n")).expect("valid");
        assert!(!sim::is_symmetric(&Plan::build(&few).expect("plans"), &sim::spec_profile(&few).expect("profile")), "{variant}: 8 or fewer ranks, not exact images");
        let s = from_toml_str(&format!("variant = \"{variant}\"\n{base}[layout]\n{layout}\n")).expect("valid");
        let plan = Plan::build(&s).expect("plans");
        let p = sim::spec_profile(&s).expect("profile");
        assert!(sim::is_symmetric(&plan, &p), "{variant}: every rank an image of rank 0");
        let out = sim::simulate_plan(&plan, &p, Symmetry::Exploit).expect("simulates");
        let every = sim::simulate_plan(&plan, &p, Symmetry::Ignore).expect("simulates");
        assert!(out.symmetric && (out.timeline.makespan / every.timeline.makespan - 1.0).abs() < 0.01, "{variant}: {} vs every rank {}", out.timeline.makespan, every.timeline.makespan);
    }
}

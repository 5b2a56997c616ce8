//! Helpers shared by the integration tests: small specs and runtime shortcuts.
#![allow(dead_code)]

use moelab::backend::cpu::CpuRuntime;
use moelab::backend::ExecOptions;
use moelab::plan::Plan;
use moelab::spec::{from_toml_str, ExperimentSpec};

/// A small spec; `extra_model`/`layout`/`run` are TOML lines appended to their tables.
pub fn spec(model: &str, layout: &str, run: &str) -> ExperimentSpec {
    let text = format!(
        "name = \"t\"\n[model]\nd_model = 16\nd_ffn = 24\nn_experts = 4\n{model}\n[layout]\n{layout}\n[run]\nbackend = \"cpu\"\n{run}\n"
    );
    from_toml_str(&text).unwrap_or_else(|e| panic!("test spec invalid: {e}\n{text}"))
}

/// A runtime for `spec` retaining the named buffers.
pub fn runtime(spec: &ExperimentSpec, retain: &[&str], skip_optimizer: bool) -> CpuRuntime {
    let plan = Plan::build(spec).expect("plan builds");
    let opts = ExecOptions { retain: retain.iter().map(|s| s.to_string()).collect(), skip_optimizer, ..Default::default() };
    CpuRuntime::new(plan, opts)
}

/// ||a - b|| / ||b||, failing on NaN.
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    assert!(num.is_finite() && den.is_finite(), "NaN or inf");
    if den == 0.0 { num.sqrt() } else { (num / den).sqrt() }
}

/// Name of the model's output buffer (the Loss op's input).
pub fn output_name(rt: &CpuRuntime, rank: usize) -> String {
    let rp = &rt.plan().ranks[rank];
    let op = rp.ops.iter().find(|o| matches!(o.kind, moelab::plan::OpKind::Loss { .. })).expect("a loss op");
    match op.kind {
        moelab::plan::OpKind::Loss { y, .. } => rp.buffer(y).name.clone(),
        _ => unreachable!(),
    }
}

/// Concatenate a buffer over ranks (data shards in rank order).
pub fn gather(rt: &CpuRuntime, name: &str) -> Vec<f32> {
    (0..rt.plan().world()).flat_map(|r| rt.read(r, name).unwrap_or_else(|| panic!("{name} on rank {r}"))).collect()
}

/// Run one step on data step 0 without the optimizer, retaining the named buffers.
pub fn step_retaining(s: &ExperimentSpec, retain: &[&str]) -> (CpuRuntime, moelab::backend::StepReport) {
    let mut rt = runtime(s, retain, true);
    let r = rt.step(false, Some(0)).expect("step");
    (rt, r)
}

/// A distributed step equals the single-rank step: loss, aux loss and drops, the retained
/// outputs `outs` (gathered over ranks) and every gradient, the expert gradients
/// concatenated over one expert-parallel group of `ep` ranks (relative error < 1e-5), and
/// every data-parallel replica's gradients equal the first replica's.
pub fn assert_matches_single_rank(
    dist: &CpuRuntime,
    a: &moelab::backend::StepReport,
    single: &CpuRuntime,
    b: &moelab::backend::StepReport,
    outs: &[&str],
    ep: usize,
    what: &str,
) {
    assert!(((a.loss - b.loss) / b.loss).abs() < 1e-5, "{what}: loss {} vs {}", a.loss, b.loss);
    assert!((a.aux_loss - b.aux_loss).abs() < 1e-5, "{what}: aux {} vs {}", a.aux_loss, b.aux_loss);
    assert_eq!(a.dropped, b.dropped, "{what}: same tokens dropped");
    for name in outs {
        let err = rel_err(&gather(dist, name), &single.read(0, name).unwrap());
        assert!(err < 1e-5, "{what}: {name} rel err {err}");
    }
    let rp = &dist.plan().ranks[0];
    for p in &rp.params {
        let gname = format!("{}.grad", rp.buffer(p.value).name);
        let want = single.read(0, &gname).unwrap();
        let got: Vec<f32> =
            if p.expert { (0..ep).flat_map(|r| dist.read(r, &gname).unwrap()).collect() } else { dist.read(0, &gname).unwrap() };
        let err = rel_err(&got, &want);
        assert!(err < 1e-5, "{what}: {gname} rel err {err}");
        // Every data-parallel replica holds the same gradients as the first (rank = replica
        // x ep + expert-parallel index).
        let world = dist.plan().world();
        for d in 1..world / ep.max(1) {
            let ranks: Vec<usize> = if p.expert { (d * ep..(d + 1) * ep).collect() } else { vec![d * ep] };
            let Some(theirs) = ranks.iter().map(|&r| dist.read(r, &gname)).collect::<Option<Vec<_>>>() else { continue };
            let err = rel_err(&theirs.concat(), &got);
            assert!(err < 1e-6, "{what}: {gname} on replica {d} differs from replica 0 (rel err {err})");
        }
    }
}

/// The objective the backward differentiates: loss + aux_coef * aux, on data step 0.
pub fn objective(rt: &mut CpuRuntime, coef: f64) -> f64 {
    let r = rt.step(false, Some(0)).expect("step");
    r.loss + coef * r.aux_loss
}

/// Central differences on the largest-gradient coordinates of `name` (skipping probes whose
/// routing flips, a discontinuity) against the analytic gradient.
pub fn check_finite_differences(rt: &mut CpuRuntime, coef: f64, idx_names: &[String], name: &str, probes: usize) {
    let _ = objective(rt, coef);
    let grad = rt.read(0, &format!("{name}.grad")).unwrap_or_else(|| panic!("no grad for {name}"));
    let base = rt.read(0, name).unwrap();
    let mut order: Vec<usize> = (0..grad.len()).collect();
    order.sort_by(|&a, &b| grad[b].abs().partial_cmp(&grad[a].abs()).unwrap());
    let h = 2e-3f32;
    let routes = |rt: &CpuRuntime| idx_names.iter().map(|n| rt.read_i32(0, n)).collect::<Vec<_>>();
    let base_routes = routes(rt);
    let mut checked = 0;
    for &i in order.iter().take(probes) {
        let mut p = base.clone();
        p[i] = base[i] + h;
        rt.write(0, name, p.clone());
        let fp = objective(rt, coef);
        let routes_p = routes(rt);
        p[i] = base[i] - h;
        rt.write(0, name, p);
        let fm = objective(rt, coef);
        let routes_m = routes(rt);
        rt.write(0, name, base.clone());
        if routes_p != base_routes || routes_m != base_routes {
            continue;
        }
        let fd = (fp - fm) / (2.0 * h as f64);
        let an = grad[i] as f64;
        let err = (fd - an).abs() / an.abs().max(1e-4);
        assert!(err < 2e-2, "{name}[{i}]: analytic {an:e} vs finite difference {fd:e} (rel {err:e})");
        checked += 1;
    }
    assert!(checked * 2 >= probes, "{name}: only {checked} of {probes} probes kept their routing");
}

/// The derivative of the objective along one pseudo-random direction through every
/// coordinate of `name` (central differences) against the analytic gradient's dot product
/// with it: unlike [`check_finite_differences`]'s largest coordinates, it sees a coordinate
/// whose gradient is wrongly zero or small. A step whose routing flips is halved.
pub fn check_directional_derivative(rt: &mut CpuRuntime, coef: f64, idx_names: &[String], name: &str) {
    let _ = objective(rt, coef);
    let grad = rt.read(0, &format!("{name}.grad")).unwrap_or_else(|| panic!("no grad for {name}"));
    let base = rt.read(0, name).unwrap();
    // Entries in [-0.5, 0.5) from a multiplicative hash of the index, scaled to unit length.
    let mut v: Vec<f64> = (0..base.len()).map(|i| ((i as u64 + 1).wrapping_mul(2_654_435_761) % 1_000_003) as f64 / 1_000_003.0 - 0.5).collect();
    let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    v.iter_mut().for_each(|x| *x /= norm);
    let an: f64 = grad.iter().zip(&v).map(|(g, x)| *g as f64 * x).sum();
    let routes = |rt: &CpuRuntime| idx_names.iter().map(|n| rt.read_i32(0, n)).collect::<Vec<_>>();
    let base_routes = routes(rt);
    let mut h = 4e-3;
    for _ in 0..4 {
        let at = |t: f64| base.iter().zip(&v).map(|(b, x)| (*b as f64 + t * x) as f32).collect::<Vec<f32>>();
        rt.write(0, name, at(h));
        let (fp, rp) = (objective(rt, coef), routes(rt));
        rt.write(0, name, at(-h));
        let (fm, rm) = (objective(rt, coef), routes(rt));
        rt.write(0, name, base.clone());
        if rp == base_routes && rm == base_routes {
            let fd = (fp - fm) / (2.0 * h);
            let err = (fd - an).abs() / an.abs().max(1e-3);
            assert!(err < 3e-2, "{name}: analytic {an:e} vs finite difference {fd:e} along a direction (rel {err:e})");
            return;
        }
        h /= 4.0;
    }
    panic!("{name}: routing flipped at every step size down to {h:e}");
}

/// The whole gradient of parameter `param` from the ranks `group` that share it: expert
/// slices concatenated in rank order, tensor-parallel slices put back in place, a replicated
/// (or single-owner) parameter's gradient as the first holder has it (replicas must agree).
pub fn assemble_grad(rt: &CpuRuntime, group: &[usize], param: &str) -> Vec<f32> {
    let gname = format!("{param}.grad");
    let mut holders = Vec::new();
    for &r in group {
        let rp = &rt.plan().ranks[r];
        if let Some(p) = rp.params.iter().find(|p| rp.buffer(p.value).name == param) {
            holders.push((r, p.clone(), rt.read(r, &gname).unwrap_or_else(|| panic!("{gname} on rank {r}"))));
        }
    }
    assert!(!holders.is_empty(), "no rank of {group:?} holds {param}");
    if holders[0].1.expert {
        return holders.into_iter().flat_map(|h| h.2).collect();
    }
    match holders[0].1.slice {
        Some(s0) => {
            let mut full = vec![f32::NAN; s0.full_len()];
            for (_, p, g) in &holders {
                let s = p.slice.expect("every holder holds a slice");
                let w = s.keep.1 - s.keep.0;
                for (row, part) in g.chunks_exact(w).enumerate() {
                    full[row * s.cols + s.keep.0..row * s.cols + s.keep.1].copy_from_slice(part);
                }
            }
            assert!(full.iter().all(|v| !v.is_nan()), "{param}: the slices of {group:?} do not cover the tensor");
            full
        }
        None => {
            for (r, _, g) in &holders[1..] {
                let e = rel_err(g, &holders[0].2);
                assert!(e < 1e-5, "{param}: replica on rank {r} differs ({e})");
            }
            holders.swap_remove(0).2
        }
    }
}

/// Runs the `moelab` binary in the repository root with `args` and extra environment
/// variables; returns (exit code, stdout, stderr).
pub fn moelab(args: &[&str], envs: &[(&str, &str)]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_moelab"))
        .args(args)
        .envs(envs.iter().copied())
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("binary runs");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

/// Run `spec` with rank 0 failing at op `fail_at`, expecting the run to fail: its run
/// directory and parsed `summary.json` (what a failed run keeps).
pub fn failed_run_summary(spec: &ExperimentSpec, fail_at: String) -> (tempfile::TempDir, std::path::PathBuf, serde_json::Value) {
    let root = tempfile::tempdir().unwrap();
    let hooks = moelab::run::RunHooks { exec: ExecOptions { fail_at: Some((0, fail_at)), ..Default::default() }, on_step: None };
    let dir = match moelab::run::run(spec, root.path(), &hooks) {
        Err(moelab::run::RunError::Backend { dir, .. }) => std::path::PathBuf::from(dir),
        Err(other) => panic!("expected a failed run, got {other}"),
        Ok(out) => panic!("expected a failed run, it completed in {}", out.dir.display()),
    };
    let summary: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["status"], "failed", "{summary}");
    (root, dir, summary)
}

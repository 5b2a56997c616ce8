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

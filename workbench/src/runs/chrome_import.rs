//! Reading a run's `trace.json` back into a [`Trace`]: the library's reader
//! (`moelab::trace::chrome_import`) with the workbench's error type.

use crate::error::WorkbenchError;
use moelab::run::run_file::read_run_file;
use moelab::trace::chrome_import;
use moelab::trace::Trace;
use std::path::Path;

/// Rebuild a trace from Chrome trace JSON text, with the step spans of its `steps` thread
/// (none in traces written before that thread existed).
pub fn trace_from_chrome(text: &str, backend: &str) -> Result<Trace, String> {
    chrome_import::trace_from_chrome(text, backend).map_err(|e| e.to_string())
}

/// Read `trace.json` from a run directory (or `trace.json.gz`, as the stored runs keep it).
pub fn read_trace(dir: &Path, backend: &str) -> Result<Trace, WorkbenchError> {
    let (text, path) = read_run_file(dir, "trace.json").map_err(|e| WorkbenchError::Io { path: dir.join("trace.json").display().to_string(), message: e.to_string() })?;
    chrome_import::trace_from_chrome(&text, backend).map_err(|e| WorkbenchError::format(&path, e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use moelab::taxonomy::{MemCategory, Pass, Stage, Stream};
    use moelab::trace::chrome::to_chrome_json;
    use moelab::trace::{MemEvent, OpEvent};

    fn sample() -> Trace {
        let op = |rank, stream, stage, start, end| OpEvent {
            rank, step: 0, stream, stage, pass: Pass::Forward, name: format!("{stage}"), layer: Some(1), chunk: None,
            start_ns: start, end_ns: end, flops: 100, bytes: 64, collective: None, host_ns: None, issue_ns: None, gemm_calls: None,
        };
        Trace {
            backend: "cpu".into(),
            world: 2,
            ops: vec![
                op(0, Stream::Compute, Stage::Gate, 1_000, 5_000),
                OpEvent { collective: Some(moelab::trace::CollectiveRef { group: 1, seq: 3 }), ..op(0, Stream::Comm, Stage::AllToAll, 5_000, 9_000) },
                op(1, Stream::Compute, Stage::ExpertGemm1, 2_000, 7_000),
            ],
            memory: vec![
                MemEvent { rank: 0, t_ns: 0, category: MemCategory::Params, delta: 4096 },
                MemEvent { rank: 0, t_ns: 1_000, category: MemCategory::Activations, delta: 512 },
                MemEvent { rank: 0, t_ns: 9_000, category: MemCategory::Activations, delta: -512 },
                MemEvent { rank: 1, t_ns: 0, category: MemCategory::Params, delta: 4096 },
            ],
            steps: vec![
                moelab::trace::StepSpan { rank: 0, step: 0, start_ns: 500, end_ns: 9_500 },
                moelab::trace::StepSpan { rank: 1, step: 0, start_ns: 1_500, end_ns: 7_250 },
            ],
            group_sizes: vec![2, 2],
        }
    }

    #[test]
    fn chrome_export_reads_back_into_the_same_ops_memory_and_step_spans() {
        let t = sample();
        let text = to_chrome_json(&t).to_string();
        let back = trace_from_chrome(&text, "cpu").expect("reads");
        assert_eq!(back.world, 2);
        assert_eq!(back.group_sizes, vec![2, 2]);
        let mut ops = back.ops.clone();
        ops.sort_by_key(|o| (o.rank, o.start_ns));
        let mut want = t.ops.clone();
        want.sort_by_key(|o| (o.rank, o.start_ns));
        assert_eq!(ops, want);
        assert_eq!(back.steps, t.steps, "the step spans come back too");
        let a = moelab::analysis::analyze(&t);
        let b = moelab::analysis::analyze(&back);
        assert_eq!(a.memory, b.memory);
        assert_eq!(a.overlap, b.overlap);
        assert_eq!(a.step_time_ns, b.step_time_ns);
    }

    #[test]
    fn a_stored_run_with_a_compressed_trace_opens() {
        // The runs kept under docs/device-runs hold trace.json.gz (scripts/pack-runs).
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/device-runs/h200-s17/bench-sim-runs");
        let dir = std::fs::read_dir(&root).expect("stored runs").map(|e| e.expect("entry").path()).min().expect("a run");
        assert!(dir.join("trace.json.gz").is_file() && !dir.join("trace.json").exists(), "{dir:?}");
        let t = read_trace(&dir, "cuda").expect("reads");
        assert_eq!(t.world, 1);
        assert!(t.ops.len() > 100, "{} ops", t.ops.len());
    }

    #[test]
    fn broken_traces_give_messages() {
        assert!(trace_from_chrome("{", "cpu").unwrap_err().contains("not JSON"));
        assert!(trace_from_chrome("{}", "cpu").unwrap_err().contains("traceEvents"));
        let bad = r#"{"traceEvents":[{"ph":"X","pid":0,"tid":0,"ts":1,"dur":1,"args":{"stage":"warp_drive","pass":"forward"}}]}"#;
        assert!(trace_from_chrome(bad, "cpu").unwrap_err().contains("args.stage"));
    }
}

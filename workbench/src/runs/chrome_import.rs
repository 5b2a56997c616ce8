//! Reading a run's `trace.json` (the Chrome/Perfetto export moelab writes) back into a
//! [`Trace`]: op events from the complete (`X`) events and memory deltas from the `memory`
//! counters, so a past run is analysed and drawn exactly like a fresh one.

use crate::error::WorkbenchError;
use moelab::taxonomy::{MemCategory, Pass, Stage, Stream};
use moelab::trace::{MemEvent, OpEvent, Trace};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

/// Microseconds (the format's unit) to nanoseconds.
fn ns(us: f64) -> u64 {
    if us.is_finite() && us > 0.0 {
        (us * 1000.0).round() as u64
    } else {
        0
    }
}

fn field<'a>(ev: &'a Value, key: &str) -> Option<&'a Value> {
    ev.get(key).filter(|v| !v.is_null())
}

fn as_u32(v: Option<&Value>) -> Option<u32> {
    v.and_then(Value::as_u64).and_then(|x| u32::try_from(x).ok())
}

/// One `X` event as an op; `None` names what is missing.
fn op_event(ev: &Value) -> Result<OpEvent, String> {
    let args = field(ev, "args").ok_or("op event without args")?;
    let stage: Stage = serde_json::from_value(field(args, "stage").cloned().ok_or("op event without args.stage")?)
        .map_err(|e| format!("args.stage: {e}"))?;
    let pass: Pass = serde_json::from_value(field(args, "pass").cloned().ok_or("op event without args.pass")?)
        .map_err(|e| format!("args.pass: {e}"))?;
    let stream = match as_u32(field(ev, "tid")) {
        Some(0) => Stream::Compute,
        Some(1) => Stream::Comm,
        other => return Err(format!("op event on unknown thread {other:?}")),
    };
    let start_ns = ns(field(ev, "ts").and_then(Value::as_f64).ok_or("op event without ts")?);
    let dur_ns = ns(field(ev, "dur").and_then(Value::as_f64).unwrap_or(0.0));
    Ok(OpEvent {
        rank: as_u32(field(ev, "pid")).ok_or("op event without pid")?,
        step: as_u32(field(args, "step")).unwrap_or(0),
        stream,
        stage,
        pass,
        name: field(ev, "name").and_then(Value::as_str).unwrap_or("?").to_string(),
        layer: as_u32(field(args, "layer")),
        chunk: as_u32(field(args, "chunk")),
        start_ns,
        end_ns: start_ns + dur_ns,
        flops: field(args, "flops").and_then(Value::as_u64).unwrap_or(0),
        bytes: field(args, "bytes").and_then(Value::as_u64).unwrap_or(0),
        collective: match (as_u32(field(args, "group")), as_u32(field(args, "seq"))) {
            (Some(group), Some(seq)) => Some(moelab::trace::CollectiveRef { group, seq }),
            _ => None,
        },
    })
}

/// Rebuild a trace from Chrome trace JSON text. Step spans are not part of the export, so
/// the returned trace has none (the run's summary carries the step time).
pub fn trace_from_chrome(text: &str, backend: &str) -> Result<Trace, String> {
    let root: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let events = root.get("traceEvents").and_then(Value::as_array).ok_or("no traceEvents array: not a Chrome trace")?;
    let mut trace = Trace { backend: backend.to_string(), ..Trace::default() };
    let mut world = 0u32;
    // Counter events carry absolute bytes per category; keep them per rank to diff later.
    let mut counters: BTreeMap<u32, Vec<(u64, [u64; 7])>> = BTreeMap::new();
    for ev in events {
        let pid = as_u32(field(ev, "pid"));
        if let Some(p) = pid {
            world = world.max(p + 1);
        }
        match field(ev, "ph").and_then(Value::as_str) {
            Some("X") => trace.ops.push(op_event(ev)?),
            Some("C") if field(ev, "name").and_then(Value::as_str) == Some("memory") => {
                let (Some(rank), Some(args)) = (pid, field(ev, "args")) else { continue };
                let mut bytes = [0u64; 7];
                for c in MemCategory::ALL {
                    bytes[c.index()] = field(args, c.as_str()).and_then(Value::as_u64).unwrap_or(0);
                }
                let t = ns(field(ev, "ts").and_then(Value::as_f64).unwrap_or(0.0));
                counters.entry(rank).or_default().push((t, bytes));
            }
            _ => {}
        }
    }
    for (rank, mut series) in counters {
        series.sort_by_key(|s| s.0);
        let mut last = [0u64; 7];
        for (t_ns, bytes) in series {
            for c in MemCategory::ALL {
                let i = c.index();
                let delta = bytes[i] as i64 - last[i] as i64;
                if delta != 0 {
                    trace.memory.push(MemEvent { rank, t_ns, category: c, delta });
                }
            }
            last = bytes;
        }
    }
    trace.world = world;
    Ok(trace)
}

/// Read `trace.json` from a run directory.
pub fn read_trace(dir: &Path, backend: &str) -> Result<Trace, WorkbenchError> {
    let path = dir.join("trace.json");
    let text = std::fs::read_to_string(&path).map_err(|e| WorkbenchError::io(&path, e))?;
    trace_from_chrome(&text, backend).map_err(|m| WorkbenchError::format(&path, m))
}

#[cfg(test)]
mod tests {
    use super::*;
    use moelab::trace::chrome::to_chrome_json;

    fn sample() -> Trace {
        let op = |rank, stream, stage, start, end| OpEvent {
            rank, step: 0, stream, stage, pass: Pass::Forward, name: format!("{stage}"), layer: Some(1), chunk: None,
            start_ns: start, end_ns: end, flops: 100, bytes: 64, collective: None,
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
            steps: vec![],
            group_sizes: vec![],
        }
    }

    #[test]
    fn chrome_export_reads_back_into_the_same_ops_and_memory() {
        let t = sample();
        let text = to_chrome_json(&t).to_string();
        let back = trace_from_chrome(&text, "cpu").expect("reads");
        assert_eq!(back.world, 2);
        let mut ops = back.ops.clone();
        ops.sort_by_key(|o| (o.rank, o.start_ns));
        let mut want = t.ops.clone();
        want.sort_by_key(|o| (o.rank, o.start_ns));
        assert_eq!(ops, want);
        let a = moelab::analysis::analyze(&t);
        let b = moelab::analysis::analyze(&back);
        assert_eq!(a.memory, b.memory);
        assert_eq!(a.overlap, b.overlap);
    }

    #[test]
    fn broken_traces_give_messages() {
        assert!(trace_from_chrome("{", "cpu").unwrap_err().contains("not JSON"));
        assert!(trace_from_chrome("{}", "cpu").unwrap_err().contains("traceEvents"));
        let bad = r#"{"traceEvents":[{"ph":"X","pid":0,"tid":0,"ts":1,"dur":1,"args":{"stage":"warp_drive","pass":"forward"}}]}"#;
        assert!(trace_from_chrome(bad, "cpu").unwrap_err().contains("args.stage"));
    }
}

//! Reading a run's `trace.json` (the Chrome/Perfetto export of [`super::chrome`]) back into a
//! [`Trace`]: op events from the complete (`X`) events and memory deltas from the `memory`
//! counters and step spans from the `steps` thread, so a past run is analysed exactly like a
//! fresh one. Traces written before the export carried step spans read back without them.

use super::{MemEvent, OpEvent, StepSpan, Trace};
use crate::taxonomy::{MemCategory, Pass, Stage, Stream};
use serde_json::Value;
use std::collections::BTreeMap;

/// Why a Chrome trace could not be read back.
#[derive(Debug, thiserror::Error)]
pub enum ChromeImportError {
    /// The text is not a trace moelab writes; the message names what is missing or wrong.
    #[error("{0}")]
    Format(String),
}

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

/// One `X` event as an op; the error names what is missing.
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
            (Some(group), Some(seq)) => Some(super::CollectiveRef { group, seq }),
            _ => None,
        },
        host_ns: field(args, "host_us").and_then(Value::as_f64).map(ns),
        issue_ns: field(args, "issue_us").and_then(Value::as_f64).map(ns),
        gemm_calls: as_u32(field(args, "gemm_calls")),
    })
}

/// Rebuild a trace from Chrome trace JSON text, recording `backend` as its backend (the
/// export does not carry it).
pub fn trace_from_chrome(text: &str, backend: &str) -> Result<Trace, ChromeImportError> {
    let fail = |m: String| ChromeImportError::Format(m);
    let root: Value = serde_json::from_str(text).map_err(|e| fail(format!("not JSON: {e}")))?;
    let events = root.get("traceEvents").and_then(Value::as_array).ok_or_else(|| fail("no traceEvents array: not a Chrome trace".into()))?;
    let group_sizes = root
        .pointer("/otherData/group_sizes")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(|v| v.as_u64().map(|n| n as u32)).collect())
        .unwrap_or_default();
    let mut trace = Trace { backend: backend.to_string(), group_sizes, ..Trace::default() };
    let mut world = 0u32;
    // Counter events carry absolute bytes per category; keep them per rank to diff later.
    let mut counters: BTreeMap<u32, Vec<(u64, [u64; 7])>> = BTreeMap::new();
    for ev in events {
        let pid = as_u32(field(ev, "pid"));
        if let Some(p) = pid {
            world = world.max(p + 1);
        }
        match field(ev, "ph").and_then(Value::as_str) {
            Some("X") if as_u32(field(ev, "tid")) == Some(super::chrome::STEPS_TID) => {
                let (Some(rank), Some(step)) = (pid, as_u32(field(ev, "args").and_then(|a| field(a, "step")))) else { continue };
                let start_ns = ns(field(ev, "ts").and_then(Value::as_f64).unwrap_or(0.0));
                let end_ns = start_ns + ns(field(ev, "dur").and_then(Value::as_f64).unwrap_or(0.0));
                trace.steps.push(StepSpan { rank, step, start_ns, end_ns });
            }
            Some("X") => trace.ops.push(op_event(ev).map_err(fail)?),
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

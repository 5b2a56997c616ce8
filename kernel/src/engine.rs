//! The engine thread: executes cells one at a time (Rust through evcxr, `%%experiment`
//! through moelab directly), answers completion, inspection and history requests, and keeps
//! the execution count. Every request it takes was announced `busy` by the socket layer; the
//! engine sends the reply, then `idle`.

use crate::cells::{classify, Cell};
use crate::evaluator::{byte_offset, char_index, ChildHandle, Evaluator};
use crate::experiment;
use crate::history::History;
use crate::outbox::{Channel, Outbox};
use crate::wire::Message;
use serde_json::{json, Map, Value};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// What an interrupt request stops: the running experiment (cancel flag) or the running
/// Rust cell (its evaluation process is killed and restarted, losing its variables).
#[derive(Default)]
pub struct Interrupter {
    cancel: Arc<AtomicBool>,
    rust_child: Mutex<Option<ChildHandle>>,
}

impl Interrupter {
    /// Stop whatever the engine is running. Returns what was stopped, for the log.
    pub fn interrupt(&self) -> &'static str {
        if let Some(child) = self.rust_child.lock().expect("interrupt lock").as_ref() {
            if let Ok(mut c) = child.lock() {
                let _ = c.kill();
            }
            return "rust cell";
        }
        self.cancel.store(true, Ordering::SeqCst);
        "experiment (if one runs)"
    }
}

/// The engine's state.
pub struct Engine {
    outbox: Outbox,
    evaluator: Evaluator,
    interrupter: Arc<Interrupter>,
    history: History,
    execution_count: u64,
    runs_root: PathBuf,
}

impl Engine {
    /// An engine whose Rust context starts with `prelude` when the first Rust cell needs it.
    pub fn new(outbox: Outbox, prelude: String, interrupter: Arc<Interrupter>, runs_root: PathBuf) -> Engine {
        Engine { evaluator: Evaluator::new(prelude, outbox.clone()), outbox, interrupter, history: History::default(), execution_count: 0, runs_root }
    }

    /// Serve requests until the channel closes.
    pub fn serve(mut self, requests: std::sync::mpsc::Receiver<Message>) {
        for msg in requests {
            match msg.header.msg_type.as_str() {
                "execute_request" => self.execute(&msg),
                "complete_request" => self.complete(&msg),
                "inspect_request" => self.inspect(&msg),
                "history_request" => {
                    let history = self.history.query(&msg.content);
                    self.outbox.reply(Channel::Shell, &msg, "history_reply", json!({ "status": "ok", "history": history }));
                }
                other => eprintln!("moelab-kernel: engine got unexpected {other}"),
            }
            self.outbox.status(Some(&msg), "idle");
        }
    }

    fn execute(&mut self, msg: &Message) {
        let code = msg.str_field("code").to_string();
        let silent = msg.content.get("silent").and_then(Value::as_bool).unwrap_or(false);
        let store = !silent && msg.content.get("store_history").and_then(Value::as_bool).unwrap_or(true);
        if store {
            self.execution_count += 1;
        }
        let count = self.execution_count;
        if !silent {
            self.outbox.publish(Some(msg), "execute_input", json!({ "code": code, "execution_count": count }));
        }
        // Silent requests run but publish nothing.
        let out = if silent { None } else { Some(msg) };
        let result = match classify(&code) {
            Cell::Experiment { args, body } => self.run_experiment(out, &args, body),
            Cell::Rust(src) => self.run_rust(out, src),
        };
        match result {
            Ok(plain) => {
                if store {
                    self.history.push(count, &code, plain);
                }
                self.outbox.reply(Channel::Shell, msg, "execute_reply", json!({
                    "status": "ok", "execution_count": count, "user_expressions": {}, "payload": [],
                }));
            }
            Err(err) => {
                if store {
                    self.history.push(count, &code, None);
                }
                if !silent {
                    self.outbox.publish(Some(msg), "error", json!({ "ename": err.ename, "evalue": err.evalue, "traceback": err.traceback }));
                }
                self.outbox.reply(Channel::Shell, msg, "execute_reply", json!({
                    "status": "error", "execution_count": count, "ename": err.ename, "evalue": err.evalue, "traceback": err.traceback,
                    "user_expressions": {}, "payload": [],
                }));
            }
        }
    }

    /// Run a `%%experiment` cell; returns the plain-text result for the history.
    fn run_experiment(&mut self, out: Option<&Message>, args: &[&str], body: &str) -> Result<Option<String>, CellError> {
        let args = experiment::parse_args(args).map_err(CellError::from_magic)?;
        let exps = experiment::experiments(body, &args, &self.runs_root).map_err(CellError::from_magic)?;
        self.interrupter.cancel.store(false, Ordering::SeqCst);
        let outbox = self.outbox.clone();
        let parent = out.cloned();
        let progress: Arc<dyn Fn(String) + Send + Sync> = Arc::new(move |line: String| outbox.stream(parent.as_ref(), "stdout", &line));
        let runs = experiment::run(&exps, self.interrupter.cancel.clone(), progress).map_err(CellError::from_magic)?;
        let displays = experiment::displays(&runs);
        let plain = runs.to_string();
        if let Some(parent) = out {
            // The table first (the cell's result), then the charts below it.
            let (table, charts) = displays.split_first().expect("one table at least");
            self.outbox.publish(Some(parent), "execute_result", json!({ "execution_count": self.execution_count, "data": table, "metadata": {} }));
            for d in charts {
                self.outbox.display(Some(parent), d.clone());
            }
        }
        Ok(Some(plain))
    }

    /// Run a Rust cell; returns the plain-text result for the history.
    fn run_rust(&mut self, out: Option<&Message>, src: &str) -> Result<Option<String>, CellError> {
        let interrupter = self.interrupter.clone();
        let ready = self.evaluator.get().map_err(|e| CellError::new("EvcxrError", &e))?;
        if let Some(e) = ready.prelude_error.take() {
            if let Some(p) = out {
                self.outbox.stream(Some(p), "stderr", &format!("{e}\n"));
            }
        }
        // An interrupt from here on kills the evaluation process (the hook's compile included).
        *interrupter.rust_child.lock().expect("interrupt lock") = Some(ready.child.clone());
        // A process evcxr restarted (after an interrupt or a crash) lacks the `?` hook.
        ready.hook();
        ready.set_parent(out.cloned());
        let result = ready.ctx.execute(src);
        *interrupter.rust_child.lock().expect("interrupt lock") = None;
        // The evaluation process may have been restarted (panic, interrupt): follow it.
        ready.child = ready.ctx.process_handle();
        ready.wait_flushed();
        let panic = ready.take_panic();
        let early_return = ready.take_early_return();
        ready.set_parent(None);
        match result {
            Ok(_) if panic.is_some() => {
                let lines = panic.unwrap_or_default();
                let evalue = lines.iter().skip(1).cloned().collect::<Vec<_>>().join("\n");
                let evalue = if evalue.is_empty() { lines.join("\n") } else { evalue };
                Err(CellError { ename: "Panic".into(), evalue, traceback: lines })
            }
            Ok(_) if early_return.is_some() => {
                let mut lines = early_return.unwrap_or_default();
                while lines.last().is_some_and(|l| l.trim().is_empty()) {
                    lines.pop();
                }
                let evalue = lines.last().cloned().unwrap_or_default();
                // The error's text: the last paragraph the cell printed on stderr.
                let start = lines.iter().rposition(|l| l.trim().is_empty()).map_or(0, |i| i + 1);
                let mut traceback = vec!["Error: the cell returned early through `?`:".to_string()];
                traceback.extend(lines[start..].iter().cloned());
                Err(CellError { ename: "Error".into(), evalue, traceback })
            }
            Ok(outputs) => {
                let mut data = Map::new();
                for (mime, content) in &outputs.content_by_mime_type {
                    data.insert(mime.clone(), Value::String(content.clone()));
                }
                let plain = outputs.get("text/plain").map(str::to_string);
                if let (Some(parent), false) = (out, data.is_empty()) {
                    self.outbox.publish(Some(parent), "execute_result", json!({ "execution_count": self.execution_count, "data": data, "metadata": {} }));
                }
                Ok(plain)
            }
            Err(evcxr::Error::CompilationErrors(errors)) => {
                let evalue = errors.iter().map(|e| e.message()).filter(|m| !m.is_empty()).collect::<Vec<_>>().join("; ");
                let mut traceback: Vec<String> = errors.iter().flat_map(|e| e.rendered().lines().map(str::to_string).collect::<Vec<_>>()).collect();
                // Some of evcxr's own errors (about variables it cannot keep) carry no
                // rendered text; show their help lines rather than nothing.
                if traceback.iter().all(|l| l.trim().is_empty()) {
                    traceback = errors.iter().flat_map(|e| std::iter::once(e.message()).chain(e.help())).filter(|l| !l.is_empty()).collect();
                }
                let evalue = if evalue.is_empty() { traceback.first().cloned().unwrap_or_else(|| "compilation failed".into()) } else { evalue };
                Err(CellError { ename: "CompilationError".into(), evalue, traceback })
            }
            Err(evcxr::Error::SubprocessTerminated(m)) => Err(CellError::new(
                "SubprocessTerminated",
                &format!("{m}\nThe evaluation process ended (interrupt, crash or abort) and was restarted: variables defined in earlier cells are gone."),
            )),
            Err(e) => {
                let text = e.to_string();
                let ename = if text.contains("panic") { "Panic" } else { "EvcxrError" };
                Err(CellError::new(ename, text.trim()))
            }
        }
    }

    fn complete(&mut self, msg: &Message) {
        let code = msg.str_field("code").to_string();
        let cursor = msg.content.get("cursor_pos").and_then(Value::as_u64).map_or(code.chars().count(), |c| c as usize);
        let mut reply = json!({ "status": "ok", "matches": [], "cursor_start": cursor, "cursor_end": cursor, "metadata": {} });
        if let Cell::Rust(_) = classify(&code) {
            if let Ok(ready) = self.evaluator.get() {
                if let Ok(c) = ready.ctx.completions(&code, byte_offset(&code, cursor)) {
                    let matches: Vec<String> = c.completions.iter().map(|m| m.code.clone()).collect();
                    reply = json!({
                        "status": "ok", "matches": matches, "cursor_start": char_index(&code, c.start_offset),
                        "cursor_end": char_index(&code, c.end_offset), "metadata": {},
                    });
                }
            }
        }
        self.outbox.reply(Channel::Shell, msg, "complete_reply", reply);
    }

    fn inspect(&mut self, msg: &Message) {
        let code = msg.str_field("code").to_string();
        let cursor = msg.content.get("cursor_pos").and_then(Value::as_u64).map_or(code.chars().count(), |c| c as usize);
        let mut reply = json!({ "status": "ok", "found": false, "data": {}, "metadata": {} });
        if let Cell::Rust(_) = classify(&code) {
            if let Ok(ready) = self.evaluator.get() {
                if let Ok((plain, html)) = ready.ctx.hover_at(&code, byte_offset(&code, cursor)) {
                    if !plain.trim().is_empty() {
                        reply = json!({ "status": "ok", "found": true, "data": { "text/plain": plain, "text/html": html }, "metadata": {} });
                    }
                }
            }
        }
        self.outbox.reply(Channel::Shell, msg, "inspect_reply", reply);
    }
}

/// A failed cell as the protocol reports it.
#[derive(Debug)]
struct CellError {
    ename: String,
    evalue: String,
    traceback: Vec<String>,
}

impl CellError {
    fn new(ename: &str, evalue: &str) -> CellError {
        CellError { ename: ename.into(), evalue: evalue.into(), traceback: std::iter::once(format!("{ename}: {evalue}")).chain(evalue.lines().skip(1).map(str::to_string)).collect() }
    }

    fn from_magic(e: experiment::MagicError) -> CellError {
        let text = e.to_string();
        CellError { ename: e.ename().into(), evalue: text.clone(), traceback: text.lines().map(str::to_string).collect() }
    }
}

//! Rust cells on evcxr: the evaluation context is created (and the moelab prelude loaded)
//! when the first Rust cell, completion or inspection needs it, not at kernel start: a
//! notebook of `%%experiment` cells then never compiles anything, and no background build
//! competes with the experiments whose timings it measures. `kernel_info` never waits (the
//! socket layer answers it).
//! Cell output printed by the evaluation process is forwarded as `stream` messages while the
//! cell runs and flushed before the cell's reply.

use crate::outbox::Outbox;
use crate::wire::Message;
use crossbeam_channel::{select, Receiver, Sender};
use evcxr::{CommandContext, EvalContextOutputs};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The child process evcxr runs cells in (killed to interrupt a Rust cell).
pub type ChildHandle = Arc<Mutex<std::process::Child>>;

/// A started evaluation context.
pub struct Ready {
    /// evcxr's context.
    pub ctx: CommandContext,
    /// The evaluation child process.
    pub child: ChildHandle,
    /// Seconds from start to ready (context creation plus prelude).
    pub startup_s: f64,
    /// The prelude's error, when it failed (cells still run, without moelab).
    pub prelude_error: Option<String>,
    flush: Sender<Sender<()>>,
    parent: Arc<Mutex<Option<Message>>>,
    panic: Arc<Mutex<Vec<String>>>,
}

/// The evaluation context, not yet started or started.
pub enum Evaluator {
    /// Not needed yet: the prelude to load and where its output goes.
    Idle {
        /// The cell that loads moelab.
        prelude: String,
        /// Where cell output is published.
        outbox: Outbox,
    },
    /// Ready for cells.
    Ready(Box<Ready>),
    /// Creation failed; every Rust cell reports this.
    Failed(String),
}

impl Evaluator {
    /// An evaluator that starts on first use, loading `prelude`.
    pub fn new(prelude: String, outbox: Outbox) -> Evaluator {
        Evaluator::Idle { prelude, outbox }
    }

    /// The context, created now if this is its first use (or the creation error).
    pub fn get(&mut self) -> Result<&mut Ready, String> {
        if let Evaluator::Idle { prelude, outbox } = self {
            *self = match create(prelude, outbox.clone()) {
                Ok(ready) => Evaluator::Ready(Box::new(ready)),
                Err(e) => Evaluator::Failed(e),
            };
        }
        match self {
            Evaluator::Ready(r) => Ok(r),
            Evaluator::Failed(e) => Err(e.clone()),
            Evaluator::Idle { .. } => unreachable!("resolved above"),
        }
    }
}

fn create(prelude: &str, outbox: Outbox) -> Result<Ready, String> {
    let t0 = Instant::now();
    let (mut ctx, outputs) = CommandContext::new().map_err(|e| format!("cannot start the Rust evaluation context (evcxr): {e}"))?;
    let parent = Arc::new(Mutex::new(None));
    let panic = Arc::new(Mutex::new(Vec::new()));
    let flush = spawn_forwarder(outputs, outbox, parent.clone(), panic.clone());
    let prelude_error = match ctx.execute(prelude) {
        Ok(_) => None,
        Err(e) => Some(format!("the moelab prelude failed to load: {e}")),
    };
    let child = ctx.process_handle();
    let ready = Ready { ctx, child, startup_s: t0.elapsed().as_secs_f64(), prelude_error, flush, parent, panic };
    ready.wait_flushed();
    eprintln!("moelab-kernel: evcxr context ready in {:.1} s{}", ready.startup_s, ready.prelude_error.as_deref().map(|e| format!(" ({e})")).unwrap_or_default());
    Ok(ready)
}

impl Ready {
    /// Route the evaluation process's output to `parent` (the running execute request).
    pub fn set_parent(&self, parent: Option<Message>) {
        *self.parent.lock().expect("parent lock") = parent;
        self.panic.lock().expect("panic lock").clear();
    }

    /// The panic message the cell printed (evcxr reports a panicking cell as a success
    /// whose stderr holds the message), if it panicked.
    pub fn take_panic(&self) -> Option<Vec<String>> {
        let lines = std::mem::take(&mut *self.panic.lock().expect("panic lock"));
        (!lines.is_empty()).then_some(lines)
    }

    /// Wait until every line the evaluation process printed so far has been published.
    pub fn wait_flushed(&self) {
        let (ack_tx, ack_rx) = crossbeam_channel::bounded(1);
        if self.flush.send(ack_tx).is_ok() {
            let _ = ack_rx.recv_timeout(Duration::from_secs(5));
        }
    }
}

/// One thread forwards the child's stdout and stderr lines as `stream` messages; a flush
/// request drains both channels (stderr lines can trail stdout by a moment) and acks.
fn spawn_forwarder(outputs: EvalContextOutputs, outbox: Outbox, parent: Arc<Mutex<Option<Message>>>, panic: Arc<Mutex<Vec<String>>>) -> Sender<Sender<()>> {
    let (flush_tx, flush_rx): (Sender<Sender<()>>, Receiver<Sender<()>>) = crossbeam_channel::unbounded();
    let EvalContextOutputs { stdout, stderr } = outputs;
    std::thread::Builder::new()
        .name("evcxr-output".into())
        .spawn(move || {
            let send = |name: &str, line: String| {
                if name == "stderr" {
                    let mut panic = panic.lock().expect("panic lock");
                    // Keep the panic line and the message after it, up to rustc's note.
                    if (line.contains(" panicked at ") || !panic.is_empty()) && !line.starts_with("note:") && panic.len() < 40 {
                        panic.push(line.clone());
                    }
                }
                let p = parent.lock().expect("parent lock").clone();
                match p {
                    Some(p) => outbox.stream(Some(&p), name, &format!("{line}\n")),
                    None => eprintln!("moelab-kernel: evcxr {name}: {line}"),
                }
            };
            loop {
                select! {
                    recv(stdout) -> line => match line { Ok(l) => send("stdout", l), Err(_) => break },
                    recv(stderr) -> line => match line { Ok(l) => send("stderr", l), Err(_) => break },
                    recv(flush_rx) -> ack => {
                        let Ok(ack) = ack else { break };
                        while let Ok(l) = stdout.try_recv() { send("stdout", l); }
                        while let Ok(l) = stderr.recv_timeout(Duration::from_millis(30)) { send("stderr", l); }
                        let _ = ack.send(());
                    }
                }
            }
        })
        .expect("spawning a thread");
    flush_tx
}

/// Byte offset of the `chars`-th character of `s` (Jupyter counts cursor positions in
/// Unicode code points).
pub fn byte_offset(s: &str, chars: usize) -> usize {
    s.char_indices().nth(chars).map_or(s.len(), |(b, _)| b)
}

/// Character index of byte offset `bytes` in `s`.
pub fn char_index(s: &str, bytes: usize) -> usize {
    s[..bytes.min(s.len())].chars().count()
}

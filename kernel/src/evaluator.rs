//! Rust cells on evcxr: the evaluation context is created (and the moelab prelude loaded)
//! when the first Rust cell, completion or inspection needs it, not at kernel start: a
//! notebook of `%%experiment` cells then never compiles anything, and no background build
//! competes with the experiments whose timings it measures. `kernel_info` never waits (the
//! socket layer answers it).
//! Cell output printed by the evaluation process is forwarded as `stream` messages while the
//! cell runs and flushed before the cell's reply.
//!
//! A cell that returns early through `?` is a success to evcxr (it prints the error on stderr
//! and a marker line on the child's stdout that it consumes itself). [`QUESTION_MARK_HOOK`],
//! run in the child after the prelude, relays the child's stdout through a pipe and writes
//! [`EARLY_RETURN_MARKER`] before evcxr's marker, on the same stdout, which evcxr passes on
//! in order and drains before a cell's `execute` returns; the kernel then reports the cell as
//! an error (a notebook's "run all" stops there). Lines still in the relay's pipe when the
//! evaluation process crashes are lost (evcxr's own pipe would have kept them).

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
    early_return: Arc<Mutex<EarlyReturn>>,
    hooked_pid: Option<u32>,
}

/// What the forwarder saw of the running cell, to name a `?` early return.
#[derive(Default)]
struct EarlyReturn {
    /// The cell's stderr lines so far (the last 40; the error's text is among the last).
    stderr: Vec<String>,
    /// The marker arrived.
    seen: bool,
}

/// The line the [`QUESTION_MARK_HOOK`] writes on the child's stdout when a cell returned early
/// through `?`; the forwarder swallows it.
pub const EARLY_RETURN_MARKER: &str = "\u{1}moelab-kernel: the cell returned early through `?`";

/// Run once per evaluation process (an environment variable holding the process id guards
/// it; a process the cell starts inherits it with another id): moves the process's stdout
/// onto a pipe whose reader thread copies every line to the old stdout, writing
/// [`EARLY_RETURN_MARKER`] before evcxr's own `EVCXR_ERROR_OCCURRED` line. The pipe's read
/// end and the old stdout are close-on-exec (`F_SETFD`, `FD_CLOEXEC`: 2 and 1 on Linux and
/// macOS), so processes a cell starts hold neither.
pub const QUESTION_MARK_HOOK: &str = r#"{
    unsafe extern "C" { fn pipe(fds: *mut i32) -> i32; fn dup(fd: i32) -> i32; fn dup2(from: i32, to: i32) -> i32; fn close(fd: i32) -> i32; fn fcntl(fd: i32, cmd: i32, ...) -> i32; }
    let me = std::process::id().to_string();
    if std::env::var("MOELAB_KERNEL_STDOUT_RELAY").ok().as_deref() != Some(me.as_str()) {
        use std::io::{BufRead, Write};
        use std::os::fd::FromRawFd;
        let _ = std::io::stdout().flush();
        let mut fds = [0i32; 2];
        if unsafe { pipe(fds.as_mut_ptr()) } == 0 {
            let old = unsafe { dup(1) };
            if old >= 0 && unsafe { dup2(fds[1], 1) } >= 0 {
                unsafe {
                    close(fds[1]);
                    fcntl(fds[0], 2, 1);
                    fcntl(old, 2, 1);
                    std::env::set_var("MOELAB_KERNEL_STDOUT_RELAY", &me);
                }
                let read = unsafe { std::fs::File::from_raw_fd(fds[0]) };
                let mut out = unsafe { std::fs::File::from_raw_fd(old) };
                std::thread::spawn(move || {
                    let mut read = std::io::BufReader::new(read);
                    let mut line = Vec::new();
                    loop {
                        line.clear();
                        if !matches!(read.read_until(b'\n', &mut line), Ok(n) if n > 0) { break; }
                        if line.trim_ascii_end() == b"EVCXR_ERROR_OCCURRED" {
                            let _ = out.write_all("\u{1}moelab-kernel: the cell returned early through `?`\n".as_bytes());
                        }
                        if out.write_all(&line).and_then(|_| out.flush()).is_err() { break; }
                    }
                });
            }
        }
    }
}"#;

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
    let early_return = Arc::new(Mutex::new(EarlyReturn::default()));
    let flush = spawn_forwarder(outputs, outbox, parent.clone(), panic.clone(), early_return.clone());
    let prelude_error = match ctx.execute(prelude) {
        Ok(_) => None,
        Err(e) => Some(format!("the moelab prelude failed to load: {e}")),
    };
    let child = ctx.process_handle();
    let mut ready = Ready { ctx, child, startup_s: t0.elapsed().as_secs_f64(), prelude_error, flush, parent, panic, early_return, hooked_pid: None };
    ready.hook();
    eprintln!("moelab-kernel: evcxr context ready in {:.1} s{}", ready.startup_s, ready.prelude_error.as_deref().map(|e| format!(" ({e})")).unwrap_or_default());
    Ok(ready)
}

impl Ready {
    /// Run [`QUESTION_MARK_HOOK`] in the evaluation process unless it ran there already (a
    /// killed or crashed process is restarted by evcxr without it). Without the hook, a `?`
    /// early return is reported as a success, as evcxr does; the failure is logged.
    pub fn hook(&mut self) {
        let pid = self.child.lock().ok().map(|c| c.id());
        if pid.is_some() && pid == self.hooked_pid {
            return;
        }
        // Tried once per process: a hook that failed is not recompiled before every cell.
        self.hooked_pid = pid;
        if let Err(e) = self.ctx.execute(QUESTION_MARK_HOOK) {
            eprintln!("moelab-kernel: the `?` early-return hook failed ({e}); such cells will report success");
        }
        self.wait_flushed();
        *self.early_return.lock().expect("early-return lock") = EarlyReturn::default();
    }

    /// Route the evaluation process's output to `parent` (the running execute request).
    pub fn set_parent(&self, parent: Option<Message>) {
        *self.parent.lock().expect("parent lock") = parent;
        self.panic.lock().expect("panic lock").clear();
        *self.early_return.lock().expect("early-return lock") = EarlyReturn::default();
    }

    /// The stderr lines the cell printed (the error's text last), if it returned early
    /// through `?`. Call after [`Ready::wait_flushed`].
    pub fn take_early_return(&self) -> Option<Vec<String>> {
        let mut e = self.early_return.lock().expect("early-return lock");
        std::mem::take(&mut e.seen).then(|| std::mem::take(&mut e.stderr))
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
fn spawn_forwarder(
    outputs: EvalContextOutputs,
    outbox: Outbox,
    parent: Arc<Mutex<Option<Message>>>,
    panic: Arc<Mutex<Vec<String>>>,
    early_return: Arc<Mutex<EarlyReturn>>,
) -> Sender<Sender<()>> {
    let (flush_tx, flush_rx): (Sender<Sender<()>>, Receiver<Sender<()>>) = crossbeam_channel::unbounded();
    let EvalContextOutputs { stdout, stderr } = outputs;
    std::thread::Builder::new()
        .name("evcxr-output".into())
        .spawn(move || {
            let send = |name: &str, line: String| {
                if name == "stdout" && line == EARLY_RETURN_MARKER {
                    early_return.lock().expect("early-return lock").seen = true;
                    return;
                }
                if name == "stderr" {
                    let mut early = early_return.lock().expect("early-return lock");
                    if early.stderr.len() == 40 {
                        early.stderr.remove(0);
                    }
                    early.stderr.push(line.clone());
                    drop(early);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hook_writes_the_marker_the_forwarder_swallows() {
        // The hook is source for the evaluation process: the marker appears there escaped.
        let escaped = EARLY_RETURN_MARKER.replace('\u{1}', "\\u{1}");
        assert!(QUESTION_MARK_HOOK.contains(&format!("\"{escaped}\\n\"")), "{QUESTION_MARK_HOOK}");
        assert!(QUESTION_MARK_HOOK.contains("b\"EVCXR_ERROR_OCCURRED\""));
    }
}

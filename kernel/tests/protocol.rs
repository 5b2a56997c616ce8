//! The kernel binary over real ZeroMQ sockets: a client with the connection file's key
//! talks to it on shell, control, iopub and heartbeat, as Jupyter does. One kernel process
//! serves the whole conversation (its evcxr context takes seconds to start).

use moelab_kernel::wire::{Header, Message, Signer};
use serde_json::{json, Value};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use zeromq::{Socket, SocketRecv, SocketSend, ZmqMessage};

const KEY: &str = "a-test-key-7d3f";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

struct Client {
    shell: zeromq::DealerSocket,
    control: zeromq::DealerSocket,
    iopub: zeromq::SubSocket,
    hb: zeromq::ReqSocket,
    signer: Signer,
    session: String,
}

impl Client {
    fn request(&self, msg_type: &str, content: Value) -> Message {
        Message {
            identities: Vec::new(),
            header: Header::new(msg_type, &self.session),
            parent: None,
            metadata: json!({}),
            content,
            buffers: Vec::new(),
        }
    }

    async fn send_shell_signed_by(&mut self, signer: &Signer, msg: &Message) {
        self.shell.send(ZmqMessage::try_from(signer.encode(msg)).unwrap()).await.unwrap();
    }

    async fn shell(&mut self, msg_type: &str, content: Value) -> Message {
        let msg = self.request(msg_type, content);
        let signer = self.signer.clone();
        self.send_shell_signed_by(&signer, &msg).await;
        msg
    }

    async fn shell_reply(&mut self, timeout: Duration) -> Option<Message> {
        let frames = tokio::time::timeout(timeout, self.shell.recv()).await.ok()?.unwrap();
        Some(self.signer.decode(frames.into_vec()).expect("the kernel signs with the connection key"))
    }

    async fn control(&mut self, msg_type: &str, content: Value) -> Message {
        let msg = self.request(msg_type, content);
        self.control.send(ZmqMessage::try_from(self.signer.encode(&msg)).unwrap()).await.unwrap();
        msg
    }

    async fn control_reply(&mut self, timeout: Duration) -> Message {
        let frames = tokio::time::timeout(timeout, self.control.recv()).await.expect("control reply in time").unwrap();
        self.signer.decode(frames.into_vec()).unwrap()
    }

    async fn iopub_next(&mut self, timeout: Duration) -> Option<Message> {
        let frames = tokio::time::timeout(timeout, self.iopub.recv()).await.ok()?.unwrap();
        Some(self.signer.decode(frames.into_vec()).expect("iopub messages are signed"))
    }

    /// IOPub messages for `parent` from `busy` up to and including `idle`.
    async fn outputs(&mut self, parent: &Message, timeout: Duration) -> Vec<Message> {
        let deadline = Instant::now() + timeout;
        let mut got = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let m = self.iopub_next(left).await.unwrap_or_else(|| panic!("idle for {} not seen in {timeout:?}; got {:?}", parent.header.msg_type, types(&got)));
            if m.parent.as_ref().map(|p| &p.msg_id) != Some(&parent.header.msg_id) {
                continue;
            }
            let idle = m.header.msg_type == "status" && m.content["execution_state"] == "idle";
            got.push(m);
            if idle {
                return got;
            }
        }
    }

    /// Execute `code`: (reply, iopub messages between busy and idle).
    async fn execute(&mut self, code: &str, timeout: Duration) -> (Message, Vec<Message>) {
        let req = self.shell("execute_request", json!({ "code": code, "silent": false, "store_history": true, "user_expressions": {}, "allow_stdin": false, "stop_on_error": true })).await;
        let reply = self.shell_reply(timeout).await.unwrap_or_else(|| panic!("no execute_reply for {code:?} in {timeout:?}"));
        assert_eq!(reply.parent.as_ref().unwrap().msg_id, req.header.msg_id);
        let out = self.outputs(&req, Duration::from_secs(10)).await;
        assert_eq!(out[0].header.msg_type, "status", "busy comes first");
        assert_eq!(out[0].content["execution_state"], "busy");
        (reply, out)
    }
}

fn types(msgs: &[Message]) -> Vec<String> {
    msgs.iter().map(|m| m.header.msg_type.clone()).collect()
}

fn of_type<'a>(msgs: &'a [Message], t: &str) -> Vec<&'a Message> {
    msgs.iter().filter(|m| m.header.msg_type == t).collect()
}

fn stream_text(msgs: &[Message], name: &str) -> String {
    of_type(msgs, "stream").iter().filter(|m| m.content["name"] == name).map(|m| m.content["text"].as_str().unwrap().to_string()).collect()
}

struct Kernel(Child);

impl Drop for Kernel {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const TINY: &str = r#"name = "tiny"
variant = "topk"
[model]
d_model = 16
d_ffn = 16
n_experts = 4
top_k = 2
n_layers = 1
tokens_per_rank = 16
[layout]
ep = 2
[run]
backend = "cpu"
warmup = 0
"#;

/// Start the kernel on five free ports and wait until its log says it listens (it binds every
/// socket first). A port picked free can be taken by another process before the kernel binds
/// it (the kernel then exits with a bind error): that start is retried on fresh ports. Fails
/// with the kernel's log when no start binds within 20 s.
fn start_kernel(dir: &std::path::Path) -> (Kernel, Vec<u16>) {
    let log_path = dir.join("kernel.log");
    for _attempt in 0..5 {
        let ports: Vec<u16> = (0..5).map(|_| free_port()).collect();
        let conn = json!({
            "transport": "tcp", "ip": "127.0.0.1", "shell_port": ports[0], "iopub_port": ports[1], "stdin_port": ports[2],
            "control_port": ports[3], "hb_port": ports[4], "key": KEY, "signature_scheme": "hmac-sha256",
        });
        let conn_file = dir.join("kernel.json");
        std::fs::write(&conn_file, conn.to_string()).unwrap();
        let log = std::fs::File::create(&log_path).unwrap();
        let mut kernel = Kernel(
            Command::new(env!("CARGO_BIN_EXE_moelab-kernel"))
                .args(["run", "--connection-file"])
                .arg(&conn_file)
                .env("MOELAB_KERNEL_CACHE", dir.join("cache"))
                .env("MOELAB_KERNEL_PRELUDE", "off")
                .env("MOELAB_RUNS_DIR", dir.join("runs"))
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        );
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(20) {
            if std::fs::read_to_string(&log_path).is_ok_and(|l| l.contains("moelab-kernel: listening on")) {
                return (kernel, ports);
            }
            if kernel.0.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if kernel.0.try_wait().unwrap().is_none() {
            panic!("kernel did not bind its shell socket in 20 s; its log:\n{}", std::fs::read_to_string(&log_path).unwrap_or_default());
        }
        eprintln!("kernel exited before binding (retrying on fresh ports); its log:\n{}", std::fs::read_to_string(&log_path).unwrap_or_default());
    }
    panic!("the kernel exited before binding on 5 sets of ports; last log:\n{}", std::fs::read_to_string(&log_path).unwrap_or_default());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kernel_speaks_jupyter_protocol_5_and_drops_badly_signed_messages() {
    let dir = tempfile::tempdir().unwrap();
    let (kernel, ports) = start_kernel(dir.path());
    let ep = |p: u16| format!("tcp://127.0.0.1:{p}");
    let mut c = Client {
        shell: zeromq::DealerSocket::new(),
        control: zeromq::DealerSocket::new(),
        iopub: zeromq::SubSocket::new(),
        hb: zeromq::ReqSocket::new(),
        signer: Signer::new(KEY),
        session: "test-session".into(),
    };
    // The kernel binds as soon as it starts; retry connecting until it does.
    let t0 = Instant::now();
    loop {
        if c.shell.connect(&ep(ports[0])).await.is_ok() {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "kernel did not bind its shell socket");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    c.control.connect(&ep(ports[3])).await.unwrap();
    c.iopub.subscribe("").await.unwrap();
    c.iopub.connect(&ep(ports[1])).await.unwrap();
    c.hb.connect(&ep(ports[4])).await.unwrap();

    // kernel_info until IOPub is subscribed (the first status may be lost to the slow joiner).
    let info = loop {
        let req = c.shell("kernel_info_request", json!({})).await;
        let reply = c.shell_reply(Duration::from_secs(10)).await.expect("kernel_info_reply at once");
        if let Some(m) = c.iopub_next(Duration::from_millis(500)).await {
            if m.parent.map(|p| p.msg_id) == Some(req.header.msg_id) {
                break reply;
            }
        }
    };
    assert_eq!(info.header.msg_type, "kernel_info_reply");
    assert_eq!(info.content["language_info"]["name"], "rust");
    assert!(info.content["protocol_version"].as_str().unwrap().starts_with("5."));

    // Heartbeat echoes.
    c.hb.send(ZmqMessage::from("ping")).await.unwrap();
    let pong = tokio::time::timeout(Duration::from_secs(5), c.hb.recv()).await.unwrap().unwrap();
    assert_eq!(pong.into_vec()[0].as_ref(), b"ping");

    // %%experiment: runs in the kernel process, streams progress, shows HTML and SVG.
    let (reply, out) = c.execute(&format!("%%experiment set=run.steps:2\n{TINY}"), Duration::from_secs(60)).await;
    assert_eq!(reply.content["status"], "ok", "{:?}", reply.content);
    assert_eq!(reply.content["execution_count"], 1);
    assert!(stream_text(&out, "stdout").contains("step 1: loss"), "{:?}", types(&out));
    let result = of_type(&out, "execute_result");
    assert_eq!(result.len(), 1);
    assert!(result[0].content["data"]["text/html"].as_str().unwrap().contains("<table"));
    let svgs = of_type(&out, "display_data").iter().filter(|m| m.content["data"]["image/svg+xml"].as_str().is_some_and(|s| s.starts_with("<svg"))).count();
    assert!(svgs >= 2, "memory bars and a timeline");

    // A message signed with the wrong key: no reply, no IOPub traffic, no new execution count.
    let bad = c.request("execute_request", json!({ "code": "%%experiment\nname = \"x\"", "silent": false, "store_history": true }));
    c.send_shell_signed_by(&Signer::new("not-the-key"), &bad).await;
    assert!(c.shell_reply(Duration::from_secs(2)).await.is_none(), "a badly signed request got a reply");
    assert!(c.iopub_next(Duration::from_millis(500)).await.is_none(), "a badly signed request caused IOPub traffic");

    // Rust through evcxr: stdout stream and execute_result; the count continues at 2.
    let (reply, out) = c.execute("println!(\"hello, world\");\n1 + 2", Duration::from_secs(180)).await;
    assert_eq!(reply.content["status"], "ok", "{:?} {:?}", reply.content, types(&out));
    assert_eq!(reply.content["execution_count"], 2, "the badly signed request must not count");
    assert_eq!(stream_text(&out, "stdout"), "hello, world\n");
    assert_eq!(of_type(&out, "execute_result")[0].content["data"]["text/plain"], "3");

    // A compile error shows the compiler's message, as exactly one error output.
    let (reply, out) = c.execute("let x: u32 = \"text\";", Duration::from_secs(60)).await;
    assert_eq!(reply.content["status"], "error");
    let errors = of_type(&out, "error");
    assert_eq!(errors.len(), 1, "{:?}", types(&out));
    let tb = errors[0].content["traceback"].as_array().unwrap().iter().map(|l| l.as_str().unwrap()).collect::<Vec<_>>().join("\n");
    assert!(tb.contains("mismatched types"), "{tb}");

    // A panic is an error, and the kernel lives on.
    let (reply, out) = c.execute("panic!(\"boom\");", Duration::from_secs(60)).await;
    assert_eq!(reply.content["status"], "error", "{:?}", types(&out));
    let (reply, out) = c.execute("40 + 2", Duration::from_secs(60)).await;
    assert_eq!(reply.content["status"], "ok");
    assert_eq!(of_type(&out, "execute_result")[0].content["data"]["text/plain"], "42");

    // A `?` early return is an error (evcxr itself calls it a success), named by the error's text.
    let question_mark = "println!(\"before\");\nlet n: i32 = \"seven\".parse()?;\nn";
    let (reply, out) = c.execute(question_mark, Duration::from_secs(90)).await;
    assert_eq!(reply.content["status"], "error", "{:?} {:?}", reply.content, types(&out));
    assert!(reply.content["evalue"].as_str().unwrap().contains("invalid digit"), "{:?}", reply.content);
    assert_eq!(stream_text(&out, "stdout"), "before\n");
    assert!(!stream_text(&out, "stderr").contains("moelab-kernel"), "the marker line leaked: {:?}", stream_text(&out, "stderr"));

    // Interrupt stops a long experiment.
    let long = TINY.replace("warmup = 0", "warmup = 0\nsteps = 100000");
    let req = c.shell("execute_request", json!({ "code": format!("%%experiment\n{long}"), "silent": false, "store_history": true })).await;
    loop {
        let m = c.iopub_next(Duration::from_secs(30)).await.expect("progress from the long run");
        if m.header.msg_type == "stream" && m.parent.as_ref().unwrap().msg_id == req.header.msg_id && m.content["text"].as_str().unwrap().contains("step 1:") {
            break;
        }
    }
    let t_int = Instant::now();
    c.control("interrupt_request", json!({})).await;
    assert_eq!(c.control_reply(Duration::from_secs(5)).await.header.msg_type, "interrupt_reply");
    let reply = c.shell_reply(Duration::from_secs(30)).await.expect("the interrupted run replies");
    assert_eq!(reply.content["status"], "error");
    assert_eq!(reply.content["ename"], "KeyboardInterrupt");
    assert!(t_int.elapsed() < Duration::from_secs(10));
    c.outputs(&req, Duration::from_secs(5)).await;

    // Interrupt stops a long Rust cell (its evaluation process restarts).
    let req = c.shell("execute_request", json!({ "code": "std::thread::sleep(std::time::Duration::from_secs(120));", "silent": false, "store_history": true })).await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    c.control("interrupt_request", json!({})).await;
    c.control_reply(Duration::from_secs(5)).await;
    let reply = c.shell_reply(Duration::from_secs(60)).await.expect("the interrupted cell replies");
    assert_eq!(reply.content["status"], "error");
    c.outputs(&req, Duration::from_secs(5)).await;
    // The restarted evaluation process gets the `?` hook again.
    let (reply, out) = c.execute(question_mark, Duration::from_secs(90)).await;
    assert_eq!(reply.content["status"], "error", "after a restart: {:?} {:?}", reply.content, types(&out));
    let (reply, _) = c.execute("1 + 1", Duration::from_secs(60)).await;
    assert_eq!(reply.content["status"], "ok");

    // is_complete, complete, inspect, history, comm_info.
    for (code, want) in [("fn f() {", "incomplete"), ("let v = vec![1, 2];", "complete"), ("}", "invalid")] {
        c.shell("is_complete_request", json!({ "code": code })).await;
        assert_eq!(c.shell_reply(Duration::from_secs(5)).await.unwrap().content["status"], want, "{code}");
    }
    c.shell("complete_request", json!({ "code": "std::collections::HashM", "cursor_pos": 23 })).await;
    let r = c.shell_reply(Duration::from_secs(60)).await.unwrap();
    assert!(r.content["matches"].as_array().unwrap().iter().any(|m| m == "HashMap"), "{:?}", r.content);
    assert_eq!(r.content["cursor_end"], 23);
    c.shell("inspect_request", json!({ "code": "std::vec::Vec", "cursor_pos": 13, "detail_level": 0 })).await;
    let r = c.shell_reply(Duration::from_secs(60)).await.unwrap();
    assert_eq!(r.content["status"], "ok");
    assert_eq!(r.content["found"], true, "{:?}", r.content);
    c.shell("history_request", json!({ "hist_access_type": "tail", "n": 2, "output": false, "raw": true })).await;
    let r = c.shell_reply(Duration::from_secs(5)).await.unwrap();
    let h = r.content["history"].as_array().unwrap();
    assert_eq!(h.len(), 2);
    assert_eq!(h[1][2], "1 + 1");
    c.shell("comm_info_request", json!({})).await;
    assert_eq!(c.shell_reply(Duration::from_secs(5)).await.unwrap().content["comms"], json!({}));

    // Shutdown on control: a reply, then the process ends.
    c.control("shutdown_request", json!({ "restart": false })).await;
    assert_eq!(c.control_reply(Duration::from_secs(5)).await.header.msg_type, "shutdown_reply");
    let mut kernel = kernel;
    let t = Instant::now();
    while kernel.0.try_wait().unwrap().is_none() {
        assert!(t.elapsed() < Duration::from_secs(10), "kernel still running after shutdown");
        std::thread::sleep(Duration::from_millis(100));
    }
}

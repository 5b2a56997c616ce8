//! The socket layer: binds the five Jupyter sockets, verifies every incoming message's
//! signature (a bad one is logged and dropped: no reply, no status, no state change),
//! answers the requests that need no evaluation (kernel_info, comm_info, is_complete,
//! interrupt, shutdown) at once, and hands the rest to the engine thread in order.

use crate::cells::completeness;
use crate::connection::ConnectionInfo;
use crate::engine::Interrupter;
use crate::outbox::{Channel, Outbox, Outgoing};
use crate::wire::{Message, Signer, PROTOCOL_VERSION};
use bytes::Bytes;
use serde_json::json;
use std::sync::Arc;
use tokio::sync::mpsc::UnboundedReceiver;
use zeromq::{Socket, SocketRecv, SocketSend, ZmqMessage};

/// Why the kernel could not serve.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A socket could not be bound or failed.
    #[error("{socket} socket on {endpoint}: {message}")]
    Socket {
        /// Which socket.
        socket: &'static str,
        /// Endpoint.
        endpoint: String,
        /// The ZeroMQ error.
        message: String,
    },
}

/// What `kernel_info_reply` says about this kernel.
pub fn kernel_info() -> serde_json::Value {
    json!({
        "status": "ok",
        "protocol_version": PROTOCOL_VERSION,
        "implementation": "moelab-kernel",
        "implementation_version": env!("CARGO_PKG_VERSION"),
        "language_info": {
            "name": "rust",
            "version": "",
            "mimetype": "text/rust",
            "file_extension": ".rs",
            "pygments_lexer": "rust",
            "codemirror_mode": "rust",
        },
        "banner": "moelab-kernel: Rust on evcxr with moelab preloaded (use moelab::notebook::Experiment), and %%experiment cells that run TOML specs directly",
        "help_links": [],
        "debugger": false,
    })
}

/// Serve until a shutdown request. `engine` receives execute, complete, inspect and
/// history requests; `out` is the queue every outgoing message passes through.
pub async fn serve(
    info: ConnectionInfo,
    signer: Signer,
    outbox: Outbox,
    mut out: UnboundedReceiver<Outgoing>,
    engine: std::sync::mpsc::Sender<Message>,
    interrupter: Arc<Interrupter>,
) -> Result<(), ServeError> {
    let bind_err = |socket: &'static str, endpoint: &str| {
        let endpoint = endpoint.to_string();
        move |e: zeromq::ZmqError| ServeError::Socket { socket, endpoint, message: e.to_string() }
    };
    let (shell_ep, control_ep, iopub_ep, stdin_ep, hb_ep) = (
        info.endpoint(info.shell_port), info.endpoint(info.control_port), info.endpoint(info.iopub_port),
        info.endpoint(info.stdin_port), info.endpoint(info.hb_port),
    );
    let mut shell = zeromq::RouterSocket::new();
    shell.bind(&shell_ep).await.map_err(bind_err("shell", &shell_ep))?;
    let mut control = zeromq::RouterSocket::new();
    control.bind(&control_ep).await.map_err(bind_err("control", &control_ep))?;
    let mut iopub = zeromq::PubSocket::new();
    iopub.bind(&iopub_ep).await.map_err(bind_err("iopub", &iopub_ep))?;
    // Nothing reads from stdin (input() is not supported), but clients connect to it.
    let mut stdin = zeromq::RouterSocket::new();
    stdin.bind(&stdin_ep).await.map_err(bind_err("stdin", &stdin_ep))?;
    let mut hb = zeromq::RepSocket::new();
    hb.bind(&hb_ep).await.map_err(bind_err("heartbeat", &hb_ep))?;
    eprintln!("moelab-kernel: listening on {} (shell {}, control {}, iopub {}, hb {})", info.ip, info.shell_port, info.control_port, info.iopub_port, info.hb_port);

    tokio::spawn(async move {
        while let Ok(ping) = hb.recv().await {
            if hb.send(ping).await.is_err() {
                break;
            }
        }
    });

    let (mut shell_tx, mut shell_rx) = shell.split();
    let (mut control_tx, mut control_rx) = control.split();
    let writer_signer = signer.clone();
    let writer = tokio::spawn(async move {
        while let Some(o) = out.recv().await {
            let frames = writer_signer.encode(&o.msg);
            let Ok(zmsg) = ZmqMessage::try_from(frames) else { continue };
            let sent = match o.channel {
                Channel::Shell => shell_tx.send(zmsg).await,
                Channel::Control => control_tx.send(zmsg).await,
                Channel::IoPub => iopub.send(zmsg).await,
            };
            if let Err(e) = sent {
                eprintln!("moelab-kernel: sending {} on {:?} failed: {e}", o.msg.header.msg_type, o.channel);
            }
        }
    });

    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let control_outbox = outbox.clone();
    let control_signer = signer.clone();
    let control_stop = stop_tx.clone();
    tokio::spawn(async move {
        while let Ok(zmsg) = control_rx.recv().await {
            let Some(msg) = verified(&control_signer, "control", zmsg) else { continue };
            let o = &control_outbox;
            match msg.header.msg_type.as_str() {
                "interrupt_request" => {
                    let what = interrupter.interrupt();
                    eprintln!("moelab-kernel: interrupt: {what}");
                    o.reply(Channel::Control, &msg, "interrupt_reply", json!({ "status": "ok" }));
                }
                "shutdown_request" => {
                    let restart = msg.content.get("restart").and_then(|v| v.as_bool()).unwrap_or(false);
                    o.reply(Channel::Control, &msg, "shutdown_reply", json!({ "status": "ok", "restart": restart }));
                    let _ = control_stop.send(true);
                }
                "kernel_info_request" => o.reply(Channel::Control, &msg, "kernel_info_reply", kernel_info()),
                other => eprintln!("moelab-kernel: ignoring {other} on control"),
            }
        }
    });

    let shell_outbox = outbox.clone();
    let shell_stop = stop_tx.clone();
    tokio::spawn(async move {
        while let Ok(zmsg) = shell_rx.recv().await {
            let Some(msg) = verified(&signer, "shell", zmsg) else { continue };
            let o = &shell_outbox;
            let kind = msg.header.msg_type.clone();
            o.status(Some(&msg), "busy");
            match kind.as_str() {
                "execute_request" | "complete_request" | "inspect_request" | "history_request" => {
                    // The engine replies and publishes `idle` when done.
                    if engine.send(msg).is_err() {
                        eprintln!("moelab-kernel: the engine thread is gone; dropping {kind}");
                    }
                    continue;
                }
                "kernel_info_request" => o.reply(Channel::Shell, &msg, "kernel_info_reply", kernel_info()),
                "comm_info_request" => o.reply(Channel::Shell, &msg, "comm_info_reply", json!({ "status": "ok", "comms": {} })),
                "is_complete_request" => {
                    let status = completeness(msg.str_field("code"));
                    let mut content = json!({ "status": status.as_str() });
                    if status == crate::cells::Completeness::Incomplete {
                        content["indent"] = json!("    ");
                    }
                    o.reply(Channel::Shell, &msg, "is_complete_reply", content);
                }
                "shutdown_request" => {
                    let restart = msg.content.get("restart").and_then(|v| v.as_bool()).unwrap_or(false);
                    o.reply(Channel::Shell, &msg, "shutdown_reply", json!({ "status": "ok", "restart": restart }));
                    let _ = shell_stop.send(true);
                }
                // No comm targets are registered: a comm_open is answered by closing it.
                "comm_open" => {
                    let id = msg.content.get("comm_id").cloned().unwrap_or_default();
                    o.publish(Some(&msg), "comm_close", json!({ "comm_id": id, "data": {} }));
                }
                "comm_msg" | "comm_close" => {}
                other => eprintln!("moelab-kernel: ignoring unsupported {other}"),
            }
            o.status(Some(&msg), "idle");
        }
    });

    let _keep_stdin = stdin;
    while !*stop_rx.borrow() {
        if stop_rx.changed().await.is_err() {
            break;
        }
    }
    // Let the writer send the shutdown reply before the process exits.
    drop(outbox);
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    writer.abort();
    eprintln!("moelab-kernel: shutdown requested");
    Ok(())
}

/// Decode and verify; a bad message is logged and dropped.
fn verified(signer: &Signer, socket: &str, zmsg: ZmqMessage) -> Option<Message> {
    let frames: Vec<Bytes> = zmsg.into_vec();
    match signer.decode(frames) {
        Ok(m) => Some(m),
        Err(e) => {
            eprintln!("moelab-kernel: dropped a message on {socket}: {e}");
            None
        }
    }
}

//! Everything the kernel sends goes through one queue to the socket tasks, so messages on a
//! channel leave in the order they were made (outputs before `idle`, reply before `idle`).

use crate::wire::{Header, Message};
use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedSender;

/// Which socket a message leaves by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    /// Shell ROUTER (replies to shell requests).
    Shell,
    /// Control ROUTER (replies to control requests).
    Control,
    /// IOPub PUB (status, outputs).
    IoPub,
}

/// A message on its way out.
#[derive(Debug)]
pub struct Outgoing {
    /// Socket to send on.
    pub channel: Channel,
    /// The message.
    pub msg: Message,
}

/// A cloneable handle that queues outgoing messages; usable from any thread.
#[derive(Clone)]
pub struct Outbox {
    tx: UnboundedSender<Outgoing>,
}

impl Outbox {
    /// Wrap the sending side of the socket tasks' queue.
    pub fn new(tx: UnboundedSender<Outgoing>) -> Outbox {
        Outbox { tx }
    }

    fn send(&self, channel: Channel, msg: Message) {
        // The receiver lives as long as the kernel; a send error only happens at shutdown,
        // when nobody is listening any more.
        let _ = self.tx.send(Outgoing { channel, msg });
    }

    /// Reply to `parent` on `channel` with `msg_type` and `content`.
    pub fn reply(&self, channel: Channel, parent: &Message, msg_type: &str, content: Value) {
        self.send(channel, Message::reply_to(parent, msg_type, content));
    }

    /// Publish `msg_type` on IOPub as a child of `parent` (or of nothing).
    pub fn publish(&self, parent: Option<&Message>, msg_type: &str, content: Value) {
        let msg = match parent {
            Some(p) => {
                let mut m = Message::reply_to(p, msg_type, content);
                m.identities = vec![bytes::Bytes::from(msg_type.to_string())];
                m
            }
            None => Message {
                identities: vec![bytes::Bytes::from(msg_type.to_string())],
                header: Header::new(msg_type, "moelab-kernel"),
                parent: None,
                metadata: json!({}),
                content,
                buffers: Vec::new(),
            },
        };
        self.send(Channel::IoPub, msg);
    }

    /// Publish `status` with `execution_state` (`busy`, `idle`, `starting`).
    pub fn status(&self, parent: Option<&Message>, state: &str) {
        self.publish(parent, "status", json!({ "execution_state": state }));
    }

    /// Publish a `stream` message (`stdout` or `stderr`).
    pub fn stream(&self, parent: Option<&Message>, name: &str, text: &str) {
        self.publish(parent, "stream", json!({ "name": name, "text": text }));
    }

    /// Publish `display_data` with a MIME bundle.
    pub fn display(&self, parent: Option<&Message>, data: Value) {
        self.publish(parent, "display_data", json!({ "data": data, "metadata": {}, "transient": {} }));
    }
}

//! The Jupyter wire format: a message is `[identities..., "<IDS|MSG>", signature, header,
//! parent_header, metadata, content, buffers...]`. The signature is the hex HMAC-SHA256 of
//! the four JSON frames (header, parent_header, metadata, content) under the connection
//! file's key; binary buffers after them are not signed. An empty key disables signing.

use bytes::Bytes;
use hmac::{KeyInit, Mac};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// The delimiter between routing identities and the message proper.
pub const DELIMITER: &[u8] = b"<IDS|MSG>";

/// The messaging protocol version this kernel speaks.
pub const PROTOCOL_VERSION: &str = "5.3";

/// Why a multipart message could not be turned into a [`Message`].
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// No `<IDS|MSG>` delimiter frame.
    #[error("no <IDS|MSG> delimiter among {0} frames")]
    NoDelimiter(usize),
    /// Fewer than the five frames that follow the delimiter.
    #[error("{0} frames after the delimiter, expected at least 5")]
    TooFewFrames(usize),
    /// The signature does not match the frames under this kernel's key.
    #[error("signature does not verify (msg_type {msg_type:?})")]
    BadSignature {
        /// The claimed message type, read from the unverified header, for the log only.
        msg_type: String,
    },
    /// A frame is not the JSON it must be.
    #[error("frame {frame} is not valid JSON: {message}")]
    Json {
        /// Which frame (header, parent_header, metadata, content).
        frame: &'static str,
        /// The parser's message.
        message: String,
    },
}

/// A message header (also used as the parent header of replies).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Header {
    /// Unique id of the message.
    pub msg_id: String,
    /// Session id of the sender.
    pub session: String,
    /// User name of the sender.
    #[serde(default)]
    pub username: String,
    /// ISO 8601 time the message was made.
    #[serde(default)]
    pub date: String,
    /// Message type, e.g. `execute_request`.
    pub msg_type: String,
    /// Protocol version.
    #[serde(default)]
    pub version: String,
}

impl Header {
    /// A new header for a message this kernel sends in `session`.
    pub fn new(msg_type: &str, session: &str) -> Header {
        Header {
            msg_id: uuid::Uuid::new_v4().to_string(),
            session: session.to_string(),
            username: "moelab-kernel".to_string(),
            date: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            msg_type: msg_type.to_string(),
            version: PROTOCOL_VERSION.to_string(),
        }
    }
}

/// One Jupyter message with its routing identities.
#[derive(Debug, Clone)]
pub struct Message {
    /// ZeroMQ routing identities (ROUTER sockets) or the topic (IOPub).
    pub identities: Vec<Bytes>,
    /// This message's header.
    pub header: Header,
    /// The header of the request this message answers, or `{}`.
    pub parent: Option<Header>,
    /// Metadata dictionary.
    pub metadata: Value,
    /// Content dictionary.
    pub content: Value,
    /// Binary buffers (not signed).
    pub buffers: Vec<Bytes>,
}

impl Message {
    /// A message of `msg_type` answering `parent` (routed back to the parent's sender).
    pub fn reply_to(parent: &Message, msg_type: &str, content: Value) -> Message {
        Message {
            identities: parent.identities.clone(),
            header: Header::new(msg_type, &parent.header.session),
            parent: Some(parent.header.clone()),
            metadata: json!({}),
            content,
            buffers: Vec::new(),
        }
    }

    /// The content field `key` as a string, `""` when missing.
    pub fn str_field(&self, key: &str) -> &str {
        self.content.get(key).and_then(Value::as_str).unwrap_or("")
    }
}

/// Signs and verifies messages under the connection file's key.
#[derive(Clone)]
pub struct Signer {
    key: Vec<u8>,
}

impl Signer {
    /// A signer for `key` (`hmac-sha256`); an empty key means messages are not signed.
    pub fn new(key: &str) -> Signer {
        Signer { key: key.as_bytes().to_vec() }
    }

    fn mac(&self, parts: &[&[u8]]) -> Option<HmacSha256> {
        if self.key.is_empty() {
            return None;
        }
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("HMAC takes keys of any length");
        for p in parts {
            mac.update(p);
        }
        Some(mac)
    }

    /// Hex signature of the four JSON frames; empty when signing is off.
    pub fn sign(&self, parts: &[&[u8]]) -> String {
        match self.mac(parts) {
            None => String::new(),
            Some(mac) => hex_encode(&mac.finalize().into_bytes()),
        }
    }

    /// Whether `signature` (hex) is the signature of `parts`, compared in constant time.
    pub fn verify(&self, parts: &[&[u8]], signature: &[u8]) -> bool {
        match self.mac(parts) {
            None => true,
            Some(mac) => match hex_decode(signature) {
                Some(bytes) => mac.verify_slice(&bytes).is_ok(),
                None => false,
            },
        }
    }

    /// Serialize `msg` into multipart frames, signed.
    pub fn encode(&self, msg: &Message) -> Vec<Bytes> {
        let header = serde_json::to_vec(&msg.header).expect("header serializes");
        let parent = match &msg.parent {
            Some(p) => serde_json::to_vec(p).expect("header serializes"),
            None => b"{}".to_vec(),
        };
        let metadata = serde_json::to_vec(&msg.metadata).expect("JSON value serializes");
        let content = serde_json::to_vec(&msg.content).expect("JSON value serializes");
        let signature = self.sign(&[&header, &parent, &metadata, &content]);
        let mut frames = msg.identities.clone();
        frames.push(Bytes::from_static(DELIMITER));
        frames.push(Bytes::from(signature));
        frames.extend([header, parent, metadata, content].map(Bytes::from));
        frames.extend(msg.buffers.iter().cloned());
        frames
    }

    /// Parse and verify multipart frames. A bad signature is an error before any JSON is
    /// trusted.
    pub fn decode(&self, frames: Vec<Bytes>) -> Result<Message, WireError> {
        let n = frames.len();
        let delim = frames.iter().position(|f| f.as_ref() == DELIMITER).ok_or(WireError::NoDelimiter(n))?;
        let rest = &frames[delim + 1..];
        if rest.len() < 5 {
            return Err(WireError::TooFewFrames(rest.len()));
        }
        let (signature, header, parent, metadata, content) = (&rest[0], &rest[1], &rest[2], &rest[3], &rest[4]);
        if !self.verify(&[header, parent, metadata, content], signature) {
            let msg_type = serde_json::from_slice::<Value>(header)
                .ok()
                .and_then(|h| h.get("msg_type").and_then(Value::as_str).map(str::to_string))
                .unwrap_or_default();
            return Err(WireError::BadSignature { msg_type });
        }
        let json = |frame: &'static str, b: &Bytes| {
            serde_json::from_slice::<Value>(b).map_err(|e| WireError::Json { frame, message: e.to_string() })
        };
        let header: Header = serde_json::from_slice(header).map_err(|e| WireError::Json { frame: "header", message: e.to_string() })?;
        let parent_value = json("parent_header", parent)?;
        let parent = if parent_value.as_object().is_some_and(|o| o.is_empty()) {
            None
        } else {
            serde_json::from_value(parent_value).ok()
        };
        Ok(Message {
            identities: frames[..delim].to_vec(),
            header,
            parent,
            metadata: json("metadata", metadata)?,
            content: json("content", content)?,
            buffers: rest[5..].to_vec(),
        })
    }
}

fn hex_encode(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn hex_decode(text: &[u8]) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 {
        return None;
    }
    text.chunks(2)
        .map(|pair| {
            let s = std::str::from_utf8(pair).ok()?;
            u8::from_str_radix(s, 16).ok()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Message {
        Message {
            identities: vec![Bytes::from_static(b"peer")],
            header: Header::new("execute_request", "s1"),
            parent: None,
            metadata: json!({}),
            content: json!({"code": "1 + 1"}),
            buffers: vec![Bytes::from_static(b"\x00\x01")],
        }
    }

    #[test]
    fn encode_then_decode_round_trips_under_the_same_key() {
        let s = Signer::new("secret");
        let m = s.decode(s.encode(&sample())).expect("verifies");
        assert_eq!(m.header.msg_type, "execute_request");
        assert_eq!(m.content["code"], "1 + 1");
        assert_eq!(m.identities, vec![Bytes::from_static(b"peer")]);
        assert_eq!(m.buffers.len(), 1);
    }

    #[test]
    fn a_message_signed_with_another_key_is_rejected() {
        let frames = Signer::new("wrong").encode(&sample());
        assert!(matches!(Signer::new("secret").decode(frames), Err(WireError::BadSignature { .. })));
    }

    #[test]
    fn a_tampered_content_frame_is_rejected_but_buffers_are_not_signed() {
        let s = Signer::new("secret");
        let mut frames = s.encode(&sample());
        let last = frames.len() - 1;
        frames[last] = Bytes::from_static(b"other buffer");
        assert!(s.decode(frames.clone()).is_ok());
        frames[last - 1] = Bytes::from_static(br#"{"code": "2"}"#);
        assert!(s.decode(frames).is_err());
    }

    #[test]
    fn signature_is_the_hmac_sha256_of_the_four_frames() {
        // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?".
        let sig = Signer::new("Jefe").sign(&[b"what do ya ", b"want ", b"for nothing?", b""]);
        assert_eq!(sig, "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
    }
}

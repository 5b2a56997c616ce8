//! The connection file Jupyter writes for a kernel: transport, ip, the five ports and the
//! signing key.

use serde::Deserialize;
use std::path::Path;

/// The parts of a connection file this kernel uses.
#[derive(Debug, Clone, Deserialize)]
pub struct ConnectionInfo {
    /// `tcp` (the only transport supported here).
    pub transport: String,
    /// Address to bind, e.g. `127.0.0.1`.
    pub ip: String,
    /// Shell ROUTER port.
    pub shell_port: u16,
    /// IOPub PUB port.
    pub iopub_port: u16,
    /// Stdin ROUTER port.
    pub stdin_port: u16,
    /// Control ROUTER port.
    pub control_port: u16,
    /// Heartbeat REP port.
    pub hb_port: u16,
    /// HMAC key; empty disables signing.
    #[serde(default)]
    pub key: String,
    /// Signature scheme; only `hmac-sha256` is supported.
    #[serde(default = "default_scheme")]
    pub signature_scheme: String,
}

fn default_scheme() -> String {
    "hmac-sha256".to_string()
}

/// Why a connection file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    /// The file could not be read.
    #[error("cannot read connection file {path}: {message}")]
    Read {
        /// Path given.
        path: String,
        /// OS error.
        message: String,
    },
    /// The file is not a connection file.
    #[error("connection file {path} is invalid: {message}")]
    Parse {
        /// Path given.
        path: String,
        /// Parser message.
        message: String,
    },
    /// A transport or signature scheme this kernel does not implement.
    #[error("connection file {path}: unsupported {field} {value:?} (supported: {supported})")]
    Unsupported {
        /// Path given.
        path: String,
        /// The field.
        field: &'static str,
        /// Its value.
        value: String,
        /// What works.
        supported: &'static str,
    },
}

impl ConnectionInfo {
    /// Read and check a connection file.
    pub fn load(path: &Path) -> Result<ConnectionInfo, ConnectionError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConnectionError::Read { path: p.clone(), message: e.to_string() })?;
        let info: ConnectionInfo = serde_json::from_str(&text).map_err(|e| ConnectionError::Parse { path: p.clone(), message: e.to_string() })?;
        if info.transport != "tcp" {
            return Err(ConnectionError::Unsupported { path: p, field: "transport", value: info.transport, supported: "tcp" });
        }
        if !info.key.is_empty() && info.signature_scheme != "hmac-sha256" {
            return Err(ConnectionError::Unsupported { path: p, field: "signature_scheme", value: info.signature_scheme, supported: "hmac-sha256" });
        }
        Ok(info)
    }

    /// `tcp://ip:port`.
    pub fn endpoint(&self, port: u16) -> String {
        format!("{}://{}:{}", self.transport, self.ip, port)
    }
}

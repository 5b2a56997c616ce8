//! The TCP rendezvous of an externally launched job (std::net, one JSON object per line).
//!
//! Rank 0 listens; every other rank connects (retrying until the timeout) and sends a
//! [`ToRoot::Hello`] with a magic string, the protocol version, its rank, the world size and
//! the hash of its spec. Rank 0 refuses a wrong version, world size, spec hash or a duplicate
//! rank (the refusal names the cause on both sides), and once all ranks are in it sends each
//! a [`Welcome`]: the NCCL unique id, the time base, the resolved spec and the run options.
//! Afterwards peers stream their [`WorkerLine`]s and finally their [`RankRecord`] to rank 0,
//! both sides ping each other every second, and a closed or silent connection is reported
//! as that rank's loss within seconds. No GPU is touched here.

use super::launch::{RankEvent, RankRecord, WorkerLine};
use crate::spec::ExperimentSpec;
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// First field of every hello: tells a moelab rank from a stray connection.
pub const MAGIC: &str = "moelab-rendezvous";
/// Protocol version; ranks of different versions refuse each other.
pub const VERSION: u32 = 1;
/// How often each side pings the other.
pub const PING_EVERY: Duration = Duration::from_secs(1);
/// Silence after which a connection counts as lost (a ping arrives every [`PING_EVERY`]).
pub const SILENCE_LIMIT: Duration = Duration::from_secs(20);
/// Longest hello line accepted.
const MAX_HELLO: usize = 64 * 1024;

/// Why the rendezvous failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RendezvousError {
    /// The user cancelled (Ctrl-C, SIGTERM) while rank 0 waited for the others.
    #[error("cancelled while waiting for the other ranks to join")]
    Cancelled,
    /// Rank 0 cannot listen on the port.
    #[error("rank 0 cannot listen on port {port}: {message} (fix: pick a free MASTER_PORT, or set MOELAB_RENDEZVOUS_PORT)")]
    Listen {
        /// The port.
        port: u16,
        /// The OS error.
        message: String,
    },
    /// Not every rank arrived in time.
    #[error("rendezvous timed out after {secs:.0} s: ranks {missing:?} never connected to rank 0 at port {port} (fix: start every rank with the same MASTER_ADDR/MASTER_PORT, check that rank 0's host is reachable, or raise MOELAB_RENDEZVOUS_TIMEOUT_S)")]
    Timeout {
        /// Seconds waited.
        secs: f64,
        /// Ranks that never arrived.
        missing: Vec<u32>,
        /// The rendezvous port.
        port: u16,
    },
    /// A peer could not reach rank 0 in time.
    #[error("could not reach rank 0 at {addr} within {secs:.0} s: {message} (fix: check MASTER_ADDR/MASTER_PORT, that rank 0 was started, or raise MOELAB_RENDEZVOUS_TIMEOUT_S)")]
    Unreachable {
        /// `host:port`.
        addr: String,
        /// Seconds tried.
        secs: f64,
        /// The last connection error.
        message: String,
    },
    /// Ranks run different specs.
    #[error("rank {rank} runs a different spec (hash {theirs}) than rank 0 ({ours}) (fix: start every rank with the same experiment file and moelab build)")]
    SpecMismatch {
        /// The peer's rank.
        rank: u32,
        /// The peer's spec hash.
        theirs: String,
        /// Rank 0's spec hash.
        ours: String,
    },
    /// Two processes claim one rank.
    #[error("rank {rank} connected twice (from {first} and from {second}) (fix: give every process its own RANK/SLURM_PROCID, 1..WORLD_SIZE-1 besides rank 0)")]
    DuplicateRank {
        /// The rank.
        rank: u32,
        /// Host of the first.
        first: String,
        /// Host of the second.
        second: String,
    },
    /// A hello that does not fit this job (rank out of range, other world size or version).
    #[error("{0}")]
    BadHello(String),
    /// Rank 0 refused this peer (the reason is rank 0's).
    #[error("rank 0 refused this rank: {0}")]
    Refused(String),
    /// The connection broke during the rendezvous.
    #[error("rendezvous connection: {0}")]
    Io(String),
}

/// A message from a peer to rank 0.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "msg", rename_all = "snake_case")]
pub enum ToRoot {
    /// The first message: who is connecting.
    Hello(Hello),
    /// A progress line, the same a local worker prints.
    Line {
        /// The line.
        line: WorkerLine,
    },
    /// The rank's trace and memory record (sent before its `Done`, also after a failure).
    Record {
        /// The record.
        record: Box<RankRecord>,
    },
    /// Still alive.
    Ping,
}

/// A peer's introduction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// Always [`MAGIC`].
    pub magic: String,
    /// The sender's [`VERSION`].
    pub version: u32,
    /// The sender's global rank.
    pub rank: u32,
    /// The world size the sender was launched with.
    pub world: u32,
    /// [`spec_hash`] of the sender's spec.
    pub spec_hash: String,
    /// The sender's host name (for messages).
    pub host: String,
}

impl Hello {
    /// A hello of this build for `rank` of `world`.
    pub fn new(rank: u32, world: u32, spec_hash: String) -> Hello {
        Hello { magic: MAGIC.into(), version: VERSION, rank, world, spec_hash, host: host_name() }
    }
}

/// What rank 0 hands every peer once all are in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    /// NCCL unique id as hex (`None` for one rank).
    pub nccl_id: Option<String>,
    /// Rank 0's wall-clock time base for the trace, Unix nanoseconds.
    pub epoch_unix_ns: u64,
    /// Collective timeout, seconds.
    pub timeout_s: u64,
    /// The spec every rank runs (rank 0's, with run-time choices resolved), as TOML.
    pub spec_toml: String,
    /// Fault injection (rank, op name), from rank 0's MOELAB_INJECT_FAILURE.
    pub fail_at: Option<(u32, String)>,
    /// Skip the optimizer (gradient checks).
    pub skip_optimizer: bool,
}

/// A message from rank 0 to a peer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "msg", rename_all = "snake_case")]
pub enum FromRoot {
    /// The rendezvous is complete.
    Welcome(Welcome),
    /// This peer (or the whole job) is refused.
    Refused {
        /// Why.
        reason: String,
    },
    /// Still alive.
    Ping,
    /// The job failed elsewhere: stop now.
    Stop {
        /// Rank 0's error.
        reason: String,
    },
    /// The job ended and rank 0 has everything.
    End {
        /// Whether it completed.
        ok: bool,
        /// The error, when it did not.
        message: Option<String>,
    },
}

/// A short, stable hash of the resolved spec (FNV-1a 64 of its TOML), compared at the
/// rendezvous.
pub fn spec_hash(spec: &ExperimentSpec) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in spec.to_toml().bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// This host's name, for messages ("?" when unknown).
pub fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "?".into())
}

fn send_line<T: Serialize>(w: &mut TcpStream, msg: &T) -> std::io::Result<()> {
    let mut s = serde_json::to_string(msg).map_err(std::io::Error::other)?;
    s.push('\n');
    w.write_all(s.as_bytes())?;
    w.flush()
}

/// Reads one line byte by byte (nothing is buffered past it), at most `max` bytes.
fn read_one_line(s: &mut TcpStream, max: usize) -> std::io::Result<Option<String>> {
    let mut buf = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match s.read(&mut b)? {
            0 if buf.is_empty() => return Ok(None),
            0 => return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "connection closed mid-line")),
            _ if b[0] == b'\n' => return Ok(Some(String::from_utf8_lossy(&buf).into_owned())),
            _ => {
                buf.push(b[0]);
                if buf.len() > max {
                    return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "line too long"));
                }
            }
        }
    }
}

/// A peer that passed the rendezvous, not yet welcomed.
#[derive(Debug)]
pub struct Peer {
    /// Its global rank.
    pub rank: u32,
    /// Its host name.
    pub host: String,
    stream: TcpStream,
}

/// Binds rank 0's listener on all interfaces at `port`.
pub fn listen(port: u16) -> Result<TcpListener, RendezvousError> {
    TcpListener::bind(("0.0.0.0", port)).map_err(|e| RendezvousError::Listen { port, message: e.to_string() })
}

/// Rank 0's side: accepts `world - 1` peers on `listener` within `timeout`, checking each
/// hello against `world` and `spec_hash`. On a refusal every peer already in is told why and
/// the error is returned; connections that are not moelab's (no magic) are dropped.
pub fn serve(listener: &TcpListener, world: usize, spec_hash: &str, timeout: Duration) -> Result<Vec<Peer>, RendezvousError> {
    serve_until(listener, world, spec_hash, timeout, None)
}

/// [`serve`], which also ends, refusing the peers that joined, when `cancel` is set (rank 0's
/// Ctrl-C while it waits: without it the wait ran to the timeout).
pub fn serve_until(
    listener: &TcpListener, world: usize, spec_hash: &str, timeout: Duration, cancel: Option<&std::sync::atomic::AtomicBool>,
) -> Result<Vec<Peer>, RendezvousError> {
    let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
    let deadline = Instant::now() + timeout;
    listener.set_nonblocking(true).map_err(|e| RendezvousError::Io(e.to_string()))?;
    let mut peers: Vec<Peer> = Vec::new();
    let refuse_all = |peers: &mut Vec<Peer>, e: &RendezvousError| {
        for p in peers.iter_mut() {
            let _ = send_line(&mut p.stream, &FromRoot::Refused { reason: format!("the job was refused: {e}") });
        }
    };
    while peers.len() + 1 < world {
        let now = Instant::now();
        if cancel.is_some_and(|c| c.load(std::sync::atomic::Ordering::Relaxed)) {
            let e = RendezvousError::Cancelled;
            refuse_all(&mut peers, &e);
            return Err(e);
        }
        if now >= deadline {
            let missing = (1..world as u32).filter(|r| !peers.iter().any(|p| p.rank == *r)).collect();
            let e = RendezvousError::Timeout { secs: timeout.as_secs_f64(), missing, port };
            refuse_all(&mut peers, &e);
            return Err(e);
        }
        let mut stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            // A connection that died between SYN and accept is not the rendezvous failing.
            Err(e) if matches!(e.kind(), std::io::ErrorKind::ConnectionAborted | std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::Interrupted) => continue,
            Err(e) => return Err(RendezvousError::Io(e.to_string())),
        };
        let _ = stream.set_nonblocking(false);
        let _ = stream.set_nodelay(true);
        // A peer that stops reading must not block rank 0's writes (pings, stop) to all.
        let _ = stream.set_write_timeout(Some(Duration::from_secs(10)));
        let _ = stream.set_read_timeout(Some((deadline - now).clamp(Duration::from_millis(100), Duration::from_secs(10))));
        let Ok(Some(line)) = read_one_line(&mut stream, MAX_HELLO) else { continue };
        let Ok(ToRoot::Hello(h)) = serde_json::from_str::<ToRoot>(&line) else { continue };
        if h.magic != MAGIC {
            continue;
        }
        let problem = if h.version != VERSION {
            Some(RendezvousError::BadHello(format!("rank {} speaks rendezvous version {} but rank 0 speaks {VERSION} (fix: run the same moelab build on every rank)", h.rank, h.version)))
        } else if h.world as usize != world {
            Some(RendezvousError::BadHello(format!("rank {} was launched with world size {} but rank 0 with {world} (fix: give every rank the same WORLD_SIZE/SLURM_NTASKS)", h.rank, h.world)))
        } else if h.rank == 0 || h.rank as usize >= world {
            Some(RendezvousError::BadHello(format!("a peer claims rank {} but peers are ranks 1..{} (fix: RANK/SLURM_PROCID must be unique, below the world size)", h.rank, world - 1)))
        } else if h.spec_hash != spec_hash {
            Some(RendezvousError::SpecMismatch { rank: h.rank, theirs: h.spec_hash.clone(), ours: spec_hash.to_string() })
        } else {
            peers.iter().find(|p| p.rank == h.rank).map(|p| RendezvousError::DuplicateRank { rank: h.rank, first: p.host.clone(), second: h.host.clone() })
        };
        if let Some(e) = problem {
            let _ = send_line(&mut stream, &FromRoot::Refused { reason: e.to_string() });
            refuse_all(&mut peers, &e);
            return Err(e);
        }
        let _ = stream.set_read_timeout(None);
        peers.push(Peer { rank: h.rank, host: h.host, stream });
    }
    peers.sort_by_key(|p| p.rank);
    Ok(peers)
}

/// Rank 0's connections after the rendezvous: one reader thread per peer turning its
/// messages into [`RankEvent`]s, and a ping thread.
pub struct Hub {
    writers: Vec<(u32, Arc<Mutex<TcpStream>>)>,
    stop: Arc<AtomicBool>,
}

impl Hub {
    /// Welcomes every peer and starts listening to them: events go to `tx` tagged with the
    /// rank; a closed connection or `silence` without a message becomes [`RankEvent::Gone`].
    pub fn start(peers: Vec<Peer>, welcome: &Welcome, tx: Sender<(u32, RankEvent)>, silence: Duration) -> Hub {
        let stop = Arc::new(AtomicBool::new(false));
        let mut writers = Vec::new();
        for mut p in peers {
            let rank = p.rank;
            if let Err(e) = send_line(&mut p.stream, &FromRoot::Welcome(welcome.clone())) {
                let _ = tx.send((rank, RankEvent::Gone(format!("welcome failed: {e}"))));
                continue;
            }
            let Ok(read) = p.stream.try_clone() else {
                let _ = tx.send((rank, RankEvent::Gone("cannot read its connection".into())));
                continue;
            };
            let _ = read.set_read_timeout(Some(silence));
            let txr = tx.clone();
            let host = p.host.clone();
            std::thread::spawn(move || read_peer(rank, host, read, silence, txr));
            writers.push((rank, Arc::new(Mutex::new(p.stream))));
        }
        let ws: Vec<_> = writers.iter().map(|(_, w)| w.clone()).collect();
        let st = stop.clone();
        std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                for w in &ws {
                    let _ = send_line(&mut w.lock().unwrap_or_else(|p| p.into_inner()), &FromRoot::Ping);
                }
                std::thread::sleep(PING_EVERY);
            }
        });
        Hub { writers, stop }
    }

    /// Sends `msg` to every peer (errors ignored: a lost peer is reported by its reader).
    pub fn send_all(&self, msg: &FromRoot) {
        for (_, w) in &self.writers {
            let _ = send_line(&mut w.lock().unwrap_or_else(|p| p.into_inner()), msg);
        }
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for (_, w) in &self.writers {
            let _ = w.lock().unwrap_or_else(|p| p.into_inner()).shutdown(std::net::Shutdown::Both);
        }
    }
}

fn read_peer(rank: u32, host: String, stream: TcpStream, silence: Duration, tx: Sender<(u32, RankEvent)>) {
    let mut r = BufReader::new(stream);
    let mut line = String::new();
    loop {
        line.clear();
        let gone = match r.read_line(&mut line) {
            Ok(0) => format!("its connection to rank 0 closed (process on {host} exited or was killed)"),
            Ok(_) => {
                let ev = match serde_json::from_str::<ToRoot>(line.trim_end()) {
                    Ok(ToRoot::Line { line }) => RankEvent::Line(line),
                    Ok(ToRoot::Record { record }) => RankEvent::Record(record),
                    Ok(ToRoot::Ping) | Ok(ToRoot::Hello(_)) => continue,
                    Err(_) => RankEvent::Note(format!("unreadable message: {}", line.trim_end())),
                };
                if tx.send((rank, ev)).is_err() {
                    return;
                }
                continue;
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                format!("sent nothing for {:.0} s (host {host} down or network lost)", silence.as_secs_f64())
            }
            Err(e) => format!("its connection to rank 0 broke: {e}"),
        };
        let _ = tx.send((rank, RankEvent::Gone(gone)));
        return;
    }
}

/// What a peer hears from rank 0 after the welcome.
#[derive(Debug, Clone, PartialEq)]
pub enum RootEvent {
    /// The job failed elsewhere; rank 0's reason.
    Stop(String),
    /// The job ended (`ok`, rank 0's error).
    End(bool, Option<String>),
    /// Rank 0 is gone (connection closed or silent); what happened.
    Lost(String),
}

/// A peer's connection to rank 0.
pub struct Client {
    writer: Arc<Mutex<TcpStream>>,
    stop: Arc<AtomicBool>,
}

/// A peer's side: connects to `addr` (retrying until `timeout`), sends `hello` and waits for
/// rank 0's welcome (rank 0 sends it once every rank is in, so this waits up to about twice
/// `timeout`). Returns the client, the welcome and the stream of [`RootEvent`]s.
pub fn connect(addr: &str, hello: &Hello, timeout: Duration) -> Result<(Client, Welcome, Receiver<RootEvent>), RendezvousError> {
    let start = Instant::now();
    let deadline = start + timeout;
    let mut stream = loop {
        let attempt = addr.to_socket_addrs().map_err(|e| e.to_string()).and_then(|mut a| {
            let sa = a.next().ok_or_else(|| "address resolves to nothing".to_string())?;
            let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(100));
            TcpStream::connect_timeout(&sa, left.min(Duration::from_secs(5))).map_err(|e| e.to_string())
        });
        let last = match attempt {
            Ok(s) => break s,
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            return Err(RendezvousError::Unreachable { addr: addr.into(), secs: timeout.as_secs_f64(), message: last });
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let io = |e: std::io::Error| RendezvousError::Io(e.to_string());
    let _ = stream.set_nodelay(true);
    let _ = stream.set_write_timeout(Some(Duration::from_secs(10)));
    send_line(&mut stream, &ToRoot::Hello(hello.clone())).map_err(io)?;
    stream.set_read_timeout(Some(timeout * 2 + Duration::from_secs(10))).map_err(io)?;
    let welcome = loop {
        let line = read_one_line(&mut stream, usize::MAX).map_err(|e| RendezvousError::Io(format!("waiting for rank 0's welcome: {e}")))?;
        let Some(line) = line else {
            return Err(RendezvousError::Io("rank 0 closed the connection before welcoming this rank".into()));
        };
        match serde_json::from_str::<FromRoot>(&line) {
            Ok(FromRoot::Welcome(w)) => break w,
            Ok(FromRoot::Refused { reason }) => return Err(RendezvousError::Refused(reason)),
            Ok(FromRoot::Stop { reason }) => return Err(RendezvousError::Refused(reason)),
            Ok(_) => continue,
            Err(e) => return Err(RendezvousError::Io(format!("unreadable message from rank 0: {e}"))),
        }
    };
    stream.set_read_timeout(Some(SILENCE_LIMIT)).map_err(io)?;
    let read = stream.try_clone().map_err(io)?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || watch_root(read, tx));
    let writer = Arc::new(Mutex::new(stream));
    let stop = Arc::new(AtomicBool::new(false));
    let (w, st) = (writer.clone(), stop.clone());
    std::thread::spawn(move || {
        while !st.load(Ordering::Relaxed) {
            if send_line(&mut w.lock().unwrap_or_else(|p| p.into_inner()), &ToRoot::Ping).is_err() {
                return;
            }
            std::thread::sleep(PING_EVERY);
        }
    });
    Ok((Client { writer, stop }, welcome, rx))
}

fn watch_root(stream: TcpStream, tx: Sender<RootEvent>) {
    let mut r = BufReader::new(stream);
    let mut line = String::new();
    loop {
        line.clear();
        let ev = match r.read_line(&mut line) {
            Ok(0) => RootEvent::Lost("rank 0's connection closed (rank 0 exited or was killed)".into()),
            Ok(_) => match serde_json::from_str::<FromRoot>(line.trim_end()) {
                Ok(FromRoot::Stop { reason }) | Ok(FromRoot::Refused { reason }) => RootEvent::Stop(reason),
                Ok(FromRoot::End { ok, message }) => RootEvent::End(ok, message),
                _ => continue,
            },
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                RootEvent::Lost(format!("rank 0 sent nothing for {:.0} s (its host is down or the network is lost)", SILENCE_LIMIT.as_secs_f64()))
            }
            Err(e) => RootEvent::Lost(format!("rank 0's connection broke: {e}")),
        };
        let _ = tx.send(ev);
        return;
    }
}

impl Client {
    /// Sends one message to rank 0.
    pub fn send(&self, msg: &ToRoot) -> std::io::Result<()> {
        send_line(&mut self.writer.lock().unwrap_or_else(|p| p.into_inner()), msg)
    }

    /// A cloneable handle that sends to rank 0 (for the thread running the GPU rank).
    pub fn sender(&self) -> ClientSender {
        ClientSender(self.writer.clone())
    }
}

impl Drop for Client {
    /// Stops the pings and closes the connection (rank 0 then sees this rank gone, which is
    /// expected after its `Done`).
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.writer.lock().unwrap_or_else(|p| p.into_inner()).shutdown(std::net::Shutdown::Both);
    }
}

/// Sends messages to rank 0 from any thread.
#[derive(Clone)]
pub struct ClientSender(Arc<Mutex<TcpStream>>);

impl ClientSender {
    /// Sends one message to rank 0.
    pub fn send(&self, msg: &ToRoot) -> std::io::Result<()> {
        send_line(&mut self.0.lock().unwrap_or_else(|p| p.into_inner()), msg)
    }
}

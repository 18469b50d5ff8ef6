//! The launcher's own rank-to-rank channel: newline-delimited JSON over TCP to the master.
//!
//! Handshake ([`crate::auth`] makes and checks the proofs): the master speaks first
//! with `Challenge { nonce, job_nonce }`; the rank answers [`Hello`] with its own nonce and a
//! proof bound to job, step, rank and both nonces; the master checks it and answers
//! `Accepted { proof }` (or `Refused`), its own proof bound to the same transcript, which the
//! rank checks before it believes anything else on the connection. A connection that fails
//! is dropped and logged; it never changes the job's course. Once every rank is in, the
//! master sends `Welcome` and then drives the start with `Start { name }`.
//! Every message is one line, at most [`PRE_AUTH_LINE`] bytes before the handshake and
//! [`MAX_TO_MASTER`] / [`MAX_TO_RANK`] after it; after the handshake each one is sealed
//! (`seal.rs`: its sequence number and a MAC). The rank's proof also covers the port it
//! dialled, so a relay from another port is refused. [`Connection`] is the one place that
//! encodes, decodes, seals, reads and writes them, for both ends.

mod seal;
#[cfg(test)]
mod tests;

use seal::{decode, sealed, Seal};
pub use seal::{seal_line, SealKeys};

use crate::plan::lifecycle::Kind;
use crate::plan::NodeInfo;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Before the handshake: a Challenge, a Hello, an Accepted (a munge credential is ~200 bytes).
pub const PRE_AUTH_LINE: u64 = 64 << 10;
/// What a rank may send the master once authenticated (exit reports carry 5 short log lines).
pub const MAX_TO_MASTER: u64 = 1 << 20;
/// What the master may send a rank once authenticated: a Welcome for a thousand nodes is
/// ~150 KB; this leaves room for a hundred times that.
pub const MAX_TO_RANK: u64 = 16 << 20;
pub const PROTOCOL: u32 = 2;

/// A port block that is not free on this node: its base and what holds it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Busy {
    pub base: u16,
    pub why: String,
}

/// A rank's first message.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Hello {
    pub protocol: u32,
    pub job_id: String,
    pub step_id: String,
    pub node: String,
    pub node_rank: usize,
    pub version: String,
    /// Digest of the settings every rank must agree on ([`crate::input::settings::Settings::agreed`]).
    pub digest: String,
    /// A digest per agreed key, so that the master can name the keys that differ without
    /// anyone sending the values (an `env:` value may be a token).
    pub settings_digests: BTreeMap<String, String>,
    pub info: NodeInfo,
    /// Candidate port blocks with a port taken on this node.
    pub busy: Vec<Busy>,
    /// What this node's pre-flight check found that stops the job (a GPU held by another
    /// process, the interface down, no room for the temp dir); empty: the node is fit.
    #[serde(default)]
    pub preflight: Vec<String>,
    /// The port this rank connected to, as it sees it: the proof covers it, so a squatter
    /// that relays from another port to the master's is found out by the master.
    #[serde(default)]
    pub master_port: u16,
    /// This rank's nonce for this connection.
    pub nonce: String,
    pub proof: Option<String>,
}

impl Hello {
    /// SHA-256 of the hello without its proof (what the proof is bound to).
    pub fn digest_without_proof(&self) -> String {
        let mut h = self.clone();
        h.proof = None;
        let bytes = serde_json::to_vec(&h).expect("serializes");
        crate::auth::hex(&Sha256::digest(bytes))
    }

    /// What this hello's proof and the master's answer are bound to, on both ends; `digest` is
    /// [`Hello::digest_without_proof`], the nonces are the master's Challenge's.
    pub fn binding<'a>(
        &'a self,
        digest: &'a str,
        master_nonce: &'a str,
        job_nonce: &'a str,
    ) -> crate::auth::Binding<'a> {
        crate::auth::Binding {
            job: &self.job_id,
            step: &self.step_id,
            node_rank: self.node_rank,
            node: &self.node,
            master_nonce,
            job_nonce,
            rank_nonce: &self.nonce,
            hello: digest,
        }
    }
}

/// Slot 0 (the node's only replica, usually) is left off the wire.
fn is_zero(n: &usize) -> bool {
    *n == 0
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToMaster {
    Hello(Box<Hello>),
    /// A command reached its ready point (what its plan's `lifecycle.ready` says).
    /// `slot`: which of the node's replicas the command belongs to (0 unless several).
    Up {
        name: Kind,
        #[serde(default, skip_serializing_if = "is_zero")]
        slot: usize,
    },
    /// A command this rank runs ended (unexpectedly unless we are stopping).
    Exited {
        name: Kind,
        #[serde(default, skip_serializing_if = "is_zero")]
        slot: usize,
        status: String,
        code: i32,
        log: Option<String>,
        tail: Vec<String>,
    },
    /// Something else went wrong here: spawn failure, health failures; `kind` = of which
    /// command, when it was one.
    Failed {
        code: i32,
        reason: String,
        #[serde(default)]
        kind: Option<Kind>,
        #[serde(default, skip_serializing_if = "is_zero")]
        slot: usize,
    },
    /// A starting command's phase changed (read from its log: `loading weights`, ...).
    Phase {
        name: Kind,
        #[serde(default, skip_serializing_if = "is_zero")]
        slot: usize,
        phase: String,
    },
    /// The replica's processes on this rank are gone (after a `Reset`).
    ResetDone {
        #[serde(default, skip_serializing_if = "is_zero")]
        slot: usize,
    },
    /// This rank got a signal and is stopping.
    Stopping {
        signal: i32,
    },
    /// A service job's rank got SIGUSR1 (`--signal=USR1@…`): hand over to a successor now
    /// (the job goes on serving until the successor serves).
    HandoverNow,
    /// Teardown on this rank is complete.
    Stopped,
    Heartbeat,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToRank {
    Challenge {
        protocol: u32,
        /// Fresh for this connection.
        nonce: String,
        /// One per job (the secret method derives the job key from it).
        job_nonce: String,
    },
    /// The hello verified and the rank has its place; `proof` is the master's.
    Accepted {
        proof: Option<String>,
    },
    /// The hello verified but the rank cannot join (`code` is the exit code it should use).
    Refused {
        code: i32,
        reason: String,
        proof: Option<String>,
    },
    /// Every rank's facts in node-rank order, and the port block every rank uses: with them
    /// each rank builds the same plan.
    Welcome {
        nodes: Vec<NodeInfo>,
        block: u16,
    },
    Start {
        name: Kind,
        #[serde(default, skip_serializing_if = "is_zero")]
        slot: usize,
    },
    /// Stop this rank's processes of its replica (Ray, engine) and answer `ResetDone`; the
    /// master starts them again later. The job goes on.
    Reset {
        reason: String,
        #[serde(default, skip_serializing_if = "is_zero")]
        slot: usize,
    },
    /// Stop everything and exit with `code`; `node` caused it (if a node did).
    Stop {
        code: i32,
        reason: String,
        node: Option<String>,
    },
    Heartbeat,
}

/// The outcome string a Refused answer's proof is bound to.
pub fn refused_outcome(code: i32, reason: &str) -> String {
    format!("refused {code} {reason}")
}

pub const ACCEPTED: &str = "accepted";

#[derive(Debug)]
pub enum RecvError {
    Closed,
    TooLong,
    Bad(String),
    Io(std::io::Error),
    /// A frame after the handshake whose MAC or sequence number is wrong (forged, rewritten,
    /// replayed or out of order): dropped; the connection goes on.
    Forged(String),
}

impl std::fmt::Display for RecvError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RecvError::Closed => f.write_str("connection closed"),
            RecvError::TooLong => f.write_str("message longer than this end accepts"),
            RecvError::Bad(e) => write!(f, "unreadable message: {e}"),
            RecvError::Io(e) => write!(f, "{e}"),
            RecvError::Forged(why) => write!(f, "a frame failed its check ({why}); dropped"),
        }
    }
}

/// The longest line a [`Reader`] takes: `first` for the first `first_lines` lines (the
/// handshake), `then` after them; the owner can set it once the handshake is done.
#[derive(Clone)]
pub struct Limit(Arc<(AtomicU64, AtomicU64, u64)>);

impl Limit {
    pub fn new(n: u64) -> Limit {
        Limit::staged(n, 0, n)
    }
    /// `first` for the first `first_lines` lines, `then` for the rest (a rank reads the
    /// Challenge and the master's answer under the small limit, and a Welcome, which may
    /// arrive right behind them, under the large one).
    pub fn staged(first: u64, first_lines: u64, then: u64) -> Limit {
        Limit(Arc::new((
            AtomicU64::new(first),
            AtomicU64::new(then),
            first_lines,
        )))
    }
    pub fn set(&self, n: u64) {
        self.0 .0.store(n, Ordering::Relaxed);
        self.0 .1.store(n, Ordering::Relaxed);
    }
    fn get(&self, line: u64) -> u64 {
        if line < self.0 .2 {
            self.0 .0.load(Ordering::Relaxed)
        } else {
            self.0 .1.load(Ordering::Relaxed)
        }
    }
}

pub struct Reader<R> {
    inner: BufReader<R>,
    buf: Vec<u8>,
    limit: Limit,
    lines: u64,
}

impl<R: AsyncRead + Unpin> Reader<R> {
    pub fn new(r: R, limit: Limit) -> Self {
        Reader {
            inner: BufReader::new(r),
            buf: Vec::new(),
            limit,
            lines: 0,
        }
    }

    pub async fn recv<T: for<'de> Deserialize<'de>>(&mut self) -> Result<T, RecvError> {
        self.recv_line().await?;
        serde_json::from_slice(&self.buf).map_err(|e| RecvError::Bad(e.to_string()))
    }

    /// The next line, newline included (in `self.buf`); its index.
    async fn recv_line(&mut self) -> Result<u64, RecvError> {
        self.buf.clear();
        let max = self.limit.get(self.lines);
        self.lines += 1;
        let n = (&mut self.inner)
            .take(max)
            .read_until(b'\n', &mut self.buf)
            .await
            .map_err(RecvError::Io)?;
        if n == 0 {
            return Err(RecvError::Closed);
        }
        if self.buf.last() != Some(&b'\n') {
            return Err(if n as u64 >= max {
                RecvError::TooLong
            } else {
                RecvError::Closed
            });
        }
        Ok(self.lines - 1)
    }
}

/// One encoded message, shareable between connections (a Welcome for a thousand nodes is
/// encoded once, not a thousand times).
pub type Line = Arc<Encoded>;

/// A message as it goes on the wire (JSON and a newline), with the digest its seal covers,
/// made once however many connections it is sealed for.
pub struct Encoded {
    bytes: Vec<u8>,
    digest: std::sync::OnceLock<[u8; 32]>,
}

impl std::ops::Deref for Encoded {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.bytes
    }
}

impl Encoded {
    fn digest(&self) -> &[u8; 32] {
        self.digest.get_or_init(|| body_digest(&self.bytes))
    }
}

/// SHA-256 of a line's JSON (its newline left out): what a seal's MAC covers.
pub(super) fn body_digest(line: &[u8]) -> [u8; 32] {
    Sha256::digest(line.strip_suffix(b"\n").unwrap_or(line)).into()
}

pub fn encode<T: Serialize>(msg: &T) -> Line {
    let mut line = serde_json::to_vec(msg).expect("messages serialize");
    line.push(b'\n');
    Arc::new(Encoded {
        bytes: line,
        digest: std::sync::OnceLock::new(),
    })
}

/// The sending half of a [`Connection`]: queue messages without waiting; a writer task sends
/// them in order.
#[derive(Clone)]
pub struct Sender {
    tx: mpsc::UnboundedSender<Line>,
}

impl Sender {
    pub fn send<T: Serialize>(&self, msg: &T) {
        self.send_line(encode(msg));
    }

    pub fn send_line(&self, line: Line) {
        let _ = self.tx.send(line);
    }
}

/// A connection to the other end: a reader task that decodes one message per line (the
/// reader is not cancel-safe, so it runs on its own) and a writer task that drains the queue.
pub struct Connection<In> {
    pub sender: Sender,
    /// The longest line this end accepts now ([`PRE_AUTH_LINE`] until the handshake).
    pub limit: Limit,
    rx: mpsc::UnboundedReceiver<Result<(u64, Vec<u8>), RecvError>>,
    seal: Seal,
    in_seq: u64,
    writer: JoinHandle<()>,
    reader: JoinHandle<()>,
    _in: std::marker::PhantomData<fn() -> In>,
}

/// TCP keepalive and a user timeout: a peer whose machine vanished is noticed by the kernel
/// too, not only by the heartbeat.
pub fn tune(stream: &tokio::net::TcpStream, user_timeout: Duration) {
    let _ = stream.set_nodelay(true);
    let s = socket2::SockRef::from(stream);
    let ka = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(10))
        .with_interval(Duration::from_secs(5))
        .with_retries(3);
    let _ = s.set_tcp_keepalive(&ka);
    let _ = s.set_tcp_user_timeout(Some(user_timeout));
}

impl<In: for<'de> Deserialize<'de> + Send + 'static> Connection<In> {
    /// A connection whose lines may be [`PRE_AUTH_LINE`] long until `limit` is raised.
    pub fn new(stream: tokio::net::TcpStream) -> Connection<In> {
        Connection::with_limit(stream, Limit::new(PRE_AUTH_LINE))
    }

    pub fn with_limit(stream: tokio::net::TcpStream, limit: Limit) -> Connection<In> {
        let (rd, mut wr) = stream.into_split();
        let (in_tx, rx) = mpsc::unbounded_channel();
        let l2 = limit.clone();
        let reader = tokio::spawn(async move {
            let mut r = Reader::new(rd, l2);
            loop {
                // nobody reads any more (the connection was dropped: a refused handshake, a
                // failed attempt): stop, and let the socket close, whatever the peer does
                let m = tokio::select! {
                    m = r.recv_line() => m.map(|i| (i, std::mem::take(&mut r.buf))),
                    _ = in_tx.closed() => return,
                };
                let end = m.is_err();
                if in_tx.send(m).is_err() || end {
                    return;
                }
            }
        });
        let (tx, mut out_rx) = mpsc::unbounded_channel::<Line>();
        let seal = Seal::default();
        let out_seal = seal.clone();
        let writer = tokio::spawn(async move {
            let (mut idx, mut seq) = (0u64, 0u64);
            while let Some(l) = out_rx.recv().await {
                let frame = match out_seal.get() {
                    Some(k) if idx >= k.from_out => {
                        seq += 1;
                        Some(sealed(&k.out_key, seq - 1, &l, l.digest()))
                    }
                    _ => None,
                };
                idx += 1;
                let bytes: &[u8] = frame.as_deref().unwrap_or(&l);
                if wr.write_all(bytes).await.is_err() || wr.flush().await.is_err() {
                    return;
                }
            }
        });
        Connection {
            sender: Sender { tx },
            limit,
            rx,
            seal,
            in_seq: 0,
            writer,
            reader,
            _in: std::marker::PhantomData,
        }
    }

    /// From now on (from the lines given on), every frame is sealed and every frame read
    /// must be: called by each end once its handshake is done, before it sends or reads past
    /// it.
    pub fn seal(&self, keys: SealKeys) {
        self.seal.set(keys);
    }

    /// The next message; `Err` once the other end closed or sent something unreadable (and
    /// for ever after).
    pub async fn recv(&mut self) -> Result<In, RecvError> {
        let (idx, line) = self.rx.recv().await.unwrap_or(Err(RecvError::Closed))?;
        decode(&self.seal, &mut self.in_seq, idx, &line)
    }

    /// Split into the receiving half and a handle that flushes the sending half.
    pub fn split(self) -> (Receiver<In>, Sender, Flush) {
        (
            Receiver {
                rx: self.rx,
                seal: self.seal,
                in_seq: self.in_seq,
                reader: self.reader,
                _in: std::marker::PhantomData,
            },
            self.sender,
            Flush {
                writer: self.writer,
            },
        )
    }

    /// Close both directions now (a connection that failed the handshake).
    pub fn close(self) {
        self.reader.abort();
        self.writer.abort();
    }
}

/// The receiving half of a [`Connection`].
pub struct Receiver<In> {
    rx: mpsc::UnboundedReceiver<Result<(u64, Vec<u8>), RecvError>>,
    seal: Seal,
    in_seq: u64,
    reader: JoinHandle<()>,
    _in: std::marker::PhantomData<fn() -> In>,
}

impl<In> Drop for Receiver<In> {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl<In: for<'de> Deserialize<'de>> Receiver<In> {
    pub async fn recv(&mut self) -> Result<In, RecvError> {
        let (idx, line) = self.rx.recv().await.unwrap_or(Err(RecvError::Closed))?;
        decode(&self.seal, &mut self.in_seq, idx, &line)
    }
}

/// Waits for everything queued on a connection to be written.
pub struct Flush {
    writer: JoinHandle<()>,
}

impl Flush {
    /// Once every [`Sender`] clone is dropped, wait (at most `limit`) until the queue is written.
    pub async fn wait(self, limit: Duration) {
        let _ = tokio::time::timeout(limit, self.writer).await;
    }
}

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
//! [`MAX_TO_MASTER`] / [`MAX_TO_RANK`] after it. [`Connection`] is the one place that
//! encodes, decodes, reads and writes them, for both ends.

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
}

impl std::fmt::Display for RecvError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RecvError::Closed => f.write_str("connection closed"),
            RecvError::TooLong => f.write_str("message longer than this end accepts"),
            RecvError::Bad(e) => write!(f, "unreadable message: {e}"),
            RecvError::Io(e) => write!(f, "{e}"),
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
        serde_json::from_slice(&self.buf).map_err(|e| RecvError::Bad(e.to_string()))
    }
}

/// One encoded message, shareable between connections (a Welcome for a thousand nodes is
/// encoded once, not a thousand times).
pub type Line = Arc<Vec<u8>>;

pub fn encode<T: Serialize>(msg: &T) -> Line {
    let mut line = serde_json::to_vec(msg).expect("messages serialize");
    line.push(b'\n');
    Arc::new(line)
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
    rx: mpsc::UnboundedReceiver<Result<In, RecvError>>,
    writer: JoinHandle<()>,
    reader: JoinHandle<()>,
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
                    m = r.recv::<In>() => m,
                    _ = in_tx.closed() => return,
                };
                let end = m.is_err();
                if in_tx.send(m).is_err() || end {
                    return;
                }
            }
        });
        let (tx, mut out_rx) = mpsc::unbounded_channel::<Line>();
        let writer = tokio::spawn(async move {
            while let Some(l) = out_rx.recv().await {
                if wr.write_all(&l).await.is_err() || wr.flush().await.is_err() {
                    return;
                }
            }
        });
        Connection {
            sender: Sender { tx },
            limit,
            rx,
            writer,
            reader,
        }
    }

    /// The next message; `Err` once the other end closed or sent something unreadable (and
    /// for ever after).
    pub async fn recv(&mut self) -> Result<In, RecvError> {
        self.rx.recv().await.unwrap_or(Err(RecvError::Closed))
    }

    /// Split into the receiving half and a handle that flushes the sending half.
    pub fn split(self) -> (Receiver<In>, Sender, Flush) {
        (
            Receiver {
                rx: self.rx,
                reader: self.reader,
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
    rx: mpsc::UnboundedReceiver<Result<In, RecvError>>,
    reader: JoinHandle<()>,
}

impl<In> Drop for Receiver<In> {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl<In> Receiver<In> {
    pub async fn recv(&mut self) -> Result<In, RecvError> {
        self.rx.recv().await.unwrap_or(Err(RecvError::Closed))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> NodeInfo {
        NodeInfo {
            name: "n1".into(),
            address: "10.0.0.1".into(),
            interface: Some("eth0".into()),
            cpus: 4,
            object_store_bytes: 1 << 30,
            gpu_ids: vec![],
            preset_ifname: vec![],
            ray_client: false,
        }
    }

    fn hello() -> Hello {
        Hello {
            protocol: PROTOCOL,
            job_id: "7".into(),
            step_id: "0".into(),
            node: "n1".into(),
            node_rank: 0,
            version: "0.1.0".into(),
            digest: "ab".into(),
            settings_digests: [("config.model".to_string(), "d1".to_string())].into(),
            info: info(),
            busy: vec![],
            preflight: vec![],
            master_port: 0,
            nonce: "n".into(),
            proof: None,
        }
    }

    #[tokio::test]
    async fn a_line_over_the_limit_is_refused_before_it_is_buffered() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let (_ar, mut aw) = tokio::io::split(a);
        let (br, _bw) = tokio::io::split(b);
        let mut r = Reader::new(br, Limit::new(1024));
        tokio::spawn(async move {
            let _ = aw.write_all(&vec![b'x'; 1 << 20]).await;
        });
        assert!(matches!(
            r.recv::<ToMaster>().await,
            Err(RecvError::TooLong)
        ));
        assert!(r.buf.capacity() < 64 << 10);
    }

    #[tokio::test]
    async fn messages_round_trip_over_a_pipe() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let (ar, mut aw) = tokio::io::split(a);
        let (br, _bw) = tokio::io::split(b);
        let mut r = Reader::new(br, Limit::new(MAX_TO_MASTER));
        let msgs = vec![
            ToMaster::Hello(Box::new(hello())),
            ToMaster::Up {
                name: Kind::RayHead,
                slot: 0,
            },
            ToMaster::Exited {
                name: Kind::Engine,
                slot: 1,
                status: "signal 9 (SIGKILL)".into(),
                code: 137,
                log: None,
                tail: vec!["x".into()],
            },
            ToMaster::Heartbeat,
        ];
        for m in &msgs {
            aw.write_all(&encode(m)).await.unwrap();
        }
        drop(aw);
        drop(ar);
        for m in &msgs {
            assert_eq!(&r.recv::<ToMaster>().await.unwrap(), m);
        }
        assert!(matches!(r.recv::<ToMaster>().await, Err(RecvError::Closed)));
    }

    #[tokio::test]
    async fn garbage_is_an_error_not_a_panic() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let (_ar, mut aw) = tokio::io::split(a);
        let (br, _bw) = tokio::io::split(b);
        let mut r = Reader::new(br, Limit::new(PRE_AUTH_LINE));
        aw.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        assert!(matches!(r.recv::<ToMaster>().await, Err(RecvError::Bad(_))));
    }

    #[test]
    fn wire_format_is_tagged_json() {
        let s = serde_json::to_string(&ToRank::Start {
            name: Kind::Engine,
            slot: 0,
        })
        .unwrap();
        assert_eq!(s, r#"{"type":"start","name":"engine"}"#);
        // the hello's settings travel inside the message, next to its other fields
        let h = serde_json::to_value(ToMaster::Hello(Box::new(hello()))).unwrap();
        assert_eq!(h["type"], "hello");
        assert_eq!(h["settings_digests"]["config.model"], "d1");
        // the proof binds everything else in the hello
        let mut a = hello();
        let d = a.digest_without_proof();
        a.proof = Some("p".into());
        assert_eq!(a.digest_without_proof(), d);
        a.node_rank = 1;
        assert_ne!(a.digest_without_proof(), d);
    }

    #[tokio::test]
    async fn a_connection_carries_both_ways_and_reports_the_close() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let mut c = Connection::<ToMaster>::new(s);
            c.sender.send(&ToRank::Heartbeat);
            let got = c.recv().await.unwrap();
            let (_, sender, flush) = c.split();
            sender.send(&ToRank::Start {
                name: Kind::Client,
                slot: 0,
            });
            drop(sender);
            flush.wait(Duration::from_secs(2)).await;
            got
        });
        let mut c = Connection::<ToRank>::new(tokio::net::TcpStream::connect(addr).await.unwrap());
        assert_eq!(c.recv().await.unwrap(), ToRank::Heartbeat);
        c.sender.send(&ToMaster::Stopped);
        assert_eq!(server.await.unwrap(), ToMaster::Stopped);
        assert_eq!(
            c.recv().await.unwrap(),
            ToRank::Start {
                name: Kind::Client,
                slot: 0
            }
        );
        assert!(matches!(c.recv().await, Err(RecvError::Closed)));
        assert!(matches!(c.recv().await, Err(RecvError::Closed)));
    }
}

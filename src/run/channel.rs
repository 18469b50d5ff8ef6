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

/// The frames of one connection after its handshake: each carries its sequence number and an
/// HMAC-SHA256 over both (`JSON\tSEQ\tMAC`), one key per direction. Lines before
/// `from_in`/`from_out` (the handshake's) are plain.
#[derive(Clone)]
pub struct SealKeys {
    pub out_key: [u8; 32],
    pub in_key: [u8; 32],
    /// The index of the first sealed line read, and written.
    pub from_in: u64,
    pub from_out: u64,
}

impl SealKeys {
    /// The master's end of the connection whose handshake had these nonces: its first two
    /// lines (the Challenge, the Accepted) are plain, and what it reads after the hello is
    /// sealed.
    pub fn master(key: &crate::auth::JobKey, master_nonce: &str, rank_nonce: &str) -> SealKeys {
        let (m2r, r2m) = key.channel_keys(master_nonce, rank_nonce);
        SealKeys {
            out_key: m2r,
            in_key: r2m,
            from_in: 1,
            from_out: 2,
        }
    }

    /// The rank's end: its hello is plain, what it reads after the Challenge and the Accepted
    /// is sealed.
    pub fn rank(key: &crate::auth::JobKey, master_nonce: &str, rank_nonce: &str) -> SealKeys {
        let (m2r, r2m) = key.channel_keys(master_nonce, rank_nonce);
        SealKeys {
            out_key: r2m,
            in_key: m2r,
            from_in: 2,
            from_out: 1,
        }
    }
}

/// A connection's seal, set once its handshake is done (none: `security.auth: off`).
#[derive(Clone, Default)]
struct Seal(Arc<std::sync::Mutex<Option<SealKeys>>>);

impl Seal {
    fn get(&self) -> Option<SealKeys> {
        self.0.lock().ok().and_then(|k| k.clone())
    }
}

/// The MAC of frame `seq` whose JSON has this SHA-256 (a broadcast is hashed once, and each
/// connection's MAC covers the hash).
fn mac(key: &[u8; 32], seq: u64, digest: &[u8; 32]) -> [u8; 32] {
    use hmac::Mac as _;
    let mut m = <hmac::Hmac<Sha256> as hmac::Mac>::new_from_slice(key).expect("any key length");
    m.update(&seq.to_le_bytes());
    m.update(digest);
    m.finalize().into_bytes().into()
}

fn sealed(key: &[u8; 32], seq: u64, line: &[u8], digest: &[u8; 32]) -> Vec<u8> {
    let body = line.strip_suffix(b"\n").unwrap_or(line);
    let mut out = Vec::with_capacity(body.len() + 90);
    out.extend_from_slice(body);
    out.extend_from_slice(
        format!("\t{seq}\t{}\n", crate::auth::hex(&mac(key, seq, digest))).as_bytes(),
    );
    out
}

/// `line` (JSON and a newline) sealed with `key` as frame `seq`.
pub fn seal_line(key: &[u8; 32], seq: u64, line: &[u8]) -> Vec<u8> {
    sealed(key, seq, line, &body_digest(line))
}

/// The JSON of a sealed line, if its MAC and sequence number (`want`) are right.
fn open_line<'a>(key: &[u8; 32], want: u64, line: &'a [u8]) -> Result<&'a [u8], String> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let mut parts = line.rsplitn(3, |b| *b == b'\t');
    let (Some(tag), Some(seq), Some(body)) = (parts.next(), parts.next(), parts.next()) else {
        return Err("it carries no MAC".into());
    };
    let seq: u64 = std::str::from_utf8(seq)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or("its sequence number is unreadable")?;
    let want_mac = mac(key, seq, &body_digest(body));
    let ok = crate::auth::unhex(std::str::from_utf8(tag).unwrap_or(""))
        .is_some_and(|t| subtle::ConstantTimeEq::ct_eq(t.as_slice(), &want_mac[..]).into());
    if !ok {
        return Err(format!(
            "frame {seq}: its MAC does not verify (forged or rewritten)"
        ));
    }
    if seq != want {
        return Err(format!(
            "frame {seq} where {want} was due (replayed or reordered)"
        ));
    }
    Ok(body)
}

/// Decode line `idx` of a connection: plain before the seal's `from_in`, else opened.
fn decode<T: for<'de> Deserialize<'de>>(
    seal: &Seal,
    in_seq: &mut u64,
    idx: u64,
    line: &[u8],
) -> Result<T, RecvError> {
    let body = match seal.get() {
        Some(k) if idx >= k.from_in => {
            let body = open_line(&k.in_key, *in_seq, line).map_err(RecvError::Forged)?;
            *in_seq += 1;
            body
        }
        _ => line,
    };
    serde_json::from_slice(body).map_err(|e| RecvError::Bad(e.to_string()))
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
fn body_digest(line: &[u8]) -> [u8; 32] {
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
        if let Ok(mut k) = self.seal.0.lock() {
            *k = Some(keys);
        }
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

    #[tokio::test]
    async fn sealed_frames_pass_and_forged_replayed_reordered_ones_are_dropped() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (m2r, r2m) = crate::auth::JobKey::random().channel_keys("mn", "rn");
        let server = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let mut c = Connection::<ToMaster>::new(s);
            c.limit.set(MAX_TO_MASTER);
            c.seal(SealKeys {
                out_key: m2r,
                in_key: r2m,
                from_in: 1,
                from_out: 2,
            });
            let mut got = Vec::new();
            for _ in 0..9 {
                got.push(match c.recv().await {
                    Ok(m) => format!("{m:?}"),
                    Err(RecvError::Forged(why)) => format!("forged: {why}"),
                    Err(e) => format!("error: {e}"),
                });
            }
            got
        });
        let mut raw = tokio::net::TcpStream::connect(addr).await.unwrap();
        let hb = encode(&ToMaster::Heartbeat);
        let stopped = encode(&ToMaster::Stopped);
        let rewritten = String::from_utf8(seal_line(&r2m, 1, &hb))
            .unwrap()
            .replace("heartbeat", "stopped");
        for line in [
            encode(&ToMaster::Hello(Box::new(hello()))).to_vec(), // the handshake: plain
            seal_line(&r2m, 0, &hb),                              // frame 0
            seal_line(&r2m, 0, &hb),                              // replayed
            seal_line(&r2m, 2, &hb),                              // out of order
            stopped.to_vec(),                                     // injected, no MAC
            rewritten.into_bytes(),                               // rewritten
            seal_line(&m2r, 1, &stopped),                         // the other direction's key
            seal_line(&r2m, 1, &stopped),                         // frame 1
        ] {
            raw.write_all(&line).await.unwrap();
        }
        drop(raw);
        let got = server.await.unwrap();
        assert!(got[0].starts_with("Hello"), "{got:?}");
        assert_eq!(got[1], "Heartbeat");
        assert!(got[2].contains("frame 0 where 1 was due"), "{got:?}");
        assert!(got[3].contains("frame 2 where 1 was due"), "{got:?}");
        assert!(got[4].contains("carries no MAC"), "{got:?}");
        assert!(got[5].contains("does not verify"), "{got:?}");
        assert!(got[6].contains("does not verify"), "{got:?}");
        assert_eq!(
            got[7], "Stopped",
            "the real frame after the forged ones: {got:?}"
        );
        assert_eq!(got[8], "error: connection closed");
    }
}

//! The launcher's own rank-to-rank channel: newline-delimited JSON over TCP to the master.
//!
//! Handshake: the master speaks first with `Challenge { nonce }`; the rank answers [`Hello`]
//! with `proof` (none today; an HMAC of the nonce with a per-job secret later, without
//! changing the message flow). The master answers `Welcome` once every rank has said hello
//! (or `Stop` on a mismatch), then drives the start with `Start { name }`.
//! Every message is one line of at most [`MAX_LINE`] bytes. [`Connection`] is the one place
//! that encodes, decodes, reads and writes them, for both ends.

use crate::plan::lifecycle::Kind;
use crate::plan::NodeInfo;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// A Welcome for a thousand nodes is ~150 KB; anything much larger is not ours.
pub const MAX_LINE: u64 = 16 << 20;
pub const PROTOCOL: u32 = 1;

/// A rank's first message.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Hello {
    pub protocol: u32,
    pub node: String,
    pub node_rank: usize,
    pub version: String,
    /// Digest of the settings every rank must agree on ([`crate::input::settings::Settings::agreed`]).
    pub digest: String,
    pub info: NodeInfo,
    pub proof: Option<String>,
    /// The agreed settings themselves, so that the master can name the keys that differ
    /// when the digests do not match.
    pub settings: serde_json::Value,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToMaster {
    Hello(Box<Hello>),
    /// A command reached its ready point (what its plan's `lifecycle.ready` says).
    Up {
        name: Kind,
    },
    /// A command this rank runs ended (unexpectedly unless we are stopping).
    Exited {
        name: Kind,
        status: String,
        code: i32,
        log: Option<String>,
        tail: Vec<String>,
    },
    /// Something else went wrong here: spawn failure, health failures.
    Failed {
        code: i32,
        reason: String,
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
        nonce: String,
    },
    /// Every rank's facts in node-rank order: with them each rank builds the same plan.
    Welcome {
        nodes: Vec<NodeInfo>,
    },
    Start {
        name: Kind,
    },
    /// Stop everything and exit with `code`; `node` caused it (if a node did).
    Stop {
        code: i32,
        reason: String,
        node: Option<String>,
    },
    Heartbeat,
}

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
            RecvError::TooLong => write!(f, "message longer than {MAX_LINE} bytes"),
            RecvError::Bad(e) => write!(f, "unreadable message: {e}"),
            RecvError::Io(e) => write!(f, "{e}"),
        }
    }
}

pub struct Reader<R> {
    inner: BufReader<R>,
    buf: Vec<u8>,
}

impl<R: AsyncRead + Unpin> Reader<R> {
    pub fn new(r: R) -> Self {
        Reader {
            inner: BufReader::new(r),
            buf: Vec::new(),
        }
    }

    pub async fn recv<T: for<'de> Deserialize<'de>>(&mut self) -> Result<T, RecvError> {
        self.buf.clear();
        let n = (&mut self.inner)
            .take(MAX_LINE)
            .read_until(b'\n', &mut self.buf)
            .await
            .map_err(RecvError::Io)?;
        if n == 0 {
            return Err(RecvError::Closed);
        }
        if self.buf.last() != Some(&b'\n') {
            return Err(if n as u64 >= MAX_LINE {
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
    rx: mpsc::UnboundedReceiver<Result<In, RecvError>>,
    writer: JoinHandle<()>,
}

impl<In: for<'de> Deserialize<'de> + Send + 'static> Connection<In> {
    pub fn new(stream: tokio::net::TcpStream) -> Connection<In> {
        let _ = stream.set_nodelay(true);
        let (rd, mut wr) = stream.into_split();
        let (in_tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut r = Reader::new(rd);
            loop {
                let m = r.recv::<In>().await;
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
            rx,
            writer,
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
            Receiver { rx: self.rx },
            self.sender,
            Flush {
                writer: self.writer,
            },
        )
    }
}

/// The receiving half of a [`Connection`].
pub struct Receiver<In> {
    rx: mpsc::UnboundedReceiver<Result<In, RecvError>>,
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
        }
    }

    #[tokio::test]
    async fn messages_round_trip_over_a_pipe() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let (ar, mut aw) = tokio::io::split(a);
        let (br, _bw) = tokio::io::split(b);
        let mut r = Reader::new(br);
        let msgs = vec![
            ToMaster::Hello(Box::new(Hello {
                protocol: PROTOCOL,
                node: "n1".into(),
                node_rank: 0,
                version: "0.1.0".into(),
                digest: "ab".into(),
                info: info(),
                proof: None,
                settings: serde_json::json!({"config": {"model": "m"}}),
            })),
            ToMaster::Up {
                name: Kind::RayHead,
            },
            ToMaster::Exited {
                name: Kind::Engine,
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
        let mut r = Reader::new(br);
        aw.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        assert!(matches!(r.recv::<ToMaster>().await, Err(RecvError::Bad(_))));
    }

    #[test]
    fn wire_format_is_tagged_json() {
        let s = serde_json::to_string(&ToRank::Start { name: Kind::Engine }).unwrap();
        assert_eq!(s, r#"{"type":"start","name":"engine"}"#);
        // the hello's settings travel inside the message, next to its other fields
        let h = serde_json::to_value(ToMaster::Hello(Box::new(Hello {
            protocol: PROTOCOL,
            node: "n1".into(),
            node_rank: 0,
            version: "v".into(),
            digest: "d".into(),
            info: info(),
            proof: None,
            settings: serde_json::json!({"k": 1}),
        })))
        .unwrap();
        assert_eq!(h["type"], "hello");
        assert_eq!(h["settings"]["k"], 1);
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
            sender.send(&ToRank::Start { name: Kind::Client });
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
            ToRank::Start { name: Kind::Client }
        );
        assert!(matches!(c.recv().await, Err(RecvError::Closed)));
        assert!(matches!(c.recv().await, Err(RecvError::Closed)));
    }
}

//! The channel's messages, lines, connections and seals, over pipes and sockets.

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

//! Refused handshakes against the real master over TCP on loopback, in a process of their
//! own (the descriptor count is this process's): a connection that fails the handshake is
//! closed by the master at once, whatever the peer does with its end.

#![allow(clippy::too_many_lines)] // tests and benchmarks read better as one story each
use ray_launch::auth::{Auth, Method};
use ray_launch::cli;
use ray_launch::input::config;
use ray_launch::input::settings::{self, Overrides};
use ray_launch::input::slurm::Step;
use ray_launch::plan::NodeInfo;
use ray_launch::run::channel::{self, ToMaster};
use ray_launch::run::master as coordinator;
use std::time::{Duration, Instant};

/// Open descriptors of this process.
fn fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// A thousand connections that fail the handshake (a well-formed hello with a forged proof),
/// each kept open by the attacker: the master closes its end of every one at once, so its descriptors stay
/// flat (only the attacker's own thousand remain), and the real ranks still get in.
#[tokio::test(flavor = "current_thread")]
async fn a_thousand_refused_handshakes_leave_the_masters_descriptors_flat() {
    use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};
    cli::raise_nofile();
    let dir = tempfile::tempdir().unwrap();
    let yaml = "engine: vllm\nmodel: m\nparallel: {tensor: 1}\ngpus_per_node: 0\nvllm: {backend: mp}\nhealth: {heartbeat_timeout: 10m}\n";
    let loaded = config::parse("refused.yaml", yaml).unwrap();
    let mut step = Step::preview(vec!["n0000".into()], "124".into());
    step.self_rank = Some(0);
    let s = settings::resolve(&loaded, &Overrides::default(), &step, vec![], dir.path());
    let listener = coordinator::bind(0).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (done_tx, _done_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(coordinator::serve(
        listener,
        s,
        step,
        Auth::for_master(Method::Secret(b"a per-user secret for the test".to_vec())),
        done_tx,
    ));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let forged = channel::encode(&ToMaster::Hello(Box::new(channel::Hello {
        protocol: channel::PROTOCOL,
        job_id: "124".into(),
        step_id: "0".into(),
        node: "n0000".into(),
        node_rank: 0,
        version: env!("CARGO_PKG_VERSION").into(),
        digest: "d".into(),
        settings_digests: Default::default(),
        info: NodeInfo {
            name: "n0000".into(),
            address: "127.0.0.1".into(),
            interface: None,
            cpus: 1,
            object_store_bytes: 1 << 30,
            gpu_ids: vec![],
            preset_ifname: vec![],
            ray_client: false,
        },
        busy: vec![],
        preflight: vec![],
        master_port: 0,
        nonce: "n".into(),
        proof: Some("00".repeat(32)),
    })));
    let before = fds();
    let mut kept = Vec::new();
    for _ in 0..1000 {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let mut line = String::new();
        let mut r = tokio::io::BufReader::new(&mut s);
        // the challenge, then a hello of the right step with a forged proof
        tokio::time::timeout(Duration::from_secs(5), r.read_line(&mut line))
            .await
            .expect("a challenge")
            .unwrap();
        s.write_all(&forged).await.unwrap();
        kept.push(s);
    }
    // the master has refused them all (it answers nothing more, and closes)
    let t0 = Instant::now();
    let flat = loop {
        let now = fds();
        if now <= before + kept.len() + 16 {
            break now;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{} descriptors open: {before} before, {} of them the attacker's; the master holds the rest",
            now,
            kept.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!(
        "1000 refused handshakes, kept open by the attacker: descriptors {before} -> {flat} ({} of them the attacker's)",
        kept.len()
    );
}

//! The plan for each engine mode, as snapshots (text and JSON). Node facts are fixed here,
//! so the snapshots do not depend on the machine that runs the tests.

#![allow(clippy::too_many_lines)] // tests and benchmarks read better as one story each
use ray_launch::input::config;
use ray_launch::input::settings::{self, Overrides};
use ray_launch::input::slurm::Step;
use ray_launch::plan::{self, NodeInfo, Plan};
use std::path::Path;

fn plan_for(yaml: &str, n: usize, gpus: u32, client: &[&str]) -> ray_launch::error::Result<Plan> {
    plan_with(yaml, n, gpus, client, |_| {})
}

/// [`plan_for`] with each node's facts changed by `node` (what a node reports of itself).
fn plan_with(
    yaml: &str,
    n: usize,
    gpus: u32,
    client: &[&str],
    node: impl Fn(&mut NodeInfo),
) -> ray_launch::error::Result<Plan> {
    let loaded = config::parse("test.yaml", yaml)?;
    let names: Vec<String> = (1..=n).map(|i| format!("node{i}")).collect();
    let mut step = Step::preview(names.clone(), "4242".into());
    step.self_rank = Some(0);
    let ov = Overrides {
        gpus_per_node: Some(gpus),
        ..Default::default()
    };
    let s = settings::resolve(
        &loaded,
        &ov,
        &step,
        client.iter().map(|s| s.to_string()).collect(),
        Path::new("/home/u"),
    );
    let nodes: Vec<NodeInfo> = names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let mut info = NodeInfo {
                name: name.clone(),
                address: format!("10.1.0.{}", i + 1),
                interface: Some("ib0".into()),
                cpus: 64,
                object_store_bytes: 64 << 30,
                gpu_ids: vec![],
                preset_ifname: vec![],
                ray_client: false,
            };
            node(&mut info);
            info
        })
        .collect();
    plan::build(&s, &step, &nodes)
}

fn text(p: &Plan) -> String {
    plan::render_text(p, &(0..p.ranks.len()).collect::<Vec<_>>())
}

const RAY: &str = "engine: vllm\nmodel: /models/llama-70b\nserved_model_name: llama\nparallel:\n  tensor: 8\n  pipeline: 2\nenv:\n  HF_HOME: /scratch/hf\n";

#[test]
fn vllm_ray_two_nodes() {
    let p = plan_for(RAY, 2, 8, &[]).unwrap();
    assert_eq!(p.master.node, "node1");
    assert_eq!(p.ranks[1].role, plan::Role::RayWorker);
    // per-node values stay per node on the Ray workers: vLLM's non-carry-over list
    let engine = p.ranks[0]
        .command(ray_launch::plan::lifecycle::Kind::Engine)
        .unwrap();
    assert!(engine
        .non_carry_over
        .contains(&"VLLM_CACHE_ROOT".to_string()));
    assert!(
        !engine.non_carry_over.contains(&"HF_HOME".to_string()),
        "the same on every node"
    );
    insta::assert_snapshot!(text(&p));
    insta::assert_json_snapshot!(p);
}

#[test]
fn vllm_ray_replicas() {
    let p = plan_for(RAY, 4, 8, &[]).unwrap();
    assert_eq!(p.replicas, 2);
    assert_eq!(p.ranks[2].role, plan::Role::RayHead);
    assert_eq!(p.ranks[3].leader, "node3");
    insta::assert_snapshot!(text(&p));
}

#[test]
fn vllm_mp_three_nodes() {
    let p = plan_for(
        "engine: vllm\nmodel: m\nparallel:\n  tensor: 3\nvllm:\n  backend: mp\n",
        3,
        1,
        &[],
    )
    .unwrap();
    let headless: Vec<bool> = p
        .ranks
        .iter()
        .map(|r| r.commands[0].argv.contains(&"--headless".to_string()))
        .collect();
    assert_eq!(headless, [false, true, true]);
    insta::assert_snapshot!(text(&p));
}

#[test]
fn sglang_two_nodes() {
    let p = plan_for(
        "engine: sglang\nmodel: /models/qwen\nparallel:\n  tensor: 16\n",
        2,
        8,
        &[],
    )
    .unwrap();
    assert!(p.backend.is_none());
    insta::assert_snapshot!(text(&p));
}

#[test]
fn client_mode_runs_on_master_only() {
    let p = plan_for(RAY, 2, 8, &["python", "gen.py", "--n", "10"]).unwrap();
    let client: Vec<_> = p
        .ranks
        .iter()
        .flat_map(|r| {
            r.commands
                .iter()
                .filter(|c| c.kind == plan::lifecycle::Kind::Client)
                .map(move |c| (r.node_rank, c))
        })
        .collect();
    assert_eq!(client.len(), 1);
    assert_eq!(client[0].0, 0);
    insta::assert_snapshot!(client[0].1.shell());
}

#[test]
fn cpu_run_without_gpus_puts_every_node_in_one_replica() {
    let p = plan_for(
        "engine: vllm\nmodel: m\nparallel:\n  tensor: 2\nvllm:\n  backend: mp\n",
        2,
        0,
        &[],
    )
    .unwrap();
    assert_eq!((p.replicas, p.nodes_per_replica), (1, 2));
}

#[test]
fn two_jobs_get_different_ports() {
    let a = plan_for(RAY, 2, 8, &[]).unwrap().ports;
    let loaded = config::parse("t", RAY).unwrap();
    let step = Step::preview(vec!["n1".into()], "4243".into());
    let s = settings::resolve(
        &loaded,
        &Overrides {
            gpus_per_node: Some(16),
            ..Default::default()
        },
        &step,
        vec![],
        Path::new("/"),
    );
    let n = NodeInfo {
        name: "n1".into(),
        address: "10.0.0.1".into(),
        interface: None,
        cpus: 1,
        object_store_bytes: 1 << 30,
        gpu_ids: vec![],
        preset_ifname: vec![],
        ray_client: false,
    };
    let b = plan::build(&s, &step, &[n]).unwrap().ports;
    assert_ne!(a.channel, b.channel);
    // consecutive jobs: five blocks apart, so that a job's steps (the next blocks) stay apart too
    assert_eq!(b.channel - a.channel, 5 * plan::PORT_BLOCK);
    let range = (20000, 32767);
    let steps: Vec<u16> = (0..4)
        .map(|st| plan::block_base("4242", &st.to_string(), range))
        .collect();
    let distinct: std::collections::BTreeSet<u16> = steps.iter().copied().collect();
    assert_eq!(
        distinct.len(),
        4,
        "two steps of one job never share a block: {steps:?}"
    );
    // srun --resv-ports: Slurm's reserved ports win when they hold a whole block
    assert_eq!(plan::reserved_block("33000-33255"), Some(33000));
    assert_eq!(plan::reserved_block("33000-33300,34000"), Some(33000));
    assert_eq!(
        plan::reserved_block("33000-33015"),
        None,
        "too few for a block"
    );
    assert_eq!(plan::reserved_block("x-y"), None);
    let mut st = Step::preview(vec!["n1".into()], "4242".into());
    st.resv_ports = Some("33000-33255".into());
    assert_eq!(plan::step_blocks(&st, range), [33000]);
    st.resv_ports = Some("33000-33007".into());
    assert_eq!(
        plan::step_blocks(&st, range),
        plan::candidate_blocks("4242", "0", range)
    );
    let c = plan::candidate_blocks("4242", "0", range);
    assert_eq!(c.len(), plan::CANDIDATE_BLOCKS);
    assert_eq!(
        c.iter().collect::<std::collections::BTreeSet<_>>().len(),
        c.len()
    );
    assert!(c
        .iter()
        .all(|b| *b >= range.0 && b + plan::PORT_BLOCK - 1 <= range.1));
    // every port of a block lies inside the block
    for p in [
        a.ray_gcs,
        a.engine_http,
        a.engine_rendezvous,
        a.min_worker,
        a.max_worker,
    ] {
        assert!(p >= a.channel && p < a.channel + plan::PORT_BLOCK);
    }
}

#[test]
fn layout_errors_say_which_counts_work() {
    let e = plan_for(RAY, 3, 8, &[]).unwrap_err();
    assert!(e.msg.contains("3 nodes"), "{}", e.msg);
    assert!(e.hint.unwrap().contains("2, 4, 6"));
    let e = plan_for(RAY, 1, 8, &[]).unwrap_err();
    assert!(e.msg.contains("needs 2 nodes"), "{}", e.msg);
}

#[test]
fn a_thousand_nodes() {
    let p = plan_for(
        "engine: vllm\nmodel: m\nparallel:\n  tensor: 8\n  pipeline: 4\n",
        1000,
        8,
        &[],
    )
    .unwrap();
    assert_eq!(p.replicas, 250);
    assert_eq!(p.ranks[999].leader, "node997");
    let json = serde_json::to_string(&p).unwrap();
    assert!(json.len() < 8 << 20);
}

#[test]
fn env_values_are_filled_per_node() {
    let y = "engine: vllm\nmodel: m\nparallel: {tensor: 2}\nvllm: {backend: mp}\nenv:\n  VLLM_CPU_OMP_THREADS_BIND: '{replica_rank}'\n  TAG: '{job}-{node}-{node_rank}-{replica}'\n";
    let p = plan_for(y, 2, 1, &[]).unwrap();
    let env = |r: usize| p.ranks[r].commands[0].env.clone();
    assert_eq!(env(0)["VLLM_CPU_OMP_THREADS_BIND"], "0");
    assert_eq!(env(1)["VLLM_CPU_OMP_THREADS_BIND"], "1");
    assert_eq!(env(1)["TAG"], "4242-node2-1-0");
}

/// Every command's lifecycle (start, readiness, deadline, teardown stage, output) for each
/// mode: the rules the coordinator and the rank follow, in one table.
#[test]
fn lifecycles_per_mode() {
    let modes: [(&str, &str, usize, u32, &[&str]); 5] = [
        (
            "vllm ray, 2 nodes, client",
            RAY,
            2,
            8,
            &["python", "gen.py"],
        ),
        ("vllm ray, 2 replicas", RAY, 4, 8, &[]),
        (
            "vllm mp, 3 nodes",
            "engine: vllm\nmodel: m\nparallel:\n  tensor: 3\nvllm:\n  backend: mp\n",
            3,
            1,
            &[],
        ),
        (
            "sglang, 2 nodes",
            "engine: sglang\nmodel: m\nparallel:\n  tensor: 16\n",
            2,
            8,
            &[],
        ),
        (
            "vllm mp, 1 node, client",
            "engine: vllm\nmodel: m\nparallel:\n  tensor: 1\nvllm:\n  backend: mp\n",
            1,
            1,
            &["true"],
        ),
    ];
    let mut out = String::new();
    for (title, yaml, n, gpus, client) in modes {
        let p = plan_for(yaml, n, gpus, client).unwrap();
        out.push_str(&format!("# {title}\n"));
        for r in &p.ranks {
            for c in &r.commands {
                let l = serde_json::to_value(&c.lifecycle).unwrap();
                let ready = match l["ready"]["by"].as_str().unwrap() {
                    "log-line" => format!("log line {:?}", l["ready"]["text"].as_str().unwrap()),
                    "http" => format!("http {}", l["ready"]["url"].as_str().unwrap()),
                    other => other.to_string(),
                };
                out.push_str(&format!(
                    "rank {} {:<10} after {:<14} up: {:<40} deadline {:<21} stage {:<6} output {}\n",
                    r.node_rank,
                    c.kind.as_str(),
                    l["start_after"].as_str().unwrap(),
                    ready,
                    l["deadline"].as_str().unwrap_or("none"),
                    l["stage"].as_str().unwrap(),
                    l["output"].as_str().unwrap(),
                ));
            }
        }
    }
    insta::assert_snapshot!(out);
}

/// 8 GPUs per node, tensor 2: four replicas side by side on each node, each on its own two
/// GPUs and port, without Ray; the router over all eight.
#[test]
fn side_by_side_replicas_on_eight_gpu_nodes() {
    let yaml = "engine: vllm\nmodel: /models/llama-8b\nparallel:\n  tensor: 2\n";
    let p = plan_for(yaml, 2, 8, &[]).unwrap();
    assert_eq!(
        (p.replicas, p.replicas_per_node, p.nodes_per_replica),
        (8, 4, 1)
    );
    assert!(p.warnings.is_empty(), "{:?}", p.warnings);
    assert!(p.router.is_some());
    let gpus: Vec<&str> = p
        .endpoints
        .iter()
        .map(|e| e.gpus.as_deref().unwrap())
        .collect();
    assert_eq!(
        gpus,
        ["0,1", "2,3", "4,5", "6,7", "0,1", "2,3", "4,5", "6,7"]
    );
    let ports: Vec<&str> = p
        .endpoints
        .iter()
        .map(|e| e.url.rsplit(':').next().unwrap())
        .collect();
    assert_eq!(ports[..4], ports[4..], "the same four ports on each node");
    for r in &p.ranks {
        assert_eq!(
            r.commands
                .iter()
                .filter(|c| c.kind.as_str() == "engine")
                .count(),
            4
        );
        assert!(
            r.commands.iter().all(|c| !c.kind.is_ray()),
            "no Ray for one-node replicas"
        );
    }
    assert_eq!(p.replica_of(1, 2), 6);
    assert_eq!(p.replica_ranks(6), 1..2);
    insta::assert_snapshot!(text(&p));
    // SGLang the same way
    let p = plan_for(
        "engine: sglang\nmodel: /models/llama-8b\nparallel:\n  tensor: 4\n",
        1,
        8,
        &[],
    )
    .unwrap();
    assert_eq!(p.replicas_per_node, 2);
    let argv = &p.ranks[0].commands[1].argv;
    assert!(
        !argv
            .iter()
            .any(|a| a == "--nnodes" || a == "--dist-init-addr"),
        "{argv:?}"
    );
}

#[test]
fn a_layout_that_leaves_gpus_idle_says_how_many() {
    // tensor 3 on 8 GPUs: two replicas fit, two GPUs idle
    let p = plan_for(
        "engine: vllm\nmodel: m\nparallel:\n  tensor: 3\n",
        1,
        8,
        &[],
    )
    .unwrap();
    assert_eq!(p.replicas_per_node, 2);
    assert_eq!(
        p.warnings,
        ["2 of the 8 GPUs per node stay idle: 2 replica(s) of 3 GPU(s) each"]
    );
    // tensor 12 over two 8-GPU nodes: 4 idle per replica
    let p = plan_for(
        "engine: vllm\nmodel: m\nparallel:\n  tensor: 12\n",
        2,
        8,
        &[],
    )
    .unwrap();
    assert_eq!(p.warnings.len(), 1);
    assert!(
        p.warnings[0].starts_with("4 of the 16 GPUs of each replica stay idle"),
        "{:?}",
        p.warnings
    );
    // asking for more side by side than fit: exit 2 with the count that would
    let e = plan_for(
        "engine: vllm\nmodel: m\nparallel:\n  tensor: 2\n  replicas_per_node: 5\n",
        1,
        8,
        &[],
    )
    .unwrap_err();
    assert!(
        e.report().contains("replicas_per_node: 4"),
        "{}",
        e.report()
    );
}

/// RL-style: a policy on two nodes (Ray, tensor 8 x pipeline 2), a reward model side by side
/// on one node (4 replicas of tensor 2), a judge on the rest (SGLang), and an attached one.
const THREE: &str = "\
engine: vllm
env:
  HF_HOME: /scratch/hf
models:
  - name: policy
    model: /models/llama-70b
    parallel: {tensor: 8, pipeline: 2}
    nodes: 2
  - name: reward
    model: /models/rm-8b
    served_model_name: rm
    parallel: {tensor: 2}
    nodes: 1
    env:
      VLLM_LOGGING_LEVEL: DEBUG
  - name: judge
    engine: sglang
    model: /models/judge-8b
    parallel: {tensor: 8}
    required: false
attach:
  - name: ext
    url: http://10.9.0.1:8000/v1
    api_key_file: /home/u/.ext-key
";

#[test]
fn three_models_on_four_eight_gpu_nodes() {
    let p = plan_for(THREE, 4, 8, &["python", "rl.py"]).unwrap();
    let names: Vec<&str> = p.models.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["policy", "reward", "judge"]);
    let nodes: Vec<(usize, usize, usize)> = p
        .models
        .iter()
        .map(|m| (m.first_node, m.nodes, m.replicas))
        .collect();
    assert_eq!(nodes, [(0, 2, 1), (2, 1, 4), (3, 1, 1)]);
    assert_eq!(p.replicas, 6);
    // the policy on Ray over nodes 1-2, the reward model alone on node 3, four times
    assert_eq!(p.ranks[0].role, plan::Role::RayHead);
    assert_eq!(p.ranks[1].role, plan::Role::RayWorker);
    assert_eq!(p.ranks[2].commands.len(), 4);
    assert_eq!(p.replica_ranks(3), 2..3);
    assert_eq!(p.replica_of(2, 3), 4);
    assert_eq!(p.slot_of(4), 3);
    assert_eq!(p.replica_of(3, 0), 5);
    assert_eq!(p.slots_on(2), 4);
    assert_eq!(p.model_of_replica(5).name, "judge");
    // each engine serves under the name clients use; the entry's env on top of the job's
    let reward = &p.ranks[2].commands[1];
    assert!(reward
        .argv
        .windows(2)
        .any(|w| w == ["--served-model-name", "rm"]));
    assert_eq!(reward.env["VLLM_LOGGING_LEVEL"], "DEBUG");
    assert_eq!(reward.env["HF_HOME"], "/scratch/hf");
    assert!(!p.ranks[0].commands[0]
        .env
        .contains_key("VLLM_LOGGING_LEVEL"));
    let judge = p.ranks[3]
        .command(ray_launch::plan::lifecycle::Kind::Engine)
        .unwrap();
    assert!(judge
        .argv
        .windows(2)
        .any(|w| w == ["--served-model-name", "judge"]));
    // the router routes by name; the client gets each model's own URL
    let router = p.ranks[0]
        .command(ray_launch::plan::lifecycle::Kind::Router)
        .unwrap();
    assert!(router
        .argv
        .windows(2)
        .any(|w| w == ["--attach-key", "ext=/home/u/.ext-key"]));
    let client = p.ranks[0]
        .command(ray_launch::plan::lifecycle::Kind::Client)
        .unwrap();
    assert_eq!(
        client.env["RAY_LAUNCH_MODEL_REWARD_URL"],
        "http://10.1.0.1:30762/models/reward/v1"
    );
    assert_eq!(
        client.env["RAY_LAUNCH_MODEL_EXT_URL"],
        "http://10.1.0.1:30762/models/ext/v1"
    );
    assert_eq!(client.env["OPENAI_BASE_URL"], "http://10.1.0.1:30762/v1");
    insta::assert_snapshot!(text(&p));
    insta::assert_json_snapshot!(p.models);
}

#[test]
fn a_model_that_does_not_fit_says_what_each_needs() {
    let e = plan_for(THREE, 3, 8, &[]).unwrap_err();
    assert_eq!(
        e.msg,
        "the models ask for 4+ node(s) (policy 2, reward 1, judge the rest (at least 1)) but the step has 3"
    );
    assert_eq!(
        e.hint.as_deref(),
        Some("run on at least 4 nodes (`#SBATCH --nodes=4`), or give the models fewer nodes")
    );
    // the judge's tensor 16 needs two nodes; the rest is one
    let e = plan_for(
        &THREE.replace("tensor: 8}\n    required", "tensor: 16}\n    required"),
        4,
        8,
        &[],
    )
    .unwrap_err();
    assert!(
        e.msg.starts_with(
            "model `judge` gets 1 of the step's 4 node(s) (node4): one replica needs 2 nodes"
        ),
        "{}",
        e.msg
    );
}

/// MoE layouts on 4 x 8 GPUs: vLLM mp with data 4 x tensor 8 over 4 nodes (one replica),
/// vLLM on Ray with data 2 x tensor 8 over 2 nodes (two replicas), SGLang tensor 16 with
/// data-parallel attention 4 over 2 nodes (two replicas).
#[test]
fn data_and_expert_parallel_layouts_on_four_eight_gpu_nodes() {
    let mp = plan_for(
        "engine: vllm\nmodel: /models/DeepSeek-V3\nparallel: {data: 4, tensor: 8, expert: true}\nvllm: {backend: mp}\n",
        4,
        8,
        &[],
    )
    .unwrap();
    assert_eq!((mp.replicas, mp.nodes_per_replica), (1, 4));
    let argv = &mp.ranks[3].commands[0].argv;
    for (flag, value) in [
        ("--data-parallel-size", "4"),
        ("--nnodes", "4"),
        ("--node-rank", "3"),
        (
            "--data-parallel-rpc-port",
            &mp.ports.data_parallel_rpc.to_string(),
        ),
    ] {
        assert!(
            argv.windows(2).any(|w| w[0] == flag && w[1] == value),
            "{flag} {value}: {argv:?}"
        );
    }
    assert!(argv.contains(&"--enable-expert-parallel".to_string()));
    assert!(argv.contains(&"--headless".to_string()));
    insta::assert_snapshot!("vllm_mp_data_4_tensor_8_expert", text(&mp));

    let ray = plan_for(
        "engine: vllm\nmodel: /models/Qwen3-30B-A3B\nparallel: {data: 2, tensor: 8, expert: true}\n",
        4,
        8,
        &[],
    )
    .unwrap();
    assert_eq!((ray.replicas, ray.nodes_per_replica), (2, 2));
    let engine = ray.ranks[2]
        .command(ray_launch::plan::lifecycle::Kind::Engine)
        .unwrap();
    assert!(engine
        .argv
        .windows(2)
        .any(|w| w == ["--data-parallel-backend", "ray"]));
    assert!(engine
        .argv
        .windows(2)
        .any(|w| w == ["--data-parallel-address", "10.1.0.3"]));
    insta::assert_snapshot!("vllm_ray_data_2_tensor_8_expert", text(&ray));

    let sg = plan_for(
        "engine: sglang\nmodel: /models/Qwen3-235B-A22B\nparallel: {tensor: 16, data: 4, expert: true}\n",
        4,
        8,
        &[],
    )
    .unwrap();
    assert_eq!((sg.replicas, sg.nodes_per_replica), (2, 2));
    let argv = &sg.ranks[1].commands[0].argv;
    assert!(
        argv.windows(3)
            .any(|w| w == ["--dp-size", "4", "--enable-dp-attention"]),
        "{argv:?}"
    );
    assert!(
        argv.windows(2).any(|w| w == ["--ep-size", "16"]),
        "{argv:?}"
    );
    assert!(
        !argv.contains(&"--pp-size".to_string()),
        "only when > 1: {argv:?}"
    );
    insta::assert_snapshot!("sglang_tensor_16_data_4_expert", text(&sg));

    // what does not fit says which counts would
    let e = plan_for(
        "engine: vllm\nmodel: m\nparallel: {data: 4, tensor: 8}\nvllm: {backend: mp}\n",
        3,
        8,
        &[],
    )
    .unwrap_err();
    assert_eq!(
        e.msg,
        "one replica needs 4 nodes (data 4 x tensor 8 x pipeline 1 = 32 GPUs at 8 per node) but the step has 3"
    );
}

#[test]
fn site_interface_variables_stay_unless_the_config_names_the_network() {
    let yaml = "engine: vllm\nmodel: m\nparallel: {tensor: 8}\n";
    let env_of = |yaml: &str, preset: &[&str]| {
        let p = plan_with(yaml, 1, 8, &[], |n| {
            n.preset_ifname = preset.iter().map(|p| p.to_string()).collect()
        })
        .unwrap();
        p.ranks[0].commands[0].env.clone()
    };
    // the site exported NCCL_SOCKET_IFNAME=hsn: ray-launch leaves it, sets only Gloo's
    let env = env_of(yaml, &["NCCL_SOCKET_IFNAME"]);
    assert!(!env.contains_key("NCCL_SOCKET_IFNAME"), "{env:?}");
    assert_eq!(env["GLOO_SOCKET_IFNAME"], "ib0");
    // network.interface says which: both are set
    let env = env_of(
        &format!("{yaml}network: {{interface: ib0}}\n"),
        &["NCCL_SOCKET_IFNAME"],
    );
    assert_eq!(env["NCCL_SOCKET_IFNAME"], "ib0");
    assert_eq!(env["VLLM_NO_USAGE_STATS"], "1");
    assert_eq!(env["TRITON_CACHE_DIR"], "/tmp/rl-4242.0-0/cache/triton");
}

#[test]
fn server_advertise_names_the_host_clients_get_and_the_router_keeps_the_address() {
    let p = plan_for(
        "engine: vllm\nmodel: m\nparallel: {tensor: 8}\nserver: {advertise: '{node}.ext.cluster'}\n",
        2,
        8,
        &["python", "x.py"],
    )
    .unwrap();
    assert_eq!(p.url(), "http://node1.ext.cluster:30762/v1");
    assert_eq!(p.endpoints[1].url, "http://node2.ext.cluster:30772/v1");
    let router = p.ranks[0]
        .command(ray_launch::plan::lifecycle::Kind::Router)
        .unwrap();
    assert!(
        router
            .argv
            .windows(2)
            .any(|w| w == ["--replica", "http://10.1.0.2:30772"]),
        "{:?}",
        router.argv
    );
    let client = p.ranks[0]
        .command(ray_launch::plan::lifecycle::Kind::Client)
        .unwrap();
    assert_eq!(
        client.env["OPENAI_BASE_URL"],
        "http://node1.ext.cluster:30762/v1"
    );
    assert!(client.env["NO_PROXY"].contains("node2.ext.cluster"));
}

#[test]
fn with_ray_client_installed_the_heads_client_server_is_explicitly_off() {
    let p = plan_with(RAY, 2, 8, &[], |n| n.ray_client = true).unwrap();
    let head = &p.ranks[0].commands[0].argv;
    assert!(
        head.contains(&"--ray-client-server-port=0".to_string()),
        "{head:?}"
    );
    // `ray.client_server: true`: on the block's port
    let yaml = format!("{RAY}ray: {{client_server: true}}\n");
    let p = plan_with(&yaml, 2, 8, &[], |n| n.ray_client = true).unwrap();
    let want = format!("--ray-client-server-port={}", p.ports.ray_client_server);
    assert!(p.ranks[0].commands[0].argv.contains(&want));
}

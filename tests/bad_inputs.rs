//! Bad input of every kind: one clear `error:` line naming the problem, a `hint:`, exit 2,
//! and nothing started. Each case runs the real binary with a clean environment.

#![allow(clippy::too_many_lines)] // tests and benchmarks read better as one story each
use assert_cmd::Command;

const OK: &str = "engine: vllm\nmodel: /m\nparallel:\n  tensor: 2\n";

struct Case {
    name: &'static str,
    yaml: Option<&'static str>,
    env: &'static [(&'static str, &'static str)],
    args: &'static [&'static str],
    want: &'static str,
}

const STEP: &[(&str, &str)] = &[
    ("SLURM_JOB_ID", "99"),
    ("SLURM_STEP_ID", "0"),
    ("SLURM_STEP_NODELIST", "node[1-2]"),
    ("SLURM_NNODES", "2"),
    ("SLURM_NTASKS", "2"),
    ("SLURM_NODEID", "0"),
    ("SLURMD_NODENAME", "node1"),
    ("SLURM_STEP_TASKS_PER_NODE", "1(x2)"),
];

fn cases() -> Vec<Case> {
    let c = |name, yaml, want| Case {
        name,
        yaml: Some(yaml),
        env: &[],
        args: &["check"],
        want,
    };
    vec![
        // ---- config: syntax, types, unknown keys
        c("yaml syntax", "engine: vllm\nmodel: [unclosed\n", "test.yaml:"),
        c("unknown top key", "engine: vllm\nmodel: m\nparallel: {tensor: 1}\nmodle: x\n", "unknown field `modle`"),
        c("unknown nested key", "engine: vllm\nmodel: m\nparallel:\n  tensr: 2\n", "unknown field `tensr`"),
        c("missing model", "engine: vllm\nparallel: {tensor: 1}\n", "`model` is missing"),
        c("missing parallel", "engine: vllm\nmodel: m\n", "`parallel` is missing"),
        // ---- several models, attached endpoints
        c("model and models", "engine: vllm\nmodel: m\nmodels:\n  - {name: a, model: m, parallel: {tensor: 1}}\n", "test.yaml:2: `model` is set together with `models:`"),
        c("models twice the name", "engine: vllm\nmodels:\n  - {name: a, model: m, parallel: {tensor: 1}, nodes: 1}\n  - {name: a, model: m, parallel: {tensor: 1}}\n", "`models[1]` (a): `name` `a` is taken"),
        c("models name clash as variable", "engine: vllm\nmodels:\n  - {name: a-b, model: m, parallel: {tensor: 1}, nodes: 1}\n  - {name: a_b, model: m, parallel: {tensor: 1}}\n", "the same RAY_LAUNCH_MODEL_A_B_URL"),
        c("models two rest", "engine: vllm\nmodels:\n  - {name: a, model: m, parallel: {tensor: 1}}\n  - {name: b, model: m, parallel: {tensor: 1}}\n", "`models[1]` (b): `nodes` is `rest` (or unset), and so is model `a`'s"),
        c("models bad name", "engine: vllm\nmodels:\n  - {name: 'a b', model: m, parallel: {tensor: 1}}\n", "`name` `a b` is not a name"),
        c("models no engine", "models:\n  - {name: a, model: m, parallel: {tensor: 1}}\n", "`models[0]` (a): `engine` is missing"),
        c("models owned flag", "engine: vllm\nmodels:\n  - name: a\n    model: m\n    parallel: {tensor: 1}\n    engine_args: [--port=1]\n", "test.yaml:3: `models[0]` (a): `engine_args` contains `--port`"),
        c("attach https", "engine: vllm\nmodel: m\nparallel: {tensor: 1}\nattach:\n  - {name: j, url: 'https://x:1/v1'}\n", "is not plain http"),
        c("data parallel in engine_args", "engine: vllm\nmodel: m\nparallel: {tensor: 1}\nengine_args: [-dp, '2']\n", "contains `-dp`, which ray-launch sets from parallel.data"),
        c("expert parallel in engine_args", "engine: sglang\nmodel: m\nparallel: {tensor: 8}\nengine_args: [--ep-size=8]\n", "set parallel.expert instead"),
        c("sglang data not dividing tensor", "engine: sglang\nmodel: m\nparallel: {tensor: 8, data: 3}\n", "`parallel.data` (3) does not divide parallel.tensor (8)"),
        c("bad advertise", "engine: vllm\nmodel: m\nparallel: {tensor: 1}\nserver: {advertise: 'http://x/'}\n", "`server.advertise` `http://x/` is not a host name or address"),
        c("attach credentials in url", "engine: vllm\nmodel: m\nparallel: {tensor: 1}\nattach:\n  - {name: j, url: 'http://u:pw@x:1/v1'}\n", "holds a user name or password"),
        c("attach no v1", "engine: vllm\nmodel: m\nparallel: {tensor: 1}\nattach:\n  - {name: j, url: 'http://x:1/'}\n", "is not an OpenAI base URL"),
        c("service bad name", "engine: vllm\nmodel: m\nparallel: {tensor: 1}\nservice: {name: '../x'}\n", "`service.name` `../x` is not a service name"),
        c("service with own key", "engine: vllm\nmodel: m\nparallel: {tensor: 1}\nserver: {api_key_file: /k}\nservice: {name: s}\n", "every job of a service uses the service's own key"),
        c("service and batch", "engine: vllm\nmodel: m\nparallel: {tensor: 1}\nbatch: {input: a, output: b}\nservice: {name: s}\n", "`batch` are both set"),
        c("service zero handover", "engine: vllm\nmodel: m\nparallel: {tensor: 1}\nservice: {name: s, handover_before: 0s}\n", "`service.handover_before` must be longer than zero"),
        Case { name: "route service missing", yaml: None, env: &[("HOME", "/nonexistent-home")], args: &["route", "--listen", "127.0.0.1:1", "--service", "nope", "--service-dir", "/nonexistent-dir/x"], want: "route --service nope" },
        c("attach without router", "engine: vllm\nmodel: m\nparallel: {tensor: 1}\nrouter: {enabled: false}\nattach:\n  - {name: j, url: 'http://x:1/v1'}\n", "`router.enabled` is false, but the job serves several models"),
        Case { name: "models do not fit", yaml: Some("engine: vllm\nmodels:\n  - {name: a, model: m, parallel: {tensor: 8}, nodes: 2}\n  - {name: b, model: m, parallel: {tensor: 8}, nodes: 2}\n"), env: &[], args: &["plan", "--nodelist", "n[1-3]", "--gpus-per-node", "8"], want: "the models ask for 4 node(s) (a 2, b 2) but the step has 3" },
        Case { name: "model layout does not fit", yaml: Some("engine: vllm\nmodels:\n  - {name: a, model: m, parallel: {tensor: 8}, nodes: 2}\n  - {name: b, model: m, parallel: {tensor: 16}}\n"), env: &[], args: &["plan", "--nodelist", "n[1-3]", "--gpus-per-node", "8"], want: "model `b` gets 1 of the step's 3 node(s) (n3): one replica needs 2 nodes" },
        c("bad engine", "engine: trt\nmodel: m\nparallel: {tensor: 1}\n", "unknown variant `trt`"),
        c("bad backend", "engine: vllm\nmodel: m\nparallel: {tensor: 1}\nvllm: {backend: nccl}\n", "unknown variant `nccl`"),
        c("tensor zero", "engine: vllm\nmodel: m\nparallel:\n  tensor: 0\n", "test.yaml:4: `parallel.tensor` must be at least 1"),
        c("tensor negative", "engine: vllm\nmodel: m\nparallel:\n  tensor: -2\n", "test.yaml:4"),
        c("tensor text", "engine: vllm\nmodel: m\nparallel:\n  tensor: eight\n", "invalid type"),
        c("pipeline zero", "engine: vllm\nmodel: m\nparallel:\n  tensor: 1\n  pipeline: 0\n", "test.yaml:5: `parallel.pipeline`"),
        c("nodes_per_replica zero", "engine: vllm\nmodel: m\nparallel:\n  tensor: 1\n  nodes_per_replica: 0\n", "`parallel.nodes_per_replica` must be at least 1"),
        c("gpus text", "engine: vllm\nmodel: m\nparallel: {tensor: 1}\ngpus_per_node: many\n", "expected `auto` or a non-negative whole number"),
        c("empty model", "engine: vllm\nmodel: ''\nparallel: {tensor: 1}\n", "`model` is empty"),
        c("bad duration", "engine: vllm\nmodel: m\nparallel: {tensor: 1}\ntimeouts:\n  engine_ready: soon\n", "`soon` is not a duration"),
        c("zero duration", "engine: vllm\nmodel: m\nparallel: {tensor: 1}\ntimeouts:\n  worker_join: 0s\n", "`timeouts.worker_join` must be longer than zero"),
        c("grace beyond killwait", "engine: vllm\nmodel: m\nparallel: {tensor: 1}\ntimeouts:\n  shutdown_grace: 20s\n", "does not fit in `timeouts.kill_wait`"),
        c("heartbeat too tight", "engine: vllm\nmodel: m\nparallel: {tensor: 1}\nhealth:\n  heartbeat_interval: 5s\n  heartbeat_timeout: 6s\n", "at least twice"),
        c("health failures zero", "engine: vllm\nmodel: m\nparallel: {tensor: 1}\nhealth:\n  failures: 0\n", "`health.failures` must be at least 1"),
        c("port zero", "engine: vllm\nmodel: m\nparallel: {tensor: 1}\nserver:\n  port: 0\n", "`server.port` must be 1-65535"),
        c("port too big", "engine: vllm\nmodel: m\nparallel: {tensor: 1}\nserver:\n  port: 70000\n", "test.yaml:"),
        c("host not ip", "engine: vllm\nmodel: m\nparallel: {tensor: 1}\nserver:\n  host: myhost\n", "`server.host` `myhost` is not an IP address"),
        c("port range privileged", "engine: vllm\nmodel: m\nparallel: {tensor: 1}\nports:\n  range: 100-2000\n", "starts below 1024"),
        c("port range small", "engine: vllm\nmodel: m\nparallel: {tensor: 1}\nports:\n  range: 20000-20100\n", "fewer ports than one job's block"),
        c("port range form", "engine: vllm\nmodel: m\nparallel: {tensor: 1}\nports:\n  range: 20000\n", "not of the form LOW-HIGH"),
        c("iface and cidr", "engine: vllm\nmodel: m\nparallel: {tensor: 1}\nnetwork:\n  interface: ib0\n  cidr: 10.0.0.0/8\n", "together with `network.interface`"),
        c("bad cidr", "engine: vllm\nmodel: m\nparallel: {tensor: 1}\nnetwork:\n  cidr: 10.0.0.0/99\n", "is not a network"),
        c("missing interface", "engine: vllm\nmodel: m\nparallel: {tensor: 1}\nnetwork:\n  interface: ib77\n", "network.interface `ib77` has no IPv4 address"),
        c("cidr matches nothing", "engine: vllm\nmodel: m\nparallel: {tensor: 1}\nnetwork:\n  cidr: 203.0.113.0/24\n", "is inside network.cidr 203.0.113.0/24"),
        c("bad env name", "engine: vllm\nmodel: m\nparallel: {tensor: 1}\nenv:\n  1BAD: x\n", "invalid variable name `1BAD`"),
        c("env value list", "engine: vllm\nmodel: m\nparallel: {tensor: 1}\nenv:\n  A: [1, 2]\n", "environment values must be text"),
        c("engine_args owns tp", "engine: vllm\nmodel: m\nparallel: {tensor: 1}\nengine_args: ['--tensor-parallel-size', '4']\n", "set parallel.tensor instead"),
        c("engine_args owns port", "engine: vllm\nmodel: m\nparallel: {tensor: 1}\nengine_args: ['--port=9000']\n", "set server.port instead"),
        c("ray extra owns port", "engine: vllm\nmodel: m\nparallel: {tensor: 1}\nray:\n  extra_args: ['--port=6379']\n", "contains `--port`"),
        c("relative temp dir", "engine: vllm\nmodel: m\nparallel: {tensor: 1}\nray:\n  temp_dir: tmp/ray\n", "must be an absolute path"),
        c("temp dir too long", "engine: vllm\nmodel: m\nparallel: {tensor: 1}\nray:\n  temp_dir: /scratch/users/somebody/with/a/long/path/{job}/{node}\n", "107-byte limit"),
        c("unknown placeholder", "engine: vllm\nmodel: m\nparallel: {tensor: 1}\nlog_dir: logs/{user}\n", "unknown placeholder `{user}`"),
        c("temp dir is the root", "engine: vllm\nmodel: m\nparallel: {tensor: 1}\nray:\n  temp_dir: /\n", "is a shared directory, not one for this job"),
        c("temp dir is /tmp", "engine: vllm\nmodel: m\nparallel: {tensor: 1}\nray:\n  temp_dir: /tmp\n", "is a shared directory"),
        c("temp dir climbs out", "engine: vllm\nmodel: m\nparallel: {tensor: 1}\nray:\n  temp_dir: /tmp/x/../..\n", "is a shared directory"),
        c("huge duration", "engine: vllm\nmodel: m\nparallel: {tensor: 1}\ntimeouts:\n  shutdown_grace: 10000000000000000000s\n", "is longer than ray-launch accepts"),
        c("NUL in engine_args", "engine: vllm\nmodel: m\nparallel: {tensor: 1}\nengine_args: [\"--x\\0y\"]\n", "`engine_args` contains a NUL byte"),
        c("secret_env not in env", "engine: vllm\nmodel: m\nparallel: {tensor: 1}\nsecret_env: [WANDB]\n", "names `WANDB`, which is not in `env`"),
        c("api key with auth off", "engine: vllm\nmodel: m\nparallel: {tensor: 1}\nsecurity: {auth: off}\nserver: {api_key_file: /k}\n", "is set while `security.auth` is off"),
        c("unknown auth", "engine: vllm\nmodel: m\nparallel: {tensor: 1}\nsecurity: {auth: kerberos}\n", "unknown variant `kerberos`"),
        c("object store text", "engine: vllm\nmodel: m\nparallel: {tensor: 1}\nray:\n  object_store_memory: lots\n", "a size such as `64GiB`"),
        c("empty executable", "engine: vllm\nmodel: m\nparallel: {tensor: 1}\nvllm:\n  executable: ''\n", "`vllm.executable` is empty"),
        // ---- config vs the step
        Case { name: "too few nodes", yaml: Some("engine: vllm\nmodel: m\nparallel: {tensor: 32}\ngpus_per_node: 8\n"), env: STEP, args: &["check"], want: "one replica needs 4 nodes (tensor 32 x pipeline 1 = 32 GPUs at 8 per node) but the step has 2" },
        Case { name: "uneven replicas", yaml: Some("engine: vllm\nmodel: m\nparallel: {tensor: 16}\n"), env: &[], args: &["plan", "--nodelist", "n[1-3]", "--gpus-per-node", "8"], want: "do not split into replicas of 2 nodes" },
        Case { name: "replica too small", yaml: Some("engine: vllm\nmodel: m\nparallel: {tensor: 16}\n"), env: &[], args: &["plan", "--nodelist", "n1", "--gpus-per-node", "8"], want: "one replica needs 2 nodes" },
        Case { name: "mp uneven ranks", yaml: Some("engine: vllm\nmodel: m\nparallel: {tensor: 3}\nvllm: {backend: mp}\n"), env: &[], args: &["plan", "--nodelist", "n[1-2]"], want: "do not split evenly over 2 nodes" },
        Case { name: "too many ranks per node", yaml: Some("engine: sglang\nmodel: m\nparallel: {tensor: 16, nodes_per_replica: 1}\n"), env: &[], args: &["plan", "--nodelist", "n[1-2]", "--gpus-per-node", "8"], want: "each node would run 16 engine ranks but has 8 GPUs" },
        // ---- environment
        Case { name: "batch script", yaml: Some(OK), env: &[("SLURM_JOB_ID", "5"), ("SLURM_JOB_NODELIST", "n[1-2]")], args: &["check"], want: "not launched by srun" },
        Case { name: "two tasks per node", yaml: Some(OK), env: &[("SLURM_JOB_ID", "5"), ("SLURM_STEP_ID", "0"), ("SLURM_STEP_NODELIST", "n[1-2]"), ("SLURM_NNODES", "2"), ("SLURM_NTASKS", "4"), ("SLURM_NODEID", "0"), ("SLURM_STEP_TASKS_PER_NODE", "2(x2)")], args: &["check"], want: "exactly one task per node" },
        Case { name: "bad step nodelist", yaml: Some(OK), env: &[("SLURM_JOB_ID", "5"), ("SLURM_STEP_ID", "0"), ("SLURM_STEP_NODELIST", "n[2-1]"), ("SLURM_NODEID", "0")], args: &["check"], want: "SLURM_STEP_NODELIST: invalid hostlist" },
        Case { name: "nnodes mismatch", yaml: Some(OK), env: &[("SLURM_JOB_ID", "5"), ("SLURM_STEP_ID", "0"), ("SLURM_STEP_NODELIST", "n[1-2]"), ("SLURM_NNODES", "3"), ("SLURM_NODEID", "0")], args: &["check"], want: "SLURM_NNODES=3" },
        Case { name: "nodeid out of range", yaml: Some(OK), env: &[("SLURM_JOB_ID", "5"), ("SLURM_STEP_ID", "0"), ("SLURM_STEP_NODELIST", "n[1-2]"), ("SLURM_NODEID", "7")], args: &["check"], want: "SLURM_NODEID=7 is outside" },
        Case { name: "gpus not a number", yaml: Some(OK), env: &[("SLURM_GPUS_ON_NODE", "eight")], args: &["check"], want: "SLURM_GPUS_ON_NODE=`eight` is not a whole number" },
        Case { name: "bad job id", yaml: Some(OK), env: &[("SLURM_JOB_ID", "5;rm")], args: &["check"], want: "is not a job id" },
        Case { name: "bad step id", yaml: Some(OK), env: &[("SLURM_JOB_ID", "5"), ("SLURM_STEP_ID", "0;x"), ("SLURM_STEP_NODELIST", "n[1-2]"), ("SLURM_NODEID", "0")], args: &["check"], want: "SLURM_STEP_ID=`0;x` is not a step id" },
        // ---- flags and hostlists
        Case { name: "no config", yaml: None, env: &[], args: &["check"], want: "no config given" },
        Case { name: "missing config file", yaml: None, env: &[], args: &["check", "--config", "/nonexistent.yaml"], want: "cannot read config /nonexistent.yaml" },
        Case { name: "unknown flag", yaml: None, env: &[], args: &["plan", "--frobnicate"], want: "unexpected argument '--frobnicate'" },
        Case { name: "bad format", yaml: Some(OK), env: &[], args: &["plan", "--format", "xml"], want: "invalid value 'xml'" },
        Case { name: "job id without nodelist", yaml: Some(OK), env: &[], args: &["plan", "--job-id", "3"], want: "--nodelist" },
        Case { name: "bad nodelist", yaml: Some(OK), env: &[], args: &["plan", "--nodelist", "node[1-"], want: "unclosed `[`" },
        Case { name: "rank out of range", yaml: Some(OK), env: &[], args: &["plan", "--nodelist", "n[1-2]", "--rank", "5"], want: "--rank 5" },
        Case { name: "hostlist reversed", yaml: None, env: &[], args: &["hostlist", "expand", "node[3-1]"], want: "runs backwards" },
        Case { name: "hostlist letters", yaml: None, env: &[], args: &["hostlist", "expand", "gpu-[a1-2]"], want: "is not a number" },
        Case { name: "hostlist absurd", yaml: None, env: &[], args: &["hostlist", "expand", "n[0-999999999]"], want: "more than" },
        Case { name: "gpus flag text", yaml: Some(OK), env: &[], args: &["check", "--gpus-per-node", "x"], want: "invalid value 'x'" },
    ]
}

#[test]
fn every_bad_input_exits_2_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let cases = cases();
    assert!(cases.len() >= 30);
    let mut failures = Vec::new();
    for case in &cases {
        let mut cmd = Command::cargo_bin("ray-launch").unwrap();
        cmd.env_clear()
            .env("PATH", "/usr/bin:/bin")
            .current_dir(dir.path());
        cmd.args(case.args);
        if let Some(y) = case.yaml {
            let p = dir.path().join("test.yaml");
            std::fs::write(&p, y).unwrap();
            // relative path so that messages say `test.yaml:LINE`
            cmd.args(["--config", "test.yaml"]);
        }
        for (k, v) in case.env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let code = out.status.code();
        let first = stderr.lines().next().unwrap_or("");
        let ok = code == Some(2)
            && first.starts_with("error")
            && stderr.contains(case.want)
            && (stderr.contains("hint:")
                || stderr.contains("Usage:")
                || stderr.contains("try '--help'"))
            && out.stdout.is_empty();
        if !ok {
            failures.push(format!(
                "[{}] code {code:?}, want `{}`:\n{stderr}",
                case.name, case.want
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

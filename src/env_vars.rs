//! Every environment variable that ray-launch reads or sets, as documented constants.

// ---- read by ray-launch: fallbacks for command-line options
/// Path of the YAML config (`--config`).
pub const RAY_LAUNCH_CONFIG: &str = "RAY_LAUNCH_CONFIG";
/// GPUs per node (`--gpus-per-node`), overrides the config's `gpus_per_node`.
pub const RAY_LAUNCH_GPUS_PER_NODE: &str = "RAY_LAUNCH_GPUS_PER_NODE";
/// Where the endpoint file is written (`--endpoint-file`).
pub const RAY_LAUNCH_ENDPOINT_FILE: &str = "RAY_LAUNCH_ENDPOINT_FILE";
/// Where the JSON-lines event log is written (`--event-log`).
pub const RAY_LAUNCH_EVENT_LOG: &str = "RAY_LAUNCH_EVENT_LOG";
/// Directory for per-node process logs (`--log-dir`).
pub const RAY_LAUNCH_LOG_DIR: &str = "RAY_LAUNCH_LOG_DIR";
/// Log filter for ray-launch's own messages (tracing `EnvFilter` syntax, default `info`).
pub const RAY_LAUNCH_LOG: &str = "RAY_LAUNCH_LOG";
/// The per-user secret for `security.auth: secret` (where munge is not available).
pub const RAY_LAUNCH_SECRET: &str = "RAY_LAUNCH_SECRET";
/// A 0600 file holding that secret (default `~/.config/ray-launch/secret`).
pub const RAY_LAUNCH_SECRET_FILE: &str = "RAY_LAUNCH_SECRET_FILE";

/// The job's API key, for the router (`ray-launch route`): a masked secret of its
/// environment, never in argv.
pub const RAY_LAUNCH_ROUTER_API_KEY: &str = "RAY_LAUNCH_ROUTER_API_KEY";

// ---- set by ray-launch on every process it starts
/// `TOKEN/KIND/SLOT`: which launcher started the process's tree (a random token per
/// launcher), and which command of it. Inherited by every descendant, double-forked or
/// `setsid`ed, so teardown, a replica's reset and the reaper find them all (src/run/proc.rs).
pub const RAY_LAUNCH_PROC: &str = "RAY_LAUNCH_PROC";

// ---- set by ray-launch for the client command
/// The endpoint file's path, for the client (and for `ray-launch wait`).
pub const RAY_LAUNCH_ENDPOINT: &str = "RAY_LAUNCH_ENDPOINT";
/// Space-separated base URLs of every replica, for clients that spread load.
pub const RAY_LAUNCH_ENDPOINTS: &str = "RAY_LAUNCH_ENDPOINTS";
/// OpenAI-compatible base URL of replica 0 (`http://IP:PORT/v1`).
pub const OPENAI_BASE_URL: &str = "OPENAI_BASE_URL";

// ---- read from Slurm (see notes in src/slurm.rs)
pub const SLURM_JOB_ID: &str = "SLURM_JOB_ID";
pub const SLURM_JOBID: &str = "SLURM_JOBID";
pub const SLURM_STEP_ID: &str = "SLURM_STEP_ID";
pub const SLURM_STEP_NODELIST: &str = "SLURM_STEP_NODELIST";
pub const SLURM_JOB_NODELIST: &str = "SLURM_JOB_NODELIST";
pub const SLURM_NODEID: &str = "SLURM_NODEID";
pub const SLURM_PROCID: &str = "SLURM_PROCID";
pub const SLURM_NNODES: &str = "SLURM_NNODES";
pub const SLURM_NTASKS: &str = "SLURM_NTASKS";
pub const SLURM_STEP_TASKS_PER_NODE: &str = "SLURM_STEP_TASKS_PER_NODE";
pub const SLURM_TASKS_PER_NODE: &str = "SLURM_TASKS_PER_NODE";
pub const SLURMD_NODENAME: &str = "SLURMD_NODENAME";
pub const SLURM_GPUS_ON_NODE: &str = "SLURM_GPUS_ON_NODE";
pub const SLURM_CPUS_ON_NODE: &str = "SLURM_CPUS_ON_NODE";
pub const SLURM_MEM_PER_NODE: &str = "SLURM_MEM_PER_NODE";
/// Ports Slurm reserved for the step (`srun --resv-ports`, with `MpiParams=ports=` set).
pub const SLURM_STEP_RESV_PORTS: &str = "SLURM_STEP_RESV_PORTS";
pub const CUDA_VISIBLE_DEVICES: &str = "CUDA_VISIBLE_DEVICES";

// ---- set by ray-launch on the processes it starts
/// This node's address, for vLLM (and inherited by Ray workers when set on `ray start`).
pub const VLLM_HOST_IP: &str = "VLLM_HOST_IP";
/// vLLM's usage report to its authors: off (compute nodes rarely reach the internet, and a
/// site's users did not agree to it).
pub const VLLM_NO_USAGE_STATS: &str = "VLLM_NO_USAGE_STATS";
/// Compile caches, on the node's own disk inside the job's private temp dir.
pub const VLLM_CACHE_ROOT: &str = "VLLM_CACHE_ROOT";
pub const TRITON_CACHE_DIR: &str = "TRITON_CACHE_DIR";
pub const TORCHINDUCTOR_CACHE_DIR: &str = "TORCHINDUCTOR_CACHE_DIR";
/// vLLM's config root, where it reads `ray_non_carry_over_env_vars.json`: the head's engine
/// gets one of its own in the private temp dir (not the user's ~/.config/vllm).
pub const VLLM_CONFIG_ROOT: &str = "VLLM_CONFIG_ROOT";
pub const GLOO_SOCKET_IFNAME: &str = "GLOO_SOCKET_IFNAME";
pub const NCCL_SOCKET_IFNAME: &str = "NCCL_SOCKET_IFNAME";
/// The Ray cluster the engine joins (`IP:GCS_PORT`), so it never starts a private one.
pub const RAY_ADDRESS: &str = "RAY_ADDRESS";
/// `token` (or `disabled` with `security.auth: off`, explicitly: a `~/.ray/auth_token` on a
/// shared $HOME would turn auth on by itself).
pub const RAY_AUTH_MODE: &str = "RAY_AUTH_MODE";
/// The job's Ray token file (0600, in the node's private temp dir).
pub const RAY_AUTH_TOKEN_PATH: &str = "RAY_AUTH_TOKEN_PATH";
/// The engine's API key (vLLM reads it instead of `--api-key`, which `ps` would show).
pub const VLLM_API_KEY: &str = "VLLM_API_KEY";
/// The API key for the client (the official OpenAI SDKs read it).
pub const OPENAI_API_KEY: &str = "OPENAI_API_KEY";
/// Hosts the client reaches without a proxy: the endpoints (a site's http_proxy would
/// otherwise carry requests for internal addresses).
pub const NO_PROXY: &str = "NO_PROXY";
pub const NO_PROXY_LOWER: &str = "no_proxy";
pub const RAY_USAGE_STATS_ENABLED: &str = "RAY_USAGE_STATS_ENABLED";

/// (name, meaning) for `--help` and the README.
pub const READ: &[(&str, &str)] = &[
    (RAY_LAUNCH_CONFIG, "config file, instead of --config"),
    (
        RAY_LAUNCH_GPUS_PER_NODE,
        "GPUs per node, instead of --gpus-per-node",
    ),
    (
        RAY_LAUNCH_ENDPOINT_FILE,
        "endpoint file path, instead of --endpoint-file",
    ),
    (
        RAY_LAUNCH_EVENT_LOG,
        "event log path, instead of --event-log",
    ),
    (
        RAY_LAUNCH_LOG_DIR,
        "per-node process log directory, instead of --log-dir",
    ),
    (RAY_LAUNCH_LOG, "ray-launch's own log filter (default info)"),
    (
        RAY_LAUNCH_SECRET,
        "per-user secret for security.auth: secret (where munge is missing)",
    ),
    (
        RAY_LAUNCH_SECRET_FILE,
        "0600 file with that secret (default ~/.config/ray-launch/secret)",
    ),
];

//! Command line: parsing (clap) and the subcommands. Turns flags into a
//! [`gather::Request`], builds the plan, and hands it to the runtime or prints it.

use crate::env_vars as ev;
use crate::error::{Error, Result};
use crate::exit;
use crate::input::gather::{self, Gathered, Request, Resolve};
use crate::input::hostlist;
use crate::input::settings::Overrides;
use crate::input::slurm::StepKind;
use crate::plan::{self, Plan};
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::io::Read as _;
use std::path::PathBuf;
use std::time::Duration;

fn footer() -> String {
    let mut s = String::from("Environment variables:\n");
    for (k, v) in ev::READ {
        s.push_str(&format!("  {k:<26} {v}\n"));
    }
    s.push_str("\nExit codes:\n");
    for (c, v) in exit::TABLE {
        s.push_str(&format!("  {c:<4} {v}\n"));
    }
    s.push_str("\nIn client mode (`-- CMD`) the step exits with the client's exit code.");
    s
}

/// `--version`: the crate's version, the commit it was built from and the build date
/// (build.rs; "unknown" when built outside a git checkout).
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("RAY_LAUNCH_COMMIT"),
    ", built ",
    env!("RAY_LAUNCH_BUILD_DATE"),
    ")"
);

#[derive(Parser, Debug)]
#[command(
    name = "ray-launch",
    version = VERSION,
    about = "Serve or batch-run LLMs (vLLM, SGLang, Ray) across the nodes of a Slurm step",
    long_about = "Run once per node with `srun --ntasks-per-node=1 ray-launch --config FILE`.\n\
                  The node with SLURM_NODEID=0 (first of SLURM_STEP_NODELIST) is the master.",
    after_help = footer(),
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Cmd>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Start the step's part on this node and supervise it (the default).
    Run(RunArgs),
    /// Print the plan for every rank of the current step (or of a simulated one).
    Plan(PlanArgs),
    /// Validate the config (and the Slurm environment, when inside a step).
    Check(CheckArgs),
    /// Send an OpenAI batch file through a running endpoint: every request answered exactly
    /// once into OUT (or OUT.errors), resumable (what the job's `--batch` runs; also usable
    /// on its own against a job's endpoint file).
    Batch(BatchArgs),
    /// Expand or compress Slurm hostlist expressions.
    #[command(subcommand)]
    Hostlist(HostlistCmd),
    /// Wait until an endpoint file says ready; print its URL.
    Wait(WaitArgs),
    /// Where a job is: its state, URL, models and replicas, from its endpoint file.
    Status(StatusArgs),
    /// A service (a chain of jobs under one name): `stop`.
    #[command(subcommand)]
    Service(ServiceCmd),
    /// Serve one OpenAI endpoint over several replicas (what the master runs when the job has
    /// more than one; the API key comes from RAY_LAUNCH_ROUTER_API_KEY).
    Route(RouteArgs),
    /// Print a shell completion script (`ray-launch completions bash > ~/.local/share/bash-completion/completions/ray-launch`).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff), generated from these same flags (`ray-launch man | man -l -`).
    Man,
    /// Internal: clean up after a launcher that was killed (see src/run/reaper.rs).
    #[command(hide = true)]
    Reap {
        #[arg(long, value_parser = humantime::parse_duration)]
        grace: Duration,
    },
}

#[derive(Args, Debug, Clone, Default)]
pub struct CommonArgs {
    /// YAML config (see configs/ and the README's config reference).
    #[arg(long, short = 'c', env = ev::RAY_LAUNCH_CONFIG)]
    pub config: Option<PathBuf>,
    /// GPUs per node; overrides `gpus_per_node` in the config.
    #[arg(long, env = ev::RAY_LAUNCH_GPUS_PER_NODE)]
    pub gpus_per_node: Option<u32>,
}

impl CommonArgs {
    fn overrides(&self) -> Overrides {
        Overrides {
            gpus_per_node: self.gpus_per_node,
            ..Default::default()
        }
    }
}

#[derive(Args, Debug, Clone, Default)]
pub struct RunArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Endpoint file written when ready (default from the config).
    #[arg(long, env = ev::RAY_LAUNCH_ENDPOINT_FILE)]
    pub endpoint_file: Option<String>,
    /// JSON-lines event log (default from the config; none if unset).
    #[arg(long, env = ev::RAY_LAUNCH_EVENT_LOG)]
    pub event_log: Option<String>,
    /// Directory for per-node process logs (default from the config).
    #[arg(long, env = ev::RAY_LAUNCH_LOG_DIR)]
    pub log_dir: Option<String>,
    /// An OpenAI batch file (JSON lines) to send through the endpoint once ready, instead of
    /// serving or a client; the step ends when every request is answered (see `batch:`).
    #[arg(long, value_name = "IN.jsonl", requires = "output")]
    pub batch: Option<String>,
    /// Where the batch's answers go (failures: its `.errors.jsonl` sibling).
    #[arg(long, value_name = "OUT.jsonl", requires = "batch")]
    pub output: Option<String>,
    /// Client command run on the master once ready; the step ends when it exits.
    #[arg(last = true, value_name = "CLIENT")]
    pub client: Vec<String>,
}

#[derive(Args, Debug, Clone, Default)]
pub struct CheckArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Also validate this batch file (else the config's `batch.input`, if any).
    #[arg(long, value_name = "IN.jsonl")]
    pub batch: Option<PathBuf>,
}

#[derive(Args, Debug, Clone)]
pub struct BatchArgs {
    /// The requests: OpenAI's batch format, one JSON object per line.
    #[arg(long, value_name = "IN.jsonl")]
    pub input: PathBuf,
    /// The answers, one line per request; failures go to OUT's `.errors.jsonl` sibling.
    #[arg(long, value_name = "OUT.jsonl")]
    pub output: PathBuf,
    /// The OpenAI base URL (`http://HOST:PORT/v1`); else from the endpoint file.
    #[arg(long, env = ev::OPENAI_BASE_URL)]
    pub url: Option<String>,
    /// A job's endpoint file: its URL, key and replicas (waits until it says ready).
    #[arg(long, env = ev::RAY_LAUNCH_ENDPOINT)]
    pub endpoint_file: Option<PathBuf>,
    /// Each replica's base URL, space-separated (their queue gauges drive `auto`).
    #[arg(long, env = ev::RAY_LAUNCH_ENDPOINTS, value_delimiter = ' ')]
    pub replicas: Vec<String>,
    /// Requests in flight: `auto` or a number.
    #[arg(long, default_value = "auto")]
    pub concurrency: String,
    /// Attempts of a request that fails in a retriable way.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub max_attempts: u32,
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub request_timeout: Duration,
    /// After SIGTERM/SIGUSR1: how long requests in flight may finish before it exits.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    pub grace: Duration,
    /// `none`, `auto` (this job array task's share) or INDEX/COUNT.
    #[arg(long, default_value = "none")]
    pub shard: String,
    /// The model names the endpoint serves, comma-separated (checked before sending).
    #[arg(long, value_delimiter = ',')]
    pub models: Vec<String>,
    /// Where to write the progress (JSON, rewritten every few seconds).
    #[arg(long)]
    pub progress_file: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
}

#[derive(Args, Debug)]
pub struct PlanArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    #[arg(long, value_enum, default_value = "text")]
    pub format: Format,
    /// Simulate a step over these nodes (NODEID order = expansion order), e.g. `node[1-4]`.
    #[arg(long)]
    pub nodelist: Option<String>,
    /// Job id for the simulated step (decides the port block).
    #[arg(long, requires = "nodelist")]
    pub job_id: Option<String>,
    /// Show the commands of this rank in text form (repeatable).
    #[arg(long)]
    pub rank: Vec<usize>,
    /// The client command, as `run` would get it.
    #[arg(last = true, value_name = "CLIENT")]
    pub client: Vec<String>,
}

#[derive(Subcommand, Debug)]
pub enum HostlistCmd {
    /// One host per line.
    Expand {
        #[arg(required = true)]
        exprs: Vec<String>,
    },
    /// One expression; hosts from the arguments, or stdin (one per line or comma-separated).
    Compress { hosts: Vec<String> },
}

#[derive(Args, Debug)]
pub struct RouteArgs {
    /// Where to listen, `HOST:PORT`.
    #[arg(long)]
    pub listen: String,
    /// A replica's base URL without `/v1` (repeat for each), e.g. `http://10.0.0.2:20034`;
    /// `NAME=URL` with `--model`.
    #[arg(long = "replica")]
    pub replicas: Vec<String>,
    /// `NAME=SERVED`: route by model name; each `--replica NAME=URL` serves model NAME.
    #[arg(long = "model")]
    pub models: Vec<String>,
    /// `NAME=URL`: an OpenAI base URL the job does not run (`http://h:8000/v1`).
    #[arg(long = "attach")]
    pub attach: Vec<String>,
    /// `NAME=FILE`: the API key (a 0600 file) of attached endpoint NAME.
    #[arg(long = "attach-key")]
    pub attach_keys: Vec<String>,
    /// How often each replica's `/health` is polled.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub health_interval: Duration,
    /// How long one poll may take (SGLang's `/health` generates a token: up to 20 s).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub health_timeout: Duration,
    /// Failed polls in a row before a replica leaves (a refused connection: at once).
    #[arg(long, default_value_t = 3)]
    pub health_failures: u32,
    /// The largest request body accepted, in bytes.
    #[arg(long, default_value_t = 32 << 20)]
    pub max_body: usize,
    /// How long one request may take, its streamed answer included.
    #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
    pub request_timeout: Duration,
    /// Connections open at once, at most (over it new ones are closed at once, the others
    /// served); 0: as many as the descriptor limit allows, less a reserve for the router's own.
    #[arg(long, default_value_t = 0)]
    pub max_connections: usize,
    /// How long a client may take to send a request's headers, and how long a kept-alive
    /// connection may sit idle.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub header_timeout: Duration,
    /// How long a client may take to send a request's body.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub body_timeout: Duration,
    /// Request bodies held at once, in bytes, across all requests (over it: 503 with
    /// Retry-After).
    #[arg(long, default_value_t = 512 << 20)]
    pub max_buffered: usize,
    /// How requests are spread over a model's replicas: `prefix` (to the replica that holds
    /// the prompt's longest prefix, or the client's session, unless it is loaded past the
    /// margin) or `least_outstanding` (fewest in flight).
    #[arg(long, value_enum, default_value_t = crate::route::policy::Policy::Prefix)]
    pub policy: crate::route::policy::Policy,
    /// Another replica for a request whose replica failed before any byte of its answer
    /// (refused, reset, no headers, its own 502/503), at most this often.
    #[arg(long, default_value_t = 2)]
    pub retries: usize,
    /// What the prefix policy remembers, in bytes, at most.
    #[arg(long, default_value_t = 4 << 20)]
    pub prefix_memory: usize,
    /// How many more requests in flight than the least loaded replica the prefix's replica
    /// may have and still get the request.
    #[arg(long, default_value_t = 4)]
    pub prefix_margin: usize,
    /// The job's endpoint file: a replica serves only while the master calls it ready (the
    /// `--replica` flags in the job's replica order).
    #[arg(long)]
    pub state_file: Option<PathBuf>,
    /// Serve a service's chain of jobs (`service: {name: NAME}` in their config) at one URL:
    /// each job joins while the service file says it serves and drains at its handover; the
    /// service's key is needed. No `--replica`.
    #[arg(long, conflicts_with_all = ["replicas", "models", "attach", "state_file"])]
    pub service: Option<String>,
    /// The service's directory (default `~/.ray-launch/services/NAME`).
    #[arg(long, requires = "service")]
    pub service_dir: Option<String>,
    /// With `--service`: how many jobs may serve through it at once (a handover needs two).
    #[arg(long, default_value_t = 4, requires = "service")]
    pub slots: usize,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// The endpoint file (the config's `endpoint_file`, or RAY_LAUNCH_ENDPOINT).
    #[arg(env = ev::RAY_LAUNCH_ENDPOINT, required_unless_present = "service")]
    pub endpoint_file: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    /// A service's chain instead: each job, its state, URL and time left.
    #[arg(long)]
    pub service: Option<String>,
    /// The service's directory (default `~/.ray-launch/services/NAME`).
    #[arg(long, requires = "service")]
    pub service_dir: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum ServiceCmd {
    /// End a service's chain: no successor is submitted (a queued one is cancelled), the
    /// serving job drains and exits 0.
    Stop {
        name: String,
        /// The service's directory (default `~/.ray-launch/services/NAME`).
        #[arg(long)]
        dir: Option<String>,
    },
}

#[derive(Args, Debug)]
pub struct WaitArgs {
    /// The endpoint file (the config's `endpoint_file`, or RAY_LAUNCH_ENDPOINT).
    #[arg(env = ev::RAY_LAUNCH_ENDPOINT)]
    pub endpoint_file: PathBuf,
    /// Give up after this long (`30s`, `10m`).
    #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                exit::USAGE
            } else {
                exit::SUCCESS
            };
        }
    };
    let result = match cli.command {
        None => run(cli.run),
        Some(Cmd::Run(a)) => run(a),
        Some(Cmd::Plan(a)) => cmd_plan(a),
        Some(Cmd::Check(a)) => cmd_check(a),
        Some(Cmd::Batch(a)) => crate::batch::cli::main(a),
        Some(Cmd::Hostlist(h)) => cmd_hostlist(h),
        Some(Cmd::Wait(w)) => cmd_wait(w),
        Some(Cmd::Status(a)) => cmd_status(a),
        Some(Cmd::Route(r)) => cmd_route(r),
        Some(Cmd::Service(ServiceCmd::Stop { name, dir })) => {
            cmd_service_stop(&name, dir.as_deref())
        }
        Some(Cmd::Completions { shell }) => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut cmd, "ray-launch", &mut out);
            Ok(print_all(&out))
        }
        Some(Cmd::Man) => cmd_man(),
        Some(Cmd::Reap { grace }) => Ok(crate::run::reaper::main(grace)),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("{}", e.report());
            e.exit_code()
        }
    }
}

/// `ray-launch route`.
fn cmd_route(r: RouteArgs) -> Result<i32> {
    let service = route_service(&r)?;
    let slots: Vec<String> = match &service {
        Some(_) => (0..r.slots.max(1)).map(|_| String::new()).collect(),
        None => r.replicas.clone(),
    };
    crate::route::backends(&r.models, &slots, &r.attach, &r.attach_keys)
        .map_err(|e| Error::usage(format!("route: {e}")).hint("see `ray-launch route --help`"))
        .map(|(models, backends)| {
            // the connection cap follows the descriptor limit
            raise_nofile();
            crate::route::main(crate::route::Options {
                listen: r.listen,
                backends,
                models,
                health_interval: r.health_interval,
                health_timeout: r.health_timeout,
                health_failures: r.health_failures,
                max_body: r.max_body,
                request_timeout: r.request_timeout,
                api_key: service.as_ref().map(|(_, k)| k.clone()),
                limits: crate::route::server::Limits {
                    max_connections: r.max_connections,
                    header_timeout: r.header_timeout,
                    body_timeout: r.body_timeout,
                    max_buffered: r.max_buffered,
                },
                policy: r.policy,
                retries: r.retries,
                prefix_memory: r.prefix_memory,
                prefix_margin: r.prefix_margin,
                state_file: r.state_file,
                // a service's slots name each job they take in turn
                job: std::env::var(ev::SLURM_JOB_ID)
                    .ok()
                    .filter(|j| !j.is_empty() && service.is_none()),
                service: service.map(|(d, _)| d),
            })
        })
}

/// `route --service NAME`: the service's directory and key (refused like a job refuses them).
fn route_service(r: &RouteArgs) -> Result<Option<(PathBuf, String)>> {
    let Some(name) = &r.service else {
        return Ok(None);
    };
    let svc = crate::service::Service::find(name, r.service_dir.as_deref())
        .and_then(|s| {
            let key = crate::auth::read_key_file(&s.key_path())
                .map_err(|e| format!("the service key: {e}"))?;
            Ok((s.dir, key))
        })
        .map_err(|e| {
            Error::usage(format!("route --service {name}: {e}"))
                .hint("start the service's first job (its key is made then), or give its directory with --service-dir")
        })?;
    Ok(Some(svc))
}

/// The man page: the top command's page, then each visible subcommand's as a section.
fn cmd_man() -> Result<i32> {
    let cmd = <Cli as clap::CommandFactory>::command();
    let mut out = Vec::new();
    let written = clap_mangen::Man::new(cmd.clone())
        .render(&mut out)
        .and_then(|()| {
            for sub in cmd.get_subcommands().filter(|c| !c.is_hide_set()) {
                let name = format!("ray-launch-{}", sub.get_name());
                let bin = format!("ray-launch {}", sub.get_name());
                let page = clap_mangen::Man::new(sub.clone().display_name(name).bin_name(bin));
                page.render_title(&mut out)?;
                page.render_name_section(&mut out)?;
                page.render_synopsis_section(&mut out)?;
                page.render_description_section(&mut out)?;
                page.render_options_section(&mut out)?;
            }
            Ok(())
        });
    written.map_err(|e| Error::usage(format!("cannot render the man page: {e}")))?;
    Ok(print_all(&out))
}

/// Write generated text to stdout; a closed pipe (`| head`) is not an error worth a message.
fn print_all(out: &[u8]) -> i32 {
    use std::io::Write as _;
    let _ = std::io::stdout().write_all(out);
    exit::SUCCESS
}

/// Gather the facts and build the plan a subcommand shows or runs.
fn gather_and_plan(req: Request<'_>) -> Result<(Gathered, Plan)> {
    let g = gather::gather(req)?;
    let plan = plan::build(&g.settings, &g.step, &g.nodes)?;
    Ok((g, plan))
}

fn cmd_plan(a: PlanArgs) -> Result<i32> {
    let (_, plan) = gather_and_plan(Request {
        config: a.common.config.as_deref(),
        overrides: a.common.overrides(),
        nodelist: a.nodelist.as_deref(),
        job_id: a.job_id.as_deref(),
        client: a.client,
        resolve: Resolve::All,
    })?;
    match a.format {
        Format::Json => {
            println!(
                "{}",
                serde_json::to_string_pretty(&plan).expect("plan serializes")
            );
        }
        Format::Text => {
            let show: Vec<usize> = if !a.rank.is_empty() {
                for r in &a.rank {
                    if *r >= plan.ranks.len() {
                        return Err(Error::usage(format!(
                            "--rank {r}: the step has {} ranks",
                            plan.ranks.len()
                        ))
                        .hint(format!("use 0..{}", plan.ranks.len() - 1)));
                    }
                }
                a.rank.clone()
            } else if plan.ranks.len() <= 8 {
                (0..plan.ranks.len()).collect()
            } else {
                let mut v = vec![0, 1];
                if let Some(s) = &plan.self_rank {
                    v.push(s.node_rank);
                }
                v.sort();
                v.dedup();
                v
            };
            print!("{}", plan::render_text(&plan, &show));
        }
    }
    Ok(exit::SUCCESS)
}

fn cmd_check(a: CheckArgs) -> Result<i32> {
    let (g, plan) = gather_and_plan(Request {
        config: a.common.config.as_deref(),
        overrides: a.common.overrides(),
        nodelist: None,
        job_id: None,
        client: Vec::new(),
        resolve: Resolve::Needed,
    })?;
    let where_ = match g.step.kind {
        StepKind::Srun => format!(
            "srun step of job {}, this is node rank {}",
            g.step.job_id,
            g.step.self_rank.unwrap_or(0)
        ),
        StepKind::Local => "no Slurm step: a single-node run on this machine".to_string(),
        StepKind::Preview => "preview".to_string(),
    };
    let security = crate::input::gather::security(&g.settings, &g.step, &crate::auth::munge_works)?;
    for w in &plan.warnings {
        println!("warning: {w}");
    }
    // the batch first: a bad line is found without asking the engine anything
    check_batch(a.batch.as_deref(), &g.settings)?;
    check_versions(&plan, &g.settings)?;
    check_attached(&plan, &g.settings)?;
    check_node(&g, &plan)?;
    println!(
        "ok: {} is valid ({where_}; {} node(s), {} replica(s); ranks authenticate with {})",
        g.settings.config_path,
        plan.nodes,
        plan.replicas,
        security.method.name()
    );
    Ok(exit::SUCCESS)
}

/// `check --batch IN` (or the config's batch): every line valid, every model served.
fn check_batch(flag: Option<&std::path::Path>, s: &crate::input::settings::Settings) -> Result<()> {
    let models = s.model_names();
    let Some(path) = flag
        .map(PathBuf::from)
        .or_else(|| s.batch.as_ref().map(|b| PathBuf::from(&b.input)))
    else {
        return Ok(());
    };
    let sum = crate::batch::input::validate(
        &path,
        &models,
        crate::batch::input::Shard::ALL,
        &Default::default(),
    )
    .map_err(|e| {
        Error::usage(e)
            .hint("fix the line, or drop it; `ray-launch check --batch FILE` checks again")
    })?;
    let per: Vec<String> = sum
        .per_model
        .iter()
        .map(|(m, n)| format!("{n} for {m}"))
        .collect();
    println!(
        "ok: batch {} holds {} request(s): {}",
        path.display(),
        sum.requests,
        per.join(", ")
    );
    Ok(())
}

/// A runtime on this thread (the launcher's children get PDEATHSIG from the thread that
/// forked them: it must live as long as they do).
fn current_thread() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::internal("cannot start the async runtime").cause(e))
}

/// `check`: the installed Ray/vLLM/SGLang are new enough for the plan.
fn check_versions(plan: &Plan, s: &crate::input::settings::Settings) -> Result<()> {
    for need in crate::plan::versions::needs(plan, s) {
        let answer = std::process::Command::new(&need.argv[0])
            .args(&need.argv[1..])
            .stdin(std::process::Stdio::null())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).to_string());
        match crate::plan::versions::judge(&need, answer.as_deref()) {
            Ok(line) => println!("{line}"),
            Err(why) => {
                return Err(Error::usage(why).hint(format!(
                    "install a newer {} (or point {} at one)",
                    need.what,
                    match need.what {
                        "Ray" => "ray.executable",
                        "vLLM" => "vllm.executable",
                        _ => "sglang.python",
                    }
                )))
            }
        }
    }
    Ok(())
}

/// `check`: what the master checks before anything starts, checked now: every attached
/// endpoint answers.
fn check_attached(plan: &Plan, s: &crate::input::settings::Settings) -> Result<()> {
    if !plan.attached.is_empty() {
        // what the master checks before anything starts, checked now
        let within = s.policy.attach_timeout;
        let rt = current_thread()?;
        match rt.block_on(crate::route::attach::check_all(&plan.attached, within)) {
            Ok(found) => {
                for (name, ids) in found {
                    println!("attached `{name}` answers: it serves {}", ids.join(", "));
                }
            }
            Err(why) => {
                return Err(Error::new(crate::error::Kind::StartupTimeout, why).hint(
                    "a job with this config would stop with exit 3 before starting anything",
                ))
            }
        }
    }
    Ok(())
}

/// `check`: where the GPU count came from, and this node's pre-flight check.
fn check_node(g: &Gathered, plan: &Plan) -> Result<()> {
    match &g.settings.gpus_from {
        Some(from) => println!(
            "GPUs: {} per node (gpus_per_node: auto, from {from})",
            g.settings.gpus_per_node
        ),
        None => println!("GPUs: {} per node (as set)", g.settings.gpus_per_node),
    }
    if g.step.kind != StepKind::Preview {
        // this node's pre-flight check, as the rank runs it before the rendezvous
        let me = g.step.self_rank.unwrap_or(0);
        let temp_dir = plan
            .ranks
            .get(me)
            .map_or_else(|| "/tmp".to_string(), |r| r.temp_dir.clone());
        let rt = current_thread()?;
        let found = rt.block_on(crate::run::preflight::node(
            g.step.cuda_visible_devices.as_deref(),
            g.nodes.get(me).and_then(|n| n.interface.as_deref()),
            &temp_dir,
        ));
        if !found.is_empty() {
            return Err(Error::new(
                crate::error::Kind::LaunchFailure,
                format!("this node failed its pre-flight check: {}", found.join("; ")),
            )
            .hint("a job would stop with exit 6 before starting anything: free the GPU, or ask for other ones (the process is not yours to stop)"));
        }
        println!(
            "pre-flight: this node's GPUs are free, its interface is up, its temp dir has room"
        );
    }
    Ok(())
}

fn cmd_hostlist(h: HostlistCmd) -> Result<i32> {
    match h {
        HostlistCmd::Expand { exprs } => {
            let mut out = String::new();
            for e in exprs {
                for host in hostlist::expand(&e)? {
                    out.push_str(&host);
                    out.push('\n');
                }
            }
            print!("{out}");
        }
        HostlistCmd::Compress { hosts } => {
            let hosts = if hosts.is_empty() {
                let mut s = String::new();
                std::io::stdin()
                    .read_to_string(&mut s)
                    .map_err(|e| Error::usage("cannot read hosts from stdin").cause(e))?;
                s.split(|c: char| c == ',' || c.is_whitespace())
                    .filter(|x| !x.is_empty())
                    .map(str::to_string)
                    .collect()
            } else {
                hosts
            };
            println!("{}", hostlist::compress(&hosts)?);
        }
    }
    Ok(exit::SUCCESS)
}

fn open_service(name: &str, dir: Option<&str>) -> Result<crate::service::Service> {
    crate::service::Service::find(name, dir).map_err(|e| {
        Error::usage(format!("service `{name}`: {e}"))
            .hint("give the name in the jobs' `service: {name: NAME}` (and --service-dir when it sets `service.dir`)")
    })
}

/// `ray-launch service stop NAME`.
fn cmd_service_stop(name: &str, dir: Option<&str>) -> Result<i32> {
    use crate::service::JobState;
    let svc = open_service(name, dir)?;
    let sf = svc
        .update(|sf| {
            sf.stopped = true;
            sf.clone()
        })
        .map_err(Error::usage)?;
    for j in sf.jobs.iter().filter(|j| j.state == JobState::Queued) {
        let ok = std::process::Command::new("scancel")
            .arg(&j.job)
            .stdin(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        println!(
            "queued job {}: {}",
            j.job,
            if ok { "cancelled" } else { "scancel failed" }
        );
    }
    for j in sf.serving() {
        println!("job {} drains and exits 0", j.job);
    }
    println!("service `{name}` stopped: no successor will be submitted");
    Ok(exit::SUCCESS)
}

/// `ray-launch status --service NAME`: the chain.
fn service_status(name: &str, dir: Option<&str>, format: Format) -> Result<i32> {
    let svc = open_service(name, dir)?;
    let sf = svc.read().map_err(Error::usage)?;
    match format {
        Format::Json => println!(
            "{}",
            serde_json::to_string_pretty(&sf).expect("the service file serializes")
        ),
        Format::Text => {
            let now = crate::service::now();
            println!(
                "service {}{}",
                sf.name,
                if sf.stopped { " (stopped)" } else { "" }
            );
            for j in &sf.jobs {
                let left = j
                    .end
                    .map(|e| format!(", {}s left", e.saturating_sub(now)))
                    .unwrap_or_default();
                println!(
                    "  job {}: {}{left}{}{}{}",
                    j.job,
                    j.state.as_str(),
                    j.url
                        .as_deref()
                        .map(|u| format!(", {u}"))
                        .unwrap_or_default(),
                    j.successor
                        .as_deref()
                        .filter(|s| !s.is_empty())
                        .map(|s| format!(", successor {s}"))
                        .unwrap_or_default(),
                    j.reason
                        .as_deref()
                        .map(|r| format!(" ({r})"))
                        .unwrap_or_default(),
                );
            }
        }
    }
    Ok(exit::SUCCESS)
}

fn cmd_status(a: StatusArgs) -> Result<i32> {
    use crate::endpoint::EndpointFile;
    if let Some(name) = &a.service {
        return service_status(name, a.service_dir.as_deref(), a.format);
    }
    let path = a.endpoint_file.clone().unwrap_or_default();
    let shown = path.display().to_string();
    let f = EndpointFile::read(&path)
        .map_err(|e| Error::usage(e).hint("give the endpoint file of a job (its `endpoint_file`, by default ray-launch-JOBID/endpoint.json)"))?
        .ok_or_else(|| {
            Error::usage(format!("{shown} does not exist (yet)"))
                .hint("the master writes it as soon as it starts: is the job running (squeue)? `ray-launch wait` waits for it")
        })?;
    let now = std::time::SystemTime::now();
    match a.format {
        Format::Json => println!("{}", crate::endpoint::status_json(&f, now)),
        Format::Text => print!("{}", crate::endpoint::status_text(&f, now)),
    }
    Ok(exit::SUCCESS)
}

fn cmd_wait(w: WaitArgs) -> Result<i32> {
    let f = wait_ready(&w.endpoint_file, w.timeout)?;
    println!("{}", f.url.unwrap_or_default());
    Ok(exit::SUCCESS)
}

/// Wait until the endpoint file at `path` says ready (`ray-launch wait`, `ray-launch batch
/// --endpoint-file`); a job that ended first, or `timeout`, is the error.
pub fn wait_ready(
    path: &std::path::Path,
    timeout: Duration,
) -> Result<crate::endpoint::EndpointFile> {
    use crate::endpoint::{EndpointFile, Status};
    let deadline = std::time::Instant::now() + timeout;
    let shown = path.display().to_string();
    loop {
        // not there yet, or caught half-written by a non-atomic copy: look again
        if let Ok(Some(f)) = EndpointFile::read(path) {
            match f.status {
                Status::Ready => return Ok(f),
                st if st.is_final() => {
                    let reason = f.reason.as_deref().unwrap_or("no reason given");
                    return Err(Error::new(
                        crate::error::Kind::PeerFailure,
                        format!("the job behind {shown} has {}: {reason}", st.as_str()),
                    )
                    .hint("look at the job's output (and the logs next to the endpoint file)"));
                }
                _ => {}
            }
        }
        if std::time::Instant::now() >= deadline {
            return Err(Error::new(
                crate::error::Kind::StartupTimeout,
                format!(
                    "{shown} did not say ready within {}",
                    humantime::format_duration(timeout)
                ),
            )
            .hint("is the job running (squeue)? raise --timeout for large models"));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The master holds one connection per rank: a thousand ranks need more than the common
/// soft limit of 1024 open files. Raise the soft limit to the hard one.
pub fn raise_nofile() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}

fn run(a: RunArgs) -> Result<i32> {
    let rt = current_thread()?;
    rt.block_on(async move {
        // Signal handlers before anything else, so that an early scancel is seen.
        let sigs = crate::run::signals::listen()
            .map_err(|e| Error::internal("cannot install signal handlers").cause(e))?;
        raise_nofile();
        // what the launcher itself creates is private; children get the user's umask back
        crate::run::proc::private_umask();
        let overrides = Overrides {
            endpoint_file: a.endpoint_file.clone(),
            event_log: a.event_log.clone(),
            log_dir: a.log_dir.clone(),
            batch: a.batch.clone().zip(a.output.clone()),
            ..a.common.overrides()
        };
        if a.batch.is_some() && !a.client.is_empty() {
            return Err(Error::usage("--batch and a client command (`-- CMD`) both given: a batch job runs its batch as its client")
                .hint("drop one: `--batch IN --output OUT`, or `-- CMD`"));
        }
        let (g, plan) = gather_and_plan(Request {
            config: a.common.config.as_deref(),
            overrides,
            nodelist: None,
            job_id: None,
            client: a.client.clone(),
            resolve: Resolve::Needed,
        })?;
        let security = crate::input::gather::security(&g.settings, &g.step, &crate::auth::munge_works)?;
        let me = g.step.self_rank.unwrap_or(0);
        crate::logging::init(me, &g.step.nodes[me]);
        tracing::info!(
            "ray-launch {} job {} step {}: node rank {me} of {}, master {} ({}), address {}, auth {}",
            VERSION,
            g.step.job_id,
            g.step.step_id,
            g.step.nodes.len(),
            plan.master.node,
            plan.master.address,
            g.nodes[me].address,
            security.method.name()
        );
        if me == 0 {
            for w in &plan.warnings {
                tracing::warn!("{w}");
            }
        }
        Ok(crate::run::node(g, plan, security, sigs).await)
    })
}

"""Stand-in engine for ray-launch's end-to-end tests (never a substitute for the real one).

Accepts the command lines ray-launch builds for `vllm serve ...` and
`python -m sglang.launch_server ...`, records them, and:
- with `--distributed-executor-backend ray`: is a real Ray driver: connects to RAY_ADDRESS and
  waits until STANDIN_EXPECT_NODES nodes are alive (exit 1 if not within 60 s);
- without Ray (vLLM mp, SGLang), like the real engines: rank 0 listens on the rendezvous port
  (`--master-port` / the port of `--dist-init-addr`) and answers /health only once every other
  rank (`--nnodes`) has joined it; ranks > 0 write their record *before* they join, so a test
  that sees the leader healthy finds every record (exit 1 if the rendezvous fails within 60 s);
- unless `--headless`: serves /health, /v1/models and /v1/completions on --host/--port; with
  an API key (`--api-key`, or VLLM_API_KEY as vLLM reads it) /v1/* answers 401 without
  `Authorization: Bearer KEY`, and /health stays open, as in vLLM.
Environment: STANDIN_RECORD_DIR (write <node>.<flavour>.json there), STANDIN_EXPECT_NODES,
STANDIN_FAIL_REPLICA + STANDIN_REPLICA (the config's `{replica}`): when equal, exit 1 after
half a second, as an engine whose model does not load (tests of replica restarts);
STANDIN_SERVICE_MS: each answer takes that long; a request whose body holds BAD gets a 400
(as an engine answers a request too long for it); answers carry `usage`.
STANDIN_AUTH_LOG: append the Authorization header of every request there (tests that a key
goes only where it belongs). Like vLLM, a request for a model it does not serve is a 404,
and /metrics counts requests running and tokens generated (vLLM's names);
STANDIN_STALL_AFTER=N (with STANDIN_STALL_REPLICA equal to STANDIN_REPLICA, when set): from
the N+1th completion on, requests hang and no token is generated while /health still answers
200, as a hung engine does.
STANDIN_ESCAPE=1: like some engines' workers and user code, leave the launcher's session: a
child double-forks and setsid()s, ignores SIGTERM and idles forever (holding what a GPU
worker would hold); its pid is written to STANDIN_RECORD_DIR/<node>.escapee.<replica>.<pid>.
"""
import json, os, signal, socket, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

flavour, args = sys.argv[1], sys.argv[2:]
if flavour == "sglang":
    assert args[:2] == ["-m", "sglang.launch_server"], args
    args = args[2:]
    model = args[args.index("--model-path") + 1]
else:
    assert args[0] == "serve", args
    model = args[1]

def opt(name, default=None):
    return args[args.index(name) + 1] if name in args else default

signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
node = socket.gethostname()
rec = os.environ.get("STANDIN_RECORD_DIR")
if rec:
    env = {k: v for k, v in os.environ.items() if k.startswith(("VLLM_", "NCCL_", "GLOO_", "RAY_ADDRESS", "RAY_AUTH", "HF_", "STANDIN_"))}
    if "VLLM_API_KEY" in env:
        env["VLLM_API_KEY"] = "<set>"  # the record is no place for the key either
    record = {"argv": sys.argv[1:], "env": env, "pid": os.getpid()}
    nco = os.path.join(os.environ.get("VLLM_CONFIG_ROOT", "/nonexistent"), "ray_non_carry_over_env_vars.json")
    if os.path.exists(nco):
        record["non_carry_over"] = json.load(open(nco))
    with open(os.path.join(rec, f"{node}.{flavour}.json"), "w") as f:
        json.dump(record, f)

if os.environ.get("STANDIN_ESCAPE"):
    r, w = os.pipe()
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            os.close(r)
            if rec:
                tag = f"{node}.escapee.{os.environ.get('STANDIN_REPLICA', '0')}.{os.getpid()}"
                open(os.path.join(rec, tag), "w").close()
            os.write(w, b"x")
            os.close(w)
            while True:
                time.sleep(1)
        os._exit(0)
    os.close(w)
    os.read(r, 1)
    os.close(r)
    os.wait()

fail = os.environ.get("STANDIN_FAIL_REPLICA")
if fail is not None and fail == os.environ.get("STANDIN_REPLICA"):
    time.sleep(0.5)
    print(f"standin: replica {fail} fails at every start (STANDIN_FAIL_REPLICA)", flush=True)
    sys.exit(1)

alive = None
if opt("--distributed-executor-backend") == "ray":
    import ray
    ray.init(address=os.environ["RAY_ADDRESS"], logging_level="WARNING")
    want = int(os.environ.get("STANDIN_EXPECT_NODES", "1"))
    deadline = time.time() + 60
    while True:
        alive = [n for n in ray.nodes() if n["Alive"]]
        if len(alive) >= want:
            break
        if time.time() > deadline:
            print(f"standin: only {len(alive)} of {want} Ray nodes alive", flush=True)
            sys.exit(1)
        time.sleep(0.2)
    print(f"standin: Ray cluster has {len(alive)} alive nodes: {[n['NodeManagerAddress'] for n in alive]}", flush=True)

def rendezvous_addr():
    if flavour == "sglang":
        host, port = opt("--dist-init-addr").rsplit(":", 1)
        return host, int(port)
    if opt("--master-port") is not None:
        return opt("--master-addr"), int(opt("--master-port"))
    return None

nnodes, node_rank = int(opt("--nnodes", "1")), int(opt("--node-rank", "0"))
rdv = rendezvous_addr() if nnodes > 1 else None
joined = []  # followers' connections, held open for the engine's lifetime
if rdv and node_rank == 0:
    # the leader hosts the rendezvous (as torch's TCPStore does on rank 0) and serves
    # nothing before every rank has joined
    lsock = socket.create_server(("0.0.0.0", rdv[1]), reuse_port=False)
    lsock.settimeout(60)
    ranks = set()
    try:
        while len(ranks) < nnodes - 1:
            conn, _ = lsock.accept()
            conn.settimeout(10)
            r = int(conn.recv(64).decode().strip() or "-1")
            conn.sendall(b"ok\n")
            ranks.add(r)
            joined.append(conn)
    except (socket.timeout, ValueError) as e:
        print(f"standin: rendezvous failed with {sorted(ranks)} of {nnodes - 1} ranks joined: {e}", flush=True)
        sys.exit(1)
    print(f"standin: ranks {sorted(ranks)} joined the rendezvous", flush=True)
elif rdv:
    deadline = time.time() + 60
    while True:
        try:
            c = socket.create_connection(rdv, timeout=5)
            c.sendall(f"{node_rank}\n".encode())
            if c.recv(16).startswith(b"ok"):
                joined.append(c)
                break
        except OSError:
            pass
        if time.time() > deadline:
            print(f"standin: cannot join the rendezvous at {rdv}", flush=True)
            sys.exit(1)
        time.sleep(0.2)
    print(f"standin: rank {node_rank} joined the rendezvous at {rdv}", flush=True)

if "--headless" in args or (flavour == "sglang" and node_rank > 0):
    print("standin: headless rank, idling", flush=True)
    while True:
        time.sleep(1)

served = opt("--served-model-name", model)
import threading
stats = {"running": 0, "tokens": 0, "done": 0}
stats_lock = threading.Lock()
stall_after = os.environ.get("STANDIN_STALL_AFTER")
stall_rep = os.environ.get("STANDIN_STALL_REPLICA")
stalls = stall_after is not None and (stall_rep is None or stall_rep == os.environ.get("STANDIN_REPLICA"))
api_key = opt("--api-key") or os.environ.get("VLLM_API_KEY")
# STANDIN_SERVICE_MS: each answer takes this long (batch tests: work left when stopped)
service_s = float(os.environ.get("STANDIN_SERVICE_MS", "0")) / 1000

class H(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def reply(self, code, obj):
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def authorized(self):
        log = os.environ.get("STANDIN_AUTH_LOG")
        if log:
            with open(log, "a") as f:
                extra = "".join(f" {h}={self.headers[h]}" for h in ("Cookie", "X-Api-Key") if h in self.headers)
                f.write(self.headers.get("Authorization", "-") + extra + "\n")
        if api_key is None or not self.path.startswith("/v1"):
            return True
        if self.headers.get("Authorization", "") == f"Bearer {api_key}":
            return True
        self.reply(401, {"error": "Unauthorized"})
        return False

    def do_GET(self):
        if not self.authorized():
            return
        if self.path == "/health":
            self.reply(200, {})
        elif self.path == "/metrics":
            with stats_lock:
                text = (f"vllm:num_requests_running{{model_name=\"{served}\"}} {stats['running']}\n"
                        f"vllm:num_requests_waiting{{model_name=\"{served}\"}} 0\n"
                        f"vllm:generation_tokens_total{{model_name=\"{served}\"}} {stats['tokens']}\n")
            body = text.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path == "/v1/models":
            self.reply(200, {"object": "list", "data": [{"id": served, "object": "model"}]})
        else:
            self.reply(404, {"error": "not found"})

    def do_POST(self):
        n = int(self.headers.get("Content-Length", 0))
        raw = self.rfile.read(n)
        if not self.authorized():
            return
        try:
            asked = json.loads(raw or b"{}").get("model")
        except ValueError:
            asked = None
        if asked is not None and asked != served:
            self.reply(404, {"error": {"message": f"The model `{asked}` does not exist.", "type": "NotFoundError", "code": 404}})
            return
        if b"BAD" in raw:
            # what an engine says to a request it cannot serve (batch tests: a final error)
            self.reply(400, {"error": {"message": "This model's maximum context length is 256 tokens", "type": "BadRequestError", "code": 400}})
            return
        with stats_lock:
            stats["running"] += 1
            hang = stalls and stats["done"] >= int(stall_after)
        while hang:
            time.sleep(1)
        time.sleep(service_s)
        with stats_lock:
            stats["running"] -= 1
            stats["done"] += 1
            stats["tokens"] += 2
        self.reply(200, {"choices": [{"text": " stand-in", "index": 0}], "model": served,
                         "usage": {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6},
                         "replica": os.environ.get("STANDIN_REPLICA", "")})

host, port = opt("--host", "0.0.0.0"), int(opt("--port", "8000"))
# a slow engine (tests: a squatter may take the port in the meantime)
time.sleep(float(os.environ.get("STANDIN_BIND_DELAY", "0")))
print(f"standin: serving {served} on {host}:{port}", flush=True)
ThreadingHTTPServer((host, port), H).serve_forever()

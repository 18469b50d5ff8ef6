"""Stand-in engine for ray-launch's end-to-end tests (never a substitute for the real one).

Accepts the command lines ray-launch builds for `vllm serve ...` and
`python -m sglang.launch_server ...`, records them, and:
- with `--distributed-executor-backend ray`: is a real Ray driver: connects to RAY_ADDRESS and
  waits until STANDIN_EXPECT_NODES nodes are alive (exit 1 if not within 60 s);
- unless `--headless`: serves /health, /v1/models and /v1/completions on --host/--port.
Environment: STANDIN_RECORD_DIR (write <node>.<flavour>.json there), STANDIN_EXPECT_NODES.
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
    env = {k: v for k, v in os.environ.items() if k.startswith(("VLLM_", "NCCL_", "GLOO_", "RAY_ADDRESS", "HF_", "STANDIN_"))}
    with open(os.path.join(rec, f"{node}.{flavour}.json"), "w") as f:
        json.dump({"argv": sys.argv[1:], "env": env, "pid": os.getpid()}, f)

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

if "--headless" in args:
    print("standin: headless rank, idling", flush=True)
    while True:
        time.sleep(1)

served = opt("--served-model-name", model)

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

    def do_GET(self):
        if self.path == "/health":
            self.reply(200, {})
        elif self.path == "/v1/models":
            self.reply(200, {"object": "list", "data": [{"id": served, "object": "model"}]})
        else:
            self.reply(404, {"error": "not found"})

    def do_POST(self):
        n = int(self.headers.get("Content-Length", 0))
        self.rfile.read(n)
        self.reply(200, {"choices": [{"text": " stand-in", "index": 0}], "model": served})

host, port = opt("--host", "0.0.0.0"), int(opt("--port", "8000"))
print(f"standin: serving {served} on {host}:{port}", flush=True)
ThreadingHTTPServer((host, port), H).serve_forever()

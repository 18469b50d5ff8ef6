"""A small OpenAI-API client for ray-launch's client mode: one completion from
$OPENAI_BASE_URL, printed; exit 0 when tokens came back, 1 otherwise (proxies ignored)."""
import json, os, sys, urllib.request

base = os.environ["OPENAI_BASE_URL"]
model = json.load(open(os.environ["RAY_LAUNCH_ENDPOINT"]))["served_model_name"]
body = json.dumps({"model": model, "prompt": sys.argv[1] if len(sys.argv) > 1 else "hello world", "max_tokens": 16}).encode()
req = urllib.request.Request(f"{base}/completions", data=body, headers={"Content-Type": "application/json"})
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
reply = json.load(opener.open(req, timeout=120))
tokens = reply["usage"]["completion_tokens"]
print(f"completion ({tokens} tokens): {reply['choices'][0]['text']!r}")
sys.exit(0 if tokens > 0 else 1)

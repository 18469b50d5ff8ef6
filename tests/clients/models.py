"""Client of the several-models test, run by ray-launch in client mode, with the official
openai SDK (in .venv-vllm): every model by name at OPENAI_BASE_URL, and each at its own
RAY_LAUNCH_MODEL_<NAME>_URL; an unknown model is the SDK's NotFoundError.
`models.py OUT_FILE NAME...` writes {"listed", "by_name": {name: model}, "own_url": {...},
"unknown"} to OUT_FILE and exits 0 when every answer came from the model asked for.
"""
import json, os, sys
import openai
from openai import OpenAI

out, names = sys.argv[1], sys.argv[2:]
key = os.environ["OPENAI_API_KEY"]
c = OpenAI(max_retries=0, timeout=120)
res = {"listed": sorted(m.id for m in c.models.list()), "by_name": {}, "own_url": {}}
for n in names:
    r = c.completions.create(model=n, prompt="hello", max_tokens=2)
    res["by_name"][n] = r.model
    own = OpenAI(base_url=os.environ[f"RAY_LAUNCH_MODEL_{n.upper()}_URL"], api_key=key, max_retries=0, timeout=120)
    res["own_url"][n] = own.completions.create(model="whatever", prompt="hello", max_tokens=2).model
try:
    c.completions.create(model="no-such-model", prompt="hello", max_tokens=2)
    res["unknown"] = "answered"
except openai.NotFoundError as e:
    res["unknown"] = e.body.get("code") if isinstance(e.body, dict) else str(e.body)
with open(out, "w") as f:
    json.dump(res, f)
ok = all(res["by_name"][n] == res["own_url"][n] for n in names) and res["unknown"] == "model_not_found"
sys.exit(0 if ok else 1)

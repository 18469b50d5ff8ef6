"""Shared-prefix workload for the prefix-routing test, with the official openai SDK (in .venv-vllm).

`prefix.py BASE_URL KEY SEED PREFIXES ASKS`: makes PREFIXES distinct long prompts (about 150
tokens of the tiny model's words: more than one 128-token KV block), asks each ASKS times with a
short distinct question, in shuffled order, one at a time; prints {"requests", "prompt_tokens"
(of the first answer), "replicas" (x-ray-launch-replica → count)}. The seed keeps two runs'
prefixes apart, so one run's cache never serves the other.
"""
import json, random, sys
from openai import OpenAI

base, key, seed, n_prefix, asks = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
c = OpenAI(base_url=base, api_key=key, max_retries=0, timeout=120)
words = ["the", "cat", "dog", "sat", "on", "mat", "hello", "world", "ray", "cluster", "node", "server",
         "model", "token", "slurm", "job", "gpu", "cpu", "fast", "slow"]
rng = random.Random(seed)
prefixes = [" ".join(rng.choice(words) for _ in range(150)) for _ in range(n_prefix)]
work = [(p, j) for p in range(n_prefix) for j in range(asks)]
rng.shuffle(work)
replicas, first = {}, None
for p, j in work:
    question = " ".join(rng.choice(words) for _ in range(12))
    raw = c.completions.with_raw_response.create(model="tiny", prompt=f"{prefixes[p]} {question}", max_tokens=1)
    r = raw.headers.get("x-ray-launch-replica")
    replicas[r] = replicas.get(r, 0) + 1
    answer = raw.parse()
    if first is None:
        first = answer.usage.prompt_tokens
print(json.dumps({"requests": len(work), "prompt_tokens": first, "replicas": replicas}))

"""Client of the router tests, with the official openai SDK (in .venv-vllm).

`router.py check BASE_URL KEY`: lists the models, sends six completions and one streamed
completion; prints {"models", "replicas" (x-ray-launch-replica of each answer), "chunks"}.
`router.py load BASE_URL KEY STOP_FILE OUT_FILE`: two threads send completions until STOP_FILE
exists, then write {"ok": n, "failed": [error, ...]} to OUT_FILE. It also stops when the test
that started it is gone, or after ten minutes, so a failed test leaves no client spinning.
"""
import json, os, sys, threading, time
from openai import OpenAI

base, key, mode = sys.argv[1], sys.argv[2], sys.argv[3]
c = OpenAI(base_url=base, api_key=key, max_retries=0, timeout=120)

if mode == "check":
    models = [m.id for m in c.models.list()]
    served = []
    for _ in range(6):
        raw = c.completions.with_raw_response.create(model="tiny", prompt="hello", max_tokens=4)
        served.append(raw.headers.get("x-ray-launch-replica"))
        raw.parse()
    stream = c.completions.create(model="tiny", prompt="hello", max_tokens=16, stream=True)
    chunks = [ch.choices[0].text for ch in stream if ch.choices]
    print(json.dumps({"models": models, "replicas": sorted(set(served)), "chunks": len(chunks)}))
elif mode == "load":
    stop, out = sys.argv[4], sys.argv[5]
    res = {"ok": 0, "failed": []}
    lock = threading.Lock()

    parent, until = os.getppid(), time.time() + 600

    def going():
        return not os.path.exists(stop) and os.getppid() == parent and time.time() < until

    def work():
        while going():
            try:
                c.completions.create(model="tiny", prompt="hello", max_tokens=8)
                with lock:
                    res["ok"] += 1
            except Exception as e:  # every failure is reported, with the router's message
                body = getattr(e, "body", None)
                with lock:
                    res["failed"].append(f"{type(e).__name__} {getattr(e, 'status_code', '')} {body or e}"[:400])

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with open(out, "w") as f:
        json.dump(res, f)

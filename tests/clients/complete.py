"""A client for ray-launch's client mode, written as a user would: the official OpenAI SDK,
configured from the environment alone (OPENAI_BASE_URL, OPENAI_API_KEY; NO_PROXY keeps a
site's http_proxy out of the way). One completion, printed; exit 0 when tokens came back.
Also checks that the endpoint refuses a request without the key."""
import json, os, sys

import openai

model = json.load(open(os.environ["RAY_LAUNCH_ENDPOINT"]))["served_model_name"]
client = openai.OpenAI()  # base URL and key from the environment
reply = client.completions.create(model=model, prompt=sys.argv[1] if len(sys.argv) > 1 else "hello world", max_tokens=16)
tokens = reply.usage.completion_tokens
print(f"completion ({tokens} tokens): {reply.choices[0].text!r}")
try:
    openai.OpenAI(api_key="not-the-key").models.list()
    print("the endpoint answered a wrong key")
    sys.exit(1)
except openai.AuthenticationError:
    print("a wrong key is refused (401)")
sys.exit(0 if tokens > 0 else 1)

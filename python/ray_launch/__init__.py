"""ray-launch's Python face: find a running job's endpoint from a client script.

The ``ray-launch`` command itself is the binary this wheel installs on the PATH. This module
only reads the endpoint file the job's master writes (atomically, 0600), so client scripts that
run outside client mode (a second ``srun`` step, a login node, a notebook) get the URL and the
API key the same way ``ray-launch wait`` does::

    import ray_launch
    ep = ray_launch.wait("~/ray-launch/endpoint.json", timeout=900)
    client = ray_launch.openai_client(ep)        # needs the `openai` package
    client.completions.create(model="tiny", prompt="hello", max_tokens=8)

Only the standard library is used; ``openai_client`` imports ``openai`` when called.
"""

from __future__ import annotations

import json
import os
import time
from typing import NamedTuple, Optional, Union

__all__ = ["Endpoint", "JobEnded", "wait", "read", "openai_client"]

#: Where client mode puts the endpoint file's path (``RAY_LAUNCH_ENDPOINT``).
ENDPOINT_VAR = "RAY_LAUNCH_ENDPOINT"
#: Where the job writes it when it was told by the environment (``RAY_LAUNCH_ENDPOINT_FILE``).
ENDPOINT_FILE_VAR = "RAY_LAUNCH_ENDPOINT_FILE"


class Endpoint(NamedTuple):
    """A ready job: its OpenAI base URL (``.../v1``) and API key (None with ``auth: off``)."""

    base_url: str
    api_key: Optional[str]
    models: dict
    job_id: str
    path: str


class JobEnded(RuntimeError):
    """The job behind the endpoint file stopped or failed before it was ready."""


def _path(endpoint_file: Union[str, "os.PathLike[str]", None]) -> str:
    if endpoint_file is None:
        endpoint_file = os.environ.get(ENDPOINT_VAR) or os.environ.get(ENDPOINT_FILE_VAR)
    if not endpoint_file:
        raise ValueError(
            "no endpoint file: pass endpoint_file=..., or set RAY_LAUNCH_ENDPOINT "
            "(client mode sets it)"
        )
    return os.path.expanduser(os.fspath(endpoint_file))


def read(endpoint_file: Union[str, "os.PathLike[str]", None] = None) -> Optional[dict]:
    """The endpoint file as it is now (a dict), or None while it does not exist or is half-copied."""
    path = _path(endpoint_file)
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        return None
    except ValueError:
        return None  # caught mid-write by a non-atomic copy: look again


def _key(doc: dict) -> Optional[str]:
    key_path = doc.get("api_key_path")
    if not key_path:
        return None
    with open(key_path, encoding="utf-8") as f:
        return f.read().strip()


def wait(
    endpoint_file: Union[str, "os.PathLike[str]", None] = None,
    timeout: float = 600.0,
    poll: float = 0.25,
) -> Endpoint:
    """Wait until the job says ready; return its URL and key.

    ``endpoint_file`` defaults to ``$RAY_LAUNCH_ENDPOINT`` (then ``$RAY_LAUNCH_ENDPOINT_FILE``).
    Raises ``JobEnded`` when the job stopped or failed first (with its reason), and
    ``TimeoutError`` after ``timeout`` seconds.
    """
    path = _path(endpoint_file)
    deadline = time.monotonic() + timeout
    while True:
        doc = read(path)
        if isinstance(doc, dict):
            status = doc.get("status")
            if status == "ready" and doc.get("url"):
                return Endpoint(
                    base_url=doc["url"],
                    api_key=_key(doc),
                    models=doc.get("models") or {},
                    job_id=str(doc.get("job_id", "")),
                    path=path,
                )
            if status in ("stopped", "failed"):
                reason = doc.get("reason") or "no reason given"
                raise JobEnded(f"the job behind {path} has {status}: {reason}")
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"{path} did not say ready within {timeout:g} s "
                "(is the job running? see squeue; raise timeout for large models)"
            )
        time.sleep(poll)


def openai_client(endpoint: Union[Endpoint, str, "os.PathLike[str]", None] = None, **kwargs):
    """An ``openai.OpenAI`` client for the job (waits for it when given a path or nothing).

    Extra keyword arguments go to ``openai.OpenAI`` (e.g. ``timeout=``, ``max_retries=``).
    """
    try:
        import openai  # noqa: PLC0415 (optional dependency)
    except ImportError as e:
        raise ImportError("ray_launch.openai_client needs the `openai` package: pip install openai") from e
    ep = endpoint if isinstance(endpoint, Endpoint) else wait(endpoint)
    # the SDK insists on a key; a job with `auth: off` accepts any
    return openai.OpenAI(base_url=ep.base_url, api_key=ep.api_key or "none", **kwargs)

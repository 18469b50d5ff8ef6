"""The wheel's Python face (python/ray_launch), run against the installed package by
scripts/check-install.sh: `python -m unittest discover -s tests/python`."""

import json
import os
import tempfile
import threading
import time
import unittest

import ray_launch


def write(path, doc):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(doc if isinstance(doc, str) else json.dumps(doc))
    os.replace(tmp, path)


class Wait(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp()
        self.path = os.path.join(self.dir, "endpoint.json")
        self.key = os.path.join(self.dir, "api-key")
        with open(self.key, "w") as f:
            f.write("sk-test\n")

    def test_waits_for_ready_through_missing_and_torn_files(self):
        def later():
            time.sleep(0.3)
            write(self.path, '{"status": "sta')  # a half-copied file is looked at again
            time.sleep(0.3)
            write(self.path, {"status": "starting"})
            time.sleep(0.3)
            write(self.path, {"status": "ready", "url": "http://10.0.0.1:8000/v1",
                              "api_key_path": self.key, "job_id": "42",
                              "models": {"tiny": {"status": "ready"}}})

        t = threading.Thread(target=later)
        t.start()
        t0 = time.monotonic()
        ep = ray_launch.wait(self.path, timeout=30, poll=0.05)
        t.join()
        self.assertGreaterEqual(time.monotonic() - t0, 0.8)
        self.assertEqual(ep.base_url, "http://10.0.0.1:8000/v1")
        self.assertEqual(ep.api_key, "sk-test")
        self.assertEqual(ep.job_id, "42")
        self.assertIn("tiny", ep.models)

    def test_no_key_with_auth_off(self):
        write(self.path, {"status": "ready", "url": "http://h:1/v1", "api_key_path": None})
        self.assertIsNone(ray_launch.wait(self.path, timeout=1).api_key)

    def test_a_job_that_ended_says_why(self):
        write(self.path, {"status": "failed", "reason": "engine on node2 exited with 1"})
        with self.assertRaises(ray_launch.JobEnded) as e:
            ray_launch.wait(self.path, timeout=5)
        self.assertIn("engine on node2 exited with 1", str(e.exception))

    def test_times_out(self):
        write(self.path, {"status": "starting"})
        t0 = time.monotonic()
        with self.assertRaises(TimeoutError):
            ray_launch.wait(self.path, timeout=0.3, poll=0.05)
        self.assertLess(time.monotonic() - t0, 5)

    def test_path_from_the_environment(self):
        write(self.path, {"status": "ready", "url": "http://h:2/v1"})
        old = os.environ.get("RAY_LAUNCH_ENDPOINT")
        os.environ["RAY_LAUNCH_ENDPOINT"] = self.path
        try:
            self.assertEqual(ray_launch.wait(timeout=1).base_url, "http://h:2/v1")
        finally:
            if old is None:
                del os.environ["RAY_LAUNCH_ENDPOINT"]
            else:
                os.environ["RAY_LAUNCH_ENDPOINT"] = old

    def test_no_path_at_all_is_a_clear_error(self):
        env = {k: os.environ.pop(k) for k in ("RAY_LAUNCH_ENDPOINT", "RAY_LAUNCH_ENDPOINT_FILE")
               if k in os.environ}
        try:
            with self.assertRaises(ValueError) as e:
                ray_launch.wait(timeout=0)
            self.assertIn("RAY_LAUNCH_ENDPOINT", str(e.exception))
        finally:
            os.environ.update(env)

    def test_openai_client(self):
        write(self.path, {"status": "ready", "url": "http://h:3/v1", "api_key_path": self.key})
        try:
            import openai  # noqa: F401
        except ImportError:
            with self.assertRaises(ImportError) as e:
                ray_launch.openai_client(self.path)
            self.assertIn("pip install openai", str(e.exception))
            return
        c = ray_launch.openai_client(self.path)
        self.assertEqual(str(c.base_url).rstrip("/"), "http://h:3/v1")
        self.assertEqual(c.api_key, "sk-test")


if __name__ == "__main__":
    unittest.main()

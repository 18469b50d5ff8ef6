"""A foreign user's attacks on a ray-launch job (end-to-end security tests; run as another user).

  channel.py flood HOST PORT JOB STEP   idle connections, garbage, forged and replayed hellos,
                                        another job's hello, an oversized line; prints a JSON
                                        summary of what the master answered
  channel.py fake-master PORT SECONDS   listen on PORT as if it were the job's master: send a
                                        challenge, take the hello, answer "accepted" with a
                                        forged proof; print what came in
  channel.py relay PORT HOST TPORT SECONDS
                                        a port squatter that relays: listen on PORT, pass each
                                        connection through to the real master at HOST:TPORT,
                                        and once the master accepts a rank, rewrite its Welcome
                                        (master address 127.0.0.99) and inject a Stop; print
                                        what it relayed and whether the master accepted any
"""
import json, os, socket, subprocess, sys, time


def line(sock, limit=1 << 16):
    buf = b""
    while not buf.endswith(b"\n"):
        try:
            chunk = sock.recv(4096)
        except (socket.timeout, OSError):
            return None
        if not chunk:
            return None
        buf += chunk
        if len(buf) > limit:
            return None
    return json.loads(buf)


def closed(sock, wait=12):
    """Whether the master closes this connection (no Accepted) within `wait` seconds."""
    sock.settimeout(wait)
    try:
        data = sock.recv(4096)
    except socket.timeout:
        return False
    except OSError:
        return True
    if data:
        return json.loads(data.split(b"\n")[0]).get("type") != "accepted" and closed(sock, wait)
    return True


def munge_cred(payload):
    return subprocess.run(["munge"], input=payload.encode(), capture_output=True, check=True).stdout.decode().strip()


def hello(job, step, node, rank, proof):
    return {
        "type": "hello", "protocol": 2, "job_id": job, "step_id": step, "node": node,
        "node_rank": rank, "version": "0.1.0", "digest": "00", "settings_digests": {},
        "info": {"name": node, "address": "10.77.0.1", "interface": None, "cpus": 1,
                 "object_store_bytes": 1},
        "busy": [], "nonce": os.urandom(16).hex(), "proof": proof,
    }


def flood(host, port, job, step):
    out = {}

    def conn():
        s = socket.create_connection((host, port), timeout=5)
        ch = line(s)
        return s, ch

    results = {}
    # first the forged handshakes, one connection each; then the flood
    # garbage instead of a hello
    s, ch = conn()
    results["challenge_seen"] = bool(ch and ch.get("type") == "challenge")
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    results["garbage_closed"] = closed(s)
    # a hello with a forged HMAC-style proof, claiming rank 1
    s, ch = conn()
    s.sendall((json.dumps(hello(job, step, "node2", 1, "00" * 32)) + "\n").encode())
    results["forged_proof_closed"] = closed(s)
    # a hello with a real munge credential, but the attacker's own (another uid)
    cred = munge_cred(os.urandom(32).hex())
    s, ch = conn()
    s.sendall((json.dumps(hello(job, step, "node2", 1, cred)) + "\n").encode())
    results["foreign_uid_closed"] = closed(s)
    # the same credential again: a replay
    s, ch = conn()
    s.sendall((json.dumps(hello(job, step, "node3", 2, cred)) + "\n").encode())
    results["replay_closed"] = closed(s)
    # a rank of another job
    s, ch = conn()
    s.sendall((json.dumps(hello("999999", step, "node2", 1, cred)) + "\n").encode())
    results["other_job_closed"] = closed(s)
    # a line longer than anything a hello may be, without an end
    s, ch = conn()
    try:
        s.sendall(b"x" * (1 << 20))
    except OSError:
        pass
    results["oversized_closed"] = closed(s)
    out.update(results)
    # then a flood of idle connections
    idle = []
    for _ in range(500):
        try:
            idle.append(socket.create_connection((host, port), timeout=5))
        except OSError:
            pass
    out["idle_opened"] = len(idle)
    # how many of the idle ones the master dropped (the rest time out after 10 s)
    time.sleep(12)
    dropped = 0
    for s in idle:
        s.settimeout(0.5)
        try:
            while True:
                d = s.recv(4096)
                if not d:
                    dropped += 1
                    break
        except (socket.timeout, OSError):
            pass
    out["idle_dropped"] = dropped
    print(json.dumps(out), flush=True)


def fake_master(port, seconds):
    srv = socket.create_server(("0.0.0.0", port))
    srv.settimeout(1)
    print(json.dumps({"listening": port}), flush=True)
    seen = []
    end = time.time() + seconds
    while time.time() < end:
        try:
            c, peer = srv.accept()
        except socket.timeout:
            continue
        c.settimeout(5)
        c.sendall((json.dumps({"type": "challenge", "protocol": 2, "nonce": "ab" * 32, "job_nonce": "cd" * 32}) + "\n").encode())
        h = line(c)
        if h:
            seen.append({"peer": peer[0], "node": h.get("node"), "rank": h.get("node_rank")})
            c.sendall((json.dumps({"type": "accepted", "proof": munge_cred("forged")}) + "\n").encode())
        time.sleep(0.2)
        c.close()
    print(json.dumps({"hellos": seen}), flush=True)


def relay(port, host, tport, seconds):
    import threading
    srv = socket.create_server(("0.0.0.0", port))
    srv.settimeout(1)
    print(json.dumps({"listening": port}), flush=True)
    stats = {"relayed": 0, "accepted": 0, "injected": 0, "hellos": []}

    def pipe(rank, master):
        up = master.makefile("rb")
        down = rank.makefile("rb")

        def to_master():
            for l in down:
                try:
                    h = json.loads(l)
                    if h.get("type") == "hello":
                        stats["hellos"].append({"node": h.get("node"), "master_port": h.get("master_port")})
                except ValueError:
                    pass
                master.sendall(l)
        threading.Thread(target=to_master, daemon=True).start()
        for l in up:
            try:
                m = json.loads(l)
            except ValueError:
                m = {}
            if m.get("type") == "accepted":
                stats["accepted"] += 1
                rank.sendall(l)
                # the channel after the handshake: a forged stop
                rank.sendall((json.dumps({"type": "stop", "code": 0, "reason": "forged by the port squatter", "node": None}) + "\n").encode())
                stats["injected"] += 1
                continue
            if m.get("type") == "welcome":
                for n in m.get("nodes", []):
                    n["address"] = "127.0.0.99"
                l = (json.dumps(m) + "\n").encode()
            rank.sendall(l)

    def serve(c):
        # as a real relay would: keep trying the master (it may not listen yet) while the
        # rank waits for its challenge
        deadline = time.time() + 8
        while True:
            try:
                m = socket.create_connection((host, tport), timeout=2)
                break
            except OSError:
                if time.time() > deadline:
                    c.close()
                    return
                time.sleep(0.1)
        stats["relayed"] += 1
        pipe(c, m)

    end = time.time() + seconds
    while time.time() < end:
        try:
            c, _ = srv.accept()
        except socket.timeout:
            continue
        stats["connections"] = stats.get("connections", 0) + 1
        threading.Thread(target=serve, args=(c,), daemon=True).start()
    print(json.dumps(stats), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "flood":
        flood(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5])
    elif sys.argv[1] == "relay":
        relay(int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), float(sys.argv[5]))
    else:
        fake_master(int(sys.argv[2]), float(sys.argv[3]))

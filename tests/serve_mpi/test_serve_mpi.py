#!/usr/bin/env python3
"""`moeserve serve` under mpirun: data-parallel and prefill/decode-disaggregated layouts.

Every layout must give the same greedy output as one process for every request, sent all at
once, and the same sampled output for seeded requests at temperature > 0 (in the disaggregated
layouts the sampler's state crosses the prefill-to-decode handoff); afterwards no rank may hold
a KV block (read from /metrics). Expert parallelism with a placement file that holds redundant
experts gives the same output too. Fault cases on a 1 prefill + 1 decode launch: a decode pool
too small for the load (requests wait), clients that disconnect during prefill and during the
KV transfer, and a transfer that exceeds its time limit. A rank stopped with SIGSTOP (colocated,
and a decode rank) fails the open and new requests with an error naming it and turns /health to
503, until SIGCONT; SIGTERM while it is stopped ends the job within seconds. Prefix caching on
gives what one process gives with --no-prefix-caching for prompts sharing a long start
(colocated, where rank 0 routes them to the rank holding it, and disaggregated, where the decode
rank reuses the blocks it holds). Every layout ends
with SIGTERM or SIGINT to rank 0 while streams are in flight and busy loops load the machine:
every rank must end within seconds, and every client hear why.

Every wait waits for the state it needs, with a deadline.

    python3 tests/serve_mpi/test_serve_mpi.py --moeserve build/moeserve [--only NAME]

Standard library only. Needs mpirun; as root it sets OMPI_ALLOW_RUN_AS_ROOT itself.
"""

import argparse
import concurrent.futures
import http.client
import json
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mpi_jobs import rank0_pid, rank_pid  # noqa: E402

# Prompts of several lengths (in tokens of the DeepSeek-V3 tokenizer: about 3 to 120).
PROMPTS = [
    "Hello",
    "The quick brown fox jumps over the lazy dog.",
    "Mixture-of-experts models route each token to a few experts. " * 3,
    "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
    "def f(x):\n    return x * x\n" * 4,
    "Once upon a time " * 12,
    "A",
    "Expert parallelism spreads the experts of every layer over ranks; " * 5,
]
MAX_TOKENS = [8, 12, 1, 16, 6, 10, 3, 9]
# Seeded requests at temperature > 0: (prompt index, max_tokens, seed).
SAMPLED = [(1, 12, 7), (3, 10, 1234), (5, 14, 99)]
TEMPERATURE = 0.9
# Prompts that share a long start (a system prompt of about 150 tokens), for prefix caching.
SYSTEM = "You are a careful assistant. Answer briefly and say which rule you follow. " * 10
QUESTIONS = ["What is 2 + 2?", "Name a colour.", "Say hello.", "Count to three.", "Why?",
             "Tell me a joke about cats."]

FAILURES = []


def check(cond, what):
    if cond:
        print(f"  ok: {what}")
    else:
        print(f"  FAIL: {what}")
        FAILURES.append(what)
    return cond


def wait_for(cond, timeout, step=0.05):
    """Polls cond() until it is true or `timeout` seconds passed; returns its last value."""
    deadline = time.time() + timeout
    while True:
        v = cond()
        if v or time.time() > deadline:
            return v
        time.sleep(step)


LIVE = []  # servers started, for their output if the test dies


class Server:
    def __init__(self, args, model, ranks, extra, env_extra=None):
        LIVE.append(self)
        # Port 0: the server takes a free port itself and prints its URL once it serves.
        self.port = None
        cmd = [args.moeserve, "serve", "--model", model, "--port", "0"] + extra
        if "--max-batch-tokens" not in extra:
            cmd += ["--max-batch-tokens", "32"]  # prompts take several steps
        env = dict(os.environ)
        env.update(env_extra or {})
        if ranks:
            env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
            env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
            cmd = ["mpirun", "--oversubscribe", "-np", str(ranks)] + cmd
        self.log = tempfile.TemporaryFile(mode="w+")
        # A session of its own, so that whatever is left of it can be ended at once.
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        self.ranks = ranks
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("server exited early:\n" + self.output())
            if self.port is None:
                m = re.search(r"serving '[^']*' at http://127\.0\.0\.1:(\d+)", self.output())
                if m:
                    self.port = int(m.group(1))
            try:
                if self.port is not None and self.get("/health")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError("server did not come up:\n" + self.output())

    def output(self):
        self.log.seek(0)
        return self.log.read()

    def get(self, path):
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        c.request("GET", path)
        r = c.getresponse()
        return r.status, r.read().decode()

    def complete(self, prompt, max_tokens, stream=False, temperature=0, seed=None,
                 timeout=120):
        req = {"model": "demo", "prompt": prompt, "max_tokens": max_tokens,
               "temperature": temperature, "stream": stream}
        if seed is not None:
            req["seed"] = seed
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        c.request("POST", "/v1/completions", json.dumps(req), {"Content-Type": "application/json"})
        r = c.getresponse()
        data = r.read().decode()
        if stream:
            text, finish, error = "", None, None
            for line in data.splitlines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    ev = json.loads(line[6:])
                    if "error" in ev:
                        error = ev["error"]["message"]
                        continue
                    ch = ev["choices"][0]
                    text += ch["text"]
                    finish = ch.get("finish_reason") or finish
            out = {"text": text, "finish": finish}
            if error is not None:
                out["error"] = error
            return r.status, out
        j = json.loads(data)
        if r.status != 200:
            return r.status, j
        return r.status, {"text": j["choices"][0]["text"],
                          "finish": j["choices"][0]["finish_reason"],
                          "tokens": j["usage"]["completion_tokens"],
                          "cached": j["usage"]["prompt_tokens_details"]["cached_tokens"]}

    def metric(self, name):
        """Sum of every sample of metric `name` (all label sets)."""
        _, page = self.get("/metrics")
        total = 0.0
        for line in page.splitlines():
            m = re.match(re.escape(name) + r"(\{[^}]*\})? (\S+)$", line)
            if m:
                total += float(m.group(2))
        return total

    def wait_metric(self, name, value, timeout=20):
        """Waits until metric `name` reads `value`; returns what it read last."""
        last = [None]

        def read():
            last[0] = self.metric(name)
            return last[0] == value
        wait_for(read, timeout, 0.1)
        return last[0]

    def health(self):
        try:
            return self.get("/health")
        except OSError as e:
            return 0, str(e)

    def settle(self, timeout=20):
        """Waits until no rank runs, waits or holds a block; returns the blocks still used."""
        deadline = time.time() + timeout
        while True:
            used = self.metric("moeserve_kv_blocks_used")
            busy = self.metric("moeserve_num_requests_running") + self.metric(
                "moeserve_num_requests_waiting")
            if (used == 0 and busy == 0) or time.time() > deadline:
                return used
            time.sleep(0.2)

    def stop(self, sig=signal.SIGTERM, timeout=60):
        """SIGTERM to rank 0 (mpirun itself would kill the job): every rank shuts down."""
        target = self.proc.pid
        if self.ranks:
            target = rank0_pid(self.proc.pid)
        os.kill(target, sig)
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            rc = f"killed after {timeout} s"
        return rc

    def kill(self):
        """Ends every process of the job, stopped ones included."""
        for sig in (signal.SIGCONT, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except OSError:
                pass
        self.proc.wait()


def run_all(srv, stream_every=3, copies=1):
    work = list(zip(PROMPTS, MAX_TOKENS)) * copies
    with concurrent.futures.ThreadPoolExecutor(len(work)) as ex:
        futs = [ex.submit(srv.complete, p, n, i % stream_every == 0)
                for i, (p, n) in enumerate(work)]
        return [f.result() for f in futs]


def run_sampled(srv):
    """The seeded requests at temperature > 0, streamed and not."""
    with concurrent.futures.ThreadPoolExecutor(len(SAMPLED)) as ex:
        futs = [ex.submit(srv.complete, PROMPTS[i], n, k % 2 == 1, TEMPERATURE, seed)
                for k, (i, n, seed) in enumerate(SAMPLED)]
        return [f.result() for f in futs]


def compare_sampled(name, got, want):
    same = all(g[0] == 200 and g[1]["text"] == w[1]["text"] for g, w in zip(got, want))
    if not same:
        for i, (g, w) in enumerate(zip(got, want)):
            print(f"    sampled {i}: got {g!r}\n               want {w!r}")
    check(same, f"{name}: {len(got)} seeded requests at temperature {TEMPERATURE} match one "
          "process")


def compare(name, got, want):
    same = all(g[0] == 200 and g[1]["text"] == w[1]["text"] and g[1]["finish"] == w[1]["finish"]
               for g, w in zip(got, want))
    if not same:
        for i, (g, w) in enumerate(zip(got, want)):
            if g != w:
                print(f"    request {i}: got {g!r}\n               want {w!r}")
    check(same, f"{name}: {len(got)} concurrent greedy requests match one process")


def layout_case(args, model, ref, ref_sampled, name, ranks, extra, expect_transfers, sig,
                kv_dtype="bf16"):
    """Returns the KV bytes the layout transferred (0 without transfers)."""
    print(f"== {name}")
    srv = Server(args, model, ranks, extra)
    moved = 0
    try:
        got = run_all(srv)
        compare(name, got, ref)
        if ref_sampled is not None:
            compare_sampled(name, run_sampled(srv), ref_sampled)
        check(srv.settle() == 0, f"{name}: every rank freed its KV blocks")
        if expect_transfers:
            n = sum(1 for n in MAX_TOKENS if n > 1)
            if ref_sampled is not None:
                n += sum(1 for _, n, _ in SAMPLED if n > 1)
            got_n = srv.wait_metric("moeserve_kv_transfers_total", n)
            check(got_n == n, f"{name}: {n} KV transfers (requests with more than one token), "
                  f"read {got_n}")
            moved = srv.metric("moeserve_kv_transfer_bytes_total")
            check(moved > 0, f"{name}: bytes counted")
            check(srv.metric("moeserve_kv_leases_expired_total") == 0, f"{name}: no lease expired")
        else:
            _, page = srv.get("/metrics")
            check("moeserve_rank_kv_blocks_total" in page, f"{name}: per-rank metrics")
        _, page = srv.get("/metrics")
        check(f'moeserve_kv_cache_dtype{{dtype="{kv_dtype}"}} 1' in page,
              f"{name}: /metrics names the {kv_dtype} cache")
        check(srv.metric("moeserve_kv_capacity_tokens") > 0, f"{name}: KV capacity in tokens")
        check(re.search(r"KV cache \d+ tokens per rank in " + kv_dtype, srv.output()) is not None,
              f"{name}: the start-up line gives the KV capacity and dtype")
        stop_with_streams(srv, name, sig)
    finally:
        if srv.proc.poll() is None:
            srv.kill()
    return moved


def shared_prefix_rounds(srv):
    """Two rounds of the shared-prefix prompts, the second after the first has finished."""
    rounds = []
    for _ in range(2):
        with concurrent.futures.ThreadPoolExecutor(len(QUESTIONS)) as ex:
            futs = [ex.submit(srv.complete, SYSTEM + q, 6) for q in QUESTIONS]
            rounds.append([f.result() for f in futs])
    return rounds


def prefix_cache_cases(args, model):
    """Prefix caching on under mpirun gives what one process gives with it off: colocated (the
    front end sends a prompt to the rank holding its prefix) and disaggregated (the decode rank
    reads only the blocks it does not hold)."""
    print("== reference: one process, --no-prefix-caching")
    srv = Server(args, model, 0, ["--no-prefix-caching"])
    try:
        ref = shared_prefix_rounds(srv)
        check(all(r[0] == 200 for rnd in ref for r in rnd), "reference: shared-prefix prompts")
        check(all(r[1]["cached"] == 0 for rnd in ref for r in rnd),
              "--no-prefix-caching: no cached tokens reported")
        check(srv.metric("moeserve_prefix_cache_hits_total") == 0, "--no-prefix-caching: no hits")
    finally:
        srv.stop()
    pd = ["--prefill-ranks", "1", "--decode-ranks", "1"]
    for name, ranks, extra in [("prefix caching, colocated 2 ranks", 2, []),
                               ("prefix caching, disaggregated 1/1", 2, pd),
                               ("prefix caching, disaggregated 1/1 two-sided", 2,
                                pd + ["--kv-transfer", "two-sided"])]:
        print(f"== {name}")
        srv = Server(args, model, ranks, extra)
        try:
            got = shared_prefix_rounds(srv)
            for k in range(2):
                compare(f"{name}, round {k + 1}", got[k], ref[k])
            check(all(r[1].get("cached", 0) >= 144 for r in got[1]),
                  f"{name}: the second round reports the system prompt's blocks as cached: "
                  f"{[r[1].get('cached') for r in got[1]]}")
            hits = srv.metric("moeserve_prefix_cache_hits_total")
            check(hits >= 144 * len(QUESTIONS), f"{name}: /metrics counts the hits ({hits})")
            if not extra:
                # Every request after the first went where its prefix was (rank 0), although
                # rank 1 was less loaded while the first round ran.
                routed = srv.metric("moeserve_prefix_routed_requests_total")
                check(routed >= len(QUESTIONS) - 1,
                      f"{name}: requests routed to the rank holding their prefix ({routed})")
                _, page = srv.get("/metrics")
                m = re.search(r'moeserve_rank_kv_blocks_cached\{rank="1"[^}]*\} (\S+)', page)
                check(m is not None and float(m.group(1)) == 0,
                      f"{name}: rank 1 cached nothing: {m.group(0) if m else 'no metric'}")
            if extra:
                reused = srv.metric("moeserve_kv_transfer_blocks_reused_total")
                check(reused >= 9 * len(QUESTIONS),
                      f"{name}: the decode rank reused the blocks it held ({reused})")
            check(srv.settle() == 0, f"{name}: every rank freed its KV blocks")
        finally:
            srv.stop()


def disconnect(srv, prompt, after_first_token):
    """Starts a streamed request and drops the connection (after its first token, or at once)."""
    s = socket.create_connection(("127.0.0.1", srv.port))
    body = json.dumps({"model": "demo", "prompt": prompt, "max_tokens": 50, "temperature": 0,
                       "stream": True})
    s.sendall(("POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n{body}").encode())
    if after_first_token:
        data = b""
        while b"data: {" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    else:
        time.sleep(0.05)
    s.close()


def fault_cases(args, model, ref):
    print("== decode pool too small for the load: requests wait, nothing fails")
    srv = Server(args, model, 2, ["--prefill-ranks", "1", "--decode-ranks", "1",
                                  "--kv-cache-mb", "1", "--max-model-len", "256"])
    try:
        # 64 requests for pools of 25 blocks (400 tokens) each: enough that the decode rank fills
        # up however fast it decodes (with 32, a fast decode rank sometimes kept up).
        got = run_all(srv, copies=8)
        compare("small pools", got, ref * 8)
        check(srv.settle() == 0, "small pools: every rank freed its KV blocks")
        # Idle and settled: the peaks came with the same statistics.
        peak = {k: srv.metric(f'moeserve_rank_{k}_peak{{rank="1",role="decode"}}')
                for k in ("waiting_requests", "kv_blocks")}
        print(f"    decode rank peak: {peak['waiting_requests']:.0f} waiting, "
              f"{peak['kv_blocks']:.0f} of 25 blocks used")
        check(peak["waiting_requests"] > 0 and peak["kv_blocks"] >= 20,
              "small pools: the decode rank ran full and made requests wait")
    finally:
        check(srv.stop() == 0, "small pools: clean shutdown")

    print("== clients that disconnect during prefill and during the KV transfer")
    srv = Server(args, model, 2, ["--prefill-ranks", "1", "--decode-ranks", "1",
                                  "--max-batch-tokens", "4"],
                 {"MOESERVE_FAULT_KV_DELAY_MS": "400"})
    try:
        disconnect(srv, PROMPTS[7], after_first_token=False)   # long prompt: still prefilling
        disconnect(srv, PROMPTS[1], after_first_token=True)    # first token out: transferring
        cancelled = srv.wait_metric(
            'moeserve_requests_total{endpoint="completions",outcome="cancelled"}', 2)
        check(cancelled == 2, f"disconnects: both requests counted as cancelled ({cancelled})")
        check(srv.settle() == 0, "disconnects: no rank holds a KV block afterwards")
        st, r = srv.complete(PROMPTS[1], MAX_TOKENS[1])
        check(st == 200 and r["text"] == ref[1][1]["text"], "disconnects: the server still serves")
    finally:
        check(srv.stop() == 0, "disconnects: clean shutdown")

    print("== transfers nobody acknowledges: the prefill rank's lease frees the blocks")
    srv = Server(args, model, 2, ["--prefill-ranks", "1", "--decode-ranks", "1",
                                  "--kv-transfer-timeout-ms", "400", "--kv-lease-ms", "1000"],
                 {"MOESERVE_FAULT_NO_ACK": "1"})
    try:
        st, r = srv.complete(PROMPTS[1], MAX_TOKENS[1])
        check(st == 200 and r["text"] == ref[1][1]["text"], "lease: the request itself completes")
        expired = srv.wait_metric("moeserve_kv_leases_expired_total", 1)
        check(expired == 1, f"lease: one lease expired ({expired})")
        check(srv.settle() == 0, "lease: blocks freed on both sides")
    finally:
        check(srv.stop() == 0, "lease: clean shutdown")

    print("== a KV transfer over its time limit fails its request with a clear error")
    srv = Server(args, model, 2, ["--prefill-ranks", "1", "--decode-ranks", "1",
                                  "--kv-transfer-timeout-ms", "100", "--kv-lease-ms", "5000"],
                 {"MOESERVE_FAULT_KV_DELAY_MS": "300"})
    try:
        st, r = srv.complete(PROMPTS[1], 5)
        msg = json.dumps(r)
        # The read takes 300 ms: the deadline fails the request while it still runs.
        check(st >= 500 and "KV cache transfer from prefill rank 0 did not finish within the "
              "100 ms limit" in msg, f"timeout: error status and message ({st}: {msg[:200]})")
        failures = srv.wait_metric("moeserve_kv_transfer_failures_total", 1)
        check(failures == 1, f"timeout: failure counted ({failures})")
        check(srv.settle() == 0, "timeout: blocks freed on both sides")
    finally:
        check(srv.stop() == 0, "timeout: clean shutdown")


def placement_flags(model):
    """--placement with a file in which each of 2 ranks also holds copies of 4 of the other's
    experts."""
    with open(os.path.join(model, "config.json")) as f:
        n = json.load(f)["n_routed_experts"]
    half = n // 2
    ranks = [list(range(half)) + list(range(half, half + 4)),
             list(range(half, n)) + list(range(0, 4))]
    path = os.path.join(os.path.dirname(model), "placement.json")
    with open(path, "w") as f:
        json.dump({"format": "moeserve-placement", "version": 1, "n_experts": n, "n_ranks": 2,
                   "default": ranks}, f)
    return ["--placement", path]


def stopped_rank_case(args, model, ref, name, ranks, extra, victim, label, before=None):
    """SIGSTOP on rank `victim`: open and new requests fail naming it, /health is 503; after
    SIGCONT it serves again and shuts down cleanly. before(srv), if given, runs first."""
    print(f"== {name}: rank {victim} stopped with SIGSTOP")
    timeout_ms = 2000
    srv = Server(args, model, ranks, extra + ["--peer-timeout-ms", str(timeout_ms)])
    if before:
        before(srv)
    pid = rank_pid(srv.proc.pid, victim)
    stopped = False
    try:
        # Two long requests, one streamed, both running when the rank stops.
        results, streams, first_token = {}, [""], threading.Event()
        sock = open_stream(srv, PROMPTS[1])

        def streamed():
            read_stream(sock, first_token, streams, 0)
            results["streamed"] = (time.time(), streams[0])

        def plain():
            r = srv.complete(PROMPTS[3], 3000, timeout=60)
            results["plain"] = (time.time(), r)

        threads = [threading.Thread(target=streamed), threading.Thread(target=plain)]
        for t in threads:
            t.start()
        check(first_token.wait(60), f"{name}: the streamed request started")
        wait_for(lambda: srv.metric("moeserve_num_requests_running") >= 2, 20)
        os.kill(pid, signal.SIGSTOP)
        stopped = True
        t0 = time.time()
        deadline = timeout_ms / 1000 + 10
        for t in threads:
            t.join(deadline + 5)
        want = f"{label} has not answered for {timeout_ms} ms"
        if "streamed" in results:
            when, data = results["streamed"]
            check(want in data and "data: [DONE]" in data and when - t0 < deadline,
                  f"{name}: the open stream ends with an error naming {label} within "
                  f"{when - t0:.1f} s: {data[-300:]!r}")
        else:
            check(False, f"{name}: the open stream ended")
        if "plain" in results:
            when, (st, r) = results["plain"]
            msg = json.dumps(r)
            check(st >= 500 and want in msg and when - t0 < deadline,
                  f"{name}: the open request fails naming {label} within {when - t0:.1f} s "
                  f"({st}: {msg[:200]})")
        else:
            check(False, f"{name}: the open request ended")
        st, body = srv.health()
        check(st == 503 and want in body, f"{name}: /health says {st}: {body[:200]}")
        t1 = time.time()
        st, r = srv.complete(PROMPTS[0], 5, timeout=30)
        check(st >= 500 and want in json.dumps(r) and time.time() - t1 < 10,
              f"{name}: a new request fails at once naming {label} ({st})")
        os.kill(pid, signal.SIGCONT)
        stopped = False
        check(wait_for(lambda: srv.health()[0] == 200, 30),
              f"{name}: /health is 200 again after SIGCONT")
        st, r = srv.complete(PROMPTS[1], MAX_TOKENS[1])
        check(st == 200 and r["text"] == ref[1][1]["text"], f"{name}: it serves again ({st})")
        check(srv.settle(30) == 0, f"{name}: the failed requests' KV blocks are freed")
    finally:
        if stopped:
            os.kill(pid, signal.SIGCONT)
        rc = srv.stop()
    check(rc == 0, f"{name}: clean shutdown (exit {rc})")


def busy_loops(n):
    """n processes that spin, to load the machine."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def stopped_at_shutdown_case(args, model):
    """SIGTERM to rank 0 while rank 1 is stopped: rank 0 ends the job (it cannot stop rank 1
    cleanly) within seconds, naming rank 1, and leaves no process behind."""
    print("== SIGTERM while rank 1 is stopped")
    srv = Server(args, model, 2, ["--peer-timeout-ms", "2000"])
    pid = rank_pid(srv.proc.pid, 1)
    try:
        os.kill(pid, signal.SIGSTOP)
        t0 = time.time()
        rc = srv.stop(timeout=30)
        took = time.time() - t0
        out = srv.output()
        check(rc not in (0, None) and isinstance(rc, int) and took < 10,
              f"stopped at shutdown: the job ends in {took:.1f} s (exit {rc})")
        check("rank 1 did not answer the stop" in out, "stopped at shutdown: the reason is given")
        check(wait_for(lambda: not os.path.exists(f"/proc/{pid}"), 10),
              "stopped at shutdown: rank 1 is gone")
    finally:
        if srv.proc.poll() is None:
            srv.kill()


def open_stream(srv, prompt):
    """Sends a streamed request for 3000 tokens and returns its socket. The three streams are
    opened and sent from the calling thread, so that no stream waits on another's reader for
    the interpreter lock before its request is out."""
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=60)
    body = json.dumps({"model": "demo", "prompt": prompt, "max_tokens": 3000, "temperature": 0,
                       "stream": True})
    s.sendall(("POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n{body}").encode())
    return s


def read_stream(s, started, out, slot):
    """Reads a stream until the server ends it: notes its first event in `started`, the whole
    response in out[slot]. Only the newest bytes are searched, so a long stream costs linear
    time."""
    chunks, tail = [], b""
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
            window = tail + chunk
            if not started.is_set() and b"data: {" in window:
                started.set()
            if b"data: [DONE]" in window:
                break
            tail = window[-16:]
    except OSError:
        pass
    s.close()
    out[slot] = b"".join(chunks).decode(errors="replace")


class StreamReader:
    """Reads several streamed responses from one thread (no reader threads to wait on the
    interpreter lock): pump() takes what has arrived on every socket."""

    def __init__(self, socks):
        self.t0 = time.time()
        self.sel = selectors.DefaultSelector()
        self.chunks = [[] for _ in socks]
        self.tails = [b""] * len(socks)
        self.first = [None] * len(socks)  # seconds from t0 to the first event
        self.done = [False] * len(socks)
        for k, s in enumerate(socks):
            s.setblocking(False)
            self.sel.register(s, selectors.EVENT_READ, k)

    def pump(self, timeout):
        for key, _ in self.sel.select(timeout):
            k, s = key.data, key.fileobj
            try:
                chunk = s.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                chunk = b""
            if chunk:
                self.chunks[k].append(chunk)
                window = self.tails[k] + chunk
                if self.first[k] is None and b"data: {" in window:
                    self.first[k] = time.time() - self.t0
                self.tails[k] = window[-16:]
            if not chunk or b"data: [DONE]" in window:
                self.done[k] = True
                self.sel.unregister(s)
                s.close()

    def pump_until(self, cond, timeout):
        deadline = time.time() + timeout
        while not cond() and time.time() < deadline and self.sel.get_map():
            self.pump(0.05)
        return cond()

    def text(self, k):
        return b"".join(self.chunks[k]).decode(errors="replace")


def stop_with_streams(srv, name, sig):
    """SIGTERM or SIGINT to rank 0 while three streams are in flight, with the machine loaded by
    two busy loops: every rank ends within seconds, and every client hears why."""
    target = rank0_pid(srv.proc.pid)
    for attempt in range(3):
        rd = StreamReader([open_stream(srv, PROMPTS[i]) for i in (1, 3, 5)])
        started = rd.pump_until(lambda: all(f is not None for f in rd.first), 60)
        if not started or not all(rd.done):
            break
        # All three ran to their end before this client saw them start (it was descheduled):
        # nothing would be in flight for the signal. Start three more.
        print(f"    (attempt {attempt + 1}: the streams ended before their first events were "
              f"read, {rd.first} s; again)")
    check(started, f"{name}: {sum(f is not None for f in rd.first)} of 3 streams started")
    ended_before = sum(rd.done)
    load = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        t0 = time.time()
        os.kill(target, sig)
        # Keep reading while the job stops, so that no server write waits on this client.
        rc = None
        while time.time() - t0 < 30:
            rd.pump(0.05)
            rc = srv.proc.poll()
            if rc is not None:
                break
        took = time.time() - t0
        if rc is None:
            srv.kill()
            rc = "killed after 30 s"
        rd.pump_until(lambda: all(rd.done), 10)
    finally:
        for p in load:
            p.kill()
            p.wait()
    streams = [rd.text(k) for k in range(3)]
    still_open = len(streams) - sum(rd.done)
    told = [d for d in streams if "shutting down" in d and "data: [DONE]" in d]
    # A stream that ran to its end before the signal (a fast machine) has nothing to be told.
    ended = [d for d in streams if '"finish_reason":"length"' in d]
    check(rc == 0 and took < 15,
          f"{name}: {signal.Signals(sig).name} to rank 0 with 3 streams in flight, machine "
          f"loaded: every rank ended in {took:.1f} s (exit {rc})")
    ok = still_open == 0 and len(told) + len(ended) == len(streams) and told
    check(ok, f"{name}: {len(told)} of {len(streams)} streams told of the shutdown "
          f"({len(ended)} had ended before it, {still_open} still open)")
    if not ok:
        print(f"    first events after {rd.first} s; {ended_before} streams had ended when "
              f"the signal went")
        for i, d in enumerate(streams):
            print(f"    stream {i}: {len(d)} bytes, ends {d[-400:]!r}")
        print("    server output ends:\n" + srv.output()[-3000:])


# Speculative decoding: the trained model (its MTP module drafts tokens that are often accepted),
# requests long enough for many verify steps.
SPEC_MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "data", "models", "shakespeare-v3-tiny")
SPEC_PROMPTS = ["ROMEO:\nBut soft, what light", "First Citizen:\nBefore we proceed",
                "KING HENRY:\n", "To be, or not to be", "A", "Now is the winter of our",
                "JULIET:\nO Romeo, Romeo", "MENENIUS:\nWhy, masters, " * 6]
SPEC_MAX = [40, 24, 33, 17, 9, 30, 1, 26]
SPEC_SAMPLED = [(0, 30, 11), (2, 25, 5), (5, 28, 77), (7, 20, 3)]


def spec_run(srv):
    """The greedy requests and the seeded sampled ones (temperature 0.8), all at once: a
    speculating request's drafts, and so a sampled one's draws, depend only on the request."""
    work = [(p, n, 0, None) for p, n in zip(SPEC_PROMPTS, SPEC_MAX)]
    work += [(SPEC_PROMPTS[i], n, 0.8, seed) for i, n, seed in SPEC_SAMPLED]
    with concurrent.futures.ThreadPoolExecutor(len(work)) as ex:
        futs = [ex.submit(srv.complete, p, n, k % 3 == 0, t, seed)
                for k, (p, n, t, seed) in enumerate(work)]
        return [f.result() for f in futs]


def spec_layer_placement():
    """--placement with a file naming each MoE layer of the main model (redundant copies, no
    default): the MTP module's layer takes contiguous ranges."""
    with open(os.path.join(SPEC_MODEL, "config.json")) as f:
        c = json.load(f)
    n = c["n_routed_experts"]
    ranks = [list(range(n)), list(range(n // 2, n))]  # rank 0 holds every expert
    layers = {str(l): ranks for l in range(c["first_k_dense_replace"], c["num_hidden_layers"])}
    fd, path = tempfile.mkstemp(suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump({"format": "moeserve-placement", "version": 1, "n_experts": n, "n_ranks": 2,
                   "layers": layers}, f)
    return ["--placement", path]


def speculative_cases(args):
    """--speculative-tokens 2 under mpirun (disaggregated 1/1, one- and two-sided: the prefill
    rank runs the MTP module over the prompt and hands its drafts over with the KV blocks, which
    hold the module's rows; colocated 2 ranks and prefill/decode instances of 2 ranks: the module's MoE layer
    exchanges tokens over the expert-parallel group, every rank stepping it in lockstep) gives
    what one process gives with it: the same greedy text (that of decoding without it) and the
    same seeded samples; /metrics counts drafts and accepted drafts per rank and in all."""
    spec = ["--served-model-name", "demo", "--speculative-tokens", "2"]
    print("== speculative: reference, one process without speculation")
    srv = Server(args, SPEC_MODEL, 0, ["--served-model-name", "demo"])
    try:
        plain = spec_run(srv)
    finally:
        srv.stop()
    print("== speculative: reference, one process, --speculative-tokens 2")
    srv = Server(args, SPEC_MODEL, 0, spec)
    try:
        ref = spec_run(srv)
        check(all(r[0] == 200 for r in ref), "speculative reference: all requests succeed")
        ng = len(SPEC_PROMPTS)
        compare("speculative reference against decoding without it", ref[:ng], plain[:ng])
        drafts = srv.metric("moeserve_spec_decode_draft_tokens_total")
        accepted = srv.metric("moeserve_spec_decode_accepted_tokens_total")
        print(f"    one process: {accepted:.0f} of {drafts:.0f} drafts accepted")
        check(drafts > 0 and accepted > 0, "speculative reference: drafts verified and accepted")
    finally:
        srv.stop()
    for name, ranks, extra, roles in [
            ("speculative, disaggregated 1/1", 2, ["--prefill-ranks", "1", "--decode-ranks", "1"],
             ["prefill", "decode"]),
            ("speculative, disaggregated 1/1 two-sided", 2,
             ["--prefill-ranks", "1", "--decode-ranks", "1", "--kv-transfer", "two-sided"],
             ["prefill", "decode"]),
            ("speculative, colocated 2 ranks", 2, [], ["colocated", "colocated"]),
            ("speculative, colocated 2 ranks, placement of the main layers only", 2,
             spec_layer_placement, ["colocated", "colocated"]),
            ("speculative, disaggregated 2/2", 4, ["--prefill-ranks", "2", "--decode-ranks", "2"],
             ["prefill", "prefill", "decode", "decode"])]:
        if args.only and args.only not in name:
            continue
        print(f"== {name}")
        placement = None
        if callable(extra):
            extra = extra()
            placement = extra[1]
        srv = Server(args, SPEC_MODEL, ranks, spec + extra)
        try:
            got = spec_run(srv)
            ng = len(SPEC_PROMPTS)
            compare(name, got[:ng], ref[:ng])
            same = all(g[0] == 200 and g[1]["text"] == w[1]["text"]
                       for g, w in zip(got[ng:], ref[ng:]))
            if not same:
                for g, w in zip(got[ng:], ref[ng:]):
                    print(f"    sampled: got {g!r}\n             want {w!r}")
            check(same, f"{name}: {len(got) - ng} seeded sampled requests match one process")
            check(srv.settle() == 0, f"{name}: every rank freed its KV blocks")
            drafts = srv.metric("moeserve_spec_decode_draft_tokens_total")
            accepted = srv.metric("moeserve_spec_decode_accepted_tokens_total")
            print(f"    {accepted:.0f} of {drafts:.0f} drafts accepted")
            check(drafts > 0 and accepted > 0, f"{name}: /metrics counts drafts and accepted ones")
            _, page = srv.get("/metrics")
            per_rank = {}
            for r, role in enumerate(roles):
                m = re.search(r'moeserve_rank_spec_decode_draft_tokens\{rank="%d",role="%s"\} (\S+)'
                              % (r, role), page)
                per_rank[r] = float(m.group(1)) if m else None
            decoding = [r for r, role in enumerate(roles) if role != "prefill"]
            check(all(per_rank[r] is not None for r in per_rank)
                  and sum(per_rank[r] for r in decoding) == drafts
                  and all(per_rank[r] == 0 for r, role in enumerate(roles) if role == "prefill"),
                  f"{name}: per-rank draft counts add up to the total ({per_rank})")
        finally:
            srv.stop()
            if placement:
                os.unlink(placement)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--moeserve", default=os.environ.get("MOESERVE_BINARY", "build/moeserve"))
    ap.add_argument("--model", help="model folder (default: a new demo model)")
    ap.add_argument("--only", help="run only the cases whose name contains this")
    args = ap.parse_args()
    tmp = tempfile.TemporaryDirectory()
    model = args.model
    if not model:
        model = os.path.join(tmp.name, "demo")
        subprocess.run([args.moeserve, "init-model", "--preset", "demo", "--out", model],
                       check=True, stdout=subprocess.DEVNULL)
    print("== reference: one process")
    srv = Server(args, model, 0, [])
    try:
        ref = run_all(srv)
        check(all(r[0] == 200 for r in ref), "reference: all requests succeed")
        ref_sampled = run_sampled(srv)
        check(all(r[0] == 200 for r in ref_sampled), "reference: seeded sampled requests succeed")
        greedy = [srv.complete(PROMPTS[i], n)[1]["text"] for i, n, _ in SAMPLED]
        check(any(g != r[1]["text"] for g, r in zip(greedy, ref_sampled)),
              "reference: sampling at temperature > 0 differs from greedy")
        again = run_sampled(srv)
        check([r[1]["text"] for r in again] == [r[1]["text"] for r in ref_sampled],
              "reference: the same seeds give the same samples")
    finally:
        srv.stop()
    pd = ["--prefill-ranks", "1", "--decode-ranks", "1"]
    # (name, ranks, flags, KV transfers expected, seeded sampled requests too)
    cases = [
        ("colocated 2 ranks, least-loaded", 2, [], False, True),
        ("colocated 3 ranks, round-robin", 3, ["--router", "round-robin"], False, False),
        ("disaggregated 1/1", 2, pd, True, True),
        ("disaggregated 1/2", 3, ["--prefill-ranks", "1", "--decode-ranks", "2"], True, False),
        ("disaggregated 2/2", 4, ["--prefill-ranks", "2", "--decode-ranks", "2"], True, True),
        ("disaggregated 1/1 two-sided", 2, pd + ["--kv-transfer", "two-sided"], True, True),
    ]

    def wanted(name):
        return not args.only or args.only in name

    moved = {}
    for k, (name, ranks, extra, transfers, sampled) in enumerate(cases):
        if wanted(name):
            sig = signal.SIGTERM if k % 2 == 0 else signal.SIGINT
            layout_case(args, model, ref, ref_sampled if sampled else None, name, ranks, extra,
                        transfers, sig)
    # The other cache dtypes (the cases above run the default, bf16): each layout gives what
    # one process gives with that dtype, and the prefill-to-decode transfer moves the stored
    # bytes: the same requests' blocks, at each dtype's size.
    for kvd in ("f32", "fp8"):
        if not wanted(f"{kvd} cache"):
            continue
        flags = ["--kv-cache-dtype", kvd]
        print(f"== reference: one process, {kvd} cache")
        srv = Server(args, model, 0, flags)
        try:
            ref_d = run_all(srv)
            check(all(r[0] == 200 for r in ref_d), f"reference, {kvd} cache: all succeed")
        finally:
            srv.stop()
        layout_case(args, model, ref_d, None, f"colocated 2 ranks, {kvd} cache", 2, flags, False,
                    signal.SIGTERM, kvd)
        moved[kvd] = layout_case(args, model, ref_d, None, f"disaggregated 1/1, {kvd} cache", 2,
                                 pd + flags, True, signal.SIGTERM, kvd)
    if len(moved) == 2 and not args.model:
        # The demo model caches 128 + 32 values per layer and token: f32 rows of 640 bytes, fp8
        # rows of 160 bytes and two scales.
        check(moved["f32"] / 640 == moved["fp8"] / 168,
              f"KV transfers move each dtype's stored bytes: {moved}")
    if wanted("prefix caching"):
        prefix_cache_cases(args, model)
    if wanted("faults"):
        fault_cases(args, model, ref)
    if wanted("speculative") or "speculative" in (args.only or ""):
        speculative_cases(args)
    if wanted("stopped rank"):
        def placement(srv):  # first: expert parallelism with redundant experts
            compare("placement with redundant experts", run_all(srv), ref)

        stopped_rank_case(args, model, ref, "stopped rank, colocated 2 ranks, placement file", 2,
                          placement_flags(model), 1, "rank 1", placement)
        stopped_rank_case(args, model, ref, "stopped rank, disaggregated 1/1", 2, pd, 1,
                          "rank 1 (decode)")
        stopped_at_shutdown_case(args, model)
    if FAILURES:
        print(f"{len(FAILURES)} check(s) failed:")
        for f in FAILURES:
            print("  " + f)
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:
        if LIVE:
            print("---- output of the last server ----\n" + LIVE[-1].output()[-4000:])
        raise

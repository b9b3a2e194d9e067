#!/usr/bin/env python3
"""`moeserve serve` under mpirun: data-parallel and prefill/decode-disaggregated layouts.

Every layout must give the same greedy output as one process for every request, sent all at
once; afterwards no rank may hold a KV block (read from /metrics). Fault cases on a 1 prefill +
1 decode launch: a decode pool too small for the load (requests wait), clients that disconnect
during prefill and during the KV transfer, and a transfer that exceeds its time limit.

    python3 tests/serve_mpi/test_serve_mpi.py --moeserve build/moeserve [--only NAME]

Standard library only. Needs mpirun; as root it sets OMPI_ALLOW_RUN_AS_ROOT itself.
"""

import argparse
import concurrent.futures
import http.client
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mpi_jobs import free_port, rank0_pid  # noqa: E402

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

FAILURES = []


def check(cond, what):
    if cond:
        print(f"  ok: {what}")
    else:
        print(f"  FAIL: {what}")
        FAILURES.append(what)


LIVE = []  # servers started, for their output if the test dies


class Server:
    def __init__(self, args, model, ranks, extra, env_extra=None):
        LIVE.append(self)
        self.port = free_port()
        cmd = [args.moeserve, "serve", "--model", model, "--port", str(self.port)] + extra
        if "--max-batch-tokens" not in extra:
            cmd += ["--max-batch-tokens", "32"]  # prompts take several steps
        env = dict(os.environ)
        env.update(env_extra or {})
        if ranks:
            env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
            env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
            cmd = ["mpirun", "--oversubscribe", "-np", str(ranks)] + cmd
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.ranks = ranks
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("server exited early:\n" + self.output())
            try:
                if self.get("/health")[0] == 200:
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

    def complete(self, prompt, max_tokens, stream=False):
        body = json.dumps({"model": "demo", "prompt": prompt, "max_tokens": max_tokens,
                           "temperature": 0, "stream": stream})
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        c.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        r = c.getresponse()
        data = r.read().decode()
        if stream:
            text, finish = "", None
            for line in data.splitlines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    ch = json.loads(line[6:])["choices"][0]
                    text += ch["text"]
                    finish = ch.get("finish_reason") or finish
            return r.status, {"text": text, "finish": finish}
        j = json.loads(data)
        if r.status != 200:
            return r.status, j
        return r.status, {"text": j["choices"][0]["text"],
                          "finish": j["choices"][0]["finish_reason"],
                          "tokens": j["usage"]["completion_tokens"]}

    def metric(self, name):
        """Sum of every sample of metric `name` (all label sets)."""
        _, page = self.get("/metrics")
        total = 0.0
        for line in page.splitlines():
            m = re.match(re.escape(name) + r"(\{[^}]*\})? (\S+)$", line)
            if m:
                total += float(m.group(2))
        return total

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

    def stop(self):
        """SIGTERM to rank 0 (mpirun itself would kill the job): every rank shuts down."""
        target = self.proc.pid
        if self.ranks:
            target = rank0_pid(self.proc.pid)
        os.kill(target, 15)
        try:
            rc = self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = "killed after 60 s"
        return rc


def run_all(srv, stream_every=3, copies=1):
    work = list(zip(PROMPTS, MAX_TOKENS)) * copies
    with concurrent.futures.ThreadPoolExecutor(len(work)) as ex:
        futs = [ex.submit(srv.complete, p, n, i % stream_every == 0)
                for i, (p, n) in enumerate(work)]
        return [f.result() for f in futs]


def compare(name, got, want):
    same = all(g[0] == 200 and g[1]["text"] == w[1]["text"] and g[1]["finish"] == w[1]["finish"]
               for g, w in zip(got, want))
    if not same:
        for i, (g, w) in enumerate(zip(got, want)):
            if g != w:
                print(f"    request {i}: got {g!r}\n               want {w!r}")
    check(same, f"{name}: {len(got)} concurrent greedy requests match one process")


def layout_case(args, model, ref, name, ranks, extra, expect_transfers):
    print(f"== {name}")
    srv = Server(args, model, ranks, extra)
    try:
        got = run_all(srv)
        compare(name, got, ref)
        check(srv.settle() == 0, f"{name}: every rank freed its KV blocks")
        if expect_transfers:
            n = sum(1 for n in MAX_TOKENS if n > 1)
            check(srv.metric("moeserve_kv_transfers_total") == n,
                  f"{name}: {n} KV transfers (requests with more than one token)")
            check(srv.metric("moeserve_kv_transfer_bytes_total") > 0, f"{name}: bytes counted")
            check(srv.metric("moeserve_kv_leases_expired_total") == 0, f"{name}: no lease expired")
        else:
            _, page = srv.get("/metrics")
            check("moeserve_rank_kv_blocks_total" in page, f"{name}: per-rank metrics")
    finally:
        rc = srv.stop()
    check(rc == 0, f"{name}: clean shutdown of every rank (exit {rc})")


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
        peak = {k: srv.metric(f'moeserve_rank_{k}_peak{{rank="1",role="decode"}}')
                for k in ("waiting_requests", "kv_blocks")}
        print(f"    decode rank peak: {peak['waiting_requests']:.0f} waiting, "
              f"{peak['kv_blocks']:.0f} of 25 blocks used")
        check(peak["waiting_requests"] > 0 and peak["kv_blocks"] >= 20,
              "small pools: the decode rank ran full and made requests wait")
        check(srv.settle() == 0, "small pools: every rank freed its KV blocks")
    finally:
        check(srv.stop() == 0, "small pools: clean shutdown")

    print("== clients that disconnect during prefill and during the KV transfer")
    srv = Server(args, model, 2, ["--prefill-ranks", "1", "--decode-ranks", "1",
                                  "--max-batch-tokens", "4"],
                 {"MOESERVE_FAULT_KV_DELAY_MS": "400"})
    try:
        disconnect(srv, PROMPTS[7], after_first_token=False)   # long prompt: still prefilling
        disconnect(srv, PROMPTS[1], after_first_token=True)    # first token out: transferring
        time.sleep(1.5)
        check(srv.settle() == 0, "disconnects: no rank holds a KV block afterwards")
        check(srv.metric('moeserve_requests_total{endpoint="completions",outcome="cancelled"}') == 2,
              "disconnects: both requests counted as cancelled")
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
        time.sleep(1.5)
        check(srv.metric("moeserve_kv_leases_expired_total") == 1, "lease: one lease expired")
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
        check(st >= 500 and "KV cache transfer" in msg and "100" in msg,
              f"timeout: error status and message ({st}: {msg[:160]})")
        check(srv.metric("moeserve_kv_transfer_failures_total") == 1, "timeout: failure counted")
        check(srv.settle() == 0, "timeout: blocks freed on both sides")
    finally:
        check(srv.stop() == 0, "timeout: clean shutdown")


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
    finally:
        srv.stop()
    cases = [
        ("colocated 2 ranks, least-loaded", 2, [], False),
        ("colocated 3 ranks, round-robin", 3, ["--router", "round-robin"], False),
        ("disaggregated 1/1", 2, ["--prefill-ranks", "1", "--decode-ranks", "1"], True),
        ("disaggregated 1/2", 3, ["--prefill-ranks", "1", "--decode-ranks", "2"], True),
        ("disaggregated 2/2", 4, ["--prefill-ranks", "2", "--decode-ranks", "2"], True),
        ("disaggregated 1/1 two-sided", 2,
         ["--prefill-ranks", "1", "--decode-ranks", "1", "--kv-transfer", "two-sided"], True),
    ]
    for name, ranks, extra, transfers in cases:
        if args.only and args.only not in name:
            continue
        layout_case(args, model, ref, name, ranks, extra, transfers)
    if not args.only or args.only in "faults":
        fault_cases(args, model, ref)
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

#!/usr/bin/env python3
"""The engine across hosts, on the test bed of scripts/testbed.sh (network namespaces, TCP).

- Transport: with one rank per host, shared memory (vader) alone cannot connect the ranks (Open
  MPI treats the hosts as separate nodes) and TCP alone can; the ranks see their own hostnames.
- Expert parallelism over 2 hosts x 2 ranks: `score` and `generate` bit-identical to one process,
  also with a prompt overlapped in two micro-batches (--ep-overlap on and off).
- Prefill on host 1, decode on host 2 (`serve --prefill-ranks 1 --decode-ranks 1`): every greedy
  request gives what one process gives, with the KV cache crossing the hosts one-sided (MPI RMA,
  where an osc component works over TCP: osc/ucx) and two-sided. osc/ucx over TCP was seen to return wrong
  data from windows of about 94 MB and more (docs/expert-parallel.md); this case's few requests
  pass, presumably because they use only the pool's first blocks. Without osc/ucx the
  one-sided window is refused with one clear error.
- The decode rank on host 2 killed with SIGKILL mid-request: the client's request ends (an error
  or a closed connection, never a hang) and the job ends with Open MPI's message naming the rank.

Exits 77 (skipped) with a message where network namespaces cannot be made (not root, or a
container without CAP_SYS_ADMIN). Every wait has a deadline.

    python3 tests/testbed/test_testbed.py --moeserve build/moeserve
"""

import argparse
import concurrent.futures
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.dirname(HERE))
from mpi_jobs import rank_pid  # noqa: E402

TESTBED = os.path.join(SRC, "scripts", "testbed.sh")
NAME = "mstt"  # this test's own test bed, apart from one made by hand
SUBNET = "10.213.7"
TB = [TESTBED, "--name", NAME, "--subnet", SUBNET]
SKIP = 77

PROMPTS = ["Hello", "The quick brown fox jumps over the lazy dog.",
           "Mixture-of-experts models route each token to a few experts. " * 3,
           "1 2 3 4 5 6 7 8 9 10 11 12"]
MAX_TOKENS = [6, 10, 4, 8]

FAILURES = []


def check(cond, what):
    print(("  ok: " if cond else "  FAIL: ") + what, flush=True)
    if not cond:
        FAILURES.append(what)
    return cond


def tb_run(args, timeout=120, env=None):
    """mpirun on the test bed; returns (rc, stdout, stderr)."""
    e = dict(os.environ)
    e.update(env or {})
    p = subprocess.run(TB + ["run"] + args, capture_output=True, text=True, timeout=timeout, env=e)
    return p.returncode, p.stdout, p.stderr


class Server:
    """`moeserve serve`, alone (address 127.0.0.1) or on the test bed (rank 0 on host 1)."""

    def __init__(self, cmd, testbed, log_name):
        self.testbed = testbed
        self.log = tempfile.TemporaryFile(mode="w+")
        self.addr = f"{SUBNET}.1" if testbed else "127.0.0.1"
        full = (TB + ["run"] + cmd) if testbed else cmd
        self.proc = subprocess.Popen(full, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.port = None
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{log_name}: server exited early:\n{self.output()}")
            m = re.search(r"serving '[^']*' at http://[0-9.]+:(\d+)", self.output())
            if m:
                self.port = int(m.group(1))
                try:
                    if self.get("/health")[0] == 200:
                        return
                except OSError:
                    pass
            time.sleep(0.2)
        self.kill()
        raise RuntimeError(f"{log_name}: server did not come up:\n{self.output()}")

    def output(self):
        self.log.seek(0)
        return self.log.read()

    def get(self, path):
        c = http.client.HTTPConnection(self.addr, self.port, timeout=30)
        c.request("GET", path)
        r = c.getresponse()
        return r.status, r.read().decode()

    def complete(self, prompt, max_tokens, stream=False, timeout=120):
        req = {"model": "demo", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
               "stream": stream}
        c = http.client.HTTPConnection(self.addr, self.port, timeout=timeout)
        c.request("POST", "/v1/completions", json.dumps(req), {"Content-Type": "application/json"})
        r = c.getresponse()
        data = r.read().decode()
        if stream:
            return r.status, data
        j = json.loads(data)
        if r.status != 200:
            return r.status, j
        return r.status, (j["choices"][0]["text"], j["choices"][0]["finish_reason"])

    def run_all(self):
        with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as ex:
            return list(ex.map(lambda pn: self.complete(*pn), zip(PROMPTS, MAX_TOKENS)))

    def metric(self, name):
        _, page = self.get("/metrics")
        return sum(float(m.group(2)) for m in
                   re.finditer("^" + re.escape(name) + r"(\{[^}]*\})? (\S+)$", page, re.M))

    def stop(self, timeout=60):
        """SIGTERM to rank 0 (on the test bed: the rank's process, found through mpirun)."""
        target = rank_pid(self.proc.pid, 0) if self.testbed else self.proc.pid
        os.kill(target, signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return f"killed after {timeout} s"

    def kill(self):
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:
            pass
        self.proc.wait()


def net_ns(pid):
    return os.readlink(f"/proc/{pid}/ns/net")


def transport_case(args):
    print("== transport between hosts", flush=True)
    rc, out, _ = tb_run(["-np", "4", "sh", "-c", "echo $(hostname) $OMPI_COMM_WORLD_RANK"])
    names = sorted(out.split("\n"))
    check(rc == 0 and names[-4:] == ["host1 0", "host1 1", "host2 2", "host2 3"],
          f"ranks 0-1 run on host1, 2-3 on host2 (got {out.split(chr(10))})")
    model = os.path.join(SRC, "tests", "fixtures", "models", "v3_tiny")
    score = [args.moeserve, "score", "--model", model, "--ids", "5,17,200,2,41", "--threads", "1"]
    ref = subprocess.run(score, capture_output=True, text=True, check=True).stdout
    rc, out, err = tb_run(["-np", "2", "--map-by", "node"] + score,
                          env={"MOESERVE_TESTBED_BTL": "vader,self"})
    check(rc != 0 and "unable to reach each other" in err,
          "one rank per host: shared memory alone cannot connect them (separate nodes)")
    rc, out, err = tb_run(["-np", "2", "--map-by", "node"] + score,
                          env={"MOESERVE_TESTBED_BTL": "tcp,self"})
    check(rc == 0 and out == ref, "one rank per host: TCP alone works, score as one process")


def ep_case(args, tmp):
    print("== expert parallelism, 2 hosts x 2 ranks", flush=True)

    one_process = {}  # what -> its output in one process

    def same_as_one_process(what, extra, label):
        """`moeserve WHAT` on 4 ranks over the hosts (with EXTRA) prints one process's bytes."""
        if tuple(what) not in one_process:
            one_process[tuple(what)] = subprocess.run([args.moeserve] + what, capture_output=True,
                                                      text=True, check=True).stdout
        ref = one_process[tuple(what)]
        rc, out, err = tb_run(["-np", "4", args.moeserve] + what + ["--threads", "1"] + extra)
        check(rc == 0 and out == ref and out, f"{label}: bit-identical to one process"
              + ("" if rc == 0 else f" (rc {rc}: {err[-500:]})"))

    ids = "5,17,200,2,2,2,41,7,99,123,64,1,0,255"
    for name in ("v3_tiny", "v3_fp8_tiny"):
        model = os.path.join(SRC, "tests", "fixtures", "models", name)
        for what in (["score", "--model", model, "--ids", ids],
                     ["generate", "--model", model, "--prompt-ids", "3,1,4,1,5", "--max-tokens",
                      "10", "--json", "--ignore-eos"]):
            for red in ("0", "3"):
                same_as_one_process(what, ["--redundant-experts", red],
                                    f"{what[0]} {name}, redundant {red}")
    # A prompt long enough for overlapped micro-batches (--ep-overlap; 64 tokens and more),
    # exchanged across the hosts through TCP: on and off bit-identical to one process.
    model = os.path.join(SRC, "tests", "fixtures", "models", "v3_tiny")
    score = ["score", "--model", model, "--ids", ",".join(str(3 * i % 250) for i in range(100))]
    for overlap in ("on", "off"):
        same_as_one_process(score, ["--ep-overlap", overlap],
                            f"score of 100 tokens, --ep-overlap {overlap}")


def pd_cases(args, tmp, model, osc_ucx):
    print("== reference: one process", flush=True)
    base = ["--model", model, "--port", "0", "--max-batch-tokens", "32"]
    srv = Server([args.moeserve, "serve"] + base, False, "reference")
    try:
        ref = srv.run_all()
        check(all(r[0] == 200 for r in ref), "reference requests answered")
    finally:
        srv.stop()
    pd = ["-np", "2", "--map-by", "node", args.moeserve, "serve"] + base + [
        "--host", "0.0.0.0", "--prefill-ranks", "1", "--decode-ranks", "1"]
    # Without osc/ucx no one-sided component works over TCP: one clear error, no MPI abort.
    name = "one-sided KV transfer without osc/ucx"
    print(f"== {name}", flush=True)
    try:
        rc, _, err = tb_run(["--mca", "osc", "^ucx"] + pd + ["--kv-transfer", "one-sided"],
                            timeout=90)
    except subprocess.TimeoutExpired:
        rc, err = None, "(hangs)"
    check(rc not in (0, None) and re.search(
        r"error: rank 0 of 2 failed: MPI cannot open a one-sided window between these ranks.*"
        r"--kv-transfer two-sided", err) is not None,
        f"{name}: one clear error naming --kv-transfer two-sided (rc {rc}: {err[-400:]!r})")
    cases = [("two-sided", [])]
    if osc_ucx:
        cases.insert(0, ("one-sided", ["--mca", "osc", "ucx", "-x", "UCX_TLS=self,tcp"]))
    else:
        print("  note: Open MPI here has no osc/ucx: the one-sided KV transfer cannot cross TCP "
              "(osc/rdma needs an RDMA network, osc/pt2pt refuses MPI_THREAD_MULTIPLE); "
              "testing two-sided only")
    for kv, mca in cases:
        name = f"prefill on host1, decode on host2, {kv} KV transfer"
        print(f"== {name}", flush=True)
        srv = Server(mca + pd + ["--kv-transfer", kv], True, name)
        try:
            r0, r1 = rank_pid(srv.proc.pid, 0), rank_pid(srv.proc.pid, 1)
            check(net_ns(r0) != net_ns(r1), f"{name}: ranks 0 and 1 in different hosts' "
                  "network namespaces")
            got = srv.run_all()
            same = got == ref
            if not same:
                for g, w in zip(got, ref):
                    print(f"    got {g!r}\n    want {w!r}")
            check(same, f"{name}: {len(got)} concurrent greedy requests match one process")
            n = sum(1 for m in MAX_TOKENS if m > 1)
            deadline = time.time() + 20
            while srv.metric("moeserve_kv_transfers_total") < n and time.time() < deadline:
                time.sleep(0.1)
            check(srv.metric("moeserve_kv_transfers_total") == n,
                  f"{name}: {n} KV transfers between the hosts")
            check(srv.metric("moeserve_kv_transfer_bytes_total") > 0, f"{name}: bytes counted")
            rc = srv.stop()
            check(rc == 0, f"{name}: SIGTERM to rank 0 ends the job cleanly (rc {rc})")
        finally:
            if srv.proc.poll() is None:
                srv.kill()


def kill_case(args, model):
    name = "decode rank on host2 killed mid-request"
    print(f"== {name}", flush=True)
    cmd = ["-np", "2", "--map-by", "node", args.moeserve, "serve", "--model", model, "--port",
           "0", "--host", "0.0.0.0", "--prefill-ranks", "1", "--decode-ranks", "1",
           "--kv-transfer", "two-sided"]
    srv = Server(cmd, True, name)
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as ex:
            fut = ex.submit(srv.complete, "Once upon a time " * 8, 4000, True, 90)
            # Wait until the request is being decoded on host 2 (its KV cache arrived there).
            deadline = time.time() + 30
            while srv.metric("moeserve_kv_transfers_total") < 1 and time.time() < deadline:
                time.sleep(0.05)
            check(srv.metric("moeserve_kv_transfers_total") >= 1, f"{name}: request in decode")
            t0 = time.time()
            os.kill(rank_pid(srv.proc.pid, 1), signal.SIGKILL)
            try:
                status, body = fut.result(timeout=60)
                ended = status != 200 or "[DONE]" not in body or "error" in body
                check(ended, f"{name}: the stream does not finish as if nothing happened "
                      f"(status {status}, ends {body[-200:]!r})")
            except TimeoutError:  # the socket's own timeout: the server kept it open, silent
                check(False, f"{name}: the client's request hangs after the kill")
            except (OSError, http.client.HTTPException) as e:
                check(True, f"{name}: the client's connection ends ({type(e).__name__})")
            except concurrent.futures.TimeoutError:
                check(False, f"{name}: the client's request hangs after the kill")
        try:
            rc = srv.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            rc = None
        took = time.time() - t0
        check(rc is not None and rc != 0, f"{name}: the job ends with an error (rc {rc}) in "
              f"{took:.1f} s")
        out = srv.output()
        check(re.search(r"process rank 1 .* on node \S+ exited on signal 9", out) is not None,
              f"{name}: mpirun names the killed rank and its host")
        if FAILURES:
            print(out[-3000:])
    finally:
        if srv.proc.poll() is None:
            srv.kill()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--moeserve", required=True)
    ap.add_argument("--only", choices=["transport", "ep", "pd", "kill"])
    args = ap.parse_args()
    args.moeserve = os.path.abspath(args.moeserve)
    chk = subprocess.run([TESTBED, "--name", NAME, "check"], capture_output=True, text=True)
    if chk.returncode != 0:
        print("SKIPPED: the test bed cannot be made here: " + chk.stderr.strip())
        return SKIP
    up = subprocess.run(TB + ["up"], capture_output=True, text=True)
    if up.returncode != 0:
        print("FAIL: scripts/testbed.sh up failed:\n" + up.stdout + up.stderr)
        return 1
    print(up.stdout.strip(), flush=True)
    t0 = time.time()
    tmp = tempfile.TemporaryDirectory()
    try:
        osc_ucx = "MCA osc: ucx" in subprocess.run(["ompi_info"], capture_output=True,
                                                     text=True).stdout
        if args.only in (None, "transport"):
            transport_case(args)
        if args.only in (None, "ep"):
            ep_case(args, tmp.name)
        if args.only in (None, "pd", "kill"):
            model = os.path.join(tmp.name, "demo")
            subprocess.run([args.moeserve, "init-model", "--preset", "demo", "--out", model],
                           check=True, capture_output=True)
            if args.only in (None, "pd"):
                pd_cases(args, tmp.name, model, osc_ucx)
            if args.only in (None, "kill"):
                kill_case(args, model)
    finally:
        subprocess.run(TB + ["down"], capture_output=True)
        tmp.cleanup()
    print(f"{'FAILED' if FAILURES else 'passed'} in {time.time() - t0:.0f} s "
          f"({len(FAILURES)} failures)")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())

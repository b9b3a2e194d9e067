#!/usr/bin/env python3
"""Colocated against prefill/decode-disaggregated serving under a mixed load.

Starts `moeserve serve` under `mpirun -np 2` twice on the same model: colocated (both ranks
prefill and decode, requests spread least-loaded) and disaggregated (1 prefill rank + 1 decode
rank). Against each it runs two load generators at once (tools/bench_serving.py):

  decodes   --decoders requests in flight all the time, short prompts, long outputs
  prompts   long prompts arriving at --prompt-rate per second, short outputs

and reports the decodes' inter-token latency (does decoding stay smooth while prompts arrive?)
and the prompts' time to first token, p50 and p99, side by side.

    python3 tools/bench_disagg.py --moeserve build/moeserve --model models/demo
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def start(args, extra):
    port = free_port()
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    cmd = ["mpirun", "--oversubscribe", "-np", "2", args.moeserve, "serve", "--model", args.model,
           "--port", str(port), "--max-batch-tokens", str(args.max_batch_tokens),
           "--served-model-name", "m"] + extra
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    for _ in range(600):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return proc, port
        except OSError:
            if proc.poll() is not None:
                log.seek(0)
                sys.exit("server failed:\n" + log.read().decode())
            time.sleep(0.2)
    sys.exit("server did not start")


def load(args, port, name, extra):
    out = tempfile.NamedTemporaryFile(suffix=".json", delete=False).name
    cmd = [sys.executable, os.path.join(HERE, "bench_serving.py"), "--base-url",
           f"http://127.0.0.1:{port}", "--model", "m", "--result-json", out] + extra
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL), out


def run(args, label, extra):
    proc, port = start(args, extra)
    try:
        # Warm-up, then both loads together; the prompts start once decoding is under way.
        subprocess.run([sys.executable, os.path.join(HERE, "bench_serving.py"), "--base-url",
                        f"http://127.0.0.1:{port}", "--model", "m", "--num-prompts", "4",
                        "--input-len", "64", "--output-len", "8"], stdout=subprocess.DEVNULL,
                       check=True)
        dec, dec_out = load(args, port, "decodes", [
            "--num-prompts", str(args.decoders * args.decode_rounds), "--max-concurrency",
            str(args.decoders), "--input-len", "32", "--output-len", str(args.decode_len)])
        time.sleep(1.0)
        pro, pro_out = load(args, port, "prompts", [
            "--num-prompts", str(args.prompts), "--request-rate", str(args.prompt_rate),
            "--input-len", str(args.prompt_len), "--output-len", "4", "--seed", "1"])
        dec.wait()
        pro.wait()
        with open(dec_out) as f:
            d = json.load(f)
        with open(pro_out) as f:
            p = json.load(f)
        return {"label": label, "itl": d["itl_ms"], "tpot": d["tpot_ms"], "ttft": p["ttft_ms"],
                "dec_tput": d["output_throughput"], "failed": d["failed"] + p["failed"]}
    finally:
        proc.terminate()
        proc.wait()


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--moeserve", default="build/moeserve")
    ap.add_argument("--model", required=True)
    ap.add_argument("--decoders", type=int, default=4)
    ap.add_argument("--decode-len", type=int, default=128)
    ap.add_argument("--decode-rounds", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=2048)
    ap.add_argument("--prompt-rate", type=float, default=1.0)
    ap.add_argument("--max-batch-tokens", type=int, default=256)
    args = ap.parse_args()
    rows = [run(args, "colocated (2 ranks, both prefill + decode)", []),
            run(args, "disaggregated (1 prefill + 1 decode)",
                ["--prefill-ranks", "1", "--decode-ranks", "1"])]
    print(f"decodes: {args.decoders} in flight, 32-token prompts, {args.decode_len} tokens out; "
          f"prompts: {args.prompts} x {args.prompt_len} tokens at {args.prompt_rate}/s, 4 out")
    print(f"{'layout':<44} {'ITL p50':>8} {'ITL p99':>8} {'TPOT p99':>9} {'TTFT p50':>9} "
          f"{'TTFT p99':>9} {'decode tok/s':>12} {'failed':>6}")
    for r in rows:
        print(f"{r['label']:<44} {r['itl']['p50']:>8.1f} {r['itl']['p99']:>8.1f} "
              f"{r['tpot']['p99']:>9.1f} {r['ttft']['p50']:>9.1f} {r['ttft']['p99']:>9.1f} "
              f"{r['dec_tput']:>12.1f} {r['failed']:>6}")
    print("(milliseconds)")


if __name__ == "__main__":
    main()

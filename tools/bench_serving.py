#!/usr/bin/env python3
"""Load generator for an OpenAI-compatible server (moeserve serve, or any other).

Sends --num-prompts requests, either at --request-rate requests/s with Poisson arrivals (inf: all
at once) or with at most --max-concurrency in flight (or both), streams every response, and
reports what vLLM's benchmark_serving.py reports, with the same definitions:

  request throughput   completed requests / benchmark duration
  output throughput    generated tokens / benchmark duration
  TTFT                 time from sending a request to its first streamed token
  TPOT                 per request: (latency - TTFT) / (output tokens - 1)
  ITL                  every gap between consecutive streamed chunks, over all requests
  E2EL                 time from sending a request to its last byte

Prompts are random token ids of --input-len tokens sent to /v1/completions (exact lengths); or,
with --endpoint /v1/chat/completions, random words. Outputs are --output-len tokens exactly
(ignore_eos, a vLLM and moeserve extension) unless --no-ignore-eos. Only the standard library is
used, so it runs with any python3.

    python3 tools/bench_serving.py --base-url http://127.0.0.1:8000 --model demo \\
        --num-prompts 64 --max-concurrency 4 --input-len 128 --output-len 64

Shared prefixes (prefix caching): --shared-prefix-len N starts every prompt with the same N
tokens (completions: N random ids; chat: a system message of N random words), before the
--input-len of its own; the warm-up request sends that prefix too, as a server that has run a
while has seen it. The report adds the prompt tokens the server says it took from its cache
(usage.prompt_tokens_details.cached_tokens). --save-outputs FILE writes every request's text;
--compare-outputs FILE checks that they equal a saved run's (exit status 1 when one differs), so
a run with caching on can be checked against one with it off:

    python3 tools/bench_serving.py --shared-prefix-len 2048 --input-len 64 --output-len 16 \\
        --num-prompts 16 --max-concurrency 2 --save-outputs off.json    # --no-prefix-caching
    python3 tools/bench_serving.py --shared-prefix-len 2048 --input-len 64 --output-len 16 \\
        --num-prompts 16 --max-concurrency 2 --compare-outputs off.json # caching on
"""

import argparse
import asyncio
import json
import math
import random
import statistics
import sys
import time
import urllib.parse

WORDS = ("time person year way day thing man world life hand part child eye woman place work "
         "week case point number group problem fact river stone light music answer").split()


async def stream_request(url, body, api_key):
    """POSTs `body`; returns (ok, error, [arrival times of content chunks], usage, end time,
    text)."""
    u = urllib.parse.urlsplit(url)
    host, port = u.hostname, u.port or 80
    data = json.dumps(body).encode()
    head = (f"POST {u.path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            "Content-Type: application/json\r\nAccept: text/event-stream\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n")
    if api_key:
        head += f"Authorization: Bearer {api_key}\r\n"
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(head.encode() + b"\r\n" + data)
        await writer.drain()
        status = (await reader.readline()).decode(errors="replace")
        headers = {}
        while True:
            line = (await reader.readline()).decode(errors="replace").strip()
            if not line:
                break
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        if " 200 " not in status:
            rest = await reader.read()
            return (False, status.strip() + " " + rest.decode(errors="replace")[:300], [], None, 0,
                    "")
        chunked = "chunked" in headers.get("transfer-encoding", "")
        buf, times, usage, out = b"", [], None, []
        while True:
            if chunked:
                size = int((await reader.readline()).strip() or b"0", 16)
                if size == 0:
                    break
                piece = await reader.readexactly(size + 2)
                buf += piece[:-2]
            else:
                piece = await reader.read(65536)
                if not piece:
                    break
                buf += piece
            now = time.perf_counter()
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                if not event.startswith(b"data: "):
                    continue
                payload = event[6:]
                if payload == b"[DONE]":
                    continue
                j = json.loads(payload)
                if "error" in j:
                    return False, j["error"].get("message", "error"), times, usage, now, ""
                if j.get("usage"):
                    usage = j["usage"]
                for ch in j.get("choices", []):
                    text = ch.get("text")
                    if text is None:
                        delta = ch.get("delta", {})
                        text = (delta.get("content") or "") + (delta.get("reasoning_content") or "")
                    if text:
                        times.append(now)
                        out.append(text)
        return True, "", times, usage, time.perf_counter(), "".join(out)
    finally:
        writer.close()


def make_body(args, rng, i, shared):
    body = {"model": args.model, "max_tokens": args.output_len, "temperature": args.temperature,
            "stream": True, "stream_options": {"include_usage": True}}
    if not args.no_ignore_eos:
        body["ignore_eos"] = True
    if args.endpoint.endswith("chat/completions"):
        words = " ".join(rng.choice(WORDS) for _ in range(args.input_len))
        body["messages"] = [{"role": "user", "content": f"{i}: {words}"}]
        if shared:
            body["messages"].insert(0, {"role": "system", "content": shared})
    else:
        body["prompt"] = list(shared or []) + [rng.randrange(args.vocab_lo, args.vocab_hi)
                                               for _ in range(args.input_len)]
    return body


def shared_prefix(args, rng):
    """The start every prompt shares (--shared-prefix-len), or None."""
    n = args.shared_prefix_len
    if n <= 0:
        return None
    if args.endpoint.endswith("chat/completions"):
        return " ".join(rng.choice(WORDS) for _ in range(n))
    return [rng.randrange(args.vocab_lo, args.vocab_hi) for _ in range(n)]


async def run(args):
    rng = random.Random(args.seed)
    url = args.base_url.rstrip("/") + args.endpoint
    shared = shared_prefix(args, rng)
    bodies = [make_body(args, rng, i, shared) for i in range(args.num_prompts)]
    # One request first, so model loading and first-touch costs stay out of the numbers (with a
    # shared prefix: a prompt of its own after it, not one of the measured ones).
    warm = dict(make_body(args, random.Random(args.seed + 1), -1, shared), max_tokens=2)
    ok, err, *_ = await stream_request(url, warm, args.api_key)
    if not ok:
        sys.exit(f"warm-up request failed: {err}")

    sem = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
    results = []

    async def one(i, body):
        async def go():
            t0 = time.perf_counter()
            ok, err, times, usage, t_end, text = await stream_request(url, body, args.api_key)
            results.append((ok, err, t0, times, usage, t_end, i, text))
        if sem:
            async with sem:
                await go()
        else:
            await go()

    start = time.perf_counter()
    tasks = []
    for i, body in enumerate(bodies):
        tasks.append(asyncio.create_task(one(i, body)))
        if math.isfinite(args.request_rate):
            await asyncio.sleep(rng.expovariate(args.request_rate))
    await asyncio.gather(*tasks)
    duration = time.perf_counter() - start
    return results, duration


def pct(xs, p):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def report(args, results, duration):
    done = [r for r in results if r[0]]
    failed = [r for r in results if not r[0]]
    ttft, tpot, itl, e2el = [], [], [], []
    out_tokens = in_tokens = cached_tokens = 0
    for ok, err, t0, times, usage, t_end, _, _ in done:
        n_out = usage["completion_tokens"] if usage else len(times)
        out_tokens += n_out
        in_tokens += usage["prompt_tokens"] if usage else args.input_len
        if usage:
            cached_tokens += (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        if times:
            ttft.append(times[0] - t0)
            itl.extend(b - a for a, b in zip(times, times[1:]))
            if n_out > 1:
                tpot.append((t_end - times[0]) / (n_out - 1))
        e2el.append(t_end - t0)
    ms = lambda xs: {"mean": 1e3 * statistics.fmean(xs) if xs else float("nan"),
                     "p50": 1e3 * pct(xs, 50), "p99": 1e3 * pct(xs, 99)}
    res = {
        "completed": len(done), "failed": len(failed), "duration_s": duration,
        "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        "total_cached_tokens": cached_tokens, "shared_prefix_len": args.shared_prefix_len,
        "request_throughput": len(done) / duration,
        "output_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
        "ttft_ms": ms(ttft), "tpot_ms": ms(tpot), "itl_ms": ms(itl), "e2el_ms": ms(e2el),
        "max_concurrency": args.max_concurrency, "request_rate": args.request_rate,
        "input_len": args.input_len, "output_len": args.output_len,
    }
    line = "=" * 50
    print(f"{line}\n{' Serving Benchmark Result ':=^50}")
    print(f"{'Successful requests:':<40}{len(done):>10}")
    print(f"{'Failed requests:':<40}{len(failed):>10}")
    print(f"{'Benchmark duration (s):':<40}{duration:>10.2f}")
    print(f"{'Total input tokens:':<40}{in_tokens:>10}")
    print(f"{'Total generated tokens:':<40}{out_tokens:>10}")
    print(f"{'Total cached prompt tokens:':<40}{cached_tokens:>10}")
    print(f"{'Request throughput (req/s):':<40}{res['request_throughput']:>10.2f}")
    print(f"{'Output token throughput (tok/s):':<40}{res['output_throughput']:>10.2f}")
    print(f"{'Total token throughput (tok/s):':<40}{res['total_token_throughput']:>10.2f}")
    for key, title in (("ttft_ms", "Time to First Token"), ("tpot_ms", "Time per Output Token (excl. 1st token)"),
                       ("itl_ms", "Inter-token Latency"), ("e2el_ms", "End-to-end Latency")):
        print(f"{' ' + title + ' ':-^50}")
        name = key.split("_")[0].upper()
        for stat in ("mean", "p50", "p99"):
            label = {"mean": "Mean", "p50": "Median", "p99": "P99"}[stat]
            print(f"{label + ' ' + name + ' (ms):':<40}{res[key][stat]:>10.2f}")
    print(line)
    for f in failed[:5]:
        print("failed:", f[1], file=sys.stderr)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", default="http://127.0.0.1:8000")
    ap.add_argument("--endpoint", default="/v1/completions",
                    help="/v1/completions (random token ids) or /v1/chat/completions (random words)")
    ap.add_argument("--model", default="demo")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=128, help="prompt tokens (words for chat)")
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--shared-prefix-len", type=int, default=0,
                    help="tokens (words for chat) of a start every prompt shares, before its own "
                         "--input-len")
    ap.add_argument("--save-outputs", help="write every request's generated text to this file")
    ap.add_argument("--compare-outputs",
                    help="check every request's text against a file --save-outputs wrote")
    ap.add_argument("--request-rate", type=float, default=float("inf"),
                    help="requests/s, Poisson arrivals; inf sends all at once")
    ap.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--no-ignore-eos", action="store_true", help="let the eos token end outputs")
    ap.add_argument("--vocab-lo", type=int, default=1000, help="random prompt ids from [lo, hi)")
    ap.add_argument("--vocab-hi", type=int, default=30000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--result-json", help="also write the results to this file")
    args = ap.parse_args()
    if args.num_prompts < 1 or args.input_len < 1 or args.output_len < 1:
        ap.error("--num-prompts, --input-len and --output-len must be >= 1")
    if args.shared_prefix_len < 0:
        ap.error("--shared-prefix-len must be >= 0")
    results, duration = asyncio.run(run(args))
    res = report(args, results, duration)
    texts = {str(r[6]): r[7] for r in results if r[0]}
    status = 0 if res["failed"] == 0 else 1
    if args.save_outputs:
        with open(args.save_outputs, "w") as f:
            json.dump(texts, f, indent=1, sort_keys=True)
    if args.compare_outputs:
        with open(args.compare_outputs) as f:
            want = json.load(f)
        differ = sorted((k for k in want if texts.get(k) != want[k]), key=int)
        res["outputs_equal"] = not differ
        print(f"outputs equal to {args.compare_outputs}: "
              + ("all " + str(len(want)) if not differ else f"NO, requests {differ} differ"))
        if differ:
            status = 1
    if args.result_json:
        with open(args.result_json, "w") as f:
            json.dump(res, f, indent=2)
    return status


if __name__ == "__main__":
    sys.exit(main())

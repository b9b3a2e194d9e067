#!/usr/bin/env python3
"""Encode throughput of Hugging Face `tokenizers` (one thread, no encode_batch) on the text
bench/tokenizer.cpp uses, for comparison:

  TOKENIZERS_PARALLELISM=false /work/venv-tok/bin/python tools/bench_tokenizer_hf.py
"""
import argparse
import os
import time

os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("RAYON_NUM_THREADS", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def chunks(text, size):
    out, start = [], 0
    while start < len(text):
        end = min(len(text), start + size)
        nl = text.find("\n", end)
        end = len(text) if nl < 0 else nl + 1
        out.append(text[start:end])
        start = end
    return out


def best(repeat, fn):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=os.path.join(ROOT, "assets", "deepseek-v3"))
    ap.add_argument("--text", default=os.path.join(ROOT, "tests", "fixtures", "tokenizer",
                                                   "bench_mixed.txt"))
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    from tokenizers import Tokenizer
    t0 = time.perf_counter()
    tok = Tokenizer.from_file(os.path.join(args.model, "tokenizer.json"))
    load = time.perf_counter() - t0
    raw = open(args.text, "rb").read()
    text = raw.decode("utf-8")
    mb = len(raw) / 1e6
    cold = best(1, lambda: tok.encode(text, add_special_tokens=False))
    n = len(tok.encode(text, add_special_tokens=False).ids)
    whole = best(args.repeat, lambda: tok.encode(text, add_special_tokens=False))
    # chunks() splits at the same places as bench/tokenizer.cpp for ASCII; byte sizes differ
    # for other text, which does not matter for throughput.
    parts = chunks(text, 4096)
    chunked = best(args.repeat, lambda: [tok.encode(p, add_special_tokens=False) for p in parts])
    print(f"HF tokenizers: load {load:.2f} s, text {mb:.2f} MB, {n} tokens")
    print(f"  encode whole text:     {mb / whole:7.2f} MB/s")
    print(f"  encode 4 KB chunks:    {mb / chunked:7.2f} MB/s")
    print(f"  encode cold (1st run): {mb / cold:7.2f} MB/s")


if __name__ == "__main__":
    main()

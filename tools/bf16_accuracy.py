#!/usr/bin/env python3
"""transformers' own bf16 run of the model fixtures, against their float32 reference.

For each fixture in tests/fixtures/models/ with a reference.json (float32 transformers log-probs) and plain
bf16 / fp8 weights (the compressed-tensors ones are left out), this loads the checkpoint with transformers in
bfloat16 (from_pretrained(dtype=torch.bfloat16), eager attention: weights and activations bf16, the
DeepSeek-V3 router's scores in float32 as transformers computes them; fp8 checkpoints are dequantized in
float32 first and then cast), scores the same id sequences, and writes reference_bf16.json next to
reference.json with the per-token log-probs and the error against float32 (max and mean |diff| in nats).
tests/engine/test_reference_bf16.cpp bounds moeserve's --precision bf16 error by these figures.

With --moeserve BIN it also runs `BIN score --precision bf16` (and exact) on each fixture and prints
moeserve's errors next to transformers'.

Usage (the fixtures' Python environment, tools/requirements-fixtures.txt):
  tools/bf16_accuracy.py [--fixtures NAME ...] [--moeserve build/moeserve]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_model_fixtures as mmf  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "models"


def load_bf16(model_dir: Path):
    tf = mmf._tf()
    cfg = json.loads((model_dir / "config.json").read_text())
    kw = dict(dtype=torch.bfloat16, attn_implementation="eager")
    if not mmf.is_fp8(cfg):
        return mmf._quiet(lambda: tf.AutoModelForCausalLM.from_pretrained(str(model_dir), **kw))
    with tempfile.TemporaryDirectory() as d:
        c = {k: v for k, v in cfg.items() if k != "quantization_config"}
        Path(d, "config.json").write_text(json.dumps(c))
        from safetensors.torch import save_file
        save_file(mmf.dequantized_tensors(mmf.read_safetensors_dir(model_dir)), str(Path(d, "model.safetensors")),
                  metadata={"format": "pt"})
        return mmf._quiet(lambda: tf.AutoModelForCausalLM.from_pretrained(d, **kw))


def errors(cases, ref_cases):
    d = [abs(a - b) for c, r in zip(cases, ref_cases) for a, b in zip(c[1:], r["logprobs"][1:])]
    return max(d), sum(d) / len(d)


def moeserve_scores(binary: str, model_dir: Path, ids, precision: str, kv: str):
    out = subprocess.run([binary, "score", "--model", str(model_dir), "--ids", ",".join(map(str, ids)),
                          "--precision", precision, "--kv-cache-dtype", kv, "--threads", "2"],
                         check=True, capture_output=True, text=True).stdout
    j = json.loads(out)
    return j["logprobs"] if isinstance(j, dict) else j


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fixtures", nargs="*")
    ap.add_argument("--moeserve")
    a = ap.parse_args()
    torch.set_num_threads(1)
    names = a.fixtures or sorted(p.name for p in ROOT.iterdir() if (p / "reference.json").exists())
    for name in names:
        d = ROOT / name
        cfg = json.loads((d / "config.json").read_text())
        if cfg.get("quantization_config", {}).get("quant_method") not in (None, "fp8"):
            continue
        ref = json.loads((d / "reference.json").read_text())
        model = load_bf16(d)
        with torch.no_grad():
            cases = [mmf.score_ids(model, c["ids"]) for c in ref["cases"]]
        mx, mean = errors(cases, ref["cases"])
        out = {"transformers_version": mmf._tf().__version__, "torch_version": torch.__version__,
               "dtype_compute": "bfloat16", "max_abs_logprob_diff": mx, "mean_abs_logprob_diff": mean,
               "cases": [{"logprobs": c} for c in cases]}
        (d / "reference_bf16.json").write_text(json.dumps(out) + "\n")
        line = f"{name:18s} transformers bf16: max {mx:.4f} mean {mean:.4f}"
        if a.moeserve:
            for prec, kv in (("bf16", "f32"), ("bf16", "bf16"), ("exact", "bf16")):
                ms = [moeserve_scores(a.moeserve, d, c["ids"], prec, kv) for c in ref["cases"]]
                mmx, mmean = errors(ms, ref["cases"])
                line += f" | moeserve {prec}/{kv} cache: max {mmx:.4f} mean {mmean:.4f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()

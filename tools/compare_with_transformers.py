#!/usr/bin/env python3
"""Compare `moeserve score` with Hugging Face transformers on the same checkpoint folder.

  compare_with_transformers.py --model DIR --moeserve BIN [--ids 1,2,3 ...] [--tol 1e-2]
                               [--against transformers|reference|official]

For every id sequence it runs

  BIN score --model DIR --ids 1,2,3,...

which must print (on stdout) one JSON object {"ids": [...], "logprobs": [null, lp1, ...]} where
logprobs[i] = log P(ids[i] | ids[<i]); then it computes the same with the reference and prints the max abs
logprob difference. Exit status: 0 within --tol, 1 over it, 2 on a usage / engine / format error.

Id sequences: each --ids (comma- or space-separated, repeatable); without --ids, the "cases" of DIR/reference.json.

References (--against):
  transformers  (default) the pinned transformers model on DIR, float32, eager attention; an fp8 checkpoint is
                dequantized first (fp8 value * weight_scale_inv of its 128x128 block, in float32).
  reference     the logprobs recorded in DIR/reference.json (no transformers needed; only for its cases).
  official      the numpy float64 forward of tools/make_model_fixtures.py written from the official DeepSeek
                formulas in tools/README.md (no transformers needed).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def parse_ids(text: str) -> list:
    parts = text.replace(",", " ").split()
    if not parts:
        raise ValueError("empty --ids")
    return [int(p) for p in parts]


def run_engine(binary: str, model_dir: str, ids: list, timeout: float, extra: list) -> list:
    cmd = [binary, "score", "--model", model_dir, "--ids", ",".join(str(i) for i in ids)] + extra
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RuntimeError(f"could not run {' '.join(cmd)}: {e}") from e
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}:\n{p.stderr.strip()}")
    obj = None
    for line in reversed(p.stdout.strip().splitlines()):  # the last JSON object printed
        line = line.strip()
        if line.startswith("{"):
            try:
                obj = json.loads(line)
                break
            except json.JSONDecodeError:
                continue
    if obj is None:
        try:
            obj = json.loads(p.stdout)
        except json.JSONDecodeError as e:
            raise RuntimeError(f"no JSON object in the output of {' '.join(cmd)}:\n{p.stdout[:2000]}") from e
    if obj.get("ids") != ids:
        raise RuntimeError(f"engine echoed ids {obj.get('ids')} for {ids}")
    lps = obj.get("logprobs")
    if not isinstance(lps, list) or len(lps) != len(ids) or lps[0] is not None:
        raise RuntimeError(f"engine logprobs must be a list of len(ids) = {len(ids)} starting with null: {lps}")
    return lps


class Reference:
    def __init__(self, kind: str, model_dir: Path):
        self.kind, self.dir = kind, model_dir
        self.recorded = {}
        ref_file = model_dir / "reference.json"
        if ref_file.exists():
            for c in json.loads(ref_file.read_text())["cases"]:
                self.recorded[tuple(c["ids"])] = c["logprobs"]
        if kind == "transformers":
            import make_model_fixtures as mmf  # noqa: PLC0415

            self.mmf = mmf
            self.model = mmf.load_reference_model(model_dir)
        elif kind == "official":
            import make_model_fixtures as mmf  # noqa: PLC0415

            self.mmf = mmf
            self.cfg = json.loads((model_dir / "config.json").read_text())
            self.tensors = mmf.dequantized_tensors(mmf.read_safetensors_dir(model_dir))

    def score(self, ids: list) -> list:
        if self.kind == "transformers":
            return self.mmf.score_ids(self.model, ids)
        if self.kind == "official":
            return self.mmf.official_score(self.cfg, self.tensors, ids)
        if tuple(ids) not in self.recorded:
            raise RuntimeError(f"ids {ids[:8]}... are not among the cases of {self.dir}/reference.json")
        return self.recorded[tuple(ids)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint folder (config.json + *.safetensors)")
    ap.add_argument("--moeserve", required=True, help="path of the moeserve binary")
    ap.add_argument("--ids", action="append", help="token ids, comma- or space-separated; repeatable")
    ap.add_argument("--tol", type=float, default=1e-2, help="max allowed |logprob difference| (default 1e-2)")
    ap.add_argument("--against", choices=["transformers", "reference", "official"], default="transformers")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per engine run")
    ap.add_argument("--engine-arg", action="append", default=[], help="extra argument passed to `score`")
    a = ap.parse_args(argv)

    model_dir = Path(a.model)
    if not (model_dir / "config.json").exists():
        print(f"error: {model_dir}/config.json not found", file=sys.stderr)
        return 2
    try:
        if a.ids:
            seqs = [parse_ids(s) for s in a.ids]
        else:
            ref_file = model_dir / "reference.json"
            if not ref_file.exists():
                print("error: no --ids and no reference.json in the model folder", file=sys.stderr)
                return 2
            seqs = [c["ids"] for c in json.loads(ref_file.read_text())["cases"]]
    except ValueError as e:
        print(f"error: bad --ids: {e}", file=sys.stderr)
        return 2

    try:
        ref = Reference(a.against, model_dir)
    except Exception as e:  # noqa: BLE001  (missing transformers, unreadable checkpoint, ...)
        print(f"error: cannot build the {a.against} reference: {e}", file=sys.stderr)
        return 2

    worst = 0.0
    for ids in seqs:
        try:
            got = run_engine(a.moeserve, str(model_dir), ids, a.timeout, a.engine_arg)
            want = ref.score(ids)
        except RuntimeError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        diffs = [abs(float(g) - float(w)) for g, w in zip(got[1:], want[1:])]
        d = max(diffs, default=0.0)
        at = diffs.index(d) + 1 if diffs else 0
        worst = max(worst, d)
        print(f"len {len(ids):4d}: max |dlogprob| = {d:.3e}" + (f" at position {at}" if diffs else ""))
    verdict = "OK" if worst <= a.tol else "FAIL"
    print(f"{verdict}: max abs logprob difference {worst:.3e} (tolerance {a.tol:g}, against {a.against})")
    return 0 if worst <= a.tol else 1


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Reference logits of the shipped model's multi-token-prediction module (data/models/shakespeare-v3-tiny,
model.layers.4), for tests/engine/test_speculative.cpp (Speculative.MtpLogitsMatchPyTorch).

The model is tools/train_tiny.py's own PyTorch class (TinyV3, whose MTP forward is the one it was trained with) in
float32 on the bf16 weights as stored, one thread. For ids t_0 .. t_n, the main model's final-normed hidden states
h_0 .. h_{n-1} (of t_0 .. t_{n-1}) and the tokens t_1 .. t_n go through the module, whose logits at position i
predict t_{i+2}; the fixture keeps the full rows of a few positions.

Usage (with the packages of tools/requirements-fixtures.txt):
  make_mtp_reference.py [--model DIR] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tools"))
import train_tiny  # noqa: E402

DEFAULT_MODEL = REPO_ROOT / "data" / "models" / "shakespeare-v3-tiny"
DEFAULT_OUT = REPO_ROOT / "tests" / "fixtures" / "mtp" / "shakespeare_mtp.json"
# "KING HENRY:\nNow, my good lords, and I'll" as `moeserve tokenize` gives it (BOS first).
IDS = [0, 471, 1141, 286, 817, 29, 329, 479, 1032, 29, 320, 313, 484]
POSITIONS = [0, 5, 11]


def load(model_dir: Path) -> train_tiny.TinyV3:
    cfg = json.loads((model_dir / "config.json").read_text())
    model = train_tiny.TinyV3(cfg)
    hf = {k: v.float() for k, v in load_file(str(model_dir / "model.safetensors")).items()}
    L = cfg["num_hidden_layers"]
    p = f"model.layers.{L}."
    state = {}
    for name in model.state_dict():
        if name.startswith("mtp."):
            rest = name[len("mtp."):]
            if rest.startswith("block."):
                state[name] = hf[p + rest[len("block."):]]
            elif rest == "norm.weight":
                state[name] = hf[p + "shared_head.norm.weight"]
            else:
                state[name] = hf[p + rest]
        elif name == "lm_head.weight":
            state[name] = hf[name]
        else:
            state[name] = hf["model." + name]
    model.load_state_dict(state)
    # The module's own copies of the head and the embedding are the main model's (train_tiny saves them so).
    assert torch.equal(hf[p + "shared_head.head.weight"], hf["lm_head.weight"])
    assert torch.equal(hf[p + "embed_tokens.weight"], hf["model.embed_tokens.weight"])
    return model.eval()


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    a = ap.parse_args()
    torch.set_num_threads(1)
    model = load(a.model)
    ids = torch.tensor([IDS])
    n = len(IDS) - 1
    h = model.hidden(ids[:, :n])
    m = model.mtp(h, model.embed_tokens(ids[:, 1:n + 1]), model.cos, model.sin)
    logits = model.lm_head(m)[0]
    out = {
        "model": str(a.model.relative_to(REPO_ROOT)) if a.model.is_absolute() else str(a.model),
        "ids": IDS,
        "logits": {
            "positions": POSITIONS,
            "values": [[float(f"{v:.7g}") for v in logits[i].tolist()] for i in POSITIONS],
        },
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, separators=(",", ":")) + "\n")
    print(f"wrote {a.out}: MTP logits at positions {POSITIONS} of {len(IDS)} ids "
          f"(argmax {[int(logits[i].argmax()) for i in POSITIONS]})")


if __name__ == "__main__":
    main()

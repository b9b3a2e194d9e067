#!/usr/bin/env python3
"""Reference figures of the shipped model (data/models/shakespeare-v3-tiny) from transformers and PyTorch, for
tests/shipped_model/: log-probs of held-out sequences, greedy continuations, the held-out perplexity computed as
`moeserve perplexity` computes it, and what the Hugging Face tokenizer and chat template give on sample inputs.

The model runs as transformers' DeepseekV3ForCausalLM in float32 with eager attention, on the bf16 weights as
stored, one thread. The held-out text is the tail of data/tinyshakespeare/input.txt that train_tiny.py did not
train on (from byte `heldout_starts_at_byte` of training.json).

Perplexity, as `moeserve perplexity --ctx C` computes it (and llama.cpp's llama-perplexity): the held-out text is
tokenized with BOS first (add_special_tokens), cut into chunks of C ids (the ids after the last whole chunk are
dropped), each chunk a fresh sequence whose first id is replaced by BOS; in each chunk the ids at positions
C/2+1 .. C-1 are scored (C - 1 - C/2 per chunk); the perplexity is exp of their mean negative log-prob.

Usage:
  make_shipped_model_reference.py [--model DIR] [--out FILE] [--ctx 128]
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO_ROOT / "data" / "models" / "shakespeare-v3-tiny"
DEFAULT_OUT = REPO_ROOT / "tests" / "fixtures" / "shipped_model" / "reference.json"
TEXT = REPO_ROOT / "data" / "tinyshakespeare" / "input.txt"

SAMPLE_TEXTS = [
    "ROMEO:\nBut, soft! what light through yonder window breaks?\n",
    "  leading spaces, tabs\tand\r\nCRLF lines\n\n\n",
    "Numbers 1234567 and 3.14159, 2024-12-07; ALL CAPS, o'er, 'tis, thou'rt.",
    "Unicode: café, naïve, Ærø, 日本語のテキスト, Ελληνικά, emoji 🎭🗡️.",
    "<｜User｜>Who art thou?<｜Assistant｜>A friend.<｜end▁of▁sentence｜>",
    "",
    " ",
]

CHATS = [
    [{"role": "user", "content": "What news from Verona?"}],
    [{"role": "system", "content": "Thou art a player."},
     {"role": "user", "content": "Speak the speech, I pray you."},
     {"role": "assistant", "content": "Trippingly on the tongue."},
     {"role": "user", "content": "And then?"}],
]


@torch.no_grad()
def logprobs(model, ids):
    out = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].double()
    lp = torch.log_softmax(out, dim=-1)
    return [None] + [float(lp[i - 1, ids[i]]) for i in range(1, len(ids))]


@torch.no_grad()
def greedy(model, prompt, n):
    ids = list(prompt)
    out, margins = [], []
    for _ in range(n):
        lp = torch.log_softmax(model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].double(), -1)
        top = torch.topk(lp, 2)
        out.append(int(top.indices[0]))
        margins.append(float(top.values[0] - top.values[1]))
        ids.append(out[-1])
    return out, margins


@torch.no_grad()
def perplexity(model, ids, ctx, bos, batch=8):
    n_chunks = len(ids) // ctx
    first = ctx // 2
    nll, n = 0.0, 0
    chunks = []
    for c in range(n_chunks):
        chunk = list(ids[c * ctx:(c + 1) * ctx])
        chunk[0] = bos
        chunks.append(chunk)
    for i in range(0, n_chunks, batch):
        x = torch.tensor(chunks[i:i + batch])
        lp = torch.log_softmax(model(input_ids=x, use_cache=False).logits.double(), dim=-1)
        for r in range(x.shape[0]):
            for p in range(first, ctx - 1):
                nll -= float(lp[r, p, x[r, p + 1]])
                n += 1
    return n_chunks, n, nll / n


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--ctx", type=int, default=128, help="the training sequence length")
    a = ap.parse_args()

    import tokenizers
    import transformers
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    torch.manual_seed(0)

    training = json.loads((a.model / "training.json").read_text())
    start = training["heldout_starts_at_byte"]
    raw = TEXT.read_bytes()
    held = raw[start:].decode("utf-8")

    tok = transformers.AutoTokenizer.from_pretrained(str(a.model))
    plain = tokenizers.Tokenizer.from_file(str(a.model / "tokenizer.json"))
    bos = tok.bos_token_id
    assert bos == 0 and tok.eos_token_id == 1, (bos, tok.eos_token_id)
    samples = []
    for t in SAMPLE_TEXTS + [held[:2000]]:
        ids = tok(t)["input_ids"]
        assert ids[0] == bos and ids == plain.encode(t).ids, t  # BOS first, in transformers and in tokenizers
        samples.append({"text": t, "ids": ids})
    chats = []
    for msgs in CHATS:
        text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)["input_ids"]
        assert ids == plain.encode(text, add_special_tokens=False).ids
        chats.append({"messages": msgs, "text": text, "ids": ids})

    model = transformers.AutoModelForCausalLM.from_pretrained(str(a.model), dtype=torch.float32,
                                                              attn_implementation="eager")
    model.eval()
    assert type(model).__name__ == "DeepseekV3ForCausalLM"
    cfg = json.loads((a.model / "config.json").read_text())
    L = cfg["num_hidden_layers"]
    assert not any(f"layers.{L}." in n for n, _ in model.named_parameters()), "transformers loaded the MTP layer"

    held_ids = tok(held)["input_ids"]
    cases = []
    # Held-out sequences, BOS first; the longest goes past original_max_position_embeddings (YaRN).
    for off, length in [(1000, 24), (5000, 128), (12000, 300), (20000, 700)]:
        ids = [bos] + held_ids[off:off + length - 1]
        cases.append({"ids": ids, "logprobs": logprobs(model, ids)})
    greedy_cases = []
    for prompt in [[bos] + held_ids[3000:3020], chats[0]["ids"]]:
        out, margins = greedy(model, prompt, 24)
        greedy_cases.append({"prompt": prompt, "output": out, "margins": margins,
                             "text": tok.decode(out)})
    n_chunks, scored, mean_nll = perplexity(model, held_ids, a.ctx, bos)
    ref = {
        "model": str(a.model.resolve().relative_to(REPO_ROOT)) if a.model.resolve().is_relative_to(REPO_ROOT)
        else str(a.model),
        "transformers_version": transformers.__version__, "torch_version": torch.__version__,
        "tokenizers_version": tokenizers.__version__,
        "dtype_compute": "float32", "attn_implementation": "eager", "model_class": type(model).__name__,
        "heldout_starts_at_byte": start, "heldout_bytes": len(raw) - start, "heldout_tokens": len(held_ids),
        "perplexity": {"ctx": a.ctx, "chunks": n_chunks, "scored_tokens": scored, "mean_nll": mean_nll,
                       "ppl": math.exp(mean_nll)},
        "cases": cases, "greedy": greedy_cases, "tokenizer": samples, "chat": chats,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(ref, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"{a.out}: held-out perplexity {math.exp(mean_nll):.4f} (ctx {a.ctx}, {n_chunks} chunks, {scored} "
          f"tokens scored); greedy from the held-out prompt: {greedy_cases[0]['text']!r}")


if __name__ == "__main__":
    main()

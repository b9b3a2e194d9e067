#!/usr/bin/env python3
"""Train a small DeepSeek-V3-architecture model on tinyshakespeare, on CPU, and save it as a Hugging Face folder.

The model is written here in plain PyTorch with the semantics of transformers' DeepseekV3ForCausalLM (so that
transformers and moeserve load the result as it is):
  - multi-head latent attention with a q-LoRA (q_a_proj -> q_a_layernorm -> q_b_proj) and a compressed KV latent
    (kv_a_proj_with_mqa -> kv_a_layernorm -> kv_b_proj), a decoupled RoPE key shared by the heads, RoPE applied to
    interleaved pairs, YaRN frequencies and YaRN's softmax scale (mscale_all_dim);
  - layer 0 dense (first_k_dense_replace = 1), the others MoE: a sigmoid router whose choice adds
    e_score_correction_bias, group-limited top-k (n_group / topk_group, a group scored by its best two experts),
    the chosen sigmoid scores renormalized and scaled by routed_scaling_factor, and one shared expert;
  - load balancing as DeepSeek-V3 does it: after every step each MoE layer's correction bias moves by
    `--bias-rate` towards balance (up for an expert that got fewer tokens than the mean, down for one that got
    more), plus a very small sequence-wise balance loss (`--seq-aux`);
  - one multi-token-prediction module trained as DeepSeek-V3 trains it: at position i it combines the main
    model's final hidden state h_i with the embedding of token i+1 (eh_proj over [enorm(emb); hnorm(h)]), runs one
    MoE transformer block over the sequence and predicts token i+2 through the shared output head; its loss is
    added with weight `--mtp-weight`. Saved as `model.layers.{num_hidden_layers}.*` (embed_tokens,
    enorm, hnorm, eh_proj, the block, shared_head.norm, shared_head.head) as DeepSeek-V3 publishes it; inference
    (transformers, moeserve) does not read it.

The tokenizer is a byte-level BPE trained on the training part of the corpus with the `tokenizers` library, with
DeepSeek-V3's pre-tokenizer, special tokens (begin/end of sentence first, ids 0 and 1) and chat template.

A quarter of the training sequences (`--chat-fraction`) are packed chat turns made from consecutive speeches,
`<bos><｜User｜>speech<｜Assistant｜>reply<eos>`, so that the chat template leads to a reply that ends.

The last `--heldout` of the text (cut at a paragraph break) is never trained on; the held-out loss is measured on
it with the bf16 weights as saved. With `--steps` everything follows from --seed (one process, `--threads`
threads): two runs with the same arguments, torch version and machine give the same file. With `--minutes` (the
default, 25) the number of steps follows from the time; training.json records it and the command that repeats
the run step for step.

Usage:
  train_tiny.py --out data/models/shakespeare-v3-tiny --steps 2020 --decay-start 1717   # the shipped model
  train_tiny.py --out DIR --minutes 28                            # as many steps as 28 minutes allow
  train_tiny.py --out /tmp/quick --steps 20                       # a short run to try things
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import sys
import time
from pathlib import Path

# Threads that wait sleep instead of spinning: on a machine whose cores are busy with other work, spinning
# threads take the time the working ones need (several times slower); on idle cores it costs little.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO_ROOT / "data" / "tinyshakespeare" / "input.txt"
DEEPSEEK_TOKENIZER = REPO_ROOT / "assets" / "deepseek-v3"

# DeepSeek-V3's added tokens that are not placeholders, in its order; the first three keep their ids (0, 1, 2).
SPECIAL_TOKENS = [
    "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>", "<｜fim▁hole｜>", "<｜fim▁begin｜>",
    "<｜fim▁end｜>", "<｜User｜>", "<｜Assistant｜>", "<|EOT|>", "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>",
    "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>",
    "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>", "<｜tool▁sep｜>",
]
BOS, EOS, USER, ASSISTANT = SPECIAL_TOKENS[0], SPECIAL_TOKENS[1], SPECIAL_TOKENS[6], SPECIAL_TOKENS[7]


def model_config(a) -> dict:
    """config.json in the layout DeepSeek-V3 publishes (rope_scaling, scoring_func, topk_method, ...)."""
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "aux_loss_alpha": a.seq_aux,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "ep_size": 1,
        "first_k_dense_replace": 1,
        "hidden_act": "silu",
        "hidden_size": a.hidden,
        "initializer_range": 0.02,
        "intermediate_size": a.intermediate,
        "kv_lora_rank": a.kv_lora,
        "max_position_embeddings": a.max_positions,
        "moe_intermediate_size": a.moe_intermediate,
        "moe_layer_freq": 1,
        "n_group": a.n_group,
        "n_routed_experts": a.experts,
        "n_shared_experts": 1,
        "norm_topk_prob": True,
        "num_attention_heads": a.heads,
        "num_experts_per_tok": a.top_k,
        "num_hidden_layers": a.layers,
        "num_key_value_heads": a.heads,
        "num_nextn_predict_layers": 1,
        "q_lora_rank": a.q_lora,
        "qk_nope_head_dim": a.nope,
        "qk_rope_head_dim": a.rope,
        "rms_norm_eps": 1e-06,
        "rope_scaling": {
            "beta_fast": 32,
            "beta_slow": 1,
            "factor": a.yarn_factor,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
            "original_max_position_embeddings": a.max_positions // int(a.yarn_factor),
            "type": "yarn",
        },
        "rope_theta": 10000,
        "routed_scaling_factor": a.routed_scaling,
        "scoring_func": "sigmoid",
        "seq_aux": True,
        "tie_word_embeddings": False,
        "topk_group": a.topk_group,
        "topk_method": "noaux_tc",
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "v_head_dim": a.v_dim,
        "vocab_size": a.vocab,
    }


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------------------


def train_tokenizer(text: str, vocab_size: int, deepseek_dir: Path):
    """Byte-level BPE on `text` with DeepSeek-V3's pre-tokenizer and decoder; returns (tokenizer.json dict,
    tokenizer_config.json dict)."""
    from tokenizers import Tokenizer
    from tokenizers import pre_tokenizers, trainers

    ds = json.loads((deepseek_dir / "tokenizer.json").read_text())
    ds_cfg = json.loads((deepseek_dir / "tokenizer_config.json").read_text())
    skeleton = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
        "normalizer": ds["normalizer"], "pre_tokenizer": ds["pre_tokenizer"],
        "post_processor": ds["post_processor"], "decoder": ds["decoder"],
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {}, "merges": []},
    }
    tok = Tokenizer.from_str(json.dumps(skeleton))
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    lines = text.splitlines(keepends=True)
    tok.train_from_iterator(["".join(lines[i:i + 64]) for i in range(0, len(lines), 64)], trainer=trainer)
    tj = json.loads(tok.to_str())
    # The added tokens as DeepSeek-V3 declares them (special or not, normalized), at their new ids.
    ds_added = {t["content"]: t for t in ds["added_tokens"]}
    added = []
    for t in tj["added_tokens"]:
        d = dict(ds_added[t["content"]])
        d["id"] = t["id"]
        added.append(d)
    tj["added_tokens"] = added
    assert [t["id"] for t in added[:3]] == [0, 1, 2]
    # BOS before the text, in tokenizer.json itself, so that every reader of the folder adds it (the tokenizers
    # package and transformers 5 read this; Llama-style tokenizers of transformers 4 and moeserve read
    # add_bos_token from tokenizer_config.json, which says the same).
    bos = {"SpecialToken": {"id": BOS, "type_id": 0}}
    tj["post_processor"] = {"type": "Sequence", "processors": [ds["post_processor"], {
        "type": "TemplateProcessing",
        "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": BOS, "type_id": 1}},
                 {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {BOS: {"id": BOS, "ids": [0], "tokens": [BOS]}}}]}
    cfg = {k: v for k, v in ds_cfg.items() if k != "added_tokens_decoder"}
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["added_tokens_decoder"] = {
        str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
        for t in added}
    cfg["model_max_length"] = None  # set by the caller
    return tj, cfg


def load_tokenizer(tj: dict):
    from tokenizers import Tokenizer
    return Tokenizer.from_str(json.dumps(tj))


# ----------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        v = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x.float() * torch.rsqrt(v + self.eps)).to(x.dtype)


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_inv_freq(cfg: dict):
    """YaRN inverse frequencies and the factor on cos/sin, as transformers computes them for DeepSeek-V3."""
    rs = cfg["rope_scaling"]
    dim, base, factor = cfg["qk_rope_head_dim"], float(cfg["rope_theta"]), float(rs["factor"])
    orig = rs["original_max_position_embeddings"]
    beta_fast, beta_slow = float(rs["beta_fast"]), float(rs["beta_slow"])
    attention_factor = yarn_get_mscale(factor, rs["mscale"]) / yarn_get_mscale(factor, rs["mscale_all_dim"])

    def correction_dim(rot):
        return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)
    extra_factor = 1 - ramp
    inv_freq = interpolation * (1 - extra_factor) + extrapolation * extra_factor
    return inv_freq, attention_factor


def rope_tables(cfg: dict, n: int):
    inv_freq, att = yarn_inv_freq(cfg)
    freqs = torch.arange(n, dtype=torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos() * att, emb.sin() * att


def rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def apply_rope_interleaved(x, cos, sin):
    """RoPE on pairs (x[2i], x[2i+1]); the result lists the pairs' first elements, then their second."""
    b, h, s, d = x.shape
    x = x.view(b, h, s, d // 2, 2).transpose(4, 3).reshape(b, h, s, d)
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        H, nh = c["hidden_size"], c["num_attention_heads"]
        self.nh, self.nope, self.rope, self.v = nh, c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
        self.kv_lora = c["kv_lora_rank"]
        self.qk = self.nope + self.rope
        self.q_a_proj = nn.Linear(H, c["q_lora_rank"], bias=False)
        self.q_a_layernorm = RMSNorm(c["q_lora_rank"])
        self.q_b_proj = nn.Linear(c["q_lora_rank"], nh * self.qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(H, self.kv_lora + self.rope, bias=False)
        self.kv_a_layernorm = RMSNorm(self.kv_lora)
        self.kv_b_proj = nn.Linear(self.kv_lora, nh * (self.nope + self.v), bias=False)
        self.o_proj = nn.Linear(nh * self.v, H, bias=False)
        m = yarn_get_mscale(float(c["rope_scaling"]["factor"]), c["rope_scaling"]["mscale_all_dim"])
        self.scale = self.qk ** -0.5 * m * m

    def forward(self, x, cos, sin):
        B, S, _ = x.shape
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))).view(B, S, self.nh, self.qk).transpose(1, 2)
        q_pass, q_rot = q.split([self.nope, self.rope], dim=-1)
        k_pass, k_rot = self.kv_a_proj_with_mqa(x).split([self.kv_lora, self.rope], dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(k_pass)).view(B, S, self.nh, self.nope + self.v).transpose(1, 2)
        k_pass, value = kv.split([self.nope, self.v], dim=-1)
        k_rot = k_rot.view(B, 1, S, self.rope)
        q_rot = apply_rope_interleaved(q_rot, cos[:S], sin[:S])
        k_rot = apply_rope_interleaved(k_rot, cos[:S], sin[:S]).expand(B, self.nh, S, self.rope)
        q = torch.cat([q_pass, q_rot], dim=-1)
        k = torch.cat([k_pass, k_rot], dim=-1)
        o = F.scaled_dot_product_attention(q, k, value, is_causal=True, scale=self.scale)
        return self.o_proj(o.transpose(1, 2).reshape(B, S, self.nh * self.v))


class MLP(nn.Module):
    def __init__(self, H: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(H, inter, bias=False)
        self.up_proj = nn.Linear(H, inter, bias=False)
        self.down_proj = nn.Linear(inter, H, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.E, self.K = c["n_routed_experts"], c["num_experts_per_tok"]
        self.n_group, self.topk_group = c["n_group"], c["topk_group"]
        self.scaling = c["routed_scaling_factor"]
        self.weight = nn.Parameter(torch.empty(self.E, c["hidden_size"]))
        self.register_buffer("e_score_correction_bias", torch.zeros(self.E))

    def forward(self, x):  # x [T, H] -> chosen experts [T, K], their weights [T, K], all scores [T, E]
        scores = F.linear(x.float(), self.weight.float()).sigmoid()
        with torch.no_grad():
            choice = scores + self.e_score_correction_bias
            groups = choice.view(-1, self.n_group, self.E // self.n_group).topk(2, dim=-1)[0].sum(-1)
            gidx = groups.topk(self.topk_group, dim=-1, sorted=False)[1]
            gmask = torch.zeros_like(groups).scatter_(1, gidx, 1.0).bool()
            emask = gmask.unsqueeze(-1).expand(-1, self.n_group, self.E // self.n_group).reshape(-1, self.E)
            idx = choice.masked_fill(~emask, float("-inf")).topk(self.K, dim=-1, sorted=False)[1]
        w = scores.gather(1, idx)
        w = w / (w.sum(-1, keepdim=True) + 1e-20) * self.scaling
        return idx, w, scores


class MoE(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.gate = Router(c)
        self.experts = nn.ModuleList(MLP(c["hidden_size"], c["moe_intermediate_size"])
                                     for _ in range(c["n_routed_experts"]))
        self.shared_experts = MLP(c["hidden_size"], c["moe_intermediate_size"] * c["n_shared_experts"])
        self.last_counts = None  # tokens per expert in the last training forward
        self.last_aux = None     # the sequence-wise balance term of the last training forward

    def forward(self, x):
        B, S, H = x.shape
        xf = x.reshape(B * S, H)
        idx, w, scores = self.gate(xf)
        # The (token, expert) pairs sorted by expert: one gather, each expert on a contiguous slice, one scatter.
        E, K = self.gate.E, self.gate.K
        flat = idx.flatten()
        order = flat.argsort(stable=True)
        tok = order // K
        counts = torch.bincount(flat, minlength=E)
        xs = xf.index_select(0, tok)
        outs = [self.experts[e](part) for e, part in enumerate(xs.split(counts.tolist())) if part.shape[0]]
        ys = torch.cat(outs) * w.flatten().index_select(0, order)[:, None].to(xf.dtype)
        y = torch.zeros_like(xf).index_add(0, tok, ys)
        if self.training:
            self.last_counts = counts
            # Sequence-wise balance (DeepSeek-V3, eq. 17-20): f_i = E / (K S) * tokens of the sequence routed to
            # i, P_i = mean over the sequence of the normalized sigmoid scores; sum_i f_i P_i per sequence.
            onehot = torch.zeros(B * S, E).scatter_(1, idx, 1.0).view(B, S, E)
            f = onehot.sum(1) * (E / (K * S))
            p = (scores / scores.sum(-1, keepdim=True)).view(B, S, E).mean(1)
            self.last_aux = (f * p).sum(-1).mean()
        return (y + self.shared_experts(xf)).view(B, S, H)


class DecoderLayer(nn.Module):
    def __init__(self, c: dict, moe: bool):
        super().__init__()
        self.self_attn = Attention(c)
        self.mlp = MoE(c) if moe else MLP(c["hidden_size"], c["intermediate_size"])
        self.input_layernorm = RMSNorm(c["hidden_size"])
        self.post_attention_layernorm = RMSNorm(c["hidden_size"])

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class MTP(nn.Module):
    """DeepSeek-V3's multi-token-prediction module (depth 1); embedding and output head are the main model's."""

    def __init__(self, c: dict):
        super().__init__()
        H = c["hidden_size"]
        self.enorm = RMSNorm(H)
        self.hnorm = RMSNorm(H)
        self.eh_proj = nn.Linear(2 * H, H, bias=False)
        self.block = DecoderLayer(c, moe=True)
        self.norm = RMSNorm(H)  # shared_head.norm

    def forward(self, h, next_emb, cos, sin):
        x = self.eh_proj(torch.cat([self.enorm(next_emb), self.hnorm(h)], dim=-1))
        return self.norm(self.block(x, cos, sin))


class TinyV3(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.cfg = c
        H, V, L = c["hidden_size"], c["vocab_size"], c["num_hidden_layers"]
        self.embed_tokens = nn.Embedding(V, H)
        self.layers = nn.ModuleList(DecoderLayer(c, moe=i >= c["first_k_dense_replace"]) for i in range(L))
        self.norm = RMSNorm(H)
        self.lm_head = nn.Linear(H, V, bias=False)
        self.mtp = MTP(c)
        cos, sin = rope_tables(c, c["max_position_embeddings"])
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def moe_layers(self):
        return [m for m in self.modules() if isinstance(m, MoE)]

    def hidden(self, ids):
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = layer(x, self.cos, self.sin)
        return self.norm(x)

    def forward(self, ids):
        return self.lm_head(self.hidden(ids))

    def losses(self, ids):
        """ids [B, S + 2]: next-token loss on positions 0..S-1, MTP loss (token i+2 from h_i and token i+1)."""
        S = ids.shape[1] - 2
        h = self.hidden(ids[:, :S])
        main = F.cross_entropy(self.lm_head(h).flatten(0, 1), ids[:, 1:S + 1].flatten())
        m = self.mtp(h, self.embed_tokens(ids[:, 1:S + 1]), self.cos, self.sin)
        mtp = F.cross_entropy(self.lm_head(m).flatten(0, 1), ids[:, 2:S + 2].flatten())
        return main, mtp

    def init_weights(self, seed: int):
        g = torch.Generator().manual_seed(seed)
        std = self.cfg["initializer_range"]
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or "norm" in name.split(".")[-2]:
                continue  # norms start at 1
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * std)

    def state_dict_hf(self) -> dict:
        """Tensors under DeepSeek-V3's published names; the MTP module as model.layers.{L}.*."""
        L = self.cfg["num_hidden_layers"]
        out = {}
        for name, t in self.state_dict().items():
            if name.startswith("mtp."):
                continue
            if name == "lm_head.weight":
                out[name] = t
            else:
                out["model." + name] = t
        p = f"model.layers.{L}."
        for name, t in self.mtp.state_dict().items():
            if name.startswith("block."):
                out[p + name[len("block."):]] = t
            elif name == "norm.weight":
                out[p + "shared_head.norm.weight"] = t
            else:
                out[p + name] = t
        out[p + "embed_tokens.weight"] = self.embed_tokens.weight.detach()
        out[p + "shared_head.head.weight"] = self.lm_head.weight.detach()
        return out


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------


def split_text(text: str, heldout: float):
    """(train, held-out): the held-out part is the last `heldout` of the text, starting at a line."""
    cut = text.rfind("\n\n", 0, int(len(text) * (1 - heldout))) + 2
    return text[:cut], text[cut:]


def speeches(text: str):
    """The speeches of the play text ("NAME:\\nlines\\n\\n" blocks) without their speakers' names."""
    out = []
    for block in text.split("\n\n"):
        lines = block.strip("\n").split("\n")
        if len(lines) >= 2 and re.fullmatch(r"[A-Za-z][A-Za-z' .,-]*:", lines[0]):
            out.append("\n".join(lines[1:]).strip())
    return out


def chat_ids(tok, a: str, b: str, bos: int, eos: int, user: int, assistant: int):
    return ([bos, user] + tok.encode(a, add_special_tokens=False).ids + [assistant] +
            tok.encode(b, add_special_tokens=False).ids + [eos])


class Batches:
    """Training sequences of S + 2 ids: random windows of the text, and (a fraction) packed chat turns."""

    def __init__(self, train_ids, chats, seq, batch, chat_fraction, seed):
        self.ids, self.chats, self.seq, self.batch = train_ids, chats, seq, batch
        self.chat_fraction = chat_fraction
        self.rng = random.Random(seed)

    def next(self):
        rows = []
        n = self.seq + 2
        for _ in range(self.batch):
            if self.chats and self.rng.random() < self.chat_fraction:
                row = []
                while len(row) < n:
                    row += self.chats[self.rng.randrange(len(self.chats))]
                rows.append(row[:n])
            else:
                s = self.rng.randrange(len(self.ids) - n)
                rows.append(self.ids[s:s + n])
        return torch.tensor(rows, dtype=torch.long)


@torch.no_grad()
def heldout_loss(model, ids, seq, max_windows=None):
    """Mean next-token loss over non-overlapping windows of seq + 1 ids of the held-out text."""
    model.eval()
    total, n = 0.0, 0
    windows = [ids[i:i + seq + 1] for i in range(0, len(ids) - seq - 1, seq)]
    if max_windows:
        windows = windows[:max_windows]
    for i in range(0, len(windows), 8):
        x = torch.tensor(windows[i:i + 8])
        logits = model(x[:, :-1])
        total += F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="sum").item()
        n += x[:, 1:].numel()
    model.train()
    return total / n


def fmt_time(s: float) -> str:
    s = int(s)
    return f"{s // 60}:{s % 60:02d}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--deepseek-tokenizer", type=Path, default=DEEPSEEK_TOKENIZER,
                    help="folder with DeepSeek-V3's tokenizer.json and tokenizer_config.json")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--heldout", type=float, default=0.1)
    # model
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=192)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--q-lora", type=int, default=96)
    ap.add_argument("--kv-lora", type=int, default=64)
    ap.add_argument("--nope", type=int, default=32)
    ap.add_argument("--rope", type=int, default=16)
    ap.add_argument("--v-dim", type=int, default=32)
    ap.add_argument("--intermediate", type=int, default=512)
    ap.add_argument("--moe-intermediate", type=int, default=128)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--n-group", type=int, default=4)
    ap.add_argument("--topk-group", type=int, default=2)
    ap.add_argument("--routed-scaling", type=float, default=2.5)
    ap.add_argument("--max-positions", type=int, default=1024)
    ap.add_argument("--yarn-factor", type=float, default=4.0)
    # training
    ap.add_argument("--steps", type=int, default=None,
                    help="optimizer steps (default: as many as --minutes allows)")
    ap.add_argument("--decay-start", type=int, default=None,
                    help="step where the learning rate starts its linear decay (default: 85%% of --steps)")
    ap.add_argument("--minutes", type=float, default=25.0,
                    help="without --steps: train at the peak rate until 85%% of this time, then decay over "
                         "15%% more steps; training.json records --steps and --decay-start to repeat the run")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--min-lr", type=float, default=3e-4)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--mtp-weight", type=float, default=0.3, help="weight of the MTP loss (DeepSeek-V3's lambda)")
    ap.add_argument("--router-lr-scale", type=float, default=0.1, help="the routers' learning rate / --lr")
    ap.add_argument("--bias-rate", type=float, default=1e-2,
                    help="correction-bias update speed (DeepSeek-V3's gamma)")
    ap.add_argument("--seq-aux", type=float, default=1e-4, help="weight of the sequence-wise balance loss")
    ap.add_argument("--chat-fraction", type=float, default=0.25)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--no-verify", action="store_true", help="skip the check against transformers")
    ap.add_argument("--tokenizer-only", action="store_true",
                    help="only train the tokenizer and write its files (tokenizer.json, tokenizer_config.json)")
    a = ap.parse_args()

    torch.manual_seed(a.seed)
    torch.set_num_threads(a.threads)
    os.environ.setdefault("RAYON_NUM_THREADS", str(a.threads))
    t_start = time.time()
    load_start = list(os.getloadavg())

    text = a.data.read_text(encoding="utf-8")
    train_text, held_text = split_text(text, a.heldout)
    tj, tcfg = train_tokenizer(train_text, a.vocab, a.deepseek_tokenizer)
    tcfg["model_max_length"] = a.max_positions
    if a.tokenizer_only:
        write_tokenizer(a.out, tj, tcfg)
        return
    tok = load_tokenizer(tj)
    vocab_real = tok.get_vocab_size()
    assert vocab_real <= a.vocab, vocab_real
    sid = {s: tok.token_to_id(s) for s in SPECIAL_TOKENS}
    train_ids = tok.encode(train_text, add_special_tokens=False).ids
    held_ids = tok.encode(held_text, add_special_tokens=False).ids
    sp = speeches(train_text)
    chats = [chat_ids(tok, sp[i], sp[i + 1], sid[BOS], sid[EOS], sid[USER], sid[ASSISTANT])
             for i in range(len(sp) - 1) if len(sp[i]) < 600 and len(sp[i + 1]) < 600]
    print(f"text: {len(text):,} chars; train {len(train_text):,} chars = {len(train_ids):,} tokens, held-out "
          f"{len(held_text):,} chars = {len(held_ids):,} tokens; vocab {vocab_real}; {len(chats):,} chat pairs",
          flush=True)

    cfg = model_config(a)
    model = TinyV3(cfg)
    model.init_weights(a.seed)
    n_params = sum(p.numel() for p in model.parameters())
    n_saved = sum(t.numel() for t in model.state_dict_hf().values())
    print(f"model: {n_params / 1e6:.2f} M parameters trained, {n_saved / 1e6:.2f} M saved (with the MTP module's "
          f"copies of the embedding and head)", flush=True)

    # The routers learn at a tenth of the rate: at the full rate Adam moves a router's scores faster than the
    # correction bias can follow, and every token goes to the same experts.
    groups = {"decay": [], "no_decay": [], "router": []}
    for n, p in model.named_parameters():
        if n.endswith("mlp.gate.weight"):
            groups["router"].append(p)
        elif p.dim() >= 2 and "embed" not in n:
            groups["decay"].append(p)
        else:
            groups["no_decay"].append(p)
    opt = torch.optim.AdamW([{"params": groups["decay"], "weight_decay": a.weight_decay, "scale": 1.0},
                             {"params": groups["no_decay"], "weight_decay": 0.0, "scale": 1.0},
                             {"params": groups["router"], "weight_decay": 0.0, "scale": a.router_lr_scale}],
                            lr=a.lr, betas=(0.9, 0.95), eps=1e-8)

    # Warmup, a constant rate, then a linear decay to --min-lr over the last steps. With a time budget the
    # number of steps is fixed when 85% of the time has passed (what the run did is recorded to repeat it).
    steps, decay_start = a.steps, a.decay_start
    if steps is not None and decay_start is None:
        decay_start = int(steps * 0.85)

    def lr_at(step):
        if step < a.warmup:
            return a.lr * (step + 1) / a.warmup
        if decay_start is None or step < decay_start:
            return a.lr
        return a.lr + (a.min_lr - a.lr) * (step - decay_start) / max(1, steps - decay_start)

    batches = Batches(train_ids, chats, a.seq, a.batch, a.chat_fraction, a.seed)
    moes = model.moe_layers()
    log = []
    t_train = time.time()
    tokens_per_step = a.batch * a.seq
    ema = None
    step = 0
    while steps is None or step < steps:
        if steps is None and time.time() - t_train > 0.85 * a.minutes * 60:
            decay_start = step
            steps = step + math.ceil(step * 0.15 / 0.85)
            print(f"decaying the learning rate from step {decay_start} to step {steps}", flush=True)
        for g in opt.param_groups:
            g["lr"] = lr_at(step) * g["scale"]
        x = batches.next()
        main_loss, mtp_loss = model.losses(x)
        aux = sum(m.last_aux for m in moes)
        loss = main_loss + a.mtp_weight * mtp_loss + a.seq_aux * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        # DeepSeek-V3's auxiliary-loss-free balancing: b_i += gamma * sign(mean load - load_i).
        with torch.no_grad():
            for m in moes:
                c = m.last_counts.float()
                m.gate.e_score_correction_bias += a.bias_rate * torch.sign(c.mean() - c)
        ema = main_loss.item() if ema is None else 0.95 * ema + 0.05 * main_loss.item()
        step += 1
        done = step
        if done % 10 == 0 or done == steps or done == 1:
            el = time.time() - t_train
            tps = done * tokens_per_step / el
            imb = max((m.last_counts.max().item() / max(1e-9, m.last_counts.float().mean().item())) for m in moes)
            left = el / done * (steps - done) if steps else a.minutes * 60 - el
            print(f"step {done}/{steps or '?'}  loss {main_loss.item():.4f} (avg {ema:.4f})  mtp {mtp_loss.item():.4f}  "
                  f"lr {lr_at(step - 1):.2e}  max load/mean {imb:.2f}  {tps:,.0f} tok/s  "
                  f"elapsed {fmt_time(el)}  ETA {fmt_time(left)}", flush=True)
        if a.eval_every and (done % a.eval_every == 0) and done != steps:
            hl = heldout_loss(model, held_ids, a.seq, max_windows=16)
            print(f"  held-out loss (first 16 windows) {hl:.4f}", flush=True)
            log.append({"step": done, "train_loss_avg": ema, "heldout_loss_16": hl})
    train_seconds = time.time() - t_train

    # The saved model is bf16 (the correction biases f32, as DeepSeek-V3 publishes them): measure that one.
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(p.to(torch.bfloat16).float())
    final_train = heldout_loss(model, train_ids[-len(held_ids):], a.seq)
    final_held = heldout_loss(model, held_ids, a.seq)
    print(f"final (bf16 weights): held-out loss {final_held:.4f} (perplexity {math.exp(final_held):.2f}), "
          f"loss on as much training text {final_train:.4f}; training {fmt_time(train_seconds)}", flush=True)

    a.out.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file
    tensors = {}
    for n, t in sorted(model.state_dict_hf().items()):
        t = t.detach().contiguous()
        tensors[n] = t.float().contiguous() if n.endswith("e_score_correction_bias") else t.to(torch.bfloat16)
    save_file(tensors, str(a.out / "model.safetensors"), metadata={"format": "pt"})
    (a.out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    write_tokenizer(a.out, tj, tcfg)
    (a.out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 0, "eos_token_id": 1, "do_sample": True, "temperature": 0.8, "top_p": 0.95},
        indent=2) + "\n")
    info = {
        "command": "tools/train_tiny.py " + " ".join(sys.argv[1:]),
        "seed": a.seed, "threads": a.threads, "torch_version": torch.__version__,
        "repeat": f"tools/train_tiny.py --out DIR --seed {a.seed} --threads {a.threads} --steps {steps} "
                  f"--decay-start {decay_start}" + ("" if a.batch == 8 and a.seq == 128 else
                                                    f" --batch {a.batch} --seq {a.seq}"),
        "steps": steps, "decay_start": decay_start, "batch": a.batch, "seq": a.seq,
        "tokens_seen": steps * tokens_per_step,
        "train_tokens": len(train_ids), "heldout_tokens": len(held_ids),
        "heldout_bytes": len(held_text.encode()), "heldout_starts_at_byte": len(train_text.encode()),
        "train_seconds": round(train_seconds, 1), "total_seconds": round(time.time() - t_start, 1),
        "final_train_loss_avg": ema, "final_heldout_loss": final_held,
        "final_train_text_loss": final_train, "log": log,
        "parameters": n_params, "parameters_saved": n_saved,
        "load_average_at_start": load_start, "load_average_at_end": list(os.getloadavg()),
    }
    (a.out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    size = (a.out / "model.safetensors").stat().st_size
    print(f"saved {a.out}: model.safetensors {size / 1e6:.2f} MB", flush=True)
    if not a.no_verify:
        verify(model, a.out, held_ids[:200])


def write_tokenizer(out: Path, tj: dict, tcfg: dict):
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(tcfg, ensure_ascii=False, indent=2) + "\n",
                                               encoding="utf-8")


@torch.no_grad()
def verify(model, out: Path, ids):
    """transformers' DeepseekV3ForCausalLM on the saved folder must compute what this model computes."""
    import transformers
    transformers.logging.set_verbosity_error()
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32,
                                                            attn_implementation="eager")
    assert type(ref).__name__ == "DeepseekV3ForCausalLM", type(ref).__name__
    ref.eval()
    model.eval()
    x = torch.tensor([ids])
    want = torch.log_softmax(ref(input_ids=x, use_cache=False).logits[0].double(), -1)
    got = torch.log_softmax(model(x)[0].double(), -1)
    d = (want - got).abs().max().item()
    print(f"transformers {transformers.__version__} loads it as {type(ref).__name__}: max |log-prob difference| "
          f"over {len(ids)} positions {d:.2e}", flush=True)
    assert d < 1e-3, d


if __name__ == "__main__":
    main()

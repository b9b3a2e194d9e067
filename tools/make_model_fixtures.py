#!/usr/bin/env python3
"""Build tiny random DeepSeek-V3/V2-architecture checkpoints and record reference outputs.

The reference is Hugging Face transformers' own DeepSeek-V3 / DeepSeek-V2 implementation (version pinned in
tools/requirements-fixtures.txt; see tools/README.md for what exactly it computes). Everything is deterministic:
weights come from a seeded generator, the reference runs in float32 on one CPU thread.

Each fixture folder gets:
  config.json                      published-style (rope_scaling/rope_theta, scoring_func, topk_method, ...)
  model.safetensors                or model-0000i-of-0000n.safetensors + model.safetensors.index.json
  reference.json                   logprobs of fixed id sequences, greedy decodes, checks (see write_reference)

Stored dtypes follow the published checkpoints: BF16 everywhere except e_score_correction_bias (F32); with fp8
(quantization_config.quant_method == "fp8") every Linear weight inside the layers is F8_E4M3 plus a
`<name>_scale_inv` F32 [ceil(out/128), ceil(in/128)] block scale. The reference runs in float32 with exactly the
stored values (bf16 upcast, fp8 * scale_inv dequantized in float32), eager attention.

Usage:
  make_model_fixtures.py --all                           # every built-in preset into tests/fixtures/models/
  make_model_fixtures.py --preset v3_tiny [--out DIR]
  make_model_fixtures.py --config my_config.json --out DIR [--seed N] [--shards N] [--mtp]
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT_ROOT = REPO_ROOT / "tests" / "fixtures" / "models"
FP8_BLOCK = 128
FP8_MAX = 448.0  # largest finite float8_e4m3fn

# --------------------------------------------------------------------------------------------------------------
# Presets. "config" is written verbatim as config.json (the published DeepSeek layout); the rest drives generation.
# --------------------------------------------------------------------------------------------------------------

_V3_BASE = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "ep_size": 1,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "moe_layer_freq": 1,
    "norm_topk_prob": True,
    "num_nextn_predict_layers": 0,
    "rms_norm_eps": 1e-06,
    "rope_theta": 10000,
    "scoring_func": "sigmoid",
    "seq_aux": True,
    "tie_word_embeddings": False,
    "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16",
    "use_cache": True,
}

_YARN_V3 = {
    "beta_fast": 32,
    "beta_slow": 1,
    "factor": 4,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
    "original_max_position_embeddings": 64,
    "type": "yarn",
}


def _v3(**kw):
    c = dict(_V3_BASE)
    c.update(kw)
    return dict(sorted(c.items()))


def _v2(**kw):
    c = dict(_V3_BASE)
    for k in ("scoring_func", "topk_method", "norm_topk_prob", "ep_size", "num_nextn_predict_layers"):
        c.pop(k)
    c.update(
        architectures=["DeepseekV2ForCausalLM"],
        model_type="deepseek_v2",
        bos_token_id=0,
        eos_token_id=1,
        scoring_func="softmax",
        pretraining_tp=1,
    )
    c.update(kw)
    return dict(sorted(c.items()))


PRESETS = {
    # DeepSeek-V3 style: sigmoid + bias + group-limited top-k, q_lora, yarn; MTP layer tensors present.
    "v3_tiny": {
        "seed": 1000,
        "mtp": True,
        "config": _v3(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=128,
            moe_intermediate_size=32,
            num_hidden_layers=4,
            num_nextn_predict_layers=1,
            num_attention_heads=4,
            num_key_value_heads=4,
            n_shared_experts=1,
            n_routed_experts=16,
            num_experts_per_tok=4,
            n_group=4,
            topk_group=2,
            first_k_dense_replace=1,
            routed_scaling_factor=2.5,
            q_lora_rank=48,
            kv_lora_rank=32,
            qk_nope_head_dim=32,
            qk_rope_head_dim=16,
            v_head_dim=32,
            max_position_embeddings=256,
            rope_scaling=dict(_YARN_V3),
        ),
    },
    # DeepSeek-V2-Lite style: no q_lora, softmax, greedy top-k, no renorm, scaling 1.0, 2 shared experts,
    # yarn with mscale == mscale_all_dim == 0.707 as published.
    "v2_lite_tiny": {
        "seed": 2000,
        "config": _v2(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=128,
            moe_intermediate_size=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=4,
            n_shared_experts=2,
            n_routed_experts=16,
            num_experts_per_tok=4,
            n_group=1,
            topk_group=1,
            topk_method="greedy",
            norm_topk_prob=False,
            routed_scaling_factor=1.0,
            first_k_dense_replace=1,
            q_lora_rank=None,
            kv_lora_rank=32,
            qk_nope_head_dim=32,
            qk_rope_head_dim=16,
            v_head_dim=32,
            max_position_embeddings=256,
            rope_scaling=dict(_YARN_V3, mscale=0.707, mscale_all_dim=0.707),
        ),
    },
    # DeepSeek-V2 (full) style: softmax + group_limited_greedy (group score = max), no renorm,
    # routed_scaling_factor != 1, q_lora. yarn with mscale != mscale_all_dim so that the cos/sin
    # attention factor (mscale/mscale_all_dim ratio) is exercised.
    "v2_group_tiny": {
        "seed": 3000,
        "config": _v2(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=128,
            moe_intermediate_size=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=4,
            n_shared_experts=2,
            n_routed_experts=16,
            num_experts_per_tok=4,
            n_group=4,
            topk_group=2,
            topk_method="group_limited_greedy",
            norm_topk_prob=False,
            routed_scaling_factor=4.0,
            first_k_dense_replace=1,
            q_lora_rank=48,
            kv_lora_rank=32,
            qk_nope_head_dim=32,
            qk_rope_head_dim=16,
            v_head_dim=32,
            max_position_embeddings=256,
            rope_scaling=dict(_YARN_V3, mscale=1.0, mscale_all_dim=0.707),
        ),
    },
    # DeepSeek-V3 fp8 checkpoint: dims > 128 and not multiples of 128 (partial scale blocks at the edges).
    "v3_fp8_tiny": {
        "seed": 4000,
        "config": _v3(
            vocab_size=256,
            hidden_size=200,
            intermediate_size=328,
            moe_intermediate_size=136,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            n_shared_experts=1,
            n_routed_experts=16,
            num_experts_per_tok=4,
            n_group=4,
            topk_group=2,
            first_k_dense_replace=1,
            routed_scaling_factor=2.5,
            q_lora_rank=144,
            kv_lora_rank=160,
            qk_nope_head_dim=32,
            qk_rope_head_dim=16,
            v_head_dim=32,
            max_position_embeddings=256,
            rope_scaling=dict(_YARN_V3),
            quantization_config={
                "activation_scheme": "dynamic",
                "fmt": "e4m3",
                "quant_method": "fp8",
                "weight_block_size": [128, 128],
            },
        ),
    },
    # Sharded checkpoint (index + 3 shards). Kimi-K2-like router (sigmoid + bias, n_group = topk_group = 1,
    # routed_scaling_factor 2.827) and plain RoPE (no rope_scaling, rope_theta 50000).
    "v3_sharded_tiny": {
        "seed": 5000,
        "shards": 3,
        "config": _v3(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=128,
            moe_intermediate_size=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=4,
            n_shared_experts=1,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_group=1,
            topk_group=1,
            first_k_dense_replace=1,
            routed_scaling_factor=2.827,
            q_lora_rank=48,
            kv_lora_rank=32,
            qk_nope_head_dim=32,
            qk_rope_head_dim=16,
            v_head_dim=32,
            max_position_embeddings=256,
            rope_theta=50000,
            rope_scaling=None,
        ),
    },
    # Long context with DeepSeek-V3's published YaRN settings (factor 40 over 4096 positions, qk_rope_head_dim 64):
    # one 5000-token case and a greedy decode after a 4500-token prompt, past original_max_position_embeddings.
    # Dense layer 0 and a small MoE layer 1 (4 experts, top-2, one group) keep it fast.
    "v3_long_yarn": {
        "seed": 6000,
        "case_lengths": [5000],
        "greedy_prompt_lengths": [4500],
        "position_checks": True,
        "config": _v3(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            moe_intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            n_shared_experts=1,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_group=1,
            topk_group=1,
            first_k_dense_replace=1,
            routed_scaling_factor=2.5,
            q_lora_rank=32,
            kv_lora_rank=32,
            qk_nope_head_dim=32,
            qk_rope_head_dim=64,
            v_head_dim=32,
            max_position_embeddings=163840,
            rope_scaling=dict(_YARN_V3, factor=40, original_max_position_embeddings=4096),
        ),
    },
}

CASE_LENGTHS = [1, 10, 40, 100]  # 100 > original_max_position_embeddings (64): yarn matters
GREEDY_PROMPT_LENGTHS = [6, 70]
GREEDY_NEW_TOKENS = 16

# Quality gates: a fixture is rejected (and the next seed tried) when a discontinuity of the reference is so
# close that an engine with float32 rounding differences could legitimately land on the other side.
MIN_ROUTER_MARGIN = 1e-5  # in score units (sigmoid / softmax), at every routing decision
MIN_GREEDY_MARGIN = 1e-3  # log-prob top1 - top2 at every greedy step
MIN_SENSITIVITY = 0.05  # every simulated engine bug must move some logprob by at least this much
MAX_SEED_TRIES = 40

# --------------------------------------------------------------------------------------------------------------
# transformers helpers
# --------------------------------------------------------------------------------------------------------------


def _tf():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never touch the network
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import transformers  # noqa: PLC0415  (imported lazily so --help works without it)

    transformers.utils.logging.disable_progress_bar()
    return transformers


def is_fp8(cfg: dict) -> bool:
    q = cfg.get("quantization_config") or {}
    return q.get("quant_method") == "fp8"


def hf_config(cfg: dict):
    """The transformers config object for a published-style config dict (parsed as from_pretrained would)."""
    cfg = {k: v for k, v in cfg.items() if k != "quantization_config"}
    with tempfile.TemporaryDirectory() as d:
        Path(d, "config.json").write_text(json.dumps(cfg))
        return _tf().AutoConfig.from_pretrained(d)


def _routers(model):
    out = []
    for m in model.modules():
        if type(m).__name__ in ("DeepseekV3TopkRouter", "DeepseekV2TopkRouter"):
            out.append(m)
    return out


def _attns(model):
    return [m for m in model.modules() if type(m).__name__ in ("DeepseekV3Attention", "DeepseekV2Attention")]


# --------------------------------------------------------------------------------------------------------------
# Random weights
# --------------------------------------------------------------------------------------------------------------


def _normal(gen, shape, std, mean=0.0):
    return torch.randn(shape, generator=gen, dtype=torch.float32) * std + mean


def random_tensor(name: str, shape, gen, cfg: dict) -> torch.Tensor:
    """Init chosen so that attention and routing are far from trivial (see tools/README.md)."""
    shape = tuple(shape)
    if name.endswith("e_score_correction_bias"):
        # Comparable to the spread of sigmoid scores, and mostly negative so that some biased scores inside the
        # selected groups fall below 0 (then masking with 0.0 instead of -inf changes the choice).
        return _normal(gen, shape, 0.25, mean=-0.35)
    if "norm" in name.split(".")[-2] or name.endswith("norm.weight"):
        return torch.rand(shape, generator=gen) * 0.6 + 0.7  # RMSNorm weights in [0.7, 1.3]
    if "embed_tokens" in name:
        return _normal(gen, shape, 1.0)
    if name.endswith("mlp.gate.weight"):  # router: logits with std ~2 on normalized input
        return _normal(gen, shape, 2.0 / math.sqrt(shape[-1]))
    if name.startswith("lm_head") or name.endswith("shared_head.head.weight"):
        return _normal(gen, shape, 2.5 / math.sqrt(shape[-1]))
    if len(shape) == 2:  # Linear [out, in]
        gain = 1.3 if ".self_attn." in name else 1.0
        return _normal(gen, shape, gain / math.sqrt(shape[-1]))
    if len(shape) == 3:  # fused experts [E, out, in]
        return _normal(gen, shape, 1.0 / math.sqrt(shape[-1]))
    raise ValueError(f"no init rule for {name} {shape}")


def init_model(model, cfg: dict, gen: torch.Generator):
    """Deterministic init, in state_dict order; every value but the router bias is rounded to bf16."""
    with torch.no_grad():
        sd = model.state_dict()
        for name in sd:  # state_dict order is deterministic (module registration order)
            t = sd[name]
            if not t.is_floating_point():
                continue
            v = random_tensor(name, t.shape, gen, cfg)
            if not name.endswith("e_score_correction_bias"):
                v = v.to(torch.bfloat16).to(torch.float32)
            t.copy_(v)


def mtp_tensors(model, cfg: dict, gen: torch.Generator) -> dict:
    """Tensors of the MTP module `model.layers.{num_hidden_layers}.*` as in the published V3 checkpoint
    (a full MoE decoder layer plus enorm, hnorm, eh_proj, shared_head.{norm,head}, embed_tokens). The reference
    model never reads them; an engine must skip them."""
    L = cfg["num_hidden_layers"]
    H, V = cfg["hidden_size"], cfg["vocab_size"]
    last = L - 1
    assert last >= cfg["first_k_dense_replace"], "MTP layer copies the shapes of an MoE layer"
    src = _official_state_dict(model)
    out = {}
    for name, t in src.items():
        pre = f"model.layers.{last}."
        if name.startswith(pre):
            out[f"model.layers.{L}." + name[len(pre):]] = tuple(t.shape)
    out[f"model.layers.{L}.embed_tokens.weight"] = (V, H)
    out[f"model.layers.{L}.enorm.weight"] = (H,)
    out[f"model.layers.{L}.hnorm.weight"] = (H,)
    out[f"model.layers.{L}.eh_proj.weight"] = (H, 2 * H)
    out[f"model.layers.{L}.shared_head.norm.weight"] = (H,)
    out[f"model.layers.{L}.shared_head.head.weight"] = (V, H)
    res = {}
    for name in sorted(out):
        v = random_tensor(name, out[name], gen, cfg)
        if not name.endswith("e_score_correction_bias"):
            v = v.to(torch.bfloat16).to(torch.float32)
        res[name] = v
    return res


def _official_state_dict(model) -> dict:
    """The model's tensors under the published checkpoint names (per-expert gate/up/down), via save_pretrained."""
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d, safe_serialization=True)
        return read_safetensors_dir(d)


# --------------------------------------------------------------------------------------------------------------
# Checkpoint files
# --------------------------------------------------------------------------------------------------------------


def read_safetensors_dir(d) -> dict:
    d = Path(d)
    files = sorted(d.glob("*.safetensors"))
    out = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():
                out[k] = sf.get_tensor(k)
    return out


def fp8_quantize(w: torch.Tensor):
    """Block-wise (128x128) e4m3 quantization as in the published DeepSeek-V3 checkpoint.
    Returns (F8_E4M3 weight, F32 scale_inv [ceil(out/128), ceil(in/128)]) with w ~= fp8 * scale_inv."""
    out_f, in_f = w.shape
    nb_o, nb_i = -(-out_f // FP8_BLOCK), -(-in_f // FP8_BLOCK)
    scale = torch.empty(nb_o, nb_i, dtype=torch.float32)
    q = torch.empty(out_f, in_f, dtype=torch.float8_e4m3fn)
    for bo in range(nb_o):
        for bi in range(nb_i):
            blk = w[bo * FP8_BLOCK:(bo + 1) * FP8_BLOCK, bi * FP8_BLOCK:(bi + 1) * FP8_BLOCK].float()
            s = blk.abs().max().item() / FP8_MAX
            if s == 0.0:
                s = 1.0
            scale[bo, bi] = s
            q[bo * FP8_BLOCK:(bo + 1) * FP8_BLOCK, bi * FP8_BLOCK:(bi + 1) * FP8_BLOCK] = (
                blk / scale[bo, bi]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


def fp8_dequantize(q: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """float32 weight = fp8 value * scale_inv of its 128x128 block (edge blocks partial)."""
    out_f, in_f = q.shape
    s = scale_inv.float().repeat_interleave(FP8_BLOCK, 0)[:out_f].repeat_interleave(FP8_BLOCK, 1)[:, :in_f]
    return q.float() * s


def is_fp8_linear(name: str) -> bool:
    """Linear weights inside the decoder layers; embed_tokens, lm_head, norms and mlp.gate stay bf16."""
    if not name.startswith("model.layers.") or not name.endswith(".weight"):
        return False
    if "norm" in name or name.endswith("mlp.gate.weight"):
        return False
    leaf = name.split(".")[-2]
    return leaf in ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
                    "gate_proj", "up_proj", "down_proj", "eh_proj")


def stored_tensors(tensors: dict, fp8: bool) -> dict:
    """Apply the published dtype policy to float32 tensors (already bf16-representable except the bias)."""
    out = {}
    for name, t in tensors.items():
        if name.endswith("e_score_correction_bias"):
            out[name] = t.to(torch.float32).contiguous()
        elif fp8 and is_fp8_linear(name):
            q, s = fp8_quantize(t)
            out[name] = q.contiguous()
            out[name + "_scale_inv"] = s.contiguous()
        else:
            out[name] = t.to(torch.bfloat16).contiguous()
    return out


def dequantized_tensors(stored: dict, dequant=None) -> dict:
    """float32 tensors as the reference model sees them (fp8 dequantized, scale_inv dropped)."""
    dequant = dequant or fp8_dequantize
    out = {}
    for name, t in stored.items():
        if name.endswith("_scale_inv"):
            continue
        if t.dtype == torch.float8_e4m3fn:
            out[name] = dequant(t, stored[name + "_scale_inv"])
        else:
            out[name] = t.float()
    return out


def _fp8_bug_uniform_blocks(q, scale_inv):
    """Bug simulation: block size derived from the shape (ceil(dim / n_blocks)) instead of 128."""
    out_f, in_f = q.shape
    bo, bi = -(-out_f // scale_inv.shape[0]), -(-in_f // scale_inv.shape[1])
    s = scale_inv.float().repeat_interleave(bo, 0)[:out_f].repeat_interleave(bi, 1)[:, :in_f]
    return q.float() * s


def _fp8_bug_no_scale(q, scale_inv):
    return q.float()


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def write_checkpoint(out_dir: Path, tensors: dict, shards: int | None):
    """Write model.safetensors, or n shards + model.safetensors.index.json (HF naming), tensors in name order."""
    names = sorted(tensors)
    meta = {"format": "pt"}
    if not shards or shards <= 1:
        save_file({n: tensors[n] for n in names}, str(out_dir / "model.safetensors"), metadata=meta)
        return
    total = sum(_nbytes(tensors[n]) for n in names)
    target = total / shards
    groups, cur, cur_size = [], [], 0
    for n in names:
        if cur and cur_size + _nbytes(tensors[n]) > target and len(groups) < shards - 1:
            groups.append(cur)
            cur, cur_size = [], 0
        cur.append(n)
        cur_size += _nbytes(tensors[n])
    groups.append(cur)
    weight_map = {}
    for i, g in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: tensors[n] for n in g}, str(out_dir / fname), metadata=meta)
        for n in g:
            weight_map[n] = fname
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _make_readable(out_dir: Path):
    for f in out_dir.iterdir():
        os.chmod(f, 0o644)  # safetensors writes 0600


# --------------------------------------------------------------------------------------------------------------
# Reference model
# --------------------------------------------------------------------------------------------------------------


def load_reference_model(model_dir, dequant=None):
    """transformers model in float32 / eager attention on the tensors stored in model_dir.

    Non-fp8 folders are loaded by transformers' own from_pretrained (its name mapping, bf16 -> f32 upcast,
    ignoring the MTP layer). fp8 folders are dequantized here (fp8 * scale_inv in float32, 128x128 blocks with
    partial edge blocks) into a temporary float32 checkpoint first: transformers' fp8 loader needs `accelerate`
    and derives the block size as rows // scale_rows, which is wrong for partial edge blocks."""
    tf = _tf()
    model_dir = Path(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    kw = dict(dtype=torch.float32, attn_implementation="eager")
    if not is_fp8(cfg):
        return _quiet(lambda: tf.AutoModelForCausalLM.from_pretrained(str(model_dir), **kw))
    with tempfile.TemporaryDirectory() as d:
        c = {k: v for k, v in cfg.items() if k != "quantization_config"}
        Path(d, "config.json").write_text(json.dumps(c))
        save_file(dequantized_tensors(read_safetensors_dir(model_dir), dequant), str(Path(d, "model.safetensors")),
                  metadata={"format": "pt"})
        return _quiet(lambda: tf.AutoModelForCausalLM.from_pretrained(d, **kw))


def _quiet(fn):
    tf = _tf()
    v = tf.logging.get_verbosity()
    tf.logging.set_verbosity_error()
    try:
        m = fn()
    finally:
        tf.logging.set_verbosity(v)
    m.eval()
    return m


@torch.no_grad()
def logits_full(model, ids) -> torch.Tensor:
    """[len(ids), vocab] float32 logits of one uncached forward."""
    out = model(input_ids=torch.tensor([list(ids)], dtype=torch.long), use_cache=False)
    return out.logits[0].float()


def score_ids(model, ids) -> list:
    """logprobs[i] = log P(ids[i] | ids[<i]); logprobs[0] = None. log_softmax in float64 of float32 logits."""
    lp = torch.log_softmax(logits_full(model, ids).double(), dim=-1)
    return [None] + [float(lp[i - 1, ids[i]]) for i in range(1, len(ids))]


def _cache_of(out):
    c = getattr(out, "cache", None)
    return c if c is not None else getattr(out, "past_key_values", None)


@torch.no_grad()
def greedy_cached(model, prompt, n_new):
    """Greedy decode with the KV cache: prefill, then one token per step. Does not stop at eos."""
    out = model(input_ids=torch.tensor([list(prompt)]), use_cache=True)
    cache = _cache_of(out)
    step_logits = out.logits[0, -1].float()
    tokens, margins, step_lps = [], [], []
    for _ in range(n_new):
        lp = torch.log_softmax(step_logits.double(), dim=-1)
        top = torch.topk(lp, 2)
        tok = int(top.indices[0])
        tokens.append(tok)
        margins.append(float(top.values[0] - top.values[1]))
        step_lps.append(lp)
        out = model(input_ids=torch.tensor([[tok]]), cache=cache, use_cache=True)
        cache = _cache_of(out)
        step_logits = out.logits[0, -1].float()
    return tokens, margins, step_lps


@torch.no_grad()
def check_uncached(model, prompt, tokens, step_lps):
    """KV-cached greedy must equal argmax of full uncached forwards; returns max |logprob diff|."""
    seq = list(prompt) + list(tokens)
    lp = torch.log_softmax(logits_full(model, seq[:-1]).double(), dim=-1)
    worst = 0.0
    for j, tok in enumerate(tokens):
        row = lp[len(prompt) - 1 + j]
        if int(row.argmax()) != tok:
            raise AssertionError(f"cached greedy token {j} = {tok} but uncached argmax = {int(row.argmax())}")
        worst = max(worst, float((row - step_lps[j]).abs().max()))
    if worst > 1e-4:
        raise AssertionError(f"cached vs uncached logprobs differ by {worst}")
    return worst


# --------------------------------------------------------------------------------------------------------------
# Router margins and sensitivity to simulated engine bugs
# --------------------------------------------------------------------------------------------------------------


def _router_choice(r, h, variant=None):
    """Re-implementation of the pinned transformers routers with optional deliberate bugs (for sensitivity).
    variant None reproduces transformers exactly (checked in build_fixture)."""
    v3 = type(r).__name__ == "DeepseekV3TopkRouter"
    h = h.view(-1, r.hidden_dim)
    logits = torch.nn.functional.linear(h.float(), r.weight.float())
    E, G, TG, K = r.num_experts, r.num_group, r.topk_group, r.top_k
    if v3:
        scores = logits.sigmoid()
        bias = r.e_score_correction_bias
        choice = scores if variant == "no_bias_for_choice" else scores + bias
        grouped = choice.view(-1, G, E // G)
        if variant == "group_score_max":
            gs = grouped.max(dim=-1).values
        else:
            gs = grouped.topk(min(2, E // G), dim=-1)[0].sum(dim=-1)
        if variant == "no_group_limit":
            mask = torch.ones_like(choice, dtype=torch.bool)
        else:
            gidx = torch.topk(gs, k=TG, dim=-1, sorted=False)[1]
            gm = torch.zeros_like(gs).scatter_(1, gidx, 1)
            mask = gm.unsqueeze(-1).expand(-1, G, E // G).reshape(-1, E).bool()
        fill = 0.0 if variant == "mask_zero_not_neg_inf" else float("-inf")
        masked = choice.masked_fill(~mask, fill)
        idx = torch.topk(masked, k=K, dim=-1, sorted=False)[1]
        w = (choice if variant == "bias_in_weights" else scores).gather(1, idx)
        if r.norm_topk_prob and variant != "no_renormalize":
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        if variant != "no_routed_scaling":
            w = w * r.routed_scaling_factor
        return logits, w, idx, gs, masked
    scores = logits.softmax(dim=-1, dtype=torch.float32)
    gs = None
    if r.topk_method == "greedy" or variant == "no_group_limit":
        masked = scores
    else:
        grouped = scores.view(-1, G, E // G)
        if variant == "group_score_sum_top2":
            gs = grouped.topk(2, dim=-1)[0].sum(dim=-1)
        else:
            gs = grouped.max(dim=-1).values
        gidx = torch.topk(gs, k=TG, dim=-1, sorted=False)[1]
        gm = torch.zeros_like(gs).scatter_(1, gidx, 1)
        mask = gm.unsqueeze(-1).expand(-1, G, E // G).reshape(-1, E).bool()
        masked = scores.masked_fill(~mask, 0.0)
    w, idx = torch.topk(masked, k=K, dim=-1, sorted=False)
    if variant == "renormalize":
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
    if variant != "no_routed_scaling":
        w = w * r.routed_scaling_factor
    return logits, w, idx, gs, masked


class _PatchRouters:
    """Temporarily replace every router's forward (variant None: exact copy, also records margins)."""

    def __init__(self, model, variant=None, record=None):
        self.model, self.variant, self.record = model, variant, record

    def __enter__(self):
        self.saved = []
        for r in _routers(self.model):
            self.saved.append((r, r.forward))
            r.forward = self._make(r)
        return self

    def _make(self, r):
        def fwd(hidden_states):
            logits, w, idx, gs, masked = _router_choice(r, hidden_states, self.variant)
            if self.record is not None:
                self.record.append(_margins(r, gs, masked))
            return logits, w, idx

        return fwd

    def __exit__(self, *a):
        for r, f in self.saved:
            r.forward = f


def _margins(r, gs, masked) -> float:
    """Smallest gap at a selection boundary: topk_group-th vs next group score, k-th vs next expert score."""
    m = float("inf")
    if gs is not None and r.topk_group < r.num_group:
        s = gs.sort(dim=-1, descending=True).values
        m = min(m, float((s[:, r.topk_group - 1] - s[:, r.topk_group]).min()))
    if r.top_k < r.num_experts:
        s = masked.sort(dim=-1, descending=True).values
        gap = s[:, r.top_k - 1] - s[:, r.top_k]
        gap = gap[torch.isfinite(gap)]
        if gap.numel():
            m = min(m, float(gap.min()))
    return m


def _variants(model, cfg):
    """Simulated engine bugs: name -> (enter, exit) callables. Router bugs go through _PatchRouters."""
    v3 = cfg["model_type"] == "deepseek_v3"
    out = {}
    r = _routers(model)
    if r:
        r0 = r[0]
        if v3:
            names = ["no_bias_for_choice", "bias_in_weights", "no_routed_scaling"]
            if r0.num_group > 1:
                names += ["mask_zero_not_neg_inf", "group_score_max", "no_group_limit"]
            if r0.norm_topk_prob:
                names += ["no_renormalize"]
        else:
            names = ["renormalize"]
            if r0.routed_scaling_factor != 1.0:
                names += ["no_routed_scaling"]
            if r0.topk_method == "group_limited_greedy":
                names += ["group_score_sum_top2", "no_group_limit"]
        for n in names:
            out["router:" + n] = ("router", n)
    out["rope:not_interleaved"] = ("rope_layout", None)
    rs = cfg.get("rope_scaling")
    if rs:
        out["rope:no_yarn_inv_freq"] = ("no_yarn", None)
        if _attns(model)[0].scaling != (cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]) ** -0.5:
            out["attn:no_mscale_in_softmax_scale"] = ("no_mscale", None)
        if model.model.rotary_emb.attention_scaling != 1.0:
            out["rope:no_attention_factor_on_cos_sin"] = ("no_attn_factor", None)
    return out


@torch.no_grad()
def run_variant(model, cfg, kind, arg, cases):
    rot = model.model.rotary_emb
    attns = _attns(model)
    saved = {}
    tf = _tf()
    v2mod = tf.models.deepseek_v2.modeling_deepseek_v2
    try:
        if kind == "router":
            with _PatchRouters(model, arg):
                return [score_ids(model, c) for c in cases]
        if kind == "rope_layout":
            if cfg["model_type"] == "deepseek_v3":
                saved["interleave"] = model.config.rope_interleave
                model.config.rope_interleave = False
            else:
                saved["v2_apply"] = v2mod.apply_rotary_emb
                v2mod.apply_rotary_emb = _v2_rotate_half
        elif kind == "no_yarn":
            saved["inv_freq"] = rot.inv_freq.clone()
            d = cfg["qk_rope_head_dim"]
            rot.inv_freq = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.float) / d))
        elif kind == "no_mscale":
            saved["scaling"] = [a.scaling for a in attns]
            for a in attns:
                a.scaling = a.qk_head_dim ** -0.5
        elif kind == "no_attn_factor":
            saved["attn_factor"] = rot.attention_scaling
            rot.attention_scaling = 1.0
        return [score_ids(model, c) for c in cases]
    finally:
        if "interleave" in saved:
            model.config.rope_interleave = saved["interleave"]
        if "v2_apply" in saved:
            v2mod.apply_rotary_emb = saved["v2_apply"]
        if "inv_freq" in saved:
            rot.inv_freq = saved["inv_freq"]
        if "scaling" in saved:
            for a, s in zip(attns, saved["scaling"]):
                a.scaling = s
        if "attn_factor" in saved:
            rot.attention_scaling = saved["attn_factor"]


def _v2_rotate_half(xq, xk, freqs_cis):
    """Bug simulation: V2 rope applied to (first half, second half) pairs instead of interleaved pairs."""
    cos = freqs_cis.real.unsqueeze(1)
    sin = freqs_cis.imag.unsqueeze(1)
    cos, sin = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)

    def rot(x):
        h = x.shape[-1] // 2
        return torch.cat([-x[..., h:], x[..., :h]], -1)

    return (xq * cos + rot(xq) * sin).type_as(xq), (xk * cos + rot(xk) * sin).type_as(xk)


@torch.no_grad()
def _position_sensitivity(model, cfg, cases_ids, cases) -> dict:
    """Long-context bugs, measured on the positions past original_max_position_embeddings only: positions that
    wrap around at it (a table of that many rows), and angles pos * inv_freq rounded in float64 instead of float32
    (for the record: how much the float32 convention of transformers matters at these positions)."""
    L0 = cfg["rope_scaling"]["original_max_position_embeddings"]
    rot = model.model.rotary_emb
    out = {}

    def score_at(ids, pos):
        lg = model(input_ids=torch.tensor([list(ids)]), position_ids=torch.tensor([pos]), use_cache=False)
        lp = torch.log_softmax(lg.logits[0].double(), dim=-1)
        return [None] + [float(lp[i - 1, ids[i]]) for i in range(1, len(ids))]

    def diff_past_l0(other):
        worst = 0.0
        for a, b in zip(cases, other):
            for i in range(L0 + 1, len(a)):
                worst = max(worst, abs(a[i] - b[i]))
        return worst

    out["rope:positions_wrap_at_original_max"] = diff_past_l0(
        [score_at(ids, [i % L0 for i in range(len(ids))]) for ids in cases_ids])
    saved = rot.forward

    def fwd64(x, position_ids):
        ang = position_ids[:, :, None].double() * rot.inv_freq.double()[None, None, :]
        emb = torch.cat((ang, ang), dim=-1)
        return (emb.cos() * rot.attention_scaling).to(x.dtype), (emb.sin() * rot.attention_scaling).to(x.dtype)

    rot.forward = fwd64
    try:
        out["record:rope_angles_in_float64"] = diff_past_l0(
            [score_at(ids, list(range(len(ids)))) for ids in cases_ids])
    finally:
        rot.forward = saved
    return out


def max_lp_diff(a_cases, b_cases) -> float:
    worst = 0.0
    for a, b in zip(a_cases, b_cases):
        for x, y in zip(a[1:], b[1:]):
            worst = max(worst, abs(x - y))
    return worst


# --------------------------------------------------------------------------------------------------------------
# A second, independent forward in numpy float64, written from the official DeepSeek formulas in tools/README.md
# (no transformers code). Agreement with transformers shows that the notes the engine follows are exact.
# --------------------------------------------------------------------------------------------------------------


def yarn_get_mscale(scale: float, mscale: float) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_tables(cfg: dict):
    """(inv_freq [d/2] float64, attention_factor on cos/sin, softmax scale)."""
    d = cfg["qk_rope_head_dim"]
    base = float(cfg.get("rope_theta", 10000.0))
    inv = 1.0 / base ** (np.arange(0, d, 2, dtype=np.float64) / d)
    scale = (cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]) ** -0.5
    rs = cfg.get("rope_scaling")
    if not rs:
        return inv, 1.0, scale
    kind = rs.get("type", rs.get("rope_type"))
    assert kind in ("yarn", "deepseek_yarn"), kind
    f = float(rs["factor"])
    orig = rs["original_max_position_embeddings"]
    bf, bs = rs.get("beta_fast", 32), rs.get("beta_slow", 1)

    def corr_dim(rot):
        return d * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(corr_dim(bf)), 0)
    high = min(math.ceil(corr_dim(bs)), d - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(d // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    extra = 1.0 - ramp  # 1: keep the original frequency (high frequencies), 0: divide by factor
    inv = inv / f * (1 - extra) + inv * extra
    m, mad = rs.get("mscale", 1), rs.get("mscale_all_dim", 0)
    attn_factor = yarn_get_mscale(f, m) / yarn_get_mscale(f, mad)
    if mad:
        scale *= yarn_get_mscale(f, mad) ** 2
    return inv, attn_factor, scale


def _rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _silu(x):
    return x / (1 + np.exp(-x))


def _route(cfg, logits, bias):
    """Official DeepSeek gating on [T, E] logits: (expert ids [T, k], weights [T, k])."""
    E, K = cfg["n_routed_experts"], cfg["num_experts_per_tok"]
    G, TG = cfg.get("n_group") or 1, cfg.get("topk_group") or 1
    method = cfg.get("topk_method", "greedy")
    if cfg.get("scoring_func", "softmax") == "sigmoid":
        s = 1 / (1 + np.exp(-logits))
    else:
        e = np.exp(logits - logits.max(-1, keepdims=True))
        s = e / e.sum(-1, keepdims=True)
    choice = s + bias if method == "noaux_tc" else s.copy()
    if method in ("noaux_tc", "group_limited_greedy") and G > 1:
        grp = choice.reshape(len(s), G, E // G)
        if method == "noaux_tc":
            gs = np.sort(grp, -1)[..., -2:].sum(-1)
        else:
            gs = grp.max(-1)
        keep = np.argsort(-gs, -1, kind="stable")[:, :TG]
        gm = np.zeros_like(gs, dtype=bool)
        np.put_along_axis(gm, keep, True, -1)
        choice = np.where(np.repeat(gm, E // G, -1), choice, -np.inf)
    idx = np.argsort(-choice, -1, kind="stable")[:, :K]
    w = np.take_along_axis(s, idx, -1)
    norm = cfg.get("norm_topk_prob", False) and K > 1
    if method == "noaux_tc":  # V3: normalize (optional), then always scale
        if norm:
            w = w / (w.sum(-1, keepdims=True) + 1e-20)
        w = w * cfg["routed_scaling_factor"]
    elif norm:  # V2: normalized weights are not scaled
        w = w / (w.sum(-1, keepdims=True) + 1e-20)
    else:
        w = w * cfg["routed_scaling_factor"]
    return idx, w


def official_forward(cfg: dict, t: dict, ids) -> np.ndarray:
    """[len(ids), vocab] float64 logits. t: float32/float64 tensors under the published names (dequantized)."""
    W = {k: v.double().numpy() for k, v in t.items()}
    eps = cfg.get("rms_norm_eps", 1e-6)
    Hn, dn, dr, dv = cfg["num_attention_heads"], cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    r = cfg["kv_lora_rank"]
    inv, attn_factor, scale = rope_tables(cfg)
    T = len(ids)
    ang = np.arange(T, dtype=np.float64)[:, None] * inv[None, :]  # [T, dr/2]
    cos, sin = np.cos(ang) * attn_factor, np.sin(ang) * attn_factor

    def rope(x):  # [..., T, dr], pairs (2i, 2i+1) rotated by angle pos * inv[i]; output interleaved
        a, b = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = a * cos - b * sin
        out[..., 1::2] = b * cos + a * sin
        return out

    h = W["model.embed_tokens.weight"][list(ids)]
    causal = np.triu(np.full((T, T), -np.inf), 1)
    for li in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{li}."
        x = _rms(h, W[p + "input_layernorm.weight"], eps)
        if cfg.get("q_lora_rank"):
            q = _rms(x @ W[p + "self_attn.q_a_proj.weight"].T, W[p + "self_attn.q_a_layernorm.weight"], 1e-6)
            q = q @ W[p + "self_attn.q_b_proj.weight"].T
        else:
            q = x @ W[p + "self_attn.q_proj.weight"].T
        q = q.reshape(T, Hn, dn + dr).transpose(1, 0, 2)  # [H, T, dn+dr]
        q_nope, q_pe = q[..., :dn], rope(q[..., dn:])
        kv = x @ W[p + "self_attn.kv_a_proj_with_mqa.weight"].T  # [T, r + dr]
        latent = _rms(kv[:, :r], W[p + "self_attn.kv_a_layernorm.weight"], 1e-6)
        k_pe = rope(kv[:, r:])  # [T, dr], shared by all heads
        kvb = (latent @ W[p + "self_attn.kv_b_proj.weight"].T).reshape(T, Hn, dn + dv).transpose(1, 0, 2)
        k_nope, v = kvb[..., :dn], kvb[..., dn:]
        sc = (q_nope @ k_nope.transpose(0, 2, 1) + q_pe @ k_pe.T[None]) * scale + causal
        sc = np.exp(sc - sc.max(-1, keepdims=True))
        o = (sc / sc.sum(-1, keepdims=True)) @ v  # [H, T, dv]
        h = h + o.transpose(1, 0, 2).reshape(T, Hn * dv) @ W[p + "self_attn.o_proj.weight"].T
        x = _rms(h, W[p + "post_attention_layernorm.weight"], eps)

        def mlp(pre, x):
            g = x @ W[pre + "gate_proj.weight"].T
            u = x @ W[pre + "up_proj.weight"].T
            return (_silu(g) * u) @ W[pre + "down_proj.weight"].T

        moe = (cfg.get("n_routed_experts") and li >= cfg.get("first_k_dense_replace", 0)
               and li % cfg.get("moe_layer_freq", 1) == 0)
        if moe:
            logits = x @ W[p + "mlp.gate.weight"].T
            bias = W.get(p + "mlp.gate.e_score_correction_bias")
            idx, w = _route(cfg, logits, bias)
            y = mlp(p + "mlp.shared_experts.", x) if cfg.get("n_shared_experts") else np.zeros_like(x)
            for ti in range(T):
                for e, we in zip(idx[ti], w[ti]):
                    y[ti] += we * mlp(f"{p}mlp.experts.{e}.", x[ti:ti + 1])[0]
        else:
            y = mlp(p + "mlp.", x)
        h = h + y
    h = _rms(h, W["model.norm.weight"], eps)
    return h @ W["lm_head.weight"].T


def official_score(cfg: dict, tensors: dict, ids) -> list:
    lg = official_forward(cfg, tensors, ids)
    lg = lg - lg.max(-1, keepdims=True)
    lp = lg - np.log(np.exp(lg).sum(-1, keepdims=True))
    return [None] + [float(lp[i - 1, ids[i]]) for i in range(1, len(ids))]


# --------------------------------------------------------------------------------------------------------------
# Building one fixture
# --------------------------------------------------------------------------------------------------------------


def make_ids(gen: torch.Generator, n: int, vocab: int) -> list:
    return [int(x) for x in torch.randint(2, vocab, (n,), generator=gen)]


def try_build(cfg: dict, seed: int, out_dir: Path, shards, mtp: bool, verbose=True, case_lengths=None,
              greedy_prompt_lengths=None, position_checks=False):
    """Build the checkpoint in out_dir and compute the reference; returns (reference dict, problems list)."""
    tf = _tf()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    hcfg = hf_config(cfg)
    model = tf.AutoModelForCausalLM.from_config(hcfg, attn_implementation="eager", dtype=torch.float32)
    init_model(model, cfg, gen)
    official = _official_state_dict(model)
    if mtp:
        official.update(mtp_tensors(model, cfg, gen))
    fp8 = is_fp8(cfg)
    stored = stored_tensors(official, fp8)

    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    write_checkpoint(out_dir, stored, shards)

    ref_model = load_reference_model(out_dir)
    # The loaded model must hold exactly the stored values (catches name-mapping / dtype surprises).
    expect = dequantized_tensors(stored)
    got = _official_state_dict(ref_model)
    L = cfg["num_hidden_layers"]
    for name, t in expect.items():
        if name.startswith(f"model.layers.{L}."):
            assert name not in got, f"transformers loaded MTP tensor {name}"
            continue
        if not torch.equal(got[name].float(), t):
            raise AssertionError(f"reference model tensor {name} differs from the stored one")
    assert set(got) <= set(expect), f"unexpected tensors in reference model: {set(got) - set(expect)}"

    ids_gen = torch.Generator().manual_seed(seed + 1)
    V = cfg["vocab_size"]
    cases_ids = [make_ids(ids_gen, n, V) for n in (case_lengths or CASE_LENGTHS)]
    prompts = [make_ids(ids_gen, n, V) for n in (greedy_prompt_lengths or GREEDY_PROMPT_LENGTHS)]

    problems = []
    margins_seen = []
    with _PatchRouters(ref_model, None, margins_seen):
        cases = [score_ids(ref_model, ids) for ids in cases_ids]
    plain = [score_ids(ref_model, ids) for ids in cases_ids]
    if max_lp_diff(cases, plain) != 0.0:
        raise AssertionError("router re-implementation differs from transformers")

    greedy, kv_check = [], 0.0
    for p in prompts:
        toks, margins, step_lps = greedy_cached(ref_model, p, GREEDY_NEW_TOKENS)
        kv_check = max(kv_check, check_uncached(ref_model, p, toks, step_lps))
        with _PatchRouters(ref_model, None, margins_seen):
            logits_full(ref_model, list(p) + toks[:-1])
        greedy.append({"prompt": p, "output": toks, "margins": margins})
        if min(margins) < MIN_GREEDY_MARGIN:
            problems.append(f"greedy margin {min(margins):.2e} < {MIN_GREEDY_MARGIN}")
    router_margin = min(margins_seen) if margins_seen else None
    if router_margin is not None and router_margin < MIN_ROUTER_MARGIN:
        problems.append(f"router margin {router_margin:.2e} < {MIN_ROUTER_MARGIN}")

    sensitivity = {}
    for name, (kind, arg) in _variants(ref_model, cfg).items():
        d = max_lp_diff(cases, run_variant(ref_model, cfg, kind, arg, cases_ids))
        sensitivity[name] = d
        if d < MIN_SENSITIVITY:
            problems.append(f"{name} changes logprobs by only {d:.3g}")

    if position_checks:
        for name, d in _position_sensitivity(ref_model, cfg, cases_ids, cases).items():
            sensitivity[name] = d
            if d < MIN_SENSITIVITY and not name.startswith("record:"):
                problems.append(f"{name} changes logprobs by only {d:.3g}")

    official_cases = [official_score(cfg, expect, ids) for ids in cases_ids]
    official_diff = max_lp_diff(cases, official_cases)
    if official_diff > 2e-3:
        raise AssertionError(f"numpy official-formula forward differs from transformers by {official_diff}")

    if fp8:
        for name, fn in (("fp8:ignore_scale_inv", _fp8_bug_no_scale), ("fp8:blocks_from_shape", _fp8_bug_uniform_blocks)):
            bug_model = load_reference_model(out_dir, dequant=fn)
            d = max_lp_diff(cases, [score_ids(bug_model, c) for c in cases_ids])
            sensitivity[name] = d
            if d < MIN_SENSITIVITY:
                problems.append(f"{name} changes logprobs by only {d:.3g}")
        # quantization error of the stored weights, for the record
        qerr = max(float((expect[n] - official[n]).abs().max() / official[n].abs().max())
                   for n in official if is_fp8_linear(n))
        if qerr > 0.07:
            raise AssertionError(f"fp8 block quantization error {qerr} too large")
    else:
        qerr = None

    ref = {
        "transformers_version": tf.__version__,
        "torch_version": torch.__version__,
        "dtype_compute": "float32",
        "attn_implementation": "eager",
        "model_class": type(ref_model).__name__,
        "seed": seed,
        "cases": [{"ids": ids, "logprobs": lps} for ids, lps in zip(cases_ids, cases)],
        "greedy": greedy,
        "checks": {
            "kv_cached_vs_uncached_max_abs_logprob_diff": kv_check,
            # an independent numpy float64 forward written from tools/README.md agrees with transformers to:
            "numpy_official_formulas_max_abs_logprob_diff": official_diff,
            "min_router_margin": router_margin,
            "min_greedy_margin": min(min(g["margins"]) for g in greedy),
            # fp8 only: max |dequantized - original| / max |original| over the quantized weights
            "fp8_max_rel_quant_error": qerr,
            # max |logprob change| over the cases when the reference runs with one deliberate bug:
            # what an engine with that bug would be off by.
            "sensitivity": sensitivity,
        },
    }
    if verbose:
        for p in problems:
            print(f"    seed {seed}: {p}")
    return ref, problems


def build_fixture(name: str, cfg: dict, out_dir: Path, seed: int, shards=None, mtp=False, strict=True, **options):
    torch.set_num_threads(1)
    print(f"[{name}] -> {out_dir}")
    for attempt in range(MAX_SEED_TRIES):
        s = seed + 17 * attempt
        ref, problems = try_build(cfg, s, out_dir, shards, mtp, **options)
        if not problems or not strict:
            break
    else:
        raise SystemExit(f"[{name}] no seed in {MAX_SEED_TRIES} tries passed the quality gates")
    (out_dir / "reference.json").write_text(_dump_reference(ref))
    _make_readable(out_dir)
    size = sum(f.stat().st_size for f in out_dir.iterdir())
    c = ref["checks"]
    print(f"[{name}] seed {ref['seed']}: {size / 1e6:.2f} MB, router margin {c['min_router_margin']}, "
          f"greedy margin {c['min_greedy_margin']:.3g}, kv check {c['kv_cached_vs_uncached_max_abs_logprob_diff']:.2e}, "
          f"numpy official forward {c['numpy_official_formulas_max_abs_logprob_diff']:.2e}")
    for k, v in c["sensitivity"].items():
        print(f"    sensitivity {k}: {v:.3f}")
    return ref


def _dump_reference(ref: dict) -> str:
    """Indented JSON whose lists of numbers stay on one line; floats at full float64 precision."""

    def enc(v, ind):
        pad = " " * ind
        if isinstance(v, dict):
            items = [f'{pad} {json.dumps(k)}: {enc(x, ind + 1)}' for k, x in v.items()]
            return "{\n" + ",\n".join(items) + "\n" + pad + "}"
        if isinstance(v, list) and any(isinstance(x, (dict, list)) for x in v):
            return "[\n" + ",\n".join(pad + " " + enc(x, ind + 1) for x in v) + "\n" + pad + "]"
        return json.dumps(v)

    return enc(ref, 0) + "\n"


# --------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--preset", choices=sorted(PRESETS), help="one built-in preset")
    g.add_argument("--all", action="store_true", help="every built-in preset into --out-root")
    g.add_argument("--config", help="a published-style config.json (fp8 when quantization_config says so)")
    ap.add_argument("--out", help="fixture folder (default: <out-root>/<preset>)")
    ap.add_argument("--out-root", default=str(DEFAULT_OUT_ROOT))
    ap.add_argument("--seed", type=int, help="override the preset's seed (default 1 for --config)")
    ap.add_argument("--shards", type=int, help="write N safetensors shards + index")
    ap.add_argument("--mtp", action="store_true", help="also store MTP tensors model.layers.{num_hidden_layers}.*")
    ap.add_argument("--no-strict", action="store_true", help="keep the first seed even if quality gates fail")
    a = ap.parse_args(argv)

    _tf()  # fail early when transformers is missing
    if a.config:
        if not a.out:
            ap.error("--config needs --out")
        cfg = json.loads(Path(a.config).read_text())
        build_fixture(Path(a.config).stem, cfg, Path(a.out), a.seed if a.seed is not None else 1,
                      shards=a.shards, mtp=a.mtp, strict=not a.no_strict)
        return 0
    names = sorted(PRESETS) if a.all else [a.preset]
    if a.out and len(names) > 1:
        ap.error("--out is for one fixture; use --out-root with --all")
    for n in names:
        p = PRESETS[n]
        out = Path(a.out) if a.out else Path(a.out_root) / n
        build_fixture(n, copy.deepcopy(p["config"]), out, a.seed if a.seed is not None else p["seed"],
                      shards=a.shards or p.get("shards"), mtp=a.mtp or p.get("mtp", False),
                      strict=not a.no_strict, case_lengths=p.get("case_lengths"),
                      greedy_prompt_lengths=p.get("greedy_prompt_lengths"),
                      position_checks=p.get("position_checks", False))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Tiny compressed-tensors pack-quantized checkpoints, made by the compressed-tensors package itself.

Takes a fixture of tests/fixtures/models/ (made by make_model_fixtures.py; default v3_tiny) and writes
<base>_int4 and <base>_int8 beside it: the routed experts (model.layers.L.mlp.experts.E.{gate,up,down}_proj,
the MTP layer's too) quantized with compressed-tensors' own API -- calculate_qparams on each group's min / max (what
its minmax observer gives), then compress_module, which quantizes and packs -- symmetric, group 32, bf16 scales;
every other tensor as the base stores it, config.json with the package's own quantization_config.

Each folder also gets
  quantized.json  for a few matrices: the integers compressed-tensors unpacks (unpack_from_int32), the scales,
                  and the weights its checkpoint dequantizer (CompressedTensorsDequantizer, bf16) gives;
  reference.json  the log-probs and greedy continuations of transformers running the checkpoint (as the base
                  fixtures' reference.json; see tools/README.md for which weights it runs on).

  python tools/make_quantized_fixtures.py [--base v3_tiny] [--bits 4 8] [--check-output DIR]

--check-output DIR instead loads a checkpoint that `moeserve quantize` wrote with the package's checkpoint
dequantizer, and (with --against BASE) checks that every quantized matrix equals the package's own quantization of
BASE's weights, integer for integer and scale for scale.
"""
import argparse
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_model_fixtures as mmf  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
FIXTURES = REPO_ROOT / "tests" / "fixtures" / "models"
GROUP_SIZE = 32
# Every Linear module but the routed experts (what `moeserve quantize` writes too).
IGNORE = [
    "lm_head",
    "re:.*self_attn.*",
    "re:.*shared_experts.*",
    r"re:.*mlp\.(gate|up|gate_up|down)_proj.*",
    "re:.*eh_proj.*",
    "re:.*shared_head.*",
]
RECORDED = [  # matrices whose unpacked integers, scales and dequantized values go into quantized.json
    "model.layers.1.mlp.experts.0.gate_proj",
    "model.layers.2.mlp.experts.7.down_proj",
    "model.layers.3.mlp.experts.15.up_proj",
]


def is_routed_expert(name: str) -> bool:
    parts = name.split(".")
    return (len(parts) == 7 and parts[0] == "model" and parts[1] == "layers" and parts[3] == "mlp"
            and parts[4] == "experts" and parts[6] in ("gate_proj", "up_proj", "down_proj"))


def scheme(bits: int, group: int = GROUP_SIZE):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme  # noqa: PLC0415

    return QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="group",
                                 group_size=group, observer="minmax"),
        format="pack-quantized",
    )


def quantization_config(bits: int) -> dict:
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus  # noqa: PLC0415

    qc = QuantizationConfig(config_groups={"group_0": scheme(bits)}, format="pack-quantized",
                            quantization_status=QuantizationStatus.COMPRESSED, ignore=list(IGNORE))
    return qc.model_dump(mode="json")


def compress_linear(w: torch.Tensor, bits: int, group: int = GROUP_SIZE) -> dict:
    """compressed-tensors' quantization of one bf16 weight [out, in]: {weight_packed, weight_scale, weight_shape}."""
    from compressed_tensors.compressors import compress_module  # noqa: PLC0415
    from compressed_tensors.quantization.utils import calculate_qparams  # noqa: PLC0415

    s = scheme(bits, group)
    rows, cols = w.shape
    g = w.reshape(rows, cols // group, group)
    scale, _ = calculate_qparams(g.amin(dim=-1), g.amax(dim=-1), s.weights)
    lin = torch.nn.Linear(cols, rows, bias=False, dtype=w.dtype)
    lin.weight.data.copy_(w)
    lin.register_parameter("weight_scale", torch.nn.Parameter(scale.to(w.dtype), requires_grad=False))
    lin.quantization_scheme = s
    compress_module(lin)
    return {k: v.detach().clone() for k, v in lin.state_dict().items()}


def read_dir(d: Path) -> dict:
    return mmf.read_safetensors_dir(d)


def dequantize_checkpoint(d: Path) -> dict:
    """The checkpoint as compressed-tensors' checkpoint dequantizer reads it (validate: no stray qparams)."""
    from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import (  # noqa: PLC0415
        CompressedTensorsDequantizer,
    )

    return CompressedTensorsDequantizer(str(d), dtype=torch.bfloat16).validate(read_dir(d))


def unpack(t: dict, module: str, bits: int) -> torch.Tensor:
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32  # noqa: PLC0415

    shape = torch.Size(t[module + ".weight_shape"].tolist())
    return unpack_from_int32(t[module + ".weight_packed"], bits, shape)


def exact_dequantized(t: dict, bits: int) -> dict:
    """float32 weights q * scale, exactly (what moeserve computes with): every pack-quantized module dequantized."""
    out = {}
    for name, v in t.items():
        if name.endswith((".weight_packed", ".weight_scale", ".weight_shape")):
            continue
        out[name] = v.float()
    for name in t:
        if name.endswith(".weight_packed"):
            m = name[: -len(".weight_packed")]
            q = unpack(t, m, bits).float()
            s = t[m + ".weight_scale"].float()
            s = s.repeat_interleave(q.shape[1] // s.shape[1], dim=1)
            out[m + ".weight"] = q * s
    return out


def try_transformers_load(d: Path):
    """transformers' own loading of the compressed checkpoint (decompressing it), or the reason it fails."""
    tf = mmf._tf()
    try:
        m = mmf._quiet(lambda: tf.AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32,
                                                                     attn_implementation="eager"))
        return m, None
    except Exception as e:  # noqa: BLE001  (any failure: fall back, and say why)
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"


def model_from_tensors(cfg: dict, tensors: dict):
    tf = mmf._tf()
    with tempfile.TemporaryDirectory() as tmp:
        c = {k: v for k, v in cfg.items() if k != "quantization_config"}
        Path(tmp, "config.json").write_text(json.dumps(c))
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(Path(tmp, "model.safetensors")),
                  metadata={"format": "pt"})
        return mmf._quiet(lambda: tf.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32,
                                                                         attn_implementation="eager"))


def build(base: str, bits: int):
    tf = mmf._tf()
    torch.set_num_threads(1)
    src = FIXTURES / base
    out = FIXTURES / f"{base}_int{bits}"
    cfg = json.loads((src / "config.json").read_text())
    assert not mmf.is_fp8(cfg), "the base must be a bf16 fixture"
    base_ref = json.loads((src / "reference.json").read_text())
    tensors = read_dir(src)
    stored = {}
    for name, t in tensors.items():
        m = name[: -len(".weight")] if name.endswith(".weight") else None
        if m and is_routed_expert(m):
            assert t.dtype == torch.bfloat16, name
            for k, v in compress_linear(t, bits).items():
                stored[f"{m}.{k}"] = v
        else:
            stored[name] = t
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    cfg["quantization_config"] = quantization_config(bits)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    save_file(dict(sorted(stored.items())), str(out / "model.safetensors"), metadata={"format": "pt"})

    # (a) the package's unpacking and dequantization of some matrices
    back = read_dir(out)
    deq = dequantize_checkpoint(out)
    recorded = []
    for m in RECORDED:
        q = unpack(back, m, bits)
        recorded.append({
            "module": m,
            "shape": list(back[m + ".weight_shape"].tolist()),
            "ints": q.to(torch.int32).tolist(),
            "scales": back[m + ".weight_scale"].float().tolist(),
            # compressed-tensors' dequantization: bf16(q * scale) (a bf16 product, rounded)
            "dequantized_bf16": deq[m + ".weight"].float().tolist(),
        })
    (out / "quantized.json").write_text(json.dumps({
        "compressed_tensors_version": __import__("compressed_tensors").__version__,
        "torch_version": torch.__version__, "num_bits": bits, "group_size": GROUP_SIZE,
        "matrices": recorded}) + "\n")

    # (b) transformers on the same checkpoint
    exact = exact_dequantized(back, bits)
    ref_model = model_from_tensors(cfg, exact)
    tf_model, tf_failure = try_transformers_load(out)
    cases_ids = [c["ids"] for c in base_ref["cases"]]
    prompts = [g["prompt"] for g in base_ref["greedy"]]
    margins_seen = []
    with mmf._PatchRouters(ref_model, None, margins_seen):
        cases = [mmf.score_ids(ref_model, ids) for ids in cases_ids]
    greedy, kv_check = [], 0.0
    for p in prompts:
        toks, margins, step_lps = mmf.greedy_cached(ref_model, p, mmf.GREEDY_NEW_TOKENS)
        kv_check = max(kv_check, mmf.check_uncached(ref_model, p, toks, step_lps))
        with mmf._PatchRouters(ref_model, None, margins_seen):
            mmf.logits_full(ref_model, list(p) + toks[:-1])
        greedy.append({"prompt": p, "output": toks, "margins": margins})
    checks = {
        "kv_cached_vs_uncached_max_abs_logprob_diff": kv_check,
        "min_router_margin": min(margins_seen) if margins_seen else None,
        "min_greedy_margin": min(min(g["margins"]) for g in greedy),
        # the unquantized base model's log-probs against these: what int quantization changed
        "base_bf16_max_abs_logprob_diff": mmf.max_lp_diff(cases, [c["logprobs"] for c in base_ref["cases"]]),
    }
    # transformers' own decompression gives bf16(q * scale); the exact products differ from it by < 2^-9.
    bf16_model = model_from_tensors(cfg, {k: (v.float() if v.is_floating_point() else v) for k, v in deq.items()})
    checks["package_bf16_dequantization_max_abs_logprob_diff"] = mmf.max_lp_diff(
        cases, [mmf.score_ids(bf16_model, ids) for ids in cases_ids])
    if tf_model is not None:
        # transformers decompresses the experts as the package's dequantizer does (checked here, tensor for
        # tensor), keeps them bf16 and runs them in bf16; in float32 it differs from `cases` by the bf16
        # rounding of q * scale only.
        sd = tf_model.state_dict()
        for key, t in sd.items():
            if key.endswith("mlp.experts.gate_up_proj") or key.endswith("mlp.experts.down_proj"):
                p = key[: -len("gate_up_proj")] if key.endswith("gate_up_proj") else key[: -len("down_proj")]
                for e in range(t.shape[0]):
                    want = (torch.cat([deq[f"{p}{e}.gate_proj.weight"], deq[f"{p}{e}.up_proj.weight"]])
                            if key.endswith("gate_up_proj") else deq[f"{p}{e}.down_proj.weight"])
                    assert torch.equal(t[e].to(want.dtype), want), f"transformers loaded {key}[{e}] differently"
        checks["transformers_loaded_checkpoint_max_abs_logprob_diff"] = mmf.max_lp_diff(
            cases, [mmf.score_ids(tf_model, ids) for ids in cases_ids])
        for prm in tf_model.parameters():
            prm.data = prm.data.float()
        checks["transformers_loaded_checkpoint_float32_max_abs_logprob_diff"] = mmf.max_lp_diff(
            cases, [mmf.score_ids(tf_model, ids) for ids in cases_ids])
    else:
        checks["transformers_loaded_checkpoint"] = "not loadable: " + tf_failure
    ref = {
        "transformers_version": tf.__version__,
        "torch_version": torch.__version__,
        "compressed_tensors_version": __import__("compressed_tensors").__version__,
        "dtype_compute": "float32",
        "attn_implementation": "eager",
        "model_class": type(ref_model).__name__,
        "weights": "routed experts dequantized exactly (float32 q * scale, from compressed-tensors' unpacking); "
                   "the rest as stored, upcast to float32",
        "base": base,
        "seed": base_ref["seed"],
        "cases": [{"ids": ids, "logprobs": lps} for ids, lps in zip(cases_ids, cases)],
        "greedy": greedy,
        "checks": checks,
    }
    (out / "reference.json").write_text(mmf._dump_reference(ref))
    mmf._make_readable(out)
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"[{out.name}] {size / 1e6:.2f} MB, " + ", ".join(f"{k} {v}" for k, v in checks.items()))


def block_dequantized(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 float(fp8) * scale, one scale per 128x128 block (DeepSeek's weight_scale_inv, compressed-tensors'
    block weight_scale)."""
    s = scale.float().repeat_interleave(128, 0)[: w.shape[0]].repeat_interleave(128, 1)[:, : w.shape[1]]
    return w.float() * s


def check_output(d: Path, against: Path | None):
    """A checkpoint `moeserve quantize` wrote: the package's dequantizer reads it; with `against`, every quantized
    matrix equals the package's own quantization of the input's weights."""
    cfg = json.loads((d / "config.json").read_text())
    qc = cfg["quantization_config"]
    from compressed_tensors.quantization import QuantizationConfig  # noqa: PLC0415

    QuantizationConfig.model_validate(qc)
    bits = qc["config_groups"]["group_0"]["weights"]["num_bits"]
    group = qc["config_groups"]["group_0"]["weights"]["group_size"]
    deq = dequantize_checkpoint(d)
    stored = read_dir(d)
    n = sum(1 for k in stored if k.endswith(".weight_packed"))
    print(f"{d}: compressed-tensors {__import__('compressed_tensors').__version__} dequantized {n} matrices "
          f"(int{bits}), {len(deq)} tensors in all")
    # fp8 matrices kept as they were (format mixed-precision, a float-quantized group): the package reads
    # them as weight * weight_scale per 128x128 block.
    n8 = bad8 = 0
    for k, v in stored.items():
        if v.dtype == torch.float8_e4m3fn:
            n8 += 1
            want = block_dequantized(v, stored[k + "_scale"]).to(torch.bfloat16)
            if not torch.equal(deq[k].to(torch.bfloat16), want):
                bad8 += 1
                print(f"  {k}: the package reads other values than weight * weight_scale")
    if n8:
        print(f"{d}: {n8} fp8 matrices (float-quantized), the package reads {n8 - bad8} as weight * weight_scale")
    if bad8:
        raise SystemExit(1)
    tf_model, failure = try_transformers_load(d)
    print(f"{d}: transformers {mmf._tf().__version__}: " + ("loaded" if tf_model is not None else failure))
    if against is None:
        return
    src = read_dir(against)
    bad = 0
    for name, t in src.items():
        m = name[: -len(".weight")]
        if name.endswith(".weight_scale_inv") and not is_routed_expert(name[: -len(".weight_scale_inv")]):
            if name[: -len("_inv")] not in stored:
                continue  # its matrix became bf16 (--dense-dtype bf16)
            if not torch.equal(stored[name[: -len("_inv")]], t):  # renamed weight_scale, same numbers
                print(f"  {name[: -len('_inv')]} differs from the input's {name}")
                bad += 1
            continue
        if not (name.endswith(".weight") and is_routed_expert(m)):
            if name in stored and not torch.equal(stored[name], t):
                print(f"  {name} differs from the input")
                bad += 1
            continue
        if t.dtype == torch.float8_e4m3fn:
            t = block_dequantized(t, src[name + "_scale_inv"])
        if t.dtype != torch.bfloat16:
            t = t.to(torch.bfloat16)
        want = compress_linear(t, bits, group)
        for k, v in want.items():
            got = stored[f"{m}.{k}"]
            if k == "weight_shape":
                same = got.tolist() == v.tolist()
            else:
                same = got.dtype == v.dtype and torch.equal(got, v)
            if not same:
                bad += 1
                print(f"  {m}.{k} differs from compressed-tensors' quantization")
    print(f"{d}: {'every quantized matrix equals compressed-tensors own quantization' if not bad else f'{bad} mismatches'}")
    if bad:
        raise SystemExit(1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="v3_tiny")
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--check-output", type=Path)
    ap.add_argument("--against", type=Path)
    a = ap.parse_args()
    if a.check_output:
        check_output(a.check_output, a.against)
        return
    for b in a.bits:
        build(a.base, b)


if __name__ == "__main__":
    main()

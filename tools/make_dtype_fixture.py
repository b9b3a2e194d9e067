#!/usr/bin/env python3
"""Write tests/fixtures/dtypes/dtypes.json: the scalar conversions of src/core/dtype.h computed by ml_dtypes and
numpy, for tests/core/test_dtype.cpp and tests/kernels/test_kernels.cpp to compare with bit for bit.

The decoders and encoders in src/core/dtype.cpp are shared by the kernels and by their reference, so the kernel
tests cannot catch a mistake in them; this fixture is the independent check.

What it holds (every float as its IEEE bit pattern, an unsigned integer):
  fp8_e4m3fn_decode  all 256 codes -> float32 bits
  bf16_decode_edges  named edge cases (zeros, subnormals, min normal, max, inf, NaN) -> float32 bits
  f16_decode_edges   the same for IEEE half
  bf16_encode, f16_encode, fp8_e4m3fn_encode
                     [float32 bits, code] pairs: ties (both ways), just off ties, subnormals, overflow, NaN
  sweeps             digests over whole tables, so that every input is checked with a small file:
    bf16_decode / f16_decode   all 65536 codes
    *_encode                   the float32 inputs  k << 12 for k in [0, 2^20) (every sign, exponent and the top 11
                               mantissa bits: every bf16 and fp8 tie) and (i * 2654435761) mod 2^32 for i in
                               [0, 2^17) (low mantissa bits too)
  A digest is FNV-1a over 32-bit words: h = 0xcbf29ce484222325; for each result r: h = (h ^ r) * 0x100000001b3
  mod 2^64. NaN results are replaced by one canonical value first (float32 0x7fc00000, bf16 0x7fc0, f16 0x7e00,
  fp8 0x7f), since NaN payloads and signs are not part of the contract.

fp8 encoding saturates: finite values and infinities beyond +-448 become +-448, as torch's float8_e4m3fn cast does
(ml_dtypes instead gives NaN above 464). The fixture records ml_dtypes' result for the input clamped to
[-448, 448], which is that contract.

Usage: .venv/bin/python tools/make_dtype_fixture.py [--out tests/fixtures/dtypes/dtypes.json]
Needs numpy and ml_dtypes (tools/requirements-fixtures.txt). Deterministic: byte-identical output on every run.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import ml_dtypes
import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "tests" / "fixtures" / "dtypes" / "dtypes.json"

BF16 = ml_dtypes.bfloat16
FP8 = ml_dtypes.float8_e4m3fn
FP8_MAX = 448.0
MASK64 = (1 << 64) - 1


def fnv1a_words(words) -> str:
    h = 0xCBF29CE484222325
    for w in np.asarray(words, dtype=np.uint64).tolist():
        h = ((h ^ w) * 0x100000001B3) & MASK64
    return f"{h:016x}"


def f32_bits(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    b = x.view(np.uint32).copy()
    b[np.isnan(x)] = 0x7FC00000
    return b


def sweep_inputs() -> np.ndarray:
    a = np.arange(1 << 20, dtype=np.uint64) << np.uint64(12)
    b = (np.arange(1 << 17, dtype=np.uint64) * np.uint64(2654435761)) & np.uint64(0xFFFFFFFF)
    return np.concatenate([a, b]).astype(np.uint32)


def enc_bf16(x: np.ndarray) -> np.ndarray:
    c = np.asarray(x, dtype=np.float32).astype(BF16).view(np.uint16).astype(np.uint32)
    c[np.isnan(x)] = 0x7FC0
    return c


def enc_f16(x: np.ndarray) -> np.ndarray:
    c = np.asarray(x, dtype=np.float32).astype(np.float16).view(np.uint16).astype(np.uint32)
    c[np.isnan(x)] = 0x7E00
    return c


def enc_fp8(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    c = np.clip(x, -FP8_MAX, FP8_MAX).astype(FP8).view(np.uint8).astype(np.uint32)
    c[np.isnan(x)] = 0x7F
    return c


def u32(*vals) -> np.ndarray:
    return np.array(vals, dtype=np.uint64).astype(np.uint32)


def encode_cases(kind: str) -> np.ndarray:
    """Inputs (float32 bits) around the places where rounding can go wrong for one format."""
    common = [0x00000000, 0x80000000, 0x3F800000, 0xBF800000, 0x00000001, 0x807FFFFF, 0x00800000,
              0x7F7FFFFF, 0xFF7FFFFF, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00000, 0x7F800001, 0x7FBFFFFF]
    out = list(common)
    if kind == "bf16":
        mant_drop = 16  # bf16 keeps the top 7 mantissa bits
    elif kind == "f16":
        mant_drop = 13
    else:
        mant_drop = 20
    half = 1 << (mant_drop - 1)
    for e in (1, 60, 100, 112, 113, 118, 119, 120, 121, 125, 126, 127, 128, 134, 135, 142, 143, 200, 254):
        for m_hi in (0, 1, 2, 3, 6, 7):
            base = (e << 23) | (m_hi << mant_drop)
            for d in (0, half - 1, half, half + 1, (1 << mant_drop) - 1):
                b = base + d
                if b >> 23 != e:
                    continue
                out.append(b)
                out.append(b | 0x80000000)
    if kind == "fp8":  # the subnormal range (units of 2^-9) and its ties, the largest finite values
        for k in range(0, 40):
            v = np.float32(k * 2.0**-10)
            out.append(int(np.array([v]).view(np.uint32)[0]))
            out.append(int(np.array([-v]).view(np.uint32)[0]))
        for v in (416.0, 432.0, 440.0, 447.9, 448.0, 448.1, 463.9, 464.0, 464.1, 479.9, 480.0, 512.0, 1e6):
            out.append(int(np.array([v], dtype=np.float32).view(np.uint32)[0]))
            out.append(int(np.array([-v], dtype=np.float32).view(np.uint32)[0]))
    if kind == "f16":  # the subnormal range (units of 2^-24) and overflow at 65520
        for v in (2.0**-25, 2.0**-25 * 1.0000001, 3 * 2.0**-25, 2.0**-24, 2.0**-14, 2.0**-14 * 0.99, 65504.0,
                  65519.99, 65520.0, 65536.0):
            out.append(int(np.array([v], dtype=np.float32).view(np.uint32)[0]))
            out.append(int(np.array([-v], dtype=np.float32).view(np.uint32)[0]))
    seen, uniq = set(), []
    for b in out:
        if b not in seen:
            seen.add(b)
            uniq.append(b)
    return u32(*uniq)


def pairs(inputs: np.ndarray, codes: np.ndarray) -> list:
    return [[int(a), int(b)] for a, b in zip(inputs.tolist(), codes.tolist())]


def build() -> dict:
    codes8 = np.arange(256, dtype=np.uint8)
    codes16 = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    bf16_all = codes16.view(BF16).astype(np.float32)
    f16_all = codes16.view(np.float16).astype(np.float32)

    bf16_edges = {
        "+0": 0x0000, "-0": 0x8000, "min subnormal": 0x0001, "-min subnormal": 0x8001, "max subnormal": 0x007F,
        "min normal": 0x0080, "1": 0x3F80, "-2": 0xC000, "1 + ulp": 0x3F81, "pi": 0x4049, "max": 0x7F7F,
        "-max": 0xFF7F, "+inf": 0x7F80, "-inf": 0xFF80, "quiet NaN": 0x7FC0, "signalling NaN": 0x7F81,
        "-NaN": 0xFFFF,
    }
    f16_edges = {
        "+0": 0x0000, "-0": 0x8000, "min subnormal": 0x0001, "-min subnormal": 0x8001, "max subnormal": 0x03FF,
        "min normal": 0x0400, "1": 0x3C00, "-2": 0xC000, "1 + ulp": 0x3C01, "max": 0x7BFF, "-max": 0xFBFF,
        "+inf": 0x7C00, "-inf": 0xFC00, "quiet NaN": 0x7E00, "signalling NaN": 0x7C01, "-NaN": 0xFFFF,
    }

    sw = sweep_inputs()
    swf = sw.view(np.float32)
    enc = {}
    for kind, fn in (("bf16", enc_bf16), ("f16", enc_f16), ("fp8_e4m3fn", enc_fp8)):
        inputs = encode_cases("fp8" if kind == "fp8_e4m3fn" else kind)
        enc[kind] = pairs(inputs, fn(inputs.view(np.float32)))

    return {
        "generator": "tools/make_dtype_fixture.py",
        "ml_dtypes_version": ml_dtypes.__version__,
        "numpy_version": np.__version__,
        "fp8_e4m3fn_decode": [int(b) for b in f32_bits(codes8.view(FP8).astype(np.float32)).tolist()],
        "bf16_decode_edges": [[name, code, int(f32_bits(bf16_all[code:code + 1])[0])]
                              for name, code in bf16_edges.items()],
        "f16_decode_edges": [[name, code, int(f32_bits(f16_all[code:code + 1])[0])]
                             for name, code in f16_edges.items()],
        "bf16_encode": enc["bf16"],
        "f16_encode": enc["f16"],
        "fp8_e4m3fn_encode": enc["fp8_e4m3fn"],
        "sweeps": {
            "inputs": "k << 12 for k in [0, 2^20), then (i * 2654435761) mod 2^32 for i in [0, 2^17)",
            "count": int(sw.size),
            "bf16_decode": fnv1a_words(f32_bits(bf16_all)),
            "f16_decode": fnv1a_words(f32_bits(f16_all)),
            "bf16_encode": fnv1a_words(enc_bf16(swf)),
            "f16_encode": fnv1a_words(enc_f16(swf)),
            "fp8_e4m3fn_encode": fnv1a_words(enc_fp8(swf)),
        },
    }


def dump(v, ind=0) -> str:
    """Indented JSON whose innermost lists stay on one line."""
    pad = " " * ind
    if isinstance(v, dict):
        items = [f"{pad} {json.dumps(k)}: {dump(x, ind + 1)}" for k, x in v.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(v, list) and v and all(isinstance(x, list) for x in v):
        return "[\n" + ",\n".join(pad + " " + json.dumps(x) for x in v) + "\n" + pad + "]"
    return json.dumps(v)


def main(argv=None) -> int:
    np.seterr(all="ignore")  # NaN and overflow casts are the point here
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(dump(build()) + "\n")
    print(f"wrote {out} ({out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

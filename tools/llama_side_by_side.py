#!/usr/bin/env python3
"""Side-by-side speed of moeserve and llama.cpp on the same checkpoint, same thread count.

  llama_side_by_side.py [--bf16-model DIR] [--fp8-model DIR] [--threads N] [--rounds N]
                        [--precision exact,bf16] [--cache-dir DIR] [--python PY] [--check N] [--json-out FILE]

Steps, each skipped when its output is already in --cache-dir (default .cache/llama-side-by-side):

  1. fetch    `pip download --no-binary :all: --no-deps llama-cpp-python==VERSION`: the sdist vendors llama.cpp
              (sources, convert_hf_to_gguf.py, gguf-py) under vendor/llama.cpp.
  2. build    CMake + Ninja build of llama-bench only: CPU backend, -march=native, no web UI (the prebuilt UI
              download is turned off), no OpenSSL, no tests, examples or server.
  3. venv     a Python for the converter: --python PY if given (it needs torch, numpy, transformers,
              safetensors), else a venv in the cache with the sdist's converter requirements from PyPI.
  4. convert  each moeserve checkpoint folder to GGUF with the sdist's convert_hf_to_gguf.py:
              bf16 -> BF16 GGUF; fp8 (e4m3, 128x128 block scales) -> the converter dequantizes each block with its
              scale and stores those matrices as Q8_0 (--fp8-as-q8); the tensors the checkpoint keeps in bf16
              (embeddings, norms, router, output) stay BF16, as moeserve keeps them.
              The bench models have no tokenizer; the converter needs one, so the DeepSeek-V3 tokenizer
              (--tokenizer DIR) is cut to the model's vocabulary (ids < vocab_size, merges among kept tokens) and
              written beside links to the checkpoint's files. Cut, its output no longer has the fingerprint the
              converter recognises, so the converter runs with its pre-tokenizer named "deepseek-v3" explicitly.
  5. check   (--check N) N fixed token ids scored by `moeserve score` and by a small program the tool builds against
              the sdist's libllama; prints the largest and mean |difference| of log P(token | prefix).
  6. bench    ROUNDS rounds; in each, for each model, the engines run one after the other:
                moeserve bench MODEL --prompt-len P --decode-tokens D --threads T --precision X --json
                llama-bench -m GGUF -t T -r 1 -p P -n 0            (prefill P tokens)
                llama-bench -m GGUF -t T -r 1 -p 0 -n D -d P       (decode D tokens after P tokens of context)
              and prints prefill and decode tokens/s (median and best over rounds) and moeserve / llama.cpp.

Speeds on a shared machine swing with other load; llama.cpp's decode drops far more than moeserve's under it,
so compare the best as well as the median of the rounds.

Exit status: 0 when everything ran, 1 when a step failed (the failing command is printed), 2 on a usage error.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_VERSION = "0.3.36"
PRE_TOKENIZER = "deepseek-v3"
LLAMA_EXTRA: list = []  # --llama-bench-args

# Python packages the converter imports (the sdist's requirements name the same ones; its torch line points at an
# extra index, so the list is given here and installed from PyPI).
CONVERTER_PACKAGES = ["torch", "numpy", "transformers", "safetensors", "sentencepiece", "protobuf", "tqdm",
                      "pyyaml", "requests"]


class StepError(RuntimeError):
    pass


def log(msg: str) -> None:
    print(f"[side-by-side] {msg}", file=sys.stderr, flush=True)


def run(cmd: list, *, cwd: Path | None = None, env: dict | None = None, capture: bool = False,
        nice: int = 0) -> str:
    if nice:
        cmd = ["nice", "-n", str(nice)] + [str(c) for c in cmd]
    cmd = [str(c) for c in cmd]
    log("$ " + " ".join(cmd))
    res = subprocess.run(cmd, cwd=cwd, env=env, text=True,
                         stdout=subprocess.PIPE if capture else None,
                         stderr=subprocess.PIPE if capture else None)
    if res.returncode != 0:
        tail = ""
        if capture:
            tail = "\n" + "\n".join((res.stdout + res.stderr).strip().splitlines()[-20:])
        raise StepError(f"command failed with status {res.returncode}: {' '.join(cmd)}{tail}")
    return res.stdout if capture else ""


# --- 1. fetch ---------------------------------------------------------------------------------------------------

def fetch_sdist(cache: Path, version: str) -> Path:
    src = cache / f"llama_cpp_python-{version}"
    vendor = src / "vendor" / "llama.cpp"
    if (vendor / "CMakeLists.txt").is_file() and (vendor / "convert_hf_to_gguf.py").is_file():
        log(f"fetch: {src} is there")
        return vendor
    tarball = cache / f"llama_cpp_python-{version}.tar.gz"
    if not tarball.is_file():
        run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
             f"llama-cpp-python=={version}", "-d", cache])
    if not tarball.is_file():
        raise StepError(f"pip download did not leave {tarball}")
    log(f"fetch: unpacking {tarball.name}")
    with tarfile.open(tarball) as tf:
        try:
            tf.extractall(cache, filter="data")
        except TypeError:  # Python without extraction filters
            tf.extractall(cache)
    if not (vendor / "CMakeLists.txt").is_file():
        raise StepError(f"the sdist has no vendor/llama.cpp: {src}")
    return vendor


# --- 2. build ---------------------------------------------------------------------------------------------------

def build_llama_bench(cache: Path, vendor: Path, jobs: int) -> Path:
    bdir = cache / "llama-build"
    exe = bdir / "bin" / "llama-bench"
    if exe.is_file():
        log(f"build: {exe} is there")
        return exe
    cfg = ["cmake", "-S", vendor, "-B", bdir, "-DCMAKE_BUILD_TYPE=Release",
           "-DGGML_NATIVE=ON",                   # -march=native: the same ISA moeserve picks at run time
           "-DLLAMA_USE_PREBUILT_UI=OFF",        # the default downloads a prebuilt web UI at configure time
           "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_OPENSSL=OFF",
           "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
           "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_BUILD_TOOLS=ON"]
    if shutil.which("ninja"):
        cfg += ["-G", "Ninja"]
    if shutil.which("ccache"):
        cfg += ["-DCMAKE_C_COMPILER_LAUNCHER=ccache", "-DCMAKE_CXX_COMPILER_LAUNCHER=ccache"]
    if not (bdir / "CMakeCache.txt").is_file():
        run(cfg, nice=10)
    run(["cmake", "--build", bdir, "--target", "llama-bench", "-j", str(jobs)], nice=10)
    if not exe.is_file():
        raise StepError(f"the build did not produce {exe}")
    return exe


# --- 3. converter's Python --------------------------------------------------------------------------------------

def converter_python(cache: Path, given: str | None) -> str:
    if given:
        return given
    venv = cache / "venv"
    py = venv / "bin" / "python"
    stamp = venv / ".converter-packages"
    if py.is_file() and stamp.is_file():
        log(f"venv: {venv} is there")
        return str(py)
    if not py.is_file():
        run([sys.executable, "-m", "venv", venv])
    run([py, "-m", "pip", "install"] + CONVERTER_PACKAGES)
    stamp.write_text("\n".join(CONVERTER_PACKAGES) + "\n")
    return str(py)


# --- 4. convert -------------------------------------------------------------------------------------------------

def cut_tokenizer(src: Path, dst: Path, vocab_size: int) -> None:
    """Writes dst/tokenizer.json and tokenizer_config.json: the BPE tokenizer of src keeping ids < vocab_size."""
    tok = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    model = tok["model"]
    if model.get("type") != "BPE":
        raise StepError(f"{src}/tokenizer.json: expected a BPE model, found {model.get('type')!r}")
    vocab = {t: i for t, i in model["vocab"].items() if i < vocab_size}
    merges = []
    for m in model["merges"]:
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        if a in vocab and b in vocab and a + b in vocab:
            merges.append(m)
    model["vocab"] = vocab
    model["merges"] = merges
    tok["added_tokens"] = [a for a in tok.get("added_tokens", []) if a["id"] < vocab_size]
    (dst / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")

    cfg = {}
    if (src / "tokenizer_config.json").is_file():
        cfg = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
    if "added_tokens_decoder" in cfg:
        cfg["added_tokens_decoder"] = {k: v for k, v in cfg["added_tokens_decoder"].items() if int(k) < vocab_size}
    # The generic fast tokenizer loads tokenizer.json as it is (a model-specific class may rebuild parts of it).
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["model_max_length"] = cfg.get("model_max_length", 131072)
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False, indent=1), encoding="utf-8")
    log(f"tokenizer: {len(vocab)} tokens, {len(merges)} merges, {len(tok['added_tokens'])} added tokens")


def stage_model(cache: Path, name: str, model: Path, tokenizer: Path) -> Path:
    """A folder with links to the checkpoint's files and a tokenizer cut to its vocabulary."""
    stage = cache / "staged" / name
    stamp = stage / ".staged"
    if stamp.is_file():
        return stage
    stage.mkdir(parents=True, exist_ok=True)
    files = [p for p in model.iterdir() if p.suffix in (".json", ".safetensors") and not p.name.startswith("tokenizer")]
    if not any(p.suffix == ".safetensors" for p in files):
        raise StepError(f"{model}: no .safetensors files")
    for p in files:
        link = stage / p.name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(p.resolve())
    config = json.loads((model / "config.json").read_text())
    cut_tokenizer(tokenizer, stage, int(config["vocab_size"]))
    stamp.write_text(str(model.resolve()) + "\n")
    return stage


# Runs the sdist's converter with its BPE pre-tokenizer detection answering `PRE_TOKENIZER`.
CONVERT_WRAPPER = r"""
import sys
vendor, pre = sys.argv[1], sys.argv[2]
sys.argv = [vendor + "/convert_hf_to_gguf.py"] + sys.argv[3:]
sys.path.insert(0, vendor)
import convert_hf_to_gguf
from conversion import base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
convert_hf_to_gguf.main()
"""


def convert(cache: Path, vendor: Path, py: str, name: str, model: Path, kind: str, tokenizer: Path) -> Path:
    out = gguf_path(cache, name, kind)
    source = out.with_name(out.name + ".source")
    origin = source_id(model)
    if out.is_file() and source.is_file() and source.read_text() == origin:
        log(f"convert: {out} is there")
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    stage_dir = cache / "staged" / name
    if stage_dir.is_dir():
        shutil.rmtree(stage_dir)
    stage = stage_model(cache, name, model, tokenizer)
    tmp = out.with_suffix(".gguf.part")
    cmd = [py, "-c", CONVERT_WRAPPER, vendor, PRE_TOKENIZER, stage, "--outfile", tmp, "--outtype", "bf16"]
    if kind == "fp8":
        cmd.append("--fp8-as-q8")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    run(cmd, env=env, nice=10)
    tmp.rename(out)
    source.write_text(origin)
    return out


def gguf_path(cache: Path, name: str, kind: str) -> Path:
    return cache / "gguf" / (f"{name}-bf16.gguf" if kind == "bf16" else f"{name}-q8_0.gguf")


def source_id(model: Path) -> str:
    """The checkpoint a GGUF was made from: its folder and its files' sizes and times."""
    files = sorted(p for p in model.iterdir() if p.suffix in (".json", ".safetensors"))
    return json.dumps([str(model.resolve())] + [[p.name, p.stat().st_size, int(p.stat().st_mtime)] for p in files])


# --- 5. output check (optional, --check) ----------------------------------------------------------------------

# A small program against the built libllama: log P(ids[i] | ids[<i]) for every position of one id sequence, from
# one batch with every position's logits, printed in the JSON shape `moeserve score` prints.
SCORER_SOURCE = r"""
#include "llama.h"
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

static void quiet(ggml_log_level, const char *, void *) {}

int main(int argc, char ** argv) {
    if (argc != 4) { std::fprintf(stderr, "usage: %s MODEL.gguf THREADS ID,ID,...\n", argv[0]); return 2; }
    std::vector<llama_token> ids;
    for (const char * p = argv[3]; *p;) {
        char * end = nullptr;
        ids.push_back((llama_token) std::strtol(p, &end, 10));
        p = (*end == ',') ? end + 1 : end;
        if (end == p && *p) { std::fprintf(stderr, "bad id list\n"); return 2; }
    }
    llama_log_set(quiet, nullptr);
    llama_backend_init();
    llama_model_params mp = llama_model_default_params();
    llama_model * model = llama_model_load_from_file(argv[1], mp);
    if (!model) { std::fprintf(stderr, "cannot load %s\n", argv[1]); return 1; }
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = cp.n_batch = cp.n_ubatch = (uint32_t) ids.size() < 64 ? 64 : (uint32_t) ids.size();
    cp.n_threads = cp.n_threads_batch = std::atoi(argv[2]);
    llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) { std::fprintf(stderr, "cannot make a context\n"); return 1; }
    const int n = (int) ids.size();
    llama_batch batch = llama_batch_init(n, 0, 1);
    for (int i = 0; i < n; ++i) {
        batch.token[i] = ids[i]; batch.pos[i] = i; batch.n_seq_id[i] = 1; batch.seq_id[i][0] = 0; batch.logits[i] = 1;
    }
    batch.n_tokens = n;
    if (llama_decode(ctx, batch) != 0) { std::fprintf(stderr, "llama_decode failed\n"); return 1; }
    const int nv = llama_vocab_n_tokens(llama_model_get_vocab(model));
    std::string out = "{\"ids\": [";
    for (int i = 0; i < n; ++i) out += (i ? "," : "") + std::to_string(ids[i]);
    out += "], \"logprobs\": [null";
    for (int i = 1; i < n; ++i) {
        const float * lg = llama_get_logits_ith(ctx, i - 1);
        double mx = lg[0];
        for (int v = 1; v < nv; ++v) mx = lg[v] > mx ? lg[v] : mx;
        double sum = 0;
        for (int v = 0; v < nv; ++v) sum += std::exp((double) lg[v] - mx);
        char buf[64];
        std::snprintf(buf, sizeof buf, ", %.9g", (double) lg[ids[i]] - mx - std::log(sum));
        out += buf;
    }
    out += "]}";
    std::printf("%s\n", out.c_str());
    llama_batch_free(batch);
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
"""


def build_scorer(cache: Path, vendor: Path) -> Path:
    exe = cache / "llama-score"
    src = cache / "llama-score.cpp"
    if exe.is_file() and src.is_file() and src.read_text() == SCORER_SOURCE:
        return exe
    src.write_text(SCORER_SOURCE)
    lib = cache / "llama-build" / "bin"
    run(["c++", "-std=c++17", "-O2", "-I", vendor / "include", "-I", vendor / "ggml" / "include", src,
         "-o", exe, "-L", lib, "-lllama", "-lggml", "-lggml-base", f"-Wl,-rpath,{lib}"], nice=10)
    return exe


def check_ids(vocab: int, n: int, seed: int = 1) -> list:
    # A fixed pseudo-random sequence (LCG) so both engines score the same ids on every run.
    ids, x = [], seed
    for _ in range(n):
        x = (x * 6364136223846793005 + 1442695040888963407) % (1 << 64)
        ids.append(3 + (x >> 33) % (vocab - 3))
    return ids


def check_outputs(scorer: Path, moeserve: Path, model: Path, gguf: Path, threads: int, precisions: list,
                  n: int) -> list:
    vocab = int(json.loads((model / "config.json").read_text())["vocab_size"])
    ids = ",".join(str(i) for i in check_ids(vocab, n))
    theirs = json.loads(run([scorer, gguf, threads, ids], capture=True).strip().splitlines()[-1])["logprobs"][1:]
    rows = []
    for prec in precisions:
        out = run([moeserve, "score", model, "--ids", ids, "--threads", threads, "--precision", prec], capture=True)
        line = [ln for ln in out.splitlines() if ln.strip().startswith("{")][-1]
        ours = json.loads(line)["logprobs"][1:]
        diffs = [abs(a - b) for a, b in zip(ours, theirs)]
        rows.append({"precision": prec, "gguf": gguf.name, "tokens": n, "max_abs": max(diffs),
                     "mean_abs": sum(diffs) / len(diffs)})
    return rows


# --- 6. bench ----------------------------------------------------------------------------------------------------

def bench_moeserve(exe: Path, model: Path, args, precision: str) -> dict:
    out = run([exe, "bench", model, "--prompt-len", args.prompt_len, "--decode-tokens", args.decode_tokens,
               "--threads", args.threads, "--precision", precision, "--json"], capture=True)
    for line in reversed(out.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            j = json.loads(line)
            return {"prefill": float(j["prefill_tokens_per_s"]), "decode": float(j["decode_tokens_per_s"]),
                    "unit": j.get("unit")}
    raise StepError("moeserve bench printed no JSON line")


def llama_bench_once(exe: Path, gguf: Path, threads: int, extra: list) -> float:
    out = run([exe, "-m", gguf, "-t", threads, "-r", 1, "-o", "json"] + extra + LLAMA_EXTRA, capture=True)
    rows = json.loads(out[out.index("["):])
    if len(rows) != 1:
        raise StepError(f"llama-bench printed {len(rows)} results, expected 1")
    return float(rows[0]["avg_ts"])


def bench_llama(exe: Path, gguf: Path, args) -> dict:
    prefill = llama_bench_once(exe, gguf, args.threads, ["-p", args.prompt_len, "-n", 0])
    decode = llama_bench_once(exe, gguf, args.threads, ["-p", 0, "-n", args.decode_tokens, "-d", args.prompt_len])
    return {"prefill": prefill, "decode": decode}


def summarize(values: list) -> tuple:
    return statistics.median(values), max(values)


def default_model(name: str) -> Path:
    for root in (REPO, Path("/work/main")):
        if (root / "models" / name / "config.json").is_file():
            return root / "models" / name
    return REPO / "models" / name


def default_tokenizer() -> Path:
    for root in (REPO, REPO.parent, Path("/work")):
        d = root / "shared" / "data" / "deepseek-v3"
        if (d / "tokenizer.json").is_file():
            return d
    return REPO.parent / "shared" / "data" / "deepseek-v3"


def cpu_model() -> str:
    name, fam, mod = platform.processor() or "unknown", None, None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, val = line.partition(":")
            key, val = key.strip(), val.strip()
            if key == "model name":
                name = val
            elif key == "cpu family" and fam is None:
                fam = val
            elif key == "model" and mod is None:
                mod = val
            elif not key and name:
                break
    except OSError:
        pass
    return f"{name} (family {fam}, model {mod})" if fam else name


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bf16-model", type=Path, default=default_model("bench-bf16"),
                    help="bf16 checkpoint folder (moeserve init-model --preset bench --out DIR); '' to skip")
    ap.add_argument("--fp8-model", type=Path, default=default_model("bench-fp8"),
                    help="fp8 checkpoint folder (moeserve init-model --preset bench --dtype fp8 --out DIR); '' to skip")
    ap.add_argument("--tokenizer", type=Path, default=default_tokenizer(),
                    help="folder with the DeepSeek-V3 tokenizer.json and tokenizer_config.json "
                         "(default: shared/data/deepseek-v3 in or beside the repository)")
    ap.add_argument("--moeserve", type=Path, default=REPO / "build" / "moeserve")
    ap.add_argument("--cache-dir", type=Path, default=REPO / ".cache" / "llama-side-by-side")
    ap.add_argument("--version", default=DEFAULT_VERSION, help="llama-cpp-python sdist version")
    ap.add_argument("--python", help="Python with torch/numpy/transformers/safetensors for the converter "
                                     "(default: a venv in the cache, installed from PyPI)")
    ap.add_argument("--jobs", type=int, default=2, help="build jobs")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads for both engines")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--llama-bench-args", default="",
                    help="extra llama-bench arguments for every timing run, e.g. '-lm none' (default: its defaults)")
    ap.add_argument("--precision", default="exact,bf16", help="moeserve --precision values to run, comma-separated")
    ap.add_argument("--prepare-only", action="store_true", help="fetch, build and convert, then stop")
    ap.add_argument("--check", type=int, default=0, metavar="N",
                    help="before the timings, score N fixed token ids with both engines (llama.cpp through a small "
                         "program built against its libllama) and print the log-prob differences")
    ap.add_argument("--check-only", action="store_true", help="run the --check comparison and no timings")
    ap.add_argument("--json-out", type=Path, help="also write every measurement here")
    args = ap.parse_args()

    LLAMA_EXTRA[:] = args.llama_bench_args.split()
    models = []
    for kind, path in (("bf16", args.bf16_model), ("fp8", args.fp8_model)):
        if str(path) in ("", "."):
            continue
        if not (path / "config.json").is_file():
            print(f"error: {path} is not a checkpoint folder (no config.json); make one with "
                  f"moeserve init-model --preset bench{' --dtype fp8' if kind == 'fp8' else ''} --out {path}",
                  file=sys.stderr)
            return 2
        models.append((kind, path.resolve()))
    if not models:
        print("error: no model to run (--bf16-model and --fp8-model both empty)", file=sys.stderr)
        return 2
    precisions = [p for p in args.precision.split(",") if p]
    if any(p not in ("exact", "bf16") for p in precisions) or not precisions:
        print(f"error: --precision takes exact and/or bf16, got {args.precision!r}", file=sys.stderr)
        return 2
    if not args.prepare_only and not os.access(args.moeserve, os.X_OK):
        print(f"error: no moeserve binary at {args.moeserve} (build it: ninja -C build moeserve)", file=sys.stderr)
        return 2

    cache = args.cache_dir.resolve()
    cache.mkdir(parents=True, exist_ok=True)
    try:
        vendor = fetch_sdist(cache, args.version)
        llama_bench = build_llama_bench(cache, vendor, args.jobs)
        py = None
        ggufs = {}
        for kind, path in models:
            name = f"{path.name}"
            out = gguf_path(cache, name, kind)
            fresh = out.is_file() and out.with_name(out.name + ".source").is_file() and \
                out.with_name(out.name + ".source").read_text() == source_id(path)
            if not fresh and py is None:
                if not (args.tokenizer / "tokenizer.json").is_file():
                    raise StepError(f"no tokenizer.json in {args.tokenizer} (give --tokenizer DIR)")
                py = converter_python(cache, args.python)
            ggufs[kind] = convert(cache, vendor, py, name, path, kind, args.tokenizer)
        if args.prepare_only:
            return 0
        checks = []
        if args.check or args.check_only:
            scorer = build_scorer(cache, vendor)
            for kind, path in models:
                checks += [dict(model=kind, **row) for row in check_outputs(
                    scorer, args.moeserve, path, ggufs[kind], args.threads, precisions, args.check or 64)]
            print("log P(token | prefix), moeserve against llama.cpp on the same ids:")
            for c in checks:
                print(f"  {c['model']:<5} moeserve {c['precision']:<5} vs {c['gguf']}: max |diff| {c['max_abs']:.2e}, "
                      f"mean {c['mean_abs']:.2e} over {c['tokens'] - 1} positions")
            if args.check_only:
                return 0

        # results[(model kind, engine)] = list of {"prefill", "decode"}
        results: dict = {}
        for r in range(args.rounds):
            for kind, path in models:
                for prec in precisions:
                    log(f"round {r + 1}/{args.rounds}: moeserve {kind} --precision {prec}")
                    results.setdefault((kind, f"moeserve {prec}"), []).append(
                        bench_moeserve(args.moeserve, path, args, prec))
                log(f"round {r + 1}/{args.rounds}: llama.cpp {ggufs[kind].name}")
                results.setdefault((kind, "llama.cpp"), []).append(bench_llama(llama_bench, ggufs[kind], args))
    except StepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    print(f"CPU {cpu_model()}; {args.threads} threads for both engines; {args.rounds} alternating rounds; "
          f"prefill {args.prompt_len} tokens, decode {args.decode_tokens} tokens after {args.prompt_len}")
    print(f"llama.cpp from the llama-cpp-python {args.version} sdist; moeserve {args.moeserve}")
    hdr = (f"{'model':<6} {'engine':<18} {'prefill tok/s':>15} {'decode tok/s':>15} "
           f"{'prefill ratio':>15} {'decode ratio':>15}")
    print(hdr)
    print(f"{'':<6} {'':<18} {'median / best':>15} {'median / best':>15} {'median / best':>15} {'median / best':>15}")
    summary = []
    for kind, _ in models:
        ref = results[(kind, "llama.cpp")]
        ref_p, ref_d = summarize([x["prefill"] for x in ref]), summarize([x["decode"] for x in ref])
        engines = [f"moeserve {p}" for p in precisions] + ["llama.cpp"]
        for eng in engines:
            rows = results[(kind, eng)]
            p, d = summarize([x["prefill"] for x in rows]), summarize([x["decode"] for x in rows])
            label = eng if eng != "llama.cpp" else ("llama.cpp BF16" if kind == "bf16" else "llama.cpp Q8_0")
            if eng == "llama.cpp":
                rp = rd = ""
            else:
                rp = f"{p[0] / ref_p[0]:.2f}x / {p[1] / ref_p[1]:.2f}x"
                rd = f"{d[0] / ref_d[0]:.2f}x / {d[1] / ref_d[1]:.2f}x"
            print(f"{kind:<6} {label:<18} {p[0]:7.1f} / {p[1]:5.1f} {d[0]:7.2f} / {d[1]:5.2f} {rp:>15} {rd:>15}")
            summary.append({"model": kind, "engine": label, "runs": rows,
                            "prefill_median": p[0], "prefill_best": p[1],
                            "decode_median": d[0], "decode_best": d[1]})
    print("ratio = moeserve / llama.cpp (median over median, best over best)")
    if args.json_out:
        args.json_out.write_text(json.dumps({
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "cpu": cpu_model(), "threads": args.threads, "rounds": args.rounds, "prompt_len": args.prompt_len,
            "decode_tokens": args.decode_tokens, "llama_cpp_python": args.version,
            "ggufs": {k: str(v) for k, v in ggufs.items()}, "checks": checks, "results": summary}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

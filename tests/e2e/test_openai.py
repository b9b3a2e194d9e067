#!/usr/bin/env python3
"""End-to-end test of `moeserve serve` with the official `openai` Python client and with curl.

Starts the server on a free port against a random-weight demo model (made with
`moeserve init-model --preset demo` in a temporary folder, unless --model is given), then checks
chat and completions, streamed and not, stop strings, usage, logprobs, sampling controls, n > 1,
/tokenize, structured output and tool calls (validated with the `jsonschema` package), errors and
shutdown.

    python3 tests/e2e/test_openai.py --moeserve build/moeserve
    python3 tests/e2e/test_openai.py --moeserve build/moeserve --mpirun-np 2 \
        --serve-args "--prefill-ranks 1 --decode-ranks 1"

The moeserve binary may also come from $MOESERVE_BINARY. The script needs the `openai` package:
it runs under the first Python that has it among this one, $MOESERVE_E2E_PYTHON and the venv
$MOESERVE_E2E_VENV (default .venv-e2e at the top of the repository); when none has it, it prints
a line starting with SKIPPED and exits with status 77 (ctest's SKIP_RETURN_CODE).
"""

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mpi_jobs import rank0_pid  # noqa: E402

SKIP = 77
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def ensure_openai():
    """Re-executes under a Python that has `openai`, or exits with SKIP."""
    try:
        import openai  # noqa: F401
        return
    except ImportError:
        pass
    if os.environ.get("MOESERVE_E2E_REEXEC"):
        print("SKIPPED: the Python found has no `openai` package")
        sys.exit(SKIP)
    venv = os.environ.get("MOESERVE_E2E_VENV", os.path.join(REPO, ".venv-e2e"))
    for py in (os.environ.get("MOESERVE_E2E_PYTHON"), os.path.join(venv, "bin", "python")):
        if py and os.path.exists(py):
            env = dict(os.environ, MOESERVE_E2E_REEXEC="1")
            os.execve(py, [py] + sys.argv, env)
    print("SKIPPED: the `openai` Python package is not installed (create the venv with: "
          f"python3 -m venv {venv} && {venv}/bin/pip install openai)")
    sys.exit(SKIP)


class Server:
    """`moeserve serve` on 127.0.0.1 and a free port."""

    def __init__(self, binary, model, api_key, np=0, extra=()):
        cmd = [binary, "serve", "--model", model, "--port", "0", "--api-key", api_key,
               "--served-model-name", "demo", "--max-model-len", "512", "--kv-cache-mb", "64"]
        cmd += list(extra)
        env = dict(os.environ)
        self.np = np
        if np:  # under mpirun: rank 0 serves HTTP
            env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
            env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
            cmd = ["mpirun", "--oversubscribe", "-np", str(np)] + cmd
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env)
        # stderr carries a line per request: read it as it comes, so the pipe never fills.
        self.err = []
        self.err_reader = threading.Thread(target=lambda: self.err.extend(self.proc.stderr),
                                           daemon=True)
        self.err_reader.start()
        line = self.proc.stdout.readline()
        m = re.search(r"at (http://\S+)", line)
        if not m:
            self.proc.kill()
            self.proc.wait()
            self.err_reader.join(10)
            raise RuntimeError("server did not start: " + line + "".join(self.err))
        self.url = m.group(1)
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError("server not healthy")
            time.sleep(0.1)

    def stop(self):
        """SIGINT (to rank 0 under mpirun); returns (exit status, stderr)."""
        if self.proc.poll() is None:
            os.kill(rank0_pid(self.proc.pid) if self.np else self.proc.pid, signal.SIGINT)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.err_reader.join(10)
        return self.proc.returncode, "".join(self.err)


def main():
    ensure_openai()
    import openai

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--moeserve", default=os.environ.get("MOESERVE_BINARY"),
                    help="the moeserve binary (default: $MOESERVE_BINARY)")
    ap.add_argument("--model", help="model folder (default: a fresh random demo model)")
    ap.add_argument("--mpirun-np", type=int, default=0,
                    help="serve under `mpirun -np N` (default: one process)")
    ap.add_argument("--serve-args", default="",
                    help="more `moeserve serve` flags, e.g. '--prefill-ranks 1 --decode-ranks 1'")
    args = ap.parse_args()
    if not args.moeserve or not os.path.exists(args.moeserve):
        print("error: give the moeserve binary with --moeserve or $MOESERVE_BINARY")
        return 2

    tmp = tempfile.mkdtemp(prefix="moeserve-e2e-")
    model = args.model
    if not model:
        model = os.path.join(tmp, "demo")
        subprocess.run([args.moeserve, "init-model", "--preset", "demo", "--out", model],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    key = "e2e-secret"
    server = Server(args.moeserve, model, key, args.mpirun_np, args.serve_args.split())
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=120)
    failures = []

    def check(name, fn):
        try:
            fn()
            print(f"PASS {name}")
        except Exception:  # noqa: BLE001 - report every failure, keep going
            failures.append(name)
            print(f"FAIL {name}\n{traceback.format_exc()}")

    chat_msgs = [{"role": "system", "content": "You are terse."},
                 {"role": "user", "content": "Name three colours."}]

    def models():
        ms = client.models.list()
        assert [m.id for m in ms.data] == ["demo"], ms

    def chat():
        r = client.chat.completions.create(model="demo", messages=chat_msgs, max_tokens=12,
                                           temperature=0)
        c = r.choices[0]
        assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
        assert c.message.role == "assistant" and isinstance(c.message.content, str)
        assert c.finish_reason in ("stop", "length")
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        assert r.usage.completion_tokens <= 12

        s = client.chat.completions.create(model="demo", messages=chat_msgs, max_tokens=12,
                                           temperature=0, stream=True,
                                           stream_options={"include_usage": True})
        text, reason, usage = "", None, None
        for chunk in s:
            if chunk.usage:
                usage = chunk.usage
            for ch in chunk.choices:
                text += ch.delta.content or ""
                reason = ch.finish_reason or reason
        assert text == c.message.content, (text, c.message.content)
        assert reason == c.finish_reason
        assert usage.completion_tokens == r.usage.completion_tokens
        assert usage.prompt_tokens == r.usage.prompt_tokens

    def completions():
        r = client.completions.create(model="demo", prompt="The weather today is", max_tokens=10,
                                      temperature=0, extra_body={"ignore_eos": True})
        assert r.object == "text_completion"
        assert r.choices[0].finish_reason == "length"
        assert r.usage.completion_tokens == 10
        s = client.completions.create(model="demo", prompt="The weather today is", max_tokens=10,
                                      temperature=0, stream=True, extra_body={"ignore_eos": True})
        text = "".join(ch.choices[0].text for ch in s if ch.choices)
        assert text == r.choices[0].text

    def stop_strings():
        base = client.completions.create(model="demo", prompt="Once upon a time", max_tokens=20,
                                         temperature=0, logprobs=0,
                                         extra_body={"ignore_eos": True})
        text = base.choices[0].text
        off = base.choices[0].logprobs.text_offset
        stop = text[off[3]:off[5]]  # two tokens' worth, across a token boundary
        assert stop, text
        want = text[:text.find(stop)]
        r = client.completions.create(model="demo", prompt="Once upon a time", max_tokens=20,
                                      temperature=0, stop=[stop, "zzzz-never"],
                                      extra_body={"ignore_eos": True})
        assert r.choices[0].text == want, (r.choices[0].text, want, stop)
        assert r.choices[0].finish_reason == "stop"
        s = client.completions.create(model="demo", prompt="Once upon a time", max_tokens=20,
                                      temperature=0, stop=stop, stream=True,
                                      extra_body={"ignore_eos": True})
        chunks = [ch for ch in s]
        streamed = "".join(ch.choices[0].text for ch in chunks if ch.choices)
        assert streamed == want and stop not in streamed
        assert chunks[-1].choices[0].finish_reason == "stop"

    def logprobs():
        r = client.chat.completions.create(model="demo", messages=chat_msgs, max_tokens=5,
                                           temperature=0, logprobs=True, top_logprobs=2)
        content = r.choices[0].logprobs.content
        assert len(content) == r.usage.completion_tokens
        for t in content:
            assert t.logprob <= 0 and len(t.top_logprobs) == 2
            assert t.top_logprobs[0].token == t.token
        c = client.completions.create(model="demo", prompt="Hi", max_tokens=5, temperature=0,
                                      logprobs=3, extra_body={"ignore_eos": True})
        lp = c.choices[0].logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == 5
        assert all(len(t) >= 3 for t in lp.top_logprobs)

    def errors():
        def expect(exc, status, **kw):
            try:
                client.chat.completions.create(**{"model": "demo", "messages": chat_msgs,
                                                  "max_tokens": 2, **kw})
            except exc as e:
                assert e.status_code == status, e
                assert e.body and "message" in e.body, e.body
                return
            raise AssertionError(f"no {exc.__name__} for {kw}")

        expect(openai.BadRequestError, 400, n=0)
        expect(openai.BadRequestError, 400, presence_penalty=3)
        expect(openai.BadRequestError, 400, logit_bias={"abc": 1})
        expect(openai.BadRequestError, 400, logit_bias={"5": 101})
        expect(openai.BadRequestError, 400, extra_body={"repetition_penalty": 0})
        expect(openai.BadRequestError, 400, extra_body={"min_tokens": 5})  # over max_tokens
        expect(openai.BadRequestError, 400, model="no-such-model")
        expect(openai.BadRequestError, 400, messages=[])
        expect(openai.BadRequestError, 400, messages=[{"role": "alien", "content": "x"}])
        expect(openai.BadRequestError, 400, max_tokens=0)
        expect(openai.BadRequestError, 400, max_tokens=100000)  # over --max-model-len
        expect(openai.BadRequestError, 400, temperature="warm")
        bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
        try:
            bad.models.list()
            raise AssertionError("no AuthenticationError")
        except openai.AuthenticationError as e:
            assert e.status_code == 401
        try:
            client.get("/nothing-here", cast_to=object)
            raise AssertionError("no NotFoundError")
        except openai.NotFoundError as e:
            assert e.status_code == 404

    def raw_post(path, body):
        req = urllib.request.Request(server.url + path, data=json.dumps(body).encode(),
                                     headers={"Authorization": f"Bearer {key}",
                                              "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())

    def tokenize():
        t = raw_post("/tokenize", {"model": "demo", "prompt": " hello world",
                                   "add_special_tokens": False})
        assert t["count"] == len(t["tokens"]) == 2 and t["max_model_len"] == 512, t
        d = raw_post("/detokenize", {"model": "demo", "tokens": t["tokens"]})
        assert d["prompt"] == " hello world", d
        c = raw_post("/tokenize", {"model": "demo", "messages": chat_msgs})
        r = client.chat.completions.create(model="demo", messages=chat_msgs, max_tokens=1)
        assert c["count"] == r.usage.prompt_tokens, (c, r.usage)

    def sampling_controls():
        hello, world = raw_post("/tokenize", {"prompt": " hello world",
                                              "add_special_tokens": False})["tokens"]
        eos = raw_post("/tokenize", {"prompt": "<｜end▁of▁sentence｜>",
                                     "add_special_tokens": False})["tokens"][0]
        # logit_bias forces a token, greedy and sampled, streamed and not.
        for temp in (0, 1.2):
            r = client.chat.completions.create(model="demo", messages=chat_msgs, max_tokens=4,
                                               temperature=temp, seed=1,
                                               logit_bias={str(hello): 100})
            assert r.choices[0].message.content == " hello" * 4, r
        s = client.chat.completions.create(model="demo", messages=chat_msgs, max_tokens=4,
                                           temperature=0, stream=True,
                                           logit_bias={str(hello): -100, str(world): 100})
        assert "".join(c.choices[0].delta.content or "" for c in s if c.choices) == " world" * 4
        # Penalties act on repeats: with a bias of 10 the token repeats; repetition_penalty
        # divides its logit once it occurred, frequency_penalty takes 2 per occurrence.
        base = dict(model="demo", prompt="Say:", max_tokens=10, temperature=0,
                    logit_bias={str(hello): 10})
        r = client.completions.create(**base, extra_body={"ignore_eos": True})
        assert r.choices[0].text.count(" hello") == 10, r.choices[0].text
        r = client.completions.create(**base, extra_body={"ignore_eos": True,
                                                          "repetition_penalty": 1000})
        assert r.choices[0].text.count(" hello") == 1, r.choices[0].text
        r = client.completions.create(**base, frequency_penalty=2, presence_penalty=0.5,
                                      extra_body={"ignore_eos": True})
        assert 1 <= r.choices[0].text.count(" hello") <= 5, r.choices[0].text
        # min_tokens holds off the end token, which the bias otherwise picks at once.
        r = client.completions.create(model="demo", prompt="Hi", max_tokens=10, temperature=0,
                                      logit_bias={str(eos): 100})
        assert r.usage.completion_tokens == 1 and r.choices[0].finish_reason == "stop"
        r = client.completions.create(model="demo", prompt="Hi", max_tokens=10, temperature=0,
                                      logit_bias={str(eos): 100}, extra_body={"min_tokens": 4})
        assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "stop", r.usage
        # Seeded sampling with every control reproduces.
        kw = dict(model="demo", messages=chat_msgs, max_tokens=8, temperature=1.0, seed=42,
                  frequency_penalty=0.5, presence_penalty=0.5, logit_bias={str(world): 2},
                  extra_body={"repetition_penalty": 1.1, "min_tokens": 2})
        a = client.chat.completions.create(**kw)
        b = client.chat.completions.create(**kw)
        assert a.choices[0].message.content == b.choices[0].message.content

    def n_choices():
        kw = dict(model="demo", messages=chat_msgs, max_tokens=5, temperature=1.0, seed=7, n=3,
                  extra_body={"ignore_eos": True})
        r = client.chat.completions.create(**kw)
        assert [c.index for c in r.choices] == [0, 1, 2], r
        texts = [c.message.content for c in r.choices]
        assert len(set(texts)) == 3, texts
        assert r.usage.completion_tokens == 15, r.usage
        got, done = ["", "", ""], [None] * 3
        for chunk in client.chat.completions.create(**kw, stream=True):
            for ch in chunk.choices:
                got[ch.index] += ch.delta.content or ""
                done[ch.index] = ch.finish_reason or done[ch.index]
        assert got == texts and done == ["length"] * 3, (got, texts, done)
        one = client.chat.completions.create(**{**kw, "n": 1, "seed": 9})
        assert one.choices[0].message.content == texts[2]  # choice i is seeded seed + i
        c = client.completions.create(model="demo", prompt="Once", max_tokens=4, n=2,
                                      temperature=0, extra_body={"ignore_eos": True})
        assert len(c.choices) == 2 and c.choices[0].text == c.choices[1].text
        s = client.completions.create(model="demo", prompt="Once", max_tokens=4, n=2,
                                      temperature=0, stream=True, extra_body={"ignore_eos": True})
        parts = ["", ""]
        for chunk in s:
            for ch in chunk.choices:
                parts[ch.index] += ch.text
        assert parts == [c.choices[0].text] * 2, parts

    def structured_output():
        import jsonschema  # scripts/test.sh installs it into the venv with openai
        schemas = [
            {"type": "object", "properties": {
                "name": {"type": "string", "maxLength": 10}, "age": {"type": "integer"},
                "ok": {"type": "boolean"}},
             "required": ["name", "age", "ok"], "additionalProperties": False},
            {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 5},
            {"enum": ["red", "green", "blue", 7, None]},
            {"type": "object", "properties": {
                "id": {"type": "string", "minLength": 2, "maxLength": 6},
                "score": {"type": "number"},
                "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
                "note": {"type": ["string", "null"], "maxLength": 5}},
             "required": ["id", "score", "tags", "note"], "additionalProperties": False},
            {"anyOf": [{"type": "integer"},
                       {"type": "object", "properties": {"k": {"const": "v"}},
                        "required": ["k"]}]},
            {"$defs": {"pt": {"type": "object", "properties": {
                "x": {"type": "integer"}, "y": {"type": "integer"}},
                "required": ["x", "y"], "additionalProperties": False}},
             "type": "object", "properties": {
                 "points": {"type": "array", "items": {"$ref": "#/$defs/pt"}, "maxItems": 3},
                 "closed": {"type": "boolean"}},
             "required": ["points", "closed"], "additionalProperties": False},
            {"type": "object", "properties": {
                "user": {"type": "object", "properties": {
                    "first": {"type": "string", "maxLength": 8},
                    "langs": {"type": "array", "items": {"type": "string", "maxLength": 3},
                              "minItems": 1, "maxItems": 2}},
                    "required": ["first", "langs"], "additionalProperties": False},
                "active": {"type": "boolean"}},
             "required": ["user", "active"], "additionalProperties": False},
            {"type": "number"},
        ]
        for i, schema in enumerate(schemas):
            rf = {"type": "json_schema",
                  "json_schema": {"name": f"s{i}", "schema": schema, "strict": True}}
            for seed in range(3):
                kw = dict(model="demo", messages=[{"role": "user", "content": "JSON please"}],
                          max_tokens=150, temperature=0 if seed == 0 else 1.0, seed=seed,
                          response_format=rf)
                r = client.chat.completions.create(**kw)
                out = r.choices[0].message.content
                assert r.choices[0].finish_reason == "stop", (schema, out)
                jsonschema.validate(json.loads(out), schema)
                if seed == 1:  # streamed: the same text
                    text = "".join(c.choices[0].delta.content or ""
                                   for c in client.chat.completions.create(**kw, stream=True)
                                   if c.choices)
                    assert text == out, (text, out)
        # Completions, n = 2, seeded choices each valid.
        r = client.completions.create(model="demo", prompt="JSON:", max_tokens=150, n=2,
                                      temperature=1.0, seed=3,
                                      extra_body={"response_format": {
                                          "type": "json_schema",
                                          "json_schema": {"name": "p", "schema": schemas[0]}}})
        for c in r.choices:
            jsonschema.validate(json.loads(c.text), schemas[0])
        # json_object: any object. Its strings have no bound, so a random model may write one
        # past any budget: an output that ends must be an object; with the token "{}" favoured
        # by logit_bias every output is that object.
        close = raw_post("/tokenize", {"prompt": "{}", "add_special_tokens": False})["tokens"]
        assert len(close) == 1, close
        for seed in range(3):
            for bias in ({}, {str(close[0]): 30}):
                r = client.chat.completions.create(model="demo", messages=chat_msgs,
                                                   max_tokens=60, temperature=1.0, seed=seed,
                                                   logit_bias=bias,
                                                   response_format={"type": "json_object"})
                out = r.choices[0].message.content
                assert out.startswith("{"), out
                if bias:
                    assert r.choices[0].finish_reason == "stop" and out == "{}", out
                if r.choices[0].finish_reason == "stop":
                    assert isinstance(json.loads(out), dict), out
        # Unsupported keywords are refused by name.
        try:
            client.chat.completions.create(
                model="demo", messages=chat_msgs, max_tokens=5,
                response_format={"type": "json_schema", "json_schema": {
                    "name": "x", "schema": {"type": "string", "pattern": "a+"}}})
            raise AssertionError("no 400 for 'pattern'")
        except openai.BadRequestError as e:
            assert "pattern" in str(e), e

    def tool_calls():
        import jsonschema
        weather = {"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 12},
            "unit": {"enum": ["celsius", "fahrenheit"]}, "days": {"type": "integer"}},
            "required": ["city", "unit", "days"], "additionalProperties": False}
        clock = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
                 "required": ["zone"]}
        tools = [{"type": "function", "function": {"name": "get_weather",
                                                   "description": "Weather of a city",
                                                   "parameters": weather}},
                 {"type": "function", "function": {"name": "get_time", "parameters": clock}}]
        schemas = {"get_weather": weather, "get_time": clock}
        msgs = [{"role": "user", "content": "Weather in Paris?"}]
        for seed, choice in enumerate(["required", "required",
                                       {"type": "function", "function": {"name": "get_time"}},
                                       {"type": "function", "function": {"name": "get_weather"}}]):
            kw = dict(model="demo", messages=msgs, tools=tools, tool_choice=choice,
                      max_tokens=100, temperature=0 if seed == 0 else 1.0, seed=seed)
            r = client.chat.completions.create(**kw)
            c = r.choices[0]
            assert c.finish_reason == "tool_calls", r
            assert len(c.message.tool_calls) == 1 and c.message.content is None, r
            call = c.message.tool_calls[0]
            assert call.type == "function" and call.id.startswith("call_")
            if isinstance(choice, dict):
                assert call.function.name == choice["function"]["name"]
            jsonschema.validate(json.loads(call.function.arguments),
                                schemas[call.function.name])
            # Streamed as OpenAI streams calls: the id and name first, then the arguments.
            name, args, ids, finish = "", "", set(), None
            for chunk in client.chat.completions.create(**kw, stream=True):
                for ch in chunk.choices:
                    for t in ch.delta.tool_calls or []:
                        assert t.index == 0
                        if t.id:
                            ids.add(t.id)
                        if t.function.name:
                            name += t.function.name
                        args += t.function.arguments or ""
                    finish = ch.finish_reason or finish
            assert (name, args) == (call.function.name, call.function.arguments), (name, args)
            assert len(ids) == 1 and finish == "tool_calls"
        # The result goes back as a tool message and renders as the template has it: the
        # prompt is the conversation /tokenize renders, and it gets an answer.
        back = msgs + [{"role": "assistant", "content": None,
                        "tool_calls": [{"id": call.id, "type": "function",
                                        "function": {"name": call.function.name,
                                                     "arguments": call.function.arguments}}]},
                       {"role": "tool", "tool_call_id": call.id, "content": "{\"temp\": 21}"}]
        r = client.chat.completions.create(model="demo", messages=back, tools=tools,
                                           max_tokens=5, temperature=0)
        t = raw_post("/tokenize", {"model": "demo", "messages": back})
        assert r.usage.prompt_tokens == t["count"], (r.usage, t["count"])
        d = raw_post("/detokenize", {"model": "demo", "tokens": t["tokens"]})
        assert d["prompt"].endswith(call.function.arguments + "\n```<｜tool▁call▁end｜>"
                                    "<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>{\"temp\": 21}"
                                    "<｜tool▁output▁end｜><｜tool▁outputs▁end｜>"), d["prompt"]
        # tool_choice none: plain text, no calls.
        r = client.chat.completions.create(model="demo", messages=msgs, tools=tools,
                                           tool_choice="none", max_tokens=4, temperature=0)
        assert not r.choices[0].message.tool_calls and r.choices[0].finish_reason != "tool_calls"
        try:
            client.chat.completions.create(
                model="demo", messages=msgs, tools=tools, max_tokens=4,
                tool_choice={"type": "function", "function": {"name": "nope"}})
            raise AssertionError("no 400 for an unknown function")
        except openai.BadRequestError as e:
            assert e.status_code == 400

    def curl():
        if not shutil.which("curl"):
            print("  (curl not found; skipped)")
            return
        auth = ["-H", f"Authorization: Bearer {key}", "-H", "Content-Type: application/json"]
        body = json.dumps({"model": "demo", "messages": chat_msgs, "max_tokens": 4,
                           "temperature": 0, "stream": True})
        out = subprocess.run(["curl", "-sN", *auth, "-d", body, server.url + "/v1/chat/completions"],
                             capture_output=True, text=True, check=True).stdout
        events = [e for e in out.split("\n\n") if e]
        assert all(e.startswith("data: ") for e in events), out
        assert events[-1] == "data: [DONE]", out
        first = json.loads(events[0][6:])
        assert first["object"] == "chat.completion.chunk"
        assert first["choices"][0]["delta"]["role"] == "assistant"
        code = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                               server.url + "/v1/models"], capture_output=True, text=True).stdout
        assert code == "401", code
        code = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                               server.url + "/health"], capture_output=True, text=True).stdout
        assert code == "200", code
        metrics = subprocess.run(["curl", "-s", *auth, server.url + "/metrics"],
                                 capture_output=True, text=True).stdout
        for name in ("moeserve_requests_total", "moeserve_time_to_first_token_seconds_bucket",
                     "moeserve_kv_blocks_free", "moeserve_expert_routed_tokens_total"):
            assert name in metrics, name
        used = re.search(r"^moeserve_kv_blocks_used (\S+)$", metrics, re.M)
        assert used and float(used.group(1)) == 0, used

    try:
        for name, fn in [("models", models), ("chat", chat), ("completions", completions),
                         ("stop strings", stop_strings), ("logprobs", logprobs),
                         ("errors", errors), ("tokenize", tokenize),
                         ("sampling controls", sampling_controls), ("n choices", n_choices),
                         ("structured output", structured_output), ("tool calls", tool_calls),
                         ("curl", curl)]:
            check(name, fn)
    finally:
        status, err = server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    if status != 0 or "stopped" not in err:
        failures.append("shutdown")
        print(f"FAIL shutdown: exit status {status}\n{err}")
    else:
        print("PASS shutdown on SIGINT")
    print(f"{'FAILED' if failures else 'OK'}: {len(failures)} of 13 checks failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

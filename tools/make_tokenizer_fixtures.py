#!/usr/bin/env python3
"""Writes the reference fixtures for tests/tokenizer from the Hugging Face implementations.

Tokenizer fixtures come from the `tokenizers` package, chat-template fixtures from `jinja2`
configured as transformers' apply_chat_template configures it. The C++ tests read only the JSON
written here, so they need no Python.

  python3 -m venv /work/venv-tok && /work/venv-tok/bin/pip install tokenizers jinja2
  /work/venv-tok/bin/python tools/make_tokenizer_fixtures.py
"""
import json
import os
import random
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.path.join(ROOT, "assets")
OUT = os.path.join(ROOT, "tests", "fixtures", "tokenizer")


# ---------------------------------------------------------------------------------------------
# Corpus
# ---------------------------------------------------------------------------------------------

SPECIALS = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>",
            "<｜tool▁calls▁begin｜>", "<｜tool▁sep｜>", "<|EOT|>", "<｜place▁holder▁no▁7｜>",
            "<｜fim▁hole｜>", "<think>", "</think>"]


def handwritten():
    return [
        "", " ", "  ", "\n", "\t", "a", "Hello world", "Hello, world! How are you?",
        "The quick brown fox jumps over the lazy dog.",
        "I'm sure they'll say it's what we'd've done. DON'T SHOUT", "  leading and trailing  ",
        "multiple   spaces\t\ttabs\n\n\nnewlines\r\n\r\ncrlf \n \n", "\n\n\n", " \n",
        "12345678901234567890", "3.14159 1,000,000 -42 +7 0x1F 1e-9 ٣٤٥ ۱۲۳ १२३ ①②③",
        "9" * 1000, "123abc456def7890", "你好，世界！这是一个测试。", "中文English混合mixed文本",
        "日本語のテキストです。カタカナとひらがな、漢字。ｶﾀｶﾅ", "한국어 텍스트입니다. 안녕하세요!",
        "Привет, мир! Ελληνικά. Ünïcödé façade naïve café",
        "مرحبا بالعالم. שלום עולם", "हिन्दी पाठ। தமிழ் ไทย", "e\u0301 a\u0308o\u0303 \u0301x",
        "😀😃😄 👨‍👩‍👧‍👦 👍🏽 🇫🇷🇯🇵 🏳️‍🌈 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𠀀𠀁 \U0001F600x",
        "def f(x):\n    return x ** 2  # square\n\nif __name__ == '__main__':\n\tprint(f(3))\n",
        "#include <stdio.h>\nint main(void) { printf(\"%d\\n\", a[i++]); return 0; }\n",
        "<div class=\"x\">&nbsp;&lt;tag&gt;</div> <br/> <!-- comment -->",
        '{"key": [1, 2.5, null, true], "nested": {"a": "b"}}', "$ ls -la | grep '^d' > out.txt",
        "https://example.com/path?query=1&x=y#frag user@example.org",
        "<｜User｜>Hello<｜Assistant｜>Hi there<｜end▁of▁sentence｜>",
        "<｜begin▁of▁sentence｜><｜begin▁of▁sentence｜>x<｜end▁of▁sentence｜>",
        "<｜User｜<｜User｜><|EOT|><|EOT|> <｜Use r｜> <｜user｜> ｜> <｜",
        "<think>\nreasoning\n</think>\n\nanswer", "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function"
        "<｜tool▁sep｜>get_weather\n```json\n{\"city\": \"Paris\"}\n```<｜tool▁call▁end｜>",
        "<｜place▁holder▁no▁0｜><｜place▁holder▁no▁799｜><｜place▁holder▁no▁800｜>",
        "\u00a0non\u00a0breaking\u3000ideographic\u2028line\u2029para\x85nel\x0bvt\x0cff",
        "\x00\x01\x1f\x7f control", "a" * 3000, " " * 500 + "x", "\n" * 300, "\t \t \n" * 50,
        "!!!???...,,,;;;", "'''\"\"\"```~~~", "Mr. O'Neil's 'quoted' \"text\"", "ＡＢＣ全角１２３",
        "𝐀𝐁𝐂 𝟏𝟐𝟑", "ﬁ ﬂ ﬀ Ⅻ ½ ² ³", "\ufeffBOM", "\ue000\uf8ff private \U000F0000",
        "٠١٢٣٤٥٦٧٨٩" * 5, "🙂" * 100, "中" * 500, "ok\r\n" * 20 + "end",
    ]


def random_texts(rng, n):
    pools = [
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", "0123456789",
        "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~", " \t\n\r\x0b\x0c\x85\xa0\u3000\u2028",
        "你好世界中文字测试龥一", "ぁあいうえおアイウエオヴーｱ", "한국어가각힣", "абвгдЖЗИ", "αβγΩ",
        "\u0301\u0308\u0903\u093f\u200d\ufe0f", "😀👍🏽🇫🇷👨𝔘𠀀🀄", "€£¥©®™°±§¶", "٣۱१①½",
        "\ue000\U000F0000\ufffd\u2060", "｜▁<>",
    ]
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randrange(0, 40)):
            r = rng.random()
            if r < 0.06:
                parts.append(rng.choice(SPECIALS))
            elif r < 0.12:
                parts.append(rng.choice(["'s", "'ll", " '", "''", "\r\n", "  ", "...", "$1"]))
            else:
                parts.append(rng.choice(rng.choice(pools)))
        out.append("".join(parts))
    return out


SWEEP_CHUNK = 256
# (first, end, step): every code point of planes 0-1 and tags, samples of the rest.
SWEEP_RANGES = [(0, 0x20000, 1), (0x20000, 0x40000, 7), (0x40000, 0xE0000, 251),
                (0xE0000, 0xE1000, 1), (0xF0000, 0x110000, 509)]


def sweep_text(start, stop, step):
    """Each code point in a few contexts; tests/tokenizer builds the same text."""
    parts = []
    for cp in range(start, stop, step):
        if 0xD800 <= cp <= 0xDFFF:
            continue
        c = chr(cp)
        parts.append(c + "a " + c + c + "1'" + c + "\t" + c + " \n")
    return "".join(parts)



def load_hf_tokenizer(model_dir):
    from tokenizers import Tokenizer
    from tokenizers.processors import TemplateProcessing

    plain = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    cfg = json.load(open(os.path.join(model_dir, "tokenizer_config.json"), encoding="utf-8"))
    bos = cfg["bos_token"]["content"] if isinstance(cfg["bos_token"], dict) else cfg["bos_token"]
    # transformers' LlamaTokenizerFast (DeepSeek's tokenizer_class) installs this post-processor
    # when add_bos_token is true; the tokenizers package alone would not add BOS.
    with_bos = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    with_bos.post_processor = TemplateProcessing(
        single=f"{bos}:0 $A:0", special_tokens=[(bos, plain.token_to_id(bos))])
    no_special = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    no_special.encode_special_tokens = True
    return plain, with_bos, no_special


def fnv1a_ids(ids):
    h = 0xCBF29CE484222325
    for i in ids:
        for k in range(4):
            h ^= (i >> (8 * k)) & 0xFF
            h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def write(name, obj):
    path = os.path.join(OUT, name)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=None, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {path} ({os.path.getsize(path)} bytes)")


def tokenizer_fixtures():
    plain, with_bos, no_special = load_hf_tokenizer(os.path.join(ASSETS, "deepseek-v3"))
    cases = []
    for text in handwritten() + random_texts(random.Random(1234), 400):
        ids = plain.encode(text, add_special_tokens=False).ids
        cases.append({
            "text": text,
            "ids": ids,
            "ids_bos": with_bos.encode(text, add_special_tokens=True).ids,
            "ids_no_special": no_special.encode(text, add_special_tokens=False).ids,
            "decode": plain.decode(ids, skip_special_tokens=False),
            "decode_skip": plain.decode(ids, skip_special_tokens=True),
        })
    write("encode_deepseek_v3.json", cases)

    # Every code point (sampled in the sparse planes) in a few contexts, checked by hash.
    sweeps = []
    for lo, hi, step in SWEEP_RANGES:
        for start in range(lo, hi, SWEEP_CHUNK * step):
            stop = min(hi, start + SWEEP_CHUNK * step)
            text = sweep_text(start, stop, step)
            sweeps.append({"start": start, "stop": stop, "step": step,
                           "hash": fnv1a_ids(plain.encode(text, add_special_tokens=False).ids)})
    write("sweep_deepseek_v3.json", {"chunk": SWEEP_CHUNK, "chunks": sweeps})

    # Decoding of arbitrary id sequences: partial UTF-8, special ids, ids with no token.
    rng = random.Random(99)
    vocab = plain.get_vocab_size(with_added_tokens=True)
    dec = []
    for n in range(300):
        ids = [rng.choice([rng.randrange(0, 128000), rng.randrange(0, 300),
                           rng.randrange(128000, 128815), rng.randrange(0, vocab + 500)])
               for _ in range(rng.randrange(0, 12))]
        dec.append({"ids": ids, "text": plain.decode(ids, skip_special_tokens=False),
                    "text_skip": plain.decode(ids, skip_special_tokens=True)})
    write("decode_deepseek_v3.json", dec)


def synthetic_tokenizer_fixtures():
    """A small byte-level BPE trained here, saved with [a, b] merges, a GPT-2-regex ByteLevel
    pre-tokenizer with add_prefix_space, and added tokens using lstrip/rstrip/single_word."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    train = handwritten() + random_texts(random.Random(5), 200)
    tok.train_from_iterator(train * 3, trainer)
    tok.add_special_tokens([AddedToken("[CLS]", special=True), AddedToken("<eot>", special=True,
                                                                         rstrip=True)])
    tok.add_tokens([AddedToken("<mask>", lstrip=True, normalized=False),
                    AddedToken("ony", single_word=True), AddedToken("name", normalized=True),
                    AddedToken("name is", normalized=False)])
    d = os.path.join(OUT, "synthetic")
    os.makedirs(d, exist_ok=True)
    tok.save(os.path.join(d, "tokenizer.json"))
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "[CLS]", "eos_token": "<eot>"}, f)
    texts = handwritten()[:45] + [
        "[CLS] My name is Anthony <eot>   next", "ony Tony ony, phony ony", "a  <mask>b <mask>  c",
        "<mask><mask>  <mask>", "name is name isname", "<eot><eot> \n x", "[CLS][CLS]ony"]
    texts += random_texts(random.Random(77), 100)
    cases = []
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False).ids
        cases.append({"text": text, "ids": ids, "decode": tok.decode(ids, skip_special_tokens=False),
                      "decode_skip": tok.decode(ids, skip_special_tokens=True)})
    write("encode_synthetic.json", cases)


# ---------------------------------------------------------------------------------------------
# Oniguruma's Unicode classes (what HF's regexes mean) as deltas from PCRE2's
# ---------------------------------------------------------------------------------------------

ONIG_CLASSES = ["L", "Lu", "Ll", "Lt", "Lm", "Lo", "M", "Mn", "Mc", "Me", "N", "Nd", "Nl", "No",
                "P", "Pc", "Pd", "Ps", "Pe", "Pi", "Pf", "Po", "S", "Sm", "Sc", "Sk", "So",
                "Z", "Zs", "Zl", "Zp", "C", "Cc", "Cf", "Co", "Cn"]
ALL_CPS = [c for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]


def onig_set(pattern):
    from tokenizers import Regex, pre_tokenizers
    split = pre_tokenizers.Split(Regex(pattern), behavior="removed")
    text = "".join(map(chr, ALL_CPS))
    rest = set()
    for i in range(0, len(text), 4096):
        for piece, _ in split.pre_tokenize_str(text[i:i + 4096]):
            rest.update(map(ord, piece))
    return set(ALL_CPS) - rest


def pcre2_set(pattern):
    """Code points PCRE2 (the library moeserve links) matches with UTF + UCP."""
    import ctypes
    import ctypes.util
    lib = ctypes.CDLL(ctypes.util.find_library("pcre2-8") or "libpcre2-8.so.0")
    lib.pcre2_compile_8.restype = ctypes.c_void_p
    lib.pcre2_compile_8.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint32,
                                    ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_size_t),
                                    ctypes.c_void_p]
    lib.pcre2_match_data_create_8.restype = ctypes.c_void_p
    lib.pcre2_match_data_create_8.argtypes = [ctypes.c_uint32, ctypes.c_void_p]
    lib.pcre2_match_8.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t,
                                  ctypes.c_size_t, ctypes.c_uint32, ctypes.c_void_p, ctypes.c_void_p]
    lib.pcre2_get_ovector_pointer_8.restype = ctypes.POINTER(ctypes.c_size_t)
    lib.pcre2_get_ovector_pointer_8.argtypes = [ctypes.c_void_p]
    pat = ("(?:" + pattern + ")+").encode()
    err, off = ctypes.c_int(), ctypes.c_size_t()
    code = lib.pcre2_compile_8(pat, len(pat), 0x00080000 | 0x00020000, ctypes.byref(err),
                               ctypes.byref(off), None)  # PCRE2_UTF | PCRE2_UCP
    assert code, pattern
    md = lib.pcre2_match_data_create_8(1, None)
    subject = "".join(map(chr, ALL_CPS)).encode("utf-8")
    starts = {}
    pos = 0
    for i, cp in enumerate(ALL_CPS):
        starts[pos] = i
        pos += len(chr(cp).encode("utf-8"))
    starts[pos] = len(ALL_CPS)
    found, pos = set(), 0
    while lib.pcre2_match_8(code, subject, len(subject), pos, 0, md, None) >= 0:
        ov = lib.pcre2_get_ovector_pointer_8(md)
        b, e = ov[0], ov[1]
        found.update(ALL_CPS[starts[b]:starts[e]])
        pos = e
    return found


def ranges(cps):
    out = []
    for c in sorted(cps):
        if out and out[-1][1] == c - 1:
            out[-1][1] = c
        else:
            out.append([c, c])
    return out


def unicode_tables():
    import tokenizers
    entries = []
    specs = [(c, r"\p{%s}" % c) for c in ONIG_CLASSES] + [("space", r"\s"), ("word", r"\w")]
    for name, pat in specs:
        onig = onig_set(pat)
        pcre = pcre2_set(pat)
        full = bool(pcre - onig) or name in ("space", "word")
        entries.append((name, full, ranges(onig if full else onig - pcre)))
        print(f"  {name}: {'full' if full else 'delta'} {len(entries[-1][2])} ranges")
    lines = ["// Generated by tools/make_tokenizer_fixtures.py unicode: what Oniguruma (the regex",
             f"// engine of tokenizers {tokenizers.__version__}) matches with each class, as code",
             "// point ranges added to PCRE2's class (delta) or replacing it (full). Do not edit.",
             "// clang-format off"]
    for name, full, rs in entries:
        body = ",".join(f"0x{a:X},0x{b:X}" for a, b in rs) or "0"
        lines.append(f"static const uint32_t kOnig_{name}[] = {{{body}}};")
    lines.append("static const OnigClass kOnigClasses[] = {")
    for name, full, rs in entries:
        lines.append(f'  {{"{name}", {str(full).lower()}, kOnig_{name}, {len(rs)}}},')
    lines += ["};", "// clang-format on", ""]
    path = os.path.join(ROOT, "src", "tokenizer", "onig_classes.inc")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    print(f"wrote {path}")


def bench_text():
    """The mixed text bench/tokenizer.cpp and tools/bench_tokenizer_hf.py both encode:
    Shakespeare, Chinese/Japanese/Korean prose made of common characters, source code, and a
    sprinkling of numbers, emoji and whitespace runs."""
    shakespeare = open("/work/shared/data/tinyshakespeare/input.txt", encoding="utf-8").read()
    rng = random.Random(2024)
    han = "的一是不了人我在有他这为之大来以个中上们到说国和地也子时道出而要于就下得可你年生自会那后能对着事其里所去行过家十用发天如然作方成者多日都三小军二无同么经法当起与好看学进种将还分此心前面又定见只主没公从"
    kana = "あいうえおかきくけこさしすせそたちつてとなにぬねのはひふへほまみむめもやゆよらりるれろわをんアイウエオカキクケコサシスセソ"
    hangul = "가나다라마바사아자차카타파하는이를에서한국어입니다고있다"
    cjk = []
    for _ in range(6000):
        script = rng.random()
        pool = han if script < 0.6 else kana if script < 0.8 else hangul
        n = rng.randrange(2, 14)
        cjk.append("".join(rng.choice(pool) for _ in range(n)) + rng.choice("，。、！？ \n"))
    code = []
    for folder, _, files in sorted(os.walk(os.path.join(ROOT, "src"))):
        for name in sorted(files):
            if name.endswith((".cpp", ".h")):
                code.append(open(os.path.join(folder, name), encoding="utf-8").read())
    code = "".join(code)[:150_000]
    misc = []
    for _ in range(3000):
        misc.append(rng.choice([str(rng.randrange(10**12)), "😀", "👍🏽", "\t\t", "    ", "\n\n",
                                "3.14159", "ÀÉÎÕÜ", "λx.x", "2024-01-01T00:00:00Z"]))
    text = shakespeare + "".join(cjk) + code + " ".join(misc)
    path = os.path.join(OUT, "bench_mixed.txt")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {path} ({len(text.encode())} bytes)")


# ---------------------------------------------------------------------------------------------
# Chat templates, rendered by jinja2 the way transformers' apply_chat_template renders them
# ---------------------------------------------------------------------------------------------

def hf_environment():
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):  # transformers' AssistantTracker, minus the tracking
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body, lineno=lineno)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}


def conversations():
    call = lambda name, args: {"type": "function", "function": {"name": name, "arguments": args}}
    return {
        "user_only": [{"role": "user", "content": "Hello!"}],
        "system_user": [{"role": "system", "content": "You are helpful."},
                        {"role": "user", "content": "What is 2+2?"}],
        "two_systems": [{"role": "system", "content": "Rule one."},
                        {"role": "system", "content": "Rule two."},
                        {"role": "user", "content": "Hi"}],
        "multi_turn": [{"role": "system", "content": "Be brief."},
                       {"role": "user", "content": "Hi"},
                       {"role": "assistant", "content": "Hello! How can I help?"},
                       {"role": "user", "content": "Tell me a joke."},
                       {"role": "assistant", "content": "Why did the chicken cross the road?"},
                       {"role": "user", "content": "Why?"}],
        "reasoning_history": [
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "<think>\nSimple sum.\n</think>\n\n4"},
            {"role": "user", "content": "and 3+3?"},
            {"role": "assistant", "content": "<think>a</think>b</think>\n6"},
            {"role": "user", "content": "thanks"}],
        "tool_call": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None,
             "tool_calls": [call("get_weather", '{"city": "Paris"}')]},
            {"role": "tool", "content": '{"temp": 21}'},
            {"role": "assistant", "content": "It is 21°C in Paris."},
            {"role": "user", "content": "And Tokyo and Rome?"}],
        "two_tool_calls_pending": [
            {"role": "user", "content": "Weather in Tokyo and Rome?"},
            {"role": "assistant", "content": None,
             "tool_calls": [call("get_weather", '{"city": "Tokyo"}'),
                            call("get_weather", '{"city": "Rome"}')]},
            {"role": "tool", "content": '{"temp": 18}'},
            {"role": "tool", "content": '{"temp": 25}'}],
        "unicode": [{"role": "system", "content": "用中文回答。"},
                    {"role": "user", "content": "你好 😀 <｜User｜> {{ not jinja }} {% raw %}"},
                    {"role": "assistant", "content": "こんにちは\n\n  spaced  "},
                    {"role": "user", "content": ""}],
        "empty": [],
    }


def feature_templates():
    """Small templates covering the interpreter; rendered with messages/tools as context."""
    return {
        "loop_vars": "{% for m in messages %}{{ loop.index }}/{{ loop.length }} {{ loop.index0 }}"
                     " {{ loop.revindex }} {{ loop.first }} {{ loop.last }}"
                     " {{ loop.cycle('a', 'b') }}|{% endfor %}",
        "namespace": "{% set ns = namespace(n=0, s='') %}{% for m in messages %}{% set ns.n = ns.n"
                     " + 1 %}{% set ns.s = ns.s ~ m.role[0] %}{% endfor %}{{ ns.n }} {{ ns.s }}",
        "scoping": "{% set x = 1 %}{% for i in [1, 2] %}{{ x }}{% set x = i * 10 %}{{ x }},"
                   "{% endfor %}{{ x }}{% if true %}{% set x = 5 %}{% endif %}{{ x }}",
        "whitespace": "A\n  {% if true %}\n    B\n  {% endif %}\nC {{- ' D ' -}} E\n{# c #}\n"
                      "  {#- c2 -#}  F\n{%+ if true %}G{% endif +%}\nH\n{%- if 1 %} I {% endif -%}\n J\n",
        "raw": "{% raw %}{{ not evaluated }} {% if %}{% endraw %}\n{%- raw -%}  x  {%- endraw %}y",
        "filters": "{{ '  pad  ' | trim }}|{{ 'Hello World' | upper }}|{{ 'ABC' | lower }}|"
                   "{{ [3, 1, 2] | sort | join(',') }}|{{ [1, 2, 3] | length }}|{{ 'x' | length }}|"
                   "{{ undefined_var | default('dflt') }}|{{ '' | default('e', true) }}|"
                   "{{ [1, 2] | first }}{{ [1, 2] | last }}|{{ 'a,b' | replace(',', ';') }}|"
                   "{{ 3.7 | int }}|{{ '42' | int + 1 }}|{{ 2 | float }}|{{ -3 | abs }}|"
                   "{{ 2.567 | round(2) }}|{{ [1, 2, 2, 3] | unique | list }}|{{ 'abc' | reverse }}|"
                   "{{ 'hello world' | title }}|{{ 'hello' | capitalize }}|{{ [4, 9] | max }}"
                   "{{ [4, 9] | min }}|{{ [1, 2, 3] | sum }}|{{ '<&>' | e }}|"
                   "{{ 'a\nb\n\nc' | indent(2) }}|{{ 'a\nb' | indent(2, true) }}|"
                   "{{ 'one two three' | wordcount }}|{{ '%s-%d' | format('x', 3) }}|"
                   "{{ 'abcdefghijklmnop' | truncate(9) }}|{{ [1,2,3,4,5] | batch(2) | list }}|"
                   "{{ 'ab' | center(6) }}|{{ 'x' | string }}{{ 1 | string }}",
        "tojson": "{{ messages | tojson }}\n{{ tools | tojson(indent=2) }}\n"
                  "{{ {'b': 1, 'a': [1.5, none, true, 'é\"\\n']} | tojson(sort_keys=true) }}\n"
                  "{{ {'k': {}} | tojson(indent=4) }} {{ [] | tojson(indent=2) }}",
        "tests": "{{ none is none }}{{ 1 is number }}{{ 'a' is string }}{{ x is defined }}"
                 "{{ x is undefined }}{{ messages is iterable }}{{ {} is mapping }}"
                 "{{ 4 is even }}{{ 3 is odd }}{{ 9 is divisibleby 3 }}{{ 9 is divisibleby(2) }}"
                 "{{ 1 is integer }}{{ 1.0 is float }}{{ true is boolean }}{{ 'AB' is upper }}"
                 "{{ 'ab' is lower }}{{ 2 is in [1, 2] }}{{ 1 is eq 1 }}{{ 1 is gt 0 }}"
                 "{{ none is not none }}{{ x is not defined }}{{ true is sameas true }}",
        "methods": "{{ ' a b  c '.split() }}{{ 'a,b,,c'.split(',') }}{{ 'a,b,c'.split(',', 1) }}"
                   "{{ 'a,b,c'.rsplit(',', 1) }}{{ 'xxhixx'.strip('x') }}{{ '  hi '.lstrip() }}|"
                   "{{ '  hi '.rstrip() }}|{{ 'hello'.startswith('he') }}"
                   "{{ 'hello'.endswith(('x', 'lo')) }}{{ 'Hello'.upper() }}{{ 'HeLLo'.lower() }}"
                   "{{ 'a-b-c'.replace('-', '+', 1) }}{{ 'hello'.find('l') }}{{ 'hello'.rfind('l') }}"
                   "{{ 'hello'.count('l') }}{{ '-'.join(['a', 'b']) }}{{ '{} and {}'.format(1, 'x') }}"
                   "{{ '{0}{name}'.format('a', name='b') }}{{ '12'.isdigit() }}{{ 'ab'.isalpha() }}"
                   "{{ 'a\\nb\\r\\nc'.splitlines() }}{{ 'x'.center(5, '*') }}{{ '5'.zfill(3) }}"
                   "{{ {'a': 1}.get('a') }}{{ {'a': 1}.get('b', 2) }}{{ {'a': 1}.items() | list }}"
                   "{{ {'a': 1, 'b': 2}.keys() | list }}{{ {'a': 1}.values() | list }}"
                   "{{ [1, 2, 3].index(2) }}{{ 'a b'.title() }}{{ 'ab'.partition('a') }}",
        "operators": "{{ 1 + 2 * 3 }} {{ (1 + 2) * 3 }} {{ 7 // 2 }} {{ -7 // 2 }} {{ 7 % 3 }}"
                     " {{ -7 % 3 }} {{ 7 / 2 }} {{ 4 / 2 }} {{ 2 ** 10 }} {{ 2 ** -1 }}"
                     " {{ 'a' ~ 1 ~ none }} {{ 'ab' * 3 }} {{ [1] + [2] }} {{ 1 < 2 < 3 }}"
                     " {{ 3 > 2 > 2 }} {{ 'b' > 'a' }} {{ 1 == 1.0 }} {{ 'a' in 'cat' }}"
                     " {{ 2 not in [1] }} {{ 'k' in {'k': 1} }} {{ not 0 }} {{ 0 or 'x' }}"
                     " {{ 1 and 2 }} {{ none or [] }} {{ 'y' if 0 else 'n' }} {{ 'y' if 1 }}"
                     " {{ -(3) }} {{ 1e3 }} {{ 1.5e-7 }} {{ 0.1 + 0.2 }} {{ 1e16 }} {{ 123456789.0 }}"
                     " {{ 10 - 2.5 }} {{ true + 1 }} {{ '%s=%r' % ('a', 'b') }}",
        "subscripts": "{{ messages[0]['role'] }}{{ messages[-1].role }}{{ messages[0].nope }}"
                      "{{ 'hello'[1:3] }}{{ 'hello'[::-1] }}{{ [1, 2, 3, 4][1:] }}"
                      "{{ [1, 2, 3, 4][:-1] }}{{ [1, 2, 3, 4][::2] }}{{ 'héllo'[1] }}"
                      "{{ [1, 2][5] }}{{ (1, 2) }}{{ (1,) }}{{ {'a': [1, {'b': 'c'}]}.a[1].b }}",
        "printing": "{{ none }} {{ true }} {{ [1, 'a', none, true, 1.0] }} {{ {'a': 'b', 1: 2} }}"
                    " {{ ['it\\'s'] }} {{ [\"q\\\"\"] }} {{ 'tab\\there' }} {{ ['\\n'] }}",
        "macros": "{% macro greet(name, greeting='Hello') %}{{ greeting }}, {{ name }}!{% endmacro %}"
                  "{{ greet('Ann') }} {{ greet('Bob', greeting='Hi') }} {{ greet('C', 'Yo') }}",
        "set_block": "{% set block %}inner {{ 1 + 1 }}{% endset %}[{{ block }}]"
                     "{% set up | upper %}shout{% endset %}{{ up }}"
                     "{% filter upper %}filtered {{ 'x' }}{% endfilter %}",
        "with_break": "{% with a = 1, b = 2 %}{{ a + b }}{% endwith %}"
                      "{% for i in range(10) %}{% if i == 2 %}{% continue %}{% endif %}"
                      "{% if i > 4 %}{% break %}{% endif %}{{ i }}{% endfor %}"
                      "{% for i in [] %}x{% else %}empty{% endfor %}"
                      "{% for k, v in {'a': 1, 'b': 2}.items() %}{{ k }}={{ v }};{% endfor %}"
                      "{% for m in messages if m.role == 'user' %}{{ loop.index }}{% endfor %}",
        "select_map": "{{ messages | selectattr('role', 'equalto', 'user') | list | length }}"
                      "{{ messages | rejectattr('role', 'eq', 'user') | map(attribute='role') | join(',') }}"
                      "{{ [1, 2, 3, 4] | select('odd') | list }}{{ ['a', 'b'] | map('upper') | list }}"
                      "{{ {'b': 1, 'a': 2} | dictsort }}{{ {'b': 1, 'a': 2} | items | list }}"
                      "{{ messages | map(attribute='content') | select | list | length }}",
        "generation": "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}"
                      "{{ m.content }}{% endgeneration %}{% else %}{{ m.content }}{% endif %}|{% endfor %}",
        "joiner": "{% set j = joiner('; ') %}{% for x in [1, 2, 3] %}{{ j() }}{{ x }}{% endfor %}",
        "crlf": "line1\r\n{% if true %}\r\nline2\r\n{% endif %}\r\nend\r\n",
        "corners": "{{ 'hello w//orld-x(y [z <a' | title }}|{{ 'one-two three_3' | wordcount }}|"
                   "{{ 0x1F }} {{ 1_000 }} {{ 0b101 }} {{ 0o17 }} {{ 1_0.5 }}|"
                   "{{ {'é': [1, 'ü😀']} | tojson(true) }}|{{ [1, {'a': 2}] | tojson(separators=(',', ':')) }}|"
                   "{{ {'a': [1]} | tojson(indent=0) }}|{{ 'x' in nothing }}|{{ nothing is sameas nothing }}|"
                   "{% for i in [1] %}{{ loop }}{{ loop.nope }}{{ loop['index'] }}{% endfor %}|"
                   "{{ 5 | format }}|{{ nothing | center(4) }}|{{ nothing | truncate }}|{{ (3)[1:] }}|"
                   "{{ '{}-{}'.format('a', 'b') }}|{{ 'abc'.find('z') }}|{{ 2.5 ** 2 }}{# c #}"
                   "{{ 17 | round(2) }} {{ 2.675 | round(2) }} {{ 1234 | round(-2) }} {{ 1250 | round(-2) }}"
                   " {{ 2.5 | round }} {{ -0.5 | round }} {{ 3.14159 | round(3, 'floor') }}|"
                   "{{ {'a': [1]} | tojson(indent='\t') }}|{{ [1, 2, 3] | batch(nothing) | list }}|"
                   "{% call(x) caller_user('q') %}[{{ x }}]{% endcall %}{#",
    }


def error_templates():
    """Templates jinja2 refuses (at parse or render time); the C++ must refuse them too."""
    return {
        "unclosed_if": "{% if true %}x",
        "unclosed_var": "{{ 1 + ",
        "bad_tag": "{% frobnicate %}",
        "unknown_filter": "{{ 1 | nosuchfilter }}",
        "raise": "{{ raise_exception('Only user and assistant roles are supported!') }}",
        "undefined_attr": "{{ nothing.attr }}",
        "str_plus_int": "{{ 'a' + 1 }}",
        "div_zero": "{{ 1 / 0 }}",
        "mutate_list": "{% set l = [1] %}{{ l.append(2) }}",
        "unbalanced": "{{ (1 }}",
        "bad_escape": "{{ '\\x4' }}",
        "endfor_without_for": "{% endfor %}",
        "not_iterable": "{% for x in 5 %}{% endfor %}",
        "big_range": "{{ range(1000000) | length }}",
        "comment_unclosed": "{# never closed",
        "leading_zero": "{{ 05 }}",
        "unicode_name": "{{ ｜ }}",
        "method_kwargs": "{{ 'x'.strip(chars='x') }}",
        "test_arity": "{{ 1 is defined 2 }}",
        "odd_undefined": "{{ nothing is odd }}",
        "format_mixed": "{{ '{}{0}'.format(1) }}",
        "pow_overflow": "{{ 10.0 ** 400 }}",
        "indent_float": "{{ 2.5 | indent }}",
        "float_undefined": "{{ nothing | float }}",
        "fill_too_long": "{{ 'x'.center(3, 'ab') }}",
        "filter_extra_arg": "{{ 'a' | e(1) }}",
        "nul_format": "{{ '%\x00' % 1 }}",
    }


def template_fixtures():
    env = hf_environment()
    cfg = json.load(open(os.path.join(ASSETS, "deepseek-v3", "tokenizer_config.json"),
                         encoding="utf-8"))
    special = {k: (v["content"] if isinstance(v, dict) else v) for k, v in cfg.items()
               if k in ("bos_token", "eos_token", "pad_token", "unk_token") and v is not None}
    sources = {"v3": cfg["chat_template"],
               "r1": open(os.path.join(ASSETS, "deepseek-r1", "chat_template.jinja"),
                          encoding="utf-8").read()}
    cases = []

    def render(source, messages, agp, tools=None, extra=None):
        return env.from_string(source).render(messages=messages, tools=tools, documents=None,
                                              add_generation_prompt=agp, **special,
                                              **(extra or {}))

    for tname in ("v3", "r1"):
        for cname, messages in conversations().items():
            for agp in (False, True):
                cases.append({"name": f"{tname}/{cname}/agp={agp}", "template": tname,
                              "messages": messages, "add_generation_prompt": agp,
                              "expected": render(sources[tname], messages, agp)})
    msgs = conversations()["tool_call"]
    for name, src in feature_templates().items():
        if name == "corners":
            src = "{% macro caller_user(v) %}<{{ caller(v) }}>{% endmacro %}" + src
        cases.append({"name": f"feature/{name}", "source": src, "messages": msgs,
                      "tools": [WEATHER_TOOL], "add_generation_prompt": True,
                      "expected": render(src, msgs, True, tools=[WEATHER_TOOL])})
    for name, src in error_templates().items():
        try:
            render(src, msgs, True)
            raise SystemExit(f"error template {name} rendered without an error")
        except SystemExit:
            raise
        except Exception as e:  # noqa: BLE001  (any jinja2 error is what we want)
            cases.append({"name": f"error/{name}", "source": src, "messages": msgs,
                          "add_generation_prompt": True, "error": f"{type(e).__name__}: {e}"})
    write("chat_templates.json", {"special_tokens": special, "cases": cases})


def main():
    os.makedirs(OUT, exist_ok=True)
    what = sys.argv[1:] or ["tokenizer", "template"]
    if "unicode" in what:
        unicode_tables()
    if "bench" in what:
        bench_text()
    if "tokenizer" in what:
        tokenizer_fixtures()
        synthetic_tokenizer_fixtures()
    if "template" in what:
        template_fixtures()


if __name__ == "__main__":
    main()

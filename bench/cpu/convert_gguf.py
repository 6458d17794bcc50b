#!/usr/bin/env python3
"""Converts a Qwen3-Next checkpoint directory (bf16) to GGUF with llama.cpp's own converter, using
only what Debian ships (apt-get install python3-torch python3-numpy python3-sentencepiece).

llama.cpp's convert_hf_to_gguf.py wants transformers (AutoConfig, AutoTokenizer) and torch >= 2.1
(it names the float8 dtypes). Debian has neither transformers nor that torch, so this script
stands in for what the converter asks of them, reading config.json and tokenizer.json itself:
- torch.float8_* as objects equal to no dtype (a bf16 checkpoint holds none);
- transformers.AutoConfig: config.json as a dict;
- transformers.AutoTokenizer: the vocabulary and added tokens of tokenizer.json (byte-level BPE);
- the pre-tokenizer by name, "qwen2", where llama.cpp hashes a test string's token ids against
  known tokenizers (a tokenizer trained for the demo model has no known hash; its split regex is
  Qwen2's, which this script checks).
Nothing of llama.cpp is copied here: its converter runs from the checkout given.

  /usr/bin/python3 bench/cpu/convert_gguf.py --llama-cpp LLAMA_DIR MODEL_DIR --outfile M.gguf --outtype bf16
"""
import argparse
import json
import os
import runpy
import sys
import types

import torch

QWEN2_SPLIT = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
               "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")

for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu"):
    if not hasattr(torch, name):
        setattr(torch, name, object())


class _Config:
    @staticmethod
    def from_pretrained(model_dir, **_):
        with open(os.path.join(model_dir, "config.json")) as f:
            d = json.load(f)
        return types.SimpleNamespace(to_dict=lambda: dict(d))


class _Tokenizer:
    @staticmethod
    def from_pretrained(model_dir, **_):
        return _Tokenizer(model_dir)

    def __init__(self, model_dir):
        with open(os.path.join(model_dir, "tokenizer.json"), encoding="utf-8") as f:
            t = json.load(f)
        if t["model"]["type"] != "BPE":
            sys.exit(f"convert_gguf: {model_dir}/tokenizer.json is {t['model']['type']}, not byte-level BPE")
        splits = [p for p in t.get("pre_tokenizer", {}).get("pretokenizers", []) if p.get("type") == "Split"]
        if not splits or splits[0]["pattern"].get("Regex") != QWEN2_SPLIT:
            sys.exit(f"convert_gguf: {model_dir}/tokenizer.json does not split as Qwen2's tokenizer does")
        self.vocab = dict(t["model"]["vocab"])
        self.added = {a["content"]: a["id"] for a in t.get("added_tokens", [])}
        self.vocab.update(self.added)
        # Added tokens are taken as they are (no encode/decode round trip to normalize them).
        self.added_tokens_decoder = {a["id"]: types.SimpleNamespace(content=a["content"], special=a["special"],
                                                                    normalized=True)
                                     for a in t.get("added_tokens", [])}

    def get_added_vocab(self):
        return dict(self.added)


p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--llama-cpp", required=True, help="a llama.cpp checkout (its convert_hf_to_gguf.py and gguf-py)")
args, rest = p.parse_known_args()
sys.modules["transformers"] = types.SimpleNamespace(AutoConfig=_Config, AutoTokenizer=_Tokenizer)
sys.path[:0] = [args.llama_cpp, os.path.join(args.llama_cpp, "gguf-py")]
import conversion.base  # noqa: E402  (llama.cpp's, from the checkout)

conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen2"
sys.argv = [os.path.join(args.llama_cpp, "convert_hf_to_gguf.py")] + rest
runpy.run_path(sys.argv[0], run_name="__main__")

#!/usr/bin/env python3
"""Make the reference fixtures under tests/fixtures/ from tiny RANDOM transformers checkpoints.

Needs torch and transformers (run it on the GPU machine; everything runs on the CPU in float32):

    PYTHONUNBUFFERED=1 python3 tools/make_fixtures.py --out /tmp/fx
    # -> /tmp/fx/fixtures/<name>/...   (copy into tests/fixtures/)
    # -> /tmp/fx/introspect/...        (what the installed transformers looks like; not committed)

Each fixture directory holds a checkpoint (config.json + safetensors) and
  reference.safetensors: prompt_ids I32[80], logits F32[80,V], continuation I32[16],
                         short_prompt_ids I32[7], short_logits F32[7,V], short_continuation I32[16],
                         continuation_logits F32[16,V], short_continuation_logits F32[16,V]
                         (continuation_logits[i] = logits of the last position of a full forward over
                          prompt + continuation[:i]; its argmax is continuation[i])
  reference.json:        the same ids as JSON lists, versions, layout/dtype, checks that were run.

The script fails loudly (non-zero exit) when a check that the references depend on fails
(generate() != manual greedy loop, a reloaded checkpoint not reproducing the logits, NaNs, ...),
after writing everything it could, so the log can be read.
"""

import argparse
import copy
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
import traceback
from collections import OrderedDict, defaultdict

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # references are computed on the CPU

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import transformers  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

PROMPT_LEN = 80
SHORT_LEN = 7
NEW_TOKENS = 16
# A prompt is accepted when, over the prompt + its greedy continuation:
MIN_GREEDY_GAP = 0.05  # top1 - top2 logit gap at every greedy step (robust argmax)
MIN_ROUTER_GAP = 1e-3  # p_k - p_(k+1) of the router softmax at every token of every MoE layer (robust top-k)
MIN_DISTINCT = 6       # distinct tokens among the 16 continuation tokens (no degenerate repetition)

HARD = []  # hard failures
WARN = []


def log(*a):
    print(*a, flush=True)


def hard(msg):
    log("HARD FAILURE: " + msg)
    HARD.append(msg)


def warn(msg):
    log("WARNING: " + msg)
    WARN.append(msg)


# ----------------------------------------------------------------------------------------------
# Fixture specifications
# ----------------------------------------------------------------------------------------------

FIXTURES = [
    dict(
        name="qwen3_next_a",
        family="qwen3_next",
        seed=1001,
        cfg=dict(
            vocab_size=300, hidden_size=32, num_hidden_layers=6,
            num_attention_heads=3, num_key_value_heads=1, head_dim=16,
            linear_num_key_heads=2, linear_num_value_heads=4,
            linear_key_head_dim=8, linear_value_head_dim=16, linear_conv_kernel_dim=4,
            num_experts=8, num_experts_per_tok=3, moe_intermediate_size=16,
            shared_expert_intermediate_size=24, norm_topk_prob=True,
            decoder_sparse_step=1, mlp_only_layers=[1], intermediate_size=40,
            tie_word_embeddings=False, rms_norm_eps=1e-6, max_position_embeddings=512,
        ),
        full_attention_interval=3,
        rope_theta=10000.0,
        partial_rotary_factor=0.5,
        expert_layout="per_expert",
        prefix="model.",
        dtype="float32",
        # config.json: no layer_types (derive from full_attention_interval), legacy top-level rope fields
        config_forms=["legacy_interval", "native"],
    ),
    dict(
        name="qwen3_next_b",
        family="qwen3_next",
        seed=2002,
        cfg=dict(
            vocab_size=288, hidden_size=40, num_hidden_layers=5,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            linear_num_key_heads=1, linear_num_value_heads=3,
            linear_key_head_dim=16, linear_value_head_dim=8, linear_conv_kernel_dim=4,
            num_experts=6, num_experts_per_tok=2, moe_intermediate_size=16,
            shared_expert_intermediate_size=16, norm_topk_prob=False,
            decoder_sparse_step=2, mlp_only_layers=[], intermediate_size=48,
            tie_word_embeddings=True, rms_norm_eps=1e-5, max_position_embeddings=512,
        ),
        layer_types=["linear_attention", "full_attention", "linear_attention", "linear_attention",
                     "full_attention"],
        rope_theta=50000.0,
        partial_rotary_factor=None,  # transformers' default (0.25); stripped from config.json
        expert_layout="fused",
        prefix="model.",
        dtype="bfloat16",
        config_forms=["no_partial_rotary", "native"],
    ),
    dict(
        name="qwen3_5_moe_text",
        family="qwen3_5_moe",
        seed=3003,
        cfg=dict(
            vocab_size=320, hidden_size=48, num_hidden_layers=5,
            num_attention_heads=4, num_key_value_heads=1, head_dim=32,
            linear_num_key_heads=2, linear_num_value_heads=6,
            linear_key_head_dim=16, linear_value_head_dim=8, linear_conv_kernel_dim=4,
            num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
            shared_expert_intermediate_size=32,
            tie_word_embeddings=False, rms_norm_eps=1e-6, max_position_embeddings=512,
        ),
        full_attention_interval=4,
        rope_theta=10000.0,
        partial_rotary_factor=0.5,
        mrope_section=[3, 3, 2],  # sums to rotary_dim / 2 = 8, like [11, 11, 10] for the real models
        expert_layout="per_expert",
        prefix="model.",
        dtype="float32",
        # config.json exactly as transformers writes it (includes a stale top-level partial_rotary_factor)
        config_forms=["native", "drop_top_level_partial"],
    ),
]
RELEASED = dict(name="qwen3_5_moe_released", source="qwen3_5_moe_text", expert_layout="fused",
                prefix="model.language_model.", dtype="float32")


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------

def tcls(name):
    c = getattr(transformers, name, None)
    if c is None:
        raise RuntimeError(f"transformers {transformers.__version__} has no {name}")
    return c


def disable_fast_paths():
    """Force the pure-torch code paths (fla / causal_conv1d kernels would put modules on the GPU)."""
    patched = []
    for modname in ["transformers.models.qwen3_next.modeling_qwen3_next",
                    "transformers.models.qwen3_5_moe.modeling_qwen3_5_moe",
                    "transformers.models.qwen3_5.modeling_qwen3_5"]:
        try:
            mod = __import__(modname, fromlist=["x"])
        except Exception as e:  # noqa: BLE001
            log(f"  (cannot import {modname}: {e})")
            continue
        for attr in ["FusedRMSNormGated", "chunk_gated_delta_rule", "fused_recurrent_gated_delta_rule"]:
            if getattr(mod, attr, None) is not None:
                setattr(mod, attr, None)
                patched.append(f"{modname}.{attr}")
        if getattr(mod, "is_fast_path_available", False):
            mod.is_fast_path_available = False
            patched.append(f"{modname}.is_fast_path_available")
    return patched


def layer_types_for(spec):
    n = spec["cfg"]["num_hidden_layers"]
    if "layer_types" in spec:
        return list(spec["layer_types"])
    iv = spec["full_attention_interval"]
    return ["full_attention" if (i + 1) % iv == 0 else "linear_attention" for i in range(n)]


def make_config(spec):
    fam = spec["family"]
    cls = tcls("Qwen3NextConfig" if fam == "qwen3_next" else "Qwen3_5MoeTextConfig")
    hd = spec["cfg"]["head_dim"]
    want_prf = spec["partial_rotary_factor"] if spec["partial_rotary_factor"] is not None else 0.25
    attempts = []
    for form in ["in_rope_parameters", "top_level_kwarg"]:
        kw = dict(spec["cfg"])
        kw["layer_types"] = layer_types_for(spec)
        rp = {"rope_type": "default", "rope_theta": spec["rope_theta"]}
        if fam == "qwen3_5_moe":
            rp["mrope_section"] = list(spec["mrope_section"])
            rp["mrope_interleaved"] = True
        if spec["partial_rotary_factor"] is not None:
            if form == "in_rope_parameters":
                rp["partial_rotary_factor"] = spec["partial_rotary_factor"]
            else:
                kw["partial_rotary_factor"] = spec["partial_rotary_factor"]
        kw["rope_parameters"] = rp
        try:
            cfg = cls(**kw)
        except Exception as e:  # noqa: BLE001
            attempts.append(f"{form}: {type(e).__name__}: {e}")
            continue
        got = (cfg.rope_parameters or {}).get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", None))
        if got is None or abs(float(got) - want_prf) > 1e-12:
            attempts.append(f"{form}: partial_rotary_factor ended up {got}, wanted {want_prf}")
            continue
        cfg.eos_token_id = None
        cfg.bos_token_id = None
        cfg.pad_token_id = None
        if int(hd * want_prf) % 2:
            raise RuntimeError("rotary dim must be even")
        return cfg, form, attempts
    raise RuntimeError("could not make config: " + " | ".join(attempts))


def build_model(cls, cfg):
    last = None
    for kw in ({"attn_implementation": "eager", "experts_implementation": "eager"},
               {"attn_implementation": "eager"}, {}):
        try:
            m = cls._from_config(copy.deepcopy(cfg), **kw)
            if "attn_implementation" not in kw and hasattr(m, "set_attn_implementation"):
                try:
                    m.set_attn_implementation("eager")
                except Exception:  # noqa: BLE001
                    pass
            m = m.float().eval()
            return m, kw
        except Exception as e:  # noqa: BLE001
            last = e
            log(f"  _from_config({kw}) failed: {type(e).__name__}: {e}")
    raise last


def load_pretrained(cls, path, **extra):
    last = None
    for kw in ({"attn_implementation": "eager", "experts_implementation": "eager"},
               {"attn_implementation": "eager"}, {}):
        for info in (True, False):
            try:
                args = dict(kw, **extra)
                args["dtype"] = torch.float32
                if info:
                    m, li = cls.from_pretrained(path, output_loading_info=True, **args)
                else:
                    m, li = cls.from_pretrained(path, **args), None
                return m.float().eval(), li
            except TypeError as e:
                last = e
                continue
            except Exception as e:  # noqa: BLE001
                last = e
                log(f"  from_pretrained({cls.__name__}, {list(args)}) failed: {type(e).__name__}: {e}")
                break
    raise last


def impl_of(model):
    c = model.config
    return {
        "attn": getattr(c, "_attn_implementation", None),
        "experts": getattr(c, "_experts_implementation", None),
    }


def ntensors(sd):
    return {k: [str(v.dtype).replace("torch.", ""), list(v.shape)] for k, v in sd.items()}


def natural_key(s):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def canonicalize(sd):
    """Any supported layout -> transformers' in-memory names (prefix model., fused experts)."""
    out = OrderedDict()
    experts = defaultdict(lambda: defaultdict(dict))
    for k, v in sd.items():
        k2 = k
        if k2.startswith("model.language_model."):
            k2 = "model." + k2[len("model.language_model."):]
        if k2.startswith("model.visual.") or k2.startswith("mtp."):
            continue
        m = re.match(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$", k2)
        if m:
            experts[m.group(1)][int(m.group(2))][m.group(3)] = v
            continue
        out[k2] = v
    for base, d in experts.items():
        E = max(d) + 1
        out[base + ".gate_up_proj"] = torch.stack(
            [torch.cat([d[e]["gate_proj"], d[e]["up_proj"]], 0) for e in range(E)])
        out[base + ".down_proj"] = torch.stack([d[e]["down_proj"] for e in range(E)])
    return out


def convert_layout(sd_mem, expert_layout, prefix, tied, dtype):
    """transformers' in-memory state dict -> the on-disk layout we want."""
    tdt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    out = OrderedDict()
    for k, v in sd_mem.items():
        if tied and k == "lm_head.weight":
            continue
        nk = prefix + k[len("model."):] if k.startswith("model.") else k
        m = re.match(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$", nk)
        if m and expert_layout == "per_expert":
            base, which = m.groups()
            E = v.shape[0]
            if which == "gate_up_proj":
                I2 = v.shape[1] // 2
                for e in range(E):
                    out[f"{base}.{e}.gate_proj.weight"] = v[e, :I2]
                    out[f"{base}.{e}.up_proj.weight"] = v[e, I2:]
            else:
                for e in range(E):
                    out[f"{base}.{e}.down_proj.weight"] = v[e]
            continue
        out[nk] = v
    return OrderedDict((k, v.detach().to(tdt).contiguous().clone()) for k, v in out.items())


def state_equal(a, b, tied):
    """a, b: canonical dicts. Returns list of problems."""
    probs = []
    ka = set(a) - ({"lm_head.weight"} if tied else set())
    kb = set(b) - ({"lm_head.weight"} if tied else set())
    if ka != kb:
        probs.append(f"key sets differ: only-left {sorted(ka - kb)[:8]} only-right {sorted(kb - ka)[:8]}")
    for k in sorted(ka & kb):
        x, y = a[k], b[k]
        if tuple(x.shape) != tuple(y.shape):
            probs.append(f"{k}: shape {tuple(x.shape)} vs {tuple(y.shape)}")
        elif not torch.equal(x.float(), y.float()):
            probs.append(f"{k}: values differ (max {float((x.float() - y.float()).abs().max()):.3g})")
    return probs


def read_checkpoint_dir(path):
    sd = OrderedDict()
    for fn in sorted(os.listdir(path)):
        if fn.endswith(".safetensors") and fn != "reference.safetensors":
            sd.update(load_file(os.path.join(path, fn)))
    return sd


# ----------------------------------------------------------------------------------------------
# Perturbation: make everything non-degenerate
# ----------------------------------------------------------------------------------------------

def perturb(model, cfg, seed, router_bias_scale, tied):
    gen = torch.Generator().manual_seed(seed)
    H = cfg.hidden_size

    def rn(*shape):
        return torch.randn(*shape, generator=gen)

    def ru(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(*shape, generator=gen)

    norm_zero, norm_gated = set(), set()
    for mname, m in model.named_modules():
        cn = type(m).__name__
        if "RMSNormGated" in cn:
            norm_gated.add(mname + ".weight")
        elif "RMSNorm" in cn:
            norm_zero.add(mname + ".weight")
    direction = rn(H)
    dhat = direction / direction.norm()
    emb_scale = 0.35 if tied else 1.0  # tied: keep the self-logit of the last input token from dominating
    rules = defaultdict(int)
    with torch.no_grad():
        for name, p in model.named_parameters():
            shp = tuple(p.shape)
            if name in norm_zero:
                new, r = 0.1 * rn(*shp), "zero_centred_norm N(0,0.1)"
            elif name in norm_gated:
                new, r = 1.0 + 0.1 * rn(*shp), "gated_norm 1+N(0,0.1)"
            elif name.endswith("embed_tokens.weight"):
                new, r = emb_scale * (rn(*shp) + 0.7 * direction[None, :]), "embed N(0,1)+0.7*dir"
            elif name == "lm_head.weight":
                new, r = rn(*shp) * (2.0 / math.sqrt(H)), "lm_head N(0,2/sqrt(H))"
            elif name.endswith("mlp.gate.weight"):
                E = shp[0]
                b = torch.linspace(-1.0, 1.0, E)[torch.randperm(E, generator=gen)]
                new = rn(*shp) * (4.0 / math.sqrt(H)) + router_bias_scale * b[:, None] * dhat[None, :]
                r = "router 4*N(0,1/sqrt(H)) + bias*dir"
            elif name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
                new, r = rn(*shp) / math.sqrt(shp[-1]), "experts N(0,1/sqrt(fan_in))"
            elif name.endswith("A_log"):
                new, r = torch.log(ru(0.05, 3.0, *shp)), "A_log log(U(0.05,3))"
            elif name.endswith("dt_bias"):
                new, r = ru(-1.5, 1.0, *shp), "dt_bias U(-1.5,1)"
            elif name.endswith("conv1d.weight"):
                new, r = 0.5 * rn(*shp), "conv N(0,0.5)"
            elif p.dim() == 2 and name.endswith(".weight"):
                new, r = rn(*shp) / math.sqrt(shp[1]), "linear N(0,1/sqrt(fan_in))"
            else:
                raise RuntimeError(f"no perturbation rule for parameter {name} {shp}")
            p.copy_(new)
            rules[r] += 1
    if tied:
        lm = model.get_output_embeddings().weight
        emb = model.get_input_embeddings().weight
        if lm.data_ptr() != emb.data_ptr():
            warn("tied lm_head is not the same tensor as embed_tokens after perturbation; copying")
            with torch.no_grad():
                lm.copy_(emb)
    return dict(rules)


def round_to_bf16(model):
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).to(torch.float32))


# ----------------------------------------------------------------------------------------------
# Reference computation
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def forward_logits(model, ids, use_cache=False):
    return model(input_ids=ids[None], use_cache=use_cache).logits[0].float()


@torch.no_grad()
def greedy_manual(model, ids, n):
    seq = ids.clone()
    steps, gaps = [], []
    for _ in range(n):
        lg = forward_logits(model, seq)[-1]
        t2 = lg.topk(2).values
        gaps.append(float(t2[0] - t2[1]))
        nxt = int(lg.argmax())
        steps.append(lg)
        seq = torch.cat([seq, torch.tensor([nxt], dtype=seq.dtype)])
    return seq[len(ids):].clone(), torch.stack(steps), min(gaps)


@torch.no_grad()
def greedy_generate(model, ids, n):
    gc = copy.deepcopy(model.generation_config)
    gc.eos_token_id = None
    gc.do_sample = False
    gc.num_beams = 1
    gc.max_new_tokens = n
    gc.min_new_tokens = None
    gc.use_cache = True
    gc.return_dict_in_generate = True
    gc.output_logits = True
    if gc.pad_token_id is None:
        gc.pad_token_id = 0  # never used: no eos, explicit attention mask
    out = model.generate(input_ids=ids[None], attention_mask=torch.ones_like(ids[None]), generation_config=gc)
    seq = out.sequences[0]
    cont = seq[len(ids):].clone()
    lg = torch.stack([x[0].float() for x in out.logits]) if out.logits is not None else None
    return cont, lg


@torch.no_grad()
def routing_stats(model, prompts):
    recs = defaultdict(list)
    hooks = []
    for name, m in model.named_modules():
        if type(m).__name__.endswith("TopKRouter"):
            def hk(mod, inp, out, name=name):
                recs[name].append(out)
            hooks.append(m.register_forward_hook(hk))
    try:
        for ids in prompts:
            model(input_ids=ids[None], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    stats = OrderedDict()
    all_used = True
    for name, outs in recs.items():
        probs, idx = [], []
        for o in outs:
            tens = o if isinstance(o, (tuple, list)) else (o,)
            fl = [t for t in tens if torch.is_tensor(t) and t.is_floating_point()]
            it = [t for t in tens if torch.is_tensor(t) and not t.is_floating_point()]
            probs.append(fl[0])
            idx.append(it[0])
        p = torch.cat(probs).float()
        ix = torch.cat(idx)
        E, k = p.shape[-1], ix.shape[-1]
        counts = torch.bincount(ix.flatten(), minlength=E).tolist()
        ps = p.sort(dim=-1, descending=True).values
        min_gap = float((ps[:, k - 1] - ps[:, k]).min()) if k < E else None
        if min(counts) == 0:
            all_used = False
        stats[name] = {"expert_counts": counts, "min_kth_gap": min_gap, "tokens": int(p.shape[0])}
    return stats, all_used


@torch.no_grad()
def hidden_rms(model, ids):
    out = model(input_ids=ids[None], use_cache=False, output_hidden_states=True)
    hs = out.hidden_states or ()
    return [round(float(h.float().pow(2).mean().sqrt()), 4) for h in hs]


def pick_prompt(model, vocab, length, base_seed, budget_s=60.0):
    t0 = time.time()
    best = None
    for attempt in range(200):
        seed = base_seed + attempt
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, vocab, (length,), generator=g)
        cont, steps, gap = greedy_manual(model, ids, NEW_TOKENS)
        st, _ = routing_stats(model, [torch.cat([ids, cont])])
        rg = [x["min_kth_gap"] for x in st.values() if x["min_kth_gap"] is not None]
        rgap = min(rg) if rg else None
        distinct = len(set(cont.tolist()))
        ok = (gap >= MIN_GREEDY_GAP, rgap is None or rgap >= MIN_ROUTER_GAP, distinct >= MIN_DISTINCT)
        score = (sum(ok), min(gap / MIN_GREEDY_GAP, 1.0)
                 + (1.0 if rgap is None else min(rgap / MIN_ROUTER_GAP, 1.0)) + min(distinct / MIN_DISTINCT, 1.0))
        cand = dict(seed=seed, ids=ids, cont=cont, steps=steps, gap=gap, router_gap=rgap, distinct=distinct,
                    attempts=attempt + 1)
        if best is None or score > best[0]:
            best = (score, cand)
        if all(ok) or time.time() - t0 > budget_s:
            break
    c = best[1]
    if best[0][0] < 3:
        warn(f"prompt len {length}: no candidate met all criteria; took seed {c['seed']} "
             f"(greedy gap {c['gap']:.4g}, router gap {c['router_gap']}, distinct {c['distinct']})")
    return c


# ----------------------------------------------------------------------------------------------
# Config.json forms
# ----------------------------------------------------------------------------------------------

def config_variant(native, form, spec):
    c = copy.deepcopy(native)
    if form == "native":
        pass
    elif form == "legacy_interval":
        c.pop("layer_types", None)
        c["full_attention_interval"] = spec["full_attention_interval"]
        rp = c.pop("rope_parameters", None) or {}
        c["rope_theta"] = rp.get("rope_theta", spec["rope_theta"])
        c["partial_rotary_factor"] = rp.get("partial_rotary_factor", spec["partial_rotary_factor"])
    elif form == "drop_top_level_partial":
        c.pop("partial_rotary_factor", None)
    elif form == "no_partial_rotary":
        c.pop("partial_rotary_factor", None)
        if isinstance(c.get("rope_parameters"), dict):
            c["rope_parameters"].pop("partial_rotary_factor", None)
    else:
        raise ValueError(form)
    c["eos_token_id"] = None
    c["bos_token_id"] = None
    c["pad_token_id"] = None
    c["dtype"] = spec["dtype"]
    c.pop("torch_dtype", None)
    return c


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")


# ----------------------------------------------------------------------------------------------
# Layout listing (one layer of each kind)
# ----------------------------------------------------------------------------------------------

def layout_listing(tensors_meta, layer_types, mlp_kinds, prefix):
    lines = []
    pat = re.compile(r"^" + re.escape(prefix) + r"layers\.(\d+)\.(.*)$")
    by_layer = defaultdict(list)
    other = []
    for name, (dt, shp) in tensors_meta.items():
        m = pat.match(name)
        if m:
            by_layer[int(m.group(1))].append((m.group(2), dt, shp))
        else:
            other.append((name, dt, shp))
    for name, dt, shp in sorted(other, key=lambda x: natural_key(x[0])):
        lines.append(f"  {name:<60} {dt:<9} {shp}")
    seen = set()
    for i in sorted(by_layer):
        kind = (layer_types[i], mlp_kinds[i])
        if kind in seen:
            continue
        seen.add(kind)
        lines.append(f"  -- layer {i}: {layer_types[i]} + {mlp_kinds[i]} --")
        ents = sorted(by_layer[i], key=lambda x: natural_key(x[0]))
        collapsed = OrderedDict()
        for sub, dt, shp in ents:
            em = re.match(r"^mlp\.experts\.(\d+)\.(.*)$", sub)
            if em:
                key = "mlp.experts.{e}." + em.group(2)
                collapsed.setdefault(key, [dt, shp, 0])
                collapsed[key][2] += 1
            else:
                collapsed[sub] = [dt, shp, None]
        for sub, (dt, shp, cnt) in collapsed.items():
            nm = f"{prefix}layers.{i}.{sub}"
            extra = f"   (e = 0..{cnt - 1})" if cnt else ""
            lines.append(f"  {nm:<60} {dt:<9} {shp}{extra}")
    return lines


# ----------------------------------------------------------------------------------------------
# One fixture
# ----------------------------------------------------------------------------------------------

def make_fixture(spec, outroot, introspect_dir, versions):
    name = spec["name"]
    fam = spec["family"]
    log(f"\n================ {name} ({fam}) ================")
    torch.manual_seed(spec["seed"])
    cfg, cfg_form, cfg_attempts = make_config(spec)
    for a in cfg_attempts:
        log("  config attempt: " + a)
    log(f"  config made with partial_rotary_factor via {cfg_form}; rope_parameters={cfg.rope_parameters}")
    log(f"  layer_types={cfg.layer_types}")
    cls = tcls("Qwen3NextForCausalLM" if fam == "qwen3_next" else "Qwen3_5MoeForCausalLM")
    tied = bool(spec["cfg"]["tie_word_embeddings"])

    model, build_kw = build_model(cls, cfg)
    log(f"  built {cls.__name__} with {build_kw}; implementations {impl_of(model)}")
    rot = getattr(getattr(model.model, "rotary_emb", None), "inv_freq", None)
    rot_dim = 2 * rot.numel() if rot is not None else None
    want_prf = spec["partial_rotary_factor"] if spec["partial_rotary_factor"] is not None else 0.25
    if rot_dim != int(spec["cfg"]["head_dim"] * want_prf):
        hard(f"{name}: rotary dim {rot_dim} != int(head_dim*{want_prf})")

    # mlp kinds per layer
    mlp_kinds = []
    for i, layer in enumerate(model.model.layers):
        mlp_kinds.append("moe" if hasattr(layer.mlp, "experts") else "dense")
    log(f"  mlp kinds: {mlp_kinds}")

    # in-memory names (introspection)
    mem_sd = model.state_dict()
    mem_meta = ntensors(mem_sd)

    chosen = None
    for bias_scale in (1.0, 0.5, 0.0):
        torch.manual_seed(spec["seed"])
        rules = perturb(model, cfg, spec["seed"] + 17, bias_scale, tied)
        if spec["dtype"] == "bfloat16":
            round_to_bf16(model)
        model.eval()
        long_p = pick_prompt(model, cfg.vocab_size, PROMPT_LEN, spec["seed"] * 10)
        short_p = pick_prompt(model, cfg.vocab_size, SHORT_LEN, spec["seed"] * 10 + 500)
        rstats, all_used = routing_stats(model, [torch.cat([long_p["ids"], long_p["cont"]]),
                                                 torch.cat([short_p["ids"], short_p["cont"]])])
        log(f"  router bias scale {bias_scale}: all experts used = {all_used}")
        for rn_, st in rstats.items():
            log(f"    {rn_}: counts {st['expert_counts']} min k-th prob gap {st['min_kth_gap']}")
        chosen = (bias_scale, rules, long_p, short_p, rstats, all_used)
        if all_used:
            break
    bias_scale, rules, long_p, short_p, rstats, all_used = chosen
    if not all_used:
        warn(f"{name}: some expert unused even with router bias 0")
    log(f"  perturbation rules: {rules}")

    # ---- references
    ref = {}
    checks = OrderedDict()
    for tag, pk in (("", long_p), ("short_", short_p)):
        pseed, ids, cont_m, steps_m, gap = pk["seed"], pk["ids"], pk["cont"], pk["steps"], pk["gap"]
        logits = forward_logits(model, ids, use_cache=False)
        logits_c = forward_logits(model, ids, use_cache=True)
        cont_g, steps_g = greedy_generate(model, ids, NEW_TOKENS)
        if not torch.isfinite(logits).all():
            hard(f"{name}: {tag}logits not finite")
        std = float(logits.std())
        if std <= 0.5:
            hard(f"{name}: {tag}logits std {std:.3f} <= 0.5")
        if not torch.equal(cont_g, cont_m):
            hard(f"{name}: {tag}generate() continuation {cont_g.tolist()} != manual greedy loop {cont_m.tolist()}")
        if len(cont_g) != NEW_TOKENS:
            hard(f"{name}: {tag}generate() produced {len(cont_g)} tokens")
        # steps_m[0] must equal the last row of the prompt logits
        d_first = float((steps_m[0] - logits[-1]).abs().max())
        d_cache = float((logits_c - logits).abs().max())
        d_gen = float((steps_g - steps_m).abs().max()) if steps_g is not None else None
        checks[tag + "prompt_seed"] = pseed
        checks[tag + "prompt_attempts"] = pk["attempts"]
        checks[tag + "min_greedy_top1_top2_gap"] = gap
        checks[tag + "min_router_kth_prob_gap"] = pk["router_gap"]
        checks[tag + "distinct_continuation_tokens"] = pk["distinct"]
        checks[tag + "logits_std"] = std
        checks[tag + "logits_absmax"] = float(logits.abs().max())
        checks[tag + "maxdiff_use_cache_true_vs_false"] = d_cache
        checks[tag + "maxdiff_manual_step0_vs_prompt_last_row"] = d_first
        checks[tag + "maxdiff_generate_decode_logits_vs_full_forward"] = d_gen
        checks[tag + "generate_equals_manual_loop"] = bool(torch.equal(cont_g, cont_m))
        log(f"  {tag or 'long_'}prompt seed {pseed}: logits std {std:.3f} absmax {float(logits.abs().max()):.2f}, "
            f"min greedy gap {gap:.4f}, router gap {pk['router_gap']}, distinct {pk['distinct']}, "
            f"attempts {pk['attempts']}, cache diff {d_cache:.2e}, decode-vs-full diff {d_gen}")
        log(f"  {tag or 'long_'}continuation {cont_m.tolist()}")
        ref[tag + "prompt_ids"] = ids.to(torch.int32)
        ref[tag + "logits"] = logits.contiguous()
        ref[tag + "continuation"] = cont_m.to(torch.int32)
        ref[tag + "continuation_logits"] = steps_m.contiguous()
    try:
        hrms = hidden_rms(model, long_p["ids"])
    except Exception as e:  # noqa: BLE001
        hrms = []
        warn(f"{name}: output_hidden_states failed: {e}")
    checks["hidden_state_rms_per_layer"] = hrms
    log(f"  hidden-state rms (as returned by output_hidden_states): {hrms}")
    if hrms and (max(hrms) > 1e3 or min(hrms) < 1e-3):
        hard(f"{name}: hidden-state rms out of range {hrms}")
    # DeltaNet decays actually used
    decays = []
    for lname, mod in model.named_modules():
        if hasattr(mod, "A_log") and hasattr(mod, "dt_bias"):
            decays.append([round(float(x), 3) for x in mod.A_log.exp().tolist()])
    checks["deltanet_exp_A_log"] = decays
    checks["routing"] = rstats
    checks["router_bias_scale"] = bias_scale

    # ---- save with transformers (introspection of its saved layout)
    sd_mem = OrderedDict((k, v.detach().clone()) for k, v in model.state_dict().items())
    canon_mem = canonicalize(sd_mem)
    tmp = tempfile.mkdtemp(prefix=f"hf_{name}_")
    try:
        try:
            model.save_pretrained(tmp, safe_serialization=True)
        except TypeError:
            model.save_pretrained(tmp)
        saved_files = sorted(os.listdir(tmp))
        saved_sd = read_checkpoint_dir(tmp)
        saved_meta = ntensors(saved_sd)
        with open(os.path.join(tmp, "config.json")) as f:
            native_cfg = json.load(f)
        gen_cfg_path = os.path.join(tmp, "generation_config.json")
        gen_cfg = json.load(open(gen_cfg_path)) if os.path.exists(gen_cfg_path) else None
        probs = state_equal(canonicalize(saved_sd), canon_mem, tied)
        saved_layout = {
            "files": saved_files,
            "has_language_model_prefix": any(k.startswith("model.language_model.") for k in saved_sd),
            "per_expert": any(re.search(r"\.experts\.\d+\.", k) for k in saved_sd),
            "fused": any(k.endswith("experts.gate_up_proj") for k in saved_sd),
            "has_lm_head": "lm_head.weight" in saved_sd,
            "canonical_equals_in_memory": not probs,
            "problems": probs[:10],
        }
        log(f"  transformers save_pretrained layout: {json.dumps(saved_layout)}")
        first_full = layer_types_for(spec).index("full_attention")
        for k in sorted(saved_sd, key=natural_key):
            if ".layers." in k and not re.search(r"layers\.(0|%d)\." % first_full, k):
                continue
            if re.search(r"experts\.([1-9]\d*)\.", k):
                continue
            log(f"    saved {k:<62} {str(saved_sd[k].dtype):<15} {list(saved_sd[k].shape)}")
        write_json(os.path.join(introspect_dir, f"{name}.saved_by_transformers.json"),
                   {"config.json": native_cfg, "generation_config.json": gen_cfg,
                    "layout": saved_layout, "tensors": saved_meta, "in_memory_tensors": mem_meta})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    # in-memory expert shapes
    for k, v in sd_mem.items():
        if k.endswith("experts.gate_up_proj"):
            E, I, H = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
            if tuple(v.shape) != (E, 2 * I, H):
                hard(f"{name}: in-memory {k} shape {tuple(v.shape)} != (E,2I,H)")
            break

    # ---- write the fixture
    fdir = os.path.join(outroot, name)
    os.makedirs(fdir, exist_ok=True)
    disk = convert_layout(sd_mem, spec["expert_layout"], spec["prefix"], tied, spec["dtype"])
    save_file(disk, os.path.join(fdir, "model.safetensors"), metadata={"format": "pt"})
    if gen_cfg is not None:
        write_json(os.path.join(fdir, "generation_config.json"), gen_cfg)
    # structural check of what we wrote
    probs = state_equal(canonicalize(read_checkpoint_dir(fdir)),
                        OrderedDict((k, v.to(torch.bfloat16).float() if spec["dtype"] == "bfloat16" else v)
                                    for k, v in canon_mem.items()), tied)
    if probs:
        hard(f"{name}: written checkpoint != model: {probs[:5]}")
    checks["written_tensors_equal_model"] = not probs

    ids_long = ref["prompt_ids"].long()
    used_form = None
    reload_results = OrderedDict()
    for form in spec["config_forms"]:
        cj = config_variant(native_cfg, form, spec)
        write_json(os.path.join(fdir, "config.json"), cj)
        try:
            rm, li = load_pretrained(cls, fdir)
            rl = forward_logits(rm, ids_long)
            d = float((rl - ref["logits"]).abs().max())
            lt_ok = list(rm.config.layer_types) == layer_types_for(spec)
            canon_loaded = canonicalize(OrderedDict((k, v.detach()) for k, v in rm.state_dict().items()))
            wprobs = state_equal(canon_loaded, OrderedDict(
                (k, v.to(torch.bfloat16).float() if spec["dtype"] == "bfloat16" else v) for k, v in canon_mem.items()),
                tied)
            res = {"max_abs_logit_diff": d, "layer_types_match": lt_ok, "weights_equal": not wprobs,
                   "weight_problems": wprobs[:5],
                   "loading_info": {k: list(v)[:10] for k, v in (li or {}).items() if v} if isinstance(li, dict) else None,
                   "implementations": impl_of(rm)}
            del rm
        except Exception as e:  # noqa: BLE001
            res = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
        reload_results[form] = res
        log(f"  reload with config form '{form}': {json.dumps({k: v for k, v in res.items() if k != 'traceback'})[:900]}")
        if "error" not in res and res["max_abs_logit_diff"] <= 1e-5 and res["layer_types_match"]:
            used_form = form
            break
    checks["transformers_reload"] = reload_results
    if used_form is None:
        if spec["family"] == "qwen3_5_moe" and spec["expert_layout"] == "per_expert":
            warn(f"{name}: transformers cannot reload this layout (per-expert Qwen3.5); verified by tensor "
                 f"equality instead (written_tensors_equal_model={checks['written_tensors_equal_model']})")
            used_form = spec["config_forms"][-1]
        else:
            hard(f"{name}: no config form reloads to the reference logits")
            used_form = spec["config_forms"][-1]
        write_json(os.path.join(fdir, "config.json"), config_variant(native_cfg, used_form, spec))
    log(f"  config.json form: {used_form}")

    meta = ntensors(disk)
    listing = layout_listing(meta, layer_types_for(spec), mlp_kinds, spec["prefix"])
    write_reference(fdir, name, spec, ref, checks, versions, meta, used_form, tied,
                    layer_types_for(spec), mlp_kinds, cfg)
    return dict(spec=spec, cfg=cfg, model=model, ref=ref, sd_mem=sd_mem, canon_mem=canon_mem,
                native_cfg=native_cfg, gen_cfg=gen_cfg, checks=checks, listing=listing,
                mlp_kinds=mlp_kinds, cfg_json=json.load(open(os.path.join(fdir, "config.json"))))


def write_reference(fdir, name, spec, ref, checks, versions, meta, config_form, tied, layer_types,
                    mlp_kinds, cfg, extra=None):
    save_file(OrderedDict((k, v.contiguous()) for k, v in ref.items()),
              os.path.join(fdir, "reference.safetensors"),
              metadata={"fixture": name, "transformers": versions["transformers"], "torch": versions["torch"]})
    c = spec.get("cfg", {})
    rj = OrderedDict()
    rj["fixture"] = name
    rj["family"] = spec.get("family", "qwen3_5_moe")
    rj["versions"] = versions
    rj["weights"] = {
        "dtype": spec["dtype"],
        "expert_layout": spec["expert_layout"],
        "tensor_prefix": spec["prefix"],
        "tied_embeddings": tied,
        "lm_head_in_checkpoint": not tied,
        "sharded": bool(extra and extra.get("sharded")),
        "config_form": config_form,
    }
    rj["references_computed"] = (
        "transformers eager model on CPU, float32 compute"
        + ("; the checkpoint stores bf16 weights and the references were computed with exactly those "
           "bf16 values upcast to float32" if spec["dtype"] == "bfloat16" else "; float32 weights"))
    rj["derived"] = {"layer_types": layer_types, "mlp_kinds": mlp_kinds,
                     "rotary_dim": int(cfg.head_dim * ((cfg.rope_parameters or {}).get("partial_rotary_factor", 0.25))),
                     "rope_parameters": cfg.rope_parameters}
    rj["prompt_ids"] = ref["prompt_ids"].tolist()
    rj["continuation"] = ref["continuation"].tolist()
    rj["short_prompt_ids"] = ref["short_prompt_ids"].tolist()
    rj["short_continuation"] = ref["short_continuation"].tolist()
    rj["reference_tensors"] = {k: [str(v.dtype).replace("torch.", ""), list(v.shape)] for k, v in ref.items()}
    rj["checks"] = checks
    if extra:
        rj.update(extra)
    rj["tensors"] = meta
    write_json(os.path.join(fdir, "reference.json"), rj)


# ----------------------------------------------------------------------------------------------
# Released Qwen3.5 layout
# ----------------------------------------------------------------------------------------------

def make_released(src, outroot, versions):
    name = RELEASED["name"]
    log(f"\n================ {name} (from {src['spec']['name']}) ================")
    spec = dict(RELEASED)
    spec["family"] = "qwen3_5_moe"
    cfg = src["cfg"]
    H = cfg.hidden_size
    fdir = os.path.join(outroot, name)
    os.makedirs(fdir, exist_ok=True)

    text_cfg = copy.deepcopy(src["cfg_json"])
    text_cfg.pop("architectures", None)
    text_cfg.pop("transformers_version", None)
    text_cfg["model_type"] = "qwen3_5_moe_text"
    text_cfg["full_attention_interval"] = src["spec"]["full_attention_interval"]  # as in released configs
    # released configs keep partial_rotary_factor inside rope_parameters only (transformers' native
    # config.json also writes a top-level partial_rotary_factor, which can be stale: see README)
    text_cfg.pop("partial_rotary_factor", None)
    vision_cfg = {
        "model_type": "qwen3_5_moe", "depth": 1, "hidden_size": 16, "hidden_act": "gelu_pytorch_tanh",
        "intermediate_size": 32, "num_heads": 2, "in_channels": 3, "patch_size": 4,
        "spatial_merge_size": 2, "temporal_patch_size": 2, "out_hidden_size": H,
        "num_position_embeddings": 16, "initializer_range": 0.02, "deepstack_visual_indexes": [],
    }
    top = OrderedDict()
    top["architectures"] = ["Qwen3_5MoeForConditionalGeneration"]
    top["model_type"] = "qwen3_5_moe"
    top["image_token_id"] = 248056
    top["video_token_id"] = 248057
    top["vision_start_token_id"] = 248053
    top["vision_end_token_id"] = 248054
    top["tie_word_embeddings"] = False
    top["dtype"] = "float32"
    top["transformers_version"] = transformers.__version__
    top["text_config"] = text_cfg
    top["vision_config"] = vision_cfg

    # visual tensors from a real (tiny) vision tower, so the checkpoint looks like a released one
    visual = OrderedDict()
    visual_note = None
    try:
        CG = tcls("Qwen3_5MoeForConditionalGeneration")
        CC = tcls("Qwen3_5MoeConfig")
        cgcfg = CC.from_dict(copy.deepcopy(dict(top)))
        torch.manual_seed(4242)
        cgm = CG._from_config(cgcfg)
        for k, v in cgm.state_dict().items():
            if ".visual." in k or k.startswith("visual.") or k.startswith("model.visual."):
                kk = k if k.startswith("model.visual.") else "model.visual." + k.split("visual.", 1)[1]
                visual[kk] = v.detach().float().contiguous().clone()
        del cgm
        visual_note = f"{len(visual)} model.visual.* tensors from a depth-1 vision tower (random; text engines ignore them)"
    except Exception as e:  # noqa: BLE001
        visual_note = f"no visual tensors ({type(e).__name__}: {e})"
        warn(f"{name}: could not build the vision tower: {e}")
    log("  " + visual_note)

    disk = convert_layout(src["sd_mem"], "fused", "model.language_model.", False, "float32")
    allt = OrderedDict(list(disk.items()) + list(visual.items()))
    names = sorted(allt, key=natural_key)
    total = sum(allt[n].numel() * allt[n].element_size() for n in names)
    acc, cut = 0, len(names)
    for i, n in enumerate(names):
        acc += allt[n].numel() * allt[n].element_size()
        if acc >= total / 2:
            cut = i + 1
            break
    files = {"model-00001-of-00002.safetensors": names[:cut], "model-00002-of-00002.safetensors": names[cut:]}
    wmap = {}
    for fn, ns in files.items():
        save_file(OrderedDict((n, allt[n]) for n in ns), os.path.join(fdir, fn), metadata={"format": "pt"})
        for n in ns:
            wmap[n] = fn
    write_json(os.path.join(fdir, "model.safetensors.index.json"),
               {"metadata": {"total_size": total}, "weight_map": OrderedDict(sorted(wmap.items()))})
    write_json(os.path.join(fdir, "config.json"), top)
    if src["gen_cfg"] is not None:
        write_json(os.path.join(fdir, "generation_config.json"), src["gen_cfg"])

    checks = OrderedDict()
    probs = state_equal(canonicalize(read_checkpoint_dir(fdir)), src["canon_mem"], False)
    checks["written_tensors_equal_model"] = not probs
    if probs:
        hard(f"{name}: written checkpoint != model: {probs[:5]}")
    ref = src["ref"]
    ids = ref["prompt_ids"].long()
    reload = OrderedDict()
    # (a) text-only class, config = text_config
    try:
        CC = tcls("Qwen3_5MoeConfig")
        tcfg = CC.from_pretrained(fdir).text_config
        m, li = load_pretrained(tcls("Qwen3_5MoeForCausalLM"), fdir, config=tcfg)
        d = float((forward_logits(m, ids) - ref["logits"]).abs().max())
        reload["Qwen3_5MoeForCausalLM(config=text_config)"] = {
            "max_abs_logit_diff": d,
            "loading_info": {k: list(v)[:10] for k, v in (li or {}).items() if v} if isinstance(li, dict) else None}
        del m
    except Exception as e:  # noqa: BLE001
        reload["Qwen3_5MoeForCausalLM(config=text_config)"] = {"error": f"{type(e).__name__}: {e}",
                                                               "traceback": traceback.format_exc()[-1500:]}
    # (b) the multimodal class, text-only input
    try:
        m, li = load_pretrained(tcls("Qwen3_5MoeForConditionalGeneration"), fdir)
        with torch.no_grad():
            lg = m(input_ids=ids[None], use_cache=False).logits[0].float()
        d = float((lg - ref["logits"]).abs().max())
        reload["Qwen3_5MoeForConditionalGeneration"] = {
            "max_abs_logit_diff": d,
            "loading_info": {k: list(v)[:10] for k, v in (li or {}).items() if v} if isinstance(li, dict) else None}
        del m
    except Exception as e:  # noqa: BLE001
        reload["Qwen3_5MoeForConditionalGeneration"] = {"error": f"{type(e).__name__}: {e}",
                                                        "traceback": traceback.format_exc()[-1500:]}
    for k, v in reload.items():
        log(f"  reload {k}: {json.dumps({a: b for a, b in v.items() if a != 'traceback'})[:900]}")
        if "traceback" in v:
            log(v["traceback"])
    checks["transformers_reload"] = reload
    ok = [v for v in reload.values() if "error" not in v and v["max_abs_logit_diff"] <= 1e-5]
    if not ok:
        hard(f"{name}: no transformers class reloads the released layout to the reference logits")
    checks["reference_copied_from"] = src["spec"]["name"]
    meta = ntensors(allt)
    meta_text = OrderedDict((k, v) for k, v in meta.items() if not k.startswith("model.visual."))
    listing = layout_listing(meta_text, layer_types_for(src["spec"]), src["mlp_kinds"], "model.language_model.")
    nvis = len(visual)
    if nvis:
        listing.append(f"  model.visual.* : {nvis} tensors (ignored by a text engine)")
    listing.append(f"  shards: model-00001-of-00002.safetensors ({cut} tensors), "
                   f"model-00002-of-00002.safetensors ({len(names) - cut} tensors), total_size {total}")
    write_reference(fdir, name, spec, ref, checks, versions, meta, "released_nested_text_config", False,
                    layer_types_for(src["spec"]), src["mlp_kinds"], cfg,
                    extra={"sharded": True, "visual": visual_note,
                           "same_model_as": src["spec"]["name"]})
    return listing


# ----------------------------------------------------------------------------------------------
# Introspection + DeltaNet check
# ----------------------------------------------------------------------------------------------

def introspect(introspect_dir):
    info = OrderedDict()
    info["torch"] = torch.__version__
    info["transformers"] = transformers.__version__
    info["python"] = sys.version.split()[0]
    for n in ["Qwen3NextConfig", "Qwen3NextForCausalLM", "Qwen3NextModel", "Qwen3_5MoeTextConfig",
              "Qwen3_5MoeForCausalLM", "Qwen3_5MoeTextModel", "Qwen3_5MoeConfig", "Qwen3_5MoeVisionConfig",
              "Qwen3_5MoeForConditionalGeneration"]:
        info["has_" + n] = hasattr(transformers, n)
    try:
        from transformers.utils import import_utils as iu
        info["fla_available"] = bool(iu.is_flash_linear_attention_available())
        info["causal_conv1d_available"] = bool(iu.is_causal_conv1d_available())
    except Exception as e:  # noqa: BLE001
        info["fast_path_probe_error"] = str(e)
    keys = ["partial_rotary_factor", "rope_parameters", "rope_theta", "layer_types", "full_attention_interval",
            "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers", "head_dim", "num_experts",
            "num_experts_per_tok", "shared_expert_intermediate_size", "moe_intermediate_size",
            "intermediate_size", "linear_conv_kernel_dim", "tie_word_embeddings", "rms_norm_eps", "dtype",
            "hidden_act", "attention_bias"]
    for cname in ["Qwen3NextConfig", "Qwen3_5MoeTextConfig", "Qwen3_5MoeConfig"]:
        try:
            d = tcls(cname)().to_dict()
            write_json(os.path.join(introspect_dir, f"{cname}.defaults.json"), d)
            short = {}
            for k in keys:
                if k in d:
                    v = d[k]
                    if k == "layer_types":
                        v = f"{v[:4]}... (len {len(v)})"
                    short[k] = v
            info[cname + "_defaults"] = short
        except Exception as e:  # noqa: BLE001
            info[cname + "_defaults_error"] = f"{type(e).__name__}: {e}"
    try:
        from transformers import conversion_mapping as cm
        for mt in ["qwen3_next", "qwen3_5_moe_text", "qwen3_5_moe", "qwen3_5_text"]:
            try:
                info["conversion_mapping_" + mt] = repr(cm.get_checkpoint_conversion_mapping(mt))[:600]
            except Exception as e:  # noqa: BLE001
                info["conversion_mapping_" + mt] = f"error {e}"
    except Exception as e:  # noqa: BLE001
        info["conversion_mapping"] = f"error {e}"
    # copy the installed sources for reading
    srcdir = os.path.join(introspect_dir, "transformers_src")
    os.makedirs(srcdir, exist_ok=True)
    base = os.path.dirname(transformers.__file__)
    for rel in ["models/qwen3_next/modeling_qwen3_next.py", "models/qwen3_next/configuration_qwen3_next.py",
                "models/qwen3_5_moe/modeling_qwen3_5_moe.py", "models/qwen3_5_moe/configuration_qwen3_5_moe.py",
                "conversion_mapping.py", "integrations/moe.py", "modeling_rope_utils.py"]:
        p = os.path.join(base, rel)
        if os.path.exists(p):
            shutil.copy(p, os.path.join(srcdir, rel.replace("/", "__")))
    for k, v in info.items():
        log(f"  {k}: {v}")
    write_json(os.path.join(introspect_dir, "summary.json"), info)
    return info


@torch.no_grad()
def deltanet_check():
    """Chunked (WY) vs recurrent gated delta rule in transformers vs a direct transcription of docs/model.md."""
    res = OrderedDict()
    try:
        from transformers.models.qwen3_next import modeling_qwen3_next as mq
        chunk = getattr(mq, "torch_chunk_gated_delta_rule")
        recur = getattr(mq, "torch_recurrent_gated_delta_rule")
    except Exception as e:  # noqa: BLE001
        return {"skipped": f"{type(e).__name__}: {e}"}
    g = torch.Generator().manual_seed(7)
    B, T, Hh, dk, dv = 1, 150, 3, 8, 16
    q = torch.randn(B, T, Hh, dk, generator=g)
    k = torch.randn(B, T, Hh, dk, generator=g)
    v = torch.randn(B, T, Hh, dv, generator=g)
    beta = torch.rand(B, T, Hh, generator=g)
    gl = -torch.rand(B, T, Hh, generator=g) * 0.7
    oc, sc = chunk(q, k, v, g=gl, beta=beta, chunk_size=64, initial_state=None, output_final_state=True,
                   use_qk_l2norm_in_kernel=True)
    orr, sr = recur(q, k, v, g=gl, beta=beta, initial_state=None, output_final_state=True,
                    use_qk_l2norm_in_kernel=True)
    # docs/model.md transcription
    qn = q * torch.rsqrt((q * q).sum(-1, keepdim=True) + 1e-6) * dk ** -0.5
    kn = k * torch.rsqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    S = torch.zeros(B, Hh, dk, dv)
    outs = []
    for t in range(T):
        S = S * gl[:, t].exp()[..., None, None]
        kv = torch.einsum("bhkv,bhk->bhv", S, kn[:, t])
        delta = beta[:, t][..., None] * (v[:, t] - kv)
        S = S + kn[:, t][..., :, None] * delta[..., None, :]
        outs.append(torch.einsum("bhkv,bhk->bhv", S, qn[:, t]))
    om = torch.stack(outs, 1)
    res["T"] = T
    res["maxdiff_chunk_vs_recurrent_out"] = float((oc - orr).abs().max())
    res["maxdiff_chunk_vs_recurrent_state"] = float((sc - sr).abs().max())
    res["maxdiff_modelmd_vs_recurrent_out"] = float((om - orr).abs().max())
    res["maxdiff_modelmd_vs_recurrent_state"] = float((S - sr).abs().max())
    res["state_layout"] = "[B, H, dk, dv] (S^T k = sum over dk)"
    # chunked prefill of 70 tokens, then recurrent continuation from its final state
    o1, s1 = chunk(q[:, :70], k[:, :70], v[:, :70], g=gl[:, :70], beta=beta[:, :70], chunk_size=64,
                   initial_state=None, output_final_state=True, use_qk_l2norm_in_kernel=True)
    o2, s2 = recur(q[:, 70:], k[:, 70:], v[:, 70:], g=gl[:, 70:], beta=beta[:, 70:], initial_state=s1,
                   output_final_state=True, use_qk_l2norm_in_kernel=True)
    res["maxdiff_split_prefill_then_decode"] = float((torch.cat([o1, o2], 1) - orr).abs().max())
    for kk, vv in res.items():
        log(f"  {kk}: {vv}")
    return res


# ----------------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=4)
    args = ap.parse_args()
    torch.set_default_dtype(torch.float32)
    torch.set_num_threads(args.threads)
    outroot = os.path.join(args.out, "fixtures")
    introspect_dir = os.path.join(args.out, "introspect")
    if os.path.exists(outroot):
        shutil.rmtree(outroot)
    os.makedirs(outroot)
    os.makedirs(introspect_dir, exist_ok=True)

    log("== introspection ==")
    info = introspect(introspect_dir)
    patched = disable_fast_paths()
    log(f"  forced pure-torch paths: {patched or 'nothing to patch'}")
    versions = {"transformers": transformers.__version__, "torch": torch.__version__,
                "python": sys.version.split()[0]}

    log("\n== DeltaNet chunked vs recurrent ==")
    dn = deltanet_check()
    write_json(os.path.join(introspect_dir, "deltanet_check.json"), dn)

    made = {}
    listings = OrderedDict()
    for spec in FIXTURES:
        try:
            r = make_fixture(spec, outroot, introspect_dir, versions)
            made[spec["name"]] = r
            listings[spec["name"]] = r["listing"]
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            hard(f"{spec['name']}: exception {type(e).__name__}: {e}")
    if "qwen3_5_moe_text" in made:
        try:
            listings[RELEASED["name"]] = make_released(made["qwen3_5_moe_text"], outroot, versions)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            hard(f"{RELEASED['name']}: exception {type(e).__name__}: {e}")

    # layout listing
    lines = ["# Tensor layouts of the fixtures (generated by tools/make_fixtures.py)", "",
             f"transformers {versions['transformers']}, torch {versions['torch']}", "",
             "One decoder layer of each (mixer, mlp) kind per fixture, then the non-layer tensors first.",
             "Shapes are [out, in] for linear weights, as stored.", ""]
    for n, ls in listings.items():
        lines.append(f"## {n}")
        lines.append("```")
        lines.extend(ls)
        lines.append("```")
        lines.append("")
    with open(os.path.join(outroot, "LAYOUT.md"), "w") as f:
        f.write("\n".join(lines))

    # sizes
    total = 0
    log("\n== sizes ==")
    for dp, dn_, fns in os.walk(outroot):
        for fn in sorted(fns):
            p = os.path.join(dp, fn)
            total += os.path.getsize(p)
            log(f"  {os.path.relpath(p, outroot):<60} {os.path.getsize(p):>10}")
    log(f"  TOTAL {total} bytes")
    if total > 10 * 1024 * 1024:
        hard(f"fixtures total {total} bytes > 10 MB")

    log("\n== summary ==")
    for w in WARN:
        log("  warning: " + w)
    for h in HARD:
        log("  HARD: " + h)
    log("RESULT: " + ("FAIL" if HARD else "OK"))
    sys.exit(1 if HARD else 0)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Reference PyTorch implementation of the Qwen3-Next / Qwen3.5-MoE MTP head (docs/model.md, "MTP head").

transformers does not model the MTP head (its loaders drop `mtp.*`), so this module is the
reference the engine is tested against. It reuses transformers' own decoder-layer class
(`Qwen3NextDecoderLayer` / `Qwen3_5MoeDecoderLayer`, built with `layer_types = ["full_attention"]`)
so that the norms, the gated attention projections and the sparse MoE (router, experts, shared
expert) are transformers' math; only the attention's KV cache is written out here, so that a
prefill followed by chained drafting steps can be expressed.

One drafting step, for a batch of pairs (h_t, x_{t+1}):

    e = pre_fc_norm_embedding(embed_tokens(x_{t+1}))          # embedding FIRST
    g = pre_fc_norm_hidden(h_t)                               # h_t: trunk hidden AFTER model.norm
    u = fc(concat[e, g])                                       # mtp.fc.weight [H, 2H]
    u = u + self_attn(input_layernorm(u), rope at position p)  # own KV cache, the trunk's RoPE
    u = u + mlp(post_attention_layernorm(u))                   # own router / experts / shared expert
    out = norm(u)                                              # mtp.norm
    logits = lm_head(out)                                      # lm_head shared with the trunk

Position convention used by this reference: the pair (h_t, x_{t+1}) sits at p = t + 1, the position
of x_{t+1} (docs/model.md). vLLM's EAGLE proposer and SGLang's draft-extend use the position of h_t
(p = t) instead. Since the MTP layer only attends over its own KV cache and RoPE scores depend on
position differences only, both conventions give the same logits (up to rounding) as long as one is
used consistently for the cache and the queries; `tools/add_mtp_fixtures.py` checks this.

Chained drafting (num_steps > 1): step s + 1 takes the token drafted at step s and, as its hidden
input, `out` of step s (the MTP layer's output AFTER mtp.norm), at the next position. This is what
vLLM (`Qwen3NextMultiTokenPredictor.forward` returns `self.norm(hidden_states, residual)`, which the
proposer feeds back as `hidden_states`) and SGLang (`Qwen3NextForCausalLMMTP` runs `Qwen3NextModel`,
whose final norm is `mtp.norm`, and its logits processor returns that normed hidden) do.

Weight names (as in a checkpoint, with the `mtp.` prefix):
    mtp.fc.weight [H, 2H], mtp.pre_fc_norm_embedding.weight [H], mtp.pre_fc_norm_hidden.weight [H],
    mtp.norm.weight [H], mtp.layers.0.{input_layernorm,post_attention_layernorm}.weight [H],
    mtp.layers.0.self_attn.{q_proj,k_proj,v_proj,o_proj,q_norm,k_norm}.weight,
    mtp.layers.0.mlp.gate.weight [E, H], mtp.layers.0.mlp.shared_expert.{gate,up,down}_proj.weight,
    mtp.layers.0.mlp.shared_expert_gate.weight [1, H], and the experts either per expert
    mtp.layers.0.mlp.experts.{e}.{gate,up,down}_proj.weight or fused
    mtp.layers.0.mlp.experts.gate_up_proj [E, 2I, H] (gate rows first), mtp.layers.0.mlp.experts.down_proj [E, H, I].
In memory (this module's state_dict) the names have no `mtp.` prefix and the experts are fused.
"""

import copy
import re
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F


def _family_classes(config):
    """transformers' decoder-layer and RMSNorm classes for the trunk's config."""
    mt = getattr(config, "model_type", "")
    if mt.startswith("qwen3_next"):
        from transformers.models.qwen3_next import modeling_qwen3_next as m
        return m.Qwen3NextDecoderLayer, m.Qwen3NextRMSNorm
    if mt.startswith("qwen3_5_moe"):
        from transformers.models.qwen3_5_moe import modeling_qwen3_5_moe as m
        return m.Qwen3_5MoeDecoderLayer, m.Qwen3_5MoeRMSNorm
    raise ValueError(f"unsupported model_type {mt!r}")


def layer_config(config):
    """The trunk's text config turned into a one-layer, full-attention, MoE config."""
    c = copy.deepcopy(config)
    c.num_hidden_layers = 1
    c.layer_types = ["full_attention"]
    if hasattr(c, "mlp_only_layers"):
        c.mlp_only_layers = []
    if hasattr(c, "decoder_sparse_step"):
        c.decoder_sparse_step = 1
    return c


class KVCache:
    """The MTP layer's own KV cache: k, v as [B, S, Hkv, hd] (after k_norm and RoPE)."""

    def __init__(self):
        self.k = None
        self.v = None

    def __len__(self):
        return 0 if self.k is None else self.k.shape[1]

    def append(self, k, v):
        self.k = k if self.k is None else torch.cat([self.k, k], 1)
        self.v = v if self.v is None else torch.cat([self.v, v], 1)
        return self.k, self.v


def rope(x, cos, sin):
    """NeoX RoPE on the first rot = cos.shape[-1] dims. x [B, T, heads, hd]; cos, sin [T, rot]."""
    rot = cos.shape[-1]
    xr, xp = x[..., :rot], x[..., rot:]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    x1, x2 = xr[..., : rot // 2], xr[..., rot // 2:]
    rotated = torch.cat([-x2, x1], -1)
    return torch.cat([xr * c + rotated * s, xp], -1)


class MTPHead(nn.Module):
    """The MTP head: fc + norms + one full-attention MoE decoder layer (transformers' class).

    `embed_tokens`, `lm_head` and `inv_freq` come from the trunk and are not parameters of this
    module (its state_dict holds exactly the `mtp.*` tensors, without the prefix, experts fused).
    """

    def __init__(self, config, embed_tokens, lm_head, inv_freq):
        super().__init__()
        Layer, Norm = _family_classes(config)
        H, eps = config.hidden_size, config.rms_norm_eps
        self.config = config
        self.fc = nn.Linear(2 * H, H, bias=False)
        self.pre_fc_norm_embedding = Norm(H, eps=eps)
        self.pre_fc_norm_hidden = Norm(H, eps=eps)
        self.norm = Norm(H, eps=eps)
        self.layer_config = layer_config(config)
        self.layers = nn.ModuleList([Layer(self.layer_config, 0)])
        self._shared = (embed_tokens, lm_head)  # a tuple: not registered as submodules
        self.register_buffer("inv_freq", inv_freq.detach().clone().float(), persistent=False)
        self.use_sdpa = False  # training may switch to F.scaled_dot_product_attention

    # -- pieces ---------------------------------------------------------------------------------
    def cos_sin(self, positions):
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat([freqs, freqs], -1)
        return emb.cos(), emb.sin()

    def attention(self, x, positions, cache):
        """Gated attention of docs/model.md over this layer's own KV cache. x [B, T, H] (normed)."""
        a = self.layers[0].self_attn
        B, T, _ = x.shape
        hd = a.head_dim
        qg = a.q_proj(x).view(B, T, -1, 2 * hd)
        q, gate = qg.chunk(2, -1)                       # per head [q | gate]
        Hq = q.shape[2]
        gate = gate.reshape(B, T, Hq * hd)
        k = a.k_proj(x).view(B, T, -1, hd)
        v = a.v_proj(x).view(B, T, -1, hd)
        Hkv = k.shape[2]
        q, k = a.q_norm(q), a.k_norm(k)
        cos, sin = self.cos_sin(positions)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        past = 0 if cache is None else len(cache)
        if cache is not None:
            k, v = cache.append(k, v)
        S = k.shape[1]
        rep = Hq // Hkv
        kk = k.repeat_interleave(rep, dim=2).transpose(1, 2)   # [B, Hq, S, hd]; head h -> kv head h // rep
        vv = v.repeat_interleave(rep, dim=2).transpose(1, 2)
        qq = q.transpose(1, 2)                                 # [B, Hq, T, hd]
        # query i (absolute cache index past + i) sees keys j <= past + i
        allowed = torch.arange(S, device=x.device)[None, :] <= (past + torch.arange(T, device=x.device))[:, None]
        if self.use_sdpa:
            o = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=None if past == 0 else allowed,
                                               is_causal=(past == 0), scale=hd ** -0.5)
        else:
            s = torch.matmul(qq, kk.transpose(-1, -2)) * hd ** -0.5
            s = s.masked_fill(~allowed, float("-inf"))
            p = torch.softmax(s.float(), dim=-1).to(qq.dtype)
            o = torch.matmul(p, vv)
        o = o.transpose(1, 2).reshape(B, T, Hq * hd)
        return a.o_proj(o * torch.sigmoid(gate))

    def moe(self, x):
        out = self.layers[0].mlp(x)
        return out[0] if isinstance(out, tuple) else out

    # -- one step -------------------------------------------------------------------------------
    def forward(self, hidden, tokens, positions, cache=None):
        """hidden [B, T, H]: h_t (trunk, after model.norm) or the previous step's `out`;
        tokens [B, T]: x_{t+1}; positions [T]: RoPE positions (this reference: position of x_{t+1});
        cache: a KVCache (appended to) or None (a causal pass over these T entries alone).
        Returns (out [B, T, H] after mtp.norm, logits [B, T, V])."""
        embed_tokens, lm_head = self._shared
        e = self.pre_fc_norm_embedding(embed_tokens(tokens))
        g = self.pre_fc_norm_hidden(hidden)
        u = self.fc(torch.cat([e, g], -1))
        layer = self.layers[0]
        u = u + self.attention(layer.input_layernorm(u), positions, cache)
        u = u + self.moe(layer.post_attention_layernorm(u))
        out = self.norm(u)
        return out, lm_head(out)

    # -- reference procedures -------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, hidden, ids, cache, start=0):
        """Draft over a prompt: pairs (h_t, x_{t+1}) for t = 0 .. n-2 at positions t + 1 + start.
        hidden [n, H] (trunk, after model.norm), ids [n]. Fills `cache`. Returns (out, logits) [n-1, .]."""
        n = ids.shape[0]
        pos = torch.arange(1, n, device=ids.device) + start
        out, logits = self(hidden[None, : n - 1], ids[None, 1:], pos, cache)
        return out[0], logits[0]

    @torch.no_grad()
    def chain(self, h_last, next_token, first_position, cache, steps):
        """Chained greedy drafting after a prefill: step 1 is (h_last, next_token) at first_position;
        step s + 1 is (out_s after mtp.norm, argmax logits_s) at first_position + s."""
        hid = h_last.reshape(1, 1, -1)
        tok = torch.as_tensor([[int(next_token)]], device=h_last.device)
        toks, logits_all = [], []
        for s in range(steps):
            pos = torch.tensor([first_position + s], device=h_last.device)
            out, lg = self(hid, tok, pos, cache)
            d = int(lg[0, -1].argmax())
            toks.append(d)
            logits_all.append(lg[0, -1])
            hid, tok = out, torch.tensor([[d]], device=h_last.device)
        return toks, torch.stack(logits_all)


# ------------------------------------------------------------------------------------------------
# Checkpoint names <-> module names
# ------------------------------------------------------------------------------------------------

def to_checkpoint(sd, expert_layout):
    """This module's state_dict -> `mtp.*` tensors, experts "per_expert" or "fused"."""
    out = OrderedDict()
    for k, v in sd.items():
        m = re.match(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$", k)
        if m and expert_layout == "per_expert":
            base, which = m.groups()
            if which == "gate_up_proj":
                I = v.shape[1] // 2
                for e in range(v.shape[0]):
                    out[f"mtp.{base}.{e}.gate_proj.weight"] = v[e, :I]
                    out[f"mtp.{base}.{e}.up_proj.weight"] = v[e, I:]
            else:
                for e in range(v.shape[0]):
                    out[f"mtp.{base}.{e}.down_proj.weight"] = v[e]
            continue
        out["mtp." + k] = v
    return OrderedDict((k, v.detach().contiguous().clone()) for k, v in out.items())


def from_checkpoint(tensors):
    """`mtp.*` tensors (either expert layout) -> this module's state_dict names (experts fused)."""
    out = OrderedDict()
    experts = {}
    for k, v in tensors.items():
        if not k.startswith("mtp."):
            continue
        k = k[len("mtp."):]
        m = re.match(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$", k)
        if m:
            experts.setdefault(m.group(1), {}).setdefault(int(m.group(2)), {})[m.group(3)] = v
            continue
        out[k] = v
    for base, d in experts.items():
        E = max(d) + 1
        out[base + ".gate_up_proj"] = torch.stack([torch.cat([d[e]["gate_proj"], d[e]["up_proj"]], 0) for e in range(E)])
        out[base + ".down_proj"] = torch.stack([d[e]["down_proj"] for e in range(E)])
    return out


def build_for(trunk):
    """An MTPHead bound to a transformers *ForCausalLM trunk (shares its embedding, lm_head, RoPE)."""
    base = trunk.model
    inner = getattr(base, "language_model", base)
    inv_freq = inner.rotary_emb.inv_freq
    return MTPHead(trunk.config.get_text_config() if hasattr(trunk.config, "get_text_config") else trunk.config,
                   inner.embed_tokens, trunk.get_output_embeddings(), inv_freq)

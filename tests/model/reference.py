"""A plain, obviously-correct Parcae forward written from the spec (parcae-model.md), reading
weights by their released state-dict names. No cache, no batching tricks, no shared code with
`model/`: explicit softmax attention, explicit cos/sin RoPE on interleaved pairs."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ACT = {
    "ReLU2": lambda x: 0.5 * torch.relu(x) ** 2,
    "GELU": F.gelu,
    "SiLU": F.silu,
}


def rmsnorm(x, weight, eps):
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return y if weight is None else y * weight


def rope(x, base, condense):
    """x: (L, H, hd); pair (2m, 2m+1) turns by pos / base^(2m/hd)."""
    L, _, hd = x.shape
    x = x.float()
    out = torch.empty_like(x)
    for m in range(hd // 2):
        inv = 1.0 / (base ** (2 * m / hd))
        ang = (torch.arange(L, dtype=torch.float64) / condense * inv).float()[:, None]
        a, b = x[..., 2 * m], x[..., 2 * m + 1]
        out[..., 2 * m] = a * torch.cos(ang) - b * torch.sin(ang)
        out[..., 2 * m + 1] = a * torch.sin(ang) + b * torch.cos(ang)
    return out


def block(sd, prefix, x, ids, cfg, j):
    """One pre-norm block on a single sequence x: (L, width)."""
    eps = cfg["norm_eps"]
    L, width = x.shape
    heads = cfg["heads"][prefix.split(".")[1]]
    kv = cfg["kv_heads"][prefix.split(".")[1]]
    hd = width // heads
    h = rmsnorm(x, sd[f"{prefix}.norm_1.weight"], eps)
    q = (h @ sd[f"{prefix}.attn.c_q.weight"].T).view(L, heads, hd)
    k = (h @ sd[f"{prefix}.attn.c_k.weight"].T).view(L, kv, hd)
    v = (h @ sd[f"{prefix}.attn.c_v.weight"].T).view(L, kv, hd)
    gate_key = f"{prefix}.attn.ve_gate.weight"
    if gate_key in sd and f"value_embeds.{j}.weight" in sd:
        gate = 2 * torch.sigmoid(h[:, :32] @ sd[gate_key].T)  # (L, kv)
        ve = sd[f"value_embeds.{j}.weight"][ids].view(L, kv, hd)
        v = v + gate[..., None] * ve
    q = rope(q, cfg["rope_base"], 1)
    k = rope(k, cfg["rope_base"], 1)
    q, k = rmsnorm(q, None, eps).to(x.dtype), rmsnorm(k, None, eps).to(x.dtype)
    outs = []
    for head in range(heads):
        kh = head // (heads // kv)
        scores = (q[:, head] @ k[:, kh].T) / math.sqrt(hd)
        scores = scores.masked_fill(torch.ones(L, L).triu(1).bool(), float("-inf"))
        outs.append(torch.softmax(scores.float(), -1).to(x.dtype) @ v[:, kh])
    x = x + torch.cat(outs, -1) @ sd[f"{prefix}.attn.c_proj.weight"].T
    h = rmsnorm(x, sd[f"{prefix}.norm_2.weight"], eps)
    f = h @ sd[f"{prefix}.mlp.fc.weight"].T
    act = ACT[cfg["nonlin_name"]]
    if cfg["mlp_class_name"] == "GatedMLP":
        a, b = f.chunk(2, -1)
        f = act(a) * b
    else:
        f = act(f)
    return x + f @ sd[f"{prefix}.mlp.proj.weight"].T


def reference_forward(sd, cfg, ids, depth, h0):
    """ids: (L,) one sequence; h0: (L, d_rec) initial state; returns fp32 logits (L, vocab)."""
    P, R, C = cfg["P"], cfg["R"], cfg["C"]
    x = sd["transformer.wte.weight"][ids]
    for i in range(P):
        x = block(sd, f"transformer.prelude.{i}", x, ids, cfg, i)
    e = rmsnorm(x, sd["transformer.ln_prelude.weight"], cfg["norm_eps"])
    h = h0
    for _ in range(depth):
        if cfg["injection_type"] == "diagonal":
            dt = F.softplus(sd["transformer.adapter.dt_bias"])
            decay = torch.exp(-dt * torch.exp(sd["transformer.adapter.A_log"]))
            h = h * decay + dt * (e @ sd["transformer.adapter.B"].T)
        elif cfg["injection_type"] == "linear":
            h = torch.cat([h, e], -1) @ sd["transformer.adapter.adapter.weight"].T
        else:
            h = h + e
        for i in range(R):
            h = block(sd, f"transformer.core_block.{i}", h, ids, cfg, P + i)
    y = h @ sd["transformer.C.weight"].T
    for i in range(C):
        y = block(sd, f"transformer.coda.{i}", y, ids, cfg, P + R + i)
    y = rmsnorm(y, sd["transformer.ln_f.weight"], cfg["norm_eps"])
    logits = (y @ sd["transformer.wte.weight"].T).float()[:, : cfg["vocab_size"]]
    if cfg.get("logit_softcap"):
        logits = cfg["logit_softcap"] * torch.tanh(logits / cfg["logit_softcap"])
    return logits

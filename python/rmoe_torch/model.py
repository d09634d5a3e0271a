"""RMoE's transformer in plain PyTorch, readable in one sitting.

This is a reference, not a fast implementation: every computation follows what RMoE's C++
model does (rmoe/model/*.cc) in the same order and precision, so that float32 logits agree
to ~1e-6. Parameter names are exactly the tensor names of an export's model.safetensors
(docs/export.md), so `load_state_dict(strict=True)` works without any renaming.

    x = embedding[tokens]
    for each layer:  x = x + Attention(RMSNorm(x));  x = x + FFN_or_MoE(RMSNorm(x))
    logits = RMSNorm(x) @ (lm_head or embedding).T
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import RMoEConfig, expert_capacity


def _empty(*shape: int) -> nn.Parameter:
    # Weights come from model.safetensors; an unloaded model holds zeros, not random values.
    return nn.Parameter(torch.zeros(*shape))


# ----------------------------------------------------------------------------- norm


class RMSNorm(nn.Module):
    """y = x * rsqrt(mean(x^2) + eps) * weight, in float32 even for bf16/fp16 activations."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wide = x.float() if x.dtype in (torch.bfloat16, torch.float16) else x
        # RMoE rounds the weight to x's dtype first, then widens it (RmsNormFromOperators).
        w = self.weight.to(x.dtype).to(wide.dtype)
        y = wide * torch.rsqrt(wide.square().mean(-1, keepdim=True) + self.eps) * w
        return y.to(x.dtype)


# ----------------------------------------------------------------------------- attention


def rotary_tables(max_seq_len: int, head_dim: int, theta: float):
    """cos and sin of angle[pos, i] = pos * theta^(-2i/head_dim), [max_seq_len, head_dim/2].

    The angles are computed in float64 and only then rounded to float32, as RMoE does: at
    position ~1000 a float32 angle is already off by ~1e-4 radians.
    """
    inv_freq = torch.pow(float(theta), -torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Turns the channel pairs (2i, 2i+1) of each head (x: [B, H, T, hd]) by their angle.

    RMoE's layout is interleaved pairs, NOT the half-split (i, i + hd/2) of most Hugging
    Face code. The rotation is done in float32 (bf16 inputs are widened first).
    """
    wide = x.float() if x.dtype in (torch.bfloat16, torch.float16) else x
    pairs = wide.unflatten(-1, (x.size(-1) // 2, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    c, s = cos.to(wide.dtype), sin.to(wide.dtype)  # [T, hd/2], broadcast over B and H
    turned = torch.stack((a * c - b * s, a * s + b * c), dim=-1).flatten(-2)
    return turned.to(x.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: RMoEConfig):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        # One fused projection: output rows are q, then k, then v, each num_heads x head_dim.
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        cos, sin = rotary_tables(cfg.max_seq_len, cfg.head_dim, cfg.rope_theta)
        # Derived from the config, not saved: non-persistent buffers stay out of state_dict.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        if T > self.rope_cos.size(0):
            raise ValueError(f"a sequence of {T} tokens exceeds max_seq_len = {self.rope_cos.size(0)}")
        qkv = self.qkv(x).view(B, T, 3, self.num_heads, self.head_dim)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # each [B, H, T, hd]
        cos, sin = self.rope_cos[:T].float(), self.rope_sin[:T].float()
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        # Causal softmax attention, scores scaled by 1/sqrt(hd), softmax in float32. (RMoE
        # calls the fused scaled_dot_product_attention; the plain form differs by ~1e-7.)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)
        future = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
        y = probs.to(v.dtype) @ v  # [B, H, T, hd]
        return self.out(y.transpose(1, 2).reshape(B, T, D))


# ----------------------------------------------------------------------------- FFNs


class SwiGLU(nn.Module):
    """Dense FFN (and the shared expert): (silu(x @ w1.T) * (x @ w3.T)) @ w2.T."""

    def __init__(self, d_model: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, hidden_dim, bias=False)
        self.w3 = nn.Linear(d_model, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Experts(nn.Module):
    """E SwiGLU experts stacked: w1, w3 [E, D, H], w2 [E, H, D], applied as x @ w[e].

    Unlike nn.Linear weights these are NOT transposed (and have no ".weight" suffix).
    """

    def __init__(self, num_experts: int, d_model: int, hidden_dim: int):
        super().__init__()
        self.w1 = _empty(num_experts, d_model, hidden_dim)
        self.w3 = _empty(num_experts, d_model, hidden_dim)
        self.w2 = _empty(num_experts, hidden_dim, d_model)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return (F.silu(x @ self.w1[e]) * (x @ self.w3[e])) @ self.w2[e]


# ----------------------------------------------------------------------------- routers


class RecurrentCell(nn.Module):
    """PyTorch's GRUCell / RNNCell (tanh) as explicit equations, PyTorch's parameters.

    GRU gate order in w_ih / w_hh rows: r (reset), z (update), n (new), as nn.GRUCell.
    """

    def __init__(self, cell: str, hidden_dim: int):
        super().__init__()
        self.cell, self.hidden_dim = cell, hidden_dim
        gates = 3 if cell == "gru" else 1
        # The router cell's input is the projection h @ proj.T, of width hidden_dim too.
        self.w_ih = _empty(gates * hidden_dim, hidden_dim)
        self.w_hh = _empty(gates * hidden_dim, hidden_dim)
        self.b_ih = _empty(gates * hidden_dim)
        self.b_hh = _empty(gates * hidden_dim)

    def input_gates(self, u: torch.Tensor) -> torch.Tensor:
        """The part of the gates that does not depend on the state: u @ w_ih.T + b_ih."""
        return F.linear(u, self.w_ih.to(u.dtype), self.b_ih.to(u.dtype))

    def step(self, gi: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """One step from precomputed input gates gi and the previous state h."""
        gh = F.linear(h, self.w_hh.to(h.dtype), self.b_hh.to(h.dtype))
        if self.cell == "rnn":
            return torch.tanh(gi + gh)
        i_r, i_z, i_n = gi.chunk(3, dim=-1)
        h_r, h_z, h_n = gh.chunk(3, dim=-1)
        r = torch.sigmoid(i_r + h_r)
        z = torch.sigmoid(i_z + h_z)
        n = torch.tanh(i_n + r * h_n)  # the reset gate scales W_hn h + b_hn (PyTorch's GRU)
        return (1 - z) * n + z * h


class Router(nn.Module):
    """Router logits [N, E] (float32) for the N = B*T tokens of h [B, T, D].

    linear:              logits = h @ gate.T
    recurrent, layer:    carry = Cell(h @ proj.T, carry); logits = carry @ gate.T, where the
                         cell is the model's one shared `router_cell` and `carry` is the
                         state the previous MoE layer left for the same token (zeros first)
    recurrent, token:    this layer's own cell scans the sequence,
                         s_t = Cell(h_t @ proj.T, s_{t-1}), s_{-1} = 0; logits_t = s_t @ gate.T
    recurrent, none:     as layer, but every MoE layer starts from zeros and passes nothing on
    mlp:                 logits = tanh(h @ hidden.T + hidden_bias) @ gate.T
    (detach_state changes only gradients: the forward pass is layer recurrence's.)
    """

    def __init__(self, cfg: RMoEConfig):
        super().__init__()
        rc = cfg.router
        self.kind, self.recurrence = rc.type, rc.recurrence
        E = cfg.moe.num_experts
        if self.kind == "linear":
            self.gate = _empty(E, cfg.d_model)
            return
        if self.kind == "mlp":
            self.hidden = _empty(rc.hidden_dim, cfg.d_model)
            self.hidden_bias = _empty(rc.hidden_dim)
            self.gate = _empty(E, rc.hidden_dim)
            return
        self.proj = _empty(rc.hidden_dim, cfg.d_model)
        if self.recurrence == "token":
            self.cell = RecurrentCell(rc.cell, rc.hidden_dim)
        self.gate = _empty(E, rc.hidden_dim)

    def forward(self, h: torch.Tensor, carry: Optional[torch.Tensor],
                shared_cell: Optional[RecurrentCell]):
        """Returns (logits [B*T, E], the carry for the next MoE layer)."""
        B, T, D = h.shape
        h = h.float() if h.dtype in (torch.bfloat16, torch.float16) else h  # routing in fp32
        if self.kind == "linear":
            return h.reshape(B * T, D) @ self.gate.to(h.dtype).T, carry
        gate = self.gate.to(h.dtype)
        if self.kind == "mlp":
            hidden = torch.tanh(h.reshape(B * T, D) @ self.hidden.to(h.dtype).T
                                + self.hidden_bias.to(h.dtype))
            return hidden @ gate.T, carry
        u = h @ self.proj.to(h.dtype).T  # [B, T, R]
        if self.recurrence in ("layer", "none"):
            u = u.reshape(B * T, -1)
            start = carry if self.recurrence == "layer" and carry is not None else torch.zeros_like(u)
            state = shared_cell.step(shared_cell.input_gates(u), start)
            return state @ gate.T, (state if self.recurrence == "layer" else carry)
        # Token recurrence: a left-to-right scan; the input gates of all steps at once.
        gi = self.cell.input_gates(u)
        s = torch.zeros(B, self.cell.hidden_dim, dtype=u.dtype, device=u.device)
        states = []
        for t in range(T):
            s = self.cell.step(gi[:, t], s)
            states.append(s)
        return torch.stack(states, dim=1).reshape(B * T, -1) @ gate.T, carry


# ----------------------------------------------------------------------------- MoE


class MoE(nn.Module):
    def __init__(self, cfg: RMoEConfig):
        super().__init__()
        m = cfg.moe
        self.top_k, self.renormalize = m.top_k, m.renormalize
        self.capacity_factor = m.capacity_factor
        self.moe_weight, self.shared_expert_weight = m.moe_weight, m.shared_expert_weight
        self.router = Router(cfg)
        self.experts = Experts(m.num_experts, cfg.d_model, m.expert_hidden_dim)
        self.shared_expert = (SwiGLU(cfg.d_model, m.shared_expert_hidden_dim)
                              if m.shared_expert else None)

    def forward(self, h: torch.Tensor, carry, shared_cell, capacity_prefix: Optional[int] = None):
        B, T, D = h.shape
        N, k, E = B * T, self.top_k, self.experts.w1.size(0)
        logits, carry = self.router(h, carry, shared_cell)
        probs = torch.softmax(logits, dim=-1)
        weight, expert = torch.topk(probs, k, dim=-1)  # [N, k] each, most likely first
        if self.renormalize:
            weight = weight / weight.sum(-1, keepdim=True)

        # Assignments in GShard priority order: every token's first choice (in token order),
        # then every second choice, ... An expert over capacity keeps the earliest ones.
        a_expert = expert.t().reshape(-1)                    # [k*N]
        a_weight = weight.t().reshape(-1)
        a_token = torch.arange(N, device=h.device).repeat(k)
        # Tokens that compete for capacity: all of them, or (to replay RMoE's cached
        # generation, see RMoEForCausalLM.forward) only the first `capacity_prefix` positions.
        if capacity_prefix is None:
            limited = torch.ones(N, dtype=torch.bool, device=h.device)
            capacity = expert_capacity(self.capacity_factor, N, k, E)
        else:
            limited = (torch.arange(T, device=h.device) < capacity_prefix).repeat(B)
            capacity = expert_capacity(self.capacity_factor, B * min(capacity_prefix, T), k, E)
        a_limited = limited[a_token]

        flat = h.reshape(N, D)
        y = torch.zeros_like(flat)
        # Expert by expert, summing weighted outputs into their tokens' rows in the same
        # order as RMoE (grouped by expert, then priority), so float sums round the same.
        for e in range(E):
            idx = (a_expert == e).nonzero().squeeze(1)  # ascending = priority order
            if capacity > 0:
                rank = torch.cumsum(a_limited[idx].long(), 0)  # rank among competing ones
                idx = idx[~a_limited[idx] | (rank <= capacity)]
            if idx.numel() == 0:
                continue
            tokens = a_token[idx]
            out = self.experts.expert(e, flat[tokens])
            y.index_add_(0, tokens, out * a_weight[idx].unsqueeze(1).to(out.dtype))
        y = y.view(B, T, D)

        if self.shared_expert is not None:
            y = self.moe_weight * y + self.shared_expert_weight * self.shared_expert(h)
        elif self.moe_weight != 1.0:
            y = self.moe_weight * y
        return y, carry


# ----------------------------------------------------------------------------- model


class Block(nn.Module):
    def __init__(self, cfg: RMoEConfig, is_moe: bool):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        if is_moe:
            self.moe = MoE(cfg)
        else:
            self.ffn = SwiGLU(cfg.d_model, cfg.dense_hidden_dim)

    def forward(self, x, carry, shared_cell, capacity_prefix=None):
        x = x + self.attn(self.attn_norm(x))
        h = self.ffn_norm(x)
        if hasattr(self, "ffn"):
            return x + self.ffn(h), carry
        y, carry = self.moe(h, carry, shared_cell, capacity_prefix)
        return x + y, carry


class RMoEForCausalLM(nn.Module):
    def __init__(self, cfg: RMoEConfig):
        super().__init__()
        self.config = cfg
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
        rc = cfg.router
        # Layer recurrence: ONE cell shared by every MoE layer, owned by the model.
        self.router_cell = (RecurrentCell(rc.cell, rc.hidden_dim)
                            if rc.type == "recurrent" and rc.recurrence in ("layer", "none")
                            else None)
        self.layers = nn.ModuleList(Block(cfg, cfg.is_moe_layer(i)) for i in range(cfg.num_layers))
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = (None if cfg.tie_embeddings
                        else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False))

    def forward(self, tokens: torch.Tensor, capacity_prefix: Optional[int] = None) -> torch.Tensor:
        """tokens [B, T] (int64) -> logits [B, T, V] in float32 (float64 for a float64 model).

        capacity_prefix: None = capacity dropping (if the model has a capacity_factor) over
        all B*T tokens, as one RMoE forward pass. An int P: only positions < P compete for
        capacity (computed from B*P tokens) and later positions are routed dropless; that is
        what RMoE's cached generation does (the prompt in one pass, then one token per pass,
        which can never overflow an expert), replayed by re-running the whole prefix.
        """
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [batch, time], got shape {list(tokens.shape)}")
        x = self.embedding(tokens)
        carry = None  # the layer-recurrent router's state, per token
        for block in self.layers:
            x, carry = block(x, carry, self.router_cell, capacity_prefix)
        x = self.final_norm(x)
        head = self.embedding.weight if self.lm_head is None else self.lm_head.weight
        logits = x @ head.T
        return logits.to(torch.float64 if logits.dtype == torch.float64 else torch.float32)

"""config.json of an RMoE export folder, read and checked (docs/export.md).

Every architectural fact is explicit in the file, so nothing here has a default that
could silently differ from RMoE's: a missing key is an error naming the file and the key.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

FORMAT = "rmoe"
FORMAT_VERSIONS = (1,)  # the versions this reader understands

# safetensors dtype names <-> config.json torch_dtype names.
SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}


class ExportError(ValueError):
    """An export folder that this reader cannot load as it is (the message says why)."""


def _f32(x: float) -> float:
    # RMoE keeps eps, theta, the MoE weights and the capacity factor as protobuf floats:
    # the values it computes with are the float32 roundings of what config.json prints.
    return struct.unpack("<f", struct.pack("<f", x))[0]


class _Reader:
    """Reads keys of one JSON object, naming the file and the key path in every error."""

    def __init__(self, obj: Any, path: str, where: str = ""):
        if not isinstance(obj, dict):
            raise ExportError(f"{path}: {where or 'the top level'} must be a JSON object")
        self.obj, self.path, self.where = obj, path, where

    def _name(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def get(self, key: str, kinds, optional: bool = False):
        if key not in self.obj:
            if optional:
                return None
            raise ExportError(f"{self.path}: missing key '{self._name(key)}'")
        value = self.obj[key]
        if value is None and optional:  # JSON null where the key is optional
            return None
        # JSON booleans are ints in Python; keep them apart.
        ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in _tuple(kinds))
        if not ok:
            raise ExportError(f"{self.path}: '{self._name(key)}' is {value!r}, expected "
                              f"{' or '.join(k.__name__ for k in _tuple(kinds))}")
        return value

    def int(self, key: str, minimum: int = 0) -> int:
        value = self.get(key, int)
        if value < minimum:
            raise ExportError(f"{self.path}: '{self._name(key)}' is {value}, must be >= {minimum}")
        return value

    def number(self, key: str) -> float:
        return float(self.get(key, (int, float)))

    def bool(self, key: str) -> bool:
        return self.get(key, bool)

    def str(self, key: str, choices=None) -> str:
        value = self.get(key, str)
        if choices is not None and value not in choices:
            raise ExportError(f"{self.path}: '{self._name(key)}' is {value!r}; this reader knows "
                              f"{', '.join(repr(c) for c in choices)}")
        return value

    def sub(self, key: str) -> "_Reader":
        return _Reader(self.get(key, dict), self.path, self._name(key))


def _tuple(kinds):
    return kinds if isinstance(kinds, tuple) else (kinds,)


@dataclass
class RouterConfig:
    type: str                      # "linear" | "recurrent" | "mlp"
    cell: Optional[str] = None     # "gru" | "rnn" (recurrent only)
    recurrence: Optional[str] = None  # "layer" | "token" | "none" (recurrent only)
    hidden_dim: int = 0            # R (recurrent), or the MLP's hidden size
    detach_state: bool = False     # layer recurrence: no gradient through the passed state

    @property
    def gates(self) -> int:
        return 3 if self.cell == "gru" else 1


@dataclass
class MoEConfig:
    layers: List[int]
    num_experts: int
    top_k: int
    expert_hidden_dim: int
    renormalize: bool
    capacity_factor: float         # 0 = dropless
    shared_expert: bool
    shared_expert_hidden_dim: int
    moe_weight: float
    shared_expert_weight: float
    aux_loss_coef: float = 0.0     # training only; kept for completeness
    z_loss_coef: float = 0.0


@dataclass
class TokenizerInfo:
    type: str                      # "byte" | "bpe"
    vocab_size: int
    document_separator: int
    bos_token_id: int
    eos_token_id: int
    file: Optional[str]            # "tokenizer.model" for BPE, None for bytes


@dataclass
class RMoEConfig:
    vocab_size: int
    d_model: int
    num_layers: int
    num_heads: int
    head_dim: int
    max_seq_len: int
    tie_embeddings: bool
    norm_eps: float
    rope_theta: float
    dense_hidden_dim: int
    moe: MoEConfig
    router: RouterConfig
    tokenizer: TokenizerInfo
    torch_dtype: str = "float32"
    source: Dict[str, Any] = field(default_factory=dict)
    path: str = ""                 # the config.json it was read from

    # ------------------------------------------------------------------ reading

    @classmethod
    def from_json_file(cls, path: str) -> "RMoEConfig":
        if not os.path.isfile(path):
            raise ExportError(f"{path}: no such file (an export folder has a config.json)")
        try:
            with open(path, encoding="utf-8") as f:
                obj = json.load(f)
        except json.JSONDecodeError as e:
            raise ExportError(f"{path}: not valid JSON: {e}") from e
        return cls.from_dict(obj, path)

    @classmethod
    def from_dict(cls, obj: Dict[str, Any], path: str = "config.json") -> "RMoEConfig":
        r = _Reader(obj, path)
        # Version first: a newer layout may have renamed anything below.
        fmt = r.get("format", str)
        if fmt != FORMAT:
            raise ExportError(f"{path}: key 'format' is {fmt!r}; this reader loads only "
                              f"{FORMAT!r} (an RMoE export made by `rmoe_ckpt export`)")
        version = r.get("format_version", int)
        if version not in FORMAT_VERSIONS:
            raise ExportError(f"{path}: key 'format_version' is {version}; this reader knows "
                              f"version(s) {', '.join(map(str, FORMAT_VERSIONS))}: update "
                              f"python/rmoe_torch, or export with a matching RMoE")
        r.str("architecture", ("RMoETransformer",))
        torch_dtype = r.str("torch_dtype", tuple(SAFETENSORS_DTYPES.values()))

        norm = r.sub("norm")
        norm.str("type", ("rmsnorm",))
        rotary = r.sub("rotary")
        rotary.str("layout", ("interleaved_pairs",))
        attention = r.sub("attention")
        attention.str("qkv", ("fused",))
        if attention.bool("bias"):
            raise ExportError(f"{path}: 'attention.bias' is true; RMoE's attention has no biases")
        if not attention.bool("causal"):
            raise ExportError(f"{path}: 'attention.causal' is false; RMoE's attention is causal")
        dense = r.sub("dense_ffn")
        dense.str("type", ("swiglu",))

        m = r.sub("moe")
        layers = m.get("layers", list)
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
            raise ExportError(f"{path}: 'moe.layers' must be a list of layer indices, got {layers!r}")
        moe = MoEConfig(
            layers=list(layers),
            num_experts=m.int("num_experts", 1),
            top_k=m.int("top_k", 1),
            expert_hidden_dim=m.int("expert_hidden_dim", 1),
            renormalize=m.bool("renormalize"),
            capacity_factor=_f32(m.number("capacity_factor")),
            shared_expert=m.bool("shared_expert"),
            shared_expert_hidden_dim=m.int("shared_expert_hidden_dim", 0),
            moe_weight=_f32(m.number("moe_weight")),
            shared_expert_weight=_f32(m.number("shared_expert_weight")),
            aux_loss_coef=m.number("aux_loss_coef"),
            z_loss_coef=m.number("z_loss_coef"),
        )

        rr = r.sub("router")
        router = RouterConfig(type=rr.str("type", ("linear", "recurrent", "mlp")))
        if router.type == "mlp":
            router.hidden_dim = rr.int("hidden_dim", 1)
            rr.str("activation", ("tanh",))
        if router.type == "recurrent":
            router.cell = rr.str("cell", ("gru", "rnn"))
            router.recurrence = rr.str("recurrence", ("layer", "token", "none"))
            router.hidden_dim = rr.int("hidden_dim", 1)
            router.detach_state = rr.bool("detach_state")
            order = rr.get("gate_order", list, optional=True)
            if router.cell == "gru" and order is not None and order != ["r", "z", "n"]:
                raise ExportError(f"{path}: 'router.gate_order' is {order!r}; this reader knows "
                                  f"PyTorch's ['r', 'z', 'n']")

        tokenizer = tokenizer_info_from_dict(r.get("tokenizer", dict), path, "tokenizer")

        cfg = cls(
            vocab_size=r.int("vocab_size", 1),
            d_model=r.int("d_model", 1),
            num_layers=r.int("num_layers", 1),
            num_heads=r.int("num_heads", 1),
            head_dim=r.int("head_dim", 1),
            max_seq_len=r.int("max_seq_len", 1),
            tie_embeddings=r.bool("tie_embeddings"),
            norm_eps=_f32(norm.number("eps")),
            rope_theta=_f32(rotary.number("theta")),
            dense_hidden_dim=dense.int("hidden_dim", 0),
            moe=moe,
            router=router,
            tokenizer=tokenizer,
            torch_dtype=torch_dtype,
            source=r.get("source", dict, optional=True) or {},
            path=path,
        )
        cfg._check_consistency()
        return cfg

    def _check_consistency(self) -> None:
        p = self.path
        if self.num_heads * self.head_dim != self.d_model:
            raise ExportError(f"{p}: num_heads ({self.num_heads}) x head_dim ({self.head_dim}) "
                              f"!= d_model ({self.d_model})")
        if self.head_dim % 2:
            raise ExportError(f"{p}: head_dim {self.head_dim} is odd; rotary turns channel pairs")
        bad = [i for i in self.moe.layers if not 0 <= i < self.num_layers]
        if bad or len(set(self.moe.layers)) != len(self.moe.layers):
            raise ExportError(f"{p}: 'moe.layers' {self.moe.layers} must be distinct indices in "
                              f"[0, {self.num_layers})")
        if self.moe.top_k > self.moe.num_experts:
            raise ExportError(f"{p}: moe.top_k {self.moe.top_k} > moe.num_experts "
                              f"{self.moe.num_experts}")
        if self.moe.capacity_factor < 0:
            raise ExportError(f"{p}: moe.capacity_factor {self.moe.capacity_factor} is negative")
        if self.tokenizer.vocab_size != self.vocab_size:
            raise ExportError(f"{p}: tokenizer.vocab_size {self.tokenizer.vocab_size} != "
                              f"vocab_size {self.vocab_size}")
        if self.num_layers > len(self.moe.layers) and self.dense_hidden_dim < 1:
            raise ExportError(f"{p}: dense layers need 'dense_ffn.hidden_dim' >= 1")
        if self.moe.shared_expert and self.moe.shared_expert_hidden_dim < 1:
            raise ExportError(f"{p}: a shared expert needs 'moe.shared_expert_hidden_dim' >= 1")

    # ------------------------------------------------------------------ tensors

    def is_moe_layer(self, i: int) -> bool:
        return i in self.moe.layers

    def expected_tensors(self) -> Dict[str, Tuple[int, ...]]:
        """Every tensor model.safetensors must hold for this config, with its shape."""
        D, V, E = self.d_model, self.vocab_size, self.moe.num_experts
        shapes: Dict[str, Tuple[int, ...]] = {"embedding.weight": (V, D)}
        rc = self.router

        def cell(prefix: str) -> None:
            R, G = rc.hidden_dim, rc.gates
            shapes.update({f"{prefix}.w_ih": (G * R, R), f"{prefix}.w_hh": (G * R, R),
                           f"{prefix}.b_ih": (G * R,), f"{prefix}.b_hh": (G * R,)})

        def swiglu(prefix: str, H: int) -> None:
            shapes.update({f"{prefix}.w1.weight": (H, D), f"{prefix}.w3.weight": (H, D),
                           f"{prefix}.w2.weight": (D, H)})

        if rc.type == "recurrent" and rc.recurrence in ("layer", "none"):
            cell("router_cell")
        for i in range(self.num_layers):
            p = f"layers.{i}"
            shapes.update({f"{p}.attn_norm.weight": (D,), f"{p}.ffn_norm.weight": (D,),
                           f"{p}.attn.qkv.weight": (3 * D, D), f"{p}.attn.out.weight": (D, D)})
            if not self.is_moe_layer(i):
                swiglu(f"{p}.ffn", self.dense_hidden_dim)
                continue
            H = self.moe.expert_hidden_dim
            shapes.update({f"{p}.moe.experts.w1": (E, D, H), f"{p}.moe.experts.w3": (E, D, H),
                           f"{p}.moe.experts.w2": (E, H, D)})
            if self.moe.shared_expert:
                swiglu(f"{p}.moe.shared_expert", self.moe.shared_expert_hidden_dim)
            if rc.type == "linear":
                shapes[f"{p}.moe.router.gate"] = (E, D)
            elif rc.type == "mlp":
                shapes[f"{p}.moe.router.hidden"] = (rc.hidden_dim, D)
                shapes[f"{p}.moe.router.hidden_bias"] = (rc.hidden_dim,)
                shapes[f"{p}.moe.router.gate"] = (E, rc.hidden_dim)
            else:
                shapes[f"{p}.moe.router.proj"] = (rc.hidden_dim, D)
                shapes[f"{p}.moe.router.gate"] = (E, rc.hidden_dim)
                if rc.recurrence == "token":
                    cell(f"{p}.moe.router.cell")
        shapes["final_norm.weight"] = (D,)
        if not self.tie_embeddings:
            shapes["lm_head.weight"] = (V, D)
        return shapes

    def check_safetensors(self, path: str) -> None:
        """Compares model.safetensors' header with expected_tensors(): names, shapes, dtype."""
        header = read_safetensors_header(path)
        expected = self.expected_tensors()
        missing = sorted(set(expected) - set(header))
        unexpected = sorted(set(header) - set(expected))
        problems = []
        if missing:
            problems.append(f"missing tensor(s): {', '.join(missing)}")
        if unexpected:
            problems.append(f"unexpected tensor(s): {', '.join(unexpected)}")
        wrong_dtype = []
        for name in sorted(set(expected) & set(header)):
            shape = tuple(header[name]["shape"])
            if shape != expected[name]:
                problems.append(f"tensor '{name}' has shape {list(shape)}, {os.path.basename(self.path)} "
                                f"implies {list(expected[name])}")
            dtype = SAFETENSORS_DTYPES.get(header[name]["dtype"], header[name]["dtype"])
            if dtype != self.torch_dtype:
                wrong_dtype.append(f"{name} ({dtype})")
        if wrong_dtype:
            problems.append(f"{len(wrong_dtype)} tensor(s) are not {self.torch_dtype} (config.json's "
                            f"torch_dtype): {', '.join(wrong_dtype[:3])}"
                            f"{', ...' if len(wrong_dtype) > 3 else ''}")
        if problems:
            raise ExportError(f"{path} does not match {self.path}:\n  " + "\n  ".join(problems))


def tokenizer_info_from_dict(obj: Any, path: str, where: str = "") -> TokenizerInfo:
    t = _Reader(obj, path, where)
    info = TokenizerInfo(
        type=t.str("type", ("byte", "bpe")),
        vocab_size=t.int("vocab_size", 1),
        document_separator=t.int("document_separator"),
        bos_token_id=t.int("bos_token_id"),
        eos_token_id=t.int("eos_token_id"),
        file=t.get("file", str, optional=True),
    )
    if info.type == "bpe" and not info.file:
        raise ExportError(f"{path}: a BPE tokenizer needs '{t._name('file')}' (tokenizer.model)")
    return info


def read_safetensors_header(path: str) -> Dict[str, Dict[str, Any]]:
    """The tensors a safetensors file holds: name -> {"dtype", "shape", ...}.

    The format is an 8-byte little-endian header length, then that many bytes of JSON.
    """
    if not os.path.isfile(path):
        raise ExportError(f"{path}: no such file (an export folder has a model.safetensors)")
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) != 8:
            raise ExportError(f"{path}: too short to be a safetensors file")
        (n,) = struct.unpack("<Q", prefix)
        if n > os.path.getsize(path) - 8:
            raise ExportError(f"{path}: header length {n} runs past the end of the file")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ExportError(f"{path}: unreadable safetensors header: {e}") from e
    header.pop("__metadata__", None)
    return header


def expert_capacity(capacity_factor: float, num_tokens: int, top_k: int, num_experts: int) -> int:
    """Assignments one expert keeps per forward pass (RMoE's ExpertCapacity); 0 = unlimited."""
    if capacity_factor <= 0:
        return 0
    return int(math.ceil(capacity_factor * float(num_tokens * top_k) / num_experts))

"""Loads an RMoE export folder (docs/export.md) into RMoEForCausalLM, strictly."""

from __future__ import annotations

import json
import os
from typing import Optional, Tuple, Union

import torch

from .config import ExportError, RMoEConfig, TokenizerInfo, tokenizer_info_from_dict
from .model import RMoEForCausalLM, rotary_tables

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}


def _dtype(dtype: Union[None, str, torch.dtype]) -> torch.dtype:
    if dtype is None:
        return torch.float32  # the reference computes in float32 whatever the file holds
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_export(path: str, device: Union[str, torch.device] = "cpu",
                dtype: Union[None, str, torch.dtype] = None
                ) -> Tuple[RMoEForCausalLM, RMoEConfig, TokenizerInfo]:
    """(model in eval mode, its config, its tokenizer's description) from an export folder.

    dtype: the dtype to compute in; None = float32 (bf16/fp16 files are widened exactly).
    Every tensor of the file must be a parameter of the model and the other way round,
    with the shape config.json implies: anything else is an ExportError naming it.
    """
    if not os.path.isdir(path):
        raise ExportError(f"{path}: no such directory (pass the folder `rmoe_ckpt export` wrote)")
    cfg = RMoEConfig.from_json_file(os.path.join(path, "config.json"))

    tok_path = os.path.join(path, "rmoe_tokenizer.json")
    if not os.path.isfile(tok_path):
        raise ExportError(f"{tok_path}: no such file (an export folder has an rmoe_tokenizer.json)")
    with open(tok_path, encoding="utf-8") as f:
        try:
            tokenizer = tokenizer_info_from_dict(json.load(f), tok_path)
        except json.JSONDecodeError as e:
            raise ExportError(f"{tok_path}: not valid JSON: {e}") from e
    if tokenizer != cfg.tokenizer:
        raise ExportError(f"{tok_path} says {tokenizer}, but config.json's 'tokenizer' says "
                          f"{cfg.tokenizer}")
    if tokenizer.file and not os.path.isfile(os.path.join(path, tokenizer.file)):
        raise ExportError(f"{os.path.join(path, tokenizer.file)}: no such file "
                          f"(rmoe_tokenizer.json names it)")

    weights = os.path.join(path, "model.safetensors")
    cfg.check_safetensors(weights)  # names, shapes, dtypes from the header, before reading
    try:
        from safetensors.torch import load_file
    except ImportError as e:
        raise ImportError("loading model.safetensors needs the `safetensors` package "
                          "(pip install safetensors)") from e
    state = load_file(weights)

    model = RMoEForCausalLM(cfg)
    try:
        model.load_state_dict(state, strict=True)  # check_safetensors has named any problem
    except RuntimeError as e:
        raise ExportError(f"{weights}: {e}") from e
    model.to(device=device, dtype=_dtype(dtype))
    # .to(dtype) also converted the rotary tables; they stay float32 values, as RMoE's.
    for block in model.layers:
        cos, sin = rotary_tables(cfg.max_seq_len, cfg.head_dim, cfg.rope_theta)
        block.attn.rope_cos, block.attn.rope_sin = cos.to(device), sin.to(device)
    model.eval()
    return model, cfg, tokenizer

"""rmoe_torch: a plain-PyTorch reference for RMoE's exported models (docs/export.md).

    from rmoe_torch import load_export, generate
    model, config, tokenizer_info = load_export("path/to/export")
    logits = model(tokens)                      # [B, T] -> [B, T, V] float32
    ids = generate(model, prompt_ids, max_new_tokens=40)   # greedy, like rmoe_generate
"""

from .config import ExportError, RMoEConfig, TokenizerInfo
from .generate import generate, sampling_distribution
from .load import load_export
from .model import RMoEForCausalLM
from .tokenizer import open_tokenizer

__all__ = ["ExportError", "RMoEConfig", "TokenizerInfo", "RMoEForCausalLM", "load_export",
           "generate", "sampling_distribution", "open_tokenizer"]

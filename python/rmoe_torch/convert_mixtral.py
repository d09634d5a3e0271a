"""Convert an RMoE export folder (linear router) into a Hugging Face Mixtral folder.

    python -m rmoe_torch.convert_mixtral EXPORT_DIR OUT_DIR [--dtype float32|bfloat16]

EXPORT_DIR is what `rmoe_ckpt export` writes (see docs/export.md): model.safetensors with
RMoE's tensor names, config.json, rmoe_tokenizer.json and, for BPE tokenizers,
tokenizer.model. OUT_DIR becomes a folder that `MixtralForCausalLM.from_pretrained` loads:

    model.safetensors      the weights, named as Mixtral checkpoints on the Hugging Face Hub
                           are (per-expert `block_sparse_moe.experts.{e}.w1/w2/w3.weight`);
                           transformers 4.x loads them as they are, 5.x fuses them on load
                           into `mlp.experts.gate_up_proj` / `down_proj`
    config.json            MixtralConfig
    generation_config.json bos/eos ids
    tokenizer.model,       BPE tokenizers only: the SentencePiece model and a LlamaTokenizer
    tokenizer_config.json  configuration (no BOS/EOS added when encoding, as RMoE does)
    README.md              what was converted, and what was not

The differences between the two forward passes are handled here:

* RMoE's rotary embedding turns interleaved channel pairs (2i, 2i+1) of each head; HF's
  Mixtral turns the half-split pairs (i, i + head_dim/2). Permuting the rows of q_proj and
  k_proj within each head (new row j <- old 2j for j < head_dim/2, new row j <- old
  2(j - head_dim/2) + 1 otherwise) makes them equal: attention scores are dot products over
  the head channels, which a common permutation of q and k leaves unchanged. v is not
  permuted.
* Experts are stored stacked and applied as `x @ W`; HF's are `nn.Linear`-style `x @ W.T`,
  so each expert's matrices are transposed.

What Mixtral cannot express is refused, with the reason: recurrent routers, dense (non-MoE)
layers, a shared expert, moe_weight != 1, renormalize false (HF's router always divides the
top-k probabilities by their sum), and, unless --allow-dropless is given, capacity_factor > 0
(HF's Mixtral never drops an assignment).

This file imports nothing from the rest of rmoe_torch: json, torch and safetensors only, so
it can be copied and run on its own.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ConversionError(Exception):
    """The export cannot be expressed as a Hugging Face Mixtral model (or is malformed)."""


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConversionError(f"{path}: missing (is this an `rmoe_ckpt export` folder?)") from None
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: not valid JSON: {e}") from None


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConversionError(message)


def check_convertible(cfg: dict, allow_dropless: bool = False) -> list[str]:
    """Raises ConversionError for what Mixtral cannot express; returns warnings."""
    notes: list[str] = []
    _require(cfg.get("format") == "rmoe", "config.json: 'format' is not \"rmoe\"; not an RMoE export")
    version = cfg.get("format_version")
    _require(version == 1, f"config.json: format_version {version!r} is not one this converter knows (1)")

    router = cfg.get("router", {})
    rtype = router.get("type")
    if rtype == "recurrent":
        raise ConversionError(
            "this model has a recurrent router "
            f"({router.get('cell', '?')} cell, {router.get('recurrence', '?')} recurrence): "
            "Hugging Face transformers has no class for it, so it cannot become a Mixtral model. "
            "Load the export with python/rmoe_torch instead (plain PyTorch, no RMoE code)."
        )
    _require(rtype == "linear", f"config.json: unknown router type {rtype!r}")

    num_layers = int(cfg["num_layers"])
    moe = cfg["moe"]
    layers = sorted(int(i) for i in moe.get("layers", []))
    dense = [i for i in range(num_layers) if i not in layers]
    _require(
        not dense,
        f"layers {dense} are dense (SwiGLU FFN, not MoE): every Mixtral layer is a sparse MoE "
        "block, so a model with dense layers cannot be expressed (moe.layers = "
        f"{layers} of {num_layers} layers)",
    )
    _require(
        not moe.get("shared_expert", False),
        "the model has a shared expert (always-on FFN added to the routed experts); Mixtral has "
        "none, so it cannot be expressed",
    )
    mw = float(moe.get("moe_weight", 1.0))
    _require(
        mw == 1.0,
        f"moe_weight is {mw}, not 1: Mixtral adds the routed experts' output unscaled",
    )
    _require(
        bool(moe.get("renormalize", True)),
        "moe.renormalize is false: HF Mixtral's router always divides the top-k softmax "
        "probabilities by their sum, so the expert weights would differ",
    )
    cf = float(moe.get("capacity_factor", 0.0))
    if cf > 0:
        msg = (
            f"capacity_factor is {cf}: RMoE drops expert assignments beyond "
            f"ceil({cf} * tokens * top_k / experts) per expert, HF's Mixtral never drops any "
            "(dropless), so their numbers agree only on batches where RMoE dropped nothing"
        )
        if not allow_dropless:
            raise ConversionError(msg + "; pass --allow-dropless to convert anyway")
        notes.append(msg)

    norm = cfg.get("norm", {})
    _require(norm.get("type") == "rmsnorm", f"norm type {norm.get('type')!r} is not rmsnorm")
    rot = cfg.get("rotary", {})
    _require(
        rot.get("layout") == "interleaved_pairs",
        f"rotary layout {rot.get('layout')!r}: this converter knows \"interleaved_pairs\" only",
    )
    att = cfg.get("attention", {})
    _require(att.get("qkv") == "fused", f"attention.qkv {att.get('qkv')!r} is not \"fused\"")
    _require(not att.get("bias", False), "attention has biases; Mixtral's projections have none")
    _require(att.get("causal", True), "attention is not causal")
    _require(
        int(cfg["num_heads"]) * int(cfg["head_dim"]) == int(cfg["d_model"]),
        "num_heads * head_dim != d_model",
    )
    _require(int(cfg["head_dim"]) % 2 == 0, "head_dim is odd; rotary needs pairs")
    top_k, num_experts = int(moe["top_k"]), int(moe["num_experts"])
    _require(1 <= top_k <= num_experts, f"top_k {top_k} not in [1, {num_experts}]")
    return notes


def rotary_row_permutation(head_dim: int) -> torch.Tensor:
    """Index `perm` such that new_rows = old_rows[perm] within one head: interleaved -> half."""
    half = head_dim // 2
    return torch.tensor([2 * j if j < half else 2 * (j - half) + 1 for j in range(head_dim)])


def _permute_heads(w: torch.Tensor, num_heads: int, head_dim: int) -> torch.Tensor:
    perm = rotary_row_permutation(head_dim)
    return w.reshape(num_heads, head_dim, -1)[:, perm, :].reshape(num_heads * head_dim, -1)


def convert_tensors(cfg: dict, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """RMoE tensor names/layouts -> Hub-style Mixtral names/layouts (same dtype)."""
    D, L = int(cfg["d_model"]), int(cfg["num_layers"])
    nh, hd = int(cfg["num_heads"]), int(cfg["head_dim"])
    E, H, V = int(cfg["moe"]["num_experts"]), int(cfg["moe"]["expert_hidden_dim"]), int(cfg["vocab_size"])
    tied = bool(cfg["tie_embeddings"])

    expected = {"embedding.weight": (V, D), "final_norm.weight": (D,)}
    if not tied:
        expected["lm_head.weight"] = (V, D)
    for i in range(L):
        p = f"layers.{i}."
        expected.update({
            p + "attn_norm.weight": (D,),
            p + "ffn_norm.weight": (D,),
            p + "attn.qkv.weight": (3 * D, D),
            p + "attn.out.weight": (D, D),
            p + "moe.experts.w1": (E, D, H),
            p + "moe.experts.w3": (E, D, H),
            p + "moe.experts.w2": (E, H, D),
            p + "moe.router.gate": (E, D),
        })
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    _require(not missing, f"model.safetensors lacks {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    _require(
        not extra,
        f"model.safetensors has tensors a linear-router, all-MoE model without shared expert "
        f"does not: {extra[:8]}{' ...' if len(extra) > 8 else ''}",
    )
    for name, shape in expected.items():
        got = tuple(tensors[name].shape)
        _require(got == shape, f"{name}: shape {list(got)}, config.json implies {list(shape)}")

    out: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": tensors["embedding.weight"],
        "model.norm.weight": tensors["final_norm.weight"],
    }
    if not tied:
        out["lm_head.weight"] = tensors["lm_head.weight"]
    for i in range(L):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        q, k, v = tensors[src + "attn.qkv.weight"].split(D, dim=0)
        out[dst + "self_attn.q_proj.weight"] = _permute_heads(q, nh, hd)
        out[dst + "self_attn.k_proj.weight"] = _permute_heads(k, nh, hd)
        out[dst + "self_attn.v_proj.weight"] = v
        out[dst + "self_attn.o_proj.weight"] = tensors[src + "attn.out.weight"]
        out[dst + "input_layernorm.weight"] = tensors[src + "attn_norm.weight"]
        out[dst + "post_attention_layernorm.weight"] = tensors[src + "ffn_norm.weight"]
        moe = dst + "block_sparse_moe."
        out[moe + "gate.weight"] = tensors[src + "moe.router.gate"]
        w1, w2, w3 = (tensors[src + f"moe.experts.{w}"] for w in ("w1", "w2", "w3"))
        for e in range(E):
            out[moe + f"experts.{e}.w1.weight"] = w1[e].t()  # [H, D]
            out[moe + f"experts.{e}.w3.weight"] = w3[e].t()  # [H, D]
            out[moe + f"experts.{e}.w2.weight"] = w2[e].t()  # [D, H]
    return out


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """Contiguous, and not a view into a larger tensor (safetensors stores whole storages)."""
    t = t.contiguous()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.clone()
    return t


def mixtral_config(cfg: dict, tok: dict, dtype_name: str) -> dict:
    moe = cfg["moe"]
    theta = float(cfg["rotary"]["theta"])
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "vocab_size": int(cfg["vocab_size"]),
        "hidden_size": int(cfg["d_model"]),
        "intermediate_size": int(moe["expert_hidden_dim"]),
        "num_hidden_layers": int(cfg["num_layers"]),
        "num_attention_heads": int(cfg["num_heads"]),
        "num_key_value_heads": int(cfg["num_heads"]),
        "head_dim": int(cfg["head_dim"]),
        "hidden_act": "silu",
        "max_position_embeddings": int(cfg["max_seq_len"]),
        "rms_norm_eps": float(cfg["norm"]["eps"]),
        # transformers < 5 reads rope_theta; 5.x reads rope_parameters (and moves a
        # top-level rope_theta there itself). Both say the same.
        "rope_theta": theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "sliding_window": None,
        "attention_dropout": 0.0,
        "num_local_experts": int(moe["num_experts"]),
        "num_experts_per_tok": int(moe["top_k"]),
        "router_aux_loss_coef": float(moe.get("aux_loss_coef", 0.0)),
        "router_jitter_noise": 0.0,
        "output_router_logits": False,
        "tie_word_embeddings": bool(cfg["tie_embeddings"]),
        "bos_token_id": int(tok["bos_token_id"]),
        "eos_token_id": int(tok["eos_token_id"]),
        "pad_token_id": None,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": dtype_name,
        "dtype": dtype_name,
    }


def _readme(cfg: dict, tok: dict, dtype_name: str, notes: list[str], export_dir: Path) -> str:
    moe = cfg["moe"]
    lines = [
        "# RMoE model converted to Hugging Face Mixtral",
        "",
        f"Converted by `python -m rmoe_torch.convert_mixtral` from `{export_dir}` "
        f"(job {cfg.get('source', {}).get('job', '?')!r}, step {cfg.get('source', {}).get('step', '?')}).",
        "",
        "```python",
        "import torch",
        "from transformers import MixtralForCausalLM",
        "model = MixtralForCausalLM.from_pretrained(PATH, torch_dtype=torch.float32)",
        "```",
        "",
        f"- {cfg['num_layers']} layers, d_model {cfg['d_model']}, {cfg['num_heads']} heads of "
        f"{cfg['head_dim']}, {moe['num_experts']} experts (top {moe['top_k']}, hidden "
        f"{moe['expert_hidden_dim']}), vocabulary {cfg['vocab_size']}, weights in {dtype_name}, "
        f"embeddings {'tied' if cfg['tie_embeddings'] else 'untied'}.",
        "- q_proj/k_proj rows are permuted within each head: RMoE's rotary embedding turns "
        "interleaved channel pairs, HF's the half-split ones. Logits are unchanged.",
        f"- Trained with context {cfg['max_seq_len']} (`max_position_embeddings`); "
        "longer inputs are outside what the model saw.",
        f"- bos = eos = {tok['eos_token_id']}: RMoE joins documents with one separator token "
        "and starts generation without a prompt from it. Tokens are never added "
        "automatically when encoding.",
        "- RMoE's router z-loss (training only) has no Mixtral counterpart and is not "
        "recorded; `router_aux_loss_coef` is RMoE's aux_loss_coef.",
    ]
    if tok["type"] == "byte":
        lines += [
            "",
            "## Tokenizer: none written",
            "",
            "This model's tokenizer is RMoE's byte tokenizer: token id = byte value "
            f"(vocabulary {tok['vocab_size']}), documents separated by byte "
            f"{tok['document_separator']} (`\\n`). No Hugging Face tokenizer class maps "
            "ids to bytes like this, so this folder has no tokenizer files. Encode with "
            "`list(text.encode('utf-8'))` and decode with "
            "`bytes(ids).decode('utf-8', errors='replace')`.",
        ]
    else:
        lines += [
            "",
            "## Tokenizer",
            "",
            "`tokenizer.model` is RMoE's SentencePiece BPE model (byte fallback, identity "
            "normalisation); `tokenizer_config.json` loads it as a `LlamaTokenizer` that adds "
            "neither BOS nor EOS and reads `<s>`/`</s>` in text as characters, as RMoE does. "
            "transformers 5 needs the `sentencepiece` package to read `tokenizer.model`.",
            "",
            "With transformers 5.24, `AutoTokenizer.from_pretrained` builds the tokenizer "
            "from the SentencePiece model's own rules and gave RMoE's ids exactly when this "
            "converter was tested. `LlamaTokenizer.from_pretrained` does not, for text that "
            "starts with a space: SentencePiece still adds its dummy-prefix `▁` (`' a'` -> "
            "`▁▁a`), Llama's Metaspace pre-tokenizer does not when the text already starts "
            "with one. Decoding agrees either way. When ids must be exact, compare with "
            "`sentencepiece` itself.",
        ]
    if notes:
        lines += ["", "## Warnings", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def _tokenizer_config(cfg: dict, tok: dict) -> dict:
    return {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": False,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": None,
        "add_prefix_space": True,  # RMoE trains SentencePiece with add_dummy_prefix
        # legacy: prepend the dummy prefix "always" (SentencePiece's way), not only "first"
        "legacy": True,
        # RMoE's SentencePiece reads "<s>"/"</s>" in text as characters, not as the tokens.
        "split_special_tokens": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(cfg["max_seq_len"]),
        "sp_model_kwargs": {},
    }


def convert(export_dir, out_dir, dtype: str | None = None, allow_dropless: bool = False,
            overwrite: bool = False, log=print) -> dict:
    """Converts; returns a summary dict. Raises ConversionError when it cannot."""
    export_dir, out_dir = Path(export_dir), Path(out_dir)
    cfg = _read_json(export_dir / "config.json")
    tok = _read_json(export_dir / "rmoe_tokenizer.json")
    notes = check_convertible(cfg, allow_dropless=allow_dropless)
    _require(tok.get("type") in ("byte", "bpe"), f"rmoe_tokenizer.json: unknown type {tok.get('type')!r}")
    _require(int(tok["vocab_size"]) == int(cfg["vocab_size"]),
             "rmoe_tokenizer.json and config.json disagree on vocab_size")

    src_dtype = cfg.get("torch_dtype", "float32")
    dtype_name = dtype or src_dtype
    _require(dtype_name in _DTYPES, f"unknown dtype {dtype_name!r}")
    target = _DTYPES[dtype_name]
    if _DTYPES.get(src_dtype, torch.float32).itemsize > target.itemsize or (
        src_dtype == "float16" and dtype_name == "bfloat16"
    ):
        notes.append(f"weights rounded from {src_dtype} to {dtype_name}: numbers will differ "
                     "slightly from RMoE's")

    st_path = export_dir / "model.safetensors"
    _require(st_path.is_file(), f"{st_path}: missing")
    if tok["type"] == "bpe":
        _require((export_dir / "tokenizer.model").is_file(),
                 f"{export_dir / 'tokenizer.model'}: missing (BPE tokenizer)")
    tensors = {}
    with safe_open(str(st_path), framework="pt") as f:
        for name in f.keys():
            tensors[name] = f.get_tensor(name)
    hf = convert_tensors(cfg, tensors)
    hf = {name: _own_storage(t.to(target)) for name, t in hf.items()}
    del tensors

    if out_dir.exists():
        _require(overwrite, f"{out_dir} exists; pass --overwrite to replace it")
        _require(out_dir.is_dir(), f"{out_dir} exists and is not a directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        save_file(hf, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        with open(tmp / "config.json", "w", encoding="utf-8") as f:
            json.dump(mixtral_config(cfg, tok, dtype_name), f, indent=2)
            f.write("\n")
        with open(tmp / "generation_config.json", "w", encoding="utf-8") as f:
            json.dump({"bos_token_id": int(tok["bos_token_id"]),
                       "eos_token_id": int(tok["eos_token_id"])}, f, indent=2)
            f.write("\n")
        if tok["type"] == "bpe":
            shutil.copyfile(export_dir / "tokenizer.model", tmp / "tokenizer.model")
            with open(tmp / "tokenizer_config.json", "w", encoding="utf-8") as f:
                json.dump(_tokenizer_config(cfg, tok), f, indent=2)
                f.write("\n")
        with open(tmp / "README.md", "w", encoding="utf-8") as f:
            f.write(_readme(cfg, tok, dtype_name, notes, export_dir))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700
        for child in tmp.iterdir():
            os.chmod(child, 0o666 & ~umask)
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.rename(out_dir, old / "x")
            os.rename(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    n_params = sum(t.numel() for t in hf.values())
    summary = {
        "out_dir": str(out_dir),
        "tensors": len(hf),
        "parameters": n_params,
        "dtype": dtype_name,
        "tokenizer": tok["type"],
        "notes": notes,
    }
    moe = cfg["moe"]
    log(f"wrote {out_dir}: MixtralForCausalLM, {cfg['num_layers']} layers, d_model "
        f"{cfg['d_model']}, {moe['num_experts']} experts top-{moe['top_k']}, "
        f"{n_params:,} parameters in {len(hf)} tensors ({dtype_name}), "
        f"{'tied' if cfg['tie_embeddings'] else 'untied'} embeddings")
    if tok["type"] == "byte":
        log("tokenizer: none written - RMoE's byte tokenizer (id = byte value) has no Hugging "
            "Face class; encode as list(text.encode('utf-8')) (see README.md in the folder)")
    else:
        log("tokenizer: tokenizer.model + tokenizer_config.json (LlamaTokenizer, no BOS/EOS added)")
    for n in notes:
        log(f"warning: {n}")
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m rmoe_torch.convert_mixtral",
        description="Convert an RMoE export folder (rmoe_ckpt export; linear router, every "
                    "layer MoE, no shared expert) into a Hugging Face MixtralForCausalLM "
                    "folder. Recurrent routers have no Hugging Face class: load them with "
                    "rmoe_torch.",
    )
    ap.add_argument("export_dir", metavar="EXPORT_DIR", help="the RMoE export folder")
    ap.add_argument("out_dir", metavar="OUT_DIR",
                    help="the Mixtral folder to write (written to a temporary sibling, then "
                         "renamed into place)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                    help="dtype of the written weights (default: the export's own)")
    ap.add_argument("--allow-dropless", action="store_true",
                    help="convert a model trained with capacity_factor > 0 anyway (HF Mixtral "
                         "drops nothing, so numbers agree only where RMoE dropped nothing)")
    ap.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    args = ap.parse_args(argv)
    try:
        convert(args.export_dir, args.out_dir, dtype=args.dtype,
                allow_dropless=args.allow_dropless, overwrite=args.overwrite)
    except ConversionError as e:
        print(f"convert_mixtral: cannot convert {args.export_dir}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

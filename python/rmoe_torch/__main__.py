"""Command line: python -m rmoe_torch {eval,generate} EXPORT_DIR ... (PYTHONPATH=python)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Dict, List

import torch

from .generate import generate
from .load import load_export
from .tokenizer import open_tokenizer


def read_json_lenient(path: str) -> Any:
    """JSON that may hold invalid UTF-8: rmoe_eval writes each token's "text" as its raw
    bytes, and a byte token that is part of a multi-byte character is not UTF-8 alone."""
    with open(path, "rb") as f:
        return json.loads(f.read().decode("utf-8", errors="replace"))


def read_dump_windows(path: str) -> List[Dict[str, Any]]:
    """The windows of an `rmoe_eval --dump` file, each with "tokens" and "positions".

    Accepts both shapes rmoe_eval has written: {"windows": [...]} and a single window
    object (without "tokens": rebuilt as the first input token, then every next token).
    """
    dump = read_json_lenient(path)
    windows = dump["windows"] if isinstance(dump, dict) and "windows" in dump else [dump]
    out = []
    for i, w in enumerate(windows):
        if not isinstance(w, dict) or not isinstance(w.get("positions"), list) or not w["positions"]:
            raise ValueError(f"{path}: window {i} has no 'positions' list")
        positions = w["positions"]
        tokens = w.get("tokens") or [positions[0]["token"]] + [p["next"] for p in positions]
        if len(tokens) != len(positions) + 1:
            raise ValueError(f"{path}: window {i} has {len(tokens)} tokens for "
                             f"{len(positions)} positions (expected one more)")
        out.append({"window": w.get("window", i), "tokens": [int(t) for t in tokens],
                    "positions": positions})
    return out


@torch.no_grad()
def window_losses(model, tokens: List[int]) -> torch.Tensor:
    """-log p(next token) at every position of one window ([T] float64), one forward pass of
    batch 1 as rmoe_eval's dump does (capacity, if any, is per window)."""
    device = next(model.parameters()).device
    ids = torch.tensor([tokens], dtype=torch.long, device=device)
    logits = model(ids[:, :-1])[0]
    log_probs = torch.log_softmax(logits.double(), dim=-1)
    return -log_probs.gather(1, ids[0, 1:, None]).squeeze(1).cpu()


def cmd_eval(args) -> int:
    model, cfg, _ = load_export(args.export_dir, device=args.device, dtype=args.dtype)
    windows = read_dump_windows(args.dump)
    records, all_diffs, ours_all, ref_all = [], [], [], []
    for w in windows:
        ours = window_losses(model, w["tokens"])
        ref = torch.tensor([float(p["loss"]) for p in w["positions"]], dtype=torch.float64)
        diff = (ours - ref).abs()
        all_diffs.append(diff)
        ours_all.append(ours)
        ref_all.append(ref)
        records.append({"window": w["window"], "positions": len(ref),
                        "mean_loss": float(ours.mean()), "dump_mean_loss": float(ref.mean()),
                        "max_abs_diff": float(diff.max()),
                        "worst_position": int(diff.argmax())})
    diffs, ours, ref = torch.cat(all_diffs), torch.cat(ours_all), torch.cat(ref_all)
    result = {"export": args.export_dir, "dump": args.dump, "windows": records,
              "positions": int(diffs.numel()), "mean_loss": float(ours.mean()),
              "dump_mean_loss": float(ref.mean()), "max_abs_diff": float(diffs.max())}
    for r in records:
        print(f"window {r['window']}: {r['positions']} positions, mean loss {r['mean_loss']:.6f} "
              f"(dump {r['dump_mean_loss']:.6f}), max |diff| {r['max_abs_diff']:.3e} at "
              f"position {r['worst_position']}")
    print(f"all: {result['positions']} positions, mean loss {result['mean_loss']:.6f} "
          f"(dump {result['dump_mean_loss']:.6f}), max |diff| {result['max_abs_diff']:.3e}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
    return 0


def cmd_generate(args) -> int:
    model, cfg, _ = load_export(args.export_dir, device=args.device, dtype=args.dtype)
    tokenizer = None
    if args.prompt is not None:
        tokenizer = open_tokenizer(args.export_dir, cfg.tokenizer)
        prompt = tokenizer.encode(args.prompt)
    elif args.prompt_ids:
        prompt = [int(t) for t in args.prompt_ids.split(",") if t.strip()]
    else:
        prompt = [cfg.tokenizer.document_separator]  # RMoE's start of a new document
    bad = [t for t in prompt if not 0 <= t < cfg.vocab_size]
    if bad:
        print(f"rmoe_torch: prompt ids {bad} are outside the vocabulary [0, {cfg.vocab_size})",
              file=sys.stderr)
        return 2
    ids = generate(model, prompt, args.max_new_tokens, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    result = {"prompt_ids": prompt, "generated_ids": ids}
    if tokenizer is not None:
        result["continuation"] = tokenizer.decode(ids)
    print(json.dumps(result))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rmoe_torch",
        description="Plain-PyTorch reference for RMoE export folders (docs/export.md).")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("export_dir", metavar="EXPORT_DIR", help="a folder `rmoe_ckpt export` wrote")
        p.add_argument("--device", default="cpu", help="torch device (default cpu)")
        p.add_argument("--dtype", default=None, choices=["float32", "float64", "bfloat16", "float16"],
                       help="compute dtype (default float32)")

    e = sub.add_parser("eval", help="per-position losses of an rmoe_eval --dump's windows",
                       description="Runs every window of an `rmoe_eval --dump` file through the "
                       "model and prints the mean loss and the largest per-position difference "
                       "from the dump's losses.")
    common(e)
    e.add_argument("--dump", required=True, metavar="DUMP.json", help="rmoe_eval --dump output")
    e.add_argument("--json", metavar="OUT.json", help="also write the results as JSON")
    e.set_defaults(func=cmd_eval)

    g = sub.add_parser("generate", help="continue token ids (greedy by default)",
                       description="Generates by re-running the whole prefix each step; prints "
                       '{"prompt_ids": [...], "generated_ids": [...]} as JSON. Stops at '
                       "max_seq_len, as rmoe_generate does.")
    common(g)
    prompt = g.add_mutually_exclusive_group()
    prompt.add_argument("--prompt-ids", default="", metavar="1,2,3",
                        help="comma-separated prompt ids (default: the document separator)")
    prompt.add_argument("--prompt", default=None, metavar="TEXT",
                        help="prompt text, encoded with the export's tokenizer (the JSON then "
                        "also has the decoded \"continuation\")")
    g.add_argument("--max-new-tokens", type=int, default=200, metavar="N")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=0, help="0 = all (default)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus mass (default 1 = off)")
    g.add_argument("--seed", type=int, default=0,
                   help="torch generator seed for sampling (not RMoE's generator)")
    g.set_defaults(func=cmd_generate)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

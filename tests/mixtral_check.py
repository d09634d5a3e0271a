#!/usr/bin/env python3
"""Checks that a Hugging Face Mixtral conversion of an RMoE export reproduces RMoE's numbers.

    python tests/mixtral_check.py --export DIR --out MIXTRAL_DIR --dump D.json \
        --generate G.json [--tolerance 1e-5]

1. Runs `python -m rmoe_torch.convert_mixtral DIR MIXTRAL_DIR --overwrite` (float32).
2. Loads MIXTRAL_DIR with `transformers.MixtralForCausalLM.from_pretrained` in float32 (eager
   attention and eager experts: plain matmuls, nothing fused) and fails on any missing,
   unexpected or mismatched weight.
3. Evaluates every window of D.json (`rmoe_eval --dump`) and compares each position's loss
   -log p(next) with RMoE's: the largest absolute difference must be <= --tolerance.
4. Greedy `generate` from G.json's prompt_ids (`{"prompt_ids": [...], "generated_ids":
   [...]}`, from `rmoe_generate --temperature 0`) must give exactly generated_ids.

Dump formats accepted: one window `{"window": w, "first_token": .., "positions": [{"position":
t, "token": id, "next": id, "loss": x, ...}]}` (the window's tokens are positions[0].token
followed by every position's next), or `{"windows": [{"window": w, "tokens": [seq_len + 1
ids], "positions": [...]}]}`.

Exit status: 0 PASS, 1 FAIL, 2 usage or input error, 77 skipped (transformers is not
installed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SKIP = 77


def load_windows(dump: dict) -> list[dict]:
    """Normalises both dump formats to [{"window", "tokens", "positions"}]."""
    raw = dump["windows"] if "windows" in dump else [dump]
    windows = []
    for w in raw:
        positions = sorted(w["positions"], key=lambda p: p["position"])
        if not positions:
            raise ValueError(f"window {w.get('window')}: no positions")
        if "tokens" in w:
            tokens = [int(t) for t in w["tokens"]]
        else:
            idx = [p["position"] for p in positions]
            if idx != list(range(len(positions))):
                raise ValueError(f"window {w.get('window')}: positions are not 0..{len(positions) - 1} "
                                 "and there is no 'tokens' list to evaluate them with")
            tokens = [int(positions[0]["token"])] + [int(p["next"]) for p in positions]
        for p in positions:
            t = p["position"]
            if not 0 <= t < len(tokens) - 1:
                raise ValueError(f"window {w.get('window')}: position {t} outside its {len(tokens)} tokens")
            if "token" in p and int(p["token"]) != tokens[t]:
                raise ValueError(f"window {w.get('window')}: position {t} token {p['token']} != tokens[{t}]")
            if int(p["next"]) != tokens[t + 1]:
                raise ValueError(f"window {w.get('window')}: position {t} next {p['next']} != tokens[{t + 1}]")
        windows.append({"window": w.get("window", len(windows)), "tokens": tokens, "positions": positions})
    return windows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--export", required=True, help="the RMoE export folder (rmoe_ckpt export)")
    ap.add_argument("--out", required=True, help="where to write the Mixtral folder")
    ap.add_argument("--dump", required=True, help="rmoe_eval --dump JSON")
    ap.add_argument("--generate", required=True, help='{"prompt_ids": [...], "generated_ids": [...]}')
    ap.add_argument("--tolerance", type=float, default=1e-5,
                    help="largest allowed |loss difference| per position (default 1e-5)")
    args = ap.parse_args()

    try:
        import torch
        import transformers
        from transformers import GenerationConfig, MixtralForCausalLM
    except ImportError as e:
        print(f"SKIP: transformers (or torch) is not importable: {e}")
        return SKIP

    # 1. Convert, through the command line users run.
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "python") + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "rmoe_torch.convert_mixtral", args.export, args.out,
           "--dtype", "float32", "--overwrite"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    sys.stdout.write(proc.stdout)
    if proc.returncode != 0:
        sys.stdout.write(proc.stderr)
        print(f"FAIL: the converter exited with {proc.returncode}")
        return 1

    try:
        with open(args.dump, encoding="utf-8") as f:
            windows = load_windows(json.load(f))
        with open(args.generate, encoding="utf-8") as f:
            gen = json.load(f)
        prompt_ids = [int(t) for t in gen["prompt_ids"]]
        expected_ids = [int(t) for t in gen["generated_ids"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"error: bad --dump or --generate input: {e}")
        return 2
    if not prompt_ids:
        print("error: prompt_ids is empty")
        return 2

    transformers.utils.logging.disable_progress_bar()

    # 2. Load exactly: eager attention and eager (per-expert loop) MoE, float32.
    torch.manual_seed(0)
    kwargs = {"torch_dtype": torch.float32, "attn_implementation": "eager", "output_loading_info": True}
    major = int(transformers.__version__.split(".")[0])
    if major >= 5:
        kwargs["experts_implementation"] = "eager"
    model, info = MixtralForCausalLM.from_pretrained(args.out, **kwargs)
    model.eval()
    bad = {k: sorted(v) for k, v in info.items() if k != "error_msgs" and v}
    if bad or info.get("error_msgs"):
        print(f"FAIL: loading {args.out} was not exact: {bad} {info.get('error_msgs')}")
        return 1
    print(f"loaded {args.out} with transformers {transformers.__version__}, torch {torch.__version__}: "
          "no missing, unexpected or mismatched weights")
    ok = True

    # 3. Per-position losses.
    diffs = []
    worst = (0.0, None, None)
    with torch.no_grad():
        for w in windows:
            ids = torch.tensor([w["tokens"][:-1]], dtype=torch.long)
            logits = model(input_ids=ids, use_cache=False).logits[0].double()
            logp = torch.log_softmax(logits, dim=-1)
            for p in w["positions"]:
                t = p["position"]
                ours = -logp[t, w["tokens"][t + 1]].item()
                d = abs(ours - float(p["loss"]))
                diffs.append(d)
                if d > worst[0] or worst[1] is None:
                    worst = (d, w["window"], t)
    max_d = max(diffs)
    mean_d = sum(diffs) / len(diffs)
    mean_ref = sum(float(p["loss"]) for w in windows for p in w["positions"]) / len(diffs)
    verdict = "PASS" if max_d <= args.tolerance and math.isfinite(max_d) else "FAIL"
    ok &= verdict == "PASS"
    print(f"{verdict}: per-position loss over {len(windows)} window(s), {len(diffs)} positions: "
          f"max |diff| {max_d:.3e} (window {worst[1]}, position {worst[2]}), mean |diff| "
          f"{mean_d:.3e}, tolerance {args.tolerance:g}; RMoE's mean loss {mean_ref:.6f}")

    # 4. Greedy generation. EOS must not stop it early: rmoe_generate ran for a fixed count.
    n = len(expected_ids)
    if n == 0:
        print("PASS: greedy generation (nothing to compare: generated_ids is empty)")
    else:
        gc = GenerationConfig(do_sample=False, max_new_tokens=n, min_new_tokens=0,
                              eos_token_id=None, bos_token_id=None, pad_token_id=0,
                              num_beams=1, use_cache=True)
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor([prompt_ids]),
                                 attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                                 generation_config=gc)
        got = out[0, len(prompt_ids):].tolist()
        if got == expected_ids:
            print(f"PASS: greedy generate() gives RMoE's {n} tokens exactly")
        else:
            ok = False
            first = next((i for i, (a, b) in enumerate(zip(got, expected_ids)) if a != b), min(len(got), n))
            print(f"FAIL: greedy generate() differs from RMoE at new token {first} of {n}: "
                  f"HF {got[first:first + 8]}, RMoE {expected_ids[first:first + 8]} "
                  f"(HF gave {len(got)} tokens)")
            # Was it a near tie? Top-2 margin of the full-sequence forward at that step.
            with torch.no_grad():
                seq = torch.tensor([prompt_ids + expected_ids[:first]])
                last = model(input_ids=seq, use_cache=False).logits[0, -1].double()
                top = torch.topk(last, 2)
            print(f"      at that step HF's top-2 are {top.indices.tolist()} with logit margin "
                  f"{(top.values[0] - top.values[1]).item():.3e}")

    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

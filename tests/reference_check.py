#!/usr/bin/env python3
"""Checks that the plain-PyTorch reference (python/rmoe_torch) reproduces RMoE on an export.

    reference_check.py --export DIR --dump D.json --generate G.json [--tolerance 1e-5]

D.json is `rmoe_eval --dump` output (one window object, or {"windows": [...]}); every window
is run through rmoe_torch and each position's loss must be within --tolerance of the dump's.
G.json is `rmoe_generate --temperature 0 --json` output ({"prompt_ids", "generated_ids"});
greedy generation from prompt_ids must give exactly generated_ids.

Exit status: 0 PASS, 1 FAIL, 2 bad input files, 77 (skipped) when torch or safetensors
cannot be imported.
"""

import argparse
import json
import os
import sys

SKIP = 77
NOISE_SLACK = 10.0  # how far beyond our own float32 rounding error RMoE's may be (see below)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--export", required=True, help="the export folder (rmoe_ckpt export)")
    parser.add_argument("--dump", required=True, help="rmoe_eval --dump output")
    parser.add_argument("--generate", required=True, help="rmoe_generate --json output")
    parser.add_argument("--tolerance", type=float, default=1e-5,
                        help="largest allowed |loss difference| at any position (default 1e-5)")
    parser.add_argument("--strict", action="store_true",
                        help="every position within --tolerance, even ill-conditioned ones")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: the test models are tiny)")
    args = parser.parse_args()

    try:
        import torch  # noqa: F401
        import safetensors  # noqa: F401
    except ImportError as e:
        print(f"reference_check: SKIPPED: {e} (this Python, {sys.executable}, needs torch and "
              f"safetensors)")
        return SKIP

    import torch
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "python"))
    from rmoe_torch import generate, load_export
    from rmoe_torch.__main__ import read_dump_windows, read_json_lenient, window_losses

    torch.set_num_threads(max(1, args.threads))
    try:
        model, cfg, _ = load_export(args.export)
        windows = read_dump_windows(args.dump)
        gen = read_json_lenient(args.generate)
        prompt, expected = [int(t) for t in gen["prompt_ids"]], [int(t) for t in gen["generated_ids"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"reference_check: FAIL: cannot read the inputs: {type(e).__name__}: {e}")
        return 2

    router = cfg.router.type if cfg.router.type == "linear" else \
        f"recurrent {cfg.router.cell}/{cfg.router.recurrence}"
    print(f"reference_check: {args.export}: {cfg.num_layers} layers, MoE layers {cfg.moe.layers}, "
          f"{router} router, shared expert {cfg.moe.shared_expert}, tied "
          f"{cfg.tie_embeddings}, capacity_factor {cfg.moe.capacity_factor:g}")

    failures = []
    # 1. Per-position losses of every dumped window.
    #
    # Two float32 implementations agree to ~1e-6 at most positions, but a few positions of
    # some models are ill-conditioned: float32 rounding alone moves their loss by 1e-5..1e-4
    # (RMoE's own float32 loss is as far from a float64 evaluation there as ours is). So a
    # position beyond --tolerance is accepted only if it is such a position: its difference
    # is within tolerance + NOISE_SLACK x |our float32 loss - our float64 loss| there. A real
    # mismatch (a wrong layout, routing, norm, ...) is off by far more, and at most positions.
    # --strict turns this off. The mean loss must agree within --tolerance regardless.
    windows_losses = []
    for w in windows:
        ours = window_losses(model, w["tokens"])
        ref = torch.tensor([float(p["loss"]) for p in w["positions"]], dtype=torch.float64)
        windows_losses.append((w, ours, ref))
    ours_all = torch.cat([o for _, o, _ in windows_losses])
    ref_all = torch.cat([r for _, _, r in windows_losses])
    diff = (ours_all - ref_all).abs()
    where = [(w["window"], t) for w, o, _ in windows_losses for t in range(o.numel())]
    worst = int(diff.argmax())
    ours_mean, ref_mean = float(ours_all.mean()), float(ref_all.mean())
    print(f"losses: {len(windows)} window(s), {diff.numel()} positions: mean loss {ours_mean:.7f} "
          f"(rmoe_eval {ref_mean:.7f}, diff {abs(ours_mean - ref_mean):.2e}); max |diff| "
          f"{float(diff.max()):.3e} at window {where[worst][0]} position {where[worst][1]} "
          f"(tolerance {args.tolerance:g}); median |diff| {float(diff.median()):.1e}")
    if bool(torch.isnan(diff).any()):
        failures.append("NaN losses")
    beyond = (diff > args.tolerance).nonzero().squeeze(1).tolist()
    if beyond and not args.strict:
        model64, _, _ = load_export(args.export, dtype="float64")
        ours64 = torch.cat([window_losses(model64, w["tokens"]) for w, _, _ in windows_losses])
        noise = (ours_all - ours64).abs()
        allowed = args.tolerance + NOISE_SLACK * noise
        unexplained = [i for i in beyond if not diff[i] <= allowed[i]]
        for i in beyond[:10]:
            print(f"  window {where[i][0]} position {where[i][1]}: |diff| {float(diff[i]):.3e}; "
                  f"float32 noise there (|our fp32 - fp64 loss|) {float(noise[i]):.3e}: "
                  f"{'ill-conditioned, accepted' if i not in unexplained else 'NOT explained by rounding'}")
        if len(beyond) > 10:
            print(f"  ... {len(beyond) - 10} more")
        print(f"  {len(beyond)} position(s) beyond {args.tolerance:g}, {len(unexplained)} not "
              f"explained by float32 rounding (allowed: tolerance + {NOISE_SLACK:g} x noise)")
        if unexplained:
            i = max(unexplained, key=lambda j: float(diff[j]))
            failures.append(f"{len(unexplained)} position loss(es) differ beyond tolerance and "
                            f"float32 noise, worst {float(diff[i]):.3e} at window {where[i][0]} "
                            f"position {where[i][1]}")
    elif beyond:
        failures.append(f"{len(beyond)} position loss(es) differ by more than {args.tolerance:g}, "
                        f"worst {float(diff.max()):.3e}")
    if not abs(ours_mean - ref_mean) <= args.tolerance:
        failures.append(f"mean loss differs by {abs(ours_mean - ref_mean):.3e} > {args.tolerance:g}")
    max_diff = float(diff.max())

    # 2. Greedy generation: the same ids, all of them.
    got = generate(model, prompt, len(expected), temperature=0.0)
    first_diff = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), None)
    if first_diff is None and len(got) != len(expected):
        first_diff = min(len(got), len(expected))
    if first_diff is None:
        print(f"generation: {len(got)} greedy tokens after a {len(prompt)}-token prompt, identical")
    else:
        print(f"generation: first difference at generated position {first_diff}: rmoe_torch "
              f"{got[first_diff:first_diff + 8]}..., rmoe_generate "
              f"{expected[first_diff:first_diff + 8]}... ({len(got)} vs {len(expected)} tokens)")
        if first_diff < min(len(got), len(expected)):
            # A near-tie between the two tokens is float32 noise, not a bug: say which it was.
            context = prompt + got[:first_diff]
            with torch.no_grad():
                logits = model(torch.tensor([context]), capacity_prefix=len(prompt))[0, -1]
            gap = float(logits[got[first_diff]] - logits[expected[first_diff]])
            print(f"  at that step rmoe_torch's logit of its token {got[first_diff]} exceeds that "
                  f"of rmoe_generate's token {expected[first_diff]} by {gap:.3e}"
                  f"{' (a near-tie: float32 rounding decides it)' if gap < 1e-4 else ''}")
        failures.append(f"greedy tokens differ from generated position {first_diff}")

    if failures:
        print("reference_check: FAIL: " + "; ".join(failures))
        return 1
    print(f"reference_check: PASS (max loss diff {max_diff:.3e}, mean loss diff "
          f"{abs(ours_mean - ref_mean):.1e}, {len(got)} generated tokens identical)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

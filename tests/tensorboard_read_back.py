"""Reads a finished rmoe_train run's TensorBoard event files with TensorBoard's own reader
and checks them against the run's metrics.jsonl: every logged value under its tag, at its
step, once (a resumed run's restart must have superseded the steps it computed again).

Usage: tensorboard_read_back.py OUTPUT_DIR. Exit 77 (skipped) where tensorboard is not
installed, 1 on a mismatch."""
import json
import os
import sys

try:
    import numpy as np
    from tensorboard.backend.event_processing import event_accumulator
except ImportError as error:
    print(f"tensorboard_read_back: skipped: {error}")
    sys.exit(77)

run = sys.argv[1]
expected = {}  # tag -> {step: value}


def expect(tag, step, value):
    expected.setdefault(tag, {})[step] = value


for line in open(os.path.join(run, "metrics.jsonl")):
    record = json.loads(line)
    step = record.get("step")
    if record.get("type") == "train":
        for key in ("loss", "router_loss", "lr", "grad_norm", "tokens_per_s"):
            expect(f"train/{key}", step, record[key])
        for layer in record["moe"]:
            expect(f"moe/layer_{layer['layer']}/load_cv", step, layer["load_cv"])
            expect(f"moe/layer_{layer['layer']}/router_entropy", step, layer["router_entropy"])
    elif record.get("type") == "eval":
        expect("val/loss", step, record["val_loss"])
        expect("val/ppl", step, record["val_ppl"])
        for layer in record["routing"]["layers"]:
            expect(f"val_moe/layer_{layer['layer']}/load_cv", step, layer["load_cv"])
            expect(f"val_moe/layer_{layer['layer']}/entropy", step, layer["entropy"])

files = sorted(f for f in os.listdir(run) if f.startswith("events.out.tfevents."))
reader = event_accumulator.EventAccumulator(run, size_guidance={event_accumulator.SCALARS: 0})
reader.Reload()
tags = set(reader.Tags()["scalars"])
problems = []
if tags != set(expected):
    problems.append(f"tags differ: only in the events {sorted(tags - set(expected))}, "
                    f"only in metrics.jsonl {sorted(set(expected) - tags)}")
values = 0
for tag in sorted(tags & set(expected)):
    events = reader.Scalars(tag)
    steps = [e.step for e in events]
    if sorted(steps) != sorted(expected[tag]) or len(set(steps)) != len(steps):
        problems.append(f"{tag}: steps {steps}, expected {sorted(expected[tag])}")
        continue
    for e in events:
        want = np.float32(expected[tag][e.step])
        if not np.isclose(np.float32(e.value), want, rtol=1e-6, atol=0):
            problems.append(f"{tag} at step {e.step}: {e.value} in the events, {want} in metrics.jsonl")
        values += 1
for problem in problems[:20]:
    print("tensorboard_read_back:", problem)
if problems:
    sys.exit(1)
print(f"tensorboard_read_back: PASS: {len(files)} event file(s), {len(tags)} tags, "
      f"{values} values equal to metrics.jsonl")

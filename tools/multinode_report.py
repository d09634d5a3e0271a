#!/usr/bin/env python3
"""The tables of docs/results/multinode.md from tools/multinode_bench.sh's raw numbers.

  tools/multinode_report.py DATA_DIR              print the tables (Markdown)
  tools/multinode_report.py DATA_DIR --summary    print the summary docs/scaling.md shows
  tools/multinode_report.py DATA_DIR --check PAGE exit 1 unless PAGE holds them verbatim
                                                  between "<!-- tables begin -->" and
                                                  "<!-- tables end -->", or the summary
                                                  between "<!-- network summary begin -->"
                                                  and "<!-- network summary end -->"

Measured: rmoe_bench collectives medians (N<nodes>_<setting>.collectives.json) and
rmoe_bench step means (.step.json); predicted: rmoe_plan --collectives (.predicted.json)
and rmoe_plan's row of the same layout (.plan.json), from the profile of each setting.
"""
import json
import os
import re
import sys

RATE_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}
DELAY_UNITS = {"s": 1, "ms": 1e-3, "us": 1e-6}
WITHIN = 0.20  # the goal: predictions within 20% of the measurement


def load(path):
    with open(path) as f:
        return json.load(f)


def settings(data_dir):
    """(nodes, setting name) of every measured collectives file, in a stable order."""
    found = []
    for name in os.listdir(data_dir):
        m = re.fullmatch(r"N(\d+)_(.+)\.collectives\.json", name)
        if m and os.path.exists(os.path.join(data_dir, f"N{m[1]}_{m[2]}.predicted.json")):
            found.append((int(m[1]), m[2]))

    def key(item):
        nodes, setting = item
        if setting == "none":
            return (nodes, 0, 0)
        rate, delay = describe(setting)
        return (nodes, rate, delay)

    return sorted(found, key=key)


def describe(setting):
    """'1gbit_500us' -> (bits/s, one-way node-to-node latency in s)."""
    rate, delay = setting.split("_")
    r = re.fullmatch(r"([0-9.]+)([kmg]?)bit", rate)
    d = re.fullmatch(r"([0-9.]+)(s|ms|us)", delay)
    return float(r[1]) * RATE_UNITS[r[2]], 2 * float(d[1]) * DELAY_UNITS[d[2]]


def label(setting):
    if setting == "none":
        return "unshaped"
    rate, latency = describe(setting)
    rate_text = f"{rate / 1e9:g} Gbit/s" if rate >= 1e9 else f"{rate / 1e6:g} Mbit/s"
    return f"{rate_text}, {latency * 1e3:g} ms"


def collectives_table(data_dir):
    rows = [
        "| nodes | link (rate, one-way latency) | op | bytes | measured us | predicted us | predicted / measured | busbw, % of the link |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    ratios = {}  # (nodes, rate, message size class) -> predicted / measured, shaped links
    for nodes, setting in settings(data_dir):
        base = os.path.join(data_dir, f"N{nodes}_{setting}")
        measured = load(base + ".collectives.json")["result"]["results"]
        predicted = {(p["op"], p["bytes"]): p for p in load(base + ".predicted.json")["results"]}
        rate = describe(setting)[0] if setting != "none" else None
        for m in measured:
            p = predicted.get((m["op"], m["bytes"]))
            if p is None:
                continue
            ratio = p["predicted_s"] / m["median_s"]
            share = f"{100 * m['busbw_bytes_per_s'] * 8 / rate:.0f}%" if rate and m["bytes"] >= 1 << 20 else ""
            if setting != "none":
                size = "1 MiB and more" if m["bytes"] >= 1 << 20 else "64 KiB and less"
                ratios.setdefault((nodes, rate, size), []).append(ratio)
            rows.append(
                f"| {nodes} | {label(setting)} | {m['op']} | {m['bytes']} | {m['median_s'] * 1e6:.0f} | "
                f"{p['predicted_s'] * 1e6:.0f} | {ratio:.2f} | {share} |")
    return rows, summarize(ratios)


def summarize(groups):
    """A table of how many predictions fall within 20%, per group of settings."""
    rows = ["| nodes | link rate | messages | predictions within 20% | predicted / measured |",
            "|---|---|---|---:|---|"]
    for (nodes, rate, size), ratios in sorted(groups.items()):
        within = sum(1 for r in ratios if abs(r - 1) <= WITHIN)
        rate_text = f"{rate / 1e9:g} Gbit/s" if rate >= 1e9 else f"{rate / 1e6:g} Mbit/s"
        rows.append(f"| {nodes} | {rate_text} | {size} | {within} of {len(ratios)} | "
                    f"{min(ratios):.2f} to {max(ratios):.2f} |")
    return "\n".join(rows)


def steps_table(data_dir):
    rows = [
        "| nodes | link (rate, one-way latency) | layout | measured step ms | of which communication ms | predicted step ms | predicted / measured |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    ratios = []
    for nodes, setting in settings(data_dir):
        base = os.path.join(data_dir, f"N{nodes}_{setting}")
        if not os.path.exists(base + ".step.json") or not os.path.exists(base + ".plan.json"):
            continue
        step = load(base + ".step.json")["result"]
        plan = load(base + ".plan.json")
        ep = step["expert_parallel_size"]
        row = next(r for r in plan["rows"] if r["expert_parallel_size"] == ep)
        ratio = row["step_s"] / step["step_s"]
        if setting != "none":
            ratios.append(ratio)
        rows.append(
            f"| {nodes} | {label(setting)} | EP {ep} x DP {step['data_parallel_size']} | "
            f"{step['step_s'] * 1e3:.1f} | {step['comm_s'] * 1e3:.1f} | {row['step_s'] * 1e3:.1f} | {ratio:.2f} |")
    within = sum(1 for r in ratios if abs(r - 1) <= WITHIN)
    summary = (f"Shaped links: {within} of {len(ratios)} step predictions within 20% "
               f"(ratios {min(ratios):.2f} to {max(ratios):.2f}).") if ratios else ""
    return rows, summary


def algorithm_table(data_dir):
    """Open MPI's binomial all-reduce (binomial_N<nodes>_<setting>.json, measured with
    coll_libnbc_iallreduce_algorithm 2) against the reduce-scatter + all-gather rmoe selects."""
    rows = ["| nodes | link | bytes | binomial: busbw, % of the link | reduce-scatter + all-gather | speed-up |",
            "|---|---|---:|---:|---:|---:|"]
    for name in sorted(os.listdir(data_dir)):
        m = re.fullmatch(r"binomial_N(\d+)_(.+)\.json", name)
        if not m:
            continue
        rate = describe(m[2])[0]
        binomial = load(os.path.join(data_dir, name))["result"]["results"]
        chosen = {(r["op"], r["bytes"]): r for r in
                  load(os.path.join(data_dir, f"N{m[1]}_{m[2]}.collectives.json"))["result"]["results"]}
        for b in binomial:
            c = chosen.get((b["op"], b["bytes"]))
            if c is None:
                continue
            rows.append(f"| {m[1]} | {label(m[2])} | {b['bytes']} | "
                        f"{100 * b['busbw_bytes_per_s'] * 8 / rate:.0f}% | "
                        f"{100 * c['busbw_bytes_per_s'] * 8 / rate:.0f}% | "
                        f"{b['median_s'] / c['median_s']:.2f}x |")
    return rows


def report(data_dir):
    algorithms = algorithm_table(data_dir)
    collectives, c_summary = collectives_table(data_dir)
    steps, s_summary = steps_table(data_dir)
    parts = ["### The all-reduce algorithm", "", *algorithms, "", "### Collectives: summary", "",
             c_summary, "", "### Collectives: every measurement", "", *collectives, "",
             "### Training steps", "", *steps, "", s_summary]
    return "\n".join(parts).rstrip() + "\n"


def summary(data_dir):
    """The part docs/scaling.md shows: how close the predictions came, and the steps."""
    _, c_summary = collectives_table(data_dir)
    steps, s_summary = steps_table(data_dir)
    return "\n".join([c_summary, "", *steps, "", s_summary]).rstrip() + "\n"


SECTIONS = {"tables": report, "network summary": summary}


def main(argv):
    if len(argv) == 3 and argv[2] == "--summary":
        sys.stdout.write(summary(argv[1]))
        return 0
    if len(argv) not in (2, 4) or (len(argv) == 4 and argv[2] != "--check"):
        sys.stderr.write(__doc__)
        return 2
    if len(argv) == 2:
        sys.stdout.write(report(argv[1]))
        return 0
    with open(argv[3]) as f:
        page = f.read()
    found = 0
    for name, make in SECTIONS.items():
        m = re.search(f"<!-- {name} begin -->\n(.*?)<!-- {name} end -->", page, re.S)
        if not m:
            continue
        found += 1
        if m[1] != make(argv[1]):
            print(f"{argv[3]}: its {name} differ from what {argv[1]} gives; regenerate them with "
                  f"tools/multinode_report.py {argv[1]}" + (" --summary" if name != "tables" else ""))
            return 1
    if not found:
        print(f"{argv[3]}: no <!-- tables begin --> or <!-- network summary begin --> section")
        return 1
    print(f"{argv[3]}: tables match {argv[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

"""The results tables of README.md and docs/results.md, rebuilt from the runs committed under docs/runs/ (ours).

    python -m shell.tables            # rewrite every marked table from its runs
    python -m shell.tables --check    # exit 1 if any table differs from what its runs give

A table is marked in the markdown by the line `<!-- table KIND FOLDER [FOLDER ...] -->` above it and
`<!-- /table -->` below; FOLDER holds one <method>-s<seed>/results.json per run (what `--methods ... --out`
writes, checkpoints left out). KIND is one of TABLES, or `tuning` (a folder of benchmarks/tune_baselines.py). No number in a marked table is typed by hand.
"""
import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

from shell import compare

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = ["README.md", "docs/results.md"]


def load_runs(folder):
    """{method: [results.json, ...] by seed} of every <method>-s<seed> run in folder."""
    runs = {}
    for path in sorted(Path(folder).glob("*-s*/results.json")):
        method = path.parent.name.rsplit("-s", 1)[0]
        runs.setdefault(method, []).append(json.loads(path.read_text()))
    for results in runs.values():
        results.sort(key=lambda r: r["config"]["seed"])
    if not runs:
        raise SystemExit(f"no <method>-s<seed>/results.json in {folder}")
    return runs


def signed(x):
    """+1.23 / −1.23 (a typographic minus) / 0 for exactly nothing (RI without replay, PA of local)."""
    return "0" if x == 0 else f"{x:+.2f}".replace("-", "−")


def interval(values):
    if values is None:
        return "–"
    mean, low, high = values
    return f"{signed(mean)} [{signed(low)}, {signed(high)}]"


def method_order(runs, reference="pfeddsh"):
    """reference first, then the others by final mean accuracy (best first), local last."""
    others = [m for m in runs if m not in (reference, "local")]
    mean = {m: np.mean([r["metrics"]["mean_acc"] for r in runs[m]]) for m in others}
    return ([reference] if reference in runs else []) + sorted(others, key=lambda m: -mean[m]) \
        + (["local"] if "local" in runs else [])


def headline(runs, reference="pfeddsh"):
    """Per method: mean accuracy ± std over seeds, mean PA and RI, and `reference` minus it (paired by seed)."""
    table = compare.summarize(runs)
    lines = ["| method | mean acc | PA | RI | pfeddsh minus it (paired 95 % interval) |", "|---|---|---|---|---|"]
    ours = {r["config"]["seed"]: 100 * r["metrics"]["mean_acc"] for r in runs[reference]}
    for method in method_order(runs, reference):
        col = table[method]
        accuracy = compare.cell(col["mean_acc"])
        pa = signed(float(np.mean(col["pa"]))) if col["pa"] else "–"
        ri = signed(float(np.mean(col["ri"])))
        if method == reference:
            lines.append(f"| **{method}** | **{accuracy}** | {pa} | {ri} | – |")
            continue
        pairs = [(ours[r["config"]["seed"]], 100 * r["metrics"]["mean_acc"]) for r in runs[method]
                 if r["config"]["seed"] in ours]
        difference = compare.paired_interval([a for a, _ in pairs], [b for _, b in pairs])
        lines.append(f"| {method} | {accuracy} | {pa} | {ri} | {interval(difference)} |")
    return lines


def replay_arms(runs):
    """Each replay arm's share of RI and pfeddsh minus the arm on RI, paired by seed (compare.replay_arms)."""
    return compare.replay_arms(runs)[3:]


def replay_cost(runs):
    """Per replay arm: seconds per replay (mean over every replay of every seed) and updates kept of those tried."""
    lines = ["| arm | s per replay | kept / tried | client queries per replay |", "|---|---|---|---|"]
    for arm in compare.REPLAY_ARMS:
        replays = [x for r in runs.get(arm, []) for x in r["replay"]]
        if replays:
            kept = sum(len(x.get("kept", x["tried"])) for x in replays)       # the paper's replay keeps all it tries
            tried = sum(len(x["tried"]) for x in replays)
            seconds = np.mean([x["replay_s"] for x in replays])
            queries = np.mean([x.get("client_queries", 0) for x in replays])
            lines.append(f"| {arm} | {seconds:.1f} | {kept} / {tried} | {queries:.1f} |")
    return lines


def per_batch(runs):
    """Per method and batch t: accuracy of batch t's clients right after its own stage (t) and at the end,
    mean over seeds: what a batch gets on arrival and what it keeps."""
    num_batches = len(next(iter(runs.values()))[0]["metrics"]["batch_acc"])
    header = [f"batch {t}: own stage / end" for t in range(num_batches)]
    lines = ["| method | " + " | ".join(header) + " |", "|---" * (num_batches + 1) + "|"]
    for method in method_order(runs):
        cells = []
        for t in range(num_batches):
            own = np.mean([100 * r["metrics"]["batch_acc"][t][t] for r in runs[method]])
            end = np.mean([100 * r["metrics"]["batch_acc"][-1][t] for r in runs[method]])
            cells.append(f"{own:.1f} / {end:.1f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def ri_per_batch(runs, method="pfeddsh"):
    """`method`'s RI of every earlier batch on every seed (points), with the smallest and the mean: whether any
    batch was left worse off than its own stage left it."""
    rows = sorted(runs.get(method, []), key=lambda r: r["config"]["seed"])
    if not rows:
        return []
    num = len(rows[0]["metrics"]["ri_per_batch"])
    lines = ["| seed | " + " | ".join(f"batch {k}" for k in range(num)) + " | smallest | mean |",
             "|---" * (num + 3) + "|"]
    for r in rows:
        ri = [100 * x for x in r["metrics"]["ri_per_batch"]]
        lines.append(f"| {r['config']['seed']} | " + " | ".join(signed(x) for x in ri)
                     + f" | {signed(min(ri))} | {signed(float(np.mean(ri)))} |")
    return lines


def compute(runs, reference="pfeddsh"):
    """Per method: wall time of a whole run (minutes, one thread, mean ± std over seeds), its time relative to
    `reference`, and the SGD steps its clients took (PA's reference run excluded)."""
    table = compare.summarize(runs)
    ours = np.mean(table[reference]["time_min"]) if reference in table else None
    lines = ["| method | minutes per run | x pfeddsh's time | local SGD steps |", "|---|---|---|---|"]
    for method in method_order(runs, reference):
        col = table[method]
        ratio = f"{np.mean(col['time_min']) / ours:.2f}" if ours else "–"
        steps = f"{np.mean(col['local_steps']):.0f}" if col["local_steps"] else "–"
        lines.append(f"| {method} | {compare.cell(col['time_min'], digits=1)} | {ratio} | {steps} |")
    return lines


def holm(runs):
    """pfeddsh minus each method on final mean accuracy: paired interval, p and Holm's verdict (compare.versus)."""
    return compare.versus(runs)[3:]


def tuning(folder):
    """Per baseline (a subfolder <method>/<knob>-<value>-s<seed>/ each, benchmarks/tune_baselines.py): every
    value of its knob with its final mean validation accuracy over the development seeds, the chosen (the
    best; the smaller value on a tie, as the tuning picks it) in bold."""
    lines = ["| baseline | knob | value: mean validation accuracy (chosen in bold) | seeds |", "|---|---|---|---|"]
    for method_dir in sorted(p for p in Path(folder).iterdir() if p.is_dir()):
        scores, seeds, flag = {}, set(), None
        for path in method_dir.glob("*-s*/results.json"):
            # <knob>-<value>-s<seed>: the knob is letters and hyphens, the value starts with a digit (3.7037e-05)
            flag = re.match(r"([a-z][a-z-]*?)-\d", path.parent.name).group(1)
            results = json.loads(path.read_text())
            value = results["config"][flag.replace("-", "_")]
            scores.setdefault(value, []).append(100 * results["val_metrics"]["mean_acc"])
            seeds.add(results["config"]["seed"])
        if not scores:
            continue
        mean = {v: float(np.mean(a)) for v, a in sorted(scores.items())}
        chosen = max(mean, key=mean.get)
        cells = [f"**{v:g}: {a:.2f}**" if v == chosen else f"{v:g}: {a:.2f}" for v, a in mean.items()]
        lines.append(f"| {method_dir.name} | `--{flag}` | {' · '.join(cells)} | {', '.join(map(str, sorted(seeds)))} |")
    return lines


def dream_map(folder):
    """Per replay setting (the records of benchmarks/dream_map.py, *.jsonl): each arm's validation RI over the
    development runs both have, and the dreams minus each control, paired by run with a 95 % t interval."""
    settings = {}
    for path in sorted(Path(folder).glob("*.jsonl")):
        for line in filter(str.strip, path.read_text().splitlines()):
            r = json.loads(line)
            key = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(r["setting"].items()))
            settings.setdefault(key or "the default", {}).setdefault(r["arm"], {})[r["seed"]] = r
    controls = ["noise", "noise-kd", "own"]
    lines = ["| setting | seeds | teachers read | dreams | " + " | ".join(controls) + " | "
             + " | ".join(f"dreams − {c}" for c in controls) + " |", "|---" * (4 + 2 * len(controls)) + "|"]
    for key, arms in settings.items():
        seeds = sorted(set.intersection(*(set(a) for a in arms.values())))
        ri = {arm: [100 * arms[arm][s]["ri_val"] for s in seeds] for arm in ["dreams"] + controls}
        reads = np.mean([arms["dreams"][s]["teacher_reads"] for s in seeds])
        versus = [paired_interval_or_one(ri["dreams"], ri[c]) for c in controls]
        lines.append(f"| {key} | {', '.join(map(str, seeds))} | {100 * reads:.0f} % | "
                     + " | ".join(signed(float(np.mean(ri[a]))) for a in ["dreams"] + controls) + " | "
                     + " | ".join(versus) + " |")
    return lines


def paired_interval_or_one(a, b):
    """a − b paired: the mean and its 95 % interval, or the one difference there is."""
    pair = compare.paired_interval(a, b)
    return interval(pair) if pair else signed(float(np.mean(np.asarray(a) - np.asarray(b))))


# Kinds that read their folder themselves rather than its <method>-s<seed> runs.
FOLDER_TABLES = {"tuning": tuning, "dream-map": dream_map}

TABLES = {"headline": headline, "replay-arms": replay_arms, "replay-cost": replay_cost, "per-batch": per_batch,
          "compute": compute, "holm": holm, "ri-per-batch": ri_per_batch}


def rebuild(text, root=REPO):
    """The markdown with every marked table rebuilt from its runs."""
    out, lines, k = [], text.splitlines(), 0
    while k < len(lines):
        line = lines[k]
        out.append(line)
        k += 1
        if not line.startswith("<!-- table "):
            continue
        kind, *folders = line[len("<!-- table "):].removesuffix("-->").split()
        if kind in FOLDER_TABLES:
            out += FOLDER_TABLES[kind](root / folders[0])
        else:
            runs = {}
            for folder in folders:
                runs.update(load_runs(root / folder))
            out += TABLES[kind](runs)
        while k < len(lines) and lines[k] != "<!-- /table -->":
            k += 1
        if k == len(lines):
            raise SystemExit(f"a table marked '{line}' has no '<!-- /table -->' below it")
    return "\n".join(out) + ("\n" if text.endswith("\n") else "")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table differs from its runs")
    args = p.parse_args(argv)
    differs = []
    for name in DOCUMENTS:
        path = REPO / name
        text = path.read_text()
        new = rebuild(text)
        if new != text:
            differs.append(name)
            if not args.check:
                path.write_text(new)
    verb = "differ from their runs" if args.check else "rebuilt"
    print(f"{', '.join(differs)}: {verb}" if differs else "every marked table is what its runs give")
    return 1 if differs and args.check else 0


if __name__ == "__main__":
    sys.exit(main())

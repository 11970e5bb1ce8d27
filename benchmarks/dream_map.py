"""Where do the dreams start to matter? The dreams against each control, on validation, development seeds.

    python benchmarks/dream_map.py runs/map/t1-s720 runs/map/t1-s721 --setting iterations=50 \
        --setting iterations=2000,bn_weight=10,synthesis_lr=0.05 --out runs/map/t1.jsonl

Takes finished `--method pfeddsh --no-replay` runs with their checkpoints. Without replay every client's
generated model is bitwise the same from the end of its own stage on (its batch's mask is frozen, nothing
writes its row), and what a client uploaded never changes after its stage: the final checkpoint is the state
every stage's replay would have met. So this replays the stages in order on it, as a `--method pfeddsh` run
with the setting would (arm `dreams`; `--full` checks it against a full run, bit for bit), and once per
control of `--replay-control` (extensions/controls.py), each arm on its own copy of the embedding rows. One
synthesis per stage serves every arm: the controls dream exactly as the dreams do, then use something else.
No replay leaves RI at exactly 0, so an arm's RI is also its gain over no replay. Reads validation data only.

A setting overrides the run's replay settings: num_images, iterations, bn_weight, synthesis_lr, tv_weight
(DeepInversion's), steps, lr, keep (the fine-tuning's). Appends one JSON line per (run, setting, arm) to --out
and prints, per setting, each arm's validation RI and the dreams minus each control, paired over the runs.
"""
import argparse
import functools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import deepinversion as di  # noqa: E402
import train  # noqa: E402
from extensions import controls  # noqa: E402
from shell import compare, runner  # noqa: E402

ARMS = ("dreams",) + tuple(c for c in controls.CONTROLS if c != "none")
SYNTHESIS = {"synthesis_lr": "lr", "tv_weight": "tv_weight"}       # synthesize()'s own keywords


def parse_setting(text):
    """'iterations=2000,bn_weight=10' -> {'iterations': 2000, 'bn_weight': 10.0}."""
    setting = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        setting[key] = value if key == "keep" else (int(value) if key in ("num_images", "iterations", "steps")
                                                     else float(value))
    return setting


def memoised_dream(cache):
    """deepinversion.dream, computed once per (dreamers, seed): every arm of a stage asks for the same dreams."""
    dream = di.dream

    def once(server, dreamers, **settings):
        key = (tuple(dreamers), settings["seed"])
        if key not in cache:
            cache[key] = dream(server, dreamers, **settings)
        return cache[key]
    return once


def validation(server, client):
    """The client's validation accuracy under its generated model (never its test data)."""
    return client.evaluate(server.generate(client.cid), server.bn_stats[client.cid], "val")


def run_arms(run_dir, setting, matrices=False):
    """{arm: record} for one finished no-replay run under one setting. With `matrices` (a final's), every
    earlier client is also measured after every stage, on test and validation: the arm's accuracy matrices."""
    config, _, clients, server, batches, _ = runner.restore_finished(run_dir)
    settings = dict(train.replay_settings(config), **{k: v for k, v in setting.items() if k not in SYNTHESIS})
    server.replay_settings = settings
    rows = server.hypernet.client_embeddings
    start_rows = rows.detach().clone()
    earlier = [c for b in batches[:-1] for c in b]
    before = {c: validation(server, clients[c]) for c in earlier}        # right after its own stage
    synthesize, dream, cache = di.synthesize, di.dream, {}
    di.synthesize = functools.partial(synthesize, **{SYNTHESIS[k]: v for k, v in setting.items() if k in SYNTHESIS})
    di.dream = memoised_dream(cache)
    records = {}
    try:
        for arm in ARMS:
            with torch.no_grad():
                rows.copy_(start_rows)
            server.dreams, start, reports, measured = {}, time.time(), [], {}
            for t in range(1, len(batches)):
                seed = config["seed"] + t                   # what Server.replay hands deepinversion.replay
                reports.append(di.replay(server, t, seed=seed, **settings) if arm == "dreams"
                               else controls.replay(server, t, arm, seed=seed, **settings))
                if matrices:
                    measured[t] = {c: server.evaluate(clients[c]) for b in batches[:t] for c in b}
            after = {c: validation(server, clients[c]) for c in earlier}
            ri_per_batch = [float(np.mean([after[c] - before[c] for c in b])) for b in batches[:-1]]
            records[arm] = dict(run=str(run_dir), seed=config["seed"], setting=setting, arm=arm,
                                ri_val=float(np.mean(ri_per_batch)), ri_val_per_batch=ri_per_batch,
                                final_val={c: after[c] for c in earlier}, seconds=time.time() - start,
                                measured=measured, reports=[{k: v for k, v in r.items() if k not in ("images", "labels")}
                                                            for r in reports])
        # What the dreams are: how often each new client's own model reads its dreams as the class they were
        # dreamed for, and the BN loss synthesis reached.
        reads = [float((logits.argmax(1) == labels).float().mean()) for (dreamers, _), (out, _, _) in cache.items()
                 for j, (_, labels, logits) in out.items()]
        records["dreams"].update(teacher_reads=float(np.mean(reads)) if reads else None,
                                 bn_loss_end=[x for r in reports for x in r["bn_loss_end"]])
    finally:
        di.synthesize, di.dream = synthesize, dream
        with torch.no_grad():
            rows.copy_(start_rows)
    return records


CONFIG_KEYS = {"num_images": "replay_images", "iterations": "replay_iterations", "bn_weight": "replay_bn_weight",
               "steps": "replay_steps", "lr": "replay_lr", "keep": "replay_keep",
               "synthesis_lr": "replay_synthesis_lr", "tv_weight": "replay_tv_weight"}   # the last two: no flag
NAMES = {"dreams": "pfeddsh", "noise": "pfeddsh-noise", "noise-kd": "pfeddsh-noise-kd", "own": "pfeddsh-own"}


def write_results(run_dir, setting, records, folder):
    """Each arm's results.json, as a full run of it would write it: the no-replay run's, with every earlier
    client's accuracies after each stage t >= 1 replaced by the arm's (replay moves nobody else), the metrics
    recomputed, and the replay settings and reports. The no-replay run itself is the arm pfeddsh-no-replay."""
    base = json.loads((Path(run_dir) / "results.json").read_text())
    seed, batches = base["config"]["seed"], base["batches"]
    out = {"pfeddsh-no-replay": base}
    for arm, record in records.items():
        results = json.loads(json.dumps(base))
        for t, scores in record["measured"].items():
            for c, (test, val) in scores.items():
                results["accuracy"][t][c], results["val_accuracy"][t][c] = test, val
        results["config"].update(no_replay=False, replay_control="none" if arm == "dreams" else arm,
                                 **{CONFIG_KEYS[k]: v for k, v in setting.items()})
        results["metrics"] = train.metrics(results["accuracy"], batches, base["test_sizes"], base["local_accuracy"])
        results["val_metrics"] = train.metrics(results["val_accuracy"], batches, base["test_sizes"])
        results.update(replay=record["reports"], replay_s=record["seconds"],
                       reconstructed_from=f"benchmarks/dream_map.py --results on {run_dir}, setting {setting}")
        out[NAMES[arm]] = results
    for name, results in out.items():
        path = Path(folder) / f"{name}-s{seed}" / "results.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1))


def summary(records):
    """One block per setting: each arm's validation RI over the runs, and the dreams minus each control."""
    by_setting = {}
    for r in records:
        by_setting.setdefault(json.dumps(r["setting"], sort_keys=True), {}).setdefault(r["arm"], {})[r["run"]] = r
    lines = []
    for key, arms in by_setting.items():
        runs = sorted(set.intersection(*(set(a) for a in arms.values())))
        lines.append(f"setting {key} ({len(runs)} runs; validation RI in points, no replay = 0)")
        for arm in ARMS:
            if arm in arms:
                values = [100 * arms[arm][r]["ri_val"] for r in runs]
                lines.append(f"  {arm:9s} RI {np.mean(values):+.2f}  per run " + " ".join(f"{v:+.2f}" for v in values))
        reads = [arms["dreams"][r].get("teacher_reads") for r in runs if "dreams" in arms]
        if reads and None not in reads:
            lines.append(f"  teachers read {100 * np.mean(reads):.0f} % of their dreams as dreamed")
        for arm in ARMS[1:]:
            if arm in arms and "dreams" in arms:
                a, b = ([100 * arms[x][r]["ri_val"] for r in runs] for x in ("dreams", arm))
                pair = compare.paired_interval(a, b)
                lines.append(f"  dreams - {arm:9s} " + (f"{pair[0]:+.2f} [{pair[1]:+.2f}, {pair[2]:+.2f}]" if pair
                                                        else f"{np.mean(a) - np.mean(b):+.2f}"))
    return "\n".join(lines)


def by_setting_and_seed(records):
    """{setting as sorted JSON: {seed: {arm: record}}}."""
    grouped = {}
    for r in records:
        grouped.setdefault(json.dumps(r["setting"], sort_keys=True), {}).setdefault(r["seed"], {})[r["arm"]] = r
    return grouped


def pick(records, seeds, most_iterations=500):
    """Issue 42's declared rule for the final's setting: among the settings of at most `most_iterations`
    synthesis iterations that ran on every one of `seeds`, the one with the largest mean over them of validation
    RI(dreams) minus the best control's; the default ({}) if none is above 0. Returns (setting, {setting: mean})."""
    margins = {}
    for key, by_seed in by_setting_and_seed([r for r in records if r["seed"] in seeds]).items():
        # a setting without `iterations` keeps the runs' own (the default's 50)
        if json.loads(key).get("iterations", 0) > most_iterations or set(by_seed) != set(seeds):
            continue
        if any(set(ARMS) - set(arms) for arms in by_seed.values()):
            continue
        margins[key] = float(np.mean([100 * (arms["dreams"]["ri_val"] - max(arms[a]["ri_val"] for a in ARMS[1:]))
                                      for arms in by_seed.values()]))
    best = max(margins, key=margins.get, default=None)
    return (json.loads(best) if best is not None and margins[best] > 0 else {}), margins


def plot(records, path):
    """The map as a picture: per setting, the dreams minus each control (validation RI, points), one dot per
    seed and a bar at their mean; above 0 the dreams did better."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    by_setting = by_setting_and_seed(records)
    keys = list(by_setting)
    fig, ax = plt.subplots(figsize=(2.2 + 2.4 * len(keys), 3.6))
    for j, control in enumerate(ARMS[1:]):
        for k, key in enumerate(keys):
            seeds = [arms for arms in by_setting[key].values() if "dreams" in arms and control in arms]
            gaps = [100 * (arms["dreams"]["ri_val"] - arms[control]["ri_val"]) for arms in seeds]
            x = k + (j - 1) * 0.25
            ax.bar(x, np.mean(gaps) if gaps else 0, width=0.22, color=f"C{j}", alpha=0.5,
                   label=f"dreams − {control}" if k == 0 else None)
            ax.scatter([x] * len(gaps), gaps, color=f"C{j}", s=12, zorder=3)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(keys)), ["the default" if key == "{}" else
                                     ",\n".join(f"{k}={v}" for k, v in json.loads(key).items()) for key in keys],
                  fontsize=8)
    ax.set_ylabel("validation RI, points")
    ax.set_title("the dreams minus each control (dots: seeds; bars: their mean)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="*", help="finished --no-replay runs (with checkpoint.pt)")
    parser.add_argument("--setting", action="append", default=[], help="replay settings to try, k=v,k=v")
    parser.add_argument("--out", required=True, help="a .jsonl file the records are appended to")
    parser.add_argument("--full", help="a full --method pfeddsh run of the first run's seed and settings: "
                                       "check that the arm `dreams` gives its validation accuracies, bit for bit")
    parser.add_argument("--summary", action="store_true", help="only print the summary of --out")
    parser.add_argument("--results", help="a final's folder: write each arm's results.json there (one setting; "
                                          "measures test data too, so never for choosing anything)")
    parser.add_argument("--pick", help="development seeds, e.g. 720,721,722: print the setting issue 42's declared "
                                       "rule picks from --out's records")
    parser.add_argument("--plot", help="a .png: draw the map of --out's records there")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    if not args.summary:
        for setting in map(parse_setting, args.setting or [""]):
            for run in args.runs:
                records = run_arms(run, setting, matrices=bool(args.results))
                if args.results:
                    write_results(run, setting, records, args.results)
                with open(out, "a") as f:
                    for record in records.values():
                        f.write(json.dumps({k: v for k, v in record.items() if k != "measured"}) + "\n")
                print(f"{run} {setting}: " + ", ".join(f"{a} {100 * r['ri_val']:+.2f} ({r['seconds']:.0f} s)"
                                                        for a, r in records.items()), flush=True)
                if args.full and run == args.runs[0]:
                    full = json.loads((Path(args.full) / "results.json").read_text())["val_accuracy"][-1]
                    same = all(full[int(c)] == v for c, v in records["dreams"]["final_val"].items())
                    print(f"the arm `dreams` against the full run {args.full}: "
                          f"{'the same validation accuracies' if same else 'DIFFERENT'}", flush=True)
    if out.exists():
        records = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
        print(summary(records))
        if args.plot:
            plot(records, args.plot)
            print(f"wrote {args.plot}")
        if args.pick:
            seeds = sorted(int(s) for s in args.pick.split(","))
            chosen, margins = pick(records, seeds)
            print(f"the declared rule on seeds {', '.join(map(str, seeds))}: mean of dreams minus the best control "
                  "(validation RI, points) per candidate of at most 500 iterations:")
            for key, margin in sorted(margins.items(), key=lambda x: -x[1]):
                print(f"  {key:60s} {margin:+.3f}")
            print(f"  S* = {json.dumps(chosen)}" + ("" if chosen else " (the default)"))


if __name__ == "__main__":
    main()

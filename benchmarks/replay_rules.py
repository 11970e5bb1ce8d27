"""Which replay settings leave earlier clients better off, on validation data, without a client asked?

    python benchmarks/replay_rules.py runs/nr-710 runs/nr-711 --rule keep=end --rule keep=held-out \
        --rule keep=end,lr=0.003

Takes finished `--method pfeddsh --no-replay` runs (development seeds; their checkpoints). Without replay every
client's generated model is bitwise the same at every stage, so the final checkpoint serves every stage t >= 1:
for each t it dreams once (the new clients' dreams and the tried clients' own, deepinversion.dream), then for
each rule fine-tunes every tried earlier client as the paper's replay does (deepinversion.fine_tune), reads its
validation accuracy before and after, and puts its embedding row back. Each stage's replay is applied alone to
the state it would have met, so a batch's RI is estimated as the sum of its clients' changes over the later
stages (replays compound in a run; this ignores that). Test data is never read.

Prints per rule: tried clients, mean validation change per tried client (points), the share that lost more than
1 point, and per run the estimated validation RI of every earlier batch with its smallest value.
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import deepinversion as di  # noqa: E402
import train  # noqa: E402
from shell import runner  # noqa: E402


def parse_rule(text):
    """'keep=end,lr=0.003' -> {'keep': 'end', 'lr': 0.003} over deepinversion.fine_tune's settings."""
    rule = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        rule[key] = value if key == "keep" else (int(value) if key == "steps" else float(value))
    return rule


def stage_changes(run_dir, rules):
    """{rule index: {cid: [validation change (points) at each stage t >= 1 it was tried]}}, and the batches."""
    config, _, clients, server, batches, _ = runner.restore_finished(run_dir)
    settings = train.replay_settings(config)
    fine_tuning = {k: v for k, v in settings.items() if k not in ("num_images", "iterations", "bn_weight")}
    changes = {r: {} for r in range(len(rules))}
    rows = server.hypernet.client_embeddings
    for t in range(1, len(batches)):
        tried, teachers = di.who_replays(server, t)
        if not tried:
            continue
        server.dreams = {}
        dreamed, _, _ = di.dream(server, teachers + tried, num_images=settings["num_images"],
                                 iterations=settings["iterations"], bn_weight=settings["bn_weight"],
                                 seed=config["seed"] + t)
        server.dreams = {i: dreamed[i] for i in tried}
        images, labels, logits = (torch.cat([dreamed[j][n] for j in teachers]) for n in range(3))
        before = {i: server.evaluate(clients[i])[1] for i in tried}
        for r, rule in enumerate(rules):
            saved = rows.detach().clone()
            for i in tried:
                di.fine_tune(server, i, *di.fine_tuning_set(server, i, images, labels, logits),
                             **dict(fine_tuning, **rule))
            for i in tried:
                changes[r].setdefault(i, []).append(100 * (server.evaluate(clients[i])[1] - before[i]))
            with torch.no_grad():
                rows.copy_(saved)
        print(f"{run_dir} stage {t}: {len(tried)} tried", flush=True)
    return changes, batches


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="folders of finished --no-replay pfeddsh runs")
    p.add_argument("--rule", action="append", required=True, help="fine_tune settings, e.g. keep=end,lr=0.003")
    args = p.parse_args()
    torch.set_num_threads(1)
    rules = [parse_rule(r) for r in args.rule]
    found = [stage_changes(run, rules) for run in args.runs]
    print("\n| rule | tried | mean change per try (points) | tries losing > 1 point | estimated validation RI per "
          "batch, per run (smallest) |\n|---|---|---|---|---|")
    for r, text in enumerate(args.rule):
        tries = [c for changes, _ in found for per in changes[r].values() for c in per]
        ri = []
        for changes, batches in found:
            per_batch = [float(np.mean([sum(changes[r].get(c, [])) for c in b])) for b in batches[:-1]]
            ri.append("[" + ", ".join(f"{x:+.2f}" for x in per_batch) + f"] ({min(per_batch):+.2f})")
        print(f"| {text} | {len(tries)} | {np.mean(tries):+.2f} | {np.mean(np.array(tries) < -1):.0%} | "
              f"{'; '.join(ri)} |")


if __name__ == "__main__":
    main()

"""What must replay cost to work? Replay's gain against its synthesis budget (docs/design.md §5).

Takes finished `--no-replay` runs: their checkpoint holds the server exactly as replay would find it after
the last stage (masks frozen, nothing replayed). For each budget (DeepInversion iterations x images per new
client) it restores that state, replays the last stage onto every earlier client, and measures what the
earlier clients' VALIDATION accuracy gained (test data decides nothing, so it is not read here), how many
updates the clients accepted, the BN loss reached and the seconds spent.

    python train.py ... --batches 2 --no-replay --seed 100 --out runs/nr100     # one per development seed
    python benchmarks/replay_budget.py runs/nr100 runs/nr101 --iterations 0,25,50,100,200 --images 16,32

The gain is measured on the full validation split, half of which the acceptance rule itself used, so it is
an optimistic estimate of the same size for every budget: compare budgets with it, not with other methods.
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import replay as replay_module  # noqa: E402
from shell import runner  # noqa: E402
import train  # noqa: E402


def replay_once(run_dir, iterations, images):
    config, _, clients, server, batches, _ = runner.restore_finished(run_dir)
    t = len(batches) - 1
    earlier = [c for b in batches[:t] for c in b]
    before = {c: clients[c].evaluate(server.generate(c), server.bn_stats[c], "val")[0] for c in earlier}
    replay = dict(train.replay_settings(config), num_images=images, iterations=iterations)
    start = time.time()
    report = replay_module.run_replay(server, clients, t, config["seed"], replay)
    seconds = time.time() - start
    after = {c: clients[c].evaluate(server.generate(c), server.bn_stats[c], "val")[0] for c in earlier}
    # What the path proposed, before the confirmation test decided: its best point's gain on val_select
    # (the half that chose it: optimistic), and the confirmation half's paired counts (gained, lost).
    proposed_gain = [a[0] - b[0] for a, b in zip(report["val_after"], report["val_before"])]
    return {"gain": 100 * float(np.mean([after[c] - before[c] for c in earlier])), "accepted": report["accepted"],
            "select_gain": 100 * float(np.mean(proposed_gain)) if proposed_gain else 0.0,
            "gained": sum(c[0] for c in report["confirm"]), "lost": sum(c[1] for c in report["confirm"]),
            "proposed": report["accepted"] + report["rejected"], "bn_loss": float(np.mean(report["bn_loss_end"])),
            "seconds": seconds}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="folders of finished --no-replay runs (results.json + checkpoint.pt)")
    p.add_argument("--iterations", default="0,25,50,100,200")
    p.add_argument("--images", default="32")
    args = p.parse_args()
    print("| DeepInversion iterations | images per new client | val gain of earlier clients (points) | "
          "accepted / proposed | proposals' gain on val_select (points) | val_confirm images gained / lost | "
          "BN loss | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for images in [int(v) for v in args.images.split(",")]:
        for iterations in [int(v) for v in args.iterations.split(",")]:
            rows = [replay_once(run, iterations, images) for run in args.runs]
            mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
            print(f"| {iterations} | {images} | {mean['gain']:+.2f} (" + ", ".join(f"{r['gain']:+.2f}" for r in rows)
                  + f") | {sum(r['accepted'] for r in rows)} / {sum(r['proposed'] for r in rows)} | "
                  f"{mean['select_gain']:+.2f} | {sum(r['gained'] for r in rows)} / {sum(r['lost'] for r in rows)} | "
                  f"{mean['bn_loss']:.1f} | {mean['seconds']:.1f} |", flush=True)


if __name__ == "__main__":
    main()

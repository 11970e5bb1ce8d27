"""RI of pfeddsh (replay), pfeddsh --no-replay and pfedhn over several seeds: the README's table.

Runs train.py once per (method, seed) into runs/table/<name>-s<seed>/ (a run whose results.json exists
is not run again, so an interrupted table resumes), then prints one markdown table: mean +- std over
seeds of RI, mean accuracy, each batch's accuracy after its own stage, and replay latency.

    python benchmarks/ri_table.py --seeds 0,1,2 -- --dataset cifar10 --data-dir ../shared/data --preset cpu-demo
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
METHODS = {"pfeddsh": ["--method", "pfeddsh"], "pfeddsh --no-replay": ["--method", "pfeddsh", "--no-replay"],
           "pfedhn": ["--method", "pfedhn"]}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--out", default="runs/table")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="after --: arguments for train.py")
    args = p.parse_args()
    train_args = [a for a in args.train_args if a != "--"]
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    for name in args.methods.split(","):
        runs = []
        for seed in seeds:
            out = Path(args.out) / f"{name.replace(' --', '-')}-s{seed}"
            if not (out / "results.json").exists():
                cmd = [sys.executable, str(REPO / "train.py"), *train_args, *METHODS[name], "--seed", str(seed),
                       "--out", str(out), "--overwrite"]
                print("running:", " ".join(cmd), flush=True)
                subprocess.run(cmd, check=True)
            runs.append(json.loads((out / "results.json").read_text()))
        rows.append((name, runs))

    print(f"\n{len(seeds)} seeds ({args.seeds}); accuracies in %, mean ± std over seeds; train.py {' '.join(train_args)}\n")
    print("| method | RI (points) | mean acc | batch 0 after stage 0 | batch 0 final | batch 1 after stage 1 | replay s | updates accepted |")
    print("|---|---|---|---|---|---|---|---|")
    for name, runs in rows:
        ri = np.array([r["metrics"]["ri"] for r in runs]) * 100
        acc = np.array([r["metrics"]["mean_acc"] for r in runs]) * 100
        b00 = np.array([r["metrics"]["batch_acc"][0][0] for r in runs]) * 100
        b0f = np.array([r["metrics"]["batch_acc"][-1][0] for r in runs]) * 100
        b11 = np.array([r["metrics"]["batch_acc"][1][1] for r in runs]) * 100
        replay = [s for r in runs for s in r.get("replay_s", [])]
        accepted = [f"{x['accepted']}/{x['accepted'] + x['rejected'] + x['skipped']}" for r in runs for x in r.get("replay", [])]
        replay_cell = f"{np.mean(replay):.1f}" if replay else "-"
        print(f"| {name} | {ri.mean():+.2f} ± {ri.std():.2f} | {acc.mean():.2f} ± {acc.std():.2f} | "
              f"{b00.mean():.2f} ± {b00.std():.2f} | {b0f.mean():.2f} ± {b0f.std():.2f} | "
              f"{b11.mean():.2f} ± {b11.std():.2f} | {replay_cell} | {', '.join(accepted) or '-'} |")


if __name__ == "__main__":
    main()

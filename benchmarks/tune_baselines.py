"""Each baseline's knob chosen on validation, on development seeds, with the same budget for every baseline.

    python benchmarks/tune_baselines.py --data-dir ../shared/data --seeds 600,601 --out runs/tune
    python benchmarks/tune_baselines.py ... --methods ditto,fedlwf --dry-run      # print the commands only
    python benchmarks/tune_baselines.py ... -- --rounds 2 --width 8               # train.py flags over PROTOCOL

For every method in KNOBS: runs its grid (one knob, values in geometric steps) on the given development seeds
with the 5-batch CPU protocol of the finals (PROTOCOL), one thread per run, and scores each value by the final
mean **validation** accuracy over the seeds (test accuracy is never read). While the best value sits at an
end of its grid, the grid is extended one step beyond that end (at most --max-extensions times per method),
so that every chosen value is inside its grid. Every run is a `python train.py` of its own under
<out>/<method>/<knob>-<value>-s<seed>; a finished run is reused. Prints a markdown table per method and
writes <out>/choices.json ({method: {"knob", "chosen", "scores": {value: mean validation accuracy}}}).
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROTOCOL = ["--dataset", "cifar10", "--batches", "5", "--preset", "cpu-demo", "--clients-per-batch", "3",
            "--clients-per-round", "3", "--rounds", "10", "--batch-size", "32", "--threads", "1"]
# method -> (flag, starting grid around the run's default, step factor when the grid is extended)
KNOBS = {
    "ditto": ("--ditto-lambda", [0.003, 0.01, 0.03], 3.0),
    "fedlwf": ("--lwf-weight", [0.3, 1.0, 3.0], 3.0),
    "fedtarget": ("--lwf-weight", [0.3, 1.0, 3.0], 3.0),
    "frozen-adapters": ("--adapter-lr", [3e-3, 1e-2, 3e-2], 3.0),
    "pfedhn-frozen": ("--embed-lr", [0.03, 0.1, 0.3], 3.0),
    "pfedhn-pc": ("--server-lr", [1e-3, 3e-3, 1e-2], 3.0),
    "fedrep": ("--lr", [0.025, 0.05, 0.1], 2.0),
    "fedavg-ft": ("--lr", [0.025, 0.05, 0.1], 2.0),
}


def value_name(value):
    return f"{value:g}"


def extend(grid, scores, factor):
    """The grid with one more value beyond the end the best score sits at; the grid itself if the best is inside."""
    best = max(grid, key=lambda v: scores[v])
    if best == min(grid):
        return sorted(grid + [min(grid) / factor])
    if best == max(grid):
        return sorted(grid + [max(grid) * factor])
    return grid


def run(method, flag, value, seed, args):
    """Mean final validation accuracy (points) of one run; trains it unless its results.json exists."""
    out = Path(args.out) / method / f"{flag.lstrip('-')}-{value_name(value)}-s{seed}"
    command = [sys.executable, str(REPO / "train.py"), *PROTOCOL, *args.extra, "--data-dir", args.data_dir,
               "--method", method, flag, value_name(value), "--seed", str(seed), "--out", str(out)]
    if args.dry_run:
        print(" ".join(command[1:]))
        return float("nan")
    if not (out / "results.json").exists():
        if (out / "checkpoint.pt").exists():        # a run stopped part-way (a session's end) continues
            command.append("--resume")
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        done = subprocess.run(command, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{method} {flag} {value}: train.py ended with {done.returncode}: {done.stderr[-500:]}")
    results = json.loads((out / "results.json").read_text())
    return 100 * results["val_metrics"]["mean_acc"]


def tune(method, args):
    flag, grid, factor = KNOBS[method]
    scores = {}
    for extensions in range(args.max_extensions + 1):
        for value in grid:
            if value not in scores:
                per_seed = [run(method, flag, value, seed, args) for seed in args.seeds]
                scores[value] = sum(per_seed) / len(per_seed)
        if args.dry_run:
            return None
        if extend(grid, scores, factor) == grid or extensions == args.max_extensions:
            break       # inside its grid, or at an end after the last extension allowed (printed as such)
        grid = extend(grid, scores, factor)
    chosen = max(grid, key=lambda v: scores[v])
    if chosen in (min(grid), max(grid)):
        print(f"\n{method}: the best value {value_name(chosen)} is still at an end of its grid after "
              f"{args.max_extensions} extensions")
    print(f"\n{method} ({flag}; seeds {', '.join(map(str, args.seeds))}; final mean validation accuracy, points)\n")
    print("| value | validation |\n|---|---|")
    for value in grid:
        print(f"| {value_name(value)}{' (chosen)' if value == chosen else ''} | {scores[value]:.2f} |")
    return {"knob": flag, "chosen": chosen, "scores": {value_name(v): scores[v] for v in grid}}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seeds", default="600,601", help="development seeds, never a final's")
    p.add_argument("--methods", default=",".join(KNOBS), help=f"from {', '.join(KNOBS)}")
    p.add_argument("--max-extensions", type=int, default=2)
    p.add_argument("--dry-run", action="store_true", help="print the first grid's commands, run nothing")
    p.add_argument("extra", nargs="*", help="more train.py flags, after --: they win over PROTOCOL's (a smoke test's "
                                            "smaller protocol; the tuning itself runs PROTOCOL as it is)")
    args = p.parse_args()
    args.seeds = [int(s) for s in args.seeds.split(",")]
    unknown = [m for m in args.methods.split(",") if m not in KNOBS]
    if unknown:
        raise SystemExit(f"no knob for {', '.join(unknown)}: choose from {', '.join(KNOBS)}")
    choices = {method: tune(method, args) for method in args.methods.split(",")}
    if not args.dry_run:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "choices.json")
        if os.path.exists(path):            # another process's methods, tuned into the same folder, are kept
            with open(path) as f:
                choices = dict(json.load(f), **choices)
        with open(path, "w") as f:
            json.dump(choices, f, indent=1)


if __name__ == "__main__":
    main()

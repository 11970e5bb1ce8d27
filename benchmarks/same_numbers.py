"""Do two versions of the code compute the same numbers? Bitwise, on one thread.

    python benchmarks/same_numbers.py --data-dir ../shared/data --out runs/same-after          # this checkout
    python benchmarks/same_numbers.py --data-dir ../shared/data --out runs/same-before \
        --repo ../before --old-names                                                    # a checkout of 86cc891
    python benchmarks/same_numbers.py --data-dir ../shared/data --out runs/same-after \
        --against runs/same-before/matrices.json                                        # compare the two

Runs a short real-data protocol (CIFAR-10, 3 batches, so replay runs twice) through `python train.py` of the
checkout in --repo for every method and variant below, each on one thread (two-thread runs are not bitwise
reproducible: docs/robustness.md), and writes every run's `accuracy` and `val_accuracy` matrices to
<out>/matrices.json. With --against it compares them with an earlier file and prints, per run, "identical" or
the largest difference; exit code 1 if any differs that should not. Each run has the flags of today's code and
those of 86cc891, where our extension was the default `pfeddsh` (--old-names); the paper's method has no
counterpart there but `pfeddsh-paper --replay paper`, which it is known to differ from (docs/design.md §5).
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROTOCOL = ["--dataset", "cifar10", "--preset", "cpu-demo", "--batches", "3", "--clients-per-batch", "3",
            "--clients-per-round", "3", "--rounds", "4", "--local-steps", "3", "--batch-size", "32",
            "--replay-images", "8", "--replay-iterations", "10", "--replay-steps", "6", "--seed", "7", "--device", "cpu"]
# Our extension's scoring interval: every run of 86cc891 had it; today a pfeddsh run refuses it (it reads none).
EXTENSION = ["--replay-validate-every", "2"]
# name: (today's flags, 86cc891's flags). The paper's method's runs are compared but expected to differ.
RUNS = {
    "pfeddsh-ext": (["--method", "pfeddsh-ext"], ["--method", "pfeddsh"]),
    "pfeddsh-ext-no-replay": (["--method", "pfeddsh-ext", "--no-replay"], ["--method", "pfeddsh", "--no-replay"]),
    "pfeddsh-ext-noise": (["--method", "pfeddsh-ext", "--replay-control", "noise"],
                          ["--method", "pfeddsh", "--replay-control", "noise"]),
    "pfeddsh-ext-own": (["--method", "pfeddsh-ext", "--replay-control", "own"],
                        ["--method", "pfeddsh", "--replay-control", "own"]),
    "pfeddsh-ext-shape": (["--method", "pfeddsh-ext", "--adapter-budget", "0"], ["--method", "pfeddsh", "--adapter-budget", "0"]),
    "pfeddsh-no-replay": (["--method", "pfeddsh", "--no-replay"],
                          ["--method", "pfeddsh", "--adapter-budget", "0", "--no-replay"]),
    "pfeddsh-no-masks": (["--method", "pfeddsh", "--no-masks"], ["--method", "pfeddsh", "--no-masks", "--replay", "paper"]),
    "pfeddsh": (["--method", "pfeddsh"], ["--method", "pfeddsh", "--adapter-budget", "0", "--replay", "paper"]),
    **{m: (["--method", m], ["--method", m]) for m in
       ["pfedhn", "pfedhn-frozen", "pfedhn-pc", "fedavg", "fedavg-ft", "fedrep", "fedrep-frozen", "ditto", "fedlwf",
        "fedtarget", "frozen-adapters", "local"]},
    "compare": (["--methods", "pfedhn,pfeddsh-ext-shape", "--seeds", "7"], ["--methods", "pfedhn,pfeddsh-paper", "--seeds", "7"]),
}
EXPECTED_TO_DIFFER = {"pfeddsh", "pfeddsh-no-masks"}     # the paper's replay changed (docs/design.md §5)
OLD_FOLDERS = {"compare/pfeddsh-paper-s7": "compare/pfeddsh-ext-shape-s7"}


def matrices(folder):
    """{run name: {"accuracy": A, "val_accuracy": V}} for every results.json under folder."""
    found = {}
    for path in sorted(Path(folder).rglob("results.json")):
        results = json.loads(path.read_text())
        found[str(path.parent.relative_to(folder))] = {k: results[k] for k in ("accuracy", "val_accuracy")}
    return found


def largest_gap(a, b):
    gaps = [abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb) if x is not None and y is not None]
    return max(gaps, default=0.0)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--against", help="matrices.json of an earlier version to compare with")
    p.add_argument("--repo", default=str(REPO), help="the checkout whose train.py runs (default: this one)")
    p.add_argument("--old-names", action="store_true", help="the checkout is 86cc891: use its flags")
    p.add_argument("--only", help="comma-separated names of RUNS to run (default: all)")
    args = p.parse_args()
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    found = {}
    names = args.only.split(",") if args.only else list(RUNS)
    for name in names:
        extra = RUNS[name][1 if args.old_names else 0]
        paper = not args.old_names and extra[:2] == ["--method", "pfeddsh"]
        extra = extra + ([] if paper else EXTENSION)
        out = os.path.abspath(os.path.join(args.out, name))
        if os.path.exists(os.path.join(out, "results.json")) or os.path.exists(os.path.join(out, "comparison.md")):
            found.update({f"{name}/{k}" if k != "." else name: v for k, v in matrices(out).items()})
            print(f"{name}: done earlier", flush=True)
            continue
        done = subprocess.run([sys.executable, "train.py", *PROTOCOL, *extra, "--data-dir", os.path.abspath(args.data_dir),
                               "--out", out, "--overwrite", "--threads", "1"], check=False, env=env, cwd=args.repo,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{name}: train.py ended with exit code {done.returncode}")
        found.update({f"{name}/{k}" if k != "." else name: v for k, v in matrices(out).items()})
        print(f"{name}: done", flush=True)
    found = {OLD_FOLDERS.get(k, k): v for k, v in found.items()}
    with open(os.path.join(args.out, "matrices.json"), "w") as f:
        json.dump(found, f, indent=1)
    if args.against is None:
        return 0
    with open(args.against) as f:
        before = json.load(f)
    before = {OLD_FOLDERS.get(k, k): v for k, v in before.items()}
    same = True
    for name in sorted(set(before) | set(found)):
        if name not in before or name not in found:
            print(f"{name}: only in {'the new' if name in found else 'the earlier'} version")
            same = False
            continue
        for key in ("accuracy", "val_accuracy"):
            equal = before[name][key] == found[name][key]
            expected = name.split("/")[0] in EXPECTED_TO_DIFFER
            same &= equal or expected
            print(f"{name} {key}: " + ("identical" if equal else
                                       f"DIFFERS (largest gap {largest_gap(before[name][key], found[name][key])})"
                                       + (" -- expected: the paper's replay changed" if expected else "")))
    print("all identical (but the paper's replay, expected to differ)" if same else "some differ")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())

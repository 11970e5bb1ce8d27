"""Do two versions of the code compute the same numbers? Bitwise, on one thread.

    python benchmarks/same_numbers.py --data-dir ../shared/data --out runs/same-before      # on the old code
    python benchmarks/same_numbers.py --data-dir ../shared/data --out runs/same-after \\
        --against runs/same-before/matrices.json                                          # on the new code

Runs a short real-data protocol (CIFAR-10, 3 batches, so replay runs twice) through `python train.py` for
pfeddsh with and without replay, pfedhn, fedavg-ft, ditto, local, and one `--methods` comparison
(pfedhn and pfeddsh-paper), each on one
thread (two-thread runs are not bitwise reproducible: docs/robustness.md), and writes every run's
`accuracy` and `val_accuracy` matrices to <out>/matrices.json. With --against it compares them with an
earlier file and prints, per run, "identical" or the largest difference; exit code 1 if any differs.
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
            "--replay-images", "8", "--replay-iterations", "10", "--replay-steps", "6",
            "--replay-validate-every", "2", "--seed", "7", "--device", "cpu"]
RUNS = {
    "pfeddsh": ["--method", "pfeddsh"],
    "pfeddsh-no-replay": ["--method", "pfeddsh", "--no-replay"],
    "pfedhn": ["--method", "pfedhn"],
    "fedavg-ft": ["--method", "fedavg-ft"],
    "ditto": ["--method", "ditto"],
    "local": ["--method", "local"],
    "compare": ["--methods", "pfedhn,pfeddsh-paper", "--seeds", "7"],
}


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
    args = p.parse_args()
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    found = {}
    for name, extra in RUNS.items():
        out = os.path.join(args.out, name)
        done = subprocess.run([sys.executable, str(REPO / "train.py"), *PROTOCOL, *extra, "--data-dir", args.data_dir,
                        "--out", out, "--overwrite"], check=False, env=env, cwd=REPO,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{name}: train.py ended with exit code {done.returncode}")
        found.update({f"{name}/{k}" if k != "." else name: v for k, v in matrices(out).items()})
        print(f"{name}: done", flush=True)
    with open(os.path.join(args.out, "matrices.json"), "w") as f:
        json.dump(found, f, indent=1)
    if args.against is None:
        return 0
    with open(args.against) as f:
        before = json.load(f)
    same = True
    for name in sorted(set(before) | set(found)):
        if name not in before or name not in found:
            print(f"{name}: only in {'the new' if name in found else 'the earlier'} version")
            same = False
            continue
        for key in ("accuracy", "val_accuracy"):
            equal = before[name][key] == found[name][key]
            same &= equal
            print(f"{name} {key}: " + ("identical" if equal else
                                       f"DIFFERS (largest gap {largest_gap(before[name][key], found[name][key])})"))
    print("all identical" if same else "some differ")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())

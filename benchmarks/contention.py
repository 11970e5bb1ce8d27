"""Does a run survive a busy core? The cpu-demo's first rounds, idle and with one core held by another process.

    python benchmarks/contention.py --data-dir ../shared/data                 # about 4 min on a 2-core CPU
    python benchmarks/contention.py --data-dir ../shared/data --rounds 3 --threads 1,2

For each thread count (default: train.py's default, then every core) it runs `python train.py --preset
cpu-demo --batches 1 --no-replay --rounds R` twice, once on an idle machine and once while a busy loop
holds one core, and reads the stage's own time from results.json (the rounds and the evaluation, no
start-up or data loading). It prints both times and their ratio, busy over idle, side by side.
"""
import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from shell import cli  # noqa: E402


def spin():
    while True:
        pass


def stage_seconds(threads, args, out):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    command = [sys.executable, str(REPO / "train.py"), "--dataset", "cifar10", "--data-dir", args.data_dir,
               "--preset", "cpu-demo", "--batches", "1", "--no-replay", "--rounds", str(args.rounds),
               "--device", "cpu", "--threads", str(threads), "--out", out, "--overwrite"]
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"train.py failed ({done.returncode}): {done.stderr.strip().splitlines()[-1]}")
    return json.loads((Path(out) / "results.json").read_text())["time_s"][0]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--rounds", type=int, default=5, help="rounds of the cpu-demo's first stage (default 5)")
    p.add_argument("--threads", help="comma-separated thread counts (default: train.py's default, then all cores)")
    args = p.parse_args()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    counts = [int(t) for t in args.threads.split(",")] if args.threads else sorted({cli.default_threads(), cores})
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for threads in counts:
            idle = stage_seconds(threads, args, os.path.join(tmp, f"idle{threads}"))
            hog = multiprocessing.Process(target=spin, daemon=True)
            hog.start()
            try:
                busy = stage_seconds(threads, args, os.path.join(tmp, f"busy{threads}"))
            finally:
                hog.terminate()
                hog.join()
            rows.append((threads, idle, busy))
            print(f"{threads} thread(s): idle {idle:.1f} s, one core busy {busy:.1f} s, ratio {busy / idle:.2f}",
                  flush=True)
    print(f"\ncpu-demo, 1 stage of {args.rounds} rounds, {cores} cores (default threads: {cli.default_threads()})")
    print("| threads | idle (s) | one core busy (s) | busy / idle |\n|---|---|---|---|")
    for threads, idle, busy in rows:
        default = " (default)" if threads == cli.default_threads() else ""
        print(f"| {threads}{default} | {idle:.1f} | {busy:.1f} | {busy / idle:.2f} |")


if __name__ == "__main__":
    main()

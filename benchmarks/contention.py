"""Does a run survive a busy core? The cpu-demo's first rounds, idle and with one core held by another process.

    python benchmarks/contention.py --data-dir ../shared/data                 # about 4 min on a 2-core CPU
    python benchmarks/contention.py --data-dir ../shared/data --rounds 3 --threads 1,2

For each thread count (default: train.py's default, then every core) it runs `python train.py --preset
cpu-demo --batches 1 --no-replay --rounds R` twice, once on an idle machine and once while a busy loop
holds one core, and reads the stage's own time from results.json (the rounds and the evaluation, no
start-up or data loading). It prints both times and their ratio, busy over idle, side by side.

    python benchmarks/contention.py --data-dir ../shared/data --bare          # about 3 min on an idle 2-core CPU

--bare (issue 43): the bare core as a notebook runs it, with no command line to choose its threads. A fresh
interpreter runs the thread line of docs/walkthrough.md's notebook block (read from the page itself), then one
width-16 cpu-demo stage through `train.run(config, device)` (--batches 1, so no replay; the preset's 10 rounds
unless --rounds), timed by a train.Hooks from the start of training to the stage's end (its rounds and the
evaluation), in wall and CPU seconds. Once alone, once beside two busy loops (--hogs); with --torch-default
also once each with torch's own default threads (what a notebook got before the walkthrough set them).
"""
import argparse
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from shell import cli  # noqa: E402
from shell.settings import PRESETS  # noqa: E402


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


def walkthrough_threads_line():
    """The line of docs/walkthrough.md's python block that sets torch's threads."""
    text = (REPO / "docs" / "walkthrough.md").read_text()
    lines = [line for block in re.findall(r"```python\n(.*?)\n```", text, flags=re.S) for line in block.splitlines()
             if line.startswith("torch.set_num_threads(")]
    if len(lines) != 1:
        raise SystemExit(f"docs/walkthrough.md: expected one torch.set_num_threads line, found {len(lines)}")
    return lines[0]


BARE_STAGE = """
import json, os, sys, time
sys.path.insert(0, {repo!r})
import torch
{threads_line}
import train
from shell.settings import PRESETS
config = dict(train.DEFAULTS, **dict(PRESETS["cpu-demo"], rounds={rounds}), dataset="cifar10",
              data_dir={data_dir!r}, batches=1, device="cpu")


class Clock(train.Hooks):
    def begin(self, *args):
        self.start, self.cpu_start = time.perf_counter(), time.process_time()
        return None, None

    def after_round(self, state, rng, stage_done, loss=None):
        if stage_done:
            self.seconds, self.cpu = time.perf_counter() - self.start, time.process_time() - self.cpu_start


clock = Clock()
train.run(config, torch.device("cpu"), hooks=clock)
print(json.dumps({{"seconds": clock.seconds, "cpu": clock.cpu, "threads": torch.get_num_threads()}}))
"""


def bare_stage(threads_line, args):
    """(wall seconds, CPU seconds, threads) of one bare cpu-demo stage in a fresh interpreter (no OMP_NUM_THREADS
    of ours). CPU seconds that grow beside busy loops are threads waiting for each other; wall seconds that grow
    alone are the stage's share of the cores."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    script = BARE_STAGE.format(repo=str(REPO), threads_line=threads_line, data_dir=args.data_dir, rounds=args.rounds)
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the bare stage failed ({done.returncode}): {done.stderr.strip().splitlines()[-1]}")
    found = json.loads(done.stdout.strip().splitlines()[-1])
    return found["seconds"], found["cpu"], found["threads"]


def beside_busy(measure, hogs):
    """measure() while `hogs` busy loops run."""
    loops = [multiprocessing.Process(target=spin, daemon=True) for _ in range(hogs)]
    for loop in loops:
        loop.start()
    try:
        return measure()
    finally:
        for loop in loops:
            loop.terminate()
            loop.join()


def main_bare(args):
    settings = [("the walkthrough's line", walkthrough_threads_line())]
    if args.torch_default:
        settings.append(("torch's default", "pass"))
    print(f"load before: {os.getloadavg()[0]:.2f} (1 min), {len(os.sched_getaffinity(0))} cores", flush=True)
    rows = []
    for name, line in settings:
        alone, alone_cpu, threads = bare_stage(line, args)
        busy, busy_cpu, _ = beside_busy(lambda: bare_stage(line, args), args.hogs)
        rows.append((name, line.split("#")[0].strip(), threads, alone, busy, alone_cpu, busy_cpu))
        print(f"{name} ({threads} thread(s)): alone {alone:.1f} s ({alone_cpu:.1f} CPU s), beside {args.hogs} busy "
              f"loops {busy:.1f} s ({busy_cpu:.1f} CPU s), ratio {busy / alone:.2f}", flush=True)
    print(f"load after: {os.getloadavg()[0]:.2f} (1 min)")
    print(f"\nbare train.run, cpu-demo width 16, 1 stage of {args.rounds} rounds")
    print(f"| threads set by | threads | alone (s) | beside {args.hogs} busy loops (s) | ratio | CPU s alone, "
          f"beside |\n|---|---|---|---|---|---|")
    for name, line, threads, alone, busy, alone_cpu, busy_cpu in rows:
        print(f"| {name}: `{line}` | {threads} | {alone:.1f} | {busy:.1f} | {busy / alone:.2f} | {alone_cpu:.1f}, "
              f"{busy_cpu:.1f} |")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--rounds", type=int, help="rounds of the cpu-demo's first stage (default 5; --bare: the "
                                               "preset's, 10)")
    p.add_argument("--threads", help="comma-separated thread counts (default: train.py's default, then all cores)")
    p.add_argument("--bare", action="store_true", help="time bare train.run with the walkthrough's thread line")
    p.add_argument("--hogs", type=int, default=2, help="--bare: busy loops beside it (default 2)")
    p.add_argument("--torch-default", action="store_true", help="--bare: also with torch's default threads")
    args = p.parse_args()
    if args.bare:
        args.rounds = args.rounds or PRESETS["cpu-demo"]["rounds"]
        return main_bare(args)
    args.rounds = args.rounds or 5
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

"""Every numeric flag of train.py at its edges: does each value run, or end in one clear line and exit 2?

    python benchmarks/flag_edges.py                      # every case: about an hour on a busy 2-core CPU
    python benchmarks/flag_edges.py --flags width,lr     # some flags only
    python benchmarks/flag_edges.py --timeout 60

Issue 43: no value a student types may end in a Python traceback, a native crash (exit 134, 135, 139 or a
signal) or a hang. For every int and float flag `python train.py --help` lists, it runs `python train.py`
as a child process on a tiny generated CIFAR-10 (tests/conftest.py's make_tiny_dataset, 200 test images)
with a tiny run (2 batches of 2 clients, 1 round of 1 local step, width 8, replay of 2 images), the flag's
value appended as --flag=value (a later flag wins; `=`, so that argparse reads -inf as a value), in the
context that reads it (--ditto-lambda with --method ditto, --alpha with --partition dirichlet,
--node-timeout with --engine flower, ...). Values: 0, 1, -1 and 10**12 for an int; for a float 0, 1, -1,
3.4e38 (the largest a float flag accepts: float32's), 1e308, 1e-308, nan, inf and -inf; plus each flag's
own edges (the largest or smallest value its check accepts, a large size that fits in memory).

Outcomes: `ran` (exit 0); `refused` (exit 2, an `error:` line, no traceback; `late` when it came after
training started); `running` (still training normally when the timeout hit: allowed only where the value
only makes the work longer, e.g. --rounds 10**12, and only once the run printed its header); anything else
fails: `TRACEBACK`, `NATIVE CRASH`, `HANG`, `EXIT n`. It prints a table and exits 1 when any case fails.
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
from conftest import make_tiny_dataset  # noqa: E402
from shell import cli  # noqa: E402

BASE = ["--dataset", "cifar10", "--batches", "2", "--clients-per-batch", "2", "--rounds", "1",
        "--clients-per-round", "2", "--local-steps", "1", "--batch-size", "8", "--width", "8", "--hidden", "8",
        "--chunk-size", "1024", "--embed-dim", "4", "--replay-images", "2", "--replay-iterations", "1",
        "--replay-steps", "1", "--classes-per-client", "5", "--threads", "1", "--device", "cpu"]
# The context in which a flag is read at all (elsewhere it is refused, or ignored).
CONTEXT = {"alpha": ["--partition", "dirichlet"], "embed-lr": ["--method", "pfedhn-frozen"],
           "ditto-lambda": ["--method", "ditto"], "lwf-weight": ["--method", "fedlwf"],
           "lwf-temperature": ["--method", "fedlwf"], "adapter-budget": ["--method", "pfeddsh-ext"],
           "adapter-lr": ["--method", "pfeddsh-ext"], "replay-validate-every": ["--method", "pfeddsh-ext"],
           "replay-confirm-alpha": ["--method", "pfeddsh-ext"], "node-timeout": ["--engine", "flower"]}
# Each flag's own edges beyond the common values: the largest its checks accept, sizes that still fit.
EXTRA = {"seed": ["4294967295"], "batches": ["5000"], "clients-per-batch": ["5000"], "classes-per-client": ["10"],
         "val-fraction": ["0.999"], "adapter-budget": ["0.999", "1e-308"],
         "batch-size": ["4096"], "width": ["64"], "hidden": ["2048"], "hyper-layers": ["64"],
         "chunk-size": ["1000000"], "embed-dim": ["4096"], "replay-images": ["512"],
         "threads": [str(cli.available_cores()), str(cli.available_cores() + 1)],
         "replay-confirm-alpha": ["0.999", "1e-9"],
         "s-max": ["1.0"], "clients-per-round": ["1000"], "node-timeout": ["1e100"]}
# Flags whose large values only make the run longer: still running at the timeout is fine for those.
LONGER = {"rounds", "local-steps", "replay-iterations", "replay-steps", "batches", "clients-per-batch",
          "replay-images", "batch-size", "hidden", "hyper-layers", "embed-dim", "width", "chunk-size",
          "replay-validate-every", "threads", "checkpoint-every"}
NATIVE = {134: "abort", 135: "bus error", 136: "floating point exception", 139: "segmentation fault"}


def numeric_flags():
    """(flag without --, int or float) for every numeric option --help shows."""
    return [(a.option_strings[0][2:], a.type) for a in cli.build_parser()._actions
            if a.type in (int, float) and a.help != argparse.SUPPRESS]


def values(flag, kind):
    common = ["0", "1", "-1", "1000000000000"] if kind is int else ["0", "1", "-1", "3.4e38", "1e308", "1e-308",
                                                                    "nan", "inf", "-inf"]
    return list(dict.fromkeys(common + EXTRA.get(flag, [])))


def is_large(value):
    return value not in ("0", "1", "-1", "1e-308", "nan", "inf", "-inf", "1.0")


def run_case(flag, value, data_dir, out, timeout):
    """(outcome, exit code, what stderr said) of one `python train.py ... --flag value`."""
    argv = [*BASE, "--data-dir", str(data_dir), "--out", str(out), *CONTEXT.get(flag, []), f"--{flag}={value}"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    start = time.time()
    child = subprocess.Popen([sys.executable, str(REPO / "train.py"), *argv], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, 9)        # the child and whatever it started (Flower's Ray workers)
        stdout, stderr = child.communicate()
        started = " | device cpu | " in stdout
        if "Traceback" in stderr:
            return "TRACEBACK", "-", last_traceback_line(stderr)
        if started and flag in LONGER and is_large(value):
            return "running", "-", f"still running normally after {timeout:.0f} s (the value only lengthens the run)"
        return "HANG", "-", f"no end after {timeout:.0f} s" + ("" if started else ", no header printed")
    finally:
        shutil.rmtree(out, ignore_errors=True)
    code, lines = child.returncode, [line for line in stderr.strip().splitlines() if line.strip()]
    if "Traceback" in stderr:
        return "TRACEBACK", code, last_traceback_line(stderr)
    if code < 0 or code in NATIVE:
        signal = -code if code < 0 else code - 128
        return "NATIVE CRASH", code, f"native crash (signal {signal}: {NATIVE.get(128 + signal, '?')})"
    if code == 0:
        return "ran", 0, f"ran in {time.time() - start:.0f} s"
    errors = [line for line in lines if line.startswith("error:")]
    if code == 2 and errors:
        late = " | device cpu | " in stdout
        return ("refused late" if late else "refused"), code, errors[-1][:150]
    return f"EXIT {code}", code, (lines[-1] if lines else "(nothing on stderr)")[:150]


def last_traceback_line(stderr):
    """The exception's own line (its type and message), from under the progress bars' redraws."""
    lines = [line.split("\r")[-1].strip() for line in stderr.splitlines()]
    errors = [line for line in lines if re.match(r"[A-Za-z_][\w.]*(Error|Exception|Exit)\b", line)]
    return "Traceback: " + (errors or [line for line in lines if line] or [""])[-1][:140]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--flags", help="comma-separated flags without -- (default: every numeric flag)")
    p.add_argument("--timeout", type=float, default=120, help="seconds per case (default 120)")
    args = p.parse_args()
    flags = numeric_flags()
    if args.flags:
        wanted = args.flags.split(",")
        unknown = set(wanted) - {f for f, _ in flags}
        if unknown:
            raise SystemExit(f"not a numeric flag: {', '.join(sorted(unknown))}")
        flags = [(f, k) for f, k in flags if f in wanted]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = make_tiny_dataset(Path(tmp) / "data")
        for flag, kind in flags:
            for value in values(flag, kind):
                outcome, code, said = run_case(flag, value, data_dir, Path(tmp) / "out", args.timeout)
                rows.append((flag, value, outcome, code, said))
                print(f"--{flag} {value}: {outcome} ({code}) {said}", file=sys.stderr, flush=True)
    failed = [r for r in rows if r[2] not in ("ran", "refused", "refused late", "running")]
    print(f"\n{len(rows)} cases, {len(flags)} flags, {len(failed)} failing (tiny run: {' '.join(BASE)})\n")
    print("| flag | value | outcome | exit | stderr / what happened |\n|---|---|---|---|---|")
    for flag, value, outcome, code, said in rows:
        print(f"| --{flag} | {value} | {outcome} | {code} | {said.replace('|', '/')} |")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

"""Where the default command's time goes: the design-card protocol, run in-process on the core alone.

    python train.py --dataset cifar10 --batches 2 --data-dir ../shared/data     # the command (cpu-demo on a CPU)
    python benchmarks/default_time.py                                           # the same protocol, timed
    python benchmarks/default_time.py --replay-iterations 25 --rounds 10        # a setting changed, to compare

It runs what that command runs on a CPU (shell.settings.PRESETS["cpu-demo"] over shell.settings.DEFAULTS,
CIFAR-10, 2 batches, method pfeddsh, one thread) with the core's own functions: train.build, then
train.onboard with a Hooks subclass that says when each stage is done. The server's and the core's
functions are wrapped with a stopwatch (nothing they compute changes), and the script prints the seconds
of each part and its share of the whole: the two stages' training rounds (with local training and the
server's update inside them), the end-of-stage evaluation, replay's synthesis and fine-tuning, PA's local
reference, and the total; then the run's mean accuracy, PA and RI, so one sees the run still gives them.
The shell's own work (checkpoints, progress bars, results.json, plots, fault screening) is not in it.
Timings depend on the machine and on what else it runs: compare settings in one place, at one time.
"""
import argparse
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import deepinversion  # noqa: E402
import train  # noqa: E402
from shell.settings import DEFAULTS, PRESETS  # noqa: E402

OVERRIDES = ("rounds", "local_steps", "replay_iterations", "replay_images", "replay_steps", "clients_per_batch")


class Stopwatch:
    """Inclusive seconds of wrapped calls, wall-clock and this process's CPU time, keyed by the path of wrapped
    calls they ran inside. With one thread, CPU seconds are what the part costs even when other processes
    share the machine (wall seconds then include the waiting)."""

    def __init__(self):
        self.seconds, self.cpu, self.calls, self.path = defaultdict(float), defaultdict(float), defaultdict(int), []

    def wrap(self, label, fn):
        """fn, timed under `label` (a string, or a function of no argument that returns one)."""
        def timed(*args, **kwargs):
            self.path.append(label() if callable(label) else label)
            key, start, cpu = tuple(self.path), time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[key] += time.perf_counter() - start
                self.cpu[key] += time.process_time() - cpu
                self.calls[key] += 1
                self.path.pop()
        return timed

    def total(self, *path):
        """(wall, CPU) seconds of `path`."""
        return self.seconds.get(tuple(path), 0.0), self.cpu.get(tuple(path), 0.0)


@contextmanager
def patched(module, name, replacement):
    """module.name replaced for the duration (the core looks its functions up when it calls them)."""
    original = getattr(module, name)
    setattr(module, name, replacement)
    try:
        yield
    finally:
        setattr(module, name, original)


class Timestamps(train.Hooks):
    """The onboard loop's own hooks: a line when each stage is done, with the time since the start."""

    def __init__(self, start):
        self.start = start

    def after_round(self, state, rng, stage_done, loss=None):
        if stage_done:
            print(f"[{time.perf_counter() - self.start:.1f} s] stage {state.stage - 1} done", flush=True)


def protocol(args):
    """The design-card command's configuration on a CPU, with the overrides given."""
    config = {**DEFAULTS, **PRESETS["cpu-demo"], "dataset": "cifar10", "batches": 2, "method": "pfeddsh",
              "data_dir": args.data_dir, "seed": args.seed, "device": "cpu", "threads": 1}
    config.update({k: getattr(args, k) for k in OVERRIDES if getattr(args, k) is not None})
    return config


def timed_run(config):
    """(results, stopwatch, (wall, CPU) seconds in all): build and onboard, every part of interest wrapped."""
    device, watch = torch.device("cpu"), Stopwatch()
    start, cpu = time.perf_counter(), time.process_time()
    dataset, clients, server, batches, _ = watch.wrap("setup", train.build)(config, device)
    stage = lambda: f"stage {server.stage} training rounds"                      # noqa: E731
    server.train_round = watch.wrap(stage, server.train_round)
    server.update = watch.wrap("server update", server.update)
    server.begin_stage = watch.wrap("begin and end of stage (masks)", server.begin_stage)
    server.end_stage = watch.wrap("begin and end of stage (masks)", server.end_stage)
    server.evaluate = watch.wrap("evaluation (end of stage)", server.evaluate)
    server.replay = watch.wrap("replay", server.replay)
    for client in clients:
        client.local_train = watch.wrap("local training", client.local_train)
    with patched(deepinversion, "dream", watch.wrap("synthesis", deepinversion.dream)), \
            patched(deepinversion, "fine_tune", watch.wrap("fine-tuning", deepinversion.fine_tune)), \
            patched(train, "local_reference", watch.wrap("PA's local reference", train.local_reference)):
        state = train.onboard(server, clients, batches, config, hooks=Timestamps(start))
    total = time.perf_counter() - start, time.process_time() - cpu
    return train.results(config, batches, state, clients), watch, total


def minus(a, *bs):
    """(wall, CPU) a minus every b."""
    return tuple(x - sum(b[k] for b in bs) for k, x in enumerate(a))


def report(config, results, watch, total):
    stages = config["batches"]
    print(f"protocol: cpu-demo over the defaults, cifar10, {stages} batches x {config['clients_per_batch']} clients, "
          f"method {config['method']}, seed {config['seed']}, {torch.get_num_threads()} thread(s); "
          f"{config['rounds']} rounds x {min(config['clients_per_round'], config['clients_per_batch'])} clients x "
          f"{config['local_steps']} local steps per stage, replay {config['replay_images']} images x "
          f"{config['replay_iterations']} iterations, {config['replay_steps']} fine-tuning steps")
    print(f"torch {torch.__version__}; wall: seconds on the clock, CPU: this process's CPU seconds (the same on an "
          "idle machine; less than wall when other processes share it)")
    print("| part | wall s | share | CPU s | share |")
    print("|---|---|---|---|---|")

    def line(name, seconds, indent=False):
        (wall, cpu), (all_wall, all_cpu) = seconds, total
        print(f"| {'... ' if indent else ''}{name} | {wall:.1f} | {wall / all_wall:.1%} | {cpu:.1f} | "
              f"{cpu / all_cpu:.1%} |")

    rounds = [f"stage {t} training rounds" for t in range(stages)]
    parts = {"setup (data, split, models)": watch.total("setup")}
    for name in rounds:
        parts[name] = watch.total(name)
    for name in ("begin and end of stage (masks)", "evaluation (end of stage)", "replay", "PA's local reference"):
        parts[name] = watch.total(name)
    parts["the rest (onboard's own bookkeeping)"] = minus(total, *parts.values())
    for name, seconds in parts.items():
        line(name, seconds)
        if name in rounds:
            local, update = watch.total(name, "local training"), watch.total(name, "server update")
            line(f"local training ({watch.calls.get((name,), 0)} rounds)", local, indent=True)
            line("server update", update, indent=True)
            line("generation and the rest of the round", minus(seconds, local, update), indent=True)
        if name == "replay":
            synthesis, fine_tuning = watch.total("replay", "synthesis"), watch.total("replay", "fine-tuning")
            line("synthesis (DeepInversion)", synthesis, indent=True)
            line("fine-tuning (embedding rows)", fine_tuning, indent=True)
            line("the rest of replay", minus(seconds, synthesis, fine_tuning), indent=True)
    line("total", total)
    m = results["metrics"]
    for t, row in enumerate(m["batch_acc"]):
        print(f"after stage {t}: " + ", ".join(f"batch {b} " + ("-" if a is None else f"{a:.4f}")
                                               for b, a in enumerate(row)))
    pa = "n/a" if m["pa"] is None else f"{m['pa']:+.4f}"
    print(f"mean accuracy {m['mean_acc']:.4f} (weighted {m['weighted_acc']:.4f}), PA {pa}, RI {m['ri']:+.4f}")
    tried = sum(len(r["tried"]) for r in results["replay"])
    print(f"replay: {len(results['replay'])} replay(s), {tried} earlier client(s) fine-tuned, "
          f"{sum(r['client_queries'] for r in results['replay'])} client queries")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default="../shared/data", help="holds cifar10/ (default ../shared/data)")
    p.add_argument("--seed", type=int, default=0, help="default 0")
    for key in OVERRIDES:
        p.add_argument(f"--{key.replace('_', '-')}", type=int,
                       help=f"instead of cpu-demo's {PRESETS['cpu-demo'].get(key, DEFAULTS[key])}")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    config = protocol(args)
    results, watch, total = timed_run(config)
    report(config, results, watch, total)
    return results, watch, total


if __name__ == "__main__":
    main()

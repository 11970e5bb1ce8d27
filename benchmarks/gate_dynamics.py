"""Do the batch masks learn? Per round of every stage: how decided the training batch's gates are.

Runs train.run bare (cpu-demo protocol unless told otherwise, no replay) and prints, per round, the batch's
mean |e|, the share of its gates still soft (between 0.1 and 0.9) at the round's s and at s_max, the share on
(e > 0), and how many units the round flipped (sign of e changed). At each stage's end: units used, owned,
reused, and the batch's accuracy against its clients trained alone (PA). Validation accuracy only decides;
test accuracy is printed because PA is defined on it.

    python benchmarks/gate_dynamics.py --seeds 70,200 --set sparsity=0.01 --out /tmp/gates.json
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import train  # noqa: E402


class GateWatch(train.Hooks):
    def __init__(self, quiet=False):
        self.rows, self.quiet, self.previous = [], quiet, None

    def begin(self, server, clients, batches, model, dataset=None):
        self.server = server
        return None, None

    def after_round(self, state, rng, stage_done, loss=None):
        gates = self.server.hypernet.gates
        if gates is None or stage_done:
            self.previous = None
            return
        e = gates.embeddings[state.stage].detach()
        soft_now = torch.sigmoid(self.server.gate_scale * e)
        soft_end = torch.sigmoid(gates.s_max * e)
        on = e > 0
        row = dict(stage=state.stage, round=state.round, loss=loss, mean_abs_e=e.abs().mean().item(),
                   soft_now=((soft_now > 0.1) & (soft_now < 0.9)).float().mean().item(),
                   soft_at_smax=((soft_end > 0.1) & (soft_end < 0.9)).float().mean().item(),
                   on=on.float().mean().item(),
                   flipped=0.0 if self.previous is None else (on != self.previous).float().mean().item())
        self.previous = on
        self.rows.append(row)
        if not self.quiet:
            print("  stage {stage} round {round:3d} loss {loss:.3f} |e| {mean_abs_e:.4f} soft(s) {soft_now:.3f} "
                  "soft(s_max) {soft_at_smax:.3f} on {on:.3f} flipped {flipped:.3f}".format(**row), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", default="70")
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--batches", type=int, default=2)
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--set", action="append", default=[], help="key=value over the cpu-demo config")
    p.add_argument("--out")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    config = dict(train.DEFAULTS, **train.PRESETS["cpu-demo"], dataset=args.dataset, batches=args.batches,
                  data_dir=args.data_dir, no_replay=True)
    for item in args.set:
        key, value = item.split("=", 1)
        kind = type(train.DEFAULTS[key])
        config[key] = None if value == "None" else (value == "True" if kind is bool else kind(value))
    dataset = data.load_dataset(config["dataset"], config["data_dir"], device=torch.device("cpu"))
    everything = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        config["seed"] = seed
        watch = GateWatch(args.quiet)
        dataset_, clients, server, batches, model = train.build(config, torch.device("cpu"), dataset)
        watch.begin(server, clients, batches, model)
        state = train.onboard(server, clients, batches, config, hooks=watch)
        result = train.results(config, batches, state, clients, "cpu", dict(server.faults))
        m = result["metrics"]
        local = [None if row is None else float(np.mean([row[c] for c in b])) for row, b in
                 zip(state.local_accuracy, batches)]
        own = [m["batch_acc"][t][t] for t in range(len(batches))]
        print(f"seed {seed}: own-stage batch accuracy {[round(100 * a, 1) for a in own]}, local "
              f"{[None if a is None else round(100 * a, 1) for a in local]}, PA per batch "
              f"{[round(100 * a, 2) for a in (m['pa_per_batch'] or [])]}, final mean {100 * m['mean_acc']:.2f}, "
              f"neurons {[{k: round(v, 3) for k, v in n.items()} for n in state.neurons]}", flush=True)
        everything.append(dict(seed=seed, rows=watch.rows, metrics=m, local=local, own=own, neurons=state.neurons,
                               val=result["val_metrics"]["batch_acc"]))
    if args.out:
        Path(args.out).write_text(json.dumps(dict(config={k: v for k, v in config.items() if k != "seed"},
                                                  runs=everything), indent=1))


if __name__ == "__main__":
    main()

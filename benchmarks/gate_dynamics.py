"""Do the batch masks learn? Per round of every stage: how decided the training batch's gates are.

Runs the core bare (train.build, train.onboard; the cpu-demo protocol unless told otherwise, no replay) and
prints, per round, the batch's mean |e|, the share of its gates still soft (between 0.1 and 0.9) at the
round's s and at s_max, the share on (e > 0), and how many units the round flipped (sign of e changed). At
each stage's end: units used, owned, reused, and the batch's accuracy against its clients trained alone
(PA). Validation accuracy only decides; test accuracy is printed because PA is defined on it.

    python benchmarks/gate_dynamics.py --seeds 70,200 --set sparsity=0.01 --out /tmp/gates.json
    python benchmarks/gate_dynamics.py --summarize /tmp/gates.json     # the table, from saved runs
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import hypernet as hn  # noqa: E402
import train  # noqa: E402
from shell.settings import DEFAULTS, PRESETS  # noqa: E402


class GateWatch(train.Hooks):
    def __init__(self, quiet=False):
        self.rows, self.quiet, self.previous = [], quiet, None

    def begin(self, server, clients, batches, model, dataset=None):
        self.server, self.clients, self.starts = server, clients, []
        begin_stage = server.begin_stage

        def begin_and_look(t):         # how a new batch's first models read its validation images
            begin_stage(t)
            if t == 0:
                return
            own, right, total = 0, 0, 0
            for cid in server.batches[t]:
                client = clients[cid]
                flat = server.hypernet([cid], [t], s=server.hypernet.gates.scale(0.0))[0].detach()
                # in train mode, as local training first sees them (a new client's BN statistics are blank)
                x, y = client.x_val, client.y_val
                classes = set((client.label_counts > 0).nonzero().flatten().tolist())
                client.model.train()
                with torch.no_grad():
                    logits = hn.run_model(client.model, client.layout.unflatten(flat),
                                          {n: b.clone() for n, b in server.bn_stats[cid].items()},
                                          data.normalize(x, client.mean, client.std))
                guess = logits.argmax(1)
                own += sum(int(g) in classes for g in guess.tolist())
                right += int((guess == y).sum())
                total += len(y)
            self.starts.append(dict(stage=t, own_class_share=own / total, accuracy=right / total))
            if not self.quiet:
                print(f"  stage {t} starts: {100 * own / total:.1f} % of first predictions in own classes, "
                      f"accuracy {100 * right / total:.1f} %", flush=True)
        server.begin_stage = begin_and_look
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


def summarize(paths):
    """One line per seed and the distribution of PA, from the --out files of earlier runs."""
    runs = [r for path in paths for r in json.loads(Path(path).read_text())["runs"]]
    print("seed | own-stage acc per batch | local per batch | PA per batch | final mean | soft at s_max (max) | "
          "flipped in the last 5 rounds (max) | used / owned per batch | new batch's first predictions in own classes")
    for r in sorted(runs, key=lambda r: r["seed"]):
        m, rows = r["metrics"], r["rows"]
        units = " / ".join("{used:.2f}-{owned:.2f}".format(**n) for n in r["neurons"])
        starts = " / ".join("{:.0f} %".format(100 * d["own_class_share"]) for d in r.get("starts", []))
        last = max(x["round"] for x in rows)
        late = max((x["flipped"] for x in rows if x["round"] > last - 5), default=0.0)
        print(f"{r['seed']} | {' / '.join(f'{100 * a:.1f}' for a in r['own'])} | "
              f"{' / '.join('-' if a is None else f'{100 * a:.1f}' for a in r['local'])} | "
              f"{' / '.join(f'{100 * a:+.2f}' for a in m['pa_per_batch'] or [])} | {100 * m['mean_acc']:.2f} | "
              f"{max(n.get('soft', float('nan')) for n in r['neurons']):.3f} | {late:.3f} | "
              f"{units} | "
              f"{starts}")
    worst = [min(r["metrics"]["pa_per_batch"]) for r in runs if r["metrics"]["pa_per_batch"]]
    pa = [r["metrics"]["pa"] for r in runs if r["metrics"]["pa"] is not None]
    if pa:
        print(f"{len(pa)} runs: PA mean {100 * np.mean(pa):+.2f}, median {100 * np.median(pa):+.2f}, min "
              f"{100 * min(pa):+.2f}, max {100 * max(pa):+.2f}; quartiles {100 * np.percentile(pa, 25):+.2f} / "
              f"{100 * np.percentile(pa, 75):+.2f}; runs with a batch more than 5 points below local: "
              f"{sum(w < -0.05 for w in worst)}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--summarize", nargs="+", metavar="JSON", help="print the table of earlier --out files and stop")
    p.add_argument("--seeds", default="70")
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--batches", type=int, default=2)
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--set", action="append", default=[], help="key=value over the cpu-demo config")
    p.add_argument("--out")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()
    if args.summarize:
        return summarize(args.summarize)
    torch.set_num_threads(1)
    config = dict(DEFAULTS, **PRESETS["cpu-demo"], dataset=args.dataset, batches=args.batches,
                  data_dir=args.data_dir, no_replay=True)
    for item in args.set:
        key, value = item.split("=", 1)
        kind = type(DEFAULTS[key]) if DEFAULTS[key] is not None else int
        config[key] = None if value == "None" else (value == "True" if kind is bool else kind(value))
    dataset = data.load_dataset(config["dataset"], config["data_dir"], device=torch.device("cpu"))
    everything = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        config["seed"] = seed
        watch = GateWatch(args.quiet)
        dataset_, clients, server, batches, model = train.build(config, torch.device("cpu"), dataset)
        watch.begin(server, clients, batches, model)
        state = train.onboard(server, clients, batches, config, hooks=watch)
        result = train.results(config, batches, state, clients)
        m = result["metrics"]
        local = [None if row is None else float(np.mean([row[c] for c in b])) for row, b in
                 zip(state.local_accuracy, batches)]
        own = [m["batch_acc"][t][t] for t in range(len(batches))]
        print(f"seed {seed}: own-stage batch accuracy {[round(100 * a, 1) for a in own]}, local "
              f"{[None if a is None else round(100 * a, 1) for a in local]}, PA per batch "
              f"{[round(100 * a, 2) for a in (m['pa_per_batch'] or [])]}, final mean {100 * m['mean_acc']:.2f}, "
              f"neurons {[{k: round(v, 3) for k, v in n.items()} for n in state.neurons]}", flush=True)
        print(f"  first models of each new batch: {[(d['stage'], round(100 * d['own_class_share'], 1)) for d in watch.starts]}"
              " (% of validation predictions in the batch's own classes)", flush=True)
        everything.append(dict(seed=seed, rows=watch.rows, starts=watch.starts, metrics=m, local=local, own=own, neurons=state.neurons,
                               val=result["val_metrics"]["batch_acc"]))
    if args.out:
        Path(args.out).write_text(json.dumps(dict(config={k: v for k, v in config.items() if k != "seed"},
                                                  runs=everything), indent=1))


if __name__ == "__main__":
    main()

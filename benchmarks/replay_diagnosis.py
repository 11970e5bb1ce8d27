"""Why does replay so rarely help? What the dreams teach an earlier client, class by class (docs/results.md).

Takes finished `--no-replay` runs (as benchmarks/replay_budget.py does) and, for every stage t >= 1, replays
batch t onto the earlier clients from that state, as a replay run would (the earlier clients' generated
models are bitwise the same at every stage when nothing is replayed, so the final checkpoint serves every t;
each t starts again from it). For every earlier client that shares a class with the dreams it measures, on
its VALIDATION split only (test data decides nothing):
  - transfer: its own model's accuracy on the dreamed images of its classes (labels: the class each image was
    dreamed as), next to its accuracy on its real validation images of those classes; the teachers' accuracy
    on their own dreams says what the images are to the model that made them;
  - the path: its validation accuracy on the dreamed classes and on its other classes, before and after the
    fine-tuning steps (the end of the path, before anything is chosen or confirmed).

    python benchmarks/replay_diagnosis.py runs/nr5-100 runs/nr5-101 --bn-weight 0.1
"""
import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import replay as replay_module  # noqa: E402
from shell import runner  # noqa: E402
import train  # noqa: E402
from hypernet import run_model  # noqa: E402


def check_runs(parser, runs):
    """Every folder must hold a finished pfeddsh --no-replay run: with replay, its final checkpoint would hold
    earlier clients as replay left them, not as each stage found them. One line and exit 2 otherwise."""
    for run in runs:
        results = os.path.join(run, "results.json")
        if not (os.path.isfile(results) and os.path.isfile(os.path.join(run, "checkpoint.pt"))):
            parser.error(f"{run}: not a finished run (results.json and checkpoint.pt expected)")
        with open(results) as f:
            config = json.load(f)["config"]
        if config.get("method") != "pfeddsh" or not config.get("no_replay") or config.get("no_masks"):
            what = config.get("method") if config.get("method") != "pfeddsh" else \
                "pfeddsh with --no-masks" if config.get("no_masks") else "pfeddsh with replay"
            parser.error(f"{run}: a pfeddsh --no-replay run is needed, this one is {what}")


def accuracy_within(logits, labels, classes):
    """Accuracy when the model may answer only among `classes` (a client's own), labels in dataset ids."""
    return (classes[logits[:, classes].argmax(1)] == labels).float()


@torch.no_grad()
def own_dreams_accuracy(server, dreamers, images, labels):
    """Each teacher's accuracy on the images dreamed from it (`images` holds theirs in `dreamers` order)."""
    if not dreamers:
        return []
    server.model.eval()
    out = []
    for j, x, y in zip(dreamers, images.chunk(len(dreamers)), labels.chunk(len(dreamers))):
        classes = (server.label_counts[j] > 0).nonzero().flatten().to(y.device)
        logits = run_model(server.model, server.hypernet.unflatten(server.generate(j)), server.bn_stats[j], x)
        out.append(accuracy_within(logits, y, classes).mean().item())
    return out


def mean_of(correct):
    return correct.float().mean().item() if len(correct) else np.nan


def diagnose(run_dir, bn_weight=None):
    """(one row per teacher: its BN loss and accuracy on its own dreams, one row per earlier client tried)."""
    config, _, clients, server, batches, _ = runner.restore_finished(run_dir)
    model = server.model
    replay = dict(train.replay_settings(config), confirm_alpha=0.0)   # decide nothing: restore every client
    if bn_weight is not None:
        replay["bn_weight"] = bn_weight
    teachers, tried = [], []
    for t in range(1, len(batches)):
        path = {}                               # client -> per-image correctness on val, at every validation

        def validate(cid, flat):
            correct, _ = clients[cid].correct(flat, server.bn_stats[cid], "val")
            path.setdefault(cid, []).append(correct)
            return clients[cid].evaluate(flat, server.bn_stats[cid], split="val_select")

        def confirm(cid, before, after):
            return clients[cid].confirm(before, after, server.bn_stats[cid])

        start = {c: server.generate(c) for b in batches[:t] for c in b}
        report = replay_module.backward_transfer(server, t, validate, confirm, seed=config["seed"] + t, **replay)
        images, labels = report["images"], report["labels"]
        teachers += [{"accuracy": a, "bn_loss": b} for a, b in
                     zip(own_dreams_accuracy(server, report["dreamers"], images, labels), report["bn_loss_end"])]
        model.eval()
        with torch.no_grad():
            for i in start:
                classes = (server.label_counts[i] > 0).nonzero().flatten().to(labels.device)
                keep = torch.isin(labels, classes)
                if not keep.any():
                    continue
                dreamed = labels[keep].unique()
                weights = server.hypernet.unflatten(start[i])
                on_dreams = run_model(model, weights, server.bn_stats[i], images[keep])
                x_val, y_val = clients[i].held_out("val")
                real = torch.isin(y_val, dreamed)
                on_real = run_model(model, weights, server.bn_stats[i],
                                    data.normalize(x_val[real], clients[i].mean, clients[i].std))
                first, last = path[i][0], path[i][-1]
                tried.append({"all_dreamed": len(dreamed) == len(classes),
                              "on_dreams": mean_of(accuracy_within(on_dreams, labels[keep], classes)),
                              "on_real": mean_of(accuracy_within(on_real, y_val[real], classes)),
                              "dreamed_before": mean_of(first[real]), "dreamed_after": mean_of(last[real]),
                              "other_before": mean_of(first[~real]), "other_after": mean_of(last[~real])})
    return teachers, tried


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="folders of finished --no-replay runs (results.json + checkpoint.pt)")
    p.add_argument("--bn-weight", type=float, help="DeepInversion's BN-loss weight (default: the run's own)")
    args = p.parse_args()
    check_runs(p, args.runs)
    print("| run | BN loss of the dreams | teachers on their own dreams | earlier clients tried | "
          "all their classes dreamed | their model on the dreams of their classes | "
          "on their real val images of those classes | val acc, dreamed classes: before → after | "
          "val acc, other classes: before → after |")
    print("|---|---|---|---|---|---|---|---|---|")
    all_teachers, all_tried = [], []
    for run in args.runs + [None]:
        if run is None:                 # the last line: every run together
            teachers, tried = all_teachers, all_tried
        else:
            teachers, tried = diagnose(run, args.bn_weight)
            all_teachers, all_tried = all_teachers + teachers, all_tried + tried
        mean = {k: 100 * float(np.nanmean([r[k] for r in tried])) for k in
                ("on_dreams", "on_real", "dreamed_before", "dreamed_after", "other_before", "other_after")}
        print(f"| {run or 'all'} | {np.mean([r['bn_loss'] for r in teachers]):.1f} | "
              f"{100 * np.mean([r['accuracy'] for r in teachers]):.1f} | {len(tried)} | "
              f"{sum(r['all_dreamed'] for r in tried)} | {mean['on_dreams']:.1f} | {mean['on_real']:.1f} | "
              f"{mean['dreamed_before']:.1f} → {mean['dreamed_after']:.1f} | "
              f"{mean['other_before']:.1f} → {mean['other_after']:.1f} |", flush=True)


if __name__ == "__main__":
    main()

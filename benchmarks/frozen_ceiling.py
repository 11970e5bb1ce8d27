"""How far pfedhn-frozen's new clients can get on a split, read from the split alone (issue 22).

pfedhn-frozen is pFedHN's protocol for novel clients: the hypernetwork is trained on batch 0 only, then
frozen, and a later client moves nothing but its own embedding. Its classifier is generated, so a class
that no batch-0 client holds was only ever pushed down: on development seed 100 every new client read
every such class at 0 % on validation, at embedding rates 0.3 and 1 (docs/results.md). If that holds, a
new batch's accuracy cannot pass the share of its images whose class batch 0 trained on. This script
prints that share per batch, for the seeds and protocol given; it trains nothing and reads only labels.

    python benchmarks/frozen_ceiling.py --dataset cifar10 --data-dir ../shared/data --seeds 20,21,22,23,24
    python benchmarks/frozen_ceiling.py --runs runs/frozen-s100    # finished pfedhn-frozen runs: is it 0 %?

With --runs it reads finished pfedhn-frozen runs instead: each later batch's validation accuracy on the
images of classes batch 0 trained on and on the others, from the run's final checkpoint.

The share is over the validation images; data.partition gives each client the same share of every class
in its training, validation and test splits, so the test split's share differs only by rounding.
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
from shell import runner  # noqa: E402
import train  # noqa: E402


def seen_shares(config, dataset):
    """[share of batch t's validation images whose class some batch-0 client holds, for t >= 1]."""
    splits = train.client_splits(config, dataset)
    num_clients = config["batches"] * config["clients_per_batch"]
    batches = data.assign_batches(num_clients, config["batches"], config["seed"])
    seen = {k for cid in batches[0] for k in splits[cid].classes}
    shares = []
    for ids in batches[1:]:
        labels = np.concatenate([dataset.y_train[splits[cid].val].cpu().numpy() for cid in ids])
        shares.append(float(np.isin(labels, sorted(seen)).mean()))
    return len(seen), shares


def seen_and_unseen_accuracy(run_dir):
    """[(accuracy on images of classes batch 0 trained on, on the others), for each batch t >= 1] (val)."""
    _, _, clients, server, batches, _ = runner.restore_finished(run_dir)
    seen = torch.tensor(sorted({k for cid in batches[0] for k in clients[cid].classes}))
    out = []
    for ids in batches[1:]:
        right, known = [], []
        for cid in ids:
            correct, _ = clients[cid].correct(server.generate(cid), server.bn_stats[cid], "val")
            right.append(correct)
            known.append(torch.isin(clients[cid].y_val, seen))
        right, known = torch.cat(right), torch.cat(known)
        out.append(tuple(right[mask].float().mean().item() if mask.any() else float("nan")
                         for mask in (known, ~known)))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--data-dir", default="./data")
    p.add_argument("--seeds", default="20,21,22,23,24")
    p.add_argument("--batches", type=int, default=5)
    p.add_argument("--clients-per-batch", type=int, default=3)
    p.add_argument("--runs", nargs="*", help="finished pfedhn-frozen runs to read instead")
    args = p.parse_args()
    if args.runs:
        for run_dir in args.runs:
            cells = seen_and_unseen_accuracy(run_dir)
            print(f"{run_dir}: batches 1-{len(cells)}, validation accuracy on classes batch 0 trained on / on the "
                  "others (%): " + "  ".join(f"{100 * a:.1f} / {100 * b:.1f}" for a, b in cells))
        return
    dataset = data.load_dataset(args.dataset, args.data_dir)
    print(f"{args.dataset}, {args.batches} batches of {args.clients_per_batch} clients: share of each later "
          f"batch's validation images whose class batch 0 trained on (pfedhn-frozen's ceiling)")
    means = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        config = dict(train.DEFAULTS, dataset=args.dataset, batches=args.batches,
                      clients_per_batch=args.clients_per_batch, seed=seed)
        num_seen, shares = seen_shares(config, dataset)
        means.append(np.mean(shares))
        print(f"seed {seed}: batch 0 holds {num_seen} of {dataset.num_classes} classes; batches 1-{args.batches - 1}: "
              + " ".join(f"{100 * s:.1f}" for s in shares) + f" %  (mean {100 * np.mean(shares):.1f} %)")
    print(f"mean over seeds: {100 * np.mean(means):.1f} %")


if __name__ == "__main__":
    main()

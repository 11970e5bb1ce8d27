"""Replay's settings against what it gains, at every stage of finished 5-batch runs (docs/results.md).

Takes finished `--no-replay` runs of development seeds. For each stage t >= 1 it replays batch t onto the
earlier clients from the no-replay state (their generated models are bitwise the same at every stage when
nothing is replayed, so the final checkpoint serves every t), once per setting, and puts the state back.
Each client's validation split is cut in thirds: replay picks its point of the path on the first (playing
val_select), the confirmation test reads the second (val_confirm), and the third, which replay never sees,
measures what an update is worth. Test data is never read. The confirmation test's z is applied afterwards
to the recorded counts, so one replay serves every z.

    python benchmarks/replay_settings.py runs/nr5-100 runs/nr5-101 runs/nr5-102 runs/nr5-103 --bn-weight 10,0.1

Columns: earlier clients tried (summed over stages and runs; a client is tried when a new client dreamed one
of its classes), proposals (the path beat its start on the first third), then per z: updates accepted, the
mean gain on the third third per tried client (points; a rejected client gains 0), accepted updates that lost
on it. "teachers on own dreams": the new clients' accuracy on their own dreamed images, among their classes.
"""
import argparse
import itertools
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import deepinversion  # noqa: E402
import federated as fl  # noqa: E402
import replay as replay_module  # noqa: E402
import runner  # noqa: E402
import train  # noqa: E402
from replay_diagnosis import check_runs, own_dreams_accuracy  # noqa: E402  (benchmarks/, this script's folder)

Z = [0.0, 1.0, 1.645]


class ThirdsClient(fl.Client):
    """A client whose validation split is read in thirds: select, confirm, and one replay never sees."""

    def held_out(self, split):
        if split == "test":
            raise RuntimeError("choosing replay's settings never reads test data")
        part = {"val": slice(None), "val_select": slice(0, None, 3), "val_confirm": slice(1, None, 3),
                "assess": slice(2, None, 3)}[split]
        return self.x_val[part], self.y_val[part]


def replay_stages(run_dir, settings):
    """{setting: [(tried, proposals) per stage]}, proposals = [(gained, lost, gain on the third third)],
    and {(stage, BN weight): the teachers' accuracy on their own dreams}."""
    config, _, clients, server, batches, _ = runner.restore_finished(run_dir)
    for client in clients:
        client.__class__ = ThirdsClient
    synthesize, dreams = deepinversion.synthesize, {}
    results, teacher_accuracy = {s: [] for s in settings}, {}
    try:
        for t in range(1, len(batches)):
            for setting in settings:
                lr, steps, select, bn_weight = setting
                proposals = []

                def cached(model, teachers, **kw):      # one synthesis per (stage, BN weight), every setting reads it
                    if (t, bn_weight) not in dreams:
                        dreams[t, bn_weight] = synthesize(model, teachers, **kw)
                    return dreams[t, bn_weight]

                def validate(cid, flat):
                    acc, loss = clients[cid].evaluate(flat, server.bn_stats[cid], split="val_select")
                    return (-loss, 0.0) if select == "loss" else (acc, loss)

                def confirm(cid, before, after):
                    gained, lost = clients[cid].confirm(before, after, server.bn_stats[cid])
                    worth = (clients[cid].evaluate(after, server.bn_stats[cid], "assess")[0]
                             - clients[cid].evaluate(before, server.bn_stats[cid], "assess")[0])
                    proposals.append((gained, lost, worth))
                    return gained, lost

                deepinversion.synthesize = cached
                # z = inf: nothing is accepted, so every client is restored bitwise for the next setting and
                # stage; the z of the table is applied to the recorded counts afterwards.
                replay = dict(train.replay_settings(config), lr=lr, steps=steps, bn_weight=bn_weight,
                              confirm_z=math.inf)
                report = replay_module.backward_transfer(server, t, validate, confirm, seed=config["seed"] + t,
                                                         **replay)
                results[setting].append((report["accepted"] + report["rejected"], proposals))
                if (t, bn_weight) not in teacher_accuracy:
                    teacher_accuracy[t, bn_weight] = own_dreams_accuracy(server, report["dreamers"], report["images"],
                                                                         report["labels"])
    finally:
        deepinversion.synthesize = synthesize
    return results, teacher_accuracy


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="folders of finished --no-replay runs (results.json + checkpoint.pt)")
    p.add_argument("--lr", default="0.003", help="replay Adam rates, comma-separated")
    p.add_argument("--steps", default="30", help="fine-tuning steps, comma-separated")
    p.add_argument("--select", default="acc", help="acc (accuracy, then loss: replay's rule) and/or loss")
    p.add_argument("--bn-weight", default="10", help="DeepInversion BN-loss weights, comma-separated")
    args = p.parse_args()

    def values(text, kind, flag, ok):
        try:
            out = [kind(v) for v in text.split(",")]
        except ValueError:
            p.error(f"{flag} must be comma-separated {kind.__name__}s, got {text!r}")
        if not all(ok(v) for v in out):
            p.error(f"{flag} out of range: {text!r}")
        return out

    select = args.select.split(",")
    if not set(select) <= {"acc", "loss"}:
        p.error(f"--select takes acc and/or loss, got {args.select!r}")
    settings = list(itertools.product(values(args.lr, float, "--lr", lambda v: 0 < v < math.inf),
                                      values(args.steps, int, "--steps", lambda v: v >= 1), select,
                                      values(args.bn_weight, float, "--bn-weight", lambda v: 0 <= v < math.inf)))
    check_runs(p, args.runs)
    totals = {s: [] for s in settings}
    teachers = {}
    for run in args.runs:
        results, accuracy = replay_stages(run, settings)
        for s in settings:
            totals[s] += results[s]
        for (t, bn_weight), accuracies in accuracy.items():
            teachers.setdefault(bn_weight, []).extend(accuracies)
    print(f"{len(args.runs)} runs: " + ", ".join(args.runs))
    print("| lr | steps | select | BN weight | teachers on own dreams | tried | proposals | "
          + " | ".join(f"z = {z}: accepted, gain per tried, lost" for z in Z) + " |")
    print("|---|---|---|---|---|---|---|" + "---|" * len(Z))
    for s in settings:
        tried = sum(n for n, _ in totals[s])
        proposals = [q for _, qs in totals[s] for q in qs]
        cells = []
        for z in Z:
            kept = [worth for gained, lost, worth in proposals if replay_module.accept(gained, lost, z)]
            cells.append(f"{len(kept)}, {100 * sum(kept) / max(tried, 1):+.2f}, {sum(w < 0 for w in kept)}")
        print(f"| {s[0]:g} | {s[1]} | {s[2]} | {s[3]:g} | {100 * np.mean(teachers[s[3]]):.1f} % | {tried} | "
              f"{len(proposals)} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()

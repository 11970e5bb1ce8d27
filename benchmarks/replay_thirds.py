"""What replay's accepted updates are worth, on validation data replay never saw (issue 21's yardstick).

Takes finished `--no-replay` runs of development seeds. For each stage t >= 1 it runs replay
(replay.backward_transfer, the code a run uses) onto the earlier clients from the no-replay state (their
generated models are bitwise the same at every stage when nothing is replayed, so the final checkpoint
serves every t), then puts the state back. Each client's validation split is cut in thirds: replay picks
its point on the first (playing val_select), the confirmation test reads the second (val_confirm), and the
third measures what an update is worth. Test data is never read. The acceptance rule is applied afterwards
to the recorded counts of each stage at several levels (Holm's step-down over the stage's proposals, as
replay.accept does), so one replay serves every level.

    python benchmarks/replay_thirds.py runs/nr-100 runs/nr-101 --bn-weight 0.1,10

Per setting: earlier clients tried (summed over stages and runs), proposals, teachers' reading of their
own dreams, then per level: updates kept, mean gain on the third third per tried client (points; a client not
kept gains 0), kept updates that lost on it.
"""
import argparse
import itertools
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import deepinversion  # noqa: E402
import replay as replay_module  # noqa: E402
from shell import runner  # noqa: E402
import train  # noqa: E402
from replay_diagnosis import check_runs  # noqa: E402  (benchmarks/, this script's folder)
import federated as fl  # noqa: E402

ALPHAS = [0.5, 0.16, 0.05, 0.01]     # the levels of replay.accept (one proposal: z = 0, 1, 1.645, 2.326)
VERBOSE = False
IMAGES = None       # dreams per new client (None: the run's)
ITERATIONS = None   # DeepInversion iterations (None: the run's)
CONTROL = "none"    # replay's control (--replay-control)
SECONDS = []        # (synthesis, the rest) seconds of each replay with the first setting


class ThirdsClient(fl.Client):
    """A client whose validation split is read in thirds: select, confirm, and one replay never sees."""

    def held_out(self, split):
        if split == "test":
            raise RuntimeError("choosing replay's settings never reads test data")
        part = {"val": slice(None), "val_select": slice(0, None, 3), "val_confirm": slice(1, None, 3),
                "assess": slice(2, None, 3)}[split]
        return self.x_val[part], self.y_val[part]


def replay_stages(run_dir, settings):
    """settings: (BN weight, lr, steps, anchor weight, validate every) tuples (None: train.py's lr, anchor and
    validate-every, the run's steps).
    {setting: [(tried, {cid: (gained, lost, loss drop, its error, worth on the third third)}) per stage]},
    {setting: reads}."""
    config, _, clients, server, batches, _ = runner.restore_finished(run_dir)
    for client in clients:
        client.__class__ = ThirdsClient
    results, reads = {s: [] for s in settings}, {s: [] for s in settings}
    synthesize, dreamed, stage = deepinversion.synthesize, {}, [0]

    def cached(model, teachers, **kw):      # one synthesis per (stage, BN weight): every setting reads it
        key = (stage[0], kw["bn_weight"], len(teachers))
        if key not in dreamed:
            dreamed[key] = synthesize(model, teachers, **kw)
        return dreamed[key]

    deepinversion.synthesize = cached
    try:
        for t in range(1, len(batches)):
            stage[0] = t
            for setting in settings:
                replay_one(config, clients, server, t, setting, results, reads)
    finally:
        deepinversion.synthesize = synthesize
    return results, reads


def replay_one(config, clients, server, t, setting, results, reads):
    """Replay after stage t with one setting, from the no-replay state, and put that state back."""
    bn_weight, lr, steps, anchor, every = setting
    saved = {n: p.detach().clone() for n, p in server.hypernet.named_parameters()}
    dreams = dict(server.dreams)
    proposals = {}

    def validate(cid, flat):
        return clients[cid].evaluate(flat, server.bn_stats[cid], split="val_select")

    def confirm(cid, before, after):
        said = clients[cid].confirm(before, after, server.bn_stats[cid])
        worth = (clients[cid].evaluate(after, server.bn_stats[cid], "assess")[0]
                 - clients[cid].evaluate(before, server.bn_stats[cid], "assess")[0])
        proposals[cid] = (*said, worth)
        return said

    replay = dict(train.replay_settings(config), bn_weight=bn_weight, confirm_alpha=0.0,
                  num_images=IMAGES or config["replay_images"],
                  iterations=ITERATIONS or config["replay_iterations"], control=CONTROL,
                  lr=lr or train.DEFAULTS["replay_lr"], steps=steps or config["replay_steps"],
                  anchor_weight=train.DEFAULTS["replay_anchor"] if anchor is None else anchor,
                  validate_every=every or train.DEFAULTS["replay_validate_every"])
    start = time.time()
    report = replay_module.backward_transfer(server, t, validate, confirm, seed=config["seed"] + t, **replay)
    if setting == next(iter(results)):
        SECONDS.append((report["synthesis_s"], time.time() - start - report["synthesis_s"]))
    results[setting].append((len(report["tried"]), proposals))
    if VERBOSE:
        for cid, before, after in zip(report["tried"], report["val_before"], report["val_after"]):
            print(f"  stage {t} {setting} client {cid}: select {before[0]:.3f} -> {after[0]:.3f}, "
                  f"confirm/worth {proposals.get(cid)}", flush=True)
    if report["teacher_reads"] is not None:
        reads[setting].append(report["teacher_reads"])
    with torch.no_grad():           # the next setting and stage start from the no-replay state
        for n, p in server.hypernet.named_parameters():
            p.copy_(saved[n])
    server.dreams = dreams
    return results, reads


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="folders of finished --no-replay runs (results.json + checkpoint.pt)")
    p.add_argument("--bn-weight", default=str(train.DEFAULTS["replay_bn_weight"]),
                   help="DeepInversion BN-loss weights, comma-separated")
    p.add_argument("--lr", default=None, help="replay's rates, comma-separated (default: train.py's, not the run's)")
    p.add_argument("--steps", default=None, help="fine-tuning steps, comma-separated (default: the run's)")
    p.add_argument("--anchor", default=None, help="anchor (KD toward the client's own model) weights, comma-separated")
    p.add_argument("--validate-every", default=None, help="steps between scores of the path, comma-separated")
    p.add_argument("--images", type=int, default=None, help="dreams per new client (default: the run's)")
    p.add_argument("--iterations", type=int, default=None, help="DeepInversion iterations (default: the run's)")
    p.add_argument("--control", default="none", choices=["none", "noise", "own"], help="replay's control")
    p.add_argument("--verbose", action="store_true", help="one line per tried client")
    args = p.parse_args()
    global VERBOSE, IMAGES, ITERATIONS, CONTROL
    VERBOSE, IMAGES, ITERATIONS, CONTROL = args.verbose, args.images, args.iterations, args.control
    try:
        settings = list(itertools.product([float(v) for v in args.bn_weight.split(",")],
                                          [float(v) for v in args.lr.split(",")] if args.lr else [None],
                                          [int(v) for v in args.steps.split(",")] if args.steps else [None],
                                          [float(v) for v in args.anchor.split(",")] if args.anchor else [None],
                                          [int(v) for v in args.validate_every.split(",")]
                                          if args.validate_every else [None]))
    except ValueError:
        p.error("--bn-weight, --lr, --steps, --anchor and --validate-every take comma-separated numbers")
    check_runs(p, args.runs)
    totals, reads = {s: [] for s in settings}, {s: [] for s in settings}
    for run in args.runs:
        results, r = replay_stages(run, settings)
        for s in settings:
            totals[s] += results[s]
            reads[s] += r[s]
    print(f"{len(args.runs)} runs: " + ", ".join(args.runs))
    synthesis, rest = (np.mean([x[i] for x in SECONDS]) for i in (0, 1))
    print(f"control {CONTROL}, images {IMAGES or 'as run'}, iterations {ITERATIONS or 'as run'}: per replay "
          f"{synthesis + rest:.1f} s, synthesis {synthesis:.1f} s, fine-tuning and the clients' scores {rest:.1f} s "
          f"(first setting; the others reuse its dreams)")
    print("| BN weight, lr, steps, anchor, validate every | teachers on own dreams | tried | proposals | "
          + " | ".join(f"alpha = {a}: kept, gain per tried, lost" for a in ALPHAS)
          + " | stages whose kept updates gain in sum, none losing (default level) |")
    print("|---|---|---|---|" + "---|" * len(ALPHAS) + "---|")
    for s in settings:
        tried = sum(n for n, _ in totals[s])
        cells = []
        for a in ALPHAS:
            kept = [stage[c][4] for _, stage in totals[s]
                    for c in replay_module.accept({c: v[:4] for c, v in stage.items()}, a)]
            cells.append(f"{len(kept)}, {100 * sum(kept) / max(tried, 1):+.2f}, {sum(w < 0 for w in kept)}")
        proposals = sum(len(stage) for _, stage in totals[s])
        a = train.DEFAULTS["replay_confirm_alpha"]
        worths = [[stage[c][4] for c in replay_module.accept({c: v[:4] for c, v in stage.items()}, a)]
                  for _, stage in totals[s]]
        cells.append(f"{sum(sum(w) > 0 and min(w) >= 0 for w in worths if w)} of {len(worths)}")
        anchor = train.DEFAULTS["replay_anchor"] if s[3] is None else s[3]
        read = 100 * np.mean(reads[s]) if reads[s] else float("nan")
        print(f"| {s[0]:g}, {s[1] or train.DEFAULTS['replay_lr']:g}, {s[2] or 'run'}, {anchor:g}, "
              f"{s[4] or train.DEFAULTS['replay_validate_every']} | {read:.1f} % | {tried} | {proposals} | "
              + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()

"""What privacy costs replay: RI and the audit's membership AUC against --bn-noise sigma (docs/privacy.md).

    python benchmarks/privacy_curve.py --seeds 0,1,2 --sigmas 0,0.1,0.3,1,3 --out runs/privacy-curve \\
        --dataset cifar10 --data-dir ../shared/data --preset cpu-demo --batches 2

Every flag it does not know goes to train.py and sets the protocol. For each seed it trains that protocol
once with --no-replay (reused when <out>/no-replay-s<seed> holds a finished run with the same settings,
resumed when it holds a checkpoint): its last checkpoint holds the server exactly as replay finds it after
the last stage (masks frozen, nothing replayed). For each sigma it restores that state, replays the last
stage from the clients' uploads under that noise, audits the replay (privacy.audit_replay) and evaluates
every client: RI on test and validation, updates accepted, the attackers' AUCs, the reconstruction shares.
With --batches 2 (the default protocol) this is the replay a `train.py --bn-noise sigma` run makes, on the
same state, so the sigma = 0 row is that run's RI exactly; with more batches only the last stage is replayed.

Writes <out>/curve.json (one row per seed and sigma; a rerun reuses the rows it finds), the audit's grid
<out>/grid-s<seed>-sigma<sigma>.png, and <docs>/privacy_curve.md and <docs>/privacy_curve.png.
Bad input: one line, exit code 2, as train.py.
"""
import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from shell import checkpoint  # noqa: E402
from shell import privacy  # noqa: E402
from shell import cli  # noqa: E402
import replay  # noqa: E402
from shell import runner  # noqa: E402
import train  # noqa: E402

# Set by this script itself, per seed and sigma: not protocol flags.
OWN_FLAGS = ["--seed", "--seeds", "--out", "--methods", "--method", "--no-replay", "--no-masks", "--bn-noise",
             "--privacy-audit", "--resume", "--overwrite"]


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                epilog="any other flag is passed to train.py (the protocol)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated (default 0,1,2)")
    p.add_argument("--sigmas", default="0,0.1,0.3,1,3",
                   help="comma-separated --bn-noise values (default 0,0.1,0.3,1,3)")
    p.add_argument("--out", default="runs/privacy-curve", help="runs and curve.json (default runs/privacy-curve)")
    p.add_argument("--docs", default="docs", help="where privacy_curve.md and .png go (default docs)")
    args, protocol = p.parse_known_args(argv)
    for flag in OWN_FLAGS:
        if any(a == flag or a.startswith(flag + "=") for a in protocol):
            raise runner.CliError(f"{flag} is set by privacy_curve.py itself; use --seeds, --sigmas and --out")
    try:
        args.seeds = [int(s) for s in args.seeds.split(",")]
        args.sigmas = [float(s) for s in args.sigmas.split(",")]
    except ValueError:
        raise runner.CliError("--seeds must be comma-separated integers and --sigmas comma-separated numbers") from None
    if any(not 0 <= s < math.inf for s in args.sigmas):
        raise runner.CliError(f"--sigmas must be >= 0 and finite, got {args.sigmas}")
    return args, protocol


def no_replay_run(protocol, seed, out):
    """The seed's --no-replay run (trained, resumed or reused); returns its folder."""
    argv = protocol + ["--no-replay", "--seed", str(seed), "--out", out]
    results_path = os.path.join(out, "results.json")
    if os.path.exists(results_path):
        config, _ = cli.resolve_config(argv)
        with open(results_path) as f:
            done = json.load(f)["config"]
        differing = checkpoint.differing_settings(config, dict(train.DEFAULTS, **done))
        if differing:
            raise runner.CliError(f"{results_path} was made with other settings ({', '.join(differing)}): "
                                 f"use another --out")
        print(f"== seed {seed}: reusing {out}")
        return out
    resume = os.path.exists(os.path.join(out, checkpoint.FILENAME))
    print(f"== seed {seed}: training the protocol without replay" + (" (resuming)" if resume else ""))
    cli.main(argv + ["--resume"] * resume)
    return out


def replay_once(run_dir, sigma, grid_path):
    """Restore the run's final state, replay its last stage under noise sigma, audit it, evaluate: one row."""
    config, dataset, clients, server, batches, onboarding = runner.restore_finished(run_dir)
    t = len(batches) - 1
    start = time.time()
    report = replay.run_replay(server, clients, t, config["seed"], train.replay_settings(config),
                               uploads=privacy.uploads(server, config["seed"], sigma),
                               audit=privacy.auditor(dataset, config["seed"], lambda t: grid_path))
    seconds = time.time() - start
    seen = [c for b in batches for c in b]
    acc = {cid: server.evaluate(clients[cid]) for cid in seen}
    test_sizes = [len(c.y_test) for c in clients]
    # the stage's evaluation is the one after replay: replace the no-replay run's last row
    test = train.metrics(onboarding.accuracy[:-1] + [[acc[c][0] for c in range(len(clients))]], batches, test_sizes)
    val = train.metrics(onboarding.val_accuracy[:-1] + [[acc[c][1] for c in range(len(clients))]], batches, test_sizes)
    return {"seed": config["seed"], "sigma": sigma, "ri": test["ri"], "val_ri": val["ri"],
            "mean_acc": test["mean_acc"], "accepted": report["accepted"],
            "proposed": report["accepted"] + report["rejected"], "dropped": report["dropped"],
            "bn_loss_end": float(np.mean(report["bn_loss_end"])) if report["bn_loss_end"] else None,
            "seconds": seconds, "audit": report.get("audit"),
            # what results.json's replay report says, to check a row against a train.py run
            "replay": {k: report[k] for k in ("bn_loss_end", "accepted", "rejected", "skipped", "val_before",
                                              "val_after", "confirm")}}


def mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1) if len(values) > 1 else 0.0:.3f}"


def table(rows, sigmas, seeds, command):
    """The markdown report: per sigma, mean ± std over seeds."""
    lines = [f"`{command}`", "",
             f"Seeds {', '.join(map(str, seeds))}; mean ± std over seeds. RI in points; AUC 0.5 = nothing leaks. "
             "'Closer than chance': share of dreamed images nearer a training image than the 5th percentile of "
             "held-out distances (chance 0.05).", "",
             "| sigma | RI (test) | RI (val) | accepted / proposed | AUC pixel | AUC feature | AUC statistics | "
             "AUC model loss | closer than chance (pixel) | seconds |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for sigma in sigmas:
        rs = [r for r in rows if r["sigma"] == sigma]
        audits = [r["audit"] for r in rs if r["audit"]]

        def auc(name):
            return mean_std([a["membership"][name]["auc"] for a in audits if name in a["membership"]])
        lines.append(
            f"| {sigma:g} | {mean_std([100 * r['ri'] for r in rs])} | {mean_std([100 * r['val_ri'] for r in rs])} | "
            f"{sum(r['accepted'] for r in rs)} / {sum(r['proposed'] for r in rs)} | "
            + " | ".join(auc(name) for name in privacy.ATTACKERS)
            + f" | {mean_std([a['reconstruction']['pixel']['closer_than_chance'] for a in audits])} | "
            f"{np.mean([r['seconds'] for r in rs]):.0f} |")
    return "\n".join(lines) + "\n"


def plot(rows, sigmas, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for seed in sorted({r["seed"] for r in rows}):
        rs = sorted((r for r in rows if r["seed"] == seed), key=lambda r: r["sigma"])
        left.plot([r["sigma"] for r in rs], [100 * r["ri"] for r in rs], "o", color="gray", alpha=0.5)
    left.plot(sigmas, [100 * np.mean([r["ri"] for r in rows if r["sigma"] == s]) for s in sigmas], "k-",
              label="mean over seeds (points: seeds)")
    left.axhline(0, color="gray", lw=0.8, ls=":")
    left.set_xlabel("--bn-noise sigma")
    left.set_ylabel("RI of replay (points, test)")
    left.legend(fontsize=8)
    for name in privacy.ATTACKERS:
        means = [np.mean([r["audit"]["membership"][name]["auc"] for r in rows
                          if r["sigma"] == s and r["audit"] and name in r["audit"]["membership"]] or [np.nan])
                 for s in sigmas]
        right.plot(sigmas, means, "o-", label=name)
    right.axhline(0.5, color="gray", lw=0.8, ls=":")
    right.set_xlabel("--bn-noise sigma")
    right.set_ylabel("membership AUC (0.5 = nothing leaks)")
    right.legend(fontsize=8)
    positive = [s for s in sigmas if s > 0]
    for ax in (left, right):
        if positive:
            ax.set_xscale("symlog", linthresh=min(positive))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args, protocol = parse(argv)
    os.makedirs(args.out, exist_ok=True)
    curve_path = os.path.join(args.out, "curve.json")
    rows = {}
    if os.path.exists(curve_path):
        with open(curve_path) as f:
            rows = {(r["seed"], r["sigma"]): r for r in json.load(f)}
    for seed in args.seeds:
        run_dir = no_replay_run(protocol, seed, os.path.join(args.out, f"no-replay-s{seed}"))
        for sigma in args.sigmas:
            if (seed, sigma) in rows:
                continue
            row = replay_once(run_dir, sigma, os.path.join(args.out, f"grid-s{seed}-sigma{sigma:g}.png"))
            rows[seed, sigma] = row
            aucs = ", ".join(f"{k} {v['auc']:.3f}" for k, v in (row["audit"] or {}).get("membership", {}).items())
            print(f"seed {seed} sigma {sigma:g}: RI {100 * row['ri']:+.2f} (val {100 * row['val_ri']:+.2f}), "
                  f"accepted {row['accepted']}/{row['proposed']}, AUC {aucs} ({row['seconds']:.0f} s)", flush=True)
            with open(curve_path, "w") as f:            # after every row: an interrupted curve loses one row
                json.dump(list(rows.values()), f, indent=1)
    done = [rows[s, g] for s in args.seeds for g in args.sigmas]
    command = "python benchmarks/privacy_curve.py " + " ".join(argv)
    os.makedirs(args.docs, exist_ok=True)
    text = table(done, args.sigmas, args.seeds, command)
    with open(os.path.join(args.docs, "privacy_curve.md"), "w") as f:
        f.write(text)
    plot(done, args.sigmas, os.path.join(args.docs, "privacy_curve.png"))
    print(text)
    print(f"wrote {curve_path}, {os.path.join(args.docs, 'privacy_curve.md')} and privacy_curve.png")
    return done


if __name__ == "__main__":
    try:
        main()
    except runner.CliError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (runner.Interrupted, KeyboardInterrupt) as e:
        print(f"interrupted ({e or 'SIGINT'}): rerun the same command to continue (finished rows and runs are kept)",
              file=sys.stderr)
        sys.exit(getattr(e, "code", 130))

"""The comparison report: what pFedDSH buys over its baselines (docs/design.md §2, §6).

    python train.py --methods local,fedavg,pfedhn,pfeddsh --seeds 0,1,2 --dataset cifar10 --batches 2 ...

train.py runs every (method, seed) on the same split into <out>/<method>-s<seed>/results.json (a finished
run is reused, an interrupted one resumed), then write_report reads them and writes
  <out>/comparison.md          per method, mean ± std over seeds: mean and weighted accuracy, PA, RI,
                               hypernetwork units used, wall time
  <out>/batch_accuracy.png     each batch's accuracy after every stage, one line per method
  <out>/pfeddsh_matrix.png     pFedDSH's accuracy matrix A[t][i] as a heatmap
The same two plotting functions draw every single run's accuracy_matrix.png and batch_accuracy.png next
to its results.json (write_run_plots, called by train.py).

PA (plasticity, docs/design.md §2): for each batch t > 0, the mean over its clients of A[t][i] minus
what the same client reaches with `local` (same seed, so the same split and the same number of local
steps). PA <= 0 is the failure signature "new clients fail to outperform local training".
"""
import json
import math
import os

import numpy as np

# A comparison entry is a method plus the ablation switches of pfeddsh.
VARIANTS = {
    "local": dict(method="local"),
    "fedavg": dict(method="fedavg"),
    "fedavg-ft": dict(method="fedavg-ft"),
    "pfedhn": dict(method="pfedhn"),
    "pfedhn-frozen": dict(method="pfedhn-frozen"),
    "pfedhn-pc": dict(method="pfedhn-pc"),
    "fedrep": dict(method="fedrep"),
    "fedrep-frozen": dict(method="fedrep-frozen"),
    "ditto": dict(method="ditto"),
    "fedlwf": dict(method="fedlwf"),
    "fedtarget": dict(method="fedtarget"),
    "frozen-adapters": dict(method="frozen-adapters"),
    "pfeddsh": dict(method="pfeddsh"),                                # the paper's method
    "pfeddsh-no-replay": dict(method="pfeddsh", no_replay=True),
    "pfeddsh-no-masks": dict(method="pfeddsh", no_masks=True),       # = pfedhn + replay
    # the paper's replay with a control in place of the dreams (extensions/controls.py)
    "pfeddsh-noise": dict(method="pfeddsh", replay_control="noise"),
    "pfeddsh-noise-kd": dict(method="pfeddsh", replay_control="noise-kd"),
    "pfeddsh-own": dict(method="pfeddsh", replay_control="own"),
    # our extensions (extensions/): adapters and offsets, replay with the clients' selection, its controls
    "pfeddsh-ext": dict(method="pfeddsh-ext"),
    "pfeddsh-ext-no-replay": dict(method="pfeddsh-ext", no_replay=True),
    "pfeddsh-ext-shape": dict(method="pfeddsh-ext", adapter_budget=0.0),     # the paper's shape, our replay
    "pfeddsh-ext-noise": dict(method="pfeddsh-ext", replay_control="noise"),
    "pfeddsh-ext-own": dict(method="pfeddsh-ext", replay_control="own"),
}


def variant_config(name):
    """The config keys that make a run this variant (the switches of the others set back to off)."""
    return dict(dict(no_replay=False, no_masks=False, replay_control="none"), **VARIANTS[name])


def plasticity(results, local):
    """PA per batch t > 0: the new clients' accuracy after their stage minus local's on the same clients."""
    pa = []
    for t, ids in enumerate(results["batches"][1:], start=1):
        pa.append(float(np.mean([results["accuracy"][t][c] - local["accuracy"][t][c] for c in ids])))
    return pa


def hypernet_units(results):
    """Fraction of the hypernetwork's hidden units written by the end: masks own part; pFedHN writes all."""
    if results.get("neurons"):
        return results["neurons"][-1]["owned"]
    return 1.0 if results["config"]["method"].startswith("pfed") else None


def summarize(runs):
    """runs: {variant: [results.json of each seed]} -> {variant: {column: per-seed values}}."""
    local = {r["config"]["seed"]: r for r in runs.get("local", [])}
    table = {}
    for name, seeds in runs.items():
        columns = {"mean_acc": [], "weighted_acc": [], "pa": [], "ri": [], "units": [], "time_min": [],
                   "local_steps": []}
        for r in seeds:
            m = r["metrics"]
            columns["mean_acc"].append(100 * m["mean_acc"])
            columns["weighted_acc"].append(100 * m["weighted_acc"])
            pa = plasticity(r, local[r["config"]["seed"]]) if r["config"]["seed"] in local else []
            if pa:                                  # none with a single batch
                columns["pa"].append(100 * np.mean(pa))
            elif not local and m.get("pa") is not None:     # no local run beside it: the run's own reference's
                columns["pa"].append(100 * m["pa"])
            columns["ri"].append(100 * m["ri"])
            if hypernet_units(r) is not None:
                columns["units"].append(hypernet_units(r))
            columns["time_min"].append(sum(r["time_s"]) / 60)
            if r.get("local_steps") is not None:     # results.json from before it was counted has none
                columns["local_steps"].append(r["local_steps"])
        table[name] = columns
    return table


# Student's t, 97.5 % quantile, by degrees of freedom: a 95 % interval over a handful of seeds.
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def paired_interval(a, b):
    """Mean of a - b over seeds (paired) and its 95 % t interval; None with fewer than two seeds."""
    d = np.asarray(a) - np.asarray(b)
    if len(d) < 2:
        return None
    half = T975.get(len(d) - 1, 1.96) * d.std(ddof=1) / np.sqrt(len(d))
    return float(d.mean()), float(d.mean() - half), float(d.mean() + half)


def cell(values, signed=False, digits=2):
    if not values:
        return "–"
    # the sample std (ddof = 1): seeds are a sample of what a user would see; one seed has no spread
    mean, std = float(np.mean(values)), (float(np.std(values, ddof=1)) if len(values) > 1 else 0.0)
    return f"{mean:{'+' if signed else ''}.{digits}f} ± {std:.{digits}f}"


def markdown(runs, command):
    table = summarize(runs)
    seeds = sorted({r["config"]["seed"] for rs in runs.values() for r in rs})
    c = next(iter(runs.values()))[0]["config"]
    lines = [
        f"# Comparison: {c['dataset']}, {c['batches']} batches of {c['clients_per_batch']} clients",
        "",
        f"Seeds {', '.join(map(str, seeds))}; mean ± std over seeds; accuracies and PA / RI in points (%).",
        f"Protocol: width {c['width']}, {c['rounds']} rounds per stage, {c['clients_per_round']} clients per round, "
        f"{c['local_steps']} local steps of batch {c['batch_size']}, device {next(iter(runs.values()))[0]['device']}.",
        "",
        f"    {command}",
        "",
        "| method | mean acc | weighted acc | PA (t > 0) | RI | hypernet units owned at the end | wall time (min) "
        "| local steps |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, col in table.items():
        # a method that has fewer seeds than the others (an unfinished comparison) says so
        if len(runs[name]) < len(seeds):
            name = f"{name} (seeds {', '.join(str(r['config']['seed']) for r in runs[name])})"
        lines.append(f"| {name} | {cell(col['mean_acc'])} | {cell(col['weighted_acc'])} | "
                     f"{cell(col['pa'], signed=True)} | {cell(col['ri'], signed=True)} | "
                     f"{cell(col['units'])} | {cell(col['time_min'], digits=1)} | "
                     f"{cell(col['local_steps'], digits=0)} |")
    lines += ["", "Each batch's accuracy (%) after its own stage and at the end, and replay (seconds per "
              "onboarded batch; earlier clients whose replay update was accepted, per seed):", ""]
    num_batches = c["batches"]
    header = ([f"batch {b} after stage {b}" for b in range(num_batches)]
              + [f"batch {b} final" for b in range(num_batches - 1)] + ["replay s", "replay accepted"])
    lines += ["| method | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]
    for name, seeds_results in runs.items():
        own = [[100 * r["metrics"]["batch_acc"][b][b] for r in seeds_results] for b in range(num_batches)]
        final = [[100 * r["metrics"]["batch_acc"][-1][b] for r in seeds_results] for b in range(num_batches - 1)]
        replay_s = [s for r in seeds_results for s in r["replay_s"]]
        accepted = ", ".join(f"{sum(x['accepted'] for x in r['replay'])}/"
                             f"{sum(x['accepted'] + x['rejected'] + x['skipped'] for x in r['replay'])}"
                             for r in seeds_results if r["replay"] and "accepted" in r["replay"][0])
        lines.append(f"| {name} | " + " | ".join(cell(v) for v in own + final)
                     + f" | {cell(replay_s, digits=1)} | {accepted or '–'} |")
    lines += per_batch_transfer(runs, num_batches)
    lines += neuron_table(runs)
    lines += replay_arms(runs)
    lines += versus(runs)
    lines += ["", "PA: new clients' accuracy after their stage minus `local` on the same clients and seed. "
              "RI: final minus after-own-stage accuracy of earlier batches (negative = forgetting). "
              "Hypernet units owned at the end: fraction of hidden units owned by some batch (pFedHN "
              "variants write all of them; FedAvg and local have no hypernetwork). Wall time: training, "
              "replay and evaluation of one run.", ""]
    return "\n".join(lines)


# Replay's arms, each group against its own no-replay run ("<reference>-no-replay") and its reference's dreams.
# The first group's names are also those of the runs made before the core and our extensions were split,
# when "pfeddsh" was the extended method (docs/runs/i32_*).
REPLAY_GROUPS = [("pfeddsh", ["pfeddsh", "pfeddsh-noise", "pfeddsh-noise-kd", "pfeddsh-own"]),
                 ("pfeddsh-ext", ["pfeddsh-ext", "pfeddsh-ext-noise", "pfeddsh-ext-own"])]
REPLAY_ARMS = [arm for _, arms in REPLAY_GROUPS for arm in arms]


def ri_pairs(runs, first, second):
    """RI (points) of two methods on the seeds both ran: ([first's], [second's])."""
    by_seed = {r["config"]["seed"]: 100 * r["metrics"]["ri"] for r in runs[second]}
    pairs = [(100 * r["metrics"]["ri"], by_seed[r["config"]["seed"]]) for r in runs[first]
             if r["config"]["seed"] in by_seed]
    return [a for a, _ in pairs], [b for _, b in pairs]


def replay_arms(runs):
    """Replay's share of RI for every replay arm present (the arm minus its group's no-replay run, paired by
    seed), the reference's dreams against each control (reference minus the arm), with 95 % t intervals, and
    the questions each arm put to earlier clients."""
    lines = []
    for reference, arms in REPLAY_GROUPS:
        arms, without = [a for a in arms if a in runs], f"{reference}-no-replay"
        if without not in runs or not arms:
            continue
        lines += ["", f"Replay's share of RI (each replay arm minus {without}, paired by seed; points, 95 % t "
                      f"interval), and the dreams against each arm ({reference} minus it):", "",
                  f"| arm | seeds | share of RI | 95 % interval | {reference} minus arm | 95 % interval | client "
                  "queries per replay |", "|---|---|---|---|---|---|---|"]
        for arm in arms:
            a, b = ri_pairs(runs, arm, without)
            share = paired_interval(a, b)
            versus_dreams = paired_interval(*ri_pairs(runs, reference, arm)) if arm != reference and reference in runs \
                else None
            queries = [x.get("client_queries") for r in runs[arm] for x in r["replay"]]
            queries = "–" if not queries or None in queries else f"{np.mean(queries):.1f}"
            lines.append(f"| {arm} | {len(a)} | " + (f"{share[0]:+.2f} | [{share[1]:+.2f}, {share[2]:+.2f}]" if share
                                                     else "– | –")
                         + " | " + (f"{versus_dreams[0]:+.2f} | [{versus_dreams[1]:+.2f}, {versus_dreams[2]:+.2f}]"
                                    if versus_dreams else "– | –") + f" | {queries} |")
    return lines


def t_pvalue(d):
    """Two-sided p-value of a paired t test that the differences d have mean 0 (Student's t, len(d) - 1 degrees
    of freedom; its density integrated by Simpson's rule, so no SciPy is needed). None under two values."""
    d = np.asarray(d, dtype=float)
    if len(d) < 2:
        return None
    if d.std(ddof=1) == 0:
        return 0.0 if d.mean() != 0 else 1.0
    t, nu = abs(d.mean()) / (d.std(ddof=1) / np.sqrt(len(d))), len(d) - 1
    x = np.linspace(0.0, t, 20001)
    density = np.exp(math.lgamma((nu + 1) / 2) - math.lgamma(nu / 2)) / math.sqrt(nu * math.pi) \
        * (1 + x ** 2 / nu) ** (-(nu + 1) / 2)
    h = x[1] - x[0]
    inside = h / 3 * (density[0] + density[-1] + 4 * density[1:-1:2].sum() + 2 * density[2:-1:2].sum())
    return float(max(0.0, 1 - 2 * inside))


def holm(pvalues, alpha=0.05):
    """{name: rejected?} by Holm's step-down over {name: p}: the k-th smallest p must be below alpha / (m - k)."""
    rejected, m = {name: False for name in pvalues}, len(pvalues)
    for k, name in enumerate(sorted(pvalues, key=pvalues.get)):
        if pvalues[name] > alpha / (m - k):
            break
        rejected[name] = True
    return rejected


def versus(runs, reference="pfeddsh", alpha=0.05):
    """Final mean accuracy of `reference` minus each other method's, paired by seed, with its 95 % t interval,
    the paired t test's p-value and Holm's verdict over all the methods compared (family-wise alpha)."""
    if reference not in runs:
        return []
    ours = {r["config"]["seed"]: 100 * r["metrics"]["mean_acc"] for r in runs[reference]}
    rows, pvalues = [], {}
    for name, seeds_results in runs.items():
        pairs = [(ours[r["config"]["seed"]], 100 * r["metrics"]["mean_acc"]) for r in seeds_results
                 if name != reference and r["config"]["seed"] in ours]
        interval = paired_interval([a for a, _ in pairs], [b for _, b in pairs])
        if interval:
            pvalues[name] = t_pvalue([a - b for a, b in pairs])
            rows.append((name, len(pairs), interval))
    verdicts = holm(pvalues, alpha)
    lines = ["", f"Final mean accuracy, {reference} minus each method (points, paired by seed, 95 % t interval; "
                 f"p: two-sided paired t test; Holm: step-down over the {len(rows)} methods at {alpha:g} family-wise):",
             "", "| method | seeds | difference | 95 % interval | p | Holm |", "|---|---|---|---|---|---|"]
    for name, n, (mean, low, high) in rows:
        verdict = (f"{reference} above" if mean > 0 else f"{reference} below") if verdicts[name] else "not shown"
        lines.append(f"| {name} | {n} | {mean:+.2f} | [{low:+.2f}, {high:+.2f}] | {pvalues[name]:.3f} | {verdict} |")
    return lines


def per_batch_transfer(runs, num_batches):
    """PA of every batch t > 0 and RI of every batch t < T-1, per method (mean ± std over seeds)."""
    local = {r["config"]["seed"]: r for r in runs.get("local", [])}
    header = [f"PA batch {t}" for t in range(1, num_batches)] + [f"RI batch {t}" for t in range(num_batches - 1)]
    lines = ["", "Transfer per batch (points):", "", "| method | " + " | ".join(header) + " |",
             "|---" * (len(header) + 1) + "|"]
    for name, seeds_results in runs.items():
        pa = [[100 * plasticity(r, local[r["config"]["seed"]])[t - 1] for r in seeds_results
               if r["config"]["seed"] in local] for t in range(1, num_batches)]
        ri = [[100 * r["metrics"]["ri_per_batch"][t] for r in seeds_results] for t in range(num_batches - 1)]
        lines.append(f"| {name} | " + " | ".join(cell(v, signed=True) for v in pa + ri) + " |")
    return lines


def neuron_table(runs):
    """Hypernetwork units per stage for the methods with masks: used by batch t, owned by batches <= t, and
    reuse (the share of batch t's units that earlier batches already owned), mean over seeds."""
    lines = []
    for name, seeds_results in runs.items():
        if not seeds_results[0].get("neurons"):
            continue
        stages = len(seeds_results[0]["neurons"])
        if not lines:
            lines = ["", "Hypernetwork units per stage (fraction of hidden units; mean over seeds): "
                         "used by batch t / owned by batches <= t / reuse by batch t:", "",
                     "| method | " + " | ".join(f"stage {t}" for t in range(stages)) + " |",
                     "|---" * (stages + 1) + "|"]
        row = []
        for t in range(stages):
            used, owned, reuse = (float(np.mean([r["neurons"][t][k] for r in seeds_results]))
                                  for k in ("used", "owned", "reuse"))
            row.append(f"{used:.2f} / {owned:.2f} / {reuse:.2f}")
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    return lines


def plot_batch_accuracy(runs, path):
    """One panel per batch: its mean accuracy (over clients, then seeds) after each stage, a line per method,
    and for each later batch its clients trained alone (PA's reference, from the runs' local_reference)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    num_batches = next(iter(runs.values()))[0]["config"]["batches"]
    fig, axes = plt.subplots(1, num_batches, figsize=(4 * num_batches + 1.5, 3.6), sharey=True, squeeze=False)
    markers = "osv^DPX*<>"
    for b, ax in enumerate(axes[0]):
        for k, (name, seeds_results) in enumerate(runs.items()):
            stages = list(range(b, num_batches))
            acc = [100 * np.mean([r["metrics"]["batch_acc"][t][b] for r in seeds_results]) for t in stages]
            shift = 0.04 * (k - (len(runs) - 1) / 2)        # methods that coincide stay visible side by side
            ax.plot([t + shift for t in stages], acc, marker=markers[k % len(markers)],
                    linestyle="--" if "-no-" in name else "-", label=name)
        alone = [np.mean([r["local_accuracy"][b][c] for c in r["batches"][b]])
                 for rs in runs.values() for r in rs
                 if b > 0 and len(r.get("local_accuracy") or []) > b and r["local_accuracy"][b] is not None]
        if alone:           # what PA measures against: the same clients trained alone in the same rounds
            ax.plot([b], [100 * np.mean(alone)], marker="*", markersize=12, color="gray", linestyle="none",
                    label="trained alone (PA's reference)" if b == 1 else None)
        ax.set_xlim(-0.5, num_batches - 0.5)
        ax.set_title(f"batch {b}")
        ax.set_xlabel("after stage t")
        ax.set_xticks(range(num_batches))
    axes[0][0].set_ylabel("test accuracy (%)")
    handles = {label: h for ax in axes[0] for h, label in zip(*ax.get_legend_handles_labels())}
    axes[0][-1].legend(handles.values(), handles.keys(), fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_accuracy_matrix(results, path, name=None):
    """A[t][i] of one run: a row per stage, a column per client (grouped by batch), blank before it joins."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = [c for ids in results["batches"] for c in ids]
    matrix = np.array([[np.nan if row[c] is None else 100 * row[c] for c in order] for row in results["accuracy"]])
    fig, ax = plt.subplots(figsize=(0.55 * len(order) + 2, 0.6 * len(matrix) + 1.6))
    image = ax.imshow(matrix, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    for t in range(matrix.shape[0]):
        for k in range(matrix.shape[1]):
            if not np.isnan(matrix[t, k]):
                ax.text(k, t, f"{matrix[t, k]:.0f}", ha="center", va="center", fontsize=7,
                        color="white" if matrix[t, k] < 60 else "black")
    edges = np.cumsum([len(ids) for ids in results["batches"]])[:-1]
    for e in edges:                                    # batch boundaries
        ax.axvline(e - 0.5, color="red", linewidth=1)
    ax.set_xticks(range(len(order)), [str(c) for c in order], fontsize=7)
    ax.set_yticks(range(len(matrix)))
    ax.set_xlabel("client (grouped by batch)")
    ax.set_ylabel("after stage t")
    ax.set_title(f"{name or results['config']['method']} accuracy matrix (%), seed {results['config']['seed']}",
                 fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_run_plots(results, out, name):
    """One run's plots next to its results.json: the accuracy matrix and each batch's accuracy per stage."""
    paths = [os.path.join(out, "accuracy_matrix.png"), os.path.join(out, "batch_accuracy.png")]
    plot_accuracy_matrix(results, paths[0], name)
    plot_batch_accuracy({name: [results]}, paths[1])
    return paths


def write_report(out, runs, command):
    """comparison.md, comparison.json (the per-seed numbers) and the plots; returns the markdown."""
    text = markdown(runs, command)
    with open(os.path.join(out, "comparison.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, "comparison.json"), "w") as f:
        json.dump(summarize(runs), f, indent=1)
    plot_batch_accuracy(runs, os.path.join(out, "batch_accuracy.png"))
    if "pfeddsh" in runs:
        plot_accuracy_matrix(runs["pfeddsh"][0], os.path.join(out, "pfeddsh_matrix.png"))
    return text

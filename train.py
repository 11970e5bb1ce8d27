"""Run pFedDSH (or a baseline) on progressively onboarded batches of clients: the paper's experiments.

    python train.py --dataset cifar10 --batches 2                     # paper-scale protocol, wants a GPU
    python train.py --dataset cifar10 --data-dir ../shared/data --batches 2 --preset cpu-demo
    python train.py ... --methods local,fedavg,pfedhn,pfeddsh --seeds 0,1,2 --out runs/compare

Wires data.py (clients and their splits), hypernet.py (ResNet-18 target + hypernetwork), masks.py
(sub-hypernetwork per batch), baselines.py and federated.py (server, clients, onboarding loop), then writes
<out>/results.json: the configuration, the batches, the accuracy matrix A[t][i] and the metrics.
With --methods / --seeds it runs every (method, seed) on the same splits into <out>/<method>-s<seed>/
and writes the comparison (compare.py: comparison.md and plots).
Bad input ends with one line on stderr and exit code 2. A checkpoint is written to <out>/checkpoint.pt
after every stage and every --checkpoint-every rounds; --resume continues from it. SIGINT / SIGTERM finish
the current round, write a checkpoint and exit with 130 / 143.
"""
import argparse
import json
import os
import signal
import sys

import torch

# Defaults are the paper-scale protocol (hours on one GPU); presets override whatever was not given.
DEFAULTS = dict(dataset="cifar10", data_dir="data", batches=2, clients_per_batch=10, classes_per_client=None,
                partition="pathological", alpha=0.5, rounds=300, clients_per_round=5, local_steps=50,
                batch_size=64, lr=0.05, width=64, method="pfeddsh", seed=0, device="auto", out=None,
                server_lr=3e-3, server_optimizer="adam", hidden=128, hyper_layers=3, chunk_size=4096,
                embed_dim=32, sparsity=0.75, s_max=400.0, val_fraction=0.1, no_replay=False, no_masks=False,
                batch_base=False,
                replay_images=64, replay_iterations=200, replay_steps=30, replay_lr=3e-3)
PRESETS = {
    # Same pipeline on a 2-core CPU in a few minutes: narrow ResNet-18, 5 clients per batch, short stages.
    "cpu-demo": dict(width=16, clients_per_batch=5, rounds=40, clients_per_round=5, local_steps=5,
                     replay_images=32, replay_iterations=100, replay_steps=30),
}
# local, fedavg, fedavg-ft and pfedhn-frozen live in baselines.py; pfedhn is federated.Server without masks.
METHODS = ["local", "fedavg", "fedavg-ft", "pfedhn", "pfedhn-frozen", "pfeddsh"]


class CliError(Exception):
    """A user mistake: printed as one line, exit code 2."""


class Interrupted(Exception):
    """SIGINT or SIGTERM: printed as one line, exit code 128 + signal number."""

    def __init__(self, message, code):
        super().__init__(message)
        self.code = code


class Parser(argparse.ArgumentParser):
    def error(self, message):             # argparse's default prints the whole usage block first
        raise CliError(message)


def build_parser():
    p = Parser(description=__doc__.split("\n")[0])
    a = p.add_argument
    a("--dataset", help="cifar10 | cifar100 | tinyimagenet")
    a("--data-dir", help="folder holding <dataset>/train_*.npz, test.npz (default: data)")
    a("--batches", type=int, help="number of client batches that join one after another (T)")
    a("--clients-per-batch", type=int)
    a("--classes-per-client", type=int, help="pathological split: classes per client (default 2/10/20)")
    a("--partition", choices=["pathological", "dirichlet"])
    a("--alpha", type=float, help="Dirichlet concentration")
    a("--rounds", type=int, help="server rounds per stage")
    a("--clients-per-round", type=int)
    a("--local-steps", type=int, help="client SGD steps per round (K)")
    a("--batch-size", type=int)
    a("--lr", type=float, help="client SGD learning rate")
    a("--width", type=int, help="ResNet-18 width multiplier (64 = standard)")
    a("--method", help=" | ".join(METHODS))
    a("--seed", type=int)
    a("--methods", help="comparison: comma-separated methods, plus the ablations pfeddsh-no-replay and "
                        "pfeddsh-no-masks; each runs into <out>/<method>-s<seed>, then <out>/comparison.md")
    a("--seeds", help="comparison: comma-separated seeds (default: --seed)")
    a("--device", choices=["auto", "cpu", "cuda"])
    a("--out", help="output folder (default runs/<method>-<dataset>-s<seed>)")
    a("--preset", choices=sorted(PRESETS))
    a("--overwrite", action="store_true", help="replace results (and a checkpoint) already in --out")
    a("--resume", action="store_true", help="continue the run whose checkpoint is in --out")
    a("--checkpoint-every", type=int, default=10, help="rounds between checkpoints (also after every stage)")
    # Testing only: send SIGINT to ourselves after this many rounds in all, so a kill is deterministic.
    a("--stop-after-rounds", type=int, help=argparse.SUPPRESS)
    g = p.add_argument_group("hypernetwork and masks")
    g.add_argument("--server-lr", type=float)
    g.add_argument("--server-optimizer", choices=["adam", "sgd"])
    g.add_argument("--hidden", type=int, help="hypernetwork trunk width")
    g.add_argument("--hyper-layers", type=int, help="hypernetwork trunk depth")
    g.add_argument("--chunk-size", type=int)
    g.add_argument("--embed-dim", type=int)
    g.add_argument("--sparsity", type=float, help="HAT sparsity penalty c")
    g.add_argument("--s-max", type=float, help="HAT gate annealing s_max")
    g.add_argument("--val-fraction", type=float)
    g.add_argument("--batch-base", action="store_true", default=None,
                   help="pfeddsh: a full-size weight offset per batch (our extension, not in the paper)")
    r = p.add_argument_group("data-free replay (pfeddsh)")
    r.add_argument("--no-replay", action="store_true", default=None, help="ablation: masks only (RI is then exactly 0)")
    r.add_argument("--no-masks", action="store_true", default=None, help="ablation: no masks (pfedhn + replay)")
    r.add_argument("--replay-images", type=int, help="synthetic images per new client")
    r.add_argument("--replay-iterations", type=int, help="DeepInversion iterations")
    r.add_argument("--replay-steps", type=int, help="fine-tuning steps per earlier client")
    r.add_argument("--replay-lr", type=float)
    return p


def resolve_config(argv):
    args = build_parser().parse_args(argv)
    preset = PRESETS.get(args.preset, {})
    config = {}
    for key, default in DEFAULTS.items():
        given = getattr(args, key)
        config[key] = given if given is not None else preset.get(key, default)
    config["preset"], config["overwrite"], config["resume"] = args.preset, args.overwrite, args.resume
    config["checkpoint_every"], config["stop_after_rounds"] = args.checkpoint_every, args.stop_after_rounds
    validate(config)
    comparison = None
    if args.methods is not None or args.seeds is not None:
        comparison = parse_comparison(args, config)
    return config, comparison


def parse_comparison(args, config):
    """--methods / --seeds -> (variant names, seeds); `local` is added since PA is measured against it."""
    import compare
    for given, flag in [(args.method, "--method"), (args.no_replay, "--no-replay"), (args.no_masks, "--no-masks"),
                        (args.batch_base, "--batch-base"),
                        (args.resume or None, "--resume"), (args.stop_after_rounds, "--stop-after-rounds")]:
        if given is not None:
            raise CliError(f"{flag} does not go with --methods / --seeds (a comparison resumes its runs by itself)")
    names = (args.methods or config["method"]).split(",")
    unknown = [n for n in names if n not in compare.VARIANTS]
    if unknown:
        raise CliError(f"unknown method '{unknown[0]}' in --methods: choose from {', '.join(compare.VARIANTS)}")
    if len(set(names)) != len(names):
        raise CliError(f"--methods lists a method twice: {args.methods}")
    try:
        seeds = [int(s) for s in (args.seeds or str(config["seed"])).split(",")]
    except ValueError:
        raise CliError(f"--seeds must be comma-separated integers, got '{args.seeds}'") from None
    if len(set(seeds)) != len(seeds):
        raise CliError(f"--seeds lists a seed twice: {args.seeds}")
    if "local" not in names:
        names.insert(0, "local")
    return names, seeds


def validate(c):
    import data
    if c["dataset"] not in data.DATASETS:
        raise CliError(f"unknown dataset '{c['dataset']}': choose from {', '.join(data.DATASETS)}")
    if c["method"] not in METHODS:
        raise CliError(f"unknown method '{c['method']}': choose from {', '.join(METHODS)}")
    for flag in ["no_replay", "no_masks", "batch_base"]:
        if c[flag] and c["method"] != "pfeddsh":
            raise CliError(f"--{flag.replace('_', '-')} is an option of pfeddsh, not of {c['method']}")
    if c["batch_base"] and c["no_masks"]:
        raise CliError("--batch-base needs the masks: without them every batch writes the shared base")
    for key in ["batches", "clients_per_batch", "rounds", "clients_per_round", "local_steps", "batch_size",
                "width", "hidden", "hyper_layers", "chunk_size", "embed_dim", "replay_images",
                "replay_iterations", "replay_steps", "checkpoint_every"]:
        if c[key] < 1:
            raise CliError(f"--{key.replace('_', '-')} must be a positive integer, got {c[key]}")
    for key in ["lr", "server_lr", "alpha", "s_max", "replay_lr"]:
        if not c[key] > 0:
            raise CliError(f"--{key.replace('_', '-')} must be positive, got {c[key]}")
    if c["sparsity"] < 0:
        raise CliError(f"--sparsity must be >= 0, got {c['sparsity']}")
    if c["classes_per_client"] is not None and c["classes_per_client"] < 1:
        raise CliError(f"--classes-per-client must be a positive integer, got {c['classes_per_client']}")
    if c["classes_per_client"] is not None and c["classes_per_client"] > data.DATASETS[c["dataset"]]:
        raise CliError(f"--classes-per-client {c['classes_per_client']} is more than {c['dataset']} has "
                       f"({data.DATASETS[c['dataset']]} classes)")
    if not 0 <= c["val_fraction"] < 1:
        raise CliError(f"--val-fraction must be in [0, 1), got {c['val_fraction']}")
    if c["device"] == "cuda" and not torch.cuda.is_available():
        raise CliError("--device cuda was asked for but CUDA is not available here; use --device cpu or auto")


def build(config, device):
    """Data, clients, target model and server (or a baseline standing in for it), all from one config."""
    import baselines
    import data
    import federated as fl
    import hypernet as hn
    import masks

    torch.manual_seed(config["seed"])
    dataset = data.load_dataset(config["dataset"], config["data_dir"], device=device)
    num_clients = config["batches"] * config["clients_per_batch"]
    classes_per_client = config["classes_per_client"] or data.DEFAULT_CLASSES_PER_CLIENT[config["dataset"]]
    splits = data.partition(dataset.y_train, dataset.y_test, num_clients, dataset.num_classes,
                            scheme=config["partition"], classes_per_client=classes_per_client,
                            alpha=config["alpha"], val_fraction=config["val_fraction"], seed=config["seed"])
    batches = data.assign_batches(num_clients, config["batches"], config["seed"])
    model = hn.ResNet18(dataset.num_classes, config["width"]).to(device)
    method = config["method"]
    if method in ("local", "fedavg", "fedavg-ft"):
        layout = hn.WeightLayout(model)
        if method == "local":
            server = baselines.Local(model, layout, batches)
        else:
            server = baselines.FedAvg(model, layout, batches, batch_size=config["batch_size"], lr=config["lr"],
                                      finetune_steps=config["local_steps"] if method == "fedavg-ft" else 0,
                                      seed=config["seed"])
    else:
        gates = None
        if method == "pfeddsh" and not config["no_masks"]:
            gates = masks.BatchGates(config["batches"], config["hyper_layers"], config["hidden"], num_clients,
                                     s_max=config["s_max"])
        hypernet = hn.HyperNetwork(model, num_clients, embed_dim=config["embed_dim"], hidden=config["hidden"],
                                   num_layers=config["hyper_layers"], chunk_size=config["chunk_size"],
                                   gates=gates, batch_base=config["batch_base"]).to(device)
        layout = hypernet.layout
        server_class = baselines.FrozenPFedHN if method == "pfedhn-frozen" else fl.Server
        server = server_class(hypernet, model, batches, optimizer=config["server_optimizer"],
                              server_lr=config["server_lr"], sparsity=config["sparsity"],
                              image_size=dataset.image_size)
    clients = [fl.Client(cid, dataset, splits[cid], model, layout.unflatten, layout.flatten, config["seed"])
               for cid in range(num_clients)]
    return dataset, clients, server, batches, model


def print_table(accuracy_by_batch, ri_per_batch, neurons):
    header = "stage | " + " | ".join(f"batch {b}" for b in range(len(accuracy_by_batch[0])))
    print(header)
    for t, row in enumerate(accuracy_by_batch):
        cells = " | ".join("   -   " if a is None else f"{a:7.4f}" for a in row)
        extra = ""
        if neurons[t] is not None:
            extra = f"   neurons used {neurons[t]['used']:.2f} owned {neurons[t]['owned']:.2f} reuse {neurons[t]['reuse']:.2f}"
        print(f"{t:5d} | {cells}{extra}")
    print("RI per batch: " + ", ".join(f"{r:+.4f}" for r in ri_per_batch))


def plot_neurons(neurons, path):
    """Capacity over the batches: units each batch uses, units owned so far, and reuse (seed experiment 3)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = range(len(neurons))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(stages, [n["used"] for n in neurons], "o-", label="used by batch t")
    ax.plot(stages, [n["owned"] for n in neurons], "s-", label="owned by batches <= t")
    ax.plot(stages, [n["reuse"] for n in neurons], "^--", label="reuse: used & owned before")
    ax.set_xlabel("batch t")
    ax.set_ylabel("fraction of hypernetwork hidden units")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report_replay(report, t, dataset, out, write=print):
    """Write stage t's synthetic images to a png and drop them from the report (results.json holds numbers)."""
    import deepinversion

    deepinversion.save_grid(report.pop("images")[:128], dataset.mean, dataset.std,
                            os.path.join(out, f"synthetic_batch{t}.png"))
    report.pop("labels")
    write(f"replay after stage {t}: {report['replay_s']:.1f} s (synthesis {report['synthesis_s']:.1f} s), "
          f"BN loss {sum(report['bn_loss_start']) / len(report['bn_loss_start']):.2f} -> "
          f"{sum(report['bn_loss_end']) / len(report['bn_loss_end']):.2f}, updates accepted "
          f"{report['accepted']}, rejected {report['rejected']}, skipped {report['skipped']}"
          + (" -- DIVERGED (non-finite), undone" if report["dropped"] else ""))


def run_name(config):
    return (config["method"] + "-no-replay" * bool(config["no_replay"]) + "-no-masks" * bool(config["no_masks"])
            + "-batch-base" * bool(config["batch_base"]))


def main(argv=None):
    """Parse, build, (resume,) train, write results.json. Signals are handled only while this runs."""
    caught = []

    def on_signal(signum, frame):
        if caught:       # a second signal: the user does not want to wait for the round to end
            raise Interrupted("interrupted again: stopped without waiting for the round; the last checkpoint "
                              "is kept", 128 + signum)
        caught.append(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        config, comparison = resolve_config(sys.argv[1:] if argv is None else argv)
        if comparison is not None:
            return run_comparison(config, *comparison, caught, argv)
        return run(config, caught)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def run_comparison(config, names, seeds, caught, argv):
    """Every (method, seed) into <out>/<method>-s<seed>, then the report (compare.py)."""
    import checkpoint
    import compare

    out = config["out"] or os.path.join("runs", f"compare-{config['dataset']}")
    runs = {}
    for name in names:
        for seed in seeds:
            run_config = dict(config, **compare.variant_config(name), seed=seed,
                              out=os.path.join(out, f"{name}-s{seed}"))
            results_path = os.path.join(run_config["out"], "results.json")
            if os.path.exists(results_path) and not config["overwrite"]:
                with open(results_path) as f:
                    results = json.load(f)
                # A setting missing from an older results.json did not exist then: it had its default.
                differing = checkpoint.differing_settings(run_config, dict(DEFAULTS, **results["config"]))
                if differing:
                    raise CliError(f"{results_path} was made with other settings ({', '.join(differing)}): "
                                   f"use another --out, or --overwrite to rerun every method")
                print(f"== {name}, seed {seed}: finished earlier, reusing {results_path}")
            else:
                run_config["resume"] = (not config["overwrite"]
                                        and os.path.exists(os.path.join(run_config["out"], checkpoint.FILENAME)))
                print(f"== {name}, seed {seed}" + (": resuming" if run_config["resume"] else ""))
                results = run(run_config, caught, how_to_continue="rerun the same command to continue "
                                                                  "(finished runs are reused, this one resumes)")
            runs.setdefault(name, []).append(results)
    command = "python train.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(compare.write_report(out, runs, command))
    print(f"wrote {os.path.join(out, 'comparison.md')} and its plots")
    return runs


def run(config, caught, how_to_continue="rerun with --resume to continue"):
    import checkpoint
    import data
    import federated as fl
    import hypernet as hn
    from tqdm import tqdm

    config = dict(config)
    device = torch.device("cuda" if config["device"] == "auto" and torch.cuda.is_available()
                          else ("cpu" if config["device"] == "auto" else config["device"]))
    out = config["out"] or os.path.join("runs", f"{run_name(config)}-{config['dataset']}-s{config['seed']}")
    config["out"] = out
    results_path = os.path.join(out, "results.json")
    checkpoint_path = os.path.join(out, checkpoint.FILENAME)
    if not config["resume"] and not config["overwrite"]:
        for path in (results_path, checkpoint_path):
            if os.path.exists(path):
                raise CliError(f"{path} already exists: pick another --out, pass --resume to continue that run "
                               f"or --overwrite to replace it")
    state = None
    if config["resume"]:
        if not os.path.exists(checkpoint_path):
            raise CliError(f"--resume: no checkpoint in {out} ({checkpoint.FILENAME} not found)")
        try:
            state = checkpoint.load(checkpoint_path, config, device)
        except checkpoint.CheckpointError as e:
            raise CliError(str(e)) from None
    try:
        dataset, clients, server, batches, model = build(config, device)
    except data.DataError as e:
        raise CliError(str(e)) from None
    onboarding, rng = fl.OnboardingState(), None
    if state is not None:
        try:
            onboarding, rng = checkpoint.restore(state, server, clients, fl.OnboardingState)
        except Exception as e:          # passed the config check yet does not fit: corrupt inside
            raise CliError(f"checkpoint {checkpoint_path} does not fit this run ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}); delete it to start over") from None
        del state
    os.makedirs(out, exist_ok=True)

    hypernet = getattr(server, "hypernet", None)
    print(f"{run_name(config)} on {config['dataset']} | device {device} | {len(clients)} clients in "
          f"{len(batches)} batches | ResNet-18 width {config['width']}: "
          f"{hn.count_parameters(model) / 1e6:.2f} M weights"
          + (f", hypernetwork {hn.count_parameters(hypernet) / 1e6:.2f} M parameters" if hypernet else "")
          + (f" | resumed at stage {onboarding.stage} round {onboarding.round}" if config["resume"] else ""))
    rounds = config["rounds"]
    bar = tqdm(total=config["batches"] * rounds, initial=onboarding.stage * rounds + onboarding.round,
               desc="rounds", dynamic_ncols=True)
    replay = None
    if config["method"] == "pfeddsh" and not config["no_replay"]:     # with --no-masks: pfedhn + replay
        replay = dict(num_images=config["replay_images"], iterations=config["replay_iterations"],
                      steps=config["replay_steps"], lr=config["replay_lr"])

    def after_round(onboarding, rng, stage_done):
        """Between rounds: png of a finished replay, checkpoint when due, and stop here after a signal."""
        if stage_done and onboarding.replays and "images" in onboarding.replays[-1]:
            report_replay(onboarding.replays[-1], onboarding.stage - 1, dataset, out, write=tqdm.write)
        done = onboarding.stage * rounds + onboarding.round
        if not stage_done and done == config["stop_after_rounds"]:
            os.kill(os.getpid(), signal.SIGINT)         # handled by on_signal right here, like a real Ctrl-C
        if stage_done or caught or done % config["checkpoint_every"] == 0:
            checkpoint.save(checkpoint_path, checkpoint.capture(config, device, server, clients, rng, onboarding))
        if caught:
            bar.close()
            where = (f"after stage {onboarding.stage - 1}" if onboarding.round == 0
                     else f"at stage {onboarding.stage} round {onboarding.round} of {rounds}")
            raise Interrupted(f"interrupted ({signal.Signals(caught[0]).name}): checkpoint saved {where}; "
                              f"{how_to_continue}", 128 + caught[0])

    replay_bar = None

    def on_replay(phase, done, total):
        """Replay's progress on a second bar under the rounds (synthesis iterations, then earlier clients)."""
        nonlocal replay_bar
        if replay_bar is None:
            replay_bar = tqdm(total=total, desc=f"replay {phase}", position=1, leave=False, dynamic_ncols=True)
        elif replay_bar.desc != f"replay {phase}":
            replay_bar.reset(total=total)
            replay_bar.set_description(f"replay {phase}")
        replay_bar.n = done
        replay_bar.refresh()
        if phase == "fine-tune" and done == total:
            replay_bar.close()
            replay_bar = None

    accuracy, neurons, stage_seconds, replays = fl.onboard(
        server, clients, batches, rounds=rounds, clients_per_round=config["clients_per_round"],
        local_steps=config["local_steps"], batch_size=config["batch_size"], lr=config["lr"],
        seed=config["seed"], progress_bar=bar, replay=replay, onboarding=onboarding, rng=rng,
        after_round=after_round, replay_progress=on_replay)
    bar.close()

    test_sizes = [len(c.y_test) for c in clients]
    m = fl.metrics(accuracy, batches, test_sizes)
    print_table(m["batch_acc"], m["ri_per_batch"], neurons)
    print(f"mean accuracy {m['mean_acc']:.4f} (weighted {m['weighted_acc']:.4f}), RI {m['ri']:+.4f}")
    if any(server.faults.values()):
        print("numerical faults survived: " + ", ".join(f"{k} {v}" for k, v in server.faults.items()))
    if neurons[-1] is not None:
        plot_neurons(neurons, os.path.join(out, "neurons.png"))
        if neurons[-1]["owned"] == 1.0:
            print("note: every hypernetwork unit is owned: later batches can only reuse (read) owned units "
                  "and learn their embeddings and gates")
    results = {"config": config, "batches": batches, "accuracy": accuracy, "metrics": m,
               "neurons": neurons if neurons[-1] is not None else None,
               "test_sizes": test_sizes, "time_s": stage_seconds, "device": str(device),
               "replay_s": [r["replay_s"] for r in replays], "replay": replays, "faults": dict(server.faults)}
    tmp = results_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1)
    os.replace(tmp, results_path)       # never leave a half-written results.json behind
    print(f"wrote {results_path}")
    return results


if __name__ == "__main__":
    try:
        main()
    except CliError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Interrupted as e:
        print(e, file=sys.stderr)
        sys.exit(e.code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)

"""Run pFedDSH (or a baseline) on progressively onboarded batches of clients: the paper's experiments.

    python train.py --dataset cifar10 --batches 2            # paper protocol with CUDA, cpu-demo without
    python train.py --dataset cifar10 --batches 2 --data-dir ../shared/data --preset cpu-demo --rounds 20
    python train.py ... --methods local,fedavg,pfedhn,pfeddsh --seeds 0,1,2 --out runs/compare

Wires data.py (clients and their splits), hypernet.py (ResNet-18 target + hypernetwork), masks.py
(sub-hypernetwork per batch), baselines.py and federated.py (server, clients, onboarding loop), then writes
<out>/results.json (the configuration, the batches, the accuracy matrix A[t][i] and the metrics) with
accuracy_matrix.png and batch_accuracy.png beside it.
With --methods / --seeds it runs every (method, seed) on the same splits into <out>/<method>-s<seed>/
and writes the comparison (compare.py: comparison.md and plots).
Bad input (a run too large for the device's memory included) ends with one line on stderr and exit
code 2 (docs/robustness.md). A checkpoint is written to <out>/checkpoint.pt after every stage and every
--checkpoint-every rounds; --resume continues from it. SIGINT / SIGTERM finish the current round, write a
checkpoint and exit with 130 / 143.
"""
import sys

if sys.version_info < (3, 10):          # before anything else: the modules use zip(strict=True) and `X | None`
    print(f"error: pFedDSH needs Python >= 3.10, this is Python {sys.version.split()[0]}", file=sys.stderr)
    sys.exit(2)

import argparse  # noqa: E402 (after the version check, on purpose)
import importlib.util
import json
import math
import os
import signal
import textwrap
import threading
import time

import torch

# Every flag's default, and the one place defaults live (--help renders them): the paper-scale protocol,
# hours on one GPU. A preset overrides what it names, except what is given on the command line.
DEFAULTS = dict(dataset="cifar10", data_dir="data", batches=2, clients_per_batch=10, classes_per_client=None,
                partition="pathological", alpha=0.5, rounds=300, clients_per_round=5, local_steps=50,
                batch_size=64, lr=0.05, width=64, method="pfeddsh", seed=0, device="auto", out=None,
                server_lr=3e-3, server_optimizer="adam", hidden=128, hyper_layers=3, chunk_size=4096,
                embed_dim=32, sparsity=0.01, s_max=400.0, gate_lr=0.05, gate_start=0.0, val_fraction=0.1,
                no_replay=False, no_masks=False, adapter_budget=0.05, adapter_lr=1e-2,
                replay_images=64, replay_iterations=200, replay_steps=30, replay_lr=3e-3, replay_kd=1.0,
                replay_anchor=1.0, replay_temperature=2.0, replay_validate_every=3, replay_confirm_z=1.645,
                replay_bn_weight=10.0,
                bn_noise=0.0, privacy_audit=False, checkpoint_every=10, engine="local", node_timeout=600.0,
                amp=False)
PRESETS = {
    # The paper-scale protocol: DEFAULTS as they are. Wants a GPU.
    "paper": {},
    # The same pipeline on a 2-core CPU in a few minutes: narrow ResNet-18, 5 clients per batch, short stages.
    "cpu-demo": dict(width=16, clients_per_batch=5, rounds=40, clients_per_round=5, local_steps=5,
                     replay_images=32, replay_iterations=100, replay_steps=30),
}
PRESET_NOTES = {"paper": "the paper-scale protocol, hours on one GPU", "cpu-demo": "a few minutes on a 2-core CPU"}
# local, fedavg, fedavg-ft and pfedhn-frozen live in baselines.py; pfedhn is federated.Server without masks.
METHODS = ["local", "fedavg", "fedavg-ft", "pfedhn", "pfedhn-frozen", "pfeddsh"]
# Sizes of the datasets data.py reads (train, test images): to refuse early what cannot fit.
DATASET_IMAGES = {"cifar10": (50_000, 10_000), "cifar100": (50_000, 10_000), "tinyimagenet": (100_000, 10_000)}
SEED_LIMIT = 2 ** 32      # seeds are mixed into torch generator seeds (seed * 1_000_003 + ...): keep them < 2^64


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


def show(value):
    return "off" if value is False else str(value)


def presets_help():
    """The epilog of --help: what each preset sets."""
    lines = ["presets (--preset; the default, auto, picks paper when the run uses CUDA and cpu-demo otherwise;",
             "a flag given on the command line always wins over the preset):"]
    for name, values in PRESETS.items():
        sets = " ".join(f"--{k.replace('_', '-')} {show(v)}" for k, v in values.items()) or "every default as listed"
        lines += textwrap.wrap(f"{name}: {PRESET_NOTES[name]}: {sets}", width=100, initial_indent="  ",
                               subsequent_indent="      ", break_on_hyphens=False)
    return "\n".join(lines)


def build_parser():
    p = Parser(description=__doc__.split("\n")[0], epilog=presets_help(),
               formatter_class=argparse.RawDescriptionHelpFormatter)

    def flag(group, name, help="", **kwargs):
        """An option whose help ends with its default (and the cpu-demo value where that preset differs)."""
        key = name[2:].replace("-", "_")
        if key in DEFAULTS and DEFAULTS[key] is not None:
            default = f"default {show(DEFAULTS[key])}"
            if PRESETS["cpu-demo"].get(key, DEFAULTS[key]) != DEFAULTS[key]:
                default += f"; cpu-demo {show(PRESETS['cpu-demo'][key])}"
            help = f"{help} ({default})" if help else f"({default})"
        group.add_argument(name, help=help, **kwargs)

    a = lambda *args, **kwargs: flag(p, *args, **kwargs)    # noqa: E731
    a("--dataset", help="cifar10 | cifar100 | tinyimagenet")
    a("--data-dir", help="folder holding <dataset>/train_*.npz, test.npz; CIFAR is downloaded there when missing")
    a("--batches", type=int, help="number of client batches that join one after another (T)")
    a("--clients-per-batch", type=int)
    a("--classes-per-client", type=int,
      help="pathological split: classes per client (default 2 for cifar10, 10 for cifar100, 20 for tinyimagenet)")
    a("--partition", choices=["pathological", "dirichlet"])
    a("--alpha", type=float, help="Dirichlet concentration")
    a("--rounds", type=int, help="server rounds per stage")
    a("--clients-per-round", type=int, help="capped at --clients-per-batch")
    a("--local-steps", type=int, help="client SGD steps per round (K)")
    a("--batch-size", type=int)
    a("--lr", type=float, help="client SGD learning rate")
    a("--width", type=int, help="ResNet-18 width multiplier (64 = standard)")
    a("--method", help=" | ".join(METHODS))
    a("--seed", type=int, help=f"0 .. {SEED_LIMIT - 1}")
    a("--methods", help="comparison: comma-separated methods, plus the ablations pfeddsh-no-replay and "
                        "pfeddsh-no-masks; each runs into <out>/<method>-s<seed>, then <out>/comparison.md "
                        "(default: none, a single run)")
    a("--seeds", help="comparison: comma-separated seeds (default: --seed)")
    a("--device", choices=["auto", "cpu", "cuda"], help="auto: cuda when available")
    a("--out", help="output folder (default runs/<method>-<dataset>-s<seed>)")
    a("--preset", choices=["auto"] + list(PRESETS),
      help="protocol: auto (default) is paper with CUDA, cpu-demo without; what each sets is listed below")
    a("--overwrite", action="store_true", help="replace results (and a checkpoint) already in --out (default off)")
    a("--resume", action="store_true", help="continue the run whose checkpoint is in --out (default off)")
    a("--checkpoint-every", type=int, help="rounds between checkpoints (also after every stage)")
    a("--engine", choices=["local", "flower"],
      help="local: every client in this process; flower: every client a Flower ClientApp, here in Flower's "
           "simulation engine (pip install -r requirements-flower.txt; README)")
    a("--node-timeout", type=float, help="flower: seconds a node has to answer a message, and a batch's nodes "
                                         "to register; a node that does not counts as a dropped update")
    a("--amp", action="store_true", default=None,
      help="bf16 autocast for local training, evaluation and replay's synthesis; meant for CUDA (on a CPU it "
           "runs, usually slower than fp32)")
    # Testing only: send SIGINT to ourselves after this many rounds in all, so a kill is deterministic.
    p.add_argument("--stop-after-rounds", type=int, help=argparse.SUPPRESS)
    g = p.add_argument_group("hypernetwork and masks")
    flag(g, "--server-lr", type=float)
    flag(g, "--server-optimizer", choices=["adam", "sgd"])
    flag(g, "--hidden", type=int, help="hypernetwork trunk width")
    flag(g, "--hyper-layers", type=int, help="hypernetwork trunk depth")
    flag(g, "--chunk-size", type=int, help="weights the head emits per call")
    flag(g, "--embed-dim", type=int, help="client embedding size")
    flag(g, "--sparsity", type=float, help="HAT sparsity penalty c")
    flag(g, "--s-max", type=float, help="HAT gate annealing s_max")
    flag(g, "--val-fraction", type=float, help="share of each client's training data held out for validation")
    flag(g, "--gate-lr", type=float, help="SGD rate of the gate embeddings (HAT's optimiser)")
    flag(g, "--gate-start", type=float,
         help="where a new batch's gate embedding starts on units nobody owns (0 = undecided)")
    flag(g, "--adapter-budget", type=float,
         help="pfeddsh: per-batch adapters + the batch's client offsets, at most this fraction of the model "
              "(our extension, not in the paper); 0 = the paper's shape")
    flag(g, "--adapter-lr", type=float, help="server Adam rate of the adapters and client offsets")
    r = p.add_argument_group("data-free replay (pfeddsh)")
    flag(r, "--no-replay", action="store_true", default=None, help="ablation: masks only (RI is then exactly 0)")
    flag(r, "--no-masks", action="store_true", default=None, help="ablation: no masks (pfedhn + replay)")
    flag(r, "--replay-images", type=int, help="synthetic images per new client")
    flag(r, "--replay-iterations", type=int, help="DeepInversion iterations")
    flag(r, "--replay-bn-weight", type=float,
         help="DeepInversion's weight of the BN-statistics loss against the dreamed labels' cross-entropy")
    flag(r, "--replay-steps", type=int, help="fine-tuning steps per earlier client")
    flag(r, "--replay-lr", type=float, help="Adam rate of what replay trains (an earlier client's own rows)")
    flag(r, "--replay-kd", type=float, help="weight of KD toward the dreaming client's model")
    flag(r, "--replay-anchor", type=float, help="weight of KD toward the earlier client's own model")
    flag(r, "--replay-temperature", type=float, help="KD temperature")
    flag(r, "--replay-validate-every", type=int, help="fine-tuning steps between the client's scores")
    flag(r, "--replay-confirm-z", type=float,
         help="z of the paired test on the client's confirmation images that accepts an update")
    v = p.add_argument_group("privacy of replay (privacy.py, docs/privacy.md)")
    flag(v, "--bn-noise", type=float, metavar="SIGMA",
         help="Gaussian noise sigma on the BN statistics (and sigma x n on the label counts) each client "
              "uploads for replay, once; 0 = the upload as it is")
    flag(v, "--privacy-audit", action="store_true", default=None,
         help="after each replay, audit what the dreamed images and the uploaded statistics give away "
              "(reconstruction, membership AUC; reads the new clients' images, changes nothing; "
              "privacy_batch{t}.png)")
    return p


def auto_preset(device):
    """`--preset auto`: the paper protocol when the run will use CUDA, the CPU protocol otherwise."""
    return "paper" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu-demo"


def resolve_config(argv):
    """Command line -> config: a flag given wins, then the preset (auto: by device), then DEFAULTS."""
    args = build_parser().parse_args(argv)
    chosen = args.preset in (None, "auto")
    preset_name = auto_preset(args.device or DEFAULTS["device"]) if chosen else args.preset
    preset = PRESETS[preset_name]
    config = {}
    for key, default in DEFAULTS.items():
        given = getattr(args, key)
        config[key] = given if given is not None else preset.get(key, default)
    config["preset"], config["preset_auto"] = preset_name, chosen
    config["overwrite"], config["resume"] = args.overwrite, args.resume
    config["stop_after_rounds"] = args.stop_after_rounds
    validate(config)
    comparison = None
    if args.methods is not None or args.seeds is not None:
        comparison = parse_comparison(args, config)
    return config, comparison


def describe_protocol(config):
    """One line: which protocol runs, why, and how to get the other."""
    name = config["preset"]
    other = "cpu-demo" if name == "paper" else "paper"
    if config["preset_auto"]:
        why = "CUDA found" if name == "paper" else ("--device cpu" if config["device"] == "cpu" else "no CUDA")
        why = f"chosen by --preset auto: {why}"
    else:
        why = f"--preset {name}"
    return (f"protocol {name} ({why}): ResNet-18 width {config['width']}, {config['clients_per_batch']} clients "
            f"per batch, {config['rounds']} rounds x "
            f"{min(config['clients_per_round'], config['clients_per_batch'])} clients x "
            f"{config['local_steps']} local steps per stage; --preset {other} for {PRESET_NOTES[other]}")


def parse_comparison(args, config):
    """--methods / --seeds -> (variant names, seeds); `local` is added since PA is measured against it."""
    import compare
    for given, flag in [(args.method, "--method"), (args.no_replay, "--no-replay"), (args.no_masks, "--no-masks"),
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
    for seed in seeds:
        check_seed(seed, "--seeds")
    if len(set(seeds)) != len(seeds):
        raise CliError(f"--seeds lists a seed twice: {args.seeds}")
    if "local" not in names:
        names.insert(0, "local")
    if config["engine"] == "flower":
        for name in names:
            check_flower(compare.variant_config(name)["method"])
    return names, seeds


def validate(c):
    import data
    if c["dataset"] not in data.DATASETS:
        raise CliError(f"unknown dataset '{c['dataset']}': choose from {', '.join(data.DATASETS)}")
    if c["method"] not in METHODS:
        raise CliError(f"unknown method '{c['method']}': choose from {', '.join(METHODS)}")
    for flag in ["no_replay", "no_masks"]:
        if c[flag] and c["method"] != "pfeddsh":
            raise CliError(f"--{flag.replace('_', '-')} is an option of pfeddsh, not of {c['method']}")
    if not math.isfinite(c["gate_start"]):
        raise CliError(f"--gate-start must be a finite number, got {c['gate_start']}")
    if not 0 <= c["adapter_budget"] < 1:
        raise CliError(f"--adapter-budget must be in [0, 1), got {c['adapter_budget']}")
    for key in ["batches", "clients_per_batch", "rounds", "clients_per_round", "local_steps", "batch_size",
                "width", "hidden", "hyper_layers", "chunk_size", "embed_dim", "replay_images",
                "replay_iterations", "replay_steps", "replay_validate_every", "checkpoint_every"]:
        if c[key] < 1:
            raise CliError(f"--{key.replace('_', '-')} must be a positive integer, got {c[key]}")
    for key in ["lr", "server_lr", "adapter_lr", "alpha", "s_max", "gate_lr", "replay_lr", "replay_temperature",
                "node_timeout"]:
        if not 0 < c[key] < math.inf:
            raise CliError(f"--{key.replace('_', '-')} must be positive and finite, got {c[key]}")
    for key in ["sparsity", "replay_kd", "replay_anchor", "replay_confirm_z", "replay_bn_weight", "bn_noise"]:
        if not 0 <= c[key] < math.inf:
            raise CliError(f"--{key.replace('_', '-')} must be >= 0 and finite, got {c[key]}")
    replays = c["method"] == "pfeddsh" and not c["no_replay"]
    for flag, given in [("--privacy-audit", c["privacy_audit"]), ("--bn-noise", c["bn_noise"] > 0)]:
        if given and not replays:
            raise CliError(f"{flag} is about replay: it needs --method pfeddsh without --no-replay")
    if c["s_max"] < 1:
        raise CliError(f"--s-max must be >= 1 (the gates anneal from s = 1/s_max up to s_max), got {c['s_max']}")
    check_seed(c["seed"], "--seed")
    clients, test_images = c["batches"] * c["clients_per_batch"], DATASET_IMAGES[c["dataset"]][1]
    if clients > test_images:
        raise CliError(f"{clients} clients (--batches x --clients-per-batch) is more than the data supports: "
                       f"{c['dataset']} has {test_images} test images and every client needs some")
    if c["classes_per_client"] is not None and c["classes_per_client"] < 1:
        raise CliError(f"--classes-per-client must be a positive integer, got {c['classes_per_client']}")
    if c["classes_per_client"] is not None and c["classes_per_client"] > data.DATASETS[c["dataset"]]:
        raise CliError(f"--classes-per-client {c['classes_per_client']} is more than {c['dataset']} has "
                       f"({data.DATASETS[c['dataset']]} classes)")
    if not 0 <= c["val_fraction"] < 1:
        raise CliError(f"--val-fraction must be in [0, 1), got {c['val_fraction']}")
    if c["device"] == "cuda" and not torch.cuda.is_available():
        raise CliError("--device cuda was asked for but CUDA is not available here; use --device cpu or auto")
    if c["engine"] == "flower":
        check_flower(c["method"], c["resume"])
        if c["privacy_audit"]:
            raise CliError("--privacy-audit reads the clients' training images, which stay on their Flower nodes; "
                           "run the audit with --engine local")


def check_flower(method, resume=False):
    """--engine flower: Flower installed, a method whose clients only answer messages, no resume."""
    if importlib.util.find_spec("flwr") is None:
        raise CliError("--engine flower needs Flower, which is not installed: pip install -r requirements-flower.txt")
    if method == "fedavg-ft":
        raise CliError("--engine flower cannot run fedavg-ft: its evaluation fine-tunes each client with a "
                       "generator the server makes, which a message cannot carry; use --engine local")
    if resume:
        raise CliError("--engine flower keeps no checkpoint (the clients' generators live on their nodes), "
                       "so there is nothing to --resume")


def check_seed(seed, flag):
    if not 0 <= seed < SEED_LIMIT:
        raise CliError(f"{flag} must be an integer in 0 .. {SEED_LIMIT - 1}, got {seed}")


def check_out(out):
    """--out must be (or become) a folder we can write: refuse a file, or a parent that is not writable."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise CliError(f"--out {out} is a file, not a folder: pick another --out")
    parent = os.path.abspath(out)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise CliError(f"--out {out}: {parent} is a file, not a folder: pick another --out")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CliError(f"--out {out}: cannot write in {parent}: pick another --out")


def memory_estimate(config):
    """A lower estimate of the bytes a run holds at once, from the config alone, before anything is allocated.

    Returns {part: bytes}. Counted in float32: the target model's weights (with its gradient and SGD
    momentum while a client trains) and a training batch's activations; the hypernetwork's parameters with
    their gradients and Adam moments, its scale/offset buffers and one round of generation; replay's
    images and activations; the dataset as uint8. The ResNet is built on the meta device: shapes only.
    """
    import data
    import hypernet as hn

    c = config
    num_classes, size = data.DATASETS[c["dataset"]], data.IMAGE_SIZE[c["dataset"]]
    with torch.device("meta"):
        model = hn.ResNet18(num_classes, c["width"])
        activations = []
        hooks = [m.register_forward_hook(lambda m, i, o: activations.append(o.numel()))
                 for m in model.modules() if not list(m.children())]
        model(torch.empty(1, 3, size, size))
        for h in hooks:
            h.remove()
    weights, per_image = hn.count_parameters(model), sum(activations)
    clients = c["batches"] * c["clients_per_batch"]
    round_clients = min(c["clients_per_round"], c["clients_per_batch"])
    floats = {"client training (--width, --batch-size)": 3 * weights + c["batch_size"] * (per_image + 3 * size ** 2)}
    if c["method"] in ("pfedhn", "pfedhn-frozen", "pfeddsh"):
        chunks, h, layers, e = -(-weights // c["chunk_size"]), c["hidden"], c["hyper_layers"], c["embed_dim"]
        params = (clients * e + chunks * 32 + (e + 32) * h + (layers - 1) * h * h + layers * h
                  + (h + 1) * c["chunk_size"] + weights)
        masks = c["method"] == "pfeddsh" and not c["no_masks"]
        if masks:
            params += (c["batches"] + clients) * layers * h
        if masks and c["adapter_budget"] > 0:     # adapters + client offsets: the budget per batch, or the
            params += max(c["adapter_budget"] * weights * c["batches"],  # clients' classifiers where larger
                          clients * num_classes * (8 * c["width"] + 1))
        generation = round_clients * (2 * chunks * h * layers + chunks * c["chunk_size"] + 2 * weights)
        floats["hypernetwork, its gradients and Adam state (--width, --chunk-size, --hidden, --hyper-layers, "
               "--embed-dim, --batches, --clients-per-batch)"] = 4 * params + 2 * weights + generation
    elif c["method"] == "local":
        floats["one model per client (--width, --batches, --clients-per-batch)"] = clients * weights
    if c["method"] == "pfeddsh" and not c["no_replay"]:
        images = c["clients_per_batch"] * c["replay_images"]
        floats["replay (--replay-images, --clients-per-batch, --width)"] = (images * (per_image + 3 * size ** 2)
                                                                            + c["clients_per_batch"] * weights)
    parts = {name: 4 * n for name, n in floats.items()}
    train_images, test_images = DATASET_IMAGES[c["dataset"]]
    parts["the dataset"] = (train_images + test_images) * 3 * size * size
    return parts


def check_memory(config, device):
    """Refuse, before allocating anything, a run that cannot fit in the device's memory."""
    try:
        parts = memory_estimate(config)
    except (RuntimeError, OverflowError, ValueError, TypeError) as e:   # sizes torch cannot even describe
        raise CliError(f"this model is too large to build ({str(e).splitlines()[0]}): use a smaller --width, "
                       "--hidden, --chunk-size or --embed-dim") from None
    if device.type == "cuda":
        available, where = torch.cuda.mem_get_info(device)[0], f"free on {torch.cuda.get_device_name(device)}"
    else:
        available, where = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "of memory on this machine"
    needed = sum(parts.values())
    if needed > available:
        largest = max(parts, key=parts.get)
        raise CliError(f"this run needs at least {needed / 2 ** 30:.1f} GiB, {available / 2 ** 30:.1f} GiB "
                       f"{where}; the largest part is {largest}: {parts[largest] / 2 ** 30:.1f} GiB")
    return needed


def build(config, device, dataset=None):
    """Data, clients, target model and server (or a baseline standing in for it), all from one config.

    `dataset` (a data.Dataset) replaces the one the config names: benchmarks/performance.py passes
    generated images of CIFAR-10's shape, so it needs no download."""
    import data
    import federated as fl

    torch.manual_seed(config["seed"])
    if dataset is None:
        dataset = data.load_dataset(config["dataset"], config["data_dir"], device=device)
    splits = client_splits(config, dataset)
    server, batches, model, layout = build_server(config, device, dataset.num_classes, dataset.image_size)
    clients = [fl.Client(cid, dataset, split, model, layout.unflatten, layout.flatten, config["seed"],
                         amp=config["amp"])
               for cid, split in enumerate(splits)]
    return dataset, clients, server, batches, model


def restore_finished(run_dir):
    """A finished run's final state, as its last checkpoint holds it (the benchmarks replay its last stage
    from there): (config, dataset, clients, server, batches, onboarding state)."""
    import checkpoint
    import federated as fl

    with open(os.path.join(run_dir, "results.json")) as f:
        results = json.load(f)
    config = dict(DEFAULTS, **results["config"])
    device = torch.device(results["device"])
    state = checkpoint.load(os.path.join(run_dir, checkpoint.FILENAME), config, device, defaults=DEFAULTS)
    dataset, clients, server, batches, _ = build(config, device)
    onboarding, _ = checkpoint.restore(state, server, clients, fl.OnboardingState)
    return config, dataset, clients, server, batches, onboarding


def client_splits(config, dataset):
    """Every client's train/val/test indices and classes (data.partition with the config's settings); a
    Flower node (flower_app.py) makes the same call to find its own split."""
    import data

    classes_per_client = config["classes_per_client"] or data.DEFAULT_CLASSES_PER_CLIENT[config["dataset"]]
    return data.partition(dataset.y_train, dataset.y_test, config["batches"] * config["clients_per_batch"],
                          dataset.num_classes, scheme=config["partition"], classes_per_client=classes_per_client,
                          alpha=config["alpha"], val_fraction=config["val_fraction"], seed=config["seed"])


def build_server(config, device, num_classes, image_size):
    """The server (or a baseline standing in for it), its target model and the batches: no data needed,
    so a Flower server (--engine flower) builds only this. Called right after torch.manual_seed(seed):
    the model's and hypernetwork's initial values come from torch's global generator."""
    import baselines
    import data
    import federated as fl
    import hypernet as hn
    import masks

    num_clients = config["batches"] * config["clients_per_batch"]
    batches = data.assign_batches(num_clients, config["batches"], config["seed"])
    model = hn.ResNet18(num_classes, config["width"]).to(device)
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
                                     s_max=config["s_max"], lr=config["gate_lr"], free_start=config["gate_start"])
        hypernet = hn.HyperNetwork(model, num_clients, embed_dim=config["embed_dim"], hidden=config["hidden"],
                                   num_layers=config["hyper_layers"], chunk_size=config["chunk_size"],
                                   gates=gates, adapter_budget=config["adapter_budget"] if gates is not None else 0.0
                                   ).to(device)
        layout = hypernet.layout
        server_class = baselines.FrozenPFedHN if method == "pfedhn-frozen" else fl.Server
        server = server_class(hypernet, model, batches, optimizer=config["server_optimizer"],
                              server_lr=config["server_lr"], sparsity=config["sparsity"],
                              adapter_lr=config["adapter_lr"],
                              image_size=image_size, amp=config["amp"])
    return server, batches, model, layout


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


def report_replay(report, t, mean, std, out, write=print):
    """Write stage t's synthetic images to a png and drop them from the report (results.json holds numbers)."""
    import deepinversion

    images = report.pop("images")
    report.pop("labels"), report.pop("dreamers")
    if len(images) == 0:
        write(f"replay after stage {t}: no new client uploaded statistics (all their updates were dropped)")
        return
    deepinversion.save_grid(images[:128], mean, std, os.path.join(out, f"synthetic_batch{t}.png"))
    write(f"replay after stage {t}: {report['replay_s']:.1f} s (synthesis {report['synthesis_s']:.1f} s), "
          f"BN loss {sum(report['bn_loss_start']) / len(report['bn_loss_start']):.2f} -> "
          f"{sum(report['bn_loss_end']) / len(report['bn_loss_end']):.2f}, updates accepted "
          f"{report['accepted']}, rejected {report['rejected']}, skipped {report['skipped']}"
          + (" -- DIVERGED (non-finite), undone" if report["dropped"] else ""))
    if report.get("audit"):
        write(audit_line(report["audit"], t))


def audit_line(figures, t):
    """The privacy audit in one line: membership AUCs, and how often dreams sit nearer training images."""
    aucs = ", ".join(f"{name} {m['auc']:.3f} [{m['ci'][0]:.3f}, {m['ci'][1]:.3f}]"
                     for name, m in figures["membership"].items())
    px, ft = figures["reconstruction"]["pixel"], figures["reconstruction"]["feature"]
    return (f"privacy audit after stage {t} ({figures['audit_s']:.1f} s): membership AUC (0.5 = nothing leaks) "
            f"{aucs}; dreams nearer a training than a held-out image: pixel {px['nearest_is_train']:.0%}, "
            f"feature {ft['nearest_is_train']:.0%} (chance 50%); closer than chance: pixel "
            f"{px['closer_than_chance']:.0%}, feature {ft['closer_than_chance']:.0%} (chance 5%)")


def replay_settings(config):
    """The keyword arguments of deepinversion.backward_transfer, from the config."""
    return dict(num_images=config["replay_images"], iterations=config["replay_iterations"],
                bn_weight=config["replay_bn_weight"],
                steps=config["replay_steps"], lr=config["replay_lr"], kd_weight=config["replay_kd"],
                anchor_weight=config["replay_anchor"], temperature=config["replay_temperature"],
                validate_every=config["replay_validate_every"], confirm_z=config["replay_confirm_z"])


def estimate_seconds(config, round_s, rounds_left, replay_stages):
    """Rough length of what is left, from one timed round: the rounds, plus replay after each stage in
    `replay_stages`, counted in image passes against a round's. The factor 1.5 is the cpu-demo protocol's
    on a 2-core AMD EPYC CPU (replay about 30 s next to rounds of about 1.3 s); elsewhere it is rough."""
    c = config
    round_images = min(c["clients_per_round"], c["clients_per_batch"]) * c["local_steps"] * c["batch_size"]
    replay_images = sum(c["clients_per_batch"] * c["replay_images"] * (c["replay_iterations"]
                                                                       + t * c["replay_steps"])
                        for t in replay_stages)
    return round_s * (rounds_left + 1.5 * replay_images / round_images)


def duration(seconds):
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def run_name(config):
    return (config["method"] + "-no-replay" * bool(config["no_replay"]) + "-no-masks" * bool(config["no_masks"])
            + "-paper" * (config["method"] == "pfeddsh" and not config["no_masks"]
                          and config["adapter_budget"] == 0))


def main(argv=None, grid=None):
    """Parse, build, (resume,) train, write results.json. Signals are handled only while this runs.

    `grid`: a Flower Grid, when this runs as the ServerApp of a real SuperLink (flower_app.py)."""
    caught = []

    def on_signal(signum, frame):
        if caught:       # a second signal: the user does not want to wait for the round to end
            raise Interrupted("interrupted again: stopped without waiting for the round; the last checkpoint "
                              "is kept", 128 + signum)
        caught.append(signum)

    # Only the main thread may set handlers (a Flower ServerApp may run in another): there, no handlers.
    in_main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)} if in_main else {}
    try:
        config, comparison = resolve_config(sys.argv[1:] if argv is None else argv)
        print(describe_protocol(config))
        if comparison is not None:
            return run_comparison(config, *comparison, caught, argv, grid=grid)
        return run(config, caught, grid=grid)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def run_comparison(config, names, seeds, caught, argv, grid=None):
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
                run_config["resume"] = (not config["overwrite"] and config["engine"] != "flower"
                                        and os.path.exists(os.path.join(run_config["out"], checkpoint.FILENAME)))
                print(f"== {name}, seed {seed}" + (": resuming" if run_config["resume"] else ""))
                results = run(run_config, caught, how_to_continue="rerun the same command to continue "
                                                                  "(finished runs are reused, this one resumes)",
                              grid=grid)
            runs.setdefault(name, []).append(results)
    command = "python train.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(compare.write_report(out, runs, command))
    print(f"wrote {os.path.join(out, 'comparison.md')} and its plots")
    return runs


def run(config, caught, how_to_continue="rerun with --resume to continue", grid=None):
    """One run. With --engine flower the clients are Flower nodes (flower_app.py): simulated in this
    process, or, given a Flower `grid`, the nodes of a real SuperLink; the server and the loop are the same."""
    import checkpoint
    import compare
    import data
    import federated as fl
    import hypernet as hn
    from tqdm import tqdm

    config = dict(config)
    device = torch.device("cuda" if config["device"] == "auto" and torch.cuda.is_available()
                          else ("cpu" if config["device"] == "auto" else config["device"]))
    out = config["out"] or os.path.join("runs", f"{run_name(config)}-{config['dataset']}-s{config['seed']}")
    config["out"] = out
    check_out(out)
    check_memory(config, device)
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
            state = checkpoint.load(checkpoint_path, config, device, defaults=DEFAULTS)
        except checkpoint.CheckpointError as e:
            raise CliError(str(e)) from None
    flower = config["engine"] == "flower"
    try:
        if flower:      # the server holds no data: the nodes do (and report their sizes)
            if grid is None and importlib.util.find_spec("ray") is None:
                raise CliError("--engine flower simulates the nodes with Ray, which is missing: "
                               "pip install -r requirements-flower.txt")
            torch.manual_seed(config["seed"])
            server, batches, model, _ = build_server(config, device, data.DATASETS[config["dataset"]],
                                                     data.IMAGE_SIZE[config["dataset"]])
            dataset, clients = None, None
        else:
            dataset, clients, server, batches, model = build(config, device)
    except data.DataError as e:
        raise CliError(str(e)) from None
    nodes = None        # --engine flower: flower_app.Nodes, once the nodes are reached
    onboarding, rng = fl.OnboardingState(), None
    if state is not None:
        try:
            onboarding, rng = checkpoint.restore(state, server, clients, fl.OnboardingState)
        except Exception as e:          # passed the config check yet does not fit: corrupt inside
            raise CliError(f"checkpoint {checkpoint_path} does not fit this run ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}); delete it to start over") from None
        del state
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise CliError(f"--out {out}: cannot create the folder ({e.strerror or e})") from None

    hypernet = getattr(server, "hypernet", None)
    print(f"{run_name(config)} on {config['dataset']} | device {device} | {sum(map(len, batches))} clients in "
          f"{len(batches)} batches | ResNet-18 width {config['width']}: "
          f"{hn.count_parameters(model) / 1e6:.2f} M weights"
          + (f", hypernetwork {hn.count_parameters(hypernet) / 1e6:.2f} M parameters" if hypernet else "")
          + (f", adapters of rank {hypernet.adapters.rank}: {hypernet.adapters.per_batch_cost() / 1e3:.1f} k "
             f"per batch ({hypernet.adapters.per_batch_cost() / hypernet.num_weights:.1%} of the model) + "
             f"{hypernet.client_offsets.shape[1] / 1e3:.1f} k per client "
             f"({hypernet.client_offsets.shape[1] / hypernet.num_weights:.1%})"
             if hypernet is not None and hypernet.adapters is not None else "")
          + (f" | resumed at stage {onboarding.stage} round {onboarding.round}" if config["resume"] else ""))
    if config["amp"] and device.type == "cpu":
        print("note: --amp on a CPU runs bf16 autocast, usually slower than fp32 there; it is meant for CUDA")
    rounds = config["rounds"]
    bar = tqdm(total=config["batches"] * rounds, initial=onboarding.stage * rounds + onboarding.round,
               desc="rounds", dynamic_ncols=True)
    replay = None
    if config["method"] == "pfeddsh" and not config["no_replay"]:     # with --no-masks: pfedhn + replay
        replay = replay_settings(config)

    audit = None
    if replay is not None and config["privacy_audit"]:      # its grid goes next to the synthetic images
        import privacy
        audit = privacy.auditor(dataset, config["seed"], lambda t: os.path.join(out, f"privacy_batch{t}.png"))

    clock = {"start": time.time(), "last": time.time(), "rounds": []}

    def after_round(onboarding, rng, stage_done):
        """Between rounds: the run's estimated length once rounds are timed, png of a finished replay,
        checkpoint when due, and stop here after a signal."""
        now = time.time()
        if not stage_done and len(clock["rounds"]) < 2:
            clock["rounds"].append(now - clock["last"])
            rounds_left = config["batches"] * rounds - (onboarding.stage * rounds + onboarding.round)
            # The first round can carry one-off costs (41 s against about 10 s for later rounds in one
            # cpu-demo run on a busy 2-core CPU), so the estimate waits for the second; a one-round run gets none.
            if len(clock["rounds"]) == 2:
                first, round_s = clock["rounds"]
                replay_stages = range(max(onboarding.stage, 1), config["batches"]) if replay is not None else []
                total = now - clock["start"] + estimate_seconds(config, round_s, rounds_left, replay_stages)
                tqdm.write(f"rounds take {round_s:.1f} s (the first {first:.1f} s): this run should take about "
                           f"{duration(total)} in all" + (", replay included" if replay_stages else ""))
        clock["last"] = now
        if stage_done and onboarding.replays and "images" in onboarding.replays[-1]:
            mean, std = flower_app.channel_stats(nodes) if flower else (dataset.mean, dataset.std)
            report_replay(onboarding.replays[-1], onboarding.stage - 1, mean, std, out, write=tqdm.write)
        done = onboarding.stage * rounds + onboarding.round
        if not stage_done and done == config["stop_after_rounds"]:
            os.kill(os.getpid(), signal.SIGINT)         # handled by on_signal right here, like a real Ctrl-C
        # The flower engine keeps no checkpoint: the clients' generators live on their nodes.
        if not flower and (stage_done or caught or done % config["checkpoint_every"] == 0):
            checkpoint.save(checkpoint_path, checkpoint.capture(config, device, server, clients, rng, onboarding))
        if caught and flower:
            raise Interrupted(f"interrupted ({signal.Signals(caught[0]).name}): the flower engine keeps no "
                              "checkpoint; rerun to start over", 128 + caught[0])
        if caught:
            bar.close()
            where = (f"after stage {onboarding.stage - 1}" if onboarding.round == 0
                     else f"at stage {onboarding.stage} round {onboarding.round} of {rounds}")
            raise Interrupted(f"interrupted ({signal.Signals(caught[0]).name}): checkpoint saved {where}; "
                              f"{how_to_continue}", 128 + caught[0])

    replay_bar = {"bar": None, "phase": None}

    def on_replay(phase, done, total):
        """Replay's progress on a second bar under the rounds (synthesis iterations, then earlier clients)."""
        if replay_bar["bar"] is None:
            replay_bar["bar"] = tqdm(total=total, position=1, leave=False, dynamic_ncols=True,
                                     bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}]")
        if replay_bar["phase"] != phase:
            replay_bar["phase"] = phase
            replay_bar["bar"].set_description(f"replay after stage {onboarding.stage}: {phase}", refresh=False)
            replay_bar["bar"].reset(total=total)
        replay_bar["bar"].n = done
        replay_bar["bar"].refresh()
        if phase == "fine-tune" and done == total:
            replay_bar["bar"].close()
            replay_bar["bar"] = replay_bar["phase"] = None

    def train(these_clients, these_nodes=None):
        nonlocal clients, nodes
        clients, nodes = these_clients, these_nodes
        return fl.onboard(
            server, clients, batches, rounds=rounds, clients_per_round=config["clients_per_round"],
            local_steps=config["local_steps"], batch_size=config["batch_size"], lr=config["lr"],
            seed=config["seed"], progress_bar=bar, replay=replay, onboarding=onboarding, rng=rng,
            after_round=after_round, replay_progress=on_replay, bn_noise=config["bn_noise"], audit=audit)

    if flower:
        import flower_app
        onboarding = flower_app.run(config, batches, train, device, grid=grid)
    else:
        onboarding = train(clients)
    bar.close()
    accuracy, neurons, stage_seconds, replays = (onboarding.accuracy, onboarding.neurons, onboarding.stage_seconds,
                                                 onboarding.replays)

    test_sizes = [len(c.y_test) for c in clients]
    m = fl.metrics(accuracy, batches, test_sizes)
    print_table(m["batch_acc"], m["ri_per_batch"], neurons)
    print(f"mean accuracy {m['mean_acc']:.4f} (weighted {m['weighted_acc']:.4f}), RI {m['ri']:+.4f}")
    faults = dict(server.faults, **(nodes.faults if nodes is not None else {}))
    if any(faults.values()):
        print("faults survived: " + ", ".join(f"{k} {v}" for k, v in faults.items()))
    if neurons[-1] is not None:
        plot_neurons(neurons, os.path.join(out, "neurons.png"))
        if neurons[-1]["owned"] == 1.0:
            print("note: every hypernetwork unit is owned: later batches can only reuse (read) owned units "
                  "and learn their embeddings and gates")
    results = {"config": config, "batches": batches, "accuracy": accuracy, "metrics": m,
               "val_accuracy": onboarding.val_accuracy,
               "val_metrics": fl.metrics(onboarding.val_accuracy, batches, test_sizes),
               "neurons": neurons if neurons[-1] is not None else None,
               "test_sizes": test_sizes, "time_s": stage_seconds, "device": str(device),
               "replay_s": [r["replay_s"] for r in replays], "replay": replays, "faults": faults}
    tmp = results_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1)
    os.replace(tmp, results_path)       # never leave a half-written results.json behind
    plots = compare.write_run_plots(results, out, run_name(config))
    print(f"wrote {results_path} and {', '.join(os.path.basename(p) for p in plots)}")
    return results


def cli(argv=None, grid=None):
    """main() as a program: returns the exit code; a user mistake or a signal is one line on stderr."""
    try:
        main(argv, grid)
        return 0
    except CliError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(e, file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (MemoryError, RuntimeError) as e:      # the estimate let it through, the allocator did not
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if not isinstance(e, (MemoryError, torch.cuda.OutOfMemoryError)) and "allocate" not in first:
            raise
        print(f"error: out of memory ({first}): use a smaller --width, --batch-size or --replay-images "
              "(a checkpoint, if one was written, is kept for --resume)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())

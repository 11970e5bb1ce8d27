"""The shell around train.py: the command line, its checks and exit codes (ours; not the paper's).

    python train.py --dataset cifar10 --batches 2 --data-dir ../shared/data      # train.py hands over to cli()
    python train.py ... --methods local,fedavg,pfedhn,pfeddsh --seeds 0,1,2 --out runs/compare

Owns: the flags (their help; their defaults are train.DEFAULTS), the presets' resolution, the checks of
every value (a user mistake is one line on stderr and exit code 2, a run too large for the device's
memory included: docs/robustness.md), signals (SIGINT / SIGTERM finish the current round, write a
checkpoint and exit with 130 / 143), and `--methods` / `--seeds` comparisons (every (method, seed) into
<out>/<method>-s<seed>/, then compare.py's report). One run's own machinery is runner.py.
"""
import argparse
import importlib.util
import json
import math
import os
import signal
import textwrap
import sys
import threading

import torch

import data
from extensions import controls
from shell import checkpoint, compare, runner
from shell.runner import CliError, Interrupted
from shell.settings import DEFAULTS, PRESETS, REPLAYING, relevant

PRESET_NOTES = {"full": "the full-scale protocol, for a GPU (not yet timed on one: README)",
                "cpu-demo": "a few minutes on a 2-core CPU"}
# pfeddsh (the paper's method) and pfedhn are the core's; pfeddsh-ext is ours (extensions/); the rest are the
# baselines (baselines.py).
METHODS = ["local", "fedavg", "fedavg-ft", "pfedhn", "pfedhn-frozen", "pfedhn-pc", "fedrep", "fedrep-frozen", "ditto",
           "fedlwf", "fedtarget", "frozen-adapters", "pfeddsh", "pfeddsh-ext"]
EXTENSION_ONLY = ["adapter_budget", "adapter_lr", "replay_validate_every", "replay_confirm_alpha"]
# Methods whose clients keep a personal part, or train with a loss, that a Flower message cannot carry.
LOCAL_ENGINE_ONLY = ["pfedhn-pc", "fedrep", "fedrep-frozen", "ditto", "fedlwf", "fedtarget"]
# Methods whose clients only answer messages, but which have not been run on Flower yet.
NOT_TRIED_ON_FLOWER = ["frozen-adapters"]
METHOD_NOTES = {"pfeddsh": "the paper's method: hypernetwork, batch masks, DeepInversion replay that asks no client",
                "pfeddsh-ext": "ours, not the paper's: pfeddsh with adapters, client offsets and replay with the "
                               "clients' selection (extensions/)"}
SEED_LIMIT = 2 ** 32      # seeds are mixed into torch generator seeds (seed * 1_000_003 + ...): keep them < 2^64
FLOAT32_MAX = 3.4e38      # a float setting's bound (just under float32's largest, 3.4028e38): the core computes in float32
# Holm's step-down tests at alpha / k for up to one proposal per client (at most 10,000: the test images); under
# this, 1 - alpha / k rounds to 1.0 and the normal quantile of the test is undefined.
CONFIRM_ALPHA_MIN = 1e-9


class Parser(argparse.ArgumentParser):
    def error(self, message):             # argparse's default prints the whole usage block first
        raise CliError(message)


def show(value):
    return "off" if value is False else str(value)


def presets_help():
    """The epilog of --help: what each preset sets."""
    lines = ["presets (--preset; the default, auto, picks full when the run uses CUDA and cpu-demo otherwise;",
             "a flag given on the command line always wins over the preset):"]
    for name, values in PRESETS.items():
        sets = " ".join(f"--{k.replace('_', '-')} {show(v)}" for k, v in values.items()) or "every default as listed"
        lines += textwrap.wrap(f"{name}: {PRESET_NOTES[name]}: {sets}", width=100, initial_indent="  ",
                               subsequent_indent="      ", break_on_hyphens=False)
    return "\n".join(lines)


def build_parser():
    p = Parser(description=__doc__.split("\n")[0], epilog=presets_help(),
               formatter_class=argparse.RawDescriptionHelpFormatter)

    def flag(group, name, *aliases, help="", **kwargs):
        """An option whose help ends with its default (and the cpu-demo value where that preset differs)."""
        key = name[2:].replace("-", "_")
        if key in DEFAULTS and DEFAULTS[key] is not None:
            default = f"default {show(DEFAULTS[key])}"
            if PRESETS["cpu-demo"].get(key, DEFAULTS[key]) != DEFAULTS[key]:
                default += f"; cpu-demo {show(PRESETS['cpu-demo'][key])}"
            help = f"{help} ({default})" if help else f"({default})"
        group.add_argument(name, *aliases, help=help, **kwargs)

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
    a("--batch-size", "--minibatch-size", type=int, help="SGD minibatch size (a *batch* is a group of clients)")
    a("--lr", type=float, help="client SGD learning rate")
    a("--width", type=int, help="ResNet-18 width multiplier (64 = standard)")
    a("--method", help=" | ".join(METHODS))
    a("--seed", type=int, help=f"0 .. {SEED_LIMIT - 1}")
    a("--methods", help="comparison: comma-separated methods, plus the ablations pfeddsh-no-replay and "
                        "pfeddsh-no-masks; each runs into <out>/<method>-s<seed>, then <out>/comparison.md "
                        "(default: none, a single run)")
    a("--seeds", help="comparison: comma-separated seeds (default: --seed)")
    a("--per-method", action="append", metavar="METHOD:FLAG=VALUE",
      help="comparison: a training setting for one method only, e.g. ditto:ditto-lambda=0.003 (repeatable; the "
           "data, the clients and the seeds stay shared; the other methods keep the command's value)")
    a("--device", choices=["auto", "cpu", "cuda"], help="auto: cuda when available")
    a("--out", help="output folder (default runs/<method>-<dataset>-s<seed>)")
    a("--preset", choices=["auto"] + list(PRESETS),
      help="protocol: auto (default) is full with CUDA, cpu-demo without; what each sets is listed below")
    a("--overwrite", action="store_true", help="replace results (and a checkpoint) already in --out (default off)")
    a("--resume", action="store_true", help="continue the run whose checkpoint is in --out (default off)")
    a("--checkpoint-every", type=int, help="rounds between checkpoints (also after every stage)")
    a("--engine", choices=["local", "flower"],
      help="local: every client in this process; flower: every client a Flower ClientApp, here in Flower's "
           "simulation engine (pip install -r requirements-flower.txt; README)")
    a("--node-timeout", type=float, help="flower: seconds a node has to answer a message, and a batch's nodes "
                                         "to register; a node that does not counts as a dropped update")
    a("--threads", type=int, help="[ours] CPU threads, at most the cores this process may use (default: "
                                   "OMP_NUM_THREADS when set, else one fewer than the cores, so that a busy core "
                                   "cannot stall every step)")
    a("--deterministic", action="store_true", default=None,
      help="[ours] CUDA: deterministic cuDNN, no cuDNN benchmark, no TF32, so a rerun or a resume gives the same "
           "bits (slower); without it cuDNN picks its fastest kernels. CPU runs need no switch: one thread is "
           "bitwise reproducible")
    a("--amp", action="store_true", default=None,
      help="bf16 autocast for local training, evaluation and replay's synthesis; meant for CUDA (on a CPU it "
           "runs, usually slower than fp32)")
    # Testing only: send SIGINT to ourselves after this many rounds in all, so a kill is deterministic.
    p.add_argument("--stop-after-rounds", type=int, help=argparse.SUPPRESS)
    g = p.add_argument_group("hypernetwork and masks")
    flag(g, "--server-lr", type=float)
    flag(g, "--hidden", type=int, help="hypernetwork trunk width")
    flag(g, "--hyper-layers", type=int, help="hypernetwork trunk depth")
    flag(g, "--chunk-size", type=int, help="weights the head emits per call")
    flag(g, "--embed-dim", type=int, help="client embedding size")
    flag(g, "--sparsity", type=float, help="HAT sparsity penalty c")
    flag(g, "--s-max", type=float, help="HAT gate annealing s_max")
    flag(g, "--val-fraction", type=float, help="share of each client's training data held out for validation")
    flag(g, "--gate-lr", type=float, help="SGD rate of the gate embeddings (HAT's optimiser)")
    flag(g, "--classifier-lr", type=float, help="server Adam rate of the clients' own classifiers")
    flag(g, "--adapter-budget", type=float,
         help="[ours] pfeddsh-ext and frozen-adapters: per-batch adapters + the batch's client offsets, at most "
              "this fraction of the model; 0 = the paper's shape (frozen-adapters: client offsets only)")
    flag(g, "--adapter-lr", type=float, help="[ours] server Adam rate of the adapters, client offsets and "
                                             "classifiers (pfeddsh-ext, frozen-adapters)")
    b = p.add_argument_group("baselines (each to be chosen on validation with development seeds)")
    flag(b, "--embed-lr", type=float, help="pfedhn-frozen: Adam rate of a new client's embedding (batch 1 on)")
    flag(b, "--ditto-lambda", type=float, help="ditto: weight lambda of the personal model's pull to the global one")
    flag(b, "--lwf-weight", type=float, help="fedlwf, fedtarget: weight of distillation from the previous stage's "
                                             "model (fedtarget: on the server's dreams)")
    flag(b, "--lwf-temperature", type=float, help="fedlwf, fedtarget: distillation temperature")
    r = p.add_argument_group("data-free replay (pfeddsh, pfeddsh-ext; fedtarget dreams --replay-images x "
                             "--clients-per-batch images per stage with --replay-iterations and --replay-bn-weight)")
    flag(r, "--no-replay", action="store_true", default=None, help="ablation: masks only (RI is then exactly 0)")
    flag(r, "--no-masks", action="store_true", default=None, help="ablation: no masks (pfedhn + replay)")
    flag(r, "--replay-control", choices=list(controls.CONTROLS),
         help="[ours] a control in place of the new clients' dreams, through the same replay (pfeddsh: the paper's; "
              "pfeddsh-ext: ours): noise = noise images, drawn labels, no teacher outputs; noise-kd = the same noise "
              "with the new teachers' outputs as targets (their function distilled through noise); own = the "
              "earlier client's own dreams alone; none = the dreams")
    flag(r, "--replay-images", type=int, help="synthetic images per new client")
    flag(r, "--replay-iterations", type=int, help="DeepInversion iterations")
    flag(r, "--replay-bn-weight", type=float,
         help="DeepInversion's weight of the BN-statistics loss against the dreamed labels' cross-entropy")
    flag(r, "--replay-steps", type=int, help="fine-tuning steps per earlier client")
    flag(r, "--replay-lr", type=float, help="Adam rate of what replay trains (an earlier client's own embedding)")
    flag(r, "--replay-keep", choices=["own", "end"],
         help="pfeddsh: which point of an earlier client's fine-tuning path replay keeps: own = the one (the start "
              "included) that best explains half of the client's own dreams, held out; end = the end, as the paper")
    flag(r, "--replay-kd", type=float, help="weight of KD toward the dreaming client's model")
    flag(r, "--replay-anchor", type=float, help="[ours] weight of KD toward the earlier client's own model")
    flag(r, "--replay-temperature", type=float, help="KD temperature")
    flag(r, "--replay-validate-every", type=int,
         help="[ours] pfeddsh-ext: fine-tuning steps between the client's scores")
    flag(r, "--replay-confirm-alpha", type=float,
         help="[ours] pfeddsh-ext: level of the paired tests on the clients' confirmation images that accept "
              "updates, for a whole replay (Holm's step-down over its proposals)")
    v = p.add_argument_group("privacy of replay ([ours]: privacy.py, docs/privacy.md)")
    flag(v, "--bn-noise", type=float, metavar="SIGMA",
         help="Gaussian noise sigma on the BN statistics (and sigma x n on the label counts) each client "
              "uploads for replay, once; 0 = the upload as it is")
    flag(v, "--privacy-audit", action="store_true", default=None,
         help="after each replay, audit what the dreamed images and the uploaded statistics give away "
              "(reconstruction, membership AUC; reads the new clients' images, changes nothing; "
              "privacy_batch{t}.png)")
    return p


def auto_preset(device):
    """`--preset auto`: the full-scale protocol when the run will use CUDA, the CPU protocol otherwise."""
    return "full" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu-demo"


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
    elif args.per_method:
        raise CliError("--per-method goes with --methods (a setting of a single run is its own flag)")
    elif config["method"] == "pfeddsh":     # the paper's method: our extensions' settings would be ignored
        changed = [k for k in EXTENSION_ONLY if config[k] != DEFAULTS[k]]
        if changed:
            raise CliError(f"--{changed[0].replace('_', '-')} is a setting of our extension: use --method pfeddsh-ext")
    return config, comparison


def describe_protocol(config):
    """One line: which protocol runs, why, and how to get the other."""
    name = config["preset"]
    other = "cpu-demo" if name == "full" else "full"
    if config["preset_auto"]:
        why = "CUDA found" if name == "full" else ("--device cpu" if config["device"] == "cpu" else "no CUDA")
        why = f"chosen by --preset auto: {why}"
    else:
        why = f"--preset {name}"
    method = config["method"] + (f" ({METHOD_NOTES[config['method']]})" if config["method"] in METHOD_NOTES else "")
    return (f"{method}; protocol {name} ({why}): ResNet-18 width {config['width']}, "
            f"{config['clients_per_batch']} clients "
            f"per batch, {config['rounds']} rounds x "
            f"{min(config['clients_per_round'], config['clients_per_batch'])} clients x "
            f"{config['local_steps']} local steps per stage; --preset {other} for {PRESET_NOTES[other]}")


def parse_comparison(args, config):
    """--methods / --seeds -> (variant names, seeds); `local` is added since PA is measured against it."""
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
    return names, seeds, parse_per_method(args.per_method or [], names, config)


# What every method of a comparison must share, so that its runs are paired: the data, the clients, the seed.
SHARED_SETTINGS = {"dataset", "data_dir", "batches", "clients_per_batch", "classes_per_client", "partition", "alpha",
                   "val_fraction", "seed", "method", "no_replay", "no_masks"} | checkpoint.RUN_ONLY_KEYS


def parse_per_method(items, names, config):
    """--per-method METHOD:FLAG=VALUE ... -> {method: {setting: value}}, each value typed as its flag's."""
    settings, parser = {}, build_parser()
    for item in items:
        name, _, assignment = item.partition(":")
        flag, equals, value = assignment.partition("=")
        flag = flag.strip().removeprefix("--")
        key = flag.replace("-", "_")
        if not equals or not name or not flag:
            raise CliError(f"--per-method takes METHOD:FLAG=VALUE (e.g. ditto:ditto-lambda=0.003), got '{item}'")
        if name not in names:
            raise CliError(f"--per-method {item}: '{name}' is not in this comparison ({', '.join(names)})")
        if key not in DEFAULTS:
            raise CliError(f"--per-method {item}: unknown setting '--{flag}'")
        if key in SHARED_SETTINGS:
            raise CliError(f"--per-method {item}: --{flag} is shared by every method of a comparison")
        if key in settings.get(name, {}):
            raise CliError(f"--per-method sets --{flag} of {name} twice")
        parsed = getattr(parser.parse_args([f"--{flag}", value]), key)
        settings.setdefault(name, {})[key] = parsed
        validate(dict(config, **compare.variant_config(name), **settings[name]))
    return settings


def validate(c):
    if c["dataset"] not in data.DATASETS:
        raise CliError(f"unknown dataset '{c['dataset']}': choose from {', '.join(data.DATASETS)}")
    if c["method"] not in METHODS:
        raise CliError(f"unknown method '{c['method']}': choose from {', '.join(METHODS)}")
    if c["no_replay"] and c["method"] not in REPLAYING:
        raise CliError(f"--no-replay is an option of {' and '.join(REPLAYING)}, not of {c['method']}")
    if c["no_masks"] and c["method"] != "pfeddsh":
        raise CliError(f"--no-masks is an option of pfeddsh, not of {c['method']}")
    if not 0 <= c["adapter_budget"] < 1:
        raise CliError(f"--adapter-budget must be in [0, 1), got {c['adapter_budget']}")
    positive = ["batches", "clients_per_batch", "rounds", "clients_per_round", "local_steps", "batch_size", "width",
                "hidden", "hyper_layers", "chunk_size", "embed_dim", "replay_images", "replay_iterations",
                "replay_steps", "replay_validate_every", "checkpoint_every"]
    for key in positive + (["threads"] if c["threads"] is not None else []):
        if c[key] < 1:
            raise CliError(f"--{key.replace('_', '-')} must be a positive integer, got {c[key]}")
    if c["threads"] is not None and c["threads"] > available_cores():
        raise CliError(f"--threads must be at most {available_cores()}, the cores this process may use (more threads "
                       f"than cores only wait for each other), got {c['threads']}")
    if not 0 < c["node_timeout"] < math.inf:
        raise CliError(f"--node-timeout must be positive and finite, got {c['node_timeout']}")
    # The rest are numbers the core computes with in float32: a larger one overflows there (an SGD step with
    # lr 1e308, a temperature's square), so the bound is float32's largest, not float64's.
    for key in ["lr", "server_lr", "classifier_lr", "adapter_lr", "alpha", "s_max", "gate_lr", "replay_lr",
                "replay_temperature", "embed_lr", "lwf_temperature"]:
        if not 0 < c[key] <= FLOAT32_MAX:
            raise CliError(f"--{key.replace('_', '-')} must be positive and finite, at most {FLOAT32_MAX:.3g} "
                           f"(float32's largest), got {c[key]}")
    if not CONFIRM_ALPHA_MIN <= c["replay_confirm_alpha"] < 1:
        raise CliError(f"--replay-confirm-alpha must be between 0 and 1, at least {CONFIRM_ALPHA_MIN:g} (below, "
                       f"Holm's 1 - alpha / k rounds to 1.0 in a float), got {c['replay_confirm_alpha']}")
    for key in ["sparsity", "replay_kd", "replay_anchor", "replay_bn_weight", "bn_noise",
                "ditto_lambda", "lwf_weight"]:
        if not 0 <= c[key] <= FLOAT32_MAX:
            raise CliError(f"--{key.replace('_', '-')} must be >= 0 and finite, at most {FLOAT32_MAX:.3g} "
                           f"(float32's largest), got {c[key]}")
    replays = c["method"] in REPLAYING and not c["no_replay"]
    for flag, given in [("--privacy-audit", c["privacy_audit"]), ("--bn-noise", c["bn_noise"] > 0),
                        (f"--replay-control {c['replay_control']}", c["replay_control"] != "none")]:
        if given and not replays:
            raise CliError(f"{flag} is about replay: it needs --method pfeddsh or pfeddsh-ext without --no-replay")
    if c["privacy_audit"] and c["replay_control"] != "none":
        raise CliError("--privacy-audit audits the new clients' dreams; a --replay-control run has none to audit")
    if c["s_max"] < 1:
        raise CliError(f"--s-max must be >= 1 (the gates anneal from s = 1/s_max up to s_max), got {c['s_max']}")
    check_seed(c["seed"], "--seed")
    clients, test_images = c["batches"] * c["clients_per_batch"], runner.DATASET_IMAGES[c["dataset"]][1]
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
        if c["amp"]:
            raise CliError("--amp runs with --engine local only (the Flower nodes train in fp32)")
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
    if method in LOCAL_ENGINE_ONLY:
        raise CliError(f"--engine flower cannot run {method}: its clients keep a personal part or train with an "
                       "extra loss, which the Flower messages do not carry; use --engine local")
    if method in NOT_TRIED_ON_FLOWER:
        raise CliError(f"--engine flower has not been tried with {method} yet; use --engine local")
    if resume:
        raise CliError("--engine flower keeps no checkpoint (the clients' generators live on their nodes), "
                       "so there is nothing to --resume")


def check_seed(seed, flag):
    if not 0 <= seed < SEED_LIMIT:
        raise CliError(f"{flag} must be an integer in 0 .. {SEED_LIMIT - 1}, got {seed}")


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
    threads = torch.get_num_threads()
    try:
        config, comparison = resolve_config(sys.argv[1:] if argv is None else argv)
        config["threads"] = use_threads(config["threads"])
        use_kernels(config["deterministic"])
        print(describe_protocol(config if comparison is None else dict(config, method=",".join(comparison[0]))))
        if comparison is not None:
            return run_comparison(config, *comparison, caught, argv, grid=grid)
        return runner.run(config, caught, grid=grid)
    finally:
        torch.set_num_threads(threads)
        for s, handler in previous.items():
            signal.signal(s, handler)


def available_cores():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_threads():
    """One core fewer than this process may use (at least one). With as many threads as cores, one other
    busy process stalls every parallel step (each waits for its slowest thread): 8x slower on 2 cores,
    measured by benchmarks/contention.py, which also shows what the spare core costs on an idle machine."""
    return max(1, available_cores() - 1)


def use_kernels(deterministic):
    """CUDA kernels: reproducible ones under --deterministic, else cuDNN's fastest (its benchmark mode)."""
    if deterministic:                   # cuBLAS's reproducible reductions need this before CUDA starts
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not deterministic


def use_threads(threads):
    """Set torch's CPU threads: --threads, else OMP_NUM_THREADS when set, else default_threads(); returns it."""
    if threads is None and "OMP_NUM_THREADS" not in os.environ:
        threads = default_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def run_comparison(config, names, seeds, per_method, caught, argv, grid=None):
    """Every (method, seed) into <out>/<method>-s<seed> (with its --per-method settings), then the report."""
    out = config["out"] or os.path.join("runs", f"compare-{config['dataset']}")
    runs = {}
    for name in names:
        for seed in seeds:
            run_config = dict(config, **compare.variant_config(name), **per_method.get(name, {}), seed=seed,
                              out=os.path.join(out, f"{name}-s{seed}"))
            results_path = os.path.join(run_config["out"], "results.json")
            if os.path.exists(results_path) and not config["overwrite"]:
                with open(results_path) as f:
                    results = json.load(f)
                # A setting missing from an older results.json did not exist then: it had its default.
                differing = checkpoint.differing_settings(relevant(run_config),
                                                          relevant(dict(DEFAULTS, **results["config"])))
                if differing:
                    raise CliError(f"{results_path} was made with other settings ({', '.join(differing)}): "
                                   f"use another --out, or --overwrite to rerun every method")
                print(f"== {name}, seed {seed}: finished earlier, reusing {results_path}")
            else:
                run_config["resume"] = (not config["overwrite"] and config["engine"] != "flower"
                                        and os.path.exists(os.path.join(run_config["out"], checkpoint.FILENAME)))
                print(f"== {name}, seed {seed}" + (": resuming" if run_config["resume"] else ""))
                # `local` is in every comparison, so its runs need no PA reference of their own.
                results = runner.run(run_config, caught, how_to_continue="rerun the same command to continue "
                                                                         "(finished runs are reused, this one resumes)",
                                     grid=grid, pa_reference=False)
            runs.setdefault(name, []).append(results)
    command = "python train.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(compare.write_report(out, runs, command))
    print(f"wrote {os.path.join(out, 'comparison.md')} and its plots")
    return runs


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

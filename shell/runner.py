"""One run's machinery around train.run (ours; not the paper's): everything real use needs and a reader of
the method does not.

Owns: the output folder and its checks, resume from <out>/checkpoint.pt (written after every stage and
every --checkpoint-every rounds), the progress bars and the run's time estimate, stopping cleanly on a
signal, the Flower engine's wiring, and what a finished run prints and writes: the accuracy table with
mean accuracy, PA and RI, results.json (the configuration, the batches, the accuracy matrix A[t][i] and
the metrics) with accuracy_matrix.png, batch_accuracy.png, neurons.png and synthetic_batch{t}.png.
"""
import contextlib
import importlib.util
import json
import os
import signal
import time

import torch

import data
import extensions
from extensions import controls
import federated as fl
import hypernet as hn
import train
from shell import baselines, checkpoint, compare, datasets, faults
from shell.settings import DEFAULTS, REPLAYING, relevant

# The registry train.run builds every method that is not the core's own from.
SERVERS = {**baselines.SERVERS, **extensions.SERVERS}


def count_parameters(module):
    return sum(p.numel() for p in module.parameters())


# Sizes of the datasets data.py reads (train, test images): to refuse early what cannot fit.
DATASET_IMAGES = {"cifar10": (50_000, 10_000), "cifar100": (50_000, 10_000), "tinyimagenet": (100_000, 10_000)}


def late_rise(losses, stage):
    """A warning when a stage's last two rounds trained from clearly worse models than its best round
    before them (local loss 1.5 times and 0.2 above it): the batch's mask or weights changed late and no
    round followed to repair it. None otherwise (and for stages too short to tell, or resumed mid-way)."""
    finite = [x for x in losses if x == x]
    if len(finite) < 4:
        return None
    best, last = min(finite[:-2]), sum(finite[-2:]) / 2
    if last > 1.5 * best and last - best > 0.2:
        return (f"warning: stage {stage}'s last rounds got worse (local loss {best:.3f} at best, {last:.3f} in the "
                "last two): its batch may end below what it reached; compare its accuracy with its local reference")
    return None


class CliError(Exception):
    """A user mistake: printed as one line, exit code 2."""


class Interrupted(Exception):
    """SIGINT or SIGTERM: printed as one line, exit code 128 + signal number."""

    def __init__(self, message, code):
        super().__init__(message)
        self.code = code


def run(config, caught, how_to_continue="rerun with --resume to continue", grid=None, pa_reference=True):
    """One run of train.py's experiment, with the shell around it; returns its results (results.json).

    `caught`: the signals cli.main's handler has seen (the run stops after the round it is in).
    With --engine flower the clients are Flower nodes (flower_app.py): simulated in this process, or,
    given a Flower `grid`, the nodes of a real SuperLink; the server and the loop are the same."""
    config = dict(config)
    device = torch.device("cuda" if config["device"] == "auto" and torch.cuda.is_available()
                          else ("cpu" if config["device"] == "auto" else config["device"]))
    out = config["out"] or os.path.join("runs", f"{run_name(config)}-{config['dataset']}-s{config['seed']}")
    config["out"] = out
    state = prepare_out(config, device)
    check_memory(config, device)
    shell = Shell(config, device, caught, state, how_to_continue)
    shell.pa_reference = pa_reference and config["engine"] != "flower" and config["method"] != "local"
    flower = config["engine"] == "flower"
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if config["amp"] else contextlib.nullcontext()
    try:
        if flower:              # the server holds no data: the nodes do (and report their sizes)
            results = run_on_flower(config, device, shell, grid)
        else:
            datasets.prepare(config["dataset"], config["data_dir"])
            with amp:
                results = train.run(config, device, shell, pa_reference=pa_reference and config["method"] != "local",
                                    servers=SERVERS)
    except data.DataError as e:
        raise CliError(str(e)) from None
    finally:
        shell.close()
    results = complete(results, config, device, shell.stage_seconds, shell.server.faults,
                       shell.nodes.faults if flower else None)
    report(results, config)
    return results


def complete(results, config, device, shell_seconds, server_faults, node_faults=None):
    """What the shell adds to the core's results: the device, each stage's seconds (evaluation and PA's reference
    included), the faults survived, replay's seconds, and `local`'s PA reference (a local run is its own: PA 0)."""
    results = dict(results, config=relevant(results["config"]), device=str(device),
                   faults=dict(server_faults, **(node_faults or {})),
                   replay_s=[r["replay_s"] for r in results["replay"]], time_s=shell_seconds)
    if config["method"] == "local" and not results["local_accuracy"]:
        rows = [None] + [[a if cid in b else None for cid, a in enumerate(row)]
                         for row, b in zip(results["accuracy"][1:], results["batches"][1:])]
        results.update(local_accuracy=rows,
                       metrics=train.metrics(results["accuracy"], results["batches"], results["test_sizes"], rows))
    return results


def prepare_out(config, device):
    """Check --out against what is there; the checkpoint to resume from (--resume), else None."""
    out = config["out"]
    check_out(out)
    results_path, checkpoint_path = os.path.join(out, "results.json"), os.path.join(out, checkpoint.FILENAME)
    if not config["resume"] and not config["overwrite"]:
        for path in (results_path, checkpoint_path):
            if os.path.exists(path):
                raise CliError(f"{path} already exists: pick another --out, pass --resume to continue that run "
                               f"or --overwrite to replace it")
    if not config["resume"]:
        return None
    if not os.path.exists(checkpoint_path):
        raise CliError(f"--resume: no checkpoint in {out} ({checkpoint.FILENAME} not found)")
    try:
        return checkpoint.load(checkpoint_path, config, device, defaults=DEFAULTS)
    except checkpoint.CheckpointError as e:
        raise CliError(str(e)) from None


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


def run_on_flower(config, device, shell, grid):
    """train.py's loop with every client a Flower node (flower_app.run); no checkpoint, no PA reference."""
    if grid is None and importlib.util.find_spec("ray") is None:
        raise CliError("--engine flower simulates the nodes with Ray, which is missing: "
                       "pip install -r requirements-flower.txt")
    from shell import flower_app
    torch.manual_seed(config["seed"])
    server, batches, model, _ = train.build_server(config, device, data.DATASETS[config["dataset"]],
                                                   data.IMAGE_SIZE[config["dataset"]], servers=SERVERS)
    found = {}

    def onboard(clients, nodes):
        shell.nodes = nodes
        state, rng = shell.begin(server, clients, batches, model)
        found["clients"] = clients
        return train.onboard(server, clients, batches, config, state, rng, shell, pa_reference=False)

    state = flower_app.run(config, batches, onboard, device, grid=grid)
    return train.results(config, batches, state, found["clients"])


class Shell(train.Hooks):
    """train.Hooks as a real run needs them: header, resume, bars, time estimate, checkpoints, signals,
    replay's pictures, --bn-noise's uploads and the privacy audit."""

    def __init__(self, config, device, caught, checkpoint_state, how_to_continue):
        self.config, self.device, self.caught = config, device, caught
        self.checkpoint_state, self.how_to_continue = checkpoint_state, how_to_continue
        self.flower = config["engine"] == "flower"
        self.pa_reference = True            # whether train.onboard trains PA's local reference (for the estimate)
        self.nodes = None                   # --engine flower: flower_app.Nodes, once the nodes are reached
        self.bar = self.replay_bar = self.replay_phase = self.audit = self.server = None
        self.clock = {"start": time.time(), "last": time.time(), "rounds": []}
        self.stage_losses = []      # this stage's local losses, to warn when its last rounds get worse
        self.stage_seconds, self.stage_start = [], time.time()      # wall time of every stage, in the checkpoint
        self.checkpoint_path = os.path.join(config["out"], checkpoint.FILENAME)

    def begin(self, server, clients, batches, model, dataset=None):
        """Restore a checkpoint (--resume), make the folder, print the run's header, start the bar."""
        config = self.config
        self.server, self.clients, self.batches, self.stage = server, clients, batches, 0
        self.class_names = dataset.classes if dataset is not None else None
        if config["bn_noise"] > 0 or config["privacy_audit"]:     # both need replay (cli.validate checks)
            from shell import privacy
            if config["bn_noise"] > 0:      # replay reads the noisy uploads (Server.uploads)
                server.uploads = privacy.uploads(server, config["seed"], config["bn_noise"])
            if config["privacy_audit"]:     # its grid goes next to the synthetic images
                self.audit = privacy.auditor(dataset, config["seed"],
                                             lambda t: os.path.join(config["out"], f"privacy_batch{t}.png"))
        if config["method"] == "pfeddsh" and config["replay_control"] != "none":
            controls.install(server, config["replay_control"])     # ours: a control in the dreams' place
        if isinstance(server, fl.Server):   # the baselines screen their own updates
            faults.screen(server, self.audit)
        state, rng = None, None
        if self.checkpoint_state is not None:
            try:
                state, rng = checkpoint.restore(self.checkpoint_state, server, clients, train.OnboardingState)
                self.stage_seconds = list(self.checkpoint_state.get("stage_seconds", []))
            except Exception as e:          # passed the config check yet does not fit: corrupt inside
                raise CliError(f"checkpoint {self.checkpoint_path} does not fit this run ({type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else ''}); delete it to start over") from None
            self.checkpoint_state = None
        try:
            os.makedirs(config["out"], exist_ok=True)
        except OSError as e:
            raise CliError(f"--out {config['out']}: cannot create the folder ({e.strerror or e})") from None
        print(header(config, self.device, server, batches, model, state))
        self.stage_start = time.time()
        if config["amp"] and self.device.type == "cpu":
            print("note: --amp on a CPU runs bf16 autocast, usually slower than fp32 there; it is meant for CUDA")
        from tqdm import tqdm
        self.write = tqdm.write
        done = (state.stage * config["rounds"] + state.round) if state is not None else 0
        self.bar = tqdm(total=config["batches"] * config["rounds"], initial=done, desc="rounds", dynamic_ncols=True)
        self.stage = state.stage if state is not None else 0
        return (state, rng) if state is not None else (None, None)

    def after_round(self, state, rng, stage_done, loss=None):
        """Between rounds: the bar, the run's estimated length, replay's picture, checkpoints, signals."""
        config, rounds = self.config, self.config["rounds"]
        self.stage = state.stage
        if not stage_done:
            self.bar.set_postfix(stage=f"{state.stage + 1}/{config['batches']}", loss=f"{loss:.3f}")
            self.bar.update(1)
            self.estimate(state)
            self.stage_losses.append(loss)
        else:
            self.stage_seconds.append(time.time() - self.stage_start)
            self.stage_start = time.time()
            warning = late_rise(self.stage_losses, state.stage - 1)
            if warning:
                self.bar.write(warning)
            self.stage_losses = []
        self.clock["last"] = time.time()
        if stage_done and state.replays and "images" in state.replays[-1]:
            if self.flower:             # the dataset's normalisation lives on the nodes
                from shell import flower_app
                mean, std = flower_app.channel_stats(self.nodes)
            else:
                mean, std = self.clients[0].mean, self.clients[0].std
            report_replay(state.replays[-1], state.stage - 1, mean, std, config["out"], write=self.write,
                          class_names=getattr(self, "class_names", None))
        done = state.stage * rounds + state.round
        if not stage_done and done == config["stop_after_rounds"]:
            os.kill(os.getpid(), signal.SIGINT)         # handled by cli's on_signal right here, like a real Ctrl-C
        # The flower engine keeps no checkpoint: the clients' generators live on their nodes.
        if not self.flower and (stage_done or self.caught or done % config["checkpoint_every"] == 0):
            state_now = checkpoint.capture(config, self.device, self.server, self.clients, rng, state)
            checkpoint.save(self.checkpoint_path, dict(state_now, stage_seconds=self.stage_seconds))
        if self.caught and self.flower:
            raise Interrupted(f"interrupted ({signal.Signals(self.caught[0]).name}): the flower engine keeps no "
                              "checkpoint; rerun to start over", 128 + self.caught[0])
        if self.caught:
            self.bar.close()
            where = (f"after stage {state.stage - 1}" if state.round == 0
                     else f"at stage {state.stage} round {state.round} of {rounds}")
            raise Interrupted(f"interrupted ({signal.Signals(self.caught[0]).name}): checkpoint saved {where}; "
                              f"{self.how_to_continue}", 128 + self.caught[0])

    def estimate(self, state):
        """Once two rounds are timed, the run's estimated length (the first round carries one-off costs)."""
        config, now = self.config, time.time()
        if len(self.clock["rounds"]) >= 2:
            return
        self.clock["rounds"].append(now - self.clock["last"])
        if len(self.clock["rounds"]) == 2:
            first, round_s = self.clock["rounds"]
            rounds_left = config["batches"] * config["rounds"] - (state.stage * config["rounds"] + state.round)
            later_stages = range(max(state.stage, 1), config["batches"])
            replays = config["method"] in REPLAYING and not config["no_replay"]
            replay_stages = later_stages if replays else []
            # fedtarget dreams once per later stage, and its later rounds also train on the dreams (about twice)
            dreams = config["method"] == "fedtarget" and config["lwf_weight"] > 0
            dream_stages = later_stages if dreams else []
            dream_rounds = config["rounds"] * len(dream_stages) - (state.round if state.stage >= 1 and dreams else 0)
            # PA's reference trains each later batch's clients alone: about a round's local training per round
            reference_rounds = config["rounds"] * len(later_stages) * self.pa_reference
            total = now - self.clock["start"] + estimate_seconds(
                config, round_s, rounds_left + reference_rounds + dream_rounds, replay_stages, dream_stages)
            self.write(f"rounds take {round_s:.1f} s (the first {first:.1f} s): this run should take about "
                       f"{duration(total)} in all" + (", replay included" if replay_stages else ""))

    def replay_progress(self, phase, done, total):
        """Replay's progress on a second bar under the rounds (synthesis iterations, then earlier clients)."""
        from tqdm import tqdm
        if self.replay_bar is None:
            self.replay_bar = tqdm(total=total, position=1, leave=False, dynamic_ncols=True,
                                   bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}]")
        if self.replay_phase != phase:
            self.replay_phase = phase
            self.replay_bar.set_description(f"replay after stage {self.stage}: {phase}", refresh=False)
            self.replay_bar.reset(total=total)
        self.replay_bar.n = done
        self.replay_bar.refresh()
        if phase == "fine-tune" and done == total:
            self.replay_bar.close()
            self.replay_bar = self.replay_phase = None

    def close(self):
        if self.bar is not None:
            self.bar.close()


def memory_estimate(config):
    """A lower estimate of the bytes a run holds at once, from the config alone, before anything is allocated.

    Returns {part: bytes}. Counted in float32: the target model's weights (with its gradient and SGD
    momentum while a client trains) and a training batch's activations; the hypernetwork's parameters with
    their gradients and Adam moments, its scale/offset buffers and one round of generation; replay's
    images and activations; the dataset as uint8. The ResNet is built on the meta device: shapes only.
    """
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
    weights, per_image = count_parameters(model), sum(activations)
    clients = c["batches"] * c["clients_per_batch"]
    round_clients = min(c["clients_per_round"], c["clients_per_batch"])
    floats = {"client training (--width, --batch-size)": 3 * weights + c["batch_size"] * (per_image + 3 * size ** 2)}
    if c["method"] in ("pfedhn", "pfedhn-frozen", "pfedhn-pc", "pfeddsh", "pfeddsh-ext"):
        chunks, h, layers, e = -(-weights // c["chunk_size"]), c["hidden"], c["hyper_layers"], c["embed_dim"]
        params = (clients * e + chunks * 32 + (e + 32) * h + (layers - 1) * h * h + layers * h
                  + (h + 1) * c["chunk_size"] + weights)
        masks = c["method"] in REPLAYING and not c["no_masks"]
        if masks:
            params += (c["batches"] + clients) * layers * h
        if c["method"] == "pfeddsh-ext" and c["adapter_budget"] > 0:     # adapters + client offsets: the budget per batch, or the
            params += max(c["adapter_budget"] * weights * c["batches"],  # clients' classifiers where larger
                          clients * num_classes * (8 * c["width"] + 1))
        generation = round_clients * (2 * chunks * h * layers + chunks * c["chunk_size"] + 2 * weights)
        floats["hypernetwork, its gradients and Adam state (--width, --chunk-size, --hidden, --hyper-layers, "
               "--embed-dim, --batches, --clients-per-batch)"] = 4 * params + 2 * weights + generation
    elif c["method"] in ("local", "ditto"):       # ditto: the global model plus a personal one per client
        floats["one model per client (--width, --batches, --clients-per-batch)"] = clients * weights
    if c["method"] in REPLAYING and not c["no_replay"]:
        images = c["clients_per_batch"] * c["replay_images"]
        floats["replay (--replay-images, --clients-per-batch, --width)"] = (images * (per_image + 3 * size ** 2)
                                                                            + c["clients_per_batch"] * weights)
    if c["method"] == "fedtarget":     # one DeepInversion run of as many images from the global model
        images = c["clients_per_batch"] * c["replay_images"]
        floats["the server's dreams (--replay-images, --clients-per-batch, --width)"] = (
            images * (per_image + 3 * size ** 2) + weights)
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
        torch.cuda.empty_cache()        # blocks an earlier run of a comparison cached are free for this one
        available, where = torch.cuda.mem_get_info(device)[0], f"free on {torch.cuda.get_device_name(device)}"
    else:
        available, where = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "of memory on this machine"
    needed = sum(parts.values())
    if needed > available:
        largest = max(parts, key=parts.get)
        raise CliError(f"this run needs at least {needed / 2 ** 30:.1f} GiB, {available / 2 ** 30:.1f} GiB "
                       f"{where}; the largest part is {largest}: {parts[largest] / 2 ** 30:.1f} GiB")
    return needed


def header(config, device, server, batches, model, state):
    """The run's first line: method, data, device, clients, model and hypernetwork sizes."""
    hypernet = getattr(server, "hypernet", None)
    line = (f"{run_name(config)} on {config['dataset']} | device {device} | {sum(map(len, batches))} clients in "
            f"{len(batches)} batches | ResNet-18 width {config['width']}: {count_parameters(model) / 1e6:.2f} M weights")
    if hypernet is not None:
        line += f", hypernetwork {count_parameters(hypernet) / 1e6:.2f} M parameters"
    adapted = hypernet if hypernet is not None else getattr(server, "adapted", None)    # frozen-adapters' own
    if getattr(adapted, "adapters", None) is not None:
        cost, offsets, weights = adapted.adapters.per_batch_cost(), adapted.client_offsets.shape[1], count_parameters(model)
        line += (f", adapters of rank {adapted.adapters.rank}: {cost / 1e3:.1f} k per batch ({cost / weights:.1%} "
                 f"of the model) + {offsets / 1e3:.1f} k per client ({offsets / weights:.1%})")
    if state is not None:
        line += f" | resumed at stage {state.stage} round {state.round}"
    return line


def report(results, config):
    """Print the table, mean accuracy, PA and RI; write results.json and the plots."""
    m, out = results["metrics"], config["out"]
    print_table(m["batch_acc"], m["ri_per_batch"], results["neurons"] or [None] * len(m["batch_acc"]))
    pa = "n/a (needs --engine local)" if m["pa"] is None else f"{m['pa']:+.4f}"
    print(f"mean accuracy {m['mean_acc']:.4f} (weighted {m['weighted_acc']:.4f}), PA {pa}, RI {m['ri']:+.4f}")
    if results["replay"]:
        print(replay_summary(results))
    if any(results["faults"].values()):
        print("faults survived: " + ", ".join(f"{k} {v}" for k, v in results["faults"].items()))
    neurons = results["neurons"]
    if neurons is not None:
        plot_neurons(neurons, os.path.join(out, "neurons.png"))
        if neurons[-1]["owned"] == 1.0:
            print("note: every hypernetwork unit is owned: later batches can only reuse (read) owned units "
                  "and learn their embeddings and gates")
    results_path = os.path.join(out, "results.json")
    tmp = results_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1)
    os.replace(tmp, results_path)       # never leave a half-written results.json behind
    plots = compare.write_run_plots(results, out, run_name(config))
    print(f"wrote {results_path} and {', '.join(os.path.basename(p) for p in plots)}")


def replay_summary(results):
    """How many earlier clients replay improved (on their test data), and by how much."""
    accuracy, batches = results["accuracy"], results["batches"]
    earlier = [c for b in batches[:-1] for c in b]
    gains = [accuracy[-1][c] - accuracy[next(t for t, b in enumerate(batches) if c in b)][c] for c in earlier]
    improved = [g for g in gains if g > 0]
    seconds = sum(r["replay_s"] for r in results["replay"])
    accepted = (f"{sum(r['accepted'] for r in results['replay'])} updates accepted in "
                if "accepted" in results["replay"][0] else "")
    return (f"replay: {accepted}{len(results['replay'])} replays ({seconds:.0f} s); "
            f"{len(improved)} of {len(earlier)} earlier clients end above where their own stage left them"
            + (f", by {sum(improved) / len(improved):+.4f} on average" if improved else ""))


def restore_finished(run_dir):
    """A finished run's final state, as its last checkpoint holds it (the benchmarks replay its last stage
    from there): (config, dataset, clients, server, batches, onboarding state)."""
    with open(os.path.join(run_dir, "results.json")) as f:
        results = json.load(f)
    config = dict(DEFAULTS, **results["config"])
    device = torch.device(results["device"])
    state = checkpoint.load(os.path.join(run_dir, checkpoint.FILENAME), config, device, defaults=DEFAULTS)
    if config["threads"] is not None:       # the run's own thread count: the same kernels, the same bits
        torch.set_num_threads(config["threads"])
    dataset, clients, server, batches, _ = train.build(config, device, servers=SERVERS)
    if isinstance(server, fl.Server):
        faults.screen(server)
    onboarding, _ = checkpoint.restore(state, server, clients, train.OnboardingState)
    return config, dataset, clients, server, batches, onboarding


def print_table(accuracy_by_batch, ri_per_batch, neurons):
    header = "stage | " + " | ".join(f"batch {b}" for b in range(len(accuracy_by_batch[0])))
    print(header)
    for t, row in enumerate(accuracy_by_batch):
        cells = " | ".join("   -   " if a is None else f"{a:7.4f}" for a in row)
        extra = ""
        if neurons[t] is not None:
            extra = (f"   neurons used {neurons[t]['used']:.2f} owned {neurons[t]['owned']:.2f} "
                     f"reuse {neurons[t]['reuse']:.2f} soft {neurons[t].get('soft', float('nan')):.2f}")
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


def save_dream_grid(images, labels, read, mean, std, path, class_names=None, per_row=8):
    """The dreams, a row per class dreamed: the class, and how many of its dreams their own teacher reads
    as that class (so a reader can tell a dream that carries its class from noise)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mean = torch.as_tensor(mean).view(3, 1, 1)
    std = torch.as_tensor(std).view(3, 1, 1)
    classes = sorted(set(labels.tolist()))[:10]
    fig, axes = plt.subplots(len(classes), per_row, figsize=(1.1 * per_row + 2.2, 1.15 * len(classes)),
                             squeeze=False)
    for row, k in zip(axes, classes):
        mine = (labels == k).nonzero().flatten()
        name = class_names[k] if class_names else f"class {k}"
        reads = f"{int(read[mine].sum())} of {len(mine)} read as it by their teacher" if read is not None else ""
        row[0].set_title(f"{name}: {reads}", fontsize=8, loc="left")
        for ax, i in zip(row, list(mine[:per_row]) + [None] * per_row):
            ax.axis("off")
            if i is not None:
                ax.imshow((images[i].detach().cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy())
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report_replay(report, t, mean, std, out, write=print, class_names=None):
    """Write stage t's synthetic images to a png and drop them from the report (results.json holds numbers)."""
    images, read = report.pop("images"), report.pop("read", None)
    labels = report.pop("labels", None)
    report.pop("dreamers")
    if not report["tried"]:
        write(f"replay after stage {t}: nothing to replay (no earlier client holds a class of a new client "
              f"that uploaded statistics)")
        return
    if len(images):
        save_dream_grid(images, labels, read, mean, std, os.path.join(out, f"synthetic_batch{t}.png"), class_names)
    bn = (f"BN loss {sum(report['bn_loss_start']) / len(report['bn_loss_start']):.2f} -> "
          f"{sum(report['bn_loss_end']) / len(report['bn_loss_end']):.2f}, " if report["bn_loss_start"] else "")
    reads = (f"teachers read {report['teacher_reads']:.0%} of their dreams as dreamed, "
             if report.get("teacher_reads") is not None else "")
    control = "" if report.get("control", "none") == "none" else f"control {report['control']}, "
    unanswered = f", {len(report['unanswered'])} did not answer" if report.get("unanswered") else ""
    selection = (f"updates accepted {report['accepted']}, rejected {report['rejected']}, skipped {report['skipped']}"
                 f"{unanswered}; " if "accepted" in report else f"{len(report['tried'])} earlier clients fine-tuned; ")
    write(f"replay after stage {t}: {report['replay_s']:.1f} s (synthesis {report['synthesis_s']:.1f} s), "
          f"{control}{bn}{reads}{selection}{report['client_queries']} questions to earlier clients"
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


def estimate_seconds(config, round_s, rounds_left, replay_stages, dream_stages=()):
    """Rough length of what is left, from one timed round: the rounds, plus replay after each stage in
    `replay_stages` and fedtarget's dreaming before each stage in `dream_stages`, counted in image passes
    against a round's. The factor 1.5 is the cpu-demo protocol's on a 2-core AMD EPYC CPU (replay about
    30 s next to rounds of about 1.3 s); elsewhere it is rough."""
    c = config
    round_images = min(c["clients_per_round"], c["clients_per_batch"]) * c["local_steps"] * c["batch_size"]
    replay_images = sum(c["clients_per_batch"] * c["replay_images"] * (c["replay_iterations"]
                                                                       + t * c["replay_steps"])
                        for t in replay_stages)
    dream_images = len(dream_stages) * c["clients_per_batch"] * c["replay_images"] * c["replay_iterations"]
    return round_s * (rounds_left + 1.5 * (replay_images + dream_images) / round_images)


def duration(seconds):
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def run_name(config):
    return (config["method"] + "-no-replay" * bool(config["no_replay"]) + "-no-masks" * bool(config["no_masks"])
            + "-shape" * (config["method"] == "pfeddsh-ext" and config["adapter_budget"] == 0))

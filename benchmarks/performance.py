"""Where a round's time and the server's memory go, as ratios measured side by side in one process (issue 14).

A round of federated training can never be cheaper than its clients' local training: that is the limit,
1.0. Everything the server adds (generation, pFedHN's VJP update, the masks, evaluation, replay,
bookkeeping) is overhead, and it must not grow as batches join. pFedHN's hypernetwork (one linear head
per target tensor) is the design ours replaces (docs/design.md §3, "Chunked generation" and "Overhead").
Every line of the table is a ratio of two things measured in this process, for the server `python
train.py` builds for --method (pfeddsh, the paper's, by default; pfeddsh-ext, ours, with its adapters):

  (a) a whole round (generation, local training, update with the shell's fault screen, bookkeeping, the
      checkpoint every 10 rounds) / the same clients' local training alone on a plain nn.Module ResNet-18
      of the same width, steps and batch: the cpu-demo protocol at width 16, and width 64 with the default
      50 local steps. Ours and the plain round alternate, so a machine that slows down slows both.
      Sub-lines split the round into its parts.
  (b) round time at stage 5 and 10 / stage 1 of a 10-batch run
  (c) evaluation (every client seen so far) and replay after a stage / the stage's training time
  (e) server memory (hypernetwork, masks, optimizer state, per-client state, the dreams replay keeps) at
      1, 5, 10 and 50 batches against 1 batch, and the checkpoint's size
  (f) our chunked hypernetwork / a pFedHN-style one generating the same target: parameters, generation +
      update time per round, memory in a round; at width 16 and at the largest width where pFedHN's fits

(d) (replay's synthesis vmapped / client by client) and (g) (the functional call, channels_last, larger
batches, clients trained together with vmap) were measured by earlier versions of this script (`git show
86cc891:benchmarks/performance.py`); their answers are in docs/performance.md, and the paths they compared
(synthesis client by client, AMP inside the core) are no longer in the code.

Images are generated (CIFAR-10's shape and sizes, 10 balanced classes, pFedHN's 2-class split): time does
not depend on pixel values, so no dataset is needed. The first line printed names the machine.

    python benchmarks/performance.py                       # the whole table: tens of minutes on a 2-core CPU
    python benchmarks/performance.py --quick               # smoke run of every part in seconds; numbers meaningless
    python benchmarks/performance.py --parts a,f --threads 2 --json perf.json
"""
import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import federated as fl  # noqa: E402
import hypernet as hn  # noqa: E402
import train  # noqa: E402
from shell import checkpoint, faults  # noqa: E402
from shell.runner import SERVERS, count_parameters  # noqa: E402
from shell.settings import DEFAULTS, PRESETS  # noqa: E402

ROWS = []     # every line of the table, also written to --json
PER_CLIENT = ("client_embeddings", "client_classifiers", "client_offsets", "gates.borrow")


def row(part, what, ours, reference, ratio, target=""):
    ROWS.append(dict(part=part, what=what, ours=ours, reference=reference, ratio=ratio, target=target))
    print(f"| ({part}) | {what} | {ours} | {reference} | {ratio:.3f} | {target} |", flush=True)


# --------------------------------------------------------------------------------------------------
# The machine, the data, the protocol
# --------------------------------------------------------------------------------------------------

def machine(device):
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores, {available_bytes(device) / 2 ** 30:.0f} GiB available, {gpu}; "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads, Python {platform.python_version()}")


def available_bytes(device):
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemAvailable"))
    except (OSError, StopIteration):
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def fake_cifar10(device, num_train=50_000, num_test=10_000):
    """Random uint8 images with CIFAR-10's shape and sizes, 10 balanced classes."""
    g = torch.Generator().manual_seed(0)

    def split(n):
        x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
        y = (torch.arange(n) % 10)[torch.randperm(n, generator=g)]
        return x.to(device), y.to(device)

    (x_train, y_train), (x_test, y_test) = split(num_train), split(num_test)
    return data.Dataset("cifar10", x_train, y_train, x_test, y_test, [f"class{c}" for c in range(10)],
                        (0.49, 0.48, 0.45), (0.25, 0.24, 0.26))


def protocol(args, **overrides):
    """train.py's cpu-demo configuration (the defaults with the preset), plus what a measurement changes."""
    return {**DEFAULTS, **PRESETS["cpu-demo"], "device": args.device.type, "method": args.method, **args.scale,
            **overrides}


def build(config, device, dataset):
    """(clients, server, batches) as train.py builds them, the server screened as the shell screens it."""
    _, clients, server, batches, _ = train.build(config, device, dataset, servers=SERVERS)
    return clients, faults.screen(server), batches


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def clock(device):
    sync(device)            # a GPU runs ahead of the host: wait for it before reading the clock
    return time.perf_counter()


class Stopwatch:
    """Seconds spent in wrapped calls, by name: how a round splits into generation, training and update."""

    def __init__(self, device):
        self.device, self.seconds = device, defaultdict(float)

    def wrap(self, name, fn):
        def timed(*a, **k):
            start = clock(self.device)
            out = fn(*a, **k)
            self.seconds[name] += clock(self.device) - start
            return out
        return timed


def plain_round(model, clients, ids, steps, batch_size, lr, generator):
    """The limit: each client's K SGD steps on an nn.Module and nothing else (no weights in or out)."""
    model.train()
    for cid in ids:
        client = clients[cid]
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-5)   # as local_train
        for _ in range(steps):
            idx = torch.randint(len(client.y_train), (batch_size,), generator=generator, device=client.y_train.device)
            x = data.augment(client.x_train[idx], client.mean, client.std, generator=generator)
            loss = F.cross_entropy(model(x), client.y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()


def seconds(x):
    return f"{x:.3f} s" if x < 100 else f"{x:.0f} s"


def mib(n):
    return f"{n / 2 ** 20:.1f} MiB" if n < 2 ** 30 else f"{n / 2 ** 30:.2f} GiB"


# --------------------------------------------------------------------------------------------------
# (a) a whole round against plain local training
# --------------------------------------------------------------------------------------------------

def part_a(args, dataset, width, local_steps, clients_per_round, rounds, warmup_steps):
    config = protocol(args, width=width, local_steps=local_steps, clients_per_round=clients_per_round)
    clients, server, batches = build(config, args.device, dataset)
    server.begin_stage(0)
    watch = Stopwatch(args.device)
    server.hypernet.forward = watch.wrap("generation", server.hypernet.forward)
    server.update = watch.wrap("update (with the fault screen)", server.update)
    for client in clients:
        client.local_train = watch.wrap("local training", client.local_train)
    plain = hn.ResNet18(dataset.num_classes, width).to(args.device)
    generator = torch.Generator(args.device).manual_seed(0)
    rng = np.random.default_rng(0)
    steps, batch_size, lr = config["local_steps"], config["batch_size"], config["lr"]
    # The first round of each warms allocators and kernels (with few steps where steps are expensive).
    ids = batches[0][:clients_per_round]
    server.train_round(ids, clients, 0.0, warmup_steps, batch_size, lr)
    plain_round(plain, clients, ids, warmup_steps, batch_size, lr, generator)
    watch.seconds.clear()
    ours = limit = 0.0
    for r in range(rounds):
        start = clock(args.device)
        # The round as train.onboard runs it: draw the round's clients, train, update.
        ids = sorted(rng.choice(batches[0], size=clients_per_round, replace=False).tolist())
        server.train_round(ids, clients, r / max(rounds - 1, 1), steps, batch_size, lr)
        middle = clock(args.device)
        plain_round(plain, clients, ids, steps, batch_size, lr, generator)
        ours, limit = ours + middle - start, limit + clock(args.device) - middle
    # train.py writes a checkpoint every --checkpoint-every rounds: its share of a round.
    with tempfile.TemporaryDirectory() as tmp:
        saves = []
        for _ in range(3):
            start = clock(args.device)
            checkpoint.save(os.path.join(tmp, checkpoint.FILENAME), checkpoint.capture(
                config, args.device, server, clients, rng, train.OnboardingState()))
            saves.append(clock(args.device) - start)
    per_checkpoint = statistics.median(saves) * rounds / config["checkpoint_every"]
    total = ours + per_checkpoint
    what = f"width {width}, {clients_per_round} clients x {steps} steps, batch {batch_size}"
    row("a", f"round / plain local training ({what}, {rounds} rounds)", seconds(total / rounds),
        seconds(limit / rounds), total / limit, "<= 1.05")
    parts = dict(watch.seconds, **{f"checkpoint (every {config['checkpoint_every']} rounds)": per_checkpoint})
    parts["bookkeeping (the rest of the round)"] = ours - sum(watch.seconds.values())
    for name, s in parts.items():
        row("a", f"... {name} / plain local training", seconds(s / rounds), seconds(limit / rounds), s / limit)


# --------------------------------------------------------------------------------------------------
# (b) rounds as batches join, (c) evaluation and replay against a stage's training
# --------------------------------------------------------------------------------------------------

def part_bc(args, dataset, stages, rounds):
    config = protocol(args, batches=max(stages))
    clients, server, batches = build(config, args.device, dataset)
    steps, batch_size, lr = config["local_steps"], config["batch_size"], config["lr"]
    replays = getattr(server, "replay_settings", None) is not None     # as train.onboard decides
    round_s = {}
    for t, batch in enumerate(batches):
        server.begin_stage(t)
        # Unmeasured stages run 2 rounds (s from 1/s_max to s_max): enough for masks and every client's BN
        # statistics to exist, which is all a later stage's round cost can depend on.
        measured = t + 1 in stages
        n = 1 + rounds if measured else 2
        times = []
        for r in range(n):
            start = clock(args.device)
            server.train_round(batch, clients, r / (n - 1), steps, batch_size, lr)
            times.append(clock(args.device) - start)
        server.end_stage(t)
        if not measured:
            continue
        round_s[t + 1] = statistics.median(times[1:])       # the stage's first round warms up
        stage_s = round_s[t + 1] * config["rounds"]
        if "b" in args.parts and t + 1 != stages[0]:
            row("b", f"round at stage {t + 1} / stage {stages[0]} of {len(batches)}", seconds(round_s[t + 1]),
                seconds(round_s[stages[0]]), round_s[t + 1] / round_s[stages[0]], "<= 1.1")
        if "c" not in args.parts:
            continue
        start = clock(args.device)
        {cid: server.evaluate(clients[cid]) for b in batches[:t + 1] for cid in b}
        evaluation = clock(args.device) - start
        row("c", f"evaluation of {sum(map(len, batches[:t + 1]))} clients after stage {t + 1} / the stage's "
                 f"{config['rounds']} rounds", seconds(evaluation), seconds(stage_s), evaluation / stage_s)
        if t > 0 and replays:
            start = clock(args.device)
            report = server.replay(clients, t, config["seed"])
            replayed = clock(args.device) - start
            row("c", f"replay after stage {t + 1} (synthesis {report['synthesis_s']:.1f} s, {len(report['tried'])} "
                     f"of {sum(map(len, batches[:t]))} earlier clients tried) / the stage's {config['rounds']} rounds",
                seconds(replayed), seconds(stage_s), replayed / stage_s)


# --------------------------------------------------------------------------------------------------
# (e) server memory as batches join, and the checkpoint
# --------------------------------------------------------------------------------------------------

def storage_bytes(tensors):
    """Bytes of the distinct storages behind `tensors` (expanded views and aliases counted once)."""
    seen, total = set(), 0
    for t in tensors:
        key = (t.device, t.untyped_storage().data_ptr())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def server_memory(server):
    """{part: bytes} of everything the server holds between rounds."""
    parts = defaultdict(list)
    for name, t in list(server.hypernet.named_parameters()) + list(server.hypernet.named_buffers()):
        if name in PER_CLIENT:
            parts["per-client state"].append(t)
        elif name.startswith("adapters."):
            parts["per-batch adapters"].append(t)
        elif name.startswith("gates."):
            parts["masks"].append(t)
        else:
            parts["hypernetwork"].append(t)
    parts["masks"] += [m for m in server.free.values() if torch.is_tensor(m)]   # the stage's partly free masks
    parts["optimizer state"] = [s for state in server.optimizer.state.values() for s in state.values()]
    parts["per-client state"] += [b for stats in server.bn_stats.values() for b in stats.values()]
    parts["per-client state"] += list(server.label_counts.values())
    parts["dreams kept for replay"] = [t for dreams in server.dreams.values() for t in dreams]
    return {name: storage_bytes(ts) for name, ts in parts.items()}


def checkpoint_bytes(config, device, server, num_clients):
    """Size of the checkpoint train.py would write (checkpoint.capture) for this server."""
    clients = [SimpleNamespace(generator=torch.Generator(), steps_trained=0) for _ in range(num_clients)]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, checkpoint.FILENAME)
        checkpoint.save(path, checkpoint.capture(config, device, server, clients, np.random.default_rng(0),
                                                 train.OnboardingState()))
        return os.path.getsize(path)


def finished_run(server, config, num_classes=10, image_size=32):
    """What a finished run holds for every client: label counts and, where replay runs, the dreams of every
    client of the earlier batches (an upper bound: replay keeps the dreams of the clients it tried)."""
    for cid in server.batch_of:
        server.label_counts[cid] = torch.zeros(num_classes, dtype=torch.long)
    if getattr(server, "replay_settings", None) is None:
        return
    n, device = config["replay_images"], server.hypernet.client_embeddings.device
    for cid in (c for b in server.batches[:-1] for c in b):
        server.dreams[cid] = (torch.zeros(n, 3, image_size, image_size, device=device),
                              torch.zeros(n, dtype=torch.long, device=device), torch.zeros(n, num_classes, device=device))


def part_e(args, width, clients_per_batch, batch_counts):
    first = None
    for num_batches in batch_counts:
        config = protocol(args, width=width, batches=num_batches, clients_per_batch=clients_per_batch)
        torch.manual_seed(0)
        server, _, model, _ = train.build_server(config, args.device, 10, 32, servers=SERVERS)
        faults.screen(server)
        server.begin_stage(0)
        finished_run(server, config)
        parts = server_memory(server)
        total, size = sum(parts.values()), checkpoint_bytes(config, args.device, server, len(server.batch_of))
        first = first or (total, size, num_batches)
        split = ", ".join(f"{name} {mib(b)}" for name, b in parts.items())
        row("e", f"server memory, width {width}, {num_batches} x {clients_per_batch} clients ({split}) / "
                 f"{first[2]} batch", mib(total), mib(first[0]), total / first[0])
        row("e", f"checkpoint, width {width}, {num_batches} batches / {first[2]} batch", mib(size), mib(first[1]),
            size / first[1])
        del server, model


# --------------------------------------------------------------------------------------------------
# (f) our chunked hypernetwork against pFedHN's, one linear head per target tensor
# --------------------------------------------------------------------------------------------------

class PerTensorHyperNetwork(nn.Module):
    """pFedHN's hypernetwork (Shamsian et al., ICML 2021): client embedding -> MLP trunk -> one linear head
    per target tensor, each emitting the whole tensor. Same embedding and trunk sizes as ours."""

    def __init__(self, target, num_clients, embed_dim=32, hidden=128, num_layers=3):
        super().__init__()
        self.layout = hn.WeightLayout(target)
        self.client_embeddings = nn.Parameter(torch.randn(num_clients, embed_dim))
        sizes = [embed_dim] + [hidden] * num_layers
        self.trunk = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.heads = nn.ModuleList(nn.Linear(hidden, n) for n in self.layout.numels)

    def forward(self, client_ids):
        h = self.client_embeddings[torch.as_tensor(client_ids, device=self.client_embeddings.device)]
        for layer in self.trunk:
            h = torch.relu(layer(h))
        return torch.cat([head(h) for head in self.heads], dim=1)


def target_weights(width):
    with torch.device("meta"):              # shapes only: nothing is allocated
        model = hn.ResNet18(10, width)
        return count_parameters(model), max(p.numel() for p in model.parameters())


def pfedhn_bytes(width, clients_per_round, hidden=128):
    """What pFedHN's round needs at its peak, worked out before anything is allocated: parameters, their
    gradients and Adam's two moments (4 x P floats), the two temporaries Adam's step makes for its largest
    head, and the round's generated weights, their concatenation, the deltas and the scaled deltas."""
    weights, largest = target_weights(width)
    params = (hidden + 1) * weights
    return 4 * (4 * params + 2 * (hidden + 1) * largest + 4 * clients_per_round * weights)


def largest_fitting_width(device, clients_per_round, hidden, cap=64):
    budget = 0.8 * available_bytes(device)
    fitting = [w for w in range(8, cap + 1) if pfedhn_bytes(w, clients_per_round, hidden) <= budget]
    return max(fitting) if fitting else None


def time_rounds(device, one_round, rounds):
    one_round()                                                      # warm-up
    times = []
    for _ in range(rounds):
        start = clock(device)
        one_round()
        times.append(clock(device) - start)
    return statistics.median(times)


def part_f(args, width, rounds):
    config = protocol(args, width=width)
    n = config["clients_per_round"]
    torch.manual_seed(0)
    # Ours, as train.py runs it: the masked Adam (federated.Server), the gates, the fault screen.
    server, batches, model, _ = train.build_server(config, args.device, 10, 32, servers=SERVERS)
    faults.screen(server)
    server.begin_stage(0)
    num_clients, weights = len(server.batch_of), count_parameters(model)
    deltas = 1e-3 * torch.randn(n, weights, device=args.device)     # what the clients would send back
    ids = sorted(batches[0][:n])
    updates = [fl.ClientUpdate(deltas[k], {k_: b.clone() for k_, b in server.bn_stats[c].items()},
                               torch.zeros(10, dtype=torch.long), 0.0) for k, c in enumerate(ids)]

    def ours_round():
        flat = server.hypernet(ids, [0] * n, s=server.gate_scale)
        server.update(ids, flat, updates)
    ours_s = time_rounds(args.device, ours_round, rounds)
    hypernet = server.hypernet
    ours_bytes = (storage_bytes(list(hypernet.parameters()) + list(hypernet.buffers()))          # parameters
                  + sum(p.numel() * p.element_size() for p in hypernet.parameters())            # their gradients
                  + storage_bytes([s for st in server.optimizer.state.values() for s in st.values()])
                  + storage_bytes([m for m in server.free.values() if torch.is_tensor(m)])      # the masks
                  + deltas.numel() * 4)                                                         # the output
    ours_params = count_parameters(hypernet)
    del server, updates, hypernet

    # pFedHN: the same trunk, a head per tensor, torch's Adam with gradients clipped in place (its recipe).
    net = PerTensorHyperNetwork(model, num_clients, embed_dim=config["embed_dim"], hidden=config["hidden"],
                                num_layers=config["hyper_layers"]).to(args.device)
    params = list(net.parameters())
    optimizer = torch.optim.Adam(params, lr=config["server_lr"])

    def pfedhn_round():
        flat = net(ids)
        for p, g in zip(params, torch.autograd.grad(flat, params, grad_outputs=-deltas / n)):
            p.grad = g
        torch.nn.utils.clip_grad_norm_(params, 50.0)
        optimizer.step()
    theirs_s = time_rounds(args.device, pfedhn_round, rounds)
    theirs_params = count_parameters(net)
    theirs_bytes = (storage_bytes(params + [s for st in optimizer.state.values() for s in st.values()
                                            if s.dim() > 0])
                    + storage_bytes([p.grad for p in params]) + deltas.numel() * 4)
    del net, optimizer, params
    what = f"width {width}, {n} clients per round"
    row("f", f"hypernetwork parameters, ours / pFedHN's ({what})", f"{ours_params / 1e6:.2f} M",
        f"{theirs_params / 1e6:.1f} M", ours_params / theirs_params, "< 1")
    row("f", f"generation + update per round, ours / pFedHN's ({what})", seconds(ours_s), seconds(theirs_s),
        ours_s / theirs_s, "< 1")
    row("f", f"memory in a round (parameters, gradients, optimizer state, masks, output), ours / pFedHN's "
             f"({what})", mib(ours_bytes), mib(theirs_bytes), ours_bytes / theirs_bytes, "< 1")


# --------------------------------------------------------------------------------------------------

def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", default="a,b,c,e,f", help="which lines to measure (default all: a,b,c,e,f)")
    p.add_argument("--method", default="pfeddsh", choices=["pfeddsh", "pfeddsh-ext"],
                   help="whose server (default pfeddsh, the paper's; pfeddsh-ext is ours, with adapters)")
    p.add_argument("--widths", default="16,64", help="(a): ResNet-18 widths; 16 runs cpu-demo, others "
                                                     "--wide-steps x --wide-clients")
    p.add_argument("--rounds", type=int, default=10, help="(a) timed rounds at width 16 (default 10)")
    p.add_argument("--wide-steps", type=int, default=50, help="(a) local steps at other widths (default 50, "
                                                              "the paper protocol's)")
    p.add_argument("--wide-clients", type=int, default=1,
                   help="(a) clients per round at other widths (default 1: the server's share is largest with one "
                        "client, so the ratio is an upper bound for more)")
    p.add_argument("--wide-rounds", type=int, default=1,
                   help="(a) timed rounds at other widths (default 1: at width 64 one round is over a minute)")
    p.add_argument("--stages", default="1,5,10", help="(b, c) stages measured; the run has as many batches as "
                                                      "the largest (default 1,5,10)")
    p.add_argument("--memory-widths", default="16,64", help="(e) widths (16: 5 clients per batch as cpu-demo; "
                                                            "others 10, as the paper protocol)")
    p.add_argument("--memory-batches", default="1,5,10,50")
    p.add_argument("--f-widths", default="16,max", help="(f) widths; max = the largest (<= 64) where "
                                                        "pFedHN's fits in 80%% of the available memory")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's, which follows OMP_NUM_THREADS)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="every part at toy sizes, seconds: a smoke test")
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                               else ("cpu" if args.device == "auto" else args.device))
    args.parts = set(args.parts.split(","))
    stages = [int(s) for s in args.stages.split(",")]
    widths = [int(w) for w in args.widths.split(",")]
    memory_widths = [int(w) for w in args.memory_widths.split(",")]
    memory_batches = [int(b) for b in args.memory_batches.split(",")]
    f_widths, repeats = args.f_widths.split(","), 2
    args.scale = {}
    sizes = dict(num_train=50_000, num_test=10_000)
    if args.quick:      # toy sizes: checks that every line runs, says nothing about performance
        args.scale = dict(width=8, hidden=16, chunk_size=256, local_steps=2, batch_size=8, rounds=4,
                          replay_images=4, replay_iterations=2, replay_steps=2)
        sizes = dict(num_train=2_000, num_test=400)
        args.rounds, args.wide_steps, args.wide_rounds, widths = 2, 2, 1, [8, 12]
        stages, memory_widths, memory_batches, f_widths, repeats = [1, 3], [8], [1, 5], ["8", "max"], 1

    print(f"machine: {machine(args.device)}")
    print(f"command: python benchmarks/performance.py {' '.join(sys.argv[1:])}".rstrip())
    print("| | what | ours | reference | ratio | target |")
    print("|---|---|---|---|---|---|")
    dataset = fake_cifar10(args.device, **sizes)
    demo = protocol(args)
    if "a" in args.parts:
        for width in widths:
            cpu_demo = width == demo["width"]
            part_a(args, dataset, width, demo["local_steps"] if cpu_demo else args.wide_steps,
                   demo["clients_per_round"] if cpu_demo else args.wide_clients,
                   args.rounds if cpu_demo else args.wide_rounds, demo["local_steps"] if cpu_demo else 2)
    if args.parts & {"b", "c"}:
        part_bc(args, dataset, stages, args.rounds if not args.quick else 2)
    if "e" in args.parts:
        for width in memory_widths:
            part_e(args, width, 5 if width == demo["width"] else 10, memory_batches)
    if "f" in args.parts:
        for w in f_widths:
            width = largest_fitting_width(args.device, demo["clients_per_round"], demo["hidden"],
                                          cap=12 if args.quick else 64) if w == "max" else int(w)
            if width is None:
                print("| (f) | pFedHN's hypernetwork does not fit in 80% of this machine's memory at any width "
                      ">= 8 | | | | |")
                continue
            need = pfedhn_bytes(width, demo["clients_per_round"], demo["hidden"])
            budget = 0.8 * available_bytes(args.device)
            row("f", f"pFedHN's estimated peak / 80% of the available memory (width {width})", mib(need),
                mib(budget), need / budget, "<= 1")
            part_f(args, width, repeats)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(args.device), "method": args.method, "rows": ROWS}, f, indent=1)


if __name__ == "__main__":
    main()

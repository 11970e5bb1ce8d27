"""The same server and clients on Flower: `--engine flower` (docs/flower.md).

The method does not change. train.onboard drives federated.Server (or a baseline) exactly as with
`--engine local`; only the clients it is handed live elsewhere. Each one is a Flower ClientApp on a node
of its own, and the server talks to it with Flower's Message API:

  message type        the server sends                         the client answers (numbers only)
  query               the data setup (which dataset, seed ...)  its client id, split sizes, channel mean/std
  train               its generated weights + BN statistics     exactly a federated.ClientUpdate: delta, BN
                      and K, batch size, lr                     statistics, label counts, mean loss
  evaluate            weights + BN statistics, split names      accuracy and mean loss on each split
  evaluate.confirm    weights before and after replay           the four numbers of the paired test

Owns:
  * the ClientApp (`client_app`): rebuilds its federated.Client from the data it holds, answers one
    message, and keeps its minibatch generator's state in the node's Flower Context between messages.
  * Nodes: which node is which client. The server asks every node that appears (`query`); a stage waits
    until the nodes of its batch have registered. Every exchange has a deadline (`--node-timeout`).
  * RemoteClient: what federated.Server calls a client (local_train, evaluate, accuracy, confirm), as
    messages. A node that errors or misses the deadline counts as a dropped update, exactly as a
    non-finite update does today (faults.dropped_updates, no server step from it); its evaluations are
    NaN. Every unanswered message is also counted in faults.unanswered_messages.
  * run(): the in-process simulation (Flower's simulation engine, Ray) or, given a Grid, a real
    SuperLink; and `server_app` for `flwr run` on a real SuperLink (pyproject.toml names both apps).

This is the only file that imports flwr: federated.py and the method files never do.
"""
import math
import os
import shlex
import time

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

import federated as fl
from extensions import selection

# What a client needs to build its own data: the same split on every node (train.py's settings).
SETUP_KEYS = ("dataset", "data_dir", "batches", "clients_per_batch", "classes_per_client", "partition", "alpha",
              "val_fraction", "seed", "width")


def to_record(tensors):
    """{name: tensor} -> ArrayRecord (float32 and int64 survive the trip bit for bit)."""
    return ArrayRecord(torch_state_dict={n: t.detach().cpu() for n, t in tensors.items()})


def from_record(record, device="cpu"):
    return {n: t.to(device) for n, t in record.to_torch_state_dict().items()}


# ------------------------------------------------------------------------------------------------------
# The client side: one ClientApp, one federated.Client per node
# ------------------------------------------------------------------------------------------------------

client_app = ClientApp()
_DATA = {}       # per process: (setup, data dir, device) -> (dataset, splits, model, layout); a Ray actor
_CLIENTS = {}    # serves many messages, a real node starts one process per message and rebuilds


def client_id(context):
    """A real node says who it is (`--node-config client-id=3`); a simulated one is partition i."""
    node_config = context.node_config
    return int(node_config["client-id"] if "client-id" in node_config else node_config["partition-id"])


def local_client(message, context):
    """This node's federated.Client, with its generator where the previous message left it."""
    import data
    import hypernet as hn
    import train
    from shell import datasets

    setup = dict(message.content["setup"])
    data_dir = str(context.node_config.get("data-dir", setup["data_dir"]))    # the node's own path wins
    device = str(context.node_config.get("device", setup.get("device", "cpu")))   # a real node's own wins
    key = (tuple(sorted(setup.items())), data_dir, device)
    if key not in _DATA:
        datasets.prepare(setup["dataset"], data_dir)
        dataset = data.load_dataset(setup["dataset"], data_dir, device=device)
        splits = train.client_splits(setup, dataset)      # setup holds the config's keys (0 for None)
        model = hn.ResNet18(dataset.num_classes, setup["width"]).to(device)
        _DATA[key] = dataset, splits, model, hn.WeightLayout(model)
    cid = client_id(context)
    if (key, cid) not in _CLIENTS:
        dataset, splits, model, layout = _DATA[key]
        if not 0 <= cid < len(splits):
            raise ValueError(f"client id {cid} is not one of this run's {len(splits)} clients")
        _CLIENTS[key, cid] = fl.Client(cid, dataset, splits[cid], model, layout, setup["seed"])
    client = _CLIENTS[key, cid]
    # The node's Context outlives this process: the generator goes on from where the last message left it,
    # so the client draws the same minibatches as in one process.
    if "generator" in context.state:
        client.generator.set_state(from_record(context.state["generator"])["state"])
    return client


def reply(message, **records):
    return Message(RecordDict(records), reply_to=message)


@client_app.query()
def query(message, context):
    client = local_client(message, context)
    return reply(message, info=ConfigRecord({
        "client-id": client.cid, "train-size": len(client.y_train), "test-size": len(client.y_test),
        "mean": list(client.mean), "std": list(client.std)}))


@client_app.train()
def train(message, context):
    client = local_client(message, context)
    c = message.content["config"]
    update = client.local_train(from_record(message.content["weights"])["flat"],
                                from_record(message.content["bn"]), c["steps"], c["batch-size"], c["lr"])
    context.state["generator"] = to_record({"state": client.generator.get_state()})
    return reply(message, delta=to_record({"delta": update.delta}), bn=to_record(update.bn_stats),
                 counts=to_record({"label_counts": update.label_counts}), metrics=MetricRecord({"loss": update.loss}))


@client_app.evaluate()
def evaluate(message, context):
    client = local_client(message, context)
    flat, bn = from_record(message.content["weights"])["flat"], from_record(message.content["bn"])
    scores = {}
    for split in message.content["config"]["splits"]:      # the validation halves are replay selection's
        if split in selection.HALVES:
            scores[f"{split}-accuracy"], scores[f"{split}-loss"] = selection.Halves(client).evaluate(flat, bn, split)
        else:
            scores[f"{split}-accuracy"], scores[f"{split}-loss"] = client.evaluate(flat, bn, split), math.nan
    return reply(message, metrics=MetricRecord(scores))


@client_app.evaluate("confirm")
def confirm(message, context):
    client = local_client(message, context)
    weights = from_record(message.content["weights"])
    gained, lost, drop, error = selection.Halves(client).confirm(weights["before"], weights["after"],
                                                                from_record(message.content["bn"]))
    return reply(message, metrics=MetricRecord({"gained": gained, "lost": lost, "drop": drop, "error": error}))


# ------------------------------------------------------------------------------------------------------
# The server side: nodes, and clients that are messages
# ------------------------------------------------------------------------------------------------------

class Nodes:
    """Which node is which client, and every exchange with them (with its deadline)."""

    def __init__(self, grid, setup, batches, timeout, device):
        self.grid, self.setup, self.batches, self.timeout, self.device = grid, setup, batches, timeout, device
        self.node_of, self.info, self.asked, self.waited = {}, {}, set(), set()
        self.faults = {"unanswered_messages": 0}
        self.pending = []        # training requests not sent yet (PendingUpdate)

    def exchange(self, requests):
        """[(client id, message type, {name: record})] -> [reply content, or None if it did not come]."""
        self.send_pending()
        return self._exchange(requests)

    def _exchange(self, requests):
        messages, slots = [], []
        for cid, kind, records in requests:
            node = self.node_of.get(cid)
            if node is None:
                slots.append(None)
                continue
            records = dict(records, setup=ConfigRecord(self.setup))
            slots.append(len(messages))
            messages.append(Message(RecordDict(records), dst_node_id=node, message_type=kind))
        replies = {}
        if messages:
            for r in self.grid.send_and_receive(messages, timeout=self.timeout):
                replies[r.metadata.reply_to_message_id] = r
        out = []
        for slot in slots:
            r = None if slot is None else replies.get(messages[slot].metadata.message_id)
            if r is None or r.has_error():
                self.faults["unanswered_messages"] += 1
                out.append(None)
            else:
                out.append(r.content)
        return out

    def register(self):
        """Ask every node not asked yet which client it is (once: a node that did not answer stays unknown)."""
        new = [n for n in self.grid.get_node_ids() if n not in self.asked]
        self.asked.update(new)
        if not new:
            return
        messages = [Message(RecordDict({"setup": ConfigRecord(self.setup)}), dst_node_id=n, message_type="query")
                    for n in new]
        for r in self.grid.send_and_receive(messages, timeout=self.timeout):
            if r.has_error():
                print(f"node {r.metadata.src_node_id} could not say which client it is: {r.error.reason}")
                continue
            info = r.content["info"]
            cid = int(info["client-id"])
            if cid in self.node_of:
                print(f"node {r.metadata.src_node_id} says it is client {cid}, which node {self.node_of[cid]} "
                      "already is: ignored")
                continue
            self.node_of[cid], self.info[cid] = r.metadata.src_node_id, dict(info)

    def wait_for(self, cids):
        """A stage starts once its batch's nodes have registered, or after --node-timeout without them."""
        deadline = time.time() + self.timeout
        while True:
            self.register()
            missing = [c for c in cids if c not in self.node_of]
            if not missing or time.time() > deadline:
                break
            time.sleep(0.5)
        if missing:
            print(f"clients {missing} have no node after {self.timeout:g} s: their messages count as unanswered")

    def stage_of(self, cid):
        return next(t for t, ids in enumerate(self.batches) if cid in ids)

    # training requests wait until the round reads its first update, then go out together
    def send_pending(self):
        pending, self.pending = self.pending, []
        if pending:
            for p, content in zip(pending, self._exchange([p.request for p in pending])):
                p.resolve(content)


class PendingUpdate:
    """A federated.ClientUpdate still on its way.

    Server.train_round asks all of a round's clients to train before it reads any update. Sending each
    request the moment it is made would train the nodes one after another; instead the first read sends
    the round's requests together, so the nodes train at the same time. A node that does not answer
    gives a non-finite update, which the server drops exactly as it drops a diverged one."""

    def __init__(self, nodes, request, flat, bn_stats):
        self.nodes, self.request, self.flat, self.bn_stats_sent, self.update = nodes, request, flat, bn_stats, None

    def resolve(self, content):
        if content is None:
            self.update = fl.ClientUpdate(delta=torch.full_like(self.flat, math.nan), bn_stats=self.bn_stats_sent,
                                          label_counts=torch.zeros(0, dtype=torch.long), loss=math.nan)
        else:
            device = self.nodes.device
            self.update = fl.ClientUpdate(delta=from_record(content["delta"], device)["delta"],
                                          bn_stats=from_record(content["bn"], device),
                                          label_counts=from_record(content["counts"])["label_counts"],
                                          loss=float(content["metrics"]["loss"]))

    def result(self):
        if self.update is None:
            self.nodes.send_pending()
        return self.update

    delta = property(lambda self: self.result().delta)
    bn_stats = property(lambda self: self.result().bn_stats)
    label_counts = property(lambda self: self.result().label_counts)
    loss = property(lambda self: self.result().loss)


class RemoteClient:
    """What federated.Server and the baselines call a client, as messages to the client's node."""

    def __init__(self, cid, nodes):
        self.cid, self.nodes = cid, nodes
        self.steps_trained = 0      # the steps asked of its node (results.json's local_steps)

    def _info(self, key, default):
        return self.nodes.info.get(self.cid, {}).get(key, default)

    # the server only ever takes len() of these: the sizes the client reported, never its data
    y_train = property(lambda self: range(self._info("train-size", 0)))
    y_test = property(lambda self: range(self._info("test-size", 0)))

    def _ready(self):
        """The first message of a batch waits for the batch's nodes; later ones only look for late nodes."""
        if self.cid not in self.nodes.node_of:
            t = self.nodes.stage_of(self.cid)
            if t in self.nodes.waited:
                self.nodes.register()
            else:
                self.nodes.waited.add(t)
                self.nodes.wait_for(self.nodes.batches[t])

    def local_train(self, flat_weights, bn_stats, steps, minibatch_size, lr):
        self._ready()
        self.steps_trained += steps
        request = (self.cid, "train", {"weights": to_record({"flat": flat_weights}), "bn": to_record(bn_stats),
                                       "config": ConfigRecord({"steps": steps, "batch-size": minibatch_size, "lr": lr})})
        pending = PendingUpdate(self.nodes, request, flat_weights.detach(), bn_stats)
        self.nodes.pending.append(pending)
        return pending

    def _scores(self, flat_weights, bn_stats, splits):
        self._ready()
        content, = self.nodes.exchange([(self.cid, "evaluate", {
            "weights": to_record({"flat": flat_weights}), "bn": to_record(bn_stats),
            "config": ConfigRecord({"splits": list(splits)})})])
        if content is None:
            return {s: (math.nan, math.nan) for s in splits}
        m = content["metrics"]
        return {s: (float(m[f"{s}-accuracy"]), float(m[f"{s}-loss"])) for s in splits}

    def evaluate(self, flat_weights, bn_stats, split="test"):
        """Accuracy, as federated.Client.evaluate; (accuracy, loss) on a half of the validation split, as
        extensions.selection.Halves.evaluate."""
        scores = self._scores(flat_weights, bn_stats, [split])[split]
        return scores if split in selection.HALVES else scores[0]

    def confirm(self, flat_before, flat_after, bn_stats):
        """No answer: None, and replay leaves the client as it was (replay.run_replay)."""
        self._ready()
        content, = self.nodes.exchange([(self.cid, "evaluate.confirm", {
            "weights": to_record({"before": flat_before, "after": flat_after}), "bn": to_record(bn_stats)})])
        if content is None:
            return None
        metrics = content["metrics"]
        return int(metrics["gained"]), int(metrics["lost"]), float(metrics["drop"]), float(metrics["error"])


def channel_stats(nodes):
    """The dataset's normalisation (the same on every node), from the first client that registered."""
    info = next(iter(nodes.info.values()), {"mean": [0.0] * 3, "std": [1.0] * 3})
    return tuple(info["mean"]), tuple(info["std"])


# ------------------------------------------------------------------------------------------------------
# Running it: simulation in this process, or a Grid from a real SuperLink
# ------------------------------------------------------------------------------------------------------

def run(config, batches, train, device, grid=None):
    """`train(clients, nodes)` (train.py's onboarding) with every client on a Flower node.

    grid None: Flower's simulation engine in this process, one virtual node per client (partition i is
    client i). Returns train's result."""
    setup = {k: (config[k] if config[k] is not None else 0) for k in SETUP_KEYS}   # records hold no None
    setup["device"] = device.type       # simulated nodes train where the run does (and draw the same minibatches)
    setup["data_dir"] = os.path.abspath(setup["data_dir"])
    num_clients = sum(len(b) for b in batches)

    def main(grid):
        nodes = Nodes(grid, setup, batches, config["node_timeout"], device)
        nodes.waited.add(0)
        nodes.wait_for(batches[0])
        return train([RemoteClient(cid, nodes) for cid in range(num_clients)], nodes)

    if grid is not None:
        return main(grid)

    from flwr.simulation import run_simulation
    import logging
    logging.getLogger("flwr").setLevel(logging.WARNING)     # one line per message otherwise
    result = {}
    server_app = ServerApp()

    @server_app.main()
    def simulated_main(grid, context):
        result["value"] = main(grid)

    # Ray's workers import this file by name: they must find it wherever the run was started from.
    here = os.path.dirname(os.path.abspath(__file__))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in [here, os.environ.get("PYTHONPATH")] if p)
    # One worker with as many threads as this process: the nodes train one after another on this machine,
    # with the same kernels as --engine local, so the numbers are the same.
    threads = torch.get_num_threads()
    gpus = 1 if device.type == "cuda" else 0      # one worker, on the run's GPU
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=num_clients,
                   backend_config={"client_resources": {"num_cpus": threads, "num_gpus": gpus},
                                   "init_args": {"num_cpus": threads, "num_gpus": gpus, "include_dashboard": False}})
    return result["value"]


# `flwr run` on a real SuperLink: the run config's "args" is train.py's command line.
server_app = ServerApp()


@server_app.main()
def deployed_main(grid: Grid, context: Context):
    from shell import cli
    argv = shlex.split(str(context.run_config.get("args", ""))) + ["--engine", "flower"]
    code = cli.cli(argv, grid=grid)
    if code:
        raise SystemExit(code)

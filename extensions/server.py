"""Ours: the server of `--method pfeddsh-ext`, the core's Server with every extension of this folder plugged
in (a registry entry, built as the shell builds a baseline)."""
import federated as fl
import masks
import train
from extensions import adapters, borrow, selection


class ExtendedServer(fl.Server):
    def __init__(self, hypernet, model, batches, *, adapter_lr, selection_settings, **settings):
        super().__init__(hypernet, model, batches, **settings)
        if hypernet.adapters is None:           # the paper's shape: the client offsets stay exactly zero
            del self.params["client_offsets"]
        # A new batch has a stage of tens of server steps to move its adapter and offsets as far as the
        # classifier's own scale: at the hypernetwork's rate it would not get there, so they have their own.
        rates = {name: adapter_lr for name in self.params
                 if name.startswith("adapters.") or name in ("client_offsets", "client_classifiers")}
        self.optimizer = masks.ServerOptimizer(self.params, lr=settings.get("server_lr", 3e-3),
                                               lr_of=rates if adapter_lr else {})
        self.selection_settings = selection_settings

    def free_masks(self):
        adapters = self.hypernet.adapters
        return dict(super().free_masks(), **(adapters.free_masks(self.stage) if adapters is not None else {}))

    def replay(self, clients, t, seed, progress=None):
        return selection.replay(self, clients, t, seed=seed + t, progress=progress, **self.replay_settings,
                                **self.selection_settings)


def build(config, device, model, batches, image_size):
    """The registry entry: (server, layout) for `--method pfeddsh-ext`."""
    num_clients = config["batches"] * config["clients_per_batch"]
    gates = borrow.BorrowGates(config["batches"], config["hyper_layers"], config["hidden"], num_clients,
                               s_max=config["s_max"], lr=config["gate_lr"])
    hypernet = adapters.ExtendedHyperNetwork(
        model, num_clients, embed_dim=config["embed_dim"], hidden=config["hidden"], num_layers=config["hyper_layers"],
        chunk_size=config["chunk_size"], gates=gates, adapter_budget=config["adapter_budget"]).to(device)
    replays = not config["no_replay"]
    server = ExtendedServer(
        hypernet, model, batches, server_lr=config["server_lr"],
        sparsity=config["sparsity"], image_size=image_size, adapter_lr=config["adapter_lr"],
        replay={k: v for k, v in train.replay_settings(config).items() if k != "keep"} if replays else None,
        selection_settings=dict(validate_every=config["replay_validate_every"],
                                confirm_alpha=config["replay_confirm_alpha"], control=config["replay_control"]))
    return server, hypernet.layout

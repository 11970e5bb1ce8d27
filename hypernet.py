"""The server's hypernetwork and the ResNet-18 it generates (paper: the "central hypernetwork"; docs/design.md §3).

Owns, in reading order:
  1. ResNet18       the target model every client runs, run *functionally* on weights the hypernetwork
                    generates plus the client's own BatchNorm statistics (never generated). WeightLayout
                    turns its parameters into one flat vector and back.
  2. HyperNetwork   client embedding v_i + chunk embedding c_j -> MLP trunk -> one shared linear head that
                    emits one chunk of the flat weight vector. The trunk's hidden units are gated per batch
                    of clients: that is the "sub-hypernetwork" (the gates live in masks.py).
How the hypernetwork learns (pFedHN's update) is the server's business: federated.Server.update.

pFedHN: Shamsian et al., "Personalized Federated Learning using Hypernetworks", ICML 2021.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call


# --------------------------------------------------------------------------------------------------
# 1. The target model: CIFAR ResNet-18 (BasicBlock [2, 2, 2, 2], 3x3 stem, no max-pool)
# --------------------------------------------------------------------------------------------------
# Names follow torchvision's resnet18 (conv1, bn1, layer1.0.conv1, ..., fc), so a test can load
# torchvision's weights into it and check that the functional call computes the same function.

class BasicBlock(nn.Module):
    def __init__(self, in_planes, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                                            nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


class ResNet18(nn.Module):
    """width=64 is the standard ResNet-18 (11.17 M parameters for 10 classes); smaller widths for CPUs."""

    def __init__(self, num_classes=10, width=64):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        in_planes = width
        for i, (planes, stride) in enumerate(zip([width, 2 * width, 4 * width, 8 * width], [1, 2, 2, 2])):
            setattr(self, f"layer{i + 1}", nn.Sequential(BasicBlock(in_planes, planes, stride),
                                                        BasicBlock(planes, planes, 1)))
            in_planes = planes
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x):
        # torch's CPU convolution backward crashes on channels-last input (data.augment's) with 2 to 7 channels.
        x = x.contiguous() if self.conv1.out_channels < 8 else x
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class WeightLayout:
    """The model's parameters as one flat vector and back: what the hypernetwork emits and clients return."""

    def __init__(self, model):
        self.names = [n for n, _ in model.named_parameters()]
        self.shapes = [p.shape for _, p in model.named_parameters()]
        self.numels = [p.numel() for _, p in model.named_parameters()]
        self.num_weights = sum(self.numels)
        self.starts = torch.tensor([0] + self.numels).cumsum(0)[:-1].tolist()
        self.classifier_index = self.index_of(lambda name, shape: name.startswith("fc."))

    def index_of(self, chosen):
        """Flat positions of every parameter for which chosen(name, shape) holds."""
        return torch.cat([torch.arange(s, s + n) for s, n, name, shape in
                          zip(self.starts, self.numels, self.names, self.shapes) if chosen(name, shape)])

    def unflatten(self, flat):
        """Flat vector -> {parameter name: tensor (a view)} for run_model."""
        return dict(zip(self.names, (t.view(s) for t, s in zip(flat.split(self.numels), self.shapes))))

    def flatten(self, weights):
        return torch.cat([weights[n].reshape(-1) for n in self.names])


def bn_stats_init(model):
    """A fresh client's BatchNorm running statistics (mean 0, var 1): what it owns, never generated."""
    return {name: buf.detach().clone() for name, buf in model.named_buffers()}


def run_model(model, weights, bn_stats, x):
    """Run the target on generated `weights` and a client's `bn_stats`. In train mode BatchNorm updates the
    client's own bn_stats tensors in place: exactly the statistics DeepInversion later inverts."""
    return functional_call(model, (weights, bn_stats), (x,))


# --------------------------------------------------------------------------------------------------
# 2. The chunked hypernetwork
# --------------------------------------------------------------------------------------------------

def init_scale_and_offset(model):
    """Per-entry (scale, offset) that make a freshly generated ResNet start like a freshly initialised one.

    The head emits numbers of order one for every tensor alike; without each tensor's usual scale (He for
    convolutions, 1/sqrt(fan_in) for the classifier, 0.1 around 1 or 0 for BatchNorm) deep layers explode.
    """
    scales, offsets = [], []
    for name, p in model.named_parameters():
        fan_in = p[0].numel() if p.dim() > 1 else None
        scale = math.sqrt(2.0 / fan_in) if p.dim() == 4 else (1.0 / math.sqrt(fan_in) if p.dim() == 2 else 0.1)
        scales.append(torch.full((p.numel(),), scale))
        offsets.append(torch.full((p.numel(),), 1.0 if name.endswith("weight") and p.dim() == 1 else 0.0))
    return torch.cat(scales), torch.cat(offsets)


class HyperNetwork(nn.Module):
    """phi: (client i) -> theta_i, all of ResNet-18's weights, generated chunk by chunk.

    For every chunk j of the flat weight vector the trunk sees [v_i, c_j] and the shared head emits that
    chunk's `chunk_size` numbers (pFedHN's per-tensor heads would need ~1.1 B parameters for ResNet-18).
    Each hidden layer's output is multiplied by the gate of the client's batch (masks.BatchGates); without
    gates (pFedHN) there is none. Generated weights are base + scale * head output: `base` is a learned
    full-size vector shared by everyone (without it the generated models barely follow the clients).
    With gates every client also adds a classifier of its own (`client_classifiers`), which
    Server.begin_stage starts blank for a new client (docs/design.md §4).
    """

    def __init__(self, target, num_clients, embed_dim=32, chunk_embed_dim=32, hidden=128, num_layers=3,
                 chunk_size=4096, gates=None):
        super().__init__()
        self.layout, self.chunk_size = WeightLayout(target), chunk_size
        self.num_chunks = math.ceil(self.layout.num_weights / chunk_size)
        # N(0, 1) as in pFedHN: clients must be told apart from the first round on.
        self.client_embeddings = nn.Parameter(torch.randn(num_clients, embed_dim))
        self.chunk_embeddings = nn.Parameter(torch.randn(self.num_chunks, chunk_embed_dim))
        sizes = [embed_dim + chunk_embed_dim] + [hidden] * num_layers
        self.trunk = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.head = nn.Linear(hidden, chunk_size)
        self.gates = gates
        scale, offset = init_scale_and_offset(target)
        self.register_buffer("scale", scale)
        self.base = nn.Parameter(offset + scale * torch.randn_like(scale))
        self.register_buffer("classifier_index", self.layout.classifier_index.clone())
        self.client_classifiers = None
        if gates is not None:
            self.client_classifiers = nn.Parameter(torch.zeros(num_clients, len(self.classifier_index)))

    def forward(self, client_ids, batch_of_client, s=1.0):
        """Flat weights, shape (len(client_ids), num_weights); batch_of_client[k] picks client k's gate."""
        n = len(client_ids)
        ids = torch.as_tensor(client_ids, device=self.chunk_embeddings.device)
        h = torch.cat([self.client_embeddings[ids].repeat_interleave(self.num_chunks, dim=0),
                       self.chunk_embeddings.repeat(n, 1)], dim=1)
        if self.gates is not None:
            gates = torch.stack([self.gate_of(c, b, s) for c, b in zip(client_ids, batch_of_client)])
            gates = gates.repeat_interleave(self.num_chunks, dim=0)
        for l, layer in enumerate(self.trunk):
            h = torch.relu(layer(h))
            if self.gates is not None:
                h = h * gates[:, l]
        raw = self.head(h).reshape(n, self.num_chunks * self.chunk_size)[:, : self.layout.num_weights]
        return self.personalise(self.base + self.scale * raw, ids, batch_of_client)

    def gate_of(self, client, batch, s):
        """The gate client `client` is generated with: its batch's (extensions may add to it)."""
        return self.gates.gate(batch, s)

    def personalise(self, weights, ids, batch_of_client):
        """What is each client's own on top of the shared generation: its classifier (extensions add more)."""
        if self.client_classifiers is None:
            return weights
        return weights.index_add(1, self.classifier_index, self.client_classifiers[ids])

    def unflatten(self, flat):
        return self.layout.unflatten(flat)

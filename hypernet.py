"""The server's hypernetwork and the ResNet-18 it generates (paper: the "central hypernetwork"; docs/design.md §3).

Owns two things, in reading order:
  1. ResNet18       the target model every client runs: a CIFAR ResNet-18 with a width multiplier. It is
                    run *functionally* (torch.func.functional_call) on weights that the hypernetwork
                    generates, plus the client's own BatchNorm running statistics (never generated).
                    WeightLayout turns its parameters into one flat vector and back.
  2. HyperNetwork   client embedding v_i + chunk embedding c_j -> MLP trunk -> one shared linear head that
                    emits one chunk of the flat weight vector (pFedHN's per-tensor heads would need ~1.1 B
                    parameters for ResNet-18; the shared head has 0.53 M, the whole generator 0.66 M at width 64). The trunk's hidden units
                    are gated per batch of clients: that is the "sub-hypernetwork" (gates live in masks.py).
                    BatchAdapters, the client offsets and the clients' own classifiers are ours.
How the hypernetwork learns (pFedHN's update) is the server's business: federated.Server.update.

pFedHN: Shamsian et al., "Personalized Federated Learning using Hypernetworks", ICML 2021.
"""
import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call


# --------------------------------------------------------------------------------------------------
# 1. The target model: CIFAR ResNet-18 (BasicBlock [2, 2, 2, 2], 3x3 stem, no max-pool)
# --------------------------------------------------------------------------------------------------
# Names follow torchvision's resnet18 (conv1, bn1, layer1.0.conv1, ..., fc) so that a test can load
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

    def __init__(self, num_classes=10, width=64, in_channels=3):
        super().__init__()
        widths = [width, 2 * width, 4 * width, 8 * width]
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        in_planes = width
        for i, (planes, stride) in enumerate(zip(widths, [1, 2, 2, 2])):
            blocks = [BasicBlock(in_planes, planes, stride), BasicBlock(planes, planes, 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            in_planes = planes
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


class WeightLayout:
    """The model's parameters as one flat vector and back: what the hypernetwork emits and clients return."""

    def __init__(self, model):
        self.names = [n for n, _ in model.named_parameters()]
        self.shapes = [p.shape for _, p in model.named_parameters()]
        self.numels = [p.numel() for _, p in model.named_parameters()]
        self.num_weights = sum(self.numels)
        # Flat positions of everything that is not a convolution: BatchNorm gains and biases and the
        # classifier. Small (3.7 k of 0.70 M at width 16), and what a client needs to re-weigh features.
        starts = torch.tensor([0] + self.numels).cumsum(0)[:-1].tolist()
        self.non_conv_index = torch.cat([torch.arange(s, s + n) for s, n, shape in
                                         zip(starts, self.numels, self.shapes) if len(shape) < 4])
        # Flat positions of the classifier (the last layer, fc): the part each new client starts blank.
        self.classifier_index = torch.cat([torch.arange(s, s + n) for s, n, name in
                                           zip(starts, self.numels, self.names) if name.startswith("fc.")])

    def unflatten(self, flat):
        """Flat vector -> {parameter name: tensor (a view)} for run_model."""
        return dict(zip(self.names, (t.view(s) for t, s in zip(flat.split(self.numels), self.shapes))))

    def flatten(self, weights):
        return torch.cat([weights[n].reshape(-1) for n in self.names])


def bn_stats_init(model):
    """A fresh client's BatchNorm running statistics (mean 0, var 1): what it owns, never generated."""
    return {name: buf.detach().clone() for name, buf in model.named_buffers()}


def run_model(model, weights, bn_stats, x):
    """Run the target on generated `weights` and a client's `bn_stats`.

    In train mode F.batch_norm updates the running statistics in place, so the client's own
    bn_stats tensors are what gets updated: exactly the statistics DeepInversion later inverts.
    """
    return functional_call(model, (weights, bn_stats), (x,))


def autocast(device, enabled):
    """bf16 autocast for --amp; when off, no autocast context at all, so fp32 runs stay bitwise as they were.

    bf16 rather than fp16: the same exponent range as fp32, so no loss scaling is needed.
    """
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


# --------------------------------------------------------------------------------------------------
# 2. The chunked hypernetwork
# --------------------------------------------------------------------------------------------------

def init_scale_and_offset(model):
    """Per-entry (scale, offset) that turn the head's raw output into weights of a sensible size.

    The head emits numbers of order one for every tensor alike; multiplying by each tensor's usual
    initialisation scale (He for convolutions, 1/sqrt(fan_in) for the classifier) and adding 1 to the
    BatchNorm gains makes a freshly generated ResNet start like a freshly initialised one. Without it
    every tensor starts at the same scale and deep layers explode or vanish.
    """
    scales, offsets = [], []
    for name, p in model.named_parameters():
        if p.dim() == 4:                        # convolution: He init, fan_in = in_channels * k * k
            scale = math.sqrt(2.0 / p[0].numel())
        elif p.dim() == 2:                      # classifier
            scale = 1.0 / math.sqrt(p.shape[1])
        else:                                   # BatchNorm gain/bias, classifier bias: small moves around 1 / 0
            scale = 0.1
        offset = 1.0 if name.endswith("weight") and p.dim() == 1 else 0.0
        scales.append(torch.full((p.numel(),), scale))
        offsets.append(torch.full((p.numel(),), offset))
    return torch.cat(scales), torch.cat(offsets)


class BatchAdapters(nn.Module):  # ours
    """Each batch's own low-rank offset of the convolutions, written only during its own stage (ours).

    The shared base and every owned unit are frozen once batch 0 has finished (that is what keeps earlier
    clients bitwise unchanged), so without an offset of its own a new batch can adapt only through the
    few free units. A full-size offset per batch fixes that but costs one model per batch. This one is a
    rank-r offset U_b V_b of every convolution (LoRA: Hu et al., ICLR 2022), r the largest rank whose cost
    fits `budget` x the model's weights once `reserved` entries per batch (the clients' own offsets,
    HyperNetwork.client_offsets) are counted. U starts at zero, so the offset starts at exactly zero.
    Batch 0 trains the shared base instead; its offset stays zero.
    """

    def __init__(self, layout, num_batches, budget, reserved=0):
        super().__init__()
        self.layout = layout
        self.conv_dims = {name: (shape[0], shape[1:].numel())              # (out, in * k * k)
                          for name, shape in zip(layout.names, layout.shapes) if len(shape) == 4}
        per_rank = sum(o + i for o, i in self.conv_dims.values())
        self.rank = r = max(0, int((budget * layout.num_weights - reserved) // per_rank))
        self.lora_out = nn.Parameter(torch.zeros(num_batches, sum(o * r for o, _ in self.conv_dims.values())))
        # V ~ N(0, 1/r): an Adam step on U then moves each weight by about the learning rate, as a full offset would.
        self.lora_in = nn.Parameter(torch.randn(num_batches, sum(r * i for _, i in self.conv_dims.values()))
                                    / math.sqrt(max(r, 1)))

    def per_batch_cost(self):
        return self.lora_out.shape[1] + self.lora_in.shape[1]

    def forward(self, batch_ids):
        """(len(batch_ids), num_weights) offsets, one row per client in the call (zero off the convolutions)."""
        n, r = len(batch_ids), self.rank
        outs = self.lora_out[batch_ids].split([o * r for o, _ in self.conv_dims.values()], dim=1)
        ins = self.lora_in[batch_ids].split([r * i for _, i in self.conv_dims.values()], dim=1)
        pieces = iter(zip(outs, ins, self.conv_dims.values()))
        flat = []
        for name, numel in zip(self.layout.names, self.layout.numels):
            if name in self.conv_dims:
                u, v, (o, i) = next(pieces)
                flat.append((u.view(n, o, r) @ v.view(n, r, i)).view(n, numel))
            else:
                flat.append(self.lora_out.new_zeros(n, numel))
        return torch.cat(flat, dim=1)


class HyperNetwork(nn.Module):
    """phi: (client i) -> theta_i, all of ResNet-18's weights, generated chunk by chunk.

    For every chunk j of the flat weight vector the trunk sees [v_i, c_j] (client embedding, chunk
    embedding) and the shared head emits that chunk's `chunk_size` numbers. Each hidden layer's output
    is multiplied by the gate of the client's batch (masks.BatchGates); without masks (pFedHN) the
    gate is all ones.

    Additions of ours (docs/design.md), each zero until trained or started, so they change nothing before:
      * client_offsets: per client, an offset of its non-convolution weights (BatchNorm gains and biases,
        the classifier): a classifier of its own, which a hypernetwork shared by clients with other
        classes gives it only slowly. With adapters the server trains it in the client's own stage and
        nobody writes it afterwards; without adapters it stays zero.
      * adapter_budget > 0 (needs gates) gives every batch a low-rank offset of its own (BatchAdapters).
    With gates, every client also has its own offset of the classifier (client_classifiers, below), in
    both shapes: a new client's starts blank.
    """

    def __init__(self, target, num_clients, embed_dim=32, chunk_embed_dim=32, hidden=128, num_layers=3,
                 chunk_size=4096, gates=None, adapter_budget=0.0):
        super().__init__()
        self.layout = WeightLayout(target)
        self.names, self.num_weights = self.layout.names, self.layout.num_weights
        self.chunk_size = chunk_size
        self.num_chunks = math.ceil(self.num_weights / chunk_size)
        self.hidden, self.num_layers = hidden, num_layers

        # N(0, 1) as in pFedHN: clients must be told apart from the first round on.
        self.client_embeddings = nn.Parameter(torch.randn(num_clients, embed_dim))
        self.chunk_embeddings = nn.Parameter(torch.randn(self.num_chunks, chunk_embed_dim))
        sizes = [embed_dim + chunk_embed_dim] + [hidden] * num_layers
        self.trunk = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.head = nn.Linear(hidden, chunk_size)
        self.gates = gates          # masks.BatchGates, or None for pFedHN
        scale, offset = init_scale_and_offset(target)
        self.register_buffer("scale", scale)
        self.register_buffer("offset", offset)
        # BASE: a learned full-size weight vector shared by all clients (a freshly initialised ResNet).
        self.base = nn.Parameter(offset + scale * torch.randn_like(scale))
        self.register_buffer("non_conv_index", self.layout.non_conv_index.clone())
        self.client_offsets = nn.Parameter(torch.zeros(num_clients, len(self.layout.non_conv_index)))  # ours
        # ours: with gates, each client adds a classifier offset of its own to the classifier's entries (fc),
        # written only in its batch's stage. Server.begin_stage starts a new batch's at minus what the frozen
        # part generates, so a new client starts with a blank decision, not the earlier batches' one.
        self.register_buffer("classifier_index", self.layout.classifier_index.clone())
        self.client_classifiers = None
        if gates is not None:
            self.client_classifiers = nn.Parameter(torch.zeros(num_clients, len(self.classifier_index)))
        self.adapters = None
        if adapter_budget > 0:  # ours
            if gates is None:
                raise ValueError("adapters need gates: without masks every batch writes the shared base anyway")
            num_batches = gates.embeddings.shape[0]
            clients_per_batch = math.ceil(num_clients / num_batches)
            self.adapters = BatchAdapters(self.layout, num_batches, adapter_budget,
                                          reserved=clients_per_batch * self.client_offsets.shape[1])

    def forward(self, client_ids, batch_of_client, s=1.0):
        """Flat weights, shape (len(client_ids), num_weights), for clients in one batched call.

        batch_of_client[k] is the batch (arrival group) of client_ids[k]; it picks the gate.
        """
        n = len(client_ids)
        ids = torch.as_tensor(client_ids, device=self.chunk_embeddings.device)
        v = self.client_embeddings[ids].repeat_interleave(self.num_chunks, dim=0)
        c = self.chunk_embeddings.repeat(n, 1)
        h = torch.cat([v, c], dim=1)
        if self.gates is not None:
            gates = torch.stack([self.gates.client_gate(cid, b, s) for cid, b in zip(client_ids, batch_of_client)])
            gates = gates.repeat_interleave(self.num_chunks, dim=0)
        for l, layer in enumerate(self.trunk):
            h = torch.relu(layer(h))
            if self.gates is not None:
                h = h * gates[:, l]
        raw = self.head(h).reshape(n, self.num_chunks * self.chunk_size)[:, : self.num_weights]
        weights = self.base + self.scale * raw
        if self.adapters is not None:
            weights = weights + self.adapters(torch.as_tensor(batch_of_client, device=weights.device))
        if self.client_classifiers is not None:
            weights = weights.index_add(1, self.classifier_index, self.client_classifiers[ids])
        return weights.index_add(1, self.non_conv_index, self.client_offsets[ids])

    def unflatten(self, flat):
        return self.layout.unflatten(flat)

    def flatten(self, weights):
        return self.layout.flatten(weights)


def count_parameters(module):
    return sum(p.numel() for p in module.parameters())

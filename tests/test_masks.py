"""The sub-hypernetwork masks (masks.py) and the isolation they promise."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import federated as fl  # noqa: E402
import hypernet as hn  # noqa: E402
import masks  # noqa: E402


class FakeClient:
    """Stands in for local training: returns a random delta (what training would return), no data."""

    def __init__(self, cid):
        self.generator = torch.Generator().manual_seed(cid)

    def local_train(self, flat_weights, bn_stats, steps, minibatch_size, lr):
        delta = 0.01 * torch.randn(flat_weights.shape, generator=self.generator)
        new_bn = {n: b.clone() for n, b in bn_stats.items()}
        return fl.ClientUpdate(delta=delta, bn_stats=new_bn, label_counts=torch.ones(10, dtype=torch.long),
                               loss=0.0)


def make_server(with_masks, optimizer="sgd", hidden=16, layers=2, batches=((0, 1), (2, 3)), adapter_budget=0.0,
                sparsity=0.75):
    torch.manual_seed(0)
    model = hn.ResNet18(10, 4)
    gates = masks.BatchGates(len(batches), layers, hidden, 4) if with_masks else None
    net = hn.HyperNetwork(model, 4, embed_dim=4, chunk_embed_dim=4, hidden=hidden, num_layers=layers,
                          chunk_size=256, gates=gates, adapter_budget=adapter_budget)
    # Momentum AND weight decay on: both move parameters whose gradient is zero in torch.optim.
    server = fl.Server(net, model, [list(b) for b in batches], optimizer=optimizer, server_lr=0.05,
                       server_momentum=0.9, server_weight_decay=0.01, sparsity=sparsity)
    return server, [FakeClient(c) for c in range(4)]


def run_stage(server, clients, t, rounds=6):
    server.begin_stage(t)
    for r in range(rounds):
        server.train_round(server.batches[t], clients, r / (rounds - 1), steps=1, minibatch_size=1, lr=0.0)
    return server.end_stage(t)


@pytest.mark.parametrize("optimizer,adapter_budget", [("sgd", 0.0), ("adam", 0.0), ("sgd", 0.3), ("adam", 0.3)])
def test_earlier_batch_weights_bitwise_unchanged_by_later_stage(optimizer, adapter_budget):
    server, clients = make_server(with_masks=True, optimizer=optimizer, adapter_budget=adapter_budget)
    run_stage(server, clients, 0)
    after_stage0 = {c: server.generate(c).clone() for c in (0, 1)}
    params_before = {n: p.detach().clone() for n, p in server.hypernet.named_parameters()}
    run_stage(server, clients, 1)
    for c in (0, 1):
        weights_0 = server.hypernet.unflatten(after_stage0[c])
        weights_1 = server.hypernet.unflatten(server.generate(c))
        for name in weights_0:
            assert torch.equal(weights_0[name], weights_1[name]), f"client {c}: {name} changed"
    # ...and not because nothing trained: stage 1 wrote the hypernetwork.
    changed = [n for n, p in server.hypernet.named_parameters() if not torch.equal(p, params_before[n])]
    assert "client_embeddings" in changed and any(n.startswith("trunk") for n in changed)
    if adapter_budget:              # batch 1 wrote its own adapter; batch 0's stays zero (it has the base)
        adapters = server.hypernet.adapters
        assert adapters.rank >= 1
        offsets = adapters(torch.tensor([0, 1]))
        assert offsets[0].abs().sum() == 0 and offsets[1].abs().sum() > 0
        assert adapters.lora_out[1].abs().sum() > 0
        offsets = server.hypernet.client_offsets         # batch 1's clients trained their own; 0 and 1 did not
        assert all(offsets[c].abs().sum() > 0 for c in (2, 3))


def test_without_masks_earlier_clients_drift():
    """The control: the same run without masks (pFedHN) changes batch-0 clients' weights."""
    server, clients = make_server(with_masks=False)
    run_stage(server, clients, 0)
    before = server.generate(0).clone()
    run_stage(server, clients, 1)
    assert not torch.equal(before, server.generate(0))


def test_sparsity_penalty_charges_only_fresh_units():
    gates = masks.BatchGates(num_batches=2, num_layers=1, hidden=4, num_clients=1)
    with torch.no_grad():
        gates.embeddings[0] = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
        gates.embeddings[1] = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    gates.finish(0)                                         # batch 0 owns units 0 and 1
    # Batch 1 gates on exactly the owned units: no charge at all.
    assert gates.sparsity_penalty(1, s=400.0).item() == pytest.approx(0.0, abs=1e-12)
    with torch.no_grad():
        gates.embeddings[1] = torch.tensor([[-1.0, -1.0, 1.0, -1.0]])
    assert gates.sparsity_penalty(1, s=400.0).item() > 0.4  # one of the two fresh units is on


def test_binarised_gates_are_exactly_zero_or_one_and_ownership_accumulates():
    torch.manual_seed(0)
    gates = masks.BatchGates(num_batches=3, num_layers=2, hidden=8, num_clients=1)
    stats0 = gates.finish(0)
    assert set(gates.binary[0].unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(gates.gate(0, s=0.001), gates.binary[0])   # frozen: s no longer matters
    assert torch.equal(gates.owned, gates.binary[0] > 0)
    stats1 = gates.finish(1)
    assert torch.equal(gates.owned, (gates.binary[0] > 0) | (gates.binary[1] > 0))
    assert stats0["reuse"] == 0.0 and 0 < stats1["reuse"] <= 1
    assert stats1["owned"] >= stats0["owned"]


def test_free_masks_freeze_exactly_what_earlier_batches_read():
    server, _ = make_server(with_masks=True, hidden=4, layers=2)
    gates = server.hypernet.gates
    with torch.no_grad():
        gates.embeddings[0] = torch.tensor([[1.0, -1, -1, -1], [1.0, 1, -1, -1]])
    gates.finish(0)
    free = gates.free_masks(server.hypernet, 1)
    assert free["trunk.0.weight"][0].sum() == 0 and free["trunk.0.weight"][1:].all()
    w1 = free["trunk.1.weight"]                   # rows: layer-1 units, columns: layer-0 units
    assert w1[0, 0] == 0 and w1[1, 0] == 0        # both ends owned: frozen
    assert w1[0, 1] == 1 and w1[2, 0] == 1        # one end fresh: writable
    assert free["head.weight"][:, :2].sum() == 0 and free["head.weight"][:, 2:].all()
    assert free["head.bias"].sum() == 0 and free["chunk_embeddings"].sum() == 0
    assert "gates.embeddings" not in free and "gates.borrow" not in free    # not the server optimizer's
    assert "gates.embeddings" not in server.params and "client_offsets" not in server.params   # no adapters


def test_gate_step_moves_only_its_own_batch_row():
    torch.manual_seed(0)
    gates = masks.BatchGates(num_batches=3, num_layers=2, hidden=8, num_clients=1)
    before = gates.embeddings.detach().clone()
    gates.step(torch.randn(3, 2, 8), batch=1, s=10.0, sparsity=0.75)
    after = gates.embeddings.detach()
    assert torch.equal(after[0], before[0]) and torch.equal(after[2], before[2])
    assert not torch.equal(after[1], before[1])


@pytest.mark.parametrize("s", [1 / 400, 0.3, 5.0, 400.0])
def test_compensate_is_hats(s):
    """HAT's compensation turns d sigmoid(s e)/de into s_max sigmoid'(e): the same push at every s."""
    torch.manual_seed(0)
    gates = masks.BatchGates(num_batches=2, num_layers=1, hidden=6, num_clients=1, s_max=400.0)
    with torch.no_grad():
        gates.embeddings[1] = torch.tensor([[-0.02, -0.01, 0.0, 0.005, 0.01, 0.02]])   # |s e| <= 8: no underflow
    w = torch.randn(6)
    loss = (w * gates.gate(1, s)).sum()
    grad = torch.autograd.grad(loss, gates.embeddings)[0]
    compensated = gates.compensate(grad, 1, s)
    e = gates.embeddings[1].detach()
    expected = w * 400.0 * torch.sigmoid(e) * (1 - torch.sigmoid(e))
    assert torch.allclose(compensated[1], expected, rtol=1e-4, atol=1e-6)
    assert torch.equal(compensated[0], grad[0])                  # other batches: untouched
    if s < 1:
        assert grad[1].abs().max() < 0.01 * expected.abs().max()   # without it the gate would hardly move


def test_clamp_keeps_only_its_batch_within_hats_bound():
    gates = masks.BatchGates(num_batches=2, num_layers=1, hidden=3, num_clients=1)
    with torch.no_grad():
        gates.embeddings.copy_(torch.tensor([[[-9.0, 2.0, 9.0]], [[-9.0, 2.0, 9.0]]]))
    gates.clamp_(1)
    assert gates.embeddings[1].tolist() == [[-6.0, 2.0, 6.0]]
    assert gates.embeddings[0].tolist() == [[-9.0, 2.0, 9.0]]


def units_on(gates, batch):
    return (gates.embeddings[batch] > 0).float().mean().item()


@pytest.mark.parametrize("sparsity", [0.0, 20.0])
def test_masks_learn_a_large_penalty_switches_units_off(sparsity):
    """From HAT's random start (half on), a stage with a large sparsity weight ends with far fewer units
    on; without the penalty about as many as it started with. Fails if the gates do not learn."""
    server, clients = make_server(with_masks=True, optimizer="adam", hidden=32, sparsity=sparsity)
    gates = server.hypernet.gates
    gates.free_start = None                      # HAT's start: N(0, 1), about half the units on
    server.begin_stage(0)
    started = units_on(gates, 0)
    assert 0.3 < started < 0.7
    for r in range(10):
        server.train_round([0, 1], clients, r / 9, steps=1, minibatch_size=1, lr=0.0)
    used = server.end_stage(0)["used"]
    if sparsity > 0:
        assert used < 0.25 * started
    else:
        assert used > 0.6 * started


def test_prepare_leaves_the_head_alone_at_stage_0_and_zeroes_fresh_columns_later():
    server, clients = make_server(with_masks=True, hidden=8, layers=2)
    head = server.hypernet.head.weight
    before = head.detach().clone()
    server.begin_stage(0)
    assert torch.equal(head, before) and head.abs().sum() > 0
    g0 = server.hypernet([0, 1], [0, 0])
    assert not torch.equal(g0[0], g0[1])          # batch-0 clients start from different models
    gates = server.hypernet.gates
    with torch.no_grad():
        gates.embeddings[0] = torch.tensor([[1.0] * 4 + [-1.0] * 4] * 2)
    server.end_stage(0)
    server.begin_stage(1)
    assert head[:, 4:].abs().sum() == 0 and torch.equal(head[:, :4], before[:, :4])
    assert (gates.embeddings[1][:, :4] >= 1).all() and (gates.embeddings[1][:, 4:] == gates.free_start).all()


def test_annealing_runs_from_one_over_smax_to_smax():
    gates = masks.BatchGates(1, 1, 2, 1, s_max=400.0)
    assert gates.scale(0.0) == pytest.approx(1 / 400)
    assert gates.scale(1.0) == pytest.approx(400.0)


def test_a_batch_that_finds_no_free_unit_still_learns_and_earlier_batches_stay_fixed():
    # Capacity exhausted: batch 0 owns every hidden unit. Batch 1 can then only read them (its gate starts
    # on for owned units) and write what is its own: embeddings, adapter, client offsets.
    server, clients = make_server(with_masks=True, adapter_budget=0.3, sparsity=0.0)
    gates = server.hypernet.gates
    server.begin_stage(0)
    with torch.no_grad():
        gates.embeddings[0] = 6.0                    # batch 0 keeps every unit on (HAT's clamp bound)
    for r in range(6):
        server.train_round([0, 1], clients, r / 5, steps=1, minibatch_size=1, lr=0.0)
    server.end_stage(0)
    assert gates.owned.all()
    frozen_before = {c: server.generate(c).clone() for c in (0, 1)}
    server.begin_stage(1)
    new_before = {c: server.generate(c).clone() for c in (2, 3)}
    free = gates.free_masks(server.hypernet, 1)
    assert all(free[n].sum() == 0 for n in free if n.startswith(("trunk", "head")))   # nothing shared is free
    for r in range(6):
        server.train_round([2, 3], clients, r / 5, steps=1, minibatch_size=1, lr=0.0)
    stats = server.end_stage(1)
    assert stats["reuse"] == 1.0 and stats["owned"] == 1.0
    for c in (0, 1):
        assert torch.equal(server.generate(c), frozen_before[c])
    for c in (2, 3):
        assert not torch.equal(server.generate(c), new_before[c])


def test_a_new_client_starts_with_its_own_blank_classifier():
    """From batch 1 on, a new client's generated classifier is exactly zero when its stage begins (its own
    offset cancels what the frozen, owned part says), instead of the earlier batches' decision; earlier
    clients' classifier offsets are never written after their stage."""
    server, clients = make_server(with_masks=True)
    net = server.hypernet
    run_stage(server, clients, 0)
    before_offsets = net.client_classifiers[:2].detach().clone()
    first_s = net.gates.scale(0.0)                  # the gate scale of a stage's first round
    old_decision = net([2, 3], [0, 0], s=first_s)[:, net.classifier_index]   # as if batch 1 were batch 0
    server.begin_stage(1)
    start = net([2, 3], [1, 1], s=first_s)[:, net.classifier_index]
    assert old_decision.abs().max() > 1e-3
    assert start.abs().max() < 1e-6 * max(1.0, old_decision.abs().max().item())
    run_stage(server, clients, 1)
    assert torch.equal(net.client_classifiers[:2], before_offsets)
    assert (net([2, 3], [1, 1], s=first_s)[:, net.classifier_index] != 0).any()   # batch 1 trained its own


def tiny_run(tiny_data_dir, **overrides):
    """train.run on the tiny generated data with a small, quick configuration (no replay, no reference)."""
    import train
    config = dict(train.DEFAULTS, dataset="cifar10", data_dir=str(tiny_data_dir), batches=2, clients_per_batch=3,
                  rounds=12, clients_per_round=3, local_steps=3, batch_size=16, width=4, hidden=32, chunk_size=256,
                  embed_dim=4, no_replay=True, seed=0)
    config.update(overrides)
    return train.run(config, torch.device("cpu"), pa_reference=False)


def test_a_stage_ends_with_hard_gates(tiny_data_dir):
    """At the end of every stage the gates are decided at s_max (almost none between 0.1 and 0.9), so binarising
    freezes the mask that trained; and the batch keeps some units and leaves others (the mask decided)."""
    results = tiny_run(tiny_data_dir)
    for stage in results["neurons"]:
        assert stage["soft"] < 0.05, results["neurons"]         # before: 0.9 of the gates still soft
    assert 0.0 < results["neurons"][0]["used"] < 1.0


def test_the_papers_shape_onboards_a_second_batch(tiny_data_dir):
    """--adapter-budget 0 (no adapters, no client offsets): the second batch learns its own classes well
    above chance (each client holds 2 classes: chance is 0.5) while batch 0 stays exactly where it was."""
    results = tiny_run(tiny_data_dir, adapter_budget=0.0, rounds=24)
    batch0, batch1 = results["batches"]
    assert [results["accuracy"][0][c] for c in batch0] == [results["accuracy"][1][c] for c in batch0]
    assert results["metrics"]["batch_acc"][1][1] > 0.6, results["metrics"]["batch_acc"]   # before: 0.17

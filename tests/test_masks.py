"""The sub-hypernetwork masks (masks.py): HAT's gates, the free masks, the masked Adam, and the isolation they
promise (an earlier batch's generated weights bitwise unchanged by later stages)."""
import pytest
import torch

import federated as fl
import hypernet as hn
import masks
import train


class FakeClient:
    """Stands in for local training: returns a random delta (what training would return), no data."""

    def __init__(self, cid):
        self.generator = torch.Generator().manual_seed(cid)

    def local_train(self, flat_weights, bn_stats, steps, minibatch_size, lr):
        delta = 0.01 * torch.randn(flat_weights.shape, generator=self.generator)
        new_bn = {n: b.clone() for n, b in bn_stats.items()}
        return fl.ClientUpdate(delta=delta, bn_stats=new_bn, label_counts=torch.ones(10, dtype=torch.long),
                               loss=0.0)


def make_server(with_masks, hidden=16, layers=2, batches=((0, 1), (2, 3)), sparsity=0.75, s_max=4.0):
    torch.manual_seed(0)
    model = hn.ResNet18(10, 4)
    num_clients = sum(len(b) for b in batches)
    gates = masks.BatchGates(len(batches), layers, hidden, s_max=s_max) if with_masks else None
    net = hn.HyperNetwork(model, num_clients, embed_dim=4, chunk_embed_dim=4, hidden=hidden, num_layers=layers,
                          chunk_size=256, gates=gates)
    server = fl.Server(net, model, [list(b) for b in batches], server_lr=0.05, sparsity=sparsity)
    return server, [FakeClient(c) for c in range(num_clients)]


def run_stage(server, clients, t, rounds=6):
    server.begin_stage(t)
    for r in range(rounds):
        server.train_round(server.batches[t], clients, r / (rounds - 1), steps=1, minibatch_size=1, lr=0.0)
    return server.end_stage(t)


# --------------------------------------------------------------------------------------------------
# Isolation
# --------------------------------------------------------------------------------------------------

def test_earlier_batches_weights_bitwise_unchanged_by_every_later_stage():
    """Three batches: after its stage, each batch's generated weights never change again, although every
    later stage writes the hypernetwork (embeddings, trunk units, classifiers)."""
    server, clients = make_server(with_masks=True, batches=((0, 1), (2, 3), (4, 5)))
    frozen = {}
    for t in range(3):
        params_before = {n: p.detach().clone() for n, p in server.hypernet.named_parameters()}
        run_stage(server, clients, t)
        changed = [n for n, p in server.hypernet.named_parameters() if not torch.equal(p, params_before[n])]
        assert "client_embeddings" in changed and any(n.startswith("trunk") for n in changed), changed
        for c, weights in frozen.items():
            assert torch.equal(server.generate(c), weights), f"client {c} changed in stage {t}"
        frozen.update({c: server.generate(c).clone() for c in server.batches[t]})


def test_without_masks_earlier_clients_drift():
    """The control: the same run without masks (pFedHN) changes batch-0 clients' weights."""
    server, clients = make_server(with_masks=False)
    run_stage(server, clients, 0)
    before = server.generate(0).clone()
    run_stage(server, clients, 1)
    assert not torch.equal(before, server.generate(0))


def test_a_batch_that_finds_no_free_unit_still_learns_and_earlier_batches_stay_fixed():
    # Capacity exhausted: batch 0 owns every hidden unit. Batch 1 can then only read them (its gate starts
    # on for owned units) and write what is its own: its clients' embeddings and classifiers.
    server, clients = make_server(with_masks=True, sparsity=0.0)
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
    free = gates.free_masks(server.hypernet)
    assert all(free[n].sum() == 0 for n in free)     # nothing shared is free
    for r in range(6):
        server.train_round([2, 3], clients, r / 5, steps=1, minibatch_size=1, lr=0.0)
    stats = server.end_stage(1)
    assert stats["reuse"] == 1.0 and stats["owned"] == 1.0
    for c in (0, 1):
        assert torch.equal(server.generate(c), frozen_before[c])
    for c in (2, 3):
        assert not torch.equal(server.generate(c), new_before[c])


# --------------------------------------------------------------------------------------------------
# The gates (HAT)
# --------------------------------------------------------------------------------------------------

def test_sparsity_penalty_charges_only_fresh_units():
    gates = masks.BatchGates(num_batches=2, num_layers=1, hidden=4)
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
    gates = masks.BatchGates(num_batches=3, num_layers=2, hidden=8)
    stats0 = gates.finish(0)
    assert set(gates.binary[0].unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(gates.gate(0, s=0.001), gates.binary[0])   # frozen: s no longer matters
    assert torch.equal(gates.owned, gates.binary[0] > 0)
    stats1 = gates.finish(1)
    assert torch.equal(gates.owned, (gates.binary[0] > 0) | (gates.binary[1] > 0))
    assert stats0["reuse"] == 0.0 and 0 < stats1["reuse"] <= 1
    assert stats1["owned"] >= stats0["owned"]


def test_finish_keeps_a_unit_on_in_a_layer_left_empty():
    gates = masks.BatchGates(num_batches=1, num_layers=2, hidden=4)
    with torch.no_grad():
        gates.embeddings[0] = torch.tensor([[1.0, -1, -1, -1], [-3.0, -0.5, -2, -1]])
    gates.finish(0)
    assert gates.binary[0].tolist() == [[1, 0, 0, 0], [0, 1, 0, 0]]     # layer 1: its largest e, unit 1


def test_free_masks_freeze_exactly_what_earlier_batches_read():
    server, _ = make_server(with_masks=True, hidden=4, layers=2)
    gates = server.hypernet.gates
    free = gates.free_masks(server.hypernet)                # nothing finished: everything free
    assert all(m.all() for m in free.values())
    with torch.no_grad():
        gates.embeddings[0] = torch.tensor([[1.0, -1, -1, -1], [1.0, 1, -1, -1]])
    gates.finish(0)
    free = gates.free_masks(server.hypernet)
    assert free["trunk.0.weight"][0].sum() == 0 and free["trunk.0.weight"][1:].all()
    w1 = free["trunk.1.weight"]                   # rows: layer-1 units, columns: layer-0 units
    assert w1[0, 0] == 0 and w1[1, 0] == 0        # both ends owned: frozen
    assert w1[0, 1] == 1 and w1[2, 0] == 1        # one end fresh: writable
    assert free["head.weight"][:, :2].sum() == 0 and free["head.weight"][:, 2:].all()
    assert free["head.bias"].sum() == 0 and free["chunk_embeddings"].sum() == 0 and free["base"].sum() == 0
    assert "gates.embeddings" not in free            # HAT learns the gates, not the server optimizer
    assert "gates.embeddings" not in server.params
    for name, mask in free.items():                  # every mask fits its parameter
        assert mask.shape == server.hypernet.get_parameter(name).shape, name


def test_gate_step_moves_only_its_own_batch_row_and_clamps_it():
    torch.manual_seed(0)
    gates = masks.BatchGates(num_batches=3, num_layers=2, hidden=8, lr=100.0)   # a huge step: the clamp acts
    with torch.no_grad():
        gates.embeddings[0] = 9.0                    # outside the bound, and not its business
    before = gates.embeddings.detach().clone()
    gates.step(torch.randn(3, 2, 8), batch=1, s=10.0, sparsity=0.75)
    after = gates.embeddings.detach()
    assert torch.equal(after[0], before[0]) and torch.equal(after[2], before[2])
    assert not torch.equal(after[1], before[1])
    assert after[1].abs().max() == gates.clamp == 6.0


def test_gate_step_follows_the_task_gradient():
    """A unit whose task gradient says "on" turns on, one that says "off" turns off (sparsity 0)."""
    gates = masks.BatchGates(num_batches=1, num_layers=1, hidden=4, s_max=400.0, lr=0.5)
    with torch.no_grad():
        gates.embeddings.zero_()
    grad = torch.tensor([[[-1.0, -2.0, 1.0, 2.0]]])    # gradient descent: negative -> e grows
    for _ in range(5):
        gates.step(grad, batch=0, s=gates.scale(0.5), sparsity=0.0)
    e = gates.embeddings[0, 0]
    assert (e[:2] > 0).all() and (e[2:] < 0).all()


def test_gate_step_is_hats_compensated_step_with_each_term_normalised():
    """step's contract: each term compensated (HAT), divided by its root mean square over the units it moves,
    one SGD step of `lr`. So a typical unit moves by lr whatever the gradient's scale (HAT's raw step of a
    ~1e-3 gradient would leave the gates undecided at the end of a stage), and the penalty pushes down only the
    units no earlier batch owns."""
    torch.manual_seed(0)
    gates = masks.BatchGates(num_batches=2, num_layers=2, hidden=6, s_max=400.0, lr=0.05)
    with torch.no_grad():
        gates.embeddings[0] = torch.tensor([[1.0, 1, -1, -1, -1, -1]] * 2)
    gates.finish(0)                                     # batch 0 owns units 0 and 1 of each layer
    e, s, task = 0.3 * torch.randn(2, 6), 5.0, 1e-3 * torch.randn(2, 2, 6)     # s e within +-5: no overflow

    def moved_by(task_grad, sparsity):
        with torch.no_grad():
            gates.embeddings[1] = e
        gates.step(task_grad, batch=1, s=s, sparsity=sparsity)
        return gates.embeddings[1].detach() - e

    with torch.no_grad():
        gates.embeddings[1] = e
        expected = -0.05 * masks.normalised(gates.compensate(task, 1, s)[1])
    for scale in (1.0, 1000.0):                         # the task term alone: its scale does not matter
        torch.testing.assert_close(moved_by(scale * task, 0.0), expected)
    assert expected.pow(2).mean().sqrt().item() == pytest.approx(0.05, rel=1e-4)
    penalty = moved_by(torch.zeros(2, 2, 6), 1.0)       # the penalty alone: free units down, owned ones untouched
    assert (penalty[:, :2] == 0).all() and (penalty[:, 2:] < 0).all()
    assert penalty[:, 2:].pow(2).mean().sqrt().item() == pytest.approx(0.05, rel=1e-4)


@pytest.mark.parametrize("s", [1 / 400, 0.3, 5.0, 400.0])
def test_compensate_is_hats(s):
    """HAT's compensation turns d sigmoid(s e)/de into s_max sigmoid'(e): the same push at every s."""
    torch.manual_seed(0)
    gates = masks.BatchGates(num_batches=2, num_layers=1, hidden=6, s_max=400.0)
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


def test_annealing_takes_the_gates_from_soft_to_hard_over_a_stage():
    """Behaviour, not the formula: the server's gate scale rises over the stage's rounds from 1/s_max (every
    gate about 0.5, soft) to s_max (every gate within 1e-3 of 0 or 1 for the e a stage reaches)."""
    server, clients = make_server(with_masks=True, s_max=400.0, hidden=16)
    gates = server.hypernet.gates
    server.begin_stage(0)
    scales = []
    for r in range(5):
        server.train_round([0, 1], clients, r / 4, steps=1, minibatch_size=1, lr=0.0)
        scales.append(server.gate_scale)
    assert scales == sorted(scales) and len(set(scales)) == 5
    assert scales[0] == pytest.approx(1 / 400) and scales[-1] == pytest.approx(400.0)
    e = torch.linspace(-6, 6, 25)
    e = e[e.abs() > 0.05]
    with torch.no_grad():
        gates.embeddings[0, 0, :len(e[:16])] = e[:16]
        soft, hard = gates.gate(0, scales[0]), gates.gate(0, scales[-1])
    assert ((soft - 0.5).abs() < 0.01).all()
    assert (torch.minimum(hard, 1 - hard)[0, :16] < 1e-3).all()


def units_on(gates, batch):
    return (gates.embeddings[batch] > 0).float().mean().item()


def test_masks_learn_a_large_penalty_switches_units_off():
    """The same stage with and without a large sparsity weight: the penalty leaves far fewer units on.
    Fails if the gates do not learn (both would keep what they started with)."""
    used = {}
    for sparsity in (0.0, 20.0):
        server, clients = make_server(with_masks=True, hidden=32, sparsity=sparsity, s_max=400.0)
        server.begin_stage(0)
        for r in range(10):
            server.train_round([0, 1], clients, r / 9, steps=1, minibatch_size=1, lr=0.0)
        used[sparsity] = server.end_stage(0)["used"]
    assert used[0.0] > 0.25 and used[20.0] < 0.5 * used[0.0], used


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
    assert (gates.embeddings[1][:, :4] >= 1).all() and (gates.embeddings[1][:, 4:] == 0).all()


def test_a_new_client_starts_with_its_own_blank_classifier():
    """From batch 1 on, a new client's generated classifier is exactly zero when its stage begins (its own
    offset cancels what the frozen, owned part says), instead of the earlier batches' decision; earlier
    clients' classifier offsets are never written after their stage."""
    server, clients = make_server(with_masks=True)
    net = server.hypernet
    run_stage(server, clients, 0)
    before_offsets = net.client_classifiers[:2].detach().clone()
    first_s = net.gates.scale(0.0)                  # the gate scale of a stage's first round
    with torch.no_grad():
        old_decision = net([2, 3], [0, 0], s=first_s)[:, net.classifier_index]   # as if batch 1 were batch 0
    server.begin_stage(1)
    with torch.no_grad():
        start = net([2, 3], [1, 1], s=first_s)[:, net.classifier_index]
    assert old_decision.abs().max() > 1e-3
    assert start.abs().max() < 1e-6 * max(1.0, old_decision.abs().max().item())
    run_stage(server, clients, 1)
    assert torch.equal(net.client_classifiers[:2], before_offsets)
    with torch.no_grad():
        assert (net([2, 3], [1, 1], s=first_s)[:, net.classifier_index] != 0).any()   # batch 1 trained its own


# --------------------------------------------------------------------------------------------------
# The server's optimizer
# --------------------------------------------------------------------------------------------------

def test_server_optimizer_is_adam_on_free_entries_and_never_moves_a_frozen_one():
    """Where free, the same numbers as torch.optim.Adam; where not, bitwise untouched, even after earlier
    steps left Adam's running averages nonzero (torch.optim would move such an entry with a zero gradient)."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4, 3))
    q = torch.nn.Parameter(p.detach().clone())
    ours, reference = masks.ServerOptimizer({"p": p}, lr=0.1), torch.optim.Adam([q], lr=0.1)
    grads = [torch.randn(4, 3) for _ in range(3)]
    for g in grads:                                 # every entry free (a name missing from `free`)
        ours.step({"p": g}, {})
        q.grad = g.clone()
        reference.step()
    torch.testing.assert_close(p.detach(), q.detach())
    frozen_rows = torch.tensor([True, False, True, False])[:, None].expand(4, 3)
    before, state_before = p.detach().clone(), {k: v.clone() for k, v in ours.state["p"].items()}
    ours.step({"p": torch.zeros(4, 3)}, {"p": ~frozen_rows})
    assert torch.equal(p[frozen_rows], before[frozen_rows])
    for k, v in ours.state["p"].items():                # nor its moments: it resumes where it stopped
        assert torch.equal(v[frozen_rows], state_before[k][frozen_rows]), k
        assert (v[~frozen_rows] != state_before[k][~frozen_rows]).all(), k
    assert (p[~frozen_rows] != before[~frozen_rows]).all()          # momentum alone moved the free rows
    ours.reset()
    assert ours.steps == 0 and all((s == 0).all() for s in ours.state["p"].values())


# --------------------------------------------------------------------------------------------------
# On the tiny data: a stage ends with hard gates, and the second batch learns
# --------------------------------------------------------------------------------------------------

def tiny_run(tiny_data_dir, **overrides):
    """train.run on the tiny generated data with a small, quick configuration (no replay, no reference)."""
    config = dict(train.DEFAULTS, dataset="cifar10", data_dir=str(tiny_data_dir), batches=2, clients_per_batch=2,
                  rounds=8, clients_per_round=2, local_steps=2, batch_size=16, width=8, hidden=32, chunk_size=256,
                  embed_dim=4, no_replay=True, seed=0)
    config.update(overrides)
    return train.run(config, torch.device("cpu"), pa_reference=False)


def test_the_core_onboards_a_second_batch_with_hard_gates(tiny_data_dir):
    """At the end of every stage the gates are decided at s_max (almost none between 0.1 and 0.9), so
    binarising freezes the mask that trained, and the batch keeps some units and leaves others; the second
    batch learns its own classes well above chance (each client holds 2 classes: chance is 0.5) while
    batch 0 stays exactly where it was."""
    results = tiny_run(tiny_data_dir)
    for stage in results["neurons"]:
        assert stage["soft"] < 0.05, results["neurons"]         # before: 0.9 of the gates still soft
    assert 0.0 < results["neurons"][0]["used"] < 1.0
    batch0, batch1 = results["batches"]
    assert [results["accuracy"][0][c] for c in batch0] == [results["accuracy"][1][c] for c in batch0]
    assert results["metrics"]["batch_acc"][1][1] > 0.6, results["metrics"]["batch_acc"]

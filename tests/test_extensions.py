"""Our extensions (extensions/, `--method pfeddsh-ext`), none of them the paper's: the batch adapters and client
offsets (adapters.py), the borrow gates (borrow.py), replay with the clients' validation selection and
Holm-confirmed acceptance (selection.py), and its controls (controls.py)."""
import pytest
import torch
import torch.nn.functional as F

import data
import deepinversion as di
import federated as fl
import hypernet as hn
import train
from extensions import adapters, borrow, controls, selection
from extensions import server as ext_server
from test_masks import FakeClient, run_stage


def make_ext_server(adapter_budget=0.0, sparsity=0.0, batches=((0, 1), (2, 3)), hidden=16, layers=2):
    """The extension's server on a width-4 ResNet, trained by FakeClients (no images exist at all)."""
    torch.manual_seed(0)
    model = hn.ResNet18(10, 4)
    n = sum(len(b) for b in batches)
    gates = borrow.BorrowGates(len(batches), layers, hidden, n, s_max=4.0)
    net = adapters.ExtendedHyperNetwork(model, n, gates=gates, adapter_budget=adapter_budget, embed_dim=4,
                                        chunk_embed_dim=4, hidden=hidden, num_layers=layers, chunk_size=256)
    server = ext_server.ExtendedServer(net, model, [list(b) for b in batches], adapter_lr=1e-2, server_lr=0.05,
                                       sparsity=sparsity, selection_settings={})
    return server, [FakeClient(c) for c in range(n)]


# --------------------------------------------------------------------------------------------------
# adapters.py and borrow.py
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("adapter_budget", [0.0, 0.3])
def test_earlier_batch_bitwise_unchanged_with_adapters_and_offsets(adapter_budget):
    server, clients = make_ext_server(adapter_budget=adapter_budget, sparsity=0.75)
    run_stage(server, clients, 0)
    after_stage0 = {c: server.generate(c).clone() for c in (0, 1)}
    params_before = {n: p.detach().clone() for n, p in server.hypernet.named_parameters()}
    run_stage(server, clients, 1)
    for c in (0, 1):
        assert torch.equal(server.generate(c), after_stage0[c]), f"client {c} changed"
    changed = [n for n, p in server.hypernet.named_parameters() if not torch.equal(p, params_before[n])]
    assert "client_embeddings" in changed and any(n.startswith("trunk") for n in changed)
    offsets = server.hypernet.client_offsets
    if adapter_budget:              # batch 1 wrote its own adapter; batch 0's stays zero (it has the base)
        a = server.hypernet.adapters
        assert a.rank >= 1
        per_batch = a(torch.tensor([0, 1]))
        assert per_batch[0].abs().sum() == 0 and per_batch[1].abs().sum() > 0
        assert all(offsets[c].abs().sum() > 0 for c in (2, 3))      # batch 1's clients trained their own
    else:                           # the paper's shape: no adapters, and the offsets are not even trained
        assert server.hypernet.adapters is None and "client_offsets" not in server.params
        assert offsets.abs().sum() == 0


def test_adapters_start_at_zero_and_write_only_convolutions():
    layout = hn.WeightLayout(hn.ResNet18(10, 8))
    a = adapters.BatchAdapters(layout, num_batches=3, budget=0.1)
    assert a.rank >= 1 and a(torch.tensor([0, 1, 2])).abs().sum() == 0
    with torch.no_grad():
        a.lora_out.normal_()
    out = a(torch.tensor([1]))[0]
    convs = layout.index_of(lambda name, shape: len(shape) == 4)
    others = torch.ones(layout.num_weights, dtype=torch.bool)
    others[convs] = False
    assert out[others].abs().sum() == 0 and out[convs].abs().sum() > 0
    assert a.per_batch_cost() <= 0.1 * layout.num_weights
    free = a.free_masks(2)
    assert all(m[2].all() and not m[[0, 1]].any() for m in free.values())
    assert not any(m.any() for m in a.free_masks(0).values())       # batch 0 trains the shared base instead


def test_borrow_gates_change_nothing_until_they_train_and_then_only_units_another_batch_owns():
    gates = borrow.BorrowGates(num_batches=2, num_layers=1, hidden=4, num_clients=3)
    with torch.no_grad():
        gates.embeddings[0] = torch.tensor([[1.0, -1.0, -1.0, -1.0]])
        gates.embeddings[1] = torch.tensor([[-1.0, 1.0, -1.0, -1.0]])
    gates.finish(0)
    gates.finish(1)                                          # unit 0 is batch 0's, unit 1 batch 1's
    assert torch.equal(gates.client_gate(0, 0, 1.0), gates.gate(0, 1.0))
    with torch.no_grad():
        gates.borrow[0] = 0.5
    assert gates.client_gate(0, 0, 1.0).tolist() == [[1.0, 0.5, 0.0, 0.0]]    # reads batch 1's unit, no other
    assert torch.equal(gates.client_gate(1, 0, 1.0), gates.gate(0, 1.0))       # another client's row: nothing


# --------------------------------------------------------------------------------------------------
# selection.py: replay with the clients' selection and Holm-confirmed acceptance
# --------------------------------------------------------------------------------------------------

def two_stage_server():
    """Batches (0, 1) and (2, 3); label counts as the clients upload them: client c holds classes c and c + 1,
    so of the earlier clients only 1 shares a class (2) with the new batch, and only new client 2 with it.
    No sparsity penalty: random deltas carry no task signal, and against a penalty batch 0 would keep a
    single unit per layer, through which a client's embedding may not reach its weights at all."""
    server, clients = make_ext_server()
    run_stage(server, clients, 0)
    run_stage(server, clients, 1)
    for c in range(4):
        counts = torch.zeros(10, dtype=torch.long)
        counts[[c, c + 1]] = 5
        server.label_counts[c] = counts
    return server


REPLAY = dict(num_images=4, iterations=3, bn_weight=10.0, steps=3, lr=3e-2, kd_weight=1.0, anchor_weight=1.0,
              temperature=2.0, validate_every=1, confirm_alpha=0.05, seed=0, control="none")


class Asked:
    """A client as selection asks it: its score on val_select for the model it is sent, and its confirmation."""

    def __init__(self, cid, validate, confirm):
        self.cid, self.validate, self.answer = cid, validate, confirm

    def evaluate(self, flat, bn_stats, split):
        assert split == "val_select"
        return self.validate(self.cid, flat)

    def confirm(self, before, after, bn_stats):
        return self.answer(self.cid, before, after)


def ask(validate, confirm):
    return [Asked(c, validate, confirm) for c in range(4)]


def confirm_yes(cid, before, after):      # a client whose confirmation half agrees with any change
    return (40, 2, 0.05, 0.01) if not torch.equal(before, after) else (0, 0, 0.0, 0.0)


def confirm_no(cid, before, after):       # ... and one whose confirmation half sees nothing but noise
    return (6, 5, 0.001, 0.01)


def never_better(cid, flat):
    return (0.0, 1.0)


def snapshot(server):
    return {c: server.generate(c).clone() for c in range(4)}


def parameters(server):
    return {n: p.detach().clone() for n, p in server.hypernet.named_parameters()}


def pleased_with_any_change(before):
    return lambda cid, flat: (1.0, 0.0) if not torch.equal(flat, before[cid]) else (0.5, 1.0)


def test_replay_touches_only_the_client_being_improved_and_only_its_rows():
    server = two_stage_server()
    before, params_before = snapshot(server), parameters(server)
    calls = []
    pleased = pleased_with_any_change(before)
    report = selection.replay(server, ask(lambda cid, flat: calls.append(cid) or pleased(cid, flat), confirm_yes),
                              1, **REPLAY)
    assert report["tried"] == report["kept"] == [1] and report["accepted"] == 1
    after = snapshot(server)
    assert [c for c in range(4) if not torch.equal(before[c], after[c])] == [1]
    assert set(calls) == {1}
    moved = {n for n, p in parameters(server).items() if not torch.equal(p, params_before[n])}
    assert moved and moved <= {"client_embeddings", "gates.borrow"}
    for name in moved:
        rows = (parameters(server)[name] != params_before[name]).flatten(1).any(1).nonzero().flatten().tolist()
        assert rows == [1], name


def test_a_client_no_step_improves_is_left_bitwise_and_never_asked_to_confirm():
    server = two_stage_server()
    params_before = parameters(server)
    asked = []
    report = selection.replay(server, ask(never_better, lambda *args: asked.append(args) or confirm_yes(*args)),
                              1, **REPLAY)
    assert report["tried"] == [1] and report["accepted"] == 0 and report["rejected"] == 1 and not asked
    assert report["client_queries"] == 1 + REPLAY["steps"]      # the start, then every step (validate_every 1)
    assert all(torch.equal(p, params_before[n]) for n, p in parameters(server).items())


@pytest.mark.parametrize("verdict", ["keep", "refuse"])
def test_accept_decides_which_confirmed_proposals_are_written(monkeypatch, verdict):
    """A client's pick reaches selection.accept with what its confirmation half said, and only the clients
    accept returns are written: kept, the client moves; refused, every parameter is bitwise as it was."""
    server = two_stage_server()
    before, params_before = snapshot(server), parameters(server)
    heard = []

    def accept(confirmations, alpha):
        heard.append((dict(confirmations), alpha))
        return list(confirmations) if verdict == "keep" else []

    monkeypatch.setattr(selection, "accept", accept)
    report = selection.replay(server, ask(pleased_with_any_change(before), confirm_yes), 1, **REPLAY)
    assert heard == [({1: (40, 2, 0.05, 0.01)}, REPLAY["confirm_alpha"])]
    moved = [c for c in range(4) if not torch.equal(before[c], server.generate(c))]
    if verdict == "keep":
        assert report["kept"] == [1] and moved == [1]
    else:
        assert report["kept"] == [] and report["rejected"] == 1 and moved == []
        assert all(torch.equal(p, params_before[n]) for n, p in parameters(server).items())


def test_a_pick_the_confirmation_half_does_not_confirm_is_undone_bitwise():
    server = two_stage_server()
    before, params_before = snapshot(server), parameters(server)
    report = selection.replay(server, ask(pleased_with_any_change(before), confirm_no), 1, **REPLAY)
    assert report["accepted"] == 0 and report["rejected"] == 1 and report["confirm"][0] == [6, 5, 0.001, 0.01]
    assert all(torch.equal(p, params_before[n]) for n, p in parameters(server).items())


def test_replay_moves_the_earlier_clients_model():
    """Replay must be able to move a model, not only in principle: the tried client's embedding row moves
    by a fair fraction of its size, and so does every weight generated from it."""
    server = two_stage_server()
    before = snapshot(server)
    embedding = server.hypernet.client_embeddings.detach().clone()
    calls = {"n": 0}

    def improving(cid, flat):               # each score a little better than the last: the last is best
        calls["n"] += 1
        return (calls["n"] / 100.0, 0.0)

    report = selection.replay(server, ask(improving, confirm_yes), 1, **dict(REPLAY, steps=30))
    assert report["kept"] == report["tried"] == [1]      # client 0 holds no class of the new batch
    assert torch.equal(server.generate(0), before[0])
    moved = (server.hypernet.client_embeddings[1] - embedding[1]).norm() / embedding[1].norm()
    assert moved > 0.1, moved
    change = (server.generate(1) - before[1]).norm() / before[1].norm()
    assert change > 1e-3, change


def test_an_earlier_client_that_does_not_answer_stays_bitwise_as_it_was():
    server = two_stage_server()
    params_before = parameters(server)

    def unreachable(*args):
        raise TimeoutError("no answer")

    report = selection.replay(server, ask(unreachable, unreachable), 1, **REPLAY)
    assert report["tried"] == [1] and report["unanswered"] == [1] and report["accepted"] == 0
    assert report["client_queries"] == 1
    assert all(torch.equal(p, params_before[n]) for n, p in parameters(server).items())


def test_an_earlier_client_that_never_uploaded_is_not_tried_and_nobody_is_asked():
    """Client 1, the only one that shares a class with the new batch, never trained in its stage: nobody is
    tried, no client is asked anything, and the report says both earlier clients were skipped."""
    server = two_stage_server()
    del server.label_counts[1]
    params_before = parameters(server)

    def refuse(*args):
        raise AssertionError("a client was asked")

    report = selection.replay(server, ask(refuse, refuse), 1, **REPLAY)
    assert report["tried"] == [] and report["skipped"] == 2 and report["client_queries"] == 0
    assert len(report["images"]) == 0
    assert all(torch.equal(p, params_before[n]) for n, p in parameters(server).items())


def pools_and_dreamers(monkeypatch):
    """Record what reaches the fine-tuning (each tried client's pool) and whom synthesis dreams from."""
    pools, dreamed = {}, []
    improve, dream = selection.improve_client, di.dream

    def recording_improve(server, client, cid, pool, *args, **kwargs):
        pools[cid] = [d.clone() for d in pool]
        return improve(server, client, cid, pool, *args, **kwargs)

    def recording_dream(server, dreamers, *args, **kwargs):
        dreamed.extend(dreamers)
        return dream(server, dreamers, *args, **kwargs)

    monkeypatch.setattr(selection, "improve_client", recording_improve)
    monkeypatch.setattr(di, "dream", recording_dream)
    return pools, dreamed


def test_with_dreams_the_pool_holds_the_new_clients_dreams_of_the_clients_classes(monkeypatch):
    """The reference for the two controls: dreams from new client 2 (it shares class 2 with client 1; new
    client 3 shares nothing with any tried client, so it is not dreamed from)."""
    server = two_stage_server()
    pools, dreamed = pools_and_dreamers(monkeypatch)
    report = selection.replay(server, ask(never_better, confirm_no), 1, **REPLAY)
    assert dreamed == [2, 1] and report["dreamers"] == [2]
    assert len(pools[1][0]) > len(server.dreams[1][0])
    assert set(pools[1][1].tolist()) <= {1, 2}


def test_the_noise_control_feeds_the_fine_tuning_no_dream(monkeypatch):
    """--replay-control noise: no new client is dreamed from; the tried client's pool is its own dreams
    next to noise_dreams' Gaussian images with zero teacher logits, and nothing else."""
    server = two_stage_server()
    pools, dreamed = pools_and_dreamers(monkeypatch)
    report = selection.replay(server, ask(never_better, confirm_no), 1, **dict(REPLAY, control="noise"))
    assert report["tried"] == [1] and dreamed == [1]          # only the tried client's own dreams
    noise = controls.noise_dreams(server, [2], num_images=4, seed=0)[2]
    images, labels, logits = pools[1]
    own = server.dreams[1]
    held = server.label_counts[1] > 0
    expected_images = torch.cat([noise[0][held[noise[1]]], own[0][held[own[1]]]])
    assert torch.equal(images, expected_images)
    new_part = len(expected_images) - int(held[own[1]].sum())
    assert new_part > 0 and torch.equal(logits[:new_part], torch.zeros_like(logits[:new_part]))


def test_the_own_control_fine_tunes_on_the_clients_own_dreams_alone(monkeypatch):
    server = two_stage_server()
    pools, dreamed = pools_and_dreamers(monkeypatch)
    report = selection.replay(server, ask(never_better, confirm_no), 1, **dict(REPLAY, control="own"))
    assert dreamed == [1] and report["dreamers"] == []
    assert torch.equal(pools[1][0], server.dreams[1][0])       # all its own dreams (it holds both classes)


def test_noise_dreams_are_what_synthesis_starts_from():
    server = two_stage_server()
    out = controls.noise_dreams(server, [2, 3], num_images=6, seed=1)
    for j in (2, 3):
        images, labels, logits = out[j]
        assert images.shape == (6, 3, 32, 32) and logits.shape == (6, 10) and not logits.any()
        assert set(labels.tolist()) <= {j, j + 1}
        assert abs(images.mean().item()) < 0.1 and abs(images.std().item() - 1) < 0.1
    assert not torch.equal(out[2][0], out[3][0])
    assert controls.sources("own", [2, 3]) == [] and controls.sources("none", [2, 3]) == [2, 3]


def test_acceptance_rule_lets_noise_through_rarely_and_real_gains_often():
    """Each proposal is tested on its own client's confirmation half. Proposals no better than their starts
    (the two models' per-image margins equally noisy around the same values) are kept in under 10 % of
    trials (about 5 % at alpha = 0.05); proposals that raise every margin a little, on 250 images, are kept
    most of the time, where a test counting the images they flip keeps few. A client whose own images
    lost is never kept. A replay's proposals are tested together (Holm), so a replay of four keeps an update
    that changes nothing about as rarely as a replay of one."""
    g = torch.Generator().manual_seed(0)

    def confirmations(gain, trials=2000, n=250, noise=0.3):
        """What a client's confirmation sends back, for `trials` proposals of a two-class client near 85 %."""
        margin = 2 + 2 * torch.randn(trials, n, generator=g)          # logit of the right class minus the other
        before = margin + noise * torch.randn(trials, n, generator=g)
        after = margin + gain + noise * torch.randn(trials, n, generator=g)
        drop = (F.softplus(-before) - F.softplus(-after)).double()    # per-image cross-entropy drop
        gained, lost = ((after > 0) & (before <= 0)).sum(1), ((before > 0) & (after <= 0)).sum(1)
        return [(int(a), int(b), d.mean().item(), d.std().item() / n ** 0.5) for a, b, d in zip(gained, lost, drop)]

    def kept(said):
        return sum(selection.accept({0: one}, 0.05) == [0] for one in said) / len(said)

    def kept_by_counting(said):
        return sum(a > b and a - b >= 1.645 * (a + b) ** 0.5 for a, b, _, _ in said) / len(said)

    noise = confirmations(gain=0.0)
    assert 0.01 < kept(noise) < 0.10, kept(noise)        # rare, and the test is not inert
    gains = confirmations(gain=0.1)
    assert kept(gains) > 0.6 and kept(gains) > kept_by_counting(gains) + 0.3, (kept(gains), kept_by_counting(gains))
    assert selection.accept({0: (3, 4, 0.05, 0.01), 1: (5, 5, 0.05, 0.01), 2: (9, 2, 0.01, 0.01)}, 0.05) == [1]

    # A replay that tries four clients: tested one by one at 5 %, an update that changes nothing would be
    # kept in about one replay of five; Holm's step-down keeps the whole replay under 5 %, and a real gain
    # still passes most of the time.
    def any_kept(said, m=4):
        replays = [dict(enumerate(said[i:i + m])) for i in range(0, len(said) - m + 1, m)]
        return sum(bool(selection.accept(one, 0.05)) for one in replays) / len(replays)

    alone = sum(any(selection.accept({0: one}, 0.05) for one in noise[i:i + 4]) for i in range(0, 2000, 4)) / 500
    assert any_kept(noise) < 0.10 and alone > any_kept(noise) + 0.05, (any_kept(noise), alone)
    assert any_kept(gains) > 0.6, any_kept(gains)
    # the step-down: the larger z must pass at 0.05 / 2 (z 1.96), then the smaller at 0.05 (z 1.645)
    assert selection.accept({0: (9, 2, 0.021, 0.01), 1: (9, 2, 0.017, 0.01)}, 0.05) == [0, 1]
    assert selection.accept({0: (9, 2, 0.019, 0.01), 1: (9, 2, 0.019, 0.01)}, 0.05) == []
    assert selection.accept({0: (9, 2, 0.019, 0.01)}, 0.05) == [0]


# --------------------------------------------------------------------------------------------------
# Halves: a local client's answers, and a real run of the extension
# --------------------------------------------------------------------------------------------------

def tiny_ext_config(tiny_data_dir, **overrides):
    from shell.settings import DEFAULTS
    config = dict(DEFAULTS, method="pfeddsh-ext", data_dir=str(tiny_data_dir), batches=2, clients_per_batch=2,
                  rounds=2, clients_per_round=2, local_steps=1, batch_size=8, width=8, hidden=16, embed_dim=8,
                  chunk_size=1024, classes_per_client=10, replay_images=4, replay_iterations=2, replay_steps=2, seed=0)
    return dict(config, **overrides)


def build_ext(config):
    from shell.runner import SERVERS
    return train.build(config, torch.device("cpu"), servers=SERVERS)


def test_a_clients_confirmation_is_the_loss_its_own_evaluation_measures(tiny_data_dir):
    """Halves.confirm's four numbers: nothing changes when the model does not; otherwise the mean loss drop
    is what evaluate() measures on val_confirm before minus after, and the counts are its flipped images."""
    _, clients, server, _, _ = build_ext(tiny_ext_config(tiny_data_dir))
    client, bn = selection.Halves(clients[0]), server.bn_stats[0]
    before = server.generate(0)
    after = before + 0.05 * torch.randn(before.shape, generator=torch.Generator().manual_seed(0))
    assert client.confirm(before, before, bn) == (0, 0, 0.0, 0.0)
    gained, lost, drop, error = client.confirm(before, after, bn)
    (acc_before, loss_before), (acc_after, loss_after) = (client.evaluate(flat, bn, "val_confirm")
                                                          for flat in (before, after))
    assert drop == pytest.approx(loss_before - loss_after, rel=1e-4, abs=1e-6) and drop != 0 and error > 0
    n = len(clients[0].y_val[selection.HALVES["val_confirm"]])
    assert n > 1 and (gained - lost) / n == pytest.approx(acc_after - acc_before, abs=1e-6)
    # val_select and val_confirm are the two halves of the validation split, disjoint
    assert n + len(clients[0].y_val[selection.HALVES["val_select"]]) == len(clients[0].y_val)
    # A client with one validation image has none to confirm on (val_confirm is every second one), or one
    # after a second: either way an answer, never a crash, and nothing it says can be accepted.
    for kept in (1, 2):
        clients[0].x_val, clients[0].y_val = clients[0].x_val[:kept], clients[0].y_val[:kept]
        said = client.confirm(before, after, bn)
        assert said[3] == float("inf") and selection.accept({0: said}, 0.05) == []


class ClientSideOnly(fl.Client):
    """A client whose data raises when read from anywhere but its own side (its methods, or Halves acting
    for it)."""
    DATA = {"x_train", "y_train", "x_val", "y_val", "x_test", "y_test"}

    def __getattribute__(self, name):
        if name in ClientSideOnly.DATA and not object.__getattribute__(self, "inside"):
            raise AssertionError(f"client {object.__getattribute__(self, 'cid')}'s {name} read on the server's side")
        return object.__getattribute__(self, name)


def on_its_side(method):
    def run(self, *args, **kwargs):
        client = self.client if isinstance(self, selection.Halves) else self
        client.inside += 1
        try:
            return method(self, *args, **kwargs)
        finally:
            client.inside -= 1
    return run


def test_the_extensions_replay_asks_its_clients_and_reads_no_client_data_on_the_servers_side(tiny_data_dir,
                                                                                             monkeypatch):
    """A tiny real pfeddsh-ext run's replay, with clients whose images and labels raise unless the client (or
    Halves, answering for it) reads them: replay dreams, asks, confirms and writes without the server touching
    any, it counts its questions, and what the server keeps of it holds no client image."""
    config = tiny_ext_config(tiny_data_dir)
    _, clients, server, batches, _ = build_ext(config)
    assert isinstance(server, ext_server.ExtendedServer)
    real = torch.cat([c.x_train for c in clients])
    for client in clients:
        client.__class__, client.inside = ClientSideOnly, 0
    for name in ("local_train", "evaluate"):
        monkeypatch.setattr(ClientSideOnly, name, on_its_side(getattr(fl.Client, name)), raising=False)
    for name in ("evaluate", "per_image"):
        monkeypatch.setattr(selection.Halves, name, on_its_side(getattr(selection.Halves, name)))
    with pytest.raises(AssertionError, match="read on the server's side"):
        clients[0].x_train                                  # noqa: B018 (the guard is armed)
    state = train.onboard(server, clients, batches, config, pa_reference=False)
    report, = state.replays
    assert report["tried"] and report["client_queries"] >= 2 * len(report["tried"]) and len(report["images"]) > 0
    real = data.normalize(real, clients[0].mean, clients[0].std).flatten(1)
    kept = torch.cat([report["images"]] + [d[0] for d in server.dreams.values()]).flatten(1)
    assert torch.cdist(kept, real).min() > 1e-3


# --------------------------------------------------------------------------------------------------
# controls.py in the paper's mode: --method pfeddsh --replay-control
# --------------------------------------------------------------------------------------------------

def paper_arm(monkeypatch, control):
    """The paper's two-stage server (test_deepinversion) replayed under `control` ("none": the core's own
    replay): what fine_tune received per client, and what the synthesis dreamed."""
    from test_deepinversion import two_stage_server as paper_server
    server = paper_server(steps=2)
    seen, dreamed = {}, {}
    fine_tune, dream = di.fine_tune, di.dream

    def recording_fine_tune(server, cid, new, own, **settings):
        seen[cid] = (new, own)
        return fine_tune(server, cid, new, own, **settings)

    def recording_dream(server, dreamers, **settings):
        out = dream(server, dreamers, **settings)
        dreamed.update(out[0])
        return out
    with monkeypatch.context() as patch:
        patch.setattr(di, "fine_tune", recording_fine_tune)
        patch.setattr(di, "dream", recording_dream)
        if control != "none":
            controls.install(server, control)
        report = server.replay([None] * 4, 1, seed=0)
    return server, report, seen, dreamed


def test_each_control_feeds_the_papers_fine_tuning_its_stand_in_and_never_the_dreams(monkeypatch):
    arms = {c: paper_arm(monkeypatch, c) for c in controls.CONTROLS}
    server, report, seen, dreamed = arms["none"]
    held = server.label_counts[1] > 0
    dream_images, dream_labels, _ = dreamed[2]
    # the dreams: the new client's dreams of client 1's classes, nothing else
    assert torch.equal(seen[1][0][0], dream_images[held[dream_labels]])
    noise = controls.noise_dreams(server, [2], num_images=4, seed=1)[2]          # replay's seed is seed + t
    for control in ("noise", "noise-kd"):
        _, report, seen_c, dreamed_c = arms[control]
        new_images, new_labels, new_logits = seen_c[1][0]
        assert report["dreamers"] == [2] and report["control"] == control
        assert not any(torch.equal(x, d) for x in new_images for d in dream_images)      # no dream's pixels
        assert all(any(torch.equal(x, n) for n in noise[0]) for x in new_images)         # only noise images
        assert torch.equal(dreamed_c[2][0], dream_images)     # synthesis ran exactly as for the dreams
    # every arm fine-tunes client 1 on the same own dreams, bit for bit: only the new part differs
    for control in controls.CONTROLS:
        own = arms[control][2][1][1]
        assert all(torch.equal(a, b) for a, b in zip(own, seen[1][1]))
    assert len(arms["own"][2][1][0][0]) == 0 and arms["own"][1]["dreamers"] == []
    assert not arms["noise"][2][1][0][2].any()                # noise: no teacher's outputs


def test_the_knowledge_through_noise_control_targets_the_new_teachers_outputs_on_noise(monkeypatch):
    server, report, seen, _ = paper_arm(monkeypatch, "noise-kd")
    noise = controls.noise_dreams(server, [2], num_images=4, seed=1)
    server.model.eval()
    with torch.no_grad():        # teacher 2's generated model (replay moved only client 1's row) on the noise
        teacher = hn.run_model(server.model, server.hypernet.unflatten(server.generate(2)), server.uploads(2)[0],
                               noise[2][0])
    images, labels, logits = controls.read_by_teachers(server, noise)[2]
    assert torch.equal(images, noise[2][0]) and torch.allclose(logits, teacher) and logits.abs().sum() > 0
    assert torch.equal(labels, torch.tensor([2, 3])[teacher[:, [2, 3]].argmax(1)])   # client 2 holds 2 and 3
    keep = labels == 2                                              # of which client 1 holds class 2
    assert all(torch.equal(a, b[keep]) for a, b in zip(seen[1][0], (images, labels, logits)))

"""The baselines of issue 22 (baselines.py) do what defines them: pfedhn-frozen, pfedhn-pc, fedrep(-frozen),
ditto and fedlwf, and those of issue 34, frozen-adapters and fedtarget, on tiny generated data. Every one
also runs through train.py in tests/test_cli.py (parametrized over compare.VARIANTS)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data
import deepinversion
import federated as fl
import hypernet as hn
import train
from conftest import counts_of_test_images
from shell import baselines, checkpoint, cli, faults, runner
from test_baselines import TINY, build, onboard
from test_checkpoint import comparable


def test_loss(client, flat, bn_stats):
    """The mean cross-entropy of a model on the client's test images (evaluation mode)."""
    client.model.eval()
    with torch.no_grad():
        logits = hn.run_model(client.model, client.layout.unflatten(flat), bn_stats,
                              data.normalize(client.x_test, client.mean, client.std))
    return F.cross_entropy(logits, client.y_test).item()


test_loss.__test__ = False      # a helper, not a test


def recording(monkeypatch, cls, name):
    """Wrap cls.name so that every call's positional arguments are kept (the call itself goes on)."""
    calls, real = [], getattr(cls, name)

    def wrapper(self, *args, **kwargs):
        calls.append(args)
        return real(self, *args, **kwargs)
    monkeypatch.setattr(cls, name, wrapper)
    return calls


# --- the personal head / classifier never leaves its client ------------------------------------------

@pytest.mark.parametrize("method", ["fedrep", "fedrep-frozen"])
def test_fedrep_heads_are_never_averaged(tiny_data_dir, monkeypatch, method):
    averaged = recording(monkeypatch, baselines.FedAvg, "average")     # the only way into the shared body
    config, clients, server, batches = build(tiny_data_dir, method)
    index, initial_head = server.head_index, server.weights[server.head_index].clone()
    heads_after = []

    class Hooks(train.Hooks):
        def after_round(self, state, rng, stage_done, loss=None):
            if stage_done:
                heads_after.append({cid: h.clone() for cid, h in server.heads.items()})
    train.onboard(server, clients, batches, config, hooks=Hooks(), pa_reference=False)
    # What is averaged carries zeros where the head is, in every round...
    assert averaged and all((u.delta[index] == 0).all() for _, _, updates in averaged for u in updates)
    # ...so the shared vector still holds the initial classifier, while every client's own head moved.
    assert torch.equal(server.weights[index], initial_head)
    assert all(not torch.equal(server.heads[c], initial_head) for b in batches for c in b)
    for c in batches[0]:                    # nobody else's training touches an earlier client's head
        assert torch.equal(heads_after[0][c], heads_after[1][c])
    # the head it is evaluated with is its own
    seen = recording(monkeypatch, fl.Client, "evaluate")
    server.evaluate(clients[batches[1][0]])
    assert torch.equal(seen[-1][0][index], server.heads[batches[1][0]])
    if method == "fedrep":                  # stage 1 averages its clients' bodies: both stages average
        assert len(averaged) == 2 * config["rounds"]
    else:                                   # frozen: stage 1 never reaches the body
        assert len(averaged) == config["rounds"]


def test_fedrep_frozen_keeps_the_body_and_batch_0_exactly_after_its_stage(tiny_data_dir):
    config, clients, server, batches = build(tiny_data_dir, "fedrep-frozen")
    server.begin_stage(0)
    for _ in range(2):
        server.train_round(batches[0], clients, 0.0, config["local_steps"], config["batch_size"], config["lr"])
    body, bn = server.weights.clone(), {n: b.clone() for n, b in server.bn.items()}
    before = [server.evaluate(clients[c]) for c in batches[0]]
    server.begin_stage(1)
    for _ in range(2):
        server.train_round(batches[1], clients, 0.0, config["local_steps"], config["batch_size"], config["lr"])
    assert torch.equal(server.weights, body) and all(torch.equal(server.bn[n], bn[n]) for n in bn)
    assert [server.evaluate(clients[c]) for c in batches[0]] == before


def test_pfedhn_pc_sends_the_hypernetwork_nothing_of_the_classifier(tiny_data_dir, monkeypatch):
    sent = recording(monkeypatch, fl.Server, "update")
    config, clients, server, batches = build(tiny_data_dir, "pfedhn-pc")
    initial = {cid: h.clone() for cid, h in server.heads.items()}
    onboard(config, clients, server, batches)
    index = server.head_index
    assert len(sent) == 2 * config["rounds"]
    assert all((u.delta[index] == 0).all() for _, _, updates in sent for u in updates)
    assert all(not torch.equal(server.heads[c], initial[c]) for b in batches for c in b)
    # A client's model is the generated body with its own classifier; scrambling one client's
    # classifier changes nobody else's model.
    cid, other = batches[0]
    assert torch.equal(server.generate(cid)[index], server.heads[cid])
    theirs = server.generate(other)
    server.heads[cid] = torch.randn_like(server.heads[cid])
    assert torch.equal(server.generate(other), theirs)


# --- Ditto ----------------------------------------------------------------------------------------

def test_ditto_evaluates_the_personal_model_which_differs_from_the_global_one(tiny_data_dir, monkeypatch):
    config, clients, server, batches = build(tiny_data_dir, "ditto")
    personal_after, received = [], []
    real_round = baselines.Ditto.train_round

    def train_round(self, *args):
        received.append(self.weights.clone())     # every global model a client is sent
        return real_round(self, *args)
    monkeypatch.setattr(baselines.Ditto, "train_round", train_round)

    class Hooks(train.Hooks):
        def after_round(self, state, rng, stage_done, loss=None):
            if stage_done:
                personal_after.append({c: w.clone() for c, w in server.personal.items()})
    train.onboard(server, clients, batches, config, hooks=Hooks(), pa_reference=False)
    seen = recording(monkeypatch, fl.Client, "evaluate")
    for b in batches:
        for c in b:
            # trained on its own: neither the final global model nor any global model it was sent
            assert not any(torch.equal(server.personal[c], w) for w in received + [server.weights])
            server.evaluate(clients[c])
            assert torch.equal(seen[-1][0], server.personal[c])
    for c in batches[0]:                    # an earlier client keeps its personal model
        assert torch.equal(personal_after[0][c], personal_after[1][c])


def test_ditto_pull_is_the_proximal_term_and_lambda_matters(tiny_data_dir):
    config, clients, server, batches = build(tiny_data_dir, "ditto")
    anchor = server.weights.clone()
    pull = server.proximal(anchor)
    weights = server.layout.unflatten(anchor + 0.5)
    expected = 0.5 * server.lam * 0.25 * anchor.numel()
    assert float(pull(weights, None, None)) == pytest.approx(expected, rel=1e-4)
    # The personal model of a strong pull stays nearer the global model than that of no pull.
    distance = {}
    for lam in (0.0, 10.0):
        config, clients, server, batches = build(tiny_data_dir, "ditto")
        server.lam = lam
        server.begin_stage(0)
        for _ in range(2):
            server.train_round(batches[0], clients, 0.0, config["local_steps"], config["batch_size"], config["lr"])
        distance[lam] = float((server.personal[batches[0][0]] - server.weights).norm())
    assert distance[10.0] < distance[0.0]


# --- pfedhn-frozen: pFedHN's novel-client protocol ---------------------------------------------------

def test_frozen_pfedhn_hypernetwork_stays_while_new_embeddings_move_at_their_own_rate(tiny_data_dir):
    config, clients, server, batches = build(tiny_data_dir, "pfedhn-frozen")
    rounds = 3
    server.begin_stage(0)
    for _ in range(rounds):
        server.train_round(batches[0], clients, 0.0, config["local_steps"], config["batch_size"], config["lr"])
    server.end_stage(0)
    after_0 = {n: p.detach().clone() for n, p in server.hypernet.named_parameters()}
    server.begin_stage(1)
    assert list(server.params) == ["client_embeddings"] and server.optimizer.lr == config["embed_lr"]
    for _ in range(rounds):
        server.train_round(batches[1], clients, 0.0, config["local_steps"], config["batch_size"], config["lr"])
    for name, p in server.hypernet.named_parameters():
        if name != "client_embeddings":
            assert torch.equal(p, after_0[name]), name
    emb, before = server.hypernet.client_embeddings.detach(), after_0["client_embeddings"]
    assert torch.equal(emb[batches[0]], before[batches[0]])
    # Adam at the hypernetwork's 3e-3 moves an entry at most ~3e-3 a step; the embedding's own rate
    # (0.1 by default) moves it much further in the same rounds.
    moved = (emb[batches[1]] - before[batches[1]]).abs().max().item()
    assert moved > 10 * 3e-3 * rounds, moved


# --- FedLwF -------------------------------------------------------------------------------------------

def test_fedlwf_distils_only_after_batch_0_and_its_term_is_not_zero(tiny_data_dir, monkeypatch):
    values = []
    real = baselines.FedLwF.distillation

    def recorded(self):
        kd = real(self)

        def extra_loss(*args):
            value = kd(*args)
            values.append((self.stage, float(value.detach())))
            return value
        return extra_loss
    monkeypatch.setattr(baselines.FedLwF, "distillation", recorded)
    config, clients, server, batches = build(tiny_data_dir, "fedlwf")
    onboard(config, clients, server, batches)
    assert {stage for stage, _ in values} == {1}                            # never in stage 0
    assert len(values) == config["rounds"] * 2 * config["local_steps"]     # every local step of stage 1
    assert all(v > 0 for _, v in values)


def test_fedlwf_with_no_weight_is_fedavg_bit_for_bit(tiny_data_dir):
    config, clients, plain, batches = build(tiny_data_dir, "fedavg")
    onboard(config, clients, plain, batches)
    config, clients, lwf, batches = build(tiny_data_dir, "fedlwf")
    lwf.kd_weight = 0.0
    onboard(config, clients, lwf, batches)
    assert torch.equal(plain.weights, lwf.weights)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fedlwf_forgets_less_than_fedavg(tiny_data_dir, seed):
    """Forgetting: how much batch 0's mean test loss under the global model grows during stage 1. At this
    size accuracy moves in steps of whole classes (a 4-wide ResNet predicting 2 classes), so the loss is
    what is compared; the distillation weight is a strong 3 (at 10 and T = 2 the local steps diverge on
    one of these seeds). 3 out of 3 seeds of this exact setting hold; a change that breaks one says so."""
    forgetting = {}
    for method in ("fedavg", "fedlwf"):
        config, _ = cli.resolve_config(TINY + ["--data-dir", str(tiny_data_dir), "--method", method,
                                               "--seed", str(seed), "--rounds", "4", "--local-steps", "3",
                                               "--lwf-weight", "3"])
        _, clients, server, batches, _ = train.build(config, torch.device("cpu"), servers=baselines.SERVERS)
        losses = []

        class Hooks(train.Hooks):
            def after_round(self, state, rng, stage_done, loss=None):
                if stage_done:
                    losses.append(np.mean([test_loss(clients[c], server.weights, server.bn) for c in batches[0]]))
        train.onboard(server, clients, batches, config, hooks=Hooks(), pa_reference=False)
        forgetting[method] = losses[1] - losses[0]
    assert forgetting["fedlwf"] < forgetting["fedavg"], forgetting


# --- frozen-adapters: our extension's adapters and offsets on a body frozen after batch 0 -------------

def build_with(tiny_data_dir, method, *extra):
    config, _ = cli.resolve_config(TINY + ["--data-dir", str(tiny_data_dir), "--method", method, *extra])
    _, clients, server, batches, _ = train.build(config, torch.device("cpu"), servers=runner.SERVERS)
    return config, clients, server, batches


def stage(server, t, batches, clients, config, rounds=2):
    server.begin_stage(t)
    for r in range(rounds):
        server.train_round(batches[t], clients, r / (rounds - 1), config["local_steps"], config["batch_size"],
                           config["lr"])
    server.end_stage(t)


def test_frozen_adapters_train_only_the_stages_batch_on_a_body_frozen_after_fedavgs_batch_0(tiny_data_dir):
    # An adapter budget of 20 %: at this width the default 5 % leaves the clients' offsets no room for rank 1.
    extra = ["--batches", "3", "--adapter-budget", "0.2"]
    config, clients, server, batches = build_with(tiny_data_dir, "frozen-adapters", *extra)
    # pfeddsh-ext's adapters and rate: the same rank and cost under the same settings, the same Adam rate
    _, _, pfeddsh, _ = build_with(tiny_data_dir, "pfeddsh-ext", *extra)
    adapters = server.adapted.adapters
    assert adapters.rank == pfeddsh.hypernet.adapters.rank > 0
    assert adapters.per_batch_cost() == pfeddsh.hypernet.adapters.per_batch_cost()
    assert server.adapted.client_offsets.shape == pfeddsh.hypernet.client_offsets.shape
    assert server.optimizer.lr == config["adapter_lr"]
    # Batch 0 is FedAvg's, bit for bit.
    _, fedavg_clients, fedavg, _ = build_with(tiny_data_dir, "fedavg", *extra)
    stage(fedavg, 0, batches, fedavg_clients, config)
    stage(server, 0, batches, clients, config)
    assert torch.equal(server.weights, fedavg.weights)
    assert all(torch.equal(server.bn[n], fedavg.bn[n]) for n in fedavg.bn)
    body, body_bn = server.weights.clone(), {n: b.clone() for n, b in server.bn.items()}
    scores = {c: server.evaluate(clients[c]) for c in batches[0]}
    params = {n: p.detach().clone() for n, p in server.params.items()}
    generated, bn_stats = {}, {}
    for t in (1, 2):
        stage(server, t, batches, clients, config)
        assert torch.equal(server.weights, body) and all(torch.equal(server.bn[n], body_bn[n]) for n in body_bn)
        now = {n: p.detach().clone() for n, p in server.params.items()}
        for name in ("adapters.lora_out", "adapters.lora_in"):      # batch t's adapter, nobody else's
            assert not torch.equal(now[name][t], params[name][t]), (t, name)
            others = [b for b in range(3) if b != t]
            assert torch.equal(now[name][others], params[name][others]), (t, name)
        for name in ("client_offsets", "client_classifiers"):       # batch t's clients' rows, nobody else's
            others = [c for b in range(3) if b != t for c in batches[b]]
            assert all(not torch.equal(now[name][c], params[name][c]) for c in batches[t]), (t, name)
            assert torch.equal(now[name][others], params[name][others]), (t, name)
        params = now
        if t == 2:          # batch 1's models are bitwise what they were after its own stage
            for c in batches[1]:
                assert torch.equal(server.generate(c), generated[c])
                assert all(torch.equal(server.bn_stats[c][n], bn_stats[c][n]) for n in bn_stats[c])
        generated.update({c: server.generate(c) for c in batches[t]})
        bn_stats.update({c: {n: b.clone() for n, b in server.bn_stats[c].items()} for c in batches[t]})
        assert {c: server.evaluate(clients[c]) for c in batches[0]} == scores     # batch 0 keeps the body


# --- fedtarget: distillation on the server's dreams -------------------------------------------------

class Tripwire:
    """Stands in for a client's images and labels while the server dreams: any use of it fails the test."""

    def __getattr__(self, name):
        raise AssertionError(f"the server read a client's data ({name})")

    def __len__(self):
        raise AssertionError("the server read a client's data (len)")

    def __getitem__(self, index):
        raise AssertionError("the server read a client's data (indexing)")


def test_fedtarget_dreams_from_the_global_model_alone_and_every_later_local_step_distils_on_them(
        tiny_data_dir, monkeypatch):
    synthesized, real_synthesize = [], deepinversion.synthesize

    def synthesize(model, teachers, **kwargs):
        synthesized.append((model, teachers, kwargs))
        return real_synthesize(model, teachers, **kwargs)
    monkeypatch.setattr(deepinversion, "synthesize", synthesize)
    targets, real_loss = [], deepinversion.distillation_loss

    def distillation_loss(student_logits, teacher_logits, temperature, weight=None):
        targets.append(teacher_logits)
        return real_loss(student_logits, teacher_logits, temperature, weight)
    monkeypatch.setattr(deepinversion, "distillation_loss", distillation_loss)
    terms, real_distillation = [], baselines.FedTarget.distillation

    def distillation(self, client):         # what each local step adds to its loss
        kd = real_distillation(self, client)

        def extra_loss(*args):
            value = kd(*args)
            terms.append((self.stage, float(value.detach()), value.requires_grad))
            return value
        return extra_loss
    monkeypatch.setattr(baselines.FedTarget, "distillation", distillation)
    config, clients, server, batches = build_with(tiny_data_dir, "fedtarget", "--replay-images", "4",
                                                  "--replay-iterations", "3")
    stage(server, 0, batches, clients, config, rounds=config["rounds"])
    assert not synthesized and not terms                            # stage 0 is FedAvg's
    weights, bn = server.weights.clone(), {n: b.clone() for n, b in server.bn.items()}
    held = {}
    for c in clients:                                               # no client data may be read while dreaming
        held[c.cid] = {k: getattr(c, k) for k in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")}
        for k in held[c.cid]:
            setattr(c, k, Tripwire())
    server.begin_stage(1)
    for c in clients:
        for k, v in held[c.cid].items():
            setattr(c, k, v)
    # What DeepInversion was given: the model and the global model's weights, BN statistics and the
    # label counts batch 0 uploaded, nothing else; replay's budget: replay-images per client of a batch.
    (model, ((teacher_weights, teacher_bn, label_counts),), kwargs), = synthesized
    assert model is server.model
    assert torch.equal(server.layout.flatten(teacher_weights), weights)
    assert all(torch.equal(teacher_bn[n], bn[n]) for n in bn)
    assert torch.equal(label_counts, sum(clients[c].label_counts for c in batches[0]))
    assert kwargs["num_images"] == config["replay_images"] * config["clients_per_batch"]
    assert kwargs["iterations"] == config["replay_iterations"]
    images, logits = server.dreams
    assert len(images) == len(logits) == kwargs["num_images"]
    for r in range(config["rounds"]):
        server.train_round(batches[1], clients, r / (config["rounds"] - 1), config["local_steps"],
                           config["batch_size"], config["lr"])
    # every local step of stage 1 added a KD term that trains (positive, with a gradient), toward the
    # previous model's logits on the server's dreams
    assert len(terms) == len(targets) == config["rounds"] * len(batches[1]) * config["local_steps"]
    assert all(stage == 1 and value > 0 and trains for stage, value, trains in terms)
    assert all((target[:, None] == logits[None]).all(-1).any(1).all() for target in targets)


def test_fedtarget_with_no_weight_is_fedavg_bit_for_bit(tiny_data_dir):
    trained = {}
    for name, method, weight in [("fedavg", "fedavg", "1"), ("off", "fedtarget", "0"), ("on", "fedtarget", "1")]:
        config, clients, server, batches = build_with(tiny_data_dir, method, "--lwf-weight", weight,
                                                      "--replay-images", "4", "--replay-iterations", "3")
        onboard(config, clients, server, batches)
        trained[name] = server.weights
    assert torch.equal(trained["off"], trained["fedavg"])
    assert not torch.equal(trained["on"], trained["fedavg"])        # the control: with a weight, it is not


@pytest.mark.parametrize("method", ["frozen-adapters", "fedtarget"])
def test_issue_34s_baselines_run_through_train_run(tiny_data_dir, method):
    config, _ = cli.resolve_config(TINY + ["--data-dir", str(tiny_data_dir), "--method", method,
                                           "--replay-images", "4", "--replay-iterations", "3"])
    results = train.run(config, torch.device("cpu"), servers=runner.SERVERS)
    assert len(results["accuracy"]) == 2 and all(a is not None for a in results["accuracy"][1])
    assert all(counts_of_test_images(row, results["test_sizes"]) for row in results["accuracy"])
    assert results["metrics"]["pa"] is not None and results["replay"] == []
    if method == "frozen-adapters":         # nothing batch 0 reads is written after its stage
        assert results["metrics"]["ri"] == 0.0


# --- resume ---------------------------------------------------------------------------------------

CHECKPOINTED = TINY + ["--rounds", "4", "--local-steps", "1", "--checkpoint-every", "3", "--replay-images", "4",
                       "--replay-iterations", "3"]


@pytest.mark.parametrize("method", ["pfedhn-frozen", "pfedhn-pc", "fedrep", "ditto", "fedlwf", "fedtarget",
                                    "frozen-adapters"])
def test_killed_mid_stage_1_then_resumed_equals_uninterrupted(tiny_data_dir, tmp_path, method):
    """Stopped after round 6 of 8 (mid stage 1, where each method's stage-1 state matters: the embedding
    optimiser, the heads, the personal models, the teacher), then resumed: the same results.json."""
    argv = CHECKPOINTED + ["--data-dir", str(tiny_data_dir), "--method", method]
    reference = cli.main(argv + ["--out", str(tmp_path / "reference")])
    with pytest.raises(cli.Interrupted):
        cli.main(argv + ["--out", str(tmp_path / "run"), "--stop-after-rounds", "6"])
    resumed = cli.main(argv + ["--out", str(tmp_path / "run"), "--resume"])
    assert comparable(resumed) == comparable(reference)


def test_new_methods_refuse_the_flower_engine():
    for method in cli.LOCAL_ENGINE_ONLY:
        with pytest.raises(cli.CliError, match=f"cannot run {method}|needs Flower"):
            cli.check_flower(method)
    for method in cli.NOT_TRIED_ON_FLOWER:
        with pytest.raises(cli.CliError, match=f"not been tried with {method}|needs Flower"):
            cli.check_flower(method)


def all_finite(value):
    if isinstance(value, torch.Tensor):
        return not value.is_floating_point() or bool(torch.isfinite(value).all())
    if isinstance(value, dict):
        return all(all_finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(all_finite(v) for v in value)
    return True


@pytest.mark.parametrize("method", ["pfedhn-frozen", "pfedhn-pc", "fedrep", "fedrep-frozen", "ditto", "fedlwf",
                                    "fedtarget", "frozen-adapters"])
def test_a_diverged_local_update_is_dropped_and_counted(tiny_data_dir, monkeypatch, method):
    real, calls = fl.Client.local_train, []

    def first_one_nan(self, *args, **kwargs):
        update = real(self, *args, **kwargs)
        calls.append(self.cid)
        if len(calls) == 1:
            update.delta = torch.full_like(update.delta, float("nan"))
        return update
    monkeypatch.setattr(fl.Client, "local_train", first_one_nan)
    config, clients, server, batches = build(tiny_data_dir, method)
    if isinstance(server, fl.Server):       # the hypernetwork baselines are screened by the shell (runner.Shell)
        faults.screen(server)
    state = onboard(config, clients, server, batches)
    assert server.faults["dropped_updates"] == 1 and server.faults["skipped_rounds"] == 0
    assert all_finite(checkpoint.server_state(server))
    assert counts_of_test_images(state.accuracy[-1], [len(c.y_test) for c in clients])

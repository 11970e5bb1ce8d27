"""The protocol (federated.py): what a client does with the weights it is sent (local training lowers its loss,
evaluation counts its own images, it uploads no data) and the server's pFedHN update (it moves the generated
weights toward the trained ones, clipped, and leaves absent clients' rows alone)."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import data
import federated as fl
import hypernet as hn
import train
from test_hypernet import make_hypernet

REPO = Path(__file__).resolve().parents[1]


def make_server(net, target, **kwargs):
    """federated.Server around the hypernetwork, one batch of every client."""
    return fl.Server(net, target, [list(range(net.client_embeddings.shape[0]))], **kwargs)


def client_update(delta, target):
    """What a client sends back: the delta, fresh BN statistics, some label counts."""
    return fl.ClientUpdate(delta=delta, bn_stats=hn.bn_stats_init(target), label_counts=torch.ones(10), loss=0.0)


# --------------------------------------------------------------------------------------------------
# The server's update
# --------------------------------------------------------------------------------------------------

def test_server_update_moves_generated_weights_toward_trained_weights():
    """pFedHN's rule: after one server step the generated weights of the round's clients are closer to what
    they trained to."""
    target, net = make_hypernet()
    server = make_server(net, target, server_lr=1e-2)
    flat = net([1, 2], [0, 0])
    torch.manual_seed(1)
    trained = flat.detach() + 0.05 * torch.randn_like(flat)       # what local training returned
    server.update([1, 2], flat, [client_update(trained[k] - flat[k].detach(), target) for k in range(2)])
    with torch.no_grad():
        after = net([1, 2], [0, 0])
    for k in range(2):
        before_gap, after_gap = (trained[k] - flat[k].detach()).norm(), (trained[k] - after[k]).norm()
        assert after_gap < 0.99 * before_gap, (k, before_gap, after_gap)


def test_server_update_direction_is_the_pull_toward_the_trained_weights():
    """The gradient pull_toward gives is exactly that of 1/2 ||generated - trained||^2 averaged over clients."""
    target, net = make_hypernet()
    params = {n: p for n, p in net.named_parameters()}
    flat = net([0, 3], [0, 0])
    deltas = 0.01 * torch.randn_like(flat)
    grads = fl.pull_toward(flat, deltas, params)
    loss = 0.5 * ((net([0, 3], [0, 0]) - (flat.detach() + deltas)) ** 2).sum(1).mean()
    expected = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    for (name, g), e in zip(grads.items(), expected):
        torch.testing.assert_close(g, torch.zeros_like(g) if e is None else e, rtol=1e-4, atol=1e-7)


def test_absent_clients_embeddings_do_not_move_even_with_adams_momentum():
    target, net = make_hypernet()
    server = make_server(net, target, server_lr=1e-2)
    before = net.client_embeddings.detach().clone()
    for round_clients in ([0, 1], [0, 1], [1]):
        flat = net(round_clients, [0] * len(round_clients))
        server.update(round_clients, flat, [client_update(torch.randn_like(f) * 0.01, target) for f in flat.detach()])
    after = net.client_embeddings.detach()
    assert torch.equal(after[2:], before[2:])           # never in a round: bitwise unchanged
    assert not torch.equal(after[:2], before[:2])        # in a round: moved


def test_gradient_clipping_bounds_the_norm():
    grads = {"a": torch.full((3,), 4.0), "b": torch.full((2, 2), 3.0)}       # norm sqrt(48 + 36)
    clipped = fl.clipped(grads, 1.0)
    norm = torch.sqrt(sum((g ** 2).sum() for g in clipped.values()))
    assert norm.item() == pytest.approx(1.0, rel=1e-5)
    torch.testing.assert_close(clipped["a"] / clipped["a"].norm(), grads["a"] / grads["a"].norm())   # direction kept
    same = fl.clipped(grads, 100.0)
    assert all(torch.equal(same[k], grads[k]) for k in grads)                 # under the bound: untouched


def test_the_update_records_what_clients_uploaded():
    target, net = make_hypernet()
    server = make_server(net, target)
    flat = net([2], [0])
    bn = {n: b + 1 for n, b in hn.bn_stats_init(target).items()}
    counts = torch.arange(10)
    server.update([2], flat, [fl.ClientUpdate(torch.zeros_like(flat[0]), bn, counts, 0.5)])
    stats, label_counts = server.uploads(2)
    assert stats is bn and torch.equal(label_counts, counts)
    assert 0 not in server.label_counts                   # a client that never uploaded has no counts


# --------------------------------------------------------------------------------------------------
# The client
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_clients(tiny_data_dir):
    config = dict(train.DEFAULTS, data_dir=str(tiny_data_dir), batches=2, clients_per_batch=2, width=8, hidden=16,
                  embed_dim=4, chunk_size=1024, seed=0)
    _, clients, server, batches, model = train.build(config, torch.device("cpu"))
    return clients, server


def training_loss(client, flat, bn_stats):
    """The model's mean cross-entropy on the client's whole training split, without augmentation (eval mode)."""
    weights = client.layout.unflatten(flat)
    client.model.eval()
    with torch.no_grad():
        logits = hn.run_model(client.model, weights, bn_stats, data.normalize(client.x_train, client.mean, client.std))
    return F.cross_entropy(logits, client.y_train).item()


def test_local_training_lowers_the_clients_loss_on_its_training_data(tiny_clients):
    """K steps of SGD from the weights it is sent: the model it returns (sent + delta, with its new BN
    statistics) fits the client's training images better than the one it was sent, and only its own generator
    advanced (the server's state and the weights it sent are untouched)."""
    clients, server = tiny_clients
    client = clients[1]
    flat, bn = server.generate(1), server.bn_stats[1]
    sent, sent_bn = flat.clone(), {n: b.clone() for n, b in bn.items()}
    # the sent model's loss, with BN statistics from the client's own data (as after any training)
    calibrated = {n: b.clone() for n, b in bn.items()}
    client.model.train()
    with torch.no_grad():
        hn.run_model(client.model, client.layout.unflatten(flat), calibrated,
                     data.normalize(client.x_train, client.mean, client.std))
    before = training_loss(client, flat, calibrated)
    steps = client.steps_trained
    update = client.local_train(flat, bn, 15, 16, 0.05)
    after = training_loss(client, flat + update.delta, update.bn_stats)
    assert after < 0.7 * before, (before, after)
    assert client.steps_trained == steps + 15 and update.loss > 0
    assert torch.equal(flat, sent) and all(torch.equal(bn[n], sent_bn[n]) for n in bn)


def test_local_train_uploads_counts_not_data_and_keeps_frozen_weights(tiny_clients):
    clients, server = tiny_clients
    client = clients[0]
    flat = server.generate(0)
    update = client.local_train(flat, server.bn_stats[0], 2, 8, 0.05, trainable={"fc.weight", "fc.bias"})
    assert set(vars(update)) == {"delta", "bn_stats", "label_counts", "loss"}      # nothing else leaves
    assert torch.equal(update.label_counts, torch.bincount(client.y_train, minlength=10))
    assert update.label_counts.sum() == len(client.y_train)
    moved = update.delta != 0
    assert moved.any() and moved.nonzero().flatten().tolist() == [i for i in client.layout.classifier_index.tolist()
                                                                   if moved[i]]
    assert not moved[torch.ones(len(moved), dtype=torch.bool).index_fill_(0, client.layout.classifier_index,
                                                                           False)].any()


def test_the_same_generator_draws_the_same_training(tiny_clients):
    clients, server = tiny_clients
    client = clients[2]
    flat, bn = server.generate(2), server.bn_stats[2]
    a = client.local_train(flat, bn, 2, 8, 0.05, generator=fl.client_generator(0, 2, "cpu"))
    b = client.local_train(flat, bn, 2, 8, 0.05, generator=fl.client_generator(0, 2, "cpu"))
    c = client.local_train(flat, bn, 2, 8, 0.05, generator=fl.client_generator(1, 2, "cpu"))
    assert torch.equal(a.delta, b.delta) and not torch.equal(a.delta, c.delta)


def test_evaluate_counts_the_clients_own_images(tiny_clients):
    """Accuracy is the share of the split's images the model gets right (checked against a plain forward),
    the test and validation splits are the client's own, and a split without images is NaN."""
    clients, server = tiny_clients
    client = clients[3]
    flat, bn = server.generate(3), server.bn_stats[3]
    for split, (x, y) in {"test": (client.x_test, client.y_test), "val": (client.x_val, client.y_val)}.items():
        client.model.eval()
        with torch.no_grad():
            logits = hn.run_model(client.model, client.layout.unflatten(flat), bn, data.normalize(x, client.mean, client.std))
        expected = (logits.argmax(1) == y).float().mean().item()
        assert client.evaluate(flat, bn, split) == pytest.approx(expected)
    test_acc, val_acc = server.evaluate(client)
    assert test_acc == client.evaluate(flat, bn) and val_acc == client.evaluate(flat, bn, "val")
    empty = fl.Client.__new__(fl.Client)
    empty.__dict__.update(vars(client))
    empty.x_val, empty.y_val = client.x_val[:0], client.y_val[:0]
    assert client.evaluate(flat, bn, "val") == client.evaluate(flat, bn, "val")         # a number
    assert empty.evaluate(flat, bn, "val") != empty.evaluate(flat, bn, "val")           # NaN


def test_every_small_width_trains_a_step_without_a_native_crash():
    """Widths 2-7 once ended in a segmentation fault inside the convolution's backward pass (channels-last
    input from data.augment, one thread). In a child process, so a crash is a failure here, not pytest's end."""
    script = """
import torch, data, hypernet as hn
torch.set_num_threads(1)
x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
for width in range(1, 9):
    model = hn.ResNet18(10, width).train()
    model(data.augment(x, (0.5,) * 3, (0.25,) * 3, generator=torch.Generator().manual_seed(1))).sum().backward()
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", (done.returncode, done.stderr[-500:])

"""The protocol (federated.py): the server's pFedHN update and what a client answers."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import federated as fl  # noqa: E402
import hypernet as hn  # noqa: E402
import replay  # noqa: E402
import train  # noqa: E402
from shell import cli  # noqa: E402
from test_hypernet import make_hypernet  # noqa: E402


def make_server(net, target, **kwargs):
    """federated.Server around the hypernetwork, one batch of every client."""
    return fl.Server(net, target, [list(range(net.client_embeddings.shape[0]))], **kwargs)


def client_update(delta, target):
    """What a client sends back: the delta, fresh BN statistics, some label counts."""
    return fl.ClientUpdate(delta=delta, bn_stats=hn.bn_stats_init(target), label_counts=torch.ones(10), loss=0.0)


def test_server_update_moves_generated_weights_toward_trained_weights():
    target, net = make_hypernet()
    server = make_server(net, target, optimizer="sgd", server_lr=0.05, server_momentum=0.0)
    flat = net([1], [0])
    torch.manual_seed(1)
    trained = flat.detach() + 0.01 * torch.randn_like(flat)       # what local training returned
    server.update([1], flat, [client_update((trained - flat.detach())[0], target)])
    after = net([1], [0]).detach()
    before_gap = (trained - flat.detach()).norm()
    after_gap = (trained - after).norm()
    assert after_gap < before_gap, (before_gap, after_gap)


def test_absent_clients_embeddings_do_not_move_even_with_momentum_and_decay():
    target, net = make_hypernet()
    server = make_server(net, target, optimizer="adam", server_lr=1e-2, server_weight_decay=1e-2)
    before = net.client_embeddings.detach().clone()
    for round_clients in ([0, 1], [0, 1], [1]):
        flat = net(round_clients, [0] * len(round_clients))
        server.update(round_clients, flat, [client_update(torch.randn_like(f) * 0.01, target) for f in flat.detach()])
    after = net.client_embeddings.detach()
    assert torch.equal(after[2:], before[2:])           # never in a round: bitwise unchanged
    assert not torch.equal(after[:2], before[:2])        # in a round: moved


def test_gradient_clipping_bounds_the_norm():
    # With plain SGD at rate 1 the step is the clipped gradient itself: its norm is the clip bound.
    target, net = make_hypernet()
    server = make_server(net, target, optimizer="sgd", server_lr=1.0, server_momentum=0.0, grad_clip=1.0)
    before = {name: p.detach().clone() for name, p in server.params.items()}
    flat = net([0], [0])
    server.update([0], flat, [client_update(torch.full_like(flat[0], 100.0), target)])
    step = torch.sqrt(sum(((p.detach() - before[name]) ** 2).sum() for name, p in server.params.items()))
    assert abs(step.item() - 1.0) < 1e-3


def test_a_clients_confirmation_is_the_loss_its_own_evaluation_measures(tiny_data_dir):
    """Client.confirm's four numbers: nothing changes when the model does not; otherwise the mean loss drop
    is what evaluate() measures on val_confirm before minus after, and the counts are its flipped images."""
    config, _ = cli.resolve_config(["--dataset", "cifar10", "--data-dir", str(tiny_data_dir), "--batches", "2",
                                    "--clients-per-batch", "2", "--width", "4", "--device", "cpu"])
    _, clients, server, _, _ = train.build(config, torch.device("cpu"))
    client, bn = clients[0], server.bn_stats[0]
    before = server.generate(0)
    after = before + 0.05 * torch.randn(before.shape, generator=torch.Generator().manual_seed(0))
    assert client.confirm(before, before, bn) == (0, 0, 0.0, 0.0)
    gained, lost, drop, error = client.confirm(before, after, bn)
    (acc_before, loss_before), (acc_after, loss_after) = (client.evaluate(flat, bn, "val_confirm")
                                                          for flat in (before, after))
    assert drop == pytest.approx(loss_before - loss_after, rel=1e-4, abs=1e-6) and drop != 0 and error > 0
    n = len(client.held_out("val_confirm")[1])
    assert (gained - lost) / n == pytest.approx(acc_after - acc_before, abs=1e-6)
    # A client with one validation image has none to confirm on (val_confirm is every second one), or one
    # after a second: either way an answer, never a crash, and nothing it says can be accepted.
    for kept in (1, 2):
        client.x_val, client.y_val = client.x_val[:kept], client.y_val[:kept]
        said = client.confirm(before, after, bn)
        assert said[3] == float("inf") and replay.accept({0: said}, 0.05) == []

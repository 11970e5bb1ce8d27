"""The target model and the hypernetwork (hypernet.py)."""
import sys
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import hypernet as hn  # noqa: E402


def torchvision_cifar_resnet18(num_classes=10):
    """torchvision's ResNet-18 with the CIFAR stem: the reference our own module must match."""
    net = torchvision.models.resnet18(num_classes=num_classes)
    net.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    net.maxpool = torch.nn.Identity()
    return net


def test_functional_resnet18_matches_torchvision():
    torch.manual_seed(0)
    reference = torchvision_cifar_resnet18()
    ours = hn.ResNet18(num_classes=10, width=64)
    state = reference.state_dict()
    assert set(state) == set(ours.state_dict()), "parameter names must match torchvision's"
    # Non-trivial BN statistics, so eval mode really exercises the running stats.
    for name, t in state.items():
        if name.endswith("running_mean"):
            t.normal_(0, 0.1)
        elif name.endswith("running_var"):
            t.uniform_(0.5, 1.5)
    reference.load_state_dict(state)
    weights = {n: p.detach() for n, p in reference.named_parameters()}
    bn = {n: b.clone() for n, b in reference.named_buffers()}
    x = torch.randn(4, 3, 32, 32)
    reference.eval(), ours.eval()
    expected = reference(x)
    got = hn.run_model(ours, weights, bn, x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_resnet18_parameter_count():
    assert hn.count_parameters(hn.ResNet18(10, 64)) == 11_173_962   # the standard CIFAR ResNet-18


def test_train_mode_updates_only_the_clients_bn_stats():
    model = hn.ResNet18(10, 8)
    weights = {n: p.detach() for n, p in model.named_parameters()}
    bn = hn.bn_stats_init(model)
    before = {n: b.clone() for n, b in bn.items()}
    model.train()
    hn.run_model(model, weights, bn, torch.randn(8, 3, 32, 32) + 1.0)
    assert not torch.equal(bn["bn1.running_mean"], before["bn1.running_mean"])
    assert torch.equal(model.bn1.running_mean, torch.zeros_like(model.bn1.running_mean))


def make_hypernet(num_clients=4, width=8, chunk_size=512):
    torch.manual_seed(0)
    target = hn.ResNet18(10, width)
    return target, hn.HyperNetwork(target, num_clients, embed_dim=8, chunk_embed_dim=8, hidden=32,
                                   num_layers=2, chunk_size=chunk_size)


def test_hypernet_shapes_and_size():
    target, net = make_hypernet()
    flat = net([0, 2], [0, 0])
    assert flat.shape == (2, hn.count_parameters(target))
    weights = net.unflatten(flat[0])
    assert [weights[n].shape for n in net.names] == [p.shape for p in target.parameters()]
    assert torch.equal(net.flatten(weights), flat[0])
    assert net.num_chunks == -(-hn.count_parameters(target) // 512)
    # Clients differ only through their embeddings, so two clients get different weights.
    assert not torch.equal(flat[0], flat[1])
    # The generated model runs.
    logits = hn.run_model(target, weights, hn.bn_stats_init(target), torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 10)


def test_batched_generation_equals_one_by_one():
    _, net = make_hypernet()
    both = net([1, 3], [0, 0])
    torch.testing.assert_close(both[0], net([1], [0])[0])
    torch.testing.assert_close(both[1], net([3], [0])[0])


def test_hypernet_is_much_smaller_than_a_per_tensor_head():
    target = hn.ResNet18(10, 64)
    net = hn.HyperNetwork(target, 50)
    weights = hn.count_parameters(target)
    # everything but the shared base vector and the clients' own offsets (per-client state)
    generator = hn.count_parameters(net) - net.base.numel() - net.client_offsets.numel()
    assert net.base.numel() == weights
    assert generator < 0.1 * weights                              # pFedHN's heads: hidden x weights = 100x

"""The target model, its flat layout and the hypernetwork (hypernet.py)."""
import torch
import torchvision

import hypernet as hn
import masks


def count_parameters(module):
    return sum(p.numel() for p in module.parameters())


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
    assert count_parameters(hn.ResNet18(10, 64)) == 11_173_962   # the standard CIFAR ResNet-18


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
    assert flat.shape == (2, count_parameters(target))
    weights = net.unflatten(flat[0])
    assert [weights[n].shape for n in net.layout.names] == [p.shape for p in target.parameters()]
    assert torch.equal(net.layout.flatten(weights), flat[0])
    assert net.num_chunks == -(-count_parameters(target) // 512)
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
    weights = count_parameters(target)
    generator = count_parameters(net) - net.base.numel()      # everything but the shared base vector
    assert net.base.numel() == weights and net.client_classifiers is None     # no gates: no own classifiers
    assert generator < 0.1 * weights                              # pFedHN's heads: hidden x weights = 100x


def test_weight_layout_round_trip_and_indices():
    model = hn.ResNet18(10, 8)
    layout = hn.WeightLayout(model)
    params = dict(model.named_parameters())
    flat = layout.flatten(params)
    assert flat.shape == (layout.num_weights,) == (count_parameters(model),)
    back = layout.unflatten(flat)
    assert list(back) == layout.names and all(torch.equal(back[n], params[n]) for n in layout.names)
    # the classifier's positions are exactly fc.weight then fc.bias
    fc = torch.cat([params["fc.weight"].reshape(-1), params["fc.bias"]])
    assert torch.equal(flat[layout.classifier_index], fc)
    assert len(layout.classifier_index) == 10 * 64 + 10
    convs = layout.index_of(lambda name, shape: len(shape) == 4)
    assert len(convs) == sum(p.numel() for p in params.values() if p.dim() == 4)
    # a view: writing into the unflattened dict writes the flat vector
    plain = torch.zeros(layout.num_weights)
    layout.unflatten(plain)["fc.bias"].fill_(7.0)
    assert torch.equal(plain.nonzero().flatten(), layout.classifier_index[-10:])


def test_generated_model_starts_like_a_fresh_resnet():
    """init_scale_and_offset: a freshly generated model's tensors have the usual scales, and it runs to
    logits of order one (without the scales deep layers would explode)."""
    target, net = make_hypernet(width=16)
    with torch.no_grad():
        weights = net.unflatten(net([0], [0])[0])
    for name, p in target.named_parameters():
        w = weights[name]
        if p.dim() == 4:            # He
            assert 0.5 < w.std().item() / (2.0 / p[0].numel()) ** 0.5 < 2.0, name
        elif name.endswith("weight") and p.dim() == 1:     # BatchNorm weight around 1
            assert abs(w.mean().item() - 1.0) < 0.2, name
    torch.manual_seed(1)
    logits = hn.run_model(target, weights, hn.bn_stats_init(target), torch.randn(16, 3, 32, 32))
    assert torch.isfinite(logits).all() and 0.01 < logits.std().item() < 10


def test_gates_and_own_classifiers():
    """With gates, a client's weights depend on its batch's gate, and its own classifier row adds to the
    classifier's entries only, and only its own."""
    torch.manual_seed(0)
    target = hn.ResNet18(10, 8)
    gates = masks.BatchGates(2, 2, 32)
    net = hn.HyperNetwork(target, 4, embed_dim=8, chunk_embed_dim=8, hidden=32, num_layers=2, chunk_size=512,
                          gates=gates)
    assert net.client_classifiers.shape == (4, len(net.classifier_index))
    with torch.no_grad():
        before = net([0, 1], [0, 0], s=1.0)
        assert not torch.equal(net([0], [1], s=1.0)[0], before[0])     # another batch's gate, other weights
        net.client_classifiers[1] = 1.0
        after = net([0, 1], [0, 0], s=1.0)
    assert torch.equal(after[0], before[0])
    moved = (after[1] != before[1]).nonzero().flatten()
    assert torch.equal(moved, net.classifier_index)
    torch.testing.assert_close(after[1, net.classifier_index], before[1, net.classifier_index] + 1.0)

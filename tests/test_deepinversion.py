"""deepinversion.py: DeepInversion synthesis (the BN loss, hook hygiene, what synthesize returns) and the paper's
replay (who is tried, whom the server dreams from, what the fine-tuning sees and may change). The paper's replay
asks no client anything: here its clients raise on any call, and only the tried clients' embedding rows move."""
from contextlib import contextmanager

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import deepinversion as di
import federated as fl
import hypernet as hn
import train
from shell.settings import PRESETS
from test_masks import make_server, run_stage


def bn_modules(model):
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


def structured_batch(generator, n=32, size=16):
    """Smooth colour blobs (a 4x4 colour grid upsampled) plus a little noise: statistics unlike N(0, 1)."""
    grid = torch.rand(n, 3, 4, 4, generator=generator) * 2 - 0.5
    x = F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False)
    return x + 0.1 * torch.randn(x.shape, generator=generator)


def make_teacher(model, seed, label_counts, passes=4):
    """(weights, BN statistics, label counts) of a client: generated-like weights and statistics from a few
    train-mode passes over its (fake) data."""
    g = torch.Generator().manual_seed(seed)
    weights = {n: 0.5 * p.detach() + 0.1 * torch.randn(p.shape, generator=g) for n, p in model.named_parameters()}
    bn_stats = hn.bn_stats_init(model)
    # Cumulative averages (momentum None) so that the stats describe the data, as a trained client's
    # would; with momentum 0.1 and 4 passes they would still be mostly the (0, 1) initialisation.
    model.train()
    for m in bn_modules(model):
        m.momentum = None
    with torch.no_grad():
        for _ in range(passes):
            hn.run_model(model, weights, bn_stats, structured_batch(g))
    for m in bn_modules(model):
        m.momentum = 0.1
    model.eval()
    return weights, bn_stats, torch.as_tensor(label_counts, dtype=torch.int64)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = hn.ResNet18(num_classes=10, width=8)
    teachers = [make_teacher(model, 1, [5, 5, 0, 0, 0, 0, 0, 0, 0, 0]),
                make_teacher(model, 2, [0, 0, 0, 3, 0, 0, 0, 9, 0, 0])]
    return model, teachers


@contextmanager
def bn_losses(model):
    """deepinversion's BN-loss hooks on `model` for the block: yields the list every forward appends to."""
    losses = []
    hooks = di.bn_loss_hooks(model, losses)
    try:
        yield losses
    finally:
        for h in hooks:
            h.remove()


def stacked(teachers):
    weights = {k: torch.stack([w[k] for w, _, _ in teachers]) for k in teachers[0][0]}
    bn_stats = {k: torch.stack([b[k] for _, b, _ in teachers]) for k in teachers[0][1]}
    return weights, bn_stats


FAST = dict(num_images=16, image_size=16, iterations=20, lr=0.1)


# --------------------------------------------------------------------------------------------------
# 1. Synthesis
# --------------------------------------------------------------------------------------------------

def test_bn_statistics_loss_is_zero_on_matching_statistics_and_positive_otherwise():
    x = torch.randn(8, 4, 5, 5) * torch.tensor([1.0, 2.0, 0.5, 3.0]).view(1, 4, 1, 1) + 0.7
    mean, var = x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False)
    assert di.bn_statistics_loss(x, mean, var).item() == 0.0
    shifted_mean = mean + torch.tensor([0.0, 0.3, 0.0, 0.4])           # ||.||_2 = 0.5
    torch.testing.assert_close(di.bn_statistics_loss(x, shifted_mean, var), torch.tensor(0.5))
    torch.testing.assert_close(di.bn_statistics_loss(x, mean, var + torch.tensor([0.0, 0.0, 1.2, 0.0])),
                               torch.tensor(1.2))
    # the unbiased variance (what train-mode BN stores) is NOT a match: the loss must use the biased one
    assert di.bn_statistics_loss(x, mean, x.var(dim=(0, 2, 3))).item() > 0


def test_model_level_bn_loss_zero_when_running_stats_are_the_batch_stats(tiny):
    """Set every layer's running stats to the statistics of its own input, in one eval pass.

    In eval mode layer k's input depends on the running stats of layers < k, so a pre-hook writes each
    layer's stats just before it normalises: afterwards the same batch matches at every layer.
    """
    model, teachers = tiny
    weights, bn_stats = teachers[0][0], {k: v.clone() for k, v in teachers[0][1].items()}
    x = structured_batch(torch.Generator().manual_seed(5), n=8)

    def set_stats(module, inputs):
        module.running_mean.copy_(inputs[0].mean(dim=(0, 2, 3)))
        module.running_var.copy_(inputs[0].var(dim=(0, 2, 3), unbiased=False))

    handles = [m.register_forward_pre_hook(set_stats) for m in bn_modules(model)]
    with torch.no_grad():
        hn.run_model(model, weights, bn_stats, x)
    for h in handles:
        h.remove()

    def bn_loss(stats):
        one = {k: v[None] for k, v in stats.items()}
        with bn_losses(model) as losses, torch.no_grad():
            _, bn = di.teacher_forward(model, {k: v[None] for k, v in weights.items()}, one, x[None], losses)
        return bn.item()

    assert bn_loss(bn_stats) < 1e-4     # vmap's batched convolution rounds differently: zero up to float error
    perturbed = dict(bn_stats, **{"layer3.0.bn1.running_var": bn_stats["layer3.0.bn1.running_var"] + 0.5})
    assert bn_loss(perturbed) > 0.1


def test_teacher_forward_computes_what_each_client_alone_computes(tiny):
    """The vmapped forward over clients equals one plain forward per client (logits and summed BN loss)."""
    model, teachers = tiny
    weights, stats = stacked(teachers)
    x = structured_batch(torch.Generator().manual_seed(7), n=16).view(2, 8, 3, 16, 16)
    with bn_losses(model) as losses, torch.no_grad():
        logits, bn = di.teacher_forward(model, weights, stats, x, losses)
        for c, (w, b, _) in enumerate(teachers):
            losses.clear()
            alone = hn.run_model(model, w, b, x[c])
            torch.testing.assert_close(logits[c], alone, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(bn[c], torch.stack(losses).sum(), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(logits[0], logits[1])


def test_synthesis_lowers_bn_loss_and_removes_every_hook(tiny):
    model, teachers = tiny
    calls = []
    images, labels, bn_start, bn_end = di.synthesize(model, teachers, progress=calls.append, **FAST)
    assert images.shape == (2, 16, 3, 16, 16) and labels.shape == (2, 16) and labels.dtype == torch.int64
    assert calls == list(range(FAST["iterations"]))
    assert bn_start.shape == bn_end.shape == (2,)
    assert (bn_end < 0.7 * bn_start).all(), (bn_start, bn_end)
    for c, (_, _, counts) in enumerate(teachers):       # every label is one of the teacher's classes
        assert set(labels[c].tolist()) <= set(counts.nonzero().flatten().tolist())
    assert all(len(m._forward_hooks) == 0 and len(m._forward_pre_hooks) == 0 for m in bn_modules(model))


def test_hooks_removed_when_synthesis_raises(tiny):
    model, teachers = tiny

    def stop(it):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        di.synthesize(model, teachers, progress=stop, **FAST)
    assert all(len(m._forward_hooks) == 0 for m in bn_modules(model))


def test_the_teacher_is_bitwise_unchanged_by_synthesis(tiny):
    """Synthesis optimises pixels only: the teacher's weights (even ones that require grad) and its BN
    statistics (it runs in eval mode, so train-mode BN would move them) are exactly as they were."""
    model, teachers = tiny
    weights = {k: v.clone().requires_grad_() for k, v in teachers[0][0].items()}
    bn_stats = {k: v.clone() for k, v in teachers[0][1].items()}
    teacher = (weights, bn_stats, teachers[0][2])
    before = [{k: v.detach().clone() for k, v in d.items()} for d in (weights, bn_stats)]
    model_before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.train()           # the caller's mode must not let synthesis update statistics
    di.synthesize(model, [teacher], **dict(FAST, iterations=3))
    for now, then in zip((weights, bn_stats), before):
        assert all(torch.equal(now[k], then[k]) for k in then)
    assert all(torch.equal(v, model_before[k]) for k, v in model.state_dict().items())


def test_returned_images_are_the_best_iterate(tiny, monkeypatch):
    """With no jitter, flip or TV every forward's loss is a function of the pixels it sees, so the returned
    images must be exactly the iterate whose loss was lowest (the public script returned the last one), and
    bn_end its BN loss. Every forward synthesis makes is recorded; the rate overshoots, so the best is early."""
    model, teachers = tiny
    seen, forward = [], di.teacher_forward

    def recording(model, weights, bn_stats, images, losses):
        logits, bn = forward(model, weights, bn_stats, images, losses)
        seen.append((images.detach().clone(), logits.detach(), bn.detach()))
        return logits, bn

    monkeypatch.setattr(di, "teacher_forward", recording)
    images, labels, bn_start, bn_end = di.synthesize(model, teachers, jitter=0, flip=False, tv_weight=0.0,
                                                     bn_weight=10.0, **dict(FAST, lr=2.0, iterations=4))
    start, *path, final = seen
    assert len(path) == 4 and torch.equal(start[0], path[0][0])
    for c in range(2):
        totals = torch.stack([F.cross_entropy(logits[c], labels[c]) + 10.0 * bn[c] for _, logits, bn in path])
        best = int(totals.argmin())
        assert best < len(path) - 1, totals      # a rate that overshoots: the last iterate is not the best
        assert torch.equal(images[c], path[best][0][c])
        assert bn_end[c].item() == pytest.approx(final[2][c].item()) and torch.equal(final[0][c], images[c])
        assert bn_start[c].item() == pytest.approx(start[2][c].item())


def test_labels_follow_label_counts():
    counts = torch.tensor([0, 5, 0, 10, 0, 1, 0, 0])
    labels = di.draw_labels(counts, 48, torch.Generator().manual_seed(0))
    assert labels.dtype == torch.int64 and labels.shape == (48,)
    assert set(labels.tolist()) <= {1, 3, 5}
    assert torch.bincount(labels, minlength=8)[[1, 3, 5]].tolist() == [15, 30, 3]
    # largest remainders: 7 images of 5 : 10 : 1 are 2.19, 4.38, 0.44 -> 2, 4, 0 plus the one left to class 5
    few = di.draw_labels(counts, 7, torch.Generator().manual_seed(0))
    assert torch.bincount(few, minlength=8)[[1, 3, 5]].tolist() == [2, 4, 1]


def test_same_seed_same_images(tiny):
    model, teachers = tiny
    fast = dict(FAST, iterations=4)
    a = di.synthesize(model, teachers, seed=3, **fast)
    b = di.synthesize(model, teachers, seed=3, **fast)
    c = di.synthesize(model, teachers, seed=4, **fast)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])


def test_a_trained_teacher_reads_its_own_dreams_well_above_chance_at_the_default_weight():
    """Issue 21: at DeepInversion's CIFAR-10 weight (10) the BN term swamps the targets and a 2-class
    teacher read its own dreams at chance; at the default weight it must recognise them. A tiny ResNet
    learns two classes (horizontal or vertical stripes of random phase, in colour), then dreams 16 images
    per class with the cpu-demo preset's iterations; chance is 50 %."""
    g = torch.Generator().manual_seed(0)

    def stripes(n, vertical):
        phase = torch.rand(n, 1, 1, 1, generator=g) * 6.28
        grid = torch.arange(16.0).view(1, 1, 1, 16) if vertical else torch.arange(16.0).view(1, 1, 16, 1)
        colour = torch.rand(n, 3, 1, 1, generator=g) + 0.5
        return colour * torch.sin(grid * 1.2 + phase).expand(n, 3, 16, 16) + 0.2 * torch.randn(n, 3, 16, 16, generator=g)

    torch.manual_seed(0)
    model = hn.ResNet18(num_classes=10, width=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(60):
        x = torch.cat([stripes(16, False), stripes(16, True)]).contiguous()
        y = torch.cat([torch.full((16,), 3), torch.full((16,), 7)])
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        real = torch.cat([stripes(50, False), stripes(50, True)])
        truth = torch.cat([torch.full((50,), 3), torch.full((50,), 7)])
        assert (model(real).argmax(1) == truth).float().mean() > 0.9        # the teacher did learn its classes
    counts = torch.zeros(10, dtype=torch.int64)
    counts[[3, 7]] = 100
    weights, bn_stats = {n: p.detach().clone() for n, p in model.named_parameters()}, hn.bn_stats_init(model)
    images, labels, _, _ = di.synthesize(model, [(weights, bn_stats, counts)], num_images=32, image_size=16,
                                         iterations=PRESETS["cpu-demo"]["replay_iterations"],
                                         bn_weight=train.DEFAULTS["replay_bn_weight"], seed=0)
    with torch.no_grad():
        reads = (hn.run_model(model, weights, bn_stats, images[0]).argmax(1) == labels[0]).float().mean()
    assert reads > 0.8, float(reads)


# --------------------------------------------------------------------------------------------------
# 2. The paper's replay
# --------------------------------------------------------------------------------------------------

REPLAY = dict(num_images=4, iterations=3, bn_weight=10.0, steps=3, lr=3e-2, kd_weight=1.0, anchor_weight=1.0,
              temperature=2.0, keep="end")


def two_stage_server(**replay):
    """Batches (0, 1) and (2, 3) trained on FakeClient updates (no images exist at all), with the paper's
    replay settings. Label counts as the clients upload them: client c holds classes c and c + 1, so of the
    earlier clients only 1 shares a class (2) with the new batch, and of the new clients only 2 shares one
    with client 1."""
    torch.manual_seed(0)
    # No sparsity penalty: random deltas carry no task signal, and against a penalty batch 0 would keep a
    # single unit per layer, through which a client's embedding may not reach its weights at all.
    server, clients = make_server(with_masks=True, sparsity=0.0)
    run_stage(server, clients, 0)
    run_stage(server, clients, 1)
    for c in range(4):
        counts = torch.zeros(10, dtype=torch.long)
        counts[[c, c + 1]] = 5
        server.label_counts[c] = counts
    server.replay_settings = dict(REPLAY, **replay)
    return server


class Untouchable:
    """A client the paper's replay must never reach: any attribute read at all raises."""

    def __init__(self, cid):
        object.__setattr__(self, "cid", cid)

    def __getattribute__(self, name):
        raise AssertionError(f"replay asked client {object.__getattribute__(self, 'cid')} for {name}")


def parameters(server):
    return {n: p.detach().clone() for n, p in server.hypernet.named_parameters()}


def test_the_papers_replay_asks_no_client_and_moves_only_the_tried_clients_embedding_row():
    server = two_stage_server(steps=10)
    before, generated = parameters(server), {c: server.generate(c).clone() for c in range(4)}
    report = server.replay([Untouchable(c) for c in range(4)], 1, seed=0)
    assert report["client_queries"] == 0
    assert report["tried"] == [1] and report["dreamers"] == [2]
    after = parameters(server)
    moved = {n for n in after if not torch.equal(after[n], before[n])}
    assert moved == {"client_embeddings"}
    rows = (after["client_embeddings"] != before["client_embeddings"]).any(1).nonzero().flatten().tolist()
    assert rows == [1]
    # and it does move that client's model, by a fair fraction of its row
    shift = (after["client_embeddings"][1] - before["client_embeddings"][1]).norm() / before["client_embeddings"][1].norm()
    assert shift > 0.02, shift
    assert not torch.equal(server.generate(1), generated[1])
    assert all(torch.equal(server.generate(c), generated[c]) for c in (0, 2, 3))


def test_who_replays_and_whom_the_server_dreams_from():
    server = two_stage_server()
    assert di.who_replays(server, 1) == ([1], [2])
    server.label_counts[3] = server.label_counts[2].clone()      # now both new clients hold class 2
    assert di.who_replays(server, 1) == ([1], [2, 3])
    del server.label_counts[1]                   # an earlier client that never uploaded is not tried
    assert di.who_replays(server, 1) == ([], [])
    server = two_stage_server()
    for c in (2, 3):                             # no upload from the new batch: nothing to dream from
        del server.label_counts[c]
    assert di.who_replays(server, 1) == ([], [])


def test_replay_without_any_statistics_from_the_new_batch_changes_nothing():
    server = two_stage_server()
    for c in (2, 3):
        del server.label_counts[c]
    before = parameters(server)
    report = server.replay([Untouchable(c) for c in range(4)], 1, seed=0)
    assert report["tried"] == [] and len(report["images"]) == 0 and report["client_queries"] == 0
    assert all(torch.equal(p, before[n]) for n, p in parameters(server).items())


def test_the_fine_tuning_set_is_the_new_dreams_of_the_clients_classes_next_to_its_own(monkeypatch):
    server = two_stage_server()
    pools, fine_tune = {}, di.fine_tune

    def recording(server, cid, new, own, **kwargs):
        pools[cid] = new, own
        return fine_tune(server, cid, new, own, **kwargs)

    monkeypatch.setattr(di, "fine_tune", recording)
    report = server.replay([Untouchable(c) for c in range(4)], 1, seed=0)
    (images, labels, logits), own = pools[1]
    assert all(torch.equal(a, b) for a, b in zip(own, server.dreams[1]))   # its own dreams, made once and kept
    assert set(server.dreams[1][1].tolist()) <= {1, 2}
    new = report["labels"] == 2                  # client 2's dreams of class 2, the one class they share
    assert torch.equal(images, report["images"][new]) and torch.equal(labels, report["labels"][new])
    assert len(logits) == len(labels) and 0 < int(new.sum()) < len(report["labels"])


def test_targets_weigh_every_class_the_same():
    """targets(): client 1 holds classes 1 and 2; four dreams of class 1 and one of class 2 weigh the same in
    all (each class 1/2), labels become positions among its classes, the teachers' and its own model's logits
    are cut to its classes."""
    server = two_stage_server()
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    labels, logits = torch.tensor([1, 1, 1, 2, 1]), torch.arange(50.0).view(5, 10)
    images, classes, y, soft, own, weight = di.targets(server, 1, (x, labels, logits))
    assert torch.equal(images, x) and classes.tolist() == [1, 2] and y.tolist() == [0, 0, 0, 1, 0]
    assert torch.equal(soft, logits[:, [1, 2]])
    torch.testing.assert_close(weight, torch.tensor([1 / 8, 1 / 8, 1 / 8, 1 / 2, 1 / 8]))
    bn_stats = server.uploads(1)[0]
    with torch.no_grad():
        expected = hn.run_model(server.model, server.hypernet.unflatten(server.generate(1)), bn_stats, x)[:, [1, 2]]
    torch.testing.assert_close(own, expected)


def test_distillation_loss():
    torch.manual_seed(0)
    teacher = torch.randn(6, 4)
    assert di.distillation_loss(teacher, teacher, 2.0).abs() < 1e-6
    student = torch.randn(6, 4)
    per_image = F.kl_div(F.log_softmax(student / 2, 1), F.softmax(teacher / 2, 1), reduction="none").sum(1) * 4
    torch.testing.assert_close(di.distillation_loss(student, teacher, 2.0), per_image.mean())
    weight = torch.tensor([1.0, 0, 0, 0, 0, 0])
    torch.testing.assert_close(di.distillation_loss(student, teacher, 2.0, weight), per_image[0])


def test_keep_own_keeps_the_point_of_the_path_that_best_explains_the_clients_held_out_own_dreams():
    """keep "own" fits the new dreams and every second own dream, and keeps the point of its path (the start
    included) whose loss on the other own dreams is lowest. The path is rebuilt step by step with keep "end" on
    the same fitted dreams (Adam's first k steps do not depend on how many follow), and the kept row must be
    its best point, bitwise; keep "end" keeps the last point instead."""
    server = two_stage_server()
    weights = dict(kd_weight=1.0, anchor_weight=1.0, temperature=2.0)
    dreamed = di.dream(server, [2, 1], num_images=8, iterations=2, bn_weight=10.0, seed=0)[0]
    server.dreams[1] = dreamed[1]
    new, own = di.fine_tuning_set(server, 1, *dreamed[2])
    assert len(new[0]) > 0 and len(own[0]) == 8
    fitted, held = tuple(o[0::2] for o in own), di.targets(server, 1, tuple(o[1::2] for o in own))
    rows = server.hypernet.client_embeddings
    start = rows.detach().clone()
    path = []
    for k in range(5):
        di.fine_tune(server, 1, new, fitted, steps=k, lr=1.0, keep="end", **weights)
        with torch.no_grad():
            path.append((di.loss_on(server, 1, held, **weights).item(), rows[1].detach().clone()))
            rows.copy_(start)
    losses = [loss for loss, _ in path]
    assert len(set(losses)) == 5                 # the path moves
    best = min(range(5), key=losses.__getitem__)
    assert best != 4, losses                     # so keeping the end would not pass by chance
    di.fine_tune(server, 1, new, own, steps=4, lr=1.0, keep="own", **weights)
    assert torch.equal(rows[1], path[best][1]), (losses, best)
    assert torch.equal(rows[[0, 2, 3]], start[[0, 2, 3]])


# --------------------------------------------------------------------------------------------------
# 3. A tiny real run: the paper's replay asks no client, moves only the tried clients' rows, keeps no image
# --------------------------------------------------------------------------------------------------

class Guarded(fl.Client):
    """A real client that raises on any call, and on any read of its data, while `armed` says it is replay's
    turn: the paper's replay must neither ask it anything nor read what it holds."""
    DATA = {"x_train", "y_train", "x_val", "y_val", "x_test", "y_test"}
    armed = [False]

    def __getattribute__(self, name):
        if Guarded.armed[0] and (name in Guarded.DATA or name in ("local_train", "evaluate")):
            raise AssertionError(f"replay reached client {object.__getattribute__(self, 'cid')}'s {name}")
        return object.__getattribute__(self, name)


def test_a_tiny_pfeddsh_run_replays_without_asking_a_client_and_keeps_no_image(tiny_data_dir):
    config = dict(train.DEFAULTS, data_dir=str(tiny_data_dir), batches=3, clients_per_batch=2, rounds=2,
                  clients_per_round=2, local_steps=1, batch_size=8, width=8, hidden=16, embed_dim=8, chunk_size=1024,
                  classes_per_client=5, replay_images=4, replay_iterations=2, replay_steps=3, replay_lr=0.1, seed=0)
    _, clients, server, batches, _ = train.build(config, torch.device("cpu"))
    assert server.replay_settings is not None                # the default method replays
    for client in clients:
        client.__class__ = Guarded
    real = torch.cat([object.__getattribute__(c, "x_train") for c in clients])
    replay, moves = server.replay, []

    def guarded_replay(clients, t, seed, progress=None):
        before = parameters(server)
        Guarded.armed[0] = True
        try:
            report = replay(clients, t, seed, progress)
        finally:
            Guarded.armed[0] = False
        after = parameters(server)
        moves.append(({n for n in after if not torch.equal(after[n], before[n])},
                      (after["client_embeddings"] != before["client_embeddings"]).any(1).nonzero().flatten().tolist()))
        return report

    server.replay = guarded_replay
    state = train.onboard(server, clients, batches, config, pa_reference=False)
    assert len(state.replays) == 2                           # after stages 1 and 2
    for t, (report, (moved, rows)) in enumerate(zip(state.replays, moves), 1):
        assert report["client_queries"] == 0
        earlier = [c for b in batches[:t] for c in b]
        assert report["tried"] and set(report["tried"]) <= set(earlier)
        assert moved == {"client_embeddings"} and rows and set(rows) <= set(report["tried"])
    # What the server keeps of replay holds no client image: dreams only, and per-client BN statistics.
    real = data.normalize(real, clients[0].mean, clients[0].std).flatten(1)
    kept = torch.cat([r["images"] for r in state.replays] + [d[0] for d in server.dreams.values()]).flatten(1)
    assert torch.cdist(kept, real).min() > 1e-3
    for stats in server.bn_stats.values():
        assert all(t.dim() <= 1 for t in stats.values())

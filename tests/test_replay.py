"""Backward transfer (deepinversion.backward_transfer): who may change, what a rejection leaves, privacy."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import deepinversion  # noqa: E402
import hypernet as hn  # noqa: E402
from test_masks import make_server, run_stage, FakeClient  # noqa: E402


def two_stage_server():
    """Batches (0, 1) and (2, 3); the server only ever sees FakeClient updates: no images exist at all."""
    torch.manual_seed(0)
    server, clients = make_server(with_masks=True, optimizer="adam")
    run_stage(server, clients, 0)
    run_stage(server, clients, 1)
    for c in range(4):        # label counts as clients upload them: 0 and 2 share class 1
        counts = torch.zeros(10, dtype=torch.long)
        counts[[c, c + 1]] = 5
        server.label_counts[c] = counts
    return server


def snapshot(server):
    return {c: server.generate(c).clone() for c in range(4)}


def test_replay_touches_only_the_client_being_improved():
    server = two_stage_server()
    before = snapshot(server)
    calls = []

    def validate(cid, flat):          # a client that is pleased with any change to itself
        calls.append(cid)
        return (1.0, 0.0) if not torch.equal(flat, before[cid]) else (0.5, 1.0)

    report = deepinversion.backward_transfer(server, 1, validate, num_images=4, iterations=3, steps=3)
    after = snapshot(server)
    assert report["accepted"] >= 1
    changed = [c for c in range(4) if not torch.equal(before[c], after[c])]
    assert changed and set(changed) <= {0, 1}            # only earlier clients, each through its own rows
    assert torch.equal(before[2], after[2]) and torch.equal(before[3], after[3])
    assert set(calls) <= {0, 1}


def test_rejected_update_leaves_client_bitwise_unchanged():
    server = two_stage_server()
    before = snapshot(server)
    params_before = {n: p.detach().clone() for n, p in server.hypernet.named_parameters()}
    report = deepinversion.backward_transfer(server, 1, lambda cid, flat: (0.0, 1.0), num_images=4,
                                             iterations=3, steps=3)   # never better: always rejected
    assert report["accepted"] == 0 and report["rejected"] + report["skipped"] == 2
    after = snapshot(server)
    assert all(torch.equal(before[c], after[c]) for c in range(4))
    assert all(torch.equal(p, params_before[n]) for n, p in server.hypernet.named_parameters())


def test_server_replay_never_receives_client_samples():
    """The replay API takes the server (hypernetwork, BN statistics, label counts) and a validate
    callback that returns two numbers. Nothing else crosses: no client object, no tensor of images."""
    server = two_stage_server()
    received = []

    def validate(cid, flat):
        received.append(flat)            # what the server sends: its own generated weights
        return 0.0, 1.0                  # what comes back: two floats

    deepinversion.backward_transfer(server, 1, validate, num_images=4, iterations=2, steps=1)
    assert all(f.shape == (server.hypernet.num_weights,) for f in received)
    # The server's state holds BN statistics and label counts per client, never image-shaped tensors.
    for stats in server.bn_stats.values():
        assert all(t.dim() <= 1 for t in stats.values())
    assert all(c.dim() == 1 for c in server.label_counts.values())
    assert not any(isinstance(v, FakeClient) for v in vars(server).values())

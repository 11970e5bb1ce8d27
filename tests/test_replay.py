"""Backward transfer (replay.backward_transfer): who may change, what a rejection leaves, privacy."""
import argparse
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import federated  # noqa: E402
from shell import cli  # noqa: E402
import replay  # noqa: E402
import train  # noqa: E402
from test_masks import make_server, run_stage  # noqa: E402


def two_stage_server():
    """Batches (0, 1) and (2, 3); the server only ever sees FakeClient updates: no images exist at all."""
    torch.manual_seed(0)
    # No sparsity penalty: random deltas carry no task signal, and against a penalty batch 0 would keep a
    # single unit per layer, through which a client's embedding may not reach its weights at all.
    server, clients = make_server(with_masks=True, optimizer="adam", sparsity=0.0)
    run_stage(server, clients, 0)
    run_stage(server, clients, 1)
    for c in range(4):        # label counts as clients upload them: 0 and 2 share class 1
        counts = torch.zeros(10, dtype=torch.long)
        counts[[c, c + 1]] = 5
        server.label_counts[c] = counts
    return server


REPLAY = dict(num_images=4, iterations=3, bn_weight=10.0, steps=3, lr=3e-2, kd_weight=1.0, anchor_weight=1.0,
              temperature=2.0, validate_every=1, confirm_alpha=0.05, seed=0, mode="ours", control="none")


def confirm_yes(cid, before, after):      # a client whose confirmation half agrees with any change
    return (40, 2, 0.05, 0.01) if not torch.equal(before, after) else (0, 0, 0.0, 0.0)


def confirm_no(cid, before, after):       # ... and one whose confirmation half sees nothing but noise
    return (6, 5, 0.001, 0.01)


def snapshot(server):
    return {c: server.generate(c).clone() for c in range(4)}


def test_replay_touches_only_the_client_being_improved():
    server = two_stage_server()
    before = snapshot(server)
    calls = []

    def validate(cid, flat):          # a client that is pleased with any change to itself
        calls.append(cid)
        return (1.0, 0.0) if not torch.equal(flat, before[cid]) else (0.5, 1.0)

    report = replay.backward_transfer(server, 1, validate, confirm_yes, **REPLAY)
    after = snapshot(server)
    assert report["accepted"] >= 1
    changed = [c for c in range(4) if not torch.equal(before[c], after[c])]
    assert changed and set(changed) <= {0, 1}            # only earlier clients, each through its own rows
    assert torch.equal(before[2], after[2]) and torch.equal(before[3], after[3])
    assert set(calls) <= {0, 1}


def test_a_client_no_step_improves_is_left_bitwise_and_never_asked_to_confirm():
    server = two_stage_server()
    before = snapshot(server)
    params_before = {n: p.detach().clone() for n, p in server.hypernet.named_parameters()}
    asked = []
    report = replay.backward_transfer(server, 1, lambda cid, flat: (0.0, 1.0),      # never better than its start
                                      lambda *args: asked.append(args) or confirm_yes(*args), **REPLAY)
    assert report["tried"] == [1] and report["accepted"] == 0 and report["rejected"] == 1 and not asked
    after = snapshot(server)
    assert all(torch.equal(before[c], after[c]) for c in range(4))
    assert all(torch.equal(p, params_before[n]) for n, p in server.hypernet.named_parameters())


@pytest.mark.parametrize("verdict", ["keep", "refuse"])
def test_accept_decides_which_confirmed_proposals_are_written(monkeypatch, verdict):
    """A client's pick reaches replay.accept with what its confirmation half said, and only the clients
    accept returns are written: kept, the client moves; refused, every parameter is bitwise as it was."""
    server = two_stage_server()
    before = snapshot(server)
    params_before = {n: p.detach().clone() for n, p in server.hypernet.named_parameters()}
    heard = []

    def accept(confirmations, alpha):
        heard.append((dict(confirmations), alpha))
        return list(confirmations) if verdict == "keep" else []

    monkeypatch.setattr(replay, "accept", accept)
    pleased = lambda cid, flat: (1.0, 0.0) if not torch.equal(flat, before[cid]) else (0.5, 1.0)  # noqa: E731
    report = replay.backward_transfer(server, 1, pleased, confirm_yes, **REPLAY)
    assert heard == [({1: (40, 2, 0.05, 0.01)}, REPLAY["confirm_alpha"])]
    moved = [c for c in range(4) if not torch.equal(before[c], server.generate(c))]
    if verdict == "keep":
        assert report["kept"] == [1] and moved == [1]
    else:
        assert report["kept"] == [] and report["rejected"] == 1 and moved == []
        assert all(torch.equal(p, params_before[n]) for n, p in server.hypernet.named_parameters())


class ClientSideOnly(federated.Client):
    """A client whose data raises when read from anywhere but inside its own methods (the client's side)."""
    DATA = {"x_train", "y_train", "x_val", "y_val", "x_test", "y_test"}

    def __getattribute__(self, name):
        if name in ClientSideOnly.DATA and not object.__getattribute__(self, "inside"):
            raise AssertionError(f"client {object.__getattribute__(self, 'cid')}'s {name} read on the server's side")
        return object.__getattribute__(self, name)

    def on_its_side(method):
        def run(self, *args, **kwargs):
            self.inside += 1
            try:
                return method(self, *args, **kwargs)
            finally:
                self.inside -= 1
        return run

    local_train = on_its_side(federated.Client.local_train)
    evaluate = on_its_side(federated.Client.evaluate)
    accuracy = on_its_side(federated.Client.accuracy)
    confirm = on_its_side(federated.Client.confirm)


def trained_two_batches(tiny_data_dir):
    """A tiny real run after its two stages (replay not yet run): config, clients, server, batches."""
    config = dict(train.DEFAULTS, data_dir=str(tiny_data_dir), batches=2, clients_per_batch=2, rounds=2,
                  clients_per_round=2, local_steps=1, batch_size=8, width=4, hidden=16, embed_dim=8,
                  classes_per_client=10, replay_images=4, replay_iterations=2, replay_steps=2, seed=0,
                  device="cpu")
    _, clients, server, batches, _ = train.build(config, torch.device("cpu"))
    train.onboard(server, clients, batches, dict(config, no_replay=True), pa_reference=False)
    return config, clients, server, batches


def test_replay_reads_no_client_data_on_the_servers_side(tiny_data_dir):
    """Through run_replay, as a run calls it, with real clients whose images and labels raise unless the
    client itself reads them: replay dreams, asks, confirms and writes without the server touching any."""
    config, clients, server, batches = trained_two_batches(tiny_data_dir)
    real = torch.cat([c.x_train for c in clients])
    for client in clients:
        client.__class__, client.inside = ClientSideOnly, 0
    with pytest.raises(AssertionError, match="read on the server's side"):
        clients[0].x_train                                  # noqa: B018 (the guard is armed)
    report = replay.run_replay(server, clients, 1, 0, train.replay_settings(config))
    assert report["tried"] and report["client_queries"] > 0 and len(report["images"]) > 0
    # What the server keeps of replay holds no client image: dreams only, and per-client BN statistics.
    real = data.normalize(real, clients[0].mean, clients[0].std).flatten(1)
    kept = torch.cat([report["images"]] + [d[0] for d in server.dreams.values()]).flatten(1)
    assert torch.cdist(kept, real).min() > 1e-3
    for stats in server.bn_stats.values():
        assert all(t.dim() <= 1 for t in stats.values())


def test_a_pick_the_confirmation_half_does_not_confirm_is_undone_bitwise():
    server = two_stage_server()
    before = snapshot(server)
    params_before = {n: p.detach().clone() for n, p in server.hypernet.named_parameters()}
    pleased = lambda cid, flat: (1.0, 0.0) if not torch.equal(flat, before[cid]) else (0.5, 1.0)  # noqa: E731
    report = replay.backward_transfer(server, 1, pleased, confirm_no, **REPLAY)
    assert report["accepted"] == 0 and report["rejected"] >= 1 and report["confirm"][0] == [6, 5, 0.001, 0.01]
    assert all(torch.equal(p, params_before[n]) for n, p in server.hypernet.named_parameters())


def test_replay_moves_the_earlier_clients_model():
    """Replay must be able to move a model, not only in principle: the tried client's embedding row moves
    by a fair fraction of its size, and so does every weight generated from it."""
    server = two_stage_server()
    before = {c: server.generate(c).clone() for c in (0, 1)}
    embedding = server.hypernet.client_embeddings.detach().clone()
    calls = {"n": 0}

    def improving(cid, flat):               # each score a little better than the last: the last is best
        calls["n"] += 1
        return (calls["n"] / 100.0, 0.0)

    report = replay.backward_transfer(server, 1, improving, confirm_yes, **dict(REPLAY, steps=30))
    assert report["kept"] == report["tried"] == [1]      # client 0 holds no class of the new batch
    assert torch.equal(server.generate(0), before[0])
    moved = (server.hypernet.client_embeddings[1] - embedding[1]).norm() / embedding[1].norm()
    assert moved > 0.1, moved
    change = (server.generate(1) - before[1]).norm() / before[1].norm()
    assert change > 1e-3, change


def pools_and_dreamers(monkeypatch):
    """Record what reaches the fine-tuning (each tried client's pool) and whom synthesis dreams from."""
    pools, dreamed = {}, []
    improve, dream = replay.improve_client, replay.dream

    def recording_improve(server, cid, batch, dreams, *args, **kwargs):
        pools[cid] = [d.clone() for d in dreams]
        return improve(server, cid, batch, dreams, *args, **kwargs)

    def recording_dream(server, dreamers, *args, **kwargs):
        dreamed.extend(dreamers)
        return dream(server, dreamers, *args, **kwargs)

    monkeypatch.setattr(replay, "improve_client", recording_improve)
    monkeypatch.setattr(replay, "dream", recording_dream)
    return pools, dreamed


def test_the_noise_control_feeds_the_fine_tuning_no_dream(monkeypatch):
    """--replay-control noise: no new client is dreamed from; the tried client's pool is its own dreams
    next to noise_dreams' Gaussian images with zero teacher logits, and nothing else."""
    server = two_stage_server()
    pools, dreamed = pools_and_dreamers(monkeypatch)
    report = replay.backward_transfer(server, 1, lambda cid, flat: (0.0, 1.0), confirm_no,
                                      **dict(REPLAY, control="noise"))
    assert report["tried"] == [1] and dreamed == [1]          # only the tried client's own dreams
    noise = replay.noise_dreams(replay.held_uploads(server), [2], num_images=4, image_size=server.image_size,
                                seed=0)[2]
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
    replay.backward_transfer(server, 1, lambda cid, flat: (0.0, 1.0), confirm_no, **dict(REPLAY, control="own"))
    assert dreamed == [1]
    assert torch.equal(pools[1][0], server.dreams[1][0])       # all its own dreams (it holds both classes)


def test_with_dreams_the_pool_holds_the_new_clients_dreams_of_the_clients_classes(monkeypatch):
    """The reference for the two controls: dreams from new client 2 (it shares class 2 with client 1; new
    client 3 shares nothing with any tried client, so it is not dreamed from)."""
    server = two_stage_server()
    pools, dreamed = pools_and_dreamers(monkeypatch)
    replay.backward_transfer(server, 1, lambda cid, flat: (0.0, 1.0), confirm_no, **REPLAY)
    assert dreamed == [2, 1]
    assert len(pools[1][0]) > len(server.dreams[1][0])


def test_the_papers_replay_asks_no_client_and_keeps_the_end_of_the_path():
    server = two_stage_server()
    before = snapshot(server)

    def refuse(*args):
        raise AssertionError("the paper's replay asked a client")

    report = replay.backward_transfer(server, 1, refuse, refuse, **dict(REPLAY, mode="paper"))
    assert report["client_queries"] == 0 and report["kept"] == report["tried"] == [1]
    after = snapshot(server)
    assert not torch.equal(before[1], after[1])
    assert all(torch.equal(before[c], after[c]) for c in (0, 2, 3))


def test_ours_counts_its_questions_to_the_clients():
    report = replay.backward_transfer(two_stage_server(), 1, lambda cid, flat: (0.0, 1.0), confirm_no,
                                      **dict(REPLAY, steps=3))
    assert report["client_queries"] == 1 + 3            # the start, then every step (validate_every 1)


def test_an_earlier_client_that_does_not_answer_stays_bitwise_as_it_was(tiny_data_dir):
    """Through run_replay, as a run calls it: client 1 (the one replay would try) is unreachable."""
    config, clients, server, batches = trained_two_batches(tiny_data_dir)
    earlier = batches[0]
    before = {c: server.generate(c).clone() for c in earlier}
    params = {n: p.detach().clone() for n, p in server.hypernet.named_parameters()}

    def unreachable(*args, **kwargs):
        raise TimeoutError("no answer")

    for c in earlier:
        clients[c].evaluate = clients[c].confirm = unreachable
    report = replay.run_replay(server, clients, 1, 0, train.replay_settings(config))
    assert report["tried"] and report["unanswered"] == report["tried"] and report["accepted"] == 0
    assert all(torch.equal(server.generate(c), before[c]) for c in earlier)
    assert all(torch.equal(p, params[n]) for n, p in server.hypernet.named_parameters())


def test_acceptance_rule_lets_noise_through_rarely_and_real_gains_often():
    """Each proposal is tested on its own client's confirmation half. Proposals no better than their starts
    (the two models' per-image margins equally noisy around the same values) are kept in under 10 % of
    trials (about 5 % at alpha = 0.05); proposals that raise every margin a little, on 250 images, are kept
    most of the time, where a test counting the images they flip keeps few. A client whose own images
    lost is never kept. A replay's proposals are tested together (Holm), so a replay of four keeps an update
    that changes nothing about as rarely as a replay of one."""
    g = torch.Generator().manual_seed(0)

    def confirmations(gain, trials=2000, n=250, noise=0.3):
        """What Client.confirm sends back, for `trials` proposals of a two-class client near 85 %."""
        margin = 2 + 2 * torch.randn(trials, n, generator=g)          # logit of the right class minus the other
        before = margin + noise * torch.randn(trials, n, generator=g)
        after = margin + gain + noise * torch.randn(trials, n, generator=g)
        drop = (F.softplus(-before) - F.softplus(-after)).double()    # per-image cross-entropy drop
        gained, lost = ((after > 0) & (before <= 0)).sum(1), ((before > 0) & (after <= 0)).sum(1)
        return [(int(a), int(b), d.mean().item(), d.std().item() / n ** 0.5) for a, b, d in zip(gained, lost, drop)]

    def kept(said):
        return sum(replay.accept({0: one}, 0.05) == [0] for one in said) / len(said)

    def kept_by_counting(said):
        return sum(a > b and a - b >= 1.645 * (a + b) ** 0.5 for a, b, _, _ in said) / len(said)

    noise = confirmations(gain=0.0)
    assert 0.01 < kept(noise) < 0.10, kept(noise)        # rare, and the test is not inert
    gains = confirmations(gain=0.1)
    assert kept(gains) > 0.6 and kept(gains) > kept_by_counting(gains) + 0.3, (kept(gains), kept_by_counting(gains))
    assert replay.accept({0: (3, 4, 0.05, 0.01), 1: (5, 5, 0.05, 0.01), 2: (9, 2, 0.01, 0.01)}, 0.05) == [1]

    # A replay that tries four clients: tested one by one at 5 %, an update that changes nothing would be
    # kept in about one replay of five; Holm's step-down keeps the whole replay under 5 %, and a real gain
    # still passes most of the time.
    def any_kept(said, m=4):
        replays = [dict(enumerate(said[i:i + m])) for i in range(0, len(said) - m + 1, m)]
        return sum(bool(replay.accept(one, 0.05)) for one in replays) / len(replays)

    alone = sum(any(replay.accept({0: one}, 0.05) for one in noise[i:i + 4]) for i in range(0, 2000, 4)) / 500
    assert any_kept(noise) < 0.10 and alone > any_kept(noise) + 0.05, (any_kept(noise), alone)
    assert any_kept(gains) > 0.6, any_kept(gains)
    # the step-down: the larger z must pass at 0.05 / 2 (z 1.96), then the smaller at 0.05 (z 1.645)
    assert replay.accept({0: (9, 2, 0.021, 0.01), 1: (9, 2, 0.017, 0.01)}, 0.05) == [0, 1]
    assert replay.accept({0: (9, 2, 0.019, 0.01), 1: (9, 2, 0.019, 0.01)}, 0.05) == []
    assert replay.accept({0: (9, 2, 0.019, 0.01)}, 0.05) == [0]


def test_replay_without_any_statistics_from_the_new_batch_skips_everyone():
    """Every update of the new clients was dropped (say, they diverged): nothing to dream from, no traceback."""
    server = two_stage_server()
    for c in (2, 3):
        del server.label_counts[c]
    before = snapshot(server)
    report = replay.backward_transfer(server, 1, lambda cid, flat: (1.0, 0.0), confirm_yes, **REPLAY)
    assert report["skipped"] == 2 and report["accepted"] == 0 and len(report["images"]) == 0
    assert all(torch.equal(before[c], server.generate(c)) for c in range(4))


def test_replay_benchmarks_run_on_a_finished_run_and_read_no_test_data(tiny_data_dir, tmp_path, capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import replay_diagnosis
    import replay_thirds
    from test_privacy import TINY
    cli.main(TINY + ["--no-replay", "--data-dir", str(tiny_data_dir), "--out", str(tmp_path)])
    settings = [(10.0, None, None, None, None), (0.1, 3e-2, 6, 0.0, 1)]
    # ThirdsClient raises on any read of test data, so finishing is the check that none happened.
    results, reads = replay_thirds.replay_stages(str(tmp_path), settings)
    assert set(results) == set(settings) and all(len(rs) == 1 for rs in reads.values())   # the stage that replays
    for stages in results.values():
        (tried, proposals), = stages                     # 2 batches: one stage replays
        assert 0 < tried <= 2 and len(proposals) <= tried
        assert all(g >= 0 and lost >= 0 and error >= 0 and -1 <= worth <= 1
                   for g, lost, _, error, worth in proposals.values())
    _, tried = replay_diagnosis.diagnose(str(tmp_path), bn_weight=0.1)
    assert len(tried) >= results[settings[0]][0][0]      # it looks at every client replay tries
    # A replay run's final state is not what each stage found: refused, as is a folder without a run.
    replayed = tmp_path / "replayed"
    replayed.mkdir()
    results_json = json.loads((tmp_path / "results.json").read_text())
    results_json["config"]["no_replay"] = False
    (replayed / "results.json").write_text(json.dumps(results_json))
    shutil.copy(tmp_path / "checkpoint.pt", replayed / "checkpoint.pt")
    replay_diagnosis.check_runs(argparse.ArgumentParser(), [str(tmp_path)])
    for folder, message in [(replayed, "this one is pfeddsh with replay"), (tmp_path / "none", "not a finished run")]:
        with pytest.raises(SystemExit) as refused:
            replay_diagnosis.check_runs(argparse.ArgumentParser(), [str(folder)])
        assert refused.value.code == 2 and message in capsys.readouterr().err


def test_synthesis_under_amp_survives_the_dtypes_a_gpu_produces(monkeypatch):
    """Under CUDA autocast a convolution hands batch norm bf16 activations, and vmapped batch norm refuses
    them against a client's fp32 running statistics ("expected scalar type BFloat16 but found Float"); a
    CPU's autocast leaves convolutions in fp32, so it never shows. Imitate the GPU: inside any autocast
    context, convolutions compute in bf16. Replay of a server running --amp must still work: synthesis
    opens no autocast at all."""
    real_conv, inside = F.conv2d, []

    class GpuLikeAutocast:
        def __init__(self, *args, **kwargs):
            pass

        def __enter__(self):
            inside.append(True)

        def __exit__(self, *exc):
            inside.pop()

    def conv2d(x, w, *args, **kwargs):
        return real_conv(x.bfloat16(), w.bfloat16(), *args, **kwargs) if inside else real_conv(x, w, *args, **kwargs)

    monkeypatch.setattr(torch, "autocast", GpuLikeAutocast)
    monkeypatch.setattr(F, "conv2d", conv2d)
    with pytest.raises(RuntimeError, match="BFloat16"):      # the imitation does show the GPU's failure
        with torch.autocast("cuda"):
            bn = torch.nn.BatchNorm2d(3).eval()
            w = {k: torch.stack([v, v]) for k, v in bn.named_parameters()}
            b = {k: torch.stack([v, v]) for k, v in bn.named_buffers()}
            x = conv2d(torch.randn(4, 3, 5, 5), torch.randn(3, 3, 1, 1)).view(2, 2, 3, 5, 5)
            torch.func.vmap(lambda w_, b_, x_: torch.func.functional_call(bn, (w_, b_), (x_,)))(w, b, x)
    server = two_stage_server()
    server.amp = True
    report = replay.backward_transfer(server, 1, lambda cid, flat: (0.5, 1.0), confirm_no, **REPLAY)
    assert report["images"].dtype == torch.float32 and torch.isfinite(report["images"]).all()


def test_replay_decides_in_fp32_under_amp(tiny_data_dir, monkeypatch):
    """--amp: the reported evaluation may run in bf16; what decides replay (val_select, val_confirm) never does."""
    config, _ = cli.resolve_config(["--dataset", "cifar10", "--data-dir", str(tiny_data_dir), "--batches", "2",
                                    "--clients-per-batch", "2", "--width", "4", "--amp", "--device", "cpu"])
    _, clients, server, _, _ = train.build(config, torch.device("cpu"))
    opened = []
    real = torch.autocast
    monkeypatch.setattr(torch, "autocast", lambda *a, **k: opened.append(True) or real(*a, **k))
    flat = server.generate(0)
    clients[0].evaluate(flat, server.bn_stats[0], "val_select")
    clients[0].confirm(flat, flat, server.bn_stats[0])
    assert not opened
    clients[0].evaluate(flat, server.bn_stats[0], "test")
    assert opened


def test_an_earlier_client_that_never_trained_is_skipped_not_a_crash():
    server = two_stage_server()
    del server.label_counts[1]              # never drawn for a round of its stage: it uploaded nothing
    report = replay.backward_transfer(server, 1, lambda cid, flat: (0.5, 1.0), confirm_no, **REPLAY)
    assert report["skipped"] >= 1 and report["accepted"] + report["rejected"] + report["skipped"] == 2


def test_shared_replay_benchmark_starts_each_client_where_it_was_and_puts_everything_back(tiny_data_dir, tmp_path):
    """benchmarks/replay_shared.py (the paper's variant: shared hypernetwork entries fine-tuned for every
    tried client at once): the free units it opens to the tried clients change nobody's model at the start
    (an assert inside), a point it chooses moves the tried clients, and afterwards every parameter is bitwise
    what the finished run left. ThirdsClient raises on test data, so finishing also says none was read."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import replay_shared
    import replay_thirds
    from shell import runner
    from test_privacy import TINY
    cli.main(TINY + ["--no-replay", "--data-dir", str(tiny_data_dir), "--out", str(tmp_path)])
    config, _, clients, server, _, _ = runner.restore_finished(str(tmp_path))
    for client in clients:
        client.__class__ = replay_thirds.ThirdsClient
    before = {n: p.detach().clone() for n, p in server.hypernet.named_parameters()}
    stage_dreams = replay_shared.dream_stage(config, server, 1)
    for then_own in (False, True):      # one point for everyone; then each client's own rows from it too
        tried, out, reads = replay_shared.shared_replay(config, clients, server, 1, 1e-2, True, stage_dreams,
                                                        then_own)
        assert 0 < tried <= 2 and (len(out) <= tried if then_own else len(out) in (0, tried))
        assert all(g >= 0 and lost >= 0 and error >= 0 and -1 <= worth <= 1
                   for g, lost, _, error, worth in out.values())
        assert not out or any(drop != 0 for _, _, drop, _, _ in out.values())
        assert all(torch.equal(p, before[n]) for n, p in server.hypernet.named_parameters())
    assert server.hypernet.gates.client_gate.__func__ is type(server.hypernet.gates).client_gate

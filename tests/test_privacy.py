"""The privacy audit and the noise knob (privacy.py, docs/privacy.md): the measure can fail both ways,
--bn-noise 0 is today's run bit for bit, and neither the audit nor the noise touches training."""
import numpy as np
import pytest
import torch

import data
from conftest import make_tiny_dataset
from shell import cli, privacy
from test_checkpoint import comparable, final_hypernet

# tests/test_train.py's TINY with 5 classes per client, so that new clients dream classes earlier clients
# hold and replay fine-tunes them (with 2 of 10 classes it mostly skips them).
DREAMS = 8
TINY = ["--dataset", "cifar10", "--batches", "2", "--clients-per-batch", "2", "--rounds", "3",
        "--clients-per-round", "2", "--local-steps", "2", "--batch-size", "16", "--width", "8",
        "--hidden", "16", "--chunk-size", "1024", "--embed-dim", "4", "--device", "cpu", "--classes-per-client", "5",
        "--replay-images", str(DREAMS), "--replay-iterations", "4", "--replay-steps", "4", "--replay-lr", "0.1"]


def run(tiny_data_dir, out, *extra):
    return cli.main(TINY + ["--data-dir", str(tiny_data_dir), "--out", str(out), *extra])


def without_audit(results):
    r = comparable(results)
    r["config"].pop("privacy_audit")
    for report in r["replay"]:
        report.pop("audit", None)
    return r


@pytest.fixture(scope="module")
def reference(tiny_data_dir, tmp_path_factory):
    """A run as every run was before the knob: no noise, no audit. Its folder and results."""
    out = tmp_path_factory.mktemp("reference")
    return out, run(tiny_data_dir, out)


# --------------------------------------------------------------------------------------------------
# The measure: AUC near 0.5 when nothing leaks, clearly above when the dreams are copies
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pools(tmp_path_factory):
    """Training images, a held-out pool of the same size and classes, and a third pool of images drawn
    independently of both (the tiny dataset's other test half), all normalised."""
    root = make_tiny_dataset(tmp_path_factory.mktemp("pools"), train_per_class=60, test_per_class=60)
    ds = data.load_dataset("cifar10", str(root))
    half = len(ds.y_test) // 2
    held_y = ds.y_test[:half]
    tr, he = privacy.matched_pools(ds.y_train, held_y, range(10), 20, torch.Generator().manual_seed(0))
    norm = lambda x: data.normalize(x, ds.mean, ds.std)            # noqa: E731
    return dict(x_train=norm(ds.x_train[tr]), y_train=ds.y_train[tr], x_held=norm(ds.x_test[:half][he]),
                y_held=held_y[he], independent=norm(ds.x_test[half:]),
                features=privacy.feature_model(10, 4, "cpu"))


def audit(pools, dreams):
    result = privacy.audit_client(dreams, pools["x_train"], pools["y_train"], pools["x_held"], pools["y_held"],
                                  pools["features"])
    return privacy.summarize([result])


def test_pools_are_size_matched_per_class(pools):
    assert len(pools["y_train"]) == len(pools["y_held"]) == 200
    assert torch.equal(torch.bincount(pools["y_train"], minlength=10), torch.bincount(pools["y_held"], minlength=10))


def test_audit_auc_is_near_half_when_dreams_are_drawn_independently_of_the_training_set(pools):
    figures = audit(pools, pools["independent"][:100])
    for space in ("pixel", "feature"):
        m = figures["membership"][space]
        assert abs(m["auc"] - 0.5) < 0.1 and m["ci"][0] < 0.5 < m["ci"][1], (space, m)
        r = figures["reconstruction"][space]
        assert 0.3 < r["nearest_is_train"] < 0.7 and r["closer_than_chance"] < 0.2, (space, r)


def test_audit_auc_is_clearly_above_half_when_dreams_copy_training_images(pools):
    copies = pools["x_train"][::2].clone()                  # 100 of the 200 training images ...
    copies[::2] = copies[::2].flip(-1)                      # ... half of them mirrored, as replay's flips would
    figures = audit(pools, copies)
    for space in ("pixel", "feature"):
        m = figures["membership"][space]
        assert m["auc"] > 0.7 and m["ci"][0] > 0.6, (space, m)
        assert figures["reconstruction"][space]["nearest_is_train"] > 0.95
    pixel = figures["reconstruction"]["pixel"]
    assert pixel["train_nn"]["q95"] == 0.0 and pixel["closer_than_chance"] == 1.0


def test_auc_orders_scores_counts_ties_half_and_gives_an_interval():
    assert privacy.auc_delong([2, 3, 4], [0, 1])[0] == 1.0
    assert privacy.auc_delong([0, 1], [2, 3, 4])[0] == 0.0
    assert privacy.auc_delong([1, 1], [1, 1])[0] == 0.5
    rng = np.random.default_rng(0)
    same = privacy.stratified_auc([(rng.normal(size=300), rng.normal(size=300)) for _ in range(3)])
    assert same["ci"][0] < 0.5 < same["ci"][1] and len(same["per_client"]) == 3
    apart = privacy.stratified_auc([(rng.normal(1, 1, 300), rng.normal(size=300))])
    assert apart["ci"][0] > 0.7            # the normal model: AUC = Phi(1 / sqrt 2) = 0.76


# --------------------------------------------------------------------------------------------------
# The knob: --bn-noise
# --------------------------------------------------------------------------------------------------

def statistics():
    return ({"bn1.running_mean": torch.zeros(4), "bn1.running_var": torch.ones(4),
             "bn1.num_batches_tracked": torch.tensor(7)}, torch.tensor([0, 300, 100, 0]))


def test_bn_noise_zero_draws_nothing_and_uploads_the_statistics_themselves():
    bn, counts = statistics()
    generator = torch.Generator().manual_seed(1)
    state, global_state = generator.get_state(), torch.get_rng_state()
    noisy_bn, noisy_counts = privacy.release(bn, counts, 0.0, generator)
    assert noisy_bn is bn and noisy_counts is counts
    assert torch.equal(generator.get_state(), state) and torch.equal(torch.get_rng_state(), global_state)


def test_bn_noise_moves_statistics_and_shares_keeps_variances_positive_and_repeats_per_client():
    bn, counts = statistics()

    class Holder:                                               # what privacy.uploads reads of a server
        bn_stats, label_counts = {0: bn, 1: bn}, {0: counts, 1: counts}

    upload = privacy.uploads(Holder, seed=0, sigma=2.0)
    noisy_bn, noisy_counts = upload(0)
    assert not torch.equal(noisy_bn["bn1.running_mean"], bn["bn1.running_mean"])
    assert (noisy_bn["bn1.running_var"] >= privacy.VAR_FLOOR).all()
    assert noisy_bn["bn1.num_batches_tracked"] == 7
    assert noisy_counts.dtype == torch.long and (noisy_counts >= 0).all() and noisy_counts.sum() > 0
    again_bn, again_counts = upload(0)                          # one upload per client: asking twice, the same
    assert torch.equal(again_bn["bn1.running_mean"], noisy_bn["bn1.running_mean"])
    assert torch.equal(again_counts, noisy_counts)
    assert not torch.equal(upload(1)[0]["bn1.running_mean"], noisy_bn["bn1.running_mean"])
    assert torch.equal(bn["bn1.running_var"], torch.ones(4))     # the client's own copy is untouched
    # sigma on the shares: the noise on a count is sigma x n (n = 400 here), not sigma
    shares = torch.stack([privacy.release(bn, counts, 0.1, torch.Generator().manual_seed(s))[1]
                          for s in range(200)]).double()
    assert 20 < shares[:, 1].std() < 60


def test_bn_noise_zero_is_bitwise_the_run_from_before_the_knob(tiny_data_dir, tmp_path, reference, monkeypatch):
    # sigma 0 never goes through the noisy upload: replay reads the server's copies (uploads=None).
    monkeypatch.setattr(privacy, "uploads", lambda server, seed, sigma: pytest.fail("sigma 0 made a noisy upload"))
    before = run(tiny_data_dir, tmp_path)
    assert before["replay"][0]["tried"]                     # replay did fine-tune an earlier client
    assert comparable(before) == comparable(reference[1])
    ours, theirs = final_hypernet(tmp_path), final_hypernet(reference[0])
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_bn_noise_changes_replay_and_nothing_before_it(tiny_data_dir, tmp_path, reference):
    noisy = run(tiny_data_dir, tmp_path, "--bn-noise", "1")
    assert noisy["accuracy"][0] == reference[1]["accuracy"][0] and noisy["neurons"] == reference[1]["neurons"]
    assert noisy["replay"][0]["bn_loss_start"] != reference[1]["replay"][0]["bn_loss_start"]   # dreamt from noise
    # what each client keeps for its own training and evaluation never sees the noise
    ours = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["server"]["bn_stats"]
    theirs = torch.load(reference[0] / "checkpoint.pt", weights_only=True)["server"]["bn_stats"]
    assert all(torch.equal(ours[c][k], theirs[c][k]) for c in theirs for k in theirs[c])


# --------------------------------------------------------------------------------------------------
# The audit in a run: figures in results.json, a grid, and training untouched
# --------------------------------------------------------------------------------------------------

def test_audit_changes_nothing_and_writes_its_figures_and_grid(tiny_data_dir, tmp_path, reference):
    audited = run(tiny_data_dir, tmp_path, "--privacy-audit")
    assert without_audit(audited) == without_audit(reference[1])
    ours, theirs = final_hypernet(tmp_path), final_hypernet(reference[0])
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    figures = audited["replay"][0]["audit"]
    assert set(figures) == {"reconstruction", "membership", "pools", "audit_s"}
    assert set(figures["membership"]) == set(privacy.ATTACKERS)
    for m in figures["membership"].values():
        assert m["ci"][0] <= m["auc"] <= m["ci"][1] and len(m["per_client"]) == 2
    for r in figures["reconstruction"].values():
        halves = r["nearest_is_train"] * 2 * figures["pools"]["dreamed"]    # a share of the dreams (ties count half)
        assert abs(halves - round(halves)) < 1e-9 and r["train_nn"]["q05"] <= r["train_nn"]["q95"]
    assert figures["pools"]["dreamed"] == 2 * DREAMS and figures["pools"]["members"] == figures["pools"]["held_out"] > 0
    assert (tmp_path / "privacy_batch1.png").stat().st_size > 0
    assert "audit" not in reference[1]["replay"][0]


def test_save_grid_writes_a_png_of_the_images(tmp_path):
    """The grid is a real PNG of the images: 20 images of 8 x 8 in rows of 5 (torchvision's 2-pixel padding),
    un-normalised (not a constant picture)."""
    from PIL import Image
    mean, std = (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)
    path = tmp_path / "grid.png"
    privacy.save_grid(torch.randn(20, 3, 8, 8, generator=torch.Generator().manual_seed(0)), mean, std, path, nrow=5)
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (5 * 10 + 2, 4 * 10 + 2)
        pixels = np.asarray(image.convert("RGB"))
    assert pixels[2:10, 2:10].std() > 10                    # the first image is not flat
    # a constant image un-normalises to the mean colour: mean + 0 * std
    privacy.save_grid(torch.zeros(1, 3, 4, 4), mean, std, tmp_path / "one.png", nrow=1)
    with Image.open(tmp_path / "one.png") as one:
        centre = np.asarray(one.convert("RGB"))[2, 2]
    assert np.allclose(centre, np.round(np.array(mean) * 255), atol=1)

"""What the uploaded BatchNorm statistics give away: the privacy audit of replay, and the noise knob that
trades accuracy for privacy (the seed's open question 2; docs/privacy.md, docs/design.md §5).

The paper calls replay private because the server dreams images from BatchNorm statistics rather than
data, and measures nothing. This file measures it, and gives the user a price for more privacy.

Owns:
  * release, uploads   what a client uploads for replay under `--bn-noise SIGMA`: its BN running
                       statistics plus N(0, SIGMA^2) on every running mean and variance entry (variances
                       floored at VAR_FLOOR) and its label counts plus N(0, (SIGMA n)^2), n its number of
                       training images (SIGMA on the label shares). SIGMA = 0 is today's upload, bit for
                       bit: nothing is drawn and the very same tensors are used.
  * the audit          runs after a replay, on the CLIENT side of the line: it reads the new clients' real
                       training images, because it stands in for an attacker's best case, and changes
                       nothing (its own generators, eval mode, no gradients, nothing written back).
      reconstruction   each dreamed image's nearest real image in the dreaming client's training split,
                       against its nearest in a held-out pool of the same size and classes (test images:
                       no client trained on them), in pixel space and in the feature space of a randomly
                       initialised ResNet-18 (a model that saw no image at all); and, in pixel space, the
                       nearest image of the whole training split, which the grid shows.
      membership       ROC AUC of four attackers that score the new clients' training images against
                       held-out images of the same classes (0.5 = nothing leaks), with DeLong's 95 %
                       interval: nearest dream in pixel space, in feature space, the likelihood of an
                       image's BN-input features under the uploaded statistics, and the loss of the
                       client's generated model (what the server holds without any replay: the reference).
      grid             dreamed images above their nearest training images, so a reader can look.

Everything here is a pure function of its arguments except `audit_replay`, which gathers them from a
server, its clients and the dataset.
"""
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import hypernet as hn

# Noise can push a variance to or below zero, where BatchNorm would divide by sqrt(eps) ~ 3e-3 and the
# dreaming teacher would explode. 0.1 is below every running variance of the trained cpu-demo clients we
# looked at (smallest 0.24, docs/privacy.md), so only noise reaches it, and it caps BN's gain at about 3x.
VAR_FLOOR = 0.1
# Images per class per pool (training and held-out alike). CIFAR-10 has 1000 test images a class, shared
# by the clients that hold it; 500 keeps the audit at tens of seconds on a CPU and the AUC's interval
# near +-0.01 with 5 clients of 2 classes.
POOL_PER_CLASS = 500
FEATURE_SEED = 0          # the random feature model is the same in every audit
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
ATTACKERS = ("pixel", "feature", "statistics", "model_loss")


# --------------------------------------------------------------------------------------------------
# 1. The knob: noisy uploads
# --------------------------------------------------------------------------------------------------

def release(bn_stats, label_counts, sigma, generator):
    """(bn_stats, label_counts) as a client uploads them under noise sigma; sigma = 0: the inputs themselves.

    Running means and variances get N(0, sigma^2) per entry (the variances then floored at VAR_FLOOR);
    num_batches_tracked (the number of local steps, fixed by the protocol) is sent as it is. Label counts
    get N(0, (sigma n)^2), i.e. sigma on the shares, the same relative size as on the statistics, which
    BatchNorm keeps of order 1; rounded, floored at 0, and all ones if nothing is left (replay needs a
    positive total; that is post-processing, it reveals nothing more).
    """
    if sigma == 0:              # today's upload: not a single random number is drawn
        return bn_stats, label_counts

    def noise(shape):
        return sigma * torch.randn(shape, generator=generator, dtype=torch.float64)

    noisy = {}
    for name, buf in bn_stats.items():
        if name.endswith("running_mean"):
            noisy[name] = buf + noise(buf.shape).to(buf)
        elif name.endswith("running_var"):
            noisy[name] = (buf + noise(buf.shape).to(buf)).clamp_min(VAR_FLOOR)
        else:
            noisy[name] = buf.clone()
    n = float(label_counts.sum())
    counts = (label_counts.cpu().double() + n * noise(label_counts.shape)).round().clamp_min(0).long()
    if counts.sum() == 0:
        counts = torch.ones_like(counts)
    return noisy, counts.to(label_counts.device)


def uploads(server, seed, sigma):
    """cid -> (bn_stats, label_counts): what client cid uploaded for replay, once, after its own stage.

    The noise depends on (seed, cid) alone, so asking again gives the same upload and nothing needs to be
    checkpointed. A client's statistics no longer change once its stage is over (it never trains again),
    so this is its upload whenever replay asks. Uploading once matters: fresh noise every round would let
    the server average it away. In the simulation `server.bn_stats` keeps each client's exact statistics
    for its own training and evaluation (the client's side); with sigma > 0 only replay and the audit's
    attackers, the server's side, read this upload.
    """
    def upload(cid):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + 777_767 + cid)
        return release(server.bn_stats[cid], server.label_counts[cid], sigma, generator)
    return upload


# --------------------------------------------------------------------------------------------------
# 2. Distances and attack scores (pure functions)
# --------------------------------------------------------------------------------------------------

def distances(pool, dreams):
    """(P, D) RMS distance (Euclidean / sqrt(dim)) from every pool image to every dream, each dream taken as
    the nearer of itself and its mirror image: replay dreams with random flips, so a mirrored copy is a copy."""
    exact = "donot_use_mm_for_euclid_dist"         # a copy must come out at distance 0, not 1e-3
    flat = pool.flatten(1)
    d = torch.minimum(torch.cdist(flat, dreams.flatten(1), compute_mode=exact),
                      torch.cdist(flat, dreams.flip(-1).flatten(1), compute_mode=exact))
    return d / flat.shape[1] ** 0.5


def feature_model(num_classes, width, device):
    """A randomly initialised ResNet-18 of the clients' width, without its classifier: x -> unit-norm
    pooled features. Random on purpose: it has seen no image, so any closeness it finds between a dream and
    a training image cannot come from having learnt that image (a trained model would have to have been
    trained on neither pool). It is a weaker judge of content than a trained one: docs/privacy.md."""
    with torch.random.fork_rng(devices=[]):        # the run's own random stream is left where it was
        torch.manual_seed(FEATURE_SEED)
        model = hn.ResNet18(num_classes, width)
    model.fc = nn.Identity()
    model = model.to(device).eval()

    @torch.no_grad()
    def features(x, chunk=500):
        return torch.cat([F.normalize(model(x[i:i + chunk]), dim=1) for i in range(0, len(x), chunk)])
    return features


def feature_distances(features, pool, dreams):
    """distances() in the feature space: each dream's features and its mirror image's, the nearer one."""
    pool_f, dream_f, mirror_f = features(pool), features(dreams), features(dreams.flip(-1))
    return torch.minimum(torch.cdist(pool_f, dream_f), torch.cdist(pool_f, mirror_f))


@torch.no_grad()
def statistics_scores(model, weights, bn_stats, x, y, chunk=500):
    """Two attackers that hold what the server holds about a client: its generated weights and uploaded
    statistics. Per image, higher = 'more likely a training image':
      statistics  minus the mean Gaussian negative log-likelihood of the image's input to every BN layer
                  under the uploaded per-channel (running_mean, running_var);
      model_loss  minus the cross-entropy of the generated model with those statistics (Yeom et al.'s loss
                  attack: what the weights alone give away, without any replay)."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    nll = []

    def hook(module, inputs, output):     # inside functional_call, running_* are the client's tensors
        f = inputs[0]
        var = module.running_var.view(1, -1, 1, 1) + module.eps
        mean = module.running_mean.view(1, -1, 1, 1)
        nll.append((0.5 * ((f - mean) ** 2 / var + var.log())).mean(dim=(1, 2, 3)))

    was_training = model.training
    model.eval()                          # eval: BatchNorm reads the statistics, never writes them
    handles = [m.register_forward_hook(hook) for m in bns]
    stats, losses = [], []
    try:
        for i in range(0, len(x), chunk):
            nll.clear()
            logits = hn.run_model(model, weights, bn_stats, x[i:i + chunk])
            stats.append(-torch.stack(nll).mean(0))
            losses.append(-F.cross_entropy(logits, y[i:i + chunk], reduction="none"))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return torch.cat(stats), torch.cat(losses)


# --------------------------------------------------------------------------------------------------
# 3. AUC with its interval, and the chance comparison
# --------------------------------------------------------------------------------------------------

def auc_delong(members, nonmembers):
    """(AUC, its variance): P(score of a member > score of a non-member), ties counted half (Mann-Whitney),
    and DeLong's variance from the placement values. No random numbers."""
    pos, neg = np.asarray(members, dtype=np.float64), np.asarray(nonmembers, dtype=np.float64)
    neg_sorted, pos_sorted = np.sort(neg), np.sort(pos)
    # share of non-members below each member, and of members above each non-member (ties half)
    v10 = (np.searchsorted(neg_sorted, pos, "left") + np.searchsorted(neg_sorted, pos, "right")) / (2 * len(neg))
    v01 = 1 - (np.searchsorted(pos_sorted, neg, "left") + np.searchsorted(pos_sorted, neg, "right")) / (2 * len(pos))
    var = (v10.var(ddof=1) / len(pos) if len(pos) > 1 else 0.0) + (v01.var(ddof=1) / len(neg) if len(neg) > 1 else 0.0)
    return float(v10.mean()), float(var)


def stratified_auc(groups, z=1.96):
    """One AUC over several clients, each scored by its own attacker: groups = [(member scores, non-member
    scores)]. Members are compared only with non-members of the same client (different clients' scores are
    on different scales); the client AUCs are weighted by their number of pairs, and the pools are disjoint,
    so their variances add. Returns {auc, ci: [lo, hi], per_client: [...]}."""
    aucs, variances, pairs = zip(*[(*auc_delong(m, n), len(m) * len(n)) for m, n in groups])
    w = np.asarray(pairs, dtype=np.float64) / sum(pairs)
    auc = float(np.dot(w, aucs))
    se = float(np.sqrt(np.dot(w ** 2, variances)))
    return {"auc": auc, "ci": [max(0.0, auc - z * se), min(1.0, auc + z * se)], "per_client": list(aucs)}


def summary(d):
    """A distribution in a few numbers: its quantiles (q05 ... q95) and mean."""
    d = np.asarray(d, dtype=np.float64)
    return dict({f"q{round(100 * q):02d}": float(np.quantile(d, q)) for q in QUANTILES}, mean=float(d.mean()))


def reconstruction(train_nn, held_nn):
    """Each dream's distance to its nearest training image against its nearest held-out one (pools of the
    same size and classes, so under 'nothing leaks' the two are exchangeable):
      nearest_is_train     share of dreams nearer a training image than any held-out one (chance 0.5);
      closer_than_chance   share whose training distance is below the 5th percentile of the held-out
                           distances over all dreams (chance 0.05), i.e. nearer than held-out images of
                           the same classes come by chance."""
    train_nn, held_nn = np.asarray(train_nn, dtype=np.float64), np.asarray(held_nn, dtype=np.float64)
    threshold = float(np.quantile(held_nn, 0.05))
    return {"train_nn": summary(train_nn), "held_out_nn": summary(held_nn),
            "nearest_is_train": float(np.mean((train_nn < held_nn) + 0.5 * (train_nn == held_nn))),
            "closer_than_chance": float(np.mean(train_nn < threshold)), "chance_threshold": threshold}


def matched_pools(train_y, held_y, classes, per_class, generator):
    """Indices (into the training and the held-out labels) of two pools with the same number of images of
    every class in `classes`: min(training, held-out, per_class) each, drawn with `generator`."""
    train_idx, held_idx = [], []
    for c in classes:
        tr = (train_y == c).nonzero().flatten().cpu()
        he = (held_y == c).nonzero().flatten().cpu()
        m = min(len(tr), len(he), per_class)
        train_idx.append(tr[torch.randperm(len(tr), generator=generator)[:m]])
        held_idx.append(he[torch.randperm(len(he), generator=generator)[:m]])
    return torch.cat(train_idx).sort().values, torch.cat(held_idx).sort().values


# --------------------------------------------------------------------------------------------------
# 4. The audit of one replay
# --------------------------------------------------------------------------------------------------

def audit_client(dreams, x_train, y_train, x_held, y_held, features, attacker=None):
    """One dreaming client: its dreams (normalised, in the valid pixel range), its training pool and a
    held-out pool (normalised, size-matched). `attacker(x, y) -> (statistics scores, model_loss scores)` or
    None. Returns each dream's nearest distances (training, held-out) and each image's membership scores."""
    pixel_tr, pixel_he = distances(x_train, dreams), distances(x_held, dreams)
    feat_tr, feat_he = feature_distances(features, x_train, dreams), feature_distances(features, x_held, dreams)
    out = {"pixel": (pixel_tr.min(0).values, pixel_he.min(0).values),
           "feature": (feat_tr.min(0).values, feat_he.min(0).values),
           # an image's score: minus its distance to the nearest dream (members should sit closer)
           "scores": {"pixel": (-pixel_tr.min(1).values, -pixel_he.min(1).values),
                      "feature": (-feat_tr.min(1).values, -feat_he.min(1).values)}}
    if attacker is not None:
        (stat_tr, loss_tr), (stat_he, loss_he) = attacker(x_train, y_train), attacker(x_held, y_held)
        out["scores"]["statistics"] = (stat_tr, stat_he)
        out["scores"]["model_loss"] = (loss_tr, loss_he)
    return out


def summarize(per_client):
    """The audit's figures from audit_client's results of every dreaming client (with `pixel_full`, each
    dream's pixel distance to the nearest image of the client's whole training split, where measured)."""
    figures = {"reconstruction": {}, "membership": {}}
    for space in ("pixel", "feature"):
        train_nn = torch.cat([r[space][0] for r in per_client]).cpu().numpy()
        held_nn = torch.cat([r[space][1] for r in per_client]).cpu().numpy()
        figures["reconstruction"][space] = reconstruction(train_nn, held_nn)
    if all("pixel_full" in r for r in per_client):
        # descriptive only: there is no held-out pool that large to compare with
        figures["reconstruction"]["pixel"]["train_nn_whole_split"] = summary(
            torch.cat([r["pixel_full"] for r in per_client]).cpu().numpy())
    for name in ATTACKERS:
        if all(name in r["scores"] for r in per_client):
            figures["membership"][name] = stratified_auc(
                [(r["scores"][name][0].cpu().numpy(), r["scores"][name][1].cpu().numpy()) for r in per_client])
    return figures


def valid_range(images, mean, std):
    """Clamp normalised images to what a real image can be (pixels in [0, 1]), as anyone looking would."""
    mean = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return torch.maximum(torch.minimum(images, (1 - mean) / std), -mean / std)


def auditor(dataset, seed, grid_path):
    """federated.run_replay's `audit`: audit_replay, with its grid saved at `grid_path(t)` (one row of a
    client's dreams above a row of their nearest training images)."""
    def audit(server, clients, t, report):
        figures, grid = audit_replay(server, clients, dataset, t, report, server.uploads, seed=seed)
        if grid is not None:
            save_grid(grid, dataset.mean, dataset.std, grid_path(t), nrow=len(grid) // (2 * len(report["dreamers"])))
        return figures
    return audit


def save_grid(images, mean, std, path, nrow=16):
    """Undo the normalisation, clamp to [0, 1] and write one PNG grid."""
    import torchvision.utils
    mean = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    torchvision.utils.save_image((images.detach() * std + mean).clamp(0, 1), path, nrow=nrow)


@torch.no_grad()
def audit_replay(server, clients, dataset, t, report, upload, *, seed, per_class=POOL_PER_CLASS, grid_per_client=8):
    """The audit of the replay after stage t: (figures for results.json, grid images), or (None, None)
    when there is nothing to audit (no client dreamed, or the replay diverged).

    `report` is backward_transfer's (its images, and `dreamers`, the clients they were dreamed from, in
    order); `upload(cid)` is what the server holds of a client's statistics (uploads()). For each dreaming
    client j: a training pool from j's training split and a held-out pool from the test images of j's
    classes, of the same size per class; the test images of a class are split among the clients that hold
    it, so no image is in two clients' pools. In pixel space each dream's nearest image in j's whole
    training split is found too (cheap: no model runs), for the grid and as a descriptive figure: a copy of
    an image outside the sampled pool would show there. Nothing here changes the server or the clients.
    """
    start = time.time()
    dreamers, images = report["dreamers"], report["images"]
    if not dreamers or not bool(torch.isfinite(images).all()):
        return None, None
    model = server.model
    num_images = len(images) // len(dreamers)
    features = feature_model(model.fc.out_features, model.conv1.out_channels, images.device)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + 999_983 + t)
    # The held-out share of each class: its test images in a random order, cut into one slice per holder.
    holders = {}
    for j in dreamers:
        for c in clients[j].y_train.unique().tolist():
            holders.setdefault(c, []).append(j)
    held_share = {}
    for c, js in holders.items():
        idx = (dataset.y_test == c).nonzero().flatten().cpu()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        for k, j in enumerate(js):
            held_share[j, c] = idx[k * len(idx) // len(js):(k + 1) * len(idx) // len(js)]
    per_client, grid = [], []
    for n, j in enumerate(dreamers):
        client = clients[j]
        classes = client.y_train.unique().tolist()
        held_idx = torch.cat([held_share[j, c] for c in classes])
        tr, he = matched_pools(client.y_train, dataset.y_test[held_idx], classes, per_class, generator)
        he = held_idx[he]
        x_tr, y_tr = data.normalize(client.x_train[tr], dataset.mean, dataset.std), client.y_train[tr]
        x_he, y_he = data.normalize(dataset.x_test[he], dataset.mean, dataset.std), dataset.y_test[he]
        dreams = valid_range(images[n * num_images:(n + 1) * num_images], dataset.mean, dataset.std)
        weights, bn_stats = server.hypernet.unflatten(server.generate(j)), upload(j)[0]
        result = audit_client(dreams, x_tr, y_tr, x_he, y_he, features,
                              lambda x, y: statistics_scores(model, weights, bn_stats, x, y))
        whole = torch.cat([distances(data.normalize(client.x_train[i:i + 1000], dataset.mean, dataset.std), dreams)
                           for i in range(0, len(client.y_train), 1000)]).min(0)
        result["pixel_full"] = whole.values
        per_client.append(result)
        # the most suspicious dreams: nearest the training split relative to the held-out pool
        ratio = whole.values / result["pixel"][1].clamp_min(1e-12)
        pick = ratio.argsort()[:min(grid_per_client, num_images)]
        nearest = data.normalize(client.x_train[whole.indices[pick]], dataset.mean, dataset.std)
        grid.append((dreams[pick], nearest))
    figures = summarize(per_client)
    figures["pools"] = {"dreamed": int(len(images)),
                        "members": int(sum(len(r["scores"]["pixel"][0]) for r in per_client)),
                        "held_out": int(sum(len(r["scores"]["pixel"][1]) for r in per_client)),
                        "per_class": per_class}
    figures["audit_s"] = time.time() - start
    # one row of a client's dreams, the row below their nearest training images: min(grid_per_client,
    # images per client) to a row
    return figures, torch.cat([torch.cat([d, nb]) for d, nb in grid])

"""The paper's replay, measured against ours: fine-tune the SHARED hypernetwork for all earlier clients at once.

Issue 21 asked which transfers more: our replay (each earlier client fine-tunes only its own rows, its
embedding and its borrow gate) or the paper's variant (the global hypernetwork is fine-tuned on the
synthetic data with earlier batches' masks frozen). This development script measures the second on the
validation thirds of benchmarks/replay_thirds.py (pick on the first, the confirmation test reads the
second, the third says what a kept update is worth; test data is never read), from finished
`--no-replay` runs, and changes nothing in the code a run uses.

What is fine-tuned here, so that no client outside the replay can move: the hypernetwork entries that
`BatchGates.free_masks` leaves writable once every batch so far has finished (the rows of units nobody
owns, and the head's columns from them), for all tried earlier clients together, next to each tried
client's embedding and borrow-gate rows. The tried clients read the free units through their borrow gate
(started at 1 on them, their head columns at 0, so the start is exactly the generated model they had);
a client whose update is rejected gets its own rows back and reads nothing of the free units again, so it
is bitwise where it was. One point of the joint 30-step path is chosen for everyone (the best mean score
of the tried clients on their first thirds), then each client's update is confirmed on its own.

    python benchmarks/replay_shared.py runs/nr-dc-100 runs/nr-dc-102 --shared-lr 1e-3,1e-2
    python benchmarks/replay_shared.py runs/nr-dc-100 runs/nr-dc-102 --shared-lr 1e-3 --then-own
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import replay as replay_module  # noqa: E402
from shell import runner  # noqa: E402
import train  # noqa: E402
from hypernet import run_model  # noqa: E402
from masks import ServerOptimizer  # noqa: E402
from replay_diagnosis import check_runs  # noqa: E402
from replay_thirds import ThirdsClient  # noqa: E402


def client_loss(server, cid, batch, pool, own, settings):
    """replay.improve_client's loss for one client, from where the hypernetwork is now."""
    x, labels, teacher_logits = pool
    classes, y, soft, weight = replay_module.own_class_targets(labels, teacher_logits, server.label_counts[cid])
    logits = run_model(server.model, server.hypernet.unflatten(server.hypernet([cid], [batch])[0]),
                       server.bn_stats[cid], x)[:, classes]
    return replay_module.replay_loss(logits, y, soft, own[:, classes], weight, kd_weight=settings["kd_weight"],
                                     anchor_weight=settings["anchor_weight"], temperature=settings["temperature"])


def dream_stage(config, server, t):
    """The stage's dreams, as replay.backward_transfer makes them (one synthesis serves every setting)."""
    settings, uploads = train.replay_settings(config), replay_module.held_uploads(server)
    new_clients = [j for j in server.batches[t] if j in server.label_counts]
    new_classes = sum((uploads(j)[1] > 0).long() for j in new_clients)
    tried = [(k, i) for k in range(t) for i in server.batches[k]
             if i in server.label_counts and bool(((uploads(i)[1] > 0) & (new_classes > 0)).any())]
    dreamers = new_clients + [i for _, i in tried if i not in server.dreams]
    dreamed, _, _ = replay_module.dream(server, dreamers, uploads, num_images=settings["num_images"],
                                        iterations=settings["iterations"], bn_weight=settings["bn_weight"],
                                        seed=config["seed"] + t)
    return new_clients, tried, dreamed


def better(score, than):
    """(accuracy, loss) on the first third: more right, or as many right with a lower loss."""
    return score[0] > than[0] or (score[0] == than[0] and score[1] < than[1])


def own_paths(server, clients, ids, batch_of, pools, settings):
    """replay.improve_client for every tried client from where the hypernetwork is now, its own rows only:
    {cid: (its best first-third score, its rows there, or None when no point beat where it started)}."""
    rows = replay_module.replayed_rows(server.hypernet)
    validate = lambda cid, flat: clients[cid].evaluate(flat, server.bn_stats[cid], "val_select")  # noqa: E731
    keys = ("steps", "lr", "kd_weight", "anchor_weight", "temperature", "validate_every")
    out = {}
    for i in ids:
        _, score, best, _ = replay_module.improve_client(
            server, i, batch_of[i], pools[i], rows, validate, lambda *a: (0, 0, 0.0, 0.0),
            replay_module.held_uploads(server), **{k: settings[k] for k in keys})
        out[i] = (score, best)
    return out


def measure(client, start, after, bn_stats):
    """What the client's second third says of the update (replay's four numbers), and its worth on the third."""
    worth = client.evaluate(after, bn_stats, "assess")[0] - client.evaluate(start, bn_stats, "assess")[0]
    return (*client.confirm(start, after, bn_stats), worth)


def shared_replay(config, clients, server, t, shared_lr, with_shared, stage_dreams, then_own=False):
    """One replay of batch t onto the earlier clients, from the no-replay state, put back afterwards.
    `then_own`: after the joint path, each client also walks its own rows from the joint point, and keeps
    the better (on its first third) of that and of today's replay (its own rows from its start, reading
    no free unit): the two can sit side by side, since a client that reads no free unit is untouched by them.
    Returns (tried, {cid: (gained, lost, loss drop, its error, worth on the third)}, teachers' reading)."""
    hypernet, gates = server.hypernet, server.hypernet.gates
    saved = {n: p.detach().clone() for n, p in hypernet.named_parameters()}
    saved_dreams = dict(server.dreams)
    settings = train.replay_settings(config)
    uploads = replay_module.held_uploads(server)
    new_clients, tried, dreamed = stage_dreams
    server.dreams.update(dreamed)
    images, labels, teacher_logits = (torch.cat([dreamed[j][n] for j in new_clients]) for n in range(3))
    reads = float((teacher_logits.argmax(1) == labels).float().mean())
    if not tried:
        server.dreams = saved_dreams
        return 0, {}, reads
    ids = [i for _, i in tried]
    batch_of = dict((i, k) for k, i in tried)
    start = {i: server.generate(i) for i in ids}
    pools = {i: replay_module.fine_tuning_set(server, i, images, labels, teacher_logits, uploads)
             for i in ids}
    with torch.no_grad():
        own = {i: run_model(server.model, hypernet.unflatten(start[i]), server.bn_stats[i], pools[i][0])
               for i in ids}
    today = own_paths(server, clients, ids, batch_of, pools, settings) if then_own else {}
    free_units = ~gates.owned                                   # nobody owns them after every stage so far
    original_client_gate = gates.client_gate

    def client_gate(client, batch, s):                          # the borrow gate reaches the free units too
        gate = gates.gate(batch, s)
        return gate + gates.borrow[client] * (gates.binary[batch] == 0).float()

    gates.client_gate = client_gate
    try:
        params = replay_module.replayed_rows(hypernet)
        free = {name: torch.zeros_like(p) for name, p in params.items()}
        with torch.no_grad():
            # Free units add nothing at the start: whatever reads them from an owned unit or the head is
            # zeroed (nobody reads these entries: every finished batch's gate is 0 on the free units)...
            hypernet.head.weight[:, free_units[-1]] = 0.0
            for l in range(1, len(hypernet.trunk)):
                rows = gates.owned[l].nonzero().flatten()
                hypernet.trunk[l].weight[rows[:, None], free_units[l - 1].nonzero().flatten()[None, :]] = 0.0
            for i in ids:
                gates.borrow[i][free_units] = 1.0               # ...though the tried clients read them
                for mask in free.values():
                    mask[i] = 1.0
        assert all(torch.equal(server.generate(i), start[i]) for i in ids), "the start moved"
        if with_shared:
            masks = gates.free_masks(hypernet, t)
            for name, p in hypernet.named_parameters():
                if name.startswith(("trunk.", "head.weight")):
                    params[name], free[name] = p, masks[name]
        lr_of = {name: shared_lr for name in params if name.startswith(("trunk.", "head."))}
        optimizer = ServerOptimizer(params, kind="adam", lr=settings["lr"], lr_of=lr_of)
        scores = {i: [clients[i].evaluate(start[i], server.bn_stats[i], "val_select")] for i in ids}
        points = [None]
        for step in range(1, settings["steps"] + 1):
            loss = sum(client_loss(server, i, batch_of[i], pools[i], own[i], settings) for i in ids)
            grads = torch.autograd.grad(loss, list(params.values()))
            optimizer.step(dict(zip(params, grads)), free)
            if step % settings["validate_every"] == 0 or step == settings["steps"]:
                for i in ids:
                    scores[i].append(clients[i].evaluate(server.generate(i), server.bn_stats[i], "val_select"))
                points.append({n: p.detach().clone() for n, p in params.items()})
        # one point for everyone: the best mean first-third accuracy (then loss) over the tried clients
        mean = [(np.mean([scores[i][k][0] for i in ids]), -np.mean([scores[i][k][1] for i in ids]))
                for k in range(len(points))]
        best = max(range(len(points)), key=lambda k: mean[k])
        out = {}
        if best > 0:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(points[best][n])
        if then_own:
            rows = replay_module.replayed_rows(hypernet)
            joint = {i: {n: p[i].detach().clone() for n, p in rows.items()} for i in ids}
            onward = own_paths(server, clients, ids, batch_of, pools, settings)
            for i in ids:
                candidates = [today[i], (onward[i][0], onward[i][1] or joint[i]) if onward[i][1] or best
                              else (None, None)]
                chosen = None
                for score, rows_i in candidates:
                    if rows_i is not None and better(score, scores[i][0]) and (
                            chosen is None or better(score, chosen[0])):
                        chosen = (score, rows_i)
                replay_module.set_rows(rows, i, chosen[1] if chosen else
                                       {n: saved[n][i] for n in rows})
                if chosen is not None:
                    out[i] = measure(clients[i], start[i], server.generate(i), server.bn_stats[i])
        elif best > 0:
            for i in ids:
                out[i] = measure(clients[i], start[i], server.generate(i), server.bn_stats[i])
    finally:
        gates.client_gate = original_client_gate
        with torch.no_grad():
            for n, p in hypernet.named_parameters():
                p.copy_(saved[n])
        server.dreams = saved_dreams
    return len(ids), out, reads


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="folders of finished --no-replay runs (results.json + checkpoint.pt)")
    p.add_argument("--shared-lr", default="1e-3", help="Adam's rate for the shared entries, comma-separated")
    p.add_argument("--then-own", action="store_true",
                   help="instead: after the joint path each client walks its own rows and keeps the better of "
                        "that and today's replay")
    p.add_argument("--verbose", action="store_true", help="one line per tried client")
    args = p.parse_args()
    try:
        rates = [float(v) for v in args.shared_lr.split(",")]
    except ValueError:
        p.error("--shared-lr takes comma-separated numbers")
    check_runs(p, args.runs)
    # (shared fine-tuned?, its rate): the rows alone through the free units too, then with the shared entries
    settings = ([(True, r, True) for r in rates] if args.then_own
                else [(False, 0.0, False)] + [(True, r, False) for r in rates])
    totals = {s: [] for s in settings}
    for run in args.runs:
        config, _, clients, server, batches, _ = runner.restore_finished(run)
        for client in clients:
            client.__class__ = ThirdsClient
        for t in range(1, len(batches)):
            stage_dreams = dream_stage(config, server, t)
            for s in settings:
                tried, out, reads = shared_replay(config, clients, server, t, s[1], s[0], stage_dreams, s[2])
                totals[s].append((tried, out))
                if args.verbose:
                    for cid, v in out.items():
                        print(f"  {run} stage {t} {s} client {cid}: {v}", flush=True)
    alpha = train.DEFAULTS["replay_confirm_alpha"]
    print(f"{len(args.runs)} runs: " + ", ".join(args.runs))
    print("| shared entries fine-tuned, rate | tried | proposals | kept (Holm, alpha = 0.05) | gain per tried on the third "
          "| kept that lost there | stages whose kept updates gain in sum, none losing |")
    print("|---|---|---|---|---|---|---|")
    for s in settings:
        tried = sum(n for n, _ in totals[s])
        worths = [[stage[c][4] for c in replay_module.accept({c: v[:4] for c, v in stage.items()}, alpha)]
                  for _, stage in totals[s]]
        kept = [w for ws in worths for w in ws]
        ok = sum(bool(w) and sum(w) > 0 and min(w) >= 0 for w in worths)
        label = (f"yes, {s[1]:g}" + (", then each its own rows or today's" if s[2] else "")) if s[0] else \
            "no (rows only)"
        print(f"| {label} | {tried} | "
              f"{sum(len(stage) for _, stage in totals[s])} | {len(kept)} | {100 * sum(kept) / max(tried, 1):+.2f} | "
              f"{sum(w < 0 for w in kept)} | {ok} of {len(worths)} |", flush=True)


if __name__ == "__main__":
    main()

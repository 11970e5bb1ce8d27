"""Numerical faults met and survived (ours; not the paper's): a NaN/Inf client update is dropped, a round
whose updates were all dropped makes no server step, a replay that diverged is undone. Counted in
results.json's `faults`. The core does none of this; `screen` wraps a core server's update and replay."""
import math
import time

import torch


def no_faults():
    """The fault counters every server (and every baseline) reports in results.json, all zero."""
    return {"dropped_updates": 0, "skipped_rounds": 0, "dropped_replays": 0}


def is_finite_update(update):
    """No NaN or Inf in the delta or the BN statistics, with one host round trip for the whole update:
    x * 0 is 0 for every finite x and NaN for NaN and +-Inf, and a sum of zeros cannot overflow."""
    zeros = [(update.delta * 0).sum()] + [(b * 0).sum() for b in update.bn_stats.values() if b.is_floating_point()]
    return bool(torch.isfinite(torch.stack(zeros).sum()))


def keep_finite(updates, faults):
    """The indices of the round's updates with no NaN or Inf; the others are counted in `faults`."""
    kept = [k for k, u in enumerate(updates) if is_finite_update(u)]
    faults["dropped_updates"] += len(updates) - len(kept)
    faults["skipped_rounds"] += not kept
    return kept


def screen(server, audit=None):
    """Wrap a core (or extension) server: its update sees only finite client updates, its replay is timed and
    undone when it diverged, and `audit(server, clients, t, report)` (the privacy audit) runs after it."""
    server.faults = no_faults()
    update, replay = server.update, server.replay

    def screened_update(client_ids, generated, updates):
        kept = keep_finite(updates, server.faults)
        if not kept:
            return float("nan")
        return update([client_ids[k] for k in kept], generated[kept], [updates[k] for k in kept])

    def screened_replay(clients, t, seed, progress=None):
        # Whatever a replay moves (the core's embedding rows, an extension's borrowed gates), a diverged one is
        # undone whole: every hypernetwork parameter is saved, not a list of the names replays are known to write.
        weights = dict(server.hypernet.named_parameters())
        saved = {n: p.detach().clone() for n, p in weights.items()}
        start, synthesis = time.time(), {}

        def timed(phase, done, total):
            if phase != "synthesis" and "end" not in synthesis:
                synthesis["end"] = time.time()
            if progress is not None:
                progress(phase, done, total)
        report = replay(clients, t, seed, timed)
        report["replay_s"] = time.time() - start
        report["synthesis_s"] = synthesis.get("end", time.time()) - start
        finite = (bool(torch.isfinite(report["images"]).all()) and all(math.isfinite(x) for x in report["bn_loss_end"])
                  and all(bool(torch.isfinite(p).all()) for p in weights.values()))
        report["dropped"] = not finite
        if not finite:
            server.faults["dropped_replays"] += 1
            with torch.no_grad():
                for n, p in weights.items():
                    p.copy_(saved[n])
        if audit is not None:
            report["audit"] = None if report["dropped"] else audit(server, clients, t, report)
        return report

    server.update, server.replay = screened_update, screened_replay
    return server

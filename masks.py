"""Batch-specific masks on the hypernetwork's hidden units (paper: the "sub-hypernetwork"; docs/design.md §4).

The paper gives every batch of clients a binary mask over the hypernetwork, learned with a sparsity
regulariser and then frozen, so that later batches cannot change what earlier clients' models are
generated from. We build it as HAT does for tasks (Serra et al., ICML 2018, arXiv 1801.01423):
  * each batch b has a gate per hidden unit, sigmoid(s * e_b), annealed during its stage from s = 1/s_max
    (soft) to s_max (nearly binary); at the end of the stage it is binarised and frozen;
  * a sparsity penalty pushes the gates toward 0 on units no earlier batch owns, so new batches prefer to
    reuse (read) owned units: that reuse is the forward transfer;
  * `free_masks` says which hypernetwork entries a later stage may still write: everything an earlier
    batch's generated weights depend on is frozen, and ServerOptimizer never moves a frozen entry.
"""
import torch
import torch.nn as nn


class BatchGates(nn.Module):
    def __init__(self, num_batches, num_layers, hidden, s_max=400.0, clamp=6.0, lr=0.05):
        super().__init__()
        # `lr`: plain SGD on the embeddings, HAT's way (Adam would normalise each unit on its own and erase the
        # compensation below); how far a typical unit's e moves in one server step (see step).
        self.s_max, self.clamp, self.lr = s_max, clamp, lr
        self.embeddings = nn.Parameter(torch.randn(num_batches, num_layers, hidden))
        self.register_buffer("binary", torch.zeros(num_batches, num_layers, hidden))
        self.register_buffer("owned", torch.zeros(num_layers, hidden, dtype=torch.bool))
        self.register_buffer("finished", torch.zeros(num_batches, dtype=torch.bool))

    def scale(self, stage_fraction):
        """s at a point in [0, 1] of the stage: linear from 1/s_max to s_max (HAT)."""
        return 1.0 / self.s_max + (self.s_max - 1.0 / self.s_max) * stage_fraction

    def gate(self, batch, s):
        """(num_layers, hidden) gate of `batch`: frozen 0/1 once its stage is over, soft while it trains."""
        if self.finished[batch]:
            return self.binary[batch]
        return torch.sigmoid(s * self.embeddings[batch])

    @torch.no_grad()
    def step(self, task_grad, batch, s, sparsity):
        """One HAT update of `batch`'s gate embedding from the task's gradient (the server's VJP).

        Task and sparsity gradients are compensated (HAT), each divided by its root mean square over the
        units it moves (ours), then one SGD step on this batch's row and HAT's clamp. Why the division:
        HAT takes thousands of gate steps per task, a stage here takes tens, and the raw gradient is ~1e-3
        per unit, so e would end within +-0.01 of 0 and the frozen mask would be sign noise. Normalised, a
        typical unit moves by `lr` a step and the gates saturate within a stage; `sparsity` becomes a ratio:
        at 1 the penalty pushes a unit off as hard as a typical task gradient pushes it on.
        """
        with torch.enable_grad():
            penalty_grad = torch.autograd.grad(self.sparsity_penalty(batch, s), self.embeddings)[0]
        task = self.compensate(task_grad, batch, s)[batch]
        penalty = self.compensate(penalty_grad, batch, s)[batch]
        self.embeddings[batch] -= self.lr * (normalised(task) + sparsity * normalised(penalty))
        self.embeddings[batch].clamp_(-self.clamp, self.clamp)     # sigmoid(s_max * e) stays finite and movable

    def sparsity_penalty(self, batch, s):
        """HAT's regulariser: mean gate value over units no earlier batch owns (owned units are free)."""
        free = (~self.owned).float()
        return (self.gate(batch, s) * free).sum() / free.sum().clamp(min=1.0)

    def compensate(self, grad, batch, s):
        """HAT's compensation: times (s_max/s)(cosh(s e)+1)/(cosh(e)+1), d sigmoid(s e)/de becomes
        s_max sigmoid'(e), the same push early and late in the stage, whatever s is."""
        e = self.embeddings[batch].detach()
        grad = grad.clone()
        grad[batch] *= (self.s_max / s) * (torch.cosh(torch.clamp(s * e, -50.0, 50.0)) + 1) / (torch.cosh(e) + 1)
        return grad

    def free_masks(self, hypernet):
        """{name: bool mask}, True where the running stage may write a hypernetwork entry.

        Unit u of layer l feeds earlier batches only if one of them owns it (their binary gates are 0
        elsewhere), so a weight is frozen when both of its ends are owned; everything downstream of all
        units (head bias, chunk embeddings, the shared base) is frozen once any batch has finished. The
        client rows (embeddings, classifiers) are the server's business: it frees the round's clients'.
        """
        masks = {}
        for l, layer in enumerate(hypernet.trunk):
            # The trunk's input (client and chunk embeddings) counts as owned by everyone.
            reads_owned = self.owned[l - 1] if l > 0 else torch.ones(layer.in_features, dtype=torch.bool,
                                                                     device=self.owned.device)
            masks[f"trunk.{l}.weight"] = ~(self.owned[l][:, None] & reads_owned[None, :])
            masks[f"trunk.{l}.bias"] = ~self.owned[l]
        masks["head.weight"] = (~self.owned[-1])[None, :].expand_as(hypernet.head.weight)
        nobody_finished = not bool(self.finished.any())
        for name in ("head.bias", "chunk_embeddings", "base"):
            masks[name] = torch.full_like(hypernet.get_parameter(name), nobody_finished, dtype=torch.bool)
        return masks

    @torch.no_grad()
    def prepare(self, hypernet, batch):
        """A new batch starts from what earlier batches built, and from nothing else.

        Head columns of units nobody owns are zeroed, so fresh units add nothing to the new clients' first
        models (they still learn: their gradient is their activation times the output gradient); batch 0
        finds nothing owned and keeps the random head. The gate starts "on" for every owned unit (reading
        them is free) and at 0, undecided, elsewhere: the stage's gradients alone decide which it takes.
        """
        if self.owned.any():
            hypernet.head.weight[:, ~self.owned[-1]] = 0.0
        e = self.embeddings[batch]
        e.copy_(torch.where(self.owned, e.abs().clamp(min=1.0), torch.zeros_like(e)))

    @torch.no_grad()
    def finish(self, batch):
        """Binarise and freeze batch's gate, record what it owns; return the neuron accounting.

        `soft`: the share of its gates still between 0.1 and 0.9 at s_max, i.e. what binarising changes."""
        at_s_max = torch.sigmoid(self.s_max * self.embeddings[batch])
        soft = ((at_s_max > 0.1) & (at_s_max < 0.9)).float().mean().item()
        active = self.embeddings[batch] > 0
        for l in range(active.shape[0]):    # a layer with no unit on would leave the batch no path through it
            if not active[l].any():
                active[l, self.embeddings[batch, l].argmax()] = True
        previously_owned = self.owned.clone()
        self.binary[batch] = active.float()
        self.owned |= active
        self.finished[batch] = True
        return {"used": active.float().mean().item(), "owned": self.owned.float().mean().item(),
                "reuse": (active & previously_owned).sum().item() / max(active.sum().item(), 1),
                "free_before": 1.0 - previously_owned.float().mean().item(), "soft": soft}


def normalised(grad):
    """grad divided by its root mean square over its nonzero entries (all zeros stays all zeros)."""
    rms = torch.sqrt((grad ** 2).sum() / (grad != 0).sum().clamp(min=1))
    return grad / rms if rms > 0 else grad


class ServerOptimizer:
    """Adam whose step leaves every entry outside its free mask bitwise untouched.

    torch.optim would still move a parameter whose gradient is zero (weight decay, momentum, Adam's running
    averages). Here every update, and every state update, goes through torch.where(free, ...), so a frozen
    entry is exactly what it was: this is how earlier batches stay isolated, and how the embedding rows of
    clients absent from a round stay put (pFedHN issue #6).
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, lr_of=None):
        self.params, self.lr, self.lr_of, self.betas, self.eps = params, lr, lr_of or {}, betas, eps
        self.reset()

    def reset(self):
        """Forget running averages: a new stage starts with a clean optimizer."""
        self.state = {name: {"m": torch.zeros_like(p), "v": torch.zeros_like(p)} for name, p in self.params.items()}
        self.steps = 0

    @torch.no_grad()
    def step(self, grads, free):
        """`free[name]`: a bool mask of the entries that may move; a name not in `free` moves everywhere."""
        self.steps += 1
        beta1, beta2 = self.betas
        for name, p in self.params.items():
            g, m, v = grads[name], self.state[name]["m"], self.state[name]["v"]
            m_new = beta1 * m + (1 - beta1) * g
            v_new = beta2 * v + (1 - beta2) * g * g
            update = (self.lr_of.get(name, self.lr) * (m_new / (1 - beta1 ** self.steps))
                      / ((v_new / (1 - beta2 ** self.steps)).sqrt() + self.eps))
            is_free = free.get(name, torch.ones((), dtype=torch.bool, device=p.device))
            m.copy_(torch.where(is_free, m_new, m))
            v.copy_(torch.where(is_free, v_new, v))
            p.copy_(torch.where(is_free, p - update, p))

"""Batch-specific masks on the hypernetwork's hidden units: the "sub-hypernetwork" (docs/design.md §4).

The paper gives every batch of clients its own binary mask over the hypernetwork's neurons and keeps
what earlier batches depend on immutable. We build it the way HAT does (Serra et al., "Overcoming
Catastrophic Forgetting with Hard Attention to the Task", ICML 2018), with one batch of clients in the
role of one task:

  * batch t owns a gate embedding e_t per hidden layer; while batch t trains, its gate is
    sigmoid(s * e_t) with s annealed from 1/s_max to s_max, so the soft gate ends (almost) binary;
  * at the end of stage t the gate is binarised (e_t > 0) and frozen, and ownership accumulates:
    owned_<=t = owned_<t OR active_t;
  * a sparsity penalty charges batch t only for units nobody owns yet, so new batches prefer to reuse
    (read) owned units: that reuse is the forward transfer;
  * `free_masks` says which hypernetwork entries a later stage may still write. Everything an earlier
    batch's generated weights depend on is frozen; the server's optimizer applies these masks with
    torch.where, so neither momentum nor weight decay can move a frozen entry.

What this file owns, in file order: the gate (`scale`, `gate`, `client_gate`), HAT's update of it
(`step`, with its sparsity penalty, compensation and clamp), `free_masks` (what a stage may still write),
`prepare` and `finish` (a batch's gate starts, then is binarised and frozen, with the neuron accounting
reported after every stage), and ServerOptimizer, the masked Adam that enforces the masks. The borrow
gates are ours (replay's).
"""
import torch
import torch.nn as nn


class BatchGates(nn.Module):
    def __init__(self, num_batches, num_layers, hidden, num_clients, s_max=400.0, clamp=6.0, lr=0.05,
                 free_start=0.0):
        super().__init__()
        self.s_max, self.clamp = s_max, clamp
        # HAT trains the gate embeddings with plain SGD, not with the server's Adam: Adam would normalise
        # each unit on its own and erase the compensation below. `lr` is how far a typical unit's e moves in
        # one server step (see step).
        self.lr = lr
        # Where a batch's gate starts on units nobody owns yet (prepare): 0 = undecided, so the stage's
        # gradients alone (task against sparsity) decide which units it takes; None keeps HAT's N(0, 1).
        self.free_start = free_start
        self.embeddings = nn.Parameter(torch.randn(num_batches, num_layers, hidden))
        # Replay's "borrow" gates (our proposal, docs/design.md §5): how much client i reads owned units outside
        # its own batch's mask (after its stage, only later batches can own new ones). Exactly zero until
        # replay trains them, so they change nothing before that.
        self.borrow = nn.Parameter(torch.zeros(num_clients, num_layers, hidden))  # ours
        self.register_buffer("binary", torch.zeros(num_batches, num_layers, hidden))
        self.register_buffer("owned", torch.zeros(num_layers, hidden, dtype=torch.bool))
        self.register_buffer("finished", torch.zeros(num_batches, dtype=torch.bool))

    # --- the gate itself -----------------------------------------------------------------------------

    def scale(self, stage_fraction):
        """s at a point in [0, 1] of the stage: linear from 1/s_max to s_max (HAT)."""
        return 1.0 / self.s_max + (self.s_max - 1.0 / self.s_max) * stage_fraction

    def gate(self, batch, s):
        """(num_layers, hidden) gate of `batch`: frozen 0/1 once its stage is over, soft while it trains."""
        if self.finished[batch]:
            return self.binary[batch]
        return torch.sigmoid(s * self.embeddings[batch])

    def client_gate(self, client, batch, s):
        """The gate one client's weights are generated with: its batch's gate plus what it borrows."""
        gate = self.gate(batch, s)
        if not self.finished[batch]:
            return gate
        borrowable = (self.owned & (self.binary[batch] == 0)).float()
        return gate + self.borrow[client] * borrowable     # + 0.0 exactly while borrow is zero

    # --- learning the gate (HAT) ---------------------------------------------------------------------

    @torch.no_grad()
    def step(self, task_grad, batch, s, sparsity):
        """One HAT update of `batch`'s gate embedding from the task's gradient (the server's VJP).

        The task's gradient and the sparsity penalty's are compensated (HAT) and each is divided by its
        root mean square over the units it moves (ours); then a plain SGD step on this batch's row only,
        and HAT's clamp. Earlier batches' rows are never touched.

        Why the division: HAT takes thousands of gate steps per task, a stage here takes tens, and the raw
        gradient is ~1e-3 per unit, so e would end within +-0.01 of 0 and the binarised mask would be sign
        noise. Normalised, a typical unit moves by `lr` a step and the gates saturate within a stage, so the
        mask that is frozen is the mask that trained. Normalising the two terms apart makes `sparsity` a
        ratio that means the same in every shape of the hypernetwork: at 1 the penalty pushes a unit off as
        hard as a typical task gradient pushes it on (raw, their ratio changes tenfold with the client
        offsets). A saturated unit's gradient is exactly 0, so the normalisation counts only units that move.
        """
        with torch.enable_grad():
            penalty_grad = torch.autograd.grad(self.sparsity_penalty(batch, s), self.embeddings)[0]
        task = self.compensate(task_grad, batch, s)[batch]
        penalty = self.compensate(penalty_grad, batch, s)[batch]
        self.embeddings[batch] -= self.lr * (normalised(task) + sparsity * normalised(penalty))
        self.clamp_(batch)
        return torch.linalg.vector_norm(task).item()

    # --- what the optimizer sees ---------------------------------------------------------------------

    def sparsity_penalty(self, batch, s):
        """HAT's regulariser: mean gate value over units no earlier batch owns (owned units are free)."""
        free = (~self.owned).float()
        gate = self.gate(batch, s)
        return (gate * free).sum() / free.sum().clamp(min=1.0)

    def compensate(self, grad, batch, s):
        """HAT's embedding-gradient compensation: undo the vanishing slope of sigmoid(s*e) at small s.

        d sigmoid(s e)/de = s sigmoid'(s e); times (s_max/s)(cosh(s e)+1)/(cosh(e)+1) it becomes
        s_max sigmoid'(e): the same push early and late in the stage, whatever s is.
        """
        e = self.embeddings[batch].detach()
        numerator = torch.cosh(torch.clamp(s * e, -50.0, 50.0)) + 1       # HAT's thres_cosh = 50
        denominator = torch.cosh(e) + 1
        grad = grad.clone()
        grad[batch] *= (self.s_max / s) * numerator / denominator
        return grad

    def clamp_(self, batch):
        """Keep e within +-clamp so sigmoid(s_max * e) stays finite and can still move (HAT's trick)."""
        with torch.no_grad():
            self.embeddings[batch].clamp_(-self.clamp, self.clamp)

    def free_masks(self, hypernet, batch):
        """1 where stage `batch` may write a hypernetwork entry, 0 where an earlier batch depends on it.

        Unit u of layer l feeds earlier batches only if one of them owns it (their binary gates are 0
        elsewhere), so a weight is frozen when both of its ends are owned, and everything downstream of
        all units (head bias, chunk embeddings, the shared base) is frozen as soon as any batch has finished.
        Client embeddings, offsets and classifiers are the server's business: it frees exactly the rows of the
        round's clients.
        """
        owned = self.owned
        masks = {}
        for l, layer in enumerate(hypernet.trunk):
            # The trunk's input (client and chunk embeddings) counts as owned by everyone.
            input_owned = owned[l - 1] if l > 0 else torch.ones(layer.in_features, dtype=torch.bool,
                                                                  device=owned.device)
            masks[f"trunk.{l}.weight"] = (~(owned[l][:, None] & input_owned[None, :])).float()
            masks[f"trunk.{l}.bias"] = (~owned[l]).float()
        masks["head.weight"] = (~owned[-1])[None, :].float().expand_as(hypernet.head.weight)
        anyone_finished = bool(self.finished.any())
        masks["head.bias"] = torch.full_like(hypernet.head.bias, 0.0 if anyone_finished else 1.0)
        masks["chunk_embeddings"] = torch.full_like(hypernet.chunk_embeddings, 0.0 if anyone_finished else 1.0)
        masks["base"] = torch.full_like(hypernet.base, 0.0 if anyone_finished else 1.0)
        if hypernet.adapters is not None:
            # A batch writes its own adapter, never another's. Batch 0 writes the shared base instead (its
            # adapter stays zero), so stage 0 trains exactly as without them.
            for name, p in hypernet.adapters.named_parameters():
                own = torch.zeros_like(p)
                if batch > 0:
                    own[batch] = 1.0
                masks[f"adapters.{name}"] = own
        return masks

    @torch.no_grad()
    def prepare(self, hypernet, batch):
        """A new batch starts from what earlier batches built, and from nothing else.

        Head columns of units nobody owns are zeroed, so fresh units add exactly nothing to the new
        clients' first models (random columns would add noise on top of the owned units' knowledge);
        they still learn, since their gradient is their activation times the output gradient. Batch 0
        finds nothing owned and keeps the random head: zeroing it would give every client the same first
        model and a zero gradient to the trunk, embeddings and gates in round 0. The new gate starts "on"
        for every owned unit (reading them is free) and at `free_start` elsewhere.
        """
        if self.owned.any():
            hypernet.head.weight[:, ~self.owned[-1]] = 0.0
        e = self.embeddings[batch]
        free = e if self.free_start is None else torch.full_like(e, self.free_start)   # None: HAT's N(0, 1)
        e.copy_(torch.where(self.owned, e.abs().clamp(min=1.0), free))

    # --- end of a stage ------------------------------------------------------------------------------

    @torch.no_grad()
    def finish(self, batch):
        """Binarise and freeze batch's gate, record what it owns; return the neuron accounting.

        `soft`: the share of the batch's gates still between 0.1 and 0.9 at s_max, i.e. what binarising
        changes. Near 0 when the mask that is frozen is the mask that trained."""
        at_s_max = torch.sigmoid(self.s_max * self.embeddings[batch])
        soft = ((at_s_max > 0.1) & (at_s_max < 0.9)).float().mean().item()
        active = self.embeddings[batch] > 0
        if not active.any(dim=1).all():
            # A layer with no active unit would generate weights from the head bias alone. Keep the
            # single most-wanted unit on, so the batch still has a path through every layer.
            for l in range(active.shape[0]):
                if not active[l].any():
                    active[l, self.embeddings[batch, l].argmax()] = True
        previously_owned = self.owned.clone()
        self.binary[batch] = active.float()
        self.owned |= active
        self.finished[batch] = True
        used = active.float().mean().item()
        reuse = (active & previously_owned).sum().item() / max(active.sum().item(), 1)
        return {"used": used, "owned": self.owned.float().mean().item(), "reuse": reuse,
                "free_before": 1.0 - previously_owned.float().mean().item(), "soft": soft}


def normalised(grad):  # ours
    """grad divided by its root mean square over its nonzero entries (all zeros stays all zeros)."""
    moving = (grad != 0).sum().clamp(min=1)
    rms = torch.sqrt((grad ** 2).sum() / moving)
    return grad / rms if rms > 0 else grad


# --------------------------------------------------------------------------------------------------
# Applying the masks: an optimizer that never moves a frozen entry
# --------------------------------------------------------------------------------------------------

def compact_masks(masks):
    """{name: 0/1 mask} -> {name: False (nothing may move) | True (everything may) | bool tensor}.

    The masks change only when a stage begins, so the server compacts them once per stage; the two
    constant cases let ServerOptimizer.step skip a tensor or skip torch.where (from batch 1 on, the
    shared base alone is 0.70 M frozen entries at width 16)."""
    compact = {}
    for name, m in masks.items():
        on = m > 0
        compact[name] = False if not on.any() else (True if on.all() else on)
    return compact


class ServerOptimizer:
    """Adam or SGD with momentum whose step leaves every entry with free-mask 0 bitwise untouched.

    torch.optim would still move a parameter whose gradient is zero (weight decay, momentum, Adam's
    running averages). Here every update, and every state update, goes through torch.where(free, ...),
    so a frozen entry is exactly what it was: this is how earlier batches stay isolated, and how
    embedding rows of clients absent from a round stay put (pFedHN issue #6).
    """

    def __init__(self, params, kind="adam", lr=1e-3, momentum=0.9, weight_decay=0.0, betas=(0.9, 0.999),
                 eps=1e-8, lr_of=None):
        self.params, self.kind, self.lr = params, kind, lr
        self.lr_of = lr_of or {}            # parameter name -> a rate of its own (the adapters')
        self.momentum, self.weight_decay, self.betas, self.eps = momentum, weight_decay, betas, eps
        self.reset()

    def reset(self):
        """Forget running averages: a new stage starts with a clean optimizer."""
        self.state = {name: {"m": torch.zeros_like(p), "v": torch.zeros_like(p)} for name, p in self.params.items()}
        self.steps = 0

    @torch.no_grad()
    def step(self, grads, free):
        """`free[name]`: a 0/1 (or bool) mask of the entries that may move; False: none may (the tensor is
        skipped, which leaves it and its state exactly as a mask of zeros would); True or absent: all may."""
        self.steps += 1
        beta1, beta2 = self.betas
        for name, p in self.params.items():
            is_free = free.get(name, True)
            if is_free is False:
                continue
            if is_free is not True and is_free.dtype != torch.bool:
                is_free = is_free > 0
            g = grads[name] + self.weight_decay * p
            m, v = self.state[name]["m"], self.state[name]["v"]
            lr = self.lr_of.get(name, self.lr)
            if self.kind == "adam":
                m_new = beta1 * m + (1 - beta1) * g
                v_new = beta2 * v + (1 - beta2) * g * g
                m_hat = m_new / (1 - beta1 ** self.steps)
                v_hat = v_new / (1 - beta2 ** self.steps)
                update = lr * m_hat / (v_hat.sqrt() + self.eps)
            else:
                m_new = self.momentum * m + g
                v_new = v
                update = lr * m_new
            if is_free is True:                 # torch.where with an all-true mask, without the passes
                m.copy_(m_new)
                v.copy_(v_new)
                p.sub_(update)
            else:
                m.copy_(torch.where(is_free, m_new, m))
                v.copy_(torch.where(is_free, v_new, v))
                p.copy_(torch.where(is_free, p - update, p))

    def state_dict(self):
        return {"state": self.state, "steps": self.steps}

    def load_state_dict(self, sd):
        self.state, self.steps = sd["state"], sd["steps"]

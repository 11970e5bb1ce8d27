"""Our extensions of pFedDSH, none of them the paper's (docs/design.md §6). The core never imports this
folder: the shell hands train.run its registry, SERVERS, as it hands it the baselines'.

  * adapters.py   each batch's low-rank adapters of the convolutions and each client's offsets
  * borrow.py     replay's borrow gates: an earlier client may read units a later batch owns
  * selection.py  replay with the earlier clients' selection and Holm-confirmed acceptance
  * controls.py   replay's controls: noise, or the client's own dreams, in place of the new clients' dreams
  * server.py     the server that wires them together: `--method pfeddsh-ext`
"""
from extensions.server import build

# Their settings, beside the core's (train.DEFAULTS); read by the methods below only.
DEFAULTS = dict(adapter_budget=0.05, adapter_lr=1e-2, replay_control="none", replay_validate_every=3,
                replay_confirm_alpha=0.05)
SERVERS = {"pfeddsh-ext": build}

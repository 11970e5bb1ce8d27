"""Every setting a command line can give, with its default (ours; not the paper's): the core's (train.DEFAULTS),
our extensions' (extensions.DEFAULTS), the baselines' and the shell's own; and the presets."""
import extensions
import train

BASELINE_DEFAULTS = dict(
    # pfedhn-frozen's embedding rate, Ditto's pull, FedLwF's distillation (chosen on validation, development
    # seeds: docs/results-archive.md)
    embed_lr=0.1, ditto_lambda=0.01, lwf_weight=1.0, lwf_temperature=2.0)
SHELL_DEFAULTS = dict(
    # privacy of replay, where the run goes, how it runs
    bn_noise=0.0, privacy_audit=False, device="auto", out=None, checkpoint_every=10, engine="local",
    node_timeout=600.0, amp=False, threads=None, deterministic=False)
DEFAULTS = {**train.DEFAULTS, **extensions.DEFAULTS, **BASELINE_DEFAULTS, **SHELL_DEFAULTS}
PRESETS = {
    "full": {},     # the defaults: the full-scale protocol (ResNet-18 width 64), for a GPU
    # the same pipeline on one CPU core in minutes: narrow ResNet-18, 3 clients per batch, short stages (with
    # --batches 5, the protocol of the finals in docs/results.md)
    "cpu-demo": dict(width=16, clients_per_batch=3, rounds=10, clients_per_round=3, local_steps=5, batch_size=32,
                     replay_images=16, replay_iterations=50, replay_steps=30),
}
REPLAYING = ("pfeddsh", "pfeddsh-ext")     # the methods that replay (unless --no-replay)
# Our extension's settings, and the methods that read them: every other run's results.json leaves them out.
EXTENSION_KEYS = {"adapter_budget": ("pfeddsh-ext", "frozen-adapters"), "adapter_lr": ("pfeddsh-ext", "frozen-adapters"),
                  "replay_control": ("pfeddsh-ext", "pfeddsh"), "replay_validate_every": ("pfeddsh-ext",),
                  "replay_confirm_alpha": ("pfeddsh-ext",)}


def relevant(config):
    """The config without the extension's settings its method never reads (what results.json records)."""
    return {k: v for k, v in config.items() if config["method"] in EXTENSION_KEYS.get(k, (config["method"],))}

"""docs/walkthrough.md cannot rot: every command it shows runs (at toy size) and shows what it says to look for.
And PA measured inside one run equals PA from a separate `local` run, as the guide and compare.py promise."""
import re
import shlex
from pathlib import Path

import pytest

from shell import cli, compare

REPO = Path(__file__).resolve().parents[1]

GUIDE = REPO / "docs" / "walkthrough.md"
# Appended to each command: later flags win, so the guide's protocol shrinks to a few seconds. With 2 clients a
# batch, 5 classes a client, so that a new batch shares a class with an earlier client and replay has something
# to dream (it dreams only from new clients that share a class with a tried client).
TOY = ["--clients-per-batch", "2", "--clients-per-round", "2", "--rounds", "3", "--local-steps", "2",
       "--batch-size", "16", "--width", "8", "--hidden", "16", "--chunk-size", "1024", "--embed-dim", "4",
       "--replay-images", "4", "--replay-iterations", "3", "--replay-steps", "3", "--device", "cpu",
       "--classes-per-client", "5"]


def guide_commands():
    return re.findall(r"```bash\n(.*?)\n```", GUIDE.read_text(), flags=re.S)


def test_the_guide_has_a_command_per_mechanism():
    commands = guide_commands()
    assert len(commands) == 5 and all(c.startswith("python train.py ") and "\n" not in c for c in commands)


@pytest.mark.parametrize("command", guide_commands())
def test_guide_command_runs_at_toy_size(command, tiny_data_dir, tmp_path):
    argv = shlex.split(command)[2:]
    argv[argv.index("--data-dir") + 1] = str(tiny_data_dir)
    out = tmp_path / Path(argv[argv.index("--out") + 1]).name
    argv[argv.index("--out") + 1] = str(out)
    found = cli.main(argv + TOY)
    if "--methods" in argv:                 # step 5: a comparison and its report
        assert (out / "comparison.md").exists() and set(found) >= {"local", "pfeddsh"}
        return
    assert (out / "results.json").exists() and (out / "accuracy_matrix.png").exists()
    m = found["metrics"]
    assert m["pa"] is not None              # every single run reports PA next to RI
    if "--no-replay" in argv:               # step 3: earlier clients bitwise fixed, units switched
        assert m["ri_per_batch"] == [0.0] * (len(found["batches"]) - 1)
        assert (out / "neurons.png").exists() and found["neurons"][0]["used"] > 0
    if found["config"]["method"] == "pfedhn":          # step 2: the hypernetwork alone forgets
        assert m["ri"] < 0, m["ri_per_batch"]
    if found["config"]["method"] == "pfeddsh" and "--no-replay" not in argv:    # steps 1 and 4: replay ran
        assert (out / "synthetic_batch1.png").exists() and len(found["replay"]) == len(found["batches"]) - 1
        assert all(r["client_queries"] == 0 for r in found["replay"])         # the paper's: no client asked


def test_pa_of_one_run_equals_pa_against_a_separate_local_run(tiny_data_dir, tmp_path):
    common = ["--dataset", "cifar10", "--batches", "3", "--data-dir", str(tiny_data_dir)] + TOY
    single = cli.main(common + ["--no-replay", "--out", str(tmp_path / "single")])
    runs = cli.main(common + ["--methods", "local,pfeddsh-no-replay", "--seeds", "0", "--out", str(tmp_path / "compare")])
    local, = runs["local"]
    assert single["accuracy"] == runs["pfeddsh-no-replay"][0]["accuracy"]
    assert single["metrics"]["pa_per_batch"] == compare.plasticity(single, local)
    assert len(single["metrics"]["pa_per_batch"]) == 2


def guide_python_blocks():
    return re.findall(r"```python\n(.*?)\n```", GUIDE.read_text(), flags=re.S)


def test_the_notebook_path_sets_the_threads_in_one_line_and_runs_at_toy_size(tiny_data_dir, monkeypatch):
    """The notebook block sets one thread before the core runs (issue 43: a bare core on a busy machine), and
    runs as shown, the core alone, its config shrunk to toy size on the way into train.run."""
    import torch
    import train
    block, = guide_python_blocks()
    lines = block.splitlines()
    setting = [i for i, line in enumerate(lines) if line.startswith("torch.set_num_threads(")]
    assert len(setting) == 1 and "#" in lines[setting[0]]           # one visible line, with its why
    assert setting[0] < next(i for i, line in enumerate(lines) if "train.run(" in line)
    seen, real_run = {}, train.run

    def toy_run(config, device, **kwargs):
        seen["threads"] = torch.get_num_threads()
        toy = dict(zip(TOY[::2], TOY[1::2]))
        shrunk = {k[2:].replace("-", "_"): (v if k == "--device" else int(v)) for k, v in toy.items()}
        return real_run(dict(config, **shrunk), device, **kwargs)

    monkeypatch.setattr(train, "run", toy_run)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)            # as a notebook starts on a 2-core machine: the block must set it
        namespace = {}
        exec(block.replace("../shared/data", str(tiny_data_dir)), namespace)
    finally:
        torch.set_num_threads(threads)
    assert seen["threads"] == 1
    results = namespace["results"]
    assert len(results["accuracy"]) == 2 and results["metrics"]["pa"] is not None

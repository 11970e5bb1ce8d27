"""shell/tables.py: every marked table of README.md and docs/results.md is what its committed runs give."""
import json
import shutil
from pathlib import Path

from shell import tables

REPO = Path(__file__).resolve().parents[1]


def with_a_headline():
    """The first document that holds a marked headline table, and that table with its marker."""
    name, text = next((name, text) for name in tables.DOCUMENTS
                      for text in [(REPO / name).read_text()] if "<!-- table headline docs/runs/" in text)
    block = "<!-- table headline " + text.split("<!-- table headline ", 1)[1].split("\n\n", 1)[0] + "\n\n"
    return name, block


def test_the_documents_tables_are_what_their_runs_give():
    for name in tables.DOCUMENTS:
        text = (REPO / name).read_text()
        assert tables.rebuild(text) == text, f"{name}: run python -m shell.tables"
    assert with_a_headline()


def test_a_run_that_changes_changes_its_table(tmp_path):
    _, text = with_a_headline()
    marked = text.split("<!-- table headline ", 1)[1].split(" -->", 1)[0]      # the first headline table's folder
    folder = tmp_path / marked
    shutil.copytree(REPO / marked, folder)
    assert tables.rebuild(text, root=tmp_path) == text
    path = sorted(folder.glob("local-s*/results.json"))[0]
    results = json.loads(path.read_text())
    results["metrics"]["mean_acc"] -= 0.05 * len(list(folder.glob("local-s*")))   # local's mean drops 5 points
    path.write_text(json.dumps(results))
    rebuilt = tables.rebuild(text, root=tmp_path)

    def local_mean(markdown):
        row = next(line for line in markdown.splitlines() if line.startswith("| local | "))
        return float(row.split(" | ")[1].split(" ±")[0])

    assert abs(local_mean(rebuilt) - (local_mean(text) - 5)) < 0.011


def fake_run(method, seed, mean_acc, batch_acc, minutes=1.0, steps=100):
    return {"config": {"seed": seed, "method": method},
            "metrics": {"mean_acc": mean_acc, "weighted_acc": mean_acc, "ri": 0.0, "batch_acc": batch_acc},
            "time_s": [30.0 * minutes, 30.0 * minutes], "local_steps": steps}


def test_per_batch_reads_each_batch_on_arrival_and_at_the_end():
    # batch 0 scores 0.5 after its own stage and 0.7 at the end; batch 1 arrives at 0.9 and ends there
    runs = {"pfeddsh": [fake_run("pfeddsh", s, 0.8, [[0.5, None], [0.7, 0.9]]) for s in (1, 2)],
            "fedavg": [fake_run("fedavg", s, 0.6, [[0.6, None], [0.4, 0.8]]) for s in (1, 2)]}
    lines = tables.per_batch(runs)
    assert lines[2] == "| pfeddsh | 50.0 / 70.0 | 90.0 / 90.0 |"
    assert lines[3] == "| fedavg | 60.0 / 40.0 | 80.0 / 80.0 |"


def test_compute_and_holm_read_time_steps_and_paired_differences():
    seeds = range(5)
    runs = {"pfeddsh": [fake_run("pfeddsh", s, 0.80 + 0.01 * s, [[0.5]], minutes=2.0, steps=300) for s in seeds],
            "ahead": [fake_run("ahead", s, 0.70 + 0.01 * s + 0.001 * (s % 2), [[0.5]], minutes=1.0, steps=150)
                      for s in seeds],
            "level": [fake_run("level", s, 0.80 + 0.01 * s + 0.02 * (-1) ** s, [[0.5]]) for s in seeds]}
    compute = tables.compute(runs)
    assert compute[2] == "| pfeddsh | 2.0 ± 0.0 | 1.00 | 300 |"   # pfeddsh first, the rest by accuracy
    assert compute[3:] == ["| level | 1.0 ± 0.0 | 0.50 | 100 |", "| ahead | 1.0 ± 0.0 | 0.50 | 150 |"]
    verdicts = {line.split(" | ")[0].strip("| "): line.split(" | ")[-1].strip(" |") for line in tables.holm(runs)[2:]}
    assert verdicts == {"ahead": "pfeddsh above", "level": "not shown"}


def test_ri_per_batch_lists_every_earlier_batch_per_seed_with_the_smallest_and_the_mean():
    def run(seed, ri):
        return {"config": {"seed": seed, "method": "pfeddsh"}, "metrics": {"ri_per_batch": ri}}
    runs = {"pfeddsh": [run(2, [0.0, 0.01, -0.02]), run(1, [0.03, 0.0, 0.0])]}
    lines = tables.ri_per_batch(runs)
    assert lines[0] == "| seed | batch 0 | batch 1 | batch 2 | smallest | mean |"
    assert lines[2] == "| 1 | +3.00 | 0 | 0 | 0 | +1.00 |"             # by seed; exactly nothing is 0
    assert lines[3] == "| 2 | 0 | +1.00 | \u22122.00 | \u22122.00 | \u22120.33 |"
    assert tables.ri_per_batch({"fedavg": runs["pfeddsh"]}) == []


def test_tuning_scores_each_value_on_validation_and_bolds_the_best(tmp_path):
    # two values of ditto's lambda on two seeds: 0.01 is better on validation (test accuracy says the opposite)
    for value, val, test in [(3.7037e-05, [0.50, 0.52], 0.9), (0.003, [0.60, 0.62], 0.9), (0.01, [0.70, 0.66], 0.1)]:
        for seed, v in zip((600, 601), val):
            run = tmp_path / "ditto" / f"ditto-lambda-{value:g}-s{seed}"
            run.mkdir(parents=True)
            (run / "results.json").write_text(json.dumps({"config": {"seed": seed, "ditto_lambda": value},
                                                          "val_metrics": {"mean_acc": v},
                                                          "metrics": {"mean_acc": test}}))
    assert tables.tuning(tmp_path)[2] == "| ditto | `--ditto-lambda` | 3.7037e-05: 51.00 · 0.003: 61.00 · **0.01: 68.00** | 600, 601 |"


def test_dream_map_pairs_the_dreams_with_each_control_by_seed(tmp_path):
    """Two seeds: the dreams' RI 0.02 and 0.04, noise's 0.01 and 0.01 -> dreams - noise +2.00 [...]; a
    setting with one seed prints its one difference; a seed only one arm has is left out."""
    records = []
    for seed, ri in [(1, {"dreams": 0.02, "noise": 0.01, "noise-kd": 0.02, "own": 0.0}),
                     (2, {"dreams": 0.04, "noise": 0.01, "noise-kd": 0.01, "own": 0.0})]:
        records += [dict(seed=seed, setting={}, arm=a, ri_val=v, teacher_reads=0.5) for a, v in ri.items()]
    records += [dict(seed=1, setting={"iterations": 500}, arm=a, ri_val=0.01, teacher_reads=1.0)
                for a in ("dreams", "noise", "noise-kd", "own")]
    records.append(dict(seed=3, setting={}, arm="dreams", ri_val=0.5, teacher_reads=0.5))
    (tmp_path / "map.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    lines = tables.dream_map(tmp_path)
    default, budget = lines[2].split(" | "), lines[3].split(" | ")
    assert default[1] == "1, 2" and default[2] == "50 %" and default[3] == "+3.00"
    assert default[7].startswith("+2.00 [") and budget[1] == "1" and budget[7] == "0"


def load_dream_map():
    import importlib.util
    spec = importlib.util.spec_from_file_location("dream_map", REPO / "benchmarks" / "dream_map.py")
    dream_map = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dream_map)
    return dream_map


def test_dream_map_pick_follows_issue_42s_declared_rule():
    """The rule: among settings of at most 500 iterations that ran every arm on every development seed, the
    largest mean of dreams minus the best control; the default when none is above 0."""
    dream_map = load_dream_map()

    def arms(seed, setting, dreams, noise, kd=0.0, own=0.0):
        return [dict(seed=seed, setting=setting, arm=a, ri_val=v)
                for a, v in [("dreams", dreams), ("noise", noise), ("noise-kd", kd), ("own", own)]]
    records = arms(1, {}, 0.02, 0.01) + arms(2, {}, 0.01, 0.03)                 # mean (+1 - 2) / 2 = -0.5 points
    records += arms(1, {"keep": "end"}, 0.03, 0.0, kd=0.01) + arms(2, {"keep": "end"}, 0.02, 0.01)   # +1.5
    records += arms(1, {"iterations": 2000}, 0.09, 0.0) + arms(2, {"iterations": 2000}, 0.09, 0.0)   # too dear
    records += arms(1, {"iterations": 500}, 0.09, 0.0)                                  # seed 2 never ran it
    chosen, margins = dream_map.pick(records, [1, 2])
    assert chosen == {"keep": "end"} and set(margins) == {"{}", '{"keep": "end"}'}
    assert abs(margins["{}"] + 0.5) < 1e-9 and abs(margins['{"keep": "end"}'] - 1.5) < 1e-9
    records = [r for r in records if r["setting"] != {"keep": "end"}]
    assert dream_map.pick(records, [1, 2])[0] == {}                                     # none above 0
    records += [dict(r, setting={"keep": "own"}, ri_val=r["ri_val"] + (r["arm"] == "dreams") * 0.05)
                for r in records if r["setting"] == {} and r["arm"] != "own"]          # no `own` arm: incomplete
    assert dream_map.pick(records, [1, 2])[0] == {}


def test_dream_map_plot_draws_the_committed_map(tmp_path):
    records = [json.loads(line) for line in (REPO / "docs/runs/map42/t1.jsonl").read_text().splitlines() if line]
    load_dream_map().plot(records, tmp_path / "map.png")
    assert (tmp_path / "map.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

"""shell/compare.py's statistics: the paired t test's p-value and Holm's step-down over the methods compared."""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from shell import compare  # noqa: E402


def differences_with_t(t, n=5):
    """n paired differences whose t statistic is exactly t."""
    x = np.arange(n, dtype=float)
    x -= x.mean()
    return x + t * x.std(ddof=1) / np.sqrt(n)


def test_the_p_value_is_students():
    # the 97.5 % quantiles of Student's t at 4 and 9 degrees of freedom, and a t of 0
    assert abs(compare.t_pvalue(differences_with_t(2.7764)) - 0.05) < 1e-4
    assert abs(compare.t_pvalue(differences_with_t(2.2622, n=10)) - 0.05) < 1e-4
    assert abs(compare.t_pvalue(differences_with_t(-4.6041)) - 0.01) < 1e-4      # two-sided: the sign is no matter
    assert compare.t_pvalue(differences_with_t(0.0)) > 0.999 and compare.t_pvalue([1.0]) is None


def test_holm_steps_down_and_stops_at_the_first_p_it_cannot_reject():
    assert compare.holm({"a": 0.01, "b": 0.04, "c": 0.03}) == {"a": True, "b": False, "c": False}
    assert compare.holm({"a": 0.01, "b": 0.02, "c": 0.03}) == {"a": True, "b": True, "c": True}
    assert compare.holm({"a": 0.02, "b": 0.02}) == {"a": True, "b": True}
    assert compare.holm({"a": 0.03, "b": 0.03}) == {"a": False, "b": False}     # 0.03 > 0.05 / 2


def test_versus_gives_each_method_its_p_and_holms_verdict():
    def run(method, seed, accuracy):
        return {"config": {"seed": seed, "method": method}, "metrics": {"mean_acc": accuracy}}
    ours = [0.80, 0.82, 0.78, 0.81, 0.79]
    runs = {"pfeddsh": [run("pfeddsh", s, a) for s, a in enumerate(ours)],
            "far": [run("far", s, a - 0.10 - 0.002 * s) for s, a in enumerate(ours)],      # clearly below
            "near": [run("near", s, a + (0.01 if s % 2 else -0.01)) for s, a in enumerate(ours)]}
    rows = {line.split(" | ")[0].strip("| "): line for line in compare.versus(runs) if line.startswith("| ")}
    assert rows["far"].endswith("| pfeddsh above |") and rows["near"].endswith("| not shown |")


def test_summarize_reads_pa_from_a_local_run_beside_it_else_from_the_runs_own_reference():
    def run(method, seed, accuracy, pa=None):
        return {"config": {"seed": seed, "method": method}, "batches": [[0], [1]], "accuracy": accuracy,
                "time_s": [1.0], "metrics": {"mean_acc": 0.5, "weighted_acc": 0.5, "ri": 0.0, "pa": pa}}
    ours = run("pfeddsh", 0, [[0.6, 0.0], [0.6, 0.7]], pa=0.05)           # its own local reference: +5 points
    local = run("local", 0, [[0.5, 0.0], [0.5, 0.6]])
    assert compare.summarize({"pfeddsh": [ours], "local": [local]})["pfeddsh"]["pa"] == [100 * (0.7 - 0.6)]
    assert compare.summarize({"pfeddsh": [ours]})["pfeddsh"]["pa"] == [5.0]
    assert compare.summarize({"pfeddsh": [run("pfeddsh", 0, [[0.6, 0.0], [0.6, 0.7]])]})["pfeddsh"]["pa"] == []

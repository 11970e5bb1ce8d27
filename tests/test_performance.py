"""benchmarks/performance.py: every line of the table runs (--quick, toy sizes; the numbers mean nothing). Parts
(d) and (g) compared paths that are no longer in the code (synthesis client by client, AMP in the core)."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_quick_run_prints_every_line_and_writes_json(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "performance.py"), "--quick", "--threads", "1",
                           "--json", str(tmp_path / "perf.json")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("machine: ") and "torch " in done.stdout.splitlines()[0]
    rows = json.loads((tmp_path / "perf.json").read_text())["rows"]
    assert {r["part"] for r in rows} == set("abcef")
    assert all(r["ratio"] > 0 for r in rows)
    assert sum(r["part"] == "f" for r in rows) == 8      # two widths x (estimate, parameters, time, memory)

"""shell/tables.py: every marked table of README.md and docs/results.md is what its committed runs give."""
import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from shell import tables  # noqa: E402


def test_the_documents_tables_are_what_their_runs_give():
    for name in tables.DOCUMENTS:
        text = (REPO / name).read_text()
        assert tables.rebuild(text) == text, f"{name}: run python -m shell.tables"
    assert "<!-- table headline docs/runs/" in (REPO / "README.md").read_text()


def test_a_run_that_changes_changes_its_table(tmp_path):
    folder = tmp_path / "docs" / "runs" / "i31_dc"
    shutil.copytree(REPO / "docs" / "runs" / "i31_dc", folder)
    text = (REPO / "README.md").read_text()
    assert tables.rebuild(text, root=tmp_path) == text
    path = folder / "local-s410" / "results.json"
    results = json.loads(path.read_text())
    results["metrics"]["mean_acc"] -= 0.05
    path.write_text(json.dumps(results))
    rebuilt = tables.rebuild(text, root=tmp_path)
    assert rebuilt != text and "| local | 73.10 ± " in rebuilt

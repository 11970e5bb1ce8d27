"""The comparison report from whatever runs of a comparison folder have finished (the rest is left out).

    python benchmarks/report_partial.py runs/c10_5batch "python train.py ... --out runs/c10_5batch"

train.py writes the same report when every (method, seed) is done; this is for a comparison that was
stopped before its end: rerunning train.py's command finishes it and rewrites the report.
"""
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from shell import compare  # noqa: E402

out, command = sys.argv[1], sys.argv[2]
runs = {}
for name in compare.VARIANTS:
    for seed in range(100):
        path = os.path.join(out, f"{name}-s{seed}", "results.json")
        if os.path.exists(path):
            with open(path) as f:
                runs.setdefault(name, []).append(json.load(f))
print(compare.write_report(out, runs, command))

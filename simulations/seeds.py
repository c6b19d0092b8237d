"""Run one ``fedaiot simulate`` command over several seeds and report the mean and spread.

Accuracy claims in the README are means over seeds (at least 3; 5 for breast-cancer). Each seed
is a real run through Flower's simulation engine, in a run folder of its own::

    python simulations/seeds.py --seeds 1 2 3 -- --task digits --epsilon 3 --lr 0.2
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

METRICS = ("accuracy", "auc", "sensitivity", "specificity")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--json", type=Path, help="write every run's summary here")
    parser.add_argument("simulate", nargs=argparse.REMAINDER, help="-- then simulate's options")
    args = parser.parse_args()
    options = [a for a in args.simulate if a != "--"]
    scratch = Path(tempfile.mkdtemp(prefix="fedaiot-seeds-"))
    runs = []
    try:
        for seed in args.seeds:
            command = [sys.executable, "-m", "fedaiot", "simulate", *options]
            command += ["--seed", str(seed), "--output", str(scratch / f"seed-{seed}"), "--json"]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"seed {seed} failed ({done.returncode}): {done.stderr[-2000:]}")
            summary = json.loads(done.stdout)
            runs.append(summary)
            shown = {k: round(summary["metrics"][k], 4) for k in METRICS if k in summary["metrics"]}
            spent = [n["epsilon"] for n in summary["nodes"] if n["epsilon"] is not None]
            eps = f"max epsilon {max(spent):.3f}" if spent else "non-private"
            print(f"seed {seed}: {shown}, {eps}, {summary['wall_seconds']:.0f} s")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    for key in METRICS:
        values = [r["metrics"][key] for r in runs if key in r["metrics"]]
        if values:
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            print(f"{key}: mean {statistics.mean(values):.4f} ± {spread:.4f} over {len(values)}")
    if args.json:
        args.json.write_text(json.dumps(runs, indent=2))


if __name__ == "__main__":
    main()

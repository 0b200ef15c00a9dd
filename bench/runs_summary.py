"""Mean and worst of several train.py runs' evaluations: the figure a fresh run reproduces is a range,
not one good run.

Reads each workdir's evaluation.json (or another stage's: --evaluation reward_evaluation.json) and
config.json, for what it trained, and writes every accuracy's mean, worst and per-run values, one
section per guidance scale (or before/after, student/teacher), together with each run's train.py
wall time when a `time -v` log sits beside it (<workdir>.log, or the --logs given).

    python bench/runs_summary.py /work/runs/mmdit_s0 /work/runs/mmdit_s1 /work/runs/mmdit_s2 \\
        --out bench/results/shapes_mmdit_runs.json
    python bench/runs_summary.py W0 W1 W2 --evaluation reward_evaluation.json --logs r0.log r1.log r2.log \\
        --out bench/results/reward_finetuning_runs.json
"""

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np
from report import write_report


def wall_seconds(log: Path) -> float | None:
    """train.py's wall time from GNU time's `-v` report, if the run was timed that way."""
    if not log.exists():
        return None
    found = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", log.read_text(errors="replace"))
    if not found:
        return None
    seconds = 0.0
    for part in found.group(1).split(":"):
        seconds = seconds * 60 + float(part)
    return seconds


def summarize(evaluations: list[dict]) -> dict:
    """Per section (guidance scale, detector baselines) and metric: mean, worst (min) and all values."""
    summary = {}
    for section, first in evaluations[0].items():
        if not isinstance(first, dict):
            continue
        summary[section] = {}
        for metric, value in first.items():
            if not isinstance(value, (int, float)):
                continue  # e.g. the reward's calibration table
            values = [float(evaluation[section][metric]) for evaluation in evaluations]
            summary[section][metric] = dict(mean=round(float(np.mean(values)), 4), worst=min(values), runs=values)
    return {section: metrics for section, metrics in summary.items() if metrics}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdirs", nargs="+", type=Path, help="train.py workdirs, each with evaluation.json")
    parser.add_argument("--evaluation", default="evaluation.json", help="the file of each workdir to summarise")
    parser.add_argument("--logs", nargs="*", type=Path, help="each run's `time -v` log (default <workdir>.log)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    logs = args.logs or [w.with_suffix(".log") for w in args.workdirs]
    if len(logs) != len(args.workdirs):
        sys.exit(f"--logs: {len(logs)} logs for {len(args.workdirs)} workdirs")

    missing = [str(w) for w in args.workdirs if not (w / args.evaluation).exists()]
    if missing:
        sys.exit(f"no {args.evaluation} in: {', '.join(missing)} (did train.py finish there?)")
    evaluations = [json.loads((w / args.evaluation).read_text()) for w in args.workdirs]
    configs = [json.loads((w / "config.json").read_text()) for w in args.workdirs]
    runs = [dict(workdir=str(w), seed=c["seed"], family=c.get("family"), diffusion_steps=c["diffusion_train"]["steps"],
                 wall_seconds=wall_seconds(log))
            for w, c, log in zip(args.workdirs, configs, logs)]
    for run in runs:
        print(json.dumps(run))
    summary = summarize(evaluations)
    for section, metrics in summary.items():
        print(section, {m: (v["mean"], v["worst"]) for m, v in metrics.items()})
    settings = {k: v for k, v in evaluations[0].items() if not isinstance(v, dict)}  # shared by the runs
    write_report(args.out, [summary], runs=runs, evaluation=args.evaluation, **settings)


if __name__ == "__main__":
    main()

"""The results table of hw3's runs: mean and spread of the score over seeds per (method, mode or
prompt, k), as markdown; ft.py and icl.py print it and write results.json, experiments.py builds
its tables from it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from common.runlog import RunLogger
from hw3_lm_fewshot.data import TaskData
from hw3_lm_fewshot.metrics import TASK_METRIC


def summarize(results: list[dict]) -> list[dict]:
    """Mean and sample standard deviation (ddof 1; 0 for one run) of the score over repeats, per
    (method, mode/prompt, k)."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["method"], r.get("mode") or r.get("prompt"), r["k"]), []).append(r)
    return [{"method": m, "variant": v, "k": k, "mean": float(np.mean([r["score"] for r in rs])),
             "std": float(np.std([r["score"] for r in rs], ddof=1)) if len(rs) > 1 else 0.0, "repeats": len(rs),
             "trainable_params": rs[0].get("trainable_params"), "seconds": float(np.mean([r["seconds"] for r in rs])),
             "support_acc": _mean_of(rs, "support_acc"), "steps": _mean_of(rs, "steps")}
            for (m, v, k), rs in groups.items()]


def _mean_of(runs: list[dict], key: str) -> float | None:
    """The mean of a fine-tuning field over runs (None for ICL, or at k = 0 where nothing was trained)."""
    values = [r[key] for r in runs if r.get(key) is not None and np.isfinite(r[key])]
    return float(np.mean(values)) if values else None


def print_table(rows: list[dict], metric: str, write: Callable[[str], object] = print) -> None:
    """A markdown table of :func:`summarize` rows."""
    write(f"| method | variant | k | {metric} (mean ± std) | repeats | trainable params | support acc | steps "
          "| s/run |")
    write("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in sorted(rows, key=lambda r: (r["method"], str(r["variant"]), r["k"])):
        params = f"{r['trainable_params']:,}" if r.get("trainable_params") is not None else "0"
        fitted = f"{r['support_acc']:.2f}" if r.get("support_acc") is not None else "-"
        steps = f"{r['steps']:.0f}" if r.get("steps") else "-"
        write(f"| {r['method']} | {r['variant']} | {r['k']} | {r['mean']:.3f} ± {r['std']:.3f} | {r['repeats']} "
              f"| {params} | {fitted} | {steps} | {r['seconds']:.1f} |")


def finish_runs(logger: RunLogger, results: list[dict], task: TaskData, run_dir: Path) -> list[dict]:
    """Write results.json (every run and the mean/std table), print the table and where it went."""
    table = summarize(results)
    logger.finish({"runs": results, "summary": table, "data_source": task.source})
    print_table(table, TASK_METRIC[task.name])
    print(f"results: {run_dir / 'results.json'}")
    return results

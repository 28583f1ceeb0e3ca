"""What ft.py and icl.py share: their common flags, the run folder, the checked model load, the
Ctrl-C message, and the results table (also used by experiments.py)."""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np

from common.cli import add_run_args, int_list, positive_int
from common.errors import CS330Error
from common.runlog import RunLogger, runs_root
from hw3_lm_fewshot.data import TASKS, TaskData
from hw3_lm_fewshot.metrics import TASK_METRIC
from hw3_lm_fewshot.models import MODEL_CHOICES, ModelSpec, load_causal_lm, load_classifier

T = TypeVar("T")

HOMEWORK = "hw3_lm_fewshot"
# measured on the AVX512_BF16 CPU (README, section 5): same scores, 1.5-2x slower training and 1.6x
# slower generation than fp32; on GPUs it is not measured yet (the course preset's bf16 part does)
FP32_BECAUSE = "bf16 autocast measured slower than fp32 for hw3's models on CPU (hw3 README)"
INTERRUPTED = "interrupted; nothing was saved (results.json is written at the end of a run)"


parse_k_list = int_list(0, "1,8,128")  # --k: support sizes


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """Flags ft.py and icl.py share. Neither keeps checkpoints (each run is short), so there is no ``--resume``."""
    parser.add_argument("--model", default=None,
                        help=f"short name ({', '.join(MODEL_CHOICES)}), hub id or model folder "
                             "(default: minilm for amazon, smollm2 otherwise)")
    parser.add_argument("--dataset", default="amazon", help=f"one of {', '.join(TASKS)} (default: amazon)")
    parser.add_argument("--repeats", type=positive_int, default=1,
                        help="reruns with seeds seed, seed+1, ...: mean and std over them (default: 1)")
    parser.add_argument("--n_eval", type=positive_int, default=50,
                        help="evaluation examples (amazon: split evenly over the 5 classes; course: 625/125); "
                             "the pool is all the rest of the data")
    parser.add_argument("--max_context", type=positive_int, default=None,
                        help="cap on prompt + generated tokens (default: the model's context length)")
    add_run_args(parser, resume=False)


def run_dir_for(args: argparse.Namespace, run_name: str) -> Path:
    """``--log_dir`` if given, else ``runs/hw3_lm_fewshot/<run name>``."""
    return Path(args.log_dir) if args.log_dir else runs_root() / HOMEWORK / run_name


def load_model(spec: ModelSpec, classifier: bool, num_labels: int = 5):
    """``(model, tokenizer)``: a classifier with a fresh head, or a causal LM. A folder transformers
    cannot read (no ``model_type``, broken or truncated weights) is a :class:`CS330Error`, not a traceback."""
    from safetensors import SafetensorError

    try:
        return load_classifier(spec, num_labels) if classifier else load_causal_lm(spec)
    except SafetensorError as err:  # a truncated or damaged .safetensors file
        raise CS330Error(f"the weights of model {spec.name!r} in {spec.path} are damaged ({err}): download or "
                         "save them again") from None
    except (ValueError, RuntimeError) as err:  # what from_pretrained raises for unreadable configs/weights
        raise CS330Error(f"could not load model {spec.name!r} from {spec.path}: {err}") from None


def exits_on_interrupt(main: Callable[..., T]) -> Callable[..., T]:
    """Ctrl-C: say that nothing was saved and exit 130. Goes inside :func:`common.errors.cli_main`,
    whose own message promises a checkpoint, which these scripts do not write."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except KeyboardInterrupt:
            print(INTERRUPTED, file=sys.stderr)
            raise SystemExit(130) from None

    return wrapper


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

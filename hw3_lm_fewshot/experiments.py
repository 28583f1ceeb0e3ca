"""hw3's questions as one grid of ``ft.py`` / ``icl.py`` runs: fine-tuning modes and LoRA against
in-context learning on the same tasks, with tables, a cost table and plots.

    python hw3_lm_fewshot/experiments.py --preset cpu --dry_run     # what would run, and what is done
    python hw3_lm_fewshot/experiments.py --preset cpu --threads 1   # offline models (minilm, smollm2)
    python hw3_lm_fewshot/experiments.py --preset course --device cuda   # the course's models (hub)

Parts (``--parts`` picks some; the grid is in CPU / COURSE / SMOKE below):
- ``amazon_ft``: the encoder fine-tuned on 5-way star ratings, modes all / last / first / middle /
  lora4 / lora16, k = 1, 8, 128 per class, until the support set is fitted (or a step limit).
- ``amazon_icl``: the causal LM on the same reviews in context, k = 0, 1, 4 per class (``course``:
  0, 1, what GPT-2's 1024 tokens hold), the label scored by likelihood (the most likely of " 1" ..
  " 5" after "Stars:").
- ``babi_icl`` (k = 0, 1, 4, 16) against ``babi_ft`` (last, lora4, lora16, all at k = 1, 8, 64).
- ``babi_order``: ICL at k = 16 with 5 orderings of each seed's support set.
- ``xsum_icl`` (prompts none / tldr / custom, k = 0, 1, 4) against ``xsum_ft`` (lora16, last).
- ``bf16``: bAbI ICL at k = 4 again under bf16 autocast (``course``: a fine-tuning setting too).
- ``amazon_calib``, ``babi_calib``: the ICL settings of ``amazon_icl`` / ``babi_icl`` scored by label
  likelihood with contextual calibration (``icl.py --calibrate``; each run also keeps the
  uncalibrated label-scored result, so the table pairs the two on the same support sets).
ICL runs use ``--support fixed``: one support set per seed, shared by every query and read once,
as fine-tuning trains on one support set per seed (so a seed's spread means the same thing for
both). Each cell is the mean ± std over 3 seeds (k = 0 ICL: one run, greedy answers do not depend
on the seed); each seed draws the support set, the head and the batch order; the evaluation set is
the same for every run of a task. Presets: ``cpu`` (minilm + smollm2, 250 / 200 / 100 evaluation
examples for amazon / babi / xsum), ``course`` (bert-med + GPT-2 XL from the hub, longer training,
bAbI k = 128), ``smoke`` (``--quick``: a few runs of each part on small evaluation sets).
Each configuration is one script call in ``runs/hw3_lm_fewshot/experiments/<preset>/<name>``;
finished ones are skipped, so a killed grid continues where it stopped (a run that was cut short
starts again: these scripts keep no checkpoints). Two processes with disjoint ``--only`` patterns
run side by side. Writes ``results.json``, ``results.md`` (tables, cost) and ``score_vs_k.png``,
``score_vs_params.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from common.cli import positive_int  # noqa: E402
from common.errors import CS330Error, cli_main  # noqa: E402
from common.grid import Config, grid_parser, lookup, run_experiments  # noqa: E402
from common.runlog import write_json  # noqa: E402
from hw3_lm_fewshot.metrics import TASK_METRIC  # noqa: E402
from hw3_lm_fewshot.results import print_table, summarize  # noqa: E402

HOMEWORK = "hw3_lm_fewshot"
PARTS = ("amazon_ft", "amazon_icl", "babi_icl", "babi_order", "babi_ft", "xsum_icl", "xsum_ft", "bf16",
         "amazon_calib", "babi_calib")
ENCODER_MODES = ["all", "last", "first", "middle", "lora4", "lora16"]
# part -> what it runs; "steps" = (--max_steps, --early_stop_acc): the run stops once the support
# set is fitted (classification accuracy / answer-token accuracy on up to 32 support examples)
CPU = {
    "amazon_ft": {"k": [1, 8, 128], "modes": ENCODER_MODES, "steps": (240, 1.0)},
    "amazon_icl": {"k": [0, 1, 4], "prompts": ["qa"]},
    "babi_icl": {"k": [0, 1, 4, 16], "prompts": ["qa"]},
    "babi_order": {"k": 16, "orderings": 5},
    "babi_ft": {"k": [1, 8, 64], "modes": ["last", "lora4", "lora16", "all"], "steps": (20, 1.0)},
    "xsum_icl": {"k": [0, 1, 4], "prompts": ["none", "tldr", "custom"]},
    "xsum_ft": {"k": [1, 8, 64], "modes": ["lora16", "last"], "steps": (8, 1.0)},
    # bAbI ICL at k = 4 again under bf16 autocast, against its fp32 run above; fine-tuning in bf16 is
    # not rerun on CPU (the README's section 5 says why), the course preset does
    "bf16": {"icl": ("babi", "qa", 4)},
    "amazon_calib": {"k": [0, 1, 4], "prompts": ["qa"]},
    "babi_calib": {"k": [0, 1, 4, 16], "prompts": ["qa"]},
}
# GPT-2's context is 1024 tokens: amazon prompts with 2 or 4 reviews per class (10 / 20 reviews, about
# 1,000 / 2,100 tokens of support, measured with SmolLM2's BPE tokenizer) do not fit, 1 per class does
COURSE = {**CPU, "bf16": {"icl": ("babi", "qa", 4), "ft": ("babi", "lora16", 8)},
          "babi_ft": {**CPU["babi_ft"], "k": [1, 8, 64, 128], "steps": (100, 1.0)},
          "amazon_ft": {**CPU["amazon_ft"], "steps": (600, 1.0)},
          "xsum_ft": {**CPU["xsum_ft"], "steps": (100, 1.0)},
          "amazon_icl": {**CPU["amazon_icl"], "k": [0, 1]}, "amazon_calib": {**CPU["amazon_calib"], "k": [0, 1]}}
SMOKE = {
    "amazon_ft": {"k": [1, 8], "modes": ["all", "lora4"], "steps": (20, 1.0)},
    "amazon_icl": {"k": [0, 1], "prompts": ["qa"]},
    "babi_icl": {"k": [0, 1, 4], "prompts": ["qa"]},
    "babi_order": {"k": 4, "orderings": 2},
    "babi_ft": {"k": [8], "modes": ["last", "lora4"], "steps": (10, 1.0)},
    "xsum_icl": {"k": [0, 1], "prompts": ["tldr", "custom"]},
    "xsum_ft": {"k": [1], "modes": ["lora16"], "steps": (5, 1.0)},
    "bf16": {"icl": ("babi", "qa", 1), "ft": ("babi", "lora4", 8)},
    "amazon_calib": {"k": [0, 1], "prompts": ["qa"]},
    "babi_calib": {"k": [0, 4], "prompts": ["qa"]},
}
PRESETS = {  # grid, models, evaluation examples per task, repeats (seeds 0, 1, ...)
    "smoke": {"grid": SMOKE, "encoder": "minilm", "lm": "smollm2", "n_eval": {"amazon": 50, "babi": 20, "xsum": 10},
              "repeats": 1},
    # evaluation sizes: the binomial standard error of one accuracy / exact match is <= 0.032 at 250
    # reviews and <= 0.035 at 200 questions (<= 0.03 once the score is below 0.3 or above 0.7)
    "cpu": {"grid": CPU, "encoder": "minilm", "lm": "smollm2", "n_eval": {"amazon": 250, "babi": 200, "xsum": 100},
            "repeats": 3},
    "course": {"grid": COURSE, "encoder": "bert-med", "lm": "full",
               "n_eval": {"amazon": 250, "babi": 250, "xsum": 125}, "repeats": 3},
}
FT, ICL = "hw3_lm_fewshot.ft", "hw3_lm_fewshot.icl"


def ft_config(sizes: dict, part: str, task: str, mode: str, k: int, steps: tuple[int, float],
              precision: str | None = None) -> Config:
    model = sizes["encoder"] if task == "amazon" else sizes["lm"]
    argv = ["--model", model, "--dataset", task, "--mode", mode, "--k", str(k), "--n_eval", str(sizes["n_eval"][task]),
            "--repeats", str(sizes["repeats"]), "--max_steps", str(steps[0]), "--early_stop_acc", str(steps[1])]
    argv += ["--precision", precision] if precision else []
    name = f"{part}_{model}_{mode}_k{k}" + (f"_{precision}" if precision else "")
    return Config(name, FT, argv, tags={"task": task, "part": part})


def icl_config(sizes: dict, part: str, task: str, prompt: str, k: int, orderings: int = 1,
               precision: str | None = None, calibrate: bool = False) -> Config:
    repeats = 1 if k == 0 else sizes["repeats"]  # no support: greedy answers do not depend on the seed
    argv = ["--model", sizes["lm"], "--dataset", task, "--prompt", prompt, "--k", str(k), "--support", "fixed",
            "--n_eval", str(sizes["n_eval"][task]), "--repeats", str(repeats), "--orderings", str(orderings)]
    argv += ["--precision", precision] if precision else []
    argv += ["--calibrate"] if calibrate else []
    name = f"{part}_{sizes['lm']}_{prompt}_k{k}" + (f"_{precision}" if precision else "")
    return Config(name, ICL, argv, tags={"task": task, "part": part})


def part_configs(part: str, sizes: dict) -> list[Config]:
    grid = sizes["grid"][part]
    task = part.split("_")[0]
    if part.endswith("_ft"):
        return [ft_config(sizes, part, task, mode, k, grid["steps"]) for mode in grid["modes"] for k in grid["k"]]
    if part.endswith(("_icl", "_calib")):
        return [icl_config(sizes, part, task, prompt, k, calibrate=part.endswith("_calib"))
                for prompt in grid["prompts"] for k in grid["k"]]
    if part == "babi_order":
        return [icl_config(sizes, part, "babi", "qa", grid["k"], orderings=grid["orderings"])]
    (icl_task, prompt, icl_k) = grid["icl"]
    configs = [icl_config(sizes, part, icl_task, prompt, icl_k, precision="bf16")]
    if "ft" in grid:
        ft_task, mode, ft_k = grid["ft"]
        configs.append(ft_config(sizes, part, ft_task, mode, ft_k, sizes["grid"][f"{ft_task}_ft"]["steps"], "bf16"))
    return configs


def part_results(frame: pd.DataFrame, part: str, configs: list[Config]) -> list[dict]:
    """Every (k, seed) result of the part's finished runs, with its task and part."""
    results = []
    for config in configs:
        for result in lookup(frame, config.name, "runs", []):
            results.append({**result, "part": part, "task": config.tags["task"]})
    return results


def method_label(row: dict) -> str:
    """"ft lora16", "icl tldr": a summary row's or a run's method and its mode / prompt."""
    return f"{row['method']} {row.get('variant') or row.get('mode') or row.get('prompt')}"


def per_task_figure(by_task: dict[str, list[dict]], draw, xlabel: str, linthresh: float, out: Path) -> None:
    """One panel per task (``draw(ax, task, results)`` plots it) with a symlog x axis; saved to ``out``."""
    fig, axes = plt.subplots(1, len(by_task), figsize=(5.2 * len(by_task), 4.2), squeeze=False)
    for ax, (task, results) in zip(axes[0], by_task.items()):
        draw(ax, task, results)
        ax.set_xscale("symlog", linthresh=linthresh)
        ax.set_xlim(left=-0.3 * linthresh)  # x >= 0; a chance line would otherwise stretch the axis
        ax.set_xlabel(xlabel)
        ax.set_ylabel(TASK_METRIC[task])
        ax.set_title(task)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def plot_score_vs_k(by_task: dict[str, list[dict]], out: Path) -> None:
    """Per task: score against k, one line per ICL prompt / fine-tuning mode, error bars = std over seeds."""
    def draw(ax, task: str, results: list[dict]) -> None:
        rows = summarize(results)
        for method, variant in sorted({(r["method"], r["variant"]) for r in rows}):
            line = sorted((r for r in rows if (r["method"], r["variant"]) == (method, variant)), key=lambda r: r["k"])
            ax.errorbar([r["k"] for r in line], [r["mean"] for r in line], yerr=[r["std"] for r in line], marker="o",
                        capsize=3, linestyle="--" if method == "icl" else "-", label=f"{method} {variant}")
        if task == "amazon":
            ax.axhline(1 / 5, color="grey", linewidth=0.8, linestyle=":", label="chance")

    per_task_figure(by_task, draw, "k (support examples; amazon: per class)", 1, out / "score_vs_k.png")


def largest_k_rows(results: list[dict]) -> list[dict]:
    """Each method's summary row at the largest k it ran."""
    rows = summarize(results)
    best: dict[str, dict] = {}
    for r in rows:
        if method_label(r) not in best or r["k"] > best[method_label(r)]["k"]:
            best[method_label(r)] = r
    return sorted(best.values(), key=lambda r: r["trainable_params"] or 0)


def plot_score_vs_params(by_task: dict[str, list[dict]], out: Path) -> None:
    """Per task: each method at its largest k, score against trainable parameters (ICL trains none)."""
    def draw(ax, task: str, results: list[dict]) -> None:
        for r in largest_k_rows(results):
            ax.errorbar([r["trainable_params"] or 0], [r["mean"]], yerr=[r["std"]], marker="o", capsize=3,
                        linestyle="none", label=f"{method_label(r)} (k={r['k']})")

    per_task_figure(by_task, draw, "trainable parameters (0 = in-context learning)", 1e4,
                    out / "score_vs_params.png")


def cost_table(by_task: dict[str, list[dict]], write) -> None:
    """Per task and method: trainable parameters, seconds per run, tokens/s, peak memory."""
    write("| task | method | trainable params | s/run (mean over k, seeds) | s/run at largest k | tokens/s "
          "| peak RSS MB |")
    write("|---|---|---:|---:|---:|---:|---:|")
    for task, results in by_task.items():
        for label in sorted({method_label(r) for r in results}):
            runs = [r for r in results if method_label(r) == label]
            top = max(r["k"] for r in runs)
            speed = [r.get("train_tokens_per_s") if r["method"] == "ft" else r.get("tokens_per_s") for r in runs]
            speed = [v for v in speed if v]  # fine-tuning at k = 0 trains nothing
            memory = [r["peak_memory_mb"] for r in runs if r.get("peak_memory_mb")]
            speed_text = f"{np.mean(speed):.0f}" if speed else "-"
            memory_text = f"{max(memory):.0f}" if memory else "-"
            write(f"| {task} | {label} | {runs[0].get('trainable_params') or 0:,} "
                  f"| {np.mean([r['seconds'] for r in runs]):.0f} "
                  f"| {np.mean([r['seconds'] for r in runs if r['k'] == top]):.0f} (k={top}) "
                  f"| {speed_text} | {memory_text} |")


def order_table(results: list[dict], write) -> None:
    """Prompt-order sensitivity: per support set (seed), the spread of the score over its orderings
    (sample std, as in the other tables)."""
    write("| support set (seed) | orderings | mean ± std over orderings | min | max |")
    write("|---:|---:|---:|---:|---:|")
    for seed in sorted({r["seed"] for r in results}):
        scores = [r["score"] for r in results if r["seed"] == seed]
        write(f"| {seed} | {len(scores)} | {np.mean(scores):.3f} ± {np.std(scores, ddof=1):.3f} | {min(scores):.3f} "
              f"| {max(scores):.3f} |")


def bf16_table(bf16: list[dict], fp32: list[dict], write) -> None:
    """Each bf16 setting against the same setting's fp32 runs (same task, seeds and evaluation set)."""
    write("| setting | fp32 score | bf16 score | fp32 s/run | bf16 s/run |")
    write("|---|---:|---:|---:|---:|")
    for label, k in sorted({(method_label(r), r["k"]) for r in bf16}):
        pair = [summarize([r for r in runs if method_label(r) == label and r["k"] == k]) for runs in (fp32, bf16)]
        if all(pair):
            (a,), (b,) = pair
            write(f"| {label} k={k} | {a['mean']:.3f} ± {a['std']:.3f} | {b['mean']:.3f} ± {b['std']:.3f} "
                  f"| {a['seconds']:.0f} | {b['seconds']:.0f} |")


def calibration_table(results: list[dict], metric: str, write) -> None:
    """Per k: the label-scored result without and with contextual calibration (the same runs, so the
    same support sets), and their paired difference (mean ± sample std over seeds)."""
    write(f"| k | seeds | label-scored {metric} | calibrated | calibrated - uncalibrated | s/run |")
    write("|---:|---:|---:|---:|---:|---:|")
    for k in sorted({r["k"] for r in results}):
        runs = [r for r in results if r["k"] == k]
        plain, calibrated = (np.array([r[key] for r in runs]) for key in ("uncalibrated_score", "score"))
        spread = [np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in (plain, calibrated, calibrated - plain)]
        write(f"| {k} | {len(runs)} | {plain.mean():.3f} ± {spread[0]:.3f} | {calibrated.mean():.3f} ± {spread[1]:.3f} "
              f"| {(calibrated - plain).mean():+.3f} ± {spread[2]:.3f} | {np.mean([r['seconds'] for r in runs]):.0f} |")


def report_for(parts: list[str], sizes: dict):
    def report(frame: pd.DataFrame, out: Path) -> str:
        lines, everything = [], {}
        for part in parts:
            results = everything[part] = part_results(frame, part, part_configs(part, sizes))
            lines.append(f"### {part} ({sum(r['seconds'] for r in results):.0f} s of runs)\n")
            if not results:
                lines.append("not finished\n")
            elif part == "babi_order":
                order_table(results, lines.append)
            elif part == "bf16":  # its settings are bAbI runs of babi_icl / babi_ft in fp32
                bf16_table(results, everything.get("babi_icl", []) + everything.get("babi_ft", []), lines.append)
            elif part.endswith("_calib"):
                calibration_table(results, TASK_METRIC[results[0]["task"]], lines.append)
            else:
                print_table(summarize(results), TASK_METRIC[results[0]["task"]], lines.append)
            lines.append("")
        by_task = {task: [r for part, rs in everything.items() if part.startswith(task) and part != "babi_order"
                          for r in rs] for task in ("amazon", "babi", "xsum")}
        by_task = {task: rs for task, rs in by_task.items() if rs}
        if by_task:
            lines.append("### cost\n")
            cost_table(by_task, lines.append)
            plot_score_vs_k(by_task, out)
            plot_score_vs_params(by_task, out)
        write_json(out / "results.json", {"sizes": {k: v for k, v in sizes.items() if k != "grid"},
                                          "grid": {p: sizes["grid"][p] for p in parts}, "results": everything})
        return "\n".join(lines)

    return report


def model_mapping(text: str) -> tuple[str, str]:
    """``NAME=PATH`` -> ``(NAME, PATH)``."""
    name, sep, path = text.partition("=")
    if not (sep and name and path):
        raise argparse.ArgumentTypeError(f"expected NAME=PATH (e.g. full=/models/tiny-gpt2), got {text!r}")
    return name, path


def resized(sizes: dict, args: argparse.Namespace) -> dict:
    """The preset with ``--n_eval`` / ``--repeats`` / ``--max_steps`` applied (those given)."""
    sizes = dict(sizes)
    if args.n_eval:
        sizes["n_eval"] = dict.fromkeys(sizes["n_eval"], args.n_eval)
    if args.repeats:
        sizes["repeats"] = args.repeats
    if args.max_steps:
        sizes["grid"] = {part: {**grid, "steps": (min(grid["steps"][0], args.max_steps), grid["steps"][1])}
                         if "steps" in grid else grid for part, grid in sizes["grid"].items()}
    return sizes


def with_models(config: Config, model_map: dict[str, str]) -> Config:
    """``config`` with its ``--model`` replaced as ``--model_map`` says (its name stays)."""
    argv = list(config.argv)
    where = argv.index("--model") + 1
    argv[where] = model_map.get(argv[where], argv[where])
    return dataclasses.replace(config, argv=argv)


@cli_main
def main(argv: list[str] | None = None) -> None:
    parser = grid_parser(__doc__, presets=tuple(PRESETS))
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, from {', '.join(PARTS)}")
    parser.add_argument("--encoder", default=None, help="classifier for amazon (default: the preset's)")
    parser.add_argument("--lm", default=None, help="causal LM (default: the preset's)")
    stand_in = parser.add_argument_group("stand-ins: a preset's whole pipeline on other models and small sizes")
    stand_in.add_argument("--model_map", nargs="+", default=[], type=model_mapping, metavar="NAME=PATH",
                          help="run the configurations of model NAME on PATH (a folder or hub id), names kept: "
                               "e.g. --preset course --model_map bert-med=tiny/bert full=tiny/gpt2")
    stand_in.add_argument("--n_eval", type=positive_int, default=None, help="evaluation examples of every task")
    stand_in.add_argument("--repeats", type=positive_int, default=None, help="seeds per configuration")
    stand_in.add_argument("--max_steps", type=positive_int, default=None, help="cap on every part's fine-tuning steps")
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if unknown := [p for p in parts if p not in PARTS]:
        raise CS330Error(f"unknown part(s) {unknown}; choose from: {', '.join(PARTS)}")
    sizes = resized({**PRESETS[args.preset], **{k: getattr(args, k) for k in ("encoder", "lm") if getattr(args, k)}},
                    args)
    if unknown := sorted({name for name, _ in args.model_map} - {sizes["encoder"], sizes["lm"]}):
        raise CS330Error(f"--model_map names {', '.join(unknown)}, which this grid does not run; its models are "
                         f"{sizes['encoder']} (amazon fine-tuning) and {sizes['lm']} (the rest)")
    configs = [with_models(config, dict(args.model_map)) for part in parts for config in part_configs(part, sizes)]
    # ft.py and icl.py keep no checkpoints and have no --resume: a killed run starts again.
    run_experiments(args, HOMEWORK, configs, report_for(parts, sizes), resume=False)


if __name__ == "__main__":
    main()

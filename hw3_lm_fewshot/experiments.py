"""The course's hw3 questions, as a grid of ``ft.py`` / ``icl.py`` runs, with tables and plots.

    python hw3_lm_fewshot/experiments.py --preset cpu --dry_run     # what would run, and what is done
    python hw3_lm_fewshot/experiments.py --preset cpu               # offline models, about 3 h on 2 CPU cores
    python hw3_lm_fewshot/experiments.py --preset course --device cuda   # the course's models (hub)

Parts (``--parts`` picks some):
- ``amazon_ft``: fine-tune the encoder on amazon, k = 1, 8, 128 per class (mode all).
- ``babi_icl``: in-context learning on bAbI, k = 0, 1, 16, prompt qa.
- ``xsum_icl``: in-context learning on XSum, k = 0, 1, 4, prompts none / tldr / custom.
- ``ft_modes``: fine-tuning modes first/last/middle/lora4/lora16 on xsum and babi, k = 0, 1, 8, 128
  (k = 0 is the pre-trained model, the same for every mode, so it is run once).
- ``lora_vs_icl``: LoRA-16 against ICL (tldr) on XSum at k = 0, 1, 4, with error bars over the repeats
  (its ICL runs are xsum_icl's tldr runs when the two parts share k and sizes).
Presets (PRESETS below): ``course`` = the grid above with the course's models (bert-med, GPT-2 XL from
the hub), 125 evaluation examples (amazon: 250, all the local 999-review file allows at k = 128),
3 repeats, 100 steps; ``cpu`` = the offline models (minilm, smollm2), 30 evaluation examples, 2
repeats, 50 fine-tuning steps (amazon 100), ft_modes without k = 128: about 3 h from the README's
per-run times; ``smoke`` (``--quick``) = the small grid of QUICK, 10 examples, 1 repeat, 20 steps.
Each run is one ``ft.py`` / ``icl.py`` call in ``runs/hw3_lm_fewshot/experiments/<preset>/<name>``
(see common/grid.py: finished runs are reused; a killed one is rerun, as these scripts keep no
checkpoints). Writes ``results.json``, ``results.md`` (tables) and one PNG plot per part.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import pandas as pd

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from common.errors import CS330Error, cli_main  # noqa: E402
from common.grid import Config, grid_parser, lookup, run_experiments  # noqa: E402
from common.runlog import write_json  # noqa: E402
from hw3_lm_fewshot.cli import print_table, summarize  # noqa: E402
from hw3_lm_fewshot.metrics import TASK_METRIC  # noqa: E402

HOMEWORK = "hw3_lm_fewshot"
PARTS = ("amazon_ft", "babi_icl", "xsum_icl", "ft_modes", "lora_vs_icl")
FULL = {
    "amazon_ft": {"k": [1, 8, 128]},
    "babi_icl": {"k": [0, 1, 16], "prompts": ["qa"]},
    "xsum_icl": {"k": [0, 1, 4], "prompts": ["none", "tldr", "custom"]},
    "ft_modes": {"k": [0, 1, 8, 128], "modes": ["first", "last", "middle", "lora4", "lora16"],
                 "tasks": ["xsum", "babi"]},
    "lora_vs_icl": {"k": [0, 1, 4]},
}
CPU = {**FULL, "amazon_ft": {"k": [1, 8, 128], "max_steps": 100},
       "ft_modes": {**FULL["ft_modes"], "k": [0, 1, 8]}}
QUICK = {
    "amazon_ft": {"k": [1, 8, 128]},
    "babi_icl": {"k": [0, 1, 16], "prompts": ["qa"]},
    "xsum_icl": {"k": [0, 1], "prompts": ["none", "tldr", "custom"]},
    "ft_modes": {"k": [0, 8], "modes": ["last", "lora4"], "tasks": ["babi"]},
    "lora_vs_icl": {"k": [0, 1]},
}
PRESETS = {  # grid, models, evaluation sizes, repeats (seeds 0, 1, ...), fine-tuning step limit
    "smoke": {"grid": QUICK, "encoder": "minilm", "lm": "smollm2", "n_eval": 10, "n_eval_amazon": 50, "repeats": 1,
              "max_steps": 20},
    "cpu": {"grid": CPU, "encoder": "minilm", "lm": "smollm2", "n_eval": 30, "n_eval_amazon": 50, "repeats": 2,
            "max_steps": 50},
    "course": {"grid": FULL, "encoder": "bert-med", "lm": "full", "n_eval": 125, "n_eval_amazon": 250, "repeats": 3,
               "max_steps": 100},
}
FT, ICL = "hw3_lm_fewshot.ft", "hw3_lm_fewshot.icl"


def ks(values: list[int]) -> str:
    return ",".join(map(str, values))


def ft_config(sizes: dict, task: str, mode: str, k: list[int], prompt: str | None = None,
              max_steps: int | None = None, pretrained: bool = False) -> Config:
    model = sizes["encoder"] if task == "amazon" else sizes["lm"]
    n_eval = sizes["n_eval_amazon"] if task == "amazon" else sizes["n_eval"]
    repeats = 1 if pretrained else sizes["repeats"]  # the pre-trained model's greedy answers ignore the seed
    argv = ["--model", model, "--dataset", task, "--mode", mode, "--k", ks(k), "--n_eval", str(n_eval),
            "--repeats", str(repeats), "--max_steps", str(max_steps or sizes["max_steps"])]
    argv += ["--prompt", prompt] if prompt else []
    name = f"ft_{model}_{task}_{mode}" + (f"_{prompt}" if prompt else "") + f"_k{'-'.join(map(str, k))}"
    return Config(name, FT, argv, tags={"task": task, "pretrained": pretrained})


def icl_config(sizes: dict, task: str, prompt: str, k: list[int]) -> Config:
    argv = ["--model", sizes["lm"], "--dataset", task, "--prompt", prompt, "--k", ks(k),
            "--n_eval", str(sizes["n_eval"]), "--repeats", str(sizes["repeats"])]
    return Config(f"icl_{sizes['lm']}_{task}_{prompt}_k{'-'.join(map(str, k))}", ICL, argv, tags={"task": task})


def part_configs(part: str, sizes: dict) -> list[Config]:
    grid = sizes["grid"][part]
    if part == "amazon_ft":
        return [ft_config(sizes, "amazon", "all", grid["k"], max_steps=grid.get("max_steps"))]
    if part in ("babi_icl", "xsum_icl"):
        return [icl_config(sizes, part.split("_")[0], prompt, grid["k"]) for prompt in grid["prompts"]]
    if part == "ft_modes":
        configs = []
        for task in grid["tasks"]:
            if 0 in grid["k"]:  # nothing is trained at k = 0: the pre-trained model, once
                configs.append(ft_config(sizes, task, grid["modes"][0], [0], pretrained=True))
            trained = [k for k in grid["k"] if k > 0]
            configs += [ft_config(sizes, task, mode, trained) for mode in grid["modes"]] if trained else []
        return configs
    return [icl_config(sizes, "xsum", "tldr", grid["k"]), ft_config(sizes, "xsum", "lora16", grid["k"], "tldr")]


def part_results(frame: pd.DataFrame, part: str, configs: list[Config]) -> list[dict]:
    """Every (k, seed) result of the part's finished runs, with its task and part."""
    results = []
    for config in configs:
        for result in lookup(frame, config.name, "runs", []):
            result = {**result, "part": part, "task": config.tags["task"]}
            if config.tags.get("pretrained"):
                result.update(mode="pre-trained", trainable_params=0)
            results.append(result)
    return results


def plot_part(part: str, results: list[dict], out: Path) -> None:
    """Score against k, one line per method/variant (and task), error bars = std over repeats."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for task in sorted({r["task"] for r in results}):
        rows = summarize([r for r in results if r["task"] == task])
        for method, variant in sorted({(r["method"], r["variant"]) for r in rows}):
            line = sorted((r for r in rows if (r["method"], r["variant"]) == (method, variant)), key=lambda r: r["k"])
            label = f"{task} {method} {variant}" if part == "ft_modes" else f"{method} {variant}"
            ax.errorbar([r["k"] for r in line], [r["mean"] for r in line], yerr=[r["std"] for r in line], marker="o",
                        capsize=3, label=label)
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlabel("k (support examples; amazon: per class)")
    ax.set_ylabel(" / ".join(sorted({TASK_METRIC[r["task"]] for r in results})))
    ax.set_title(part)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"{part}.png", dpi=120)
    plt.close(fig)


def report_for(parts: list[str], sizes: dict):
    def report(frame: pd.DataFrame, out: Path) -> str:
        lines, everything = [], {}
        for part in parts:
            results = everything[part] = part_results(frame, part, part_configs(part, sizes))
            lines.append(f"### {part} ({sum(r['seconds'] for r in results):.0f} s of runs)\n")
            if not results:
                lines.append("not finished\n")
                continue
            for task in sorted({r["task"] for r in results}):
                lines.append(f"{task}:\n")
                print_table(summarize([r for r in results if r["task"] == task]), TASK_METRIC[task], lines.append)
                lines.append("")
            plot_part(part, results, out)
        write_json(out / "results.json", {"sizes": {k: v for k, v in sizes.items() if k != "grid"},
                                          "grid": {p: sizes["grid"][p] for p in parts}, "results": everything})
        return "\n".join(lines)

    return report


@cli_main
def main(argv: list[str] | None = None) -> None:
    parser = grid_parser(__doc__, presets=tuple(PRESETS))
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, from {', '.join(PARTS)}")
    parser.add_argument("--encoder", default=None, help="classifier for amazon (default: the preset's)")
    parser.add_argument("--lm", default=None, help="causal LM (default: the preset's)")
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if unknown := [p for p in parts if p not in PARTS]:
        raise CS330Error(f"unknown part(s) {unknown}; choose from: {', '.join(PARTS)}")
    sizes = {**PRESETS[args.preset], **{k: getattr(args, k) for k in ("encoder", "lm") if getattr(args, k)}}
    configs = [config for part in parts for config in part_configs(part, sizes)]
    # ft.py and icl.py keep no checkpoints and have no --resume: a killed run starts again.
    run_experiments(args, HOMEWORK, configs, report_for(parts, sizes), resume=False)


if __name__ == "__main__":
    main()

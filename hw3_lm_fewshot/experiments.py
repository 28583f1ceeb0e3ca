"""The course's hw3 questions with the offline models (or hub models when asked).

    python hw3_lm_fewshot/experiments.py --quick          # a short look (minutes on one CPU core)
    python hw3_lm_fewshot/experiments.py                  # the full grid below (hours on a CPU)
    python hw3_lm_fewshot/experiments.py --encoder bert-med --lm full   # the course's models, online

Parts (``--parts`` picks some):
- ``amazon_ft``: fine-tune the encoder on amazon, k = 1, 8, 128 per class (mode all).
- ``babi_icl``: in-context learning on bAbI, k = 0, 1, 16, prompt qa.
- ``xsum_icl``: in-context learning on XSum, k = 0, 1, 4, prompts none / tldr / custom.
- ``ft_modes``: fine-tuning modes first/last/middle/lora4/lora16 on xsum and babi, k = 0, 1, 8, 128
  (k = 0 is the pre-trained model, the same for every mode, so it is run once).
- ``lora_vs_icl``: LoRA-16 against ICL (tldr) on XSum at k = 0, 1, 4, with error bars over ``--repeats``.
Writes ``results.json``, ``results.md`` (tables) and one PNG plot per part into ``--out``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from common.cli import positive_int  # noqa: E402
from common.device import DEVICE_CHOICES, resolve_device  # noqa: E402
from common.errors import CS330Error, cli_main  # noqa: E402
from common.runlog import write_json  # noqa: E402
from hw3_lm_fewshot import ft  # noqa: E402
from hw3_lm_fewshot.data import load_task  # noqa: E402
from hw3_lm_fewshot.icl import run_icl  # noqa: E402
from hw3_lm_fewshot.metrics import TASK_METRIC  # noqa: E402
from hw3_lm_fewshot.models import load_causal_lm, resolve_model  # noqa: E402

PARTS = ("amazon_ft", "babi_icl", "xsum_icl", "ft_modes", "lora_vs_icl")
FULL = {
    "amazon_ft": {"k": [1, 8, 128]},
    "babi_icl": {"k": [0, 1, 16], "prompts": ["qa"]},
    "xsum_icl": {"k": [0, 1, 4], "prompts": ["none", "tldr", "custom"]},
    "ft_modes": {"k": [0, 1, 8, 128], "modes": ["first", "last", "middle", "lora4", "lora16"],
                 "tasks": ["xsum", "babi"]},
    "lora_vs_icl": {"k": [0, 1, 4]},
}
QUICK = {
    "amazon_ft": {"k": [1, 8, 128]},
    "babi_icl": {"k": [0, 1, 16], "prompts": ["qa"]},
    "xsum_icl": {"k": [0, 1], "prompts": ["none", "tldr", "custom"]},
    "ft_modes": {"k": [0, 8], "modes": ["last", "lora4"], "tasks": ["babi"]},
    "lora_vs_icl": {"k": [0, 1]},
}


def ft_args(args: argparse.Namespace, prompt: str | None = None) -> argparse.Namespace:
    """ft.py's defaults, with this script's step limit and device."""
    extra = ["--device", args.device, "--max_steps", str(args.max_steps)]
    if prompt:
        extra += ["--prompt", prompt]
    return ft.build_parser().parse_args(extra)


def run_part(part: str, grid: dict, args: argparse.Namespace, lm) -> list[dict]:
    """All runs of one part; every result carries its task, part and repeat seed."""
    seeds = [args.seed + r for r in range(args.repeats)]
    results: list[dict] = []

    def task_of(name: str, n_eval: int | None = None):
        return load_task(name, seed=args.seed, n_eval=n_eval or args.n_eval, data_dir=args.data_dir)

    def add(result: dict, task: str) -> None:
        result.update(part=part, task=task)
        results.append(result)
        variant = result.get("mode") or result.get("prompt")
        print(f"  {part} {task} {result['method']} {variant} k={result['k']} seed={result['seed']}: "
              f"{result['metric']} {result['score']:.3f} ({result['seconds']:.0f} s)", flush=True)

    if part == "amazon_ft":
        task = task_of("amazon", args.n_eval_amazon)
        for k in grid["k"]:
            for seed in seeds:
                add(ft.run_ft(resolve_model(args.encoder), task, k, "all", seed, ft_args(args)), "amazon")
    elif part in ("babi_icl", "xsum_icl"):
        name = part.split("_")[0]
        task = task_of(name)
        for prompt in grid["prompts"]:
            for k in grid["k"]:
                for seed in seeds:
                    add(run_icl(*lm(), task, k, prompt, seed, args.max_context), name)
    elif part == "ft_modes":
        for name in grid["tasks"]:
            task = task_of(name)
            for k in grid["k"]:
                for mode in grid["modes"][:1] if k == 0 else grid["modes"]:
                    for seed in seeds:
                        result = ft.run_ft(resolve_model(args.lm), task, k, mode, seed, ft_args(args))
                        if k == 0:  # nothing was trained
                            result.update(mode="pre-trained", trainable_params=0)
                        add(result, name)
    elif part == "lora_vs_icl":
        task = task_of("xsum")
        for k in grid["k"]:
            for seed in seeds:
                add(run_icl(*lm(), task, k, "tldr", seed, args.max_context), "xsum")
                add(ft.run_ft(resolve_model(args.lm), task, k, "lora16", seed, ft_args(args, "tldr")), "xsum")
    return results


def plot_part(part: str, results: list[dict], out: Path) -> Path:
    """Score against k, one line per method/variant (and task), error bars = std over repeats."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for task in sorted({r["task"] for r in results}):
        rows = ft.summarize([r for r in results if r["task"] == task])
        for method, variant in sorted({(r["method"], r["variant"]) for r in rows}):
            line = sorted((r for r in rows if (r["method"], r["variant"]) == (method, variant)), key=lambda r: r["k"])
            ks = [r["k"] for r in line]
            label = f"{task} {method} {variant}" if part == "ft_modes" else f"{method} {variant}"
            ax.errorbar(ks, [r["mean"] for r in line], yerr=[r["std"] for r in line], marker="o", capsize=3,
                        label=label)
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlabel("k (support examples; amazon: per class)")
    ax.set_ylabel(" / ".join(sorted({TASK_METRIC[r["task"]] for r in results})))
    ax.set_title(part)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / f"{part}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def markdown(all_results: dict[str, list[dict]], seconds: dict[str, float]) -> str:
    lines = []
    for part, results in all_results.items():
        lines.append(f"### {part} ({seconds[part]:.0f} s)\n")
        for task in sorted({r["task"] for r in results}):
            lines.append(f"{task}:\n")
            ft.print_table(ft.summarize([r for r in results if r["task"] == task]), TASK_METRIC[task], lines.append)
            lines.append("")
    return "\n".join(lines) + "\n"


@cli_main
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smaller grid (see QUICK in the source)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, from {', '.join(PARTS)}")
    parser.add_argument("--encoder", default="minilm", help="classifier for amazon (default: minilm; course: bert-med)")
    parser.add_argument("--lm", default="smollm2", help="causal LM (default: smollm2; course: small..full = GPT-2)")
    parser.add_argument("--n_eval", type=positive_int, default=None,
                        help="evaluation examples for xsum/babi (default: 10 with --quick, else 50)")
    parser.add_argument("--n_eval_amazon", type=positive_int, default=50,
                        help="amazon evaluation reviews (default: 50)")
    parser.add_argument("--repeats", type=positive_int, default=None, help="seeds per setting (default: 1 quick, 3)")
    parser.add_argument("--max_steps", type=positive_int, default=None,
                        help="fine-tuning step limit (default: 20 with --quick, else 100)")
    parser.add_argument("--max_context", type=positive_int, default=None, help="prompt token cap (default: model's)")
    parser.add_argument("--out", default="runs/hw3/experiments", help="output folder (default: runs/hw3/experiments)")
    parser.add_argument("--device", choices=DEVICE_CHOICES, default="auto", help="where to run (default: auto)")
    parser.add_argument("--seed", type=int, default=0, help="base seed (default: 0)")
    parser.add_argument("--data_dir", default=None, help="data directory (default: data/, then $CS330_DATA_MIRROR)")
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",")]
    if unknown := [p for p in parts if p not in PARTS]:
        raise CS330Error(f"unknown part(s) {unknown}; choose from: {', '.join(PARTS)}")
    args.n_eval = args.n_eval or (10 if args.quick else 50)
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.max_steps = args.max_steps or (20 if args.quick else 100)
    grid = QUICK if args.quick else FULL
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    cache: dict = {}

    def lm():  # the causal LM for ICL, loaded once on first use
        if "lm" not in cache:
            model, tokenizer = load_causal_lm(resolve_model(args.lm))
            cache["lm"] = (model.to(resolve_device(args.device)).eval(), tokenizer)
        return cache["lm"]

    all_results, seconds = {}, {}
    for part in parts:
        print(f"{part} ...", flush=True)
        start = time.time()
        all_results[part] = run_part(part, grid[part], args, lm)
        seconds[part] = time.time() - start
        plot_part(part, all_results[part], out)
        write_json(out / "results.json", {"args": vars(args), "threads": torch.get_num_threads(),
                                          "seconds": seconds, "results": all_results})
        (out / "results.md").write_text(markdown(all_results, seconds))
    print((out / "results.md").read_text())
    return all_results


if __name__ == "__main__":
    main()

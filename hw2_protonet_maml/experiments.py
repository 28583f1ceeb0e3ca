"""The course's hw2 experiment grid: train, meta-test with K = 1..10, write a table and plots.

    python hw2_protonet_maml/experiments.py --quick          # minutes on a CPU: short runs, fewer tasks
    python hw2_protonet_maml/experiments.py --device cuda    # full length (use a GPU)

Runs (5-way): ProtoNet 5-shot and 1-shot; MAML 1-shot with (inner_lr 0.4, 1 step), (0.04, 1 step),
(0.04, 5 steps) and learned inner rates started at 0.4. Both kinds of 1-shot model are then
meta-tested with K = 1, 2, 4, 6, 8, 10 support examples and 10 queries per class. Finished runs are
reused (their results.json exists), so an interrupted grid continues where it stopped.
Everything lands in ``runs/hw2_protonet_maml/experiments[_quick]/``: ``results.md``,
``results.json``, ``accuracy_vs_k.png`` and ``val_curves.png``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import matplotlib
import pandas as pd

from common.checkpoint import list_checkpoints
from common.device import DEVICE_CHOICES
from common.runlog import runs_root, write_json

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
TEST_SHOTS = (1, 2, 4, 6, 8, 10)
GRID = {  # name -> (script, flags)
    "protonet_5shot": ("protonet.py", ["--num_support", "5"]),
    "protonet_1shot": ("protonet.py", ["--num_support", "1"]),
    "maml_lr0.4_1step": ("maml.py", ["--inner_lr", "0.4", "--num_inner_steps", "1"]),
    "maml_lr0.04_1step": ("maml.py", ["--inner_lr", "0.04", "--num_inner_steps", "1"]),
    "maml_lr0.04_5steps": ("maml.py", ["--inner_lr", "0.04", "--num_inner_steps", "5"]),
    "maml_learned_lr0.4": ("maml.py", ["--inner_lr", "0.4", "--num_inner_steps", "1", "--learn_inner_lrs"]),
}


def run(script: str, flags: list[str]) -> None:
    print("$ python", f"hw2_protonet_maml/{script}", " ".join(flags), flush=True)
    subprocess.run([sys.executable, str(HERE / script), *flags], check=True)


def val_curve(run_dir: Path) -> pd.Series:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    if "val/query_acc" not in events.Tags()["scalars"]:
        return pd.Series(dtype=float)
    points = events.Scalars("val/query_acc")
    return pd.Series([p.value for p in points], index=[p.step for p in points])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="short runs for a quick look: 200 ProtoNet / 40 MAML iterations, 100 test tasks")
    parser.add_argument("--only", nargs="+", choices=sorted(GRID), default=sorted(GRID), help="subset of runs")
    parser.add_argument("--device", choices=DEVICE_CHOICES, default="auto")
    parser.add_argument("--protocol", choices=("cs330", "vinyals"), default="cs330")
    parser.add_argument("--bf16", action="store_true", help="pass --bf16 to every run (MAML: query pass only)")
    parser.add_argument("--compile_query", action="store_true", help="pass --compile_query to MAML runs")
    parser.add_argument("--out", default=None, help="output folder (default: runs/hw2_protonet_maml/experiments)")
    args = parser.parse_args()

    out = Path(args.out) if args.out else runs_root() / "hw2_protonet_maml" / (
        "experiments_quick" if args.quick else "experiments")
    iterations = {"protonet.py": 200, "maml.py": 40} if args.quick else {"protonet.py": 5000, "maml.py": 15000}
    test_tasks = "100" if args.quick else "600"
    rows, curves = [], {}
    for name in args.only:
        script, flags = GRID[name]
        run_dir = out / name
        common = ["--num_way", "5", "--device", args.device, "--protocol", args.protocol, "--log_dir", str(run_dir),
                  "--num_test_tasks", test_tasks]
        if args.quick:
            common += ["--val_interval", "20" if script == "maml.py" else "50", "--num_val_tasks", "32"]
        if args.bf16:
            common.append("--bf16")
        if args.compile_query and script == "maml.py":
            common.append("--compile_query")
        if not (run_dir / "results.json").exists():
            resume = ["--resume"] if (run_dir / "checkpoints").exists() else []
            run(script, [*flags, *common, "--num_train_iterations", str(iterations[script]), *resume])
        metrics = json.loads((run_dir / "results.json").read_text())["metrics"]
        row = {"run": name, "test acc (train K)": metrics["test_accuracy"], "ci95": metrics["test_ci95"],
               "train s": metrics["train_seconds"]}
        if "test_support_acc_pre" in metrics:
            pre, post = metrics["test_support_acc_pre"], metrics["test_support_acc_post"]
            row["support acc pre/post"] = f"{pre:.3f}/{post:.3f}"
        if "1shot" in name or name.startswith("maml"):
            for k in TEST_SHOTS:
                result = run_dir / f"test_way5_shot{k}_query10_step{max(list_checkpoints(run_dir))}.json"
                if not result.exists():
                    run(script, [*flags, *common, "--test", "--test_num_support", str(k), "--test_num_query", "10"])
                tested = json.loads(result.read_text())
                row[f"K={k}"] = tested["test_accuracy"]
                row[f"K={k} ci95"] = tested["test_ci95"]
        rows.append(row)
        curves[name] = val_curve(run_dir)

    table = pd.DataFrame(rows).set_index("run")
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", table.reset_index().to_dict(orient="records"))
    shown = table[[c for c in table.columns if not c.endswith(" ci95") or c == "ci95"]]
    (out / "results.md").write_text(shown.to_markdown(floatfmt=".4f") + "\n")
    print(shown.to_markdown(floatfmt=".4f"))
    plot_accuracy_vs_k(table, out / "accuracy_vs_k.png")
    plot_curves(curves, out / "val_curves.png")
    print(f"wrote {out}/results.md, results.json, accuracy_vs_k.png, val_curves.png")


def plot_accuracy_vs_k(table: pd.DataFrame, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, row in table.iterrows():
        if f"K={TEST_SHOTS[0]}" not in row or pd.isna(row[f"K={TEST_SHOTS[0]}"]):
            continue
        ax.errorbar(TEST_SHOTS, [row[f"K={k}"] for k in TEST_SHOTS], yerr=[row[f"K={k} ci95"] for k in TEST_SHOTS],
                    marker="o", capsize=3, label=name)
    ax.set(xlabel="support examples per class at meta-test (K)", ylabel="test accuracy (10 queries/class)",
           title="Meta-trained with K=1, tested with more support")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(curves: dict[str, pd.Series], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curve in curves.items():
        if len(curve):
            ax.plot(curve.index, curve.values, marker=".", label=name)
    ax.set(xlabel="meta-training iteration", ylabel="validation query accuracy", title="Validation during training")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()

"""hw1 under Santoro et al. (2016)'s protocol: the episode sampler, labels shown one step late, the
loss on every step, accuracy by instance from one forward, and train.py's --protocol santoro."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from common.errors import CS330Error
from hw1_mann import train as train_script
from hw1_mann.data import SantoroBatch, SantoroSampler, instance_numbers
from hw1_mann.evaluate import batch_scores, evaluate
from hw1_mann.models import LSTMMANN, FastMemoryMANN, MemoryMANN, santoro_inputs, santoro_loss, sequence_loss

# 3 classes x 4 presentations = 12-step episodes, 4 episodes per step, 2 steps.
TINY = ["--protocol", "santoro", "--num_classes", "3", "--presentations", "4", "--meta_batch_size", "4",
        "--hidden_dim", "8", "--train_steps", "2", "--eval_freq", "1", "--num_test_tasks", "8", "--device", "cpu"]


def test_episodes_show_every_class_equally_often_in_a_seeded_random_order(omniglot_store):
    split = omniglot_store.split("train")
    batch = SantoroSampler(split, num_classes=3, presentations=4, seed=7).sample(5)
    assert batch.images.shape == (5, 12, 784) and batch.labels.shape == (5, 12) and batch.instance.shape == (5, 12)
    assert torch.equal(torch.nn.functional.one_hot(batch.labels, 3).sum(1), torch.full((5, 3), 4))
    assert len({tuple(row.tolist()) for row in batch.labels}) > 1  # each episode its own order
    for b in range(5):
        for label in range(3):
            steps = batch.labels[b] == label
            assert batch.instance[b, steps].tolist() == [1, 2, 3, 4]  # 1st..4th presentation, in order
            drawings = batch.images[b, steps]  # [4, 784]: four different drawings of the character
            assert all(not torch.equal(drawings[i], drawings[j]) for i in range(4) for j in range(i + 1, 4))
    again = SantoroSampler(split, num_classes=3, presentations=4, seed=7).sample(5)
    assert all(torch.equal(x, y) for x, y in zip(batch, again))


def test_presentation_counts():
    labels = torch.tensor([[2, 0, 2, 2, 0, 1]])
    assert instance_numbers(labels, 3).tolist() == [[1, 1, 2, 3, 2, 1]]


def test_impossible_episodes_are_refused(omniglot_store):
    with pytest.raises(CS330Error, match="--presentations 21"):
        SantoroSampler(omniglot_store.split("train"), num_classes=5, presentations=21)
    with pytest.raises(CS330Error, match="at least 2"):
        SantoroSampler(omniglot_store.split("train"), num_classes=1, presentations=10)


def test_each_label_arrives_one_step_after_its_image():
    images, labels = torch.rand(2, 5, 784), torch.tensor([[0, 2, 1, 1, 0], [1, 1, 0, 2, 2]])
    steps = santoro_inputs(images, labels, 3)  # [2, 5, 787]
    assert torch.equal(steps[..., :784], images)
    assert torch.equal(steps[:, 0, 784:], torch.zeros(2, 3))
    assert torch.equal(steps[:, 1:, 784:], torch.nn.functional.one_hot(labels[:, :-1], 3).float())
    with pytest.raises(CS330Error, match="3-way"):
        santoro_inputs(images, labels + 1, 3)
    with pytest.raises(CS330Error, match=r"labels \[B, T\]"):
        santoro_inputs(images, labels[:, :4], 3)


@pytest.mark.parametrize("model_cls", [LSTMMANN, MemoryMANN, FastMemoryMANN])
def test_a_prediction_never_sees_its_own_label(model_cls):
    torch.manual_seed(0)
    model = model_cls(3, hidden_dim=16)
    images, labels = torch.rand(2, 8, 784), torch.randint(0, 3, (2, 8))
    logits = model(images, labels)
    assert logits.shape == (2, 8, 3)
    later = labels.clone()
    later[:, 4:] = (later[:, 4:] + 1) % 3  # labels of step 4 on: seen from step 5 on
    changed = model(images, later)
    assert torch.equal(changed[:, :5], logits[:, :5])
    assert not torch.equal(changed[:, 5:], logits[:, 5:])
    # Every step is in the loss, the first one included.
    assert sequence_loss(logits, labels) == santoro_loss(logits, labels)
    first_changed = logits.detach().clone()
    first_changed[:, 0] += torch.tensor([5.0, 0.0, 0.0])
    assert santoro_loss(first_changed, labels) != santoro_loss(logits, labels)


class WrongOnFirstSight(nn.Module):
    """Answers every step right except a class's first presentation, where it answers the next class."""

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        first = instance_numbers(labels, 3) == 1
        answer = torch.where(first, (labels + 1) % 3, labels)
        return torch.nn.functional.one_hot(answer, 3).float()


def test_accuracy_by_instance_groups_the_steps_of_one_forward(omniglot_store):
    sampler = SantoroSampler(omniglot_store.split("val"), num_classes=3, presentations=4, seed=1)
    batch = sampler.sample(6)
    accuracies, loss_sum, by_instance = batch_scores(WrongOnFirstSight(), batch, by_instance=True)
    assert torch.allclose(accuracies, torch.full((6,), 9 / 12))  # 3 of 12 steps are first presentations
    assert by_instance.tolist() == [0.0, 6.0, 6.0, 6.0]  # summed over the 6 episodes
    assert loss_sum > 0
    result = evaluate(WrongOnFirstSight(), sampler, num_tasks=10, batch_size=4, by_instance=True)
    assert result["acc_by_instance"] == [0.0, 1.0, 1.0, 1.0] and result["acc"] == pytest.approx(0.75)
    assert isinstance(batch, SantoroBatch)


def test_train_script_runs_the_protocol_and_names_it(omniglot_data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("CS330_RUNS_DIR", str(tmp_path / "runs"))
    metrics = train_script.main(["--data_dir", str(omniglot_data_dir), *TINY, "--model", "memory",
                                 "--memory_slots", "8", "--memory_impl", "plain"])
    (run,) = (tmp_path / "runs" / "hw1_mann").iterdir()
    assert run.name.startswith("memory_santoro_N3_P4_B4_") and "_K" not in run.name
    assert len(metrics["test_acc_by_instance"]) == 4  # 1st..4th presentation
    assert all(len(record["test_acc_by_instance"]) == 4 for record in metrics["history"])
    assert json.loads((run / "hparams.json").read_text())["protocol"] == "santoro"
    # The run extends with --resume (the evaluation sizes and the memory's implementation may change),
    # and --test repeats its figures.
    extended = train_script.main(["--data_dir", str(omniglot_data_dir), *TINY, "--model", "memory",
                                  "--memory_slots", "8", "--train_steps", "3", "--eval_tasks", "2", "--resume"])
    assert extended["steps"] == 3 and extended["history"][-1]["step"] == 3
    assert metrics["memory_impl"] == "plain" and extended["memory_impl"] == "fast"  # auto, resolved: 3 steps
    retest = train_script.main(["--data_dir", str(omniglot_data_dir), *TINY, "--model", "memory",
                                "--memory_slots", "8", "--train_steps", "3", "--eval_tasks", "2", "--test"])
    assert retest["test_acc_by_instance"] == extended["test_acc_by_instance"]


def test_too_many_presentations_are_refused_before_the_run_folder(omniglot_data_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        train_script.main(["--data_dir", str(omniglot_data_dir), "--log_dir", str(tmp_path / "run"), *TINY,
                           "--presentations", "21"])
    assert info.value.code == 2 and "--presentations 21" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_report_has_the_paper_table_and_the_plot(tmp_path):
    import pandas as pd

    from hw1_mann import experiments

    rows = []
    for _, model, shots, ways, hidden, seed in experiments.SANTORO:
        level = {"lstm": 0.5, "memory": 0.9}[model] + (seed - 124) / 100  # seeds 123..125: level -+ 0.01
        by_instance = [0.2] + [level] * 9
        history = [{"step": step, "test_acc_by_instance": by_instance} for step in (200, 400)]
        rows.append({"name": experiments.run_name(model, shots, ways, hidden, seed), "test_acc": level,
                     "test_acc_ci95": 0.01, "test_acc_by_instance": by_instance, "steps_per_sec": 4.0,
                     "history": history})
    text = experiments.report_for("cpu")(pd.DataFrame(rows), tmp_path)
    assert "| **memory, mean ± std** | 3 seeds | **20.0 ± 0.0** | **90.0 ± 1.0** |" in text
    assert "| lstm, Santoro et al. table 1 | | 24.4 | 49.5 | 55.3 | 61.0 | 63.6 | 62.5 | | |" in text
    assert "192,000 episodes" in text and "± 1.4 points" in text
    assert (tmp_path / "santoro_by_instance.png").stat().st_size > 0


def test_report_states_the_sizes_the_runs_ran_with(tmp_path):
    """Issue 28 (the class of hw2's "600 test tasks"): the report's sentences came from the preset
    whatever the runs had used."""
    import pandas as pd

    from hw1_mann import experiments

    rows = []
    for _, model, shots, ways, hidden, seed in experiments.SEEDS + experiments.SANTORO:
        santoro = shots == 0
        rows.append({"name": experiments.run_name(model, shots, ways, hidden, seed), "test_acc": 0.5,
                     "test_acc_ci95": 0.01, "test_acc_by_instance": [0.5] * (10 if santoro else 2),
                     "steps_per_sec": 4.0, "history": [{"step": 10, "test_acc": 0.5,
                                                        "test_acc_by_instance": [0.5] * 10}],
                     "train_steps": 50 if santoro else 300, "meta_batch_size": 16 if santoro else 8,
                     "num_test_tasks": 40, "learning_rate": 0.001, "hidden_dim": hidden, "eval_tasks": 16})
    text = experiments.report_for("cpu")(pd.DataFrame(rows), tmp_path)
    assert "Runs of 300 steps, meta-batch 8, lr 0.001; test accuracy over 40 test tasks" in text
    assert "50 steps (800 episodes); percent correct on 40 test episodes" in text
    assert "25000" not in text and "1000 test" not in text
    rows[0]["num_test_tasks"] = 1000
    assert "over 40 or 1000 test tasks" in experiments.report_for("cpu")(pd.DataFrame(rows), tmp_path)


def test_a_read_focuses_on_a_matching_slot_only_with_a_key_strength():
    """Santoro et al.'s read (softmax of cosines in [-1, 1]) cannot put more than ~5.5% on one of 128
    slots, even on a key equal to it; a strength of 50 puts over 90% there."""
    from hw1_mann.models import content_weights

    memory = torch.randn(1, 128, 40, generator=torch.Generator().manual_seed(0))  # [B, slots, dim]
    keys = memory[:, 7:8].clone()  # [B, H=1, dim]: the key is slot 7
    plain = content_weights(keys, memory)
    sharp = content_weights(keys, memory, torch.full((1, 1, 1), 50.0))
    assert plain[0, 0].argmax() == 7 and plain[0, 0, 7] < 0.055
    assert sharp[0, 0, 7] > 0.9
    torch.testing.assert_close(sharp.sum(-1), torch.ones(1, 1))


def test_learned_key_strength_adds_one_trained_layer_and_the_default_is_unchanged():
    from hw1_mann.models import MemoryMANN

    torch.manual_seed(0)
    plain = MemoryMANN(3, hidden_dim=8, memory_slots=16, memory_dim=4, num_reads=2)
    torch.manual_seed(0)
    strong = MemoryMANN(3, hidden_dim=8, memory_slots=16, memory_dim=4, num_reads=2, key_strength=True)
    assert set(strong.state_dict()) - set(plain.state_dict()) == {"key_strength.weight", "key_strength.bias"}
    assert all(torch.equal(v, strong.state_dict()[k]) for k, v in plain.state_dict().items())  # same draws first
    images, labels = torch.rand(2, 6, 784), torch.randint(0, 3, (2, 6))
    santoro_loss(strong(images, labels), labels).backward()
    assert strong.key_strength.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("lru_write", ["paper", "per_head"])
def test_the_least_used_write_goes_where_the_rule_says(lru_write):
    """With the write gate shut (all weight on w^lu), the paper's rule adds every head's key to each of
    the H least-used slots; per_head adds head j's key to the j-th least-used slot only."""
    torch.manual_seed(0)
    model = MemoryMANN(3, hidden_dim=8, memory_slots=6, memory_dim=4, num_reads=2, lru_write=lru_write)
    nn.init.zeros_(model.write_gate.weight)
    nn.init.constant_(model.write_gate.bias, -40.0)  # sigmoid(alpha) ~ 4e-18
    h = torch.randn(1, 8)
    _, _, state = model.initial_state(torch.zeros(1, 1, 1))
    ranked = torch.tensor([[3, 1]])  # slot 3 least used, then slot 1
    state = state._replace(memory=torch.zeros(1, 6, 4), usage=torch.tensor([[0.5, 0.2, 0.9, 0.1, 0.8, 0.7]]),
                           least_used=model.least_used_weights(ranked, torch.float32))
    keys = torch.tanh(model.key(h)).view(2, 4)  # [H, dim]
    memory = model.memory_step(h, state).memory[0]  # [slots, dim]
    if lru_write == "paper":
        expected = {3: keys.sum(0), 1: keys.sum(0)}
    else:
        expected = {3: keys[0], 1: keys[1]}
    for slot in range(6):
        torch.testing.assert_close(memory[slot], expected.get(slot, torch.zeros(4)), atol=1e-6, rtol=0)


def test_the_next_least_used_weights_follow_the_usage():
    torch.manual_seed(0)
    for lru_write, ones_per_head in (("paper", 2), ("per_head", 1)):
        model = MemoryMANN(3, hidden_dim=8, memory_slots=6, memory_dim=4, num_reads=2, lru_write=lru_write)
        _, _, state = model.initial_state(torch.zeros(5, 1, 1))
        assert state.least_used.shape == (5, 2, 6) and (state.least_used.sum(-1) == ones_per_head).all()
        new = model.memory_step(torch.randn(5, 8), state)
        least = new.usage.topk(2, dim=1, largest=False).indices  # [B, H]
        for b in range(5):
            chosen = [set(row.nonzero().flatten().tolist()) for row in new.least_used[b]]
            assert chosen == ([set(least[b].tolist())] * 2 if lru_write == "paper" else
                              [{int(least[b, 0])}, {int(least[b, 1])}])
    with pytest.raises(CS330Error, match="choose one of paper, per_head"):
        MemoryMANN(3, lru_write="lru")


def test_a_run_from_before_lru_write_reads_as_per_head(omniglot_data_dir, tmp_path, capsys):
    """A run folder whose hparams.json lacks --lru_write trained with the rule of its time (per_head):
    --test with that rule takes it, the new default is refused with what changed."""
    run = tmp_path / "run"
    flags = ["--data_dir", str(omniglot_data_dir), *TINY, "--model", "memory", "--memory_slots", "8",
             "--memory_impl", "plain", "--log_dir", str(run)]
    trained = train_script.main([*flags, "--lru_write", "per_head"])
    hparams = json.loads((run / "hparams.json").read_text())
    del hparams["lru_write"]
    (run / "hparams.json").write_text(json.dumps(hparams))
    retest = train_script.main([*flags, "--lru_write", "per_head", "--test"])
    assert retest["test_acc_by_instance"] == trained["test_acc_by_instance"]
    with pytest.raises(SystemExit) as info:
        train_script.main([*flags, "--test"])
    assert info.value.code == 2 and "--lru_write per_head -> paper" in capsys.readouterr().err


def test_ablation_report_reads_validation_and_names_each_difference(tmp_path):
    import pandas as pd

    from hw1_mann import experiments

    configs = experiments.ablation_configs()
    assert [c.name for c in configs] == [experiments.ablation_name(v) for v in experiments.ABLATION]
    assert all(c.argv[:len(experiments.ABLATION_FLAGS)] == experiments.ABLATION_FLAGS for c in configs)
    assert "--lru_write" not in configs[0].argv and "--key_strength" not in configs[0].argv  # the paper's network
    history = [{"step": step, "val_acc": step / 20000, "val_acc_by_instance": [0.25, 0.5] + [0.75] * 8}
               for step in range(500, 12001, 500)]
    history[8]["val_acc"] = 0.9  # the best, at step 4500
    rows = [{"name": configs[0].name, "history": history, "test_acc": 0.6, "test_acc_ci95": 0.006,
             "steps_per_sec": 5.0}]
    text = experiments.ablation_report(pd.DataFrame(rows), tmp_path)
    assert "| paper | (the defaults) | 10.0 / 20.0 / 40.0 / 60.0 (90.0 at 4500) | 25.0 / 50.0 / 75.0 / 75.0 / " \
           "75.0 / 75.0 | 60.0 ± 0.6 | 5.00 |" in text
    assert "| lru_per_head | --lru_write per_head | not finished |" in text
    assert (tmp_path / "ablation.png").stat().st_size > 0

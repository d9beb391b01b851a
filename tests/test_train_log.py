"""What the trainer logs each --logging_steps window (zimage_utils/train_log.py), on one CPU process."""

import json

import pytest
import torch
from accelerate import Accelerator
from test_trainer import train

from zimage_utils import train_log
from zimage_utils.train_log import WANDB_ID_NAME, LogWindow, lowest_held_out_loss, tracker_init_kwargs


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(train_log.time, "time", fake)
    return fake


def step_output(loss: float, sigmas: list[float]) -> dict[str, torch.Tensor]:
    per_sample = torch.full((len(sigmas),), loss)
    return {"loss": per_sample.mean(), "per_sample": per_sample, "sigma": torch.tensor(sigmas)}


def test_window_averages_every_micro_batch_and_bins_the_loss_by_sigma(clock, tmp_path):
    accelerator = Accelerator(cpu=True)
    window = LogWindow("cpu", start_step=10)
    window.add(step_output(1.0, [0.1, 0.1]), 11)
    window.add(step_output(3.0, [0.9, 0.9]), 11)  # gradient accumulation: two micro-batches, one step
    window.add(step_output(2.0, [0.1, 0.9]), 12)
    clock.now += 4.0
    logs = window.read(accelerator, 12, tmp_path)
    assert logs["loss"] == pytest.approx(2.0)
    assert logs["loss/sigma_0.0-0.2"] == pytest.approx(4 / 3) and logs["loss/sigma_0.8-1.0"] == pytest.approx(8 / 3)
    assert logs["steps_per_s"] == pytest.approx(2 / 4.0)

    # The next window starts empty, at the step and time of the read
    window.add(step_output(5.0, [0.5]), 13)
    clock.now += 1.0
    logs = window.read(accelerator, 13, tmp_path)
    assert logs["loss"] == pytest.approx(5.0) and list(k for k in logs if k.startswith("loss/")) == [
        "loss/sigma_0.4-0.6"
    ]
    assert logs["steps_per_s"] == pytest.approx(1.0)


def test_a_loss_term_is_the_mean_over_the_micro_batches_that_had_it(clock, tmp_path):
    window = LogWindow("cpu", start_step=0)
    window.add({**step_output(1.0, [0.5]), "preservation": torch.tensor(0.3)}, 1)
    window.add(step_output(1.0, [0.5]), 1)  # (a batch without the term: e.g. no item with a preservation caption)
    window.add({**step_output(1.0, [0.5]), "preservation": torch.tensor(0.5)}, 2)
    logs = window.read(Accelerator(cpu=True), 2, tmp_path)
    assert logs["loss/preservation"] == pytest.approx(0.4) and "loss/mask_prior" not in logs
    window.add(step_output(1.0, [0.5]), 3)
    assert "loss/preservation" not in window.read(Accelerator(cpu=True), 3, tmp_path)  # the next window starts empty


def test_a_log_line_cut_short_is_left_out_and_the_next_record_starts_a_line_of_its_own(tmp_path, caplog):
    """A full disk or a power cut can leave half a line; every resumed run then ended in a JSON error (a kill audit)."""
    from zimage_utils.plots import read_log
    from zimage_utils.train_log import append_jsonl

    log = tmp_path / "train_log.jsonl"
    log.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo')
    append_jsonl(log, {"step": 3, "loss": 3.0})
    assert read_log(log) == [{"step": 1, "loss": 1.0}, {"step": 3, "loss": 3.0}]
    assert f"{log}: line(s) 2 are not log records" in caplog.text


def test_time_spent_saving_or_validating_does_not_count_as_training_time(clock, tmp_path):
    window = LogWindow("cpu", start_step=0)
    window.add(step_output(1.0, [0.5]), 1)
    clock.now += 2.0
    with window.paused():  # e.g. a checkpoint that takes 30 s
        clock.now += 30.0
    window.add(step_output(1.0, [0.5]), 2)
    clock.now += 2.0
    assert window.read(Accelerator(cpu=True), 2, tmp_path)["steps_per_s"] == pytest.approx(2 / 4.0)


def test_a_non_finite_loss_is_reported_with_the_first_step_it_appeared_at(clock, tmp_path):
    window = LogWindow("cpu", start_step=0)
    window.add(step_output(1.0, [0.5]), 1)
    window.add(step_output(float("nan"), [0.5]), 2)
    window.add(step_output(float("inf"), [0.5]), 3)
    window.add(step_output(1.0, [0.5]), 4)  # finite again: still reported
    with pytest.raises(FloatingPointError, match=f"non-finite at step 2;.*checkpoint in {tmp_path}"):
        window.read(Accelerator(cpu=True), 4, tmp_path)


def test_a_resumed_run_logs_to_the_same_wandb_run(tmp_path):
    """accelerate hands these to `wandb.init`: one id per output folder, kept in it, so a run stopped and resumed
    goes on in one wandb run. (Seen with wandb 0.31 in offline mode: both halves of a resumed run wrote under the
    same run id.)"""
    assert tracker_init_kwargs("tensorboard", tmp_path / "a") == {} and not (tmp_path / "a").exists()
    first = tracker_init_kwargs("wandb", tmp_path / "a")["wandb"]
    assert first["name"] == "a" and first["resume"] == "allow" and first["dir"] == str(tmp_path / "a" / "logs")
    resumed = tracker_init_kwargs("wandb", tmp_path / "a", run_name="my run")["wandb"]
    assert resumed["id"] == first["id"] and resumed["name"] == "my run"
    assert tracker_init_kwargs("wandb", tmp_path / "b")["wandb"]["id"] != first["id"]  # another run, another id
    assert (tmp_path / "a" / "logs" / WANDB_ID_NAME).read_text().strip() == first["id"]


def test_the_lowest_held_out_loss_names_the_files_that_hold_it(tmp_path):
    assert lowest_held_out_loss(tmp_path) is None  # no log
    log = tmp_path / "train_log.jsonl"
    records = [{"step": 1, "loss": 0.9}, {"step": 2, "val/loss": 0.5}, {"step": 4, "val/loss": 0.3}]
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert lowest_held_out_loss(tmp_path) == "held-out loss lowest at step 4 (0.3000): the final LoRA files hold it"
    with log.open("a") as f:  # overfitting after step 4
        f.write(json.dumps({"step": 6, "val/loss": 0.4}) + "\n")
    line = lowest_held_out_loss(tmp_path)
    assert line.startswith("held-out loss lowest at step 4 (0.3000; 0.4000 at the last validation, step 6): no checkp")
    (tmp_path / "checkpoint-4").mkdir()
    assert f"step 6): {tmp_path / 'checkpoint-4'} holds that LoRA" in lowest_held_out_loss(tmp_path)
    log.write_text(json.dumps({"step": 1, "loss": 0.9}) + "\n")  # no --validation_split: nothing to say
    assert lowest_held_out_loss(tmp_path) is None


def test_a_run_with_held_out_images_ends_naming_its_lowest_held_out_loss(
    tiny_model_dir, tiny_cache_dir, tmp_path, caplog
):
    caplog.set_level("INFO", logger="train")
    flags = dict(max_train_steps=2, validation_steps=1, checkpointing_steps=1, validation_split=0.25)
    log = train(tiny_model_dir, tiny_cache_dir, tmp_path, **flags, learning_rate=1e-3)
    held_out = {r["step"]: r["val/loss"] for r in log if "val/loss" in r}
    best = min(held_out, key=held_out.get)
    assert sorted(held_out) == [1, 2] and f"held-out loss lowest at step {best} ({held_out[best]:.4f}" in caplog.text

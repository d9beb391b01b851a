"""What the trainer logs each --logging_steps window (zimage_utils/train_log.py), on one CPU process."""

import pytest
import torch
from accelerate import Accelerator

from zimage_utils import train_log
from zimage_utils.train_log import WANDB_ID_NAME, LogWindow, tracker_init_kwargs


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

"""The optimiser flags of train_zimage_lora.py on the tiny model (CPU): LoRA+ (`--loraplus_lr_ratio`, through PEFT's
`create_loraplus_optimizer`), the learning-rate schedule's flags and what resuming under other optimiser flags does.

LoRA+ is checked on the first step, where it is exact: lora_B starts at zero, so lora_A gets no gradient, and Adam's
first update moves each parameter by lr · g / (|g| + eps), i.e. by lr wherever the gradient is not tiny. With ratio R,
the B factors must come out R times what they are without LoRA+, and the A factors unchanged.
"""

import pytest
import torch
from test_trainer import read_log, train

import train_zimage_lora
from zimage_utils.checkpoints import LORA_STATE_NAME
from zimage_utils.lora_io import LORA_WEIGHT_NAME, load_lora_file
from zimage_utils.optimizers import make_optimizer

LR = 1e-3


def first_step(model_dir, cache_dir, output_dir, **flags) -> dict[str, torch.Tensor]:
    """The fp32 LoRA after one optimiser step (the resume state of checkpoint-1)."""
    from safetensors.torch import load_file

    train(model_dir, cache_dir, output_dir, max_train_steps=1, checkpointing_steps=1, learning_rate=LR, **flags)
    return load_file(str(output_dir / "checkpoint-1" / LORA_STATE_NAME))


def test_loraplus_moves_the_b_factors_ratio_times_further_and_leaves_a_alone(tiny_model_dir, tiny_cache_dir, tmp_path):
    plain = first_step(tiny_model_dir, tiny_cache_dir, tmp_path / "plain")
    plus = first_step(tiny_model_dir, tiny_cache_dir, tmp_path / "plus", loraplus_lr_ratio=4)
    b_keys = [k for k in plain if "lora_B" in k]
    assert b_keys and len(b_keys) * 2 == len(plain)
    assert max(plain[k].abs().max().item() for k in b_keys) == pytest.approx(LR, rel=1e-3)  # Adam's first step
    for key in plain:
        expected = plain[key] * 4 if "lora_B" in key else plain[key]
        torch.testing.assert_close(plus[key], expected, rtol=1e-5, atol=0, msg=key)
    _, metadata = load_lora_file(tmp_path / "plus" / LORA_WEIGHT_NAME)
    assert metadata["loraplus_lr_ratio"] == "4.0" and metadata["learning_rate"] == str(LR)
    # the log shows both groups' rates; without LoRA+ there is one
    (logged,) = read_log(tmp_path / "plus")
    assert logged["lr_lora_B"] == pytest.approx(4 * logged["lr"]) and logged["lr"] > 0
    assert "lr_lora_B" not in read_log(tmp_path / "plain")[0]


def test_loraplus_keeps_the_schedule_ratio_between_its_groups():
    """A cosine decay scales both groups alike: B stays at ratio × A's rate all along."""
    from diffusers.optimization import get_scheduler

    model = torch.nn.ModuleDict(
        {"lora_A": torch.nn.Linear(4, 2, bias=False), "lora_B": torch.nn.Linear(2, 4, bias=False)}
    )
    params = list(model.parameters())
    optimizer = make_optimizer(params, "adamw", LR, loraplus_lr_ratio=16, model=model)
    schedule = get_scheduler("cosine", optimizer=optimizer, num_warmup_steps=0, num_training_steps=10)
    for _ in range(5):
        optimizer.step()
        schedule.step()
    lr_a, lr_b = schedule.get_last_lr()
    assert 0 < lr_a < LR and lr_b == pytest.approx(16 * lr_a)
    assert [len(g["params"]) for g in optimizer.param_groups] == [1, 1]  # no empty group (DeepSpeed fails on one)


@pytest.mark.parametrize(
    "flags, expected",
    [
        # diffusers' "constant" ignores warmup; a user giving --lr_warmup_steps means constant_with_warmup
        (dict(lr_warmup_steps=2), [0.5, 1, 1, 1]),
        # two cosine cycles in four steps: down to half, restart, down to half, and 0 at the end
        (dict(lr_scheduler="cosine_with_restarts", lr_num_cycles=2), [0.5, 1, 0.5, 0]),
        # the polynomial's power: (1 - 1/4)² after one step (to 1e-7 rather than 0, hence the tolerance)
        (dict(lr_scheduler="polynomial", lr_power=2.0), [0.5625, 0.25, 0.0625, 0]),
    ],
)
def test_the_schedule_flags_shape_the_learning_rate(tiny_model_dir, tiny_cache_dir, tmp_path, flags, expected):
    log = train(
        tiny_model_dir, tiny_cache_dir, tmp_path, max_train_steps=4, logging_steps=1, learning_rate=LR, **flags
    )
    assert [r["lr"] / LR for r in log] == pytest.approx(expected, abs=1e-3)
    _, metadata = load_lora_file(tmp_path / LORA_WEIGHT_NAME)  # the schedule that ran, for whoever uses the LoRA
    assert metadata["lr_scheduler"] == flags.get("lr_scheduler", "constant_with_warmup")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--adapter", "lokr", "--loraplus_lr_ratio", "4"], "--loraplus_lr_ratio is for --adapter lora"),
        (["--loraplus_lr_ratio", "0.5"], "and at least 1"),
        # each of these ran until a step, a validation or the final schedule step (a flag audit)
        (["--optimizer", "prodigy", "--learning_rate", "1", "--loraplus_lr_ratio", "16"], "drop --loraplus_lr_ratio"),
        (["--optimizer", "prodigy", "--learning_rate", "0"], "--learning_rate 0.0: give a positive rate"),
        (["--lr_scheduler", "polynomial", "--lr_power", "-1"], "with --lr_power >= 0"),
        (["--lr_scheduler", "polynomial", "--learning_rate", "0"], "give a rate above 1e-07"),
        (["--logging_steps", "0"], "--logging_steps 0: give 1 or more"),
        (["--validation_num_inference_steps", "0"], "--validation_num_inference_steps 0: give 1 or more"),
        (["--caption_dropout", "1.5"], "--caption_dropout 1.5: give a value from 0 to 1"),
        (["--lora_alpha", "0"], "--lora_alpha 0.0: give a positive value"),
        (["--activation_memory_budget", "0.5"], "applies to compiled blocks: add --compile"),
        (["--optimizer", "adamx"], "'adamx': choose one of adamw, adamw8bit"),
        (["--optimizer", "no_such_package.Lion"], "--optimizer no_such_package.Lion: cannot import no_such_package"),
        (["--optimizer", "torch.optim.Lion"], "torch.optim has no torch optimiser class Lion"),
        (["--optimizer", "torch.nn.Linear"], "torch.nn has no torch optimiser class Linear"),
        (["--optimizer_args", "amsgrad"], "--optimizer_args 'amsgrad': write KEY=VALUE"),
    ],
)
def test_flags_that_would_fail_later_are_refused_as_they_are_read(
    tiny_model_dir, tiny_cache_dir, flags, message, capsys
):
    with pytest.raises(SystemExit):
        train_zimage_lora.parse_args(
            ["--pretrained_model_name_or_path", str(tiny_model_dir), "--precomputed_dir", str(tiny_cache_dir), *flags]
        )
    assert message in capsys.readouterr().err


def test_an_optimiser_class_given_by_its_import_path_trains_with_its_arguments(
    tiny_model_dir, tiny_cache_dir, tmp_path, monkeypatch, caplog
):
    """--optimizer torch.optim.RAdam (kohya's optimizer_type form): the class gets --learning_rate,
    --adam_weight_decay and --optimizer_args only; a resume follows this run's --optimizer_args and says so."""
    made = []
    original = train_zimage_lora.optimizer_and_schedule
    monkeypatch.setattr(
        train_zimage_lora, "optimizer_and_schedule", lambda *a, **k: made.append(original(*a, **k)) or made[-1]
    )
    flags = dict(optimizer="torch.optim.RAdam", optimizer_args=["decoupled_weight_decay=True", "betas=(0.8,0.9)"])
    train(tiny_model_dir, tiny_cache_dir, tmp_path, max_train_steps=2, checkpointing_steps=2, **flags)
    group = made[-1][0].param_groups[0]
    assert type(made[-1][0]).__name__ == "RAdam"
    assert (group["lr"], group["weight_decay"], group["decoupled_weight_decay"], group["betas"]) == (
        1e-3,
        1e-4,
        True,
        (0.8, 0.9),
    )
    assert load_lora_file(tmp_path / LORA_WEIGHT_NAME)[0]

    caplog.set_level("INFO", logger="train")
    flags["optimizer_args"] = ["decoupled_weight_decay=True", "betas=(0.85,0.9)"]
    train(tiny_model_dir, tiny_cache_dir, tmp_path, max_train_steps=3, resume_from_checkpoint="latest", **flags)
    assert (
        "other optimiser settings, which apply from here: betas=(0.85, 0.9) (the checkpoint's: (0.8, 0.9))"
        in caplog.text
    )
    assert made[-1][0].param_groups[0]["betas"] == (0.85, 0.9)
    with pytest.raises(ValueError, match="saved with --optimizer torch.optim.RAdam, this run has --optimizer adamw"):
        train(tiny_model_dir, tiny_cache_dir, tmp_path, max_train_steps=4, resume_from_checkpoint="latest")

    # Arguments the class does not take are named when it is made; ours take them over this trainer's
    with pytest.raises(ValueError, match="--optimizer torch.optim.SGD: .*unexpected keyword argument 'bogus'"):
        make_optimizer([torch.nn.Parameter(torch.zeros(2))], "torch.optim.SGD", 0.1, extra={"bogus": 1})
    adamw = make_optimizer([torch.nn.Parameter(torch.zeros(2))], "adamw", 0.1, extra={"amsgrad": True, "eps": 1e-6})
    assert (adamw.param_groups[0]["amsgrad"], adamw.param_groups[0]["eps"]) == (True, 1e-6)


def test_resuming_with_other_optimiser_flags_is_refused_before_loading(tiny_model_dir, tiny_cache_dir, tmp_path):
    """The checkpoint's optimiser state (one parameter group) cannot serve LoRA+'s two: say so, and how to go on.
    Nor can its unscaled LoRA go on under another --lora_alpha (it would rescale it), nor an average start from
    a checkpoint that holds none: refused in a dry run already."""
    train(tiny_model_dir, tiny_cache_dir, tmp_path, max_train_steps=2, checkpointing_steps=2)
    with pytest.raises(FileNotFoundError, match="ema_lora.safetensors is missing: .* written without --ema_decay"):
        train(tiny_model_dir, tiny_cache_dir, tmp_path, resume_from_checkpoint="latest", ema_decay=0.9, dry_run=True)
    with pytest.raises(ValueError, match="checkpoint-2 was saved with --lora_alpha 4, this run has --lora_alpha 64"):
        train(
            tiny_model_dir, tiny_cache_dir, tmp_path, max_train_steps=4, resume_from_checkpoint="latest", lora_alpha=64
        )

    with pytest.raises(ValueError) as refused:
        train(
            tiny_model_dir,
            tiny_cache_dir,
            tmp_path,
            max_train_steps=4,
            resume_from_checkpoint="latest",
            loraplus_lr_ratio=4,
        )
    message = str(refused.value)
    assert "checkpoint-2 was saved with --loraplus_lr_ratio 0.0, this run has --loraplus_lr_ratio 4.0" in message
    assert "--init_lora" in message


def test_schedule_free_samples_and_saves_its_average_and_resumes_exactly(
    tiny_model_dir, tiny_cache_dir, tmp_path, monkeypatch
):
    """--optimizer adamw_schedulefree: each LoRA file and validation sample is made in the optimiser's eval mode
    (its average x), and training goes on from the very point y it left; a run stopped at its step-3 checkpoint and
    resumed ends bit for bit where the uninterrupted one does, validating at the same steps."""
    from zimage_utils import optimizers
    from zimage_utils.validation import Validator

    made, modes = [], []
    make, save, sample = optimizers.make_optimizer, train_zimage_lora.save_lora_files, Validator.sample_grid
    monkeypatch.setattr(optimizers, "make_optimizer", lambda *a, **k: made.append(make(*a, **k)) or made[-1])

    def train_mode(what):
        modes.append((what, made[-1].param_groups[0]["train_mode"]))

    monkeypatch.setattr(train_zimage_lora, "save_lora_files", lambda *a, **k: train_mode("save") or save(*a, **k))
    monkeypatch.setattr(Validator, "sample_grid", lambda *a, **k: train_mode("sample") or sample(*a, **k))
    flags = dict(optimizer="adamw_schedulefree", learning_rate=1e-2, lr_warmup_steps=2, max_train_steps=6)
    flags.update(checkpointing_steps=3, validation_steps=3, save_dtype="fp32", logging_steps=1)
    log_a = train(tiny_model_dir, tiny_cache_dir, tmp_path / "a", **flags)
    # checkpoint 3, validation 3, checkpoint 6, validation 6, the final files (the last validation came first)
    assert modes == [("save", False), ("sample", False), ("save", False), ("sample", False), ("save", False)]
    assert [r["lr"] for r in log_a if "lr" in r] == pytest.approx([5e-3] + [1e-2] * 5)  # its own warmup, logged
    train(tiny_model_dir, tiny_cache_dir, tmp_path / "b", **flags, max_train_steps_this_run=3)
    train(tiny_model_dir, tiny_cache_dir, tmp_path / "b", **flags, resume_from_checkpoint="latest")
    lora_a, metadata = load_lora_file(tmp_path / "a" / LORA_WEIGHT_NAME)
    lora_b, _ = load_lora_file(tmp_path / "b" / LORA_WEIGHT_NAME)
    assert metadata["optimizer"] == "adamw_schedulefree"
    assert lora_a.keys() == lora_b.keys() and all(torch.equal(lora_a[k], lora_b[k]) for k in lora_a)
    # The files hold the average x, the checkpoint's resume state the training point y: they differ
    from safetensors.torch import load_file

    files, _ = load_lora_file(tmp_path / "a" / "checkpoint-6" / LORA_WEIGHT_NAME)
    state = load_file(str(tmp_path / "a" / "checkpoint-6" / LORA_STATE_NAME))
    assert files.keys() == state.keys() and any(not torch.equal(files[k], state[k]) for k in files)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--optimizer", "adamw_schedulefree", "--lr_scheduler", "cosine"], "takes no --lr_scheduler"),
        (["--optimizer", "adamw_schedulefree", "--ema_decay", "0.99"], "its weights are an average already"),
    ],
)
def test_schedule_free_with_a_schedule_or_an_average_is_refused(
    tiny_model_dir, tiny_cache_dir, flags, message, capsys
):
    with pytest.raises(SystemExit):
        train_zimage_lora.parse_args(
            ["--pretrained_model_name_or_path", str(tiny_model_dir), "--precomputed_dir", str(tiny_cache_dir), *flags]
        )
    assert message in capsys.readouterr().err


def test_schedule_free_under_deepspeed_is_refused():
    """Under ZeRO the optimiser steps DeepSpeed's own copies of the weights: its average would never reach the
    model, so the LoRA saved and sampled would not be it."""
    from argparse import Namespace

    from zimage_utils.optimizers import optimizer_and_schedule

    model = torch.nn.Linear(4, 4)
    args = Namespace(optimizer="adamw_schedulefree", learning_rate=LR, adam_weight_decay=0.0, adam_beta1=0.9)
    args.__dict__.update(adam_beta2=0.999, adam_epsilon=1e-8, loraplus_lr_ratio=0.0, lr_warmup_steps=0)
    args.__dict__.update(lr_scheduler="constant", lr_num_cycles=1, lr_power=1.0, optimizer_args=None, ema_decay=None)
    optimizer, _ = optimizer_and_schedule(args, list(model.parameters()), model, 10, 1, 0, False)
    assert type(optimizer).__name__ == "AdamWScheduleFree"
    with pytest.raises(ValueError, match="schedule-free.* does not work under DeepSpeed: use DDP"):
        optimizer_and_schedule(args, list(model.parameters()), model, 10, 2, 2, False)
    # another schedule-free class, given by its import path, is known by its train/eval modes
    args.optimizer, args.optimizer_args = "schedulefree.SGDScheduleFree", ["warmup_steps=2"]
    optimizer, _ = optimizer_and_schedule(args, list(model.parameters()), model, 10, 1, 0, False)
    assert "train_mode" in optimizer.param_groups[0] and optimizer.param_groups[0]["warmup_steps"] == 2
    with pytest.raises(ValueError, match="SGDScheduleFree .schedule-free. does not work under DeepSpeed"):
        optimizer_and_schedule(args, list(model.parameters()), model, 10, 2, 2, False)
    args.lr_warmup_steps = 5
    with pytest.raises(ValueError, match="is schedule-free: .*give its own: --optimizer_args warmup_steps=N"):
        optimizer_and_schedule(args, list(model.parameters()), model, 10, 1, 0, False)

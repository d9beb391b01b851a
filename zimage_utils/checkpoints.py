"""`checkpoint-{step}` folders: finding the latest, pruning to a limit, the loop position stored beside
accelerate's state (optimiser, scheduler, RNG), so resume continues on the exact next batch, and when to save
besides every --checkpointing_steps (`SaveTriggers`)."""

import json
import re
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import safetensors
import torch

from .cli import write_text_atomic
from .ema import EMA_STATE_NAME

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TRAINING_STATE_NAME = "training_state.json"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Finished checkpoint folders, oldest first (half-written ones carry a temporary name and are skipped)."""
    output_dir = Path(output_dir)
    if not output_dir.exists():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name))]
    return [p for _, p in sorted(found) if (p / TRAINING_STATE_NAME).exists()]


def check_new_run(output_dir: str | Path, resume_from: str | None) -> None:
    """A run that does not resume must not start in a folder holding another run's checkpoints: its own would mix
    with them, and a later `--resume_from_checkpoint latest` could pick the other run's newest."""
    if resume_from is None and (found := list_checkpoints(output_dir)):
        raise ValueError(
            f"{output_dir} holds checkpoints of an earlier run ({', '.join(p.name for p in found[-3:])}): continue "
            "it with --resume_from_checkpoint latest, or give this run a new --output_dir"
        )
    if resume_from is None and (Path(output_dir) / "train_log.jsonl").exists():  # (its losses and samples would mix)
        raise ValueError(
            f"{output_dir} holds an earlier run (its train_log.jsonl and samples, no checkpoint to continue from): "
            "give this run a new --output_dir, or remove them"
        )


SUPERSEDED_DIR = "superseded"  # OUTPUT/superseded/after-checkpoint-N-TIME/: what a run resumed from checkpoint-N left


def later_checkpoints(output_dir: str | Path, resume: Path | None) -> list[Path]:
    """The finished checkpoints in `output_dir` after `resume` (saved by the run a resume from an older one goes
    back on)."""
    return [p for p in list_checkpoints(output_dir) if _step(p) > _step(resume)] if resume is not None else []


def set_aside_later_checkpoints(output_dir: str | Path, resume: Path | None) -> Path | None:
    """Move `later_checkpoints` into OUTPUT/superseded/after-<resume>-<time>/ (main process, before the resumed run
    saves): left in place, --checkpoints_total_limit would prune the new run's checkpoints before them, and
    `--resume_from_checkpoint latest` after an interruption would go back to the run that was left. Returns the
    folder they went to (None: there were none)."""
    later = later_checkpoints(output_dir, resume)
    if not later:
        return None
    aside = Path(output_dir) / SUPERSEDED_DIR / f"after-{resume.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    aside.mkdir(parents=True)
    for checkpoint in later:
        checkpoint.rename(aside / checkpoint.name)
    return aside


def _step(checkpoint: Path) -> int:
    """A checkpoint folder's optimiser step (its name's number; another folder's: its training_state.json's)."""
    found = CHECKPOINT_PATTERN.match(checkpoint.name)
    return int(found.group(1)) if found else read_training_state(checkpoint)["global_step"]


def resolve_resume_path(output_dir: str | Path, resume_from: str | None) -> Path | None:
    """`latest` → the newest finished checkpoint in output_dir (None if there is none); a path → that path, or, when
    nothing is there, that name inside output_dir (diffusers' examples take `checkpoint-500` so)."""
    if resume_from is None:
        return None
    if resume_from == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume_from)
    if not path.exists() and (Path(output_dir) / path).exists():
        path = Path(output_dir) / path
    if not path.exists():
        raise FileNotFoundError(
            f"--resume_from_checkpoint {resume_from}: no such folder (nor in {output_dir}); pass a checkpoint-N "
            "folder of a previous run, or latest"
        )
    if not (path / TRAINING_STATE_NAME).exists():
        raise FileNotFoundError(
            f"{path} is not a finished checkpoint (no {TRAINING_STATE_NAME}): pass a checkpoint-N folder "
            "from a previous run, or --resume_from_checkpoint latest."
        )
    return path


def prune_checkpoints(output_dir: str | Path, total_limit: int | None) -> list[Path]:
    """After a checkpoint is finished (never before: a save cut short must leave the previous one), delete the oldest
    finished ones beyond `total_limit`, and the unfinished ones older than the newest finished (saves cut short);
    returns what was removed. Each loses its finished mark first, so a removal cut short leaves no half-deleted
    folder that looks finished."""
    if not total_limit or total_limit <= 0:
        return []
    found = list_checkpoints(output_dir)
    removed = found[: max(len(found) - total_limit, 0)]
    if found:
        newest = checkpoint_step(found[-1])
        removed += [p for p in Path(output_dir).iterdir() if is_unfinished(p) and checkpoint_step(p) < newest]
    for path in removed:
        mark_unfinished(path)
        shutil.rmtree(path)
    return removed


def remove_stale_temporaries(output_dir: str | Path) -> list[Path]:
    """The files a killed run left under a temporary name (`.NAME.tmp…`: its final LoRA, card, samples) in
    `output_dir` and its samples/, removed; only while this run holds the folder's lock (no other run writes there).
    Returns what was removed."""
    output_dir = Path(output_dir)
    stale = [p for d in (output_dir, output_dir / "samples") for p in d.glob(".*.tmp*") if p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def checkpoint_step(path: Path) -> int:
    return int(CHECKPOINT_PATTERN.match(path.name).group(1))


def is_unfinished(path: Path) -> bool:
    """A checkpoint-N folder whose save did not finish (no training_state.json)."""
    return bool(CHECKPOINT_PATTERN.match(path.name)) and path.is_dir() and not (path / TRAINING_STATE_NAME).exists()


def mark_unfinished(checkpoint_dir: str | Path) -> None:
    """Before a checkpoint is (re)written: one of the same step left by an abandoned run (resumed from before it)
    loses its finished mark, so that a save cut short is never taken for a finished checkpoint."""
    (Path(checkpoint_dir) / TRAINING_STATE_NAME).unlink(missing_ok=True)


def write_training_state(checkpoint_dir: str | Path, state: dict[str, Any]) -> None:
    """Written last: its presence marks the checkpoint as finished."""
    write_text_atomic(Path(checkpoint_dir) / TRAINING_STATE_NAME, json.dumps(state, indent=2))


def read_training_state(checkpoint_dir: str | Path) -> dict[str, Any]:
    path = Path(checkpoint_dir) / TRAINING_STATE_NAME
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is damaged ({error}): {DAMAGED_ADVICE}") from None


DAMAGED_ADVICE = "delete that checkpoint folder to resume from the one before it"


LORA_STATE_NAME = "lora_state.safetensors"


def register_lora_state_hooks(accelerator, transformer_class: type) -> None:
    """Make `accelerator.save_state` store only the LoRA (unfolded, fp32, exact) instead of the 12 GB base, and
    `load_state` put it back. Same idiom as diffusers' training examples."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    from .distributed import deepspeed_stage, gathered_lora
    from .lora_io import DIFFUSERS_PREFIX, get_lora_state_dict, save_safetensors_atomic

    def is_transformer(model) -> bool:
        return isinstance(accelerator.unwrap_model(model), transformer_class)

    def save_hook(models, weights, output_dir):
        for i in reversed(range(len(models))):
            if is_transformer(models[i]):
                model = accelerator.unwrap_model(models[i])
                with gathered_lora(accelerator, model):  # every rank, under ZeRO-3
                    if accelerator.is_main_process:
                        state = get_lora_state_dict(model)
                        tensors = {k: v.to("cpu", copy=True).float().contiguous() for k, v in state.items()}
                        save_safetensors_atomic(tensors, Path(output_dir) / LORA_STATE_NAME)
                if weights:
                    weights.pop(i)

    def load_hook(models, input_dir):
        if deepspeed_stage(accelerator):  # DeepSpeed's own checkpoint restores the LoRA with its optimiser
            return
        for i in reversed(range(len(models))):
            if is_transformer(models[i]):
                model = accelerator.unwrap_model(models.pop(i))
                state = load_file(str(Path(input_dir) / LORA_STATE_NAME))
                own = get_lora_state_dict(model)
                check_same_lora(
                    input_dir, {k: v.shape for k, v in state.items()}, {k: v.shape for k, v in own.items()}
                )
                state = {k.removeprefix(DIFFUSERS_PREFIX): v for k, v in state.items()}
                result = set_peft_model_state_dict(model, state, adapter_name="default")
                if getattr(result, "unexpected_keys", None):
                    raise RuntimeError(f"{input_dir}: unexpected LoRA keys {result.unexpected_keys[:3]}…")

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def check_resume_fits(checkpoint: str | Path, model: torch.nn.Module, settings: dict) -> None:
    """Refuse, before the model loads (and in --dry_run), to resume from a `checkpoint` this run cannot: its LoRA
    (the file's header: modules and shapes) against `model`'s (a weightless one with the run's LoRA added), its
    optimiser `settings` against this run's (`check_same_settings`). A checkpoint without the LoRA file is left to
    the load, which names it."""
    from safetensors import safe_open

    from .lora_io import get_lora_state_dict

    path = Path(checkpoint) / LORA_STATE_NAME
    if not path.is_file():
        return
    try:
        with safe_open(str(path), "pt") as f:
            saved = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except (OSError, safetensors.SafetensorError) as error:
        raise ValueError(
            f"{checkpoint} could not be loaded ({str(error).splitlines()[0]}): {DAMAGED_ADVICE}"
        ) from None
    check_same_lora(checkpoint, saved, {key: tuple(t.shape) for key, t in get_lora_state_dict(model).items()})
    check_same_settings(checkpoint, read_training_state(checkpoint), settings)


def check_same_processes(accelerator, checkpoint: str | Path, state: dict) -> None:
    """Under DeepSpeed, refuse a checkpoint (its training_state.json `state`) saved by another number of processes:
    its optimiser state is split one part per process. Called before the model loads, and again on resuming."""
    from .distributed import deepspeed_stage

    saved = state.get("processes", accelerator.num_processes)  # older checkpoints: assumed unchanged
    if saved != accelerator.num_processes and deepspeed_stage(accelerator):
        raise ValueError(
            f"{checkpoint} was saved by {saved} processes, this run has {accelerator.num_processes}: DeepSpeed splits "
            f"the optimiser state across them. Resume with --num_processes {saved}, or continue its LoRA in a new "
            f"--output_dir with --init_lora {Path(checkpoint) / 'pytorch_lora_weights.safetensors'}."
        )


def check_same_settings(checkpoint: str | Path, state: dict, settings: dict) -> None:
    """Refuse a checkpoint saved with other `settings` (flag name → value, as written into its training_state.json
    `state`) than this run's: its optimiser state, or its LoRA's scale, would not fit. Flags absent from older checkpoints are not
    checked."""
    changed = {k: (state[k], v) for k, v in settings.items() if k in state and state[k] != v}
    if changed:
        was = " ".join(f"--{k} {old}" for k, (old, _) in changed.items())
        now = " ".join(f"--{k} {new}" for k, (_, new) in changed.items())
        raise ValueError(
            f"{checkpoint} was saved with {was}, this run has {now}: what it holds (the optimiser state, the LoRA at "
            "its scale) does not fit. Resume with the same flags, or start from its LoRA in a new --output_dir "
            "(--init_lora)."
        )


def check_same_lora(checkpoint: str | Path, saved: dict[str, tuple], own: dict[str, tuple]) -> None:
    """Refuse a checkpoint whose LoRA has other modules or shapes (name → shape) than this run's (another --rank,
    --lora_targets or --adapter; e.g. an earlier run in the same --output_dir), naming what differs."""
    if saved.keys() != own.keys():
        odd = sorted(saved.keys() ^ own.keys())[0]
        where = "the checkpoint" if odd in saved else "this run"
        raise ValueError(
            f"{checkpoint} holds a LoRA on other modules than this run's (e.g. {odd} only in {where}): resume with the "
            "--lora_targets, --lora_exclude_refiners and --adapter it was trained with, or give a new --output_dir"
        )
    for key, shape in saved.items():
        if tuple(shape) != tuple(own[key]):
            raise ValueError(
                f"{checkpoint} holds a LoRA of other shapes than this run's ({key}: {tuple(shape)}, here "
                f"{tuple(own[key])}): resume with the --rank (and --lokr_factor) it was trained with, or give "
                "a new --output_dir"
            )


def batch_layout(accelerator, batch_size: int) -> dict[str, int]:
    """What a checkpoint's position in the epoch counts in (written into training_state.json)."""
    return {"processes": accelerator.num_processes, "train_batch_size": batch_size}


# The optimiser settings a run's flags give each parameter group (initial_lr: --learning_rate, times LoRA+'s ratio
# in the B group). Loading a checkpoint's optimiser and scheduler state would bring back the saved run's values.
FLAG_HYPERPARAMETERS = {"initial_lr": "--learning_rate", "weight_decay": "--adam_weight_decay",
                        "betas": "--adam_beta1 --adam_beta2", "eps": "--adam_epsilon"}  # fmt: skip


def group_hyperparameters(optimizer, also: tuple[str, ...] = ()) -> list[dict]:
    """The flag-given settings of each parameter group, as this run made them (before a checkpoint is loaded); `also`:
    the keys --optimizer_args gave."""
    keys = [*FLAG_HYPERPARAMETERS, *also]
    return [{k: group[k] for k in keys if k in group} for group in optimizer.param_groups]


def restore_group_hyperparameters(schedule, flags: list[dict], given: tuple[str, ...] = ()) -> list[str]:
    """Put this run's settings back into the loaded optimiser's groups and the schedule's base rates, so that a
    resumed run follows its own --learning_rate, --adam_weight_decay, ... (loading the state restores the saved
    ones, silently). Returns what differed, as "--flag new (the checkpoint's: old)", or "key=new (...)" for the keys
    --optimizer_args `given`; the caller recomputes the rates."""
    changed = {}
    for group, own in zip(schedule.optimizer.param_groups, flags):
        for key, value in own.items():
            if group.get(key) != value:  # (LoRA+'s B group: the first group's value is the one reported)
                now = f"{key}={value}" if key in given else f"{FLAG_HYPERPARAMETERS[key]} {value}"
                changed.setdefault(key, f"{now} (the checkpoint's: {group.get(key)})")
                group[key] = value
    schedule.base_lrs = [own["initial_lr"] for own in flags]
    return list(changed.values())


# Flags a run may resume with others of (`resume_training`'s `noted`), and what the change means
NOTED_CHANGES = {
    "seed": "the run goes on from batch {batch} of a different epoch order (and other noise)",
    "training_adapter": "the LoRA goes on learning against another base (the one the adapter makes); the samples "
    "and the saved LoRA are without it, as before",
    "training_adapter_scale": "the LoRA goes on learning against another base (the adapter at another strength)",
}


def resume_training(
    accelerator,
    output_dir,
    resume_from: str | None,
    items: int,
    ema=None,
    log=print,
    settings: dict | None = None,
    batch_size: int = 1,
    lr_scheduler=None,
    noted: dict | None = None,
    optimizer_args: tuple[str, ...] = (),
):
    """Load `--resume_from_checkpoint` (a checkpoint-N folder or "latest") into the prepared objects: LoRA, optimiser,
    scheduler and RNG through accelerate (the hooks above), the LoRA average if `ema` is given. Returns (global step,
    epoch, next batch) to continue from; (0, 0, 0) without a checkpoint. `items`: training items an epoch now, to warn
    when the caches or --repeats changed since the checkpoint (the epoch order then differs). `settings`: flags
    (name → value, as written into training_state.json) the optimiser state depends on; a checkpoint saved with
    others is refused before anything is loaded (absent from older checkpoints: not checked). `noted`: flags (name →
    value) a run may go on with others of, which is said (`NOTED_CHANGES`). `optimizer_args`: the keys --optimizer_args
    gave, which this run's values also hold for.

    A checkpoint saved by another number of processes (or --train_batch_size) goes on after as many of the epoch's
    items as it had reached, and `lr_scheduler` (the prepared one: accelerate steps it once per process and step)
    at the schedule's point for the global step. Under DeepSpeed, whose optimiser state is split across processes,
    that is refused."""
    from .distributed import deepspeed_stage, weights_only_checkpoint_loads

    resume = resolve_resume_path(output_dir, resume_from)
    if resume is None:
        if resume_from:
            log(f"no checkpoint in {output_dir} to resume from: starting a new run")
        return 0, 0, 0
    state = read_training_state(resume)
    now = batch_layout(accelerator, batch_size)
    saved = {k: state.get(k, v) for k, v in now.items()}  # older checkpoints: assumed unchanged
    check_same_processes(accelerator, resume, state)
    check_same_settings(resume, state, settings or {})
    weights_only_checkpoint_loads(accelerator)
    schedule = getattr(lr_scheduler, "scheduler", lr_scheduler)
    flags = group_hyperparameters(schedule.optimizer, optimizer_args) if schedule is not None else None
    # DeepSpeed checkpoints hold only the LoRA (frozen base excluded), hence non-strict module loading
    try:
        accelerator.load_state(str(resume), **({"load_module_strict": False} if deepspeed_stage(accelerator) else {}))
    except (RuntimeError, OSError, EOFError, safetensors.SafetensorError) as error:  # a truncated or damaged file
        if isinstance(error, torch.OutOfMemoryError):
            raise
        raise ValueError(f"{resume} could not be loaded ({str(error).splitlines()[0]}): {DAMAGED_ADVICE}") from None
    if ema is not None:
        ema.load(resume)
    elif (Path(resume) / EMA_STATE_NAME).exists():
        log(f"note: {resume} holds a LoRA average (--ema_decay); this run has none, so the average is not continued")
    step, epoch, next_batch = state["global_step"], state["epoch"], state["next_batch"]
    if saved != now:
        was, is_now = (v["train_batch_size"] * v["processes"] for v in (saved, now))
        log(
            f"note: {resume} was saved by {saved['processes']} process(es) with batches of {saved['train_batch_size']}, "
            f"this run has {now['processes']} with {now['train_batch_size']}: it goes on after the {next_batch * was} "
            "items its epoch had reached, in a different epoch order"
        )
        next_batch = next_batch * was // is_now
    changed = restore_group_hyperparameters(schedule, flags, optimizer_args) if schedule is not None else []
    if changed:
        log(f"note: resuming from {resume} with other optimiser settings, which apply from here: {'; '.join(changed)}")
    if schedule is not None and saved["processes"] != now["processes"]:
        schedule.last_epoch = step * now["processes"] - 1
        schedule.step()  # sets the optimiser's learning rates for the new position
    elif changed:
        schedule.last_epoch -= 1
        schedule.step()  # the same position, at this run's base rates
    position = step, epoch, next_batch
    if state.get("items", items) != items:
        log(
            f"warning: {resume} was trained on {state['items']} items an epoch, the caches now give {items}: the run "
            f"goes on from batch {position[2]} of a different epoch order"
        )
    for flag, value in (noted or {}).items():
        old = state.get(flag, value)
        if old != value and None not in (old, value):  # (None: the flag does not apply to one of the runs)
            log(
                f"note: {resume} was trained with --{flag} {old if old != '' else '(none)'}, this run has --{flag} "
                f"{value if value != '' else '(none)'}: " + NOTED_CHANGES[flag].format(batch=position[2])
            )
    log(f"resumed from {resume}: step {position[0]}, epoch {position[1]}, batch {position[2]}")
    return position


class SaveTriggers:
    """Saves besides --checkpointing_steps: SIGTERM/SIGINT (preemption sends SIGTERM) let the current step finish,
    then save and stop; --checkpointing_minutes saves when that much time has passed since the last save.

    Installs the signal handlers (the caller restores its own afterwards). With several processes every rank must
    agree before anyone saves: the flags are reduced at each step and read one step later, which waits only for the
    previous step (finished on the GPU by then), not for the one just queued."""

    def __init__(self, accelerator, minutes: float, step: int):
        self.accelerator, self.minutes = accelerator, minutes
        self.signalled, self.vote = False, None
        self.saved(step)
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, self._request_stop)

    def _request_stop(self, signum, frame) -> None:
        self.signalled = True

    def saved(self, step: int) -> None:
        """A checkpoint of optimiser step `step` was just written."""
        self.last_step, self.last_time = step, time.time()

    def stop_now(self) -> bool:
        """Whether a stop signal came to any process, asked where they are in step anyway (after validation, which can
        outlast a preemption's grace period): without `poll`'s one-step lag. Collective with several processes."""
        if self.accelerator.num_processes == 1:
            return self.signalled
        vote = torch.tensor([float(self.signalled)], device=self.accelerator.device)
        return bool(self.accelerator.reduce(vote, "max").item())

    def poll(self, step: int) -> tuple[bool, bool]:
        """(stop, save now) after optimiser step `step`, the same on every process (a collective call then)."""
        stop, due = self.signalled, 0 < self.minutes <= (time.time() - self.last_time) / 60
        if self.accelerator.num_processes > 1:
            vote = torch.tensor([float(stop), float(due)], device=self.accelerator.device)
            self.vote, previous = self.accelerator.reduce(vote, "max"), self.vote
            stop, due = [bool(v) for v in previous.tolist()] if previous is not None else (False, False)
            due = due and self.last_step < step - 1  # (a vote cast before the last save)
        return stop, due

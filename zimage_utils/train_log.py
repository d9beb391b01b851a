"""What the trainer logs every --logging_steps, and OUTPUT/train_log.jsonl.

The loss of each micro-batch stays on the device until a logging step reads the whole window at once, so training
never waits on a host sync per step. A non-finite loss is recorded there too, with the step it first appeared at,
and reported at the next read, before any checkpoint could save the broken LoRA.
"""

import argparse
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from .cli import write_text_atomic
from .flow_matching import SigmaBinMeter
from .plots import read_log

# A step's optional loss terms (`flow_matching_step`'s outputs of these names), logged as "loss/TERM":
# --preservation_weight and --blank_preservation_weight's "preservation", --mask_prior_weight's "mask_prior"
LOSS_TERMS = ("preservation", "mask_prior")


class LogWindow:
    """The losses since the last logging step, on `device`, reduced over processes by `read`.

    Every process calls `add` for each micro-batch and `read` at the same logging steps (it is collective)."""

    def __init__(self, device: torch.device | str, start_step: int, num_bins: int = 5):
        self.meter = SigmaBinMeter(num_bins, device=device)
        self.loss_sum = torch.zeros((), device=device)
        self.term_sums = torch.zeros(len(LOSS_TERMS), device=device)  # the steps' optional loss terms, and how
        self.term_counts = torch.zeros(len(LOSS_TERMS), device=device)  # many micro-batches had each
        self.batches = 0
        self.first_bad_step = torch.full((), -1, device=device)  # -1: every loss so far was finite
        self.start_time, self.start_step = time.time(), start_step

    def add(self, out: dict[str, torch.Tensor], step: int) -> None:
        """One micro-batch's `flow_matching_step` output; `step`: the optimiser step it belongs to (1-based)."""
        loss = out["loss"].detach()
        self.meter.update(out["sigma"], out["per_sample"])
        self.loss_sum += loss
        for k, term in enumerate(LOSS_TERMS):
            if term in out:
                self.term_sums[k] += out[term]
                self.term_counts[k] += 1
        self.batches += 1
        bad = ~torch.isfinite(loss)
        self.first_bad_step = torch.where(bad & (self.first_bad_step < 0), step, self.first_bad_step)

    @contextmanager
    def paused(self):
        """Time spent inside (a checkpoint, validation) does not count against steps_per_s."""
        start = time.time()
        try:
            yield
        finally:
            self.start_time += time.time() - start

    def read(self, accelerator, step: int, resume_from: Path) -> dict[str, float]:
        """The window's logs, over every micro-batch of every process: "loss" (mean), "steps_per_s" and the mean loss
        per sigma bin ("loss/sigma_0.0-0.2", ...), "loss/TERM" for each of `LOSS_TERMS` some micro-batch had (its
        mean, unweighted); on CUDA also the largest "peak_mem_gib" (allocated) and
        "peak_reserved_gib" (what the card must hold) over all GPUs. Starts the next window.

        Raises FloatingPointError naming the first step whose loss was not finite (on any process)."""
        bad_step = int(accelerator.reduce(self.first_bad_step.float(), "max").item())
        if bad_step >= 0:
            raise FloatingPointError(
                f"the loss became non-finite at step {bad_step}; no checkpoint was written after it. Lower "
                f"--learning_rate, keep --max_grad_norm on, or resume from the last checkpoint in {resume_from}."
            )
        mean_loss = (self.loss_sum / max(self.batches, 1)).view(1)
        sums = accelerator.reduce(torch.cat([mean_loss, self.term_sums, self.term_counts]), "sum").tolist()
        loss, terms = sums[0] / accelerator.num_processes, len(LOSS_TERMS)
        term_sums, term_counts = sums[1 : 1 + terms], sums[1 + terms :]
        self.meter.sums = accelerator.reduce(self.meter.sums, "sum")
        self.meter.counts = accelerator.reduce(self.meter.counts, "sum")
        now = time.time()
        logs = {
            "loss": loss,
            "steps_per_s": (step - self.start_step) / max(now - self.start_time, 1e-9),
            **self.meter.compute(),
            **{f"loss/{t}": total / n for t, total, n in zip(LOSS_TERMS, term_sums, term_counts, strict=True) if n},
        }
        if torch.cuda.is_available():
            peaks = torch.tensor([torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()]) / 2**30
            peaks = accelerator.reduce(peaks.to(accelerator.device), "max")
            logs["peak_mem_gib"], logs["peak_reserved_gib"] = peaks.tolist()
        self.meter.reset()
        self.loss_sum.zero_()
        self.term_sums.zero_()
        self.term_counts.zero_()
        self.batches = 0
        self.start_time, self.start_step = now, step
        return logs


def append_jsonl(path: Path, record: dict) -> None:
    """One line per logging step (and one per validation with a held-out loss): the loss curves users can plot
    (OUTPUT/loss_per_sigma.png draws them), and what tests compare across runs."""
    with open(path, "a+b") as f:
        if f.tell() and (f.seek(-1, 2), f.read(1))[1] != b"\n":  # a line cut short: this record starts a new one
            f.write(b"\n")
        f.write((json.dumps(record) + "\n").encode())


def lowest_held_out_loss(output_dir: Path) -> str | None:
    """After a run with --validation_split: the step of its lowest held-out loss ("val/loss" in train_log.jsonl), and
    which LoRA files hold that step's LoRA (the final ones, or a checkpoint's if it was kept). None without a
    held-out loss. The lowest is a hint, not a verdict: on a few held-out images the loss is noisy."""
    path = Path(output_dir) / "train_log.jsonl"
    records = [r for r in read_log(path) if "val/loss" in r] if path.is_file() else []
    if not records:
        return None
    best, last = min(records, key=lambda r: r["val/loss"]), records[-1]
    line = f"held-out loss lowest at step {best['step']} ({best['val/loss']:.4f}"
    if best is last:
        return line + "): the final LoRA files hold it"
    line += f"; {last['val/loss']:.4f} at the last validation, step {last['step']})"
    checkpoint = Path(output_dir) / f"checkpoint-{best['step']}"
    if checkpoint.is_dir():
        return f"{line}: {checkpoint} holds that LoRA (pytorch_lora_weights*.safetensors), if its samples agree"
    return f"{line}: no checkpoint of that step was kept (--checkpointing_steps, --checkpoints_total_limit)"


WANDB_ID_NAME = "wandb_run_id.txt"


def add_tracker_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The trainer's --report_to, --tracker_project_name and --tracker_run_name, on `parser` (or an argument group)."""
    parser.add_argument("--report_to", default="tensorboard", help="tensorboard | wandb | none")
    parser.add_argument(
        "--tracker_project_name",
        default="zimage-lora",
        help="The tracker's project (wandb) or run folder under OUTPUT/logs (TensorBoard).",
    )
    parser.add_argument(
        "--tracker_run_name",
        default=None,
        help="wandb's run name (default: the --output_dir folder's name). A resumed run goes on in the same wandb run.",
    )


def start_trackers(accelerator, args: argparse.Namespace, output_dir: Path) -> None:
    """accelerate's trackers for --report_to, given the run's flags as its config (main process only)."""
    # Trackers take scalars and strings only (tensorboard's hparams refuse lists)
    hparams = {k: ",".join(map(str, v)) if isinstance(v, (list, tuple)) else v for k, v in vars(args).items()}
    try:
        accelerator.init_trackers(
            args.tracker_project_name,
            config={k: v for k, v in hparams.items() if v is not None},
            init_kwargs=tracker_init_kwargs(args.report_to, output_dir, args.tracker_run_name),
        )
    except Exception as error:  # (wandb not installed, not logged in, no network: each its own exception type)
        wandb = "; run `wandb login` (or set WANDB_API_KEY, or WANDB_MODE=offline to log locally)"
        fix = wandb if args.report_to == "wandb" else ""
        raise ValueError(
            f"--report_to {args.report_to} could not start ({type(error).__name__}: {error}){fix}, or pass "
            "--report_to tensorboard or none"
        ) from error


def tracker_init_kwargs(report_to: str, output_dir: Path, run_name: str | None = None) -> dict[str, dict]:
    """accelerate's `init_trackers(init_kwargs=...)`. For wandb: the run's name (default: the output folder's), its
    files under OUTPUT/logs rather than ./wandb, and one run id per output folder, kept in OUTPUT/logs/wandb_run_id.txt,
    so that a resumed run (or one stopped and started again) goes on in the same wandb run instead of a new one.
    Other trackers need nothing: TensorBoard's events already go on in OUTPUT/logs. Call on the main process."""
    if report_to not in ("wandb", "all"):
        return {}
    logs = Path(output_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    path = logs / WANDB_ID_NAME
    if not path.is_file():
        write_text_atomic(path, f"{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(4).hex()}\n")
    run_id = path.read_text().strip()
    name = run_name or Path(output_dir).resolve().name
    return {"wandb": {"id": run_id, "resume": "allow", "name": name, "dir": str(logs)}}

"""What the trainer does differently under DeepSpeed: set up its process group without GPUs, tell it the micro-batch
size (our DataLoader is not prepared by accelerate), and gather only the LoRA parameters, on every rank, before
reading them under ZeRO-3."""

import copy
import os
import re
from contextlib import contextmanager

import torch
from accelerate.utils import DistributedType, InitProcessGroupKwargs


def deepspeed_requested() -> bool:
    """True when `accelerate launch` was given a DeepSpeed config (it says so in the environment)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def process_group_kwargs() -> list[InitProcessGroupKwargs]:
    """Accelerator kwargs_handlers. Without GPUs accelerate picks no backend for DeepSpeed and sets up no process
    group among the launched processes: name gloo (CPU test runs). With GPUs, or not launched: none."""
    launched = "LOCAL_RANK" in os.environ  # set by `accelerate launch` (torchrun) in every process
    if deepspeed_requested() and launched and not torch.cuda.is_available():
        return [InitProcessGroupKwargs(backend="gloo")]
    return []


def check_deepspeed_active(accelerator) -> None:
    """A DeepSpeed config launched with ACCELERATE_USE_CPU=1 or `use_cpu: true` runs as plain DDP: accelerate drops
    DeepSpeed without a word, and a ZeRO-3 user would get a full model copy per process. Refuse instead."""
    if deepspeed_requested() and accelerator.distributed_type != DistributedType.DEEPSPEED:
        raise RuntimeError(
            "the accelerate config asks for DeepSpeed, but ACCELERATE_USE_CPU=1 or `use_cpu: true` turned it off: "
            "accelerate would train without it, each process holding the whole model. Launch DeepSpeed configs "
            "without them (on a machine without GPUs the trainer then runs DeepSpeed on the CPU, over gloo)."
        )


def deepspeed_stage(accelerator) -> int:
    """0 when not running under DeepSpeed, else its ZeRO stage (1, 2 or 3)."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return 0
    return int(accelerator.state.deepspeed_plugin.zero_stage)


def configure_deepspeed(accelerator, micro_batch_size: int, max_live_parameters: int = 0) -> None:
    """DeepSpeed needs the per-GPU micro-batch size before `prepare`; accelerate reads it from a prepared
    DataLoader, which ours is not (our sampler shards the data itself).

    max_live_parameters (ZeRO-3): how many gathered parameters a GPU may hold at once, also the distance within
    which a parameter about to be reused is kept (0 = DeepSpeed's defaults, 1e9 each: 2 GiB of bf16 weights, which
    matters on the small cards offload is for). A value set in a DeepSpeed config file wins."""
    if not deepspeed_stage(accelerator):
        return
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    config["train_micro_batch_size_per_gpu"] = micro_batch_size
    # With optimiser offload DeepSpeed insists on its own CPU Adam (a C++ op compiled on first use); the LoRA's
    # few million parameters are handled fine by torch's AdamW on the CPU.
    config["zero_force_ds_cpu_optimizer"] = False
    if deepspeed_stage(accelerator) == 3 and max_live_parameters > 0:
        zero = config.setdefault("zero_optimization", {})
        zero.setdefault("stage3_max_live_parameters", max_live_parameters)
        zero.setdefault("stage3_max_reuse_distance", max_live_parameters)


# What DeepSpeed's checkpoints of a LoRA hold besides tensors and plain containers (ZeRO-2 and -3, fp32/bf16/fp16).
DEEPSPEED_CHECKPOINT_CLASSES = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


def weights_only_checkpoint_loads(accelerator) -> None:
    """Make DeepSpeed read its checkpoints as accelerate reads the others, weights only (`weights_only_load`).
    DeepSpeed itself unpickles them whole (`weights_only=False`), which runs any code a file names: a checkpoint
    downloaded from elsewhere could. Elsewhere: nothing."""
    if deepspeed_stage(accelerator):
        accelerator.deepspeed_engine_wrapped.engine.checkpoint_engine.load = weights_only_load


def weights_only_load(path, map_location=None):
    """`torch.load(weights_only=True)` allowing `DEEPSPEED_CHECKPOINT_CLASSES` too; a file holding anything else is
    refused with a ValueError that names it and says how to keep the checkpoint's LoRA."""
    import importlib
    import pickle

    allowed = []
    for name in DEEPSPEED_CHECKPOINT_CLASSES:
        module, _, attribute = name.rpartition(".")
        allowed.append(getattr(importlib.import_module(module), attribute))
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        refused = re.search(r"GLOBAL ([\w.]+)", str(error))
        raise ValueError(
            f"{path} holds {refused[1] if refused else 'objects'}, which this trainer's DeepSpeed checkpoints do not; "
            "it is not loaded, as unpickling it could run code. To keep the checkpoint's LoRA, start a new "
            "--output_dir with --init_lora on its pytorch_lora_weights.safetensors."
        ) from None


def optimizer_offloaded(accelerator) -> bool:
    """True when DeepSpeed keeps the optimiser state in CPU memory (then the optimiser cannot be CUDA-fused)."""
    if not deepspeed_stage(accelerator):
        return False
    zero = accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {})
    return zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None)


@contextmanager
def gathered_lora(accelerator, model):
    """Inside the block every rank holds the full LoRA tensors (ZeRO-3 otherwise keeps a shard per rank, and a
    LoRA saved from a shard is empty — a known failure of other trainers). Only the trainable parameters are
    gathered, never the frozen 12 GB base. Every rank must enter it. Elsewhere it does nothing."""
    if deepspeed_stage(accelerator) != 3:
        yield
        return
    import deepspeed

    params = [p for p in model.parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


def partition_for_zero3(accelerator, model) -> None:
    """Under ZeRO-3, partition the (CPU-resident) model's parameters across ranks now, one parameter at a time,
    so that no GPU ever holds the whole 12 GB base — DeepSpeed would otherwise move the full module to each GPU
    before partitioning it (with parameter offload the shards go to CPU memory instead). Elsewhere: nothing."""
    if deepspeed_stage(accelerator) != 3:
        return
    import deepspeed

    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    # zero.Init validates the whole config; batch sizes that accelerate leaves as "auto" are not known yet and do
    # not matter for partitioning (accelerate's own zero3 init for transformers does the same).
    config.pop("train_batch_size", None)
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        if config.get(key) == "auto":
            config[key] = 1
    deepspeed.zero.Init(module=model, config_dict_or_path=config)


def skip_frozen_in_ddp(model) -> None:
    """Let DDP leave the frozen base alone. When it wraps the model it broadcasts every parameter from rank 0 (the
    whole 12 GB base, or fp8/NF4 tensors it was not written for), and its buffers (fp8_matmul's weight scales)
    before every forward; every process loaded the same base, so only the LoRA parameters need to be in sync.
    Harmless without DDP."""
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    frozen += [name for name, _ in model.named_buffers()]
    torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)


def check_process_group(accelerator) -> None:
    """Refuse a launch whose processes did not join one group: `accelerate launch --multi_gpu` on a machine
    without GPUs starts N lone processes that would each do all the work and overwrite each other's files."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise RuntimeError(
            f"{launched} processes were launched but accelerate set up {accelerator.num_processes} (no GPU found?). "
            "Without GPUs, launch with ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N ... "
            "(`accelerate launch --cpu` starts a single process whatever --num_processes says)."
        )

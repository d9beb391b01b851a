"""`--push_to_hub`: the finished LoRA, its model card and samples uploaded to a Hugging Face model repo, as diffusers'
training examples do. Whatever can be checked is checked when the run starts (online, logged in, the repo made or
there), not after hours of training; an upload that fails at the end leaves every file in the output folder and
says how to upload them by hand."""

import argparse
from pathlib import Path

# What goes up: the two LoRA files, the model card and what it shows. Not the checkpoints, logs or run_config.yaml
# (local paths).
HUB_FILES = [
    "pytorch_lora_weights.safetensors",
    "pytorch_lora_weights_comfyui.safetensors",
    "README.md",
    "samples/*.png",
    "loss_per_sigma.png",
]


def add_hub_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The trainer's --push_to_hub, --hub_model_id and --hub_private, on `parser` (or one of its argument groups)."""
    parser.add_argument(
        "--push_to_hub",
        action="store_true",
        help="At the end, upload the LoRA files, model card and samples to a hub model repo (login and repo checked "
        "when the run starts; log in with `hf auth login` or HF_TOKEN).",
    )
    parser.add_argument(
        "--hub_model_id",
        default=None,
        help="The repo for --push_to_hub: NAME (under your account) or ORG/NAME. Default: the --output_dir folder's "
        "name.",
    )
    parser.add_argument("--hub_private", action="store_true", help="Create the --push_to_hub repo private.")


def hub_repo_id(model_id: str | None, output_dir: str | Path) -> str:
    """The full repo id ("user/name" or "org/name") that `--hub_model_id` (None: the output folder's name) stands
    for, after checking that the hub can be reached and a token is there. Raises ValueError saying what to fix."""
    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        raise ValueError("--push_to_hub needs the network, and HF_HUB_OFFLINE is set: unset it, or drop --push_to_hub")
    try:
        user = HfApi().whoami()["name"]
    except Exception as error:  # no token, a revoked one, no network: the hub client raises each its own way
        raise ValueError(
            f"--push_to_hub: the Hugging Face hub did not accept this machine ({first_line(error)}): log in "
            "with `hf auth login` or set HF_TOKEN (a token that can write), or drop --push_to_hub"
        ) from None
    name = model_id or Path(output_dir).resolve().name
    return name if "/" in name else f"{user}/{name}"


def prepare_hub_repo(args: argparse.Namespace, output_dir: str | Path) -> str:
    """--push_to_hub's checks when the run starts (main process): resolves `args.hub_model_id` to the full repo id
    (see `hub_repo_id`) and, unless --dry_run, makes the repo. Returns the line to print."""
    args.hub_model_id = hub_repo_id(args.hub_model_id, output_dir)
    if args.metadata_license:
        check_card_license(args.metadata_license)
    if args.dry_run:
        return f"--push_to_hub: logged in; the end of the run would upload to {args.hub_model_id}"
    return f"--push_to_hub: uploading to {create_hub_repo(args.hub_model_id, args.hub_private)} at the end"


def check_card_license(license: str) -> None:
    """The hub refuses to commit a model card whose `license` is not one of its licence ids, and so would refuse the
    upload at the end of the run: ask it now (its card check, online) whether `--metadata_license` is one."""
    from huggingface_hub import ModelCard, ModelCardData

    try:
        ModelCard(f"---\n{ModelCardData(license=license).to_yaml()}\n---\n").validate()
    except ValueError as error:  # (the hub's 400 answer: what it refused)
        raise ValueError(
            f"--metadata_license {license}: the hub takes only its licence ids in a model card ({first_line(error)}): "
            "give one such as apache-2.0 or cc-by-nc-4.0 (huggingface.co/docs/hub/repositories-licenses), or other"
        ) from None


def create_hub_repo(repo_id: str, private: bool = False) -> str:
    """Make the model repo (an existing one is kept as it is); returns its URL."""
    from huggingface_hub import HfApi

    try:
        return str(HfApi().create_repo(repo_id, private=private or None, exist_ok=True))
    except Exception as error:
        raise ValueError(
            f"--push_to_hub: cannot create or use the repo {repo_id} ({first_line(error)}): give "
            "--hub_model_id a repo your token may write to"
        ) from None


def push_to_hub(repo_id: str, output_dir: str | Path, step: int) -> str:
    """Upload `HUB_FILES` from `output_dir` in one commit; returns the commit's URL."""
    from huggingface_hub import HfApi

    try:
        commit = HfApi().upload_folder(
            repo_id=repo_id,
            folder_path=output_dir,
            allow_patterns=HUB_FILES,
            commit_message=f"Z-Image LoRA after {step} steps",
        )
    except Exception as error:
        patterns = " ".join(f"--include '{p}'" for p in HUB_FILES)
        raise ValueError(
            f"uploading to {repo_id} failed ({first_line(error)}); the files are all in {output_dir}: "
            f"upload them with `hf upload {repo_id} {output_dir} . {patterns}`"
        ) from None
    return str(commit.commit_url)


def first_line(error: Exception) -> str:
    """An exception's message in one line, for an error that quotes it (the class name when it has none)."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]

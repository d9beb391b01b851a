"""`--push_to_hub`, against a stand-in for the hub's HTTP API (no network in tests): what is checked when the run
starts, what is uploaded when it ends, and what a failed upload leaves."""

import inspect
import types

import huggingface_hub
import pytest
from huggingface_hub.utils import filter_repo_objects
from test_trainer import reset_accelerate, train

from zimage_utils.lora_io import load_lora_file


class FakeHub:
    """HfApi's whoami / create_repo / upload_folder, recording their calls; `upload_error` makes the upload fail."""

    def __init__(self, monkeypatch, user="someone", upload_error=None):
        self.calls, self.uploaded, self.upload_error = [], None, upload_error
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # (the env var stays set)
        hub = self

        def whoami(api, *args, **kwargs):
            hub.calls.append(("whoami",))
            if user is None:
                raise huggingface_hub.errors.LocalTokenNotFoundError("Token is required ... `hf auth login`")
            return {"name": user}

        def create_repo(api, repo_id, *, private=None, exist_ok=False, **kwargs):
            hub.calls.append(("create_repo", repo_id, private, exist_ok))
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(api, *, repo_id, folder_path, allow_patterns=None, commit_message=None, **kwargs):
            hub.calls.append(("upload_folder", repo_id, folder_path, commit_message))
            if hub.upload_error:
                raise hub.upload_error
            files = [p.relative_to(folder_path).as_posix() for p in folder_path.rglob("*") if p.is_file()]
            hub.uploaded = {
                f: (folder_path / f).read_bytes() for f in filter_repo_objects(files, allow_patterns=allow_patterns)
            }
            return types.SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/0123abc")

        for name, method in (("whoami", whoami), ("create_repo", create_repo), ("upload_folder", upload_folder)):
            monkeypatch.setattr(
                huggingface_hub.HfApi, name, checked_against(getattr(huggingface_hub.HfApi, name), method)
            )

        def validate(card, repo_type=None):  # the hub's card check: a licence must be one of its ids
            hub.calls.append(("validate", card.data.license))
            if card.data.license not in ("apache-2.0", "mit", "other"):
                raise ValueError('"license" must be one of [apache-2.0, mit, ..., other]')

        monkeypatch.setattr(
            huggingface_hub.RepoCard, "validate", checked_against(huggingface_hub.RepoCard.validate, validate)
        )


def checked_against(real, fake):
    """`fake`, called only with arguments the real HfApi method takes (a renamed keyword fails the test)."""
    signature = inspect.signature(real)

    def call(api, *args, **kwargs):
        signature.bind(api, *args, **kwargs)
        return fake(api, *args, **kwargs)

    return call


FLAGS = dict(max_train_steps=2, checkpointing_steps=1, validation_steps=1, push_to_hub=True)


def test_the_finished_lora_its_card_and_samples_are_uploaded_and_not_the_checkpoints(
    tiny_model_dir, tiny_cache_dir, tmp_path, monkeypatch
):
    hub = FakeHub(monkeypatch)
    output = tmp_path / "my-lora"
    train(tiny_model_dir, tiny_cache_dir, output, **FLAGS)
    assert [c[0] for c in hub.calls] == ["whoami", "create_repo", "upload_folder"]
    assert hub.calls[1] == ("create_repo", "someone/my-lora", None, True)  # the folder's name, in the user's space
    assert hub.calls[2][1:] == ("someone/my-lora", output, "Z-Image LoRA after 2 steps")
    uploaded = set(hub.uploaded)
    assert {"pytorch_lora_weights.safetensors", "pytorch_lora_weights_comfyui.safetensors", "README.md"} <= uploaded
    assert "samples/grid.png" in uploaded and "loss_per_sigma.png" in uploaded
    assert not [f for f in uploaded if f.startswith("checkpoint-") or f.endswith((".jsonl", ".yaml"))]
    assert (output / "checkpoint-2" / "pytorch_lora_weights.safetensors").exists()  # kept locally, not uploaded
    # the final files as they are on disk: the upload comes after everything is written
    for name in ("pytorch_lora_weights.safetensors", "README.md"):
        assert hub.uploaded[name] == (output / name).read_bytes()
    assert 'pipe.load_lora_weights("someone/my-lora")' in hub.uploaded["README.md"].decode()
    # step 2 was sampled before the final files were written: they get its thumbnail all the same
    assert load_lora_file(output / "pytorch_lora_weights.safetensors")[1]["modelspec.thumbnail"].startswith("data:")


def test_an_org_repo_private(tiny_model_dir, tiny_cache_dir, tmp_path, monkeypatch):
    hub = FakeHub(monkeypatch)
    train(tiny_model_dir, tiny_cache_dir, tmp_path / "out", **FLAGS, hub_model_id="my-org/style", hub_private=True)
    assert hub.calls[1] == ("create_repo", "my-org/style", True, True)
    assert hub.calls[2][1] == "my-org/style"


@pytest.mark.parametrize(
    "offline, user, message",
    [(True, "someone", "needs the network, and HF_HUB_OFFLINE is set"), (False, None, "hf auth login")],
)
def test_no_network_or_no_login_is_refused_before_anything_is_loaded_or_written(
    tiny_model_dir, tiny_cache_dir, tmp_path, monkeypatch, offline, user, message
):
    hub = FakeHub(monkeypatch, user=user)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", offline)
    with pytest.raises(ValueError, match=message):
        train(tiny_model_dir, tiny_cache_dir, tmp_path / "out", **FLAGS)
    reset_accelerate()
    assert not (tmp_path / "out").exists()
    assert [c[0] for c in hub.calls] == ([] if offline else ["whoami"])


def test_a_licence_the_hub_would_refuse_is_refused_when_the_run_starts(
    tiny_model_dir, tiny_cache_dir, tmp_path, monkeypatch
):
    hub = FakeHub(monkeypatch)
    with pytest.raises(ValueError, match="--metadata_license CC BY-NC: the hub takes only its licence ids .*must be"):
        train(tiny_model_dir, tiny_cache_dir, tmp_path / "out", **FLAGS, metadata_license="CC BY-NC")
    reset_accelerate()
    assert not (tmp_path / "out").exists() and hub.calls == [("whoami",), ("validate", "CC BY-NC")]
    train(tiny_model_dir, tiny_cache_dir, tmp_path / "out", **FLAGS, metadata_license="apache-2.0")
    assert [c[0] for c in hub.calls[2:]] == ["whoami", "validate", "create_repo", "upload_folder"]
    assert "license: apache-2.0" in hub.uploaded["README.md"].decode()  # in the card's header, which the hub indexes


def test_a_failed_upload_keeps_every_file_and_names_the_command_that_uploads_them(
    tiny_model_dir, tiny_cache_dir, tmp_path, monkeypatch
):
    FakeHub(monkeypatch, upload_error=ConnectionError("connection reset by peer"))
    output = tmp_path / "out"
    with pytest.raises(ValueError, match=r"uploading to someone/out failed \(connection reset by peer\).*hf upload"):
        train(tiny_model_dir, tiny_cache_dir, output, **FLAGS)
    reset_accelerate()
    assert (output / "pytorch_lora_weights.safetensors").exists() and (output / "README.md").exists()

"""Weight prefetch: which directory and files a start reads ahead of the model load, and that it reads them whole."""

from __future__ import annotations

from pathlib import Path

import pytest

from diffusers_api.config import Settings
from diffusers_api.models import prefetch
from diffusers_api.models.spec import ModelSpec


def pipeline_dir(root: Path, files: dict[str, int]) -> Path:
    """A published diffusers directory holding `files` (relative path -> size in bytes)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "model_index.json").write_text("{}")
    for name, size in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(bytes(range(256)) * (size // 256) + b"x" * (size % 256))
    return root


def names(files: list[Path], root: Path) -> list[str]:
    return [str(path.relative_to(root)) for path in files]


MIXED = {
    "text_encoder/model.safetensors": 10,
    "text_encoder/model.fp16.safetensors": 5,
    "unet/diffusion_pytorch_model-00001-of-00002.safetensors": 10,
    "unet/diffusion_pytorch_model-00002-of-00002.safetensors": 10,
    "unet/diffusion_pytorch_model.fp16-00001-of-00002.safetensors": 5,
    "unet/diffusion_pytorch_model.fp16-00002-of-00002.safetensors": 5,
    "unet/diffusion_pytorch_model.safetensors.index.json": 3,
    "vae/diffusion_pytorch_model.safetensors": 10,
    "vae/diffusion_pytorch_model.bin": 10,
    "tokenizer/vocab.json": 3,
}


def test_without_a_variant_the_plain_safetensors_files_are_read_in_loading_order(tmp_path: Path) -> None:
    root = pipeline_dir(tmp_path / "m", MIXED)
    assert names(prefetch.weight_files(root, None), root) == [
        "text_encoder/model.safetensors",
        "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
        "unet/diffusion_pytorch_model-00002-of-00002.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ]


def test_a_variant_reads_its_own_files_and_the_plain_ones_where_it_has_none(tmp_path: Path) -> None:
    root = pipeline_dir(tmp_path / "m", MIXED)
    assert names(prefetch.weight_files(root, "fp16"), root) == [
        "text_encoder/model.fp16.safetensors",
        "unet/diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
        "unet/diffusion_pytorch_model.fp16-00002-of-00002.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ]


@pytest.mark.parametrize(
    ("spec", "where"),
    [
        pytest.param(ModelSpec("builtin/tiny-sd"), "models--builtin--tiny-sd", id="builtin"),
        pytest.param(ModelSpec("org/name", model_url="s3://"), "models--org--name", id="cloud-cache"),
        pytest.param(
            ModelSpec("org/name", precision="fp16", checkpoint_url="https://h/x.safetensors"),
            "models--org--name--fp16",
            id="converted-checkpoint",
        ),
    ],
)
def test_models_dir_entries_are_found_where_the_store_keeps_them(spec: ModelSpec, where: str, tmp_path: Path) -> None:
    settings = Settings(models_dir=tmp_path)
    assert prefetch.model_directory(spec, settings) is None  # not there yet: nothing to read
    root = pipeline_dir(tmp_path / where, {"unet/diffusion_pytorch_model.safetensors": 10})
    assert prefetch.model_directory(spec, settings) == root


def test_a_local_directory_is_itself(tmp_path: Path) -> None:
    root = pipeline_dir(tmp_path / "mine", {})
    assert prefetch.model_directory(ModelSpec(str(root)), Settings(models_dir=tmp_path / "store")) == root


def hub_repo(cache: Path, commit: str, refs: dict[str, str]) -> Path:
    repo = cache / "models--org--name"
    for ref, target in refs.items():
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(target)
    return pipeline_dir(repo / "snapshots" / commit, {"unet/diffusion_pytorch_model.safetensors": 10})


def test_a_hub_model_is_its_cached_snapshot(tmp_path: Path) -> None:
    snapshot = hub_repo(tmp_path / "hub", "abc123", {"main": "abc123"})
    settings = Settings(models_dir=tmp_path)
    assert prefetch.model_directory(ModelSpec("org/name"), settings) == snapshot
    assert prefetch.model_directory(ModelSpec("alias", hf_model_id="org/name"), settings) == snapshot
    assert prefetch.model_directory(ModelSpec("org/name", revision="abc123"), settings) == snapshot
    assert prefetch.model_directory(ModelSpec("org/name", revision="v2"), settings) is None
    assert prefetch.model_directory(ModelSpec("org/other"), settings) is None


def test_files_are_read_whole(tmp_path: Path) -> None:
    root = pipeline_dir(tmp_path / "m", {"a/x.safetensors": 3 * prefetch.CHUNK_BYTES // 2, "b/y.safetensors": 7})
    files = prefetch.weight_files(root, None)
    assert prefetch.read_files(files) == 3 * prefetch.CHUNK_BYTES // 2 + 7


def test_without_sendfile_files_are_read_through_a_buffer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_sendfile(fd: int) -> int:
        raise OSError("sendfile cannot write to /dev/null here")

    monkeypatch.setattr(prefetch, "_send_to_null", no_sendfile)
    root = pipeline_dir(tmp_path / "m", {"a/x.safetensors": prefetch.CHUNK_BYTES + 1})
    assert prefetch.read_files(prefetch.weight_files(root, None)) == prefetch.CHUNK_BYTES + 1


def test_start_reads_the_configured_model_on_a_daemon_thread(tmp_path: Path) -> None:
    root = pipeline_dir(tmp_path / "m", {"unet/diffusion_pytorch_model.safetensors": 10})
    thread = prefetch.start(Settings(model_id=str(root), models_dir=tmp_path / "store"))
    assert thread is not None
    assert thread.daemon
    thread.join(timeout=30)
    assert not thread.is_alive()


def test_nothing_is_read_without_a_model_on_disk_or_room_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = tmp_path / "store"
    assert prefetch.start(Settings(models_dir=store, runtime_downloads=True)) is None  # no model configured
    assert prefetch.start(Settings(model_id="org/not-downloaded", models_dir=store)) is None
    root = pipeline_dir(tmp_path / "m", {"unet/diffusion_pytorch_model.safetensors": 10})
    monkeypatch.setattr(prefetch, "available_memory", lambda: 5)
    assert prefetch.start(Settings(model_id=str(root), models_dir=store)) is None  # would not fit in memory

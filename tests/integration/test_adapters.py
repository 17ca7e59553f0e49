"""What a request adds to a model (`lora_weights`, `textual_inversions`): fetched over real HTTP from a loopback
server, applied to a variant of the tiny models, compared with what diffusers' own loaders give."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_api.config import Settings
from diffusers_api.denoising import Rendezvous, SharedSteps
from diffusers_api.errors import InvalidInputs
from diffusers_api.models.adapters import adapter_path
from diffusers_api.models.builtin import ensure_builtin
from diffusers_api.runner import Runner
from diffusers_api.schema import GenerateRequest, GenerateResult, from_legacy
from support.adapters import make_embedding, make_lora
from support.servers import FileServer, file_server
from support.together import run_together

SD, SDXL = "builtin/tiny-sd", "builtin/tiny-sdxl"
STEPS = 4


@pytest.fixture(scope="module")
def files(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FileServer]:
    """Serves /sd.safetensors, /sd-unet-only.safetensors and /sdxl.safetensors (LoRAs for the tiny models)."""
    made = tmp_path_factory.mktemp("loras")
    with file_server() as server:
        for name, model_id, seed, text in [
            ("sd", SD, 1, True),
            ("sd-unet-only", SD, 2, False),
            ("sdxl", SDXL, 3, True),
        ]:
            file = make_lora(ensure_builtin(model_id, models_dir), made / name, seed, text_encoders=text)
            server.files[f"/{name}.safetensors"] = file.read_bytes()
        server.files["/not-a-lora.safetensors"] = b"this is not a safetensors file" * 10
        server.files["/barn.safetensors"] = make_embedding(made / "barn.safetensors", 4, "<barn>").read_bytes()
        sdxl_embedding = make_embedding(made / "xl.safetensors", 5, None, sdxl=True)
        server.files["/xl.safetensors"] = sdxl_embedding.read_bytes()
        server.files["/a.safetensors"] = make_embedding(made / "a.safetensors", 6, "a").read_bytes()
        yield server


def runner_for(model_id: str, models_dir: Path, **settings: Any) -> Runner:
    runner = Runner(Settings(model_id=model_id, models_dir=models_dir, allow_private_urls=True, **settings))
    runner.start()
    return runner


@pytest.fixture(scope="module")
def sd(models_dir: Path) -> Runner:
    return runner_for(SD, models_dir)


def ask(**fields: Any) -> GenerateRequest:
    return GenerateRequest(**({"prompt": "a red barn", "seed": 5, "num_inference_steps": STEPS} | fields))


def pixels(result: GenerateResult) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(result.images[0]))).astype(int)


def diffusers_with_lora(model_dir: Path, lora: bytes, scale: float, tmp_path: Path) -> np.ndarray:
    """The same request through plain diffusers: load_lora_weights, then fuse_lora at the scale (and the
    server's default scheduler, DPM++ 2M, which tiny-sdxl's own config does not use)."""
    from diffusers import DiffusionPipeline, DPMSolverMultistepScheduler

    file = tmp_path / "lora.safetensors"
    file.write_bytes(lora)
    pipe = DiffusionPipeline.from_pretrained(model_dir)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(file))
    pipe.fuse_lora(lora_scale=scale)
    kwargs: dict[str, Any] = {"num_inference_steps": STEPS, "generator": torch.Generator().manual_seed(5)}
    image = pipe("a red barn", **kwargs).images[0]
    return np.asarray(image).astype(int)


@pytest.mark.parametrize(("model_id", "lora"), [(SD, "sd"), (SDXL, "sdxl")], ids=["sd", "sdxl"])
def test_a_lora_gives_what_diffusers_own_loader_gives(
    files: FileServer, models_dir: Path, tmp_path: Path, model_id: str, lora: str
) -> None:
    runner = runner_for(model_id, models_dir)
    plain = runner.run(ask())
    result = runner.run(ask(lora_weights=[{"url": f"{files.url}/{lora}.safetensors", "scale": 0.75}]))
    expected = diffusers_with_lora(
        ensure_builtin(model_id, models_dir), files.files[f"/{lora}.safetensors"], 0.75, tmp_path
    )
    assert np.array_equal(pixels(result), expected)
    assert not np.array_equal(pixels(result), pixels(plain))
    assert result.meta["LORA_WEIGHTS"] == [{"url": f"{files.url}/{lora}.safetensors", "scale": 0.75}]
    assert "LORA_WEIGHTS" not in plain.meta


def test_the_model_itself_is_untouched_and_the_file_is_fetched_once(files: FileServer, sd: Runner) -> None:
    url = f"{files.url}/sd.safetensors"
    before = sd.run(ask())
    first = sd.run(ask(lora_weights=url))
    again = sd.run(ask(lora_weights=url))
    after = sd.run(ask())
    assert np.array_equal(pixels(after), pixels(before))  # the shared UNet and text encoder never changed
    assert np.array_equal(pixels(again), pixels(first))
    assert "download" in first.timings or adapter_path(url, sd.settings.models_dir).is_file()
    assert "download" not in again.timings
    assert files.requests.count(("/sd.safetensors", None)) == 1
    model = sd.store.describe()["loaded"][0]
    assert [variant["loras"] for variant in model["variants"]] == [[{"url": url, "scale": 1.0}]]


def test_a_unet_only_lora_copies_the_unet_alone(files: FileServer, sd: Runner) -> None:
    sd.run(ask(lora_weights=f"{files.url}/sd-unet-only.safetensors"))
    base = sd.store.most_recent
    assert base is not None
    variant = next(v for v in base.variants.values() if "unet-only" in v.spec.loras[0][0])
    assert variant.pipelines.components["text_encoder"] is base.pipelines.components["text_encoder"]
    assert variant.pipelines.components["vae"] is base.pipelines.components["vae"]
    assert variant.pipelines.components["unet"] is not base.pipelines.components["unet"]
    assert 0 < variant.bytes < base.bytes


def attn_procs_layout(peft_lora: bytes) -> bytes:
    """A UNet LoRA in the layout of diffusers' old `unet.save_attn_procs`, which docker-diffusers-api's
    `attn_procs` loaded: `<attention>.processor.to_q_lora.down.weight`, without the `unet.` prefix."""
    from safetensors.torch import load, save

    old = {}
    for key, tensor in load(peft_lora).items():  # unet.<attention>.to_q.lora_A.weight, ...to_out.0.lora_B.weight
        name = key.removeprefix("unet.").replace(".to_out.0.", ".to_out.")
        module, _, rest = name.rpartition(".to_")  # rest: q.lora_A.weight
        target, _, lora = rest.partition(".lora_")  # q, A.weight
        factor = {"A": "down", "B": "up"}[lora[0]]
        old[f"{module}.processor.to_{target}_lora.{factor}{lora[1:]}"] = tensor
    return save(old)


def test_legacy_attn_procs_loads_the_old_layout_as_a_lora(files: FileServer, sd: Runner) -> None:
    """callInputs.attn_procs names a LoRA file, as one more of lora_weights; a file in the old attn-procs layout
    gives what the same LoRA in today's layout gives."""
    files.files["/attn-procs.safetensors"] = attn_procs_layout(files.files["/sd-unet-only.safetensors"])
    envelope = {
        "modelInputs": {"prompt": "a red barn", "seed": 5, "num_inference_steps": STEPS},
        "callInputs": {"attn_procs": f"{files.url}/attn-procs.safetensors"},
    }
    legacy = sd.run(from_legacy(envelope))
    assert legacy.meta["LORA_WEIGHTS"] == [{"url": f"{files.url}/attn-procs.safetensors", "scale": 1.0}]
    native = sd.run(ask(lora_weights=f"{files.url}/sd-unet-only.safetensors"))
    assert np.array_equal(pixels(legacy), pixels(native))
    assert not np.array_equal(pixels(legacy), pixels(sd.run(ask())))


def test_the_legacy_scale_weighs_the_lora(files: FileServer, sd: Runner) -> None:
    """The original server weighed LoRAs with cross_attention_kwargs.scale: it is the LoRA's scale here."""
    url = f"{files.url}/sd.safetensors"
    legacy = from_legacy(
        {
            "modelInputs": {"prompt": "a red barn", "seed": 5, "num_inference_steps": STEPS,
                            "cross_attention_kwargs": '{"scale": 0.5}'},
            "callInputs": {"lora_weights": url},
        }
    )  # fmt: skip
    assert legacy.lora_weights is not None
    assert (legacy.lora_weights[0].scale, legacy.cross_attention_kwargs) == (0.5, None)
    native = sd.run(ask(lora_weights=[{"url": url, "scale": 0.5}]))
    assert np.array_equal(pixels(sd.run(legacy)), pixels(native))


def test_lora_requests_batch_together(files: FileServer, sd: Runner) -> None:
    """Requests with the same LoRA share their UNet steps (the variant's UNet); each matches its solo result."""
    url = f"{files.url}/sd.safetensors"
    requests = [ask(lora_weights=url, seed=seed) for seed in (11, 12)] + [ask(seed=13)]
    alone = [sd.run(request) for request in requests]
    batcher = Rendezvous(max_wait_s=5.0)
    steps = SharedSteps(batcher)
    together = run_together(Runner(sd.settings, store=sd.store, steps=steps), steps, requests)
    assert {result.meta["LOOP"] for result in together} == {"batched"}
    assert max(batcher.stats.rows) >= 4  # the two LoRA requests (two rows each with guidance) in one forward
    for batched, solo in zip(together, alone, strict=True):
        assert np.abs(pixels(batched) - pixels(solo)).max() <= 1


def test_variants_kept_are_bounded(files: FileServer, models_dir: Path) -> None:
    runner = runner_for(SD, models_dir, lora_variants_kept=1)
    url = f"{files.url}/sd.safetensors"
    runner.run(ask(lora_weights=[{"url": url, "scale": 0.5}]))
    runner.run(ask(lora_weights=[{"url": url, "scale": 0.9}]))
    base = runner.store.most_recent
    assert base is not None
    assert [variant.spec.loras for variant in base.variants.values()] == [((url, 0.9),)]
    assert runner.store.resident_bytes() == base.bytes + next(iter(base.variants.values())).bytes


@pytest.mark.parametrize(
    ("path", "settings", "message"),
    [
        ("/not-a-lora.safetensors", {}, "is not a safetensors file"),
        ("/sdxl.safetensors", {}, "does not fit this model|has no weights for any module"),
        ("/missing.safetensors", {}, "was not found"),
        ("/sd.safetensors", {"lora_max_bytes": 1000}, "larger than the 1000 bytes allowed"),
        ("/sd.safetensors", {"allow_private_urls": False}, "ALLOW_PRIVATE_URLS"),
    ],
    ids=["not-safetensors", "other-model", "404", "too-large", "private-address"],
)
def test_a_bad_lora_is_a_clear_error_and_nothing_is_kept(
    files: FileServer, tmp_path: Path, models_dir: Path, path: str, settings: dict[str, Any], message: str
) -> None:
    fields = {"model_id": SD, "models_dir": tmp_path, "allow_private_urls": True} | settings
    runner = Runner(Settings(**fields))
    ensure_builtin(SD, tmp_path)
    runner.start()
    with pytest.raises(InvalidInputs, match=message) as caught:
        runner.run(ask(lora_weights=f"{files.url}{path}"))
    assert caught.value.status == 422
    assert not adapter_path(f"{files.url}{path}", tmp_path).exists() or path == "/sdxl.safetensors"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no partial download left
    base = runner.store.most_recent
    assert base is not None
    assert not base.variants
    assert runner.run(ask()).images  # the model still serves


# --- textual inversions -----------------------------------------------------------------------------------------


def diffusers_with_embedding(model_dir: Path, embedding: bytes, token: str, prompt: str, tmp_path: Path) -> np.ndarray:
    """The same request through plain diffusers' load_textual_inversion (SDXL: once per text encoder)."""
    from diffusers import DiffusionPipeline, DPMSolverMultistepScheduler
    from safetensors.torch import load_file

    file = tmp_path / "embedding.safetensors"
    file.write_bytes(embedding)
    pipe = DiffusionPipeline.from_pretrained(model_dir)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    state = load_file(str(file))
    if "clip_g" in state:
        pipe.load_textual_inversion(
            state["clip_l"], token=token, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer
        )
        pipe.load_textual_inversion(
            state["clip_g"], token=token, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
        )
    else:
        pipe.load_textual_inversion(str(file), token=token)
    kwargs: dict[str, Any] = {"num_inference_steps": STEPS, "generator": torch.Generator().manual_seed(5)}
    return np.asarray(pipe(prompt, **kwargs).images[0]).astype(int)


@pytest.mark.parametrize(
    ("model_id", "embedding", "token"),
    [(SD, "barn.safetensors", "<barn>"), (SDXL, "xl.safetensors#fname=xl.safetensors&token=<xl-style>", "<xl-style>")],
    ids=["sd", "sdxl"],
)
def test_a_textual_inversion_gives_what_diffusers_own_loader_gives(
    files: FileServer, models_dir: Path, tmp_path: Path, model_id: str, embedding: str, token: str
) -> None:
    runner = runner_for(model_id, models_dir)
    prompt = f"a photo of {token}"
    plain = runner.run(ask(prompt=prompt))
    result = runner.run(ask(prompt=prompt, textual_inversions=f"{files.url}/{embedding}"))
    file = files.files["/" + embedding.split("#")[0]]
    expected = diffusers_with_embedding(ensure_builtin(model_id, models_dir), file, token, prompt, tmp_path)
    assert np.array_equal(pixels(result), expected)
    assert not np.array_equal(pixels(result), pixels(plain))  # without it, the token is only characters
    base = runner.store.most_recent
    assert base is not None
    variant = next(iter(base.variants.values()))
    assert variant.pipelines.components["unet"] is base.pipelines.components["unet"]  # an embedding copies no UNet
    assert variant.pipelines.components["tokenizer"] is not base.pipelines.components["tokenizer"]
    assert token not in base.pipelines.components["tokenizer"].get_vocab()  # the shared tokenizer is untouched
    assert np.array_equal(pixels(runner.run(ask(prompt=prompt))), pixels(plain))


def test_loras_and_embeddings_together(files: FileServer, sd: Runner) -> None:
    lora, embedding = f"{files.url}/sd.safetensors", f"{files.url}/barn.safetensors"
    both = sd.run(ask(prompt="a <barn>", lora_weights=lora, textual_inversions=embedding))
    lora_only = sd.run(ask(prompt="a <barn>", lora_weights=lora))
    assert not np.array_equal(pixels(both), pixels(lora_only))
    assert both.meta["TEXTUAL_INVERSIONS"] == [{"url": embedding, "token": None}]


def test_an_sdxl_style_embedding_with_one_encoders_vector_loads_into_that_encoder(
    files: FileServer, sd: Runner, tmp_path: Path
) -> None:
    """A `clip_l`-only file (SD's single text encoder is SDXL's first) is used, not a server error."""
    from safetensors.torch import save_file

    file = tmp_path / "clip-l.safetensors"
    save_file({"clip_l": torch.randn(1, 32, generator=torch.Generator().manual_seed(8))}, str(file))
    files.files["/clip-l.safetensors"] = file.read_bytes()
    prompt = "a photo of <clip-l>"
    plain = sd.run(ask(prompt=prompt))
    result = sd.run(ask(prompt=prompt, textual_inversions=f"{files.url}/clip-l.safetensors#token=<clip-l>"))
    assert not np.array_equal(pixels(result), pixels(plain))


@pytest.mark.parametrize(
    ("embedding", "message"),
    [
        ("xl.safetensors", "name its token"),
        ("a.safetensors", "already in tokenizer vocabulary"),
        ("not-a-lora.safetensors", "is not a safetensors file"),
    ],
    ids=["sdxl-pair-without-token", "token-already-a-word", "not-safetensors"],
)
def test_a_bad_textual_inversion_is_a_clear_error(files: FileServer, sd: Runner, embedding: str, message: str) -> None:
    with pytest.raises(InvalidInputs, match=message) as caught:
        sd.run(ask(textual_inversions=f"{files.url}/{embedding}"))
    assert caught.value.extra.get("field") == "textual_inversions"


def test_making_a_variant_holds_up_no_other_request(
    files: FileServer, models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A variant is made outside the store's lock: a plain request is served meanwhile, and a second request for
    the same LoRA waits for the first one's variant instead of making its own."""
    from diffusers_api.pipelines import ModelPipelines

    runner = runner_for(SD, models_dir)
    making, release, calls = threading.Event(), threading.Event(), []
    real = ModelPipelines.with_adapters

    def held(self: ModelPipelines, loras: Any, embeddings: Any) -> Any:
        calls.append(loras)
        making.set()
        assert release.wait(60)
        return real(self, loras, embeddings)

    monkeypatch.setattr(ModelPipelines, "with_adapters", held)
    url = f"{files.url}/sd.safetensors"
    with ThreadPoolExecutor(max_workers=3) as pool:
        first = pool.submit(runner.run, ask(lora_weights=url))
        assert making.wait(60)
        second = pool.submit(runner.run, ask(lora_weights=url, seed=6))
        plain = pool.submit(runner.run, ask())
        assert "LORA_WEIGHTS" not in plain.result(timeout=60).meta  # served while the variant is being made
        assert not first.done()
        assert not second.done()
        release.set()
        assert first.result(timeout=60).meta["LORA_WEIGHTS"] == second.result(timeout=60).meta["LORA_WEIGHTS"]
    assert len(calls) == 1

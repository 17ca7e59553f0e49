"""The built-in tiny models, for real: generated, saved, loaded from disk and run on the CPU."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import (
    AutoPipelineForImage2Image,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)
from PIL import Image

from diffusers_api.errors import ModelNotFound
from diffusers_api.models import builtin
from diffusers_api.models.builtin import (
    build_builtin,
    builtin_dir,
    builtin_names,
    ensure_builtin,
    is_builtin,
)

SD, INPAINT, SDXL = "builtin/tiny-sd", "builtin/tiny-sd-inpaint", "builtin/tiny-sdxl"
SDXL_INPAINT = "builtin/tiny-sdxl-inpaint"
SD3, FLUX, PIXART = "builtin/tiny-sd3", "builtin/tiny-flux", "builtin/tiny-pixart"
PIPELINE_CLASSES = {
    SD: StableDiffusionPipeline,
    INPAINT: StableDiffusionInpaintPipeline,
    SDXL: StableDiffusionXLPipeline,
    SDXL_INPAINT: StableDiffusionXLInpaintPipeline,
}
PROMPT = "a photo of an astronaut riding a horse"
STEPS = 3


@pytest.fixture(scope="module")
def built(models_dir: Path) -> Path:
    for name in builtin_names():
        ensure_builtin(name, models_dir)
    return models_dir


@pytest.fixture(scope="module")
def pipes(built: Path) -> dict[str, Any]:
    loaded = {name: DiffusionPipeline.from_pretrained(builtin_dir(name, built)) for name in builtin_names()}
    for pipe in loaded.values():
        pipe.set_progress_bar_config(disable=True)
    return loaded


def txt2img(pipe: Any, seed: int = 0, **kwargs: Any) -> Any:
    generator = torch.Generator().manual_seed(seed)
    return pipe(PROMPT, num_inference_steps=STEPS, generator=generator, output_type="np", **kwargs)


def file_digests(directory: Path) -> dict[str, str]:
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


# ---------------------------------------------------------------------------------------------- naming


def test_names_and_directories(tmp_path: Path) -> None:
    assert builtin_names() == [SD, INPAINT, SDXL, SDXL_INPAINT, SD3, FLUX, PIXART]
    assert all(is_builtin(name) for name in builtin_names())
    assert not is_builtin("runwayml/stable-diffusion-v1-5")
    assert builtin_dir(SD, tmp_path) == tmp_path / "models--builtin--tiny-sd"
    assert builtin_dir(SDXL, tmp_path) == tmp_path / "models--builtin--tiny-sdxl"


@pytest.mark.parametrize("model_id", ["builtin/tiny-kandinsky", "builtin/", "runwayml/stable-diffusion-v1-5"])
def test_unknown_builtin_is_model_not_found(tmp_path: Path, model_id: str) -> None:
    with pytest.raises(ModelNotFound) as caught:
        ensure_builtin(model_id, tmp_path / "models")
    assert caught.value.extra == {"requested": model_id, "available": builtin_names()}
    assert caught.value.to_wire()["code"] == "MODEL_NOT_FOUND"
    assert not (tmp_path / "models").exists()
    with pytest.raises(ModelNotFound):
        build_builtin(model_id)


# ---------------------------------------------------------------------------------------------- on disk


@pytest.mark.parametrize("model_id", [SD, INPAINT, SDXL, SDXL_INPAINT])
def test_loads_from_disk_as_its_pipeline_class(pipes: dict[str, Any], model_id: str) -> None:
    pipe = pipes[model_id]
    assert type(pipe) is PIPELINE_CLASSES[model_id]
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 64
    assert pipe.vae_scale_factor >= 2
    assert pipe.tokenizer.model_max_length == 77
    assert pipe.dtype == torch.float32


@pytest.mark.parametrize("model_id", [SD, INPAINT])
def test_sd_parts(pipes: dict[str, Any], model_id: str) -> None:
    pipe = pipes[model_id]
    assert pipe.config.requires_safety_checker is True
    assert pipe.safety_checker is not None
    assert pipe.feature_extractor is not None
    assert pipe.unet.config.in_channels == (9 if model_id == INPAINT else 4)
    assert isinstance(pipe.scheduler, DPMSolverMultistepScheduler)
    expected = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012}
    expected |= {"beta_schedule": "scaled_linear", "prediction_type": "epsilon", "steps_offset": 1}
    expected |= {"clip_sample": False, "set_alpha_to_one": False}
    assert {key: pipe.scheduler.config[key] for key in expected} == expected


@pytest.mark.parametrize("model_id", [SDXL, SDXL_INPAINT])
def test_sdxl_parts(pipes: dict[str, Any], model_id: str) -> None:
    pipe = pipes[model_id]
    assert pipe.unet.config.in_channels == (9 if model_id == SDXL_INPAINT else 4)
    assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert pipe.tokenizer_2.pad_token == "!"
    assert pipe.tokenizer.pad_token == "<|endoftext|>"
    assert pipe.config.force_zeros_for_empty_prompt is True
    assert pipe.unet.config.addition_embed_type == "text_time"
    assert isinstance(pipe.scheduler, EulerDiscreteScheduler)
    assert not hasattr(pipe, "safety_checker")


@pytest.mark.parametrize("model_id", [SD3, FLUX])
def test_transformer_parts(pipes: dict[str, Any], model_id: str) -> None:
    """SD3 and Flux as their checkpoints lay them out: a flow-matching scheduler, a 16-channel VAE with a shift
    factor, and a T5 encoder with its Unigram tokenizer beside the CLIP ones."""
    pipe = pipes[model_id]
    assert type(pipe).__name__ == {SD3: "StableDiffusion3Pipeline", FLUX: "FluxPipeline"}[model_id]
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert pipe.vae.config.latent_channels == 16
    assert pipe.vae.config.shift_factor is not None
    t5 = pipe.tokenizer_3 if model_id == SD3 else pipe.tokenizer_2
    assert type(t5).__name__ == "T5Tokenizer"
    words = t5.convert_tokens_to_ids(["\u2581a", "\u2581red", "\u2581cat"])
    assert t5("a red cat").input_ids == [*words, t5.eos_token_id]
    if model_id == FLUX:
        assert pipe.transformer.config.guidance_embeds  # FLUX.1-dev: guidance-distilled
    images = txt2img(pipe, width=64, height=64).images
    assert images.shape == (1, 64, 64, 3)
    assert np.isfinite(images).all()


def test_pixart_parts(pipes: dict[str, Any]) -> None:
    """PixArt-Sigma as its checkpoint lays it out: DPM-Solver++, a 4-channel VAE with SDXL's scaling, one T5
    encoder (the same generated tokenizer as SD3's and Flux's), and a transformer that predicts a learned sigma
    without micro-conditions; its sample size has aspect-ratio bins, so the pipeline's defaults run."""
    pipe = pipes[PIXART]
    assert type(pipe).__name__ == "PixArtSigmaPipeline"
    assert isinstance(pipe.scheduler, DPMSolverMultistepScheduler)
    assert pipe.scheduler.config.algorithm_type == "dpmsolver++"
    assert pipe.vae.config.latent_channels == 4
    assert pipe.vae.config.scaling_factor == 0.13025
    assert type(pipe.tokenizer).__name__ == "T5Tokenizer"
    assert pipe.tokenizer("a red cat").input_ids == pipes[FLUX].tokenizer_2("a red cat").input_ids
    config = pipe.transformer.config
    assert config.out_channels == 2 * config.in_channels == 8
    assert config.caption_channels == pipe.text_encoder.config.d_model
    assert pipe.transformer.use_additional_conditions is False
    images = txt2img(pipe, clean_caption=False).images  # the defaults: 128x128, denoised at a 256-pixel bin
    assert images.shape == (1, 128, 128, 3)
    assert np.isfinite(images).all()
    assert images.std() > 0


@pytest.mark.parametrize("model_id", [SD, INPAINT, SDXL, SDXL_INPAINT, SD3, FLUX, PIXART])
def test_weights_are_small_safetensors(built: Path, model_id: str) -> None:
    directory = builtin_dir(model_id, built)
    weights = list(directory.rglob("*.safetensors"))
    assert weights
    assert not list(directory.rglob("*.bin"))
    assert sum(path.stat().st_size for path in weights) < 8_000_000


# ---------------------------------------------------------------------------------------------- generation


@pytest.mark.parametrize("model_id", [SD, SDXL])
def test_txt2img_defaults_to_64px(pipes: dict[str, Any], model_id: str) -> None:
    images = txt2img(pipes[model_id], guidance_scale=7.5).images
    assert images.shape == (1, 64, 64, 3)
    assert np.isfinite(images).all()
    assert images.std() > 0


def test_inpaint_with_image_and_mask(pipes: dict[str, Any]) -> None:
    image = Image.new("RGB", (64, 64), (200, 30, 30))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    generator = torch.Generator().manual_seed(0)
    out = pipes[INPAINT](PROMPT, image=image, mask_image=mask, num_inference_steps=STEPS, generator=generator)
    assert out.images[0].size == (64, 64)
    assert out.nsfw_content_detected == [False]


def test_img2img_from_the_txt2img_pipeline(pipes: dict[str, Any]) -> None:
    img2img = AutoPipelineForImage2Image.from_pipe(pipes[SD])
    assert type(img2img) is StableDiffusionImg2ImgPipeline
    init = Image.new("RGB", (64, 64), (30, 120, 200))
    generator = torch.Generator().manual_seed(0)
    out = img2img(PROMPT, image=init, strength=0.8, num_inference_steps=STEPS, generator=generator)
    assert out.images[0].size == (64, 64)


def test_safety_checker_runs_and_flags_nothing(pipes: dict[str, Any]) -> None:
    pipe = pipes[SD]
    prompts = ["a photo of a cat", "portrait of a woman", "a red car in the city at night"]
    generators = [torch.Generator().manual_seed(seed) for seed in range(len(prompts))]
    out = pipe(prompts, num_inference_steps=2, generator=generators, output_type="np")
    assert out.nsfw_content_detected == [False, False, False]
    # Beyond generated images: plain and noisy ones alike.
    samples = np.stack([np.zeros((64, 64, 3)), np.ones((64, 64, 3)), np.random.default_rng(0).random((64, 64, 3))])
    _, flagged = pipe.run_safety_checker(samples.astype(np.float32), "cpu", torch.float32)
    assert flagged == [False, False, False]


def test_same_seed_same_image(pipes: dict[str, Any]) -> None:
    first, again, other = (txt2img(pipes[SD], seed).images for seed in (7, 7, 8))
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


# ---------------------------------------------------------------------------------------------- tokenizer


@pytest.mark.parametrize(
    "text",
    ["A Photo of an Astronaut riding a Horse", "zebra xylophone quixotic", "café naïve 東京 über", "x"],
)
def test_tokenizer_round_trips_lowercased(pipes: dict[str, Any], text: str) -> None:
    for tokenizer in (pipes[SD].tokenizer, pipes[SDXL].tokenizer_2):
        ids = tokenizer(text).input_ids
        assert ids[0] == tokenizer.bos_token_id
        assert ids[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(ids, skip_special_tokens=True) == text.lower()


def test_tokenizer_merges_common_words(pipes: dict[str, Any]) -> None:
    tokenizer = pipes[SD].tokenizer
    assert tokenizer.tokenize(PROMPT) == [f"{word}</w>" for word in PROMPT.split()]
    assert len(tokenizer.tokenize("xylophone")) > 1  # not in the merge corpus: falls back to pieces


def test_tokenizer_pads_and_truncates_to_77(pipes: dict[str, Any]) -> None:
    for tokenizer, pad_id in (
        (pipes[SD].tokenizer, pipes[SD].tokenizer.eos_token_id),
        (pipes[SDXL].tokenizer_2, 0),
    ):
        assert tokenizer.pad_token_id == pad_id
        short = tokenizer("a cat", padding="max_length", truncation=True, max_length=77).input_ids
        assert len(short) == 77
        assert short[4:] == [pad_id] * 73
        long = tokenizer("horse " * 200, padding="max_length", truncation=True, max_length=77).input_ids
        assert len(long) == 77
        assert long[-1] == tokenizer.eos_token_id


# ---------------------------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("model_id", [SD, INPAINT, SDXL, SDXL_INPAINT, SD3, FLUX, PIXART])
def test_builds_are_byte_identical(built: Path, tmp_path: Path, model_id: str) -> None:
    first = ensure_builtin(model_id, tmp_path / "a")
    second = ensure_builtin(model_id, tmp_path / "b")
    assert file_digests(first) == file_digests(second) == file_digests(builtin_dir(model_id, built))


def test_build_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(1234)
    expected = torch.rand(4)
    torch.manual_seed(1234)
    build_builtin(SD)
    assert torch.equal(torch.rand(4), expected)


CHILD = """
import hashlib, sys, warnings
from pathlib import Path
import torch
from diffusers import DiffusionPipeline
from diffusers_api.models.builtin import ensure_builtin
warnings.simplefilter("ignore")
pipe = DiffusionPipeline.from_pretrained(ensure_builtin(sys.argv[1], Path(sys.argv[2])))
pipe.set_progress_bar_config(disable=True)
out = pipe(sys.argv[3], num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np")
print(hashlib.sha256(out.images.tobytes()).hexdigest())
"""


def test_processes_race_to_one_model_and_draw_the_same_image(pipes: dict[str, Any], tmp_path: Path) -> None:
    src = str(Path(builtin.__file__).parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    args = [sys.executable, "-c", CHILD, SD, str(tmp_path), PROMPT]
    children = [subprocess.Popen(args, env=env, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    digests = [child.communicate(timeout=180)[0].strip() for child in children]
    assert [child.returncode for child in children] == [0, 0]
    here = hashlib.sha256(txt2img(pipes[SD]).images.tobytes()).hexdigest()
    assert digests == [here, here]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["models--builtin--tiny-sd"]


# ---------------------------------------------------------------------------------------------- publishing


def test_threads_race_to_one_complete_model(built: Path, tmp_path: Path) -> None:
    barrier = threading.Barrier(4)
    results: list[Path] = []

    def ensure() -> None:
        barrier.wait()
        results.append(ensure_builtin(SD, tmp_path))

    threads = [threading.Thread(target=ensure) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert results == [builtin_dir(SD, tmp_path)] * 4
    assert [path.name for path in tmp_path.iterdir()] == ["models--builtin--tiny-sd"]
    assert file_digests(results[0]) == file_digests(builtin_dir(SD, built))


def test_stray_staging_dirs_are_not_models(built: Path, tmp_path: Path) -> None:
    # What a killed build leaves behind: a staging dir that looks like a model, and an old one.
    fresh, stale = (
        tmp_path / ".staging-models--builtin--tiny-sd-1",
        tmp_path / ".staging-models--builtin--tiny-sd-2",
    )
    for stray in (fresh, stale):
        shutil.copytree(builtin_dir(SD, built), stray)
    a_day_ago = time.time() - 86_400
    os.utime(stale, (a_day_ago, a_day_ago))
    target = ensure_builtin(SD, tmp_path)
    assert target == builtin_dir(SD, tmp_path)
    assert file_digests(target) == file_digests(builtin_dir(SD, built))
    assert fresh.exists(), "a recent staging dir may belong to a live build"
    assert not stale.exists(), "an old one is left over from a dead build"


@pytest.mark.parametrize("damage", ["no marker", "truncated weights", "older recipe", "empty"])
def test_incomplete_model_dir_is_rebuilt(built: Path, tmp_path: Path, damage: str) -> None:
    target = builtin_dir(SD, tmp_path)
    shutil.copytree(builtin_dir(SD, built), target)
    marker = target / builtin.COMPLETE_MARKER
    if damage == "no marker":
        marker.unlink()
    elif damage == "truncated weights":
        # A copy interrupted half-way: its weights are short and it never got its marker.
        (target / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\0" * 64)
        marker.unlink()
    elif damage == "older recipe":
        marker.write_text(json.dumps({"model_id": SD, "recipe_version": builtin.RECIPE_VERSION - 1}))
    else:
        shutil.rmtree(target)
        target.mkdir()
    assert ensure_builtin(SD, tmp_path) == target
    assert file_digests(target) == file_digests(builtin_dir(SD, built))
    assert [path.name for path in tmp_path.iterdir()] == [target.name]
    assert type(DiffusionPipeline.from_pretrained(target)) is StableDiffusionPipeline

"""Prompt weighting and long prompts on the tiny SD and SDXL models, through the runner and our batched loop.

Weighted and long prompts reach the pipeline as embeddings, so they run in our loop; it must give what diffusers'
own call gives for the same embeddings, bit for bit (alone, a request in our loop runs the pipeline's very
operations: tests/integration/test_denoise.py)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_api import prompts
from diffusers_api.config import Settings
from diffusers_api.denoising import SharedSteps
from diffusers_api.errors import InvalidInputs
from diffusers_api.runner import Runner
from diffusers_api.schema import GenerateRequest

STEPS = 2
SIZE = 32
# About 110 tokens: more than the 77 that one chunk holds.
LONG = "a red barn in a green field under a blue sky, " * 10 + "at night"


@pytest.fixture(scope="module", params=["builtin/tiny-sd", "builtin/tiny-sdxl"])
def runner(request: pytest.FixtureRequest, models_dir: Path) -> Iterator[Runner]:
    steps = SharedSteps()
    runner = Runner(Settings(model_id=request.param, models_dir=models_dir), steps=steps)
    runner.start()
    yield runner
    steps.stop()


def image(runner: Runner, encoded: bool | None = None, **fields: Any) -> np.ndarray:
    """The request's image; `encoded`: whether its prompts went through compel (default: it asks for that)."""
    defaults = {"prompt": "a red barn", "num_inference_steps": STEPS, "seed": 7, "width": SIZE, "height": SIZE}
    request = GenerateRequest(**(defaults | fields))
    result = runner.run(request)
    assert result.meta["LOOP"] == "batched"
    # Only weighted or long prompts go through compel: plain ones are left to the pipeline, as they were.
    asked = bool(request.prompt_weighting or request.long_prompts)
    assert ("prompts" in result.timings) == (asked if encoded is None else encoded)
    return np.asarray(Image.open(io.BytesIO(result.images[0])))


def test_weights_change_the_image_and_both_syntaxes_agree(runner: Runner) -> None:
    plain = image(runner)
    weighted = image(runner, prompt="a (red)1.6 barn", prompt_weighting="compel")
    assert not np.array_equal(weighted, plain)
    assert np.array_equal(image(runner, prompt="a (red:1.6) barn", prompt_weighting="a1111"), weighted)
    # A weight of 1 is no weight: the embeddings are the text encoder's own, as without weighting.
    assert np.array_equal(image(runner, prompt="a (red)1.0 barn", prompt_weighting="compel"), plain)
    assert np.array_equal(image(runner, long_prompts=True), plain)  # a short prompt fits in one chunk


def test_a_long_prompt_is_encoded_whole_not_cut(runner: Runner) -> None:
    cut = image(runner, prompt=LONG)
    whole = image(runner, prompt=LONG, long_prompts=True)
    assert not np.array_equal(whole, cut)
    # Past 77 tokens: without long_prompts a weight there is cut off with its words, as diffusers cuts them;
    # with long_prompts it counts.
    tail = LONG.replace("at night", "(at night)1.5")
    assert np.array_equal(image(runner, prompt=tail, prompt_weighting="compel"), cut)
    assert not np.array_equal(image(runner, prompt=tail, prompt_weighting="compel", long_prompts=True), whole)


def test_clip_skip_with_weighting_takes_the_layer_diffusers_takes(runner: Runner) -> None:
    """compel reads the penultimate layer; with a clip_skip it reads the one diffusers' encode_prompt reads (SD: 1
    is the penultimate, normalized; SDXL: 1 is the one before the penultimate, which compel is made to read). A
    weight of 1 is no weight, so the image is diffusers' own for that clip_skip."""
    skip = {"extra": {"clip_skip": 1}}
    plain = image(runner, **skip)
    assert not np.array_equal(plain, image(runner))
    assert np.array_equal(image(runner, prompt="a (red)1.0 barn", prompt_weighting="compel", **skip), plain)
    assert np.array_equal(image(runner, long_prompts=True, **skip), plain)
    weighted = image(runner, prompt="a (red:1.6) barn", prompt_weighting="a1111", **skip)
    assert not np.array_equal(weighted, plain)
    assert not np.array_equal(weighted, image(runner, prompt="a (red:1.6) barn", prompt_weighting="a1111"))


def test_a1111_break_encodes_each_part_as_chunks_of_its_own(runner: Runner) -> None:
    """A1111's BREAK pads the chunk it ends: "a red barn BREAK at night" is the chunk of "a red barn" then that
    of "at night" (SDXL's pooled embedding is the first chunk's, as A1111 takes it); the negative prompt is
    padded to the same length."""
    pipe = build(runner, "txt2img")

    def encoded(prompt: str) -> dict[str, Any]:
        return prompts.encode(pipe, {"prompt": prompt, "negative_prompt": "blurry"}, "a1111", False)

    parts = encoded("a (red:1.2) barn BREAK at night")
    first, second = encoded("a (red:1.2) barn"), encoded("at night")
    assert parts["prompt_embeds"].shape[1] == 2 * first["prompt_embeds"].shape[1] == 154
    torch.testing.assert_close(
        parts["prompt_embeds"], torch.cat([first["prompt_embeds"], second["prompt_embeds"]], dim=1), rtol=0, atol=0
    )
    assert parts["negative_prompt_embeds"].shape == parts["prompt_embeds"].shape
    if "pooled_prompt_embeds" in parts:
        torch.testing.assert_close(parts["pooled_prompt_embeds"], first["pooled_prompt_embeds"], rtol=0, atol=0)
    joined = image(runner, prompt="a red barn at night", prompt_weighting="a1111")
    assert not np.array_equal(image(runner, prompt="a red barn BREAK at night", prompt_weighting="a1111"), joined)


def test_the_server_setting_pipeline_lpw_stable_diffusion(runner: Runner) -> None:
    """PIPELINE=lpw_stable_diffusion: a request naming no pipeline gets long prompts with A1111 weighting."""
    settings = runner.settings.model_copy(update={"pipeline": "lpw_stable_diffusion"})
    lpw = Runner(settings, store=runner.store, steps=runner.steps)
    prompt = LONG.replace("at night", "(at night:1.5)")
    expected = image(runner, prompt=prompt, prompt_weighting="a1111", long_prompts=True)
    assert np.array_equal(image(lpw, encoded=True, prompt=prompt), expected)
    assert not np.array_equal(image(lpw, prompt=prompt, pipeline="txt2img"), expected)  # a named one: plain


def build(runner: Runner, task: str) -> Any:
    model = runner.store.get(GenerateRequest(prompt="x"))
    pipelines = model.pipelines
    scheduler = pipelines.scheduler(type(pipelines.base.scheduler).__name__)
    return pipelines.build(pipelines.resolve(task), scheduler, safety_checker=False)


def with_generators(kwargs: dict[str, Any], images: int) -> dict[str, Any]:
    generators = [torch.Generator().manual_seed(100 + i) for i in range(images)]
    return kwargs | {"generator": generators, "output_type": "pil"}


CASES = {
    "weighted-long-list": ("txt2img", "compel", True, {"prompt": ["a (red)1.4 barn", LONG], "negative_prompt": "x--"}),
    "a1111-img2img": ("img2img", "a1111", True, {"prompt": "a (red:1.3) barn", "negative_prompt": ["[blurry]"]}),
    "plain-negative": ("txt2img", None, False, {"prompt": ["a red barn", "a cat"], "negative_prompt": ["blurry", "x"]}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_our_loop_equals_diffusers_with_the_same_embeddings(runner: Runner, case: str) -> None:
    """Lists of prompts and num_images_per_prompt repeat the embeddings as diffusers repeats them."""
    task, weighting, long_prompts, texts = CASES[case]
    kwargs: dict[str, Any] = texts | {"num_images_per_prompt": 2, "num_inference_steps": STEPS}
    if task == "img2img":
        kwargs |= {"image": Image.new("RGB", (SIZE, SIZE), (180, 40, 40)), "strength": 0.9}
    else:
        kwargs |= {"width": SIZE, "height": SIZE}
    prompt_count = len(texts["prompt"]) if isinstance(texts["prompt"], list) else 1
    if weighting or long_prompts:
        kwargs = prompts.encode(build(runner, task), kwargs, weighting, long_prompts)
        assert "prompt" not in kwargs
        assert kwargs["prompt_embeds"].shape[0] == prompt_count
    images = prompt_count * 2
    assert runner.steps is not None
    assert runner.steps.supports(build(runner, task), kwargs)
    ours = runner.steps.denoise(build(runner, task), with_generators(kwargs, images), None, None).images
    theirs = build(runner, task)(**with_generators(kwargs, images)).images
    assert len(ours) == len(theirs) == images
    for mine, reference in zip(ours, theirs, strict=True):
        assert np.array_equal(np.asarray(mine), np.asarray(reference))
    assert not np.array_equal(np.asarray(ours[0]), np.asarray(ours[-1]))


def test_prompt_syntax_errors_are_invalid_inputs(runner: Runner) -> None:
    with pytest.raises(InvalidInputs, match=r"prompt: '\(' at character 3 is never closed \(in compel syntax\)"):
        runner.run(GenerateRequest(prompt="a (red barn", prompt_weighting="compel", num_inference_steps=STEPS))
    with pytest.raises(InvalidInputs, match=r"negative_prompt: '\]' at character 5 closes no '\['"):
        runner.run(GenerateRequest(prompt="a", negative_prompt="blur]", prompt_weighting="a1111"))
    with pytest.raises(InvalidInputs, match="negative_prompt: 3 given for 2 prompts"):
        runner.run(GenerateRequest(prompt=["a", "b"], negative_prompt=["x", "y", "z"], long_prompts=True))


def test_another_model_family_is_refused(models_dir: Path) -> None:
    runner = Runner(Settings(model_id="builtin/tiny-sd3", models_dir=models_dir))
    runner.start()
    with pytest.raises(InvalidInputs) as raised:
        runner.run(GenerateRequest(prompt="a (red)1.2 barn", prompt_weighting="compel"))
    assert str(raised.value) == (
        "prompt_weighting: supported for Stable Diffusion 1.x/2.x and SDXL models; builtin/tiny-sd3 runs "
        "StableDiffusion3Pipeline (stable-diffusion-3)"
    )


def test_clip_skip_past_the_penultimate_layer_matches_diffusers_on_a_deeper_encoder(models_dir: Path) -> None:
    """The tiny encoders have 2 layers, so clip_skip 1 is all they can skip: with a 4-layer encoder, clip_skip 2
    and 3 make compel read the penultimate layer of an encoder whose hidden states end early. The embeddings are
    diffusers' encode_prompt's for that clip_skip, bit for bit (the negative prompt's without it, as diffusers)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffusers_api.pipelines import _alias_clip_text_model

    runner = Runner(Settings(model_id="builtin/tiny-sd", models_dir=models_dir))
    runner.start()
    pipe = build(runner, "txt2img")
    config = CLIPTextConfig(**(pipe.text_encoder.config.to_dict() | {"num_hidden_layers": 4}))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        pipe.text_encoder = CLIPTextModel(config).eval()
    _alias_clip_text_model({"text_encoder": pipe.text_encoder})
    for skip in (2, 3):
        texts = {"prompt": "a red barn", "negative_prompt": "blurry", "clip_skip": skip}
        ours = prompts.encode(pipe, texts, "a1111", False)
        with torch.inference_mode():
            theirs = pipe.encode_prompt("a red barn", "cpu", 1, True, "blurry", clip_skip=skip)
        torch.testing.assert_close(ours["prompt_embeds"], theirs[0], rtol=0, atol=0)
        torch.testing.assert_close(ours["negative_prompt_embeds"], theirs[1], rtol=0, atol=0)

"""What training refuses before it starts: models other than SD 1.x/2.x and SDXL text-to-image, sizes the model cannot
take, a dest_url without a bucket, a name in use."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from diffusers_api import training
from diffusers_api.config import Settings
from diffusers_api.errors import InvalidInputs
from diffusers_api.models.spec import ModelSpec
from diffusers_api.schema.train import TrainRequest


class StableDiffusionXLPipeline:
    pass


def loaded(**components: Any) -> Any:
    config = SimpleNamespace(in_channels=4, addition_embed_type=None, sample_size=8, block_out_channels=(1, 2))
    base = {"unet": SimpleNamespace(config=config), "vae": SimpleNamespace(config=config), "text_encoder": object()}
    base |= {"tokenizer": object(), "scheduler": SimpleNamespace(config={})}
    pipelines = SimpleNamespace(components=base | components, base=StableDiffusionXLPipeline())
    return SimpleNamespace(pipelines=pipelines, spec=ModelSpec(model_id="some/model"))


def test_transformer_and_inpainting_models_are_refused_by_name() -> None:
    with pytest.raises(
        InvalidInputs, match=r"supports Stable Diffusion 1\.x/2\.x and SDXL models; some/model is a Sta"
    ):
        training._sd_parts(loaded(unet=None, transformer=object()))
    inpainting = SimpleNamespace(config=SimpleNamespace(in_channels=9, addition_embed_type=None))
    with pytest.raises(InvalidInputs, match="the text-to-image UNets of"):
        training._sd_parts(loaded(unet=inpainting))
    # an SDXL pipeline's UNet takes SDXL's added conditions ("text_time"); the refiner has no first text encoder
    with pytest.raises(InvalidInputs, match="the text-to-image UNets of"):
        training._sd_parts(loaded(text_encoder_2=object()))
    with pytest.raises(InvalidInputs, match="SDXL models"):
        training._sd_parts(loaded(text_encoder=None, text_encoder_2=object()))


def test_sdxl_trains_its_unet_alone() -> None:
    config = SimpleNamespace(in_channels=4, addition_embed_type="text_time", sample_size=8, block_out_channels=(1, 2))
    sdxl = loaded(unet=SimpleNamespace(config=config), text_encoder_2=object())
    assert training._sd_parts(sdxl, request(name="x"))["family"] == "sdxl"
    assert training._sd_parts(loaded(), request(name="x", train_text_encoder=True))["family"] == "sd"
    with pytest.raises(InvalidInputs, match=r"train_text_encoder: supported for Stable Diffusion 1\.x/2\.x; on SDXL"):
        training._sd_parts(sdxl, request(name="x", train_text_encoder=True))


def test_a_resolution_the_unet_cannot_halve_is_refused() -> None:
    with pytest.raises(InvalidInputs, match="resolution: 40 is not a multiple of 16"):
        training._check_resolution(40, 16)


def request(**fields: Any) -> TrainRequest:
    return TrainRequest(**({"instance_images": ["x"], "instance_prompt": "sks"} | fields))


def test_destination_and_name_are_checked_before_training(tmp_path: Path) -> None:
    settings = Settings(models_dir=tmp_path)
    with pytest.raises(InvalidInputs, match=r"dest_url 's3://' names no bucket"):
        training.destination(request(dest_url="s3://"), settings)
    location = training.destination(request(dest_url="s3:///bucket/loras/", name="dog"), settings)
    assert (location.bucket, location.key) == ("bucket", "loras/dog.safetensors")  # type: ignore[union-attr]
    full = training.destination(request(dest_url="s3:///bucket/", name="dog", train_mode="full"), settings)
    assert full.key == "models--trained--dog.tar.zst"  # type: ignore[union-attr]

    kept = tmp_path / "loras" / "trained" / "dog.safetensors"
    kept.parent.mkdir(parents=True)
    kept.write_bytes(b"x")
    with pytest.raises(InvalidInputs, match="trained/dog exists already"):
        training.check_name_free(request(name="dog"), settings)
    training.check_name_free(request(name="dog", train_mode="full"), settings)  # a model of that name is free

"""Training on the tiny SD model, on the batching engine, against a real S3-compatible server (moto on loopback):
a LoRA changes the output and loads back as lora_weights (kept here, and from its upload); a full fine-tune
round-trips through its .tar.zst upload; generation requests wait for a training instead of failing; a cancelled
training stops within a step; the RunPod handler trains from a legacy envelope."""

from __future__ import annotations

import asyncio
import base64
import io
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_api.config import Settings
from diffusers_api.engine import Engine, make_engine
from diffusers_api.errors import Cancelled
from diffusers_api.events import EventHub, ProgressThrottle, RequestEvents
from diffusers_api.generation import Generation, generate, train
from diffusers_api.models import archive
from diffusers_api.models.trained import trained_lora_path, trained_model_dir
from diffusers_api.runpod_worker import make_handler
from diffusers_api.schema import GenerateRequest, GenerateResult
from diffusers_api.schema.train import TrainRequest, TrainResult
from support.servers import ACCESS_KEY, REGION, SECRET_KEY, moto_s3, s3_client

BUCKET = "trained"
PROMPT = "a photo of sks dog"


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models train several times faster on one thread than on two busy cores fighting over them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    with moto_s3(BUCKET) as url:
        yield url


@pytest.fixture(scope="module")
def settings(models_dir: Path, endpoint: str) -> Settings:
    return Settings(
        model_id="builtin/tiny-sd",
        models_dir=models_dir,
        runtime_downloads=True,
        model_memory_budget=2**30,  # the tiny models all stay resident: switching back and forth costs no reload
        allow_private_urls=True,  # the LoRA is read back over HTTP from the S3 server on loopback
        max_batch_size=2,
        aws_s3_endpoint_url=endpoint,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        aws_default_region=REGION,
        progress_interval_s=0,
    )


@pytest.fixture(scope="module")
def engine(settings: Settings) -> Iterator[Engine]:
    engine = make_engine(settings)
    asyncio.run(engine.start())
    assert engine.setup_error is None
    yield engine
    asyncio.run(engine.stop())


def instance_images() -> list[str]:
    rng = np.random.default_rng(0)
    encoded = []
    for _ in range(2):
        image = Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))
        out = io.BytesIO()
        image.save(out, "PNG")
        encoded.append(base64.b64encode(out.getvalue()).decode())
    return encoded


def training(**fields: Any) -> TrainRequest:
    given = {"instance_images": instance_images(), "instance_prompt": PROMPT, "resolution": 32, "seed": 1}
    return TrainRequest(**(given | {"max_train_steps": 10, "learning_rate": 1e-2} | fields))


def events() -> tuple[RequestEvents, list[dict[str, Any]]]:
    seen: list[dict[str, Any]] = []
    return RequestEvents(sinks=[seen.append], container_id="test", throttle=ProgressThrottle(min_interval_s=0)), seen


def image(engine: Engine, **fields: Any) -> np.ndarray:
    request = GenerateRequest(**({"prompt": PROMPT, "num_inference_steps": 3, "seed": 3, "width": 32} | fields))
    result = asyncio.run(generate(engine, Generation(request.model_copy(update={"height": 32}))))
    return pixels(result)


def pixels(result: GenerateResult) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(result.images[0]))).astype(int)


def fresh(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def test_a_lora_changes_the_output_and_loads_back_as_lora_weights(
    engine: Engine, settings: Settings, endpoint: str
) -> None:
    before = image(engine)
    name = fresh("lora")
    emitter, seen = events()

    async def train_while_a_request_waits() -> tuple[TrainResult, GenerateResult, float]:
        started: list[float] = []
        trained = asyncio.ensure_future(
            train(engine, training(name=name, dest_url=f"s3:///{BUCKET}/loras/"), emitter, settings)
        )
        while not any(event["status"] == "progress" for event in seen):
            await asyncio.sleep(0.005)
        waiting = GenerateRequest(prompt="meanwhile", num_inference_steps=2, width=32, height=32, seed=1)
        generation = Generation(waiting, on_start=lambda: started.append(time.time()))
        result, made = await asyncio.gather(trained, generate(engine, generation))
        return result, made, started[0]

    result, meanwhile, generation_started = asyncio.run(train_while_a_request_waits())
    assert meanwhile.images  # it waited for the training instead of failing, and ran once the training was done
    last_step_ms = max(event["time"] for event in seen if event["status"] == "progress")
    assert generation_started * 1000 >= last_step_ms

    assert result.lora_weights == f"trained/{name}"
    assert result.steps == 10
    assert {"training", "upload"} <= result.timings.keys()
    progress = [event["payload"]["step"] for event in seen if event["status"] == "progress"]
    assert progress == list(range(1, 11))
    assert [(e["type"], e["status"]) for e in seen if e["status"] != "progress"] == [
        ("training", "start"),
        ("training", "done"),
        ("upload", "start"),
        ("upload", "done"),
    ]
    head = s3_client(endpoint).head_object(Bucket=BUCKET, Key=f"loras/{name}.safetensors")  # type: ignore[attr-defined]
    assert head["ContentLength"] == result.bytes

    kept = image(engine, lora_weights=f"trained/{name}")
    assert np.abs(kept - before).max() > 10  # the LoRA changed the image
    url = s3_client(endpoint).generate_presigned_url(  # type: ignore[attr-defined]
        "get_object", Params={"Bucket": BUCKET, "Key": f"loras/{name}.safetensors"}
    )
    assert np.array_equal(image(engine, lora_weights=url), kept)  # the uploaded file is the same LoRA
    assert np.array_equal(image(engine), before)  # the served model itself is untouched


def test_a_full_fine_tune_round_trips_through_its_archive(
    engine: Engine, settings: Settings, endpoint: str, tmp_path: Path
) -> None:
    name = fresh("full")
    emitter, seen = events()
    request = training(train_mode="full", max_train_steps=3, name=name, dest_url=f"s3:///{BUCKET}/models/")
    result = asyncio.run(train(engine, request, emitter, settings))
    assert result.model == f"trained/{name}"
    assert result.lora_weights is None
    assert {"training", "compress", "upload"} <= result.timings.keys()
    assert ("compress", "done") in [(event["type"], event["status"]) for event in seen]

    key = f"models/models--trained--{name}.tar.zst"
    packed = s3_client(endpoint).get_object(Bucket=BUCKET, Key=key)["Body"].read()  # type: ignore[attr-defined]
    assert len(packed) == result.bytes
    (tmp_path / "unpacked").mkdir()
    archive.unpack(io.BytesIO(packed), tmp_path / "unpacked")
    kept = trained_model_dir(result.model, settings.models_dir)
    weights = "unet/diffusion_pytorch_model.safetensors"
    assert (tmp_path / "unpacked" / weights).read_bytes() == (kept / weights).read_bytes()

    fine_tuned = image(engine, model=result.model)
    assert np.abs(fine_tuned - image(engine)).max() > 0  # three steps at 1e-2 move the UNet
    from_archive = image(engine, model=fresh("downloaded"), model_url=f"s3:///{BUCKET}/{key}")
    assert np.array_equal(from_archive, fine_tuned)


def test_prior_preservation_trains_on_given_and_generated_class_images(engine: Engine, settings: Settings) -> None:
    """One class image given, two generated by the model (one call of sample_batch_size 2): the class loss is
    added to the instance loss, and the same seed gives the same class images, so the same LoRA."""
    prior = {"with_prior_preservation": True, "class_prompt": "a photo of a dog", "num_class_images": 3}
    prior |= {"class_images": instance_images()[:1], "sample_batch_size": 2, "max_train_steps": 3}

    def lora(**fields: Any) -> tuple[TrainResult, bytes]:
        emitter, _ = events()
        result = asyncio.run(train(engine, training(name=fresh("prior"), **fields), emitter, settings))
        assert result.lora_weights is not None
        return result, trained_lora_path(result.lora_weights, settings.models_dir).read_bytes()

    result, weights = lora(**prior)
    assert result.meta["class_images"] == {"given": 1, "generated": 2}
    assert {"class_images", "training"} <= result.timings.keys()
    assert lora(**prior)[1] == weights  # generated from the seed: the same class images, the same LoRA
    plain, plain_weights = lora(max_train_steps=3)
    assert "class_images" not in plain.meta
    assert "class_images" not in plain.timings
    assert plain_weights != weights
    heavier, _ = lora(**prior | {"prior_loss_weight": 5.0})
    assert heavier.loss > result.loss  # the same batches, the class loss weighed 5 times


def test_the_text_encoder_trains_beside_the_unet(engine: Engine, settings: Settings) -> None:
    """train_text_encoder: the LoRA file holds the text encoder's layers too, and they alone change the image; a
    full fine-tune saves a changed text encoder. The served model's own encoder is untouched."""
    from safetensors.torch import load_file, save_file

    served = engine.runner.store.get(GenerateRequest(prompt="x")).pipelines.components["text_encoder"]  # type: ignore[attr-defined]
    before = {key: value.clone() for key, value in served.state_dict().items()}
    emitter, _ = events()
    result = asyncio.run(
        train(engine, training(name=fresh("te"), train_text_encoder=True, max_train_steps=3), emitter, settings)
    )
    assert result.meta["train_text_encoder"] is True
    assert result.lora_weights is not None
    layers = load_file(trained_lora_path(result.lora_weights, settings.models_dir))
    text_layers = {key: value for key, value in layers.items() if key.startswith("text_encoder.")}
    assert text_layers
    assert len(text_layers) < len(layers)  # the UNet's are there too
    text_only_id = f"trained/{fresh('text-only')}"
    save_file(text_layers, trained_lora_path(text_only_id, settings.models_dir))
    text_only = image(engine, lora_weights=text_only_id)
    assert np.abs(text_only - image(engine)).max() > 0

    full = asyncio.run(
        train(
            engine,
            training(name=fresh("te-full"), train_mode="full", train_text_encoder=True, max_train_steps=2),
            *events()[:1],
            settings,
        )
    )
    assert full.model is not None
    saved = load_file(trained_model_dir(full.model, settings.models_dir) / "text_encoder" / "model.safetensors")
    assert any(not torch.equal(saved[key], before[key].to(saved[key].dtype)) for key in saved if key in before)
    assert all(torch.equal(value, before[key]) for key, value in served.state_dict().items())


def test_sdxl_trains_a_lora_and_a_full_unet(engine: Engine, settings: Settings) -> None:
    """SDXL: both text encoders' embeddings, the pooled one and the size conditions reach the UNet; the LoRA is
    saved in SDXL's format and loads back on the model; a full fine-tune is a model of its own."""
    sdxl = "builtin/tiny-sdxl"
    before = image(engine, model=sdxl)
    emitter, _ = events()
    result = asyncio.run(train(engine, training(model=sdxl, name=fresh("sdxl"), max_train_steps=3), emitter, settings))
    assert result.meta["family"] == "sdxl"
    assert result.lora_weights is not None
    assert np.abs(image(engine, model=sdxl, lora_weights=result.lora_weights) - before).max() > 0
    assert np.array_equal(image(engine, model=sdxl), before)  # the served model is untouched
    full = asyncio.run(
        train(
            engine,
            training(model=sdxl, name=fresh("sdxl-full"), train_mode="full", max_train_steps=2),
            *events()[:1],
            settings,
        )
    )
    assert full.model is not None
    assert np.abs(image(engine, model=full.model) - before).max() > 0


def test_a_cancelled_training_stops_within_a_step(engine: Engine, settings: Settings) -> None:
    emitter, seen = events()
    cancel = threading.Event()

    async def cancel_at_step_two() -> None:
        task = asyncio.ensure_future(
            train(engine, training(max_train_steps=1000, name=fresh("x")), emitter, settings, cancel)
        )
        while not any(event["payload"].get("step", 0) >= 2 for event in seen):
            await asyncio.sleep(0.005)
        task.cancel()
        await task

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(cancel_at_step_two())
    steps = [event["payload"]["step"] for event in seen if event["status"] == "progress"]
    assert cancel.is_set()
    assert max(steps) <= 4
    assert seen[-1]["type"] == "training"
    assert seen[-1]["status"] == "error"
    assert seen[-1]["payload"]["error"]["code"] == Cancelled.code


def test_the_runpod_handler_trains_from_a_legacy_envelope(engine: Engine, settings: Settings, endpoint: str) -> None:
    updates: list[Any] = []
    handler = make_handler(engine, EventHub(settings), lambda job, payload: updates.append(payload))
    model_inputs = {"instance_images": instance_images(), "instance_prompt": PROMPT, "resolution": 32}
    model_inputs |= {"max_train_steps": 2, "seed": 1, "use_8bit_adam": True, "mixed_precision": "fp16"}
    call_inputs = {"train": "dreambooth", "dest_url": f"s3:///{BUCKET}/runpod/job.safetensors", "SCHEDULER": "DDIM"}
    output = asyncio.run(handler({"id": "j1", "input": {"modelInputs": model_inputs, "callInputs": call_inputs}}))
    assert output["done"] is True, output
    assert {"training", "upload"} <= output["$timings"].keys()
    assert {key: updates[-1][key] for key in ("stage", "step", "steps")} == {"stage": "training", "step": 2, "steps": 2}
    s3_client(endpoint).head_object(Bucket=BUCKET, Key="runpod/job.safetensors")  # type: ignore[attr-defined]

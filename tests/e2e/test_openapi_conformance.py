"""schemathesis against the real server on the tiny model: requests drawn from the OpenAPI document, valid ones
(positive) and invalid ones (negative), and chains of job calls through the document's links (stateful). No
answer may be a 5xx, have a status or content type the document does not list, or a body its schema refuses;
every request the schema refuses must be refused.

Valid requests run on the model, so the positive ones are drawn from a copy of the document whose bounds keep
them cheap (a few steps, small images); the negative ones from the document as served, as they never run.
A few dozen examples per operation keep the whole module well under 90 s on two busy cores.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import Case, GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance, use_after_free

from diffusers_api.schema import UpscaleRequest
from support.processes import Process, serving

pytestmark = pytest.mark.e2e

EXAMPLES = 25
# Checks that do not apply: the server refuses valid-looking inputs that no schema can describe (an unknown
# scheduler or model, a size under the model's minimum); DELETE cancels a job, which stays readable afterwards.
EXCLUDED = [positive_data_acceptance, use_after_free]
# What keeps a valid request cheap on a CPU, and likely to run: the document allows up to 1000 steps and 8192
# pixels a side, and names of models, pipelines and adapter files that are not on this server. Negative requests
# are drawn from the document as served: the server refuses them before anything runs.
BOUNDS = {"num_inference_steps": (1, 2), "width": (16, 64), "height": (16, 64), "num_images_per_prompt": (1, 2)}
ELSEWHERE = (
    *("model", "hf_model_id", "revision", "variant", "model_url", "checkpoint_url", "pipeline", "send_url"),
    *("MODEL_ID", "HF_MODEL_ID", "MODEL_REVISION", "MODEL_VARIANT", "MODEL_URL", "CHECKPOINT_URL", "PIPELINE"),
    *("SEND_URL", "lora_weights", "textual_inversions", "image", "init_image", "mask_image", "strength"),
    *("precision", "MODEL_PRECISION", "extra"),  # another precision is another model; extra, unknown arguments
    *("checkpoint_config_url", "CHECKPOINT_CONFIG_URL", "attn_procs", "fill_mode", "FILL_MODE"),
    "ip_adapter",  # names an adapter and an image that are not on this server
)
DRAWN = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,  # the same requests on every run
    database=None,
    phases=[Phase.generate],  # a failure is reported as drawn: shrinking it would cost minutes of inference
    suppress_health_check=list(HealthCheck),
)


@pytest.fixture(scope="module")
def server(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    # DRAIN_TIMEOUT_S: the jobs the state machine leaves running are cancelled at the end, not waited for (seconds)
    env = {"MAX_BATCH_SIZE": "4", "PROGRESS_INTERVAL_S": "0", "DRAIN_TIMEOUT_S": "0"}
    with serving(models_dir, tmp_path_factory.mktemp("conformance") / "server.log", env) as process:
        yield process


def document(server: Process) -> dict[str, Any]:
    return dict(httpx.get(f"{server.url}/openapi.json", timeout=30).json())


def schedulers(server: Process) -> list[str]:
    return list(httpx.get(f"{server.url}/v1/schedulers", timeout=60).json()["schedulers"])


def runnable(spec: dict[str, Any], schedulers: list[str]) -> dict[str, Any]:
    """The document, with what a request may ask of the served model bounded to what runs at once on it (see
    BOUNDS, ELSEWHERE): where GenerateRequest is described, and in the legacy envelope's two objects."""
    spec = copy.deepcopy(spec)
    for described in _requests(spec):
        properties = described["properties"]
        if "num_inference_steps" in properties:  # the model's defaults (50 steps, its own size) take seconds
            required = {*described.get("required", []), "prompt", "num_inference_steps", "width", "height"}
            described["required"] = sorted(required)
            properties["cross_attention_kwargs"]["anyOf"][1:2] = []  # a string of JSON, which random text is not
            prompts = properties["prompt"]["anyOf"]
            properties["prompt"]["anyOf"] = [option for option in prompts if option.get("type") != "null"]
        described["additionalProperties"] = False  # other arguments of the pipeline: random names are not
        described.pop("dependentSchemas", None)  # strength needs an image, and they are left out
        for name in ELSEWHERE:
            properties.pop(name, None)
        for name, (low, high) in BOUNDS.items():
            for option in properties.get(name, {}).get("anyOf", [properties.get(name, {})]):
                if option.get("type") == "integer":
                    option.update(minimum=low, maximum=high)
        for name in ("scheduler", "SCHEDULER"):
            if name in properties:
                properties[name] = {"enum": schedulers}
    _runnable_upscale(spec["components"]["schemas"]["UpscaleRequest"])
    return spec


def _runnable_upscale(described: dict[str, Any]) -> None:
    """POST /v1/upscale: an image no schema can describe (base64 of a PNG), and the upscaler every server has."""
    properties = described["properties"]
    properties["image"] = {"enum": [UpscaleRequest.model_json_schema()["examples"][0]["image"]]}
    properties["model"] = {"enum": ["builtin/tiny-upscaler"]}
    properties.pop("send_url")


def _requests(node: Any) -> Iterator[dict[str, Any]]:
    """Every schema of the document that describes a request: its pipeline inputs, or legacy callInputs."""
    if isinstance(node, dict):
        if {"num_inference_steps", "SCHEDULER"} & set(node.get("properties", {})):
            yield node
        for value in node.values():
            yield from _requests(value)
    elif isinstance(node, list):
        for value in node:
            yield from _requests(value)


def load(spec: dict[str, Any], server: Process) -> Any:
    checks = {check.__name__: {"enabled": False} for check in EXCLUDED}  # the state machine's checks
    # the state machine's requests: valid ones (their links lead to a job), as the document was given
    config = schemathesis.Config.from_dict(
        {"checks": checks, "request-timeout": 60, "generation": {"mode": "positive", "database": "none"}}
    )
    schema = schemathesis.openapi.from_dict(spec, config=config)
    schema.config.update(base_url=server.url)
    return schema


def check_every_operation(schema: Any, mode: GenerationMode) -> None:
    """Draw EXAMPLES requests for each operation and check every answer; report all the failures at once."""
    failures = []
    for result in schema.get_all_operations():
        operation = result.ok()
        strategy = operation.as_strategy(generation_mode=mode)

        @given(case=strategy)
        @DRAWN
        def answer(case: Case) -> None:
            case.call_and_validate(excluded_checks=EXCLUDED)

        try:
            answer()
        except Unsatisfiable:  # no invalid request: nothing to send, or anything goes (a job's id is any string)
            assert mode is GenerationMode.NEGATIVE, operation.label
        except Exception as exc:
            failures.append(f"{operation.label}: {exc}")
    assert not failures, "\n\n".join(failures)


def test_valid_requests_are_answered_as_documented(server: Process) -> None:
    check_every_operation(load(runnable(document(server), schedulers(server)), server), GenerationMode.POSITIVE)


def test_invalid_requests_are_refused_as_documented(server: Process) -> None:
    check_every_operation(load(document(server), server), GenerationMode.NEGATIVE)


def test_job_links_are_followed_as_documented(server: Process) -> None:
    machine = load(runnable(document(server), schedulers(server)), server).as_state_machine()
    machine.run(settings=settings(DRAWN, stateful_step_count=4))

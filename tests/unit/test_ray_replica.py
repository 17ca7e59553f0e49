"""diffusers_api.ray without a Ray cluster: the builder's arguments (settings, replicas, GPUs or CPUs, the session
router), the X-Replica header, and the health Ray asks for."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from diffusers_api.engine import Health
from diffusers_api.ray import (
    CONSISTENT_HASH_ROUTER,
    DEFAULT_MAX_ONGOING_REQUESTS,
    DiffusersReplica,
    InvalidRayArgs,
    ReplicaHeader,
    plan,
    visible_gpus,
)
from support.fakes import FakeEngine

MODEL = {"model_id": "builtin/tiny-sd"}


def no_gpu() -> int:
    return 0


def two_gpus() -> int:
    return 2


def test_defaults_on_a_cpu_host_are_one_replica_on_one_cpu() -> None:
    replicas = plan(MODEL, no_gpu)
    assert (replicas.replicas, replicas.num_gpus, replicas.num_cpus) == (1, 0, 1)
    assert replicas.settings == MODEL
    options = replicas.deployment_options()
    assert options["ray_actor_options"] == {"num_gpus": 0, "num_cpus": 1}
    assert options["max_ongoing_requests"] == DEFAULT_MAX_ONGOING_REQUESTS
    assert "request_router_config" not in options  # one replica: nothing to keep sessions on


def test_each_replica_holds_one_gpu_where_there_are_gpus() -> None:
    options = plan({**MODEL, "replicas": "2"}, two_gpus).deployment_options()
    assert options["num_replicas"] == 2
    assert options["ray_actor_options"] == {"num_gpus": 1, "num_cpus": 0}


def test_explicit_placement_wins_over_what_the_host_has() -> None:
    # KubeRay: the builder runs on the head, which has no GPU; the workers do
    args = {**MODEL, "gpus_per_replica": "1", "cpus_per_replica": "4", "max_ongoing_requests": "32"}
    options = plan(args, no_gpu).deployment_options()
    assert options["ray_actor_options"] == {"num_gpus": 1.0, "num_cpus": 4.0}
    assert options["max_ongoing_requests"] == 32


def test_several_replicas_keep_a_session_on_one_replica_unless_turned_off() -> None:
    router = plan({**MODEL, "replicas": "3"}, no_gpu).deployment_options()["request_router_config"]
    assert router["request_router_class"] == CONSISTENT_HASH_ROUTER
    assert router["request_router_kwargs"] == {"num_fallback_replicas": 0}
    off = plan({**MODEL, "replicas": "3", "session_affinity": "false"}, no_gpu).deployment_options()
    assert "request_router_config" not in off


def test_the_replicas_get_the_settings_as_given() -> None:
    args = {**MODEL, "max_batch_size": "4", "replicas": "2", "scheduler": "Euler a"}
    assert plan(args, no_gpu).settings == {**MODEL, "max_batch_size": "4", "scheduler": "Euler a"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param({**MODEL, "replica": "2", "colour": "red"}, "unknown argument(s) colour, replica", id="unknown"),
        pytest.param({}, "no model to serve", id="no-model"),
        pytest.param({**MODEL, "replicas": "two"}, "replicas: expected a number, got 'two'", id="not-a-number"),
        pytest.param({**MODEL, "replicas": "1.5"}, "replicas: expected a number", id="not-whole"),
        pytest.param({**MODEL, "replicas": "0"}, "replicas: must be at least 1", id="no-replicas"),
        pytest.param({**MODEL, "gpus_per_replica": "-1"}, "gpus_per_replica: must be at least 0", id="negative"),
        pytest.param({**MODEL, "cpus_per_replica": "nan"}, "cpus_per_replica: must be at least 0", id="nan"),
        pytest.param({**MODEL, "session_affinity": "maybe"}, "session_affinity: expected true or false", id="flag"),
        pytest.param({**MODEL, "max_queue": "0"}, "invalid settings: max_queue", id="bad-setting"),
    ],
)
def test_bad_arguments_are_named(args: dict[str, str], message: str) -> None:
    with pytest.raises(InvalidRayArgs) as raised:
        plan(args, no_gpu)
    assert message in str(raised.value)


def test_unknown_arguments_list_what_is_accepted() -> None:
    with pytest.raises(InvalidRayArgs, match=r"model_id=builtin/tiny-sd.*replicas.*gpus_per_replica"):
        plan({**MODEL, "gpus": "1"}, no_gpu)


def test_visible_gpus(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert visible_gpus(tmp_path / "absent") == 0
    for bus in ("0000:01:00.0", "0000:02:00.0"):
        (tmp_path / bus).mkdir()
    assert visible_gpus(tmp_path) == 2
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    assert visible_gpus(tmp_path) == 1
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus(tmp_path) == 0


def test_every_answer_names_the_replica() -> None:
    app = FastAPI()

    @app.get("/hello")
    def hello() -> dict[str, str]:
        return {"hello": "world"}

    app.add_middleware(ReplicaHeader, name="abc123")
    response = TestClient(app).get("/hello")
    assert response.headers["x-replica"] == "abc123"
    assert response.json() == {"hello": "world"}
    assert TestClient(app).get("/missing").headers["x-replica"] == "abc123"


def replica_over(engine: FakeEngine) -> DiffusersReplica:
    """A replica around `engine`, as its constructor (which needs Ray's replica context) would leave it."""
    replica = object.__new__(DiffusersReplica)
    replica.engine = engine  # type: ignore[assignment]
    return replica


@pytest.mark.parametrize("health", [Health.READY, Health.BUSY, Health.STARTING])
def test_a_serving_engine_is_healthy(health: Health) -> None:
    replica_over(FakeEngine(health=health)).check_health()


@pytest.mark.parametrize(
    ("engine", "reason"),
    [
        pytest.param(FakeEngine(health=Health.DEFUNCT), "DEFUNCT: a fatal device error", id="defunct"),
        pytest.param(
            FakeEngine(health=Health.SETUP_FAILED, setup_error="no such model"), "no such model", id="setup-failed"
        ),
    ],
)
def test_a_dead_engine_fails_the_health_check_so_ray_replaces_the_replica(engine: FakeEngine, reason: str) -> None:
    with pytest.raises(RuntimeError, match=reason):
        replica_over(engine).check_health()


def test_the_builder_makes_a_ray_serve_application() -> None:
    pytest.importorskip("ray.serve", reason="needs the ray extra")
    from ray.serve import Application

    from diffusers_api.ray import app

    assert isinstance(app({**MODEL, "replicas": "2", "gpus_per_replica": "0"}), Application)
    with pytest.raises(InvalidRayArgs, match="replicas"):
        app({**MODEL, "replicas": "none"})


def test_the_kuberay_manifest_asks_for_one_gpu_per_replica() -> None:
    """deploy/kuberay/rayservice.yaml's application arguments, as YAML types them, on a head without a GPU."""
    import yaml

    manifest = yaml.safe_load((Path(__file__).parents[2] / "deploy/kuberay/rayservice.yaml").read_text())
    (application,) = yaml.safe_load(manifest["spec"]["serveConfigV2"])["applications"]
    assert application["import_path"] == "diffusers_api.ray:app"
    replicas = plan(application["args"], no_gpu)
    assert (replicas.replicas, replicas.num_gpus) == (2, 1)
    workers = manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    gpus = sum(
        group["replicas"] * int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
        for group in workers
    )
    assert gpus >= replicas.replicas * replicas.num_gpus


def test_serve_replicas_goes_with_ray(capsys: pytest.CaptureFixture[str]) -> None:
    from diffusers_api.cli import main

    assert main(["serve", "--model", "builtin/tiny-sd", "--replicas", "2"]) == 2
    assert "--replicas goes with --ray" in capsys.readouterr().err


def test_serve_ray_names_a_bad_replica_count_before_starting_ray(capsys: pytest.CaptureFixture[str]) -> None:
    from diffusers_api.cli import main

    assert main(["serve", "--ray", "--model", "builtin/tiny-sd", "--replicas", "0"]) == 2
    assert "replicas: must be at least 1" in capsys.readouterr().err

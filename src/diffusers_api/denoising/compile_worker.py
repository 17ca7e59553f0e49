"""The compiling process of COMPILE=1 (see compiled.py): `python -m diffusers_api.denoising.compile_worker`
reads a spec (JSON) on stdin, builds a UNet (or a diffusion transformer: SD3, Flux, PixArt) of that class and
config with placeholder weights, and compiles the step for the spec's inputs, which fills inductor's on-disk
caches; the server then loads from them. The server's side of it is `compile_in_subprocess`.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import subprocess
import sys
import weakref
from typing import Any

from .compiled import CompiledForward, CompileFailed, CompileTarget, compile_step
from .forward import ForwardKey, is_transformer

log = logging.getLogger(__name__)

SUBPROCESS_TIMEOUT_S = 3600.0

COMPILE_NICENESS = 10
"""How much lower the compiling process's CPU priority is than the server's (`os.nice`; its compile workers
inherit it), so that compiling takes the cores the server leaves idle. The server's steps need a core at once (on
a GPU, one thread launches each step's kernels). On an H200 host, before this, the first request beside a cold
compile took 13.5 s against 1.3 s (bench/results/gpu-h200-2026-11-26-run3.jsonl); whether CPU contention was all
of that is not measured yet."""


def compile_in_subprocess(unet: Any, target: CompileTarget, forward: CompiledForward) -> dict[str, Any]:
    """Compile the step for the target's shape in a new Python process, which fills the on-disk caches that the
    server then loads from. The process builds a UNet of the same class and config with placeholder weights (the
    weights are inputs of the compiled graph, so their values do not matter) on the same device, at a lower CPU
    priority (COMPILE_NICENESS). Returns what the process reports of itself (its niceness)."""
    if not isinstance(forward.backend, str):
        raise CompileFailed("a compiling process needs a backend by name")
    spec = _spec(unet, target, forward)
    command = [sys.executable, "-m", "diffusers_api.denoising.compile_worker"]
    spec_json = json.dumps(spec, default=str)  # the config's paths (_name_or_path) as text
    try:
        done = subprocess.run(
            command, input=spec_json, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise CompileFailed(f"the compiling process took over {SUBPROCESS_TIMEOUT_S:.0f} s") from exc
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or [f"exit status {done.returncode}"]
        log.debug("compiling process output:\n%s", done.stderr[-20000:])
        raise CompileFailed(f"the compiling process failed: {lines[-1]}")
    return _report(done.stdout)


def _report(stdout: str) -> dict[str, Any]:
    """The compiling process's last line of JSON (libraries may print before it); {} without one."""
    for line in reversed(stdout.strip().splitlines()):
        try:
            report = json.loads(line)
        except ValueError:
            continue
        if isinstance(report, dict):
            return report
    return {}


def _spec(unet: Any, target: CompileTarget, forward: CompiledForward) -> dict[str, Any]:
    import torch

    params = list(unet.parameters())
    kernels = [param for param in params if param.dim() == 4]
    channels_last = any(
        kernel.is_contiguous(memory_format=torch.channels_last) and not kernel.is_contiguous() for kernel in kernels
    )
    sample, timesteps, hidden, added = target.inputs

    def tensor(value: Any) -> dict[str, Any]:
        return {"shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch.")}

    return {
        "unet": f"{type(unet).__module__}:{type(unet).__qualname__}",
        "config": dict(unet.config),
        "dtype": str(params[0].dtype).removeprefix("torch."),
        "device": str(params[0].device),
        "channels_last": channels_last,
        "requires_grad": any(param.requires_grad for param in params),
        "inputs": [tensor(sample), tensor(timesteps), tensor(hidden)],
        "added": {name: tensor(value) for name, value in (added or {}).items()},
        "shared": {name: tensor(value) for name, value in (target.shared or {}).items()},  # Flux's position ids
        "grad": target.grad,
        "inference": target.inference,
        "backend": forward.backend,
        "mode": forward.mode,
        "recompile_limit": forward.recompile_limit,
        "threads": torch.get_num_threads(),  # CPU kernels are generated for a thread count
    }


def _compile_from_spec(spec: dict[str, Any]) -> None:
    """The compiling process: build the model the spec describes (a UNet or a transformer, by its class) and compile
    its step for the spec's inputs."""
    import torch

    torch.set_num_threads(spec["threads"])
    module, _, name = spec["unet"].partition(":")
    unet_class = getattr(importlib.import_module(module), name)
    device, dtype = torch.device(spec["device"]), getattr(torch, spec["dtype"])
    # built without memory, then given uninitialised memory on the device in its precision: the values do not
    # matter to the compile, and the server's device holds no more than one more copy of the weights
    with torch.device("meta"):
        unet = unet_class.from_config(spec["config"]).to(dtype).eval()
    unet.to_empty(device=device)
    if spec["channels_last"]:
        unet.to(memory_format=torch.channels_last)
    unet.requires_grad_(spec["requires_grad"])

    def tensor(described: dict[str, Any]) -> Any:
        return torch.randn(described["shape"], device=device).to(getattr(torch, described["dtype"]))

    sample, timesteps, hidden = (tensor(described) for described in spec["inputs"])
    added = {name: tensor(described) for name, described in spec["added"].items()} or None
    shared = {name: tensor(described) for name, described in spec.get("shared", {}).items()} or None
    key = (int(sample.shape[0]), ForwardKey.of(unet, sample, hidden, added), ())
    inputs = (sample, timesteps, hidden, added)
    target = CompileTarget(key, weakref.ref(unet), inputs, spec["grad"], spec["inference"], shared)
    forward = CompiledForward(backend=spec["backend"], mode=spec["mode"], recompile_limit=spec["recompile_limit"])
    if not compile_step(forward.compiler(is_transformer(unet)), unet, target, forward.recompile_limit):
        raise SystemExit("dynamo left the step uncompiled (see its log)")


def main() -> None:
    """`python -m diffusers_api.denoising.compile_worker` with a spec (JSON) on stdin: the compiling process."""
    logging.basicConfig(level=logging.WARNING)
    os.nice(COMPILE_NICENESS)
    _compile_from_spec(json.loads(sys.stdin.read()))
    print(json.dumps({"niceness": os.nice(0)}), flush=True)


if __name__ == "__main__":
    main()

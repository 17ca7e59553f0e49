"""Below the runner: how concurrent requests share their denoising steps on the device.

- `tasks.py`: one request as a `DenoiseTask` (SD and SDXL prepared and finished as their pipelines do); `dit.py`:
  the diffusion transformers (SD3, Flux, PixArt-Sigma) likewise;
- `loop.py`: the `Denoiser`, one thread stepping every task, batched step by step;
- `encoding.py`: requests that arrive while a prompt encode runs encode together, in one text-encoder call;
- `decoding.py`: tasks that finish in the same round decode in one VAE call (`groups.py`: what both count);
- `rendezvous.py`: where UNet calls meet, from our loop and from diffusers' own loop (other pipelines);
- `forward.py`: which rows may share a forward (`ForwardKey`) and the rows of one (`StepBatch`);
- `graphs.py`, `compiled.py`: how a forward runs (CUDA graphs per bucket, torch.compile in the background).

`SharedSteps` is what the runner sees of all this; the engine builds one (or none: each request alone).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import InvalidInputs
from .encoding import EncodeGroups
from .forward import UNetForward
from .groups import GroupStats
from .loop import Denoiser, LoopStats
from .rendezvous import BatchStats, Rendezvous

if TYPE_CHECKING:
    import threading

    from .tasks import Output, ProgressCallback

__all__ = ["Denoiser", "Rendezvous", "SharedSteps", "StepStats"]


@dataclass(frozen=True)
class StepStats:
    """What the shared steps did so far (the live counters, read by /health and /metrics)."""

    batch: BatchStats  # the rendezvous: rounds, forwards and their rows
    loop: LoopStats  # our loop: rounds and requests stepped
    decode: GroupStats  # VAE calls that decoded requests finishing together
    encode: GroupStats  # text-encoder calls that encoded requests arriving together
    compile: dict[str, Any]  # torch.compile's state (COMPILE=1), or {"state": "off"}

    def summary(self) -> dict[str, Any]:
        loop = {"loop": self.loop.summary(), "decode": self.decode.summary(), "encode": self.encode.summary()}
        return {"batching": self.batch.summary() | loop, "compile": self.compile}


class SharedSteps:
    """Batched steps for the runner: SD, SDXL, SD3, Flux and PixArt-Sigma requests run in our loop, other UNet
    pipelines' calls meet theirs at the rendezvous."""

    def __init__(
        self,
        rendezvous: Rendezvous | None = None,
        own_loop: bool = True,
        decode_batch_max: int = 8,
        encode_batch_max: int = 8,
    ) -> None:
        """`own_loop=False` runs every request in diffusers' own loop, its UNet calls meeting the others' at the
        rendezvous (what other pipelines always do; the tests compare the two loops with it).
        `decode_batch_max`: most images that one VAE call decodes for requests of our loop finishing together;
        `encode_batch_max`: most prompts that one text-encoder call encodes for requests arriving together."""
        self.rendezvous = rendezvous or Rendezvous()
        self.denoiser = Denoiser(self.rendezvous, decode_batch_max=decode_batch_max)
        self.encodes = EncodeGroups(encode_batch_max)
        self.own_loop = own_loop

    @classmethod
    def with_forward(
        cls, forward: UNetForward | None, max_wait_s: float, decode_batch_max: int = 8, encode_batch_max: int = 8
    ) -> SharedSteps:
        rendezvous = Rendezvous(forward=forward, max_wait_s=max_wait_s)
        return cls(rendezvous, decode_batch_max=decode_batch_max, encode_batch_max=encode_batch_max)

    def supports(self, pipe: Any, kwargs: dict[str, Any]) -> bool:
        """Whether our loop runs `pipe(**kwargs)` (it reproduces it exactly)."""
        from . import tasks

        return self.own_loop and tasks.supports(pipe, kwargs)

    def denoise(
        self,
        pipe: Any,
        kwargs: dict[str, Any],
        progress: ProgressCallback | None,
        cancel: threading.Event | None,
    ) -> Output:
        """`pipe(**kwargs)` through our loop: prepare on this thread (its prompts encoded with the requests that
        arrive with it), step in the shared loop, finish here. Inputs the pipeline would refuse are InvalidInputs."""
        from . import tasks

        try:
            task = tasks.prepare(pipe, kwargs, self.encodes, cancel)
        except (ValueError, TypeError) as exc:
            raise InvalidInputs(f"{type(pipe).__name__} rejected the inputs: {exc}") from exc
        task.progress, task.cancel = progress, cancel
        self.denoiser.run(task)
        return tasks.finish(pipe, task, kwargs)

    def session(self, pipe: Any) -> AbstractContextManager[None]:
        """For the length of one call of diffusers' own loop, its UNet calls meet the others' at the rendezvous."""
        return self.rendezvous.session(pipe)

    def stats(self) -> StepStats:
        from .compiled import CompiledForward

        forward = self.rendezvous.forward
        compiled = forward.summary() if isinstance(forward, CompiledForward) else {"state": "off"}
        denoiser = self.denoiser
        return StepStats(self.rendezvous.stats, denoiser.stats, denoiser.decode_stats, self.encodes.stats, compiled)

    def stop(self) -> None:
        self.denoiser.stop()

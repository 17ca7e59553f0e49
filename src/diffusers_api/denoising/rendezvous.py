"""Step-level continuous batching: concurrent requests share their UNet calls, one forward per step.

Each request runs diffusers' own denoising loop on its own thread, with its own pipeline object, scheduler,
generators, prompt embeddings and guidance scale. Only its UNet is swapped for a `BatchedUNet` proxy. When the
loop calls the UNet, the call is parked at a rendezvous (`Rendezvous`); once every request that is inside
its loop has parked its call for this step, the calls are concatenated along the batch axis, the real UNet
runs once per compatible group, and each caller gets back its own rows. So:

- a new request joins the running batch at the next step boundary (its first call joins the next round);
- a finished request leaves as soon as its last call is answered;
- classifier-free guidance is batched too (each call already holds its uncond + cond rows);
- text encoding, VAE decoding and image encoding of one request overlap with the others' steps, because they
  happen on that request's thread outside the rendezvous;
- the result of a request is the diffusers result: the same code computes it, only the UNet's batch differs.

A round also fires after `max_wait_s` without all participants, so a slow or stuck request can delay the
others by at most that much per step, never block them.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from .forward import ForwardKey, Residuals, StepBatch, StepRows, UNetForward, eager_forward

# The UNet arguments a batched call may carry (ControlNet and T2I-Adapter residuals are the caller's own rows, zeros
# for the other callers'); anything else (timestep_cond, attention kwargs) runs the call on its own within the round.
_BATCHABLE_KWARGS = {"encoder_hidden_states", "added_cond_kwargs", "return_dict", *Residuals.KWARGS}
_ALWAYS_NONE_OK = {"timestep_cond", "cross_attention_kwargs"}

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Call:
    """A model call at the rendezvous: rows that may merge with others' (our loop's steps; diffusers' UNet calls
    that carry nothing a batched forward would drop), or a call that runs alone, as it was made."""

    unet: Any
    rows: StepRows | None  # None: the call cannot be merged and runs alone
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    wrapped: bool = True  # the caller takes the module's output form (diffusers' loop), not the bare tensor
    key: ForwardKey | None = None
    result: Any = None
    error: BaseException | None = None
    done: bool = False

    def __post_init__(self) -> None:
        self.key = self.rows.key(self.unet) if self.rows is not None else None

    @classmethod
    def of_unet_call(cls, unet: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Call:
        """A UNet call of diffusers' loop, mergeable when it carries only what a batched forward passes on."""
        rows = None
        if _batchable(args, kwargs):
            sample = args[0]
            rows = StepRows(
                sample,
                _timesteps(sample, args[1]),
                kwargs["encoder_hidden_states"],
                kwargs.get("added_cond_kwargs"),
                residuals=Residuals.of_call(kwargs),
            )
        return cls(unet, rows, args, kwargs)

    @property
    def row_count(self) -> int:
        sample = self.rows.sample if self.rows is not None else self.args[0]
        return int(sample.shape[0])


@dataclass
class BatchStats:
    """What the rendezvous did: rounds run, UNet forwards, and the rows of each forward."""

    rounds: int = 0
    forwards: int = 0
    timeouts: int = 0  # rounds fired by the wait bound rather than by everyone arriving
    rows_total: int = 0
    rows: list[int] = field(default_factory=list)
    # forwards by their rows, since the start: /metrics builds its batch-size histogram from it
    row_counts: collections.Counter[int] = field(default_factory=collections.Counter)

    def record(self, rows: int) -> None:
        self.forwards += 1
        self.rows_total += rows
        self.row_counts[rows] += 1
        self.rows.append(rows)
        del self.rows[:-1000]  # keep the recent history only

    def summary(self) -> dict[str, float]:
        recent = self.rows[-200:]
        mean = sum(recent) / len(recent) if recent else 0.0
        return {
            "rounds": self.rounds,
            "forwards": self.forwards,
            "timeouts": self.timeouts,
            "rows_total": self.rows_total,
            "mean_rows": round(mean, 2),
        }


class Rendezvous:
    """The rendezvous of UNet calls from concurrent denoising loops."""

    def __init__(self, forward: UNetForward | None = None, max_wait_s: float = 0.25) -> None:
        self.forward = forward or eager_forward  # how a merged group's UNet step runs
        self.max_wait_s = max_wait_s
        self._cond = threading.Condition()
        self._participants = 0
        self._pending: list[_Call] = []
        self.stats = BatchStats()

    @property
    def participants(self) -> int:
        return self._participants

    @contextmanager
    def session(self, pipe: Any) -> Iterator[None]:
        """Route `pipe`'s UNet calls through the rendezvous for the duration of one pipeline call."""
        proxy = BatchedUNet(self, pipe.unet, pipe)
        # object.__setattr__: DiffusionPipeline.__setattr__ would record the proxy in the pipeline's config
        object.__setattr__(pipe, "unet", proxy)
        try:
            yield
        finally:
            proxy.leave()
            object.__setattr__(pipe, "unet", proxy.unet)

    # --- participants ----------------------------------------------------------------------------------------
    # A participant is a denoising loop between its first and last UNet call: a round fires once every
    # participant has parked its call (or after max_wait_s).

    def join(self) -> None:
        with self._cond:
            self._participants += 1

    def leave(self) -> None:
        with self._cond:
            self._participants -= 1
            # the round may now be complete without the one that left
            if self._pending and len(self._pending) >= self._participants:
                self._cond.notify_all()

    # --- the rendezvous --------------------------------------------------------------------------------------

    def call(self, unet: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """A UNet call of diffusers' loop: merged with the others' of this round where it can be."""
        return self._meet(_Call.of_unet_call(unet, args, kwargs))

    def forward_rows(self, model: Any, rows: StepRows) -> Any:
        """A step of our loop (its tasks' rows, for a UNet or a diffusion transformer): the output's rows."""
        return self._meet(_Call(model, rows, wrapped=False))

    def _meet(self, call: _Call) -> Any:
        batch: list[_Call] | None = None
        with self._cond:
            self._pending.append(call)
            while not call.done:
                if call in self._pending and (len(self._pending) >= self._participants or batch == []):
                    if batch == []:
                        self.stats.timeouts += 1
                    batch, self._pending = self._pending, []
                    break
                timed_out = not self._cond.wait(self.max_wait_s)
                if timed_out and not call.done:
                    batch = []  # next pass: run whatever is pending, stragglers or not
        if batch:
            self._run_round(batch)
        if call.error is not None:
            # Raised without a reference left in this frame: the traceback holds the frame, and a cycle through
            # it would keep the failed forward's tensors (an out-of-memory retry needs them gone) until a GC pass.
            error, call.error = call.error, None
            try:
                raise error
            finally:
                del error
        return call.result

    def _run_round(self, batch: list[_Call]) -> None:
        try:
            for group in _groups(batch):
                self._run_group(group)
        except BaseException as exc:  # every caller must wake up, with the error if its group failed
            for call in batch:
                if not call.done:
                    call.error = exc
            raise
        finally:
            with self._cond:
                for call in batch:
                    call.done = True
                self.stats.rounds += 1
                self._cond.notify_all()

    def _run_group(self, group: list[_Call]) -> None:
        try:
            if group[0].key is None:
                call = group[0]
                call.result = call.unet(*call.args, **call.kwargs)
                self.stats.record(call.row_count)
                return
            outputs = self._batched_forward(group)
            for call, output in zip(group, outputs, strict=True):
                call.result = _wrap_output(output, call.kwargs.get("return_dict", True)) if call.wrapped else output
            return
        except Exception as exc:
            if len(group) == 1:
                group[0].error = exc
                return
            failure = f"{type(exc).__name__}: {exc}"
        # Out of memory, say: each call alone may still fit, and fails only itself. Retried outside the except
        # block, whose traceback holds the failed forward's tensors until it ends.
        log.warning("a merged UNet step of %d calls failed (%s); running them one by one", len(group), failure)
        for call in group:
            self._run_group([call])

    def _batched_forward(self, group: list[_Call]) -> list[Any]:
        batch = StepBatch.of([_rows(call) for call in group])
        outputs = batch.run(self.forward, group[0].unet)
        self.stats.record(batch.rows)
        return outputs


class BatchedUNet:
    """Stands in for a pipeline's UNet during one call: attributes go to the real UNet, calls to the rendezvous."""

    def __init__(self, rendezvous: Rendezvous, unet: Any, pipe: Any) -> None:
        self.__dict__.update(_rendezvous=rendezvous, unet=unet, _pipe=pipe, _joined=False, _calls=0)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.unet, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self._joined:
            self.__dict__["_joined"] = True
            self._rendezvous.join()
        try:
            return self._rendezvous.call(self.unet, args, kwargs)
        finally:
            self.__dict__["_calls"] = self._calls + 1
            # The loop makes one UNet call per timestep: after the last one the request leaves at once, so the
            # others do not wait for it while it decodes its image.
            if self._calls >= getattr(self._pipe, "_num_timesteps", float("inf")):
                self.leave()

    def leave(self) -> None:
        if self._joined:
            self.__dict__["_joined"] = False
            self._rendezvous.leave()


def _batchable(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    if len(args) != 2 or kwargs.get("encoder_hidden_states") is None:
        return False
    extra = set(kwargs) - _BATCHABLE_KWARGS
    # an IP-Adapter's image_embeds is a list of tensors, which rows cannot be concatenated along: it runs alone
    added = kwargs.get("added_cond_kwargs") or {}
    if not all(_is_tensor(value) for value in added.values()):
        return False
    return all(name in _ALWAYS_NONE_OK and kwargs[name] is None for name in extra)


def _is_tensor(value: Any) -> bool:
    import torch

    return torch.is_tensor(value)


def _timesteps(sample: Any, t: Any) -> Any:
    """A UNet call's timestep as a float vector with one entry per row (the UNet embeds timesteps as floats)."""
    import torch

    t = t if torch.is_tensor(t) else torch.tensor(t)
    return t.reshape(-1).to(device=sample.device, dtype=torch.float32).expand(sample.shape[0])


def _rows(call: _Call) -> StepRows:
    assert call.rows is not None  # only mergeable calls are batched
    return call.rows


def _groups(batch: list[_Call]) -> list[list[_Call]]:
    """Calls that can share a forward, in order of arrival; a call that cannot be merged is a group alone."""
    groups: dict[ForwardKey | int, list[_Call]] = {}
    for call in batch:
        groups.setdefault(call.key if call.key is not None else id(call), []).append(call)
    return list(groups.values())


def _wrap_output(output: Any, return_dict: bool) -> Any:
    if not return_dict:
        return (output,)
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    return UNet2DConditionOutput(sample=output)

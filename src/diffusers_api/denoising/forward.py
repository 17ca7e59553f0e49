"""One batched forward of a denoising model (a UNet or a diffusion transformer): which rows may share it
(`ForwardKey`), the rows themselves (`StepBatch`), and how it runs (`UNetForward`: eagerly, as a CUDA graph, or
compiled).

Every part of the loop that groups or caches forwards (the rendezvous, the loop's groups, the CUDA graph and
compile caches) keys them by the same `ForwardKey`, so two rows that may share a batch also share its graph.

The inputs are named as the models name them, in four parts: the latents (`sample`), one timestep per row, the
text embeddings (`hidden`), the model's other inputs with one row per latent row (`added`: a UNet's
`added_cond_kwargs`, a transformer's `pooled_projections`, `guidance` or `encoder_attention_mask`), and inputs
without a batch axis that every row takes as they are (`shared`: Flux's position ids).

A UNet call may also carry a ControlNet's or T2I-Adapter's residuals (`Residuals`), rows like the sample: they are
its request's own, and in a merged forward the rows of callers without them get zeros, which the UNet adds
exactly (x + 0 == x), so those rows compute what they would alone.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

UNetForward = Callable[..., Any]
"""(model, sample, timesteps[batch], encoder_hidden_states, added, shared) -> noise prediction: the model's step,
however it runs (`eager_forward`, `CudaGraphForward`, `CompiledForward`)."""


def eager_forward(
    model: Any, sample: Any, timesteps: Any, hidden: Any, added: dict[str, Any] | None, shared: Any = None
) -> Any:
    """The model's step, called as its pipeline calls it: a UNet by position and `added_cond_kwargs`, a diffusion
    transformer (SD3, Flux, PixArt) by name."""
    if is_transformer(model):
        named = (added or {}) | (shared or {})
        model_class: Any = type(model)  # hashable (see is_transformer)
        if _takes_micro_conditions(model_class):
            # PixArt's resolution and aspect ratio: its Sigma pipeline gives neither (`dit.supports_transformer`
            # leaves models that need them to diffusers)
            named["added_cond_kwargs"] = {"resolution": None, "aspect_ratio": None}
        return model(
            hidden_states=sample, timestep=timesteps, encoder_hidden_states=hidden, **named, return_dict=False
        )[0]
    return model(sample, timesteps, encoder_hidden_states=hidden, added_cond_kwargs=added, return_dict=False)[0]


def takes_micro_conditions(model: Any) -> bool:
    """Whether `eager_forward` passes the model PixArt's micro-conditions (`added_cond_kwargs`)."""
    model_class: Any = type(model)  # hashable (see is_transformer)
    return _takes_micro_conditions(model_class)


def is_transformer(model: Any) -> bool:
    model_class: Any = type(model)  # a class is hashable (typeshed's type[Any] is not seen as such)
    return _takes_hidden_states(model_class)


@functools.cache
def _takes_hidden_states(model_class: Any) -> bool:
    """Diffusion transformers take their latents as `hidden_states`; UNets take them as `sample`."""
    forward = getattr(model_class, "forward", None)
    if forward is None:
        return False
    parameters = list(inspect.signature(forward).parameters)
    return len(parameters) > 1 and parameters[1] == "hidden_states"


@functools.cache
def _takes_micro_conditions(model_class: Any) -> bool:
    """PixArt's transformer takes its micro-conditions as `added_cond_kwargs` (a UNet's name for its added inputs)."""
    forward = getattr(model_class, "forward", None)
    return forward is not None and "added_cond_kwargs" in inspect.signature(forward).parameters


def _row_shape(tensor: Any) -> tuple[tuple[int, ...], str]:
    """A tensor's shape past the batch axis, and its dtype."""
    return tuple(tensor.shape[1:]), str(tensor.dtype)


@dataclass(frozen=True)
class SharedInputs:
    """Inputs without a batch axis that every row of a forward takes as they are (Flux's position ids). `key`
    names what decides their values (Flux: the latent grid), so that only rows with equal ones share a forward."""

    key: tuple[Hashable, ...]
    tensors: dict[str, torch.Tensor]


@dataclass(frozen=True)
class ForwardKey:
    """Forwards with equal keys can run as one batch: the same module, on rows of the same shapes, dtypes and
    device, with the same shared inputs. The number of rows is not part of it (the CUDA graph and compile caches
    add their own)."""

    module: int  # id() of the UNet or transformer
    device: str
    sample: tuple[tuple[int, ...], str]
    hidden: tuple[tuple[int, ...], str]
    added: tuple[tuple[str, tuple[int, ...], str], ...] = ()
    shared: tuple[Hashable, ...] = ()  # SharedInputs.key

    @classmethod
    def of(
        cls, unet: Any, sample: Any, hidden: Any, added: dict[str, Any] | None, shared: SharedInputs | None = None
    ) -> ForwardKey:
        extra = tuple(sorted((name, *_row_shape(value)) for name, value in (added or {}).items()))
        shared_key = shared.key if shared is not None else ()
        return cls(id(unet), str(sample.device), _row_shape(sample), _row_shape(hidden), extra, shared_key)

    def describe(self, rows: int) -> str:
        shape, dtype = self.sample
        return f"{rows} rows of {shape} {dtype} on {self.device}"


@dataclass(frozen=True, eq=False)
class Residuals:
    """What a ControlNet (down and mid) or a T2I-Adapter (intrablock) adds inside a UNet forward, rows like its
    sample."""

    down: tuple[torch.Tensor, ...] = ()  # down_block_additional_residuals
    mid: torch.Tensor | None = None  # mid_block_additional_residual
    intrablock: tuple[torch.Tensor, ...] = ()  # down_intrablock_additional_residuals

    KWARGS = (
        "down_block_additional_residuals",
        "mid_block_additional_residual",
        "down_intrablock_additional_residuals",
    )

    @classmethod
    def of_call(cls, kwargs: dict[str, Any]) -> Residuals | None:
        """The residuals a diffusers pipeline passed to its UNet call, or None without any."""
        down, mid = kwargs.get(cls.KWARGS[0]), kwargs.get(cls.KWARGS[1])
        intrablock = kwargs.get(cls.KWARGS[2])
        if down is None and mid is None and intrablock is None:
            return None
        if mid is None and intrablock is None:  # the UNet's older spelling of a T2I-Adapter's residuals
            down, intrablock = None, down
        return cls(tuple(down or ()), mid, tuple(intrablock or ()))

    def kwargs(self) -> dict[str, Any]:
        """As the UNet takes them (the intrablock list is consumed by the UNet: a new one per call)."""
        named: dict[str, Any] = {}
        if self.mid is not None:
            named |= {self.KWARGS[0]: self.down, self.KWARGS[1]: self.mid}
        if self.intrablock:
            named[self.KWARGS[2]] = list(self.intrablock)
        return named

    @classmethod
    def cat(cls, parts: Sequence[Residuals | None], rows: Sequence[int]) -> Residuals | None:
        """The parts' residuals as one, zeros for the rows of parts without (None when no part has any)."""
        import torch

        controlnet = next((part for part in parts if part is not None and part.mid is not None), None)
        adapter = next((part for part in parts if part is not None and part.intrablock), None)
        if controlnet is None and adapter is None:
            return None

        def joined(reference: tuple[torch.Tensor, ...], own: Callable[[Residuals], tuple[torch.Tensor, ...]]) -> Any:
            columns = []
            for index, like in enumerate(reference):
                pieces = [
                    own(part)[index] if part is not None and own(part) else like.new_zeros((count, *like.shape[1:]))
                    for part, count in zip(parts, rows, strict=True)
                ]
                columns.append(torch.cat(pieces))
            return tuple(columns)

        down = mid = None
        if controlnet is not None:
            assert controlnet.mid is not None
            down_and_mid = joined(
                (*controlnet.down, controlnet.mid), lambda part: (*part.down, part.mid) if part.mid is not None else ()
            )
            down, mid = down_and_mid[:-1], down_and_mid[-1]
        intrablock = joined(adapter.intrablock, lambda part: part.intrablock) if adapter is not None else ()
        return cls(down or (), mid, intrablock)


@dataclass(frozen=True)
class StepRows:
    """One part of a batched step: the model inputs of one caller (or one half of a guided request)."""

    sample: torch.Tensor
    timesteps: torch.Tensor  # one per row
    hidden: torch.Tensor
    added: dict[str, torch.Tensor] | None = None
    shared: SharedInputs | None = None
    residuals: Residuals | None = None  # a UNet call's ControlNet / T2I-Adapter residuals

    @property
    def rows(self) -> int:
        return int(self.sample.shape[0])

    def key(self, model: Any) -> ForwardKey:
        return ForwardKey.of(model, self.sample, self.hidden, self.added, self.shared)

    @classmethod
    def cat(cls, parts: Sequence[StepRows]) -> StepRows:
        """The parts' rows as one (parts of one key: the same added inputs, equal shared ones)."""
        import torch

        added = None
        if parts[0].added is not None:
            added = {name: torch.cat([_added(part)[name] for part in parts]) for name in parts[0].added}
        return cls(
            sample=torch.cat([part.sample for part in parts]),
            timesteps=torch.cat([part.timesteps for part in parts]),
            hidden=torch.cat([part.hidden for part in parts]),
            added=added,
            shared=parts[0].shared,  # equal keys: equal shared inputs, so the first part's serve all
            residuals=Residuals.cat([part.residuals for part in parts], [part.rows for part in parts]),
        )


@dataclass(frozen=True)
class StepBatch:
    """The rows of one forward, made of parts that all have one `ForwardKey`; `run` hands each part its rows of
    the output."""

    sample: torch.Tensor
    timesteps: torch.Tensor
    hidden: torch.Tensor
    added: dict[str, torch.Tensor] | None
    sizes: tuple[int, ...]
    shared: dict[str, torch.Tensor] | None = None
    residuals: Residuals | None = None

    @classmethod
    def of(cls, parts: Sequence[StepRows]) -> StepBatch:
        whole = StepRows.cat(parts)
        return cls(
            sample=whole.sample,
            timesteps=whole.timesteps,
            hidden=whole.hidden,
            added=whole.added,
            sizes=tuple(part.rows for part in parts),
            shared=whole.shared.tensors if whole.shared is not None else None,
            residuals=whole.residuals,
        )

    @property
    def rows(self) -> int:
        return int(self.sample.shape[0])

    def run(self, forward: UNetForward, unet: Any) -> list[torch.Tensor]:
        """The forward of all rows at once, split back into each part's rows. With residuals it runs eagerly (CUDA
        graphs and compiled forwards take none)."""
        if self.residuals is not None:
            named = self.residuals.kwargs()
            output = unet(self.sample, self.timesteps, encoder_hidden_states=self.hidden, added_cond_kwargs=self.added,
                          return_dict=False, **named)[0]  # fmt: skip
            return list(output.split(list(self.sizes)))
        output = forward(unet, self.sample, self.timesteps, self.hidden, self.added, self.shared)
        return list(output.split(list(self.sizes)))


def _added(part: StepRows) -> dict[str, torch.Tensor]:
    assert part.added is not None
    return part.added

"""One batched UNet forward: which rows may share it (`ForwardKey`), the rows themselves (`StepBatch`), and how
it runs (`UNetForward`: eagerly, as a CUDA graph, or compiled).

Every part of the loop that groups or caches forwards (the rendezvous, the loop's groups, the CUDA graph and
compile caches) keys them by the same `ForwardKey`, so two rows that may share a batch also share its graph.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

UNetForward = Callable[[Any, Any, Any, Any, dict[str, Any] | None], Any]
"""(unet, sample, timesteps[batch], encoder_hidden_states, added_cond_kwargs) -> noise prediction."""


def eager_forward(unet: Any, sample: Any, timesteps: Any, hidden: Any, added: dict[str, Any] | None) -> Any:
    return unet(sample, timesteps, encoder_hidden_states=hidden, added_cond_kwargs=added, return_dict=False)[0]


def _row_shape(tensor: Any) -> tuple[tuple[int, ...], str]:
    """A tensor's shape past the batch axis, and its dtype."""
    return tuple(tensor.shape[1:]), str(tensor.dtype)


@dataclass(frozen=True)
class ForwardKey:
    """Forwards with equal keys can run as one batch: the same module, on rows of the same shapes, dtypes and
    device. The number of rows is not part of it (the CUDA graph and compile caches add their own)."""

    module: int  # id() of the UNet
    device: str
    sample: tuple[tuple[int, ...], str]
    hidden: tuple[tuple[int, ...], str]
    added: tuple[tuple[str, tuple[int, ...], str], ...] = ()

    @classmethod
    def of(cls, unet: Any, sample: Any, hidden: Any, added: dict[str, Any] | None) -> ForwardKey:
        extra = tuple(sorted((name, *_row_shape(value)) for name, value in (added or {}).items()))
        return cls(id(unet), str(sample.device), _row_shape(sample), _row_shape(hidden), extra)

    def describe(self, rows: int) -> str:
        shape, dtype = self.sample
        return f"{rows} rows of {shape} {dtype} on {self.device}"


@dataclass(frozen=True)
class StepRows:
    """One part of a batched step: the UNet inputs of one caller (or one half of a guided request)."""

    sample: torch.Tensor
    timesteps: torch.Tensor  # one float per row
    hidden: torch.Tensor
    added: dict[str, torch.Tensor] | None = None

    @property
    def rows(self) -> int:
        return int(self.sample.shape[0])


@dataclass(frozen=True)
class StepBatch:
    """The rows of one UNet forward, made of parts that all have one `ForwardKey`; `split` hands each part its
    rows of the output."""

    sample: torch.Tensor
    timesteps: torch.Tensor
    hidden: torch.Tensor
    added: dict[str, torch.Tensor] | None
    sizes: tuple[int, ...]

    @classmethod
    def of(cls, parts: Sequence[StepRows]) -> StepBatch:
        import torch

        added = None
        if parts[0].added is not None:  # parts of one key all have the same added conditioning
            added = {name: torch.cat([_added(part)[name] for part in parts]) for name in parts[0].added}
        return cls(
            sample=torch.cat([part.sample for part in parts]),
            timesteps=torch.cat([part.timesteps for part in parts]),
            hidden=torch.cat([part.hidden for part in parts]),
            added=added,
            sizes=tuple(part.rows for part in parts),
        )

    @property
    def rows(self) -> int:
        return int(self.sample.shape[0])

    def run(self, forward: UNetForward, unet: Any) -> list[torch.Tensor]:
        """The forward of all rows at once, split back into each part's rows."""
        output = forward(unet, self.sample, self.timesteps, self.hidden, self.added)
        return list(output.split(list(self.sizes)))


def _added(part: StepRows) -> dict[str, torch.Tensor]:
    assert part.added is not None
    return part.added

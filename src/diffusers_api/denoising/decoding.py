"""Requests that finish together decode together: one VAE call for the tasks whose last step ran in one round.

A request's last step ends in a loop round, and requests admitted together end in the same one. Decoding each on
its own thread is one VAE call per request; on an H200, 8 SD2.1 images at 512 px took 0.209 s that way and 0.124 s
in one call (bench/results/loop-h200-2026-11-26.jsonl). So at the end of a round the loop puts the tasks it
finished into `DecodeGroup`s: tasks with the same VAE (the same module), latent shape and dtype, and the same
decode recipe (their family's), at most DECODE_BATCH_MAX images per group. Then, on the request threads:

- the first member to ask decodes the whole group at once: every member's latents are final, so it waits for
  no one. Each member's latents become the VAE's input as its family does it (tasks.vae_input: unpacking,
  scaling, shift, SDXL's float32 upcast), they are concatenated into one `vae.decode`, and each member takes its
  own rows. The others wait only for that call, then take theirs;
- what follows the VAE (safety checker, watermark, post-processing, PixArt's resize) stays on each request's
  own thread;
- a member that no longer wants its image (cancelled after the round) is left out; one whose input cannot be
  made is left to decode alone (and to meet its own error there); a batched call that fails for any reason,
  running out of memory included, is given up and every member decodes alone, as without groups;
- a batched call that ran out of memory lowers the cap of its VAE and latent shape to half its images
  (`DecodeCaps`), so that the next rounds do not run out again (SDXL's VAE decodes in float32: 8 images at
  1024 px need several GB more than one). A cap of 1 is no group. Caps are kept while the VAE is loaded.

A batched VAE call gives the same images as one call per request up to the last float bits (batched kernels
round differently; the tests bound it as the batched UNet steps are bounded).
"""

from __future__ import annotations

import functools
import logging
import threading
import weakref
from typing import TYPE_CHECKING, Any

from .groups import GroupStats, batched

if TYPE_CHECKING:
    from collections.abc import Callable

    import torch

    from .tasks import DenoiseTask

log = logging.getLogger(__name__)

# VAE classes whose decode works row by row (and takes no generator): rows of several requests decode as alone.
# (A ConsistencyDecoderVAE samples with the request's generator, so its requests decode alone.)
_BATCHABLE_VAES = frozenset({"AutoencoderKL"})


def decode_key(task: DenoiseTask) -> tuple[Any, ...] | None:
    """Tasks with equal keys can decode in one VAE call; None: this one decodes alone.
    The same VAE module, latent shape (but the batch) and dtype, and the same recipe: the family's, and for Flux
    the image size its tokens unpack to (64x128 and 128x64 pack into tokens of one shape)."""
    from .tasks import Family

    vae = getattr(task.pipe, "vae", None)
    if vae is None or type(vae).__name__ not in _BATCHABLE_VAES:
        return None
    size = task.size if task.family is Family.FLUX else None
    latents = task.latents
    return (vae, task.family, tuple(latents.shape[1:]), latents.dtype, latents.device, size)


class DecodeCaps:
    """The most images one VAE call may decode for each VAE and latent shape (a decode key), where a batched call
    of them ran out of memory: half that call's images. Held per VAE module, weakly: an unloaded model's caps go
    with it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._caps: weakref.WeakKeyDictionary[Any, dict[tuple[Any, ...], int]] = weakref.WeakKeyDictionary()

    def of(self, key: tuple[Any, ...], limit: int) -> int:
        """The cap of `key`'s decodes: `limit` (DECODE_BATCH_MAX) unless it was lowered."""
        with self._lock:
            return min(limit, self._caps.get(key[0], {}).get(key[1:], limit))

    def lower(self, key: tuple[Any, ...], images: int) -> None:
        """A batched call of `images` images of `key` ran out of memory: later calls take at most half as many."""
        cap = max(1, images // 2)
        with self._lock:
            caps = self._caps.setdefault(key[0], {})
            lowered = cap < caps.get(key[1:], images)
            if lowered:
                caps[key[1:]] = cap
        if lowered:
            _, family, shape, dtype, *_ = key
            log.warning(
                "a batched VAE decode of %d images ran out of memory: %s latents %s %s decode at most %d per call "
                "from now on",
                images,
                family.value,
                "x".join(map(str, shape)),
                dtype,
                cap,
            )


def group_decodes(tasks: list[DenoiseTask], max_images: int, stats: GroupStats, caps: DecodeCaps) -> None:
    """Attach a shared `DecodeGroup` to the `tasks` (finished in one round) that can decode together, in groups of
    at most `max_images` images (less where `caps` says so). A task left alone gets none."""
    groups: dict[tuple[Any, ...], list[DenoiseTask]] = {}
    for task in tasks:
        key = decode_key(task)
        if key is not None:
            groups.setdefault(key, []).append(task)
    for key, members in groups.items():
        cap = caps.of(key, max_images)
        for chunk in _chunks([task for task in members if task.images < cap], cap):
            if len(chunk) > 1:
                group = DecodeGroup(chunk, stats, functools.partial(caps.lower, key))
                for task in chunk:
                    task.decode_group = group


def _chunks(tasks: list[DenoiseTask], max_images: int) -> list[list[DenoiseTask]]:
    """`tasks` in order, cut into runs of at most `max_images` images."""
    chunks: list[list[DenoiseTask]] = []
    images = max_images
    for task in tasks:
        if images + task.images > max_images:
            chunks.append([])
            images = 0
        chunks[-1].append(task)
        images += task.images
    return chunks


class DecodeGroup:
    """Tasks that decode in one VAE call, made by the first of them to ask (`images_of`)."""

    def __init__(
        self, tasks: list[DenoiseTask], stats: GroupStats, out_of_memory: Callable[[int], None] | None = None
    ) -> None:
        """`out_of_memory(images)`: called when the group's call of that many images ran out of memory."""
        self.tasks = tasks
        self._stats = stats
        self._out_of_memory = out_of_memory
        self._lock = threading.Lock()
        self._decoded = False  # whether the call was made (or given up)
        self._images: dict[int, torch.Tensor] = {}  # id(task) -> its rows of the VAE's output, until taken

    def images_of(self, task: DenoiseTask) -> torch.Tensor | None:
        """`task`'s rows of the group's VAE output (the first caller makes the call, the others wait for it);
        None where `task` must decode alone: left out of the call, the call failed, or its rows were taken."""
        with self._lock:
            if not self._decoded:
                self._decoded = True
                self._decode()
                self.tasks = []  # no longer needed: members' other tensors are not held for the others
            return self._images.pop(id(task), None)

    def _decode(self) -> None:
        import torch

        from .tasks import vae_input

        inputs: list[tuple[DenoiseTask, Any, torch.Tensor]] = []
        for task in self.tasks:
            if task.cancel is not None and task.cancel.is_set():
                continue  # cancelled after its last step: no one waits for its image
            try:
                vae, latents = vae_input(task.pipe, task)
            except Exception:  # its own decode meets the same error, for it alone
                log.exception("preparing a request's latents for a batched decode failed; it decodes alone")
                continue
            inputs.append((task, vae, latents))
        if len(inputs) < 2 or any(vae is not inputs[0][1] for _, vae, _ in inputs):
            return

        def decode() -> torch.Tensor:
            return inputs[0][1].decode(torch.cat([latents for _, _, latents in inputs]), return_dict=False)[0]

        images = [task.images for task, _, _ in inputs]
        lower = self._out_of_memory
        decoded = batched(
            self._stats, "VAE decode", len(inputs), decode, None if lower is None else lambda: lower(sum(images))
        )
        if decoded is None:
            return
        self._stats.count(sum(images))
        for (task, _, _), rows in zip(inputs, decoded.split(images), strict=True):
            self._images[id(task)] = rows

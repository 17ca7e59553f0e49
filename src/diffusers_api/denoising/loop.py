"""The batched denoising loop: one thread steps every request that is between its first and last step.

Requests arrive as `DenoiseTask`s (denoising/tasks.py), prepared on their own threads. Each round of the loop:

1. tasks submitted since the last round join (a new request joins the running batch at the next step boundary);
   cancelled tasks leave (a cancelled request stops within one step and frees its rows);
2. tasks that can share a UNet forward (same model, latent shape, conditioning shapes) form a group; each
   group's inputs are concatenated as [unconditional rows of the guided tasks, their conditional rows, rows of
   unguided tasks] and run as one forward through the rendezvous (so CUDA graphs, compile and requests on
   the generic diffusers path share it too);
3. classifier-free guidance is one tensor operation for the whole group, with each task's own guidance scale;
4. each task's own scheduler steps its own latents (schedulers keep per-request history: steps, solver state,
   noise generators), then its progress is reported; a task whose steps are done leaves at once, and its
   request thread decodes the image while the loop goes on with the others. The tasks that leave in one round
   and can share a VAE call are put in decode groups first (denoising/decoding.py): the first of their request
   threads to get there decodes them all in one call.

Every task steps in every round, so none starves; how many images are in flight at once is bounded by the
engine's admission (MAX_BATCH_SIZE), and how many rows one forward takes by the device's memory: a forward
that runs out of memory is split in halves, and the group's forwards stay capped at the rows that fit until
the loop next goes idle (then memory may have been freed, and the cap is learned again). Any other failing
forward is retried task by task, so one bad request fails only itself.
"""

from __future__ import annotations

import enum
import gc
import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..devices import is_out_of_memory
from ..errors import Cancelled, NotReady
from .decoding import DecodeCaps, group_decodes
from .forward import ForwardKey, StepRows
from .groups import GroupStats

if TYPE_CHECKING:
    import torch

    from .rendezvous import Rendezvous
    from .tasks import DenoiseTask

log = logging.getLogger(__name__)


@dataclass
class LoopStats:
    rounds: int = 0
    # (named "jobs" on the wire: /health and /metrics report requests in the loop under these names)
    jobs: int = 0  # tasks that entered the loop
    job_steps: int = 0  # sum over rounds of the tasks stepped
    max_jobs: int = 0  # most tasks stepped in one round
    out_of_memory: int = 0  # forwards that ran out of memory and were split
    row_cap: int | None = None  # the smallest rows-per-forward cap learned from those, while it holds

    def summary(self) -> dict[str, float | None]:
        mean = self.job_steps / self.rounds if self.rounds else 0.0
        return {
            "rounds": self.rounds,
            "jobs": self.jobs,
            "mean_jobs_per_round": round(mean, 2),
            "max_jobs": self.max_jobs,
            "out_of_memory": self.out_of_memory,
            "row_cap": self.row_cap,
        }


class Denoiser:
    """Runs `DenoiseTask`s to their last step on one thread, batching them step by step."""

    def __init__(self, rendezvous: Rendezvous, decode_batch_max: int = 8) -> None:
        """`decode_batch_max`: most images of tasks finishing in one round that decode in one VAE call (1: each
        decodes alone)."""
        self.rendezvous = rendezvous
        self.stats = LoopStats()
        self.decode_batch_max = decode_batch_max
        self.decode_stats = GroupStats("images")
        self.decode_caps = DecodeCaps()  # lowered where a batched decode ran out of memory
        self._cond = threading.Condition()
        self._inbox: list[DenoiseTask] = []
        self._active: list[DenoiseTask] = []
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._joined = False  # whether the loop is a participant of the rendezvous
        self._row_caps: dict[ForwardKey, int] = {}  # group key -> most rows per forward that fit in memory

    @property
    def active(self) -> int:
        return len(self._active)

    def run(self, task: DenoiseTask) -> None:
        """Denoise `task` through its last step; blocks the calling (request) thread. Raises the task's error."""
        self.submit(task)
        task.done.wait()
        if task.error is not None:
            raise task.error

    def submit(self, *tasks: DenoiseTask) -> None:
        """Hand `tasks` to the loop without waiting for them (`done` tells when each ends): they join the same
        round. (Tests start requests together with it.)"""
        with self._cond:
            if self._stopped:
                raise NotReady("the server is stopping", state="STOPPING")
            self._inbox.extend(tasks)
            self.stats.jobs += len(tasks)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="denoiser", daemon=True)
                self._thread.start()
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()

    # --- the loop ----------------------------------------------------------------------------------------------

    def _loop(self) -> None:
        import torch

        with torch.inference_mode():
            while self._next_round():
                try:
                    self._round()
                except BaseException as exc:  # a bug here must fail the requests, never leave them waiting
                    log.exception("denoising loop round failed")
                    failed, self._active = self._active, []
                    self._participate(False)  # idle: requests on diffusers' loop must not wait for us
                    self._fail(failed, exc)
                    if not isinstance(exc, Exception):
                        raise

    def _next_round(self) -> bool:
        """Wait for work; admit the tasks that arrived. False when stopped (pending tasks then fail)."""
        with self._cond:
            if not (self._inbox or self._active):
                self._row_caps.clear()  # idle: what did not fit may fit now
                self.stats.row_cap = None
            while not (self._inbox or self._active or self._stopped):
                self._cond.wait()
            if self._stopped:
                self._fail([*self._active, *self._inbox], NotReady("the server is stopping", state="STOPPING"))
                self._active, self._inbox = [], []
                self._participate(False)
                return False
            self._active.extend(self._inbox)
            self._inbox.clear()
            return True

    def _round(self) -> None:
        self._active = [task for task in self._active if not self._left_cancelled(task)]
        self._participate(bool(self._active))
        if not self._active:
            return
        self.stats.rounds += 1
        self.stats.job_steps += len(self._active)
        self.stats.max_jobs = max(self.stats.max_jobs, len(self._active))
        for group in _groups(self._active):
            self._step(group)
        leaving = [task for task in self._active if task.error is not None or task.finished]
        self._active = [task for task in self._active if task.error is None and not task.finished]
        self._group_decodes([task for task in leaving if task.error is None])
        for task in leaving:
            task.done.set()
        self._participate(bool(self._active))

    def _group_decodes(self, finished: list[DenoiseTask]) -> None:
        """Put the tasks finished in this round into decode groups, before their request threads wake up."""
        if len(finished) < 2 or self.decode_batch_max < 2:
            return
        try:
            group_decodes(finished, self.decode_batch_max, self.decode_stats, self.decode_caps)
        except Exception:  # grouping only saves time: the tasks decode alone, as without it
            log.exception("grouping finished requests for a batched decode failed")
            for task in finished:
                task.decode_group = None

    def _participate(self, busy: bool) -> None:
        """The loop counts as one participant of the rendezvous while it has tasks, so that requests on
        the generic diffusers path merge their UNet calls with it instead of racing it."""
        if busy and not self._joined:
            self.rendezvous.join()
            self._joined = True
        elif not busy and self._joined:
            self.rendezvous.leave()
            self._joined = False

    def _left_cancelled(self, task: DenoiseTask) -> bool:
        if task.cancel is None or not task.cancel.is_set():
            return False
        task.error = Cancelled(f"request cancelled after step {task.step}")
        task.done.set()
        return True

    def _step(self, tasks: list[DenoiseTask]) -> None:
        """One step of a group: one forward, or several when the group has more rows than fit in memory."""
        for chunk in _chunks(tasks, self._row_caps.get(tasks[0].key())):
            self._step_chunk(chunk)

    def _step_chunk(self, tasks: list[DenoiseTask]) -> None:
        failure: str | None = None
        try:
            noise = self._forward(tasks)
        except Exception as exc:
            if len(tasks) == 1:
                tasks[0].error = exc
                return
            failure, out_of_memory = f"{type(exc).__name__}: {exc}", is_out_of_memory(exc)
        if failure is not None:
            # Retried outside the except block: its traceback holds the failed forward's tensors until it ends.
            if out_of_memory:
                self._cap_rows(tasks, failure)
                self._step(tasks)  # again, in chunks under the new cap
                return
            log.warning("a batched step of %d requests failed (%s); retrying them one by one", len(tasks), failure)
            for task in tasks:
                self._step_chunk([task])
            return
        for task, (guided, text) in zip(tasks, noise, strict=True):
            try:
                task.advance(guided, text)
            except Exception as exc:
                task.error = exc
                continue
            _report(task)

    def _cap_rows(self, tasks: list[DenoiseTask], error: str) -> None:
        """`tasks` did not fit in one forward: cap their group at half its rows (at least its largest task)."""
        import torch

        rows = sum(task.rows for task in tasks)
        cap = max(rows // 2, max(task.rows for task in tasks))
        self._row_caps[tasks[0].key()] = cap
        self.stats.out_of_memory += 1
        self.stats.row_cap = min(self._row_caps.values())
        log.warning("a step of %d rows ran out of memory (%s); capping this batch at %d rows", rows, error, cap)
        gc.collect()  # what the failed forward allocated may still sit in reference cycles (tracebacks, frames)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # give back what the failed forward left cached

    def _forward(self, tasks: list[DenoiseTask]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """One model forward for `tasks`, guidance applied: per task (noise prediction, its conditional half)."""
        import torch

        guided = [task for task in tasks if task.guided]
        plain = [task for task in tasks if not task.guided]
        inputs = {id(task): task.model_input() for task in tasks}
        # [uncond rows of guided tasks | cond rows of guided tasks | rows of unguided tasks]
        order = [(task, Half.UNCOND) for task in guided] + [(task, Half.COND) for task in guided]
        order += [(task, Half.ALL) for task in plain]
        rows = StepRows.cat([_rows(task, inputs[id(task)], half) for task, half in order])
        noise = self.rendezvous.forward_rows(tasks[0].model, rows)

        results: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        images = sum(task.images for task in guided)
        if guided:
            uncond, text = noise[:images], noise[images : 2 * images]
            scales = torch.cat([_row_scales(task, noise) for task in guided])
            combined = uncond + scales * (text - uncond)
            sizes = [task.images for task in guided]
            for task, out, cond in zip(guided, combined.split(sizes), text.split(sizes), strict=True):
                results[id(task)] = (out, cond)
        if plain:
            for task, out in zip(plain, noise[2 * images :].split([task.images for task in plain]), strict=True):
                results[id(task)] = (out, None)
        return [results[id(task)] for task in tasks]

    def _fail(self, tasks: Iterable[DenoiseTask], error: BaseException) -> None:
        for task in tasks:
            if not task.done.is_set():
                task.error = error
                task.done.set()


def _groups(tasks: list[DenoiseTask]) -> list[list[DenoiseTask]]:
    groups: dict[ForwardKey, list[DenoiseTask]] = {}
    for task in tasks:
        groups.setdefault(task.key(), []).append(task)
    return list(groups.values())


def _chunks(tasks: list[DenoiseTask], cap: int | None) -> list[list[DenoiseTask]]:
    """`tasks` in order, cut into runs of at most `cap` rows (a task with more rows than that runs alone)."""
    if cap is None:
        return [tasks]
    chunks: list[list[DenoiseTask]] = []
    rows = 0
    for task in tasks:
        if not chunks or rows + task.rows > cap:
            chunks.append([])
            rows = 0
        chunks[-1].append(task)
        rows += task.rows
    return chunks


class Half(enum.Enum):
    """Which of a task's rows go into a part of the batch: with guidance, its unconditional and conditional halves
    go in separate parts (so that guidance is one operation over the batch); without, all of them."""

    UNCOND = "uncond"
    COND = "cond"
    ALL = "all"


def _half(task: DenoiseTask, rows: torch.Tensor, half: Half) -> torch.Tensor:
    if half is Half.UNCOND:
        return rows[: task.images]
    if half is Half.COND:
        return rows[task.images :]
    return rows


def _rows(task: DenoiseTask, latents: torch.Tensor, half: Half) -> StepRows:
    """One half's model inputs: the scaled latents (plus the mask channels of an inpainting UNet), the text
    embeddings and added inputs of those rows, the timestep once per row, and the inputs all rows share."""
    import torch

    sample = latents if task.conditioning is None else torch.cat([latents, _half(task, task.conditioning, half)], dim=1)
    added = {name: _half(task, value, half) for name, value in task.added.items()} if task.added is not None else None
    t = task.model_timestep()
    return StepRows(sample, t.expand(task.images), _half(task, task.hidden, half), added, task.shared)


def _row_scales(task: DenoiseTask, like: torch.Tensor) -> torch.Tensor:
    import torch

    return torch.full((task.images, 1, 1, 1), task.guidance_scale, dtype=like.dtype, device=like.device)


def _report(task: DenoiseTask) -> None:
    if task.progress is None:
        return
    try:
        task.progress(task.step, task.steps)
    except Exception:  # a broken progress consumer must not stop the denoising of anyone
        log.exception("progress callback failed")

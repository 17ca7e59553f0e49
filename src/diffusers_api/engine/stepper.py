"""The batched denoising loop: one thread steps every request that is between its first and last step.

Requests arrive as `Job`s (engine/denoise.py), prepared on their own threads. Each round of the loop:

1. jobs submitted since the last round join (a new request joins the running batch at the next step boundary);
   cancelled jobs leave (a cancelled request stops within one step and frees its rows);
2. jobs that can share a UNet forward (same model, latent shape, conditioning shapes) form a group; each
   group's inputs are concatenated as [unconditional rows of the guided jobs, their conditional rows, rows of
   unguided jobs] and run as one forward through the StepBatcher (so CUDA graphs, compile and requests on
   the generic diffusers path share it too);
3. classifier-free guidance is one tensor operation for the whole group, with each job's own guidance scale;
4. each job's own scheduler steps its own latents (schedulers keep per-request history: steps, solver state,
   noise generators), then its progress is reported; a job whose steps are done leaves at once, and its
   request thread decodes the image while the loop goes on with the others.

Every job steps in every round, so none starves; how many images are in flight at once is bounded by the
engine's admission (MAX_BATCH_SIZE), and how many rows one forward takes by the device's memory: a forward
that runs out of memory is split in halves, and the group's forwards stay capped at the rows that fit until
the loop next goes idle (then memory may have been freed, and the cap is learned again). Any other failing
forward is retried job by job, so one bad request fails only itself.
"""

from __future__ import annotations

import gc
import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import Cancelled, NotReady

if TYPE_CHECKING:
    import torch

    from .batcher import StepBatcher
    from .denoise import Job

log = logging.getLogger(__name__)


@dataclass
class LoopStats:
    rounds: int = 0
    jobs: int = 0  # jobs that entered the loop
    job_steps: int = 0  # sum over rounds of the jobs stepped
    max_jobs: int = 0  # most jobs stepped in one round
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
    """Runs `Job`s to their last step on one thread, batching them step by step."""

    def __init__(self, batcher: StepBatcher) -> None:
        self.batcher = batcher
        self.stats = LoopStats()
        self._cond = threading.Condition()
        self._inbox: list[Job] = []
        self._active: list[Job] = []
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._joined = False  # whether the loop is a participant of the batcher's rendezvous
        self._row_caps: dict[Any, int] = {}  # group key -> most rows per forward that fit in memory

    @property
    def active(self) -> int:
        return len(self._active)

    def run(self, job: Job) -> None:
        """Denoise `job` through its last step; blocks the calling (request) thread. Raises the job's error."""
        with self._cond:
            if self._stopped:
                raise NotReady("the server is stopping", state="STOPPING")
            self._inbox.append(job)
            self.stats.jobs += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="denoiser", daemon=True)
                self._thread.start()
            self._cond.notify()
        job.done.wait()
        if job.error is not None:
            raise job.error

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
        """Wait for work; admit the jobs that arrived. False when stopped (pending jobs then fail)."""
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
        self._active = [job for job in self._active if not self._left_cancelled(job)]
        self._participate(bool(self._active))
        if not self._active:
            return
        self.stats.rounds += 1
        self.stats.job_steps += len(self._active)
        self.stats.max_jobs = max(self.stats.max_jobs, len(self._active))
        for group in _groups(self._active):
            self._step(group)
        still = []
        for job in self._active:
            if job.error is not None or job.finished:
                job.done.set()
            else:
                still.append(job)
        self._active = still
        self._participate(bool(self._active))

    def _participate(self, busy: bool) -> None:
        """The loop counts as one participant of the batcher's rendezvous while it has jobs, so that requests on
        the generic diffusers path merge their UNet calls with it instead of racing it."""
        if busy and not self._joined:
            self.batcher.join()
            self._joined = True
        elif not busy and self._joined:
            self.batcher.leave()
            self._joined = False

    def _left_cancelled(self, job: Job) -> bool:
        if job.cancel is None or not job.cancel.is_set():
            return False
        job.error = Cancelled(f"request cancelled after step {job.step}")
        job.done.set()
        return True

    def _step(self, jobs: list[Job]) -> None:
        """One step of a group: one forward, or several when the group has more rows than fit in memory."""
        for chunk in _chunks(jobs, self._row_caps.get(jobs[0].key())):
            self._step_chunk(chunk)

    def _step_chunk(self, jobs: list[Job]) -> None:
        failure: str | None = None
        try:
            noise = self._forward(jobs)
        except Exception as exc:
            if len(jobs) == 1:
                jobs[0].error = exc
                return
            failure, out_of_memory = f"{type(exc).__name__}: {exc}", _out_of_memory(exc)
        if failure is not None:
            # Retried outside the except block: its traceback holds the failed forward's tensors until it ends.
            if out_of_memory:
                self._cap_rows(jobs, failure)
                self._step(jobs)  # again, in chunks under the new cap
                return
            log.warning("a batched step of %d requests failed (%s); retrying them one by one", len(jobs), failure)
            for job in jobs:
                self._step_chunk([job])
            return
        for job, (guided, text) in zip(jobs, noise, strict=True):
            try:
                job.advance(guided, text)
            except Exception as exc:
                job.error = exc
                continue
            _report(job)

    def _cap_rows(self, jobs: list[Job], error: str) -> None:
        """`jobs` did not fit in one forward: cap their group at half its rows (at least its largest job)."""
        import torch

        rows = sum(job.rows for job in jobs)
        cap = max(rows // 2, max(job.rows for job in jobs))
        self._row_caps[jobs[0].key()] = cap
        self.stats.out_of_memory += 1
        self.stats.row_cap = min(self._row_caps.values())
        log.warning("a step of %d rows ran out of memory (%s); capping this batch at %d rows", rows, error, cap)
        gc.collect()  # what the failed forward allocated may still sit in reference cycles (tracebacks, frames)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # give back what the failed forward left cached

    def _forward(self, jobs: list[Job]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """One UNet forward for `jobs`, guidance applied: per job (noise prediction, its conditional half)."""
        import torch

        guided = [job for job in jobs if job.guided]
        plain = [job for job in jobs if not job.guided]
        inputs = {id(job): job.model_input() for job in jobs}
        # [uncond rows of guided jobs | cond rows of guided jobs | rows of unguided jobs]
        order = [(job, "uncond") for job in guided] + [(job, "cond") for job in guided] + [(j, "all") for j in plain]
        sample = torch.cat([_model_rows(job, inputs[id(job)], half) for job, half in order])
        hidden = torch.cat([_half(job, job.hidden, half) for job, half in order])
        added = None
        if jobs[0].added is not None:  # jobs of one group all have the same added conditioning
            names = list(jobs[0].added)
            added = {name: torch.cat([_half(job, _added(job)[name], half) for job, half in order]) for name in names}
        timesteps = torch.cat([_row_timesteps(job) for job, _ in order])
        kwargs = {"encoder_hidden_states": hidden, "added_cond_kwargs": added, "return_dict": False}
        noise = self.batcher.call(jobs[0].unet, (sample, timesteps), kwargs)[0]

        results: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        images = sum(job.images for job in guided)
        if guided:
            uncond, text = noise[:images], noise[images : 2 * images]
            scales = torch.cat([_row_scales(job, noise) for job in guided])
            combined = uncond + scales * (text - uncond)
            sizes = [job.images for job in guided]
            for job, out, cond in zip(guided, combined.split(sizes), text.split(sizes), strict=True):
                results[id(job)] = (out, cond)
        if plain:
            for job, out in zip(plain, noise[2 * images :].split([job.images for job in plain]), strict=True):
                results[id(job)] = (out, None)
        return [results[id(job)] for job in jobs]

    def _fail(self, jobs: Iterable[Job], error: BaseException) -> None:
        for job in jobs:
            if not job.done.is_set():
                job.error = error
                job.done.set()


def _groups(jobs: list[Job]) -> list[list[Job]]:
    groups: dict[Any, list[Job]] = {}
    for job in jobs:
        groups.setdefault(job.key(), []).append(job)
    return list(groups.values())


def _chunks(jobs: list[Job], cap: int | None) -> list[list[Job]]:
    """`jobs` in order, cut into runs of at most `cap` rows (a job with more rows than that runs alone)."""
    if cap is None:
        return [jobs]
    chunks: list[list[Job]] = []
    rows = 0
    for job in jobs:
        if not chunks or rows + job.rows > cap:
            chunks.append([])
            rows = 0
        chunks[-1].append(job)
        rows += job.rows
    return chunks


def _out_of_memory(error: BaseException) -> bool:
    import torch

    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    text = str(error).lower()  # other devices' allocators (CPU, MPS) say it in words
    return "out of memory" in text or "can't allocate memory" in text


def _half(job: Job, rows: torch.Tensor, half: str) -> torch.Tensor:
    if half == "uncond":
        return rows[: job.images]
    if half == "cond":
        return rows[job.images :]
    return rows


def _model_rows(job: Job, latents: torch.Tensor, half: str) -> torch.Tensor:
    """The UNet input rows of one half: the scaled latents, plus the mask channels of an inpainting UNet."""
    import torch

    if job.conditioning is None:
        return latents
    return torch.cat([latents, _half(job, job.conditioning, half)], dim=1)


def _added(job: Job) -> dict[str, torch.Tensor]:
    assert job.added is not None
    return job.added


def _row_timesteps(job: Job) -> torch.Tensor:
    import torch

    t = job.timestep.reshape(1).to(device=job.latents.device, dtype=torch.float32)
    return t.expand(job.images)


def _row_scales(job: Job, like: torch.Tensor) -> torch.Tensor:
    import torch

    return torch.full((job.images, 1, 1, 1), job.guidance_scale, dtype=like.dtype, device=like.device)


def _report(job: Job) -> None:
    if job.progress is None:
        return
    try:
        job.progress(job.step, job.steps)
    except Exception:  # a broken progress consumer must not stop the denoising of anyone
        log.exception("progress callback failed")

"""Read the configured model's weights into the page cache while the process is still importing.

A cold start reads the disk twice over: Python packages (torch, diffusers, transformers: seconds of imports,
mostly holding the GIL) and then the weights (gigabytes, read by safetensors as the model loads). On a fresh
node, or from a network volume, the second read is seconds more. Reading a file releases the GIL, so a thread
started at process start reads the weight files while the imports run, and the real load finds them in memory.
The load itself is unchanged: it still goes through `sources.fetch` and `from_pretrained`, which decide what
is loaded; this only makes their reads cheap.

Only a model already on disk is read, found without importing anything and without touching the network: a
local directory, a built-in model, a MODELS_DIR entry (cloud cache or converted checkpoint), a hub cache
snapshot. Only the weight files `from_pretrained` will load are read (safetensors of the chosen variant), and
nothing stays in this process's memory. When the files would not fit in the memory the page
cache can use they would only push each other out, so nothing is read.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from . import disk
from .builtin import builtin_dir, is_builtin
from .spec import ModelSpec

if TYPE_CHECKING:
    from ..config import Settings

log = logging.getLogger(__name__)

CHUNK_BYTES = 16 << 20


def start(settings: Settings) -> threading.Thread | None:
    """Start reading the configured model's weight files on a daemon thread; None when there is nothing to read.
    Never raises: whatever is wrong with the files is for the real load to report."""
    spec = ModelSpec.from_settings(settings)
    try:
        directory = model_directory(spec, settings) if spec else None
        files = weight_files(directory, spec.variant) if spec and directory else []
        size = sum(path.stat().st_size for path in files)
    except OSError:
        return None
    if not files or size > available_memory():
        return None
    thread = threading.Thread(target=_read_logged, args=(files, size), name="prefetch", daemon=True)
    thread.start()
    return thread


def model_directory(spec: ModelSpec, settings: Settings) -> Path | None:
    """Where `spec`'s weights already are on disk, as `sources.fetch` would find them; None if not there yet."""
    if spec.model_url or spec.checkpoint_url:
        candidate = settings.models_dir / spec.normalized_id
    elif is_builtin(spec.model_id):
        candidate = builtin_dir(spec.model_id, settings.models_dir)
    elif Path(spec.model_id).expanduser().is_dir():
        candidate = Path(spec.model_id).expanduser()
    else:
        return hub_snapshot(settings.models_dir / "hub", spec.hf_model_id or spec.model_id, spec.revision)
    return candidate if disk.is_published(candidate) else None


def hub_snapshot(cache: Path, repo_id: str, revision: str | None) -> Path | None:
    """The snapshot directory of `repo_id` at `revision` (a branch, tag or commit) in a hub cache."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    ref = repo / "refs" / (revision or "main")
    commit = ref.read_text().strip() if ref.is_file() else revision
    snapshot = repo / "snapshots" / commit if commit else None
    return snapshot if snapshot is not None and disk.is_published(snapshot) else None


def weight_files(directory: Path, variant: str | None) -> list[Path]:
    """The safetensors files `from_pretrained` loads from `directory`: per component folder, those of `variant`
    (`*.fp16.safetensors`, `*.fp16-00001-of-00002.safetensors`), else the plain ones; in loading order."""
    files: list[Path] = []
    for folder in sorted(path for path in directory.iterdir() if path.is_dir() and not path.name.startswith(".")):
        candidates = sorted(folder.glob("*.safetensors"))
        chosen = [path for path in candidates if variant and _variant_of(path) == variant]
        files += chosen or [path for path in candidates if _variant_of(path) is None]
    return files


def _variant_of(path: Path) -> str | None:
    """ "fp16" for `model.fp16.safetensors` or `model.fp16-00001-of-00002.safetensors`; None for `model.safetensors`."""
    stem = path.name.removesuffix(".safetensors")
    if "." not in stem:
        return None
    return stem.rsplit(".", 1)[1].split("-", 1)[0]


def read_files(files: list[Path]) -> int:
    """Read `files` into the page cache; returns the bytes read. Copied to /dev/null by sendfile where the system
    allows it (no copy into this process, and the GIL is released for a whole file), else read through one
    reused buffer."""
    return sum(_read_file(path) for path in files)


def _read_file(path: Path) -> int:
    with path.open("rb", buffering=0) as source:
        try:
            return _send_to_null(source.fileno())
        except OSError:
            pass  # sendfile cannot write to /dev/null here (not Linux): read it ourselves
        total, buffer = 0, bytearray(CHUNK_BYTES)
        source.seek(0)
        while read := source.readinto(buffer):
            total += read
        return total


def _send_to_null(fd: int) -> int:
    size, offset = os.fstat(fd).st_size, 0
    with open(os.devnull, "wb") as null:
        while offset < size:
            sent = os.sendfile(null.fileno(), fd, offset, size - offset)
            if sent == 0:
                break
            offset += sent
    return offset


def _read_logged(files: list[Path], size: int) -> None:
    started = time.perf_counter()
    try:
        read_files(files)
    except OSError as exc:  # the real load reports what is wrong with the files
        log.debug("weight prefetch stopped: %s", exc)
        return
    elapsed = time.perf_counter() - started
    log.info("read %d weight files (%.2f GB) ahead of the model load in %.1f s", len(files), size / 1e9, elapsed)


def available_memory() -> int:
    """Bytes the page cache can grow by: MemAvailable, capped by a cgroup v2 memory limit."""
    available = _meminfo_available()
    limit = _read_int(Path("/sys/fs/cgroup/memory.max"))
    used = _read_int(Path("/sys/fs/cgroup/memory.current"))
    if limit is not None and used is not None:
        available = min(available, max(0, limit - used))
    return available


def _meminfo_available() -> int:
    """MemAvailable from /proc/meminfo (Linux); 0 elsewhere, which turns prefetching off."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" means no limit

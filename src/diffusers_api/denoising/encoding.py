"""Requests that arrive together encode together: one text-encoder call for the prompts of the requests that
arrive while an encode of theirs runs.

Each request thread prepares its own task (tasks.prepare), and preparing encodes the request's prompts with
`pipe.encode_prompt`: one text-encoder call per request, its host work (tokenizing, many small kernel launches)
serialised with the other request threads' by the GIL, which with many clients starves the loop's thread. So the
request threads encode through `EncodeGroups`, and none of them waits for company:

- requests whose encodes give the same output for the same text share an *encode key* (`encode_key`): the
  pipeline class, its text encoders and tokenizers (the modules themselves: a LoRA or textual-inversion variant
  has its own copies) and their dtypes, every argument of the call but the texts and num_images_per_prompt
  (device, guidance, clip_skip, max_sequence_length, PixArt's clean_caption, ...), and which texts are given:
  SDXL's None negative prompt gives zero embeddings where "" does not, and an empty prompt_2 falls back to the
  prompt where a list of texts does not. Requests with prompt embeddings (weighted and long prompts, made
  upstream), lists of prompts, or a PixArt negative prompt that is not a text encode alone, as without groups;
- the first request of a key encodes at once, alone: the very call it makes without groups. Requests of that
  key arriving meanwhile queue; when the call ends, one of them leads the next: it encodes everything queued (at
  most ENCODE_BATCH_MAX prompts) in one `encode_prompt` call with lists of texts and one image per prompt, and
  each member takes its rows, repeated for its own num_images_per_prompt as diffusers repeats them (copies of
  one row). A lone request never waits; under load a key's encodes come in waves, one call running while the
  members of the next one gather;
- a member cancelled while it queued is left out (its request ends as cancelled); a batched call that fails for
  any reason, running out of memory included, is given up and every member encodes alone, meeting its own error
  there.

A batched text-encoder call gives the same embeddings as one call per request up to the last float bits
(batched kernels round differently); the tests bound the images as the batched UNet steps are bounded.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import Cancelled
from .groups import GroupStats, batched

if TYPE_CHECKING:
    from .tasks import Family

log = logging.getLogger(__name__)

# The texts of encode_prompt's calls; diffusers completes the second and third with `text or other`
# (prompt_2 or prompt, ...), so for those "" is not given, as None.
_FALLBACK_TEXTS = frozenset({"prompt_2", "prompt_3", "negative_prompt_2", "negative_prompt_3"})
_TEXTS = frozenset({"prompt", "negative_prompt"}) | _FALLBACK_TEXTS
# Prompts given as embeddings: such a request encodes alone
_EMBEDDINGS = (
    "prompt_embeds",
    "negative_prompt_embeds",
    "pooled_prompt_embeds",
    "negative_pooled_prompt_embeds",
    "prompt_attention_mask",
    "negative_prompt_attention_mask",
)
# The modules an encode runs through
_MODULES = ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3")


def encode_key(pipe: Any, family: Family, call: dict[str, Any]) -> tuple[Any, ...] | None:
    """Requests with equal keys can encode in one `encode_prompt` call (`call`: a request's keyword arguments);
    None: this one encodes alone."""
    from .tasks import Family

    texts = {name: value for name, value in call.items() if name in _TEXTS}
    if any(call.get(name) is not None for name in _EMBEDDINGS) or not isinstance(texts.get("prompt"), str):
        return None
    if any(not isinstance(text, str | None) for text in texts.values()):
        return None
    if family is Family.PIXART and not isinstance(texts.get("negative_prompt"), str):
        return None  # its pipeline takes a text or a list there
    given = tuple(sorted(name for name, text in texts.items() if _given(name, text)))
    others = tuple(
        sorted((name, value) for name, value in call.items() if name not in _TEXTS | {"num_images_per_prompt"})
    )
    modules = [getattr(pipe, name, None) for name in _MODULES]
    identities = tuple((id(module), getattr(module, "dtype", None)) for module in modules)
    force_zeros = getattr(pipe.config, "force_zeros_for_empty_prompt", None)  # SDXL: None negative -> zeros
    key = (type(pipe), family, identities, given, others, force_zeros)
    try:
        hash(key)
    except TypeError:  # an argument this grouping does not know (a tensor, a list): alone
        return None
    return key


def _given(name: str, text: str | None) -> bool:
    return bool(text) if name in _FALLBACK_TEXTS else text is not None


@dataclass(eq=False)
class _Member:
    """One request's encode, queued under its key."""

    pipe: Any
    call: dict[str, Any]
    cancel: threading.Event | None
    ready: threading.Event = field(default_factory=threading.Event)  # set when its rows are in, or when it leads
    leads: bool = False  # it makes the next call of its key
    outputs: Any = None  # its outputs of encode_prompt (its rows of a batched call); None: it encodes alone
    left_out: bool = False  # cancelled while it queued


class EncodeGroups:
    """The prompt encodes of our loop's requests, each key's requests that arrive together in one call."""

    def __init__(self, max_prompts: int = 8) -> None:
        """`max_prompts`: most prompts that one call encodes (1: each request encodes alone)."""
        self.max_prompts = max_prompts
        self.stats = GroupStats("prompts")
        self._lock = threading.Lock()
        # key -> its members not yet taken by a call; a key is here while a call of it runs
        self._queues: dict[tuple[Any, ...], list[_Member]] = {}

    @property
    def queued(self) -> int:
        """Requests waiting for the next call of their key (the tests hold a call until its company is here)."""
        with self._lock:
            return sum(len(queue) for queue in self._queues.values())

    def encoder(self, pipe: Any, family: Family, cancel: threading.Event | None = None) -> Callable[..., Any]:
        """`pipe.encode_prompt` for one request (called with keyword arguments), encoded with the requests that
        arrive while a call of its key runs."""

        def encode(**call: Any) -> Any:
            return self.encode(pipe, family, call, cancel)

        return encode

    def encode(self, pipe: Any, family: Family, call: dict[str, Any], cancel: threading.Event | None = None) -> Any:
        """`pipe.encode_prompt(**call)`, or this request's rows of a call that encodes it with others."""
        key = None
        if self.max_prompts > 1:
            try:
                key = encode_key(pipe, family, call)
            except Exception:  # grouping only saves time: this request encodes alone, as without it
                log.exception("keying a prompt encode for a batched call failed; it encodes alone")
        if key is None:
            return pipe.encode_prompt(**call)
        member = _Member(pipe, call, cancel)
        with self._lock:
            member.leads = key not in self._queues  # no call of its key runs: it makes one now
            self._queues.setdefault(key, []).append(member)
        if not member.leads:
            member.ready.wait()
        if member.leads:
            self._lead(key, family)
        if member.left_out:
            raise Cancelled("request cancelled while its prompt waited to be encoded")
        if member.outputs is not None:
            return member.outputs
        return pipe.encode_prompt(**call)  # a group of one, or a batched call that failed

    def _lead(self, key: tuple[Any, ...], family: Family) -> None:
        """Encode what is queued under `key` (the leader first), then hand the key to the next queued member."""
        with self._lock:
            queue = self._queues[key]
            members = queue[: self.max_prompts]
            del queue[: self.max_prompts]
        try:
            if len(members) == 1:  # alone: the call made without groups (its error is its own, raised here)
                members[0].outputs = members[0].pipe.encode_prompt(**members[0].call)
            else:
                self._encode_together(members, family)
        finally:
            with self._lock:
                queue = self._queues[key]
                if queue:
                    queue[0].leads = True
                    queue[0].ready.set()
                else:
                    del self._queues[key]
            for member in members:
                member.ready.set()

    def _encode_together(self, members: list[_Member], family: Family) -> None:
        """One call for the `members` still wanted; on any failure none gets outputs, and each encodes alone."""
        for member in members:
            member.left_out = member.cancel is not None and member.cancel.is_set()
        live = [member for member in members if not member.left_out]
        if len(live) < 2:
            return

        def encode() -> list[tuple[Any, ...]]:
            outputs = live[0].pipe.encode_prompt(**_batched_call(live))
            return [_rows_of(outputs, index, member, family) for index, member in enumerate(live)]

        rows = batched(self.stats, "prompt encode", len(live), encode)
        if rows is None:
            return
        self.stats.count(len(live))
        for member, outputs in zip(live, rows, strict=True):
            member.outputs = outputs


def _batched_call(members: list[_Member]) -> dict[str, Any]:
    """The first member's call with each given text as the list of the members' (one prompt each, in order) and
    one image per prompt. Texts not given (the same for all: the key says which) stay as they are, for diffusers
    to complete row by row as it does for one."""
    call = dict(members[0].call)
    for name, text in call.items():
        if name in _TEXTS and _given(name, text):
            call[name] = [member.call[name] for member in members]
    call["num_images_per_prompt"] = 1
    return call


def _rows_of(outputs: Any, index: int, member: _Member, family: Family) -> tuple[Any, ...]:
    """Row `index` of each of a batched call's outputs, repeated for the member's images as diffusers repeats a
    prompt's row (`repeat(1, n, 1).view(n, ...)`: n copies). Flux's text ids are one per token, not per row."""
    from .tasks import Family

    images = int(member.call["num_images_per_prompt"])
    shared = {2} if family is Family.FLUX else set()
    return tuple(
        output if output is None or position in shared else output[index : index + 1].repeat_interleave(images, 0)
        for position, output in enumerate(outputs)
    )

"""Prompt weighting and long prompts for Stable Diffusion 1/2 and SDXL, with compel.

A request with `prompt_weighting` ("compel" or "a1111") or `long_prompts` has its prompts turned into embeddings
here, before the call: the pipeline gets `prompt_embeds` / `negative_prompt_embeds` (SDXL also the pooled ones)
instead of text. The pipelines take those as they are, so such a request runs in our batched loop
(denoising/tasks.py) or in diffusers' own call alike.

- compel syntax is compel's own: `(word)1.3`, `word++`, `word--`, `("a", "b").and()`,
  `("a", "b").blend(0.7, 0.3)`.
- A1111 syntax, `(word:1.3)`, `(word)` (x1.1), `[word]` (/1.1), `\\(` for a literal parenthesis, is parsed here
  (`parse_a1111`) into weighted fragments that are handed to compel as its own prompt structure (compel's string
  syntax cannot say a literal `+` or `"`: its escapes keep the backslash). `BREAK` ends a chunk: each part
  between BREAKs is encoded as chunks of its own, joined in order, as A1111 pads a chunk at a BREAK.
- `clip_skip` (diffusers' meaning) takes the same hidden layer diffusers' encode_prompt takes: compel reads the
  penultimate one, of an encoder whose outputs lose their last `clip_skip - 1` (SD) or `clip_skip` (SDXL) layers.
- Long prompts: a prompt of more than 77 tokens is encoded in chunks of 77 (compel's truncate_long_prompts=False),
  as the original server's lpw_stable_diffusion did; the positive and negative embeddings are padded to one length
  with compel's empty-prompt chunks. Without `long_prompts`, prompts are cut at 77 tokens as diffusers cuts them.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Literal

from .errors import InvalidInputs
from .pipelines import call_parameters, pipeline_family

if TYPE_CHECKING:
    import torch
    from compel import Compel
    from compel.prompt_parser import Conjunction

    from .schema import GenerateRequest

Weighting = Literal["compel", "a1111"]
A1111_FACTOR = 1.1  # what one pair of () multiplies a weight by, and [] divides it by
# Bounds of what a prompt may weigh. A weight past 1e20 or so (`word` with 500 `+`, 500 nested brackets, a blend's
# 1e30) overflowed the attention into NaN and made a black image without an error; compel's parser also recursed
# past Python's limit on brackets nested 100 deep (a RecursionError, a 500). Real prompts stay far inside both.
MAX_WEIGHT = 100.0
MAX_NESTING = 16

_PROMPT_FIELDS = ("prompt", "negative_prompt", "prompt_2", "negative_prompt_2")


class PromptSyntaxError(ValueError):
    """A prompt that its weighting syntax cannot read; the message says what and where."""


# ---------------------------------------------------------------------------------------------- A1111 syntax

# The tokens of A1111's prompt_parser.parse_prompt_attention: escapes, brackets, a ":weight)" closing, text.
_A1111_TOKENS = re.compile(r"\\[()\[\]\\]|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|\]|[^\\()\[\]:]+|:")


def parse_a1111(text: str) -> list[tuple[str, float]]:
    """A1111's attention syntax as (text, weight) fragments, adjacent ones of equal weight merged.

    `(x)` multiplies the weights inside by 1.1, `[x]` divides them by 1.1, `(x:1.3)` multiplies them by 1.3;
    brackets nest (their factors multiply); `\\(`, `\\)`, `\\[`, `\\]` and `\\\\` are the characters themselves. Where
    A1111 silently guesses (a bracket never closed, or closing nothing), this raises PromptSyntaxError."""
    pieces: list[list[Any]] = []  # [text, weight]
    opened: dict[str, list[tuple[int, int]]] = {"(": [], "[": []}  # (first piece inside, character position)
    for match in _A1111_TOKENS.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            pieces.append([token[-1], 1.0])
        elif token in opened:
            opened[token].append((len(pieces), match.start()))
            _check_nesting(len(opened["("]) + len(opened["["]), match.start())
        elif weight is not None or token == ")":
            factor = A1111_FACTOR if weight is None else _weight(weight, match.start())
            _apply(pieces, _close(opened["("], "(", token, match.start()), factor)
        elif token == "]":
            _apply(pieces, _close(opened["["], "[", token, match.start()), 1 / A1111_FACTOR)
        else:
            pieces.append([token, 1.0])
    for bracket, stack in opened.items():
        if stack:
            raise PromptSyntaxError(f"'{bracket}' at character {stack[-1][1] + 1} is never closed")
    return _merged(pieces)


def _check_nesting(depth: int, position: int) -> None:
    if depth > MAX_NESTING:
        raise PromptSyntaxError(f"brackets nested {depth} deep at character {position + 1}; at most {MAX_NESTING}")


def _check_weights(conjunction: Conjunction) -> None:
    """Every weight of a parsed prompt (its fragments', a blend's, an .and()'s) is finite and at most MAX_WEIGHT
    either side of 0."""
    from compel.prompt_parser import Blend

    weights = [("an .and() part", weight) for weight in conjunction.weights]
    for prompt in conjunction.prompts:
        flats = prompt.prompts if isinstance(prompt, Blend) else [prompt]
        weights += [("a .blend() part", weight) for weight in getattr(prompt, "weights", [])]
        weights += [(repr(fragment.text), fragment.weight) for flat in flats for fragment in flat.children]
    for what, weight in weights:
        if not -MAX_WEIGHT <= weight <= MAX_WEIGHT:  # NaN too
            raise PromptSyntaxError(
                f"the weight of {what} is {weight:.4g}; weights are from {-MAX_WEIGHT:g} to {MAX_WEIGHT:g}"
            )


def _weight(number: str, position: int) -> float:
    try:
        return float(number)
    except ValueError:
        raise PromptSyntaxError(f"weight {number!r} at character {position + 2} is not a number") from None


def _close(stack: list[tuple[int, int]], bracket: str, token: str, position: int) -> int:
    if not stack:
        closing = token.replace(" ", "")
        raise PromptSyntaxError(f"'{closing}' at character {position + 1} closes no '{bracket}'")
    return stack.pop()[0]


def _apply(pieces: list[list[Any]], start: int, factor: float) -> None:
    for piece in pieces[start:]:
        piece[1] *= factor


# A1111's BREAK: the word alone, in capitals (its prompt_parser's re_break).
_BREAK = re.compile(r"\s*\bBREAK\b\s*")


def split_breaks(fragments: list[tuple[str, float]]) -> list[list[tuple[str, float]]]:
    """`parse_a1111`'s fragments cut at each BREAK into the parts A1111 encodes as chunks of their own (a bracket
    may span a BREAK: its weight holds on both sides)."""
    parts: list[list[tuple[str, float]]] = [[]]
    for text, weight in fragments:
        pieces = _BREAK.split(text)
        for index, piece in enumerate(pieces):
            if index:
                parts.append([])
            if piece:
                parts[-1].append((piece, weight))
    return [part or [("", 1.0)] for part in parts]


def _merged(pieces: list[list[Any]]) -> list[tuple[str, float]]:
    merged: list[tuple[str, float]] = []
    for text, weight in pieces:
        if merged and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + text, weight)
        else:
            merged.append((text, weight))
    return merged or [("", 1.0)]


# ---------------------------------------------------------------------------------------------- compel syntax


def check_compel_syntax(text: str) -> None:
    """compel reads a prompt whose parentheses do not pair up as plain text, brackets and weights included,
    without a word; here that is an error naming the bracket. Quoted text ("a (b") and escapes (`\\(`) are
    skipped, as compel skips them."""
    quoted = text.replace('\\"', "").count('"') % 2 == 0
    depth: list[int] = []
    index, in_quote = 0, False
    while index < len(text):
        char = text[index]
        if char == "\\":
            index += 2
            continue
        if char == '"' and quoted:
            in_quote = not in_quote
        elif char == "(" and not in_quote:
            depth.append(index)
            _check_nesting(len(depth), index)
        elif char == ")" and not in_quote:
            if not depth:
                raise PromptSyntaxError(f"')' at character {index + 1} closes no '('")
            depth.pop()
        index += 1
    if depth:
        raise PromptSyntaxError(f"'(' at character {depth[-1] + 1} is never closed")


def parse(text: str, weighting: Weighting | None) -> list[Conjunction]:
    """A prompt as compel's structures, one per part encoded as chunks of its own: compel's parse of it, A1111's
    read by `parse_a1111` (one part per BREAK more), or (no weighting) the text as it is, one fragment of weight
    1."""
    from compel.prompt_parser import Conjunction, FlattenedPrompt, PromptParser

    if weighting == "compel":
        check_compel_syntax(text)
        _memoizing_parsers()
        try:
            conjunction: Conjunction = PromptParser().parse_conjunction(text)
        except PromptParser.ParsingException as exc:
            raise PromptSyntaxError(str(exc)) from None
        except RecursionError:  # its grammar recurses some 30 frames a level: MAX_NESTING leaves room, this is a net
            raise PromptSyntaxError("brackets nested too deep for compel's parser") from None
        if any(getattr(prompt, "wants_cross_attention_control", False) for prompt in conjunction.prompts):
            raise PromptSyntaxError(".swap() (cross-attention control) is not supported")
        conjunctions = [conjunction]
    else:
        parts = split_breaks(parse_a1111(text)) if weighting == "a1111" else [[(text, 1.0)]]
        conjunctions = [Conjunction([FlattenedPrompt(fragments)], weights=[1.0]) for fragments in parts]
    for part in conjunctions:
        _check_weights(part)
    return conjunctions


def _memoizing_parsers() -> None:
    """compel's grammar (pyparsing) backtracks over nested brackets: without memoizing, parsing took about 15 times
    longer per level, 60 s at 8 levels (the engine's thread held all the while), hours at 12. pyparsing's packrat
    mode memoizes every parser of the process; it changes no result. Idempotent."""
    import pyparsing

    pyparsing.ParserElement.enable_packrat()


def _plain_text(conjunction: Conjunction) -> str:
    """The words of a parsed prompt without its syntax (SDXL's pooled embedding is taken from them)."""
    from compel.prompt_parser import Blend

    words = []
    for prompt in conjunction.prompts:
        first = prompt.prompts[0] if isinstance(prompt, Blend) else prompt
        words += [fragment.text for fragment in first.children if hasattr(fragment, "text")]
    return " ".join(word for word in words if word)


# ---------------------------------------------------------------------------------------------- the request


def _option(request: GenerateRequest) -> str:
    return "prompt_weighting" if request.prompt_weighting else "long_prompts"


def _kind(pipe_cls: type, model_id: str, option: str) -> str:
    """ "sd" or "sdxl": how this pipeline's prompts are encoded; any other family is refused."""
    family = pipeline_family(pipe_cls) or ""
    takes_embeddings = {"prompt_embeds", "negative_prompt_embeds"} <= set(call_parameters(pipe_cls))
    if not family.startswith("stable-diffusion") or family.startswith("stable-diffusion-3") or not takes_embeddings:
        raise InvalidInputs(
            f"{option}: supported for Stable Diffusion 1.x/2.x and SDXL models; {model_id} runs "
            f"{pipe_cls.__name__} ({family or 'another model family'})",
            field=option,
        )
    return "sdxl" if family.startswith("stable-diffusion-xl") else "sd"


def check_request(request: GenerateRequest, pipe_cls: type, model_id: str) -> None:
    """Before anything is fetched: the model family takes weighted prompts, and every prompt reads."""
    option = _option(request)
    _kind(pipe_cls, model_id, option)
    if request.prompt is None:
        raise InvalidInputs(f"prompt: required with {option}", field="prompt")
    if request.prompt_weighting is None:
        return
    for field in _PROMPT_FIELDS:
        given = getattr(request, field, None) if field in ("prompt", "negative_prompt") else request.extra.get(field)
        for text in [given] if isinstance(given, str) else given or []:
            try:
                parse(text, request.prompt_weighting)
            except (PromptSyntaxError, ValueError) as exc:
                raise InvalidInputs(f"{field}: {exc} (in {request.prompt_weighting} syntax)", field=field) from None


def encode(pipe: Any, kwargs: dict[str, Any], weighting: Weighting | None, long_prompts: bool) -> dict[str, Any]:
    """`kwargs` with its prompts replaced by the embeddings compel makes of them."""
    import torch

    kwargs = dict(kwargs)
    kind = _kind(type(pipe), "this model", "prompt_weighting" if weighting else "long_prompts")
    skip = int(kwargs.pop("clip_skip", None) or 0)  # read here: the pipeline ignores it beside embeddings
    texts = {field: kwargs.pop(field, None) for field in _PROMPT_FIELDS}
    prompts = _listed(texts["prompt"], None)
    if prompts is None:
        raise InvalidInputs("prompt: required with prompt_weighting or long_prompts", field="prompt")
    negatives = _listed(texts["negative_prompt"], len(prompts))
    try:
        with torch.inference_mode():
            if kind == "sd":
                return kwargs | _encode_sd(pipe, prompts, negatives, weighting, long_prompts, skip)
            prompts_2 = _listed(texts["prompt_2"], len(prompts)) or prompts
            negatives_2 = _listed(texts["negative_prompt_2"], len(prompts)) or negatives
            texts_2 = (prompts, negatives, prompts_2, negatives_2)
            return kwargs | _encode_sdxl(pipe, texts_2, weighting, long_prompts, skip)
    except ValueError as exc:  # compel's own complaints about a prompt (check_request read them all already)
        raise InvalidInputs(f"the prompts cannot be encoded: {exc}") from None


def _listed(value: str | list[str] | None, count: int | None) -> list[str] | None:
    """Prompts as a list; a single string given beside `count` prompts is repeated for each (a list has one per
    prompt: limits.check_prompt_lists)."""
    if value is None:
        return None
    listed = [value] if isinstance(value, str) else list(value)
    return listed * count if count is not None and isinstance(value, str) else listed


def _compel(pipe: Any, encoder: int, long_prompts: bool, embeddings: str, skip: int = 0) -> Compel:
    """compel over the pipeline's `encoder` (1 or 2); its hidden states lose their last `skip` layers, so that
    the penultimate one that compel reads for `embeddings` PENULTIMATE_* is the one clip_skip names."""
    from compel import Compel, ReturnedEmbeddingsType

    suffix = "" if encoder == 1 else f"_{encoder}"
    tokenizer, text_encoder = getattr(pipe, "tokenizer" + suffix), getattr(pipe, "text_encoder" + suffix)
    return Compel(
        tokenizer=tokenizer,
        text_encoder=_LastLayersSkipped(text_encoder, skip) if skip else text_encoder,
        textual_inversion_manager=_TextualInversions.of(pipe, tokenizer),
        dtype_for_device_getter=lambda device: text_encoder.dtype,
        truncate_long_prompts=not long_prompts,
        returned_embeddings_type=ReturnedEmbeddingsType[embeddings],
        requires_pooled=encoder == 2,
    )


class _LastLayersSkipped:
    """A text encoder whose outputs' hidden states end `layers` early (everything else is the encoder's own)."""

    def __init__(self, encoder: Any, layers: int) -> None:
        self._encoder, self._layers = encoder, layers

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        output = self._encoder(*args, **kwargs)
        if getattr(output, "hidden_states", None) is not None:
            output.hidden_states = output.hidden_states[: -self._layers]
        return output

    def __getattr__(self, name: str) -> Any:
        return getattr(self._encoder, name)


def _conditionings(compels: tuple[Compel, Compel], prompts: list[str], negatives: list[str], parts: Any) -> Any:
    """One row per prompt then per negative prompt, each its parts' chunks joined, all padded to the longest (in
    whole chunks of the empty prompt's embedding, of the compel that encoded it). `compels`: the prompts' and the
    negative prompts' (diffusers applies a clip_skip to the prompts alone). `parts`: text -> its Conjunctions."""
    import torch

    rows = [
        (compel, torch.cat([compel.build_conditioning_tensor_for_conjunction(c)[0] for c in parts(text)], dim=1))
        for compel, texts in zip(compels, (prompts, negatives), strict=True)
        for text in texts
    ]
    length = max(row.shape[1] for _, row in rows)
    return torch.cat([_padded(compel, row, length) for compel, row in rows])


def _encode_sd(
    pipe: Any,
    prompts: list[str],
    negatives: list[str] | None,
    weighting: Weighting | None,
    long_prompts: bool,
    skip: int = 0,
) -> dict[str, Any]:
    """As StableDiffusionPipeline.encode_prompt: the text encoder's last hidden states (for the prompts, with a
    clip_skip, those `skip` layers before them, normalized); "" for no negative."""
    negatives = negatives or [""] * len(prompts)
    plain = _compel(pipe, 1, long_prompts, "LAST_HIDDEN_STATES_NORMALIZED")
    skipped = _compel(pipe, 1, long_prompts, "PENULTIMATE_HIDDEN_STATES_NORMALIZED", skip - 1) if skip else plain
    rows = _conditionings((skipped, plain), prompts, negatives, lambda text: parse(text, weighting))
    count = len(prompts)
    return {"prompt_embeds": rows[:count], "negative_prompt_embeds": rows[count:]}


def _encode_sdxl(
    pipe: Any,
    texts: tuple[list[str], list[str] | None, list[str], list[str] | None],
    weighting: Weighting | None,
    long_prompts: bool,
    skip: int = 0,
) -> dict[str, Any]:
    """As StableDiffusionXLPipeline.encode_prompt: both encoders' penultimate hidden states (for the prompts, with
    a clip_skip, `skip` layers earlier) side by side, the pooled embedding from the second (of a prompt's first
    part: A1111 pools the first chunk); no negative prompt is zeros where the model forces them."""
    import torch

    prompts, negatives, prompts_2, negatives_2 = texts
    count = len(prompts)
    zero_negatives = negatives is None and bool(getattr(pipe.config, "force_zeros_for_empty_prompt", False))
    negatives = negatives or [""] * count
    negatives_2 = negatives_2 or negatives
    parsed = {text: parse(text, weighting) for text in prompts + negatives + prompts_2 + negatives_2}
    encoders = [(2, prompts_2, negatives_2)]
    if pipe.text_encoder is not None:  # the refiner has only the second
        encoders.insert(0, (1, prompts, negatives))
    parts = []
    for encoder, positive, negative in encoders:
        plain = _compel(pipe, encoder, long_prompts, "PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED")
        skipped = (
            _compel(pipe, encoder, long_prompts, "PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED", skip) if skip else plain
        )
        parts.append((plain, _conditionings((skipped, plain), positive, negative, parsed.__getitem__)))
    length = max(rows.shape[1] for _, rows in parts)
    rows = torch.cat([_padded(compel, rows, length) for compel, rows in parts], dim=-1)
    # One prompt at a time, as diffusers encodes them (a batch of several rounds differently in the last bits).
    provider = parts[-1][0].conditioning_provider
    pooled = [provider.get_pooled_embeddings([_plain_text(parsed[text][0])]) for text in prompts_2 + negatives_2]
    pooled_rows = torch.cat(pooled).to(rows.dtype)
    embeds = {
        "prompt_embeds": rows[:count],
        "negative_prompt_embeds": rows[count:],
        "pooled_prompt_embeds": pooled_rows[:count],
        "negative_pooled_prompt_embeds": pooled_rows[count:],
    }
    if zero_negatives:
        embeds["negative_prompt_embeds"] = torch.zeros_like(embeds["prompt_embeds"])
        embeds["negative_pooled_prompt_embeds"] = torch.zeros_like(embeds["pooled_prompt_embeds"])
    return embeds


def _padded(compel: Compel, rows: torch.Tensor, length: int) -> torch.Tensor:
    """`rows` lengthened to `length` tokens with the empty prompt's chunks (the two SDXL encoders can split a
    prompt into different numbers of chunks)."""
    import torch

    empty = compel.conditioning_provider.empty_z.to(rows.dtype)
    while rows.shape[1] < length:
        rows = torch.cat([rows, empty.expand(rows.shape[0], -1, -1)], dim=1)
    return rows


class _TextualInversions:
    """compel's hook for textual inversions of several vectors: one word that the tokenizer has as `<w>`, `<w>_1`,
    ... is expanded to all of them, as diffusers' `maybe_convert_prompt` does (compel's own manager always uses the
    pipeline's first tokenizer; SDXL's second one needs its own)."""

    def __init__(self, pipe: Any, tokenizer: Any) -> None:
        self.pipe, self.tokenizer = pipe, tokenizer

    @classmethod
    def of(cls, pipe: Any, tokenizer: Any) -> _TextualInversions | None:
        """Only where such an embedding is loaded: decoding and encoding again is not always the identity."""
        added = getattr(tokenizer, "added_tokens_encoder", {})
        if not hasattr(pipe, "maybe_convert_prompt") or not any(f"{token}_1" in added for token in added):
            return None
        return cls(pipe, tokenizer)

    def expand_textual_inversion_token_ids_if_necessary(self, token_ids: list[int]) -> list[int]:
        if not token_ids:
            return token_ids
        prompt = self.pipe.maybe_convert_prompt(self.tokenizer.decode(token_ids), self.tokenizer)
        expanded: list[int] = self.tokenizer.encode(prompt, add_special_tokens=False)
        return expanded

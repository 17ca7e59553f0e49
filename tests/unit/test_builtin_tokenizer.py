"""The built-in models' generated CLIP vocabulary and tokenizer, and the module's light import."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from diffusers_api.models import builtin
from diffusers_api.models.builtin import (
    BOS_TOKEN,
    EOS_TOKEN,
    build_clip_tokenizer,
    bytes_to_unicode,
    clip_vocab,
    learn_merges,
)


def test_bytes_to_unicode_is_gpt2s_map() -> None:
    mapping = bytes_to_unicode()
    assert sorted(mapping) == list(range(256))
    assert len(set(mapping.values())) == 256
    assert all(char.isprintable() and not char.isspace() for char in mapping.values())
    # Known values of GPT-2/CLIP's table: printable ASCII maps to itself, space to "Ġ", newline to "Ċ".
    assert mapping[ord("a")] == "a"
    assert mapping[ord(" ")] == "Ġ"
    assert mapping[ord("\n")] == "Ċ"
    assert next(iter(mapping.values())) == "!"


def test_learn_merges_merges_the_most_frequent_pair_first() -> None:
    merges = learn_merges(["low", "lower", "lowest"])
    assert merges[:2] == [("l", "o"), ("lo", "w")]
    # It goes on until every word is one symbol.
    assert ("low", "w</w>") not in merges
    assert merges[-1][0] + merges[-1][1] in {"lower</w>", "lowest</w>"}


def test_clip_vocab_layout() -> None:
    vocab, merges = clip_vocab()
    chars = list(bytes_to_unicode().values())
    tokens = list(vocab)
    assert tokens[:256] == chars
    assert tokens[256:512] == [char + "</w>" for char in chars]
    assert tokens[-2:] == [BOS_TOKEN, EOS_TOKEN]
    assert list(vocab.values()) == list(range(len(vocab)))
    assert all(left + right in vocab for left, right in merges)
    assert 100 < len(merges) < 1000


def test_tokenizer_in_memory() -> None:
    tokenizer = build_clip_tokenizer()
    assert tokenizer.model_max_length == 77
    assert tokenizer.tokenize("A Painting of a Cat") == [
        "a</w>",
        "painting</w>",
        "of</w>",
        "a</w>",
        "cat</w>",
    ]
    ids = tokenizer("Hello, World").input_ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "hello , world"  # as CLIP's own decodes it
    assert build_clip_tokenizer(pad_token="!").pad_token_id == 0


@pytest.mark.parametrize("heavy", ["torch", "diffusers", "transformers"])
def test_import_stays_light(heavy: str) -> None:
    # The CLI imports this module to answer --help: it must not drag in the ML stack.
    code = f"import sys, diffusers_api.models.builtin; sys.exit({heavy!r} in sys.modules)"
    src = str(Path(builtin.__file__).parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    assert subprocess.run([sys.executable, "-c", code], env=env, check=False).returncode == 0


def test_t5_tokenizer_is_laid_out_like_t5s_and_spells_out_unknown_words() -> None:
    from diffusers_api.models.builtin import build_t5_tokenizer

    tokenizer = build_t5_tokenizer()
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("a red Zebra").input_ids)
    assert tokens == ["\u2581a", "\u2581red", "\u2581Z", "e", "b", "r", "a", "</s>"]
    padded = tokenizer("a cat", padding="max_length", max_length=6, truncation=True).input_ids
    assert padded[2:] == [1, 0, 0, 0]  # two words, the end, padding
    assert tokenizer.decode(tokenizer("a red Zebra, 42!").input_ids, skip_special_tokens=True) == "a red Zebra, 42!"

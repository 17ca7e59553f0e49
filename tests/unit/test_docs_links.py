"""Every relative link in README.md, CHANGELOG.md and docs/*.md leads somewhere: the file exists, and an `#anchor`
names a heading of the page it points to, as GitHub spells heading anchors. Sections move between the README and
docs/, and a link left pointing at the old place would fail silently on GitHub."""

from __future__ import annotations

import re
from collections import Counter
from itertools import pairwise
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from markdown_it import MarkdownIt
from markdown_it.token import Token

ROOT = Path(__file__).resolve().parents[2]
PAGES = sorted([*ROOT.glob("*.md"), *(ROOT / "docs").glob("*.md")])
_parser = MarkdownIt("commonmark", {"html": True}).enable("table")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text: lower case, punctuation dropped (letters, digits, `_`, `-` and
    spaces stay), spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def _plain(inline: Token) -> str:
    """A heading's text as GitHub renders it: text and inline code, without the markup."""
    return "".join(child.content for child in inline.children or [] if child.type in ("text", "code_inline"))


def anchors(text: str) -> set[str]:
    """The anchors of a page's headings; a repeated heading gets -1, -2, ... as on GitHub."""
    tokens = _parser.parse(text)
    seen: Counter[str] = Counter()
    found = set()
    for opening, inline in pairwise(tokens):
        if opening.type == "heading_open":
            base = slug(_plain(inline))
            found.add(f"{base}-{seen[base]}" if seen[base] else base)
            seen[base] += 1
    return found


def links(text: str) -> list[str]:
    """The targets of a page's links and images (code blocks and inline code are not links)."""
    targets = []
    for token in _parser.parse(text):
        for child in token.children or []:
            target = child.attrGet("href") or child.attrGet("src")
            if target is not None:
                targets.append(str(target))
    return targets


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    """The relative links of `page` that lead nowhere, each with the reason."""
    found = (_problem(page, target, root.resolve()) for target in links(page.read_text()))
    return [problem for problem in found if problem]


def _problem(page: Path, target: str, root: Path) -> str | None:
    parts = urlsplit(target)
    if parts.scheme or parts.netloc:  # http(s), mailto: outside the repository
        return None
    destination = (page.parent / unquote(parts.path)).resolve() if parts.path else page
    if not destination.is_relative_to(root) or not destination.exists():
        return f"{target}: no such file"
    if not parts.fragment or destination.suffix != ".md":  # a source file's #L10 is GitHub's business
        return None
    if unquote(parts.fragment) in anchors(destination.read_text()):
        return None
    return f"{target}: no heading #{parts.fragment} in {destination.relative_to(root)}"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_relative_link_resolves(page: Path) -> None:
    assert broken_links(page) == []


def test_the_pages_are_found() -> None:
    names = {str(page.relative_to(ROOT)) for page in PAGES}
    assert {"README.md", "docs/architecture.md", "docs/runpod.md"} <= names


@pytest.mark.parametrize(
    ("heading", "anchor"),
    [
        ("The legacy API: `POST /`", "the-legacy-api-post-"),
        ("The native API: `/v1`", "the-native-api-v1"),
        ("torch.compile", "torchcompile"),
        ("Events: webhooks and streaming", "events-webhooks-and-streaming"),
        ("Kernel variants: SDPA backends, fp8, max-autotune", "kernel-variants-sdpa-backends-fp8-max-autotune"),
    ],
)
def test_anchors_are_spelled_as_on_github(heading: str, anchor: str) -> None:
    assert anchors(f"## {heading}\n") == {anchor}


def test_a_repeated_heading_gets_a_number_and_code_blocks_hold_no_headings() -> None:
    text = "# Setup\n\n## Setup\n\n```yaml\n# not.a.heading\n```\n"
    assert anchors(text) == {"setup", "setup-1"}


def test_broken_links_and_anchors_are_reported(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "guide.md").write_text("# Guide\n\n## Step one\n")
    page = tmp_path / "README.md"
    page.write_text(
        "# Title\n\n[ok](docs/guide.md#step-one) [self](#title) [web](https://example.com/x#y)\n"
        "[gone](docs/missing.md) [wrong](docs/guide.md#step-two) [here](#nowhere) [out](../elsewhere.md)\n"
        "`[code](docs/missing.md)`\n"
    )
    assert broken_links(page, root=tmp_path) == [
        "docs/missing.md: no such file",
        "docs/guide.md#step-two: no heading #step-two in docs/guide.md",
        "#nowhere: no heading #nowhere in README.md",
        "../elsewhere.md: no such file",
    ]


def _table_after(heading: str, text: str) -> list[list[str]]:
    """The cells of the first table under `heading` (a `## ` heading of the page)."""
    section = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[2:]]


def test_the_request_inputs_table_names_every_field_and_legacy_key() -> None:
    from diffusers_api.errors import InvalidInputs
    from diffusers_api.schema import GenerateRequest, from_legacy

    readme = (ROOT / "README.md").read_text()
    rows = _table_after("Request inputs", readme)
    native = {name for row in rows for name in re.findall(r"`(\w+)`", row[0])}
    legacy = {name for row in rows for name in re.findall(r"`(?:callInputs\.)?(\w+)`", row[1])}
    assert native == set(GenerateRequest.model_fields)
    with pytest.raises(InvalidInputs) as refused:  # its error lists every call input the server knows
        from_legacy({"modelInputs": {}, "callInputs": {"NOT_A_CALL_INPUT": 1}})
    not_inputs = {name for name in refused.value.extra["known"] if name not in legacy}
    assert not_inputs == set(_REFUSED_OR_IGNORED)
    assert all(f"`{name}`" in readme for name in _REFUSED_OR_IGNORED)


# call inputs of the original server that this one refuses or ignores (the README's legacy API says which)
_REFUSED_OR_IGNORED = ("xformers_memory_efficient_attention",)

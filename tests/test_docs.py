"""The documentation stays true to the code: the configuration reference is generated, every internal link resolves."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest
from pydantic import BaseModel, Field

from commsync.config import reference

ROOT = Path(__file__).resolve().parent.parent
MARKDOWN = sorted(p for p in ROOT.rglob("*.md") if not {".venv", ".git", ".pytest_cache"} & set(p.relative_to(ROOT).parts))

_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
# [text](target) and [text](target "title"); images too. Targets with spaces are not used here.
_LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_CODE_SPAN = re.compile(r"(`+)(.+?)\1")


def _prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks (a `# comment` in a shell block is no heading)."""
    out, fence = [], None
    for line in text.splitlines():
        match = _FENCE.match(line)
        if match:
            if fence is None:
                fence = match.group(1)
            elif match.group(1) == fence:
                fence = None
            continue
        if fence is None:
            out.append(line)
    return out


def slug(heading: str) -> str:
    """The anchor GitHub (and most forges) give a heading: lowercase, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor a Markdown file offers: one per heading, numbered from -1 when a slug repeats."""
    seen: dict[str, int] = {}
    out = set()
    for line in _prose_lines(path.read_text(encoding="utf-8")):
        match = _HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        out.add(base if count == 0 else f"{base}-{count}")
    return out


def links(path: Path) -> list[str]:
    """The link targets of a Markdown file, outside code blocks and code spans."""
    out = []
    for line in _prose_lines(path.read_text(encoding="utf-8")):
        out += _LINK.findall(_CODE_SPAN.sub("", line))
    return out


def _broken(path: Path) -> list[str]:
    problems = []
    for target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto:, ...
            continue
        file_part, _, fragment = target.partition("#")
        dest = (path.parent / unquote(file_part)).resolve() if file_part else path
        if not dest.exists():
            problems.append(f"{target}: {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest} does not exist")
        elif fragment and dest.is_file() and dest.suffix == ".md" and unquote(fragment) not in anchors(dest):
            problems.append(f"{target}: no heading with anchor #{fragment} in {dest.relative_to(ROOT)}")
        elif fragment and not (dest.is_file() and dest.suffix == ".md"):
            problems.append(f"{target}: an anchor into something that is not a Markdown file")
    return problems


def test_the_configuration_reference_is_generated_from_the_models():
    text = (ROOT / "config" / "README.md").read_text(encoding="utf-8")
    assert reference.marked_section(text) == reference.render(), (
        "config/README.md's reference is stale: run `.venv/bin/python -m commsync.config.reference --write`"
    )


def test_every_config_key_has_a_description():
    undocumented = [key for key, _, _, description in reference.rows() if not description.strip()]
    assert undocumented == []


def test_the_reference_lists_nested_and_list_keys():
    keys = {row[0] for row in reference.rows()}
    assert {"daemon.http.listen", "mailboxes[].auth.client_secret_file", "twilio_accounts[].lookback", "retention.days"} <= keys


def test_a_key_without_a_description_fails_the_rendering():
    class Inner(BaseModel):
        bare: int = 2

    class Section(BaseModel):
        documented: int = Field(default=1, description="Has one.")
        inner: list[Inner] = Field(default_factory=list, description="Sections.")

    with pytest.raises(reference.UndocumentedKeys, match=r"inner\[\]\.bare") as caught:
        reference.render(Section)
    assert "documented" not in str(caught.value)


def test_write_replaces_only_the_marked_section(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\nbefore\n\n{reference.START}\nold table\n{reference.END}\n\nafter\n", encoding="utf-8")
    assert reference.main(["--write", str(readme)]) == 0
    text = readme.read_text(encoding="utf-8")
    assert text.startswith("# Title\n\nbefore\n\n") and text.endswith("\n\nafter\n")
    assert "old table" not in text
    assert reference.marked_section(text) == reference.render()


@pytest.mark.parametrize("path", MARKDOWN, ids=[str(p.relative_to(ROOT)) for p in MARKDOWN])
def test_every_relative_link_and_anchor_resolves(path):
    assert _broken(path) == []


def test_the_link_checker_catches_a_broken_file_and_a_broken_anchor(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "README.md").write_text("# Sub\n\n## `commsync status`\n\n## Scale-out: several instances\n", encoding="utf-8")
    page = tmp_path / "README.md"
    page.write_text(
        "# Top\n\n```sh\n# not a heading\n```\n\n"
        "[ok](sub/README.md#commsync-status) [ok](sub/README.md#scale-out-several-instances) [ok](#top)\n"
        "[missing file](nowhere.md) [missing anchor](sub/README.md#lifecycle) [code anchor](#not-a-heading)\n"
        "`[in a code span](gone.md)` [web](https://example.com/x#y)\n",
        encoding="utf-8",
    )
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        problems = _broken(page)
    finally:
        ROOT = saved
    assert [p.split(":")[0] for p in problems] == ["nowhere.md", "sub/README.md#lifecycle", "#not-a-heading"]


def test_slugs_follow_the_forge():
    assert slug("OAuth2: Microsoft 365 (Exchange Online), step by step") == "oauth2-microsoft-365-exchange-online-step-by-step"
    assert slug("`leases`, `instances` and `source_status`") == "leases-instances-and-source_status"
    assert slug("Scale-out: several instances on one MongoDB") == "scale-out-several-instances-on-one-mongodb"

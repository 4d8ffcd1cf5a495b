"""The documentation: the generated configuration reference is current, the README stays a front
page, and every relative link of README.md, docs/*.md and benchmarks/README.md reaches a file (and,
with a #fragment into a Markdown file, one of its headings)."""

import importlib.util
import re

import pytest

from tests.conftest import REPO

PAGES = sorted([REPO / "README.md", REPO / "benchmarks" / "README.md",
                *(REPO / "docs").glob("*.md")])
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _generator():
    spec = importlib.util.spec_from_file_location(
        "make_config_reference", REPO / "docs" / "make_config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _prose(text: str) -> str:
    """``text`` without fenced code blocks and inline code, where brackets are not links."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def _anchors(path) -> set[str]:
    """GitHub's heading anchors of a Markdown file: lower case, punctuation dropped, spaces as
    hyphens, -1, -2, ... for repeats."""
    seen: dict[str, int] = {}
    out = set()
    text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.S | re.M)
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_config_reference_is_current():
    """docs/config_reference.md is what docs/make_config_reference.py writes from this checkout's
    mrcnn_tf/config.py."""
    expected = _generator().render()
    current = (REPO / "docs" / "config_reference.md").read_text(encoding="utf-8")
    assert current == expected, ("docs/config_reference.md is stale: run "
                                 "python docs/make_config_reference.py")


def test_config_reference_check_flags_a_stale_file(tmp_path, monkeypatch, capsys):
    generator = _generator()
    stale = tmp_path / "config_reference.md"
    stale.write_text(generator.render().replace("`contiguous`", "`other`"), encoding="utf-8")
    monkeypatch.setattr(generator, "OUTPUT", stale)
    monkeypatch.setattr(generator, "REPO", tmp_path)
    assert generator.main(["--check"]) == 1
    assert "config_reference.md is stale" in capsys.readouterr().err
    assert generator.main([]) == 0  # rewrites it
    assert generator.main(["--check"]) == 0
    assert stale.read_text(encoding="utf-8") == generator.render()


def test_config_reference_lists_every_key():
    from mrcnn_tf.config import describe

    text = (REPO / "docs" / "config_reference.md").read_text(encoding="utf-8")
    missing = [key for key, _, _ in describe() if f"| `{key}` |" not in text]
    assert not missing, missing
    assert "| `data.class_ids` | `contiguous` | one of `contiguous`, `category_id` |" in text
    assert "| `data.eval.num_images` | `100` |" in text  # the instance's default, not the class's


def test_readme_is_a_front_page():
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; move detail to docs/"


def test_readme_keeps_the_ci_test_command():
    """The README's test command is the one .ci/run runs."""
    command = ('python3 -m venv .venv && . .venv/bin/activate && pip install -q -e ".[test]" '
               "&& python -m pytest")
    assert command in (REPO / "README.md").read_text(encoding="utf-8")
    assert command in (REPO / ".ci" / "run").read_text(encoding="utf-8")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page):
    broken = []
    for target in LINK.findall(_prose(page.read_text(encoding="utf-8"))):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, fragment = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif fragment and dest.suffix == ".md" and fragment not in _anchors(dest):
            broken.append(f"{target}: no heading #{fragment} in {dest.name}")
    assert not broken, f"{page.relative_to(REPO)}: " + "; ".join(broken)

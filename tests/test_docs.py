"""The repository's docs stand on their own: a user's clone has nothing outside it."""

import re
import subprocess
from pathlib import Path

import pytest

# Touches no database: the suite's SQLite run covers it, its PostgreSQL run skips it.
pytestmark = pytest.mark.no_database

ROOT = Path(__file__).resolve().parents[1]


def _tracked_text_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.split()
    return [ROOT / p for p in listed if p.endswith((".md", ".py", ".toml", ".js", ".html", ".cfg", ".ini"))
            or p in ("Makefile",)]


def test_nothing_points_outside_the_repository():
    # `../shared` is where the design lived outside the repository; absolute paths of the machine
    # that wrote a doc (its checkout, its temp homes) mean nothing in a user's clone.
    outside = re.compile(r"\.\./shared/")
    machine_paths = re.compile(r"/work/\S|/tmp/[\w.-]+/")
    offenders = [f"{p.relative_to(ROOT)}:{n}" for p in _tracked_text_files() if p.is_file() and p.name != "test_docs.py"
                 for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
                 if outside.search(line) or (p.suffix == ".md" and machine_paths.search(line))]
    assert offenders == []


def test_relative_links_in_the_docs_resolve():
    link = re.compile(r"\[[^\]]*\]\(([^)#\s]+)(?:#[^)]*)?\)")
    broken = []
    for doc in [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in link.findall(doc.read_text()):
            if not re.match(r"[a-z]+:", target) and not (doc.parent / target).exists():
                broken.append(f"{doc.relative_to(ROOT)} -> {target}")
    assert broken == []


def test_the_design_of_record_is_in_docs():
    design = (ROOT / "docs" / "design.md").read_text()
    for section in ("## The flow", "## HTTP contract (v1)", "## CLI (`prism`)", "## On-disk layout"):
        assert section in design
    assert "docs/design.md" in (ROOT / "README.md").read_text()

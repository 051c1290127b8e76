"""The docs say what the code and the tests do: every test a doc names exists, and every row
of docs/fidelity.md has a source and, where its verdict is "same", names a test."""

import os
import re

import pytest

from tests.conftest import ROOT

DOCS = [os.path.join("docs", f) for f in sorted(os.listdir(os.path.join(ROOT, "docs"))) if f.endswith(".md")]
TEST_REF = re.compile(r"tests/([a-z_0-9]+\.py)::([A-Za-z0-9_]+)")


@pytest.mark.parametrize("doc", DOCS + ["README.md"])
def test_every_named_test_exists(doc):
    text = open(os.path.join(ROOT, doc)).read()
    missing = []
    for path, name in set(TEST_REF.findall(text)):
        full = os.path.join(ROOT, "tests", path)
        if not os.path.exists(full) or not re.search(rf"^\s*def {name}\b", open(full).read(), re.M):
            missing.append(f"tests/{path}::{name}")
    assert not missing


def fidelity_rows():
    """(line number, behaviour, source, moe_plugin, verdict) of the behaviour tables."""
    rows, in_table = [], False
    for n, line in enumerate(open(os.path.join(ROOT, "docs", "fidelity.md")), 1):
        if line.startswith("| behaviour"):
            in_table = True
            continue
        if not line.startswith("|"):
            in_table = False
        if in_table and not line.startswith("|---"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            rows.append((n, *cells))
    return rows


def test_fidelity_rows_have_a_source_and_same_names_a_test():
    rows = fidelity_rows()
    assert len(rows) > 100
    bad = []
    for n, *cells in rows:
        if len(cells) != 4:
            bad.append(f"line {n}: {len(cells)} cells")
            continue
        _, source, _, verdict = cells
        if not source or source == "-":
            bad.append(f"line {n}: no source")
        if verdict.startswith("same") and not TEST_REF.search(verdict):
            bad.append(f"line {n}: 'same' without a test")
    assert not bad, "\n".join(bad)

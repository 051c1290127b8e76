"""``python -m moe_plugin.options``: every option an arch accepts, with that arch's default, read from
fairseq-train's own parser; the generated tables of README.md and docs/options.md are current."""

import subprocess
import sys

import pytest
from fairseq.dataclass.utils import convert_namespace_to_omegaconf

from moe_plugin import options as opts
from moe_plugin.models.archs import ARCHS, DENSE_ARCH
from tests.conftest import ROOT


def test_command_lists_an_archs_options_with_its_defaults():
    out = subprocess.run([sys.executable, "-m", "moe_plugin.options", "--arch", "hash_lm"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    lines = {line.split()[0]: line.split()[1] for line in out.splitlines() if line.startswith("  --")}
    assert lines["--hash-type"] == "random" and lines["--moe-router"] == "hash"
    assert lines["--moe-aux-loss-weight"] == "0.01" and lines["--base-sublayers"] == "1"
    assert "router hash (this arch's router):" in out
    dense = subprocess.run([sys.executable, "-m", "moe_plugin.options", "--arch", DENSE_ARCH], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout
    assert "--moe-aux-loss-weight" in dense and "--moe-expert-count" not in dense  # refused by dense_lm


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_listed_defaults_are_the_config_fairseq_train_builds(arch):
    """The default printed for each option is the value of the config fairseq-train trains with
    (after fairseq converts its namespace), e.g. GShard's top-2 at capacity factor 1.0."""
    _, args = opts.parse(arch)
    cfg = convert_namespace_to_omegaconf(args)
    listed = {o.flag: o.default for o in opts.arch_options(arch)}
    assert listed
    for flag, default in listed.items():
        name = flag[2:].replace("-", "_")
        group = cfg.criterion if name in cfg.criterion else cfg.model
        assert group[name] == default or (default is None and group[name] in ("", None)), flag
    if arch == "gshard_lm":
        assert listed["--moe-top-k"] == 2 and listed["--moe-capacity-factor"] == 1.0


def test_docs_tables_are_current():
    stale = opts.sync_docs(ROOT)
    assert not stale, f"{stale}: run python -m moe_plugin.options --update-docs ."

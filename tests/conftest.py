"""Shared fixtures: a tiny synthetic corpus binarised by fairseq-preprocess, and a runner
for fairseq's command-line tools as subprocesses (what a user runs)."""

import os
import re
import subprocess
import sys

import pytest

from moe_plugin.tools import commands

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USER_DIR = os.path.join(ROOT, "moe_plugin")


def run_cli(module: str, *args, timeout: int = 600, check: bool = True, env=None) -> subprocess.CompletedProcess:
    """``python -m fairseq_cli.<module> args...`` through the repository's one runner
    (moe_plugin.tools.commands.run: repo root, one thread, warnings off); stdout and stderr
    apart; on failure (check) the exception shows the output tail."""
    return commands.run([sys.executable, "-m", f"fairseq_cli.{module}", *map(str, args)], timeout=timeout,
                        check=check, env=env, merge_stderr=False)


def eval_lm_loss(output: str) -> float:
    """Base-2 loss printed by fairseq-eval-lm."""
    m = re.findall(r"Loss \(base 2\): ([\d.]+), Perplexity: ([\d.]+)", output)
    assert m, f"no perplexity line in eval-lm output:\n{output[-3000:]}"
    return float(m[-1][0])


#: a small model every end-to-end test can use (seconds per run on one CPU core)
TINY_MODEL = [
    "--decoder-layers", "2", "--decoder-embed-dim", "32", "--decoder-ffn-embed-dim", "64",
    "--decoder-attention-heads", "2", "--decoder-input-dim", "32", "--decoder-output-dim", "32",
    "--tokens-per-sample", "32", "--max-tokens", "512",
]
TINY_TRAIN = [
    "--task", "language_modeling", "--user-dir", USER_DIR, "--cpu", "--optimizer", "adam", "--lr", "1e-3",
    "--log-format", "simple", "--log-interval", "1", "--no-epoch-checkpoints", "--seed", "1",
    "--num-workers", "0",
]


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """Synthetic text (+ truth.json) and its fairseq data-bin; returns (text_dir, data_bin)."""
    base = tmp_path_factory.mktemp("corpus")
    text = base / "text"
    subprocess.run(
        [sys.executable, os.path.join(ROOT, "data-prep", "synthetic.py"), "--out", str(text),
         "--train-tokens", "20000", "--valid-tokens", "3000", "--test-tokens", "3000",
         "--vocab-size", "300", "--domains", "3", "--domain-vocab", "60", "--shared-vocab", "15"],
        check=True, capture_output=True,
    )
    data_bin = base / "data-bin"
    run_cli("preprocess", "--only-source", "--trainpref", text / "train.txt", "--validpref", text / "valid.txt",
            "--testpref", text / "test.txt", "--destdir", data_bin, "--workers", "1")
    return str(text), str(data_bin)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long tests, not in the default `make test` run")
    config.addinivalue_line("markers", "e2e: runs fairseq command-line tools as subprocesses")
    config.addinivalue_line("markers", "distributed: several processes over gloo")

"""The synthetic corpus: truth.json against a brute-force likelihood, and the source is a
proper distribution."""

import importlib.util
import itertools
import json
import math
import os

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("synthetic", os.path.join(ROOT, "data-prep", "synthetic.py"))
synthetic = importlib.util.module_from_spec(spec)
spec.loader.exec_module(synthetic)


def brute_force_prob(src, doc):
    """P(doc) by plain loops: sum over domains of prior * product of transition probs."""
    succ, probs, vocab = src["succ"], src["probs"], src["vocab_DN"]
    q, min_len = float(src["end_prob"]), int(src["min_len"])
    n = vocab.shape[1]
    total = 0.0
    for d in range(len(src["pi"])):
        local = {int(g): i for i, g in enumerate(vocab[d])}
        p = float(src["pi"][d])
        a = b = n
        for t, tok in enumerate(doc, start=1):
            if tok not in local:
                p = 0.0
                break
            c = local[tok]
            row = [float(pr) for s, pr in zip(succ[d, a, b], probs[d, a, b]) if int(s) == c]
            p *= row[0] if row else 0.0
            if t > min_len:
                p *= 1 - q
            a, b = b, c
        p *= q if len(doc) >= min_len else 0.0
        total += p
    return total


def test_truth_json_equals_brute_force(tmp_path):
    out = tmp_path / "syn"
    synthetic.main(["--out", str(out), "--train-tokens", "300", "--valid-tokens", "400", "--test-tokens", "300",
                    "--vocab-size", "30", "--domains", "3", "--domain-vocab", "8", "--shared-vocab", "3",
                    "--successors", "3", "--min-len", "2", "--end-prob", "0.2", "--seed", "7"])
    src = dict(np.load(out / "source.npz"))
    truth = json.load(open(out / "truth.json"))
    for split in ("valid", "test"):
        docs = synthetic.read_split(str(out / f"{split}.txt"))
        ll = sum(math.log(brute_force_prob(src, d)) for d in docs)
        ntok = sum(len(d) + 1 for d in docs)
        assert truth[split]["tokens"] == ntok
        assert truth[split]["cross_entropy_nats"] == pytest.approx(-ll / ntok, rel=1e-9)
        assert truth[split]["perplexity"] == pytest.approx(math.exp(-ll / ntok), rel=1e-9)


def test_source_is_a_proper_distribution():
    """Summing P(doc) over every document up to a length leaves only the tail mass."""
    src = synthetic.build_source(3, vocab_size=6, domains=2, domain_vocab=3, shared_vocab=1, successors=2,
                                 alpha=1.0, end_prob=0.6, min_len=1)
    words = sorted({int(w) for w in src["vocab_DN"].ravel()})
    max_len = 7
    mass = sum(brute_force_prob(src, list(doc)) for L in range(1, max_len + 1)
               for doc in itertools.product(words, repeat=L))
    tail = 0.4 ** max_len  # P(length > max_len) with min_len 1 and end prob 0.6
    assert mass == pytest.approx(1.0 - tail, abs=1e-9)


def test_sampler_matches_likelihood_statistically():
    """The empirical frequency of each short document matches its probability."""
    src = synthetic.build_source(5, vocab_size=6, domains=2, domain_vocab=3, shared_vocab=1, successors=2,
                                 alpha=1.0, end_prob=0.6, min_len=1)
    docs = synthetic.sample_docs(src, 60000, np.random.default_rng(0), batch=2048)
    counts = {}
    for d in docs:
        counts[tuple(d)] = counts.get(tuple(d), 0) + 1
    n = len(docs)
    for doc, c in sorted(counts.items(), key=lambda kv: -kv[1])[:5]:
        p = brute_force_prob(src, list(doc))
        assert abs(c / n - p) < 5 * math.sqrt(p * (1 - p) / n) + 1e-3, (doc, c / n, p)


def test_deterministic_from_seed(tmp_path):
    args = ["--train-tokens", "200", "--valid-tokens", "100", "--test-tokens", "100", "--vocab-size", "40",
            "--domains", "2", "--domain-vocab", "10", "--shared-vocab", "2"]
    synthetic.main(["--out", str(tmp_path / "a"), *args])
    synthetic.main(["--out", str(tmp_path / "b"), *args])
    for f in ("train.txt", "valid.txt", "truth.json"):
        assert (tmp_path / "a" / f).read_text() == (tmp_path / "b" / f).read_text()

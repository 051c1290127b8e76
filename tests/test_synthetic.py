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
    assert_truth_is_brute_force(out)


def assert_truth_is_brute_force(out):
    """truth.json's floor (per split: tokens, cross-entropy, perplexity) against the brute-force
    likelihood of every document under source.npz."""
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


# --- presets (issue 15): order 1, disjoint vocabularies, domain side files, CE_unigram --------------

TINY_PRESET = ["--train-tokens", "400", "--valid-tokens", "300", "--test-tokens", "300", "--domains", "3",
               "--domain-vocab", "6", "--vocab-size", "18", "--successors", "3", "--min-len", "2",
               "--end-prob", "0.2", "--seed", "5"]


@pytest.mark.parametrize("preset", sorted(synthetic.PRESETS))
def test_preset_is_deterministic(tmp_path, preset):
    args = ["--preset", preset, "--train-tokens", "3000", "--valid-tokens", "500", "--test-tokens", "500"]
    synthetic.main(["--out", str(tmp_path / "a"), *args])
    synthetic.main(["--out", str(tmp_path / "b"), *args])
    for f in ("train.txt", "valid.txt", "test.txt", "train.domains", "test.domains", "truth.json", "source.npz"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    config = json.load(open(tmp_path / "a" / "truth.json"))["config"]
    for k, v in synthetic.PRESETS[preset].items():
        if k != "train_tokens":  # overridden on the command line above
            assert config[k] == v, k
    assert config["train_tokens"] == 3000


@pytest.mark.parametrize("preset", sorted(synthetic.PRESETS))
def test_preset_truth_equals_brute_force(tmp_path, preset):
    """A tiny instance of the preset (its order and vocabulary layout, fewer words): truth.json's
    floor equals the plain-loop likelihood, and the order-1 tables are what order 1 means."""
    out = tmp_path / "syn"
    disjoint = synthetic.PRESETS[preset]["disjoint"]
    synthetic.main(["--out", str(out), "--preset", preset, *TINY_PRESET, *([] if disjoint else ["--shared-vocab", "2"])])
    src = dict(np.load(out / "source.npz"))
    assert synthetic.PRESETS[preset]["order"] == 1
    # order 1: the successors and weights of context (a, b) do not depend on a
    assert (src["succ"] == src["succ"][:, :1]).all() and (src["probs"] == src["probs"][:, :1]).all()
    assert np.allclose(src["probs"].sum(-1), 1.0)
    words = src["vocab_DN"].ravel()
    if disjoint:  # no word is in two domains, and the vocabulary is used exactly
        assert len(set(words.tolist())) == words.size == 18
    else:  # the shared words in every domain, the others drawn for each domain from one pool
        assert (src["vocab_DN"][:, :2] == np.arange(2)).all()
        assert len(set(words.tolist())) < words.size
    assert_truth_is_brute_force(out)


def test_domain_files_align_with_documents(tmp_path):
    """Line i of <split>.domains is the domain of the document on line i of <split>.txt: with
    disjoint vocabularies every word names its domain; with shared words (the default layout)
    the document has positive probability under its recorded domain."""
    out = tmp_path / "dis"
    synthetic.main(["--out", str(out), "--preset", "calibrated", *TINY_PRESET])
    src = dict(np.load(out / "source.npz"))
    owner = {int(w): d for d in range(src["vocab_DN"].shape[0]) for w in src["vocab_DN"][d]}
    for split in ("train", "valid", "test"):
        docs = synthetic.read_split(str(out / f"{split}.txt"))
        doms = [int(x) for x in open(out / f"{split}.domains").read().split("\n")[:-1]]
        assert len(doms) == len(docs)
        for doc, dom in zip(docs, doms):
            assert {owner[w] for w in doc} == {dom}
    out = tmp_path / "shared"
    synthetic.main(["--out", str(out), "--train-tokens", "300", "--valid-tokens", "300", "--test-tokens", "300",
                    "--vocab-size", "30", "--domains", "3", "--domain-vocab", "8", "--shared-vocab", "3",
                    "--successors", "3", "--min-len", "2", "--end-prob", "0.2", "--seed", "7"])
    src = dict(np.load(out / "source.npz"))
    docs = synthetic.read_split(str(out / "test.txt"))
    doms = [int(x) for x in open(out / "test.domains").read().split()]
    assert len(doms) == len(docs)
    for doc, dom in zip(docs, doms):
        one = {k: (v[dom:dom + 1] if k in ("vocab_DN", "succ", "probs") else v) for k, v in src.items()}
        one["pi"] = np.ones(1)
        assert brute_force_prob(one, doc) > 0


def test_unigram_cross_entropy_hand_made():
    # train: w0 w0 w1 </s> -> counts (2, 1, 0), 1 end; add-one over 3 words + end: denominator 3 + 1 + 4 = 8
    # test: w1 </s> -> p(w1) = 2/8, p(</s>) = 2/8 -> CE = ln 4
    assert synthetic.unigram_cross_entropy([[0, 0, 1]], [[1]], vocab=3) == pytest.approx(math.log(4), rel=1e-12)
    # a word unseen in training: p(w2) = 1/8; test w2 w0 </s>: -(ln 1/8 + ln 3/8 + ln 2/8) / 3
    assert synthetic.unigram_cross_entropy([[0, 0, 1]], [[2, 0]], vocab=3) == pytest.approx(
        -(math.log(1 / 8) + math.log(3 / 8) + math.log(2 / 8)) / 3, rel=1e-12)


def test_truth_json_unigram_from_the_files(tmp_path):
    """truth.json's CE_unigram equals a recount from train.txt, scored on test.txt by plain loops."""
    out = tmp_path / "syn"
    synthetic.main(["--out", str(out), "--preset", "control", "--train-tokens", "2000", "--valid-tokens", "300",
                    "--test-tokens", "300"])
    vocab = json.load(open(out / "truth.json"))["config"]["vocab_size"]
    counts, n = {}, 0
    for line in open(out / "train.txt"):
        for w in line.split() + ["</s>"]:
            counts[w] = counts.get(w, 0) + 1
            n += 1
    total, m = 0.0, 0
    for line in open(out / "test.txt"):
        for w in line.split() + ["</s>"]:
            total += math.log((counts.get(w, 0) + 1) / (n + vocab + 1))
            m += 1
    t = json.load(open(out / "truth.json"))["test"]
    assert t["unigram_cross_entropy_nats"] == pytest.approx(-total / m, rel=1e-12)
    assert t["learnable_nats"] == pytest.approx(-total / m - t["cross_entropy_nats"], rel=1e-12)


def test_preset_bad_values(tmp_path):
    with pytest.raises(SystemExit):
        synthetic.main(["--out", str(tmp_path), "--order", "3"])
    with pytest.raises(ValueError, match="--vocab-size"):
        synthetic.build_source(0, vocab_size=10, domains=3, domain_vocab=4, shared_vocab=0, successors=2,
                               alpha=1.0, end_prob=0.5, min_len=1, order=1, disjoint=True)

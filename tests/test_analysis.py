"""moe_plugin.tools.analysis: the statistics against brute force / scipy / scikit-learn, and the dump
of a real hash_lm checkpoint against the hash table it routes with."""

import collections
import json
import math
import os

import numpy as np
import pytest

from moe_plugin.tools import analysis
from tests import _reproduce_runs


def test_expert_load_and_entropy_against_scipy():
    from scipy.stats import entropy

    rng = np.random.default_rng(0)
    experts_NK = rng.integers(-1, 6, size=(500, 2))
    load = analysis.expert_load(experts_NK, 6)
    counts = collections.Counter(int(e) for e in experts_NK.reshape(-1) if e >= 0)
    assert load.tolist() == [counts[e] for e in range(6)]
    st = analysis.load_entropy(load)
    assert st["entropy"] == pytest.approx(entropy(load))
    assert st["entropy_norm"] == pytest.approx(entropy(load) / math.log(6))
    assert st["load_max"] == pytest.approx(load.max() / load.mean())
    assert analysis.load_entropy(np.array([5, 5, 5, 5]))["entropy_norm"] == pytest.approx(1.0)
    skew = analysis.load_entropy(np.array([10, 0, 0, 0]))
    assert skew["entropy_norm"] == 0.0 and skew["unused"] == 3 and skew["load_max"] == 4.0


def test_top_counts_against_brute_force():
    rng = np.random.default_rng(1)
    keys = rng.integers(0, 12, size=400)
    groups = rng.integers(-1, 4, size=400)  # -1 = dropped, ignored
    got = analysis.top_counts(keys, groups, 4, top=3)
    for g in range(4):
        c = collections.Counter(int(k) for k, gg in zip(keys, groups) if gg == g)
        want = sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[:3]
        assert got[g] == want


def test_mutual_information_against_scikit_learn():
    from sklearn.metrics import mutual_info_score

    rng = np.random.default_rng(2)
    a = rng.integers(0, 5, size=1000)
    b = (a * 3 + rng.integers(0, 2, size=1000)) % 7
    assert analysis.mutual_information(a, b) == pytest.approx(mutual_info_score(a, b))
    assert analysis.mutual_information(a, a) == pytest.approx(analysis.entropy_of_labels(a))


def test_expert_domain_counts_and_nmi_against_brute_force_and_scikit_learn():
    from sklearn.metrics import mutual_info_score

    rng = np.random.default_rng(3)
    dom = rng.integers(0, 6, size=2000)
    first = np.where(rng.random(2000) < 0.7, dom % 4, rng.integers(0, 4, size=2000))
    first[rng.random(2000) < 0.1] = -1  # dropped tokens are not counted
    C = analysis.expert_domain_counts(first, dom, 4, 6)
    brute = np.zeros((6, 4), dtype=np.int64)
    for d, e in zip(dom.tolist(), first.tolist()):
        if e >= 0:
            brute[d, e] += 1
    assert np.array_equal(C, brute)
    ok = first >= 0
    h = -sum(p * math.log(p) for p in np.bincount(first[ok]) / ok.sum() if p > 0)
    assert analysis.domain_nmi(first, dom) == pytest.approx(mutual_info_score(first[ok], dom[ok]) / h)
    # an expert that is a function of the domain: 1; routing independent of it: about 0
    assert analysis.domain_nmi(dom % 4, dom) == pytest.approx(1.0)
    assert analysis.domain_nmi(rng.integers(0, 4, size=20000), rng.integers(0, 6, size=20000)) < 0.01


def test_document_of_against_a_walk_over_the_documents():
    sizes = np.array([3, 1, 5, 2])
    walk = [d for d, n in enumerate(sizes) for _ in range(n)]  # the stream, token by token
    pos = np.array([-1, 0, 2, 3, 4, 8, 9, 10])
    assert analysis.document_of(pos, sizes).tolist() == [0] + [walk[p] for p in pos[1:]]
    with pytest.raises(ValueError, match="past the split"):
        analysis.document_of(np.array([11]), sizes)


def test_routing_change_counts_changes_and_undoes_relabelling():
    rng = np.random.default_rng(3)
    a = rng.integers(0, 5, size=300)
    perm = np.array([3, 0, 4, 1, 2])
    b = perm[a]
    r = analysis.routing_change(a, b, 5)
    assert r["changed"] == pytest.approx(float((a != b).mean()))
    assert r["agreement_matched"] == 1.0  # a relabelling is no change of routing
    same = analysis.routing_change(a, a, 5)
    assert same["changed"] == 0.0 and same["agreement_matched"] == 1.0
    # 10 of 100 tokens moved to another expert, dropped slots (-1) ignored
    a2 = np.zeros(100, dtype=np.int64)
    b2 = a2.copy()
    b2[:10] = 1
    a2[-5:] = -1
    r2 = analysis.routing_change(a2, b2, 2)
    assert r2["tokens"] == 95 and r2["changed"] == pytest.approx(10 / 95)
    assert r2["agreement_matched"] == pytest.approx(85 / 95)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_corpus):
    return _reproduce_runs.tiny_run(tmp_path_factory, tiny_corpus)


@pytest.mark.e2e
def test_dump_of_a_hash_checkpoint_follows_its_table(tiny_run, tiny_corpus, tmp_path):
    ckpt_dir = os.path.join(tiny_run.out, "hash_random", "checkpoints")
    model, task = analysis.load_checkpoint(os.path.join(ckpt_dir, "checkpoint_last.pt"), tiny_corpus[1])
    assign = analysis.collect_assignments(model, task, "valid", max_tokens=1024)
    routers = dict(analysis.routers_of(model))
    assert sorted(assign) == ["l0", "l1"]
    # every token of the valid split is routed once per layer (fairseq's own dataset sizes)
    n_valid = int(sum(task.dataset("valid").sizes))
    for name, a in assign.items():
        assert a["ids"].shape[0] == n_valid
        table_V = routers[name].table_VN[:, 0].numpy()
        assert np.array_equal(a["experts"][:, 0], table_V[a["ids"]])  # random hash: expert = table[token]
    # the two layers draw different tables, so their routings differ
    assert not np.array_equal(assign["l0"]["experts"], assign["l1"]["experts"])
    # the CLI: hash routing does not move between the middle and the end of training
    out = tmp_path / "an"
    mid = os.path.join(ckpt_dir, f"checkpoint_*_{_reproduce_runs.UPDATES // 2}.pt")
    assert analysis.main([os.path.join(ckpt_dir, "checkpoint_last.pt"), "--data", tiny_corpus[1], "--compare", mid,
                          "--out", str(out), "--cpu", "--max-tokens", "1024"]) == 0
    res = json.loads((out / "analysis.json").read_text())
    assert all(c["changed"] == 0.0 for c in res["change"].values())
    md = (out / "analysis.md").read_text()
    assert "## Layer l0: each expert's most frequent tokens" in md
    npz = np.load(out / "assignments.npz")
    assert np.array_equal(npz["l1_experts_NK"], assign["l1"]["experts"])


@pytest.mark.e2e
def test_tokens_are_placed_in_their_documents_domains(tiny_run, tiny_corpus, tmp_path):
    """Each routed token's document, from fairseq's token blocks, against a walk over valid.txt
    (line i: its words and the end of document), and the --domains report."""
    text_dir, data_bin = tiny_corpus
    ckpt = os.path.join(tiny_run.out, "hash_random", "checkpoints", "checkpoint_last.pt")
    model, task = analysis.load_checkpoint(ckpt, data_bin)
    assign = analysis.collect_assignments(model, task, "valid", max_tokens=1024)
    lines = open(os.path.join(text_dir, "valid.txt")).read().splitlines()
    words = [w for line in lines for w in line.split() + ["</s>"]]
    doc_of_word = [i for i, line in enumerate(lines) for _ in range(len(line.split()) + 1)]
    dictionary = task.source_dictionary
    sizes = analysis.split_documents(task, "valid")
    assert sizes.tolist() == [len(line.split()) + 1 for line in lines]
    for a in assign.values():
        # every token is routed once as an input, the stream's last only ever a target
        assert sorted(a["pos"].tolist()) == list(range(-1, len(words) - 1))
        assert [dictionary[i] for i in a["ids"][a["pos"] >= 0][:200]] == [words[p] for p in a["pos"][a["pos"] >= 0][:200]]
        docs = analysis.document_of(a["pos"], sizes)
        assert docs.tolist() == [doc_of_word[max(p, 0)] for p in a["pos"].tolist()]
    # a wrong layout is refused, not attributed to the wrong documents
    shifted = {name: dict(a, pos=a["pos"] + 1) for name, a in assign.items()}
    blocks = analysis._token_blocks(task.dataset("valid"))
    with pytest.raises(RuntimeError, match="cannot attribute"):
        analysis._check_positions(shifted, blocks, dictionary.eos())
    with pytest.raises(ValueError, match="domains for"):
        analysis.read_domains(os.path.join(text_dir, "test.domains"), sizes.shape[0] + 1)
    out = tmp_path / "dom"
    assert analysis.main([ckpt, "--data", data_bin, "--domains", os.path.join(text_dir, "valid.domains"),
                          "--out", str(out), "--cpu", "--max-tokens", "1024"]) == 0
    res = json.loads((out / "analysis.json").read_text())["layers"]
    dom_docs = analysis.read_domains(os.path.join(text_dir, "valid.domains"), len(lines))
    for name, a in assign.items():
        dom = dom_docs[analysis.document_of(a["pos"], sizes)]
        assert res[name]["nmi_domain"] == pytest.approx(analysis.domain_nmi(a["experts"][:, 0], dom))
        assert np.array(res[name]["counts"]).sum() == (a["experts"][:, 0] >= 0).sum()
    assert "NMI(expert; domain)" in (out / "analysis.md").read_text()

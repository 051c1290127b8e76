"""hash_lm's router (moe_plugin/routing/hashed.py) and MultiHash layer, tested against
independent references: plain-int arithmetic for the hash formulas, brute-force bin packing,
scipy's chi-square, fairseq's own Dictionary for the token counts, slow per-bucket and
per-token loops for the expert computation, and fairseq's full forward for incremental
decoding."""

import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.stats
import torch
import torch.nn.functional as F

from fairseq import options, tasks
from fairseq.dataclass.utils import convert_namespace_to_omegaconf

import moe_plugin  # noqa: F401
from moe_plugin import config
from moe_plugin.experts import ExpertBank, SegmentedExpertBank, segmented_ffn
from moe_plugin.moe_layer import MoELayer, build_moe_layer
from moe_plugin.routing import DROPPED, TokenInfo, VocabInfo, build_router
from moe_plugin.routing import hashed
from moe_plugin.routing.hashed import HASH_TYPES
from tests.conftest import ROOT, USER_DIR
from tests.helpers import router_cfg, token_info

V, E, D = 60, 4, 8
EOS, PAD = 2, 1


def vocab(size=V, seed=0):
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, 1000, (size,), generator=g)
    counts[:4] = 1  # fairseq's special symbols load with count 1
    return VocabInfo(size=size, pad=PAD, eos=EOS, counts_V=counts)


def table_file(tmp_path, size=V, experts=E, multi=1, seed=0, name="table.txt"):
    g = torch.Generator().manual_seed(seed)
    table = torch.randint(experts, (size, multi), generator=g)
    path = tmp_path / name
    hashed.write_table_file(str(path), table, "test table")
    return str(path), table


def make(hash_type="random", tmp_path=None, layer_index=1, voc=None, **kw):
    kw.setdefault("moe_expert_count", E)
    if hash_type in ("clustered", "dispersed") and "hash_table" not in kw:
        kw["hash_table"], _ = table_file(tmp_path, experts=kw["moe_expert_count"], multi=kw.get("hash_multi", 1))
    cfg = router_cfg("hash", hash_type=hash_type, **kw)
    config.validate(cfg)
    return build_router(cfg, D, vocab=voc or vocab(), layer_index=layer_index)


def batch(B=3, L=7, seed=0, pad_tail=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, V, (B, L), generator=g)
    ids[0, 2] = EOS
    if pad_tail:
        ids[-1, -pad_tail:] = PAD
    return ids


# ---------------------------------------------------------------------------------------
# The hash functions
# ---------------------------------------------------------------------------------------


def key_of(hash_type, ids, t, b_row, prime=1000003):
    """The independent reference: what each hash type's expert may depend on (plain ints)."""
    B, L = ids.shape
    x = int(ids[b_row, t])
    prev = int(ids[b_row, t - 1]) if t > 0 else PAD
    nxt = int(ids[b_row, t + 1]) if t + 1 < L else PAD
    return {
        "random": x, "clustered": x, "dispersed": x, "balanced": x,
        "previous": prev, "oracle": nxt, "bigram": (x, prev), "position": t,
    }[hash_type]


@pytest.mark.parametrize("hash_type", HASH_TYPES)
def test_same_key_same_expert_everywhere(hash_type, tmp_path):
    """Across positions, sequences, batch shapes, calls and train/eval, the expert is a
    function of the type's key alone (token, previous token, bigram, position, next token)."""
    router = make(hash_type, tmp_path)
    seen = {}
    for seed, (B, L), training in [(0, (3, 7), True), (1, (5, 11), False), (2, (1, 20), True), (3, (8, 4), False)]:
        router.train(training)
        ids = batch(B, L, seed)
        out = router(torch.randn(B * L, D), tokens=token_info(ids))
        ids_TN = out.expert_ids_TK.view(L, B, -1)
        for t in range(L):
            for b in range(B):
                k = key_of(hash_type, ids, t, b)
                e = tuple(ids_TN[t, b].tolist())
                assert seen.setdefault(k, e) == e, (hash_type, k)
        assert torch.equal(out.weights_TK, torch.ones_like(out.weights_TK))  # unweighted expert output
        assert out.aux_losses == {}  # no loss
    assert not list(router.parameters())  # no router parameters
    assert len(set(seen.values())) > 1  # not a constant map


def test_formulas_match_plain_integer_arithmetic():
    p, E8 = 1000003, 8
    bigram = make("bigram", moe_expert_count=E8, hash_bigram_prime=p)
    position = make("position", moe_expert_count=E8, hash_multi=2)
    ids = batch(4, 30, seed=5)
    tok = token_info(ids)
    got_b = bigram(torch.randn(120, D), tokens=tok).expert_ids_TK[:, 0].view(30, 4)
    got_p = position(torch.randn(120, D), tokens=tok).expert_ids_TK.view(30, 4, 2)
    for t in range(30):
        for b in range(4):
            prev = int(ids[b, t - 1]) if t else PAD
            assert int(got_b[t, b]) == (int(ids[b, t]) + p * prev) % E8
            assert int(got_p[t, b, 0]) == t % E8
            assert int(got_p[t, b, 1]) == (t + t // E8) % E8


def test_bigram_primes_are_primes_with_fresh_residues():
    ps = hashed.bigram_primes(1000003, 4, 8)
    assert all(trial_division_is_prime(p) for p in ps) and ps[0] == 1000003
    assert len({p % 8 for p in ps}) == 4  # 8 has 4 odd residues: all used
    assert len(hashed.bigram_primes(7, 6, 4)) == 6  # more hashes than residues still works


def trial_division_is_prime(n):
    return n > 1 and all(n % k for k in range(2, int(n**0.5) + 1))


def test_balanced_eos_previous_routes_eos_by_the_previous_token():
    r = make("balanced", hash_balanced_eos="previous")
    ids = batch(4, 9, seed=3)
    ids[1, 4] = ids[2, 0] = EOS
    got = r(torch.randn(36, D), tokens=token_info(ids)).expert_ids_TK[:, 0].view(9, 4)
    for t in range(9):
        for b in range(4):
            x = int(ids[b, t])
            key = (int(ids[b, t - 1]) if t else PAD) if x == EOS else x
            assert int(got[t, b]) == int(r.table_VN[key, 0])


@pytest.mark.parametrize("hash_type", ["random", "balanced", "previous", "oracle"])
def test_table_depends_on_hash_seed_only(hash_type):
    """One --hash-seed gives the same table under any global seed, and building it neither
    reads nor advances the global RNG; another --hash-seed or layer gives another table."""
    torch.manual_seed(1)
    state = torch.get_rng_state()
    a = make(hash_type, hash_seed=7, hash_multi=2).table_VN.clone()
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(2)
    b = make(hash_type, hash_seed=7, hash_multi=2).table_VN
    assert torch.equal(a, b)
    assert not torch.equal(a[:, 0], a[:, 1])  # the MultiHash functions differ
    if hash_type != "balanced":  # (balanced tables differ only in ties; checked below)
        assert not torch.equal(a, make(hash_type, hash_seed=8, hash_multi=2).table_VN)
        assert not torch.equal(a, make(hash_type, hash_seed=7, hash_multi=2, layer_index=3).table_VN)


def test_seed_follows_fairseq_seed_unless_hash_seed_is_given():
    """--hash-seed unset: the tables follow moe_seed (fairseq's --seed; 1 outside fairseq);
    an explicit --hash-seed fixes them whatever --seed is."""
    a = make("random", moe_seed=3, hash_multi=2).table_VN
    for i in range(2):  # the table is the seeded draw for (seed 3, layer 1, hash i)
        assert torch.equal(a[:, i], hashed.random_table(V, E, hashed.hash_generator(3, 1, i)))
    assert torch.equal(a, make("random", moe_seed=3, hash_multi=2).table_VN)
    assert not torch.equal(a, make("random", moe_seed=4, hash_multi=2).table_VN)
    fixed = make("random", moe_seed=3, hash_seed=9).table_VN
    assert torch.equal(fixed, make("random", moe_seed=4, hash_seed=9).table_VN)
    assert torch.equal(fixed[:, 0], hashed.random_table(V, E, hashed.hash_generator(9, 1, 0)))
    assert torch.equal(make("random").table_VN, make("random", moe_seed=1).table_VN)


def test_random_table_is_uniform():
    table = hashed.random_table(40000, 16, hashed.hash_generator(0, 0, 0))
    counts = np.bincount(table.numpy(), minlength=16)
    assert scipy.stats.chisquare(counts).pvalue > 1e-3


def test_balanced_lpt_against_brute_force_optimum():
    """LPT is within 4/3 of the best packing (Graham 1969); brute force over 3^9 packings."""
    import itertools

    rng = np.random.default_rng(0)
    for trial in range(5):
        counts = torch.tensor(rng.integers(1, 100, 9))
        table = hashed.balanced_table(counts, 3, hashed.hash_generator(trial, 0, 0))
        lpt = float(torch.zeros(3, dtype=torch.float64).index_add_(0, table, counts.double()).max())
        assign = np.array(list(itertools.product(range(3), repeat=9)))  # (3^9, 9)
        loads = np.stack([(counts.numpy() * (assign == e)).sum(1) for e in range(3)], 1)
        best = loads.max(1).min()
        assert best <= lpt <= 4 / 3 * best + 1e-9


def true_counts(train_txt, tmp_path):
    """(Dictionary as fairseq-train loads it, its dict.txt counts, the true counts of the
    binarised train split): fairseq's own Dictionary over the text, every line + </s>."""
    from fairseq.data import Dictionary
    from fairseq.tokenizer import tokenize_line

    d = Dictionary()
    Dictionary.add_file_to_dictionary(str(train_txt), d, tokenize_line, 1)
    d.finalize(threshold=-1, nwords=-1, padding_factor=8)
    d.save(str(tmp_path / "dict.txt"))
    loaded = Dictionary.load(str(tmp_path / "dict.txt"))
    true = torch.zeros(len(loaded), dtype=torch.long)
    with open(train_txt) as f:
        for line in f:
            for w in line.split():
                true[loaded.index(w)] += 1
            true[loaded.eos()] += 1
    return loaded, torch.tensor(loaded.count, dtype=torch.long), true


def routed_load(train_txt, d, table, experts, eos_mode):
    """Slow reference: walk the training text token by token (</s> at every line end) and
    add one to the expert the table gives each routed token."""
    load = torch.zeros(experts, dtype=torch.float64)
    with open(train_txt) as f:
        for line in f:
            ids = [d.index(w) for w in line.split()]
            for x in ids:
                load[table[x]] += 1
            last = ids[-1] if ids else d.eos()
            load[table[last] if eos_mode == "previous" else table[d.eos()]] += 1
    return load


_COUNTS = {}  # train.txt -> true_counts(...), shared by the parametrised cases


def check_balanced_loads(text_dir, tmp_path, experts):
    """Balanced tables packed from the train split's true counts, routed over the text:
    max/mean <= 1.05, except that with </s> on its own entry no table beats the largest
    single count (</s> is 1.7% of the synthetic corpus, above the mean load for E = 64)."""
    train = os.path.join(text_dir, "train.txt")
    if train not in _COUNTS:
        _COUNTS[train] = true_counts(train, tmp_path)
    d, _, counts = _COUNTS[train]
    for mode in ("table", "previous"):
        voc = VocabInfo(size=len(d), pad=d.pad(), eos=d.eos(), counts_V=counts, counts_source="train split")
        table = make("balanced", moe_expert_count=experts, voc=voc, hash_balanced_eos=mode).table_VN[:, 0]
        load = routed_load(train, d, table, experts, mode)
        assert float(load.sum()) == float(counts.sum())
        limit = max(1.05 * float(load.mean()), float(counts.max()) if mode == "table" else 0.0)
        assert float(load.max()) <= limit, mode


def synthetic(tmp_path, *args):
    out = tmp_path / "syn"
    subprocess.run([sys.executable, os.path.join(ROOT, "data-prep", "synthetic.py"), "--out", str(out), *args],
                   check=True, capture_output=True)
    return str(out)


@pytest.mark.parametrize("experts", [4, 8, 16])
def test_balanced_table_load_small_synthetic_dictionary(tmp_path_factory, experts):
    """Default synthetic config (vocabulary, domains, Zipf shape) with fewer training tokens."""
    check_balanced_loads(_small_syn(tmp_path_factory), tmp_path_factory.mktemp("d"), experts)


_SMALL = {}


def _small_syn(tmp_path_factory):
    if "dir" not in _SMALL:
        _SMALL["dir"] = synthetic(tmp_path_factory.mktemp("syn"), "--train-tokens", "300000",
                                  "--valid-tokens", "1000", "--test-tokens", "1000")
    return _SMALL["dir"]


@pytest.mark.slow
@pytest.mark.parametrize("experts", [4, 8, 16, 64])
def test_balanced_table_load_default_synthetic_dictionary(tmp_path_factory, experts):
    """The default synthetic corpus (python data-prep/synthetic.py --out DIR)."""
    if "default" not in _SMALL:
        _SMALL["default"] = synthetic(tmp_path_factory.mktemp("syndef"))
    check_balanced_loads(_SMALL["default"], tmp_path_factory.mktemp("d"), experts)


# ---------------------------------------------------------------------------------------
# Tables from files, oracle refusal, options
# ---------------------------------------------------------------------------------------


def test_table_file_is_used_and_a_loaded_state_dict_never_reads_it(tmp_path):
    path, table = table_file(tmp_path, multi=2)
    r = make("dispersed", tmp_path, hash_table=path, hash_multi=2)
    ids = batch()
    want = r(torch.randn(21, D), tokens=token_info(ids)).expert_ids_TK
    assert torch.equal(r.table_VN, table)  # read at the first forward
    assert torch.equal(make("dispersed", tmp_path, hash_table=path, hash_multi=2).state_dict()["table_VN"], table)
    # a model rebuilt where the file is gone refuses to route until a state_dict brings the table
    os.remove(path)
    r2 = make("dispersed", tmp_path, hash_table=path, hash_multi=2)
    with pytest.raises(ValueError, match="--hash-table: .* does not exist, and no checkpoint supplied"):
        r2(torch.randn(21, D), tokens=token_info(ids))
    r2.load_state_dict(r.state_dict())
    assert torch.equal(r2(torch.randn(21, D), tokens=token_info(ids)).expert_ids_TK, want)
    # ... and one loaded from a state_dict never reads the file at the path, even an unreadable one
    with open(path, "w") as f:
        f.write("not a table\n")
    r3 = make("dispersed", tmp_path, hash_table=path, hash_multi=2)
    r3.load_state_dict(r.state_dict())
    assert torch.equal(r3(torch.randn(21, D), tokens=token_info(ids)).expert_ids_TK, want)


@pytest.mark.parametrize("shape,experts,match", [((V + 1, 1), E, r"\(61, 1\) table"), ((V, 2), E, "--hash-multi"),
                                                 ((V, 1), E + 3, r"allowed: 0\.\.3")])
def test_bad_table_files_are_refused_at_first_use(tmp_path, shape, experts, match):
    path = tmp_path / "bad.txt"
    hashed.write_table_file(str(path), torch.randint(experts, shape), "")
    r = make("clustered", tmp_path, hash_table=str(path))
    with pytest.raises(ValueError, match=match):
        r(torch.randn(21, D), tokens=token_info(batch()))


def test_oracle_refuses_inference(tmp_path):
    r = make("oracle")
    ids = batch()
    tok = token_info(ids)
    r(torch.randn(21, D), tokens=tok)  # training and validation: the next token is known
    inc = TokenInfo(ids_T=tok.ids_T[:3], prev_ids_T=tok.prev_ids_T[:3], positions_T=tok.positions_T[:3],
                    pad_mask_T=tok.pad_mask_T[:3], next_ids_T=None, incremental=True)
    with pytest.raises(ValueError, match="oracle.*incremental decoding"):
        r(torch.randn(3, D), tokens=inc)
    with pytest.raises(ValueError, match="oracle.*prepared for inference"):
        r.make_generation_fast_(name="x")
    with pytest.raises(ValueError, match="oracle"):
        r(torch.randn(21, D), tokens=tok)
    make("random").make_generation_fast_()  # the other types accept inference


@pytest.mark.parametrize("kw,option", [
    ({"hash_type": "md5"}, "--hash-type"),
    ({"moe_top_k": 2}, "--moe-top-k"),
    ({"hash_multi": 0}, "--hash-multi"),
    ({"hash_multi": 2, "moe_expert_parallel": True}, "--hash-multi"),
    ({"hash_type": "clustered"}, "--hash-table"),
    ({"hash_table": "x.txt"}, "--hash-table"),
    ({"hash_bigram_prime": 12}, "--hash-bigram-prime"),
    ({"hash_balanced_eos": "drop"}, "--hash-balanced-eos"),
])
def test_bad_options(kw, option):
    cfg = router_cfg("hash", **kw)
    with pytest.raises(ValueError, match=option):
        config.validate(cfg)


def test_balanced_needs_counts():
    with pytest.raises(ValueError, match="balanced"):
        make("balanced", voc=VocabInfo(size=V, pad=PAD, eos=EOS, counts_V=None))


def test_stats_shares():
    r = make("random", moe_expert_count=4)
    ids = batch(pad_tail=3)
    st = r(torch.randn(21, D), tokens=token_info(ids)).stats
    shares = torch.stack([st[f"share_e{e}"] for e in range(4)])
    assert float(shares.sum()) == pytest.approx(1.0)
    torch.testing.assert_close(shares, st["tokens_per_expert"].double() / 18)
    assert float(st["share_max"]) == float(shares.max()) and float(st["share_min"]) == float(shares.min())
    big = make("random", moe_expert_count=32)(torch.randn(21, D), tokens=token_info(ids)).stats
    assert "share_e0" not in big and "share_max" in big


# ---------------------------------------------------------------------------------------
# The expert computation against slow references
# ---------------------------------------------------------------------------------------


def layer_for(hash_type, multi=1, ffn=12, tmp_path=None, act="relu", norm=False):
    kw = {"hash_multi": multi, "hash_expert_norm": norm}
    if hash_type in ("clustered", "dispersed"):
        kw["hash_table"], _ = table_file(tmp_path, multi=multi)
    cfg = router_cfg("hash", hash_type=hash_type, moe_expert_count=E, **kw)
    config.validate(cfg)
    torch.manual_seed(0)
    return build_moe_layer(cfg, D, ffn, activation=act, vocab=vocab(), layer_index=0)


def per_bucket_reference(x_TD, ids_T, bank):
    """Gather the rows of each expert, run its FFN with F.linear, scatter back (pads: 0)."""
    out = torch.zeros_like(x_TD)
    for e in range(bank.num_experts):
        rows = (ids_T == e).nonzero().squeeze(1)
        h = bank.activation(F.linear(x_TD[rows], bank.w1_EDF[e].t(), bank.b1_EF[e]))
        out = out.index_put((rows,), F.linear(h, bank.w2_EFD[e].t(), bank.b2_ED[e]))
    return out


@pytest.mark.parametrize("hash_type", ["random", "balanced", "bigram", "position", "previous", "oracle", "clustered"])
def test_hash_layer_equals_per_bucket_loop(hash_type, tmp_path):
    layer = layer_for(hash_type, tmp_path=tmp_path)
    assert type(layer) is MoELayer and type(layer.experts) is ExpertBank and layer.expert_norm is None
    ids = batch(pad_tail=2)
    tok = token_info(ids)
    x = torch.randn(21, D, requires_grad=True)
    y = layer(x, tokens=tok)
    ids_T = layer.router(x, tokens=tok).expert_ids_TK[:, 0]
    assert (ids_T[tok.pad_mask_T] == DROPPED).all()
    x2 = x.detach().clone().requires_grad_(True)
    ref = per_bucket_reference(x2, ids_T, layer.experts)
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x] + list(layer.experts.parameters()), g)
    ref_grads = torch.autograd.grad(ref, [x2] + list(layer.experts.parameters()), g)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


def multihash_reference(x_TD, ids_TN, bank):
    """The MultiHash equations token by token (hashed.py docstring)."""
    T, Dm = x_TD.shape
    N = ids_TN.shape[1]
    sF, sD = bank.ffn_dim // N, Dm // N
    rows = []
    for t in range(T):
        if ids_TN[t, 0] < 0:
            rows.append(torch.zeros(Dm))
            continue
        ks = [int(k) for k in ids_TN[t]]
        h = torch.cat([x_TD[t] @ bank.w1_EDF[k][:, i * sF:(i + 1) * sF] + bank.b1_EF[k][i * sF:(i + 1) * sF]
                       for i, k in enumerate(ks)])
        h = bank.activation(h)
        rows.append(torch.cat([h @ bank.w2_EFD[k][:, i * sD:(i + 1) * sD] + bank.b2_ED[k][i * sD:(i + 1) * sD]
                               for i, k in enumerate(ks)]))
    return torch.stack(rows)


@pytest.mark.parametrize("hash_type,multi,act", [("random", 2, "relu"), ("balanced", 4, "gelu"), ("bigram", 2, "relu"),
                                                 ("position", 4, "relu"), ("dispersed", 2, "relu")])
def test_multihash_equals_per_token_equations(hash_type, multi, act, tmp_path):
    layer = layer_for(hash_type, multi=multi, tmp_path=tmp_path, act=act)
    assert type(layer) is MoELayer and isinstance(layer.experts, SegmentedExpertBank)  # the router's declared variant
    ids = batch(pad_tail=2)
    tok = token_info(ids)
    x = torch.randn(21, D, requires_grad=True)
    y = layer(x, tokens=tok)
    ids_TN = layer.router(x, tokens=tok).expert_ids_TK
    assert ids_TN.shape == (21, multi)
    x2 = x.detach().clone().requires_grad_(True)
    ref = multihash_reference(x2, ids_TN, layer.experts)
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(y)
    params = list(layer.experts.parameters())
    for a, b in zip(torch.autograd.grad(y, [x] + params, g), torch.autograd.grad(ref, [x2] + params, g)):
        torch.testing.assert_close(a, b)
    st = layer.last_stats
    assert int(st["tokens_per_expert"].sum()) == multi * int(st["num_tokens"])


def test_multihash_with_one_hash_is_the_hash_layer():
    bank = ExpertBank(E, D, 12)
    x = torch.randn(21, D)
    ids = torch.randint(E, (21, 1))
    ids[-2:] = DROPPED
    from moe_plugin.dispatch import LocalDispatcher

    torch.testing.assert_close(segmented_ffn(x, ids, bank, LocalDispatcher(E), False),
                               per_bucket_reference(x, ids[:, 0], bank))


@pytest.mark.parametrize("multi", [1, 2])
def test_expert_norm_is_parlai_ln_of_x_plus_ffn(multi):
    """--hash-expert-norm: y_t = LN(x_t + FFN_k(t)(x_t)) with one LayerNorm shared by the
    experts (ParlAI HashLayerFFN), padding 0; written out with F.layer_norm per token."""
    layer = layer_for("random", multi=multi, norm=True)
    assert isinstance(layer.expert_norm, torch.nn.LayerNorm)
    assert isinstance(layer.experts, SegmentedExpertBank) == (multi > 1)
    with torch.no_grad():  # a non-trivial affine part, shared by every expert
        layer.expert_norm.weight.uniform_(0.5, 1.5)
        layer.expert_norm.bias.uniform_(-0.5, 0.5)
    ids = batch(pad_tail=2)
    tok = token_info(ids)
    x = torch.randn(21, D, requires_grad=True)
    y = layer(x, tokens=tok)
    ids_TN = layer.router(x, tokens=tok).expert_ids_TK
    x2 = x.detach().clone().requires_grad_(True)
    ffn = multihash_reference(x2, ids_TN, layer.experts) if multi > 1 else per_bucket_reference(
        x2, ids_TN[:, 0], layer.experts)
    ln = layer.expert_norm
    ref = torch.stack([torch.zeros(D) if ids_TN[t, 0] < 0 else
                       F.layer_norm(x2[t] + ffn[t], (D,), ln.weight, ln.bias, ln.eps) for t in range(21)])
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(y)
    params = [x] + list(layer.parameters())
    for a, b in zip(torch.autograd.grad(y, params, g), torch.autograd.grad(ref, [x2] + params[1:], g)):
        torch.testing.assert_close(a, b)
    plain = layer_for("random")  # off by default: the paper's plain FFN
    assert plain.expert_norm is None and type(plain.experts) is ExpertBank


def test_multihash_needs_divisible_dims():
    with pytest.raises(ValueError, match="--hash-multi"):
        layer_for("random", multi=3, ffn=12)  # 3 does not divide D = 8


# ---------------------------------------------------------------------------------------
# Through fairseq: placement default, incremental decoding == full forward
# ---------------------------------------------------------------------------------------

SMALL = ["--decoder-layers", "3", "--decoder-embed-dim", "16", "--decoder-ffn-embed-dim", "32",
         "--decoder-attention-heads", "2", "--decoder-input-dim", "16", "--decoder-output-dim", "16",
         "--tokens-per-sample", "16", "--dropout", "0"]


def build_fairseq(data_bin, *extra):
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(
        parser, [data_bin, "--task", "language_modeling", "--user-dir", USER_DIR, "--arch", "hash_lm", "--cpu",
                 "--criterion", "moe_cross_entropy", *SMALL, *map(str, extra)])
    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    torch.manual_seed(0)
    return task, task.build_model(cfg.model)


def test_missing_table_file_is_refused_when_the_command_line_is_parsed(tiny_corpus, tmp_path):
    """fairseq-train's parse (before any data is loaded or model built) refuses a missing
    --hash-table with one line naming it; a file that exists passes."""
    _, data_bin = tiny_corpus
    missing = str(tmp_path / "nonexistent.tsv")
    with pytest.raises(ValueError) as err:
        options.parse_args_and_arch(options.get_training_parser(), [
            data_bin, "--task", "language_modeling", "--user-dir", USER_DIR, "--arch", "hash_lm",
            "--hash-type", "clustered", "--hash-table", missing])
    assert str(err.value).startswith(f"--hash-table: {missing!r} does not exist; allowed: an existing file")
    path, _ = table_file(tmp_path)
    options.parse_args_and_arch(options.get_training_parser(), [
        data_bin, "--task", "language_modeling", "--user-dir", USER_DIR, "--arch", "hash_lm",
        "--hash-type", "clustered", "--hash-table", path])


def test_model_saved_before_a_forward_carries_the_table_and_loading_never_reads_the_file(tiny_corpus, tmp_path):
    _, data_bin = tiny_corpus
    n_vocab = sum(1 for _ in open(os.path.join(data_bin, "dict.txt"))) + 4
    path, table = table_file(tmp_path, size=n_vocab, experts=4)
    flags = ["--hash-type", "clustered", "--moe-expert-count", 4]
    _, model = build_fairseq(data_bin, *flags, "--hash-table", path)
    state = model.state_dict()  # no forward yet: the table is read for the save, before its checksum
    garbage = tmp_path / "garbage.txt"
    garbage.write_text("not a table\n")
    _, other = build_fairseq(data_bin, *flags, "--hash-table", str(garbage))
    other.load_state_dict(state)  # fairseq's load: the layout's checksums are verified
    ((_, layer),) = other.moe_layers()
    assert torch.equal(layer.router.table_VN, table) and not layer.router._table_pending


def test_default_placement_is_one_layer(tiny_corpus):
    from argparse import Namespace

    # one MoE layer at floor(7 L / 11): the authors' layer 7 of 11; --moe-freq wins when given
    for layers, want in [(11, "7"), (2, "1"), (4, "2"), (12, "7"), (24, "15"), (None, "3")]:
        assert hashed._default_moe_layers(Namespace(decoder_layers=layers, moe_freq=None)) == want
    assert hashed._default_moe_layers(Namespace(decoder_layers=4, moe_freq=1)) is None
    _, data_bin = tiny_corpus
    _, model = build_fairseq(data_bin)
    assert [i for i, _ in model.moe_layers()] == [1]  # 3 layers
    _, model = build_fairseq(data_bin, "--moe-layers", "0,2")
    assert [i for i, _ in model.moe_layers()] == [0, 2]
    # several layers draw different random tables
    t0, t2 = (layer.router.table_VN for _, layer in model.moe_layers())
    assert not torch.equal(t0, t2)


# every type allowed in generation once; MultiHash on about half of them
@pytest.mark.parametrize("hash_type,multi", [("random", 1), ("balanced", 2), ("bigram", 2), ("previous", 1),
                                             ("position", 2), ("clustered", 1), ("dispersed", 2)])
def test_incremental_decoding_equals_full_forward(tiny_corpus, tmp_path, hash_type, multi):
    _, data_bin = tiny_corpus
    n_vocab = sum(1 for _ in open(os.path.join(data_bin, "dict.txt"))) + 4
    extra = ["--hash-type", hash_type, "--hash-multi", multi, "--moe-layers", "0,2", "--moe-expert-count", 4]
    if hash_type in ("clustered", "dispersed"):
        path, _ = table_file(tmp_path, size=n_vocab, experts=4, multi=multi)
        extra += ["--hash-table", path]
    task, model = build_fairseq(data_bin, *extra)
    model.eval()
    g = torch.Generator().manual_seed(0)
    src = torch.randint(4, len(task.dictionary), (3, 12), generator=g)
    src[1, 5] = task.dictionary.eos()  # </s> inside a sequence (balanced routes it by the previous token)
    with torch.no_grad():
        full = model(src)[0]
        routed_full = [layer.router(torch.zeros(src.numel(), 16), tokens=_tokens(src, task)).expert_ids_TK
                       for _, layer in model.moe_layers()]
        state = {}
        steps = []
        routed_steps = [[] for _ in model.moe_layers()]
        for t in range(src.shape[1]):
            steps.append(model.decoder(src[:, : t + 1], incremental_state=state)[0])
            for j, (_, layer) in enumerate(model.moe_layers()):
                routed_steps[j].append(layer.last_stats["tokens_per_expert"])
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    # the per-step loads add up to the full forward's load in every MoE layer
    for j, ids in enumerate(routed_full):
        assert torch.equal(torch.stack(routed_steps[j]).sum(0),
                           torch.bincount(ids[ids >= 0], minlength=4))


def _tokens(src, task):
    return token_info(src, pad=task.dictionary.pad())


def test_seed_through_fairseq_follows_seed_unless_hash_seed(tiny_corpus):
    """Inside fairseq the tables follow --seed (moe_seed); --hash-seed fixes them."""
    _, data_bin = tiny_corpus

    def table(*extra):
        _, model = build_fairseq(data_bin, "--moe-layers", "1", *extra)
        ((_, layer),) = model.moe_layers()
        return layer.router.seed, layer.router.table_VN

    seed3, t3 = table("--seed", 3)
    assert seed3 == 3 and torch.equal(t3[:, 0], hashed.random_table(t3.shape[0], 8, hashed.hash_generator(3, 1, 0)))
    assert torch.equal(t3, table("--seed", 3)[1])
    assert not torch.equal(t3, table("--seed", 4)[1])
    s9, t9 = table("--seed", 3, "--hash-seed", 9)
    assert s9 == 9 and torch.equal(t9, table("--seed", 4, "--hash-seed", 9)[1]) and not torch.equal(t9, t3)


# ---------------------------------------------------------------------------------------
# Balanced: token counts from the binarised training split
# ---------------------------------------------------------------------------------------


def fairseq_item_counts(prefix, size):
    """Reference: fairseq's own dataset reader, item by item, for every shard (prefix, prefix1...)."""
    from fairseq.data import data_utils

    ds = data_utils.load_indexed_dataset(prefix, None, None, combine=True)
    counts = torch.zeros(size, dtype=torch.long)
    for i in range(len(ds)):
        counts += torch.bincount(ds[i].long(), minlength=size)
    return counts


def test_count_split_equals_fairseq_items_with_shards_and_paths(tiny_corpus, tmp_path, monkeypatch):
    import shutil
    from fairseq.data import Dictionary

    from moe_plugin.models import token_counts

    text_dir, data_bin = tiny_corpus
    size = len(Dictionary.load(os.path.join(data_bin, "dict.txt")))
    want = fairseq_item_counts(os.path.join(data_bin, "train"), size)
    counts, shards = token_counts.count_split(os.path.join(data_bin, "train"), size)
    assert shards == 1 and torch.equal(torch.from_numpy(counts), want)
    assert want[2] > 100  # </s> at its true count (one per line), not dict.txt's 1
    # the chunked path (a small chunk) and the item-by-item path (fairseq's raw text dataset) agree
    monkeypatch.setattr(token_counts, "CHUNK", 1000)
    assert torch.equal(torch.from_numpy(token_counts.count_split(os.path.join(data_bin, "train"), size)[0]), want)
    raw = tmp_path / "raw"
    raw.mkdir()
    shutil.copy(os.path.join(text_dir, "train.txt"), raw / "train")
    d = Dictionary.load(os.path.join(data_bin, "dict.txt"))
    counts, _ = token_counts.count_split(str(raw / "train"), size, "raw", d)
    assert torch.equal(torch.from_numpy(counts), want)
    # a second shard (train1) and a second data path (a:b) are both counted, as fairseq trains on them
    other = tmp_path / "other"
    other.mkdir()
    for name in ("dict.txt", "train.bin", "train.idx"):
        shutil.copy(os.path.join(data_bin, name), other / name)
    for ext in ("bin", "idx"):
        shutil.copy(os.path.join(data_bin, f"train.{ext}"), other / f"train1.{ext}")
    counts, shards = token_counts.count_split(str(other / "train"), size)
    assert shards == 2 and torch.equal(torch.from_numpy(counts), 2 * want)
    task, _ = build_fairseq(f"{data_bin}:{other}", "--hash-type", "balanced")
    assert torch.equal(token_counts.training_token_counts(task, "train", size), 3 * want)
    with pytest.raises(ValueError, match="outside the dictionary"):
        token_counts.count_split(os.path.join(data_bin, "train"), 5)


def test_counts_are_read_only_for_balanced_and_fall_back_to_dict_with_a_warning(tiny_corpus, tmp_path, caplog):
    import logging
    import shutil

    _, data_bin = tiny_corpus
    with caplog.at_level(logging.INFO, logger="moe_plugin.models.token_counts"):
        _, model = build_fairseq(data_bin, "--hash-type", "balanced")
        ((_, layer),) = model.moe_layers()
        assert layer.router.counts_source == "train split"
        assert any("token counts:" in r.getMessage() for r in caplog.records)
        caplog.clear()
        build_fairseq(data_bin, "--hash-type", "random")  # other types never read the corpus
        build_fairseq(data_bin, "--hash-type", "bigram")
        assert not [r for r in caplog.records if r.name.startswith("moe_plugin")]
        # no training split (e.g. evaluation on another machine): dict.txt counts, a warning
        bare = tmp_path / "bare"
        bare.mkdir()
        for name in ("dict.txt", "valid.bin", "valid.idx"):
            shutil.copy(os.path.join(data_bin, name), bare / name)
        _, model = build_fairseq(str(bare), "--hash-type", "balanced")
    ((_, layer),) = model.moe_layers()
    assert layer.router.counts_source == "dict.txt"
    assert any(r.levelno == logging.WARNING and "no training split" in r.getMessage() for r in caplog.records)


def unk_corpus(tmp_path, unk_frac=0.11, lines=700, seed=0):
    """Text in which ``unk_frac`` of the words occur once each (fairseq-preprocess
    --thresholdsrc 2 maps them to <unk>), the rest from 150 words of similar frequency."""
    rng = np.random.default_rng(seed)
    common = [f"w{i}" for i in range(150)]
    weights = rng.uniform(0.5, 1.5, len(common))
    weights /= weights.sum()
    rare = 0
    out = []
    for _ in range(lines):
        words = []
        for _ in range(int(rng.integers(20, 32))):
            if rng.random() < unk_frac:
                words.append(f"rare{rare}")
                rare += 1
            else:
                words.append(common[rng.choice(len(common), p=weights)])
        out.append(" ".join(words))
    text = tmp_path / "text"
    text.mkdir()
    (text / "train.txt").write_text("\n".join(out[:-50]) + "\n")
    (text / "valid.txt").write_text("\n".join(out[-50:]) + "\n")
    data_bin = tmp_path / "data-bin"
    from tests.conftest import run_cli

    run_cli("preprocess", "--only-source", "--trainpref", text / "train.txt", "--validpref", text / "valid.txt",
            "--destdir", data_bin, "--thresholdsrc", "2", "--workers", "1")
    return str(data_bin)


def test_balanced_with_many_unk_meets_the_lpt_bounds(tmp_path):
    """11% of the training tokens are <unk>. With the training split's counts the routed
    load of the training split obeys LPT's bounds: max <= mean + c_max and
    <= 4/3 * max(mean, c_max) (a lower bound of the optimum). The old dict.txt counts
    (<unk> and </s> at count 1) break the second: the test can fail."""
    E = 8
    data_bin = unk_corpus(tmp_path)
    task, model = build_fairseq(data_bin, "--hash-type", "balanced", "--moe-expert-count", E)
    ((_, layer),) = model.moe_layers()
    router = layer.router
    assert router.counts_source == "train split"
    # route the training split exactly as training feeds it (the LM task's decoder inputs)
    task.load_dataset("train")
    ds = task.dataset("train")
    src = torch.cat([ds[i]["source"] for i in range(len(ds))]).unsqueeze(0)
    c = torch.bincount(src[0], minlength=len(task.dictionary)).double()
    unk = task.dictionary.unk()
    assert 0.09 < c[unk] / c.sum() < 0.13  # the corpus is what it claims
    mean, c_max = c.sum() / E, c.max()

    def load(r):
        return r(torch.zeros(src.shape[1], 16), tokens=token_info(src, pad=task.dictionary.pad())).stats[
            "tokens_per_expert"].double()

    slack = 2  # the decoder input is the split shifted by one token per block stream
    got = load(router).max()
    assert got <= mean + c_max + slack
    assert got <= 4 / 3 * max(mean, c_max) + slack
    d = task.dictionary
    dict_counts = torch.tensor(d.count, dtype=torch.long)
    assert dict_counts[unk] == 1  # what dict.txt gives
    voc = VocabInfo(size=len(d), pad=d.pad(), eos=d.eos(), counts_V=dict_counts)
    for eos_mode in ("previous", "table"):  # the old default, and the fallback
        cfg = router_cfg("hash", hash_type="balanced", moe_expert_count=E, hash_balanced_eos=eos_mode)
        old = load(build_router(cfg, 16, vocab=voc, layer_index=1)).max()
        assert old > 4 / 3 * max(mean, c_max) + slack, eos_mode

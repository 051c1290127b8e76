"""The top-K schedule of hyper/smoe_dropout: values at start, middle and end of every mode
(hand-computed), properties over random ranges, the authors' exponential curve, the router
following fairseq's update count, and the K surviving a state_dict round trip.
(Resuming fairseq-train from checkpoint_last: tests/test_hyper_lm_e2e.py.)"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_plugin import config
from moe_plugin.routing import build_router
from moe_plugin.routing._topk import SCHEDULES, scheduled_top_k
from tests.helpers import router_cfg

D = 8

# (mode, k_min, k_max, updates, num_updates, expected); expected values worked by hand:
HAND = [
    # linear: k_min + round_half_up((k_max - k_min) * n / S)
    ("linear", 1, 16, 100, 0, 1),
    ("linear", 1, 16, 100, 10, 3),  # 1 + round(1.5) = 3
    ("linear", 1, 16, 100, 50, 9),  # 1 + round(7.5) = 9
    ("linear", 8, 16, 100, 50, 12),  # the paper's 8 -> 16: 8 + 4
    ("linear", 1, 16, 100, 100, 16),
    ("linear", 1, 16, 100, 1000, 16),  # stays at k_max after the schedule
    # cosine: k_min + round((k_max - k_min)(1 - cos(pi p / 2))); 1 - cos(pi/4) = 0.29289
    ("cosine", 8, 16, 100, 0, 8),
    ("cosine", 8, 16, 100, 50, 10),  # 8 + round(2.343)
    ("cosine", 1, 16, 100, 50, 5),  # 1 + round(4.393)
    ("cosine", 8, 16, 100, 100, 16),
    # exponential: k_min + round((k_max - k_min)(1 - e^{-r p}) / (1 - e^{-r})), r = 300 ln(1/0.99) = 3.0151;
    # p = 0.5: (1 - 0.22145) / (1 - 0.04904) = 0.81870
    ("exponential", 1, 16, 100, 0, 1),
    ("exponential", 1, 16, 100, 50, 13),  # 1 + round(12.28)
    ("exponential", 8, 16, 100, 50, 15),  # 8 + round(6.55)
    ("exponential", 1, 16, 100, 100, 16),
    # multistep: doubling stages of equal length: 1,2,4,8,16 -> 20 updates each
    ("multistep", 1, 16, 100, 0, 1),
    ("multistep", 1, 16, 100, 19, 1),
    ("multistep", 1, 16, 100, 20, 2),
    ("multistep", 1, 16, 100, 50, 4),
    ("multistep", 1, 16, 100, 79, 8),
    ("multistep", 1, 16, 100, 80, 16),
    ("multistep", 1, 16, 100, 100, 16),
    ("multistep", 2, 12, 100, 50, 8),  # stages 2,4,8,12 of 25 updates
    ("multistep", 2, 12, 100, 75, 12),
    ("multistep", 4, 4, 10, 5, 4),
]


@pytest.mark.parametrize("mode,k_min,k_max,S,n,want", HAND)
def test_schedule_values_by_hand(mode, k_min, k_max, S, n, want):
    assert scheduled_top_k(mode, k_min, k_max, S, n) == want


def test_exponential_follows_the_authors_curve():
    # reference (HyperRouter new_utils.py, exp_increase): K = max - (max - min) * 0.99 ** (n // (S // 300));
    # ours is the same curve without the staircase, normalised to end at k_max: it differs by at most
    # rounding (0.5) + (k_max - k_min) * (1/(1 - 0.99**300) - 1) = 15 * 0.0516 = 0.77.
    k_min, k_max, S = 1, 16, 30_000
    for n in range(0, S + 1, 250):
        ref = k_max - (k_max - k_min) * 0.99 ** (n // (S // 300))
        assert abs(scheduled_top_k("exponential", k_min, k_max, S, n) - ref) <= 0.5 + 0.78, n


@settings(max_examples=60, deadline=None)
@given(mode=st.sampled_from([m for m in SCHEDULES if m != "none"]), k_min=st.integers(1, 40),
       extra=st.integers(0, 40), S=st.integers(1, 500))
def test_schedule_properties(mode, k_min, extra, S):
    k_max = k_min + extra
    ks = [scheduled_top_k(mode, k_min, k_max, S, n) for n in range(0, S + 3)]
    assert ks[0] == k_min and ks[S] == k_max and ks[-1] == k_max
    assert all(k_min <= k <= k_max for k in ks)
    assert all(a <= b for a, b in zip(ks, ks[1:]))  # never decreases


def make(**kw):
    kw.setdefault("moe_expert_count", 8)
    cfg = router_cfg("hyper", **kw)
    config.validate(cfg)
    return build_router(cfg, D, layer_index=0)


@pytest.mark.parametrize("mode", [m for m in SCHEDULES if m != "none"])
def test_router_follows_the_update_count(mode):
    r = make(moe_top_k_schedule=mode, moe_top_k_min=1, moe_top_k_max=8, moe_top_k_schedule_updates=40).train()
    x = torch.randn(10, D)
    for n in (0, 7, 20, 33, 40, 90):
        r.set_num_updates(n)
        want = scheduled_top_k(mode, 1, 8, 40, n)
        assert r.top_k == want and int(r.num_updates) == n
        assert r(x).expert_ids_TK.shape == (10, want)
    # evaluation: the training K reached, unless --moe-eval-top-k overrides it
    r.set_num_updates(20)
    assert r.eval().top_k == scheduled_top_k(mode, 1, 8, 40, 20)
    r.eval_top_k = 3
    assert r.top_k == 3 and r.train().top_k == scheduled_top_k(mode, 1, 8, 40, 20)


def test_no_schedule_uses_moe_top_k_and_max_zero_means_all_experts():
    r = make(moe_top_k=3)
    r.set_num_updates(1000)
    assert r.top_k == 3
    r = make(moe_top_k_schedule="linear", moe_top_k_min=2, moe_top_k_max=0, moe_top_k_schedule_updates=10)
    r.set_num_updates(10)
    assert r.top_k == 8


def test_update_count_survives_a_state_dict_round_trip():
    kw = dict(moe_top_k_schedule="linear", moe_top_k_min=1, moe_top_k_max=6, moe_top_k_schedule_updates=60)
    a = make(**kw).train()
    a.set_num_updates(37)  # K = 1 + round(5 * 37/60) = 1 + round(3.08) = 4
    assert a.top_k == 4
    b = make(**kw).train()
    assert b.top_k == 1
    b.load_state_dict(a.state_dict())
    assert b.top_k == 4 and int(b.num_updates) == 37
    x = torch.randn(9, D)
    oa, ob = a(x), b(x)
    assert torch.equal(oa.expert_ids_TK, ob.expert_ids_TK) and torch.equal(oa.weights_TK, ob.weights_TK)


def test_fairseq_model_set_num_updates_reaches_every_router(tiny_corpus):
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    from tests.conftest import TINY_MODEL, USER_DIR

    _, data_bin = tiny_corpus
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, [
        data_bin, "--task", "language_modeling", "--user-dir", USER_DIR, "--arch", "smoe_dropout_lm", "--cpu",
        "--criterion", "moe_cross_entropy", *TINY_MODEL, "--moe-layers", "0,1", "--moe-expert-count", "4",
        "--moe-top-k-schedule", "multistep", "--moe-top-k-min", "1", "--moe-top-k-schedule-updates", "30"])
    cfg = convert_namespace_to_omegaconf(args)
    model = tasks.setup_task(cfg.task).build_model(cfg.model)
    routers = [layer.router for _, layer in model.moe_layers()]
    assert len(routers) == 2
    model.set_num_updates(12)  # what FairseqTask.train_step does before every forward
    # stages 1, 2, 4 (k_max 0 = E = 4), 10 updates each
    assert [r.top_k for r in routers] == [2, 2]
    assert [int(r.num_updates) for r in routers] == [12, 12]


@pytest.mark.parametrize("kw,match", [
    (dict(moe_top_k_schedule="sqrt"), "--moe-top-k-schedule: 'sqrt'"),
    (dict(moe_top_k_schedule="linear", moe_top_k_schedule_updates=0), "--moe-top-k-schedule-updates: 0"),
    (dict(moe_top_k_schedule="linear", moe_top_k_schedule_updates=5, moe_top_k_min=0), "--moe-top-k-min: 0"),
    (dict(moe_top_k_schedule="linear", moe_top_k_schedule_updates=5, moe_top_k_min=4, moe_top_k_max=2),
     "--moe-top-k-max: 2"),
    (dict(moe_top_k_schedule="cosine", moe_top_k_schedule_updates=5, moe_top_k_max=9), "--moe-top-k-max: 9"),
    (dict(moe_eval_top_k=9), "--moe-eval-top-k: 9"),
    (dict(moe_eval_top_k=-1), "--moe-eval-top-k: -1"),
])
@pytest.mark.parametrize("router", ["hyper", "smoe_dropout"])
def test_bad_schedule_options_raise(router, kw, match):
    cfg = router_cfg(router, moe_expert_count=8, **kw)
    with pytest.raises(ValueError, match=match.replace("(", r"\(")):
        config.validate(cfg)


def test_exp_rate_is_the_reference_decay():
    from moe_plugin.routing._topk import EXP_RATE

    assert math.exp(-EXP_RATE) == pytest.approx(0.99**300)

"""The top-K schedule of hyper/smoe_dropout/smoe against the reference's rule, step by step.

The reference is giangdip2410/HyperRouter ``new_utils.py`` ``calculate_gate_number(steps,
args, overall_steps, min_experts, max_experts)``, which ``train.py`` calls before every
update with ``steps`` = updates done (0, 1, ..., max_step - 1) and ``overall_steps`` =
``--dynamic_overall_steps``. :func:`reference_gate_number` below is a TRANSCRIPTION of that
function (numpy, Python's round, like the original), kept independent of
``moe_plugin.routing._topk``; the tests compare every step of several schedule lengths and
the K ranges the papers use. Plus: hand-computed values (round half to even, the exp
schedule that never reaches K_max, multi-step 8 -> 16 at K = 16 for the last 20%), what
happens where the reference crashes, the arch defaults (schedule over --max-update, K from
E/2 to E, evaluation at K = E), the router following fairseq's update count, and the count
surviving a state_dict round trip. (Resuming fairseq-train: tests/test_hyper_lm_e2e.py.)"""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_plugin import config
from moe_plugin.routing import build_router
from moe_plugin.routing._topk import SCHEDULES, scheduled_top_k
from tests.helpers import router_cfg

D = 8
MODES = [m for m in SCHEDULES if m != "none"]
#: the K ranges of the papers' scripts (8 -> 16 of 16 experts; 1/2 -> 16 for the other modes),
#: plus ranges with odd spans (round-half cases) and with E = 8
RANGES = [(1, 16), (2, 16), (8, 16), (4, 8), (1, 8), (2, 12), (3, 8), (5, 5)]


# --- TRANSCRIPTION of the reference (giangdip2410/HyperRouter new_utils.py) -------------------
def reference_gate_number(mode, steps, overall_steps, min_experts, max_experts):
    """calculate_gate_number as the reference writes it (``mode`` = args.dynamic_moe_mode).
    Raises where the original raises: ZeroDivisionError (exp_increase, overall_steps < 300),
    IndexError (multi_step_*, steps >= overall_steps)."""
    if mode == "linear_increase":
        number_experts = max_experts - min_experts
        gate_num = round(number_experts * steps / overall_steps) + min_experts
    elif mode == "linear_decrease":
        number_experts = min_experts - max_experts
        gate_num = round(number_experts * steps / overall_steps) + max_experts
    elif mode == "cosine_decrease":
        number_experts = max_experts - min_experts
        cosine_value = np.cos(np.pi * steps / (2 * overall_steps))
        gate_num = round(number_experts * cosine_value) + min_experts
    elif mode == "cosine_increase":
        number_experts = min_experts - max_experts
        cosine_value = np.cos(np.pi * steps / (2 * overall_steps))
        gate_num = round(number_experts * cosine_value) + max_experts
    elif mode == "exp_increase":
        number_experts = min_experts - max_experts
        current_steps = steps // (overall_steps // 300)
        cosine_value = 0.99 ** current_steps
        gate_num = round(number_experts * cosine_value) + max_experts
    elif mode == "multi_step_increase":
        custom_gate_number = [1, 2, 4, 8, 16]
        gate_num = custom_gate_number[int(len(custom_gate_number) * steps / overall_steps)]
    elif mode == "multi_step_decrease":
        custom_gate_number = [16, 8, 4, 2, 1]
        gate_num = custom_gate_number[int(len(custom_gate_number) * steps / overall_steps)]
    return int(np.clip(gate_num, min_experts, max_experts))
# ----------------------------------------------------------------------------------------------


def sampled_steps(S):
    """Every 997th step of a long schedule plus the steps next to every point where some
    mode's K can change or round a half (fractions j / (2 * 16 * 5) of S, and the exp stages)."""
    steps = set(range(0, S, 997))
    for j in range(0, 161):
        c = S * j // 160
        steps.update({c - 1, c, c + 1})
    stage = S // 300
    for j in range(0, 301, 7):
        steps.update({j * stage - 1, j * stage})
    return sorted(n for n in steps if 0 <= n < S)


@pytest.mark.parametrize("S", [300, 301, 599, 1000, 400_000])
@pytest.mark.parametrize("mode", MODES)
def test_every_step_equals_the_reference(mode, S):
    steps = range(S) if S <= 1000 else sampled_steps(S)
    for k_min, k_max in RANGES:
        got = [scheduled_top_k(mode, k_min, k_max, S, n) for n in steps]
        want = [reference_gate_number(mode, n, S, k_min, k_max) for n in steps]
        if got != want:
            bad = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
            raise AssertionError(f"{mode} {k_min}->{k_max} S={S}: step {list(steps)[bad]}: {got[bad]} != {want[bad]}")


@pytest.mark.parametrize("mode", ["linear_increase", "linear_decrease", "cosine_increase", "cosine_decrease",
                                  "exp_increase"])
def test_after_the_schedule_where_the_reference_is_defined(mode):
    # steps S .. 3S: the reference's formula is defined (and clipped) for these modes; ours agrees
    S = 300
    for k_min, k_max in RANGES:
        for n in range(S, 3 * S + 1, 7):
            assert scheduled_top_k(mode, k_min, k_max, S, n) == reference_gate_number(mode, n, S, k_min, k_max), n


def test_where_the_reference_crashes_or_turns_back():
    # multi-step past its list: the reference raises IndexError; here K stays at the last stage
    with pytest.raises(IndexError):
        reference_gate_number("multi_step_increase", 100, 100, 8, 16)
    assert [scheduled_top_k("multi_step_increase", 8, 16, 100, n) for n in (100, 101, 10_000)] == [16, 16, 16]
    assert [scheduled_top_k("multi_step_decrease", 1, 16, 100, n) for n in (100, 555)] == [1, 1]
    # exp with fewer than 300 schedule updates: the reference divides by 299 // 300 = 0
    with pytest.raises(ZeroDivisionError):
        reference_gate_number("exp_increase", 5, 299, 8, 16)
    with pytest.raises(ValueError, match="--moe-top-k-schedule-updates: 299 .* exp_increase; allowed: >= 300"):
        scheduled_top_k("exp_increase", 8, 16, 299, 5)
    # cosine is periodic in the reference: at 4S it is back at K_min; here the count stops at S
    assert reference_gate_number("cosine_increase", 400, 100, 8, 16) == 8
    assert scheduled_top_k("cosine_increase", 8, 16, 100, 400) == 16
    assert reference_gate_number("cosine_decrease", 400, 100, 8, 16) == 16
    assert scheduled_top_k("cosine_decrease", 8, 16, 100, 400) == 8


# (mode, k_min, k_max, S, n, expected), worked by hand; round = half to even
HAND = [
    # linear_increase: k_min + round((k_max - k_min) n / S)
    ("linear_increase", 8, 16, 16, 1, 8),  # 8 * 1/16 = 0.5 -> 0 (half up would give 9)
    ("linear_increase", 8, 16, 16, 3, 10),  # 1.5 -> 2
    ("linear_increase", 8, 16, 16, 5, 10),  # 2.5 -> 2
    ("linear_increase", 8, 16, 16, 8, 12),
    ("linear_increase", 1, 4, 6, 5, 3),  # 2.5 -> 2
    ("linear_increase", 1, 16, 100, 100, 16),
    # linear_decrease: k_max + round((k_min - k_max) n / S)
    ("linear_decrease", 8, 16, 16, 1, 16),  # -0.5 -> 0
    ("linear_decrease", 8, 16, 16, 3, 14),  # -1.5 -> -2
    # cosine_increase: k_max + round((k_min - k_max) cos(pi n / 2S)); cos(pi/4) = 0.70711
    ("cosine_increase", 8, 16, 100, 50, 10),  # 16 + round(-5.657)
    ("cosine_increase", 1, 16, 100, 50, 5),  # 16 + round(-10.607)
    # n / S = 2/3: pi * 200 / 600 in float64 is 1.0471975511965979, just above pi/3, and its cos is
    # 0.4999999999999999, so 16 + round(-7.4999999999999982) = 9 (an exact 0.5 would give 16 - 8 = 8)
    ("cosine_increase", 1, 16, 300, 200, 9),
    # cosine_decrease: k_min + round((k_max - k_min) cos(pi n / 2S))
    ("cosine_decrease", 8, 16, 100, 50, 14),  # 8 + round(5.657)
    # exp_increase: k_max + round((k_min - k_max) 0.99 ** (n // (S // 300)))
    ("exp_increase", 8, 16, 300, 0, 8),
    ("exp_increase", 8, 16, 300, 69, 12),  # 0.99^69 = 0.4998: 16 + round(-3.999)
    ("exp_increase", 8, 16, 300, 100, 13),  # 0.99^100 = 0.3660: 16 + round(-2.928)
    ("exp_increase", 8, 16, 600, 139, 12),  # 139 // 2 = 69
    ("exp_increase", 1, 16, 300, 299, 15),  # 0.99^299 = 0.0495: 16 + round(-0.743): never 16 in the run
    ("exp_increase", 1, 16, 300, 1000, 16),  # 0.99^1000 = 4e-5
    # multi_step_increase: (1, 2, 4, 8, 16)[5 n // S] clipped to [k_min, k_max]
    ("multi_step_increase", 8, 16, 100, 79, 8),  # stages 1, 2, 4, 8 all clip to 8
    ("multi_step_increase", 8, 16, 100, 80, 16),  # K = 16 only for the last 20%
    ("multi_step_increase", 1, 16, 100, 19, 1),
    ("multi_step_increase", 1, 16, 100, 20, 2),
    ("multi_step_increase", 1, 16, 100, 60, 8),
    ("multi_step_increase", 4, 8, 100, 59, 4),
    ("multi_step_increase", 4, 8, 100, 60, 8),
    ("multi_step_increase", 1, 32, 100, 99, 16),  # the reference's list stops at 16
    # multi_step_decrease: (16, 8, 4, 2, 1)[5 n // S]
    ("multi_step_decrease", 1, 16, 100, 0, 16),
    ("multi_step_decrease", 1, 16, 100, 20, 8),
    ("multi_step_decrease", 1, 16, 100, 80, 1),
]


@pytest.mark.parametrize("mode,k_min,k_max,S,n,want", HAND)
def test_schedule_values_by_hand(mode, k_min, k_max, S, n, want):
    assert scheduled_top_k(mode, k_min, k_max, S, n) == want


@settings(max_examples=40, deadline=None)
@given(mode=st.sampled_from(MODES), k_min=st.integers(1, 40), extra=st.integers(0, 40), S=st.integers(300, 700))
def test_schedule_stays_in_range_and_is_monotone(mode, k_min, extra, S):
    k_max = k_min + extra
    ks = [scheduled_top_k(mode, k_min, k_max, S, n) for n in range(0, S + 3)]
    assert all(k_min <= k <= k_max for k in ks)
    pairs = list(zip(ks, ks[1:]))
    if mode.endswith("increase"):
        assert all(a <= b for a, b in pairs)
    else:
        assert all(a >= b for a, b in pairs)


def make(**kw):
    kw.setdefault("moe_expert_count", 8)
    cfg = router_cfg("hyper", **kw)
    config.validate(cfg)
    return build_router(cfg, D, layer_index=0)


@pytest.mark.parametrize("mode", MODES)
def test_router_follows_the_update_count(mode):
    r = make(moe_top_k_schedule=mode, moe_top_k_min=1, moe_top_k_max=8, moe_top_k_schedule_updates=400).train()
    x = torch.randn(10, D)
    for n in (0, 7, 150, 333, 399, 400, 900):
        r.set_num_updates(n)
        want = scheduled_top_k(mode, 1, 8, 400, n)
        assert r.top_k == want and int(r.num_updates) == n
        assert r(x).expert_ids_TK.shape == (10, want)
    # evaluation: all experts by default, the training K reached with 0, or a given K
    r.set_num_updates(150)
    assert r.eval().top_k == 8
    r.eval_top_k = 0
    assert r.top_k == scheduled_top_k(mode, 1, 8, 400, 150)
    r.eval_top_k = 3
    assert r.top_k == 3 and r.train().top_k == scheduled_top_k(mode, 1, 8, 400, 150)


def test_no_schedule_uses_moe_top_k_and_zero_range_means_half_to_all_experts():
    r = make(moe_top_k=3)
    r.set_num_updates(1000)
    assert r.top_k == 3
    r = make(moe_top_k_schedule="linear_increase", moe_top_k_schedule_updates=10)  # min 0, max 0, E = 8
    assert (r.k_min, r.k_max) == (4, 8)
    assert [r.train_top_k(n) for n in (0, 5, 10)] == [4, 6, 8]


def test_update_count_survives_a_state_dict_round_trip():
    kw = dict(moe_top_k_schedule="linear_increase", moe_top_k_min=1, moe_top_k_max=6, moe_top_k_schedule_updates=60)
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


# --- in fairseq: the arch defaults and the update count -----------------------------------------


def fairseq_cfg(data_bin, arch, *extra):
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    from tests.conftest import TINY_MODEL, USER_DIR

    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, [
        data_bin, "--task", "language_modeling", "--user-dir", USER_DIR, "--arch", arch, "--cpu",
        "--criterion", "moe_cross_entropy", *TINY_MODEL, *map(str, extra)])
    return convert_namespace_to_omegaconf(args)


def build_model(cfg):
    from fairseq import tasks

    return tasks.setup_task(cfg.task).build_model(cfg.model)


def test_fairseq_model_set_num_updates_reaches_every_router(tiny_corpus):
    cfg = fairseq_cfg(tiny_corpus[1], "smoe_dropout_lm", "--moe-expert-count", "4", "--moe-top-k-min", "1",
                      "--moe-top-k-schedule", "multi_step_increase", "--max-update", "30")
    model = build_model(cfg)
    routers = [layer.router for _, layer in model.moe_layers()]
    assert len(routers) == 2  # every layer (arch default --moe-freq 1)
    model.set_num_updates(12)  # what FairseqTask.train_step does before every forward
    # (1, 2, 4, 8, 16)[5 * 12 // 30 = 2] = 4, within [1, E = 4]
    assert [r.top_k for r in routers] == [4, 4]
    assert [int(r.num_updates) for r in routers] == [12, 12]


@pytest.mark.parametrize("arch", ["hyper_lm", "smoe_dropout_lm"])
def test_arch_defaults_are_the_reference_recipe(tiny_corpus, arch):
    # script/table1/transformer_xl/{hyper_router,smoe_dropout}_*.sh: 16 experts in every layer,
    # --moe-top-k 2, linear_increase from 8 to 16 over --dynamic_overall_steps = --max_step
    cfg = fairseq_cfg(tiny_corpus[1], arch, "--max-update", "50")
    m = cfg.model
    assert (m.moe_top_k_schedule, m.moe_top_k_schedule_updates, m.moe_expert_count, m.moe_top_k) == \
           ("linear_increase", 50, 16, 2)
    assert m.moe_capacity_factor == float("inf") and m.moe_eval_capacity_factor == float("inf")
    model = build_model(cfg)
    layers = model.moe_layers()
    assert [i for i, _ in layers] == [0, 1]
    r = layers[0][1].router
    assert (r.k_min, r.k_max) == (8, 16)
    ks = [r.train_top_k(n) for n in range(50)]
    assert ks == [reference_gate_number("linear_increase", n, 50, 8, 16) for n in range(50)]
    assert ks[0] == 8 and ks[-1] == 16
    assert r.eval().top_k == 16  # evaluation at K = E
    # the user's flags win: a schedule length of its own, and the fixed K = 2 one option away
    assert fairseq_cfg(tiny_corpus[1], arch, "--max-update", "50", "--moe-top-k-schedule-updates",
                       "20").model.moe_top_k_schedule_updates == 20
    fixed = build_model(fairseq_cfg(tiny_corpus[1], arch, "--moe-top-k-schedule", "none"))
    r = fixed.moe_layers()[0][1].router
    r.set_num_updates(1000)
    assert r.train().top_k == 2 and r.eval().top_k == 16


def test_schedule_without_a_length_is_refused(tiny_corpus):
    # fairseq's --max-update 0 (no limit) gives the schedule no length
    with pytest.raises(ValueError, match="--moe-top-k-schedule-updates: 0 is not allowed with --moe-top-k-schedule "
                                         "linear_increase; allowed: >= 1"):
        build_model(fairseq_cfg(tiny_corpus[1], "hyper_lm"))
    # a hydra model config has no --max-update: the arch function keeps 0 and the build asks for it
    cfg = fairseq_cfg(tiny_corpus[1], "smoe_lm", "--moe-top-k-schedule", "linear_increase", "--max-update", "40")
    assert cfg.model.moe_top_k_schedule_updates == 40  # the command line fills it for any top-K arch
    cfg.model.moe_top_k_schedule_updates = 0
    with pytest.raises(ValueError, match="model.moe_top_k_schedule_updates"):
        build_model(cfg)


def test_smoe_lm_defaults_to_a_fixed_k(tiny_corpus):
    cfg = fairseq_cfg(tiny_corpus[1], "smoe_lm", "--max-update", "50")
    assert (cfg.model.moe_top_k_schedule, cfg.model.moe_top_k, cfg.model.moe_expert_count) == ("none", 2, 16)


@pytest.mark.parametrize("kw,match", [
    (dict(moe_top_k_schedule="sqrt"), "--moe-top-k-schedule: 'sqrt'"),
    (dict(moe_top_k_schedule="linear"), "--moe-top-k-schedule: 'linear'"),  # the reference's names only
    (dict(moe_top_k_schedule="linear_increase", moe_top_k_schedule_updates=0), "--moe-top-k-schedule-updates: 0"),
    (dict(moe_top_k_schedule="exp_increase", moe_top_k_schedule_updates=299), "--moe-top-k-schedule-updates: 299"),
    (dict(moe_top_k_schedule="linear_increase", moe_top_k_schedule_updates=5, moe_top_k_min=-1),
     "--moe-top-k-min: -1"),
    (dict(moe_top_k_schedule="linear_increase", moe_top_k_schedule_updates=5, moe_top_k_min=4, moe_top_k_max=2),
     "--moe-top-k-max: 2"),
    (dict(moe_top_k_schedule="linear_increase", moe_top_k_schedule_updates=5, moe_top_k_max=3),
     "--moe-top-k-max: 3"),  # below the default K_min = E // 2 = 4
    (dict(moe_top_k_schedule="cosine_increase", moe_top_k_schedule_updates=5, moe_top_k_max=9),
     "--moe-top-k-max: 9"),
    (dict(moe_eval_top_k=9), "--moe-eval-top-k: 9"),
    (dict(moe_eval_top_k=-2), "--moe-eval-top-k: -2"),
    (dict(moe_frozen_router_seed=-2), "--moe-frozen-router-seed: -2"),
])
@pytest.mark.parametrize("router", ["hyper", "smoe_dropout", "smoe"])
def test_bad_schedule_options_raise(router, kw, match):
    cfg = router_cfg(router, moe_expert_count=8, **kw)
    with pytest.raises(ValueError, match=match.replace("(", r"\(")):
        config.validate(cfg)

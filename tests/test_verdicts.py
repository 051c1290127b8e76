"""Seeds, spread and the verdicts on the papers' claims (moe_plugin.tools.stats), on hand-made
tables whose answers are worked out here: means and sample standard deviations by hand, a
clear win, a clear loss, overlap, a difference exactly at the combined spread, one seed, ties,
a higher-is-better metric, a claim over three runs, a paired claim, the lead-at-small-K claim;
the report's grouping of seed directories; and that every registered experiment's CLAIMS name
runs (and evaluations) its plans have."""

import json
import math
import os
import pickle

import pytest

from moe_plugin.experiments import EXPERIMENTS
from moe_plugin.experiments import _plan as P
from moe_plugin.experiments.runner import plan_of
from moe_plugin.tools import report, stats
from moe_plugin.tools.stats import DOES_NOT_HOLD, HOLDS, INCONCLUSIVE, Claim, Estimate, GapClaim, compare


# ----------------------------------------------------------------------------------------
# One figure over seeds
# ----------------------------------------------------------------------------------------


def test_estimate_is_the_mean_with_the_sample_std():
    e = stats.aggregate([10.0, 12.0, 14.0])
    # mean 12; squared deviations 4 + 0 + 4 over n - 1 = 2 -> variance 4, std 2
    assert e == 12.0 and e.mean == 12.0 and e.spread == 2.0 and e.n == 3
    two = stats.aggregate([1.0, 2.0])
    assert two.spread == pytest.approx(math.sqrt(0.5))  # |x1 - x2| / sqrt 2, not the half range 0.5
    assert stats.aggregate([5.0]).spread is None and stats.aggregate([5.0]).n == 1
    # None and NaN are no value (with their seeds); nothing left -> None
    e = stats.aggregate([3.0, None, float("nan"), 5.0], seeds=[1, 2, 3, 4])
    assert e.values == (3.0, 5.0) and e.seeds == (1, 4)
    assert stats.aggregate([None, float("nan")]) is None
    # a float (the mean) for code written for one run's figures: arithmetic sees the mean
    assert isinstance(e, Estimate) and isinstance(e, float)
    assert e / 2 == 2.0 and type(e / 2) is float and e > 3.9
    c = pickle.loads(pickle.dumps(e))  # the seeds survive a copy
    assert (c, c.values, c.seeds, c.spread) == (e, e.values, e.seeds, e.spread)
    with pytest.raises(ValueError, match="2 values but 1 seeds"):
        Estimate([1.0, 2.0], seeds=[1])


def test_formatter():
    assert stats.format_estimate(stats.aggregate([12.0, 12.5, 13.0])) == "12.50 ± 0.50 (n=3)"
    assert format(stats.aggregate([12.0, 12.5, 13.0]), ".1f") == "12.5 ± 0.5 (n=3)"
    assert stats.format_estimate(stats.aggregate([7.0])) == "7.00 (n=1)"
    assert stats.format_estimate(None) == "-" and stats.format_estimate(3.14159, ".3f") == "3.142"
    # the report's fmt writes an Estimate the same way (every table cell of a seed-grouped run)
    assert report.fmt(stats.aggregate([1000.0, 1200.0]), ",.0f") == "1,100 ± 141 (n=2)"


# ----------------------------------------------------------------------------------------
# compare
# ----------------------------------------------------------------------------------------


def test_clear_win_and_clear_loss():
    a = [10.0, 10.2, 9.8]  # mean 10, std 0.2
    b = [12.0, 12.2, 11.8]  # mean 12, std 0.2; difference 2 > 0.4
    assert compare(a, b) == HOLDS
    assert compare(b, a) == DOES_NOT_HOLD
    assert stats.margin(a, b) == pytest.approx(2.0) and stats.combined_spread(a, b) == pytest.approx(0.4)


def test_overlap_is_inconclusive():
    a = [10.0, 11.0, 12.0]  # 11 ± 1
    b = [11.0, 12.0, 13.0]  # 12 ± 1: difference 1 < combined 2
    assert compare(a, b) == INCONCLUSIVE and compare(b, a) == INCONCLUSIVE
    # the spreads add (the two intervals must not overlap): 1.8 is within 1 + 1, though beyond
    # the spread of a difference of independent means, sqrt(1 + 1) = 1.41
    assert compare(a, [11.8, 12.8, 13.8]) == INCONCLUSIVE
    assert compare(a, [12.1, 13.1, 14.1]) == HOLDS  # 2.1 > 2


def test_difference_at_exactly_the_combined_spread_is_inconclusive():
    a = [0.0, 0.0, 0.0]  # 0 ± 0
    b = [0.0, 1.0, 2.0]  # 1 ± 1 (exactly: variance (1 + 0 + 1) / 2)
    assert compare(a, b) == INCONCLUSIVE  # 1 is not more than 0 + 1
    assert compare(a, [1.0, 2.0, 3.0]) == HOLDS  # 2 > 1


def test_one_seed_or_no_value_is_inconclusive():
    assert compare([1.0], [100.0, 101.0]) == INCONCLUSIVE  # a huge difference, but no spread on one side
    assert compare(1.0, 100.0) == INCONCLUSIVE
    assert compare(None, [1.0, 2.0]) == INCONCLUSIVE and compare([1.0, 2.0], None) == INCONCLUSIVE


def test_ties():
    assert compare([5.0, 5.0, 5.0], [5.0, 5.0, 5.0]) == INCONCLUSIVE  # zero spreads, zero difference
    assert compare([5.0, 6.0], [6.0, 5.0]) == INCONCLUSIVE
    assert compare([5.0, 5.0], [6.0, 6.0]) == HOLDS  # zero spreads: any difference counts


def test_higher_is_better():
    fast, slow = [100.0, 102.0], [90.0, 92.0]  # 101 ± 1.41 vs 91 ± 1.41
    assert compare(fast, slow, better="higher") == HOLDS
    assert compare(fast, slow, better="lower") == DOES_NOT_HOLD
    assert compare(slow, fast, better="higher") == DOES_NOT_HOLD
    with pytest.raises(ValueError, match="better='smaller'; allowed: 'lower', 'higher'"):
        compare(fast, slow, better="smaller")


# ----------------------------------------------------------------------------------------
# Claims on hand-made runs (the report's run dicts, one per seed)
# ----------------------------------------------------------------------------------------


def seeds_of(name, label, tests, unit="ppl", evals=None):
    """The per-seed runs of one run: test figure per seed (and other evaluations' base-2 losses)."""
    out = []
    for i, t in enumerate(tests):
        ev = {"test": {"ppl": t, "loss_bits": math.log2(t) if unit == "ppl" else t, "label": "test"}}
        for k, vals in (evals or {}).items():
            ev[k] = {"ppl": 2 ** vals[i], "loss_bits": vals[i], "label": f"K={k[1:]}"}
        out.append({"name": name, "label": label, "unit": unit, "seed": i + 1, "status": "trained",
                    "evals": ev, "valid_final": {"ppl": t + 1.0, "nll_loss": 1.0}, "wps": 1000.0 + i})
    return out


def test_claim_over_three_runs():
    a = seeds_of("a", "A", [10.0, 10.1, 9.9])  # 10 ± 0.1
    b = seeds_of("b", "B", [12.0, 12.1, 11.9])  # clearly worse than a
    c_close = seeds_of("c", "C", [10.1, 10.3, 9.9])  # 10.1 ± 0.2: within the spread of a
    c_better = seeds_of("c", "C", [8.0, 8.1, 7.9])  # clearly better than a
    c_worse = seeds_of("c", "C", [11.0, 11.1, 10.9])
    claim = Claim("A beats B and C", a=("a",), b=("b", "c"))
    assert claim.runs == ("a", "b", "c") and claim.pairs() == [("a", "b"), ("a", "c")]
    assert claim.judge(a + b + c_worse)[0] == HOLDS  # every comparison holds
    assert claim.judge(a + b + c_close)[0] == INCONCLUSIVE  # one within the spread
    verdict, lines = claim.judge(a + b + c_better)
    assert verdict == DOES_NOT_HOLD  # one comparison refuted refutes the claim
    assert lines[0] == "A 10.000 ± 0.100 (n=3) vs B 12.000 ± 0.100 (n=3): difference +2.000 ppl beyond the " \
                       "combined spread 0.200: holds"
    assert lines[1].endswith(": does not hold") and "C 8.000 ± 0.100 (n=3)" in lines[1]
    # a run missing from the report: no value, inconclusive
    assert claim.judge(a + b)[0] == INCONCLUSIVE and "vs c (no result): no result on a side" in claim.judge(a + b)[1][1]


def test_paired_claim_compares_matching_settings_only():
    runs = (seeds_of("hash8", "Hash 8", [10.0, 10.1]) + seeds_of("switch8", "Switch 8", [11.0, 11.1])
            + seeds_of("hash16", "Hash 16", [9.0, 9.1]) + seeds_of("switch16", "Switch 16", [9.5, 9.6]))
    paired = Claim("Hash beats Switch", a=("hash8", "hash16"), b=("switch8", "switch16"), paired=True)
    assert paired.pairs() == [("hash8", "switch8"), ("hash16", "switch16")]
    assert paired.judge(runs)[0] == HOLDS  # (hash8 vs switch16 would not hold: 10.05 > 9.55)
    with pytest.raises(ValueError, match="paired=True needs as many runs"):
        Claim("x", a=("a",), b=("b", "c"), paired=True)
    with pytest.raises(ValueError, match="b names no run"):
        Claim("x", a=("a",), b=())


def test_a_claim_at_a_setting_is_not_judged_on_runs_off_it():
    a = seeds_of("sam_k2", "SAM K=2", [8.0, 8.1])
    b = seeds_of("switch", "Switch", [12.0, 12.1])  # a clear win, but only at unequal compute
    claim = Claim("SAM beats Switch at equal compute", a="sam_k2", b="switch", requires=(("equal_compute", True),))
    for r in a + b:
        r["meta"] = {"equal_compute": False}
    verdict, lines = claim.judge(a + b)
    assert verdict == INCONCLUSIVE
    assert lines == ["not judged: the claim needs equal_compute=True; SAM K=2 has equal_compute=False; "
                     "Switch has equal_compute=False"]
    for r in a + b:
        r["meta"] = {"equal_compute": True}
    assert claim.judge(a + b)[0] == HOLDS
    a[1]["meta"] = {"equal_compute": False}  # one seed off the setting is enough
    assert claim.judge(a + b)[1] == ["not judged: the claim needs equal_compute=True; SAM K=2 has equal_compute=False"]
    a[1]["meta"] = {"equal_compute": True}
    b[0]["meta"] = {}  # a run without the key is off the setting too
    assert claim.judge(a + b)[0] == INCONCLUSIVE


def test_claim_on_a_higher_is_better_metric_and_on_valid():
    runs = seeds_of("fast", "F", [10.0, 10.0]) + seeds_of("slow", "S", [10.0, 10.0])
    for r in runs[2:]:
        r["wps"] -= 100.0  # fast: 1000, 1001; slow: 900, 901
    assert Claim("F is faster", a="fast", b="slow", metric="wps", better="higher").judge(runs)[0] == HOLDS
    assert Claim("F is slower", a="fast", b="slow", metric="wps").judge(runs)[0] == DOES_NOT_HOLD
    assert Claim("valid", a="fast", b="slow", metric="valid").judge(runs)[0] == INCONCLUSIVE  # equal


def test_claim_on_the_load_at_the_end_of_training():
    """The balancing claims: load max/mean of the LAST logged training interval (the MoE
    layers' mean), not an average over training."""
    def with_load(runs, last_loads, first=3.0):
        for r, load in zip(runs, last_loads):
            r["log"] = {"train_inner": [{"num_updates": 10, "moe_l1_load_max": first, "moe_l3_load_max": first},
                                        {"num_updates": 20, "moe_l1_load_max": load - 0.1,
                                         "moe_l3_load_max": load + 0.1, "moe_load_max": 99.0}]}
        return runs

    free = with_load(seeds_of("free", "Loss-free", [10.0] * 3), [1.05, 1.06, 1.04])
    aux = with_load(seeds_of("aux", "Aux loss", [10.0] * 3), [1.30, 1.25, 1.35], first=1.0)
    assert stats.value_of(free[0], "load_max_end") == pytest.approx(1.05)
    claim = Claim("loss-free balances better", a="free", b="aux", metric="load_max_end")
    verdict, lines = claim.judge(free + aux)
    assert verdict == HOLDS and "Loss-free 1.050 ± 0.010 (n=3)" in lines[0] and "ppl" not in lines[0]
    assert "load max/mean at the end of training" in claim.describe(free + aux)
    assert Claim("x", a="aux", b="free", metric="load_max_end").judge(free + aux)[0] == DOES_NOT_HOLD
    close = with_load(seeds_of("close", "Close", [10.0] * 3), [1.06, 1.04, 1.08])
    assert Claim("x", a="free", b="close", metric="load_max_end").judge(free + close)[0] == INCONCLUSIVE
    # without per-layer figures the overall moe_load_max; without a train log, no value
    r = {"log": {"train_inner": [{"moe_load_max": 1.2}]}}
    assert stats.value_of(r, "load_max_end") == 1.2 and stats.value_of({"log": {}}, "load_max_end") is None


def test_bpc_runs_are_judged_in_bits():
    a = seeds_of("h", "H", [1.20, 1.22, 1.18], unit="bpc")
    b = seeds_of("d", "D", [1.30, 1.31, 1.29], unit="bpc")
    verdict, lines = Claim("H beats D", a="h", b="d").judge(a + b)
    assert verdict == HOLDS and "BPC" in lines[0] and "H 1.200 ± 0.020 (n=3)" in lines[0]
    assert "test BPC" in Claim("H beats D", a="h", b="d").describe(a + b)


def test_lead_at_small_k_is_paired_by_seed():
    """Per seed: the lead (bits) at K=2 and at K=8; the raw losses scatter by 1 bit across seeds,
    the leads hardly at all, so the comparison of leads is decisive only because it is paired."""
    hyper = seeds_of("hyper", "HyperRouter", [4.0, 4.0, 4.0], evals={"k2": [1.0, 2.0, 3.0], "k8": [1.0, 2.0, 3.0]})
    drop = seeds_of("drop", "SMoE-Dropout", [4.0, 4.0, 4.0], evals={"k2": [1.5, 2.5, 3.5], "k8": [1.1, 2.1, 3.1]})
    claim = GapClaim("lead largest at small K", a="hyper", b="drop", small="k2", large="k8")
    ls, ll = claim.leads(hyper + drop, "k2"), claim.leads(hyper + drop, "k8")
    assert ls == pytest.approx(0.5) and ll == pytest.approx(0.1) and ls.spread < 1e-12
    verdict, lines = claim.judge(hyper + drop)
    assert verdict == HOLDS and "at k2: 0.5000 ± 0.0000 (n=3)" in lines[0]
    # unpaired, the same numbers overlap: drop's k2 losses 2.5 ± 1 vs hyper's 2 ± 1
    assert compare(stats.estimate_of(hyper, "hyper", "k2"), stats.estimate_of(drop, "drop", "k2"),
                   "lower") == INCONCLUSIVE
    # the lead shrinking is refuted when it grows
    assert GapClaim("x", a="hyper", b="drop", small="k8", large="k2").judge(hyper + drop)[0] == DOES_NOT_HOLD


def test_verdict_lines():
    runs = seeds_of("a", "A", [10.0, 10.1, 9.9]) + seeds_of("b", "B", [12.0, 12.1, 11.9])
    lines = stats.verdicts([Claim("A beats B", a="a", b="b"), Claim("B beats A", a="b", b="a"),
                            Claim("A beats Z", a="a", b="z")], runs, title="Claims")
    assert lines[0] == "### Claims"
    assert "- **holds**: A beats B (test ppl, lower is better)" in lines
    assert "- **does not hold**: B beats A (test ppl, lower is better)" in lines
    assert "- **inconclusive**: A beats Z (test ppl, lower is better)" in lines
    assert "Verdicts: 1 hold, 1 do not hold, 1 inconclusive." in lines
    assert stats.verdicts([], runs) == []


# ----------------------------------------------------------------------------------------
# The report: seed directories grouped, the table with spreads, the verdicts at its end
# ----------------------------------------------------------------------------------------


def _write_seed_run(out, seed, name, label, meta, test_ppl, valid_ppl):
    d = os.path.join(out, f"seed{seed}", name)
    os.makedirs(d)
    nll = math.log2(valid_ppl)
    with open(os.path.join(d, "train.log"), "w") as f:
        f.write(f"2026-01-01 10:00:10 | INFO | train_inner | epoch 001:  10 / 99 loss=7, nll_loss=7, ppl=128, "
                f"wps={900 + seed}, num_updates=10, wall=10\n"
                f"2026-01-01 10:00:12 | INFO | valid | epoch 001 | valid on 'valid' subset | loss {nll} | nll_loss "
                f"{nll} | ppl {valid_ppl} | num_updates 10\n")
    with open(os.path.join(d, "eval_test.log"), "w") as f:
        f.write(f"x | Loss (base 2): {math.log2(test_ppl):.10f}, Perplexity: {test_ppl}\n")
    with open(os.path.join(d, "run.json"), "w") as f:
        json.dump(dict(script="sam_k_quality", scale="tiny", name=name, label=label, arch="sam_lm", group="main",
                       dataset="synthetic", unit="ppl", meta=meta, seed=seed, seeds=[1, 2, 3], status="trained",
                       evals=[{"name": "test", "label": "test", "log": "eval_test.log"}]), f)


def test_report_groups_seeds_and_ends_the_table_with_verdicts(tmp_path):
    out = str(tmp_path / "sam")
    tests = {"switch": [20.0, 21.0, 22.0], "sam_k2": [15.0, 15.5, 16.0], "sam_k4": [20.5, 21.5, 22.5]}
    for name, ppls in tests.items():
        k = 1 if name == "switch" else int(name[-1])
        for seed, ppl in zip((1, 2, 3), ppls):
            _write_seed_run(out, seed, name, name, {"kind": "sam", "K": k, "groups": 2, "equal_compute": True}, ppl,
                            ppl + 1.0)
    md = report.build_report(report.find_run_dirs([out]), out)
    lines = md.splitlines()
    row = next(x for x in lines if x.startswith("| sam_k2 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # valid 16.5 ± 0.5, test 15.5 ± 0.5 over the three seeds; words/s 902 ± 1
    assert cells[3] == "16.500 ± 0.500 (n=3)" and cells[4] == "15.500 ± 0.500 (n=3)"
    assert cells[5] == "902 ± 1 (n=3)"
    assert sum(1 for x in lines if x.startswith("| sam_k2 |")) == 2  # the paper table and the summary: one row each
    # SAM K=2 beats Switch (5.5 > 0.5 + 1); K=4 does not beat it (worse by 0.5, within 2): inconclusive
    i = lines.index("### The paper's claims at tiny scale (seeds 1, 2, 3)")
    claim = next(x for x in lines[i:] if x.startswith("- **"))
    assert claim.startswith("- **inconclusive**: SAM with K > 1")
    assert any("sam_k2 15.500 ± 0.500 (n=3) vs switch 21.000 ± 1.000 (n=3)" in x and x.endswith("holds")
               for x in lines[i:])
    assert any("sam_k4 21.500 ± 1.000 (n=3) vs switch" in x and x.endswith("inconclusive") for x in lines[i:])
    assert lines.index("## All runs") > i  # at the end of the experiment's table
    # report.json: one record per seed directory
    recs = json.load(open(os.path.join(out, "report.json")))
    assert sorted((r["name"], r["seed"]) for r in recs) == sorted((n, s) for n in tests for s in (1, 2, 3))


def test_unseeded_run_directories_stay_rows_of_their_own(tmp_path):
    """The layout before seeds (OUT/<run>, no seed in run.json): plain numbers, n not shown."""
    out = str(tmp_path / "old")
    _write_seed_run(out, 1, "switch", "switch", {"K": 1, "groups": 1}, 20.0, 21.0)
    src = os.path.join(out, "seed1", "switch")
    meta = json.load(open(os.path.join(src, "run.json")))
    meta.pop("seed")
    json.dump(meta, open(os.path.join(src, "run.json"), "w"))
    runs = report.group_seeds([report.load_run(src)])
    assert runs[0]["dir"] == src and "seeds" not in runs[0]
    assert report.metric_value(runs[0], "eval", "test") == pytest.approx(20.0, abs=1e-6) and type(report.metric_value(runs[0])) is float


# ----------------------------------------------------------------------------------------
# The experiments' claims name their plans' runs
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", P.SCALES)
@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_every_experiments_claims_name_runs_of_its_plan(name, scale):
    claims = report.claims_of(EXPERIMENTS[name], scale)
    assert claims, f"{name} declares no claims at {scale} scale"
    plan = plan_of(name, scale)
    runs = {r.name: r for r in plan.runs}
    for c in claims:
        missing = [r for r in c.runs if r not in runs]
        assert not missing, f"{name} ({scale}): claim {c.text!r} names runs its plan lacks: {missing}"
        metrics = [c.metric] if isinstance(c, Claim) else [c.small, c.large]
        for m in metrics:
            for r in c.runs:
                assert m in ("valid", "wps", *stats.END_OF_TRAINING) or m in [e.name for e in runs[r].evals], (
                    name, scale, c.text, r, m)

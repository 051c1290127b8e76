"""make demo's table (scripts/demo.py --table-only) on hand-made runs: no training.

The runs are written in the demo's layout (OUT/seed<N>/<arch>/ with fairseq-train's and
fairseq-eval-lm's log lines, run.json; OUT/flops.json; DATA/truth.json and a tiny corpus), and
the expected figures are computed here by hand: the end-of-training load and drops come from
the last train_inner interval (not the train line's average from update 1), the ranking counts
a difference only beyond the combined seed spread, a FLOPs ratio more than 2% off dense_lm's is
marked, and CE_unigram and the learned share come from truth.json.
"""

import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys

import pytest

from moe_plugin.tools.flops import COMPONENTS, FlopsReport

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "scripts", "demo.py")

FLOOR = 1.0  # truth.json's test cross-entropy, nats/token
CE_UNI = 3.0  # truth.json's test CE_unigram, nats/token
# arch -> per-seed gap to the floor (nats/token); None: that seed's run failed
GAPS = {
    "dense_lm": [1.0, 1.1],
    "switch_lm": [0.5, 0.52],   # better than dense by far more than the spreads
    "base_lm": [1.02, 1.12],    # within the spread of dense
    "hash_lm": [1.6, 1.62],     # worse than every other
    "sam_lm": [0.9, None],      # one seed: no spread
}
# arch -> active FLOPs/token in evaluation (dense = 1000): switch 1% off, base 10%, hash 3% below
FLOPS = {"dense_lm": 1000.0, "switch_lm": 1010.0, "base_lm": 1100.0, "hash_lm": 970.0, "sam_lm": 1000.0}
# per seed: (load max/mean, % dropped) of the two logged train_inner intervals, and of the train average
INTERVALS = {1: [(3.0, 40.0), (1.25, 2.5)], 2: [(2.5, 30.0), (1.75, 4.5)]}
TRAIN_AVERAGE = (2.1, 21.0)
# arch -> per seed, per MoE layer: NMI(expert; domain) of domains.json (2 domains x 2 experts counts)
NMI = {"switch_lm": {1: {"l1": 0.8, "l3": 0.6}, 2: {"l1": 0.5, "l3": 0.3}}, "hash_lm": {1: {"l1": 0.1}, 2: {"l1": 0.2}}}
COUNTS = [[30, 10], [5, 55]]


def _report(arch, flops):
    zero = dict.fromkeys(COMPONENTS, 0.0)
    return FlopsReport(label=arch, seq_len=32, attention="full", tokens_per_batch=512,
                       components={"train": dict(zero, output=flops), "eval": dict(zero, output=flops)},
                       active_flops_per_token={"train": flops, "eval": flops}, total_params=int(10 * flops),
                       active_params={"train": int(flops), "eval": int(flops)},
                       experts_per_token={"train": [], "eval": []})


def _train_log(arch, seed):
    moe = arch != "dense_lm"
    lines = []
    for i, (load, dropped) in enumerate(INTERVALS[seed]):
        u = 4 * (i + 1)
        extra = f"moe_load_max={load}, moe_dropped={dropped}, " if moe else ""
        lines.append(f"2026-01-01 10:00:0{u} | INFO | train_inner | epoch 001:      {u} / 40 loss=7.5, "
                     f"nll_loss=7.25, ppl=152.22, wps={1000 if i == 0 else 3000 + 100 * seed}, {extra}"
                     f"num_updates={u}, wall={u}")
        lines.append(f"2026-01-01 10:00:0{u} | INFO | valid | epoch 001 | valid on 'valid' subset | loss 6.75 | "
                     f"nll_loss {6.5 - i} | ppl {2 ** (6.5 - i):.2f} | num_updates {u}")
    extra = f" | moe_load_max {TRAIN_AVERAGE[0]} | moe_dropped {TRAIN_AVERAGE[1]}" if moe else ""
    lines.append(f"2026-01-01 10:00:09 | INFO | train | epoch 001 | loss 7.2 | nll_loss 7 | ppl 128 | wps 2000"
                 f"{extra} | num_updates 8")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    base = tmp_path_factory.mktemp("demo")
    out, data = base / "out", base / "data"
    data.mkdir()
    (data / "truth.json").write_text(json.dumps({
        "valid": {"perplexity": 3.0, "cross_entropy_nats": math.log(3.0)},
        "test": {"perplexity": math.exp(FLOOR), "cross_entropy_nats": FLOOR, "unigram_cross_entropy_nats": CE_UNI}}))
    out.mkdir()
    (out / "flops.json").write_text(json.dumps({a: dataclasses.asdict(_report(a, f)) for a, f in FLOPS.items()}))
    for arch, gaps in GAPS.items():
        for seed, gap in zip((1, 2), gaps):
            d = out / f"seed{seed}" / arch
            d.mkdir(parents=True)
            trained = gap is not None
            (d / "run.json").write_text(json.dumps({
                "name": arch, "label": arch, "arch": arch, "seed": seed, "status": "trained" if trained else "failed",
                "evals": [{"name": "test", "label": "test", "log": "eval_test.log"}], "meta": {"seconds": 10 * seed}}))
            (d / "train.log").write_text(_train_log(arch, seed))
            if arch in NMI:
                (d / "domains.json").write_text(json.dumps({"split": "test", "layers": {
                    name: {"nmi_domain": v, "counts": COUNTS} for name, v in NMI[arch][seed].items()}}))
            if trained:
                bits = (FLOOR + gap) / math.log(2)
                (d / "eval_test.log").write_text(f"Evaluated 4 tokens\nLoss (base 2): {bits:.10f}, "
                                                 f"Perplexity: {2 ** bits:.10f}\n")
    proc = subprocess.run([sys.executable, DEMO, "--table-only", "--out", str(out), "--data", str(data)],
                          cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = json.loads((out / "results.json").read_text())
    return {"rows": {r["arch"]: r for r in res["rows"]}, "order": [r["arch"] for r in res["rows"]], "json": res,
            "md": (out / "results.md").read_text(), "out": out}


def _mean(e):
    return e["mean"]


def test_end_of_training_load_and_drops_are_the_last_interval(table):
    rows = table["rows"]
    for arch in ("switch_lm", "base_lm", "hash_lm"):
        r = rows[arch]
        loads = [INTERVALS[s][-1][0] for s in (1, 2)]
        drops = [INTERVALS[s][-1][1] for s in (1, 2)]
        assert r["load_max_end"]["values"] == pytest.approx(loads)
        assert r["dropped_end"]["values"] == pytest.approx(drops)
        assert _mean(r["dropped_end"]) == pytest.approx(3.5) and _mean(r["dropped_end"]) != TRAIN_AVERAGE[1]
        assert r["dropped_end"]["spread"] == pytest.approx(statistics.stdev(drops))
        assert [s["end_updates"] for s in r["per_seed"]] == [[5, 8], [5, 8]]
    assert rows["dense_lm"]["load_max_end"] is None and rows["dense_lm"]["dropped_end"] is None
    assert "updates 5-8" in table["md"]
    # words/s: the intervals after the first
    assert rows["switch_lm"]["wps"]["values"] == [3100, 3200]


def test_gap_to_floor_and_spread(table):
    for arch, gaps in GAPS.items():
        have = [g for g in gaps if g is not None]
        r = table["rows"][arch]
        assert r["gap"]["values"] == pytest.approx(have, abs=1e-9)
        assert r["gap"]["n"] == len(have)
        if len(have) > 1:
            assert r["gap"]["spread"] == pytest.approx(statistics.stdev(have), abs=1e-9)
        else:
            assert r["gap"]["spread"] is None
        assert _mean(r["test_ppl"]) == pytest.approx(statistics.mean(math.exp(FLOOR + g) for g in have), rel=1e-8)


def test_ranking_counts_a_difference_only_beyond_the_spread(table):
    rows = table["rows"]
    # by hand: dense 1.05 ± 0.071, switch 0.51 ± 0.014, base 1.07 ± 0.071, hash 1.61 ± 0.014, sam 0.9 (n=1)
    # switch beats dense, base and hash beyond the combined spreads; dense and base are within;
    # dense and base beat hash; sam (one seed) is told apart from nothing
    assert {a: rows[a]["rank"] for a in GAPS} == {"switch_lm": 1, "sam_lm": 1, "dense_lm": 2, "base_lm": 2,
                                                 "hash_lm": 4}
    assert {a: rows[a]["vs_dense"] for a in GAPS} == {
        "dense_lm": "baseline", "switch_lm": "better", "base_lm": "within spread", "hash_lm": "worse",
        "sam_lm": "no spread (n<2)"}
    assert table["order"] == ["switch_lm", "sam_lm", "dense_lm", "base_lm", "hash_lm"]


def test_flops_ratio_marked_beyond_two_percent(table):
    rows = table["rows"]
    for arch, f in FLOPS.items():
        assert rows[arch]["flops_ratio"] == pytest.approx(f / FLOPS["dense_lm"])
        assert rows[arch]["flops_within"] == (abs(f / FLOPS["dense_lm"] - 1) <= 0.02)
    lines = {line.split(" | ")[1]: line for line in table["md"].splitlines() if line.startswith("| ") and "_lm" in line}
    assert "(>2% off)" in lines["base_lm"] and "(>2% off)" in lines["hash_lm"]
    assert "(>2% off)" not in lines["switch_lm"] and "1.010x" in lines["switch_lm"]
    assert "1.000x" in lines["dense_lm"] and "(>2% off)" not in lines["dense_lm"]
    assert (table["out"] / "plots" / "valid_ppl.png").exists()


def test_unigram_cross_entropy_and_learned_share(table):
    """CE_unigram is truth.json's (data-prep/synthetic.py computes it; tests/test_synthetic.py
    checks it); the learned share is (CE_unigram - CE_model) / (CE_unigram - floor)."""
    assert table["json"]["unigram_cross_entropy_nats"] == pytest.approx(CE_UNI)
    r = table["rows"]["switch_lm"]
    want = [(CE_UNI - (FLOOR + g)) / (CE_UNI - FLOOR) for g in GAPS["switch_lm"]]
    assert r["learned"]["values"] == pytest.approx(want)


def test_expert_domain_nmi_is_the_layers_mean_and_the_heatmap_is_the_best_moe_arch(table):
    for arch, per_seed in NMI.items():
        want = [statistics.mean(per_seed[s].values()) for s in (1, 2)]
        assert table["rows"][arch]["nmi_domain"]["values"] == pytest.approx(want)
    assert table["rows"]["dense_lm"]["nmi_domain"] is None
    assert "NMI(expert; domain)" in table["md"]
    # switch_lm ranks first among the MoE archs; its seed-1 analysis is drawn
    assert table["order"][0] == "switch_lm"
    assert (table["out"] / "plots" / "expert_domain.png").stat().st_size > 0
    assert "![expert x domain](plots/expert_domain.png)" in table["md"]


def test_a_corpus_of_another_preset_is_refused(tmp_path):
    data = tmp_path / "data"
    (data / "data-bin").mkdir(parents=True)
    (data / "data-bin" / "dict.txt").write_text("w1 1\n")
    (data / "truth.json").write_text(json.dumps({"config": {"preset": "control", "seed": 1}}))
    proc = subprocess.run([sys.executable, DEMO, "--data", str(data), "--out", str(tmp_path / "out")], cwd=ROOT,
                          capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode != 0
    assert "generated with preset 'control', seed 1; asked for --preset context, --data-seed 1" in proc.stderr


def test_bad_seeds_are_refused():
    proc = subprocess.run([sys.executable, DEMO, "--seeds", "1,1", "--table-only"], cwd=ROOT, capture_output=True,
                          text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 2
    assert "--seeds: '1,1' is not allowed; allowed: comma-separated distinct integers" in proc.stderr


def _demo_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("demo_script", DEMO)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_default_archs_are_registered_and_bad_archs_are_refused():
    from moe_plugin.models.archs import ARCHS, DENSE_ARCH
    from moe_plugin.routing import ROUTER_REGISTRY

    demo = _demo_module()
    default = demo.demo_archs("default", ARCHS, DENSE_ARCH)
    assert default[0] == DENSE_ARCH and set(default[1:]) <= set(ARCHS)
    # the two classic baselines and one arch per paper
    assert {"switch_lm", "gshard_lm", "base_lm", "hash_lm", "sam_lm", "hyper_lm"} <= set(default)
    # 'all': every registered arch but those whose evaluation reads the future (expert choice)
    leaky = [a for a, (router, _) in ARCHS.items() if ROUTER_REGISTRY[router].evaluation_sees_future]
    assert leaky == ["expert_choice_lm"]
    assert demo.demo_archs("all", ARCHS, DENSE_ARCH) == [DENSE_ARCH] + sorted(set(ARCHS) - set(leaky))
    with pytest.raises(ValueError, match=r"--archs: expert_choice_lm is not allowed: its routing of a token reads"):
        demo.demo_archs("dense_lm,expert_choice_lm", ARCHS, DENSE_ARCH)
    assert demo.demo_archs("dense_lm,switch_lm", ARCHS, DENSE_ARCH) == ["dense_lm", "switch_lm"]
    with pytest.raises(ValueError, match=r"--archs: 'dense_lm,nope_lm' is not allowed; allowed: default, all"):
        demo.demo_archs("dense_lm,nope_lm", ARCHS, DENSE_ARCH)


def test_rows_dropping_more_than_five_percent_are_marked(table):
    from moe_plugin.tools.stats import Estimate

    demo = _demo_module()
    assert "(>5%)" in demo.dropped_cell(Estimate([5.2, 5.4], [1, 2]))
    assert "(>5%)" not in demo.dropped_cell(Estimate([4.9, 5.0], [1, 2]))
    assert demo.dropped_cell(None) == "-"
    # the fixture's end-of-training drops average 3.5%: no mark and no note
    assert "(>5%)" not in table["md"]

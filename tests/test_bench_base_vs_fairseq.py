"""moe_plugin/tools/base_vs_fairseq.py (scripts/bench_base_vs_fairseq.py; BASE layers, moe_plugin vs fairseq's own --base-layers):
its log parser on real fairseq-train output, and the two sides' command lines (cheap: no
training here; the measurement itself is `python scripts/bench.py --suite base-vs-fairseq`)."""

import pytest

from moe_plugin.tools import base_vs_fairseq as bench

# rank 0 of a real 2-rank run of each side (default config, 80 updates; lines cut out of the log)
FAIRSEQ_LOG = """\
2026-12-03 23:25:24 | INFO | fairseq_cli.train | num. shared model params: 202,624 (num. trained: 202,624)
2026-12-03 23:25:24 | INFO | fairseq_cli.train | num. expert model params: 33216 (num. trained: 33216)
2026-12-03 23:25:26 | INFO | train_inner | epoch 001:     10 / 120 loss=10.288, ppl=1250.36, wps=43031.5, ups=10.5, wpb=4096, bsz=64, num_updates=10, lr=0.00075, gnorm=0.425, clip=0, train_wall=1, wall=2
2026-12-03 23:25:27 | INFO | train_inner | epoch 001:     20 / 120 loss=9.834, ppl=912.39, wps=53619.2, ups=13.09, wpb=4096, bsz=64, num_updates=20, lr=0.0015, gnorm=0.355, clip=0, train_wall=1, wall=3
2026-12-03 23:25:28 | INFO | train_inner | epoch 001:     30 / 120 loss=9.306, ppl=632.81, wps=45723.9, ups=11.16, wpb=4096, bsz=64, num_updates=30, lr=0.00225, gnorm=0.233, clip=0, train_wall=1, wall=4
2026-12-03 23:25:32 | INFO | valid | epoch 001 | valid on 'valid' subset | loss 8.995 | ppl 510.34 | wps 146779 | wpb 3705.4 | bsz 58 | num_updates 80
2026-12-03 23:25:32 | INFO | train | epoch 001 | loss 9.344 | ppl 649.67 | wps 46279.1 | ups 11.3 | wpb 4096 | bsz 64 | num_updates 80 | lr 0.00212132 | gnorm 0.218 | clip 0 | train_wall 7 | wall 8
"""

OURS_LOG = """\
2026-12-03 23:25:36 | INFO | fairseq_cli.train | num. shared model params: 202,624 (num. trained: 202,624)
2026-12-03 23:25:36 | INFO | fairseq_cli.train | num. expert model params: 33216 (num. trained: 33216)
2026-12-03 23:25:38 | INFO | train_inner | epoch 001:     10 / 120 loss=10.288, nll_loss=10.288, moe_aux=0, moe_dropped=0, moe_entropy=0.689, moe_l1_affinity=283.461, moe_l1_auction_rounds=1, moe_l1_aux=0, moe_l1_dropped=0, moe_l1_entropy=0.689, moe_l1_gap_bound=0, moe_l1_load_cv=0, moe_l1_load_max=1, moe_l1_unused=0, moe_load_cv=0, moe_load_max=1, moe_unused=0, ppl=1250.62, wps=44407.3, ups=10.84, wpb=4096, bsz=64, num_updates=10, lr=0.00075, gnorm=0.425, clip=0, train_wall=1, wall=2
2026-12-03 23:25:39 | INFO | train_inner | epoch 001:     20 / 120 loss=9.836, nll_loss=9.836, moe_aux=0, moe_dropped=0, moe_entropy=0.688, moe_l1_affinity=785.129, moe_l1_auction_rounds=1, moe_l1_aux=0, moe_l1_dropped=0, moe_l1_entropy=0.688, moe_l1_gap_bound=0, moe_l1_load_cv=0, moe_l1_load_max=1, moe_l1_unused=0, moe_load_cv=0, moe_load_max=1, moe_unused=0, ppl=914.08, wps=42717, ups=10.43, wpb=4096, bsz=64, num_updates=20, lr=0.0015, gnorm=0.355, clip=0, train_wall=1, wall=3
2026-12-03 23:25:45 | INFO | valid | epoch 001 | valid on 'valid' subset | loss 8.997 | nll_loss 8.997 | moe_aux 0 | moe_dropped 0 | moe_entropy 0.653 | moe_l1_affinity 14299.8 | moe_l1_auction_rounds 0 | moe_l1_aux 0 | moe_l1_dropped 0 | moe_l1_entropy 0.653 | moe_l1_load_cv 0.734 | moe_l1_load_max 1.734 | moe_l1_unused 0 | moe_load_cv 0.734 | moe_load_max 1.734 | moe_unused 0 | ppl 510.77 | wps 62544.6 | wpb 3705.4 | bsz 58 | num_updates 80
2026-12-03 23:25:45 | INFO | train | epoch 001 | loss 9.346 | nll_loss 9.346 | moe_aux 0 | moe_dropped 0 | moe_entropy 0.671 | moe_l1_affinity 9670.7 | moe_l1_auction_rounds 1 | moe_l1_aux 0 | moe_l1_dropped 0 | moe_l1_entropy 0.671 | moe_l1_gap_bound 0 | moe_l1_load_cv 0 | moe_l1_load_max 1 | moe_l1_unused 0 | moe_load_cv 0 | moe_load_max 1 | moe_unused 0 | ppl 650.57 | wps 40946.6 | ups 10 | wpb 4096 | bsz 64 | num_updates 80 | lr 0.00212132 | gnorm 0.219 | clip 0 | train_wall 7 | wall 9
"""


def test_parse_fairseq_log():
    r = bench.parse_log(FAIRSEQ_LOG)
    # steady state: the train_inner intervals after the first (updates 10-20 and 20-30)
    assert r["wps"] == pytest.approx(2 / (1 / 53619.2 + 1 / 45723.9))
    assert r["summary_wps"] == 46279.1
    assert r["valid_loss"] == 8.995
    assert r["train_loss"] == 9.344
    assert r["updates"] == 80
    assert r["train_wall"] == 7
    assert r["params"] == 202624 + 33216


def test_parse_moe_plugin_log():
    """The moe_cross_entropy criterion logs many more fields; the same figures come out."""
    r = bench.parse_log(OURS_LOG)
    inner = [ln for ln in OURS_LOG.splitlines() if "train_inner" in ln]
    assert len(inner) == 2
    assert r["wps"] == pytest.approx(float(inner[1].split("wps=")[1].split(",")[0]))
    assert r["valid_loss"] == 8.997
    assert r["train_loss"] == 9.346
    assert r["updates"] == 80
    assert r["params"] == 202624 + 33216


def test_parse_log_without_figures():
    r = bench.parse_log("nothing here\n")
    assert r["wps"] is None and r["valid_loss"] is None and r["params"] is None


def test_defaults():
    a = bench.build_parser().parse_args([])
    assert (a.repeats, a.layers, a.dim, a.ffn, a.heads, a.tokens_per_sample, a.max_tokens) == (2, 2, 64, 256, 2, 64, 2048)
    assert (a.lr, a.warmup) == (0.003, 40)
    assert 40 <= a.updates <= 80
    assert a.jsonl is None and bench.build_parser().parse_args(["--jsonl"]).jsonl == "-"


def _opts(flags):
    """Option names of a flag list (values dropped)."""
    return [f for f in flags if f.startswith("--")]


def test_sides_differ_only_in_arch_criterion_user_dir_and_expert_flags():
    a = bench.build_parser().parse_args(["--updates", "60"])
    cmds = {s: bench.train_command(a, "DATA", s, 12345, 0) for s in bench.SIDES}
    shared = bench.shared_flags(a, "DATA")
    tail = bench.rank_flags(12345, 0)
    for side, cmd in cmds.items():
        n = len(shared)
        # the interpreter, -m fairseq_cli.train, the shared flags, the side's own, the rank's
        assert cmd[1:3] == ["-m", "fairseq_cli.train"]
        assert cmd[3:3 + n] == shared
        assert cmd[len(cmd) - len(tail):] == tail
        own = cmd[3 + n:len(cmd) - len(tail)]
        assert own == bench.side_flags(side)
        assert set(_opts(own)) <= {"--arch", "--criterion", "--user-dir", "--moe-expert-count", "--moe-expert-parallel"}
        assert not set(_opts(own)) & set(_opts(shared))
    fs, ours = (bench.side_flags(s) for s in bench.SIDES)
    assert fs[fs.index("--arch") + 1] == "transformer_lm" and fs[fs.index("--criterion") + 1] == "cross_entropy"
    assert ours[ours.index("--arch") + 1] == "base_lm" and ours[ours.index("--moe-expert-count") + 1] == "2"
    assert "--moe-expert-parallel" in ours
    # matched architecture: pre-LN, input/output dims = the embedding dim, one BASE layer, 2 gloo ranks
    get = lambda name: shared[shared.index(name) + 1]  # noqa: E731
    assert "--decoder-normalize-before" in shared
    assert get("--decoder-input-dim") == get("--decoder-output-dim") == get("--decoder-embed-dim") == "64"
    assert get("--base-layers") == "1" and get("--max-update") == "60"
    assert get("--distributed-world-size") == "2" and get("--distributed-backend") == "gloo"
    assert "--distributed-no-spawn" in shared


def test_fresh_port_per_run():
    ports = {bench.free_port() for _ in range(3)}
    assert all(0 < p < 65536 for p in ports)


def test_summary_pairs_the_interleaved_runs():
    runs = [
        {"side": "fairseq", "repeat": 1, "wps": 100.0, "valid_loss": 9.0},
        {"side": "ours", "repeat": 1, "wps": 120.0, "valid_loss": 9.01},
        {"side": "fairseq", "repeat": 2, "wps": 50.0, "valid_loss": 9.0},
        {"side": "ours", "repeat": 2, "wps": 75.0, "valid_loss": 9.01},
        {"side": "ours", "repeat": 3, "error": "boom"},
    ]
    s = bench.summarize(runs)
    assert s["ratios"] == [1.2, 1.5]
    assert s["ratio"] == pytest.approx(1.35) and s["ratio_range"] == [1.2, 1.5]
    assert s["fairseq_wps"] == 75.0 and s["ours_wps"] == 97.5
    assert s["valid_loss_diff"] == pytest.approx(0.01)
    args = bench.build_parser().parse_args([])
    md = bench.markdown(args, [dict(r, summary_wps=None, params=None, seconds=1.0) for r in runs], s, [])
    assert "1.350x (1.200-1.500)" in md and "+0.010 bits" in md

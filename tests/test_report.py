"""moe_plugin.tools.report: log parsing on hand-written lines of every fairseq log format, the
paper-style tables on hand-made runs (values checked by hand), the plots."""

import json
import math
import os

import pytest

from moe_plugin.tools import report

# the same two train_inner records and one validation, as fairseq prints them in its four formats
DEFAULT = """\
2026-01-01 10:00:00 | INFO | fairseq_cli.train | {'_name': None, 'model': {'_name': 'switch_lm', 'dropout': 0.1}}
2026-01-01 10:00:05 | INFO | train_inner | epoch 001:      4 / 40 loss=7.5, nll_loss=7.25, moe_l1_load_max=1.5, moe_l3_load_max=2.5, ppl=152.22, wps=1000.5, num_updates=4, wall=5
2026-01-01 10:00:09 | INFO | train_inner | epoch 001:      8 / 40 loss=7, nll_loss=6.5, moe_l1_load_max=1.25, moe_l3_load_max=2, ppl=90.51, wps=3000, num_updates=8, wall=9
2026-01-01 10:00:12 | INFO | valid | epoch 001 | valid on 'valid' subset | loss 6.75 | nll_loss 6.5 | moe_load_max 1.75 | moe_l1_xdev_frac 0.25 | moe_l3_xdev_frac 0.75 | ppl 90.51 | wps 9000 | num_updates 8
2026-01-01 10:00:12 | INFO | train | epoch 001 | loss 7.2 | nll_loss 6.9 | moe_dropped 3.5 | ppl 119.4 | wps 2000 | num_updates 8 | wall 9
2026-01-01 10:00:12 | INFO | fairseq_cli.train | done training in 9.5 seconds
"""
HYDRA = """\
[2026-01-01 10:00:05,250][train_inner][INFO] - epoch 001:      4 / 40 loss=7.5, nll_loss=7.25, moe_l1_load_max=1.5, moe_l3_load_max=2.5, ppl=152.22, wps=1000.5, num_updates=4, wall=5
[2026-01-01 10:00:09,000][train_inner][INFO] - epoch 001:      8 / 40 loss=7, nll_loss=6.5, moe_l1_load_max=1.25, moe_l3_load_max=2, ppl=90.51, wps=3000, num_updates=8, wall=9
[2026-01-01 10:00:12,500][valid][INFO] - epoch 001 | valid on 'valid' subset | loss 6.75 | nll_loss 6.5 | moe_load_max 1.75 | moe_l1_xdev_frac 0.25 | moe_l3_xdev_frac 0.75 | ppl 90.51 | wps 9000 | num_updates 8
"""
JSON = """\
2026-01-01 10:00:05 | INFO | train_inner | {"epoch": 1, "update": 0.1, "loss": "7.5", "nll_loss": "7.25", "moe_l1_load_max": "1.5", "moe_l3_load_max": "2.5", "ppl": "152.22", "wps": "1000.5", "num_updates": "4", "wall": "5"}
2026-01-01 10:00:09 | INFO | train_inner | {"epoch": 1, "update": 0.2, "loss": "7", "nll_loss": "6.5", "moe_l1_load_max": "1.25", "moe_l3_load_max": "2", "ppl": "90.51", "wps": "3000", "num_updates": "8", "wall": "9"}
2026-01-01 10:00:12 | INFO | valid | {"epoch": 1, "valid_loss": "6.75", "valid_nll_loss": "6.5", "valid_moe_load_max": "1.75", "valid_moe_l1_xdev_frac": "0.25", "valid_moe_l3_xdev_frac": "0.75", "valid_ppl": "90.51", "valid_wps": "9000", "valid_num_updates": "8"}
"""
BARE = """\
epoch 001:      4 / 40 loss=7.5, nll_loss=7.25, moe_l1_load_max=1.5, moe_l3_load_max=2.5, ppl=152.22, wps=1000.5, num_updates=4, wall=5
epoch 001:      8 / 40 loss=7, nll_loss=6.5, moe_l1_load_max=1.25, moe_l3_load_max=2, ppl=90.51, wps=3000, num_updates=8, wall=9
epoch 001 | valid on 'valid' subset | loss 6.75 | nll_loss 6.5 | moe_load_max 1.75 | moe_l1_xdev_frac 0.25 | moe_l3_xdev_frac 0.75 | ppl 90.51 | wps 9000 | num_updates 8
"""


@pytest.mark.parametrize("text,valid_wall", [(DEFAULT, 9 + 3), (HYDRA, 9 + 3.5), (JSON, 9 + 3), (BARE, 9)])
def test_every_log_format_parses_to_the_same_records(tmp_path, text, valid_wall):
    p = tmp_path / "train.log"
    p.write_text(text)
    log = report.parse_train_log(str(p))
    inner, valid = log["train_inner"], log["valid"]
    assert [r["num_updates"] for r in inner] == [4, 8]
    assert [r["moe_l3_load_max"] for r in inner] == [2.5, 2]
    assert inner[0]["wps"] == 1000.5 and inner[1]["nll_loss"] == 6.5
    assert len(valid) == 1 and valid[0]["subset"] == "valid"
    v = valid[0]
    assert (v["loss"], v["nll_loss"], v["ppl"], v["num_updates"]) == (6.75, 6.5, 90.51, 8)
    assert v["moe_l1_xdev_frac"] == 0.25
    # no wall on validation lines: the last train_inner wall + the time since its line
    assert v["wall"] == pytest.approx(valid_wall)


def test_default_format_extras(tmp_path):
    p = tmp_path / "train.log"
    p.write_text(DEFAULT)
    log = report.parse_train_log(str(p))
    assert log["arch"] == "switch_lm" and log["done_seconds"] == 9.5
    assert log["train"][0]["moe_dropped"] == 3.5


def test_eval_log(tmp_path):
    p = tmp_path / "eval_test.log"
    p.write_text("blah\n2026 | INFO | fairseq_cli.eval_lm | Evaluated 3,025 tokens in 0.2s (13.2 tokens/s)\n"
                 "2026 | INFO | fairseq_cli.eval_lm | Loss (base 2): 6.9439, Perplexity: 123.12\n")
    v = report.parse_eval_log(str(p))
    assert (v["loss_bits"], v["ppl_printed"]) == (6.9439, 123.12)
    # the perplexity from the 4-decimal loss, consistent with fairseq's 2-decimal rounding of it
    assert v["ppl"] == pytest.approx(2 ** 6.9439) and abs(v["ppl"] - 123.12) <= 0.005
    (tmp_path / "empty.log").write_text("Traceback ...\n")
    assert report.parse_eval_log(str(tmp_path / "empty.log")) is None


def make_run(root, name, text, meta=None, evals=None):
    d = root / name
    d.mkdir(parents=True)
    (d / "train.log").write_text(text)
    for ev, (loss, ppl) in (evals or {}).items():
        (d / f"eval_{ev}.log").write_text(f"x | Loss (base 2): {loss}, Perplexity: {ppl}\n")
    if meta is not None:
        (d / "run.json").write_text(json.dumps(meta))
    return str(d)


def test_run_summary_figures(tmp_path):
    d = make_run(tmp_path, "r", DEFAULT, evals={"test": (6.0, 64.0)})
    run = report.load_run(d)
    assert run["updates"] == 8 and run["arch"] == "switch_lm"
    assert run["wps"] == 3000  # median of the intervals after the first
    assert run["wall"] == 9
    assert run["load_series"] == {1: [(4, 1.5), (8, 1.25)], 3: [(4, 2.5), (8, 2.0)]}
    assert report.metric_value(run) == 90.51
    assert report.metric_value(run, "eval", "test") == 64.0
    run["unit"] = "bpc"  # character level: the figure is the loss in bits
    assert report.metric_value(run) == 6.5 and report.metric_value(run, "eval", "test") == 6.0


def test_summary_prints_flops_and_params_and_marks_unequal_compute(tmp_path):
    def flops(d, f, params):
        with open(os.path.join(d, "flops.json"), "w") as fh:
            json.dump({"active_flops_per_token": {"train": f, "eval": f}, "total_params": params,
                       "active_params": {"train": 1, "eval": 1}}, fh)

    meta = dict(script="x", dataset="syn", status="trained")
    a = make_run(tmp_path, "a", DEFAULT, meta=dict(meta, name="a"), evals={"test": (6.0, 64.0)})
    b = make_run(tmp_path, "b", DEFAULT, meta=dict(meta, name="b"), evals={"test": (6.0, 64.0)})
    c = make_run(tmp_path, "c", DEFAULT, meta=dict(meta, name="c"), evals={"test": (6.0, 64.0)})
    make_run(tmp_path, "d", DEFAULT, meta=dict(meta, name="d"), evals={"test": (6.0, 64.0)})  # no flops.json
    flops(a, 2.0e6, 1000)
    flops(b, 2.03e6, 5000)  # 1.5% more: equal compute
    flops(c, 2.2e6, 7000)   # 10% more: marked
    rows = {line.split("|")[1].strip(): [x.strip() for x in line.strip("|").split("|")]
            for line in report.summary_table([report.load_run(str(tmp_path / n)) for n in "abcd"])[2:]}
    assert rows["a"][-3:] == ["1,000", "2.000M", "1.000x"]
    assert rows["b"][-3:] == ["5,000", "2.030M", "1.015x"]
    assert rows["c"][-3:] == ["7,000", "2.200M", "1.100x **(>2% off)**"]
    assert rows["d"][-3:] == ["-", "-", "-"]


def test_value_at_wall_interpolates_linearly():
    run = {"unit": "ppl", "valid_curve": [(10, 100.0, 7.0, 80.0), (20, 200.0, 6.0, 40.0)]}
    assert report.value_at_wall(run, 150.0) == pytest.approx(60.0)
    assert report.value_at_wall(run, 100.0) == 80.0
    assert report.value_at_wall(run, 50.0) is None and report.value_at_wall(run, 250.0) is None


def _valid_line(updates, nll, wall_ts, extra=""):
    return (f"2026-01-01 10:{wall_ts // 60:02d}:{wall_ts % 60:02d} | INFO | valid | epoch 001 | valid on 'valid' "
            f"subset | loss {nll} | nll_loss {nll} | {extra}ppl {2 ** nll:.2f} | num_updates {updates}\n")


def _inner_line(updates, wps, wall):
    return (f"2026-01-01 10:{wall // 60:02d}:{wall % 60:02d} | INFO | train_inner | epoch 001:  {updates} / 99 "
            f"loss=7, nll_loss=7, ppl=128, wps={wps}, num_updates={updates}, wall={wall}\n")


def test_base_table_throughput_ratios_and_paper_numbers(tmp_path):
    metas = {"dense": ("data_parallel", "transformer_lm", 1000), "switch": ("switch", "switch_lm", 800),
             "base": ("base", "base_lm", 900)}
    dirs = []
    for name, (key, arch, wps) in metas.items():
        text = _inner_line(10, 1, 10) + _inner_line(20, wps, 20) + _valid_line(20, 5.0, 20)
        meta = dict(script="base_throughput_quality", scale="tiny", name=name, label=name, arch=arch,
                    group="main", dataset="synthetic", unit="ppl", devices=1, meta={"paper_key": key},
                    evals=[], status="trained")
        dirs.append(make_run(tmp_path, name, text, meta))
    md = report.build_report(dirs, str(tmp_path))
    row = next(line for line in md.splitlines() if line.startswith("| switch |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # ours: 800 / 1000; paper: Switch 469k vs data parallel 600k
    assert cells[1] == "800" and cells[2] == "0.80" and cells[3] == "469,000" and cells[4] == f"{469 / 600:.2f}"
    assert any(line.startswith("| Model parallel x2 | not run") for line in md.splitlines())
    assert os.path.exists(tmp_path / "plots" / "valid_vs_updates_base_throughput_quality_main.png")


def test_hash_and_hyper_tables_put_published_numbers_beside_ours(tmp_path):
    dirs = []
    for name, htype, ppl in (("hash_balanced", "balanced", 40.0), ("hash_oracle", "oracle", 3.0)):
        meta = dict(script="hash_ablation", name=name, label=f"Hash ({htype})", arch="hash_lm", group="ablation",
                    dataset="synthetic", unit="ppl", meta={"hash_type": htype, "experts": 8, "router": "hash"},
                    evals=[{"name": "test", "log": "eval_test.log"}] if htype != "oracle" else [])
        dirs.append(make_run(tmp_path, name, _valid_line(10, math.log2(ppl), 5), meta,
                             evals={"test": (5.0, 32.0)} if htype != "oracle" else None))
    for kind, k2, k8 in (("hyper", (1.5, 2.83), (1.25, 2.38)), ("dense", (1.75, 3.36), None)):
        evs = {"k2": k2, "k8": k8} if k8 else {"test": k2}
        meta = dict(script="hyperrouter_tables", name=f"{kind}_b", label=kind, arch="x", group="synthetic-bytes",
                    dataset="synthetic-bytes", dataset_label="synthetic (bytes)", unit="bpc",
                    meta={"kind": kind, "experts": 8},
                    evals=[{"name": n, "log": f"eval_{n}.log"} for n in evs])
        dirs.append(make_run(tmp_path, f"{kind}_b", _valid_line(10, 2.0, 5), meta, evals=evs))
    md = report.build_report(dirs, str(tmp_path))
    lines = md.splitlines()
    bal = next(x for x in lines if x.startswith("| Hash (balanced) | 8 |"))
    assert "| 40.000 | 32.000 |" in bal and bal.rstrip().endswith("| 23.23 |")
    orc = next(x for x in lines if x.startswith("| Hash (oracle) | 8 |"))
    assert "refuses" in orc and orc.rstrip().endswith("| 1.97 |")
    # BPC rows: fairseq-eval-lm's base-2 loss; the stand-in's published enwik8 figure beside it
    hyp = next(x for x in lines if x.startswith("| HyperRouter |"))
    assert hyp == "| HyperRouter | 1.500 | 1.250 | 1.141 |"
    dense = next(x for x in lines if x.startswith("| Dense |"))
    assert dense == "| Dense | 1.750 | 1.750 | 1.166 |"
    assert "unverified" in md


def test_sam_table_averages_device_traffic_over_layers(tmp_path):
    meta = dict(script="sam_k_quality", name="sam_k2", label="SAM K=2", arch="sam_lm", group="main",
                dataset="synthetic", unit="ppl", meta={"kind": "sam", "K": 2, "groups": 2}, evals=[])
    d = make_run(tmp_path, "sam_k2", DEFAULT, meta)
    md = report.build_report([d], str(tmp_path))
    row = next(x for x in md.splitlines() if x.startswith("| SAM K=2 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[6] == "0.500"  # mean of 0.25 and 0.75


def test_plots_are_png_files(tmp_path):
    d = make_run(tmp_path, "r", DEFAULT)
    run = report.load_run(d)
    for path in (report.plot_load(run, str(tmp_path / "load.png")),
                 report.plot_valid([run], str(tmp_path / "v.png"), "wall", "t")):
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_cli_finds_runs_recursively_and_refuses_empty_dirs(tmp_path, capsys):
    make_run(tmp_path / "a", "r1", DEFAULT)
    make_run(tmp_path / "b", "r2", HYDRA)
    assert report.main([str(tmp_path), "--quiet"]) == 0
    text = (tmp_path / "report.md").read_text()
    assert "| r1 |" in text and "| r2 |" in text
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no run directory"):
        report.main([str(tmp_path / "empty")])


def test_k_sweep_and_routing_analysis_sections(tmp_path):
    """sweep_topk.py's JSON (its own table renderer reused, plus BPC on character data) and an
    analysis.md found next to the runs."""
    d = make_run(tmp_path, "hyper_b", DEFAULT, dict(script="hyperrouter_tables", name="hyper_b", label="hyper",
                                                    arch="hyper_lm", dataset="synthetic-bytes", unit="bpc",
                                                    meta={"kind": "hyper", "experts": 4}, evals=[]))
    ckpt = os.path.join(d, "checkpoints", "checkpoint_last.pt")
    rows = [dict(label="hyper", checkpoint=ckpt, arch="hyper_lm", router="hyper", experts=4, num_updates=8,
                 train_top_k=4, eval_top_k=0, has_eval_k=True, ppl={"1": 4.0, "2": 2.0}, loss={"1": 2.0, "2": 1.0},
                 fixed_ppl=None),
            dict(label="dense", checkpoint="/elsewhere/c.pt", arch="transformer_lm", router=None, experts=None,
                 num_updates=8, train_top_k=None, eval_top_k=None, has_eval_k=False, ppl={}, loss={},
                 fixed_ppl=2.5, fixed_loss=math.log2(2.5))]
    (tmp_path / "sweep_x").mkdir()
    (tmp_path / "sweep_x" / "topk_sweep.json").write_text(json.dumps({"ks": [1, 2], "rows": rows}))
    (tmp_path / "analysis_y").mkdir()
    (tmp_path / "analysis_y" / "analysis.md").write_text(
        "# Routing analysis: c.pt on valid\n\n## Load per layer\n\n| layer | x |\n|---|---|\n| l1 | 0.9 |\n\n"
        "## Layer l1: each expert's most frequent tokens\n\n| expert | tokens |\n")
    md = report.build_report([d], str(tmp_path))
    assert "| hyper | hyper_lm | 4 | 4 | 4.000 | 2.000 |" in md  # sweep_topk.render_table's row
    assert "| hyper | 2.000 | 1.000 |" in md and f"| dense | {math.log2(2.5):.3f} | {math.log2(2.5):.3f} |" in md
    assert (tmp_path / "plots" / "topk_sweep_x.png").exists()
    assert "### Routing analysis: c.pt on valid" in md and "| l1 | 0.9 |" in md
    assert "each expert's most frequent tokens" not in md  # the long per-expert tables stay in the file

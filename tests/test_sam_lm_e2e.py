"""sam_lm through fairseq: options reach the layers, fairseq-train logs SAM's losses and
metrics (with the criterion's per-name weights applied), fairseq-eval-lm reads the checkpoint."""

import math
import re

import pytest

from fairseq import checkpoint_utils, options, tasks
from fairseq.dataclass.utils import convert_namespace_to_omegaconf

import moe_plugin  # noqa: F401
from tests.conftest import TINY_MODEL, TINY_TRAIN, USER_DIR, eval_lm_loss, run_cli

SMALL = ["--decoder-layers", "2", "--decoder-embed-dim", "16", "--decoder-ffn-embed-dim", "32",
         "--decoder-attention-heads", "2", "--decoder-input-dim", "16", "--decoder-output-dim", "16",
         "--tokens-per-sample", "16"]


def build(data_bin, *extra):
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(
        parser, [data_bin, "--task", "language_modeling", "--user-dir", USER_DIR, "--arch", "sam_lm", "--cpu",
                 "--criterion", "moe_cross_entropy", *SMALL, *map(str, extra)])
    cfg = convert_namespace_to_omegaconf(args)
    return tasks.setup_task(cfg.task).build_model(cfg.model)


def test_defaults_and_options_reach_the_router(tiny_corpus):
    _, data_bin = tiny_corpus
    (_, layer), = build(data_bin, "--moe-expert-count", 8).moe_layers()
    r = layer.router
    assert (r.name, r.num_groups, r.top_k, r.renormalize, r.expert_balance) == ("sam", 2, 2, False, "in_group")
    assert r.gate_bias is None
    (_, layer), = build(data_bin, "--moe-expert-count", 12, "--sam-groups", 4, "--moe-top-k", 3,
                        "--sam-renormalize", "--sam-expert-balance", "global", "--sam-router-bias").moe_layers()
    r = layer.router
    assert (r.num_groups, r.experts_per_group, r.top_k, r.renormalize, r.expert_balance) == (4, 3, 3, True, "global")
    assert r.gate_bias is not None and "gate_bias" in dict(r.named_parameters())
    assert (r.balance_slots, r.align_reduction, r.align_detach_kth, r.capacity_rounding) == ("first", "mean", False, "total")
    # Hetu's formulation (docs/sam.md): every option as a fairseq flag
    (_, layer), = build(data_bin, "--moe-expert-count", 8, "--sam-expert-balance", "global", "--sam-balance-slots", "all",
                        "--sam-align-reduction", "sum", "--sam-align-detach-kth", "--sam-router-bias",
                        "--moe-router-init", "xavier", "--sam-capacity-rounding", "per_slot").moe_layers()
    r = layer.router
    assert (r.expert_balance, r.balance_slots, r.align_reduction, r.align_detach_kth, r.capacity_rounding) == (
        "global", "all", "sum", True, "per_slot")
    assert r.gate_bias is not None


@pytest.mark.parametrize("extra,option", [
    (["--moe-expert-count", 8, "--sam-groups", 3], "--sam-groups"),
    (["--moe-expert-count", 8, "--sam-groups", 4, "--moe-top-k", 3], "--moe-top-k"),
    (["--sam-balance-slots", "second"], "--sam-balance-slots"),
    (["--sam-align-reduction", "max"], "--sam-align-reduction"),
    (["--sam-capacity-rounding", "floor"], "--sam-capacity-rounding"),
])
def test_bad_options_fail_at_build_time(tiny_corpus, extra, option):
    _, data_bin = tiny_corpus
    with pytest.raises(ValueError, match=option):
        build(data_bin, *extra)


@pytest.mark.e2e
def test_sam_lm_trains_and_evaluates(tiny_corpus, tmp_path):
    _, data_bin = tiny_corpus
    weights = {"balance_group": 0.02, "balance_expert": 0.01, "align": 0.1}
    proc = run_cli("train", data_bin, *TINY_TRAIN, *TINY_MODEL, "--arch", "sam_lm", "--criterion", "moe_cross_entropy",
                   "--moe-expert-count", "8", "--sam-groups", "4", "--moe-top-k", "2", "--sam-renormalize",
                   "--moe-loss-weights", ",".join(f"{k}={v}" for k, v in weights.items()),
                   "--max-update", "6", "--save-dir", tmp_path)
    out = proc.stdout + proc.stderr
    # the MoE layer is decoder layer 1 (--moe-freq 2 of 2 layers)
    for split in ("train", "valid"):
        line = [l for l in out.splitlines() if f"| {split} |" in l][-1]
        logged = {k: float(v) for k, v in re.findall(r"\b(moe_l1_\w+) ([-\d.]+)", line)}
        for name in ("loss_balance_group", "loss_balance_expert", "loss_align", "group_load_max", "group_load_cv",
                     "topk_in_group", "top1_in_group", "xdev_tokens", "xdev_slots", "xdev_frac", "topk_xdev_frac", "load_max"):
            assert f"moe_l1_{name}" in logged, (split, name, line)
        # the criterion weighted each loss by its name (z has weight 0); 3-decimal rounding
        expected = sum(w * logged[f"moe_l1_loss_{k}"] for k, w in weights.items())
        assert logged["moe_l1_aux"] == pytest.approx(expected, abs=3e-3)
        # SAM: a token visits at most one other device; the shares are fractions
        assert 0.0 <= logged["moe_l1_xdev_frac"] <= 1.0
        assert 0.0 <= logged["moe_l1_topk_in_group"] <= logged["moe_l1_top1_in_group"] <= 1.0
    ckpt = tmp_path / "checkpoint_last.pt"
    (model,), _ = checkpoint_utils.load_model_ensemble([str(ckpt)])
    (_, layer), = model.moe_layers()
    assert (layer.router.num_groups, layer.router.top_k, layer.router.renormalize) == (4, 2, True)
    ev = run_cli("eval_lm", data_bin, "--user-dir", USER_DIR, "--path", ckpt, "--cpu", "--tokens-per-sample", "32",
                 "--max-tokens", "512")
    loss = eval_lm_loss(ev.stdout + ev.stderr)
    assert math.isfinite(loss) and 0 < loss < 20

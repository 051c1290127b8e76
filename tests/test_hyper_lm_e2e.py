"""hyper_lm and smoe_dropout_lm through fairseq-train / fairseq-eval-lm: the K schedule of every
update against the reference's rule (across a resume from checkpoint_last, and with the
schedule length defaulting to --max-update), the frozen parts absent from fairseq's optimizer
and unchanged by training, evaluation at any K (--model-overrides), and moe_plugin.tools.sweep_topk."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, TINY_MODEL, TINY_TRAIN, run_cli
from tests.test_topk_schedule import reference_gate_number

pytestmark = pytest.mark.e2e

E = 4
EVAL = ["--tokens-per-sample", "32", "--max-tokens", "512"]
# one MoE layer (layer 1) of E experts; hyper: K rises 1 -> 4 over 4 updates, then stays:
# K(n) = 1 + round(3 n / 4) (half to even) = 1, 2, 3, 3, 4, 4 (clipped) for n = 0..5; an explicit
# length, since the two runs of the resume test have different --max-update
HYPER = ["--arch", "hyper_lm", "--moe-expert-count", str(E), "--moe-freq", "2", "--moe-top-k-schedule",
         "linear_increase", "--moe-top-k-min", "1", "--moe-top-k-max", "4", "--moe-top-k-schedule-updates", "4"]
# smoe_dropout: the reference's multi-step list (1, 2, 4, 8, 16)[5 n // S] clipped to [1, E = 4], over the
# default length S = --max-update = 4: K = 1, 2, 4, 4
SMOE = ["--arch", "smoe_dropout_lm", "--moe-expert-count", str(E), "--moe-freq", "2", "--moe-top-k-schedule",
        "multi_step_increase", "--moe-top-k-min", "1"]


def train(data_bin, save_dir, arch_args, max_update):
    proc = run_cli("train", data_bin, *TINY_TRAIN, *TINY_MODEL, "--criterion", "moe_cross_entropy",
                   "--max-update", max_update, "--save-dir", save_dir, "--disable-validation", *arch_args)
    return proc.stdout + proc.stderr


def logged_top_k(log):
    """{num_updates: K logged by the update's forward} from train_inner lines (layer 1 = the MoE layer)."""
    out = {}
    for line in log.splitlines():
        if "| train_inner |" in line:
            n = re.search(r"num_updates=(\d+)", line)
            k = re.search(r"moe_l1_top_k=([\d.]+)", line)
            if n and k:
                out[int(n.group(1))] = float(k.group(1))
    return out


@pytest.fixture(scope="module")
def hyper_run(tiny_corpus, tmp_path_factory):
    """hyper_lm: 3 updates, then fairseq-train resumed from checkpoint_last up to 6."""
    _, data_bin = tiny_corpus
    save = tmp_path_factory.mktemp("hyper")
    first = train(data_bin, save, HYPER, 3)
    second = train(data_bin, save, HYPER, 6)
    return data_bin, save, first, second


@pytest.fixture(scope="module")
def smoe_run(tiny_corpus, tmp_path_factory):
    _, data_bin = tiny_corpus
    save = tmp_path_factory.mktemp("smoe")
    return data_bin, save, train(data_bin, save, SMOE, 4)


@pytest.fixture(scope="module")
def sweep(hyper_run, smoe_run, tmp_path_factory):
    data_bin, hyper_dir, _, _ = hyper_run
    _, smoe_dir, _ = smoe_run
    out = tmp_path_factory.mktemp("sweep")
    proc = subprocess.run(
        [sys.executable, "-m", "moe_plugin.tools.sweep_topk", data_bin,
         f"hyper={hyper_dir / 'checkpoint_last.pt'}", f"smoe={smoe_dir / 'checkpoint_last.pt'}",
         "--out", out, "--ks", "1,2,4,8", "--", *EVAL],
        cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return out


def test_schedule_continues_after_resume(hyper_run):
    _, save, first, second = hyper_run
    a, b = logged_top_k(first), logged_top_k(second)
    assert sorted(a) == [1, 2, 3] and sorted(b) == [4, 5, 6], (a, b)  # the second run resumed
    # update u runs its forward after u - 1 updates
    for u, k in {**a, **b}.items():
        assert k == reference_gate_number("linear_increase", u - 1, 4, 1, 4), (u, k)
    assert [b[u] for u in (4, 5, 6)] == [3, 4, 4]  # a restart from 0 would give 1, 2, 3
    state = torch.load(save / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    assert state["optimizer_history"][-1]["num_updates"] == 6
    # the buffer holds the count of the last training forward (fairseq calls set_num_updates before
    # each forward, not after the last update), and it survives fairseq's loader
    counts = [int(v) for k, v in state["model"].items() if k.endswith("router.num_updates")]
    assert counts == [5]
    (_, layer), = _load(save / "checkpoint_last.pt").moe_layers()
    layer.router.eval_top_k = 0  # evaluation at the training K reached
    assert int(layer.router.num_updates) == 5 and layer.router.eval().top_k == 4


def test_schedule_length_defaults_to_max_update(smoe_run):
    _, _, log = smoe_run
    logged = logged_top_k(log)
    assert sorted(logged) == [1, 2, 3, 4]
    assert [logged[u] for u in (1, 2, 3, 4)] == [reference_gate_number("multi_step_increase", u - 1, 4, 1, 4)
                                                 for u in (1, 2, 3, 4)] == [1, 2, 4, 4]


def _load(ckpt, **overrides):
    from fairseq import checkpoint_utils

    models, _ = checkpoint_utils.load_model_ensemble([str(ckpt)], arg_overrides=overrides or None)
    return models[0]


def test_frozen_router_parts_are_not_in_the_optimizer_and_do_not_train(hyper_run, smoe_run):
    from moe_plugin.routing import build_router

    for save, frozen_prefix in ((hyper_run[1], "hypernet."), (smoe_run[1], "gate.")):
        ckpt = save / "checkpoint_last.pt"
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        model = _load(ckpt)
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt_state = state["last_optimizer_state"]["state"]
        # fairseq's Adam keeps one moment per optimised parameter, in parameter order
        assert len(opt_state) == len(trainable) < len(list(model.parameters()))
        assert [tuple(opt_state[i]["exp_avg"].shape) for i in range(len(trainable))] == \
               [tuple(p.shape) for p in trainable]
        (index, layer), = model.moe_layers()
        router = layer.router
        assert all(not p.requires_grad for n, p in router.named_parameters() if n.startswith(frozen_prefix))
        # the frozen part is exactly its seeded initialisation after training
        fresh = build_router(model.decoder.moe_cfg, router.model_dim, layer_index=index)
        for n, p in router.named_parameters():
            if n.startswith(frozen_prefix):
                assert torch.equal(p, getattr_path(fresh, n)), n
        if hasattr(router, "embedding_1Q"):  # HyperRouter: the embedding learned
            assert router.embedding_1Q.requires_grad
            assert not torch.equal(router.embedding_1Q, fresh.embedding_1Q)


def getattr_path(module, name):
    for part in name.split("."):
        module = getattr(module, part)
    return module


def test_eval_k_override_changes_active_experts(hyper_run):
    from moe_plugin.models.moe_lm import MoELanguageModel  # noqa: F401  (registers the model)

    ckpt = hyper_run[1] / "checkpoint_last.pt"
    tokens = torch.randint(4, 100, (3, 16), generator=torch.Generator().manual_seed(0))
    # None: the default, all E = 4 experts; 0: the K of the last training update (K(5) = 4)
    for override, k in ((None, 4), (0, 4), (1, 1), (2, 2)):
        model = _load(ckpt, **({} if override is None else {"moe_eval_top_k": override})).eval()
        with torch.no_grad():
            model(tokens)
        (_, layer), = model.moe_layers()
        assert layer.router.top_k == k
        assert int(layer.last_stats["tokens_per_expert"].sum()) == k * tokens.numel()


def test_eval_lm_at_any_k_and_the_sweep_script(sweep):
    # the sweep runs fairseq-eval-lm's parser and main with --model-overrides "{'moe_eval_top_k': K}"
    # (tests/test_e2e.py runs the fairseq-eval-lm command itself on both archs)
    result = json.load(open(sweep / "topk_sweep.json"))
    rows = {r["label"]: r for r in result["rows"]}
    assert set(rows) == {"hyper", "smoe"}
    for label, arch in (("hyper", "hyper_lm"), ("smoe", "smoe_dropout_lm")):
        r = rows[label]
        assert r["arch"] == arch and r["experts"] == E and r["train_top_k"] == 4
        assert sorted(r["ppl"], key=int) == ["1", "2", "4"]  # K = 8 > E skipped
        assert len({round(v, 6) for v in r["loss"].values()}) == 3  # K changes the perplexity
    md = open(sweep / "topk_sweep.md").read()
    assert "| hyper | hyper_lm | 4 | 4 |" in md and "| smoe | smoe_dropout_lm | 4 | 4 |" in md
    with open(sweep / "topk_sweep.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(sweep / "topk_sweep.png") > 5000


def test_sweep_rerenders_from_json(sweep, tmp_path):
    from moe_plugin.tools import sweep_topk as mod

    mod.main(["DATA", "--from-json", str(sweep / "topk_sweep.json"), "--out", str(tmp_path), "--ks", "1,2,4,8",
              "--", *EVAL])
    table = lambda p: [l for l in open(p).read().splitlines() if l.startswith("|")]  # noqa: E731
    assert table(tmp_path / "topk_sweep.md") == table(sweep / "topk_sweep.md")
    assert os.path.getsize(tmp_path / "topk_sweep.png") > 5000

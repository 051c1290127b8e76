"""Evaluation does not depend on the batch: fairseq-eval-lm gives every token the same score
whatever --max-tokens is, whichever sequences share its batch and in whatever order, for the
dense baseline and every registered MoE arch (the default --moe-eval-capacity-factor is inf:
no token is dropped in evaluation). The old default, a finite factor, is shown to fail the
same checks, so they can fail.

Checkpoints are the ones test_e2e.py trains (tests/_e2e_runs.py: 6 updates, 4 experts). An arch
whose evaluation depends on the batch by design (_e2e_runs.BATCH_DEPENDENT_EVAL: expert choice)
is not checked here; tests/test_expert_choice.py shows that it does depend."""

import math

import pytest
import torch

from moe_plugin.moe_layer import MoELayer
from moe_plugin.models.archs import ARCHS
from tests import _e2e_runs
from tests.conftest import USER_DIR

pytestmark = pytest.mark.e2e

TOL = 1e-5


def loss_base2(scores):
    """fairseq-eval-lm's loss: minus the mean natural-log score over tokens, in bits."""
    flat = [s for v in scores.values() for s in v]
    return -sum(flat) / len(flat) / math.log(2)


def max_token_difference(a, b):
    assert sorted(a) == sorted(b), "the two runs scored different sequences"
    worst = 0.0
    for i in a:
        assert len(a[i]) == len(b[i]), i
        worst = max([worst] + [abs(x - y) for x, y in zip(a[i], b[i])])
    return worst


@pytest.mark.parametrize("arch", _e2e_runs.BATCH_INVARIANT_ARCHS)
def test_eval_lm_scores_do_not_depend_on_max_tokens(tiny_corpus, tmp_path_factory, arch):
    """fairseq-eval-lm as a user runs it: --max-tokens 64 puts 2 sequences of 32 tokens in a
    batch, 2048 puts all of them in one or two; every token's score and the loss agree."""
    _, data_bin = tiny_corpus
    ckpt, _ = _e2e_runs.trained(tmp_path_factory, data_bin, arch)
    runs = [_e2e_runs.word_scores(_e2e_runs.eval_lm(data_bin, ckpt, *_e2e_runs.EVAL_ARGS, "--max-tokens", m))
            for m in (64, 2048)]
    assert max_token_difference(*runs) <= TOL
    assert abs(loss_base2(runs[0]) - loss_base2(runs[1])) <= TOL


def test_old_eval_capacity_factor_depends_on_max_tokens(tiny_corpus, tmp_path_factory):
    """The same check with the old default --moe-eval-capacity-factor 2.0 fails for switch_lm:
    capacity is counted per batch, so which tokens are dropped depends on the batch."""
    _, data_bin = tiny_corpus
    ckpt, _ = _e2e_runs.trained(tmp_path_factory, data_bin, "switch_lm")
    runs = [_e2e_runs.word_scores(_e2e_runs.eval_lm(data_bin, ckpt, *_e2e_runs.EVAL_ARGS, "--max-tokens", m,
                                                    "--model-overrides", "{'moe_eval_capacity_factor': 2.0}"))
            for m in (64, 2048)]
    assert max_token_difference(*runs) > 1e-3


# --- in process: fairseq-eval-lm's own steps, with a context window and permuted batches --


def load_for_eval(data_bin, ckpt, context_window, overrides=None):
    """Model, task and test set as fairseq_cli/eval_lm.py's main builds them."""
    from fairseq import checkpoint_utils, options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    parser = options.get_eval_lm_parser()
    argv = [data_bin, "--user-dir", USER_DIR, "--path", ckpt, "--cpu", "--tokens-per-sample", "32",
            "--context-window", str(context_window), "--gen-subset", "test"]
    if overrides:
        argv += ["--model-overrides", repr(overrides)]
    cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(parser, argv))
    cfg.task.tokens_per_sample -= context_window
    task = tasks.setup_task(cfg.task)
    models, _, task = checkpoint_utils.load_model_ensemble_and_task(
        [ckpt], arg_overrides=eval(cfg.common_eval.model_overrides), task=task)
    model = models[0]
    model.prepare_for_inference_(cfg)
    model.eval()
    task.load_dataset("test")
    return model, task, task.dataset("test")


def permuted(sample, perm):
    """The same batch with its rows in order ``perm``."""
    out = dict(sample)
    out["net_input"] = {k: v[perm] for k, v in sample["net_input"].items()}
    out["target"] = sample["target"][perm]
    out["id"] = sample["id"][perm]
    if "start_indices" in sample:
        out["start_indices"] = [sample["start_indices"][i] for i in perm.tolist()]
    return out


def scores_by_id(model, task, dataset, max_tokens, context_window, reverse=False):
    """Per-token log-probs by sample id over the test set, batched as fairseq-eval-lm batches
    (``reverse``: every batch with its rows reversed)."""
    from fairseq import utils
    from fairseq.sequence_scorer import SequenceScorer

    scorer = SequenceScorer(task.target_dictionary)
    itr = task.eval_lm_dataloader(dataset=dataset, max_tokens=max_tokens, max_positions=utils.resolve_max_positions(
        model.max_positions()), num_workers=0, context_window=context_window)
    out, sizes = {}, []
    with torch.no_grad():
        for sample in itr:
            if "net_input" not in sample:
                continue
            B = sample["id"].numel()
            sizes.append(B)
            if reverse:
                sample = permuted(sample, torch.arange(B - 1, -1, -1))
            for i, hypos in enumerate(scorer.generate([model], sample)):
                out[int(sample["id"][i])] = hypos[0]["positional_scores"].tolist()
    return out, sizes


def batch_orders(tiny_corpus, tmp_path_factory, arch, overrides=None, context_window=16):
    _, data_bin = tiny_corpus
    ckpt, _ = _e2e_runs.trained(tmp_path_factory, data_bin, arch)
    model, task, dataset = load_for_eval(data_bin, ckpt, context_window, overrides)
    # --max-tokens counts the tokens scored (tokens_per_sample - context_window = 16 per
    # sequence): 16 = one sequence per batch; 4096 = all the test set's in one batch
    alone, alone_sizes = scores_by_id(model, task, dataset, 16, context_window)
    big, big_sizes = scores_by_id(model, task, dataset, 4096, context_window)
    big_rev, _ = scores_by_id(model, task, dataset, 4096, context_window, reverse=True)
    assert set(alone_sizes) == {1} and big_sizes == [len(dataset)] and len(dataset) > 100
    return model, (alone, big, big_rev)


@pytest.mark.parametrize("arch", _e2e_runs.BATCH_INVARIANT_ARCHS)
def test_scores_do_not_depend_on_batch_or_order_in_process(tiny_corpus, tmp_path_factory, arch):
    """With a context window of 16 (fairseq's LMContextWindowDataset: the sequences of a
    batch have different lengths, the short ones padded): each sequence alone, all of them
    in one batch, and all of them in reverse order score every token alike."""
    _, (alone, big, big_rev) = batch_orders(tiny_corpus, tmp_path_factory, arch)
    assert max_token_difference(alone, big) <= TOL
    assert max_token_difference(big, big_rev) <= TOL


@pytest.mark.parametrize("arch", _e2e_runs.BATCH_INVARIANT_ARCHS)
def test_finite_eval_capacity_depends_on_batch_and_order(tiny_corpus, tmp_path_factory, arch):
    """The same checks fail with a finite evaluation capacity (factor 1.0) for every arch
    whose router has one: capacity is counted per batch. Switch and GShard also give the
    slots to the first tokens of a batch first (GShard's Algorithm 1), so the order matters
    too (another router may rank the tokens otherwise, e.g. by their scores)."""
    model, (alone, big, big_rev) = batch_orders(tiny_corpus, tmp_path_factory, arch,
                                                overrides={"moe_eval_capacity_factor": 1.0})
    routers = [m.router for m in model.modules() if isinstance(m, MoELayer)]
    if not any(getattr(r, "eval_capacity_factor", None) == 1.0 for r in routers):
        pytest.skip(f"{arch}: no router with an evaluation capacity")
    assert max_token_difference(alone, big) > 1e-3
    if ARCHS[arch][0] in ("switch", "gshard"):
        assert max_token_difference(big, big_rev) > 1e-3

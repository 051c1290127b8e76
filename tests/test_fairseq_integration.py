"""moe_lm inside fairseq: registration, option parsing, token alignment, incremental decoding,
bad input, and the moe_cross_entropy criterion's arithmetic and metric reduction."""

import math

import pytest
import torch
import torch.nn.functional as F

from fairseq import metrics, options, tasks
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq.models import ARCH_MODEL_REGISTRY

import moe_plugin  # noqa: F401
from moe_plugin.moe_layer import MoELayer
from moe_plugin.routing import ARCHS
from tests.helpers import lm_sample
from tests.conftest import TINY_MODEL, USER_DIR

SMALL = ["--decoder-layers", "4", "--decoder-embed-dim", "16", "--decoder-ffn-embed-dim", "32",
         "--decoder-attention-heads", "2", "--decoder-input-dim", "16", "--decoder-output-dim", "16",
         "--tokens-per-sample", "16", "--dropout", "0"]


def parse(data_bin, arch, *extra):
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(
        parser, [data_bin, "--task", "language_modeling", "--user-dir", USER_DIR, "--arch", arch, "--cpu",
                 "--criterion", "moe_cross_entropy", "--max-update", "100", *SMALL, *map(str, extra)])
    return convert_namespace_to_omegaconf(args)


def build(data_bin, arch, *extra):
    cfg = parse(data_bin, arch, *extra)
    task = tasks.setup_task(cfg.task)
    torch.manual_seed(0)
    model = task.build_model(cfg.model)
    criterion = task.build_criterion(cfg.criterion)
    return cfg, task, model, criterion


def test_archs_are_registered():
    for arch in ("switch_lm", "gshard_lm"):
        assert arch in ARCHS
    for arch in ARCHS:
        assert ARCH_MODEL_REGISTRY[arch].__name__ == "MoELanguageModel"


@pytest.mark.parametrize("arch", ["switch_lm", "gshard_lm"])
def test_options_reach_the_layers(tiny_corpus, arch):
    _, data_bin = tiny_corpus
    _, _, model, _ = build(data_bin, arch, "--moe-expert-count", 6, "--moe-layers", "0,2",
                           "--moe-expert-ffn-dim", 12, "--moe-capacity-factor", 1.5)
    layers = model.moe_layers()
    assert [i for i, _ in layers] == [0, 2]
    for _, layer in layers:
        assert layer.num_experts == 6 and layer.experts.ffn_dim == 12
        assert layer.router.name == ARCHS[arch][0]
        assert layer.router.capacity_factor == 1.5
        assert layer.router.top_k == (2 if arch == "gshard_lm" else 1)
    # --moe-freq 2 over 4 layers -> layers 1 and 3; dense layers keep fairseq's fc1/fc2
    _, _, model, _ = build(data_bin, arch, "--moe-freq", 2)
    assert [i for i, _ in model.moe_layers()] == [1, 3]
    assert isinstance(model.decoder.layers[0].fc1, torch.nn.Linear)


@pytest.mark.parametrize(
    "extra,option",
    [
        (["--moe-top-k", "3", "--moe-router", "switch"], "--moe-top-k"),
        (["--moe-expert-count", "0"], "--moe-expert-count"),
        (["--moe-capacity-factor", "0"], "--moe-capacity-factor"),
        (["--moe-capacity-factor", "-1"], "--moe-capacity-factor"),
        (["--moe-eval-capacity-factor", "0"], "--moe-eval-capacity-factor"),
        (["--moe-layers", "1,4"], "--moe-layers"),
        (["--moe-layers", "a"], "--moe-layers"),
        (["--moe-freq", "9"], "--moe-freq"),
        (["--moe-router", "nope"], "--moe-router"),
        (["--moe-second-expert-policy", "best"], "--moe-second-expert-policy"),
    ],
)
def test_bad_input_is_one_clear_error_at_build_time(tiny_corpus, extra, option):
    _, data_bin = tiny_corpus
    arch = "gshard_lm" if "policy" in option else "switch_lm"
    with pytest.raises(ValueError) as err:
        build(data_bin, arch, *extra)
    msg = str(err.value)
    assert msg.startswith(option) and ("allowed" in msg or "must be" in msg), msg


def test_gshard_top_k_larger_than_expert_count(tiny_corpus):
    _, data_bin = tiny_corpus
    with pytest.raises(ValueError, match=r"--moe-top-k: 2 .*--moe-expert-count 1; allowed: 1\.\.1"):
        build(data_bin, "gshard_lm", "--moe-expert-count", 1)


def test_unknown_option_is_refused(tiny_corpus):
    _, data_bin = tiny_corpus
    with pytest.raises(SystemExit):
        parse(data_bin, "switch_lm", "--moe-expert-cuont", 4)


def test_token_ids_are_aligned_with_hidden_states(tiny_corpus):
    _, data_bin = tiny_corpus
    _, task, model, _ = build(data_bin, "switch_lm", "--moe-layers", "0,3")
    model.eval()
    seen = []

    def hook(module, args):
        tok = module.token_source()
        seen.append((args[0].shape, tok.ids_T.clone(), tok.prev_ids_T.clone(), tok.positions_T.clone()))

    for _, layer in model.moe_layers():
        layer.register_forward_pre_hook(hook)
    src = torch.randint(4, len(task.dictionary), (3, 7))
    model(src)
    assert len(seen) == 2
    for shape, ids, prev, pos in seen:
        assert shape[:2] == (7, 3)  # fairseq's T x B
        for t in range(7):
            for b in range(3):
                row = t * 3 + b
                assert ids[row] == src[b, t]
                assert prev[row] == (src[b, t - 1] if t > 0 else task.dictionary.pad())
                assert pos[row] == t


@pytest.mark.parametrize("arch", ["switch_lm", "gshard_lm"])
def test_incremental_decoding_equals_full_forward(tiny_corpus, arch):
    _, data_bin = tiny_corpus
    _, task, model, _ = build(data_bin, arch, "--moe-layers", "1,2", "--moe-eval-capacity-factor", "inf")
    model.eval()
    src = torch.randint(4, len(task.dictionary), (2, 9))
    with torch.no_grad():
        full = model(src)[0]
        state = {}
        steps = [model.decoder(src[:, : t + 1], incremental_state=state)[0] for t in range(src.shape[1])]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_criterion_arithmetic(tiny_corpus):
    _, data_bin = tiny_corpus
    _, task, model, crit = build(data_bin, "switch_lm", "--moe-aux-loss-weight", 0.3, "--moe-z-loss-weight", 0.05)
    model.train()
    pad = task.dictionary.pad()
    src = torch.randint(4, len(task.dictionary), (4, 10))
    tgt = torch.randint(4, len(task.dictionary), (4, 10))
    tgt[0, -3:] = pad
    sample = lm_sample(src, tgt, pad)
    ntok = sample["ntokens"]
    torch.manual_seed(3)
    loss, sample_size, log = crit(model, sample)
    assert sample_size == ntok
    # independent recomputation from the same forward
    logits = model(src)[0]
    nll = F.cross_entropy(logits.view(-1, logits.size(-1)), tgt.view(-1), ignore_index=pad, reduction="sum")
    aux = sum(0.3 * l.last_aux_losses["balance"] + 0.05 * l.last_aux_losses["z"] for _, l in model.moe_layers())
    torch.testing.assert_close(loss, nll + aux * ntok, rtol=1e-5, atol=1e-4)
    assert float(log["nll_loss"]) == pytest.approx(float(nll), rel=1e-5)
    # metrics: two logging outputs reduce to token-weighted loss and averaged routing stats
    log2 = dict(log, nll_loss=log["nll_loss"] * 3, loss=log["loss"] * 3, ntokens=3 * ntok, sample_size=3 * ntok,
                moe_load_max=log["moe_load_max"] + 1.0)
    with metrics.aggregate() as agg:
        crit.__class__.reduce_metrics([log, log2])
    vals = agg.get_smoothed_values()
    assert vals["nll_loss"] == pytest.approx(float(nll) * 4 / (4 * ntok) / math.log(2), abs=1e-3)
    assert vals["moe_load_max"] == pytest.approx(log["moe_load_max"] + 0.5, abs=1e-3)
    assert vals["ppl"] == pytest.approx(2 ** vals["nll_loss"], rel=1e-2)


def test_criterion_update_freq_weighting(tiny_corpus):
    """Two micro-batches summed then divided by the total sample size (what fairseq does with
    --update-freq 2) weight each batch's aux loss by its token count."""
    _, data_bin = tiny_corpus
    _, task, model, crit = build(data_bin, "switch_lm", "--moe-aux-loss-weight", 1.0)
    model.eval()
    losses = []
    for T in (5, 11):
        src = torch.randint(4, len(task.dictionary), (2, T))
        sample = {"net_input": {"src_tokens": src, "src_lengths": torch.full((2,), T)}, "target": src,
                  "ntokens": 2 * T, "id": torch.arange(2)}
        loss, ss, log = crit(model, sample)
        aux = sum(l.last_aux_losses["balance"] for _, l in model.moe_layers())
        losses.append((loss, ss, float(log["nll_loss"]), float(aux)))
    total = sum(l for l, *_ in losses) / sum(s for _, s, *_ in losses)
    expected = (sum(n for *_, n, _ in losses) + sum(a * s for _, s, _, a in losses)) / sum(s for _, s, *_ in losses)
    assert float(total) == pytest.approx(expected, rel=1e-5)


def test_dense_layers_untouched_and_state_dict_names(tiny_corpus):
    _, data_bin = tiny_corpus
    _, _, model, _ = build(data_bin, "switch_lm", "--moe-layers", "1", "--moe-expert-count", 3)
    keys = model.state_dict().keys()
    assert "decoder.layers.1.fc1.experts.w1_EDF" in keys
    assert "decoder.layers.1.fc1.router.gate.weight" in keys
    assert "decoder.layers.0.fc1.weight" in keys
    assert isinstance(model.decoder.layers[1].fc1, MoELayer)

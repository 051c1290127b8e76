"""dense_lm, the dense baseline of the MoE archs: the same moe_lm model without MoE layers.

* Why not fairseq's ``transformer_lm``: built from the same flags it is another model (its
  arch function is a no-op, so its dataclass defaults apply: post-LN, no final LayerNorm,
  512-wide input/output dims with projections), while every moe_lm arch runs fairseq's
  ``base_lm_architecture``. With the flags that undo those defaults it is dense_lm.
* dense_lm and every MoE arch build the same modules outside the MoE FFNs.
* switch_lm with one expert holding the dense FFN's weights computes the dense model
  (logits and gradients).
* dense_lm refuses the MoE options (they would have no effect), and moe_cross_entropy
  with no MoE layer is fairseq's cross-entropy.
"""

import argparse
import os

import pytest
import torch
import torch.nn.functional as F
from fairseq import options, tasks
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq.models import ARCH_MODEL_REGISTRY
from fairseq.models.transformer_lm import TransformerLanguageModelConfig, base_lm_architecture

from moe_plugin.base_layer import BaseLayer
from moe_plugin.experiments import EXPERIMENTS
from moe_plugin.experiments import _hydra as H
from moe_plugin.experiments import _plan as P
from moe_plugin.experiments.runner import plan_of
from moe_plugin.models.archs import DENSE_ARCH
from moe_plugin.models.moe_lm import MoEDecoderLayer, MoELanguageModel
from moe_plugin.moe_layer import MoELayer
from moe_plugin.models.archs import ARCHS, DEMO_ARGS
from tests.helpers import lm_sample
from tests.conftest import ROOT, USER_DIR
from tests.test_fairseq_integration import build

DIMS = ("decoder_input_dim", "decoder_output_dim", "decoder_normalize_before", "no_decoder_final_norm")


def build_flags(data_bin, arch, *flags, seed=0):
    """Model and cfg.model from fairseq-train's parser with exactly these model flags."""
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(
        parser, [data_bin, "--task", "language_modeling", "--user-dir", USER_DIR, "--arch", arch, "--cpu",
                 "--dropout", "0", *map(str, flags)])
    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    torch.manual_seed(seed)
    return task.build_model(cfg.model), cfg.model, task


def test_dense_lm_is_registered_on_moe_lm():
    assert ARCH_MODEL_REGISTRY[DENSE_ARCH] is MoELanguageModel
    assert DENSE_ARCH not in ARCHS  # ARCHS: the MoE archs, each with a router


def test_transformer_lm_takes_its_dataclass_defaults_and_dense_lm_the_base_lm_architecture(tiny_corpus):
    """The mechanism, with only --decoder-embed-dim given: fairseq registers transformer_lm's
    own arch with a no-op function (register_model with a dataclass), so its cfg is the
    dataclass defaults; moe_lm's archs apply fairseq's base_lm_architecture to the flags."""
    _, data_bin = tiny_corpus
    flags = ["--decoder-embed-dim", 64, "--decoder-layers", 2]
    tlm, tcfg, _ = build_flags(data_bin, "transformer_lm", *flags)
    dense, dcfg, _ = build_flags(data_bin, DENSE_ARCH, *flags)
    defaults = TransformerLanguageModelConfig()
    assert {k: tcfg[k] for k in DIMS} == {k: getattr(defaults, k) for k in DIMS}
    expected = argparse.Namespace(decoder_embed_dim=64)
    base_lm_architecture(expected)
    assert {k: dcfg[k] for k in DIMS} == {k: getattr(expected, k) for k in DIMS}
    # what that means for the modules: transformer_lm 512-wide embedding/softmax with
    # projections to and from 64, post-LN, no final LayerNorm; dense_lm none of these
    assert (tcfg.decoder_input_dim, tcfg.decoder_normalize_before, tcfg.no_decoder_final_norm) == (512, False, False)
    assert tlm.decoder.embed_tokens.embedding_dim == 512 and tlm.decoder.project_in_dim is not None
    assert tlm.decoder.project_out_dim is not None and tlm.decoder.layer_norm is None
    assert not any(layer.normalize_before for layer in tlm.decoder.layers)
    assert dense.decoder.embed_tokens.embedding_dim == 64 and dense.decoder.project_in_dim is None
    assert dense.decoder.project_out_dim is None and dense.decoder.layer_norm is not None
    assert all(layer.normalize_before for layer in dense.decoder.layers)


def test_dense_lm_is_transformer_lm_with_matched_flags(tiny_corpus):
    """transformer_lm given the dims and the pre-LN that base_lm_architecture sets builds
    dense_lm: the same parameters (names, shapes, and values at the same seed) and outputs."""
    _, data_bin = tiny_corpus
    flags = ["--decoder-embed-dim", 32, "--decoder-ffn-embed-dim", 64, "--decoder-layers", 2,
             "--decoder-attention-heads", 2, "--tokens-per-sample", 16]
    tlm, _, task = build_flags(data_bin, "transformer_lm", *flags, "--decoder-input-dim", 32,
                               "--decoder-output-dim", 32, "--decoder-normalize-before", seed=5)
    dense, _, _ = build_flags(data_bin, DENSE_ARCH, *flags, seed=5)
    st, sd = tlm.state_dict(), dense.state_dict()
    sd.pop("_extra_state", None)  # moe_lm's checkpoint layout record (no MoE layer here)
    assert list(st) == list(sd)
    for k in st:
        torch.testing.assert_close(st[k], sd[k], rtol=0, atol=0, msg=k)
    src = torch.randint(4, len(task.dictionary), (3, 11))
    tlm.eval(), dense.eval()
    with torch.no_grad():
        torch.testing.assert_close(tlm(src)[0], dense(src)[0], rtol=0, atol=1e-6)


def moe_key_map(model):
    """The MoE model's state-dict keys outside its MoE FFNs, mapped onto the dense model's
    layer numbering: ({moe key: dense key}, dense indices of the MoE layers). Set aside: the
    MoE FFN of an MoE layer (fc1 = router + experts; fc2 is an identity) and every inserted
    BASE layer (the layers after one shift by one)."""
    prefix_of, moe_indices, j = {}, set(), 0
    for i, layer in enumerate(model.decoder.layers):
        if isinstance(layer, BaseLayer):
            prefix_of[f"decoder.layers.{i}."] = None
            continue
        if isinstance(layer, MoEDecoderLayer):
            assert isinstance(layer.fc1, MoELayer)
            moe_indices.add(j)
        prefix_of[f"decoder.layers.{i}."] = f"decoder.layers.{j}."
        j += 1
    out = {}
    for k in model.state_dict():
        if k == "_extra_state":  # moe_lm's checkpoint layout record
            continue
        new = k
        if k.startswith("decoder.layers."):
            head = ".".join(k.split(".")[:3]) + "."
            if prefix_of[head] is None:
                continue
            rest = k[len(head):]
            new = prefix_of[head] + rest
            if int(prefix_of[head].split(".")[2]) in moe_indices and rest.split(".")[0] in ("fc1", "fc2"):
                continue
        out[k] = new
    return out, moe_indices


def dense_keys(keys, moe_indices):
    """The dense model's keys outside the FFNs of the MoE layers' indices."""
    out = []
    for k in keys:
        parts = k.split(".")
        if k == "_extra_state":
            continue
        if k.startswith("decoder.layers.") and int(parts[2]) in moe_indices and parts[3] in ("fc1", "fc2"):
            continue
        out.append(k)
    return out


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_dense_lm_and_every_moe_arch_share_all_but_the_moe_ffns(tiny_corpus, arch):
    _, data_bin = tiny_corpus
    demo = [a.format(max_update=10) for a in DEMO_ARGS.get(arch, [])]
    _, _, moe, _ = build(data_bin, arch, "--moe-expert-count", 4, "--max-update", 10, *demo)
    _, _, dense, _ = build(data_bin, DENSE_ARCH)
    assert moe.moe_layers(), f"{arch} built no MoE layer"
    assert not dense.moe_layers()
    key_map, moe_indices = moe_key_map(moe)
    ms, ds = moe.state_dict(), dense.state_dict()
    assert sorted(key_map.values()) == sorted(dense_keys(ds, moe_indices))
    for mk, dk in key_map.items():
        assert ms[mk].shape == ds[dk].shape, (mk, dk)
    # the normalisation (not visible in the keys) is the same too
    assert [l.normalize_before for l in dense.decoder.layers] == [
        l.normalize_before for l in moe.decoder.layers if not isinstance(l, BaseLayer)]
    assert (dense.decoder.layer_norm is None) == (moe.decoder.layer_norm is None)


def test_switch_with_one_expert_computes_the_dense_model(tiny_corpus):
    """switch_lm with one expert (softmax over one expert: weight 1), no capacity limit, its
    expert holding the dense model's fc1/fc2 of that layer and every other parameter the dense
    model's: the same logits (at the non-padding positions), and the same gradients (shared
    parameters and the FFN's)."""
    _, data_bin = tiny_corpus
    one = ["--moe-expert-count", 1, "--moe-capacity-factor", "inf", "--moe-eval-capacity-factor", "inf"]
    _, task, moe, _ = build(data_bin, "switch_lm", *one)
    _, _, dense, _ = build(data_bin, DENSE_ARCH)
    key_map, moe_indices = moe_key_map(moe)
    assert moe_indices == {1, 3}
    ms, ds = moe.state_dict(), dense.state_dict()
    with torch.no_grad():
        for mk, dk in key_map.items():
            ms[mk].copy_(ds[dk])
        for j in moe_indices:
            bank = moe.decoder.layers[j].fc1.experts
            fc1, fc2 = dense.decoder.layers[j].fc1, dense.decoder.layers[j].fc2
            # nn.Linear weights are (out, in); the bank's w1_EDF is (E, in=D, out=F), w2_EFD (E, F, D)
            bank.w1_EDF[0].copy_(fc1.weight.t())
            bank.b1_EF[0].copy_(fc1.bias)
            bank.w2_EFD[0].copy_(fc2.weight.t())
            bank.b2_ED[0].copy_(fc2.bias)
    pad = task.dictionary.pad()
    src = torch.randint(4, len(task.dictionary), (3, 9))
    src[0, -2:] = pad
    tgt = torch.randint(4, len(task.dictionary), (3, 9))
    tgt[0, -2:] = pad
    real = src.ne(pad)  # padding is never routed (its MoE output is 0); the dense FFN computes it
    moe.eval(), dense.eval()
    with torch.no_grad():
        torch.testing.assert_close(moe(src)[0][real], dense(src)[0][real], rtol=0, atol=1e-5)
    moe.train(), dense.train()  # dropout 0 (SMALL): training mode differs only in routing
    for m in (moe, dense):
        m.zero_grad()
        logits = m(src)[0]
        F.cross_entropy(logits.view(-1, logits.size(-1)), tgt.view(-1), ignore_index=pad).backward()
    mp, dp = dict(moe.named_parameters()), dict(dense.named_parameters())
    shared = [(mk, dk) for mk, dk in key_map.items() if mk in mp]
    assert len(shared) == len(dense_keys(dp, moe_indices))
    for mk, dk in shared:
        torch.testing.assert_close(mp[mk].grad, dp[dk].grad, rtol=1e-4, atol=1e-6, msg=mk)
    for j in moe_indices:
        bank = moe.decoder.layers[j].fc1.experts
        fc1, fc2 = dense.decoder.layers[j].fc1, dense.decoder.layers[j].fc2
        torch.testing.assert_close(bank.w1_EDF.grad[0], fc1.weight.grad.t(), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(bank.b1_EF.grad[0], fc1.bias.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(bank.w2_EFD.grad[0], fc2.weight.grad.t(), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(bank.b2_ED.grad[0], fc2.bias.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "flags,option",
    [
        (["--moe-freq", 2], "--moe-freq"),
        (["--moe-layers", "1"], "--moe-layers"),
        (["--base-layers", 1], "--base-layers"),
        (["--moe-expert-parallel"], "--moe-expert-parallel"),
        (["--moe-expert-count", 4], "--moe-expert-count"),
        (["--moe-router", "switch"], "--moe-router"),
    ],
)
def test_dense_lm_refuses_moe_options(tiny_corpus, flags, option):
    _, data_bin = tiny_corpus
    with pytest.raises(ValueError) as err:
        build(data_bin, DENSE_ARCH, *flags)
    msg = str(err.value)
    assert msg.startswith(option) and "allowed" in msg and DENSE_ARCH in msg, msg


def test_moe_cross_entropy_without_moe_layers_is_cross_entropy(tiny_corpus):
    _, data_bin = tiny_corpus
    _, task, model, crit = build(data_bin, DENSE_ARCH)
    model.eval()
    pad = task.dictionary.pad()
    src = torch.randint(4, len(task.dictionary), (2, 7))
    tgt = torch.randint(4, len(task.dictionary), (2, 7))
    tgt[1, -2:] = pad
    sample = lm_sample(src, tgt, pad)
    ntok = sample["ntokens"]
    loss, sample_size, log = crit(model, sample)
    logits = model(src)[0]
    nll = F.cross_entropy(logits.view(-1, logits.size(-1)), tgt.view(-1), ignore_index=pad, reduction="sum")
    assert sample_size == ntok
    torch.testing.assert_close(loss, nll, rtol=1e-6, atol=1e-5)
    assert not any(k.startswith("moe_") for k in log)


def model_part(args):
    """The model-size flags of a run (from --decoder-layers to the first MoE flag)."""
    start = args.index("--decoder-layers")
    end = next((i for i, a in enumerate(args) if i > start and a.startswith(("--moe-", "--base-", "--hash-",
                                                                              "--sam-", "--hyper-"))), len(args))
    return args[start:end]


@pytest.mark.parametrize("script", list(EXPERIMENTS))
def test_reproduction_dense_rows_use_dense_lm(script):
    """Every reproduction compares against dense_lm (never transformer_lm), with its MoE runs'
    model flags; the HyperRouter tables' dense FFN is E x F, the reference's dense baseline."""
    for scale in P.SCALES:
        plan = plan_of(script, scale)
        dense = [r for r in plan.runs if r.arch == DENSE_ARCH]
        assert all(r.arch not in P.FAIRSEQ_ARCHS for r in plan.runs)
        moe = [r for r in plan.runs if r.arch in ARCHS]
        if not dense:
            continue
        for d in dense:
            peers = [r for r in moe if r.dataset == d.dataset]
            assert peers
            for r in peers:
                flags, mflags = model_part(d.args), model_part(r.args)
                if script == "hyperrouter_tables":
                    E = int(r.args[r.args.index("--moe-expert-count") + 1])
                    F_ = int(r.args[r.args.index("--moe-expert-ffn-dim") + 1])
                    i = flags.index("--decoder-ffn-embed-dim")
                    assert int(flags[i + 1]) == E * F_
                    flags = flags[:i + 1] + mflags[i + 1:i + 2] + flags[i + 2:]
                assert flags == mflags, (scale, d.name, r.name)
            # fairseq-train's parser accepts the command (dense_lm refuses MoE flags there), and
            # its hydra config is committed (tests of every arch skip dense_lm: not in ARCHS)
            ns = options.parse_args_and_arch(options.get_training_parser(), input_args=P.train_args(plan, d))
            assert ns.arch == DENSE_ARCH and ns.moe_freq == 0
            assert os.path.exists(os.path.join(ROOT, "configs", scale, H.config_name(plan, d) + ".yaml"))


def test_dense_lm_hydra_config_builds_the_cli_model(tiny_corpus, tmp_path):
    """The generated YAML of a dense run (configs/, fairseq-hydra-train) builds the model its
    command line builds; the committed one is not stale."""
    from tests.test_configs import CONFIGS, assert_same_model, build_from_cli, build_from_yaml, with_data

    plan = plan_of("base_throughput_quality", "tiny")
    run = plan.run_named("dense")
    args = P.train_args(plan, run)
    name = H.config_name(plan, run)
    text = H.yaml_for_command(args)
    committed = os.path.join(CONFIGS, "tiny", name + ".yaml")
    body = "".join(line for line in open(committed) if not line.startswith("#"))
    assert body == text, f"{committed} is stale: python -m moe_plugin.experiments.runner configs"
    assert "_name: dense_lm" in text
    (tmp_path / f"{name}.yaml").write_text(text)
    data_bin = tiny_corpus[1]
    m_cli, _ = build_from_cli(with_data(args, data_bin))
    m_yaml, _ = build_from_yaml(str(tmp_path), name, data_bin)
    assert not m_yaml.moe_layers()
    assert_same_model(m_cli, m_yaml)
    # the YAML needs no moe_freq: 0 (the model dataclass's defaults are the named arch's,
    # moe_plugin/models/moe_lm.py), and one that asks for MoE layers is refused at build time
    assert "moe_freq" not in text
    (tmp_path / "with_freq.yaml").write_text(text.replace("  _name: dense_lm\n", "  _name: dense_lm\n  moe_freq: 2\n"))
    with pytest.raises(ValueError, match=r"^--moe-freq: 2 is not allowed with --arch dense_lm"):
        build_from_yaml(str(tmp_path), "with_freq", data_bin)

"""Every fairseq option a user may pass to an MoE arch either works or is refused at build
time with one line, and the model runs in half precision (the CPU proxy for fairseq's
--fp16/--bf16, whose trainer needs CUDA).

Works, checked by one training step of the fairseq model (every arch): --checkpoint-activations,
--offload-activations, --layernorm-embedding, post-LN (decoder_normalize_before off, which a
hydra config can set; fairseq's base_lm_architecture forces pre-LN on the command line).
Works, checked through fairseq-train: --update-freq 2; --zero-sharding os on 2 CPU ranks
(local experts: same losses as without it). Refused at build time: --quant-noise-pq > 0 with
MoE layers, --ddp-backend fully_sharded (command line and hydra/FSDP context).
--fp16/--bf16/--memory-efficient-fp16 build unchanged (local mode; expert-parallel refusals:
tests/test_ep_fairseq.py) and the half-precision test below runs what CPU can of them.
"""

import argparse
import subprocess
import sys
from typing import Optional

import pytest
import torch

import moe_plugin  # noqa: F401
from moe_plugin.models.archs import ARCHS
from tests.conftest import ROOT, TINY_MODEL, TINY_TRAIN, run_cli
from tests.test_activation_checkpointing import _batch
from tests.test_fairseq_integration import build, parse


def _one_step(model, criterion, task):
    model.train()
    loss, sample_size, log = criterion(model, _batch(task))
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), name
    return float(loss)


WORKING = {
    "checkpoint-activations": ["--checkpoint-activations"],
    "offload-activations": ["--checkpoint-activations", "--offload-activations"],
    "layernorm-embedding": ["--layernorm-embedding"],
    "fp16-flag-builds": ["--fp16"],
    "bf16-flag-builds": ["--bf16"],
    "memory-efficient-fp16-flag-builds": ["--memory-efficient-fp16"],
}


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("option", sorted(WORKING))
def test_option_works(tiny_corpus, arch, option):
    _, data_bin = tiny_corpus
    _, task, model, criterion = build(data_bin, arch, *WORKING[option])
    if option == "layernorm-embedding":
        assert model.decoder.layernorm_embedding is not None
    _one_step(model, criterion, task)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_decoder_normalize_before_off_is_pre_ln_as_in_fairseq(tiny_corpus, arch):
    """decoder_normalize_before off in the config (a hydra config can say so) still builds the
    pre-LN model every fairseq LM arch function makes, and it trains."""
    _, data_bin = tiny_corpus
    cfg = parse(data_bin, arch)
    cfg.model.decoder_normalize_before = False
    from fairseq import tasks

    task = tasks.setup_task(cfg.task)
    torch.manual_seed(0)
    model = task.build_model(cfg.model)
    # fairseq's base_lm_architecture, which every moe_lm arch (and dense_lm) applies on the
    # command line and again when fairseq builds the model, forces pre-LN: what is asked
    # for is documented in docs/fidelity.md, and the models compared stay alike
    assert all(getattr(layer, "normalize_before", True) for layer in model.decoder.layers)
    _one_step(model, task.build_criterion(cfg.criterion), task)


def _archs_with_moe_ffn():
    return [a for a in sorted(ARCHS) if a not in ("base_lm", "dense_lm")]


@pytest.mark.parametrize("arch", _archs_with_moe_ffn())
def test_quant_noise_is_refused(tiny_corpus, arch):
    _, data_bin = tiny_corpus
    with pytest.raises(ValueError, match=r"--quant-noise-pq: 0.1 is not allowed with MoE layers; allowed: 0"):
        build(data_bin, arch, "--quant-noise-pq", "0.1")


def test_fully_sharded_is_refused(tiny_corpus):
    _, data_bin = tiny_corpus
    with pytest.raises(ValueError, match=r"--ddp-backend: 'fully_sharded' is not allowed"):
        build(data_bin, "switch_lm", "--ddp-backend", "fully_sharded")
    # a hydra config skips the arch function: fairseq then builds inside fairscale's wrap context
    from fairscale.nn import enable_wrap
    from fairseq import tasks

    cfg = parse(data_bin, "switch_lm")
    task = tasks.setup_task(cfg.task)
    with enable_wrap(wrapper_cls=torch.nn.Identity):
        with pytest.raises(ValueError, match=r"'fully_sharded' is not allowed"):
            task.build_model(cfg.model)


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_forward_backward(tiny_corpus, arch, dtype):
    """The fairseq model after .half() / .to(bfloat16): finite loss and gradients, and the
    router logits in fp32 by default, in the model's dtype with --moe-no-gating-fp32."""
    _, data_bin = tiny_corpus
    _, task, model, criterion = build(data_bin, arch)
    model = model.to(dtype)
    seen = {}
    for _, layer in model.moe_layers() if hasattr(model, "moe_layers") else []:
        router = layer.router
        if hasattr(router, "logits"):
            original = router.logits

            def spy(x, _orig=original, _r=router):
                out = _orig(x)
                seen.setdefault(_r.use_fp32, set()).add(out.dtype)
                return out

            router.logits = spy
    _one_step(model, criterion, task)
    if seen:
        assert seen.get(True) == {torch.float32}, seen
        if arch == "sam_lm":  # always fp32: --moe-no-gating-fp32 is refused (test below)
            return
        for _, layer in model.moe_layers():
            layer.router.use_fp32 = False
        model.zero_grad()
        _one_step(model, criterion, task)
        assert seen.get(False) == {dtype}, seen


@pytest.mark.e2e
def test_update_freq_trains(tiny_corpus, tmp_path):
    _, data_bin = tiny_corpus
    run_cli("train", data_bin, *TINY_TRAIN, *TINY_MODEL, "--arch", "switch_lm", "--criterion", "moe_cross_entropy",
            "--moe-expert-count", "4", "--max-update", "3", "--update-freq", "2", "--save-dir", tmp_path)


def _train_two_ranks(data_bin, save, *extra, port):
    cmd = [sys.executable, "-m", "fairseq_cli.train", data_bin, *TINY_TRAIN, *TINY_MODEL, "--arch", "switch_lm",
           "--criterion", "moe_cross_entropy", "--moe-expert-count", "4", "--max-update", "4", "--dropout", "0",
           "--no-save", "--disable-validation", "--distributed-world-size", "2", "--distributed-backend", "gloo",
           "--distributed-init-method", f"tcp://127.0.0.1:{port}", "--distributed-no-spawn",
           "--ddp-backend", "legacy_ddp", *extra]
    env = dict(__import__("os").environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    procs = [subprocess.Popen(cmd + ["--distributed-rank", str(r)], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=env) for r in (0, 1)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    import re

    return [float(v) for v in re.findall(r"train_inner \| .*?\bloss=([\d.]+)", outs[0])]


@pytest.mark.e2e
@pytest.mark.distributed
def test_zero_sharding_os_on_two_ranks_changes_nothing(tiny_corpus, tmp_path):
    """Optimizer-state sharding in local mode (every rank holds every expert): the losses
    of 2 gloo ranks are those of the same run without it."""
    import socket

    _, data_bin = tiny_corpus
    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    plain = _train_two_ranks(data_bin, tmp_path / "a", port=ports[0])
    sharded = _train_two_ranks(data_bin, tmp_path / "b", "--zero-sharding", "os", port=ports[1])
    assert len(plain) == 4
    assert sharded == pytest.approx(plain, abs=2e-3)


def test_no_boolean_option_defaults_to_true():
    """fairseq turns a boolean dataclass field whose default is True into a store_false flag:
    passing ``--x`` would switch x *off*. No plugin option may be such a trap."""
    import dataclasses

    from moe_plugin import config as moe_config
    from moe_plugin.criterions.moe_cross_entropy import MoECrossEntropyConfig
    from moe_plugin.models.moe_lm import MoELanguageModel, MoELanguageModelConfig
    from fairseq.models.transformer_lm import TransformerLanguageModelConfig

    fairseq_own = {f.name for f in dataclasses.fields(TransformerLanguageModelConfig)}
    # the core's defaults are the arch functions' last resort, and the model dataclass's
    # (interpolated) defaults resolve to them: a True there is a True behind the flag
    traps = [
        f.name
        for dc in (MoELanguageModelConfig, MoECrossEntropyConfig, moe_config.moe_config_class())
        for f in dataclasses.fields(dc)
        if f.type in (bool, "bool", Optional[bool]) and f.default is True and f.name not in fairseq_own
    ]
    assert traps == []
    # and the flags fairseq generates (MoELanguageModel.add_args) are store_true
    parser = argparse.ArgumentParser()
    MoELanguageModel.add_args(parser)
    store_false = [a.dest for a in parser._actions if isinstance(a, argparse._StoreFalseAction)
                   and a.dest not in fairseq_own]
    assert store_false == []


def test_gating_fp32_flag_means_what_it_says(tiny_corpus):
    _, data_bin = tiny_corpus
    with pytest.raises(ValueError, match="--moe-no-gating-fp32: not allowed for the sam router"):
        build(data_bin, "sam_lm", "--moe-no-gating-fp32")
    assert parse(data_bin, "switch_lm").model.moe_no_gating_fp32 is False
    _, _, model, _ = build(data_bin, "switch_lm", "--moe-no-gating-fp32")
    assert {layer.router.use_fp32 for _, layer in model.moe_layers()} == {False}
    _, _, model, _ = build(data_bin, "switch_lm")
    assert {layer.router.use_fp32 for _, layer in model.moe_layers()} == {True}

"""configs/: a hydra YAML and the CLI command of the same reproduce run build the same model.

The YAML is composed the way fairseq-hydra-train composes it (fairseq's hydra_init,
hydra's compose, fairseq's add_defaults before and after the user dir is imported:
``moe_plugin.experiments._hydra.hydra_config``) and the model is built by fairseq's task; the CLI
arguments go through fairseq-train's parser and ``convert_namespace_to_omegaconf``. Both
models must have the same state_dict keys and shapes, the same MoE options and the same
frozen router tensors. The slow tests run fairseq-hydra-train itself and regenerate every
committed config."""

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from moe_plugin import config as moe_config
from moe_plugin.experiments import EXPERIMENTS
from moe_plugin.experiments import _hydra as H
from moe_plugin.experiments import _plan as P
from moe_plugin.experiments.runner import plan_of
from moe_plugin.models.archs import ARCHS
from tests.conftest import ROOT, run_cli

CONFIGS = os.path.join(ROOT, "configs")


def build_from_cli(args):
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    ns = options.parse_args_and_arch(options.get_training_parser(), input_args=list(args))
    cfg = convert_namespace_to_omegaconf(ns)
    task = tasks.setup_task(cfg.task)
    return task.build_model(cfg.model), cfg


def build_from_yaml(config_dir, name, data_bin):
    from fairseq import tasks

    cfg = H.hydra_config(config_dir, name, overrides=[f"task.data={data_bin}"])
    task = tasks.setup_task(cfg.task)
    return task.build_model(cfg.model), cfg


def with_data(args, data_bin):
    return [data_bin] + list(args[1:])


def assert_same_model(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        if isinstance(sa[k], torch.Tensor):
            assert sa[k].shape == sb[k].shape, k


PAIRS = [("hyperrouter_tables", "hyper_syn"), ("hash_ablation", "hash_bigram"), ("sam_k_quality", "sam_k2")]


@pytest.mark.parametrize("script,run_name", PAIRS)
def test_yaml_and_cli_build_the_same_model(script, run_name, tiny_corpus, tmp_path):
    plan = plan_of(script, "tiny")
    run = plan.run_named(run_name)
    args = P.train_args(plan, run)
    name = H.config_name(plan, run)
    text = H.yaml_for_command(args)
    committed = os.path.join(CONFIGS, "tiny", name + ".yaml")
    if os.path.exists(committed):  # the committed config is the generated one (not stale)
        body = "".join(line for line in open(committed) if not line.startswith("#"))
        assert body == text, f"{committed} is stale: python -m moe_plugin.experiments.runner configs"
    (tmp_path / f"{name}.yaml").write_text(text)
    data_bin = tiny_corpus[1]
    m_cli, cfg_cli = build_from_cli(with_data(args, data_bin))
    m_yaml, cfg_yaml = build_from_yaml(str(tmp_path), name, data_bin)
    assert type(m_cli) is type(m_yaml)
    assert_same_model(m_cli, m_yaml)
    moe_cli = dataclasses.asdict(moe_config.from_fairseq(cfg_cli.model))
    moe_yaml = dataclasses.asdict(moe_config.from_fairseq(cfg_yaml.model))
    assert moe_cli == moe_yaml
    assert moe_cli["moe_router"] == ARCHS[run.arch][0]
    # routers built alike, down to the frozen (seeded) tensors
    ra = [type(layer.router).__name__ for _, layer in m_cli.moe_layers()]
    assert ra == [type(layer.router).__name__ for _, layer in m_yaml.moe_layers()] and ra
    for k, v in m_cli.state_dict().items():
        if ".router." in k and "hypernet" in k:
            assert torch.equal(v, m_yaml.state_dict()[k]), k
    # and the training options (not only the model) agree
    for group in ("optimization", "dataset", "lr_scheduler", "optimizer", "criterion", "task"):
        a, b = dict(cfg_cli[group]), dict(cfg_yaml[group])
        a.pop("data", None), b.pop("data", None)
        assert a == b, group


def test_a_wrong_yaml_is_detected(tiny_corpus, tmp_path):
    """The comparison can fail: a YAML differing in one MoE option builds a different model."""
    plan = plan_of("hyperrouter_tables", "tiny")
    run = plan.run_named("hyper_syn")
    text = H.yaml_for_command(P.train_args(plan, run)).replace("moe_expert_ffn_dim: 64", "moe_expert_ffn_dim: 32")
    assert "moe_expert_ffn_dim: 32" in text
    (tmp_path / "bad.yaml").write_text(text)
    m_cli, _ = build_from_cli(with_data(P.train_args(plan, run), tiny_corpus[1]))
    m_yaml, _ = build_from_yaml(str(tmp_path), "bad", tiny_corpus[1])
    with pytest.raises(AssertionError):
        assert_same_model(m_cli, m_yaml)


def test_every_reproduce_run_has_a_committed_config():
    names = set()
    for scale in P.SCALES:
        for script in EXPERIMENTS:
            plan = plan_of(script, scale)
            for run in plan.runs:  # every run: the routers' archs and the dense_lm rows
                names.add(os.path.join(scale, H.config_name(plan, run) + ".yaml"))
    missing = sorted(n for n in names if not os.path.exists(os.path.join(CONFIGS, n)))
    assert not missing, f"missing configs (python -m moe_plugin.experiments.runner configs): {missing[:5]}"


@pytest.mark.slow
@pytest.mark.e2e
def test_fairseq_hydra_train_accepts_the_yaml_and_its_user_dir(tiny_corpus, tmp_path):
    """fairseq-hydra-train itself (common.user_dir = ${hydra:runtime.cwd}/moe_plugin) trains
    the committed tiny config; its checkpoint has the model of fairseq-train's."""
    plan = plan_of("hash_ablation", "tiny")
    run = plan.run_named("hash_bigram")
    data_bin = tiny_corpus[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, "-m", "fairseq_cli.hydra_train", "--config-dir", os.path.join(CONFIGS, "tiny"),
         "--config-name", H.config_name(plan, run), f"task.data={data_bin}",
         f"checkpoint.save_dir={tmp_path / 'hydra'}", "optimization.max_update=2",
         f"hydra.run.dir={tmp_path / 'hydra_out'}"],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    args = with_data(P.train_args(plan, run), data_bin)
    i = args.index("--save-dir")
    args[i + 1] = str(tmp_path / "cli")
    args[args.index("--max-update") + 1] = "2"
    run_cli("train", *args)
    a = torch.load(tmp_path / "hydra" / "checkpoint_last.pt", weights_only=False)
    b = torch.load(tmp_path / "cli" / "checkpoint_last.pt", weights_only=False)
    assert {k: tuple(v.shape) for k, v in a["model"].items() if hasattr(v, "shape")} == \
        {k: tuple(v.shape) for k, v in b["model"].items() if hasattr(v, "shape")}
    for k in ("moe_router", "moe_expert_count", "moe_layers", "hash_type"):
        assert a["cfg"]["model"][k] == b["cfg"]["model"][k]


@pytest.mark.slow
def test_every_committed_config_is_current(tmp_path):
    written = H.generate_configs(str(tmp_path))
    for path in written:
        rel = os.path.relpath(path, str(tmp_path))
        with open(path) as f, open(os.path.join(CONFIGS, rel)) as g:
            assert f.read() == g.read(), rel

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
from moe_plugin.models.archs import ARCHS
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


# ----------------------------------------------------------------------------------------
# hydra configs (fairseq-hydra-train's path): the arch fills what the config leaves out,
# and base_layers (fairseq's per-rank checkpoint switch) is derived from explicit fields
# ----------------------------------------------------------------------------------------

HYDRA_MODEL = {"decoder_layers": 4, "decoder_embed_dim": 16, "decoder_ffn_embed_dim": 32,
               "decoder_attention_heads": 2, "decoder_input_dim": 16, "decoder_output_dim": 16,
               "tokens_per_sample": 16, "dropout": 0.0}


def hydra_cfg(tmp_path, data_bin, model: dict, base: dict = HYDRA_MODEL):
    """The config fairseq-hydra-train trains with for a YAML whose model group is ``model``,
    composed step by step as fairseq_cli/hydra_train.py and train.main do (hydra_init,
    compose, add_defaults, full resolution, import_user_module, add_defaults again)."""
    import yaml
    from fairseq import utils
    from fairseq.dataclass.initialize import add_defaults, hydra_init
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf, open_dict

    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump({
        "common": {"user_dir": USER_DIR, "cpu": True, "seed": 1},
        "task": {"_name": "language_modeling", "data": data_bin, "tokens_per_sample": 16},
        "model": dict(base, **model),
        "criterion": {"_name": "moe_cross_entropy"},
        "optimization": {"max_update": 100},
    }))
    GlobalHydra.instance().clear()
    hydra_init("cfg")
    try:
        with initialize_config_dir(config_dir=str(tmp_path), version_base="1.1"):
            cfg = compose("cfg")
    finally:
        GlobalHydra.instance().clear()
    # the first add_defaults and the resolution run before fairseq imports the user dir, so the
    # model group is still the YAML's (here the plugin is imported already: keep it raw)
    with open_dict(cfg):
        raw_model, cfg.model = OmegaConf.to_container(cfg.model), None
    add_defaults(cfg)
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
    with open_dict(cfg):
        cfg.model = raw_model
    OmegaConf.set_struct(cfg, True)
    utils.import_user_module(cfg.common)
    add_defaults(cfg)
    return cfg


def build_hydra(tmp_path, data_bin, model: dict):
    cfg = hydra_cfg(tmp_path, data_bin, model)
    task = tasks.setup_task(cfg.task)
    torch.manual_seed(0)
    return cfg, task.build_model(cfg.model)


def moe_options(model):
    import dataclasses

    return {k: v for k, v in dataclasses.asdict(model.decoder.moe_cfg).items() if k != "moe_seed"}


@pytest.mark.parametrize("arch,extra", [
    ("gshard_lm", {}), ("hash_lm", {}), ("base_lm", {}),
    # the schedule's length defaults to --max-update, which a hydra model config does not see
    ("hyper_lm", {"moe_top_k_schedule_updates": 100}),
])
def test_hydra_config_naming_an_arch_gets_the_archs_router_and_defaults(tiny_corpus, tmp_path, arch, extra):
    """``model._name: gshard_lm`` without MoE options builds what ``--arch gshard_lm`` builds
    (before: the model dataclass's defaults, moe_router switch and top-1, hid the arch's)."""
    _, data_bin = tiny_corpus
    _, model = build_hydra(tmp_path, data_bin, {"_name": arch, **extra})
    _, _, cli_model, _ = build(data_bin, arch)
    assert moe_options(model) == moe_options(cli_model)
    assert model.decoder.moe_cfg.moe_router == ARCHS[arch][0]
    routers = {type(layer.router).__name__ for _, layer in model.moe_layers()}
    assert routers == {type(layer.router).__name__ for _, layer in cli_model.moe_layers()} and routers
    assert [type(layer).__name__ for layer in model.decoder.layers] == \
        [type(layer).__name__ for layer in cli_model.decoder.layers]


def test_hydra_moe_lm_must_name_its_router(tiny_corpus, tmp_path):
    _, data_bin = tiny_corpus
    with pytest.raises(ValueError, match="--moe-router: unset") as info:
        build_hydra(tmp_path, data_bin, {"_name": "moe_lm"})
    assert "allowed" in str(info.value) and "switch" in str(info.value)
    _, model = build_hydra(tmp_path, data_bin, {"_name": "moe_lm", "moe_router": "gshard", "moe_top_k": 2})
    assert {layer.router.name for _, layer in model.moe_layers()} == {"gshard"}


def _checkpoint_suffix(cfg):
    """What fairseq's distributed_init makes of ``cfg`` (one gloo process): the checkpoint suffix."""
    import logging
    import socket

    from fairseq.distributed import utils as distributed_utils
    from omegaconf import open_dict

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with open_dict(cfg):
        dt = cfg.distributed_training
        dt.distributed_world_size, dt.distributed_rank, dt.distributed_backend = 1, 0, "gloo"
        dt.distributed_init_method = f"tcp://127.0.0.1:{port}"
    level = logging.getLogger().level
    try:
        distributed_utils.distributed_init(cfg)
    finally:
        torch.distributed.destroy_process_group()
        logging.getLogger().setLevel(level)
    return cfg.checkpoint.checkpoint_suffix


def _num_base_layers(model):
    from moe_plugin.base_layer import BaseLayer

    return sum(isinstance(layer, BaseLayer) for layer in model.decoder.layers)


@pytest.mark.parametrize("model,base_layers,count", [
    ({"_name": "switch_lm", "moe_expert_parallel": True}, 1, 0),  # no BASE layer, per-rank files
    ({"_name": "switch_lm"}, 0, 0),
    ({"_name": "base_lm"}, 1, 1),  # the arch's one BASE layer
    ({"_name": "base_lm", "moe_expert_parallel": True, "moe_base_layers": 2}, 3, 2),
    ({"_name": "moe_lm", "moe_router": "switch", "moe_expert_parallel": True}, 1, 0),
    # written before moe_base_layers existed (a checkpoint's cfg): base_layers = N + 1
    ({"_name": "base_lm", "moe_expert_parallel": True, "base_layers": 3}, 3, 2),
    ({"_name": "switch_lm", "moe_expert_parallel": True, "base_layers": 1}, 1, 0),
])
def test_hydra_base_layers_say_what_they_mean(tiny_corpus, tmp_path, model, base_layers, count):
    """fairseq reads ``cfg.model.base_layers > 0`` in distributed_init (before the model is
    built) for its per-rank checkpoints; a hydra config gives the BASE-layer count and
    expert parallelism, and the value fairseq reads follows from them."""
    _, data_bin = tiny_corpus
    cfg = hydra_cfg(tmp_path, data_bin, model)
    assert cfg.model.base_layers == base_layers
    assert _checkpoint_suffix(cfg) == ("-rank-0" if base_layers > 0 else "")
    task = tasks.setup_task(cfg.task)
    assert _num_base_layers(task.build_model(cfg.model)) == count


def test_command_line_base_layers_keep_fairseqs_meaning(tiny_corpus):
    """``--base-layers N`` is N BASE layers; the saved config holds the count
    (moe_base_layers) and fairseq's switch (base_layers = N + 1 with --moe-expert-parallel)."""
    _, data_bin = tiny_corpus
    for extra, switch, count in [((), 1, 1), (("--base-layers", 2), 2, 2), (("--base-layers", 0), 0, 0),
                                 (("--moe-expert-parallel",), 2, 1), (("--moe-expert-parallel", "--base-layers", 0), 1, 0),
                                 (("--moe-base-layers", 2, "--moe-expert-parallel"), 3, 2)]:
        cfg, _, model, _ = build(data_bin, "base_lm", *extra)
        assert (cfg.model.base_layers, cfg.model.moe_base_layers, _num_base_layers(model)) == (switch, count, count), extra
    with pytest.raises(ValueError, match="--base-layers: 3 is not allowed with --moe-base-layers 1"):
        parse(data_bin, "base_lm", "--base-layers", 3, "--moe-base-layers", 1)


def test_inconsistent_base_layer_fields_are_refused(tiny_corpus, tmp_path):
    _, data_bin = tiny_corpus
    with pytest.raises(ValueError, match="--base-layers: 5 is not allowed with --moe-base-layers 1"):
        build_hydra(tmp_path, data_bin, {"_name": "base_lm", "moe_base_layers": 1, "base_layers": 5})


def _shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("model", [{"_name": "switch_lm"}, {"_name": "moe_lm", "moe_router": "switch"}])
def test_hydra_config_with_only_the_embed_dim_builds_the_command_lines_model(tiny_corpus, tmp_path, model):
    """A hydra config giving only ``decoder_embed_dim`` (as a user writes it) builds the model
    ``--arch switch_lm --decoder-embed-dim`` builds: input/output dims tied to the embedding
    dim (no 512-wide projections), pre-LN with a final LayerNorm (fairseq's base_lm_architecture
    on the command line; the model dataclass's defaults in a hydra config, where fairseq merges
    them before any arch function runs, and for ``_name: moe_lm`` runs none)."""
    _, data_bin = tiny_corpus
    given = {k: v for k, v in HYDRA_MODEL.items() if k not in ("decoder_input_dim", "decoder_output_dim")}
    cfg = hydra_cfg(tmp_path, data_bin, model, base=given)
    task = tasks.setup_task(cfg.task)
    torch.manual_seed(0)
    hydra_model = task.build_model(cfg.model)
    small = [a for i, a in enumerate(SMALL) if a not in ("--decoder-input-dim", "--decoder-output-dim")
             and SMALL[i - 1] not in ("--decoder-input-dim", "--decoder-output-dim")]
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(
        parser, [data_bin, "--task", "language_modeling", "--user-dir", USER_DIR, "--arch", "switch_lm", "--cpu",
                 "--criterion", "moe_cross_entropy", "--max-update", "100", *small])
    cli_cfg = convert_namespace_to_omegaconf(args)
    cli_model = tasks.setup_task(cli_cfg.task).build_model(cli_cfg.model)
    assert _shapes(hydra_model) == _shapes(cli_model)
    assert hydra_model.decoder.project_in_dim is None and hydra_model.decoder.layer_norm is not None
    assert all(layer.normalize_before for layer in hydra_model.decoder.layers)


def test_default_balance_weight_is_switchs(tiny_corpus):
    """Without --moe-aux-loss-weight the criterion weights the balance loss by 0.01 (Switch
    Transformer Sec. 2.2, alpha = 10^-2; fairseq moe branch --moe-gate-loss-wt 0.01)."""
    _, data_bin = tiny_corpus
    _, task, model, crit = build(data_bin, "switch_lm")
    model.train()
    pad = task.dictionary.pad()
    src = torch.randint(4, len(task.dictionary), (2, 8))
    sample = lm_sample(src, torch.randint(4, len(task.dictionary), (2, 8)), pad)
    torch.manual_seed(3)
    loss, sample_size, _ = crit(model, sample)
    nll = F.cross_entropy(model(src)[0].view(-1, len(task.dictionary)), sample["target"].view(-1),
                          ignore_index=pad, reduction="sum")
    aux = sum(l.last_aux_losses["balance"] for _, l in model.moe_layers())
    torch.testing.assert_close(loss, nll + 0.01 * aux * sample_size, rtol=1e-5, atol=1e-4)

"""Sparse upcycling: an MoE checkpoint started from a trained ``dense_lm`` checkpoint.

    python -m moe_plugin.tools.upcycle --dense CKPT --arch ARCH --out CKPT [--data DIR] [--seed S]
        [--noise STD] [--noise-seed S] [MoE options of ARCH, e.g. --moe-expert-count 8]

Komatsuzaki et al. 2022, "Sparse Upcycling: Training Mixture-of-Experts from Dense
Checkpoints" (arXiv 2212.05055): every expert of an MoE layer starts as a copy of that layer's
dense FFN; attention, embeddings, norms and the dense layers are copied; the routers start from
their own initialisation (hash tables, SAM and HyperRouter state as a fresh build makes them).
``--noise STD`` multiplies each copied expert weight by ``1 + STD * N(0, 1)`` (independent per
expert and element, from ``--noise-seed``; off by default, as in the paper). The output is a
fairseq checkpoint of ``--arch ARCH`` at update 0: ``fairseq-train --finetune-from-model OUT``
continues from it, ``fairseq-eval-lm`` evaluates it, and ``moe_plugin.tools.reshard`` splits it
for expert-parallel ranks (then ``--restore-file`` with fairseq's ``--reset-*`` flags).
docs/upcycling.md says when the upcycled model computes exactly the dense one at step 0.

Refused with one line: a checkpoint that is not ``dense_lm``; an expert hidden size other than
the dense FFN's; parameters with no dense counterpart that change the function (BASE layers,
shared experts, the hash expert norm); ``--moe-expert-parallel`` (upcycle, then reshard).
"""

import argparse
import copy
import dataclasses
import logging
import os
import sys
from typing import List, Optional

import torch

#: the dense FFN of decoder layer i -> the experts of the MoE layer that replaces it
DENSE_FFN = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")
#: routers' and layouts' entries a fresh build makes (no dense counterpart, kept as built)
FRESH = (".router.", "_extra_state")


class UpcycleError(ValueError):
    """A dense checkpoint or option the upcycling cannot use, with what differs."""


def _given_moe_options(arch: str, argv: List[str]) -> dict:
    """{field: value} of the options in ``argv``, parsed by fairseq-train's parser for ``arch``."""
    from fairseq import options

    from moe_plugin.options import USER_DIR

    parser = options.get_training_parser()
    ns = options.parse_args_and_arch(parser, ["DATA", "--task", "language_modeling", "--user-dir", USER_DIR,
                                              "--arch", arch, *argv])
    given = {}
    for action in parser._actions:
        if any(s in argv or any(a.startswith(s + "=") for a in argv) for s in action.option_strings):
            given[action.dest] = getattr(ns, action.dest)
    return given


def moe_model_config(dense_cfg, arch: str, argv: List[str]):
    """The MoE model's config: the dense model's with ``_name`` = ``arch``, every MoE option
    unset (the arch function fills its defaults when the model is built) but those in ``argv``."""
    from omegaconf import open_dict

    from moe_plugin import config as moe_config_mod
    from moe_plugin.models.archs import ARCHS

    if arch not in ARCHS:
        raise UpcycleError(f"--arch: {arch!r} is not an MoE arch; allowed: {', '.join(sorted(ARCHS))}")
    given = _given_moe_options(arch, argv)
    cfg = copy.deepcopy(dense_cfg)
    moe_fields = [f.name for f in dataclasses.fields(moe_config_mod.moe_config_class())]
    unknown = sorted(k for k in given if k not in moe_fields)
    if unknown:
        raise UpcycleError(f"--{unknown[0].replace('_', '-')}: not an MoE option; the model's shape comes from the "
                           "dense checkpoint, training options from fairseq-train; allowed: MoE options of the arch "
                           f"(python -m moe_plugin.options --arch {arch})")
    with open_dict(cfg.model):
        cfg.model._name = arch
        for name in moe_fields:
            if name != "moe_seed":  # the run's seed, as training set it
                cfg.model[name] = given.get(name)
    refusals = (
        ("moe_expert_parallel", "upcycle in one process, then reshard for the ranks (python -m "
                                "moe_plugin.tools.reshard --world-size W) and train with --restore-file and --reset-*"),
        ("moe_shared_experts", "a shared expert has no dense FFN of its own to start from; allowed: 0"),
        ("hash_expert_norm", "its LayerNorm(x + FFN(x)) has no dense counterpart; allowed: off"),
    )
    for name, why in refusals:
        if given.get(name):
            raise UpcycleError(f"--{name.replace('_', '-')}: {given[name]!r} is refused for upcycling: {why}")
    if ARCHS[arch][1].get("base_layers"):
        raise UpcycleError(f"--arch: {arch} is refused for upcycling: its BASE block is an extra decoder block with "
                           "no dense counterpart; allowed: an arch whose MoE layers replace dense FFNs")
    return cfg


def upcycled_state(dense_sd: dict, model, noise: float = 0.0, noise_seed: int = 0) -> dict:
    """The MoE model's tensors from the dense ones (module docstring), but those a fresh build
    makes (routers, the layout entry)."""
    moe_sd = model.state_dict(keep_vars=True)
    used, out = set(), {}
    for key, fresh in moe_sd.items():
        if any(s in key for s in FRESH):
            used.add(key)
        elif key in dense_sd:
            if dense_sd[key].shape != fresh.shape:
                raise UpcycleError(f"--dense: {key} is {tuple(dense_sd[key].shape)} in the dense checkpoint and "
                                   f"{tuple(fresh.shape)} in the {model.decoder.moe_cfg.moe_router} model")
            out[key] = dense_sd[key]
            used.add(key)
    for i, layer in model.moe_layers():
        bank = layer.experts
        prefix = f"decoder.layers.{i}."
        w1, b1, w2, b2 = (dense_sd[prefix + k] for k in DENSE_FFN)  # (F, D), (F,), (D, F), (D,)
        if bank.ffn_dim != w1.shape[0]:
            raise UpcycleError(f"--moe-expert-ffn-dim: {bank.ffn_dim} is refused for upcycling: every expert starts "
                               f"as the dense FFN of hidden size {w1.shape[0]}; allowed: 0 or {w1.shape[0]}")
        E = bank.w1_EDF.shape[0]
        g = torch.Generator().manual_seed(noise_seed + 1000003 * i)

        def copies(t):  # (E, ...) copies of t, each with its own noise
            t = t.unsqueeze(0).repeat(E, *([1] * t.dim()))
            return t * (1 + noise * torch.randn(t.shape, generator=g, dtype=t.dtype)) if noise > 0 else t

        bp = prefix + "fc1.experts."
        out[bp + "w1_EDF"], out[bp + "b1_EF"] = copies(w1.t().contiguous()), b1.repeat(E, 1)
        out[bp + "w2_EFD"], out[bp + "b2_ED"] = copies(w2.t().contiguous()), b2.repeat(E, 1)
        used.update(prefix + k for k in DENSE_FFN)
    missing = [k for k in moe_sd if k not in out and not any(s in k for s in FRESH)]
    if missing:
        raise UpcycleError(f"--dense: the MoE model's {missing[0]} has no dense counterpart (checkpoint of another "
                           "shape, or an option adding parameters)")
    left = [k for k in dense_sd if k not in used]
    if left:
        raise UpcycleError(f"--dense: the dense checkpoint's {left[0]} has no place in the MoE model (another shape)")
    return out


def upcycle(dense_path: str, arch: str, out_path: str, argv: List[str] = (), data: Optional[str] = None,
            noise: float = 0.0, noise_seed: int = 0, seed: Optional[int] = None, log=print) -> str:
    """Write the upcycled checkpoint of ``arch`` to ``out_path`` (module docstring); returns it.
    ``seed``: the global torch seed the fresh build (the routers) draws from, as fairseq-train
    seeds before it builds (default: the dense run's ``--seed``)."""
    from fairseq import checkpoint_utils, tasks
    from omegaconf import OmegaConf, open_dict

    import moe_plugin  # noqa: F401  (registers the model, archs and criterion)
    from moe_plugin.models.archs import DENSE_ARCH
    from moe_plugin.tools.checkpoints import atomic_save

    if noise < 0:
        raise UpcycleError(f"--noise: {noise} is not allowed; allowed: >= 0 (0 = exact copies)")
    state = checkpoint_utils.load_checkpoint_to_cpu(dense_path)
    dense_cfg = state["cfg"]
    name = dense_cfg.model.get("_name")
    if name != DENSE_ARCH:
        raise UpcycleError(f"--dense: {dense_path} is a {name} checkpoint; allowed: a {DENSE_ARCH} checkpoint")
    cfg = moe_model_config(dense_cfg, arch, list(argv))
    if data:
        with open_dict(cfg.task):
            cfg.task.data = data
    if not os.path.exists(os.path.join(str(cfg.task.data).split(os.pathsep)[0], "dict.txt")):
        where = "given" if data else "the dense run's, relative to where it ran"
        raise UpcycleError(f"--data: {cfg.task.data!r} ({where}) holds no dict.txt; allowed: the data-bin the dense "
                           "model was trained on")
    task = tasks.setup_task(cfg.task)
    torch.manual_seed(int(cfg.common.seed if seed is None else seed))
    try:
        model = task.build_model(cfg.model)  # the arch function fills the unset MoE options
    except ValueError as e:  # an option the build refuses (one line naming it)
        raise UpcycleError(str(e)) from None
    # copied in place: the layout entry (_extra_state) of the saved state_dict then records the
    # checksums of the copied tensors
    live = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for key, tensor in upcycled_state(state["model"], model, noise, noise_seed).items():
            live[key].copy_(tensor)
    history = dict(state["optimizer_history"][-1]) if state.get("optimizer_history") else {}
    out = {
        "args": None,
        "cfg": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
        "model": model.state_dict(),
        "criterion": {},
        # update 0: nothing of the dense run's schedule or data order carries over
        "optimizer_history": [{"criterion_name": history.get("criterion_name", "MoECrossEntropyCriterion"),
                               "optimizer_name": history.get("optimizer_name", "none"),
                               "lr_scheduler_state": {}, "num_updates": 0}],
        "task_state": state.get("task_state", {}),
        "extra_state": {"train_iterator": {"epoch": 1, "iterations_in_epoch": 0}, "previous_training_time": 0.0,
                        "upcycled_from": {"path": os.path.abspath(dense_path), "num_updates":
                                          history.get("num_updates", 0), "noise": noise, "noise_seed": noise_seed}},
    }
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    atomic_save(out, out_path)
    layers = [i for i, _ in model.moe_layers()]
    log(f"upcycled {dense_path} (update {history.get('num_updates', 0)}) -> {out_path}: --arch {arch}, MoE layers "
        f"{layers}, {model.decoder.moe_cfg.moe_expert_count} experts each from the dense FFN"
        + (f", noise {noise}" if noise else ""))
    return out_path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m moe_plugin.tools.upcycle", description=__doc__.split("\n\n")[0],
                                 epilog="Any other option is an MoE option of --arch (python -m moe_plugin.options "
                                        "--arch ARCH lists them).")
    ap.add_argument("--dense", required=True, help="the dense_lm checkpoint to start from")
    ap.add_argument("--arch", required=True, help="the MoE arch of the output")
    ap.add_argument("--out", required=True, help="the checkpoint file to write")
    ap.add_argument("--data", help="the data-bin whose dictionary the model uses (default: the dense run's)")
    ap.add_argument("--noise", type=float, default=0.0, help="multiplicative noise std of the expert copies (0: off)")
    ap.add_argument("--noise-seed", type=int, default=0, help="seed of the noise")
    ap.add_argument("--seed", type=int, help="seed of the routers' fresh initialisation (default: the dense run's --seed)")
    args, moe_argv = ap.parse_known_args(argv)
    logging.disable(logging.INFO)
    try:
        upcycle(args.dense, args.arch, args.out, moe_argv, data=args.data, noise=args.noise,
                noise_seed=args.noise_seed, seed=args.seed)
    except UpcycleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

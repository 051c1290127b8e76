"""The hydra YAML equivalent of every experiment's training commands (``configs/``).

``python -m moe_plugin.experiments.runner configs`` writes ``configs/<scale>/<experiment>-<run>.yaml``
for every training run of every registered experiment (:func:`generate_configs`); each YAML is
checked: composed as fairseq-hydra-train composes it, it gives the command's configuration in
every field (:func:`yaml_for_command`).
"""

import os
import shlex
import sys
from typing import Dict, List, Tuple

from moe_plugin.experiments._plan import ROOT, SCALES, Plan, Run, train_args, train_command


# ----------------------------------------------------------------------------------------
# Hydra YAML equivalent of a training command (configs/)
# ----------------------------------------------------------------------------------------

#: fields holding paths: written relative to the directory fairseq-hydra-train starts in
PATH_FIELDS = (("common", "user_dir"), ("task", "data"), ("checkpoint", "save_dir"), ("model", "hash_table"),
               ("checkpoint", "finetune_from_model"),
               ("common", "log_file"), ("common", "tensorboard_logdir"))
#: the config groups fairseq-hydra-train composes
CFG_GROUPS = ("common", "common_eval", "distributed_training", "dataset", "optimization", "checkpoint", "bmuf",
              "generation", "eval_lm", "interactive", "ema", "task", "model", "criterion", "optimizer",
              "lr_scheduler")
NAMED_GROUPS = ("task", "model", "criterion", "optimizer", "lr_scheduler")


def files_written_later(args: List[str]) -> Tuple[List[str], Dict[str, str]]:
    """``args`` with every file option whose file does not exist yet (a hash table an earlier step
    of the experiment writes from the dense run) set to ``os.devnull``, which fairseq-train's
    existence check accepts; and {field: the path} of those."""
    import dataclasses

    from moe_plugin import config as moe_config

    args, later = [str(a) for a in args], {}
    for f in dataclasses.fields(moe_config.moe_config_class()):
        flag = "--" + f.name.replace("_", "-")
        if "path" in f.metadata and flag in args[:-1]:
            i = args.index(flag) + 1
            if not os.path.exists(args[i]):
                later[f.name], args[i] = args[i], os.devnull
    return args, later


def cli_config(args: List[str]) -> dict:
    """The resolved config fairseq-train builds from ``args`` (its own parser and converter);
    a file an earlier step writes is named as it will be (:func:`files_written_later`)."""
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from omegaconf import OmegaConf

    args, later = files_written_later(args)
    parser = options.get_training_parser()
    ns = options.parse_args_and_arch(parser, input_args=args)
    cfg = OmegaConf.to_container(convert_namespace_to_omegaconf(ns), resolve=True, enum_to_str=True)
    cfg["model"].update(later)
    return cfg


def hydra_config(config_dir: str, config_name: str, overrides=(), resolve: bool = True, runtime_cwd: str = ROOT):
    """The config ``fairseq-hydra-train --config-dir DIR --config-name NAME`` trains with.

    Emulates fairseq_cli/hydra_train.py step by step with fairseq's own functions:
    ``hydra_init(NAME)`` (FairseqConfig as the schema of the primary config), hydra's
    compose, ``add_defaults`` (before the user dir is imported: plugin models, criteria
    stay raw), the full resolution of ``_hydra_main`` (``${hydra:runtime.cwd}`` = the
    directory the command starts in), then train.main's ``import_user_module`` and second
    ``add_defaults`` (now the plugin's dataclasses fill their defaults). Returns the
    DictConfig train.main goes on with.
    """
    from fairseq import utils
    from fairseq.dataclass.initialize import add_defaults, hydra_init
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, open_dict

    GlobalHydra.instance().clear()
    hydra_init(config_name)
    # version_base 1.1: what fairseq-hydra-train (no version_base) and fairseq itself assume
    with initialize_config_dir(config_dir=os.path.abspath(config_dir), version_base="1.1"):
        cfg = compose(config_name, overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.cwd = runtime_cwd
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    add_defaults(cfg)
    if not resolve:
        return cfg
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
    OmegaConf.set_struct(cfg, True)
    utils.import_user_module(cfg.common)
    add_defaults(cfg)
    GlobalHydra.instance().clear()
    return cfg


def _rel_path_expr(value: str) -> str:
    path = value if os.path.isabs(value) else os.path.join(ROOT, value)
    rel = os.path.relpath(path, ROOT)
    return "${hydra:runtime.cwd}/" + rel


def yaml_for_command(args: List[str], header: str = "") -> str:
    """Hydra YAML for fairseq-hydra-train equivalent to ``fairseq-train ARGS``.

    Every field whose resolved value differs from what fairseq-hydra-train would use
    without it (the defaults it composes for the same task/model/criterion/optimizer/
    scheduler names) is written; paths become ``${hydra:runtime.cwd}/...`` (hydra changes
    the working directory), so run it from the repository root. The result is checked: the
    YAML composed as fairseq-hydra-train composes it must equal the command's config in
    every field, else ValueError.
    """
    import tempfile

    import yaml
    from omegaconf import OmegaConf

    cli = cli_config(args)
    names = {g: (cli.get(g) or {}).get("_name") for g in NAMED_GROUPS}
    skeleton = {g: {"_name": names[g]} for g in NAMED_GROUPS if names[g]}
    skeleton.setdefault("common", {})["user_dir"] = _rel_path_expr(cli["common"]["user_dir"])
    skeleton["task"]["data"] = _rel_path_expr(cli["task"]["data"])
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "skeleton.yaml"), "w") as f:
            yaml.safe_dump(skeleton, f)
        base = OmegaConf.to_container(hydra_config(tmp, "skeleton"), resolve=True, enum_to_str=True)
        unresolved = OmegaConf.to_container(hydra_config(tmp, "skeleton", resolve=False), resolve=False)
    out = {g: dict(v) for g, v in skeleton.items()}
    for g in CFG_GROUPS:
        cg, bg = cli.get(g) or {}, base.get(g) or {}
        for k, v in cg.items():
            if k == "_name" or (g, k) in (("common", "user_dir"), ("task", "data")):
                continue
            if k in bg and bg[k] == v:
                continue
            if (g, k) in PATH_FIELDS and isinstance(v, str) and v:
                v = _rel_path_expr(v)
            out.setdefault(g, {})[k] = v
    # drop fields that are interpolations of a written field with the same value
    for g in list(out):
        for k in list(out[g]):
            ref = ((unresolved.get(g) or {}) if isinstance(unresolved.get(g), dict) else {}).get(k)
            if isinstance(ref, str) and ref.startswith("${") and ref.endswith("}") and ":" not in ref:
                rg, _, rk = ref[2:-1].partition(".")
                if rg in out and rk in out[rg] and out[rg][rk] == out[g][k]:
                    del out[g][k]
    order = ["common", "task", "model", "criterion", "optimizer", "lr_scheduler", "optimization", "dataset",
             "checkpoint", "distributed_training"]

    def compose(out):
        out = {g: out[g] for g in sorted(out, key=lambda g: order.index(g) if g in order else len(order)) if out[g]}
        text = yaml.safe_dump(out, sort_keys=False, default_flow_style=False, width=120)
        # check: fairseq-hydra-train's config from this YAML == fairseq-train's config
        with tempfile.TemporaryDirectory() as tmp:
            with open(os.path.join(tmp, "check.yaml"), "w") as f:
                f.write(text)
            got = OmegaConf.to_container(hydra_config(tmp, "check"), resolve=True, enum_to_str=True)
        return text, config_differences(cli, got)

    # fields whose default a resolver derives from other fields of the group (the model's
    # base_layers, from moe_base_layers and moe_expert_parallel; an arch default names only
    # _name): left out when the YAML composes the same without them
    derived = [(g, k) for g in out for k in out[g]
               if isinstance(unresolved.get(g), dict) and isinstance(unresolved[g].get(k), str)
               and unresolved[g][k].startswith("${") and unresolved[g][k].replace("${._name}", "").count("${.")]
    if derived:
        text, diffs = compose({g: {k: v for k, v in out[g].items() if (g, k) not in derived} for g in out})
        if not diffs:
            return (header + text) if header else text
    text, diffs = compose(out)
    if diffs:
        raise ValueError("the YAML does not reproduce the command's config: " + "; ".join(diffs[:10]))
    return (header + text) if header else text


def config_differences(a: dict, b: dict, groups=CFG_GROUPS, ignore=(("common", "user_dir"),)) -> List[str]:
    """Fields (group.key) whose values differ between two resolved configs."""
    diffs = []
    for g in groups:
        ag, bg = a.get(g) or {}, b.get(g) or {}
        for k in sorted(set(ag) | set(bg)):
            if (g, k) in ignore:
                continue
            va, vb = ag.get(k, "<missing>"), bg.get(k, "<missing>")
            if (g, k) in PATH_FIELDS and isinstance(va, str) and isinstance(vb, str):
                va, vb = os.path.abspath(os.path.join(ROOT, va)), os.path.abspath(os.path.join(ROOT, vb))
            if va != vb:
                diffs.append(f"{g}.{k}: {va!r} != {vb!r}")
    return diffs



def config_name(plan: Plan, run: Run) -> str:
    return f"{plan.experiment}-{run.name}"


def generate_configs(out_dir: str, experiments=None, scales=SCALES) -> List[str]:
    """Write configs/<scale>/<experiment>-<run>.yaml for every training run of the registered
    experiments (default: all); returns the paths."""
    import logging

    from moe_plugin.experiments import EXPERIMENTS
    from moe_plugin.experiments.runner import plan_of

    written = []
    logging.getLogger("hydra").setLevel(logging.WARNING)
    for scale in scales:
        for name in experiments or list(EXPERIMENTS):
            plan = plan_of(name, scale)
            for run in plan.runs:
                cmd = train_command(plan, run)
                header = (
                    f"# {plan.title}: {run.label} ({scale} scale)\n"
                    f"# Generated by `python -m moe_plugin.experiments.runner configs`; equivalent to the training command of\n"
                    f"#   bash scripts/reproduce/{name}.sh --scale {scale}   (run {run.name}):\n"
                    f"#   {shlex.join(cmd)}\n"
                    f"# Run from the repository root:\n"
                    f"#   fairseq-hydra-train --config-dir configs/{scale} --config-name {config_name(plan, run)}\n"
                    + (f"# ({plan.launcher.world_size} GPUs: one process per GPU, e.g. torchrun --nproc_per_node "
                       f"{plan.launcher.gpus_per_node} [--nnodes {plan.launcher.nodes} ...] -m fairseq_cli.hydra_train "
                       "...; fairseq reads torchrun's WORLD_SIZE/RANK)\n" if plan.launcher.world_size > 1 else "")
                )
                text = yaml_for_command(train_args(plan, run), header)
                path = os.path.join(out_dir, scale, config_name(plan, run) + ".yaml")
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "w") as f:
                    f.write(text)
                written.append(path)
                print(f"[configs] {path}", file=sys.stderr)
    return written

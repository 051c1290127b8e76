"""The arch table fairseq sees: one arch per router that declares one, and the dense baseline.

A router declares its arch as plain data (``register_router(name, arch=..., arch_defaults=...,
demo_args=...)``, kept on the router class); this module turns every declaration into a
fairseq arch function registered with fairseq's own ``register_model_architecture``:

* the routers registered when the shell is loaded (every router of ``moe_plugin.routing``)
  get their arch on the model ``moe_lm``, whose config dataclass holds their options;
* a router registered later, from outside the package (a researcher's ``--user-dir`` whose
  ``__init__.py`` imports ``moe_plugin.routing`` and calls ``register_router``), gets its arch
  on a subclass of the model registered as ``moe_lm_<router>`` (``register_model``) whose
  config dataclass is the model's config at that moment, its options included: fairseq
  generates the command-line options of ``--arch <its arch>`` from that dataclass
  (``add_args``), converts the command line with it and merges it into a hydra config
  naming the arch. (``moe_lm``'s own dataclass was registered when the shell was loaded: its
  options are those of the routers known then.)

:data:`ARCHS` (arch -> (router, defaults)) and :data:`DEMO_ARGS` (arch -> extra
fairseq-train flags of ``make demo``) are the table every tool and test reads:
``from moe_plugin.models.archs import ARCHS, DEMO_ARGS, DENSE_ARCH``.

Every arch function fills the options the config leaves unset, in order: its router, its
defaults (a callable is computed from the given options), the router's
``complete_arch_args``, the core defaults; on the command line it checks the expert-parallel
options and derives fairseq's ``base_layers`` (moe_plugin/models/base_layers.py); then
fairseq's ``base_lm_architecture`` and the checks of what the archs cannot honour.

"Unset" means the same on both of fairseq's paths. On the command line fairseq parses model
options without defaults (unset = None). In a hydra config fairseq merges the model
dataclass's defaults *before* the arch function runs; there every MoE option's default is an
interpolation resolving to the arch's own default (``moe_arch_default``, so the composed
config already shows what the arch gives), and the arch function reads an option still
holding it as unset (:class:`_GivenOptions`), so that defaults computed from the given
options (hash_lm's MoE layer unless ``moe_freq`` is given, the top-K schedules) come out as
on the command line.
"""

import argparse
import dataclasses
import os
from typing import Callable, Dict, List, Optional, Tuple

from fairseq.models import register_model, register_model_architecture
from fairseq.models.transformer_lm import base_lm_architecture as fairseq_base_lm_architecture
from omegaconf import OmegaConf

from moe_plugin import config as moe_config
from moe_plugin.models import base_layers as base_glue, expert_parallel as ep_glue
from moe_plugin.models.moe_lm import (
    ARCH_DEFAULT_RESOLVER,
    MoELanguageModel,
    model_config_class,
    refuse_unsupported,
)
from moe_plugin.routing import ROUTER_REGISTRY, on_register

#: fairseq arch name -> (router name, default option values of that arch)
ARCHS: Dict[str, Tuple[str, Dict[str, object]]] = {}
#: fairseq arch name -> extra fairseq-train arguments ``make demo`` adds for it
DEMO_ARGS: Dict[str, List[str]] = {}
#: fairseq arch name -> its arch function
ARCH_FUNCTIONS: Dict[str, Callable] = {}
#: every arch (dense_lm included) -> (router or None, defaults): what the model dataclass's
#: interpolated defaults resolve to (moe_plugin/models/moe_lm.py model_config_class)
_DECLARED: Dict[str, Tuple[Optional[str], Dict[str, object]]] = {}
#: the dense baseline arch: moe_lm without MoE layers, with the MoE archs' defaults (compare
#: MoE archs against it, not transformer_lm); not in ARCHS (it has no router)
DENSE_ARCH = "dense_lm"


def _refuse_moe_options(arch_name: str, args) -> None:
    """The dense baseline has no MoE layer: refuse every option that would add one (in every
    pass of the arch function) and, on the command line, every other MoE option the user gave
    (it would have no effect). A command line's Namespace holds only the flags the user gave
    (fairseq parses model options without defaults); a DictConfig (hydra, a checkpoint's cfg)
    holds every field, so there only the options that add MoE layers are checked."""
    moe_archs = f"an MoE arch ({', '.join(sorted(ARCHS))})"
    placement = (
        ("moe_layers", lambda v: v not in (None, "")),
        ("moe_freq", lambda v: v not in (None, 0)),
        ("base_layers", lambda v: v not in (None, 0)),
        ("moe_base_layers", lambda v: v not in (None, 0)),
        ("moe_expert_parallel", bool),
    )
    for name, adds_layers in placement:
        value = getattr(args, name, None)
        if adds_layers(value):
            hint = f" (in a hydra config: model.{name}: 0)" if name == "moe_freq" else ""
            raise ValueError(
                f"--{name.replace('_', '-')}: {value!r} is not allowed with --arch {arch_name}, the dense "
                f"baseline without MoE layers{hint}; allowed: unset (no MoE layer), or use {moe_archs}"
            )
    if isinstance(args, argparse.Namespace):
        checked = {name for name, _ in placement} | {"moe_seed"}  # moe_seed: filled from --seed
        for f in dataclasses.fields(moe_config.moe_config_class()):
            if f.name not in checked and getattr(args, f.name, None) is not None:
                raise ValueError(
                    f"--{f.name.replace('_', '-')}: {getattr(args, f.name)!r} has no effect with --arch "
                    f"{arch_name}, the dense baseline without MoE layers; allowed: leave it unset, or use {moe_archs}"
                )


#: the two names of the BASE-layer count on the command line (moe_plugin/models/base_layers.py)
_BASE_COUNT = ("base_layers", "moe_base_layers")


class _GivenOptions:
    """The options a config gives, seen by an arch function: an MoE option still holding the
    model dataclass's interpolated default (a hydra config that leaves it out) reads None, as
    it does on the command line's Namespace, so "unset" means the same on both paths. Writes
    go to the config."""

    def __init__(self, cfg):
        object.__setattr__(self, "_cfg", cfg)

    def __getattr__(self, name):
        cfg = self._cfg
        if OmegaConf.is_config(cfg) and name in cfg and OmegaConf.is_interpolation(cfg, name):
            if str(cfg._get_node(name)._value()).startswith("${" + ARCH_DEFAULT_RESOLVER + ":"):
                return None
        return getattr(cfg, name)

    def __setattr__(self, name, value):
        setattr(self._cfg, name, value)


def check_path_options(args) -> None:
    """Refuse a file option (an MoE field whose metadata has ``"path"``) naming a missing file,
    while fairseq-train parses its command line: before any data is loaded or model built. Only
    the command line is checked: a model built from a checkpoint's saved config takes the file's
    content from the checkpoint (the hash table is a buffer) and never reads the file."""
    for f in dataclasses.fields(moe_config.moe_config_class()):
        value = getattr(args, f.name, None)
        if "path" in f.metadata and value and not os.path.exists(value):
            raise ValueError(f"--{f.name.replace('_', '-')}: {value!r} does not exist; allowed: an existing file "
                             f"({f.metadata['path']})")


def make_arch_function(arch_name: str, router: Optional[str], defaults: dict) -> Callable:
    """The arch function of ``arch_name``: its router and default options, then the MoE core
    defaults and fairseq's ``base_lm_architecture``, which every arch (dense_lm included)
    shares. ``router=None``: the dense baseline (no MoE layer, MoE options refused)."""

    def arch(cfg):
        args = _GivenOptions(cfg)
        if router is None:
            _refuse_moe_options(arch_name, cfg)
        # the arch names its router unless the user chose one with --moe-router
        elif getattr(args, "moe_router", None) is None:
            args.moe_router = router
        for name, value in defaults.items():
            if name in _BASE_COUNT and any(getattr(args, n, None) is not None for n in _BASE_COUNT):
                continue  # the BASE-layer count was given (by either name)
            if getattr(args, name, None) is None:
                # a callable default is computed from the given options (e.g. hash_lm's one MoE layer)
                setattr(args, name, value(args) if callable(value) else value)
        # defaults a router computes from the whole command line (the top-K routers: their
        # schedule, whose length defaults to --max-update; moe_plugin/routing/_topk.py)
        complete = getattr(ROUTER_REGISTRY.get(getattr(args, "moe_router", None)), "complete_arch_args", None)
        if complete is not None:
            complete(args)
        for f in dataclasses.fields(moe_config.moe_config_class()):
            if getattr(args, f.name, None) is None and f.default is not None:
                setattr(args, f.name, f.default)
        if isinstance(cfg, argparse.Namespace):  # the command line, before fairseq converts it
            check_path_options(cfg)
            ep_glue.prepare_args(cfg)
            # before base_lm_architecture, which would make an unset --base-layers 0
            base_glue.derive_from_command_line(cfg)
        fairseq_base_lm_architecture(cfg)
        refuse_unsupported(cfg)

    arch.__name__ = f"{arch_name}_architecture"
    return arch


def _add_arch(model_name: str, arch_name: str, router: Optional[str], defaults: dict, demo_args=()) -> None:
    if arch_name in ARCH_FUNCTIONS:
        raise ValueError(f"arch {arch_name!r} is declared twice (router {router!r})")
    fn = make_arch_function(arch_name, router, defaults)
    register_model_architecture(model_name, arch_name)(fn)
    ARCH_FUNCTIONS[arch_name] = fn
    _DECLARED[arch_name] = (router, dict(defaults))
    if router is not None:
        ARCHS[arch_name] = (router, dict(defaults))
        DEMO_ARGS[arch_name] = list(demo_args)


def _declared(router_cls) -> bool:
    return getattr(router_cls, "arch_name", None) is not None


def _register_late_router(router_cls) -> None:
    """A router registered after the shell was loaded: its arch on a model of its own whose
    config dataclass holds its options (see the module docstring)."""
    if not _declared(router_cls):
        return
    model_name = f"moe_lm_{router_cls.name}"
    model_cls = type(
        f"MoELanguageModel_{router_cls.name}",
        (MoELanguageModel,),
        {"__doc__": f"moe_lm with the options of router {router_cls.name!r} (registered after the shell)",
         "__module__": __name__},
    )
    register_model(model_name, dataclass=model_config_class())(model_cls)
    _add_arch(model_name, router_cls.arch_name, router_cls.name, router_cls.arch_defaults, router_cls.arch_demo_args)


def _resolve_base_layers(arch_name, count, expert_parallel) -> int:
    """The model dataclass's ``base_layers`` default in a hydra config (resolved when fairseq
    first reads it): the arch's BASE-layer count unless ``moe_base_layers`` gives one."""
    if count is None:
        defaults = _DECLARED.get(arch_name, (None, {}))[1]
        count = defaults.get("moe_base_layers", defaults.get("base_layers", 0))
    return base_glue.fairseq_base_layers(int(count or 0), expert_parallel)


def _resolve_arch_default(arch_name, field: str):
    """An MoE option's default in the model dataclass (resolved when the config is read): what
    the arch function of ``arch_name`` fills, i.e. its router, its plain default, else the core
    default; None for a default computed from the whole config (filled at build time)."""
    router, defaults = _DECLARED.get(arch_name, (None, {}))
    if field == "moe_router":
        return router
    if field in defaults:
        value = defaults[field]
        return None if callable(value) else value
    core = {f.name: f.default for f in dataclasses.fields(moe_config.moe_config_class())}
    value = core.get(field)
    return None if value is dataclasses.MISSING else value


OmegaConf.register_new_resolver(base_glue.RESOLVER, _resolve_base_layers, replace=True)
OmegaConf.register_new_resolver(ARCH_DEFAULT_RESOLVER, _resolve_arch_default, replace=True)

for _router in sorted(ROUTER_REGISTRY.values(), key=lambda cls: cls.name):
    if _declared(_router):
        _add_arch("moe_lm", _router.arch_name, _router.name, _router.arch_defaults, _router.arch_demo_args)
# The dense baseline of the MoE archs: this model without MoE layers, with their defaults
# (pre-LN, a final LayerNorm, input/output dims = --decoder-embed-dim: fairseq's
# base_lm_architecture). fairseq's own `--arch transformer_lm` differs: its arch function is a
# no-op, so its dataclass defaults apply (post-LN, no final LayerNorm, 512-wide input/output
# dims with projections); see docs/fidelity.md, section dense.
_add_arch("moe_lm", DENSE_ARCH, None, {"moe_freq": 0})
on_register(_register_late_router)

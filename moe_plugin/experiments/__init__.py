"""Experiments: one file per paper table, each registering itself by name on import.

An experiment file holds the table's plan at each scale (a function ``build_plan(scale,
args) -> Plan`` built from ``moe_plugin.experiments._plan``), its result table (a function of
the report's runs, ``moe_plugin.tools.report.load_run``, returning markdown lines) and the
paper's published numbers with their source::

    @register_experiment("hash_ablation", table=table, paper=PAPER)
    def build_plan(scale, args): ...

The runner (``python -m moe_plugin.experiments.runner NAME``, behind
``bash scripts/reproduce/NAME.sh``), the hydra-config generator (``... runner configs``) and
the report (``python -m moe_plugin.tools.report``) read :data:`EXPERIMENTS`. Every module of
this package is imported here, so a new experiment is one new file; modules whose name
starts with ``_`` (the plan vocabulary, the config generator) and the runner are not
experiments.
"""

import argparse
import importlib
import pkgutil
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

#: the machinery of this package, not experiments (besides the ``_`` modules)
_NOT_EXPERIMENTS = ("runner",)


@dataclass(frozen=True)
class Experiment:
    """One paper table: how to run it and how to read its results.

    ``build_plan(scale, args)`` returns the :class:`~moe_plugin.experiments._plan.Plan` of
    ``scale`` (``args``: the runner's parsed command line: ``out``, ``data_root``,
    ``updates`` and what ``add_arguments`` adds); ``table(runs)`` the markdown lines of the
    paper-style table from the report's runs of this experiment; ``paper`` the published
    numbers (``source`` and ``verified`` keys, then what ``table`` reads); ``description``
    the command line's help (default: the experiment module's docstring).
    """

    name: str
    build_plan: Callable[[str, argparse.Namespace], object]
    table: Callable[[List[dict]], List[str]]
    paper: Dict[str, object]
    description: str = ""
    add_arguments: Optional[Callable[[argparse.ArgumentParser], None]] = None


#: name -> Experiment, in registration (import) order
EXPERIMENTS: Dict[str, Experiment] = {}


def register_experiment(name: str, *, table: Callable[[List[dict]], List[str]], paper: Dict[str, object],
                        add_arguments: Optional[Callable] = None, description: Optional[str] = None):
    """Function decorator on an experiment's ``build_plan``: register it under ``name``."""

    def wrap(build_plan):
        if name in EXPERIMENTS:
            raise ValueError(f"experiment {name!r} is registered twice")
        if "source" not in paper:
            raise ValueError(f"experiment {name!r}: paper numbers need a 'source' (where they come from)")
        doc = description if description is not None else (sys.modules[build_plan.__module__].__doc__ or "")
        EXPERIMENTS[name] = Experiment(name, build_plan, table, dict(paper), doc, add_arguments)
        return build_plan

    return wrap


for _mod in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if not _mod.startswith("_") and _mod not in _NOT_EXPERIMENTS:
        importlib.import_module(f"{__name__}.{_mod}")

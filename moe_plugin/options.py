"""Every option an arch accepts, with that arch's default and its help line.

    python -m moe_plugin.options [--arch ARCH] [--user-dir DIR] [--markdown | --update-docs ROOT]

``fairseq-train --arch switch_lm --help`` prints its help before it adds the model's options,
so no ``--moe-*`` option appears there. This reads the parser fairseq-train builds itself
(``options.parse_args_and_arch`` with the arch and ``--criterion moe_cross_entropy``, which adds
the model's and the criterion's options to it), keeps the plugin's options (MoE core, each
router's, BASE layers, criterion) and reads each default from the namespace the arch function
filled. ``--markdown`` prints them as tables; ``--update-docs`` rewrites the generated tables of
README.md and docs/options.md (tests/test_options.py checks they are current).
"""

import argparse
import dataclasses
import logging
import math
import os
import re
import sys
from typing import Dict, List, Optional, Tuple

#: the plugin's directory: fairseq's --user-dir
USER_DIR = os.path.dirname(os.path.abspath(__file__))
#: fairseq's own BASE-layer options, which base_lm keeps (moe_plugin/models/base_layers.py)
BASE_FIELDS = ("base_layers", "base_sublayers", "base_shuffle", "moe_base_layers")
#: shell fields that are derived, not options a user sets (filled from --seed / --train-subset)
DERIVED = ("moe_seed", "moe_train_subset")


@dataclasses.dataclass
class Option:
    flag: str
    default: object
    help: str
    group: str


def _groups() -> List[Tuple[str, Tuple[str, ...]]]:
    """(group title, field names) in print order: the core, each router's options, BASE, criterion."""
    from moe_plugin import config as moe_config
    from moe_plugin.criterions.moe_cross_entropy import MoECrossEntropyConfig
    from moe_plugin.routing import ROUTER_OPTIONS

    out = [("MoE layers (every MoE arch)", tuple(f.name for f in dataclasses.fields(moe_config.MoECoreOptions)))]
    for name in sorted(ROUTER_OPTIONS):
        out.append((f"router {name}", tuple(f.name for f in dataclasses.fields(ROUTER_OPTIONS[name]))))
    out.append(("BASE layers", BASE_FIELDS))
    crit = {f.name for f in dataclasses.fields(MoECrossEntropyConfig)} - {
        f.name for f in dataclasses.fields(_cross_entropy_config())}
    out.append(("criterion moe_cross_entropy", tuple(f.name for f in dataclasses.fields(MoECrossEntropyConfig)
                                                     if f.name in crit)))
    return out


def _cross_entropy_config():
    from fairseq.criterions.cross_entropy import CrossEntropyCriterionConfig

    return CrossEntropyCriterionConfig


def parse(arch: str, user_dir: Optional[str] = None, extra=()) -> Tuple[argparse.ArgumentParser, argparse.Namespace]:
    """fairseq-train's parser and namespace for ``--arch ARCH --criterion moe_cross_entropy``
    (a placeholder data path: nothing is read)."""
    from fairseq import options

    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, [
        "DATA", "--task", "language_modeling", "--user-dir", user_dir or USER_DIR, "--arch", arch,
        "--criterion", "moe_cross_entropy", *extra])
    return parser, args


def arch_options(arch: str, user_dir: Optional[str] = None) -> List[Option]:
    """Every plugin option ``--arch ARCH`` accepts, with the arch's default: the core group, the
    arch's own router's group, the other routers' groups, BASE layers, the criterion. The dense
    baseline refuses every MoE option (moe_plugin/models/archs.py): it accepts the criterion's."""
    from moe_plugin.models.archs import ARCHS

    parser, args = parse(arch, user_dir)
    actions = {a.dest: a for a in parser._actions if a.option_strings}
    own = f"router {ARCHS[arch][0]}" if arch in ARCHS else None
    groups = _groups()
    if arch not in ARCHS:
        groups = [g for g in groups if g[0].startswith("criterion")]
    groups.sort(key=lambda g: (not g[0].startswith("MoE"), g[0] != own))  # stable: core, own router, rest
    out = []
    for title, names in groups:
        for name in names:
            action = actions.get(name)
            if action is None or name in DERIVED:
                continue
            shown = f"{title} (this arch's router)" if title == own else title
            out.append(Option(action.option_strings[0], getattr(args, name, None), action.help or "", shown))
    return out


def _fmt(value) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def text(arch: str, user_dir: Optional[str] = None) -> str:
    """The options of ``arch`` as plain text, grouped, one per line: flag, default, help."""
    from moe_plugin.models.archs import ARCHS

    opts = arch_options(arch, user_dir)
    lines = [f"--arch {arch}: {len(opts)} moe_plugin options (default: this arch's); fairseq's own: "
             "fairseq-train --help"]
    if arch not in ARCHS:
        lines.append("the dense baseline: every MoE option is refused (it would have no effect)")
    group = None
    for o in opts:
        if o.group != group:
            group = o.group
            lines.append(f"\n{group}:")
        lines.append(f"  {o.flag:<40} {_fmt(o.default):<9} {o.help}")
    return "\n".join(lines) + "\n"


def markdown(user_dir: Optional[str] = None, groups: Optional[List[str]] = None) -> str:
    """Option tables in markdown (docs/options.md; the README holds the core and criterion ones):
    one table per group (``groups``: those titles only), the default most MoE archs give and,
    beside it, every arch whose default differs."""
    from moe_plugin.models.archs import ARCHS

    per_arch = {a: {o.flag: o for o in arch_options(a, user_dir)} for a in sorted(ARCHS)}
    flags: Dict[str, Tuple[str, str]] = {}  # flag -> (group, help), in the group order of _groups()
    for title, _ in _groups():
        for opts in per_arch.values():
            for flag, o in opts.items():
                if o.group.startswith(title) and flag not in flags:
                    flags[flag] = (title, o.help)
    blocks, group = [], None
    for flag, (title, help_) in flags.items():
        if groups is not None and title not in groups:
            continue
        if title != group:
            group = title
            blocks.append(f"\n#### {title}\n| option | default | meaning |\n|---|---|---|")
        values = {a: _fmt(opts[flag].default) for a, opts in per_arch.items() if flag in opts}
        counts = list(values.values())
        common = max(sorted(set(counts)), key=counts.count)
        if counts.count(common) == 1 and len(counts) > 1:  # no shared default (--moe-router)
            default = "per arch: " + "; ".join(f"{a}: {v}" for a, v in values.items())
        else:
            others = "; ".join(f"{a}: {v}" for a, v in values.items() if v != common)
            default = f"`{common}`" + (f" ({others})" if others else "")
        blocks.append(f"| `{flag}` | {default} | {help_.replace('|', '/')} |")
    return "\n".join(blocks).lstrip("\n") + "\n"


#: files holding generated option tables between ``<!-- options: GROUP|all -->`` and ``<!-- /options -->``
DOC_FILES = ("README.md", os.path.join("docs", "options.md"))
_BLOCK = re.compile(r"(<!-- options: (.+?) -->\n)(.*?)(<!-- /options -->)", re.S)


def sync_docs(root: str, write: bool = False, user_dir: Optional[str] = None) -> List[str]:
    """The files of :data:`DOC_FILES` (under ``root``) whose option blocks differ from
    :func:`markdown`; with ``write``, rewrite those blocks."""
    cache: Dict[str, str] = {}

    def block(m):
        title = m.group(2)
        if title not in cache:
            cache[title] = markdown(user_dir, None if title == "all" else [title])
        return m.group(1) + cache[title] + m.group(4)

    stale = []
    for name in DOC_FILES:
        path = os.path.join(root, name)
        old = open(path).read()
        new = _BLOCK.sub(block, old)
        if new != old:
            stale.append(name)
            if write:
                with open(path, "w") as f:
                    f.write(new)
    return stale


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m moe_plugin.options", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default=None, help="the arch whose options to print (default: every registered arch)")
    p.add_argument("--user-dir", default=None, help="a --user-dir registering more routers (default: moe_plugin)")
    p.add_argument("--markdown", action="store_true", help="print every option table in markdown instead")
    p.add_argument("--update-docs", metavar="ROOT", help="rewrite the generated option tables of README.md and "
                   "docs/options.md under ROOT (the repository)")
    a = p.parse_args(argv)
    logging.disable(logging.INFO)  # fairseq's and the plugin's build messages
    if a.update_docs:
        print("rewritten:", ", ".join(sync_docs(a.update_docs, write=True, user_dir=a.user_dir)) or "nothing")
        return 0
    if a.markdown:
        sys.stdout.write(markdown(a.user_dir))
        return 0
    if a.arch is None:
        from moe_plugin.models.archs import ARCHS, DENSE_ARCH

        for arch in [DENSE_ARCH] + sorted(ARCHS):
            sys.stdout.write(text(arch, a.user_dir) + "\n")
        return 0
    sys.stdout.write(text(a.arch, a.user_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())

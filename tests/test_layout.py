"""The package's wings and the direction of their imports (docs/architecture.md), read from the
source with ``ast`` (every import statement, also those inside functions):

* core (config, routing/, losses, experts, dispatch/, moe_layer, base_layer, utils) imports no
  fairseq or fairscale, and nothing of the shell, tools or experiments;
* the shell (models/, criterions/) imports no tools or experiments;
* nothing imports ``scripts/`` (no ``import scripts...``, no ``importlib`` load of a file in it)
  and nothing edits ``sys.path``: the package is installed. (data-prep/ holds stand-alone
  scripts in a directory that is no package name; tests may load those by path.)
"""

import ast
import os

import pytest

from tests.conftest import ROOT

PACKAGE = os.path.join(ROOT, "moe_plugin")
CORE = ("moe_plugin.config", "moe_plugin.routing", "moe_plugin.losses", "moe_plugin.experts", "moe_plugin.dispatch",
        "moe_plugin.moe_layer", "moe_plugin.base_layer", "moe_plugin.utils")
SHELL = ("moe_plugin.models", "moe_plugin.criterions")
TOOLS = ("moe_plugin.tools", "moe_plugin.options")
EXPERIMENTS = ("moe_plugin.experiments",)
FAIRSEQ = ("fairseq", "fairseq_cli", "fairscale")


def python_files(top):
    for d, dirs, files in os.walk(top):
        dirs[:] = [x for x in dirs if x not in ("__pycache__", ".venv", "fixtures")]
        for f in files:
            if f.endswith(".py"):
                yield os.path.join(d, f)


def module_name(path):
    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def imports(path):
    """(line, imported module) for every import in the file; relative imports resolved."""
    tree = ast.parse(open(path).read(), path)
    mod = module_name(path)
    package = mod if path.endswith("__init__.py") else mod.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            out.append((node.lineno, base))
            out += [(node.lineno, f"{base}.{a.name}") for a in node.names]  # `from pkg import mod`
    return out


def within(name, prefixes):
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def wing(mod):
    for w, prefixes in (("core", CORE), ("shell", SHELL), ("tools", TOOLS), ("experiments", EXPERIMENTS)):
        if within(mod, prefixes):
            return w
    return None


FORBIDDEN = {
    "core": FAIRSEQ + SHELL + TOOLS + EXPERIMENTS,
    "shell": TOOLS + EXPERIMENTS,
}


def test_every_package_module_is_in_a_wing():
    """A new top-level module must be placed in a wing (and in docs/architecture.md)."""
    loose = [module_name(p) for p in python_files(PACKAGE)
             if module_name(p) != "moe_plugin" and wing(module_name(p)) is None]
    assert not loose


def test_imports_run_one_way():
    bad = []
    for path in python_files(PACKAGE):
        mod = module_name(path)
        for line, name in imports(path):
            if within(name, FORBIDDEN.get(wing(mod), ())):
                bad.append(f"{os.path.relpath(path, ROOT)}:{line} ({wing(mod)}) imports {name}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("top", ["moe_plugin", "scripts", "tests", "data-prep"])
def test_nothing_imports_scripts_or_edits_sys_path(top):
    bad = []
    for path in python_files(os.path.join(ROOT, top)):
        tree = ast.parse(open(path).read(), path)
        for line, name in imports(path):
            if within(name, ("scripts",)):
                bad.append(f"{os.path.relpath(path, ROOT)}:{line} imports {name}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                target = ast.unparse(node.func)
                loads_scripts = target == "importlib.util.spec_from_file_location" and "scripts" in ast.unparse(node)
                if target in ("sys.path.insert", "sys.path.append") or loads_scripts:
                    bad.append(f"{os.path.relpath(path, ROOT)}:{node.lineno} calls {ast.unparse(node)}")
    assert not bad, "\n".join(bad)


def test_the_rule_catches_a_wrong_arrow(tmp_path):
    """The reader sees imports inside functions and relative ones (so the tests above can fail)."""
    pkg = tmp_path / "moe_plugin" / "routing"
    pkg.mkdir(parents=True)
    f = pkg / "bad.py"
    f.write_text("def f():\n    from ..models import moe_lm\n    import fairseq.models\n")
    global ROOT
    saved, ROOT = ROOT, str(tmp_path)
    try:
        names = [n for _, n in imports(str(f))]
    finally:
        ROOT = saved
    assert "moe_plugin.models.moe_lm" in names and "fairseq.models" in names
    assert within("moe_plugin.models.moe_lm", FORBIDDEN["core"]) and within("fairseq.models", FORBIDDEN["core"])


def test_architecture_doc_names_every_module():
    """docs/architecture.md and the code agree: every module of the package is named there."""
    doc = open(os.path.join(ROOT, "docs", "architecture.md")).read()
    missing = [os.path.relpath(p, PACKAGE) for p in python_files(PACKAGE)
               if not p.endswith("__init__.py") and os.path.basename(p) not in doc]
    assert not missing

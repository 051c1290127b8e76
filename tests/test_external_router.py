"""A router defined outside the package joins the options, the archs and the contract test.

The recipe of docs/architecture.md ("add a router" from your own directory): a directory
``myrouter/`` whose ``__init__.py`` imports ``moe_plugin.routing`` and registers a router with
its option dataclass and its arch; ``fairseq-train --user-dir myrouter --arch mine_lm
--mine-alpha 0.5`` trains it and ``fairseq-eval-lm --user-dir myrouter`` evaluates its
checkpoint. Checked here through the real command-line tools (subprocesses), and the router
contract (tests/test_router_contract.py) on the same router registered in this process.
"""

import sys

import torch

import pytest

import moe_plugin  # noqa: F401
from moe_plugin.routing import ROUTER_OPTIONS, ROUTER_REGISTRY
from moe_plugin.tools import commands
from tests import test_router_contract as contract
from tests.conftest import TINY_MODEL, TINY_TRAIN, USER_DIR, eval_lm_loss, run_cli

#: a researcher's router file: a fixed random linear gate (a buffer, so it is in the
#: checkpoint), logits scaled by --<name>-alpha, top-1; padding is not routed
ROUTER_SOURCE = '''
import dataclasses

import torch

from moe_plugin.routing import DROPPED, Router, RouterOutput, register_router


@dataclasses.dataclass
class {Name}Options:
    {name}_alpha: float = dataclasses.field(default=1.0, metadata={{"help": "logit scale of the {name} router"}})


@register_router("{name}", options={Name}Options, {arch_kw})
class {Name}Router(Router):
    """Top-1 by a fixed random linear gate; the combine weight is the softmax probability."""

    needs_tokens = True

    def __init__(self, cfg, model_dim, **kwargs):
        super().__init__(cfg, model_dim, **kwargs)
        g = torch.Generator().manual_seed(1000 + (self.layer_index or 0))
        self.register_buffer("gate_DE", torch.randn(model_dim, self.num_experts, generator=g))
        self.register_buffer("alpha", torch.tensor(float(cfg.{name}_alpha)))

    def forward(self, x_TD, *, tokens=None):
        probs_TE = torch.softmax(self.alpha * (x_TD.float() @ self.gate_DE), dim=-1)
        weight_T, expert_T = probs_TE.max(dim=-1)
        valid_T = torch.ones_like(expert_T, dtype=torch.bool) if tokens is None else ~tokens.pad_mask_T
        expert_T = torch.where(valid_T, expert_T, torch.full_like(expert_T, DROPPED))
        weight_T = weight_T * valid_T
        counts_E = torch.zeros(self.num_experts, dtype=torch.long, device=x_TD.device)
        counts_E.scatter_add_(0, expert_T.clamp(min=0), valid_T.long())
        return RouterOutput(expert_T.unsqueeze(1), weight_T.to(x_TD.dtype).unsqueeze(1),
                            stats={{"tokens_per_expert": counts_E}})
'''


def router_source(name: str, arch: str = None) -> str:
    arch_kw = f'arch="{arch}", arch_defaults={{"moe_freq": 2}}' if arch else "arch=None"
    return ROUTER_SOURCE.format(name=name, Name=name.capitalize(), arch_kw=arch_kw)


def test_router_from_a_user_dir_trains_and_evaluates_through_fairseq(tiny_corpus, tmp_path):
    _, data_bin = tiny_corpus
    user_dir = tmp_path / "myrouter"
    user_dir.mkdir()
    (user_dir / "__init__.py").write_text(router_source("mine", arch="mine_lm"))
    save = tmp_path / "ckpt"
    train = [a if a != USER_DIR else str(user_dir) for a in TINY_TRAIN]
    out = run_cli("train", data_bin, *train, *TINY_MODEL, "--arch", "mine_lm", "--mine-alpha", "0.5",
                  "--moe-expert-count", "4", "--criterion", "moe_cross_entropy", "--max-update", "3",
                  "--save-dir", save, "--disable-validation")
    log = out.stdout + out.stderr
    assert "num_updates=3" in log or "num_updates 3" in log, log[-3000:]
    state = torch.load(save / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    # the option reached the config fairseq saved and the routers (their state, in the checkpoint)
    assert state["cfg"]["model"]["_name"] == "mine_lm"
    assert state["cfg"]["model"]["mine_alpha"] == 0.5 and state["cfg"]["model"]["moe_router"] == "mine"
    alphas = {k: float(v) for k, v in state["model"].items() if k.endswith("router.alpha")}
    assert alphas and set(alphas.values()) == {0.5}, sorted(state["model"])
    ev = run_cli("eval_lm", data_bin, "--path", save / "checkpoint_last.pt", "--user-dir", user_dir, "--cpu",
                 "--task", "language_modeling", "--tokens-per-sample", "32", "--max-tokens", "512",
                 "--gen-subset", "valid", "--num-workers", "0")
    loss = eval_lm_loss(ev.stdout + ev.stderr)
    assert 0 < loss < 20
    # its options are listed for its arch, with their defaults
    listed = commands.run([sys.executable, "-m", "moe_plugin.options", "--user-dir", user_dir, "--arch", "mine_lm"],
                          merge_stderr=False).stdout
    assert "router mine (this arch's router):" in listed
    assert any(line.split()[:2] == ["--mine-alpha", "1.0"] for line in listed.splitlines())


@pytest.fixture
def registered_router():
    """A router registered at test time, from source outside the package (no arch: nothing is
    registered with fairseq in this process); unregistered afterwards."""
    name = "outside"
    namespace = {}
    exec(compile(router_source(name), "<outside router>", "exec"), namespace)
    try:
        yield name
    finally:
        ROUTER_REGISTRY.pop(name, None)
        ROUTER_OPTIONS.pop(name, None)


def test_a_router_registered_after_import_keeps_the_contract(registered_router):
    from moe_plugin import config

    name = registered_router
    assert name in ROUTER_REGISTRY and name in contract.all_router_names()
    assert "outside_alpha" in config.MOE_FIELDS  # its options joined the config class
    assert contract.make(name).alpha == 1.0
    for training in (True, False):
        contract.test_output_contract(name, training)
    contract.test_eval_is_deterministic_and_state_dict_round_trips(name)
    contract.test_padding_is_not_routed(name)

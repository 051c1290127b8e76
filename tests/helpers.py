"""Test helpers: a router config for any registered router, token infos, slow references."""

import dataclasses

import torch

from moe_plugin import config as moe_config
from moe_plugin.models.archs import ARCHS
from moe_plugin.routing import ROUTER_REGISTRY, TokenInfo, VocabInfo


def router_cfg(name: str, **overrides):
    """MoEConfig for router ``name`` with its arch's defaults (as --arch would give); the
    current MoEConfig class, so a router registered at test time has its options."""
    MoEConfig = moe_config.moe_config_class()
    known = {f.name for f in dataclasses.fields(MoEConfig)}
    values = {"moe_router": name}
    for arch, (router, defaults) in ARCHS.items():
        if router == name:
            # an arch's defaults may name fairseq options too (base_layers): not MoEConfig's;
            # a default computed from the command line (a callable) is left to the core default
            values.update({k: v for k, v in defaults.items() if k in known and not callable(v)})
    if "moe_gating_use_fp32" in overrides:  # the config's derived property
        overrides["moe_no_gating_fp32"] = not overrides.pop("moe_gating_use_fp32")
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"router_cfg: {unknown} are not MoEConfig fields")
    values.update(overrides)
    return MoEConfig(**values)


def token_info(ids_BT: torch.Tensor, pad: int = 1) -> TokenInfo:
    """TokenInfo in fairseq's (T x B) row order from a (B, T) batch of ids."""
    B, L = ids_BT.shape
    prev = torch.cat([ids_BT.new_full((B, 1), pad), ids_BT[:, :-1]], 1)
    nxt = torch.cat([ids_BT[:, 1:], ids_BT.new_full((B, 1), pad)], 1)
    pos = torch.arange(L).unsqueeze(0).expand(B, L)
    f = lambda t: t.t().reshape(-1)  # noqa: E731
    return TokenInfo(ids_T=f(ids_BT), prev_ids_T=f(prev), positions_T=f(pos), pad_mask_T=f(ids_BT.eq(pad)),
                     next_ids_T=f(nxt), batch_size=B)


def vocab_info(size: int = 50, seed: int = 0) -> VocabInfo:
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, 1000, (size,), generator=g)
    counts[:4] = 1  # fairseq's special symbols
    return VocabInfo(size=size, pad=1, eos=2, counts_V=counts)


def all_router_names():
    return sorted(ROUTER_REGISTRY)


def reference_moe(x_TD, expert_ids_TK, weights_TK, experts):
    """Slow obvious MoE: for every token and every kept slot, add w * FFN_e(x_t)."""
    out = torch.zeros_like(x_TD)
    for t in range(x_TD.shape[0]):
        for k in range(expert_ids_TK.shape[1]):
            e = int(expert_ids_TK[t, k])
            if e < 0:
                continue
            h = x_TD[t] @ experts.w1_EDF[e] + experts.b1_EF[e]
            h = experts.activation(h)
            out[t] = out[t] + weights_TK[t, k] * (h @ experts.w2_EFD[e] + experts.b2_ED[e])
    return out


def lm_sample(src_BT: torch.Tensor, tgt_BT: torch.Tensor, pad: int) -> dict:
    """A fairseq language-modelling sample from (B, L) source and target ids (pad marks padding)."""
    B, L = src_BT.shape
    return {
        "id": torch.arange(B),
        "net_input": {"src_tokens": src_BT, "src_lengths": src_BT.ne(pad).sum(1)},
        "target": tgt_BT,
        "ntokens": int(tgt_BT.ne(pad).sum()),
        "nsentences": B,
    }

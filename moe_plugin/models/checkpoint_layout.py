"""What a checkpoint holds: the expert layout metadata saved with every moe_lm model.

The model's state_dict carries one extra entry, ``_extra_state`` (``nn.Module``'s
extra-state hook), written by :func:`model_layout`::

    {"format": 1,
     "world_size": W, "rank": r,           # expert-parallel workers (1/0 = all experts here)
     "last_update": n,                     # last update index seen (-1: none), same on every rank
     "layers": {"1": {"num_experts": E, "router": "switch", "experts": [first, stop],
                      "prefix": "decoder.layers.1.fc1.experts."}, ...},
     "params": [[name, requires_grad], ...],   # model.named_parameters() order
     "checksums": {name: int, ...}}            # every parameter and persistent buffer

``params`` lets ``python -m moe_plugin.tools.reshard`` map optimizer state (indexed by the
position of each trainable parameter) to names without building the model.

``checksums`` (the sum of each tensor's bit pattern read as integers, mod 2^64: exact and
the same on any device, so computed where the tensors are with one small transfer; any
single flipped bit changes it) make fairseq itself refuse a corrupt file: ``torch.load``
checks neither the zip CRCs nor anything else, so a damaged byte inside a tensor would
load silently;
:func:`upgrade_state_dict` (fairseq's upgrade hook, run on the whole state_dict before
loading) recomputes them and raises :class:`CheckpointCorruptError` naming the tensor.

On load, :func:`apply_layout` compares the saved layout with the model's own and raises
:class:`LayoutMismatchError` naming every difference and the command that fixes it,
before any tensor is copied. Checkpoints written before this metadata existed get a
layout inferred from their tensor shapes (:func:`upgrade_state_dict`).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from moe_plugin.dispatch.expert_parallel import FRESH, is_expert_parallel
from moe_plugin.dispatch.placement import ExpertPlacement, describe_placement

FORMAT = 1
EXTRA_STATE_KEY = "_extra_state"


class LayoutMismatchError(ValueError):
    """A checkpoint's experts (count, router or placement) do not fit the model loading it."""


class CheckpointCorruptError(RuntimeError):
    """A checkpoint's tensors do not match the checksums recorded when it was saved."""


_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bit_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of a tensor's elements' bit patterns as integers (int64, wraps mod 2^64), on its device."""
    flat = t.detach().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    view = _INT_VIEW.get(flat.element_size())
    if view is None or flat.numel() == 0:
        return torch.zeros((), dtype=torch.int64, device=flat.device)
    return flat.contiguous().view(view).sum(dtype=torch.int64)


def tensor_checksum(t: torch.Tensor) -> int:
    """The checksum of one tensor (see the module docstring)."""
    return int(_bit_sum(t))


def checksums(named_tensors) -> Dict[str, int]:
    """Checksums of many tensors with a single device-to-host transfer."""
    named = list(named_tensors)
    if not named:
        return {}
    dev = named[0][1].device
    sums = torch.stack([_bit_sum(t).to(dev) for _, t in named]).tolist()
    return {n: s for (n, _), s in zip(named, sums)}


def _state_tensors(model):
    """(name, tensor) of every parameter and persistent buffer, as in the state_dict."""
    for mod_name, mod in model.named_modules():
        prefix = mod_name + "." if mod_name else ""
        for n, p in mod.named_parameters(recurse=False):
            yield prefix + n, p
        for n, b in mod.named_buffers(recurse=False):
            if b is not None and n not in mod._non_persistent_buffers_set:
                yield prefix + n, b


def _moe_layers(model) -> List[Tuple[int, object]]:
    return list(model.moe_layers()) if hasattr(model, "moe_layers") else []


def _experts_prefixes(model) -> Dict[int, str]:
    """decoder layer index -> state_dict prefix of that MoE layer's expert module."""
    names = {id(m): n for n, m in model.named_modules()}
    out = {}
    for index, layer in _moe_layers(model):
        name = names.get(id(layer.experts))
        if name is not None:
            out[index] = name + "."
    return out


def layer_placement(layer) -> Tuple[int, int, int, int]:
    """(first expert, stop, world size, rank) of an MoE layer (its :class:`ExpertPlacement`)."""
    p: ExpertPlacement = layer.placement
    return p.first, p.stop, p.world_size, p.rank


def model_layout(model) -> dict:
    """The layout metadata of a model (see the module docstring)."""
    prefixes = _experts_prefixes(model)
    layers = {}
    world, rank = 1, 0
    for index, layer in _moe_layers(model):
        first, stop, W, r = layer_placement(layer)
        if W > 1:
            world, rank = W, r
        layers[str(index)] = {
            "num_experts": int(layer.num_experts),
            "router": str(layer.router.name),
            "experts": [int(first), int(stop)],
            "prefix": prefixes.get(index, ""),
        }
    return {
        "format": FORMAT,
        "world_size": world,
        "rank": rank,
        "last_update": int(getattr(model, "moe_last_update", FRESH)),
        "layers": layers,
        "params": [[n, bool(p.requires_grad)] for n, p in model.named_parameters()],
        "checksums": checksums(_state_tensors(model)),
    }


def reshard_command(world_size: int) -> str:
    return (
        f"python -m moe_plugin.tools.reshard --input CHECKPOINT --world-size {world_size} --output OUT_DIR "
        "(CHECKPOINT: the checkpoint you loaded, any one of its -rank-N files; then load "
        + ("OUT_DIR/checkpoint_last.pt" if world_size == 1 else "OUT_DIR/checkpoint_last-rank-N.pt on rank N")
        + ")"
    )


def compare_layouts(saved: dict, current: dict) -> Optional[str]:
    """None when ``saved`` fits ``current``; otherwise the error message."""
    problems, fixable = [], True
    s_layers, c_layers = saved.get("layers", {}), current.get("layers", {})
    if sorted(s_layers, key=int) != sorted(c_layers, key=int):
        problems.append(
            f"the checkpoint has MoE layers {sorted(map(int, s_layers))}, this model {sorted(map(int, c_layers))} "
            "(--moe-freq / --moe-layers / --decoder-layers differ)"
        )
        fixable = False
    for key in sorted(set(s_layers) & set(c_layers), key=int):
        s, c = s_layers[key], c_layers[key]
        if s["num_experts"] != c["num_experts"]:
            problems.append(
                f"layer {key}: the checkpoint has --moe-expert-count {s['num_experts']}, this model {c['num_experts']}"
            )
            fixable = False
        if s["router"] != c["router"]:
            problems.append(f"layer {key}: the checkpoint routes with '{s['router']}', this model with '{c['router']}'")
            fixable = False
        if fixable and list(s["experts"]) != list(c["experts"]):
            problems.append(
                f"layer {key}: the checkpoint holds "
                + describe_placement(*s["experts"], s["num_experts"], saved.get("world_size", 1), saved.get("rank", 0))
                + "; this model holds "
                + describe_placement(*c["experts"], c["num_experts"], current["world_size"], current["rank"])
            )
    if not problems:
        return None
    msg = "checkpoint does not fit this model:\n  - " + "\n  - ".join(problems) + "\nfix: "
    if fixable:
        msg += "reshard it for this model's workers: " + reshard_command(current["world_size"])
    else:
        msg += (
            "build the model with the checkpoint's own options (its cfg.model: --arch, --moe-router, "
            "--moe-expert-count, --moe-freq/--moe-layers); resharding moves experts between workers "
            "but cannot change their number or the router"
        )
    return msg


def apply_layout(model, saved: dict) -> None:
    """Check a saved layout against ``model`` (raise :class:`LayoutMismatchError`) and set
    the resume stamp of its expert-parallel dispatchers."""
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise LayoutMismatchError(
            f"checkpoint layout metadata has an unknown format ({type(saved).__name__} "
            f"{saved.get('format') if isinstance(saved, dict) else ''}); this moe_plugin reads format {FORMAT}"
        )
    msg = compare_layouts(saved, model_layout(model))
    if msg:
        raise LayoutMismatchError(msg)
    for _, layer in _moe_layers(model):
        if is_expert_parallel(layer):
            layer.dispatcher.stamp = int(saved.get("last_update", FRESH))


def infer_layout(model, state_dict: dict, prefix: str = "") -> dict:
    """A layout for a checkpoint without metadata, read from its expert tensor shapes.

    A layer whose expert tensors hold E/W experts is described as a shard of unknown rank
    (a full layout is the only one such a checkpoint can be loaded as).
    """
    layout = model_layout(model)
    layout["last_update"] = FRESH
    layout["world_size"], layout["rank"] = 1, 0
    layout["checksums"] = {}
    for key, entry in layout["layers"].items():
        E = entry["num_experts"]
        held = None
        for name, value in state_dict.items():
            if name.startswith(prefix + entry["prefix"]) and torch.is_tensor(value) and value.dim() > 0:
                held = int(value.shape[0])
                break
        if held is None or held == E:
            entry["experts"] = [0, E]
        else:
            entry["experts"] = [0, held]
            layout["world_size"] = max(1, E // max(held, 1))
            layout["rank"] = -1
    return layout


def verify_checksums(state_dict: dict, layout: dict, prefix: str = "") -> None:
    """Raise CheckpointCorruptError when a tensor differs from what was saved."""
    for name, expected in (layout.get("checksums") or {}).items():
        t = state_dict.get(prefix + name)
        if torch.is_tensor(t) and tensor_checksum(t) != expected:
            raise CheckpointCorruptError(
                f"checkpoint tensor {name} is corrupt (its bytes differ from the checksum recorded when "
                "it was saved); resume from an older checkpoint: python -m moe_plugin.tools.reshard --check "
                "SAVE_DIR lists the good ones"
            )


def upgrade_state_dict(model, state_dict: dict, name: str = "") -> None:
    """fairseq's upgrade hook: verify the checksums; give a checkpoint without layout
    metadata an inferred layout."""
    prefix = name + "." if name else ""
    key = prefix + EXTRA_STATE_KEY
    if key not in state_dict:
        state_dict[key] = infer_layout(model, state_dict, prefix)
    elif isinstance(state_dict[key], dict):
        verify_checksums(state_dict, state_dict[key], prefix)

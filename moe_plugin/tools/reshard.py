"""Reshard expert-parallel checkpoints: N per-rank shards -> M (merge M < N, split M > N).

    python -m moe_plugin.tools.reshard --input SAVE_DIR/checkpoint_last.pt --world-size M --output OUT_DIR
    python -m moe_plugin.tools.reshard --check SAVE_DIR            # integrity of every checkpoint
    python -m moe_plugin.tools.reshard --resume SAVE_DIR --world-size W   # what a restart should load

``--input`` names a checkpoint: a plain file (one process, or local mode), any one file of
a per-rank set (``NAME-rank-R.pt``), or ``NAME.pt`` when only ``NAME-rank-*.pt`` exist.
The output is ``OUT_DIR/NAME.pt`` for M = 1 (fairseq-eval-lm / fairseq-train in one
process load it as is) and ``OUT_DIR/NAME-rank-R.pt`` for M > 1 (each rank of an M-worker
expert-parallel run loads its own, fairseq adds the suffix).

What is resharded (legend: E experts of a layer, N input ranks, M output ranks):

* model: every tensor of a layer's expert module (the layout metadata names its prefix)
  is concatenated over the N shards in rank order along its leading expert dimension
  (E/N each) and split into M slices of E/M; every other tensor (attention, embeddings,
  routers, BASE centroids, hash tables) is shared and taken from rank 0, after checking
  that all shards agree (legacy_ddp keeps them bitwise equal; a difference is reported);
* layout metadata: rewritten for each output rank (world size M, its expert range);
* optimizer state (``last_optimizer_state``), when the optimizer keeps per-parameter
  state whose tensors have the parameter's leading expert dimension (Adam, AdamW, SGD
  momentum, Adagrad, NAG, Adafactor's factored rows): expert entries are concatenated and
  split like the weights, shared ones taken from rank 0, scalars (``step``) checked equal.
  fairseq's flattened fp16 optimizer (one flat fp32 buffer) is unflattened first. Any
  other state (a composite optimizer, a state tensor without the expert dimension) cannot
  be split by expert: the output then has no optimizer state, the tool says so, and
  training resumes with ``--reset-optimizer`` (fairseq then restarts the update count and
  the learning-rate schedule too, as it always does without optimizer state);
* the data iterator position (``iterations_in_epoch``) counts batches per rank: it is
  scaled by N/M so the resumed run skips the same global batches (rounded down when
  N/M does not divide it: a few batches are seen twice, reported).

Everything else (cfg, optimizer history, lr scheduler, meters) is copied from rank 0.
Files are written atomically. Nothing is loaded into a model: no data directory is needed.
"""

from __future__ import annotations

import argparse
import copy
import glob
import os
import sys
from typing import Dict, List, Optional, Tuple

import torch

from moe_plugin.tools.checkpoints import (
    CheckpointError,
    atomic_save,
    checkpoint_sets,
    choose_resume,
    load_verified,
    num_updates,
    split_name,
)
from moe_plugin.dispatch.placement import ExpertPlacement
from moe_plugin.models.checkpoint_layout import EXTRA_STATE_KEY, FORMAT, checksums


class ReshardError(ValueError):
    pass


# ----------------------------------------------------------------------------------------
# finding and loading the input shards
# ----------------------------------------------------------------------------------------


def find_shards(path: str) -> List[str]:
    """The files of the checkpoint ``path`` names, in rank order."""
    stem, rank = split_name(path)
    directory = os.path.dirname(path) or "."
    ranked = glob.glob(os.path.join(glob.escape(directory), glob.escape(stem) + "-rank-*.pt"))
    ranked = sorted((f for f in ranked if split_name(f)[0] == stem), key=lambda f: split_name(f)[1])
    if rank is None and os.path.isfile(path):
        if ranked:
            raise ReshardError(f"--input: both {path} and {stem}-rank-N.pt files exist; name one of the rank files")
        return [path]
    if not ranked:
        raise ReshardError(f"--input: no checkpoint {path} and no {stem}-rank-N.pt files next to it")
    return ranked


def load_shards(paths: List[str]) -> List[dict]:
    first = load_verified(paths[0])
    lay0 = first["model"].get(EXTRA_STATE_KEY)
    if len(paths) > 1 and isinstance(lay0, dict) and lay0.get("world_size") == 1:
        # per-rank copies of one full checkpoint (fairseq writes them for models with BASE
        # layers in local mode): any one of them is the whole model
        paths = paths[:1]
    states = [first] + [load_verified(p) for p in paths[1:]]
    layouts = [s["model"].get(EXTRA_STATE_KEY) for s in states]
    for p, lay in zip(paths, layouts):
        if not isinstance(lay, dict) or lay.get("format") != FORMAT:
            raise ReshardError(
                f"{p}: no moe_plugin layout metadata (written before it existed, or not an moe_lm "
                "checkpoint); it cannot be resharded"
            )
    N = layouts[0]["world_size"]
    if len(paths) != N:
        raise ReshardError(
            f"the checkpoint was written by {N} workers but {len(paths)} file(s) were found: {paths}"
        )
    for r, (p, lay) in enumerate(zip(paths, layouts)):
        if lay["world_size"] != N or (N > 1 and lay["rank"] != r):
            raise ReshardError(f"{p} holds rank {lay['rank']} of {lay['world_size']}, expected rank {r} of {N}")
    updates = [num_updates(s) for s in states]
    if len(set(updates)) > 1:
        raise ReshardError(
            f"the shards come from different updates {updates} (the run died between two ranks' "
            "writes); reshard an older complete checkpoint (python -m moe_plugin.tools.reshard --check DIR)"
        )
    return states


# ----------------------------------------------------------------------------------------
# tensors
# ----------------------------------------------------------------------------------------


def expert_prefixes(layout: dict) -> Dict[str, dict]:
    """state_dict prefix of each layer's expert module -> that layer's metadata."""
    return {entry["prefix"]: entry for entry in layout["layers"].values() if entry.get("prefix")}


def layer_of(name: str, prefixes: Dict[str, dict]) -> Optional[dict]:
    for prefix, entry in prefixes.items():
        if name.startswith(prefix):
            return entry
    return None


def merge_split(parts: List[torch.Tensor], E: int, M: int, what: str) -> List[torch.Tensor]:
    """Concatenate per-rank expert slices along dim 0 (-> E) and split into M slices."""
    full = torch.cat(parts, dim=0)
    if full.shape[0] != E:
        raise ReshardError(f"{what}: the shards hold {full.shape[0]} experts in total, the layout says {E}")
    return [full[p.first:p.stop].clone() for p in (ExpertPlacement(E, M, r) for r in range(M))]


def same_everywhere(values: list) -> bool:
    first = values[0]
    for v in values[1:]:
        if torch.is_tensor(first):
            if not (torch.is_tensor(v) and v.shape == first.shape and torch.equal(v, first)):
                return False
        elif v != first:
            return False
    return True


def reshard_model(models: List[dict], layout: dict, M: int, notes: List[str]) -> List[dict]:
    prefixes = expert_prefixes(layout)
    keys = list(models[0].keys())
    for r, m in enumerate(models[1:], 1):
        if list(m.keys()) != keys:
            raise ReshardError(f"rank {r}'s model has different tensors from rank 0's")
    outs = [dict() for _ in range(M)]
    differing = []
    for name in keys:
        if name == EXTRA_STATE_KEY:
            for out in outs:
                out[name] = None  # rewritten below
            continue
        entry = layer_of(name, prefixes)
        values = [m[name] for m in models]
        if entry is not None and torch.is_tensor(values[0]) and values[0].dim() > 0:
            for out, t in zip(outs, merge_split(values, entry["num_experts"], M, name)):
                out[name] = t
        else:
            if not same_everywhere(values):
                differing.append(name)
            for out in outs:
                out[name] = values[0]
    if differing:
        notes.append(
            f"shared tensors differ between ranks (rank 0's were kept): {', '.join(differing[:5])}"
            + (" ..." if len(differing) > 5 else "")
        )
    return outs


def new_layout(layout: dict, M: int, rank: int) -> dict:
    out = copy.deepcopy(layout)
    out["world_size"], out["rank"] = (M, rank) if M > 1 else (1, 0)
    for entry in out["layers"].values():
        placement = ExpertPlacement(entry["num_experts"], M, rank)
        entry["experts"] = [placement.first, placement.stop]
    return out


# ----------------------------------------------------------------------------------------
# optimizer state
# ----------------------------------------------------------------------------------------


def _trainable(layout: dict) -> List[str]:
    return [name for name, requires_grad in layout["params"] if requires_grad]


def _unflatten(state: dict, shapes: List[torch.Size]) -> Optional[List[dict]]:
    """fairseq's flattened fp16 optimizer: one flat param -> per-param state views."""
    flat = state["state"].get(0, {})
    total = sum(int(torch.Size(s).numel()) for s in shapes)
    per = [dict() for _ in shapes]
    for key, value in flat.items():
        if torch.is_tensor(value) and value.dim() == 1 and value.numel() == total:
            offset = 0
            for i, s in enumerate(shapes):
                n = int(torch.Size(s).numel())
                per[i][key] = value[offset:offset + n].view(s)
                offset += n
        elif not torch.is_tensor(value) or value.dim() == 0:
            for p in per:
                p[key] = value
        else:
            return None
    return per


def _flatten(per: List[dict]) -> dict:
    out = {}
    for key in per[0]:
        vals = [p[key] for p in per]
        if torch.is_tensor(vals[0]) and vals[0].dim() > 0:
            out[key] = torch.cat([v.reshape(-1) for v in vals])
        else:
            out[key] = vals[0]
    return out


def reshard_optimizer(
    states: List[dict], models: List[dict], layout: dict, M: int, notes: List[str]
) -> Optional[List[dict]]:
    """Per-output-rank optimizer states, or None (with a note saying why) when impossible."""
    opts = [s.get("last_optimizer_state") for s in states]
    if all(o is None for o in opts):
        return None
    if any(not isinstance(o, dict) or "state" not in o or "param_groups" not in o for o in opts):
        notes.append(
            "optimizer state: not torch's per-parameter format (e.g. a composite or sharded optimizer); "
            "it cannot be split by expert and was dropped: resume with --reset-optimizer"
        )
        return None
    if len(opts[0]["param_groups"]) > 1:
        notes.append(
            "optimizer state: several parameter groups (their order need not be the model's); "
            "dropped: resume with --reset-optimizer"
        )
        return None
    names = _trainable(layout)
    prefixes = expert_prefixes(layout)
    n_params = sum(len(g["params"]) for g in opts[0]["param_groups"])
    flat = n_params == 1 and len(names) > 1
    if not flat and n_params < len(names):
        notes.append(
            f"optimizer state: {n_params} parameters but the model has {len(names)} trainable ones; "
            "dropped: resume with --reset-optimizer"
        )
        return None
    order = [p for g in opts[0]["param_groups"] for p in g["params"]]

    def per_param(opt, model) -> Optional[List[dict]]:
        if flat:
            return _unflatten(opt, [model[n].shape for n in names])
        return [opt["state"].get(i, {}) for i in order]

    per_rank = [per_param(o, m) for o, m in zip(opts, models)]
    if any(p is None for p in per_rank):
        notes.append("optimizer state: the flat fp16 buffer has an unexpected shape; dropped: resume with --reset-optimizer")
        return None
    out_per = [[dict() for _ in per_rank[0]] for _ in range(M)]
    for i, _ in enumerate(per_rank[0]):
        name = names[i] if i < len(names) else None  # criterion parameters come last: shared
        entry = layer_of(name, prefixes) if name else None
        for key in per_rank[0][i]:
            values = [p[i].get(key) for p in per_rank]
            v0 = values[0]
            if entry is not None and torch.is_tensor(v0) and v0.dim() > 0:
                L_in = entry["num_experts"] // len(per_rank)
                if any((not torch.is_tensor(v)) or v.dim() == 0 or v.shape[0] != L_in for v in values):
                    notes.append(
                        f"optimizer state {key!r} of {name} has shape {tuple(v0.shape)} without the leading "
                        f"expert dimension ({L_in}); optimizer state dropped: resume with --reset-optimizer"
                    )
                    return None
                for out, t in zip(out_per, merge_split(values, entry["num_experts"], M, f"{name}.{key}")):
                    out[i][key] = t
            else:
                if not same_everywhere(values):
                    if entry is not None or (torch.is_tensor(v0) and v0.dim() == 0) or not torch.is_tensor(v0):
                        notes.append(
                            f"optimizer state {key!r} of {name} differs between ranks; optimizer state dropped: "
                            "resume with --reset-optimizer"
                        )
                        return None
                    notes.append(f"optimizer state {key!r} of shared {name} differs between ranks (rank 0's kept)")
                for out in out_per:
                    out[i][key] = v0
    results = []
    for r in range(M):
        opt = copy.deepcopy({k: v for k, v in opts[0].items() if k != "state"})
        if flat:
            opt["state"] = {0: _flatten(out_per[r])}
        else:
            opt["state"] = {idx: st for idx, st in zip(order, out_per[r]) if st}
        results.append(opt)
    return results


# ----------------------------------------------------------------------------------------
# the whole checkpoint
# ----------------------------------------------------------------------------------------


def reshard_states(states: List[dict], M: int, keep_optimizer: bool = True) -> Tuple[List[dict], List[str]]:
    """N loaded shards -> M output states, and notes for the user."""
    notes: List[str] = []
    models = [s["model"] for s in states]
    layout = models[0][EXTRA_STATE_KEY]
    N = len(states)
    if M < 1:
        raise ReshardError(f"--world-size: {M} is not allowed; it must be >= 1")
    for key, entry in layout["layers"].items():
        if entry["num_experts"] % M:
            raise ReshardError(
                f"--world-size: {M} workers cannot share the {entry['num_experts']} experts of layer {key}; "
                f"allowed: a divisor of {entry['num_experts']}"
            )
    new_models = reshard_model(models, layout, M, notes)
    for r, m in enumerate(new_models):
        lay = new_layout(layout, M, r)
        if "checksums" in lay:
            lay["checksums"] = checksums((k, m[k]) for k in lay["checksums"] if torch.is_tensor(m.get(k)))
        m[EXTRA_STATE_KEY] = lay
    opts = reshard_optimizer(states, models, layout, M, notes) if keep_optimizer else None
    if not keep_optimizer and states[0].get("last_optimizer_state") is not None:
        notes.append("optimizer state left out (--no-optimizer): resume with --reset-optimizer")
    outs = []
    for r in range(M):
        out = {k: v for k, v in states[0].items() if k not in ("model", "last_optimizer_state")}
        out = copy.deepcopy(out)
        out["model"] = new_models[r]
        if opts is not None:
            out["last_optimizer_state"] = opts[r]
        itr = (out.get("extra_state") or {}).get("train_iterator")
        if isinstance(itr, dict) and itr.get("iterations_in_epoch"):
            seen = itr["iterations_in_epoch"] * N
            itr["iterations_in_epoch"] = seen // M
            if seen % M:
                notes.append(
                    f"data position: {seen} batches of the epoch were consumed, which {M} workers cannot skip "
                    f"evenly; the resumed run skips {seen // M * M} and sees {seen % M} batch(es) again"
                )
        outs.append(out)
    return outs, notes


def output_paths(out_dir: str, stem: str, M: int) -> List[str]:
    if M == 1:
        return [os.path.join(out_dir, stem + ".pt")]
    return [os.path.join(out_dir, f"{stem}-rank-{r}.pt") for r in range(M)]


def reshard(input_path: str, M: int, out_dir: str, keep_optimizer: bool = True, log=print) -> List[str]:
    paths = find_shards(input_path)
    states = load_shards(paths)
    N = len(states)
    outs, notes = reshard_states(states, M, keep_optimizer)
    stem = split_name(paths[0])[0]
    os.makedirs(out_dir, exist_ok=True)
    targets = output_paths(out_dir, stem, M)
    if any(os.path.abspath(t) in map(os.path.abspath, paths) for t in targets):
        raise ReshardError("--output: would overwrite an input file; choose another directory")
    for t, state in zip(targets, outs):
        atomic_save(state, t)
    kept = "kept" if outs[0].get("last_optimizer_state") is not None else "NOT kept"
    log(f"resharded {N} -> {M} worker(s) at update {num_updates(states[0])}; optimizer state {kept}")
    for n in notes:
        log("note: " + n)
    for t in targets:
        log("wrote " + t)
    return targets


def check(path: str, log=print) -> bool:
    """Report every checkpoint (set) under ``path``; False when any is unusable."""
    if os.path.isfile(path):
        try:
            states = load_shards(find_shards(path))
        except (CheckpointError, ReshardError) as e:
            log(f"BAD  {e}")
            return False
        log(f"OK   {path}: update {num_updates(states[0])}, {len(states)} worker(s)")
        return True
    ok = True
    for s in checkpoint_sets(path):
        if s.ok:
            log(f"OK   {s.stem}: update {s.num_updates}, {s.world_size} worker(s)")
        else:
            ok = False
            log(f"BAD  {s.stem}: " + "; ".join(s.problems))
    return ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m moe_plugin.tools.reshard", description=__doc__.split("\n\n")[0])
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--input", help="checkpoint to reshard (NAME.pt, or any NAME-rank-R.pt of a set)")
    what.add_argument("--check", metavar="PATH", help="verify a checkpoint file/set or every checkpoint in a directory")
    what.add_argument("--resume", metavar="SAVE_DIR", help="print the --restore-file a restart of --world-size workers should use")
    ap.add_argument("--world-size", type=int, help="number of expert-parallel workers to reshard for (1 = one process)")
    ap.add_argument("--output", help="output directory (--input)")
    ap.add_argument("--no-optimizer", action="store_true", help="leave the optimizer state out")
    args = ap.parse_args(argv)
    try:
        if args.check:
            return 0 if check(args.check) else 1
        if args.world_size is None:
            ap.error("--world-size is required with --input and --resume")
        if args.resume:
            s = choose_resume(args.resume, args.world_size)
            if s is not None:
                print(s.restore_file(args.resume))
            return 0
        if not args.output:
            ap.error("--output is required with --input")
        reshard(args.input, args.world_size, args.output, keep_optimizer=not args.no_optimizer)
        return 0
    except (CheckpointError, ReshardError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

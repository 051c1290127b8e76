"""Checkpoint files: integrity checks, per-rank sets, the newest set a run can resume from.

What fairseq 0.12 already guarantees (``fairseq/checkpoint_utils.py``): the first file a
save writes (``checkpoint_E_U.pt``, ``checkpointE.pt``, ``checkpoint_best.pt`` or
``checkpoint_last.pt``, whichever comes first in its list) goes to ``NAME.tmp`` and is
renamed over ``NAME`` only once complete, so a run killed while writing it leaves the
previous file intact. What it does not: the other names of the same save are filled by
*copying* that file in place (``checkpoint_last.pt`` after an interval or epoch
checkpoint, for instance), which truncates the old file first, so a kill during the copy
leaves a truncated ``checkpoint_last.pt``; ``--write-checkpoints-asynchronously`` writes
in place too; nothing fsyncs; and with one file per rank, a kill between two ranks'
writes leaves shards from different updates. fairseq-train loading such a file fails
inside ``torch.load`` with a zip-reader message, before any hook of the model runs.

What this module adds: :func:`verify_file` (zip structure, the CRC of every member,
unpickling, the model and its layout metadata) with a message naming the problem and the
fix; :func:`checkpoint_sets` / :func:`choose_resume` group per-rank files into sets and pick
the newest complete set whose shards agree on the update count, skipping broken ones
(the launchers in scripts/ call it before every start, so a killed run resumes from the
last good state); :func:`atomic_save` (tmp file, fsync, rename, fsync of the directory)
for the files ``python -m moe_plugin.tools.reshard`` writes.
"""

from __future__ import annotations

import dataclasses
import os
import re
import zipfile
from typing import Dict, List, Optional

import torch

RANK_RE = re.compile(r"^(?P<stem>.+?)-rank-(?P<rank>\d+)\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint file or set that cannot be used, with what is wrong and what to do."""


@dataclasses.dataclass
class FileInfo:
    path: str
    stem: str  # name without -rank-N and .pt
    rank: Optional[int]  # from the file name (None: no -rank-N suffix)
    num_updates: int
    world_size: int  # from the layout metadata (1 for a full checkpoint)
    layout_rank: int
    error: Optional[str] = None


def split_name(path: str):
    """(stem, rank or None) of a checkpoint file name."""
    base = os.path.basename(path)
    m = RANK_RE.match(base)
    if m:
        return m.group("stem"), int(m.group("rank"))
    return (base[:-3] if base.endswith(".pt") else base), None


def load_verified(path: str) -> dict:
    """torch.load a checkpoint after checking the file; CheckpointError with a clear message."""
    fix = (
        "resume from an older checkpoint (python -m moe_plugin.tools.reshard --check "
        f"{os.path.dirname(path) or '.'} lists the good ones; pass one with --restore-file) "
        "or start again"
    )
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    size = os.path.getsize(path)
    if size == 0:
        raise CheckpointError(f"{path}: the file is empty (the run died while writing it); {fix}")
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise CheckpointError(f"{path}: corrupt archive ({e}); {fix}") from None
        if bad is not None:
            raise CheckpointError(f"{path}: corrupt data in member {bad!r} (CRC mismatch); {fix}")
    else:
        with open(path, "rb") as f:
            head = f.read(2)
        if head[:1] != b"\x80":  # neither a zip archive nor a legacy pickle
            raise CheckpointError(
                f"{path}: not a torch checkpoint ({size} bytes, no zip directory: truncated while "
                f"being written, or not a checkpoint at all); {fix}"
            )
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same thing
        raise CheckpointError(f"{path}: cannot be read ({type(e).__name__}: {e}); {fix}") from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path}: not a fairseq checkpoint (no 'model' entry)")
    layout = layout_of(state)
    if isinstance(layout, dict):
        from moe_plugin.models.checkpoint_layout import CheckpointCorruptError, verify_checksums

        try:
            verify_checksums(state["model"], layout)
        except CheckpointCorruptError as e:
            raise CheckpointError(f"{path}: {e}") from None
    return state


def num_updates(state: dict) -> int:
    hist = state.get("optimizer_history") or [{}]
    return int(hist[-1].get("num_updates", 0))


def layout_of(state: dict) -> Optional[dict]:
    return state["model"].get("_extra_state") if isinstance(state.get("model"), dict) else None


def inspect_file(path: str) -> FileInfo:
    stem, rank = split_name(path)
    try:
        state = load_verified(path)
    except CheckpointError as e:
        return FileInfo(path, stem, rank, -1, 0, -1, error=str(e))
    layout = layout_of(state) or {}
    return FileInfo(
        path, stem, rank, num_updates(state), int(layout.get("world_size", 1)), int(layout.get("rank", 0))
    )


def verify_file(path: str) -> FileInfo:
    """Raise CheckpointError when ``path`` is unusable; else its summary."""
    info = inspect_file(path)
    if info.error:
        raise CheckpointError(info.error)
    return info


@dataclasses.dataclass
class CheckpointSet:
    stem: str
    files: Dict[int, FileInfo]  # rank -> file (rank 0 only for a one-file checkpoint)
    world_size: int
    num_updates: int
    problems: List[str]

    @property
    def ok(self) -> bool:
        return not self.problems

    def restore_file(self, save_dir: str) -> str:
        """What to pass as --restore-file (fairseq appends -rank-R itself on every rank)."""
        return os.path.join(save_dir, self.stem + ".pt")


def checkpoint_sets(save_dir: str) -> List[CheckpointSet]:
    """Every checkpoint in ``save_dir`` grouped by name, newest first (checkpoint_last first
    among equals); each set says whether it is complete and consistent."""
    groups: Dict[str, Dict[Optional[int], FileInfo]] = {}
    for name in sorted(os.listdir(save_dir)):
        if not name.endswith(".pt"):
            continue
        info = inspect_file(os.path.join(save_dir, name))
        groups.setdefault(info.stem, {})[info.rank] = info
    out = []
    for stem, by_rank in groups.items():
        problems = [f.error for f in by_rank.values() if f.error]
        good = [f for f in by_rank.values() if not f.error]
        if None in by_rank and len(by_rank) > 1:
            problems.append(f"both {stem}.pt and {stem}-rank-N.pt files exist")
        world = max([f.world_size for f in good] or [len(by_rank)])
        files = {(0 if f.rank is None else f.rank): f for f in by_rank.values()}
        missing = [r for r in range(world) if r not in files]
        if missing:
            problems.append(f"{stem}: no file for rank(s) {missing} of {world}")
        for f in good:
            r = 0 if f.rank is None else f.rank
            if f.world_size != world or (world > 1 and f.layout_rank != r):
                problems.append(
                    f"{os.path.basename(f.path)} holds the experts of rank {f.layout_rank} of {f.world_size}, "
                    f"expected rank {r} of {world}"
                )
        updates = sorted({f.num_updates for f in good})
        if len(updates) > 1:
            problems.append(
                f"{stem}: shards from different updates {updates} (the run died between two ranks' writes)"
            )
        out.append(CheckpointSet(stem, files, world, updates[-1] if updates else -1, problems))
    out.sort(key=lambda s: (s.num_updates, s.stem == "checkpoint_last"), reverse=True)
    return out


def choose_resume(save_dir: str, world_size: int) -> Optional[CheckpointSet]:
    """The newest complete, consistent set made for ``world_size`` workers (None: nothing
    to resume from). A newer set for another world size raises CheckpointError naming the
    reshard command."""
    if not os.path.isdir(save_dir):
        return None
    for s in checkpoint_sets(save_dir):
        if not s.ok:
            continue
        if s.world_size != world_size and s.world_size > 1:
            raise CheckpointError(
                f"the newest good checkpoint {s.stem} (update {s.num_updates}) holds experts for "
                f"{s.world_size} workers, this run has {world_size}: python -m moe_plugin.tools.reshard "
                f"--input {s.restore_file(save_dir)} --world-size {world_size} --output NEW_DIR, then "
                "restore from NEW_DIR"
            )
        return s
    return None


def atomic_save(obj, path: str) -> None:
    """torch.save to ``path`` so that a crash at any point leaves either the old file or the
    complete new one (tmp file, fsync, rename, fsync of the directory)."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

"""Token counts of the binarised training split, for routers that pack tokens by frequency.

fairseq's dict.txt keeps no counts for its special symbols: ``<s>``, ``<pad>``, ``</s>`` and
``<unk>`` load with count 1, although ``</s>`` ends every line and ``<unk>`` stands for every
word fairseq-preprocess dropped from the dictionary (about 0.4% of WikiText-103). A table
packed from those counts puts that mass on one expert unseen. The training split itself,
as fairseq-preprocess wrote it, holds every symbol at its true count; this module counts
it at model build time, only when a router asks (``Router.needs_token_counts``, true for
the balanced hash), and falls back to dict.txt with a warning when the split is absent
(e.g. fairseq-eval-lm on a machine without the training data: the table is in the
checkpoint then, so nothing changes).

Counting reads the data the way fairseq's ``language_modeling`` task does: every path of
``task.cfg.data`` (``a:b:c``; each holds one epoch's shard of the training split), split
``--train-subset`` (``train``), shards ``train``, ``train1``, ... (fairseq's ``combine``).
An ``mmap`` split (fairseq-preprocess's default) is one flat token buffer: one chunked
``numpy.bincount`` over a memory map, ~100M tokens in about a second. Other dataset
implementations are read item by item through ``fairseq.data.data_utils``.
"""

import itertools
import logging
import os
from typing import List, Optional, Tuple

import numpy as np
import torch

logger = logging.getLogger(__name__)

#: tokens per bincount call (bounded memory on a large split)
CHUNK = 1 << 24


def _bincount_flat(tokens: np.ndarray, size: int) -> np.ndarray:
    counts = np.zeros(size, dtype=np.int64)
    for start in range(0, tokens.shape[0], CHUNK):
        chunk = np.asarray(tokens[start : start + CHUNK])
        if chunk.size and int(chunk.max()) >= size:
            raise ValueError(
                f"token id {int(chunk.max())} in the training split is outside the dictionary "
                f"({size} symbols): the data and dict.txt do not match"
            )
        counts += np.bincount(chunk, minlength=size)[:size]
    return counts


def count_split(
    prefix: str, size: int, dataset_impl: Optional[str] = None, dictionary=None
) -> Optional[Tuple[np.ndarray, int]]:
    """(counts (size,), number of shards) of the split at ``prefix`` (``prefix``, ``prefix1``,
    ... as fairseq's ``combine`` reads them), or None when no shard exists. ``dictionary``
    is needed by the ``raw`` (text) dataset implementation only."""
    from fairseq.data import data_utils, indexed_dataset

    counts = np.zeros(size, dtype=np.int64)
    shards = 0
    for k in itertools.count():
        path = prefix + (str(k) if k > 0 else "")
        impl = dataset_impl or indexed_dataset.infer_dataset_impl(path)
        if impl is None or not indexed_dataset.dataset_exists(path, impl):
            break
        if impl == "mmap":
            index = indexed_dataset.MMapIndexedDataset.Index(indexed_dataset.index_file_path(path))
            total = int(np.asarray(index.sizes, dtype=np.int64).sum())
            flat = np.memmap(indexed_dataset.data_file_path(path), dtype=index.dtype, mode="r")
            # fairseq-preprocess writes the sequences back to back from offset 0
            if flat.shape[0] != total:
                raise ValueError(f"{path}.bin holds {flat.shape[0]} tokens, its index {total}")
            counts += _bincount_flat(flat, size)
            del flat, index
        else:
            if impl == "raw" and dictionary is None:
                break
            dataset = data_utils.load_indexed_dataset(path, dictionary, impl, combine=False)
            if dataset is None:
                break
            buf: List[np.ndarray] = []
            n = 0
            for i in range(len(dataset)):
                buf.append(np.asarray(dataset[i], dtype=np.int64))
                n += buf[-1].shape[0]
                if n >= CHUNK:
                    counts += _bincount_flat(np.concatenate(buf), size)
                    buf, n = [], 0
            if buf:
                counts += _bincount_flat(np.concatenate(buf), size)
        shards += 1
    return (counts, shards) if shards else None


def training_token_counts(task, subset: Optional[str], size: int) -> Optional[torch.Tensor]:
    """(size,) int64 counts of the training split of ``task``'s data, or None (with a logged
    warning) when the split is not there."""
    from fairseq import utils

    task_cfg = getattr(task, "cfg", None) or getattr(task, "args", None)
    data = getattr(task_cfg, "data", None)
    subset = subset or "train"
    if not data:
        logger.warning("token counts: the task names no data directory; using dict.txt counts "
                       "(fairseq's special symbols <unk>, </s> then count 1)")
        return None
    dataset_impl = getattr(task_cfg, "dataset_impl", None)
    counts = np.zeros(size, dtype=np.int64)
    found = []
    for path in utils.split_paths(data):
        got = count_split(os.path.join(path, subset), size, dataset_impl, getattr(task, "dictionary", None))
        if got is not None:
            counts += got[0]
            found.append(f"{os.path.join(path, subset)} ({got[1]} shard{'s' if got[1] > 1 else ''})")
    if not found:
        logger.warning(
            f"token counts: no training split {subset!r} under {data!r}; using dict.txt counts instead "
            "(fairseq's special symbols <unk>, </s> then count 1: a frequency-balanced hash table "
            "built now is less balanced; a table loaded from a checkpoint is unaffected)"
        )
        return None
    logger.info(f"token counts: {int(counts.sum())} tokens of {', '.join(found)}")
    return torch.from_numpy(counts)

"""hash_lm end to end: every hash type through fairseq-train (with validation) and
fairseq-eval-lm (oracle refused), the k-means table script, checkpoint round trips.

The default run drives fairseq_cli's own ``train.main`` / ``eval_lm.main`` in this process
(the code the console scripts run, without a new interpreter per call) and one real
command-line train + eval; the slow run repeats every type as subprocesses."""

import logging
import os
import re

import numpy as np
import pytest
import torch

from fairseq import checkpoint_utils, options
from fairseq.dataclass.utils import convert_namespace_to_omegaconf

import moe_plugin  # noqa: F401
from moe_plugin.routing import hashed
from moe_plugin.routing.hashed import HASH_TYPES
from tests.conftest import ROOT, TINY_MODEL, TINY_TRAIN, USER_DIR, eval_lm_loss, run_cli
from tests.helpers import token_info

E = 4
HASH_ARGS = ["--arch", "hash_lm", "--criterion", "moe_cross_entropy", "--moe-expert-count", str(E)]


def load_script():
    from moe_plugin.tools import hash_kmeans

    return hash_kmeans


def train_in_process(data_bin, save_dir, *extra, updates=4):
    from fairseq_cli import train

    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, [data_bin, *TINY_TRAIN, *TINY_MODEL, "--max-update", str(updates),
                                                "--save-dir", str(save_dir), *map(str, extra)])
    train.main(convert_namespace_to_omegaconf(args))
    return os.path.join(save_dir, "checkpoint_last.pt")


def eval_in_process(data_bin, ckpt):
    from fairseq_cli import eval_lm

    parser = options.get_eval_lm_parser()
    args = options.parse_args_and_arch(parser, [data_bin, "--user-dir", USER_DIR, "--path", str(ckpt), "--cpu",
                                                "--tokens-per-sample", "32", "--max-tokens", "512",
                                                "--num-workers", "0"])
    return eval_lm.main(convert_namespace_to_omegaconf(args))


def logged(text, split, layer=1):
    line = [l for l in text.splitlines() if f"| {split} |" in l or (split == "valid" and "valid on" in l)][-1]
    return {k: float(v) for k, v in re.findall(rf"\bmoe_l{layer}_(\w+) ([-\d.]+)", line)}


@pytest.fixture(scope="module")
def kmeans_tables(tiny_corpus, tmp_path_factory):
    """A tiny dense transformer_lm checkpoint and the clustered/dispersed tables of its embeddings."""
    _, data_bin = tiny_corpus
    base = tmp_path_factory.mktemp("kmeans")
    ckpt = train_in_process(data_bin, base / "dense", "--arch", "transformer_lm", updates=3)
    script = load_script()
    paths = {}
    for kind in ("clustered", "dispersed"):
        paths[kind] = str(base / f"{kind}.txt")
        script.main([ckpt, "--experts", str(E), "--type", kind, "--out", paths[kind], "--multi", "2",
                     "--dict", os.path.join(data_bin, "dict.txt")])
    return ckpt, paths


def type_args(hash_type, tables):
    extra = ["--hash-type", hash_type]
    if hash_type in ("clustered", "dispersed"):
        extra += ["--hash-table", tables[hash_type], "--hash-multi", "2"]
    return extra


@pytest.mark.parametrize("hash_type", HASH_TYPES)
def test_every_hash_type_trains_and_evaluates(tiny_corpus, kmeans_tables, tmp_path, caplog, hash_type):
    """fairseq-train (train + valid logs carry the per-expert shares) then fairseq-eval-lm;
    eval-lm refuses the oracle with an error that says why."""
    _, data_bin = tiny_corpus
    _, tables = kmeans_tables
    with caplog.at_level(logging.INFO):
        ckpt = train_in_process(data_bin, tmp_path, *HASH_ARGS, *type_args(hash_type, tables))
    # as the console prints them: "... | train | epoch 001 | loss ..." (the logger is named by split)
    text = "\n".join(f"| {r.name} | {r.getMessage()}" for r in caplog.records)
    for split in ("train", "valid"):
        m = logged(text, split)
        shares = [m[f"share_e{e}"] for e in range(E)]
        assert sum(shares) == pytest.approx(1.0, abs=3e-3), (split, m)  # 3-decimal rounding
        assert 1.0 <= m["load_max"] <= E and m["dropped"] == 0 and m["aux"] == 0
        assert m["share_min"] <= min(shares) + 1e-3 and m["share_max"] >= max(shares) - 1e-3
    if hash_type == "oracle":
        with pytest.raises(ValueError, match="oracle.*refused.*inference"):
            eval_in_process(data_bin, ckpt)
        return
    results = eval_in_process(data_bin, ckpt)
    assert np.isfinite(results["loss"]) and results["loss"] < np.log(300) * 1.5


def test_checkpoint_round_trip_keeps_routing(tiny_corpus, kmeans_tables, tmp_path):
    """The table is read from the checkpoint: loading it with another --seed or --hash-seed
    (or with the table file gone, or the training split gone) routes exactly as the trained
    model did."""
    _, data_bin = tiny_corpus
    # --hash-seed unset: the tables follow --seed (TINY_TRAIN's --seed 1)
    ckpt = train_in_process(data_bin, tmp_path / "rand", *HASH_ARGS, "--hash-type", "random",
                            "--moe-layers", "0,1", updates=2)
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)["model"]
    src = torch.randint(4, 100, (3, 10))
    for overrides, seed in [({"moe_seed": 77}, 77), ({"hash_seed": 99}, 99)]:
        torch.manual_seed(1234)
        (model,), _ = checkpoint_utils.load_model_ensemble([ckpt], arg_overrides=overrides)
        for i, layer in model.moe_layers():
            trained = saved[f"decoder.layers.{i}.fc1.router.table_VN"]
            assert torch.equal(trained[:, 0], hashed.random_table(trained.shape[0], E, hashed.hash_generator(1, i, 0)))
            assert layer.router.seed == seed  # the override reached the router ...
            fresh = hashed.random_table(layer.router.table_VN.shape[0], E, hashed.hash_generator(seed, i, 0))
            assert not torch.equal(fresh, layer.router.table_VN[:, 0])  # ... but its table was not kept
            assert torch.equal(layer.router.table_VN, trained)
            ids = layer.router(torch.zeros(30, 32), tokens=token_info(src)).expert_ids_TK
            assert torch.equal(ids, trained[token_info(src).ids_T])

    # clustered: evaluation works after the table file is gone
    _, tables = kmeans_tables
    moved = str(tmp_path / "table.txt")
    with open(tables["clustered"]) as f, open(moved, "w") as g:
        g.write(f.read())
    ckpt = train_in_process(data_bin, tmp_path / "clus", *HASH_ARGS, "--hash-type", "clustered",
                            "--hash-table", moved, "--hash-multi", "2", updates=2)
    want = hashed.read_table_file(moved)
    os.remove(moved)
    (model,), _ = checkpoint_utils.load_model_ensemble([ckpt])
    ((_, layer),) = model.moe_layers()
    assert torch.equal(layer.router.table_VN, want)
    assert np.isfinite(eval_in_process(data_bin, ckpt)["loss"])

    # balanced: packed from the training split's counts; evaluated where that split is absent
    # (the counts fall back to dict.txt's), it routes by the checkpoint's table
    import shutil

    ckpt = train_in_process(data_bin, tmp_path / "bal", *HASH_ARGS, "--hash-type", "balanced", updates=2)
    trained = torch.load(ckpt, map_location="cpu", weights_only=False)["model"]["decoder.layers.1.fc1.router.table_VN"]
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("dict.txt", "valid.bin", "valid.idx", "test.bin", "test.idx"):
        shutil.copy(os.path.join(data_bin, name), bare / name)
    (model,), _ = checkpoint_utils.load_model_ensemble([ckpt], arg_overrides={"data": str(bare)})
    ((_, layer),) = model.moe_layers()
    assert layer.router.counts_source == "dict.txt" and torch.equal(layer.router.table_VN, trained)
    assert np.isfinite(eval_in_process(str(bare), ckpt)["loss"])


def test_kmeans_script_recovers_planted_clusters(tmp_path):
    """Embeddings made of E well-separated blobs: clustered = the blobs (up to labels),
    dispersed spreads every blob evenly over the experts."""
    script = load_script()
    rng = np.random.default_rng(0)
    V, D = 64, 6
    blob = np.arange(V) % E
    centers = rng.normal(size=(E, D)) * 20
    emb = centers[blob] + rng.normal(size=(V, D)) * 0.1
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"model": {"decoder.embed_tokens.weight": torch.tensor(emb, dtype=torch.float32)}}, ckpt)
    for kind in ("clustered", "dispersed"):
        out = tmp_path / f"{kind}.txt"
        script.main([str(ckpt), "--experts", str(E), "--type", kind, "--out", str(out)])
        table = hashed.read_table_file(str(out))[:, 0].numpy()
        assert table.shape == (V,) and table.min() >= 0 and table.max() < E
        for b in range(E):
            members = table[blob == b]
            if kind == "clustered":  # one expert per blob, different blobs on different experts
                assert len(set(members)) == 1
            else:  # 16 members of a blob over 4 experts: 4 each
                assert np.bincount(members, minlength=E).tolist() == [V // E // E] * E
        if kind == "clustered":
            assert sorted(table[blob == b][0] for b in range(E)) == list(range(E))


@pytest.mark.e2e
def test_command_line_train_and_eval(tiny_corpus, tmp_path):
    """The real console path once: fairseq-train (balanced MultiHash) and fairseq-eval-lm."""
    _, data_bin = tiny_corpus
    proc = run_cli("train", data_bin, *TINY_TRAIN, *TINY_MODEL, *HASH_ARGS, "--hash-type", "balanced",
                   "--hash-multi", "2", "--max-update", "4", "--save-dir", tmp_path)
    m = logged(proc.stdout + proc.stderr, "valid")
    assert {f"share_e{e}" for e in range(E)} <= set(m) and "load_max" in m
    ev = run_cli("eval_lm", data_bin, "--user-dir", USER_DIR, "--path", tmp_path / "checkpoint_last.pt", "--cpu",
                 "--tokens-per-sample", "32", "--max-tokens", "512")
    assert np.isfinite(eval_lm_loss(ev.stdout + ev.stderr))


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.parametrize("hash_type", HASH_TYPES)
def test_every_hash_type_command_line(tiny_corpus, tmp_path, hash_type):
    """As the default in-process test, through the console entry points (subprocesses),
    with the k-means tables written by the script's command line."""
    _, data_bin = tiny_corpus
    extra = ["--hash-type", hash_type]
    if hash_type in ("clustered", "dispersed"):
        run_cli("train", data_bin, *TINY_TRAIN, *TINY_MODEL, "--arch", "transformer_lm", "--max-update", "3",
                "--save-dir", tmp_path / "dense")
        table = tmp_path / "table.txt"
        import subprocess
        import sys

        subprocess.run([sys.executable, "-m", "moe_plugin.tools.hash_kmeans",
                        tmp_path / "dense" / "checkpoint_last.pt", "--experts", str(E), "--type", hash_type,
                        "--out", table], check=True, capture_output=True, cwd=ROOT)
        extra += ["--hash-table", table]
    proc = run_cli("train", data_bin, *TINY_TRAIN, *TINY_MODEL, *HASH_ARGS, *extra, "--max-update", "6",
                   "--save-dir", tmp_path / "hash")
    m = logged(proc.stdout + proc.stderr, "valid")
    assert sum(m[f"share_e{e}"] for e in range(E)) == pytest.approx(1.0, abs=3e-3)
    ev = run_cli("eval_lm", data_bin, "--user-dir", USER_DIR, "--path", tmp_path / "hash" / "checkpoint_last.pt",
                 "--cpu", "--tokens-per-sample", "32", "--max-tokens", "512", check=hash_type != "oracle")
    if hash_type == "oracle":
        assert ev.returncode != 0
        assert "--hash-type oracle: refused" in ev.stderr + ev.stdout
    else:
        assert np.isfinite(eval_lm_loss(ev.stdout + ev.stderr))

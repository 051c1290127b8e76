"""Expert parallelism through fairseq: 2 CPU ranks over gloo (scripts/launch_cpu.sh).

Default run: one 2-rank expert-parallel fairseq-train (switch_lm, E = 4, 2 experts per
rank) next to one process training the same global batches with --update-freq 2 (what
two ranks compute, by definition; dropout 0 so both draw no random numbers). Then, in
this process: the resharded 2 -> 1 checkpoint equals the one-process checkpoint
(weights and Adam state), resharding round-trips exactly, mismatched and corrupt
checkpoints are refused with clear messages, and the resume choice skips broken sets.

Slow (``-m slow``): the acceptance flow (base_lm when registered, else switch_lm) with
fairseq-eval-lm on 2 ranks against 1 process; kill -9 mid-run and resume; ranks resumed
from different checkpoints failing on the first forward.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import unittest.mock

import pytest
import torch

from fairseq import checkpoint_utils, options
from omegaconf import OmegaConf

import moe_plugin  # noqa: F401
from moe_plugin.tools import reshard as reshard_mod
from moe_plugin.tools import checkpoints as ckpts
from moe_plugin.models import expert_parallel as fairseq_glue
from moe_plugin.models.base_layers import base_layer_count
from moe_plugin.models.checkpoint_layout import CheckpointCorruptError, LayoutMismatchError
from moe_plugin.models.archs import ARCHS
from tests.conftest import ROOT, USER_DIR, eval_lm_loss, run_cli
from tests import _e2e_runs

pytestmark = [pytest.mark.distributed, pytest.mark.e2e]

LAUNCH = os.path.join(ROOT, "scripts", "launch_cpu.sh")
MODEL = ["--decoder-layers", "2", "--decoder-embed-dim", "32", "--decoder-ffn-embed-dim", "64",
         "--decoder-attention-heads", "2", "--tokens-per-sample", "32", "--max-tokens", "512",
         "--moe-expert-count", "4"]
TRAIN = ["--task", "language_modeling", "--user-dir", USER_DIR, "--criterion", "moe_cross_entropy",
         "--optimizer", "adam", "--lr", "1e-3", "--log-format", "simple", "--log-interval", "1",
         "--no-epoch-checkpoints", "--seed", "1", "--num-workers", "0", "--dropout", "0",
         "--disable-validation"]


def launch(world, module, *args, timeout=900, check=True, env=None):
    e = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    e.update(env or {})
    proc = subprocess.run(["bash", LAUNCH, str(world), module, *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=e)
    if check and proc.returncode != 0:
        raise AssertionError(f"launch_cpu.sh {world} {module} failed ({proc.returncode}):\n"
                             + (proc.stdout + proc.stderr)[-6000:])
    return proc


def losses_by_update(log: str):
    """{update: train loss} from fairseq's simple log format."""
    out = {}
    for m in re.finditer(r"train_inner \| .*?loss=([\d.]+).*?num_updates=(\d+)", log):
        out[int(m.group(2))] = float(m.group(1))
    return out


def load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def max_diff(a: dict, b: dict) -> float:
    return max((a[k].double() - b[k].double()).abs().max().item()
               for k in b if torch.is_tensor(b[k]) and b[k].is_floating_point())


@pytest.fixture(scope="module")
def ep_run(tiny_corpus, tmp_path_factory):
    """A 2-rank expert-parallel run and the one-process --update-freq 2 run of the same batches."""
    _, data_bin = tiny_corpus
    base = tmp_path_factory.mktemp("ep_run")
    ep_dir, ref_dir = base / "ep", base / "ref"
    args = [data_bin, *TRAIN, *MODEL, "--arch", "switch_lm", "--max-update", "4", "--save-interval-updates", "2"]
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    ref = subprocess.Popen([sys.executable, "-m", "fairseq_cli.train", *args, "--cpu", "--update-freq", "2",
                            "--save-dir", str(ref_dir)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    ep = launch(2, "train", *args, "--moe-expert-parallel", "--save-dir", ep_dir)
    ref_out = ref.communicate(timeout=900)[0]
    assert ref.returncode == 0, ref_out[-4000:]
    return {"data_bin": data_bin, "ep_dir": str(ep_dir), "ref_dir": str(ref_dir), "ep_log": ep.stdout + ep.stderr,
            "ref_log": ref_out, "base": base}


def test_ranks_write_their_own_shards(ep_run):
    names = sorted(os.listdir(ep_run["ep_dir"]))
    assert names == [f"checkpoint_{s}-rank-{r}.pt" for s in ("1_2", "1_4", "last") for r in (0, 1)]
    for r in (0, 1):
        state = load(os.path.join(ep_run["ep_dir"], f"checkpoint_last-rank-{r}.pt"))
        layout = state["model"]["_extra_state"]
        assert (layout["world_size"], layout["rank"]) == (2, r)
        assert layout["layers"]["1"]["experts"] == [2 * r, 2 * r + 2]
        assert state["model"]["decoder.layers.1.fc1.experts.w1_EDF"].shape[0] == 2
        assert state["optimizer_history"][-1]["num_updates"] == 4


def test_two_ranks_equal_one_process_with_update_freq(ep_run, tmp_path):
    """Same losses at every update; after 4 Adam updates the merged weights and optimizer
    state equal the one-process run's (float32 rounding amplified by Adam: < 1e-5)."""
    ep_losses, ref_losses = losses_by_update(ep_run["ep_log"]), losses_by_update(ep_run["ref_log"])
    assert sorted(ep_losses) == [1, 2, 3, 4] and ep_losses == ref_losses
    (merged,) = reshard_mod.reshard(os.path.join(ep_run["ep_dir"], "checkpoint_last.pt"), 1, str(tmp_path),
                                    log=lambda *_: None)
    a, b = load(merged), load(os.path.join(ep_run["ref_dir"], "checkpoint_last.pt"))
    assert set(a["model"]) == set(b["model"])
    assert max_diff(a["model"], b["model"]) < 1e-5
    sa, sb = a["last_optimizer_state"]["state"], b["last_optimizer_state"]["state"]
    assert sa.keys() == sb.keys()
    for i in sb:
        assert sa[i]["step"] == sb[i]["step"]
        for k in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(sa[i][k], sb[i][k], rtol=1e-4, atol=1e-8)
    assert a["extra_state"]["train_iterator"] == b["extra_state"]["train_iterator"]


@pytest.mark.parametrize("via", [1, 4])
def test_reshard_round_trip_is_exact(ep_run, tmp_path, via):
    src = os.path.join(ep_run["ep_dir"], "checkpoint_last.pt")
    mid = reshard_mod.reshard(src, via, str(tmp_path / "mid"), log=lambda *_: None)
    assert len(mid) == via
    back = reshard_mod.reshard(mid[0], 2, str(tmp_path / "back"), log=lambda *_: None)
    for r, path in enumerate(back):
        a, b = load(os.path.join(ep_run["ep_dir"], f"checkpoint_last-rank-{r}.pt")), load(path)
        assert a["model"].keys() == b["model"].keys()
        for k, v in a["model"].items():
            assert torch.equal(v, b["model"][k]) if torch.is_tensor(v) else v == b["model"][k], k
        oa, ob = a["last_optimizer_state"], b["last_optimizer_state"]
        assert oa["param_groups"] == ob["param_groups"]
        for i, st in oa["state"].items():
            for k, v in st.items():
                assert torch.equal(v, ob["state"][i][k]) if torch.is_tensor(v) else v == ob["state"][i][k]
        assert a["extra_state"]["train_iterator"] == b["extra_state"]["train_iterator"]


def test_reshard_refuses_what_it_cannot_do(ep_run, tmp_path):
    src = os.path.join(ep_run["ep_dir"], "checkpoint_last.pt")
    with pytest.raises(reshard_mod.ReshardError, match="--world-size: 3 workers cannot share the 4 experts"):
        reshard_mod.reshard(src, 3, str(tmp_path), log=lambda *_: None)
    # a set whose second shard is missing
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    shutil.copy(os.path.join(ep_run["ep_dir"], "checkpoint_last-rank-0.pt"), lonely)
    with pytest.raises(reshard_mod.ReshardError, match="written by 2 workers but 1 file"):
        reshard_mod.reshard(str(lonely / "checkpoint_last.pt"), 1, str(tmp_path / "o"), log=lambda *_: None)
    # shards of different updates
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(os.path.join(ep_run["ep_dir"], "checkpoint_1_4-rank-0.pt"), mixed / "checkpoint_x-rank-0.pt")
    shutil.copy(os.path.join(ep_run["ep_dir"], "checkpoint_1_2-rank-1.pt"), mixed / "checkpoint_x-rank-1.pt")
    with pytest.raises(reshard_mod.ReshardError, match=r"different updates \[4, 2\]"):
        reshard_mod.reshard(str(mixed / "checkpoint_x.pt"), 1, str(tmp_path / "o2"), log=lambda *_: None)


def test_reshard_without_expert_dim_in_optimizer_state_drops_it(ep_run):
    """An optimizer state tensor without the expert dimension cannot be split: the output
    has no optimizer state and the note says to resume with --reset-optimizer."""
    states = [load(os.path.join(ep_run["ep_dir"], f"checkpoint_last-rank-{r}.pt")) for r in (0, 1)]
    names = [n for n, g in states[0]["model"]["_extra_state"]["params"] if g]
    i = names.index("decoder.layers.1.fc1.experts.w1_EDF")
    for s in states:
        s["last_optimizer_state"]["state"][i]["exp_avg_sq"] = s["last_optimizer_state"]["state"][i]["exp_avg_sq"].sum()
    outs, notes = reshard_mod.reshard_states(states, 1)
    assert "last_optimizer_state" not in outs[0]
    assert any("--reset-optimizer" in n and "exp_avg_sq" in n for n in notes)


# ----------------------------------------------------------------------------------------
# loading: layout mismatches and corrupt files are refused with a clear message
# ----------------------------------------------------------------------------------------


def load_model(path, data_bin, **overrides):
    return checkpoint_utils.load_model_ensemble_and_task([path], arg_overrides={"data": data_bin, **overrides})


def test_shard_into_one_process_names_the_reshard_command(ep_run):
    with pytest.raises(LayoutMismatchError) as e:
        load_model(os.path.join(ep_run["ep_dir"], "checkpoint_last-rank-1.pt"), ep_run["data_bin"])
    msg = str(e.value)
    assert "layer 1: the checkpoint holds experts 2..3 of 4 (expert-parallel rank 1 of 2)" in msg
    assert "this model holds all 4 experts (1 worker)" in msg
    assert "python -m moe_plugin.tools.reshard --input CHECKPOINT --world-size 1" in msg


def test_merged_checkpoint_loads_in_one_process(ep_run, tmp_path):
    (merged,) = reshard_mod.reshard(os.path.join(ep_run["ep_dir"], "checkpoint_last.pt"), 1, str(tmp_path),
                                    log=lambda *_: None)
    models, _, _ = load_model(merged, ep_run["data_bin"])
    (_, layer), = models[0].moe_layers()
    assert layer.experts.w1_EDF.shape[0] == 4
    shard1 = load(os.path.join(ep_run["ep_dir"], "checkpoint_last-rank-1.pt"))["model"]
    assert torch.equal(layer.experts.w1_EDF.data[2:], shard1["decoder.layers.1.fc1.experts.w1_EDF"])


def test_resharded_checkpoint_generates_as_the_one_process_run(ep_run, tmp_path):
    """docs/distributed.md: an expert-parallel checkpoint generates after ``reshard --world-size 1``;
    the hub interface's greedy continuation and its scores equal the one-process run's."""
    from fairseq.models.transformer_lm import TransformerLanguageModel

    (merged,) = reshard_mod.reshard(os.path.join(ep_run["ep_dir"], "checkpoint_last.pt"), 1, str(tmp_path),
                                    log=lambda *_: None)
    ref = os.path.join(ep_run["ref_dir"], "checkpoint_last.pt")
    out = []
    for path in (merged, ref):
        lm = TransformerLanguageModel.from_pretrained(os.path.dirname(path), os.path.basename(path),
                                                      data_name_or_path=ep_run["data_bin"], user_dir=USER_DIR)
        (hyp,) = lm.generate(lm.encode("w1 w2 w3"), beam=1, max_len_b=6, min_len=4)[:1]
        out.append(hyp)
    assert torch.equal(out[0]["tokens"], out[1]["tokens"]) and len(out[0]["tokens"]) > 4
    torch.testing.assert_close(out[0]["positional_scores"], out[1]["positional_scores"], atol=1e-4, rtol=0)


def test_upcycled_checkpoint_trains_expert_parallel_as_one_process(ep_run, tmp_path_factory, tmp_path):
    """docs/upcycling.md: upcycle a dense_lm checkpoint, reshard it for 2 ranks, restore it with
    fairseq's --reset-* flags: the losses equal one process's --finetune-from-model run with
    --update-freq 2 at every update."""
    from moe_plugin.tools import upcycle

    data_bin = ep_run["data_bin"]
    dense, _ = _e2e_runs.trained(tmp_path_factory, data_bin, "dense_lm")
    one = upcycle.upcycle(dense, "switch_lm", str(tmp_path / "up" / "upcycled.pt"), ["--moe-expert-count", "4"],
                          log=lambda *_: None)
    shards = reshard_mod.reshard(one, 2, str(tmp_path / "ep_in"), log=lambda *_: None)
    assert [os.path.basename(p) for p in shards] == ["upcycled-rank-0.pt", "upcycled-rank-1.pt"]
    args = [data_bin, *TRAIN, *MODEL, "--arch", "switch_lm", "--max-update", "2"]
    ep = launch(2, "train", *args, "--moe-expert-parallel", "--save-dir", tmp_path / "ep",
                "--restore-file", tmp_path / "ep_in" / "upcycled.pt", "--reset-optimizer", "--reset-lr-scheduler",
                "--reset-meters", "--reset-dataloader")
    ref = run_cli("train", *args, "--cpu", "--update-freq", "2", "--save-dir", tmp_path / "ref",
                  "--finetune-from-model", one)
    log = ep.stdout + ep.stderr
    assert "upcycled-rank-0.pt (epoch 1 @ 0 updates)" in log  # rank 0's log; each rank loads its own
    got, want = losses_by_update(log), losses_by_update(ref.stdout + ref.stderr)
    assert sorted(got) == [1, 2] and got == want


def test_checkpoint_without_layout_metadata_still_loads(ep_run, tmp_path):
    """Checkpoints written before the metadata existed: layout read from tensor shapes."""
    (merged,) = reshard_mod.reshard(os.path.join(ep_run["ep_dir"], "checkpoint_last.pt"), 1, str(tmp_path),
                                    log=lambda *_: None)
    state = load(merged)
    del state["model"]["_extra_state"]
    old = tmp_path / "old.pt"
    torch.save(state, old)
    models, _, _ = load_model(str(old), ep_run["data_bin"])
    assert torch.equal(models[0].decoder.layers[1].fc1.experts.w2_EFD.data,
                       state["model"]["decoder.layers.1.fc1.experts.w2_EFD"])
    # a shard without metadata is still refused (its shapes say it holds 2 of 4 experts)
    shard = load(os.path.join(ep_run["ep_dir"], "checkpoint_last-rank-0.pt"))
    del shard["model"]["_extra_state"]
    torch.save(shard, tmp_path / "old_shard.pt")
    with pytest.raises(LayoutMismatchError, match="experts 0..1 of 4 \\(a shard of a 2-worker"):
        load_model(str(tmp_path / "old_shard.pt"), ep_run["data_bin"])


def test_other_expert_count_or_router_is_not_fixable_by_resharding(ep_run, tmp_path):
    (merged,) = reshard_mod.reshard(os.path.join(ep_run["ep_dir"], "checkpoint_last.pt"), 1, str(tmp_path),
                                    log=lambda *_: None)
    with pytest.raises(LayoutMismatchError) as e:
        load_model(merged, ep_run["data_bin"], moe_expert_count=8)
    msg = str(e.value)
    assert "the checkpoint has --moe-expert-count 4, this model 8" in msg
    assert "cannot change their number or the router" in msg
    with pytest.raises(LayoutMismatchError, match="routes with 'switch', this model with 'smoe_dropout'"):
        load_model(merged, ep_run["data_bin"], moe_router="smoe_dropout")


def corrupt_copies(src, tmp_path):
    data = open(src, "rb").read()
    files = {"truncated": data[: len(data) // 2], "empty": b""}
    flipped = bytearray(data)
    # a byte inside the expert weights' storage (found by its value, so the zip structure stays valid)
    state = load(src)
    w = state["model"]["decoder.layers.1.fc1.experts.w1_EDF"]
    needle = w.reshape(-1)[:4].numpy().tobytes()
    pos = bytes(data).find(needle)
    assert pos > 0
    flipped[pos + 1] ^= 0x40
    files["flipped"] = bytes(flipped)
    out = {}
    for name, content in files.items():
        p = tmp_path / f"{name}.pt"
        p.write_bytes(content)
        out[name] = str(p)
    return out


def test_corrupt_files_are_refused(ep_run, tmp_path):
    bad = corrupt_copies(os.path.join(ep_run["ep_dir"], "checkpoint_last-rank-0.pt"), tmp_path)
    with pytest.raises(ckpts.CheckpointError, match="truncated"):
        ckpts.verify_file(bad["truncated"])
    with pytest.raises(ckpts.CheckpointError, match="empty"):
        ckpts.verify_file(bad["empty"])
    with pytest.raises(ckpts.CheckpointError, match="CRC mismatch"):
        ckpts.verify_file(bad["flipped"])
    # torch.load itself does not notice the flipped byte; the model's checksums do, inside
    # fairseq's own load path
    torch.load(bad["flipped"], weights_only=False)
    with pytest.raises(CheckpointCorruptError, match="decoder.layers.1.fc1.experts.w1_EDF is corrupt"):
        load_model(bad["flipped"], ep_run["data_bin"])


def test_check_command_reports_bad_sets(ep_run, tmp_path, capsys):
    d = tmp_path / "save"
    shutil.copytree(ep_run["ep_dir"], d)
    assert reshard_mod.main(["--check", str(d)]) == 0
    (d / "checkpoint_last-rank-1.pt").write_bytes((d / "checkpoint_last-rank-1.pt").read_bytes()[:1000])
    capsys.readouterr()
    assert reshard_mod.main(["--check", str(d)]) == 1
    out = capsys.readouterr().out
    assert re.search(r"BAD  checkpoint_last: .*checkpoint_last-rank-1.pt: not a torch checkpoint", out)
    assert "OK   checkpoint_1_4: update 4, 2 worker(s)" in out


def test_resume_choice_skips_broken_and_mixed_sets(ep_run, tmp_path):
    d = tmp_path / "save"
    shutil.copytree(ep_run["ep_dir"], d)
    assert ckpts.choose_resume(str(d), 2).stem == "checkpoint_last"
    # a kill while fairseq copied checkpoint_1_4 over checkpoint_last of rank 1
    (d / "checkpoint_last-rank-1.pt").write_bytes(b"")
    assert ckpts.choose_resume(str(d), 2).stem == "checkpoint_1_4"
    # a kill between two ranks' writes: rank 0 at update 4, rank 1 still at 2
    shutil.copy(d / "checkpoint_1_2-rank-1.pt", d / "checkpoint_1_4-rank-1.pt")
    chosen = ckpts.choose_resume(str(d), 2)
    assert (chosen.stem, chosen.num_updates) == ("checkpoint_1_2", 2)
    assert chosen.restore_file(str(d)) == str(d / "checkpoint_1_2.pt")
    with pytest.raises(ckpts.CheckpointError, match="--world-size 4"):
        ckpts.choose_resume(str(d), 4)


# ----------------------------------------------------------------------------------------
# refused configurations
# ----------------------------------------------------------------------------------------


def parse(data_bin, *extra):
    parser = options.get_training_parser()
    return options.parse_args_and_arch(
        parser, [data_bin, *TRAIN, *MODEL, "--arch", "switch_lm", "--cpu", *map(str, extra)])


@pytest.mark.parametrize("extra,match", [
    (["--distributed-world-size", "2", "--ddp-backend", "pytorch_ddp"], "--ddp-backend: 'pytorch_ddp' is not allowed"),
    (["--distributed-world-size", "3", "--ddp-backend", "legacy_ddp"], "--moe-expert-count: 4 is not allowed"),
    (["--distributed-world-size", "2", "--ddp-backend", "legacy_ddp", "--fp16"], "--fp16-no-flatten-grads"),
    (["--distributed-world-size", "2", "--ddp-backend", "legacy_ddp", "--zero-sharding", "os"], "--zero-sharding"),
])
def test_bad_expert_parallel_options_are_refused(tiny_corpus, extra, match):
    with pytest.raises(ValueError, match=match):
        parse(tiny_corpus[1], "--moe-expert-parallel", *extra)


def test_expert_parallel_args_use_fairseqs_per_rank_checkpoints(tiny_corpus):
    parse(tiny_corpus[1], "--moe-expert-parallel", "--distributed-world-size", "2", "--ddp-backend", "legacy_ddp",
          "--fp16", "--fp16-no-flatten-grads")  # allowed: fp32 copies keep param.expert
    args = parse(tiny_corpus[1], "--moe-expert-parallel", "--distributed-world-size", "2", "--ddp-backend", "no_c10d")
    assert args.base_layers == 1  # fairseq: save/load one file per rank
    assert args.moe_base_layers == 0 and base_layer_count(args) == 0  # the decoder builds no extra BASE layer
    local = parse(tiny_corpus[1])
    assert (local.base_layers, local.moe_base_layers) == (0, 0)  # local mode: no per-rank files
    # a checkpoint's cfg written before moe_base_layers existed: base_layers = N + 1
    old = OmegaConf.create({"base_layers": 3, "moe_expert_parallel": True})
    assert base_layer_count(old) == 2
    # on W > 1 ranks a config that turns fairseq's switch off is refused at build time
    with unittest.mock.patch.object(fairseq_glue, "world_size", lambda: 2):
        with pytest.raises(ValueError, match="--base-layers: 0 is not allowed with --moe-expert-parallel"):
            fairseq_glue.check_rank_checkpoints(OmegaConf.create({"base_layers": 0, "moe_expert_parallel": True}))
        fairseq_glue.check_rank_checkpoints(args)


# ----------------------------------------------------------------------------------------
# slow: acceptance flow, eval on 2 ranks, kill -9 and resume
# ----------------------------------------------------------------------------------------


def evaluated(output: str):
    m = re.findall(r"Evaluated ([\d,]+) tokens", output)
    assert m, output[-3000:]
    return int(m[-1].replace(",", ""))


@pytest.mark.slow
def test_acceptance_two_rank_training_evaluates_anywhere(tiny_corpus, tmp_path):
    """scripts/launch_cpu.sh trains base_lm (switch_lm until base_lm is registered) with 4
    experts on 2 ranks in expert-parallel mode; the 1-process fairseq-eval-lm of the
    checkpoint resharded to 1 matches the 2-rank fairseq-eval-lm to 1e-4 in loss.

    fairseq-eval-lm on 2 ranks prints only rank 0's figures (fairseq silences the logs of
    other ranks), so the 2-rank evaluation runs twice: as is (rank 0 scores data shard 0)
    and with --shard-id 1 (both ranks score shard 1, rank 0 prints it); the token-weighted
    mean of the two shards is the 2-rank loss of the whole test set.
    """
    _, data_bin = tiny_corpus
    arch = "base_lm" if "base_lm" in ARCHS else "switch_lm"
    save = tmp_path / "save"
    launch(2, "train", data_bin, *TRAIN, *MODEL, "--arch", arch, "--moe-expert-parallel", "--max-update", "8",
           "--save-dir", save)
    assert sorted(os.listdir(save)) == ["checkpoint_last-rank-0.pt", "checkpoint_last-rank-1.pt"]
    proc = subprocess.run([sys.executable, "-m", "moe_plugin.tools.reshard", "--input", str(save / "checkpoint_last.pt"),
                           "--world-size", "1", "--output", str(tmp_path / "one")], cwd=ROOT, capture_output=True,
                          text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert proc.returncode == 0, proc.stderr
    assert "optimizer state kept" in proc.stdout
    ev = [data_bin, "--user-dir", USER_DIR, "--tokens-per-sample", "32", "--max-tokens", "512"]
    one = run_cli("eval_lm", *ev, "--cpu", "--path", tmp_path / "one" / "checkpoint_last.pt")
    one = one.stdout + one.stderr
    loss1, n1 = eval_lm_loss(one), evaluated(one)
    shards = []
    for shard in ("0", "1"):
        out = launch(2, "eval_lm", *ev, "--path", str(save / "checkpoint_last-rank-{RANK}.pt"),
                     *(["--shard-id", shard] if shard == "1" else []))
        text = out.stdout + out.stderr
        shards.append((eval_lm_loss(text), evaluated(text)))
    assert sum(n for _, n in shards) == n1
    loss2 = sum(l * n for l, n in shards) / n1
    assert abs(loss2 - loss1) <= 1e-4 + 1e-9, (loss1, shards)
    for shard, (l2, _) in enumerate(shards):  # and each shard on its own, in one process
        part = run_cli("eval_lm", *ev, "--cpu", "--path", tmp_path / "one" / "checkpoint_last.pt",
                       "--num-shards", "2", "--shard-id", shard)
        assert abs(eval_lm_loss(part.stdout + part.stderr) - l2) <= 1e-4 + 1e-9


def start_launch(world, module, *args, log):
    e = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.Popen(["bash", LAUNCH, str(world), module, *map(str, args)], cwd=ROOT, env=e,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


@pytest.mark.slow
def test_kill_minus_9_and_resume(tiny_corpus, tmp_path):
    """SIGKILL every process of a 2-rank run mid-way; the same command resumes from the
    newest good checkpoint and ends with the same update count, the same losses and the
    same weights as a run that was never interrupted."""
    _, data_bin = tiny_corpus
    args = [data_bin, *TRAIN, *MODEL, "--arch", "switch_lm", "--moe-expert-parallel", "--max-update", "16",
            "--save-interval-updates", "2"]
    full = launch(2, "train", *args, "--save-dir", tmp_path / "full")
    full_losses = losses_by_update(full.stdout)
    save = tmp_path / "killed"
    log1 = tmp_path / "first.log"
    p = start_launch(2, "train", *args, "--save-dir", save, log=log1)
    deadline = time.time() + 600
    while time.time() < deadline and not re.search(r"num_updates=(5|6|7|8|9)\b", log1.read_text()):
        time.sleep(0.2)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    first = losses_by_update(log1.read_text())
    assert 5 <= max(first) < 16, "the kill came too late to test anything"
    second = launch(2, "train", *args, "--save-dir", save)
    resumed = losses_by_update(second.stdout)
    start = min(resumed)
    assert start >= 3 and max(resumed) == 16  # resumed from a saved update, not from scratch
    assert resumed == {u: full_losses[u] for u in range(start, 17)}
    a, b = load(save / "checkpoint_last-rank-0.pt"), load(tmp_path / "full" / "checkpoint_last-rank-0.pt")
    assert a["optimizer_history"][-1]["num_updates"] == 16
    assert max_diff(a["model"], b["model"]) < 1e-6


@pytest.mark.slow
def test_ranks_resumed_from_different_updates_fail_on_first_forward(ep_run, tmp_path):
    """Without the launcher, fairseq-train would load rank 0's update-4 shard next to rank
    1's update-2 shard; the first all-to-all compares their stamps and stops every rank."""
    d = tmp_path / "save"
    shutil.copytree(ep_run["ep_dir"], d)
    shutil.copy(d / "checkpoint_1_2-rank-1.pt", d / "checkpoint_last-rank-1.pt")
    # bypass the launcher's resume choice by naming the restore file explicitly
    proc = launch(2, "train", ep_run["data_bin"], *TRAIN, *MODEL, "--arch", "switch_lm", "--moe-expert-parallel",
                  "--max-update", "6", "--save-dir", d, "--restore-file", d / "checkpoint_last.pt", check=False)
    assert proc.returncode != 0
    logs = proc.stdout + proc.stderr
    assert "expert-parallel ranks hold state from different checkpoints" in logs
    assert "[3, 1]" in logs or "[3, 1]" in logs.replace(" ", "")


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_every_arch_trains_on_two_ranks_reshards_and_evaluates(tiny_corpus, tmp_path, arch):
    """fairseq-train on 2 ranks in expert-parallel mode, reshard to 1, and the 1-process
    fairseq-eval-lm of data shard 0 equals what rank 0 prints evaluating on the 2 ranks."""
    _, data_bin = tiny_corpus
    save = tmp_path / "save"
    launch(2, "train", data_bin, *TRAIN, *MODEL, "--arch", arch, "--moe-expert-parallel", "--max-update", "6",
           "--save-dir", save)
    (merged,) = reshard_mod.reshard(str(save / "checkpoint_last.pt"), 1, str(tmp_path / "one"), log=lambda *_: None)
    ev = [data_bin, "--user-dir", USER_DIR, "--tokens-per-sample", "32", "--max-tokens", "512"]
    overrides = _e2e_runs.EVAL_OVERRIDES.get(arch)  # expert choice: its evaluation must be allowed
    if overrides:
        ev += ["--model-overrides", repr(overrides)]
    two = launch(2, "eval_lm", *ev, "--path", str(save / "checkpoint_last-rank-{RANK}.pt"))
    one = run_cli("eval_lm", *ev, "--cpu", "--path", merged, "--num-shards", "2", "--shard-id", "0")
    assert abs(eval_lm_loss(two.stdout + two.stderr) - eval_lm_loss(one.stdout + one.stderr)) <= 1e-4 + 1e-9

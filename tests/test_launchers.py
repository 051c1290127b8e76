"""The launchers' own logic, with a stand-in for python (no fairseq, no GPU, no Slurm):
the arguments every rank receives, {RANK} substitution, the flags each adds, and that a
failing rank stops the others. The real 2-rank runs are in tests/test_ep_fairseq.py."""

import os
import shutil
import subprocess
import time

import pytest

from tests.conftest import ROOT

SCRIPTS = os.path.join(ROOT, "scripts")

FAKE_PYTHON = """#!/usr/bin/env bash
# records its arguments; the rank given by --distributed-rank R or $SLURM_PROCID / $RANK
rank=${SLURM_PROCID:-${RANK:-x}}
for ((i = 1; i <= $#; i++)); do [[ "${!i}" == --distributed-rank ]] && { j=$((i + 1)); rank=${!j}; }; done
printf '%s\\n' "$@" > "$FAKE_OUT/rank-$rank.args"
[[ "$rank" == "${FAKE_FAIL_RANK:-none}" ]] && exit 3
sleep "${FAKE_SLEEP:-0}"
exit 0
"""


@pytest.fixture
def fake(tmp_path):
    py = tmp_path / "python"
    py.write_text(FAKE_PYTHON)
    py.chmod(0o755)
    out = tmp_path / "out"
    out.mkdir()
    return py, out


def run(script, *args, env=None, timeout=60):
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run(["bash", os.path.join(SCRIPTS, script), *map(str, args)], cwd=ROOT, env=e,
                          capture_output=True, text=True, timeout=timeout)


def rank_args(out, rank):
    return (out / f"rank-{rank}.args").read_text().splitlines()


def test_launch_cpu_starts_every_rank_with_the_gloo_recipe(fake, tmp_path):
    py, out = fake
    proc = run("launch_cpu.sh", 3, "fairseq-eval-lm", "DATA", "--path", "ck/checkpoint_last-rank-{RANK}.pt",
               env={"PYTHON": str(py), "FAKE_OUT": str(out), "MASTER_PORT": "23456", "MOE_LOG_DIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    for r in range(3):
        a = rank_args(out, r)
        assert a[:4] == ["-m", "fairseq_cli.eval_lm", "DATA", "--path"]
        assert a[4] == f"ck/checkpoint_last-rank-{r}.pt"
        flags = " ".join(a[5:])
        assert flags == ("--cpu --distributed-world-size 3 --distributed-backend gloo --distributed-init-method "
                         f"tcp://127.0.0.1:23456 --distributed-no-spawn --distributed-rank {r}")


def test_launch_cpu_train_adds_legacy_ddp_only_for_expert_parallel(fake, tmp_path):
    py, out = fake
    env = {"PYTHON": str(py), "FAKE_OUT": str(out), "MOE_LOG_DIR": str(tmp_path)}
    nosave = str(tmp_path / "none")
    assert run("launch_cpu.sh", 2, "train", "DATA", "--moe-expert-parallel", "--save-dir", nosave, env=env).returncode == 0
    assert "--ddp-backend legacy_ddp" in " ".join(rank_args(out, 1))
    assert run("launch_cpu.sh", 2, "train", "DATA", "--save-dir", nosave, env=env).returncode == 0
    assert "--ddp-backend" not in rank_args(out, 1)
    assert run("launch_cpu.sh", 2, "train", "DATA", "--moe-expert-parallel", "--ddp-backend", "no_c10d",
               "--save-dir", nosave, env=env).returncode == 0
    assert rank_args(out, 0).count("--ddp-backend") == 1


def test_launch_cpu_stops_the_other_ranks_when_one_fails(fake, tmp_path):
    py, out = fake
    t0 = time.time()
    proc = run("launch_cpu.sh", 2, "eval_lm", "DATA", env={
        "PYTHON": str(py), "FAKE_OUT": str(out), "FAKE_FAIL_RANK": "1", "FAKE_SLEEP": "30",
        "MOE_LOG_DIR": str(tmp_path)})
    assert proc.returncode == 3
    assert time.time() - t0 < 25, "rank 0 was not stopped"
    assert "a rank exited with status 3" in proc.stderr


def test_launch_cpu_rejects_a_bad_world_size():
    proc = run("launch_cpu.sh", "two", "train", "DATA")
    assert proc.returncode == 2 and "W must be a positive integer" in proc.stderr


def test_launch_slurm_uses_slurm_ranks(fake, tmp_path):
    py, out = fake
    srun = tmp_path / "srun"  # runs the command once per task, like srun on 2 nodes x 2 tasks
    srun.write_text('#!/usr/bin/env bash\nwhile [[ "$1" == --* ]]; do case "$1" in --nodes|--ntasks-per-node) '
                    'shift 2;; *) shift;; esac; done\nfor r in 0 1 2 3; do SLURM_PROCID=$r "$@"; done\n')
    srun.chmod(0o755)
    proc = run("launch_slurm.sh", "train", "DATA", "--moe-expert-parallel", "--save-dir", tmp_path / "none",
               "--tag", "r{RANK}", env={"PYTHON": str(py), "FAKE_OUT": str(out), "SRUN": str(srun),
                                        "SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "2(x2)", "SLURM_JOB_ID": "777"})
    assert proc.returncode == 0, proc.stderr
    for r in range(4):
        flags = " ".join(rank_args(out, r))
        assert f"--tag r{r}" in flags
        assert "--distributed-world-size 4 --distributed-port 10777 --ddp-backend legacy_ddp" in flags


def test_launch_slurm_outside_slurm_says_so():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run(["bash", os.path.join(SCRIPTS, "launch_slurm.sh"), "train", "DATA"], env=env,
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "run it with sbatch or inside salloc" in proc.stderr


def test_launch_torchrun_command_line():
    proc = run("launch_torchrun.sh", 4, "train", "DATA", "--moe-expert-parallel", env={"MOE_DRY_RUN": "1"})
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout
    assert line.startswith("torchrun --standalone --nproc_per_node 4 --no-python bash -c ")
    assert line.rstrip().endswith("python -m fairseq_cli.train DATA --moe-expert-parallel "
                                  "--distributed-world-size 4 --ddp-backend legacy_ddp")


@pytest.mark.slow
def test_launch_torchrun_substitutes_each_rank(fake):
    """torchrun itself (CPU, a stand-in for python): every process gets its own {RANK}."""
    py, out = fake
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(os.sys.executable), "torchrun")
    proc = run("launch_torchrun.sh", 2, "eval_lm", "DATA", "--path", "c-{RANK}.pt", timeout=300,
               env={"PYTHON": str(py), "FAKE_OUT": str(out), "TORCHRUN": torchrun})
    assert proc.returncode == 0, proc.stderr
    for r in range(2):
        assert rank_args(out, r)[4] == f"c-{r}.pt"

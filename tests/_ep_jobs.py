"""Runs the distributed unit checks once per pytest process: W gloo ranks of
tests/_ep_worker.py, started as subprocesses; returns each rank's results."""

import functools
import os
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@functools.lru_cache(maxsize=None)
def worker_results(world_size: int = 2, timeout: int = 300):
    """[rank 0 results, rank 1 results, ...]; raises with the ranks' output on failure."""
    out = tempfile.mkdtemp(prefix="moe_ep_")
    init = "file://" + os.path.join(out, "rendezvous")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests._ep_worker", "--rank", str(r),
             "--world-size", str(world_size), "--init", init, "--out", out],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for r in range(world_size)
    ]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError(f"distributed worker timed out after {timeout}s")
    for r, p in enumerate(procs):
        if p.returncode != 0:
            raise AssertionError(f"rank {r} failed ({p.returncode}):\n" + "\n".join(l[-4000:] for l in logs))
    return [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(world_size)]


def result(results, rank: int, name: str):
    """One job's result on one rank; fails the test with the rank's traceback if it raised."""
    res = results[rank][name]
    if "error" in res:
        raise AssertionError(f"{name} raised on rank {rank}:\n{res['error']}")
    return res

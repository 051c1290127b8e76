"""One rank of the distributed unit checks (run by tests/_ep_jobs.py, never by pytest itself).

    python -m tests._ep_worker --rank R --world-size W --init file:///tmp/x --out DIR   (from the repository root)

Every rank runs the same sequence of collectives and writes ``DIR/rank{R}.pt``: a dict
of named results the test modules compare with references computed in the parent
process (which holds all the inputs: every tensor here comes from fixed seeds).

Jobs:
* ``a2a/<case>``: the differentiable all-to-all on hand-made uneven and zero splits:
  received rows and the gradient of sum(received * weights) w.r.t. the sent rows.
* ``dispatch/<case>``: ExpertParallelDispatcher with fixed expert ids (a rank that sends
  nothing, an expert that receives nothing, a rank with no token at all): rows and counts
  handed to the experts, the combined output, its gradient w.r.t. the input.
* ``router/<name>``: for every registered router, an MoE layer in expert-parallel mode on
  this rank's micro-batch, then fairseq's LegacyDistributedDataParallel gradient
  reduction and fairseq's gradient scaling (multiply by W / sample size): outputs, aux
  losses, and every gradient (shared and this rank's experts). The reference (one
  process, all experts, the same micro-batches) is computed by the parent.
"""

import argparse
import os
import traceback

import torch
import torch.distributed as dist

from tests import ep_cases


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--world-size", type=int, required=True)
    ap.add_argument("--init", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=args.init, rank=args.rank, world_size=args.world_size, timeout=ep_cases.TIMEOUT
    )
    results = {}
    # every rank runs every job in the same order (they are collectives); a job that fails
    # records its traceback and the others still run
    for name, job in ep_cases.jobs():
        try:
            results[name] = job(args.rank, args.world_size)
        except Exception:  # noqa: BLE001 - reported to the test as the job's result
            results[name] = {"error": traceback.format_exc()}
    torch.save(results, os.path.join(args.out, f"rank{args.rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""Expert-parallel traffic and time per router, 2 gloo ranks on this machine.

    .venv/bin/python scripts/bench_expert_parallel.py [--tokens 2048] [--dim 256] [--experts 8] [--repeats 5]

For every registered router (arch defaults, E experts, E/2 per rank) one MoE layer runs
forward + backward on each rank's T tokens:

* rows/token: rows this rank sends to the experts' ranks per token, and the part that goes
  to the other rank (exact counts). For K > 1 the dispatcher sends a token once per rank
  holding one of its experts ("token exchange"); ``slots`` shows what one row per routed
  slot would send (the dispatcher with ``dedup=False``), the ratio is the saving;
* time: median of ``--repeats`` forward+backward passes in expert-parallel mode, as a
  ratio to one process running the same layer with all experts on the same T tokens
  (the baseline, measured in the same run). On a shared 2-core CPU the two ranks compete
  for the cores, so the ratio mostly shows the exchange overhead; it is not a speed claim.
"""

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def layer_for(name, E, D, expert_parallel, dedup=True):
    import dataclasses

    from moe_plugin import config
    from moe_plugin.moe_layer import build_moe_layer
    from tests.helpers import router_cfg, vocab_info

    cfg = dataclasses.replace(router_cfg(name, moe_expert_count=E), moe_expert_parallel=expert_parallel)
    config.validate(cfg)
    torch.manual_seed(0)
    layer = build_moe_layer(cfg, D, 2 * D, vocab=vocab_info(1000), layer_index=1)
    if expert_parallel and hasattr(layer.dispatcher, "dedup"):
        layer.dispatcher.dedup = dedup
    return layer


def run_once(layer, x, tok):
    t0 = time.perf_counter()
    out = layer(x, tokens=tok)
    (out.square().mean() + sum(layer.last_aux_losses.values(), out.new_zeros(()))).backward()
    return time.perf_counter() - t0


def worker(rank, args, init, results):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    from tests.helpers import all_router_names, token_info

    g = torch.Generator().manual_seed(rank)
    B = 8
    L = args.tokens // B
    ids = torch.randint(4, 1000, (B, L), generator=g)
    tok = token_info(ids)
    x = torch.randn(B * L, args.dim, generator=g, requires_grad=True)
    out = {}
    for name in all_router_names():
        try:
            ep = layer_for(name, args.experts, args.dim, True)
            slots = layer_for(name, args.experts, args.dim, True, dedup=False)
        except ValueError as e:
            out[name] = {"skip": str(e)}
            continue
        local = layer_for(name, args.experts, args.dim, False)
        times_ep, times_local = [], []
        for _ in range(args.repeats):
            dist.barrier()
            times_ep.append(run_once(ep, x, tok))
            times_local.append(run_once(local, x, tok))
        run_once(slots, x, tok)
        d, s = ep.dispatcher, slots.dispatcher
        out[name] = {
            "k": ep.router.top_k,
            "sent": d.last_rows_sent / x.shape[0],
            "remote": d.last_rows_remote / x.shape[0],
            "slots": s.last_rows_sent / x.shape[0],
            "ratio": statistics.median(times_ep) / statistics.median(times_local),
        }
    results[rank] = out
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    init = "file://" + os.path.join(tempfile.mkdtemp(), "rendezvous")
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(worker, args=(args, init, results), nprocs=2, join=True)
        res = dict(results)
    print(f"2 gloo ranks, T={args.tokens} tokens per rank, D={args.dim}, F={2 * args.dim}, E={args.experts} "
          f"({args.experts // 2} per rank), forward+backward, median of {args.repeats}")
    print(f"{'router':<14}{'K':>3}{'rows/token':>12}{'remote':>8}{'slots':>8}{'saving':>8}{'time EP/local':>15}")
    for name in sorted(res[0]):
        r0 = res[0][name]
        if "skip" in r0:
            print(f"{name:<14} skipped: {r0['skip']}")
            continue
        sent = (r0["sent"] + res[1][name]["sent"]) / 2
        remote = (r0["remote"] + res[1][name]["remote"]) / 2
        slots = (r0["slots"] + res[1][name]["slots"]) / 2
        ratio = (r0["ratio"] + res[1][name]["ratio"]) / 2
        print(f"{name:<14}{r0['k']:>3}{sent:>12.3f}{remote:>8.3f}{slots:>8.3f}{slots / max(sent, 1e-9):>8.2f}"
              f"{ratio:>15.2f}")


if __name__ == "__main__":
    main()

"""Routing analysis of a trained checkpoint: which tokens go to which expert.

Shape legend: N routed (non-padding) tokens of the split, K expert slots per token,
E experts of a layer, V vocabulary size.

``python -m moe_plugin.tools.analysis CKPT --data DATA_BIN [--split valid] [--compare CKPT2] --out DIR``

1. **Dump**: runs the model (evaluation mode, as fairseq-eval-lm routes) over the split
   and records, for every MoE layer, each token's id, its previous token's id and its
   experts (``DIR/assignments.npz``: ``l{i}_ids_N``, ``l{i}_prev_N``, ``l{i}_experts_NK``,
   ``-1`` = a dropped slot; ``l{i}_pos_N``, the token's position in the split). Routers are
   found as modules of class :class:`moe_plugin.routing.Router`; their results are read with forward hooks, so any
   router and any layer class (MultiHash, BASE) is covered without touching the model.
2. **Experts' tokens** (BASE paper, Lewis et al. 2021, Table 1): for each expert of each
   layer, its share of the tokens and its most frequent tokens and previous tokens (the
   token's first expert, slot 0, is the one counted), and how much of the routing the
   token or the previous token explains: the normalised mutual information
   ``I(expert; token) / H(expert)`` (plug-in estimate; biased upwards when the
   vocabulary is large compared with the number of tokens, so compare layers and models
   on the same split, not against an absolute scale).
3. **Load entropy** per layer: ``H(load) / log E`` of the distribution of kept slots over
   experts (1 = perfectly balanced), load max/mean, unused experts.
4. **Routing change** (``--compare CKPT2``, e.g. an earlier checkpoint of the same run; a
   glob pattern is expanded and must match one file): per layer, the fraction of tokens
   whose first expert differs between the two checkpoints on the same tokens, and the
   agreement after the best one-to-one relabelling of the experts (Hungarian matching of
   the E x E co-assignment counts, scipy), which is what matters between two independent
   runs whose expert numbering is arbitrary.
5. **Experts and domains** (``--domains SPLIT.domains``, the side file data-prep/synthetic.py
   writes): each routed token is placed in its document (from fairseq's token blocks and the
   sample ids, checked against the split's tokens), and per layer the D x E counts of each
   domain's tokens per first expert and ``NMI(expert; domain) = I(expert; domain) / H(expert)``
   are reported (1: the expert is a function of the domain).

Writes ``DIR/analysis.md`` (tables), ``DIR/analysis.json`` and ``DIR/assignments.npz``.
"""

import argparse
import glob
import json
import math
import os
import sys
from typing import Dict, List, Optional

import numpy as np


# ----------------------------------------------------------------------------------------
# Pure functions on assignments (numpy; the tests compare them with brute force / scipy)
# ----------------------------------------------------------------------------------------


def expert_load(experts_NK: np.ndarray, num_experts: int) -> np.ndarray:
    """(E,) kept slots per expert (-1 = dropped, not counted)."""
    e = experts_NK.reshape(-1)
    return np.bincount(e[e >= 0], minlength=num_experts)[:num_experts]


def load_entropy(load_E: np.ndarray) -> Dict[str, float]:
    """Entropy of the load distribution in nats, normalised by log E, max/mean, unused."""
    load_E = np.asarray(load_E, dtype=np.float64)
    E = load_E.shape[0]
    total = load_E.sum()
    if total <= 0:
        return {"entropy": 0.0, "entropy_norm": 0.0, "load_max": float("nan"), "unused": float(E)}
    p = load_E / total
    nz = p[p > 0]
    h = float(-(nz * np.log(nz)).sum())
    return {
        "entropy": h,
        "entropy_norm": h / math.log(E) if E > 1 else 1.0,
        "load_max": float(load_E.max() / load_E.mean()),
        "unused": float((load_E == 0).sum()),
    }


def top_counts(keys_N: np.ndarray, groups_N: np.ndarray, num_groups: int, top: int) -> List[List[tuple]]:
    """For each group g in 0..num_groups-1: the ``top`` most frequent keys with their counts,
    most frequent first (ties: smaller key first)."""
    out: List[List[tuple]] = [[] for _ in range(num_groups)]
    ok = groups_N >= 0
    pairs = np.stack([groups_N[ok], keys_N[ok]], axis=1)
    if pairs.size == 0:
        return out
    uniq, counts = np.unique(pairs, axis=0, return_counts=True)
    # sort by group, then count descending, then key ascending
    order = np.lexsort((uniq[:, 1], -counts, uniq[:, 0]))
    uniq, counts = uniq[order], counts[order]
    for (g, k), c in zip(uniq.tolist(), counts.tolist()):
        if len(out[g]) < top:
            out[g].append((k, c))
    return out


def mutual_information(a_N: np.ndarray, b_N: np.ndarray) -> float:
    """Plug-in mutual information I(a; b) in nats of two integer label arrays."""
    if a_N.size == 0:
        return 0.0
    _, ai = np.unique(a_N, return_inverse=True)
    _, bi = np.unique(b_N, return_inverse=True)
    joint = np.zeros((ai.max() + 1, bi.max() + 1))
    np.add.at(joint, (ai, bi), 1.0)
    joint /= joint.sum()
    pa, pb = joint.sum(1, keepdims=True), joint.sum(0, keepdims=True)
    nz = joint > 0
    return float((joint[nz] * np.log(joint[nz] / (pa @ pb)[nz])).sum())


def entropy_of_labels(a_N: np.ndarray) -> float:
    _, c = np.unique(a_N, return_counts=True)
    p = c / c.sum()
    return float(-(p * np.log(p)).sum())


def expert_domain_counts(first_N: np.ndarray, domain_N: np.ndarray, num_experts: int,
                         num_domains: int) -> np.ndarray:
    """(D, E) tokens of each domain whose first expert is e (dropped tokens, -1, not counted)."""
    ok = first_N >= 0
    C = np.zeros((num_domains, num_experts), dtype=np.int64)
    np.add.at(C, (domain_N[ok], first_N[ok]), 1)
    return C


def domain_nmi(first_N: np.ndarray, domain_N: np.ndarray) -> float:
    """I(first expert; domain) / H(first expert) over the routed tokens: the share of the
    routing's entropy the document's domain explains (1 = the expert is a function of the
    domain; 0 = independent). The same normalisation as ``nmi_token``."""
    ok = first_N >= 0
    h = entropy_of_labels(first_N[ok]) if ok.any() else 0.0
    return mutual_information(first_N[ok], domain_N[ok]) / h if h > 0 else 0.0


def document_of(positions_N: np.ndarray, doc_sizes: np.ndarray) -> np.ndarray:
    """Document index of each position of the split's token stream (the documents' tokens,
    each ending with its end-of-document token, one after the other); position -1 (the
    end-of-document token fairseq puts before the stream's first token) is document 0."""
    ends = np.cumsum(np.asarray(doc_sizes, dtype=np.int64))
    pos = np.maximum(np.asarray(positions_N, dtype=np.int64), 0)
    if pos.size and pos.max() >= ends[-1]:
        raise ValueError(f"position {int(pos.max())} is past the split's {int(ends[-1])} tokens")
    return np.searchsorted(ends, pos, side="right")


def read_domains(path: str, num_docs: int) -> np.ndarray:
    """The ``<split>.domains`` side file of data-prep/synthetic.py: one domain per document,
    in the order of ``<split>.txt``; checked against the split's number of documents."""
    with open(path) as f:
        dom = np.array([int(line) for line in f if line.strip()], dtype=np.int64)
    if dom.shape[0] != num_docs:
        raise ValueError(f"{path}: {dom.shape[0]} domains for {num_docs} documents in the split; "
                         "the side file must come from the same corpus as the data-bin")
    return dom


def routing_change(first_a_N: np.ndarray, first_b_N: np.ndarray, num_experts: int) -> Dict[str, float]:
    """How the first expert of the same tokens differs between two checkpoints.

    ``changed``: fraction of tokens (routed in both) whose expert id differs;
    ``agreement_matched``: fraction that agree after the best one-to-one relabelling of
    b's experts (maximum-weight matching of the E x E co-assignment counts).
    """
    from scipy.optimize import linear_sum_assignment

    ok = (first_a_N >= 0) & (first_b_N >= 0)
    a, b = first_a_N[ok], first_b_N[ok]
    n = a.size
    if n == 0:
        return {"tokens": 0, "changed": float("nan"), "agreement_matched": float("nan")}
    C = np.zeros((num_experts, num_experts), dtype=np.int64)
    np.add.at(C, (a, b), 1)
    rows, cols = linear_sum_assignment(-C)
    return {
        "tokens": int(n),
        "changed": float((a != b).mean()),
        "agreement_matched": float(C[rows, cols].sum() / n),
    }


# ----------------------------------------------------------------------------------------
# Collecting assignments from a checkpoint
# ----------------------------------------------------------------------------------------


def load_checkpoint(path: str, data: str, cpu: bool = True):
    """(model in eval mode, task) from a fairseq checkpoint, reading the data-bin ``data``."""
    import torch
    from fairseq import checkpoint_utils

    import moe_plugin  # noqa: F401  (registers the archs)

    models, _cfg, task = checkpoint_utils.load_model_ensemble_and_task([path], arg_overrides={"data": data})
    model = models[0]
    if not cpu and torch.cuda.is_available():
        model = model.cuda()
    model.eval()
    return model, task


def routers_of(model):
    """[(name, router)] of every Router module, in module order; name = 'l{decoder layer}'."""
    from moe_plugin.routing import Router

    out, seen = [], set()
    for m in model.modules():
        if isinstance(m, Router):
            idx = m.layer_index if m.layer_index is not None else len(out)
            name = f"l{idx}"
            while name in seen:  # e.g. several routers reporting the same index
                name += "b"
            seen.add(name)
            out.append((name, m))
    return out


def _token_blocks(dataset):
    """The TokenBlockDataset under fairseq's language-modeling dataset wrappers, or None."""
    d = dataset
    for _ in range(8):
        if hasattr(d, "slice_indices") and hasattr(d, "dataset"):
            return d
        d = getattr(d, "dataset", None)
        if d is None:
            return None
    return None


def split_documents(task, split: str) -> np.ndarray:
    """(docs,) tokens of each document of ``split`` (its end-of-document token included), in
    the order fairseq-preprocess binarised them, i.e. the order of ``<split>.txt``."""
    task.load_dataset(split)
    blocks = _token_blocks(task.dataset(split))
    if blocks is None:
        raise ValueError(f"split {split!r}: not a language-modeling dataset of token blocks")
    return np.asarray(blocks.dataset.sizes, dtype=np.int64)


def collect_assignments(model, task, split: str, max_tokens: int = 4096, limit_tokens: int = 0) -> Dict[str, dict]:
    """Run the model over ``split``; per router: ids_N, prev_N, experts_NK and pos_N (numpy).

    ``pos_N``: each routed token's position in the split's token stream (the documents one
    after the other, see :func:`document_of`; -1 = the end-of-document token fairseq puts
    before the first block), from the sample ids and fairseq's token blocks; checked against
    the stream itself, so a dataset whose blocks are laid out otherwise fails here instead of
    attributing tokens to the wrong documents."""
    import torch
    from fairseq import utils

    routers = routers_of(model)
    if not routers:
        raise SystemExit("the checkpoint has no MoE router (a dense model?): nothing to analyse")
    store = {name: {"ids": [], "prev": [], "experts": [], "pos": []} for name, _ in routers}
    num_experts = {name: r.num_experts for name, r in routers}
    current = {}  # the batch's stream positions, row t * B + b as the routers see it

    def hook_for(name):
        def hook(module, args, kwargs, output):
            tokens = kwargs.get("tokens")
            if tokens is None:
                raise RuntimeError(f"router {name} got no token ids; cannot attribute its routing to tokens")
            keep = ~tokens.pad_mask_T
            store[name]["ids"].append(tokens.ids_T[keep].cpu().numpy())
            store[name]["prev"].append(tokens.prev_ids_T[keep].cpu().numpy())
            store[name]["experts"].append(output.expert_ids_TK[keep].cpu().numpy())
            if "pos_T" in current and not tokens.incremental:
                store[name]["pos"].append(current["pos_T"][keep.cpu().numpy()])

        return hook

    handles = [r.register_forward_hook(hook_for(name), with_kwargs=True) for name, r in routers]
    try:
        task.load_dataset(split)
        dataset = task.dataset(split)
        itr = task.get_batch_iterator(
            dataset=dataset, max_tokens=max_tokens,
            max_positions=utils.resolve_max_positions(task.max_positions(), model.max_positions()),
            ignore_invalid_inputs=True, num_workers=0,
        ).next_epoch_itr(shuffle=False)
        blocks = _token_blocks(dataset)
        starts = np.asarray(blocks.slice_indices, dtype=np.int64)[:, 0] if blocks is not None else None
        device = next(model.parameters()).device
        seen = 0
        with torch.no_grad():
            for sample in itr:
                if starts is not None:
                    B, L = sample["net_input"]["src_tokens"].shape
                    # the source is the target shifted right by one: row b's token t is the
                    # stream's token start - 1 + t
                    pos_BL = starts[sample["id"].cpu().numpy()][:, None] - 1 + np.arange(L)[None, :]
                    current["pos_T"] = pos_BL.T.reshape(-1)
                sample = utils.move_to_cuda(sample, device=device) if device.type == "cuda" else sample
                model(**sample["net_input"])
                seen += int(sample["ntokens"])
                if limit_tokens and seen >= limit_tokens:
                    break
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name, st in store.items():
        out[name] = {
            "ids": np.concatenate(st["ids"]) if st["ids"] else np.zeros(0, np.int64),
            "prev": np.concatenate(st["prev"]) if st["prev"] else np.zeros(0, np.int64),
            "experts": np.concatenate(st["experts"]) if st["experts"] else np.zeros((0, 1), np.int64),
            "num_experts": num_experts[name],
        }
        if st["pos"] and sum(p.shape[0] for p in st["pos"]) == out[name]["ids"].shape[0]:
            out[name]["pos"] = np.concatenate(st["pos"])
    if starts is not None:
        _check_positions(out, blocks, task.source_dictionary.eos())
    return out


def _check_positions(assign: Dict[str, dict], blocks, eos: int) -> None:
    """Every routed token is the stream's token at its recorded position (eos at -1)."""
    import torch

    base = blocks.dataset
    stream = torch.cat([base[i] for i in range(len(base))]).numpy()
    for name, a in assign.items():
        if "pos" not in a:
            continue
        pos, ids = a["pos"], a["ids"]
        expect = np.where(pos >= 0, stream[np.maximum(pos, 0)], eos)
        if not np.array_equal(expect, ids):
            raise RuntimeError(f"router {name}: the routed tokens are not the split's tokens at the positions "
                               "derived from fairseq's token blocks; cannot attribute them to documents")


# ----------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------


def analyse(assign: Dict[str, dict], top: int = 5) -> Dict[str, dict]:
    """Per layer: load entropy figures, per-expert top tokens / previous tokens, NMI."""
    res = {}
    for name, a in assign.items():
        E = a["num_experts"]
        load = expert_load(a["experts"], E)
        first = a["experts"][:, 0]
        ok = first >= 0
        h_e = entropy_of_labels(first[ok]) if ok.any() else 0.0
        res[name] = {
            "experts": E,
            "tokens": int(a["ids"].shape[0]),
            "load": load.tolist(),
            **load_entropy(load),
            "nmi_token": mutual_information(first[ok], a["ids"][ok]) / h_e if h_e > 0 else 0.0,
            "nmi_prev": mutual_information(first[ok], a["prev"][ok]) / h_e if h_e > 0 else 0.0,
            "top_tokens": top_counts(a["ids"], first, E, top),
            "top_prev": top_counts(a["prev"], first, E, top),
        }
    return res


def domain_analysis(assign: Dict[str, dict], doc_sizes: np.ndarray, domains_docs: np.ndarray) -> Dict[str, dict]:
    """Per layer: ``nmi_domain`` (:func:`domain_nmi`) and ``counts`` (D x E,
    :func:`expert_domain_counts`) of the routed tokens, each token in its document's domain."""
    D = int(domains_docs.max()) + 1 if domains_docs.size else 0
    res = {}
    for name, a in assign.items():
        if "pos" not in a:
            raise ValueError(f"layer {name}: no token positions were recorded; cannot relate experts to domains")
        dom = domains_docs[document_of(a["pos"], doc_sizes)]
        first = a["experts"][:, 0]
        res[name] = {"nmi_domain": domain_nmi(first, dom),
                     "counts": expert_domain_counts(first, dom, a["num_experts"], D).tolist()}
    return res


def _sym(dictionary, idx: int) -> str:
    s = dictionary[idx] if dictionary is not None and 0 <= idx < len(dictionary) else str(idx)
    return s.replace("|", "\\|")


def render(res: Dict[str, dict], dictionary=None, change: Optional[Dict[str, dict]] = None, title: str = "",
           max_experts: int = 16) -> str:
    lines = [f"# Routing analysis{': ' + title if title else ''}", ""]
    lines += ["## Load per layer", "",
              "| layer | experts | tokens | load entropy / log E | load max/mean | unused | NMI(expert; token) | "
              "NMI(expert; previous token) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in res.items():
        lines.append(f"| {name} | {r['experts']} | {r['tokens']:,} | {r['entropy_norm']:.3f} | {r['load_max']:.2f} | "
                     f"{int(r['unused'])} | {r['nmi_token']:.3f} | {r['nmi_prev']:.3f} |")
    lines += ["", "NMI = I(first expert; token) / H(first expert), plug-in estimate.", ""]
    if any("nmi_domain" in r for r in res.values()):
        lines += ["NMI(expert; domain), the same normalisation (each token in its document's domain): " +
                  ", ".join(f"{name} {r['nmi_domain']:.3f}" for name, r in res.items() if "nmi_domain" in r), ""]
    if change:
        lines += ["## Routing change between the two checkpoints", "",
                  "| layer | tokens | first expert changed | agreement after best relabelling |", "|---|---:|---:|---:|"]
        for name, c in change.items():
            lines.append(f"| {name} | {c['tokens']:,} | {100 * c['changed']:.1f}% | {100 * c['agreement_matched']:.1f}% |")
        lines.append("")
    for name, r in res.items():
        lines += [f"## Layer {name}: each expert's most frequent tokens (BASE paper Table 1 style)", "",
                  "| expert | share | most frequent tokens | most frequent previous tokens |", "|---:|---:|---|---|"]
        total = max(sum(r["load"]), 1)
        order = sorted(range(r["experts"]), key=lambda e: -r["load"][e])[:max_experts]
        for e in sorted(order):
            tt = ", ".join(f"`{_sym(dictionary, k)}` ({c})" for k, c in r["top_tokens"][e])
            tp = ", ".join(f"`{_sym(dictionary, k)}` ({c})" for k, c in r["top_prev"][e])
            lines.append(f"| {e} | {100 * r['load'][e] / total:.1f}% | {tt} | {tp} |")
        if r["experts"] > max_experts:
            lines.append(f"| ... | | ({r['experts'] - max_experts} less loaded experts not shown) | |")
        lines.append("")
    return "\n".join(lines)


def resolve_one(pattern: str) -> str:
    if os.path.exists(pattern):
        return pattern
    hits = sorted(glob.glob(pattern))
    if len(hits) != 1:
        raise SystemExit(f"--compare {pattern}: expected one matching checkpoint, found {len(hits)}: {hits[:5]}")
    return hits[0]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m moe_plugin.tools.analysis", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--data", required=True, help="the fairseq data-bin (dictionary and split)")
    p.add_argument("--split", default="valid")
    p.add_argument("--compare", default="", help="a second checkpoint (or glob) to measure the routing change")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--max-tokens", type=int, default=4096, help="tokens per batch")
    p.add_argument("--limit-tokens", type=int, default=0, help="stop after this many tokens (0 = whole split)")
    p.add_argument("--top", type=int, default=5, help="tokens listed per expert")
    p.add_argument("--max-experts", type=int, default=16, help="experts listed per layer (the most loaded)")
    p.add_argument("--domains", default="", help="the split's side file of document domains "
                   "(data-prep/synthetic.py writes <split>.domains): adds NMI(expert; domain) per layer")
    p.add_argument("--cpu", action="store_true")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    model, task = load_checkpoint(args.checkpoint, args.data, cpu=args.cpu)
    assign = collect_assignments(model, task, args.split, args.max_tokens, args.limit_tokens)
    res = analyse(assign, args.top)
    if args.domains:
        sizes = split_documents(task, args.split)
        for name, d in domain_analysis(assign, sizes, read_domains(args.domains, sizes.shape[0])).items():
            res[name].update(d)
    change = None
    if args.compare:
        other = resolve_one(args.compare)
        model_b, task_b = load_checkpoint(other, args.data, cpu=args.cpu)
        assign_b = collect_assignments(model_b, task_b, args.split, args.max_tokens, args.limit_tokens)
        change = {}
        for name, a in assign.items():
            if name not in assign_b:
                continue
            b = assign_b[name]
            if a["ids"].shape != b["ids"].shape or not np.array_equal(a["ids"], b["ids"]):
                raise SystemExit(f"layer {name}: the two checkpoints did not see the same tokens")
            change[name] = routing_change(a["experts"][:, 0], b["experts"][:, 0], a["num_experts"])
    np.savez_compressed(os.path.join(args.out, "assignments.npz"), **{
        f"{name}_{k}": v for name, a in assign.items() for k, v in
        (("ids_N", a["ids"]), ("prev_N", a["prev"]), ("experts_NK", a["experts"]), ("pos_N", a.get("pos")))
        if v is not None})
    title = f"{args.checkpoint} on {args.split}" + (f", compared with {args.compare}" if args.compare else "")
    md = render(res, task.source_dictionary, change, title, args.max_experts)
    with open(os.path.join(args.out, "analysis.md"), "w") as f:
        f.write(md)
    with open(os.path.join(args.out, "analysis.json"), "w") as f:
        json.dump({"checkpoint": args.checkpoint, "compare": args.compare, "split": args.split,
                   "layers": res, "change": change}, f, indent=1)
    print(md)
    print(f"[analysis] wrote {args.out}/analysis.md, analysis.json, assignments.npz")
    return 0


if __name__ == "__main__":
    sys.exit(main())

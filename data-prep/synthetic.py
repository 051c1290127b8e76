#!/usr/bin/env python3
"""A synthetic language-modelling corpus whose true perplexity is known exactly.

Source: a mixture of domains. Every document draws one domain d ~ pi, then its tokens from
that domain's order-2 Markov chain, which has sparse transitions (each context (a, b) has
``--successors`` possible next tokens with Dirichlet weights) over the domain's own
vocabulary: a core shared by every domain plus words drawn from a global pool, so domains
overlap partly. A document has at least ``--min-len`` tokens; after that it ends before
each further token with probability ``--end-prob`` (the ``</s>`` fairseq appends per line).

Writes train.txt, valid.txt, test.txt (one document per line, tokens ``w<id>``), the source
itself (source.npz) and truth.json: the exact per-token cross-entropy (nats, and bits) and
perplexity of the generating process on valid and test, counting every token and every
end-of-document, with the domain marginalised by exact likelihood:
    log P(doc) = logsumexp_d [ log pi_d + sum_t log P(x_t | x_{t-2}, x_{t-1}, d) + log P(end) ].
No model can beat it in expectation; it is the floor every demo row is compared with.
Deterministic from --seed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np


def build_source(seed: int, vocab_size: int, domains: int, domain_vocab: int, shared_vocab: int,
                 successors: int, alpha: float, end_prob: float, min_len: int, order: int = 2,
                 disjoint: bool = False) -> dict:
    """The source's tables (what source.npz holds), deterministic from ``seed``.

    vocab_DN (D, n): global id of each domain's local word; words ``0..shared_vocab-1`` are in
    every domain, the others are drawn from the pool ``shared_vocab..vocab_size-1`` (with
    ``disjoint``: a random partition of the pool, so every non-shared word names its domain).
    succ, probs (D, n+1, n+1, S): context (a, b) of local ids (START = n) -> the S possible next
    local ids and their probabilities. ``order=1``: the next word depends on b only (every a
    holds the same row), stored in the order-2 layout so sampling and likelihood are one code.
    The default (order 2, not disjoint) draws exactly what it always drew.
    """
    rng = np.random.default_rng(seed)
    if order not in (1, 2):
        raise ValueError(f"--order: {order} is not allowed; it must be 1 or 2")
    if not (0 if disjoint else 1) <= shared_vocab <= domain_vocab <= vocab_size:
        raise ValueError("need 0 < --shared-vocab <= --domain-vocab <= --vocab-size "
                         "(--shared-vocab 0 is allowed with --disjoint)")
    if successors > domain_vocab:
        raise ValueError("--successors must be <= --domain-vocab")
    n = domain_vocab
    need = shared_vocab + domains * (n - shared_vocab)
    if disjoint and vocab_size < need:
        raise ValueError(f"--vocab-size: {vocab_size} is not allowed with --disjoint; it must be >= "
                         f"--shared-vocab + --domains * (--domain-vocab - --shared-vocab) = {need}")
    vocab_DN = np.empty((domains, n), dtype=np.int64)  # local index -> global token id
    pool = np.arange(shared_vocab, vocab_size)
    if disjoint:
        pool = rng.permutation(pool)[: need - shared_vocab].reshape(domains, n - shared_vocab)
    for d in range(domains):
        own = pool[d] if disjoint else rng.choice(pool, size=n - shared_vocab, replace=False)
        vocab_DN[d] = np.concatenate([np.arange(shared_vocab), own])
    # contexts: local ids 0..n-1 plus START = n
    succ = np.empty((domains, n + 1, n + 1, successors), dtype=np.int64)
    probs = np.empty((domains, n + 1, n + 1, successors), dtype=np.float64)
    for d in range(domains):
        if order == 2:
            keys = rng.random((n + 1, n + 1, n))
            succ[d] = np.argpartition(keys, successors, axis=-1)[..., :successors]
            probs[d] = rng.dirichlet(np.full(successors, alpha), size=(n + 1, n + 1))
        else:  # one row per b, repeated over a
            keys = rng.random((n + 1, n))
            succ[d] = np.argpartition(keys, successors, axis=-1)[None, :, :successors]
            probs[d] = rng.dirichlet(np.full(successors, alpha), size=n + 1)[None]
    pi = rng.dirichlet(np.full(domains, 5.0))
    return dict(vocab_DN=vocab_DN, succ=succ, probs=probs, pi=pi,
                end_prob=np.float64(end_prob), min_len=np.int64(min_len))


def sample_docs(src: dict, num_tokens: int, rng: np.random.Generator, batch: int = 4096,
                return_domains: bool = False):
    """Documents (lists of global ids) until their tokens plus one end each reach num_tokens;
    with ``return_domains`` also the list of each document's domain (same order). The random
    stream does not depend on ``return_domains``."""
    succ, probs, vocab_DN = src["succ"], src["probs"], src["vocab_DN"]
    q, min_len = float(src["end_prob"]), int(src["min_len"])
    n = vocab_DN.shape[1]
    cum = np.cumsum(probs, axis=-1)
    docs, doms, total = [], [], 0
    while total < num_tokens:
        d = rng.choice(len(src["pi"]), size=batch, p=src["pi"])
        a = np.full(batch, n)
        b = np.full(batch, n)
        alive = np.ones(batch, dtype=bool)
        out = [[] for _ in range(batch)]
        t = 0
        while alive.any():
            t += 1
            if t > min_len:
                alive &= rng.random(batch) >= q
            idx = np.nonzero(alive)[0]
            if idx.size == 0:
                break
            u = rng.random(idx.size)
            k = (cum[d[idx], a[idx], b[idx]] < u[:, None]).sum(-1).clip(max=succ.shape[-1] - 1)
            nxt = succ[d[idx], a[idx], b[idx], k]
            for i, tok in zip(idx.tolist(), vocab_DN[d[idx], nxt].tolist()):
                out[i].append(tok)
            a[idx], b[idx] = b[idx], nxt
        for doc, dom in zip(out, d.tolist()):
            docs.append(doc)
            doms.append(dom)
            total += len(doc) + 1
            if total >= num_tokens:
                break
    return (docs, doms) if return_domains else docs


def doc_log_likelihood(src: dict, docs) -> np.ndarray:
    """Exact log P(doc) under the source, domain marginalised (vectorised over domains)."""
    succ, probs, vocab_DN, pi = src["succ"], src["probs"], src["vocab_DN"], src["pi"]
    q, min_len = float(src["end_prob"]), int(src["min_len"])
    D, n = vocab_DN.shape
    # global id -> local id per domain (-1 if the domain does not have the word)
    V = int(vocab_DN.max()) + 1
    local_DV = np.full((D, V), -1, dtype=np.int64)
    for d in range(D):
        local_DV[d, vocab_DN[d]] = np.arange(n)
    out = np.empty(len(docs))
    ar = np.arange(D)
    for i, doc in enumerate(docs):
        g = np.asarray(doc, dtype=np.int64)
        loc = local_DV[:, np.minimum(g, V - 1)] if g.size else np.zeros((D, 0), np.int64)
        if g.size and g.max() >= V:
            loc[:, g >= V] = -1
        ok = (loc >= 0).all(axis=1)
        lp = np.log(pi)
        lp = np.where(ok, lp, -np.inf)
        a = np.full(D, n)
        b = np.full(D, n)
        for t in range(g.size):
            c = np.where(ok, loc[:, t], 0)
            # P(c | a, b, d): the weight of c among the context's successors (0 if absent)
            p = (probs[ar, a, b] * (succ[ar, a, b] == c[:, None])).sum(-1)
            with np.errstate(divide="ignore"):
                lp = lp + np.where(ok, np.log(p), -np.inf)
            if t + 1 > min_len:
                lp = lp + np.log1p(-q)
            a, b = b, c
        lp = lp + (np.log(q) if g.size >= min_len else -np.inf)
        m = lp.max()
        out[i] = m + np.log(np.exp(lp - m).sum()) if np.isfinite(m) else -np.inf
    return out


def write_split(path: str, docs) -> None:
    with open(path, "w") as f:
        for doc in docs:
            f.write(" ".join(f"w{t}" for t in doc) + "\n")


def read_split(path: str):
    with open(path) as f:
        return [[int(w[1:]) for w in line.split()] for line in f]


def write_domains(path: str, domains) -> None:
    """``<split>.domains``: line i holds the domain (0..D-1) of the document on line i of
    ``<split>.txt`` (so also of the i-th ``</s>``-terminated sentence fairseq binarises)."""
    with open(path, "w") as f:
        f.write("".join(f"{d}\n" for d in domains))


def unigram_cross_entropy(train_docs, docs, vocab: int) -> float:
    """Per-token cross-entropy (nats) on ``docs`` of the training-unigram model: p(w) =
    (count_train(w) + 1) / (N_train + vocab + 1) over the source's ``vocab`` word ids and the
    end of document (counted once per document, like fairseq's ``</s>``), i.e. add-one
    smoothing so a word unseen in training has finite cost. Every token and end is scored."""
    counts = np.bincount(np.concatenate([np.asarray(d, dtype=np.int64) for d in train_docs] +
                                        [np.zeros(0, np.int64)]), minlength=vocab)[:vocab]
    n_end = len(train_docs)
    denom = counts.sum() + n_end + vocab + 1
    logp_V = np.log(counts + 1.0) - np.log(denom)
    toks = np.concatenate([np.asarray(d, dtype=np.int64) for d in docs] + [np.zeros(0, np.int64)])
    total = logp_V[toks].sum() + len(docs) * (np.log(n_end + 1.0) - np.log(denom))
    return float(-total / (toks.size + len(docs)))


def truth_of(src: dict, docs) -> dict:
    ll = doc_log_likelihood(src, docs)
    ntok = int(sum(len(d) + 1 for d in docs))
    ce = float(-ll.sum() / ntok)
    return {"tokens": ntok, "docs": len(docs), "cross_entropy_nats": ce,
            "cross_entropy_bits": ce / np.log(2), "perplexity": float(np.exp(ce))}


# Presets: flag values (any flag given on the command line wins). Sized for scripts/demo.py's
# budget (4 layers, d=128, FFN 512, 8 experts, 200 updates of 4096 tokens): README, "The
# synthetic corpus", holds the design and the measurements.
PRESETS = {
    "calibrated": dict(order=1, disjoint=True, domains=32, domain_vocab=64, shared_vocab=0,
                       vocab_size=2048, successors=4, alpha=0.5, end_prob=0.01, min_len=8,
                       train_tokens=1_000_000),
    "control": dict(order=1, disjoint=True, domains=2, domain_vocab=64, shared_vocab=0,
                    vocab_size=128, successors=4, alpha=0.5, end_prob=0.01, min_len=8,
                    train_tokens=1_000_000),
    # the domains share their words (each word in about 3.6 of them, with other successors in
    # each): the next word depends on (word, domain), the domain must be read off the context,
    # and no embedding bilinear form stores the table (docs/synthetic.md, design D)
    "context": dict(order=1, disjoint=False, domains=32, domain_vocab=64, shared_vocab=8,
                    vocab_size=512, successors=4, alpha=0.5, end_prob=0.01, min_len=8,
                    train_tokens=1_000_000),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="a named flag set (PRESETS in this file); flags given explicitly override it")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--train-tokens", type=int, default=2_000_000)
    p.add_argument("--valid-tokens", type=int, default=100_000)
    p.add_argument("--test-tokens", type=int, default=100_000)
    p.add_argument("--vocab-size", type=int, default=2000)
    p.add_argument("--domains", type=int, default=8)
    p.add_argument("--domain-vocab", type=int, default=160)
    p.add_argument("--shared-vocab", type=int, default=40)
    p.add_argument("--successors", type=int, default=4)
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration of transitions")
    p.add_argument("--end-prob", type=float, default=0.02)
    p.add_argument("--min-len", type=int, default=8)
    p.add_argument("--order", type=int, default=2, help="Markov order of each domain's chain: 1 or 2")
    p.add_argument("--disjoint", action="store_true",
                   help="partition the non-shared words among the domains (each names its domain)")
    pre, _ = p.parse_known_args(argv)
    if pre.preset is not None:
        p.set_defaults(**PRESETS[pre.preset])
    args = p.parse_args(argv)
    for name in ("train_tokens", "valid_tokens", "test_tokens", "domains", "successors", "min_len"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: {getattr(args, name)} is not allowed; it must be >= 1")
    if args.order not in (1, 2):
        p.error(f"--order: {args.order} is not allowed; it must be 1 or 2")
    if not 0.0 < args.end_prob < 1.0:
        p.error(f"--end-prob: {args.end_prob} is not allowed; it must be in (0, 1)")
    t0 = time.time()
    src = build_source(args.seed, args.vocab_size, args.domains, args.domain_vocab, args.shared_vocab,
                       args.successors, args.alpha, args.end_prob, args.min_len, args.order, args.disjoint)
    os.makedirs(args.out, exist_ok=True)
    np.savez_compressed(os.path.join(args.out, "source.npz"), **src)
    truth = {"config": {k: v for k, v in vars(args).items() if k != "out"}}
    train_docs = None
    for split, ntok, off in (("train", args.train_tokens, 1), ("valid", args.valid_tokens, 2),
                             ("test", args.test_tokens, 3)):
        docs, doms = sample_docs(src, ntok, np.random.default_rng([args.seed, off]), return_domains=True)
        write_split(os.path.join(args.out, f"{split}.txt"), docs)
        write_domains(os.path.join(args.out, f"{split}.domains"), doms)
        if split == "train":
            train_docs = docs
        else:
            truth[split] = truth_of(src, docs)
            ce_uni = unigram_cross_entropy(train_docs, docs, args.vocab_size)
            truth[split]["unigram_cross_entropy_nats"] = ce_uni
            truth[split]["unigram_perplexity"] = float(np.exp(ce_uni))
            # what a model can learn: (CE_unigram - CE_model) / learnable_nats is its learnable fraction
            truth[split]["learnable_nats"] = ce_uni - truth[split]["cross_entropy_nats"]
        print(f"[synthetic] {split}: {len(docs)} docs, {sum(len(d) + 1 for d in docs)} tokens "
              f"({time.time() - t0:.1f}s)", file=sys.stderr, flush=True)
    with open(os.path.join(args.out, "truth.json"), "w") as f:
        json.dump(truth, f, indent=2)
    print(f"[synthetic] true-source perplexity: valid {truth['valid']['perplexity']:.3f}, "
          f"test {truth['test']['perplexity']:.3f}; training unigram: test "
          f"{truth['test']['unigram_perplexity']:.1f} -> {args.out}/truth.json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

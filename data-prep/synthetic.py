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
                 successors: int, alpha: float, end_prob: float, min_len: int) -> dict:
    rng = np.random.default_rng(seed)
    if not 0 < shared_vocab <= domain_vocab <= vocab_size:
        raise ValueError("need 0 < --shared-vocab <= --domain-vocab <= --vocab-size")
    if successors > domain_vocab:
        raise ValueError("--successors must be <= --domain-vocab")
    n = domain_vocab
    vocab_DN = np.empty((domains, n), dtype=np.int64)  # local index -> global token id
    pool = np.arange(shared_vocab, vocab_size)
    for d in range(domains):
        own = rng.choice(pool, size=n - shared_vocab, replace=False)
        vocab_DN[d] = np.concatenate([np.arange(shared_vocab), own])
    # contexts: local ids 0..n-1 plus START = n
    succ = np.empty((domains, n + 1, n + 1, successors), dtype=np.int64)
    probs = np.empty((domains, n + 1, n + 1, successors), dtype=np.float64)
    for d in range(domains):
        keys = rng.random((n + 1, n + 1, n))
        succ[d] = np.argpartition(keys, successors, axis=-1)[..., :successors]
        probs[d] = rng.dirichlet(np.full(successors, alpha), size=(n + 1, n + 1))
    pi = rng.dirichlet(np.full(domains, 5.0))
    return dict(vocab_DN=vocab_DN, succ=succ, probs=probs, pi=pi,
                end_prob=np.float64(end_prob), min_len=np.int64(min_len))


def sample_docs(src: dict, num_tokens: int, rng: np.random.Generator, batch: int = 4096):
    """Documents (lists of global ids) until their tokens plus one end each reach num_tokens."""
    succ, probs, vocab_DN = src["succ"], src["probs"], src["vocab_DN"]
    q, min_len = float(src["end_prob"]), int(src["min_len"])
    n = vocab_DN.shape[1]
    cum = np.cumsum(probs, axis=-1)
    docs, total = [], 0
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
        for doc in out:
            docs.append(doc)
            total += len(doc) + 1
            if total >= num_tokens:
                break
    return docs


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


def truth_of(src: dict, docs) -> dict:
    ll = doc_log_likelihood(src, docs)
    ntok = int(sum(len(d) + 1 for d in docs))
    ce = float(-ll.sum() / ntok)
    return {"tokens": ntok, "docs": len(docs), "cross_entropy_nats": ce,
            "cross_entropy_bits": ce / np.log(2), "perplexity": float(np.exp(ce))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory")
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
    args = p.parse_args(argv)
    for name in ("train_tokens", "valid_tokens", "test_tokens", "domains", "successors", "min_len"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: {getattr(args, name)} is not allowed; it must be >= 1")
    if not 0.0 < args.end_prob < 1.0:
        p.error(f"--end-prob: {args.end_prob} is not allowed; it must be in (0, 1)")
    t0 = time.time()
    src = build_source(args.seed, args.vocab_size, args.domains, args.domain_vocab, args.shared_vocab,
                       args.successors, args.alpha, args.end_prob, args.min_len)
    os.makedirs(args.out, exist_ok=True)
    np.savez_compressed(os.path.join(args.out, "source.npz"), **src)
    truth = {"config": {k: v for k, v in vars(args).items() if k != "out"}}
    for split, ntok, off in (("train", args.train_tokens, 1), ("valid", args.valid_tokens, 2),
                             ("test", args.test_tokens, 3)):
        docs = sample_docs(src, ntok, np.random.default_rng([args.seed, off]))
        write_split(os.path.join(args.out, f"{split}.txt"), docs)
        if split != "train":
            truth[split] = truth_of(src, docs)
        print(f"[synthetic] {split}: {len(docs)} docs, {sum(len(d) + 1 for d in docs)} tokens "
              f"({time.time() - t0:.1f}s)", file=sys.stderr, flush=True)
    with open(os.path.join(args.out, "truth.json"), "w") as f:
        json.dump(truth, f, indent=2)
    print(f"[synthetic] true-source perplexity: valid {truth['valid']['perplexity']:.3f}, "
          f"test {truth['test']['perplexity']:.3f} -> {args.out}/truth.json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

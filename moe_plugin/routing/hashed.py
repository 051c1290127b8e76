"""Hash layers (Roller, Sukhbaatar, Szlam, Weston, NeurIPS 2021, arXiv 2106.04426).

Shape legend (see ``interface.py``): T tokens, D model dim, F expert hidden dim, E experts,
V vocabulary size, N hash functions (``--hash-multi``; N = 1 is the plain Hash layer).

A Hash layer replaces the FFN of a decoder layer by E expert FFNs and sends token t to
``FFN_{hash(.)}`` where the hash reads **token ids, not hidden states**: no router
parameters, no auxiliary loss, no capacity limit (nothing is dropped but padding), and the
expert output is used unweighted (combine weight 1.0). The decoder layer's own residual and
LayerNorm stay around it (``MoEDecoderLayer``: fc1 is the whole MoE FFN). The authors'
public code (ParlAI ``projects/params_vs_compute/hash_ladder/hash_ladder.py``,
``HashLayerFFN``) computes every expert as ``LN(x + FFN(x))`` with one LayerNorm shared by
the layer's experts, inside the layer's own residual and LayerNorm; the paper describes a
plain FFN swap, the default here; ``--hash-expert-norm`` computes the authors' form.

Hash functions (``--hash-type``; Sec. 4 of the paper). "table" means a persistent (V, N)
buffer ``table_VN`` of expert ids in the state_dict, so fairseq-eval-lm and incremental
decoding route exactly as training did, whatever the global RNG or the files at hand:

* ``random``    table[x_t]; the table is drawn from the seed (``--hash-seed`` when given,
                else fairseq's ``--seed``, see :func:`hash_seed_of`), the layer index and
                the hash index with a local ``torch.Generator``: the global RNG is neither
                read nor advanced.
* ``balanced``  table[x_t] packed from token counts so every expert gets about the same
                token mass: greedy LPT bin packing (tokens by decreasing count, each into
                the currently lightest expert; ties broken by the seeded generator). The
                counts are those of the binarised training split (``VocabInfo``
                ``counts_source="train split"``, counted by the fairseq shell at build time:
                ``moe_plugin/models/token_counts.py``), where ``<unk>`` and ``</s>`` have
                their true counts; dict.txt's (special symbols at count 1) only when the
                split is absent, with a warning. With train-split counts and ``</s>`` routed
                by its own entry (``--hash-balanced-eos table``, default), the expected load
                of the training split obeys the LPT bounds (Graham 1966/1969): max load <=
                mean + (1 - 1/E) * c_max <= mean + c_max (c_max the largest single-token
                count), and <= (4/3 - 1/(3E)) * OPT, OPT >= max(mean, c_max) the best
                packing's max load. ``--hash-balanced-eos previous`` routes ``</s>`` with the
                table entry of the previous token instead (its own entry packed with count
                0), which the bounds do not cover.
* ``bigram``    (x_t + p * x_{t-1}) mod E with p = ``--hash-bigram-prime``. The paper hashes
                the pair (x_{t-1}, x_t) without stating the function; this is the choice
                made here. For MultiHash, hash i uses the i-th prime >= p, preferring primes
                of a residue mod E not used yet (two primes with the same residue give the
                same partition).
* ``previous``  random table[x_{t-1}] (padding id before the first token of a sequence).
* ``position``  hash i: (t + i * floor(t / E)) mod E, t = 0-based position in the sequence
                (hash 0 is t mod E; hashes i > 0 partition positions differently).
* ``clustered`` / ``dispersed``: table[x_t] read from ``--hash-table FILE`` written by
                ``python -m moe_plugin.tools.hash_kmeans`` (k-means over the input embeddings of a
                trained model; clustered: one cluster per expert; dispersed: every cluster
                spread evenly over the experts). The file must exist when fairseq-train parses
                its command line; it is read at the first forward (or save) of a model no
                checkpoint has loaded, and a model built from a checkpoint never reads it:
                the table lives in the checkpoint.
* ``oracle``    random table[x_{t+1}], the *next* token: a cheating diagnostic the paper
                reports. Allowed in fairseq-train (training and validation). Refused for
                inference: fairseq-eval-lm, fairseq-generate/interactive and the hub
                interface call ``model.prepare_for_inference_``, whose
                ``make_generation_fast_`` reaches this router and raises; so does
                incremental decoding (no next token exists: ``causal_refusal``). The last
                position of a training block has no next token in the decoder input and is
                hashed as padding.

MultiHash (``--hash-multi N``, Sec. 4 "MultiHash layers"; exact equations unverified, this
is the choice made here). Expert e has W1_e (D x F), b1_e (F), W2_e (F x D), b2_e (D). Split
the hidden dim F into N contiguous segments F_1..F_N and the model dim D into D_1..D_N
(F and D divisible by N). With the N hash functions k_1(t)..k_N(t):

    h_t = act( concat_i [ x_t W1_{k_i(t)}[:, F_i] + b1_{k_i(t)}[F_i] ] )          (F,)
    y_t =      concat_i [ h_t W2_{k_i(t)}[:, D_i] + b2_{k_i(t)}[D_i] ]            (D,)

i.e. both weight matrices are split along their output dimension; hash i picks whose
segment computes output segment i, and the segments' outputs are concatenated (the second
layer sees the whole hidden vector). A token costs exactly one expert FFN; N = 1 is the
plain Hash layer. Computed by ``moe_plugin.experts.SegmentedExpertBank`` (2N grouped matmuls).

Placement (arch ``hash_lm``): the paper puts a **single** Hash layer in the decoder (the
authors' code: ``--hash-layer 7``, the 8th of the paper's 11 layers). hash_lm's default is
one MoE layer at 0-based index floor(7 L / 11) of L decoder layers (7 of 11, 1 of 2, 2 of 4,
3 of 6); ``--moe-layers`` / ``--moe-freq`` override it. With several Hash layers each layer
draws its own random table (the seed is mixed with the layer index). Expert FFNs are those of
``moe_plugin.experts.ExpertBank`` with the decoder's ``--activation-fn`` (ParlAI's
``HashLayerFFN`` always uses ReLU and Xavier-uniform weights).

Logged per layer (train and valid), besides the criterion's load max/mean: ``share_e{j}``,
the fraction of routed token slots that went to expert j (for E <= 16), and ``share_max`` /
``share_min`` for any E.
"""

import hashlib
import heapq
import math
import os
from dataclasses import dataclass, field
from typing import List, Optional

import torch

from moe_plugin.routing.interface import (
    DROPPED,
    Router,
    RouterOutput,
    TokenInfo,
    register_router,
    tokens_per_expert,
)

HASH_TYPES = ("random", "balanced", "bigram", "previous", "position", "clustered", "dispersed", "oracle")
#: hash types whose experts come from a (V, N) token table
TABLE_TYPES = ("random", "balanced", "previous", "clustered", "dispersed", "oracle")
FILE_TYPES = ("clustered", "dispersed")
#: per-expert shares are logged up to this many experts (max/min share always)
MAX_SHARES_LOGGED = 16


@dataclass
class HashOptions:
    hash_type: str = field(
        default="random",
        metadata={"help": "hash_lm: hash function: " + "|".join(HASH_TYPES) + " (see docs/hash_layers.md)"},
    )
    hash_seed: Optional[int] = field(
        default=None,
        metadata={"help": "hash_lm: seed of the random tables and of the balanced packing's tie-breaks; "
                          "unset (default): fairseq's --seed"},
    )
    hash_table: str = field(
        default="",
        # "path": a file the command line must name before training starts (checked at parse time)
        metadata={"help": "hash_lm: table file for --hash-type clustered|dispersed (moe_plugin.tools.hash_kmeans)",
                  "path": "write one with python -m moe_plugin.tools.hash_kmeans"},
    )
    hash_multi: int = field(
        default=1,
        metadata={"help": "hash_lm: MultiHash with N hash functions, each picking one of N segments of "
                          "the expert weights (1 = plain Hash layer)"},
    )
    hash_bigram_prime: int = field(
        default=1000003, metadata={"help": "hash_lm: prime p of the bigram hash (x_t + p * x_{t-1}) mod E"}
    )
    hash_expert_norm: bool = field(
        default=False,
        metadata={"help": "hash_lm: every expert computes LN(x + FFN(x)) with one LayerNorm shared by the "
                          "layer's experts, as the authors' ParlAI hash_ladder.py; off: the paper's plain "
                          "FFN swap"},
    )
    hash_balanced_eos: str = field(
        default="table",
        metadata={"help": "hash_lm balanced: route </s> by its own table entry, packed at its count like "
                          "any token ('table'), or by the previous token's entry ('previous')"},
    )


# ----------------------------------------------------------------------------------------
# Table builders (pure functions; tests call them directly)
# ----------------------------------------------------------------------------------------


#: the seed fairseq's --seed defaults to (used when neither --hash-seed nor moe_seed is set)
FAIRSEQ_DEFAULT_SEED = 1


def hash_seed_of(cfg) -> int:
    """``--hash-seed`` when given, else fairseq's ``--seed`` (``cfg.moe_seed``; 1, fairseq's
    default, outside fairseq)."""
    if getattr(cfg, "hash_seed", None) is not None:
        return int(cfg.hash_seed)
    if getattr(cfg, "moe_seed", None) is not None:
        return int(cfg.moe_seed)
    return FAIRSEQ_DEFAULT_SEED


def hash_generator(seed: int, layer_index: Optional[int], hash_index: int) -> torch.Generator:
    """A local generator for (seed, layer, hash function): never touches the global RNG.

    The three numbers are mixed with SHA-256 so nearby seeds/layers give unrelated streams.
    """
    key = f"moe_plugin.hash/{int(seed)}/{-1 if layer_index is None else int(layer_index)}/{int(hash_index)}"
    g = torch.Generator(device="cpu")
    g.manual_seed(int(hashlib.sha256(key.encode()).hexdigest()[:15], 16))
    return g


def random_table(num_tokens: int, num_experts: int, generator: torch.Generator) -> torch.Tensor:
    """(V,) expert ids drawn uniformly and independently."""
    return torch.randint(num_experts, (num_tokens,), generator=generator, dtype=torch.long)


def balanced_table(counts_V: torch.Tensor, num_experts: int, generator: torch.Generator) -> torch.Tensor:
    """(V,) expert ids by greedy LPT bin packing of the token counts.

    Tokens in decreasing count order (equal counts in a random order from ``generator``) each
    go to the expert with the least mass so far (equal masses: a random one). Expected load
    of expert e = sum of the counts assigned to it.
    """
    counts = counts_V.detach().to(torch.float64).clamp(min=0).cpu()
    V = counts.shape[0]
    perm = torch.randperm(V, generator=generator)
    order = perm[torch.argsort(counts[perm], descending=True, stable=True)].tolist()
    tiebreak = torch.rand(V + num_experts, generator=generator, dtype=torch.float64).tolist()
    heap = [(0.0, tiebreak[V + e], e) for e in range(num_experts)]
    heapq.heapify(heap)
    values = counts.tolist()
    table = [0] * V
    for j, v in enumerate(order):
        load, _, e = heapq.heappop(heap)
        table[v] = e
        heapq.heappush(heap, (load + values[v], tiebreak[j], e))
    return torch.tensor(table, dtype=torch.long)


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    r = int(math.isqrt(n))
    return all(n % k for k in range(3, r + 1, 2))


def bigram_primes(first: int, count: int, num_experts: int) -> List[int]:
    """``count`` primes >= ``first`` for the MultiHash bigram hashes (see the module doc).

    The first is the smallest prime >= ``first``; each later one is the next prime whose
    residue mod E is not used yet (the partition depends on p only through p mod E); when
    none is found within 10000 numbers, the smallest skipped prime is used instead.
    """
    out: List[int] = []
    used = set()
    skipped: List[int] = []
    n = first
    while len(out) < count:
        found = None
        for n in range(n, n + 10000):
            if _is_prime(n):
                if n % num_experts not in used:
                    found = n
                    break
                skipped.append(n)
        n += 1
        if found is None:
            found = skipped.pop(0)
        out.append(found)
        used.add(found % num_experts)
    return out


def read_table_file(path: str) -> torch.Tensor:
    """Read a table file: ``#`` comment lines, then V lines of N integers -> (V, N) LongTensor."""
    rows = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            try:
                rows.append([int(v) for v in line.split()])
            except ValueError:
                raise ValueError(f"--hash-table: {path!r} line {lineno}: {line[:60]!r} is not a row of integers") from None
    if not rows:
        raise ValueError(f"--hash-table: {path!r} holds no table rows")
    widths = {len(r) for r in rows}
    if len(widths) != 1:
        raise ValueError(f"--hash-table: {path!r} has rows of different widths {sorted(widths)}")
    return torch.tensor(rows, dtype=torch.long)


def write_table_file(path: str, table_VN: torch.Tensor, header: str = "") -> None:
    """Write a (V, N) table in the format :func:`read_table_file` reads (row v = token id v)."""
    table_VN = table_VN.reshape(table_VN.shape[0], -1)
    with open(path, "w") as f:
        for line in header.splitlines():
            f.write(f"# {line}\n")
        f.write(f"# rows: token id 0..{table_VN.shape[0] - 1} (fairseq dictionary order); columns: hash functions\n")
        for row in table_VN.tolist():
            f.write(" ".join(str(v) for v in row) + "\n")


# ----------------------------------------------------------------------------------------
# The router
# ----------------------------------------------------------------------------------------


def _default_moe_layers(args) -> Optional[str]:
    """hash_lm's default placement: one MoE layer at index floor(7 L / 11) (see module doc).

    Returns None (no default) when the user chose ``--moe-freq``, which ``--moe-layers``
    would otherwise override.
    """
    if getattr(args, "moe_freq", None) is not None:
        return None
    num_layers = getattr(args, "decoder_layers", None) or 6  # fairseq base_lm_architecture's default
    return str((7 * int(num_layers)) // 11)


@register_router(
    "hash",
    options=HashOptions,
    arch="hash_lm",
    arch_defaults={"moe_top_k": 1, "moe_layers": _default_moe_layers},
    # the demo compares every arch with MoE in every 2nd layer
    demo_args=["--moe-freq", "2", "--hash-type", "balanced"],
)
class HashRouter(Router):
    """Routes each token by a fixed hash of token ids (module docstring for every type).

    Output: ``expert_ids_TK`` (T, N) with N = ``--hash-multi`` (column i = hash function i),
    padding tokens ``DROPPED``; weights 1.0 (0 for padding); no aux losses. ``top_k`` stays
    1: a token costs one expert FFN whatever N is (MultiHash splits the expert into N parts).
    """

    needs_tokens = True

    @staticmethod
    def needs_token_counts(cfg) -> bool:
        """The balanced packing needs true token counts (the training split's, not dict.txt's)."""
        return cfg.hash_type == "balanced"

    def __init__(self, cfg, model_dim: int, *, vocab=None, layer_index=None):
        super().__init__(cfg, model_dim, vocab=vocab, layer_index=layer_index)
        self.validate(cfg)
        self.hash_type = cfg.hash_type
        self.num_hashes = int(cfg.hash_multi)
        self.seed = hash_seed_of(cfg)
        self.balanced_eos_previous = cfg.hash_balanced_eos == "previous" and cfg.hash_type == "balanced"
        self.table_path = cfg.hash_table or ""
        self.expert_norm = bool(getattr(cfg, "hash_expert_norm", False))
        # where the balanced packing's counts came from (VocabInfo.counts_source); None otherwise
        self.counts_source: Optional[str] = None
        # set by make_generation_fast_ (fairseq's "this model is for inference only" hook)
        self.inference_only = False
        E, N = self.num_experts, self.num_hashes
        self._table_pending = False
        if self.hash_type in TABLE_TYPES:
            if vocab is None:
                raise ValueError(f"--hash-type {self.hash_type}: needs the vocabulary (build the model through fairseq)")
            V = vocab.size
            self.eos = vocab.eos
            table_VN = torch.empty(V, N, dtype=torch.long)
            if self.hash_type in FILE_TYPES:
                # read at first use unless a checkpoint brings the table first (a model built
                # from a checkpoint never reads the file): materialize
                table_VN.zero_()
                self._table_pending = True
            elif self.hash_type == "balanced":
                if vocab.counts_V is None:
                    raise ValueError(
                        "--hash-type balanced: needs token counts (the training split's or dict.txt's), and "
                        "none were given; allowed without counts: random, bigram, previous, position"
                    )
                counts_V = vocab.counts_V[:V].clone()
                if self.balanced_eos_previous:
                    # </s> is routed by its previous token's entry, so its own entry carries no mass
                    counts_V[self.eos] = 0
                self.counts_source = vocab.counts_source
                for i in range(N):
                    g = hash_generator(self.seed, layer_index, i)
                    table_VN[:, i] = balanced_table(counts_V, E, g)
            else:  # random, previous, oracle
                for i in range(N):
                    table_VN[:, i] = random_table(V, E, hash_generator(self.seed, layer_index, i))
            self.register_buffer("table_VN", table_VN, persistent=True)
        if self.hash_type == "bigram":
            primes = bigram_primes(int(cfg.hash_bigram_prime), N, E)
            self.register_buffer("primes_N", torch.tensor(primes, dtype=torch.long), persistent=True)

    def _checked_file_table(self, table_VN: torch.Tensor, V: int) -> torch.Tensor:
        E, N = self.num_experts, self.num_hashes
        if table_VN.shape != (V, N):
            raise ValueError(
                f"--hash-table: {self.table_path!r} is a {tuple(table_VN.shape)} table; this model needs "
                f"({V}, {N}) (vocabulary size, --hash-multi)"
            )
        lo, hi = int(table_VN.min()), int(table_VN.max())
        if lo < 0 or hi >= E:
            raise ValueError(
                f"--hash-table: {self.table_path!r} holds expert ids {lo}..{hi}; allowed: 0..{E - 1} "
                f"(--moe-expert-count {E})"
            )
        return table_VN

    @staticmethod
    def validate(cfg) -> None:
        if cfg.hash_type not in HASH_TYPES:
            raise ValueError(f"--hash-type: {cfg.hash_type!r} is not allowed; allowed: {', '.join(HASH_TYPES)}")
        if cfg.moe_top_k != 1:
            raise ValueError(
                f"--moe-top-k: {cfg.moe_top_k} is not allowed for hash_lm (a hash picks one expert); allowed: 1"
            )
        if not isinstance(cfg.hash_multi, int) or cfg.hash_multi < 1:
            raise ValueError(f"--hash-multi: {cfg.hash_multi} is not allowed; allowed: an integer >= 1")
        if cfg.hash_multi > 1 and getattr(cfg, "moe_expert_parallel", False):
            raise ValueError(
                f"--hash-multi: {cfg.hash_multi} is not allowed with --moe-expert-parallel; allowed: 1"
            )
        if cfg.hash_type in FILE_TYPES and not cfg.hash_table:
            raise ValueError(
                f"--hash-table: a table file is required by --hash-type {cfg.hash_type}; "
                "write one with python -m moe_plugin.tools.hash_kmeans"
            )
        if cfg.hash_table and cfg.hash_type not in FILE_TYPES:
            raise ValueError(
                f"--hash-table: {cfg.hash_table!r} is only used by --hash-type clustered|dispersed, "
                f"not {cfg.hash_type}; allowed: leave it empty"
            )
        if not _is_prime(int(cfg.hash_bigram_prime)):
            raise ValueError(f"--hash-bigram-prime: {cfg.hash_bigram_prime} is not allowed; allowed: a prime number")
        if cfg.hash_balanced_eos not in ("previous", "table"):
            raise ValueError(
                f"--hash-balanced-eos: {cfg.hash_balanced_eos!r} is not allowed; allowed: previous, table"
            )

    # -- fairseq hooks -------------------------------------------------------------------

    def make_generation_fast_(self, **kwargs) -> None:
        """fairseq calls this (through ``prepare_for_inference_``) in eval-lm and generation."""
        self.inference_only = True
        if self.hash_type == "oracle":
            raise ValueError(self._oracle_refusal("this model is being prepared for inference "
                                                  "(fairseq-eval-lm / fairseq-generate / hub interface)"))

    @staticmethod
    def _oracle_refusal(where: str) -> str:
        return (
            f"--hash-type oracle: refused: {where}. The oracle hash routes each token by the NEXT "
            "token, which an evaluation or a generator may not see; it is a training diagnostic only "
            "(fairseq-train and its validation). Allowed for evaluation: "
            + ", ".join(t for t in HASH_TYPES if t != "oracle")
        )

    def causal_refusal(self) -> Optional[str]:
        if self.hash_type != "oracle":
            return None
        return self._oracle_refusal("generation (incremental decoding) has no next token")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if prefix + "table_VN" in state_dict:
            self._table_pending = False
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self.materialize()  # a saved router carries its table
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def materialize(self) -> None:
        """Read ``--hash-table`` into ``table_VN`` if no checkpoint has supplied the table yet."""
        if not self._table_pending:
            return
        if not os.path.exists(self.table_path):
            raise ValueError(
                f"--hash-table: {self.table_path!r} does not exist, and no checkpoint supplied the "
                f"{self.hash_type} table; write it with python -m moe_plugin.tools.hash_kmeans"
            )
        table_VN = self._checked_file_table(read_table_file(self.table_path), self.table_VN.shape[0])
        self.table_VN.copy_(table_VN.to(self.table_VN.device))
        self._table_pending = False

    # -- routing -------------------------------------------------------------------------

    def expert_ids(self, tokens: TokenInfo) -> torch.Tensor:
        """(T, N) expert of every token under every hash function (padding not masked)."""
        E, N = self.num_experts, self.num_hashes
        t = self.hash_type
        if t == "oracle":
            if self.inference_only:
                raise ValueError(self._oracle_refusal("the model was prepared for inference"))
            if tokens.next_ids_T is None:
                raise ValueError(self._oracle_refusal("incremental decoding has no next token"))
        self.materialize()
        if t in ("random", "balanced", "clustered", "dispersed"):
            key_T = tokens.ids_T
            if self.balanced_eos_previous:
                key_T = torch.where(tokens.ids_T == self.eos, tokens.prev_ids_T, tokens.ids_T)
            return self.table_VN[key_T]
        if t == "previous":
            return self.table_VN[tokens.prev_ids_T]
        if t == "oracle":
            return self.table_VN[tokens.next_ids_T]
        if t == "bigram":
            return (tokens.ids_T.unsqueeze(1) + self.primes_N.unsqueeze(0) * tokens.prev_ids_T.unsqueeze(1)) % E
        if t == "position":
            pos_T1 = tokens.positions_T.to(torch.long).unsqueeze(1)
            i_1N = torch.arange(N, device=pos_T1.device).unsqueeze(0)
            return (pos_T1 + i_1N * torch.div(pos_T1, E, rounding_mode="floor")) % E
        raise AssertionError(t)

    def forward(self, x_TD: torch.Tensor, *, tokens: Optional[TokenInfo] = None) -> RouterOutput:
        if tokens is None:
            raise RuntimeError("the hash router needs token ids (TokenInfo), and none reached it")
        T = x_TD.shape[0]
        if tokens.ids_T.shape[0] != T:
            raise RuntimeError(f"hash router: {T} hidden states but {tokens.ids_T.shape[0]} token ids")
        valid_T = ~tokens.pad_mask_T
        ids_TN = self.expert_ids(tokens).to(x_TD.device)
        ids_TN = ids_TN.masked_fill(~valid_T.unsqueeze(1), DROPPED)
        weights_TN = valid_T.unsqueeze(1).expand_as(ids_TN).to(x_TD.dtype)
        return RouterOutput(ids_TN, weights_TN, {}, self.routing_stats(ids_TN))

    def routing_stats(self, ids_TN: torch.Tensor) -> dict:
        E = self.num_experts
        counts_E = tokens_per_expert(ids_TN, E)
        share_E = counts_E.double() / counts_E.sum().clamp(min=1).double()
        stats = {
            "tokens_per_expert": counts_E,
            "dropped_frac": torch.zeros((), dtype=torch.float64),  # a hash drops nothing
            "entropy": torch.zeros((), dtype=torch.float64),  # one-hot routing: 0 nats
            "share_max": share_E.max(),
            "share_min": share_E.min(),
        }
        if E <= MAX_SHARES_LOGGED:
            for e in range(E):
                stats[f"share_e{e}"] = share_E[e]
        return stats

    # -- the experts this router needs (declared; moe_plugin.moe_layer.build_moe_layer reads them) --

    @property
    def expert_variant(self) -> str:
        """MultiHash (N > 1) needs the segmented bank (moe_plugin.experts.SegmentedExpertBank)."""
        return "segmented" if self.num_hashes > 1 else "ffn"

    @property
    def expert_segments(self) -> int:
        return self.num_hashes

"""BASE layers' balanced assignment (Lewis et al., ICML 2021, arXiv 2103.16716) in PyTorch.

Legend: T tokens, E experts, D model dim, K = 1 slot per token.

Two public pieces:

* :func:`balanced_assignment` ``(scores_TE) -> expert_T``: the linear assignment problem
  of BASE (paper section 3.1): maximise ``sum_t scores[t, expert_T[t]]`` subject to every
  expert receiving T/E tokens (``floor``/``ceil`` of it when E does not divide T). Pure
  PyTorch (CPU and GPU), no compiled extension; any T, E; non-finite scores allowed.
* the ``balanced`` router and the ``base_lm`` arch (BASE layers: ``moe_plugin/base_layer.py``).

The solver
----------
It works in the dual: a price ``p_e`` per expert; a token is *eps-happy* at expert e when
``a_te - p_e >= max_f (a_tf - p_f) - eps`` (a: the scores). A balanced assignment in which every token is
eps-happy is within ``sum_t slack_t <= T * eps`` of the optimum (linear-programming
duality; ``gap_bound`` below is that certificate, computed exactly). The solver keeps every
token eps-happy and removes the imbalance with three vectorised moves, all of which only
move tokens to experts where they stay eps-happy:

1. **push** (Bertsekas' auction from the experts' side, all experts at once): every
   overloaded expert raises its price just enough that its ``excess`` tokens with the
   smallest margin over their next-best expert leave for that expert;
2. **pull** (the reverse auction): an expert short of more than ``T / (8E)`` tokens lowers its
   price just enough to take the tokens that lose least by coming to it;
3. **shortest augmenting paths** when at most ``E / 4`` tokens are misplaced: Bellman-Ford
   over the E x E graph of cheapest single-token moves (reduced costs >= 0 by eps-happiness)
   from every overloaded expert; prices move by the distances (so the whole tree of
   shortest paths becomes tight) and one token moves along each tree path that ends in an
   underloaded expert (several disjoint paths per iteration). This finishes exactly and
   avoids the long random walk a single leftover token makes under pushes alone.

Prices start at the mean score of each expert (cheap and close for unstructured scores) or
at the caller's prices (``prices_E``: the BASE router passes the previous batch's prices,
which are close to the next batch's). ``eps = eps_rel * scale``, ``scale = min(max - min,
10 * std)`` of the scores (a version of libbase's ``(max - min) / 50`` that one outlier
cannot inflate). If the certified gap is above ``gap_tol`` (0.1 %) of the total (of
``T * scale / 100`` when the total is near 0), eps is divided by 4 and the solver goes on
from where it is, at most 4 times; so the result is certified within 0.1 % of the optimum
unless four refinements do not get there. At the defaults this safety net does not fire on
the benchmark (``scripts/bench_assignment.py``, docs/base_layers.md), where the result is
within 0.025 % of the optimum and above fairseq's libbase.

Which experts get the extra token when E does not divide T: the ``T mod E`` experts most
demanded at the starting prices (ties: lower index). This is a choice (the exact optimum
over both choices is a slightly larger problem); it keeps loads within one token. The
certificate above is for these loads: another choice of the experts that take the extra
tokens can score higher, and a warm start (other starting prices) may choose other ones.
"""

import contextlib
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from moe_plugin.losses import routing_entropy
from moe_plugin.routing.interface import DROPPED, Router, RouterOutput, TokenInfo, register_router

NEG_INF = float("-inf")
POS_INF = float("inf")


@dataclasses.dataclass
class AssignmentResult:
    """expert_T: expert of each token; prices_E: the final dual prices (warm start for the
    next call); rounds: push/pull rounds + shortest-path iterations; total: the assignment's
    total score; gap_bound: certified upper bound on (optimum - total), >= 0."""

    expert_T: torch.Tensor
    prices_E: torch.Tensor
    rounds: int
    total: float
    gap_bound: float


def balanced_capacities(num_tokens: int, num_experts: int, demand_E: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(E,) loads summing to T that differ by at most one; the ``T mod E`` larger ones go to
    the experts with the largest ``demand_E`` (ties: lower index), or to the first ones."""
    base, extra = divmod(num_tokens, num_experts)
    cap_E = torch.full((num_experts,), base, dtype=torch.long)
    if extra:
        if demand_E is None:
            cap_E[:extra] += 1
        else:
            order = torch.argsort(-demand_E.detach().cpu().to(torch.long), stable=True)
            cap_E[order[:extra]] += 1
    return cap_E


def sanitize_scores(scores_TE: torch.Tensor) -> torch.Tensor:
    """float32/64 copy where NaN and -inf count as the lowest finite score and +inf as the
    highest (all non-finite: zeros). fairseq's BaseLayer maps every non-finite score to the
    lowest one; a +inf affinity is better read as 'most preferred'."""
    a_TE = scores_TE.detach()
    a_TE = a_TE.double() if a_TE.dtype == torch.float64 else a_TE.float()
    if a_TE.numel() == 0:
        return a_TE.contiguous()
    lo, hi = torch.aminmax(a_TE)  # NaN propagates, so this also detects NaN
    if math.isfinite(float(lo)) and math.isfinite(float(hi)):
        return a_TE.contiguous()
    finite_TE = torch.isfinite(a_TE)
    if bool(finite_TE.any()):
        lo, hi = a_TE[finite_TE].min(), a_TE[finite_TE].max()
    else:
        lo = hi = a_TE.new_zeros(())
    a_TE = torch.where(torch.isnan(a_TE) | (a_TE == NEG_INF), lo, a_TE)
    return torch.where(a_TE == POS_INF, hi, a_TE).contiguous()


def _sample_std(a_TE: torch.Tensor, n: int = 65536) -> float:
    """Standard deviation of the scores, from a fixed spread-out sample of n of them."""
    flat = a_TE.reshape(-1)
    if flat.numel() <= n:
        return float(flat.std())
    for prime in (7919, 104729, 1299709):
        if math.gcd(prime, flat.numel()) == 1:
            break
    idx = (torch.arange(n, device=a_TE.device) * prime) % flat.numel()
    return float(flat[idx].std())


class _Auction:
    """The solver's state: scores a_TE, capacities cap_E, prices p_E, assignment own_T."""

    def __init__(self, a_TE, cap_E, p_E, own_T, pull_above: int, paths_below: int):
        self.a_TE, self.cap_E, self.p_E, self.own_T = a_TE, cap_E, p_E, own_T
        self.T, self.E = a_TE.shape
        self.device = a_TE.device
        self.pull_above = pull_above
        self.paths_below = paths_below
        self.rounds = 0
        self.last_move = None

    # -- eps-happiness ------------------------------------------------------------------
    def restore(self, idx_N: Optional[torch.Tensor], eps: float) -> None:
        """Tokens idx_N (None: all) that are not eps-happy go to their best expert."""
        a_NE = self.a_TE if idx_N is None else self.a_TE[idx_N]
        own_N = self.own_T if idx_N is None else self.own_T[idx_N]
        v_NE = a_NE - self.p_E
        v_own_N = v_NE.gather(1, own_N[:, None]).squeeze(1)
        bad_B = torch.nonzero(v_own_N < v_NE.amax(1) - eps).squeeze(1)
        if bad_B.numel():
            target_B = bad_B if idx_N is None else idx_N[bad_B]
            self.own_T[target_B] = v_NE[bad_B].argmax(1)

    # -- 1. push ------------------------------------------------------------------------
    def push(self, count_E, excess_E, over_E, eps: float) -> None:
        """Every overloaded expert sheds its ``excess`` lowest-margin tokens to their next
        best expert and raises its price by (the last one's margin + eps)."""
        O_N = torch.nonzero(over_E[self.own_T]).squeeze(1)  # tokens at overloaded experts
        e_N = self.own_T[O_N]
        v_NE = self.a_TE[O_N] - self.p_E
        v_own_N = v_NE.gather(1, e_N[:, None]).squeeze(1)
        v_NE.scatter_(1, e_N[:, None], NEG_INF)
        margin_N = v_own_N - v_NE.amax(1)
        # sort by (expert, margin): one sort on a composite float64 key
        lo, hi = torch.aminmax(margin_N)
        span = float(hi - lo) * 2.0 + 1.0
        order_N = torch.argsort(e_N.double() * span + margin_N.double(), stable=True)
        e_sorted_N = e_N[order_N]
        count_over_E = count_E * over_E
        start_E = torch.cumsum(count_over_E, 0) - count_over_E
        rank_N = torch.arange(O_N.numel(), device=self.device) - start_E[e_sorted_N]
        shed_N = excess_E[e_sorted_N]
        leave_L = order_N[rank_N < shed_N]
        last_X = order_N[rank_N == shed_N - 1]  # the last token to leave, one per expert
        raise_E = torch.zeros_like(self.p_E)
        raise_E[e_N[last_X]] = (margin_N[last_X] + eps).clamp(min=0)
        moved_L = O_N[leave_L]
        self.own_T[moved_L] = v_NE[leave_L].argmax(1)
        self.p_E = self.p_E + raise_E
        # only moved tokens can have become unhappy (their new expert may have raised too)
        raised_L = (raise_E > 0)[self.own_T[moved_L]]
        if bool(raised_L.any()):
            self.restore(moved_L[raised_L], eps)

    # -- 2. pull ------------------------------------------------------------------------
    def pull(self, excess_E, eps: float) -> None:
        """Every expert short of more than ``pull_above`` tokens takes that many tokens that
        lose least by moving to it, lowering its price by (the last one's loss + eps)."""
        F_F = torch.nonzero(excess_E < -self.pull_above).squeeze(1)
        need_F = -excess_E[F_F]
        own_T = self.own_T
        v_own_T = self.a_TE.gather(1, own_T[:, None]).squeeze(1) - self.p_E[own_T]
        loss_TF = v_own_T[:, None] - (self.a_TE.index_select(1, F_F) - self.p_E[F_F])
        loss_TF.masked_fill_(own_T[:, None] == F_F[None, :], POS_INF)
        kmax = min(int(need_F.max()), self.T)
        loss_FK, tok_FK = torch.topk(loss_TF.t(), kmax, dim=1, largest=False)
        take_FK = torch.arange(kmax, device=self.device)[None, :] < need_F[:, None]
        lower_F = (loss_FK.gather(1, (need_F - 1).clamp(max=kmax - 1)[:, None]).squeeze(1) + eps).clamp(min=0)
        moved_M = tok_FK[take_FK]
        self.p_E = self.p_E.index_add(0, F_F, -lower_F)
        self.own_T[moved_M] = F_F[:, None].expand(-1, kmax)[take_FK]
        # a token taken by two experts settles at its best one
        self.restore(moved_M.unique(), eps)

    # -- 3. shortest augmenting paths ------------------------------------------------------
    def _edge_rows(self, rows_E: Optional[torch.Tensor]) -> None:
        """Price-free cost of the cheapest single-token move e -> f,
        ``C0[e, f] = min over tokens t at e of (a[t, e] - a[t, f])``, and such a token, for the
        experts in ``rows_E`` (None: all)."""
        E = self.E
        if rows_E is None:
            idx_N, own_N, a_NE = None, self.own_T, self.a_TE
            self.C0_EE.fill_(POS_INF)
        else:
            idx_N = torch.nonzero(rows_E[self.own_T]).squeeze(1)
            own_N, a_NE = self.own_T[idx_N], self.a_TE[idx_N]
            self.C0_EE[rows_E] = POS_INF
        diff_NE = a_NE.gather(1, own_N[:, None]) - a_NE
        self.C0_EE.scatter_reduce_(0, own_N[:, None].expand(-1, E), diff_NE, "amin", include_self=True)
        hit_NE = diff_NE <= self.C0_EE.index_select(0, own_N)
        hit_NE.scatter_(1, own_N[:, None], False)
        n_H, f_H = torch.nonzero(hit_NE, as_tuple=True)
        self.edge_token_EE.view(-1)[own_N[n_H] * E + f_H] = n_H if idx_N is None else idx_N[n_H]

    def augment(self, max_iters: int) -> None:
        """Shortest augmenting paths until balanced (each iteration moves >= 1 token)."""
        E, dev = self.E, self.device
        self.C0_EE = torch.empty(E, E, dtype=self.a_TE.dtype, device=dev)
        self.edge_token_EE = torch.full((E, E), -1, dtype=torch.long, device=dev)
        self._edge_rows(None)
        arange_E = torch.arange(E, device=dev)
        for _ in range(max_iters):
            excess_E = torch.bincount(self.own_T, minlength=E) - self.cap_E
            if not bool((excess_E > 0).any()):
                return
            self.rounds += 1
            # reduced costs >= 0 because every token is eps-happy (clamped: the eps slack)
            cost_EE = (self.C0_EE - self.p_E[:, None] + self.p_E[None, :]).clamp(min=0)
            cost_EE.fill_diagonal_(POS_INF)
            dist_E = torch.where(excess_E > 0, torch.zeros_like(self.p_E), torch.full_like(self.p_E, POS_INF))
            parent_E = torch.full((E,), -1, dtype=torch.long, device=dev)
            for _ in range(E):  # Bellman-Ford from every overloaded expert at once
                best_E, via_E = (dist_E[:, None] + cost_EE).min(0)
                better_E = best_E < dist_E
                if not bool(better_E.any()):
                    break
                dist_E = torch.where(better_E, best_E, dist_E)
                parent_E = torch.where(better_E, via_E, parent_E)
            reached_E = torch.isfinite(dist_E)
            short_E = (excess_E < 0) & reached_E
            if not bool(short_E.any()):
                raise RuntimeError("balanced_assignment: no augmenting path (internal error)")
            dist_E = torch.where(reached_E, dist_E, dist_E[reached_E].max())
            # the tree becomes tight: reduced cost 0 on every tree edge, >= 0 elsewhere
            self.p_E = self.p_E - dist_E
            parent = parent_E.tolist()
            token = self.edge_token_EE[parent_E.clamp(min=0), arange_E].tolist()
            excess = excess_E.tolist()
            n_short = int(short_E.sum())
            sinks = torch.argsort(torch.where(short_E, dist_E, torch.full_like(dist_E, POS_INF)))[:n_short].tolist()
            used, moved_tok, moved_to, touched = set(), [], [], set()
            for sink in sinks:  # one path per underloaded expert, token-disjoint
                f, path = sink, []
                while parent[f] >= 0 and token[f] >= 0 and token[f] not in used:
                    path.append((token[f], f))
                    f = parent[f]
                if parent[f] >= 0 or excess[f] <= 0:
                    continue
                for t, g in path:
                    used.add(t)
                    moved_tok.append(t)
                    moved_to.append(g)
                    touched.update((g, parent[g]))
                excess[f] -= 1
                excess[sink] += 1
            if not moved_tok:
                raise RuntimeError("balanced_assignment: no disjoint augmenting path (internal error)")
            self.own_T[torch.tensor(moved_tok, device=dev)] = torch.tensor(moved_to, device=dev)
            rows_E = torch.zeros(E, dtype=torch.bool, device=dev)
            rows_E[torch.tensor(sorted(touched), device=dev)] = True
            self._edge_rows(rows_E)
        raise RuntimeError("balanced_assignment: augmenting paths did not finish (internal error)")

    # -- one eps phase ------------------------------------------------------------------
    def phase(self, eps: float, max_rounds: int) -> None:
        E = self.E
        self.restore(None, eps)
        budget = self.rounds + max_rounds
        while True:
            count_E = torch.bincount(self.own_T, minlength=E)
            excess_E = count_E - self.cap_E
            over_E = excess_E > 0
            misplaced = int(excess_E.clamp(min=0).sum())
            if misplaced == 0:
                return
            most_short = int((-excess_E).max())
            if self.rounds >= budget or (misplaced <= self.paths_below and most_short <= self.pull_above):
                self.augment(4 * misplaced + E)
                return
            self.rounds += 1
            if most_short > self.pull_above and self.last_move != "pull":
                self.last_move = "pull"
                self.pull(excess_E, eps)
            else:
                self.last_move = "push"
                self.push(count_E, excess_E, over_E, eps)


def solve_balanced(
    scores_TE: torch.Tensor,
    capacities_E: Optional[torch.Tensor] = None,
    *,
    prices_E: Optional[torch.Tensor] = None,
    eps_rel: float = 0.005,
    gap_tol: float = 1e-3,
) -> AssignmentResult:
    """Balanced assignment with its certificate; see the module docstring.

    capacities_E: tokens per expert (sum T); default :func:`balanced_capacities`.
    prices_E: starting prices (a warm start, e.g. the previous batch's ``prices_E``).
    eps_rel: eps relative to the score scale (smaller: closer to optimal, slower).
    gap_tol: refine (eps / 4, at most 4 times) while gap_bound > gap_tol * max(|total|,
        T * scale / 100).
    """
    if scores_TE.dim() != 2:
        raise ValueError(f"balanced_assignment: scores must be (T, E), got shape {tuple(scores_TE.shape)}")
    T, E = scores_TE.shape
    dev = scores_TE.device
    if E < 1:
        raise ValueError("balanced_assignment: scores must have at least one expert column")
    if not eps_rel > 0:
        raise ValueError(f"balanced_assignment: eps_rel {eps_rel} must be > 0")
    a_TE = sanitize_scores(scores_TE)
    if prices_E is None:
        p_E = a_TE.mean(0) if T > 0 else a_TE.new_zeros(E)
    else:
        p_E = prices_E.detach().to(device=dev, dtype=a_TE.dtype).clone()
    if T == 0 or E == 1:
        return AssignmentResult(torch.zeros(T, dtype=torch.long, device=dev), p_E, 0, float(a_TE.sum()), 0.0)
    own_T = torch.argmax(a_TE - p_E, 1)
    if capacities_E is None:
        capacities_E = balanced_capacities(T, E, torch.bincount(own_T, minlength=E))
    cap_E = capacities_E.to(device=dev, dtype=torch.long)
    if cap_E.shape != (E,) or int(cap_E.sum()) != T or bool((cap_E < 0).any()):
        raise ValueError(f"balanced_assignment: capacities must be (E,) non-negative and sum to T={T}")
    lo, hi = torch.aminmax(a_TE)
    scale = min(float(hi - lo), 10.0 * _sample_std(a_TE)) if T * E > 1 else 0.0
    if not scale > 0:  # all scores equal: every balanced assignment is optimal
        expert_T = torch.repeat_interleave(torch.arange(E, device=dev), cap_E, output_size=T)
        return AssignmentResult(expert_T, p_E, 0, float(a_TE.sum()), 0.0)
    k = max(T // E, 1)
    solver = _Auction(a_TE, cap_E, p_E, own_T, pull_above=max(2, k // 8), paths_below=max(2, E // 4))
    eps = eps_rel * scale
    max_rounds = 10 * E + 100
    for refinement in range(5):
        solver.phase(eps, max_rounds)
        v_TE = a_TE - solver.p_E
        best_T = v_TE.amax(1)
        got_T = v_TE.gather(1, solver.own_T[:, None]).squeeze(1)
        gap = float((best_T - got_T).sum())
        total = float(a_TE.gather(1, solver.own_T[:, None]).sum())
        if gap <= gap_tol * max(abs(total), T * scale * 1e-2) or refinement == 4:
            break
        eps /= 4.0
    return AssignmentResult(solver.own_T, solver.p_E, solver.rounds, total, max(gap, 0.0))


def balanced_assignment(scores_TE: torch.Tensor) -> torch.Tensor:
    """LongTensor (T,): the expert of each token, maximising the total score with every
    expert receiving T/E tokens (floor or ceil when E does not divide T). See
    :func:`solve_balanced` for the options and the certificate."""
    return solve_balanced(scores_TE).expert_T


def greedy_assignment(scores_TE: torch.Tensor) -> torch.Tensor:
    """BASE's inference rule: every token to its highest-scoring expert (no balancing, so no
    token's expert depends on other tokens; non-finite scores as in :func:`sanitize_scores`)."""
    return sanitize_scores(scores_TE).argmax(1)


# ---------------------------------------------------------------------------------------
# The router
# ---------------------------------------------------------------------------------------


@dataclass
class BalancedOptions:
    base_eval_balanced: bool = field(
        default=False,
        metadata={
            "help": "base_lm: balanced assignment also in evaluation (default: greedy top-1 as "
            "in the paper; balancing lets a token's expert depend on the other tokens of the "
            "batch, future ones included); generation (incremental decoding) refuses it"
        },
    )
    base_eps: float = field(
        default=0.005,
        metadata={"help": "base_lm: auction eps relative to the score scale (smaller = closer to optimal, slower)"},
    )
    base_cold_start: bool = field(
        default=False,
        metadata={"help": "base_lm: solve every batch from scratch instead of from the previous batch's prices"},
    )


@register_router(
    "balanced",
    options=BalancedOptions,
    arch="base_lm",
    # base_shuffle 1: fairseq's transformer_lm default (its dataclass); fairseq's
    # base_lm_architecture would set False when the flag is absent
    arch_defaults={"moe_freq": 0, "base_layers": 1, "base_shuffle": 1},
    demo_args=["--base-layers", "1"],
)
class BalancedRouter(Router):
    """BASE routing: expert centroids w_e (orthogonal init, gain 0.1, as fairseq's BaseLayer),
    affinities ``h_t . w_e`` computed without gradient, the balanced assignment in training
    (``self.training``) and greedy top-1 in evaluation (``--base-eval-balanced`` keeps the
    balanced one). The combine weight is ``alpha_t = sigmoid(h_t . w_e(t))`` (with gradient:
    the centroids learn only through it, as in the paper). No auxiliary loss. Padding
    tokens are not routed (fairseq routes them; here they take no expert's slot).

    Stats (logged as ``moe_l{i}_*``): ``affinity`` (total affinity of the assignment over the
    batch's tokens), ``auction_rounds`` (solver rounds; 0 in greedy mode), ``gap_bound``
    (the solver's certified bound on its distance to the optimum, relative to the total) and
    ``entropy`` (of softmax over the affinities: a diagnostic, BASE has no gate distribution).
    """

    def __init__(self, cfg, model_dim: int, **kwargs):
        super().__init__(cfg, model_dim, **kwargs)
        centroids_ED = torch.empty(self.num_experts, model_dim)
        torch.nn.init.orthogonal_(centroids_ED, gain=0.1)
        self.expert_centroids = torch.nn.Parameter(centroids_ED)
        self.eval_balanced = bool(cfg.base_eval_balanced)
        self.eps_rel = float(cfg.base_eps)
        self.warm_start = not cfg.base_cold_start
        # the previous training batch's prices: a warm start only, not part of the model
        self.register_buffer("last_prices_E", torch.zeros(0), persistent=False)
        self._replay_expert_T: Optional[torch.Tensor] = None

    def recompute_state(self, route: RouterOutput):
        """The assignment itself: a recompute must not solve again from the updated prices."""
        return route.expert_ids_TK[:, 0].detach()

    @contextlib.contextmanager
    def replaying(self, state):
        previous, self._replay_expert_T = self._replay_expert_T, state
        try:
            yield
        finally:
            self._replay_expert_T = previous

    def causal_refusal(self) -> Optional[str]:
        if not self.eval_balanced:
            return None
        return ("--base-eval-balanced: refused for generation (incremental decoding): the balanced assignment of "
                "evaluation is solved over the whole batch, later tokens included, so a step would route "
                "differently from the full forward; allowed: off (greedy: each token to its best expert)")

    @staticmethod
    def validate(cfg) -> None:
        if cfg.moe_top_k != 1:
            raise ValueError(f"--moe-top-k: {cfg.moe_top_k} is not allowed for BASE (balanced) routing; allowed: 1")
        if not 0 < cfg.base_eps < 1:
            raise ValueError(f"--base-eps: {cfg.base_eps} is not allowed; allowed: 0 < eps < 1")

    def forward(self, x_TD: torch.Tensor, *, tokens: Optional[TokenInfo] = None) -> RouterOutput:
        T, E = x_TD.shape[0], self.num_experts
        dev = x_TD.device
        valid_T = ~tokens.pad_mask_T if tokens is not None else torch.ones(T, dtype=torch.bool, device=dev)
        with torch.no_grad():
            scores_TE = x_TD.detach().float() @ self.expert_centroids.detach().float().t()
        expert_T = torch.full((T,), DROPPED, dtype=torch.long, device=dev)
        idx_V = torch.nonzero(valid_T).squeeze(1)
        stats = {}
        if self._replay_expert_T is not None:
            # a recompute under activation checkpointing: the recorded assignment, no new
            # solve, and the warm-start prices stay as the forward left them (one update a step)
            expert_T = self._replay_expert_T.to(dev)
        elif self.training or self.eval_balanced:  # eval_balanced: incremental decoding refuses it
            warm = self.training and self.warm_start and self.last_prices_E.numel() == E
            result = solve_balanced(
                scores_TE[idx_V], prices_E=self.last_prices_E if warm else None, eps_rel=self.eps_rel
            )
            expert_T[idx_V] = result.expert_T
            if self.training and self.warm_start:
                self.last_prices_E = result.prices_E.detach()
            stats["auction_rounds"] = torch.tensor(float(result.rounds), device=dev)
            stats["gap_bound"] = torch.tensor(result.gap_bound / max(abs(result.total), 1e-12), device=dev)
        else:
            expert_T[idx_V] = greedy_assignment(scores_TE[idx_V])
            stats["auction_rounds"] = torch.zeros((), device=dev)
        routed_T = expert_T >= 0
        safe_T = expert_T.clamp(min=0)
        # alpha = sigmoid(h . w_e): the gate with gradient to h and to the centroids. Read off
        # the (T, E) products rather than a gathered (T, D) copy of the centroids, which
        # backward would have to keep (the matmul keeps only h, which the layer keeps anyway)
        logit_T = (x_TD @ self.expert_centroids.to(x_TD.dtype).t()).gather(1, safe_T[:, None]).squeeze(1)
        alpha_T = torch.sigmoid(logit_T)
        weights_TK = (alpha_T * routed_T.to(alpha_T.dtype)).unsqueeze(1)
        stats["tokens_per_expert"] = torch.bincount(expert_T[routed_T], minlength=E)
        stats["affinity"] = scores_TE.gather(1, safe_T[:, None]).squeeze(1)[routed_T].sum()
        # a diagnostic only (BASE has no gate distribution): entropy of softmax(affinities)
        stats["entropy"] = routing_entropy(torch.softmax(scores_TE, dim=-1), valid_T)
        return RouterOutput(expert_ids_TK=expert_T.unsqueeze(1), weights_TK=weights_TK, stats=stats)

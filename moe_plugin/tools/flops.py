"""Active FLOPs per token of a built fairseq LM of this plugin, by component, and its parameters.

    python -m moe_plugin.tools.flops --arch switch_lm --decoder-embed-dim 128 --decoder-layers 4 \\
        --moe-expert-count 8 --vocab-size 1000 --tokens-per-sample 128

Every other flag is fairseq-train's (the model flags of ``--arch``); the tool's own are
``--vocab-size`` or ``--data`` (the dictionary), ``--seq-len``, ``--tokens-per-batch``,
``--attention`` and ``--baseline-arch`` (see ``--help``).

What is counted (:func:`flops_per_token`). One multiply-add = 2 FLOPs, forward only (a
training step's backward costs about twice its forward; not included). Counted: every
matrix product with a parameter matrix, i.e. one multiply-add per weight a token uses (bias
additions are not multiply-adds and are left out, as torch's FLOP counter leaves them out of
``addmm``), plus attention's two activation-activation products. Not counted: elementwise
work (activations, softmax, LayerNorm, residuals, dropout, the combine weighting of the
experts' outputs), lookups (the token and positional embeddings) and data movement (the MoE
dispatch: sorting, gathering, scattering), which do no multiply-adds. At the usual sizes these
are well under 1% of the total; LayerNorms are ignored on purpose.

Components (FLOPs per token, :data:`COMPONENTS`):

* ``attention_proj``: Q, K, V and output projections, ``2 * 4 * D * D`` per layer.
* ``attention_scores``: ``Q K^T`` and ``softmax(.) V`` at ``seq_len`` keys per query,
  ``2 * 2 * seq_len * D`` per layer. ``attention="full"`` (default) counts every query
  against all ``seq_len`` keys: what fairseq computes (the causal mask is applied to a full
  ``seq_len x seq_len`` product, so the masked half is computed too), what torch's FLOP
  counter reports, and the convention of Kaplan et al. (2020) and Hoffmann et al. (2022).
  ``attention="causal"`` counts the keys a query may see, ``(seq_len + 1) / 2`` on average
  over the positions of a block: the work a causal kernel that skips masked blocks does.
  Attention is the same in every arch of equal dims, so the choice moves every row alike.
* ``dense_ffn``: the dense layers' ``fc1``/``fc2``, ``2 * 2 * D * F`` per layer.
* ``experts``: the MoE layers' experts at the K used per token, ``K * 2 * 2 * D * F_e``:
  top-K softmax routers (switch 1, gshard 2, sam ``--moe-top-k``): K; hash: 1 (MultiHash:
  N segments of 1/N of an expert, one expert FFN in all); the top-K-schedule routers
  (hyper, smoe_dropout, smoe): in training the schedule's end value (the K after
  ``--moe-top-k-schedule-updates`` updates; ``--moe-top-k`` without a schedule), in
  evaluation ``--moe-eval-top-k`` (-1: all E; 0: that end value). K is the nominal number
  of slots: slots dropped by a finite capacity factor, GShard's sampled second expert and
  padding cost less (the figure is the budget, an upper bound).
* ``shared_experts``: the MoE layers' shared experts (``--moe-shared-experts N``, hidden
  ``--moe-shared-expert-ffn-dim`` F_s; DeepSeekMoE), always active: ``N * 2 * 2 * D * F_s``
  per MoE layer, in training and evaluation alike (padding rows are computed and masked,
  so the figure is exact per token). Not in ``experts_per_token`` (which counts routed
  experts). Fine-grained experts (E*m experts of hidden F/m, K*m active) are a plain
  configuration: ``experts`` is then ``K m * 4 D F / m``, the same as E experts of F at K;
  only ``router`` grows, to ``2 D E m``.
* ``router``: the gate matmul ``2 * D * E`` per MoE layer (hash: 0, a table lookup).
  HyperRouter generates its gate with a frozen hypernetwork ``Linear(Q, H) -> ReLU ->
  Linear(H, E (D + 1))`` once per forward, whatever the number of tokens: its
  ``2 (Q H + H E (D + 1))`` FLOPs are amortised over ``tokens_per_batch`` tokens (a
  parameter; the report keeps the unamortised figure in ``per_forward_flops``).
* ``base_block``: each BASE layer, an extra block with no attention: its centroid
  affinities ``2 * D * E``, the gate ``sigmoid(h . w_e)`` (``2 * D``: the method's cost, one
  dot product; the implementation reads it off the (T, E) products ``h W^T``, ``2 * D * E``,
  so that backward keeps no gathered copy of the centroids; that matmul, which torch's FLOP
  counter sees, is not what is counted here) and one expert's S sublayers
  ``S * 2 * 2 * D * F`` (every token goes to exactly one expert, in training and evaluation).
* ``embeddings``: fairseq's input projection ``project_in_dim`` (when the input dim differs
  from the embedding dim); the token lookup itself is free.
* ``output``: ``project_out_dim`` and the output projection to the vocabulary
  ``2 * D_out * V`` (the softmax over V is elementwise and not counted).

Parameters: ``total_params`` and ``active_params`` come from
:func:`moe_plugin.utils.param_counts` (everything outside the routed expert banks, shared
experts included, plus K/E of each layer's routed experts), read with the model in training
and in evaluation mode at the same K as above. Adaptive input / adaptive softmax and character embeddings are refused (ValueError).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import sys
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch.nn as nn

from moe_plugin.base_layer import BaseLayer
# the equal-compute rule (torch-free module, shared with the reproductions' report); re-exported
from moe_plugin.tools.stats import EQUAL_COMPUTE_TOLERANCE  # noqa: F401
from moe_plugin.experts import BaseSublayerBank, ExpertBank, SegmentedExpertBank
from moe_plugin.moe_layer import MoELayer
from moe_plugin.routing._topk import TopKSoftmaxRouter
from moe_plugin.routing.balanced import BalancedRouter
from moe_plugin.routing.hashed import HashRouter
from moe_plugin.routing.hyper import HyperRouter
from moe_plugin.utils import param_counts

#: the components of :attr:`FlopsReport.components`, in table order
COMPONENTS = (
    "attention_proj", "attention_scores", "dense_ffn", "experts", "shared_experts", "router", "base_block",
    "embeddings", "output",
)
#: the modes: training (the schedule's end K) and evaluation
MODES = ("train", "eval")
#: ``attention`` values (module docstring)
ATTENTION = ("full", "causal")


@dataclasses.dataclass
class FlopsReport:
    """Forward FLOPs per token and parameters of one built model (module docstring).

    components:   mode ("train" / "eval") -> component (:data:`COMPONENTS`) -> FLOPs per token
    active_flops_per_token: mode -> the sum of that mode's components
    total_params: every parameter (shared ones once)
    active_params: mode -> parameters a token uses (:func:`moe_plugin.utils.param_counts`)
    experts_per_token: mode -> K of every MoE and BASE layer, in depth order (expert FFNs a
                  token goes through; MultiHash: 1)
    per_forward_flops: FLOPs done once per forward whatever its tokens (HyperRouter's
                  hypernetworks), before they are amortised over ``tokens_per_batch``
    seq_len, attention, tokens_per_batch: what the counts assume
    label:        the arch (or any name) for tables
    notes:        what a reader of the figures should know (schedules, amortisation, bounds)
    """

    label: str
    seq_len: int
    attention: str
    tokens_per_batch: int
    components: Dict[str, Dict[str, float]]
    active_flops_per_token: Dict[str, float]
    total_params: int
    active_params: Dict[str, int]
    experts_per_token: Dict[str, List[float]]
    per_forward_flops: float = 0.0
    notes: List[str] = dataclasses.field(default_factory=list)

    HEADER = ("arch", "total params", "active params", "FLOPs/token train", "FLOPs/token eval",
              "experts", "router", "base block", "vs dense")

    @classmethod
    def header(cls) -> str:
        """The markdown header (and rule) of :meth:`format_row`'s table."""
        return "| " + " | ".join(cls.HEADER) + " |\n|" + "---|" * len(cls.HEADER)

    def format_row(self, baseline: Optional["FlopsReport"] = None, mode: str = "eval") -> str:
        """One markdown table row (columns: :meth:`header`): active params in ``mode``, both
        modes' FLOPs/token, ``mode``'s expert / router / BASE shares, and, given the dense
        baseline's report, the ratio of active FLOPs in ``mode`` and whether it is within 2%."""
        _check_mode(mode)
        parts = self.components[mode]
        vs = ""
        if baseline is not None:
            within, ratio = compare_active_flops(baseline, self, mode=mode)
            vs = f"{ratio:.3f}x" + ("" if within else f" (off by more than {EQUAL_COMPUTE_TOLERANCE:.0%})")
        cells = [
            self.label, human(self.total_params), human(self.active_params[mode]),
            human(self.active_flops_per_token["train"]), human(self.active_flops_per_token["eval"]),
            human(parts["experts"]), human(parts["router"]), human(parts["base_block"]), vs,
        ]
        return "| " + " | ".join(cells) + " |"

    def breakdown(self) -> str:
        """A plain-text table: every component's FLOPs/token in both modes and its share."""
        amortised = (f", per-forward work amortised over {self.tokens_per_batch} tokens"
                     if self.per_forward_flops else "")
        lines = [f"{self.label}: forward FLOPs per token at seq_len {self.seq_len} (attention {self.attention})"
                 f"{amortised}", f"{'component':<18}{'train':>14}{'eval':>14}{'eval %':>9}"]
        total = self.active_flops_per_token
        for c in COMPONENTS:
            # .get: a report saved before a component existed (flops.json of an older run) lacks it
            tr, ev = self.components["train"].get(c, 0.0), self.components["eval"].get(c, 0.0)
            share = 100.0 * ev / total["eval"] if total["eval"] else 0.0
            lines.append(f"{c:<18}{human(tr):>14}{human(ev):>14}{share:>8.1f}%")
        lines.append(f"{'total (active)':<18}{human(total['train']):>14}{human(total['eval']):>14}{100.0:>8.1f}%")
        lines.append(f"parameters: total {human(self.total_params)} ({self.total_params}), active train "
                     f"{human(self.active_params['train'])}, eval {human(self.active_params['eval'])}")
        if any(self.experts_per_token[m] for m in MODES):
            lines.append("experts per token (MoE / BASE layers in depth order): train "
                         f"{_ks(self.experts_per_token['train'])}, eval {_ks(self.experts_per_token['eval'])}")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


class FlopsMatch(NamedTuple):
    """:func:`compare_active_flops`'s answer (unpacks as ``within, ratio``)."""

    within: bool
    ratio: float


def compare_active_flops(baseline: FlopsReport, other: FlopsReport, *, mode: str = "eval",
                         tolerance: float = EQUAL_COMPUTE_TOLERANCE) -> FlopsMatch:
    """Whether ``other``'s active FLOPs per token in ``mode`` are within ``tolerance``
    (default 2%, the issue's rule) of the dense ``baseline``'s, and their ratio
    other / baseline. Both reports must be counted at the same ``seq_len``, ``attention``
    and ``tokens_per_batch`` (ValueError otherwise)."""
    _check_mode(mode)
    if not (0 <= tolerance < 1):
        raise ValueError(f"tolerance: {tolerance} is not allowed; allowed: 0 <= tolerance < 1")
    for name in ("seq_len", "attention", "tokens_per_batch"):
        a, b = getattr(baseline, name), getattr(other, name)
        if a != b:
            raise ValueError(f"{name}: {b!r} ({other.label}) is not allowed against the baseline's {a!r} "
                             f"({baseline.label}); allowed: the same {name} for both reports")
    base = baseline.active_flops_per_token[mode]
    if base <= 0:
        raise ValueError(f"baseline {baseline.label}: {base} active FLOPs per token; allowed: > 0")
    ratio = other.active_flops_per_token[mode] / base
    return FlopsMatch(abs(ratio - 1.0) <= tolerance, ratio)


# --- counting ---------------------------------------------------------------------------

def _linear(m: Optional[nn.Module]) -> float:
    """FLOPs per token of an ``nn.Linear`` (``2 * in * out``); 0 for None."""
    if m is None:
        return 0.0
    if not isinstance(m, nn.Linear):
        raise ValueError(f"flops: expected an nn.Linear, got {type(m).__name__}")
    return 2.0 * m.in_features * m.out_features


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode: {mode!r} is not allowed; allowed: {', '.join(MODES)}")


@contextlib.contextmanager
def _counting_state(model: nn.Module, mode: str) -> Iterator[None]:
    """The model in ``mode`` (``train()`` / ``eval()``) with every top-K-schedule router at the
    end of its schedule, restored afterwards (each module's training flag and each router's
    update count)."""
    flags = [(m, m.training) for m in model.modules()]
    routers = [(r, r._num_updates) for r in model.modules()
               if isinstance(r, TopKSoftmaxRouter) and r.schedule != "none"]
    try:
        model.train(mode == "train")
        for r, _ in routers:
            r.set_num_updates(max(int(r.schedule_updates), 0))
        yield
    finally:
        for r, n in routers:
            r.set_num_updates(n)
        for m, flag in flags:
            m.training = flag


def _attention(layer, seq_len: int, attention: str) -> Tuple[float, float]:
    attn = getattr(layer, "self_attn", None)
    if getattr(layer, "encoder_attn", None) is not None:
        raise ValueError("flops: a decoder layer with encoder attention is not a language model's; "
                         "allowed: decoder-only LMs (no_encoder_attn)")
    if attn is None:
        return 0.0, 0.0
    proj = sum(_linear(getattr(attn, n)) for n in ("q_proj", "k_proj", "v_proj", "out_proj"))
    keys = float(seq_len) if attention == "full" else (seq_len + 1) / 2.0
    scores = 2.0 * keys * (attn.q_proj.out_features + attn.v_proj.out_features)
    return proj, scores


def _router(router) -> Tuple[float, float]:
    """(FLOPs per token, FLOPs per forward) of one MoE layer's router."""
    if isinstance(router, HashRouter):
        return 0.0, 0.0
    if isinstance(router, HyperRouter):
        lin1, lin2 = router.hypernet[0], router.hypernet[2]
        per_forward = _linear(lin1) + _linear(lin2)
        return 2.0 * router.model_dim * router.num_experts, per_forward
    if isinstance(router, BalancedRouter):
        # affinities h . w_e for all E, then the gate sigmoid(h . w_e) of the chosen expert
        return 2.0 * router.model_dim * router.num_experts + 2.0 * router.model_dim, 0.0
    gate = getattr(router, "gate", None)
    if isinstance(gate, nn.Linear):
        return _linear(gate), 0.0
    raise ValueError(f"flops: router {getattr(router, 'name', type(router).__name__)!r} is not known to "
                     "moe_plugin/tools/flops.py; allowed: hash, hyper, balanced, or a router whose gate is an "
                     "nn.Linear named 'gate'")


def _expert_ffn(bank: ExpertBank) -> float:
    return 2.0 * 2.0 * bank.model_dim * bank.ffn_dim


def _shared_experts(moe: MoELayer) -> float:
    """FLOPs per token of an MoE layer's shared experts (every token uses all N of them)."""
    shared = getattr(moe, "shared_experts", None)
    return 0.0 if shared is None else shared.num_experts * _expert_ffn(shared)


def _moe_layer(moe: MoELayer) -> Tuple[float, float]:
    """(K, FLOPs per token of the experts) of an MoE layer in the current mode."""
    bank = moe.experts
    if isinstance(bank, SegmentedExpertBank):  # MultiHash: N segments of 1/N expert = one expert FFN
        return 1.0, _expert_ffn(bank)
    if isinstance(bank, BaseSublayerBank):  # BASE: one expert, its S sublayers
        return 1.0, sum(_expert_ffn(b) for b in bank.ffns)
    if isinstance(bank, ExpertBank):
        k = float(moe.router.top_k)
        return k, k * _expert_ffn(bank)
    raise ValueError(f"flops: expert bank {type(bank).__name__} is not known to moe_plugin/tools/flops.py")


def _count(model: nn.Module, seq_len: int, attention: str,
           tokens_per_batch: int) -> Tuple[Dict[str, float], List[float], float]:
    """(components, K per MoE / BASE layer, per-forward FLOPs) of ``model`` in its current mode."""
    decoder = getattr(model, "decoder", model)
    if getattr(decoder, "adaptive_softmax", None) is not None:
        raise ValueError("flops: --adaptive-softmax-cutoff is not counted; allowed: a plain output projection")
    embed = getattr(decoder, "embed_tokens", None)
    if embed is not None and not isinstance(embed, nn.Embedding):
        raise ValueError(f"flops: input embedding {type(embed).__name__} (--adaptive-input / "
                         "--character-embeddings) is not counted; allowed: a plain embedding")
    c = dict.fromkeys(COMPONENTS, 0.0)
    ks: List[float] = []
    per_forward = 0.0
    c["embeddings"] = _linear(getattr(decoder, "project_in_dim", None))
    c["output"] = _linear(getattr(decoder, "project_out_dim", None)) + _linear(decoder.output_projection)
    for layer in decoder.layers:
        if isinstance(layer, BaseLayer):
            k, experts = _moe_layer(layer.moe)
            router, _ = _router(layer.moe.router)
            c["base_block"] += experts + router
            ks.append(k)
            continue
        proj, scores = _attention(layer, seq_len, attention)
        c["attention_proj"] += proj
        c["attention_scores"] += scores
        fc1 = layer.fc1
        if isinstance(fc1, MoELayer):
            k, experts = _moe_layer(fc1)
            router, forward = _router(fc1.router)
            c["experts"] += experts
            c["shared_experts"] += _shared_experts(fc1)
            c["router"] += router + forward / tokens_per_batch
            per_forward += forward
            ks.append(k)
        else:
            c["dense_ffn"] += _linear(fc1) + _linear(layer.fc2)
    return c, ks, per_forward


def flops_per_token(model: nn.Module, seq_len: int, *, attention: str = "full",
                    tokens_per_batch: Optional[int] = None, label: Optional[str] = None) -> FlopsReport:
    """Forward FLOPs per token of ``model`` (a built moe_lm of any arch, dense_lm, base_lm, or
    fairseq's transformer_lm) by component, in training and in evaluation, and its total and
    active parameters (module docstring for what is counted and how).

    seq_len:          keys per query of the attention products (fairseq's --tokens-per-sample)
    attention:        "full" (default: what fairseq computes) or "causal" (module docstring)
    tokens_per_batch: the tokens of one forward over which per-forward work (HyperRouter's
                      hypernetwork) is amortised; default ``seq_len`` (one sequence per forward,
                      the largest share; fairseq-train's forward sees --max-tokens)
    label:            the report's name (default: the model's class name)

    The model's modes and routers are left as they were."""
    if attention not in ATTENTION:
        raise ValueError(f"attention: {attention!r} is not allowed; allowed: {', '.join(ATTENTION)}")
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len: {seq_len!r} is not allowed; allowed: an int >= 1")
    tokens_per_batch = seq_len if tokens_per_batch is None else tokens_per_batch
    if not isinstance(tokens_per_batch, int) or tokens_per_batch < 1:
        raise ValueError(f"tokens_per_batch: {tokens_per_batch!r} is not allowed; allowed: an int >= 1")
    notes: List[str] = []
    components, ks, active = {}, {}, {}
    total = 0
    per_forward = 0.0
    for mode in MODES:
        with _counting_state(model, mode):
            components[mode], ks[mode], per_forward = _count(model, seq_len, attention, tokens_per_batch)
            total, active[mode] = param_counts(model)
    seen = set()
    for r in model.modules():
        if isinstance(r, TopKSoftmaxRouter) and r.schedule != "none" and r.name not in seen:
            seen.add(r.name)
            S = int(r.schedule_updates)
            ns = range(0, S, max(1, S // 10000))  # every update, or 10000 evenly spaced ones
            mean = sum(r.train_top_k(n) for n in ns) / len(ns)
            notes.append(f"{r.name}: training K = the end of its {r.schedule} schedule, {r.train_top_k(S)} after "
                         f"{S} updates (mean over the schedule {mean:.3f})")
    if per_forward:
        notes.append(f"hyper: the frozen hypernetworks cost {human(per_forward)} FLOPs per forward, counted in "
                     f"'router' as {human(per_forward / tokens_per_batch)} per token at {tokens_per_batch} tokens "
                     "per forward")
    if any(isinstance(m, MoELayer) and not isinstance(m.experts, BaseSublayerBank)
           and math.isfinite(getattr(m.router, "capacity_factor", math.inf)) for m in model.modules()):
        notes.append("experts at the nominal K: slots dropped by the finite capacity factor (and GShard's "
                     "sampled second expert) cost less in training")
    return FlopsReport(
        label=label or type(model).__name__, seq_len=seq_len, attention=attention,
        tokens_per_batch=tokens_per_batch, components=components,
        active_flops_per_token={m: sum(components[m].values()) for m in MODES},
        total_params=int(total), active_params={m: int(active[m]) for m in MODES},
        experts_per_token=ks, per_forward_flops=per_forward, notes=notes,
    )


def human(x: float) -> str:
    """1234567 -> '1.23M' (k, M, G, T)."""
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def _ks(ks: Sequence[float]) -> str:
    return "[" + ", ".join(f"{k:g}" for k in ks) + "]"


# --- building a model from fairseq-train's flags ----------------------------------------

def build_model(model_args: Sequence[str], *, vocab_size: Optional[int] = None, data: Optional[str] = None):
    """(model, cfg) built as fairseq-train would from ``model_args`` (its flags: ``--arch`` and
    the model options), on the CPU, with the dictionary of ``data`` (a fairseq data directory
    holding dict.txt) or, without data, a dictionary of ``vocab_size`` symbols (fairseq's 4
    special symbols included). Without ``--max-update`` the top-K schedules get 1000 updates
    (their end K does not depend on it)."""
    from fairseq import options, tasks
    from fairseq.data import Dictionary
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.tasks.language_modeling import LanguageModelingTask

    import moe_plugin  # noqa: F401  (registers the archs)

    if (vocab_size is None) == (data is None):
        raise ValueError("--vocab-size / --data: give exactly one (the dictionary's size, or a data directory "
                         "holding dict.txt)")
    args = list(map(str, model_args))
    if "--max-update" not in args:
        args += ["--max-update", "1000"]
    parser = options.get_training_parser()
    ns = options.parse_args_and_arch(parser, [data or "", "--task", "language_modeling", "--cpu", *args])
    cfg = convert_namespace_to_omegaconf(ns)
    if data is not None:
        task = tasks.setup_task(cfg.task)
    else:
        dictionary = Dictionary()
        if vocab_size < len(dictionary) + 1:
            raise ValueError(f"--vocab-size: {vocab_size} is not allowed; allowed: >= {len(dictionary) + 1} "
                             f"(fairseq's {len(dictionary)} special symbols and at least one word)")
        for i in range(vocab_size - len(dictionary)):
            dictionary.add_symbol(f"w{i}")
        task = LanguageModelingTask(cfg.task, dictionary, dictionary)
    return task.build_model(cfg.model), cfg


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m moe_plugin.tools.flops",
        allow_abbrev=False,  # every other flag is fairseq's: none may be taken for an abbreviation of ours
        description="Active forward FLOPs per token and parameters of an arch, by component. Every flag not "
                    "listed here is fairseq-train's (--arch and the model flags).")
    parser.add_argument("--vocab-size", type=int, help="dictionary size, fairseq's 4 special symbols included")
    parser.add_argument("--data", help="a fairseq data directory: its dict.txt gives the vocabulary")
    parser.add_argument("--seq-len", type=int, help="keys per query (default: --tokens-per-sample)")
    parser.add_argument("--tokens-per-batch", type=int,
                        help="tokens per forward over which HyperRouter's hypernetwork is amortised "
                             "(default: --max-tokens, else --batch-size x seq-len, else seq-len)")
    parser.add_argument("--attention", choices=ATTENTION, default="full",
                        help="full: every query against seq-len keys (what fairseq computes); causal: the "
                             "(seq-len + 1) / 2 keys a query sees on average")
    parser.add_argument("--baseline-arch", default=None,
                        help="also build this arch (e.g. dense_lm) from the flags that are not MoE options and "
                             "print the ratio of active FLOPs (within 2%%: equal compute)")
    own, model_args = parser.parse_known_args(argv)
    model, cfg = build_model(model_args, vocab_size=own.vocab_size, data=own.data)
    seq_len = own.seq_len or int(cfg.task.tokens_per_sample)
    tpb = own.tokens_per_batch
    if tpb is None:
        max_tokens, batch = cfg.dataset.max_tokens, cfg.dataset.batch_size
        tpb = int(max_tokens) if max_tokens else (int(batch) * seq_len if batch else seq_len)
    report = flops_per_token(model, seq_len, attention=own.attention, tokens_per_batch=tpb, label=cfg.model._name)
    print(report.breakdown())
    if own.baseline_arch:
        base_model, _ = build_model(_baseline_args(model_args, own.baseline_arch),
                                    vocab_size=own.vocab_size, data=own.data)
        baseline = flops_per_token(base_model, seq_len, attention=own.attention, tokens_per_batch=tpb,
                                   label=own.baseline_arch)
        print()
        print(FlopsReport.header())
        print(baseline.format_row(baseline))
        for mode in MODES:
            print(report.format_row(baseline, mode=mode).replace(f"| {report.label} |", f"| {report.label} ({mode}) |", 1))
    return 0


def _baseline_args(model_args: Sequence[str], arch: str) -> List[str]:
    """``model_args`` with ``--arch`` replaced and every MoE / BASE option removed (with its
    value), for the dense baseline of the same dims."""
    from moe_plugin import config as moe_config

    moe_flags = {"--" + f.name.replace("_", "-") for f in dataclasses.fields(moe_config.moe_config_class())}
    moe_flags |= {"--base-layers", "--moe-base-layers", "--base-sublayers", "--base-shuffle"}
    out: List[str] = []
    args = list(map(str, model_args))
    i = 0
    while i < len(args):
        a = args[i]
        name = a.split("=", 1)[0]
        if name == "--arch":
            i += 1 if "=" in a else 2
            continue
        if name in moe_flags:
            # a flag's value follows unless it is given with '=' or the next item is another flag
            takes_value = "=" not in a and i + 1 < len(args) and not args[i + 1].startswith("--")
            i += 2 if takes_value else 1
            continue
        out.append(a)
        i += 1
    return ["--arch", arch, *out]


if __name__ == "__main__":
    sys.exit(main())

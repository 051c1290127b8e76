"""Seeds and spread: one figure over seeds (mean, spread, n), and verdicts on a paper's claims.

**Spread** = the sample standard deviation over seeds (``statistics.stdev``, divisor n - 1),
undefined for one seed. With the 2-3 seeds a reproduction affords, it is the usual "±" of a
results table and the more cautious of the two common choices: for n = 2 it is |x1 - x2| / sqrt 2,
larger than the min-max half range |x1 - x2| / 2, and for n = 3 it is never smaller than the half
range (equal when the three are evenly spaced). Nothing here assumes a distribution: no
t-quantile is applied (with n = 2 it would be 12.7 and make every claim inconclusive; the
spreads are read as what they are, the seeds' scatter).

**Comparison** (:func:`compare`): ``a`` *beats* ``b`` by ``margin`` = b.mean - a.mean when
lower is better (a.mean - b.mean when higher is better). The **combined spread** is the sum
``a.spread + b.spread``: the difference counts only when the two intervals mean ± spread do not
overlap. The sum is at least the spread of the difference of two independent means,
sqrt(sa^2 + sb^2), so a difference it calls a difference is one the scatter of the seeds does
not explain. Verdicts: ``holds`` when margin > combined spread; ``does not hold`` when
-margin > combined spread (b beats a); ``inconclusive`` otherwise: the difference is within
the spread (a tie included, even with zero spreads), or a side has fewer than 2 seeds (no
spread to judge by) or no value (not run). A claim that a is "at least as good as" b is judged
the same way: at 2-3 seeds an equality cannot be established, so within the spread it is
inconclusive, not confirmed.

**Claims** (:class:`Claim`, :class:`GapClaim`) name runs of an experiment's plan (the runner's
run names) and a metric of the report's runs (``moe_plugin.tools.report.load_run``: one dict
per run directory, i.e. per seed; a run of several seeds grouped by the report carries them
under ``"seeds"``). An experiment module declares its paper's claims as ``CLAIMS``: a list, or
a dict ``scale -> list`` where run names depend on the scale; the report ends the experiment's
table with :func:`verdicts`.

Metric names: ``"valid"`` (the last validation of the train log), ``"wps"`` (words/s, higher
is better), else the name of one of the run's evaluations (``"test"``, ``"k2"``, ...); the
value is in the run's unit (perplexity, or bits per character on character-level data).

This module is a tool (``moe_plugin.tools``), not a part of ``moe_plugin.experiments``: the
report (a tool) needs it at import time, and the experiments package imports every experiment,
each of which imports the report; experiments may import tools, so both read it from here.
"""

import math
import re
import statistics
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

HOLDS = "holds"
DOES_NOT_HOLD = "does not hold"
INCONCLUSIVE = "inconclusive"
BETTER = ("lower", "higher")
NO_RESULT = "(no result)"


# ----------------------------------------------------------------------------------------
# One figure over seeds
# ----------------------------------------------------------------------------------------


class Estimate(float):
    """The mean of one figure over seeds, as a float, carrying ``spread`` (sample std over the
    seeds; None for n = 1), ``n``, the per-seed ``values`` and their ``seeds``.

    Arithmetic and comparisons see the mean (their results are plain floats), so code written
    for single-run figures keeps working on seed means; ``format(e, spec)`` writes
    ``"<mean> ± <spread> (n=<n>)"`` with ``spec`` applied to both numbers (``"<mean> (n=1)"``
    for one seed).
    """

    values: Tuple[float, ...]
    seeds: Tuple[object, ...]
    n: int
    spread: Optional[float]

    def __new__(cls, values: Iterable[float], seeds: Optional[Iterable[object]] = None):
        vals = tuple(float(v) for v in values)
        if not vals:
            raise ValueError("Estimate: no values (use aggregate(), which returns None for none)")
        if any(math.isnan(v) for v in vals):
            raise ValueError(f"Estimate: NaN among the values {vals}")
        seeds = tuple(seeds) if seeds is not None else tuple(range(1, len(vals) + 1))
        if len(seeds) != len(vals):
            raise ValueError(f"Estimate: {len(vals)} values but {len(seeds)} seeds")
        self = super().__new__(cls, math.fsum(vals) / len(vals))
        self.values, self.seeds, self.n = vals, seeds, len(vals)
        self.spread = statistics.stdev(vals) if len(vals) >= 2 else None
        return self

    @property
    def mean(self) -> float:
        return float(self)

    def __format__(self, spec: str) -> str:
        mean = format(float(self), spec)
        if self.spread is None:
            return f"{mean} (n={self.n})"
        return f"{mean} ± {format(self.spread, spec)} (n={self.n})"

    def __str__(self) -> str:
        return format(self, ".4g")

    def __repr__(self) -> str:
        return f"Estimate({list(self.values)!r}, seeds={list(self.seeds)!r})"

    def __reduce__(self):
        return (Estimate, (self.values, self.seeds))


def aggregate(values: Iterable[Optional[float]], seeds: Optional[Iterable[object]] = None) -> Optional[Estimate]:
    """The :class:`Estimate` of the given per-seed values, None and NaN left out (with their
    seeds); None when no value is left."""
    values = list(values)
    seeds = list(seeds) if seeds is not None else list(range(1, len(values) + 1))
    if len(seeds) != len(values):
        raise ValueError(f"aggregate: {len(values)} values but {len(seeds)} seeds")
    keep = [(v, s) for v, s in zip(values, seeds) if v is not None and not math.isnan(float(v))]
    if not keep:
        return None
    return Estimate([v for v, _ in keep], [s for _, s in keep])


def format_estimate(e, spec: str = ".2f", none: str = "-") -> str:
    """``"12.34 ± 0.56 (n=3)"`` (``"12.34 (n=1)"``, ``none`` for no value; a plain number, a
    figure of a run without seeds, as ``format`` writes it)."""
    if e is None or (isinstance(e, float) and math.isnan(e)):
        return none
    return format(e, spec)


def _estimate(x) -> Optional[Estimate]:
    """An Estimate from an Estimate, a plain number (one seed), a sequence of per-seed numbers, or None."""
    if x is None or isinstance(x, Estimate):
        return x
    if isinstance(x, (int, float)):
        return aggregate([x])
    return aggregate(x)


def _check_better(better: str) -> None:
    if better not in BETTER:
        raise ValueError(f"better={better!r}; allowed: {', '.join(map(repr, BETTER))}")


def margin(a, b, better: str = "lower") -> Optional[float]:
    """How much ``a`` beats ``b`` (positive: a is better), in the metric's unit; None without values."""
    _check_better(better)
    a, b = _estimate(a), _estimate(b)
    if a is None or b is None:
        return None
    return float(b) - float(a) if better == "lower" else float(a) - float(b)


def combined_spread(a, b) -> Optional[float]:
    """``a.spread + b.spread`` (None when either side has fewer than 2 seeds)."""
    a, b = _estimate(a), _estimate(b)
    if a is None or b is None or a.spread is None or b.spread is None:
        return None
    return a.spread + b.spread


def compare(a, b, better: str = "lower") -> str:
    """Does ``a`` beat ``b``? ``"holds"`` when it does by more than the combined spread,
    ``"does not hold"`` when ``b`` beats ``a`` by more than it, ``"inconclusive"`` otherwise
    (within the spread, a tie, fewer than 2 seeds on a side, or no value). ``a`` and ``b``:
    :class:`Estimate` (or per-seed numbers, a plain number = one seed, None = not run);
    ``better``: ``"lower"`` (perplexity, BPC) or ``"higher"`` (words/s)."""
    m = margin(a, b, better)
    s = combined_spread(a, b)
    if m is None or s is None:
        return INCONCLUSIVE
    if m > s:
        return HOLDS
    if -m > s:
        return DOES_NOT_HOLD
    return INCONCLUSIVE


def _why(a: Optional[Estimate], b: Optional[Estimate], m: Optional[float], s: Optional[float], unit: str,
         spec: str) -> str:
    """Why a comparison got its verdict: the difference (positive: the first side is better)
    against the combined spread, or what is missing."""
    if a is None or b is None:
        return "no result on a side (not run, or not finished)"
    if s is None:
        return "fewer than 2 seeds: no spread to judge by"
    where = "beyond" if abs(m) > s else "within"
    return f"difference {format(m, '+' + spec)}{(' ' + unit) if unit else ''} {where} the combined spread " \
           f"{format(s, spec)}"


# ----------------------------------------------------------------------------------------
# Values of the report's runs
# ----------------------------------------------------------------------------------------


def _seed_runs(runs: Sequence[dict], name: str) -> List[dict]:
    """The per-seed runs of run ``name`` (a grouped run's ``seeds``, or the run itself)."""
    out = []
    for r in runs:
        if r.get("name") == name:
            out.extend(r.get("seeds") or [r])
    return out


#: metrics read off the last logged training interval (the MoE layers' mean): metric -> logged key
END_OF_TRAINING = {"load_max_end": "load_max", "dropped_end": "dropped"}
END_OF_TRAINING_LABELS = {"load_max_end": "load max/mean at the end of training",
                          "dropped_end": "% of token slots dropped at the end of training"}


def end_of_training(run: dict, key: str) -> Optional[float]:
    """The mean over MoE layers of ``moe_l<i>_<key>`` in the run's last logged training
    interval (else its overall ``moe_<key>``); None without a train log record."""
    inner = (run.get("log") or {}).get("train_inner") or []
    if not inner:
        return None
    last = inner[-1]
    per_layer = [float(v) for k, v in last.items() if re.fullmatch(rf"moe_l\d+_{key}", k)]
    if per_layer:
        return math.fsum(per_layer) / len(per_layer)
    v = last.get(f"moe_{key}")
    return None if v is None else float(v)


def value_of(run: dict, metric: str) -> Optional[float]:
    """Metric ``metric`` of one run (one seed) in its unit; None when it has none."""
    if run.get("status") == "not run":
        return None
    bpc = run.get("unit") == "bpc"
    if metric == "valid":
        v = (run.get("valid_final") or {}).get("nll_loss" if bpc else "ppl")
    elif metric == "wps":
        v = run.get("wps")
    elif metric in END_OF_TRAINING:
        v = end_of_training(run, END_OF_TRAINING[metric])
    else:
        ev = (run.get("evals") or {}).get(metric)
        v = None if ev is None else ev.get("loss_bits" if bpc else "ppl")
    return None if v is None else float(v)


def bits_of(run: dict, metric: str) -> Optional[float]:
    """The loss in bits per token of metric ``metric`` (``"valid"`` or an evaluation) of one run."""
    if run.get("status") == "not run":
        return None
    if metric == "valid":
        v = (run.get("valid_final") or {}).get("nll_loss")
    else:
        ev = (run.get("evals") or {}).get(metric)
        v = None if ev is None else ev.get("loss_bits")
    return None if v is None else float(v)


def _seed_of(run: dict, i: int):
    s = run.get("seed")
    return s if s is not None else i + 1


def seed_values(runs: Sequence[dict], name: str, metric: str, of=value_of) -> Dict[object, float]:
    """seed -> value of ``metric`` for run ``name`` (seeds without a value left out)."""
    out = {}
    for i, r in enumerate(_seed_runs(runs, name)):
        v = of(r, metric)
        if v is not None and not math.isnan(v):
            out[_seed_of(r, i)] = v
    return out


def estimate_of(runs: Sequence[dict], name: str, metric: str) -> Optional[Estimate]:
    """Run ``name``'s ``metric`` over its seeds (None when no seed has it)."""
    vals = seed_values(runs, name, metric)
    return aggregate(list(vals.values()), list(vals)) if vals else None


def _label(runs: Sequence[dict], name: str) -> str:
    rs = _seed_runs(runs, name)
    return (rs[0].get("label") or name) if rs else name


def _metric_label(runs: Sequence[dict], names: Iterable[str], metric: str) -> str:
    rs = [r for n in names for r in _seed_runs(runs, n)]
    unit = "BPC" if rs and rs[0].get("unit") == "bpc" else "ppl"
    if metric == "wps":
        return "words/s"
    if metric in END_OF_TRAINING:
        return END_OF_TRAINING_LABELS[metric]
    if metric == "valid":
        return f"valid {unit}"
    ev_label = next(((r.get("evals") or {}).get(metric, {}).get("label") for r in rs
                     if (r.get("evals") or {}).get(metric)), None) or metric
    return f"{ev_label} {unit}" if ev_label == "test" else f"test {unit} at {ev_label}"


def _combine(verdicts: Sequence[str]) -> str:
    """A claim over several comparisons (each must hold): refuted by one, confirmed by all."""
    if any(v == DOES_NOT_HOLD for v in verdicts):
        return DOES_NOT_HOLD
    if verdicts and all(v == HOLDS for v in verdicts):
        return HOLDS
    return INCONCLUSIVE


# ----------------------------------------------------------------------------------------
# Claims
# ----------------------------------------------------------------------------------------


#: a row within 2% of the baseline's active FLOPs per token is at equal compute (the demo, the
#: reproductions' report and moe_plugin.tools.flops all apply this one figure)
EQUAL_COMPUTE_TOLERANCE = 0.02


@dataclass(frozen=True)
class Claim:
    """"Each run of ``a`` beats each run of ``b`` on ``metric``" (``paired``: a[i] beats b[i]
    only, for claims made at matching settings, e.g. at each expert count).

    The claim holds when every comparison holds (:func:`compare`), does not hold when one of
    them does not hold, and is inconclusive otherwise.
    """

    text: str
    a: Tuple[str, ...]
    b: Tuple[str, ...]
    metric: str = "test"
    better: str = "lower"
    paired: bool = False
    spec: str = ".3f"
    #: (meta key, value) pairs every named run must carry (run.json "meta") for the claim to be
    #: judged, e.g. (("equal_compute", True),): a claim made at equal compute is not judged on runs
    #: that are not (inconclusive, saying which run and why) instead of silently compared
    requires: Tuple[Tuple[str, object], ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "requires", tuple(tuple(kv) for kv in self.requires))
        for side in ("a", "b"):
            v = getattr(self, side)
            v = (v,) if isinstance(v, str) else tuple(v)
            if not v:
                raise ValueError(f"Claim {self.text!r}: {side} names no run")
            object.__setattr__(self, side, v)
        _check_better(self.better)
        if self.paired and len(self.a) != len(self.b):
            raise ValueError(f"Claim {self.text!r}: paired=True needs as many runs in a ({len(self.a)}) as in b "
                             f"({len(self.b)})")

    @property
    def runs(self) -> Tuple[str, ...]:
        """Every run the claim names."""
        return tuple(dict.fromkeys(self.a + self.b))

    def pairs(self) -> List[Tuple[str, str]]:
        return list(zip(self.a, self.b)) if self.paired else [(x, y) for x in self.a for y in self.b]

    def judge(self, runs: Sequence[dict]) -> Tuple[str, List[str]]:
        """(verdict, one line per comparison with its numbers) on the report's runs."""
        unit = "" if self.metric == "wps" or self.metric in END_OF_TRAINING else ("BPC" if any(r.get("unit") == "bpc" for n in self.runs
                                                               for r in _seed_runs(runs, n)) else "ppl")
        # every seed of every named run (one line per run and value)
        off = list(dict.fromkeys(f"{_label(runs, n)} has {k}={r.get('meta', {}).get(k)!r}" for n in self.runs
                                 for k, want in self.requires for r in _seed_runs(runs, n)
                                 if r.get("meta", {}).get(k) != want))
        if off:
            need = ", ".join(f"{k}={want!r}" for k, want in self.requires)
            return INCONCLUSIVE, [f"not judged: the claim needs {need}; " + "; ".join(off)]
        out, lines = [], []
        for x, y in self.pairs():
            ea, eb = estimate_of(runs, x, self.metric), estimate_of(runs, y, self.metric)
            v = compare(ea, eb, self.better)
            m, s = margin(ea, eb, self.better), combined_spread(ea, eb)
            out.append(v)
            lines.append(f"{_label(runs, x)} {format_estimate(ea, self.spec, NO_RESULT)} vs {_label(runs, y)} "
                         f"{format_estimate(eb, self.spec, NO_RESULT)}: {_why(ea, eb, m, s, unit, self.spec)}: {v}")
        return _combine(out), lines

    def describe(self, runs: Sequence[dict]) -> str:
        return f"{_metric_label(runs, self.runs, self.metric)}, {self.better} is better"


@dataclass(frozen=True)
class GapClaim:
    """"``a``'s lead over ``b`` is larger at evaluation ``small`` than at ``large``" (HyperRouter
    over SMoE-Dropout, most at small evaluation K).

    The lead of one seed at an evaluation is ``bits(b) - bits(a)``, in bits per token (the
    eval's base-2 loss: BPC on character data, log2 of the perplexity on words, so leads at
    different K compare as ratios of perplexities, not as differences that grow with the
    perplexity itself); a and b are matched by seed (seeds where both have both evaluations).
    The claim is :func:`compare` of the leads at ``small`` and at ``large``, higher is better.
    """

    text: str
    a: str
    b: str
    small: str
    large: str
    spec: str = ".4f"

    @property
    def runs(self) -> Tuple[str, ...]:
        return (self.a, self.b)

    def leads(self, runs: Sequence[dict], metric: str) -> Optional[Estimate]:
        va = seed_values(runs, self.a, metric, of=bits_of)
        vb = seed_values(runs, self.b, metric, of=bits_of)
        seeds = [s for s in va if s in vb]
        return aggregate([vb[s] - va[s] for s in seeds], seeds) if seeds else None

    def judge(self, runs: Sequence[dict]) -> Tuple[str, List[str]]:
        ls, ll = self.leads(runs, self.small), self.leads(runs, self.large)
        v = compare(ls, ll, "higher")
        m, s = margin(ls, ll, "higher"), combined_spread(ls, ll)
        la, lb = _label(runs, self.a), _label(runs, self.b)
        return v, [f"lead of {la} over {lb} (bits/token) at {self.small}: {format_estimate(ls, self.spec, NO_RESULT)}, at "
                   f"{self.large}: {format_estimate(ll, self.spec, NO_RESULT)}: {_why(ls, ll, m, s, 'bits', self.spec)}: {v}"]

    def describe(self, runs: Sequence[dict]) -> str:
        return f"test loss in bits per token at {self.small} vs {self.large}, paired by seed"


def claims_for(claims, scale: Optional[str]) -> list:
    """An experiment's ``CLAIMS`` at ``scale``: the list itself, or ``CLAIMS[scale]`` of a dict by scale."""
    if isinstance(claims, dict):
        return list(claims.get(scale, ()))
    return list(claims or ())


def verdicts(claims: Sequence[Union[Claim, GapClaim]], runs: Sequence[dict], title: str = "") -> List[str]:
    """Markdown lines: each claim with its verdict and the numbers it rests on, then a count."""
    if not claims:
        return []
    lines = [f"### {title or 'The paper’s claims at this scale'}", "",
             "Mean ± sample standard deviation over seeds (n = seeds with a result). A claim holds when the "
             "difference exceeds the combined spread (the sum of the two standard deviations: the intervals do not "
             "overlap), does not hold when the opposite difference does, and is inconclusive otherwise (within the "
             "spread, or fewer than 2 seeds). Difference: how much the first run beats the second (positive: it is "
             "better). A claim over several comparisons holds when all hold and does not hold when one does not.", ""]
    count = {HOLDS: 0, DOES_NOT_HOLD: 0, INCONCLUSIVE: 0}
    for c in claims:
        v, detail = c.judge(runs)
        count[v] += 1
        lines.append(f"- **{v}**: {c.text} ({c.describe(runs)})")
        lines += [f"  - {d}" for d in detail]
    lines += ["", f"Verdicts: {count[HOLDS]} hold, {count[DOES_NOT_HOLD]} do not hold, {count[INCONCLUSIVE]} "
                  "inconclusive.", ""]
    return lines

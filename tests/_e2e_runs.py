"""fairseq-train and fairseq-eval-lm runs on the tiny corpus, shared by test_e2e.py and
test_eval_invariance.py: every arch (the dense baseline and every registered MoE arch) is
trained once per test session (cached in pytest's base temp directory), and every
fairseq-eval-lm command runs once per session (cached in memory)."""

import ast
import re
from pathlib import Path
from typing import Dict, List, Tuple

from moe_plugin.models.archs import ARCHS, DEMO_ARGS, DENSE_ARCH
from tests.conftest import TINY_MODEL, TINY_TRAIN, USER_DIR, run_cli

#: the dense baseline first, then every registered MoE arch (a new router joins by registering)
ALL_ARCHS = [DENSE_ARCH] + sorted(ARCHS)
UPDATES = 6
EXPERTS = 4

#: fairseq-eval-lm flags of the runs here (per-token scores printed; --max-tokens varies)
EVAL_ARGS = ["--tokens-per-sample", "32", "--context-window", "0", "--output-word-probs"]

# --- per-arch evaluation entries ---------------------------------------------------------
#: arch -> fairseq-eval-lm ``--model-overrides`` that :func:`eval_lm` adds for a checkpoint of
#: that arch (merged with any --model-overrides the caller passes; the caller's keys win).
#: expert_choice_lm: each expert takes its top-C tokens of the whole batch, so evaluation sees
#: future tokens, and fairseq-eval-lm refuses it unless told so (moe_plugin/routing/expert_choice.py,
#: docs/expert_choice.md)
EVAL_OVERRIDES = {"expert_choice_lm": {"expert_choice_allow_future_leak": True}}
#: arch -> why its evaluation depends on the batch by design (test_eval_invariance.py checks the
#: other archs: BATCH_INVARIANT_ARCHS; tests/test_expert_choice.py checks that this one does depend)
BATCH_DEPENDENT_EVAL = {
    "expert_choice_lm": "each expert takes its top-C tokens of the batch: a token's experts depend on the "
                        "other tokens of its batch",
}
#: the archs whose fairseq-eval-lm scores must not depend on the batch (test_eval_invariance.py)
BATCH_INVARIANT_ARCHS = [a for a in ALL_ARCHS if a not in BATCH_DEPENDENT_EVAL]

_EVAL_CACHE: Dict[tuple, str] = {}


def train_args(arch: str) -> List[str]:
    """fairseq-train flags of ``arch`` after the common tiny ones (none for the dense baseline)."""
    if arch not in ARCHS:
        return []
    return ["--moe-expert-count", str(EXPERTS), *[a.format(max_update=UPDATES) for a in DEMO_ARGS.get(arch, [])]]


def trained(tmp_path_factory, data_bin: str, arch: str) -> Tuple[str, str]:
    """(checkpoint_last.pt, train log) of ``arch`` trained for UPDATES updates, once per session."""
    save = tmp_path_factory.getbasetemp() / "e2e_runs" / arch
    ckpt, log = save / "checkpoint_last.pt", save / "train.log"
    if not (ckpt.exists() and log.exists()):
        proc = run_cli("train", data_bin, *TINY_TRAIN, *TINY_MODEL, "--arch", arch, "--criterion",
                       "moe_cross_entropy", "--max-update", UPDATES, "--save-dir", save, *train_args(arch))
        log.write_text(proc.stdout + proc.stderr)
    return str(ckpt), log.read_text()


def arch_of(ckpt: str):
    """The arch a checkpoint of :func:`trained` was trained with (its directory's name), or None."""
    path = Path(ckpt)
    return path.parent.name if path.parent.parent.name == "e2e_runs" else None


def with_arch_overrides(ckpt: str, args) -> List[str]:
    """``args`` with the :data:`EVAL_OVERRIDES` of ``ckpt``'s arch merged into ``--model-overrides``."""
    args = [str(a) for a in args]
    extra = EVAL_OVERRIDES.get(arch_of(ckpt))
    if not extra:
        return args
    if "--model-overrides" in args:
        i = args.index("--model-overrides")
        merged = {**extra, **ast.literal_eval(args[i + 1])}
        return args[:i] + ["--model-overrides", repr(merged)] + args[i + 2:]
    return args + ["--model-overrides", repr(dict(extra))]


def eval_lm(data_bin: str, ckpt: str, *args) -> str:
    """Output of ``fairseq-eval-lm DATA --path CKPT --cpu ARGS`` (run once per session), with
    the per-arch ``--model-overrides`` of :data:`EVAL_OVERRIDES`."""
    args = with_arch_overrides(ckpt, args)
    key = (data_bin, ckpt) + tuple(map(str, args))
    if key not in _EVAL_CACHE:
        proc = run_cli("eval_lm", data_bin, "--user-dir", USER_DIR, "--path", ckpt, "--cpu", "--num-workers", "0",
                       *args)
        _EVAL_CACHE[key] = proc.stdout + proc.stderr
    return _EVAL_CACHE[key]


_WORD_PROBS = re.compile(r"fairseq_cli\.eval_lm[:|\s]+(\d+) (.*)$")
_SCORE = re.compile(r" \[(-?[\d.]+(?:e-?\d+)?|-?inf|nan)\]")


def word_scores(output: str) -> Dict[int, List[float]]:
    """Per-token log-probabilities (natural log) by sample id, from ``--output-word-probs``
    lines ``<id> word [score]\\tword [score]...`` (6 decimals)."""
    out = {}
    for line in output.splitlines():
        m = _WORD_PROBS.search(line)
        if m:
            out[int(m.group(1))] = [float(s) for s in _SCORE.findall(m.group(2))]
    assert out, f"no --output-word-probs lines in eval-lm output:\n{output[-3000:]}"
    return out

"""Generation computes what the full forward computes, for every registered router in every mode
that may run causally; the modes that read later tokens refuse generation with one line.

Per case (an arch and its flags, built through fairseq's own parser, in evaluation mode):
* the decoder's log-probabilities under incremental decoding (fairseq's ``incremental_state``,
  one token a step) equal one full forward over the same text to 1e-5;
* fairseq's generator (the hub interface's ``generate``: the task's ``inference_step`` with
  prefix tokens, as fairseq-interactive runs it) gives positional scores equal to the full
  forward's log-probabilities of its hypothesis to 1e-4 (they are differences of float32
  running sums).
"""

import pytest
import torch

from fairseq.hub_utils import GeneratorHubInterface

from moe_plugin.models.archs import ARCHS
from moe_plugin.routing.hashed import write_table_file
from tests.test_fairseq_integration import build

#: modes beyond each arch's defaults: the hash types (those reading the previous token and the
#: position included), MultiHash, the expert norm, GShard's second-expert policies, the
#: evaluation K of the K-scheduled routers, the loss-free score functions, shared experts
MODES = [
    ("hash_lm", ["--hash-type", t]) for t in ("random", "balanced", "bigram", "previous", "position",
                                              "clustered", "dispersed")
] + [
    ("hash_lm", ["--hash-multi", "2"]),
    ("hash_lm", ["--hash-expert-norm"]),
    ("hash_lm", ["--hash-type", "balanced", "--hash-balanced-eos", "previous"]),
    ("gshard_lm", ["--moe-second-expert-policy", "sampling"]),
    ("gshard_lm", ["--moe-second-expert-policy", "random"]),
    ("hyper_lm", ["--moe-eval-top-k", "2"]),
    ("smoe_dropout_lm", ["--moe-eval-top-k", "3"]),
    ("loss_free_lm", ["--moe-router-score-function", "softmax", "--moe-top-k", "2"]),
    ("base_lm", ["--base-layers", "2", "--base-sublayers", "2"]),
    ("sam_lm", ["--sam-groups", "4"]),
    ("switch_lm", ["--moe-shared-experts", "1"]),
    ("expert_choice_lm", ["--moe-eval-capacity-factor", "inf"]),
]
#: the modes that read later tokens: generation refuses each, its message starting with the option
FUTURE_READING = [
    ("switch_lm", ["--moe-eval-capacity-factor", "1.5"], "--moe-eval-capacity-factor"),
    ("gshard_lm", ["--moe-eval-capacity-factor", "2"], "--moe-eval-capacity-factor"),
    ("base_lm", ["--base-eval-balanced"], "--base-eval-balanced"),
    ("hash_lm", ["--hash-type", "oracle"], "--hash-type oracle"),
    ("expert_choice_lm", [], "expert_choice: refused"),
]


def _label(case):
    return case[0] + "".join(" " + a.lstrip("-") for a in case[1])


#: every registered arch at its defaults (a new router joins by registering), but those whose
#: defaults read later tokens
CASES = [(a, []) for a in sorted(ARCHS) if (a, []) not in [(f[0], f[1]) for f in FUTURE_READING]] + MODES


def make(tmp_path, data_bin, arch, extra):
    extra = list(extra)
    if "clustered" in extra or "dispersed" in extra:
        from fairseq.data import Dictionary

        V = len(Dictionary.load(f"{data_bin}/dict.txt"))
        path = tmp_path / "table.txt"
        write_table_file(str(path), torch.randint(0, 8, (V, 1), generator=torch.Generator().manual_seed(3)))
        extra += ["--hash-table", str(path)]
    cfg, task, model, _ = build(data_bin, arch, *extra)
    for _, layer in model.moe_layers():
        bias = getattr(layer.router, "expert_bias_E", None)
        if bias is not None:  # loss-free: a trained bias (zero at initialisation would test nothing)
            bias.copy_(torch.randn(bias.shape, generator=torch.Generator().manual_seed(5)) * 0.3)
    return cfg, task, model.eval()


def full_lprobs(model, tokens_BT):
    with torch.no_grad():
        out = model(tokens_BT)
        return model.get_normalized_probs(out, log_probs=True)


@pytest.mark.parametrize("arch,extra", CASES, ids=[_label(c) for c in CASES])
def test_incremental_decoding_and_generator_equal_the_full_forward(tiny_corpus, tmp_path, arch, extra):
    _, data_bin = tiny_corpus
    cfg, task, model = make(tmp_path, data_bin, arch, extra)
    d = task.dictionary
    g = torch.Generator().manual_seed(0)
    src = torch.randint(d.nspecial, len(d), (2, 11), generator=g)
    src[:, 0] = d.eos()  # a sequence after a line break, as the generator's first input
    full = full_lprobs(model, src)
    with torch.no_grad():
        state, steps = {}, []
        for t in range(src.shape[1]):
            out = model.decoder(src[:, : t + 1], incremental_state=state)
            steps.append(model.get_normalized_probs(out, log_probs=True))
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)

    hub = GeneratorHubInterface(cfg, task, [model])
    prompts = [src[0, 1:4], src[1, 1:6]]  # two prompts of different lengths in one batch
    hypos = hub.generate([torch.cat([p, p.new_tensor([d.eos()])]) for p in prompts], beam=1, max_len_b=6,
                         min_len=4)
    for prompt, hyps in zip(prompts, hypos):
        tokens = hyps[0]["tokens"]
        assert torch.equal(tokens[: len(prompt)], prompt) and len(tokens) > len(prompt)
        inp = torch.cat([tokens.new_tensor([d.eos()]), tokens[:-1]]).unsqueeze(0)
        want = full_lprobs(model, inp)[0].gather(1, tokens.unsqueeze(1)).squeeze(1)
        torch.testing.assert_close(hyps[0]["positional_scores"], want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch,extra,option", FUTURE_READING, ids=[_label(c) for c in FUTURE_READING])
def test_modes_reading_later_tokens_refuse_generation(tiny_corpus, tmp_path, arch, extra, option):
    _, data_bin = tiny_corpus
    cfg, task, model = make(tmp_path, data_bin, arch, extra)
    src = torch.randint(task.dictionary.nspecial, len(task.dictionary), (2, 5))
    with pytest.raises(ValueError) as err, torch.no_grad():
        model.decoder(src[:, :1], incremental_state={})
    msg = str(err.value)
    assert msg.startswith(option) and "\n" not in msg and "allowed" in msg.lower(), msg


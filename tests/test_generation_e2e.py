"""Text from a trained model, as a fairseq user makes it, for the dense baseline and every registered
arch (the checkpoints of tests/_e2e_runs.py): fairseq-interactive, fairseq-generate on the
language-modelling data-bin (prefix completion) and the hub interface (``sample``, ``generate``,
``score``). The archs whose default evaluation reads later tokens refuse with one line. Training
with ``--sample-break-mode eos`` and ``complete_doc`` (fairseq's TokenBlockDataset path that
needs numpy < 2) runs too."""

import os

import pytest
import torch
from fairseq.models.transformer_lm import TransformerLanguageModel

from tests import _e2e_runs
from tests.conftest import TINY_MODEL, TINY_TRAIN, USER_DIR, run_cli

pytestmark = pytest.mark.e2e

#: archs whose defaults read later tokens (tests/test_generation.py checks every such mode)
REFUSED = {"expert_choice_lm": "expert_choice: refused"}
PROMPT = "w1 w2 w3"


def _prompt_file(tmp_path):
    path = tmp_path / "prompt.txt"
    path.write_text(PROMPT + "\nw5\n")
    return path


#: archs whose fairseq-interactive runs as a command (the others run its main in this process,
#: which saves a process start each: the same code after the command-line parse)
AS_COMMAND = ("dense_lm", "hash_lm", *REFUSED)


def interactive(data_bin, ckpt, prompt_file, capsys, as_command, check=True):
    """(stdout, stderr, returncode) of fairseq-interactive on ``prompt_file``."""
    args = [data_bin, "--task", "language_modeling", "--user-dir", USER_DIR, "--path", ckpt, "--cpu", "--sampling",
            "--beam", "1", "--max-len-b", "8", "--seed", "1", "--input", str(prompt_file)]
    if as_command:
        proc = run_cli("interactive", *args, check=check)
        return proc.stdout, proc.stderr, proc.returncode
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq_cli import interactive as cli

    capsys.readouterr()
    cli.main(convert_namespace_to_omegaconf(options.parse_args_and_arch(
        options.get_interactive_generation_parser(), input_args=args)))
    return capsys.readouterr().out, "", 0


@pytest.mark.parametrize("arch", _e2e_runs.ALL_ARCHS)
def test_interactive_and_hub_generate(tiny_corpus, tmp_path_factory, tmp_path, capsys, arch):
    _, data_bin = tiny_corpus
    ckpt, _ = _e2e_runs.trained(tmp_path_factory, data_bin, arch)
    out, err, rc = interactive(data_bin, ckpt, _prompt_file(tmp_path), capsys, arch in AS_COMMAND,
                               check=arch not in REFUSED)
    if arch in REFUSED:
        assert rc != 0
        assert err.strip().splitlines()[-1].startswith("ValueError: " + REFUSED[arch])
        with pytest.raises(ValueError, match=REFUSED[arch]):
            TransformerLanguageModel.from_pretrained(os.path.dirname(ckpt), os.path.basename(ckpt),
                                                     data_name_or_path=data_bin, user_dir=USER_DIR)
        return
    hyps = [line.split("\t") for line in out.splitlines() if line.startswith("H-")]
    assert len(hyps) == 2, out[-2000:]
    first = hyps[0][2].split() if hyps[0][0] == "H-0" else hyps[1][2].split()
    assert first[:3] == PROMPT.split() and len(first) > 3

    lm = TransformerLanguageModel.from_pretrained(os.path.dirname(ckpt), os.path.basename(ckpt),
                                                  data_name_or_path=data_bin, user_dir=USER_DIR)
    torch.manual_seed(0)
    text = lm.sample(PROMPT, beam=1, sampling=True, max_len_b=8)
    assert text.startswith(PROMPT) and len(text.split()) > 3
    scored = lm.score(PROMPT)
    # greedy generation scores its continuation as score() (one full forward) scores the same text,
    # which ends before the generator's final </s>
    (hyp,) = lm.generate(lm.encode(PROMPT), beam=1, max_len_b=5, min_len=3)[:1]
    again = lm.score(lm.decode(hyp["tokens"][:-1]))
    torch.testing.assert_close(again["positional_scores"], hyp["positional_scores"][:-1], atol=1e-4, rtol=0)
    assert torch.isfinite(scored["positional_scores"]).all() and len(scored["positional_scores"]) == len(PROMPT.split())


@pytest.mark.parametrize("arch", ["hash_lm", "base_lm"])
def test_generate_completes_test_prefixes(tiny_corpus, tmp_path_factory, arch):
    _, data_bin = tiny_corpus
    ckpt, _ = _e2e_runs.trained(tmp_path_factory, data_bin, arch)
    proc = run_cli("generate", data_bin, "--task", "language_modeling", "--user-dir", USER_DIR, "--path", ckpt,
                   "--cpu", "--gen-subset", "test", "--sample-break-mode", "eos", "--tokens-per-sample", "32",
                   "--skip-invalid-size-inputs-valid-test", "--prefix-size", "3", "--min-len", "5", "--max-len-b", "6", "--beam", "1",
                   "--batch-size", "4", "--num-workers", "0")
    src = {l.split("\t")[0][2:]: l.split("\t")[1].split() for l in proc.stdout.splitlines() if l.startswith("S-")}
    hyp = {l.split("\t")[0][2:]: l.split("\t")[2].split() for l in proc.stdout.splitlines() if l.startswith("H-")}
    assert src and src.keys() == hyp.keys()
    for i in src:
        assert hyp[i][:3] == src[i][:3] and len(hyp[i]) > 3


@pytest.mark.parametrize("arch,mode", [("hash_lm", "eos"), ("base_lm", "complete_doc")])
def test_train_with_sentence_break_modes(tiny_corpus, tmp_path, arch, mode):
    _, data_bin = tiny_corpus
    proc = run_cli("train", data_bin, *TINY_TRAIN, *TINY_MODEL, "--arch", arch, "--criterion", "moe_cross_entropy",
                   "--max-update", "3", "--save-dir", tmp_path, "--sample-break-mode", mode,
                   "--skip-invalid-size-inputs-valid-test", *_e2e_runs.train_args(arch))
    assert "num_updates 3" in proc.stdout + proc.stderr

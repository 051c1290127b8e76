"""data-prep/: the character-level conversion (hand-computed cases), and the prepare-*.sh
scripts end to end on small fake corpora (--local), their checksum check, and their message
when the download is impossible."""

import hashlib
import importlib.util
import os
import random
import subprocess
import sys
import zipfile

import pytest

from tests.conftest import ROOT

DATA_PREP = os.path.join(ROOT, "data-prep")
# data-prep/ is a folder of scripts, not a package: load charlevel.py from its path
_spec = importlib.util.spec_from_file_location("charlevel", os.path.join(DATA_PREP, "charlevel.py"))
charlevel = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(charlevel)


def run_script(name, *args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHON=sys.executable)
    return subprocess.run(["bash", os.path.join(DATA_PREP, name), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def binarised_tokens(data_bin, split):
    """The symbols of a binarised split, read back with fairseq's own dataset and dictionary."""
    from fairseq.data import Dictionary, data_utils

    d = Dictionary.load(os.path.join(data_bin, "dict.txt"))
    ds = data_utils.load_indexed_dataset(os.path.join(data_bin, split), d)
    return [d[int(i)] for k in range(len(ds)) for i in ds[k]], d


# ----------------------------------------------------------------------------------------
# charlevel.py (pure)
# ----------------------------------------------------------------------------------------


def test_standard_split_takes_the_held_out_sets_from_the_end():
    data = bytes(range(100))
    train, valid, test = charlevel.split_standard(data, valid_chars=10, test_chars=5)
    assert train == bytes(range(85)) and valid == bytes(range(85, 95)) and test == bytes(range(95, 100))
    # the standard sizes on a 10^8-character corpus: 90M / 5M / 5M
    n = 100_000_000
    assert n - 2 * charlevel.STANDARD_HELDOUT == 90_000_000


@pytest.mark.parametrize("valid,test", [(0, 5), (5, 0), (60, 40)])
def test_bad_split_sizes_are_refused(valid, test):
    with pytest.raises(ValueError, match="--valid-chars"):
        charlevel.split_standard(bytes(100), valid_chars=valid, test_chars=test)


def test_enwik8_format_one_token_per_byte_newline_ends_the_line(tmp_path):
    path = tmp_path / "e.txt"
    charlevel.write_split(str(path), b"ab c\n\n\xc3\xa9", "enwik8")
    # bytes as decimal tokens (space = 32), a newline byte ends the line (an empty line for two)
    assert path.read_text() == "97 98 32 99\n\n195 169\n"


def test_text8_format_visible_spaces_one_line(tmp_path):
    path = tmp_path / "t.txt"
    charlevel.write_split(str(path), b" ab cd e ", "text8")
    assert path.read_text() == "a b _ c d _ e\n"  # stripped like Transformer-XL's prep_text8.py
    with pytest.raises(ValueError, match="not text8"):
        charlevel.write_split(str(path), b"a_b", "text8")


def test_long_enwik8_lines_are_chunked_without_losing_separators(tmp_path, monkeypatch):
    monkeypatch.setattr(charlevel, "CHUNK", 3)
    path = tmp_path / "e.txt"
    data = b"abcdefg\nhij"
    charlevel.write_split(str(path), data, "enwik8")
    lines = path.read_text().split("\n")
    assert [bytes(int(t) for t in line.split()) for line in lines[:-1]] == data.split(b"\n")


# ----------------------------------------------------------------------------------------
# prepare-*.sh
# ----------------------------------------------------------------------------------------


def fake_enwik8(n=3000, seed=0):
    rnd = random.Random(seed)
    alphabet = b"<page>abc de\nxyz \t12\xc3\xa9\n\n"
    return bytes(rnd.choice(alphabet) for _ in range(n))


@pytest.mark.e2e
def test_prepare_enwik8_local_zip_to_data_bin(tmp_path):
    data = fake_enwik8()
    zpath = tmp_path / "enwik8.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        z.writestr("enwik8", data)
    out = tmp_path / "out"
    md5 = hashlib.md5(data).hexdigest()
    proc = run_script("prepare-enwik8.sh", "--out", out, "--local", zpath, "--checksum", md5,
                      "--valid-chars", 400, "--test-chars", 300, "--workers", 1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "using the local copy" in proc.stderr and f"ok (md5 {md5})" in proc.stderr
    # every split, read back from fairseq's binary files, is the original bytes (newline = </s>)
    parts = dict(zip(("train", "valid", "test"), charlevel.split_standard(data, 400, 300)))
    for split, part in parts.items():
        toks, d = binarised_tokens(str(out / "data-bin"), split)
        eos = d[d.eos()]
        assert toks[-1] == eos  # fairseq ends the last line too
        decoded = bytes(10 if t == eos else int(t) for t in toks[:-1])
        assert decoded == part, split
    # one dictionary entry per byte value seen in train (+ fairseq's 4 specials), no padding symbols
    _, d = binarised_tokens(str(out / "data-bin"), "train")
    assert len(d) == 4 + len(set(parts["train"]) - {10})


@pytest.mark.e2e
def test_prepare_wikitext103_local_directory(tmp_path):
    raw = tmp_path / "wt" / "wikitext-103"
    raw.mkdir(parents=True)
    texts = {"train": " = Title = \n the cat sat on the mat \n\n the dog sat \n", "valid": " the cat sat \n",
             "test": " a dog \n"}
    for split, text in texts.items():
        (raw / f"wiki.{split}.tokens").write_text(text)
    out = tmp_path / "out"
    proc = run_script("prepare-wikitext103.sh", "--out", out, "--local", tmp_path / "wt", "--no-checksum",
                      "--workers", 1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    toks, d = binarised_tokens(str(out / "data-bin"), "test")
    assert toks == ["<unk>", "dog", "</s>"]  # 'a' is not in train's dictionary
    # without --no-checksum the fake files are refused, naming the file and both digests
    proc = run_script("prepare-wikitext103.sh", "--out", tmp_path / "out2", "--local", tmp_path / "wt")
    assert proc.returncode != 0
    assert "checksum mismatch for wiki.train.tokens" in proc.stderr
    assert "b7497e2dfe77e72cfef5e3dbc61b7b53712ac211" in proc.stderr


def test_checksum_mismatch_is_refused_before_any_processing(tmp_path):
    src = tmp_path / "text8"
    src.write_bytes(b" anarchism originated as a term")
    proc = run_script("prepare-text8.sh", "--out", tmp_path / "out", "--local", src)
    assert proc.returncode != 0
    assert "checksum mismatch for text8" in proc.stderr and "sha256" in proc.stderr
    assert hashlib.sha256(src.read_bytes()).hexdigest() in proc.stderr
    assert not (tmp_path / "out" / "data-bin").exists()


@pytest.mark.parametrize("script", ["prepare-enwik8.sh", "prepare-text8.sh", "prepare-wikitext103.sh"])
def test_download_impossible_says_so_and_how_to_go_offline(tmp_path, script):
    # port 9 (discard) on localhost: nothing listens, the connection is refused at once
    proc = run_script(script, "--out", tmp_path / "out", "--url", "http://127.0.0.1:9/corpus.zip", timeout=120)
    assert proc.returncode != 0
    assert "download impossible" in proc.stderr
    assert "--local /path/to/" in proc.stderr


def test_local_path_that_does_not_exist(tmp_path):
    proc = run_script("prepare-enwik8.sh", "--out", tmp_path / "o", "--local", tmp_path / "nope.zip")
    assert proc.returncode != 0 and "no such file" in proc.stderr


@pytest.mark.slow
@pytest.mark.e2e
def test_prepare_text8_local_file_to_data_bin(tmp_path):
    rnd = random.Random(1)
    words = ["the", "of", "and", "anarchism", "a", "z"]
    text = (" " + " ".join(rnd.choice(words) for _ in range(600)) + " ").encode()
    src = tmp_path / "text8"
    src.write_bytes(text)
    out = tmp_path / "out"
    proc = run_script("prepare-text8.sh", "--out", out, "--local", src, "--checksum",
                      hashlib.sha256(text).hexdigest(), "--valid-chars", 200, "--test-chars", 200, "--workers", 1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    parts = dict(zip(("train", "valid", "test"), charlevel.split_standard(text, 200, 200)))
    for split, part in parts.items():
        toks, d = binarised_tokens(str(out / "data-bin"), split)
        assert toks[-1] == "</s>" and toks.count("</s>") == 1  # one line per split
        assert "".join(" " if t == "_" else t for t in toks[:-1]) == part.decode().strip()

#!/usr/bin/env python3
"""Character-level enwik8 / text8 in the standard splits, as text fairseq-preprocess reads.

The standard splits (Transformer-XL's ``prep_enwik8.py`` / ``prep_text8.py``, used by the
HyperRouter reference code): of the 100,000,000 characters, the last 5,000,000 are the
test set, the 5,000,000 before them the valid set, the first 90,000,000 the training set.

Output: one token per character, tokens separated by spaces, so fairseq's dictionary
(``fairseq-preprocess --only-source``) has one entry per character and a binarised token
is exactly one character:

* ``enwik8`` (bytes): every byte is written as its decimal value (``"60"`` for ``<``,
  ``"32"`` for a space: spaces are visible symbols), as Transformer-XL does. A newline byte
  (10) ends the line instead, and fairseq appends its end-of-sentence symbol ``</s>`` to
  every line, so ``</s>`` *is* the newline byte: the binarised split holds exactly one token
  per byte, plus one ``</s>`` after the last line (the file's final line has no newline).
* ``text8`` (lower-case letters and spaces): every character as itself, the space as ``_``
  (Transformer-XL's visible space), the whole split on one line (text8 has no newlines),
  leading/trailing spaces of each split stripped as Transformer-XL does (at most a
  character or two per split). fairseq adds one ``</s>`` at the end of the split.

So fairseq-eval-lm's "Loss (base 2)" on these data-bins is bits per character (BPC; for
enwik8 bits per byte, the usual "BPC" of that benchmark) up to that one extra ``</s>``
token per split (1 in 5 million).

Usage (the prepare-*.sh scripts call it):
  python data-prep/charlevel.py enwik8 --input enwik8.zip --out data/enwik8/text
  python data-prep/charlevel.py text8 --input text8 --out data/text8/text
``--input`` is the zip archive or the extracted file. ``--valid-chars``/``--test-chars``
change the split sizes (tests use tiny files).
"""

import argparse
import hashlib
import json
import os
import sys
import zipfile

MEMBERS = {"enwik8": "enwik8", "text8": "text8"}
STANDARD_HELDOUT = 5_000_000
CHUNK = 1 << 20

#: enwik8: byte -> its token text (newline handled separately)
_BYTE_TOKENS = [str(b) for b in range(256)]


def read_corpus(paths, name: str) -> bytes:
    """The raw corpus bytes: the zip archive (member ``name``) or the extracted file; several
    paths are concatenated in order."""
    if not isinstance(paths, str):
        return b"".join(read_corpus(p, name) for p in paths)
    path = paths
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            members = z.namelist()
            member = MEMBERS[name] if MEMBERS[name] in members else None
            if member is None:
                if len(members) != 1:
                    raise SystemExit(f"{path}: no member {MEMBERS[name]!r} in the archive (has {members[:5]})")
                member = members[0]
            return z.read(member)
    with open(path, "rb") as f:
        return f.read()


def split_standard(data: bytes, valid_chars: int = STANDARD_HELDOUT, test_chars: int = STANDARD_HELDOUT):
    """(train, valid, test): test = the last ``test_chars``, valid = the ``valid_chars`` before."""
    if valid_chars < 1 or test_chars < 1 or valid_chars + test_chars >= len(data):
        raise ValueError(
            f"--valid-chars {valid_chars} / --test-chars {test_chars}: the corpus has {len(data)} "
            "characters; both must be >= 1 and together smaller than the corpus"
        )
    n_train = len(data) - valid_chars - test_chars
    return data[:n_train], data[n_train:n_train + valid_chars], data[n_train + valid_chars:]


def enwik8_lines(part: bytes):
    """Yield the text of ``part`` in enwik8 format, chunk by chunk (bytes -> decimal tokens)."""
    # split on newline bytes: each segment is one line of space-separated decimal tokens
    segments = part.split(b"\n")
    for i, seg in enumerate(segments):
        for start in range(0, len(seg), CHUNK):
            chunk = seg[start:start + CHUNK]
            yield (" " if start else "") + " ".join(_BYTE_TOKENS[b] for b in chunk)
        if i + 1 < len(segments):
            yield "\n"


def text8_lines(part: bytes):
    """Yield the text of ``part`` in text8 format: characters, '_' for space, one line."""
    text = part.decode("ascii").strip()
    if "\n" in text or "_" in text:
        raise ValueError("text8 input contains a newline or '_'; it is not text8")
    for start in range(0, len(text), CHUNK):
        chunk = text[start:start + CHUNK].replace(" ", "_")
        yield (" " if start else "") + " ".join(chunk)
    yield "\n"


def write_split(path: str, part: bytes, name: str) -> None:
    gen = enwik8_lines(part) if name == "enwik8" else text8_lines(part)
    with open(path, "w", encoding="ascii") as f:
        for piece in gen:
            f.write(piece)
        if name == "enwik8":
            f.write("\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", choices=sorted(MEMBERS))
    p.add_argument("--input", required=True, nargs="+",
                   help="the zip archive or the extracted corpus file (several files are concatenated)")
    p.add_argument("--out", required=True, help="directory for train.txt, valid.txt, test.txt")
    p.add_argument("--valid-chars", type=int, default=STANDARD_HELDOUT)
    p.add_argument("--test-chars", type=int, default=STANDARD_HELDOUT)
    args = p.parse_args(argv)
    data = read_corpus(args.input, args.name)
    try:
        parts = split_standard(data, args.valid_chars, args.test_chars)
    except ValueError as e:
        p.error(str(e))
    os.makedirs(args.out, exist_ok=True)
    info = {"corpus": args.name, "input_chars": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    for split, part in zip(("train", "valid", "test"), parts):
        write_split(os.path.join(args.out, f"{split}.txt"), part, args.name)
        info[split] = {"chars": len(part), "sha256": hashlib.sha256(part).hexdigest()}
        print(f"[charlevel] {args.name} {split}: {len(part):,} characters", file=sys.stderr, flush=True)
    with open(os.path.join(args.out, "split_info.json"), "w") as f:
        json.dump(info, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

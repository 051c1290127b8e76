#!/usr/bin/env bash
# WikiText-103 (Merity et al. 2016), word level, its own train/valid/test files, fairseq
# data-bin (the recipe of fairseq's examples/language_model). --help for options.
source "$(dirname "${BASH_SOURCE[0]}")/_lib.sh"

NAME=wikitext-103
ARCHIVE=wikitext-103-v1.zip
# the original S3 location (fairseq's recipe) and the authors' current mirror
URLS=("https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-103-v1.zip"
      "https://wikitext.smerity.com/wikitext-103-v1.zip")
# sha1 of the archive and of its three files (as recorded by GluonNLP's dataset loader)
ARCHIVE_SHA1=0aec09a7537b58d4bb65362fee27650eeaba625a
declare -A FILE_SHA1=(
    [train]=b7497e2dfe77e72cfef5e3dbc61b7b53712ac211
    [valid]=c326ac59dc587676d58c422eb8a03e119582f92b
    [test]=8a5befc548865cec54ed4273cf87dbbad60d1e47
)

usage() {
    cat >&2 <<USAGE
Usage: $0 [--out DIR] [--local PATH] [--url URL]... [--workers N] [--no-checksum] [--force]

Downloads $ARCHIVE (resumable, with progress) or takes a local copy, checks the
sha1 of wiki.{train,valid,test}.tokens, and binarises them with fairseq-preprocess
--only-source (dictionary from train: 267,735 types + 4 specials) into OUT/data-bin.

  --out DIR       output directory (default: data/wikitext-103 in the repo); writes
                  DIR/raw (download + extracted files) and DIR/data-bin
  --local PATH    no download: PATH is $ARCHIVE or a directory holding wiki.*.tokens
                  (directly or in a wikitext-103/ subdirectory)
  --url URL       download from URL instead of the defaults (repeatable: tried in order)
  --workers N     fairseq-preprocess workers (default: number of CPUs)
  --no-checksum   skip the checksum checks
  --force         redo every step even if its output exists
USAGE
}

out="$REPO_ROOT/data/$NAME"; local_path=""; urls=(); no_check=0; force=0; workers="$(nproc_default)"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --out) out="$2"; shift 2 ;;
        --local) local_path="$2"; shift 2 ;;
        --url) urls+=("$2"); shift 2 ;;
        --workers) workers="$2"; shift 2 ;;
        --no-checksum) no_check=1; shift ;;
        --force) force=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage; die "unknown argument: $1" ;;
    esac
done
[[ ${#urls[@]} -gt 0 ]] || urls=("${URLS[@]}")
if already_prepared "$out" "$force"; then exit 0; fi
mkdir -p "$out/raw"

# 1. archive or directory
local_or_fetch "$local_path" "$out/raw/$ARCHIVE" "${urls[@]}"
src="$SRC"
if [[ -z "$local_path" && $no_check -eq 0 && "$(checksum "$src" sha1)" != "$ARCHIVE_SHA1" ]]; then
    # a mirror may re-pack the archive: the three files' own checksums below decide
    log "note: $ARCHIVE's sha1 is not the original archive's ($ARCHIVE_SHA1); checking its files"
fi

# 2. the three token files
tokdir=""
if [[ -d "$src" ]]; then
    for d in "$src" "$src/wikitext-103"; do
        if [[ -f "$d/wiki.train.tokens" ]]; then tokdir="$d"; break; fi
    done
    [[ -n "$tokdir" ]] || die "--local $src: no wiki.train.tokens in it or in its wikitext-103/ subdirectory"
else
    log "extracting $src"
    "$PYTHON" - "$src" "$out/raw" <<'PY'
import os, shutil, sys, zipfile
src, dst = sys.argv[1:]
if not zipfile.is_zipfile(src):
    sys.exit(f"{src} is not a zip archive (expected wikitext-103-v1.zip or a directory)")
with zipfile.ZipFile(src) as z:
    for split in ("train", "valid", "test"):
        hits = [n for n in z.namelist() if n.endswith(f"wiki.{split}.tokens")]
        if not hits:
            sys.exit(f"{src}: no wiki.{split}.tokens in the archive")
        os.makedirs(os.path.join(dst, "wikitext-103"), exist_ok=True)
        with z.open(hits[0]) as f, open(os.path.join(dst, "wikitext-103", f"wiki.{split}.tokens"), "wb") as g:
            shutil.copyfileobj(f, g, 1 << 22)
PY
    tokdir="$out/raw/wikitext-103"
fi
if [[ $no_check -eq 1 ]]; then
    log "checksum checks skipped (--no-checksum)"
else
    for split in train valid test; do
        verify "$tokdir/wiki.$split.tokens" "${FILE_SHA1[$split]}" "wiki.$split.tokens"
    done
fi

# 3. binarise (fairseq examples/language_model/README.md recipe)
rm -rf "$out/data-bin"
fairseq_preprocess --only-source --trainpref "$tokdir/wiki.train.tokens" \
    --validpref "$tokdir/wiki.valid.tokens" --testpref "$tokdir/wiki.test.tokens" \
    --destdir "$out/data-bin" --workers "$workers"
log "done: $out/data-bin ($(wc -l < "$out/data-bin/dict.txt") entries in dict.txt)"

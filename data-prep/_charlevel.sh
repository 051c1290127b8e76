# prepare_charlevel NAME: the body of prepare-enwik8.sh and prepare-text8.sh (sourced).
# Expects NAME, URLS (array), CONTENT_CHECKSUM (of the extracted corpus) and ARCHIVE.

usage_charlevel() {
    cat >&2 <<USAGE
Usage: $0 [--out DIR] [--local PATH] [--url URL]... [--workers N]
          [--no-checksum | --checksum HEX] [--valid-chars N] [--test-chars N] [--force]

Downloads $ARCHIVE (resumable, with progress) or takes a local copy, checks the
checksum of the corpus, splits it into the standard 90M/5M/5M characters (last 5M = test,
5M before = valid), writes one token per character (data-prep/charlevel.py: spaces as a
visible symbol) and binarises it with fairseq-preprocess (one dictionary entry per
character) into OUT/data-bin.

  --out DIR         output directory (default: data/$NAME in the repo); writes
                    DIR/raw (download), DIR/text (train/valid/test.txt), DIR/data-bin
  --local PATH      no download: PATH is $ARCHIVE or the extracted '$NAME' file
  --url URL         download from URL instead of the default (repeatable: tried in order)
  --workers N       fairseq-preprocess workers (default: number of CPUs)
  --checksum HEX    expected md5/sha1/sha256 of the extracted corpus (default: the published one)
  --no-checksum     skip the checksum check
  --valid-chars N / --test-chars N   held-out sizes (default 5000000 each)
  --force           redo every step even if its output exists
USAGE
}

prepare_charlevel() {
    local out="$REPO_ROOT/data/$NAME" local_path="" workers urls=() no_check=0 force=0
    local valid_chars=5000000 test_chars=5000000 want="$CONTENT_CHECKSUM"
    workers="$(nproc_default)"
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --out) out="$2"; shift 2 ;;
            --local) local_path="$2"; shift 2 ;;
            --url) urls+=("$2"); shift 2 ;;
            --workers) workers="$2"; shift 2 ;;
            --checksum) want="$2"; shift 2 ;;
            --no-checksum) no_check=1; shift ;;
            --valid-chars) valid_chars="$2"; shift 2 ;;
            --test-chars) test_chars="$2"; shift 2 ;;
            --force) force=1; shift ;;
            -h|--help) usage_charlevel; exit 0 ;;
            *) usage_charlevel; die "unknown argument: $1" ;;
        esac
    done
    [[ ${#urls[@]} -gt 0 ]] || urls=("${URLS[@]}")
    if already_prepared "$out" "$force"; then return 0; fi
    mkdir -p "$out/raw"

    # 1. the archive or the corpus file (a local directory: the one of the two it holds)
    if [[ -d "$local_path" ]]; then
        if [[ -f "$local_path/$NAME" ]]; then local_path="$local_path/$NAME"
        elif [[ -f "$local_path/$ARCHIVE" ]]; then local_path="$local_path/$ARCHIVE"
        else die "--local $local_path: directory has neither $NAME nor $ARCHIVE"; fi
    fi
    local_or_fetch "$local_path" "$out/raw/$ARCHIVE" "${urls[@]}"
    local src="$SRC"

    # 2. the corpus itself (extracted from the zip when needed), checksum
    local corpus="$out/raw/$NAME"
    if [[ "$src" != "$corpus" ]]; then
        "$PYTHON" - "$src" "$corpus" "$NAME" <<'PY'
import shutil, sys, zipfile
src, dst, name = sys.argv[1:]
if zipfile.is_zipfile(src):
    with zipfile.ZipFile(src) as z:
        names = z.namelist()
        member = name if name in names else (names[0] if len(names) == 1 else None)
        if member is None:
            sys.exit(f"{src}: no member {name!r} in the archive (members: {names[:5]})")
        with z.open(member) as f, open(dst, "wb") as g:
            shutil.copyfileobj(f, g, 1 << 22)
else:
    shutil.copyfile(src, dst)
PY
    fi
    if [[ $no_check -eq 1 ]]; then
        log "checksum check skipped (--no-checksum)"
    else
        verify "$corpus" "$want" "$NAME"
    fi

    # 3. standard splits, one token per character
    "$PYTHON" "$DATA_PREP_DIR/charlevel.py" "$NAME" --input "$corpus" --out "$out/text" \
        --valid-chars "$valid_chars" --test-chars "$test_chars"

    # 4. binarise: the dictionary is built from train (one entry per character, no padding symbols)
    rm -rf "$out/data-bin"
    fairseq_preprocess --only-source --trainpref "$out/text/train.txt" --validpref "$out/text/valid.txt" \
        --testpref "$out/text/test.txt" --destdir "$out/data-bin" --workers "$workers" --padding-factor 1
    log "done: $out/data-bin ($(wc -l < "$out/data-bin/dict.txt") characters in the dictionary)"
}

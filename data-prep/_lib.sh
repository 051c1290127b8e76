# Shared functions of the prepare-*.sh scripts (sourced, not run).
#
# fetch URL... DEST  downloads with resume (curl -C - / wget -c) and a progress bar into
#                    DEST.part, renamed to DEST only when complete; tries each URL in turn;
#                    when none can be reached, says that the download is impossible from
#                    this machine and how to pass a local copy (--local PATH).
# verify FILE HEX    checks a checksum; the algorithm follows from the length of HEX
#                    (32 md5, 40 sha1, 64 sha256).
# already_prepared OUT FORCE   true (and says so) when OUT/data-bin exists and FORCE is 0.
# local_or_fetch LOCAL DEST URL...   sets SRC to LOCAL (which must exist) or, with no LOCAL,
#                    to DEST, fetched from the URLs.

set -euo pipefail

DATA_PREP_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$DATA_PREP_DIR/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$REPO_ROOT/.venv/bin/python" ]]; then PYTHON="$REPO_ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi

log() { echo "[$(basename "$0")] $*" >&2; }
die() { echo "[$(basename "$0")] ERROR: $*" >&2; exit 1; }

# checksum FILE ALGO -> hex digest
checksum() {
    case "$2" in
        md5) md5sum "$1" | cut -d' ' -f1 ;;
        sha1) sha1sum "$1" | cut -d' ' -f1 ;;
        sha256) sha256sum "$1" | cut -d' ' -f1 ;;
        *) die "unknown checksum algorithm $2" ;;
    esac
}

algo_of() {
    case "${#1}" in
        32) echo md5 ;;
        40) echo sha1 ;;
        64) echo sha256 ;;
        *) die "checksum '$1' is not an md5 (32), sha1 (40) or sha256 (64) hex digest" ;;
    esac
}

# verify FILE EXPECTED_HEX [WHAT]: exit with a clear message on mismatch
verify() {
    local file="$1" want="${2,,}" what="${3:-$1}" algo got
    algo="$(algo_of "$want")"
    log "checking the $algo checksum of $what"
    got="$(checksum "$file" "$algo")"
    if [[ "$got" != "$want" ]]; then
        die "checksum mismatch for $what: $algo is $got, expected $want.
  The file is corrupt, truncated or not the published one. Delete it and download again,
  or pass --no-checksum if you know it is right (results then may not be comparable)."
    fi
    log "  ok ($algo $got)"
}

# fetch DEST URL [URL...]: download with resume; the first URL that works wins
fetch() {
    local dest="$1"; shift
    local part="$dest.part" url rc tool
    mkdir -p "$(dirname "$dest")"
    if [[ -s "$dest" ]]; then
        log "$dest already downloaded"
        return 0
    fi
    if command -v curl >/dev/null 2>&1; then tool=curl
    elif command -v wget >/dev/null 2>&1; then tool=wget
    else die "neither curl nor wget is installed: download the file yourself and run again with --local PATH"; fi
    local tried=()
    for url in "$@"; do
        log "downloading $url -> $dest (resumable: run again to continue an interrupted download)"
        set +e
        if [[ $tool == curl ]]; then
            curl -fL --retry 3 --connect-timeout 20 -C - --progress-bar -o "$part" "$url"
        else
            wget -c --tries=3 --timeout=20 --progress=bar:force -O "$part" "$url"
        fi
        rc=$?
        set -e
        if [[ $rc -eq 0 && -s "$part" ]]; then
            mv "$part" "$dest"
            return 0
        fi
        tried+=("$url ($tool exit $rc)")
        log "  failed: $tool exit $rc"
        [[ -s "$part" ]] || rm -f "$part"
    done
    # curl: 6 host unknown, 7 no connection, 28 timeout, 35 TLS; wget: 4 network failure
    local reason="the server could not be reached"
    case "$rc" in
        22|8) reason="the server answered with an error (the file may have moved: try --url)" ;;
    esac
    echo >&2
    die "download impossible: ${reason}; tried:
$(printf '    %s\n' "${tried[@]}")
  This machine may have no internet access (e.g. only package registries are reachable).
  Download the file on a machine that has it, copy it here, and run:
      $0 --local /path/to/$(basename "$dest")
  (a partial download, if any, is kept as $part and resumes on the next run)."
}

# already_prepared OUT FORCE: OUT/data-bin is there and FORCE is 0 (and it says so)
already_prepared() {
    if [[ -f "$1/data-bin/dict.txt" && $2 -eq 0 ]]; then
        log "$1/data-bin already prepared (--force to redo)"
        return 0
    fi
    return 1
}

# local_or_fetch LOCAL DEST URL...: SRC=LOCAL when given (it must exist), else DEST downloaded
# from the first URL that works
local_or_fetch() {
    local local_path="$1" dest="$2"; shift 2
    if [[ -n "$local_path" ]]; then
        [[ -e "$local_path" ]] || die "--local $local_path: no such file or directory"
        SRC="$local_path"
        log "using the local copy $SRC (no download)"
    else
        SRC="$dest"
        fetch "$dest" "$@"
    fi
}

# run fairseq-preprocess with this repo's Python
fairseq_preprocess() {
    "$PYTHON" -m fairseq_cli.preprocess "$@"
}

nproc_default() { nproc 2>/dev/null || echo 2; }

#!/usr/bin/env bash
# text8 (enwik9's first 10^8 characters cleaned to lower-case letters and spaces),
# character level, standard 90M/5M/5M split, fairseq data-bin. --help for options.
source "$(dirname "${BASH_SOURCE[0]}")/_lib.sh"
source "$DATA_PREP_DIR/_charlevel.sh"
NAME=text8
ARCHIVE=text8.zip
URLS=("http://mattmahoney.net/dc/text8.zip" "https://mattmahoney.net/dc/text8.zip")
# sha256 of the extracted 100,000,000-byte file (as quoted by several independent projects)
CONTENT_CHECKSUM=6e890197040d37d85beb962ae1f041ff1d9a9ca8d20c7d99c85027eebf51dca7
prepare_charlevel "$@"

#!/usr/bin/env bash
# enwik8 (first 10^8 bytes of an English Wikipedia XML dump; Hutter prize corpus),
# character (byte) level, standard 90M/5M/5M split, fairseq data-bin. --help for options.
source "$(dirname "${BASH_SOURCE[0]}")/_lib.sh"
source "$DATA_PREP_DIR/_charlevel.sh"
NAME=enwik8
ARCHIVE=enwik8.zip
URLS=("http://mattmahoney.net/dc/enwik8.zip" "https://mattmahoney.net/dc/enwik8.zip")
# md5 of the extracted 100,000,000-byte file as published on mattmahoney.net/dc/textdata.html
CONTENT_CHECKSUM=a1fa5ffddb56f4953e226637dabbb36a
prepare_charlevel "$@"

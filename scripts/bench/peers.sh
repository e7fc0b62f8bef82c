#!/usr/bin/env bash
# SmolLM2-135M served by this project, by HF candle (0.9, CPU) and by llama.cpp (through
# llama-cpp-python, built from source by pip), 2 threads each, the same checkpoint
# (dequantized from the one Q4_1 GGUF), in one run: ROUNDS rounds, each running every
# implementation in turn with REPS repetitions inside it; the table shows the median over
# rounds of each one's medians, and our speed over llama.cpp's on f32 weights.
# The peers are built under ${SPA_PEERS:-~/.cache/spa/peers}, outside the workspace CI builds.
#   scripts/bench/peers.sh            (first run: ~15 min of builds)
set -euo pipefail
cd "$(dirname "$0")/../.."
PEERS=${SPA_PEERS:-$HOME/.cache/spa/peers}
REPS=${REPS:-3}
ROUNDS=${ROUNDS:-3}
export RAYON_NUM_THREADS=2
mkdir -p "$PEERS"
GGUF=$(scripts/fetch-smollm2.sh --gguf-only)
cargo build --release --workspace >&2
for d in f32 f16; do
  [ -f "$PEERS/smollm2-$d/model.safetensors" ] || target/release/spa model import --gguf "$GGUF" --out "$PEERS/smollm2-$d" --dtype $d >/dev/null
done
[ -x "$PEERS/venv/bin/python" ] || { python3 -m venv "$PEERS/venv" && "$PEERS/venv/bin/pip" install --quiet llama-cpp-python numpy >&2; }
PY="$PEERS/venv/bin/python"
for d in f32 f16; do
  [ -f "$PEERS/smollm2-$d.gguf" ] || "$PY" scripts/bench/llama_cpp_bench.py --requantize "$GGUF" "$PEERS/smollm2-$d.gguf" $d >/dev/null 2>&1
done
CARGO_TARGET_DIR="$PEERS/candle-target" cargo build --release --quiet --manifest-path scripts/bench/candle/Cargo.toml >&2
CANDLE="$PEERS/candle-target/release/candle-llama-bench"
OURS=$(cargo bench --workspace --bench llm --no-run --message-format=json 2>/dev/null | "$PY" -c 'import sys, json
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "llm" and m.get("executable"): print(m["executable"])' | tail -1)
OUT=$(mktemp)
for round in $(seq "$ROUNDS"); do
  echo "round $round/$ROUNDS" >&2
  SPA_BENCH_MODEL="$PEERS/smollm2-f32" "$OURS" f32 f16 --reps "$REPS" --json >>"$OUT"
  "$CANDLE" "$PEERS/smollm2-f32" f32 "$REPS" >>"$OUT"
  "$CANDLE" "$PEERS/smollm2-f16" f16 "$REPS" >>"$OUT"
  for q in f32 f16; do "$PY" scripts/bench/llama_cpp_bench.py "$PEERS/smollm2-$q.gguf" $q "$REPS" 2 >>"$OUT"; done
  # Q4_1 is a row of its own: llama.cpp 0.3.36 built natively crashed on it on an Intel Xeon
  # with AMX (2026-12-03); the table then goes on without it.
  "$PY" scripts/bench/llama_cpp_bench.py "$GGUF" q4_1 "$REPS" 2 >>"$OUT" || echo "llama.cpp q4_1 failed (exit $?): row left out" >&2
done
"$PY" - "$OUT" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
keys = []
for r in rows:
    if (r["impl"], r["weights"]) not in keys:
        keys.append((r["impl"], r["weights"]))
med = lambda k, f: statistics.median(r[f] for r in rows if (r["impl"], r["weights"]) == k)
ref = next(k for k in keys if k[0].startswith("llama.cpp") and k[1] == "f32")
print("| implementation | weights | prefill 1x512 tokens/s | decode 128 after 6 tokens/s | decode 128 after 512 tokens/s |")
print("|---|---|---|---|---|")
for k in keys:
    print(f"| {k[0]} | {k[1]} | {med(k, 'prefill_tps'):.0f} | {med(k, 'decode6_tps'):.1f} | {med(k, 'decode512_tps'):.1f} |")
print(f"\n| ours / llama.cpp f32 | prefill | decode after 6 | decode after 512 |\n|---|---|---|---|")
for k in keys:
    if k[0] == "spa":
        print(f"| spa {k[1]} | {med(k, 'prefill_tps') / med(ref, 'prefill_tps'):.2f} | {med(k, 'decode6_tps') / med(ref, 'decode6_tps'):.2f} | {med(k, 'decode512_tps') / med(ref, 'decode512_tps'):.2f} |")
PY

#!/usr/bin/env bash
# The coordinator's memory while it serves a backbone to a real device: a coordinator
# process on loopback, one enrolled device that trains on a Shakespeare role (the head and
# the features cross the wire) and generates 64 tokens; then the coordinator's peak and
# current resident set (VmHWM, VmRSS) next to the size of the weights it holds.
#   scripts/bench/serve_rss.sh MODEL_DIR [f32|f16|bf16|auto]
set -euo pipefail
cd "$(dirname "$0")/../.."
MODEL=$(cd "$1" && pwd)
DTYPE=${2:-auto}
BIN=target/release
W=$(mktemp -d)
trap 'kill $PID 2>/dev/null || true; rm -rf "$W"' EXIT
$BIN/spa-coordinator init --home "$W/coord" >/dev/null
sed -i -e 's/127.0.0.1:7443/127.0.0.1:0/' -e "s|^path = \"\"|path = \"$MODEL\"\ndtype = \"$DTYPE\"|" "$W/coord/coordinator.toml"
$BIN/spa-coordinator serve --home "$W/coord" 2>"$W/serve.log" &
PID=$!
for _ in $(seq 600); do [ -s "$W/coord/serve.addr" ] && break; sleep 0.2; done
ADDR=$(cat "$W/coord/serve.addr")
TOKEN=$($BIN/spa-coordinator token create --home "$W/coord")
$BIN/spa-client --home "$W/dev" enroll --coordinator "$ADDR" --token "$TOKEN" --ca "$W/coord/tls/ca.pem" >/dev/null
$BIN/spa-client --home "$W/dev" data add ../shared/data/tinyshakespeare.txt --speaker SICINIUS >/dev/null
$BIN/spa-client --home "$W/dev" train --json >"$W/train.json"
$BIN/spa-client --home "$W/dev" generate "SICINIUS:" --max-tokens 64 --json >"$W/gen.json"
weights=$(du -b "$MODEL/model.safetensors" | cut -f1)
awk -v w="$weights" -v d="$DTYPE" '/VmHWM|VmRSS/ {kb[$1]=$2} END {printf "serving %s: coordinator peak RSS %.0f MB, now %.0f MB; weights file %.0f MB (peak %.2fx)\n", d, kb["VmHWM:"]/1024, kb["VmRSS:"]/1024, w/1e6, kb["VmHWM:"]*1024/w}' /proc/$PID/status
python3 -c "import json,sys; g=json.load(open('$W/gen.json')); print('generate:', g['tokens'], 'tokens,', g['round_trips'], 'round trips,', round(g['seconds'],2), 's')"

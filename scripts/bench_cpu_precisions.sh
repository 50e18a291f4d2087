#!/usr/bin/env bash
# The CPU precisions' benchmark (docs/results.md, "CPU speed"): for each size, build the fp32, int8 and bf16
# artifacts of the exact Ettin config with random weights, then bench each against CrossEncoder at its
# best batch size (searched), and bf16 also against OpenVINO's own bf16 on a padded export of the same
# modules. Speed does not depend on weight values; ranking fidelity does, and random weights fail the
# int8 / bf16 rank gates (no score margins), so a rejected build is benchmarked from its
# OUT.rejected folder with --allow-unverified, and its gate figures are printed beside the speed.
#
#   scripts/bench_cpu_precisions.sh                 # 17m and 150m, builds then benches
#   SIZES=17m BUILD=0 scripts/bench_cpu_precisions.sh   # bench what is already built
#   SIZES=150m PAIRS=96 BASELINE_BATCH=4 scripts/bench_cpu_precisions.sh
#
# Needs the dev install (torch, sentence-transformers, onnxruntime, openvino). Run it on a quiet
# machine: bench refuses to report a ratio for rounds another process disturbed (exit 4).
set -u
SIZES=${SIZES:-"17m 150m"}
RESULTS=${RESULTS:-bench-results}
BUILD=${BUILD:-1}
BENCH=${BENCH:-1}
PRECISIONS=${PRECISIONS:-"fp32 int8 bf16"}
PAIRS=${PAIRS:-256}            # 96 keeps a 150m run under half an hour on 2 cores
BASELINE_BATCH=${BASELINE_BATCH:-auto}  # the baseline's batch size: auto searches 4..64 on the pairs
mkdir -p "$RESULTS"

artifact_dir() {  # the published artifact, else the rejected build
  local out="artifacts/$1-random-cpu$([ "$2" = fp32 ] || echo "-$2")"
  if [ -d "$out" ]; then echo "$out"; elif [ -d "$out.rejected" ]; then echo "$out.rejected"; fi
}

for size in $SIZES; do
  for precision in $PRECISIONS; do
    if [ "$BUILD" = 1 ]; then
      echo "== build $size $precision"
      extra=""; [ "$precision" = int8 ] && extra="--int8-max-fp32-layers 0"  # all linear layers int8 (random weights)
      # shellcheck disable=SC2086
      ettin-export build --size "$size" --random-weights --target cpu --precision "$precision" --force --quiet $extra
      echo "   exit $? (1: the rank gate failed; the build is kept at OUT.rejected)"
    fi
    dir=$(artifact_dir "$size" "$precision")
    [ -n "$dir" ] || { echo "no $size $precision artifact"; continue; }
    python - "$dir" <<'EOF'
import json, sys
report = json.load(open(f"{sys.argv[1]}/parity.json"))
m = report["metrics"]
print(f"   gate {'PASSED' if report['passed'] else 'FAILED'}: {report['candidate']}: max |Δ| {m['max_abs_diff']:.3g}, "
      f"Spearman {m['spearman']:.4f}, top-1 {m['top1_agreement']:.1%}, top-10 {m['top10_overlap']:.3f} "
      f"({m['pairs']} pairs, {m['queries']} queries)")
EOF
    if [ "$BENCH" = 1 ]; then
      ettin-export bench "$dir" --allow-unverified --pairs "$PAIRS" --baseline-batch-size "$BASELINE_BATCH" --quiet \
        --out "$RESULTS/$size-$precision-vs-crossencoder.json" | tail -7
      if [ "$precision" != int8 ]; then
        ettin-export bench "$dir" --allow-unverified --baseline openvino-padded --pairs "$PAIRS" \
          --baseline-batch-size "$BASELINE_BATCH" --quiet \
          --out "$RESULTS/$size-$precision-vs-openvino-padded.json" | tail -7
      fi
    fi
  done
done

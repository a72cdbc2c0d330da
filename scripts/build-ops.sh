#!/usr/bin/env bash
# Build the ai.adq onnxruntime custom-op library: build/ops/libadq_ops.so.
#
# onnxruntime C/C++ headers are searched in this order:
#   1. $ORT_INCLUDE_DIR (a folder holding onnxruntime_cxx_api.h; an error if set but wrong),
#   2. the system (/usr/include/onnxruntime, /usr/local/include/onnxruntime),
#   3. build/ort-headers/, filled on first use from Debian trixie's libonnxruntime-dev package,
#      fetched with a private apt state under build/apt (nothing is installed system-wide).
# The PyPI onnxruntime wheel ships no headers; headers of an older C API version (1.21) work
# with a newer runtime. The library does not link libonnxruntime.
#
# Environment: ORT_INCLUDE_DIR, ADQ_BUILD_DIR (default <repo>/build), ADQ_BUILD_JOBS (default 2),
# ADQ_DEBIAN_MIRROR (default http://deb.debian.org/debian), ADQ_ORT_SUITE (default trixie).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="${ADQ_BUILD_DIR:-$ROOT/build}"
SRC="$ROOT/runtime/cpp"
OUT="$BUILD/ops"
JOBS="${ADQ_BUILD_JOBS:-2}"
MIRROR="${ADQ_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SUITE="${ADQ_ORT_SUITE:-trixie}"
FETCHED="$BUILD/ort-headers/usr/include/onnxruntime"

die() { echo "build-ops: error: $*" >&2; exit 1; }
has_headers() { [ -n "$1" ] && [ -f "$1/onnxruntime_cxx_api.h" ]; }

fetch_headers() {
  command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null \
    || die "no onnxruntime headers and no apt-get/dpkg-deb to fetch them; set ORT_INCLUDE_DIR to a folder with onnxruntime_cxx_api.h (onnxruntime >= 1.17)"
  local apt="$BUILD/apt"
  mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial" "$apt/deb"
  : > "$apt/status"
  local signed=""
  [ -f /usr/share/keyrings/debian-archive-keyring.gpg ] \
    && signed="[signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] "
  echo "deb ${signed}${MIRROR} ${SUITE} main" > "$apt/sources.list"
  local opts=(
    -q
    -o "Dir::Etc::SourceList=$apt/sources.list"
    -o "Dir::Etc::SourceParts=/dev/null"
    -o "Dir::Etc::Preferences=/dev/null"
    -o "Dir::Etc::PreferencesParts=/dev/null"
    -o "Dir::State::Lists=$apt/lists"
    -o "Dir::State::Status=$apt/status"
    -o "Dir::Cache=$apt/cache"
    -o "Dir::Cache::Archives=$apt/cache/archives"
    -o "APT::Sandbox::User=root"
  )
  echo "build-ops: fetching libonnxruntime-dev headers from $MIRROR $SUITE (private apt state in $apt)" >&2
  apt-get "${opts[@]}" update >&2 || die "apt-get update of $MIRROR $SUITE failed; set ORT_INCLUDE_DIR instead"
  rm -f "$apt/deb/"*.deb
  (cd "$apt/deb" && apt-get "${opts[@]}" download libonnxruntime-dev >&2) \
    || die "apt-get download libonnxruntime-dev failed; set ORT_INCLUDE_DIR instead"
  rm -rf "$BUILD/ort-headers"
  dpkg-deb -x "$apt/deb/"libonnxruntime-dev_*.deb "$BUILD/ort-headers"
  has_headers "$FETCHED" || die "libonnxruntime-dev did not contain onnxruntime_cxx_api.h"
}

if [ -n "${ORT_INCLUDE_DIR:-}" ]; then
  has_headers "$ORT_INCLUDE_DIR" || die "ORT_INCLUDE_DIR=$ORT_INCLUDE_DIR has no onnxruntime_cxx_api.h"
  INC="$ORT_INCLUDE_DIR"
elif has_headers /usr/include/onnxruntime; then
  INC=/usr/include/onnxruntime
elif has_headers /usr/local/include/onnxruntime; then
  INC=/usr/local/include/onnxruntime
else
  has_headers "$FETCHED" || fetch_headers
  INC="$FETCHED"
fi
echo "build-ops: onnxruntime headers: $INC" >&2

mkdir -p "$OUT"
if command -v cmake >/dev/null; then
  cmake -S "$SRC" -B "$BUILD/ops-cmake" -DCMAKE_BUILD_TYPE=Release -DORT_INCLUDE_DIR="$INC" \
    -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$OUT" >&2
  cmake --build "$BUILD/ops-cmake" -j "$JOBS" >&2
else
  CXX="${CXX:-g++}"
  command -v "$CXX" >/dev/null || die "need cmake or a C++17 compiler (\$CXX, default g++)"
  echo "build-ops: cmake not found, compiling with $CXX directly" >&2
  "$CXX" -O3 -std=c++17 -fPIC -shared -fvisibility=hidden -fvisibility-inlines-hidden -pthread \
    -Wall -Wextra -Wno-maybe-uninitialized -Wno-uninitialized -isystem "$INC" "$SRC"/*.cc -o "$OUT/libadq_ops.so.tmp" -Wl,--no-undefined
  mv -f "$OUT/libadq_ops.so.tmp" "$OUT/libadq_ops.so"
fi
[ -f "$OUT/libadq_ops.so" ] || die "build finished without $OUT/libadq_ops.so"
echo "$OUT/libadq_ops.so"

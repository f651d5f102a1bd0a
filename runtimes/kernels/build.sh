#!/usr/bin/env bash
# Builds runtimes/kernels into a build folder: ./build.sh [BUILD_DIR] [extra cmake args...]
# Headers: $ORT_INCLUDE_DIR if set, else Debian's libonnxruntime-dev (trixie, API 21) unpacked
# into build/ort-headers. On failure prints one line saying why and exits 1.
set -uo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
BUILD="${1:-$ROOT/build/kernels}"; shift || true
LOG="$ROOT/build/kernels-build.log"
mkdir -p "$ROOT/build"
: >"$LOG"
fail() { echo "sslc kernels not built: $1" >&2; exit 1; }

headers() {  # prints the include dir, fetching the Debian package if needed
  if [ -n "${ORT_INCLUDE_DIR:-}" ]; then
    [ -f "$ORT_INCLUDE_DIR/onnxruntime_lite_custom_op.h" ] || fail "ORT_INCLUDE_DIR=$ORT_INCLUDE_DIR has no onnxruntime_lite_custom_op.h (onnxruntime >= 1.16 headers)"
    echo "$ORT_INCLUDE_DIR"; return
  fi
  local dest="$ROOT/build/ort-headers" inc="$ROOT/build/ort-headers/usr/include/onnxruntime"
  if [ -f "$inc/onnxruntime_lite_custom_op.h" ]; then echo "$inc"; return; fi
  command -v apt-get >/dev/null && command -v dpkg >/dev/null || fail "no apt-get/dpkg to fetch onnxruntime headers; set ORT_INCLUDE_DIR to a folder with onnxruntime_cxx_api.h"
  local state="$ROOT/build/ort-apt"
  mkdir -p "$state/lists/partial" "$state/cache/archives/partial" "$state/etc" "$state/deb"
  local apt=(apt-get -q -o "Dir::Cache=$state/cache")
  # Debian 13 lists already carry the package; elsewhere a private trixie list is used.
  if ! (cd "$state/deb" && "${apt[@]}" download libonnxruntime-dev) >>"$LOG" 2>&1; then
    printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: trixie\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' >"$state/etc/trixie.sources"
    apt+=(-o "Dir::State::Lists=$state/lists" -o Dir::Etc::SourceList=/dev/null -o "Dir::Etc::SourceParts=$state/etc")
    "${apt[@]}" update >>"$LOG" 2>&1 || fail "apt-get update of Debian trixie's package list failed (see $LOG); set ORT_INCLUDE_DIR instead"
    (cd "$state/deb" && "${apt[@]}" download libonnxruntime-dev) >>"$LOG" 2>&1 || fail "apt-get download libonnxruntime-dev failed (see $LOG); set ORT_INCLUDE_DIR instead"
  fi
  dpkg -x "$(ls "$state"/deb/libonnxruntime-dev_*.deb | head -n1)" "$dest" >>"$LOG" 2>&1 || fail "dpkg -x of libonnxruntime-dev failed (see $LOG)"
  [ -f "$inc/onnxruntime_lite_custom_op.h" ] || fail "libonnxruntime-dev has no onnxruntime headers under usr/include/onnxruntime"
  echo "$inc"
}

command -v cmake >/dev/null || fail "cmake is not installed (apt-get install cmake)"
command -v c++ >/dev/null || fail "no C++ compiler (apt-get install g++)"
INC="$(headers)" || exit 1
cmake -S "$HERE" -B "$BUILD" -DORT_INCLUDE_DIR="$INC" "$@" >>"$LOG" 2>&1 || fail "cmake configure failed (see $LOG)"
cmake --build "$BUILD" -j 2 >>"$LOG" 2>&1 || fail "compilation failed (see $LOG)"

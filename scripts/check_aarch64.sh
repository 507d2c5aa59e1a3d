#!/usr/bin/env bash
# The runtime on 64-bit ARM without ARM hardware: an arm64 Debian userland run under
# qemu-user, the aarch64 wheels of onnxruntime, numpy and tokenizers from PyPI, and the
# parity checks of scripts/aarch64_check.py on the committed tiny checkpoint (fp32 vs the
# FlagEmbedding goldens, int8 vs fp32 within tests/test_variants.py's bounds, the int8
# graph's kernels, and both against the x86 runtime's own outputs).
#
# usage: bash scripts/check_aarch64.sh [PACKAGE_DIR]
#   PACKAGE_DIR: a package with fp32 and int8 (default: models/tiny-m3 exported now).
#   M3_AARCH64_CPUS: qemu CPU models to run under, space-separated. The default covers the
#     three feature sets ONNX Runtime's aarch64 int8 GEMMs dispatch on (MLAS checks dotprod
#     and i8mm; the kernel it then picks is not observed here): "max,sve=off" (i8mm
#     and dotprod: Graviton3/4-class), "neoverse-n1" (dotprod, no i8mm: Graviton2, Raspberry
#     Pi 5's Cortex-A76, Jetson Orin's A78AE) and "cortex-a72" (NEON only: Raspberry Pi 4).
#     "max" adds SVE/SVE2, which qemu emulates ~10x slower (35 short texts: 40 s vs 4 s).
#   M3_AARCH64_LONG=1: also the 8,192-token golden text (qemu -cpu neoverse-n1 here: 449 s).
#   M3_AARCH64_CACHE: where the userland and wheels are kept (default .cache/aarch64).
#
# Needs .venv (scripts/install.sh) and, on first use, root for apt-get. Debian bookworm's
# qemu-user-static 7.2 segfaults importing onnxruntime's aarch64 build; bookworm-backports'
# 10.0 works (8 and 9 untried), so qemu comes from there and 10 is the minimum. No binfmt_misc or chroot: the arm64 Python runs as
# `qemu-aarch64-static -L ROOT ROOT/usr/bin/python3.11`.
set -euo pipefail
cd "$(dirname "$0")/.."
# The tiny checkpoints' int8 saturates ONNX Runtime's u8 x s8 kernel on x86 without VNNI
# at the default 8-bit activations (docs/runtime.md#int8-on-x86-without-vnni): run int8
# at 7 bits there, as the test suite does, so every side compares at the same width.
if grep -qE '^flags' /proc/cpuinfo 2>/dev/null && [ "$(uname -m)" = x86_64 ] \
  && ! grep -qE '^flags.*\b(avx512_vnni|avx_vnni)\b' /proc/cpuinfo; then
  export M3_INT8_ACTIVATION_BITS=${M3_INT8_ACTIVATION_BITS:-7}
fi
REPO=$PWD
CACHE=${M3_AARCH64_CACHE:-$REPO/.cache/aarch64}
CPUS=${M3_AARCH64_CPUS:-max,sve=off neoverse-n1 cortex-a72}
LONG=()
[ "${M3_AARCH64_LONG:-0}" = 1 ] && LONG=(--long)
mkdir -p "$CACHE"
CACHE=$(cd "$CACHE" && pwd)
ROOTFS=$CACHE/rootfs

pin() { # version of $1 in scripts/constraints.txt
  local v
  v=$(sed -n "s/^$1==\(.*\)$/\1/p" scripts/constraints.txt)
  [ -n "$v" ] || { echo "check_aarch64: no $1 pin in scripts/constraints.txt" >&2; exit 2; }
  echo "$v"
}
say() { printf '\n== %s (%ss)\n' "$1" "$SECONDS"; }
[ -x .venv/bin/python ] || { echo "check_aarch64: no .venv here; run scripts/install.sh first" >&2; exit 2; }

qemu_major() {
  command -v qemu-aarch64-static >/dev/null || { echo 0; return; }
  qemu-aarch64-static --version | sed -n 's/.*version \([0-9]*\)\..*/\1/p' | head -1
}

# -- 1. tools: debootstrap, and qemu-user-static >= 10 from bookworm-backports ---------
if ! command -v debootstrap >/dev/null || [ "$(qemu_major)" -lt 10 ]; then
  say "installing debootstrap and qemu-user-static from bookworm-backports"
  [ "$(id -u)" = 0 ] || { echo "check_aarch64: run as root once to apt-get install them" >&2; exit 2; }
  if ! apt-cache policy | grep -q ' bookworm-backports/main '; then
    # Debian's own backports suite, on the mirror this system already uses for bookworm.
    mirror=$(apt-cache policy | awk '$3 == "bookworm/main" { print $2; exit }')
    [ -n "$mirror" ] || { echo "check_aarch64: no bookworm/main source to derive the backports one from" >&2; exit 2; }
    printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: %s\n' \
      "$mirror" /usr/share/keyrings/debian-archive-keyring.gpg >/etc/apt/sources.list.d/bookworm-backports.sources
    echo "added bookworm-backports ($mirror) to /etc/apt/sources.list.d/bookworm-backports.sources"
  fi
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends -t bookworm-backports \
    debootstrap qemu-user-static
  apt-cache policy qemu-user-static | sed -n '1,3p'
  [ "$(qemu_major)" -ge 10 ] || { echo "check_aarch64: qemu-user-static is still older than 10" >&2; exit 2; }
fi
QEMU=$(command -v qemu-aarch64-static)
echo "qemu: $($QEMU --version | head -1)"

# -- 2. arm64 Debian userland (Python 3.11), cached ------------------------------------
if [ ! -e "$ROOTFS/.m3-ready" ]; then
  say "building the arm64 bookworm userland in $ROOTFS"
  rm -rf "$ROOTFS"
  mirror=$(apt-cache policy | awk '$3 == "bookworm/main" { print $2; exit }')
  # --foreign: download and unpack only; the second stage would need to run arm64 code
  # as root in a chroot. dpkg -x of every downloaded .deb gives a usable Python instead.
  debootstrap --arch=arm64 --foreign --variant=minbase --include=python3 bookworm "$ROOTFS" ${mirror:+"$mirror"} \
    >"$CACHE/debootstrap.log" 2>&1 || { tail -20 "$CACHE/debootstrap.log"; exit 1; }
  for deb in "$ROOTFS"/var/cache/apt/archives/*.deb; do
    dpkg -x "$deb" "$ROOTFS"
  done
  "$QEMU" -L "$ROOTFS" "$ROOTFS/usr/bin/python3.11" -c 'import platform; assert platform.machine() == "aarch64"'
  touch "$ROOTFS/.m3-ready"
fi
PY=("$QEMU" -L "$ROOTFS" "$ROOTFS/usr/bin/python3.11")

# -- 3. aarch64 wheels, cached per pinned versions -------------------------------------
reqs=("onnxruntime==$(pin onnxruntime)" "numpy==$(pin numpy)" "tokenizers==$(pin tokenizers)")
SITE=$CACHE/site-$( (echo "${reqs[*]}"; cat scripts/constraints.txt) | sha256sum | cut -c1-12)
if [ ! -e "$SITE/.m3-ready" ]; then
  say "installing ${reqs[*]} (aarch64 wheels) into $SITE"
  rm -rf "$SITE"
  .venv/bin/python -m pip install --disable-pip-version-check -q -c scripts/constraints.txt --target "$SITE" \
    --platform manylinux2014_aarch64 --platform manylinux_2_28_aarch64 --python-version 3.11 \
    --only-binary=:all: "${reqs[@]}"
  touch "$SITE/.m3-ready"
fi

# -- 4. the package, exported on x86 ---------------------------------------------------
WORK=$(mktemp -d "$CACHE/run.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
trap 'exit 130' INT TERM
if [ $# -ge 1 ]; then
  PKG=$(cd "$1" && pwd)
else
  say "exporting models/tiny-m3 (fp32, int8) on x86"
  PKG=$WORK/tiny-m3
  .venv/bin/m3-export models/tiny-m3 "$PKG" --variants fp32,int8 >"$WORK/export.log" 2>&1 ||
    { tail -20 "$WORK/export.log"; exit 1; }
fi
for f in model.fp32.onnx model.int8.onnx; do
  [ -e "$PKG/$f" ] || { echo "check_aarch64: $PKG has no $f" >&2; exit 2; }
done
.venv/bin/python scripts/aarch64_check.py "$PKG" --list-ops --ops "$WORK/ops.json"

# -- 5. the checks: x86 first (its outputs are the reference), then arm64 --------------
status=0
say "x86_64 (host .venv)"
PYTHONPATH=runtime/src .venv/bin/python scripts/aarch64_check.py "$PKG" --ops "$WORK/ops.json" "${LONG[@]}" \
  --save "$WORK/x86_64.npz" || status=1
# Each CPU model after the first is also held to the first one's outputs (the three
# default feature sets gave bit-identical fp32 and int8 outputs here, 2026-12-01).
against=(--against "$WORK/x86_64.npz")
for cpu in $CPUS; do
  say "aarch64 under qemu -cpu $cpu"
  save=$WORK/aarch64-${cpu//[^a-z0-9]/_}.npz
  QEMU_CPU=$cpu PYTHONPATH="$SITE:$REPO/runtime/src" "${PY[@]}" scripts/aarch64_check.py "$PKG" \
    --ops "$WORK/ops.json" "${LONG[@]}" "${against[@]}" --save "$save" || status=1
  [ ${#against[@]} -gt 2 ] || against+=(--against "$save")
done
say "done: $([ $status = 0 ] && echo 'all checks passed' || echo 'FAILED')"
exit $status

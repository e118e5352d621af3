#!/usr/bin/env bash
# The package as users install it: build the sdist and the wheel, check their
# metadata, install the wheel (not editable) into a fresh virtual environment,
# prove that environment imports the installed copy (not this checkout), then
# run the demo and a few core tests against it from a directory outside the
# checkout; then unpack the sdist alone, install it and run its own tests
# from it, as a stranger with only the sdist would.
# Usage: .ci/wheel.sh [PYTHON]   (~2-3 min)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
PYTHON="${1:-${PYTHON:-python3}}"

WORK="$(mktemp -d /tmp/sks-wheel.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT

echo "--- build sdist and wheel"
"$PYTHON" -m venv "$WORK/build-env"
"$WORK/build-env/bin/python" -m pip install -q build twine check-wheel-contents 2>&1 \
    | grep -v "^WARNING: Location" || true
"$WORK/build-env/bin/python" -m build -q -o "$WORK/dist" . >"$WORK/build.log" 2>&1 \
    || { cat "$WORK/build.log"; exit 1; }
"$WORK/build-env/bin/python" -m twine check --strict "$WORK"/dist/*
"$WORK/build-env/bin/check-wheel-contents" "$WORK"/dist/*.whl
ls -l "$WORK/dist"

WHEEL="$(ls "$WORK"/dist/*.whl)"
echo "--- what the wheel ships"
"$WORK/build-env/bin/python" - "$WHEEL" <<'PY'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
for needed in ("shm_kernel_safe/py.typed", "shm_kernel_safe/__main__.py"):
    assert needed in names, f"{needed} is not in the wheel"
assert any(n.endswith("licenses/LICENSE") for n in names), "no LICENSE in the wheel"
assert not any(n.startswith(("tests/", "benchmarks/", "docs/")) for n in names), "stray files"
print(len(names), "files; py.typed, LICENSE, __main__ present; no tests/docs/benchmarks")
PY

echo "--- install the wheel (not editable) into a fresh venv, with the test runner"
"$PYTHON" -m venv "$WORK/env"
PY="$WORK/env/bin/python"
# Not the whole test extra (dask, spyder-kernels, hypothesis...): only what
# the tests below import, so the stage stays short.
"$PY" -m pip install -q "$WHEEL" "pytest>=7.4" "pytest-timeout>=2.2"
# The tests and their config, outside the checkout: nothing on sys.path may
# lead back to $ROOT, so the installed wheel is what gets imported.
mkdir -p "$WORK/run"
cp -r "$ROOT/tests" "$WORK/run/tests"
cat >"$WORK/run/pytest.ini" <<'INI'
[pytest]
timeout = 120
addopts = -ra -p no:cacheprovider
markers =
    slow: long-running end-to-end tests
    browser: drives JupyterLab in a real Chromium
    gui: drives the real Spyder application headless
    sigint: can notice how the runner was started with respect to SIGINT
INI
cd "$WORK/run"
LOCATION="$("$PY" -c "import shm_kernel_safe; print(shm_kernel_safe.__file__)")"
echo "imported from: $LOCATION"
case "$LOCATION" in
    "$WORK/env/"*) ;;
    *) echo "the package was not imported from the installed wheel"; exit 1 ;;
esac
"$PY" - <<'PY'
import importlib.metadata as md
import shm_kernel_safe
assert shm_kernel_safe.__version__ == md.version("shm_kernel_safe"), "version not single-sourced"
print("version", shm_kernel_safe.__version__, "(package == metadata)")
PY

echo "--- the demo, from the installed wheel"
"$PY" -m shm_kernel_safe demo
"$WORK/env/bin/shm-kernel-safe" status

echo "--- core tests against the installed wheel"
"$PY" -m pytest -q tests/memory/test_safe_close.py tests/e2e/test_original_crash.py
"$PY" -m pytest -q tests/transports/test_transports.py -k serial

echo "--- the sdist alone: unpack it, install it, run its own tests from it"
SDIST="$(ls "$WORK"/dist/*.tar.gz)"
mkdir -p "$WORK/sdist" && tar xzf "$SDIST" -C "$WORK/sdist"
SRC="$(ls -d "$WORK"/sdist/shm_kernel_safe-*)"
for needed in tests/__init__.py tests/conftest.py tests/sigint_scope.py tests/helpers.py tests/backends.py tests/engine/__init__.py \
    tests/kernels.py CHANGELOG.md docs/index.md notebooks/weather_hours.ipynb; do
    [ -e "$SRC/$needed" ] || { echo "the sdist lacks $needed"; exit 1; }
done
"$PYTHON" -m venv "$WORK/sdist-env"
"$WORK/sdist-env/bin/python" -m pip install -q "$SDIST" "pytest>=7.4" "pytest-timeout>=2.2" \
    2>&1 | grep -v "^WARNING: Location" || true
cd "$SRC"
"$WORK/sdist-env/bin/python" -m pytest -q -p no:cacheprovider tests/memory/test_safe_close.py \
    tests/e2e/test_original_crash.py tests/e2e/test_cli.py

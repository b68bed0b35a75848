# Sourced by scripts/bench and scripts/test: a project virtualenv in .venv,
# created and filled on first use, with poolkit installed in editable mode.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
if command -v pyenv >/dev/null 2>&1; then
    # both interpreters on PATH: 3.11 by default, 3.13 for the dqlite env
    export PYENV_VERSION="${PYENV_VERSION:-3.11.7:3.13.0}"
fi
py=${POOLKIT_PYTHON:-python3.11}
command -v "$py" >/dev/null 2>&1 || py=python3
stamp=.venv/.installed-$(cat pyproject.toml | sha1sum | cut -c1-12)
if [ ! -f "$stamp" ]; then
    [ -d .venv ] || "$py" -m venv .venv
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -e ".[dev,lint]" tox
    rm -f .venv/.installed-*
    touch "$stamp"
fi
export PATH="$root/.venv/bin:$PATH"

#!/usr/bin/env bash
# The one test command; README and .ci/run both call it. Lint, format check, type check, the
# import contracts (pyproject.toml [tool.importlinter]), then
# pytest (arguments go to pytest), from the repository's .venv, stopping at the first failure.
# pytest's own exit code is the script's: 5 ("no tests collected") fails too.
# Run deploy/setup.sh once first.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin="$repo_root/.venv/bin"
cd "$repo_root"

if [ ! -x "$bin/python" ]; then
    printf 'test: %s/python not found; run deploy/setup.sh first\n' "$bin" >&2
    exit 2
fi

run() {
    printf '+ %s\n' "$*"
    "$@"
}

run "$bin/ruff" check .
run "$bin/ruff" format --check .
run "$bin/mypy"
run "$bin/lint-imports" --no-cache
run "$bin/python" -m pytest "$@"

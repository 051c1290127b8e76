# Sourced by scripts/reproduce/<experiment>.sh: run experiment $EXPERIMENT of
# moe_plugin/experiments/ with the script's arguments, from the repository root (any cwd works;
# relative paths such as --out are relative to the repository root, as in every command the
# experiment prints). The Python is $PYTHON, else the repository's .venv, else python3.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "$PYTHON" -m moe_plugin.experiments.runner "$EXPERIMENT" "$@"

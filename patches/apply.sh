#!/usr/bin/env bash
# Apply the CPU source patches (patches/p*.patch, in order) to a Megatron-LM checkout or to the
# directory that holds an installed megatron-core's `megatron/` package.
#   patches/apply.sh [--dry-run] [TARGET]
# TARGET defaults to the site-packages directory of the megatron-core that `python` imports.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
dry_run=()
if [[ "${1:-}" == "--dry-run" ]]; then dry_run=(--dry-run); shift; fi
target="${1:-$(python -c 'import pathlib, megatron.core as m; print(pathlib.Path(m.__file__).resolve().parents[2])')}"
[[ -d "$target/megatron/core" ]] || { echo "no megatron/core under $target" >&2; exit 1; }
for p in "$here"/p*.patch; do
  echo "== $(basename "$p")"
  # Check first so that a patch that does not apply leaves the tree untouched.
  patch -p1 --dry-run --forward -d "$target" -i "$p" >/dev/null
  if [[ ${#dry_run[@]} -eq 0 ]]; then patch -p1 --forward --no-backup-if-mismatch -d "$target" -i "$p"; fi
done

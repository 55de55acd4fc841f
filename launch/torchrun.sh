#!/usr/bin/env bash
# Start `vespo-megatron train CONFIG [overrides]` under torchrun on this node.
# Single node, multi-node with a static master, or multi-node with a c10d rendezvous endpoint.
# Run `launch/torchrun.sh --help` for the arguments; docs/launching.md has worked examples.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/torchrun.sh [launcher options] [--] CONFIG [section.key=value ...]

Runs `python -m vespo_megatron.cli train CONFIG [overrides]` on every local rank via torchrun.
Everything from CONFIG on is passed to the trainer unchanged.

Launcher options (an option beats its environment default, which beats the built-in default):
  --nnodes N             number of nodes, or MIN:MAX with --rdzv-endpoint   [env NNODES, default 1]
  --node-rank R          rank of this node, 0..N-1 (static master only)    [env NODE_RANK, default 0]
  --nproc-per-node N     processes on this node     [env NPROC_PER_NODE, default: GPU count, or 1 without GPUs]
  --master-addr HOST     address of node 0 (static master)          [env MASTER_ADDR, default 127.0.0.1]
  --master-port PORT     free TCP port on node 0 (static master)    [env MASTER_PORT, default 29500]
  --rdzv-endpoint H:P    use the c10d rendezvous at H:P instead of a static master; node ranks are
                         assigned by the rendezvous, --node-rank is ignored  [env RDZV_ENDPOINT]
  --rdzv-id ID           rendezvous id, the same on every node of one job   [env RDZV_ID, default vespo]
  --shutdown-timeout S   seconds the workers get to checkpoint after torchrun forwards SIGTERM/SIGUSR1
                         before it kills them                               [default 300]
  --log-dir DIR          torchrun writes per-rank stdout/stderr under DIR (tee'd to the console)
  --script PATH          run `python PATH CONFIG [overrides]` instead of the vespo_megatron CLI
                         (the launcher tests pass a stand-in trainer here)
  --dry-run              print the torchrun command and exit
  -h, --help             this text

torchrun forwards SIGTERM, SIGINT, SIGHUP, SIGQUIT and SIGUSR1 to the workers, which save a checkpoint
and exit; send the signal to the torchrun process (SLURM does this through launch/slurm.sbatch).

Examples:
  launch/torchrun.sh configs/tiny.yaml train.steps=10                      # one node, all GPUs
  launch/torchrun.sh --nproc-per-node 2 configs/tiny.yaml                  # CPU, two gloo ranks
  launch/torchrun.sh --nnodes 2 --node-rank 0 --master-addr node0 configs/x.yaml   # on node0
  launch/torchrun.sh --nnodes 2 --node-rank 1 --master-addr node0 configs/x.yaml   # on node1
  launch/torchrun.sh --nnodes 2 --rdzv-endpoint node0:29400 --rdzv-id run7 configs/x.yaml
EOF
}

die() { echo "torchrun.sh: $*" >&2; exit 2; }

gpu_count() {
  # CUDA_VISIBLE_DEVICES (set by SLURM and by users) wins over what nvidia-smi sees.
  if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
    local -a ids
    IFS=',' read -r -a ids <<<"$CUDA_VISIBLE_DEVICES"
    echo "${#ids[@]}"
  elif command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
  else
    echo 0
  fi
}

nnodes="${NNODES:-1}"
node_rank="${NODE_RANK:-0}"
nproc_per_node="${NPROC_PER_NODE:-}"
master_addr="${MASTER_ADDR:-127.0.0.1}"
master_port="${MASTER_PORT:-29500}"
rdzv_endpoint="${RDZV_ENDPOINT:-}"
rdzv_id="${RDZV_ID:-vespo}"
shutdown_timeout=300
log_dir=""
script=""
dry_run=0

need_value() { [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value (see --help)"; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --nnodes) need_value "$@"; nnodes="$2"; shift 2 ;;
    --node-rank) need_value "$@"; node_rank="$2"; shift 2 ;;
    --nproc-per-node) need_value "$@"; nproc_per_node="$2"; shift 2 ;;
    --master-addr) need_value "$@"; master_addr="$2"; shift 2 ;;
    --master-port) need_value "$@"; master_port="$2"; shift 2 ;;
    --rdzv-endpoint) need_value "$@"; rdzv_endpoint="$2"; shift 2 ;;
    --rdzv-id) need_value "$@"; rdzv_id="$2"; shift 2 ;;
    --shutdown-timeout) need_value "$@"; shutdown_timeout="$2"; shift 2 ;;
    --log-dir) need_value "$@"; log_dir="$2"; shift 2 ;;
    --script) need_value "$@"; script="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) break ;;
  esac
done

[[ $# -ge 1 ]] || die "missing CONFIG: launch/torchrun.sh [options] CONFIG [section.key=value ...]"

if [[ -z "$nproc_per_node" ]]; then
  nproc_per_node="$(gpu_count)"
  [[ "$nproc_per_node" -gt 0 ]] || nproc_per_node=1
fi
[[ "$nproc_per_node" =~ ^[1-9][0-9]*$ ]] || die "--nproc-per-node=$nproc_per_node is not a positive integer"

cmd=(torchrun --nnodes "$nnodes" --nproc-per-node "$nproc_per_node")
# Older torchrun lacks these two flags; there SIGUSR1 must be sent to the workers themselves.
torchrun_source="$(python -c 'import importlib.util as u; print(u.find_spec("torch").submodule_search_locations[0])')/distributed/run.py"
if grep -q -- '--signals-to-handle' "$torchrun_source" 2>/dev/null; then
  cmd+=(--signals-to-handle "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1")
fi
if grep -q -- '--shutdown-timeout' "$torchrun_source" 2>/dev/null; then
  cmd+=(--shutdown-timeout "$shutdown_timeout")
fi
if [[ -n "$rdzv_endpoint" ]]; then
  cmd+=(--rdzv-backend c10d --rdzv-endpoint "$rdzv_endpoint" --rdzv-id "$rdzv_id")
else
  [[ "$nnodes" =~ ^[1-9][0-9]*$ ]] || die "--nnodes=$nnodes must be one integer without --rdzv-endpoint"
  [[ "$node_rank" =~ ^[0-9]+$ && "$node_rank" -lt "$nnodes" ]] \
    || die "--node-rank=$node_rank is not in 0..$((nnodes - 1)) for --nnodes=$nnodes"
  cmd+=(--node-rank "$node_rank" --master-addr "$master_addr" --master-port "$master_port")
fi
if [[ -n "$log_dir" ]]; then
  cmd+=(--log-dir "$log_dir" --redirects 3 --tee 3)
fi
if [[ -n "$script" ]]; then
  cmd+=("$script")
else
  cmd+=(-m vespo_megatron.cli train)
fi
cmd+=("$@")

if [[ "$dry_run" -eq 1 ]]; then
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi
# exec: torchrun becomes this process, so signals sent to it reach the agent that forwards them.
exec "${cmd[@]}"

#!/usr/bin/env bash
# One torchrun agent on this node for a megads job of one or more nodes: run it once on every node
# (by hand, with ssh, or with srun: tools/launch/slurm.sbatch) with the same endpoint and run id.
# The agents meet at a c10d rendezvous (a TCP store the agent on the endpoint's host serves), which
# numbers the nodes, gives every rank its RANK/WORLD_SIZE/MASTER_ADDR, and restarts all ranks from
# the latest checkpoint when one fails (--max-restarts). See the README's "Running on a cluster".
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: tools/launch/torchrun_multinode.sh [OPTIONS] COMMAND CONFIG [--set SECTION.KEY=VALUE ...]

Starts this node's torchrun agent, which runs `python -m megads.cli COMMAND CONFIG --set ...` on each of
its ranks (COMMAND: train, sft or grpo). Run it on every node with the same --nnodes, --rdzv-endpoint and
--rdzv-id. Each option can also come from the environment variable in brackets; an option wins.

  --nnodes N            nodes (one agent each) in the job                          [NNODES; default 1]
  --nproc-per-node N    ranks on this node, one per GPU       [NPROC_PER_NODE; default: the GPUs visible, else 1]
  --rdzv-endpoint H:P   where the agents meet: a host of the job and a free port
                        (the agent on that host serves the store)   [RDZV_ENDPOINT, else MASTER_ADDR:MASTER_PORT;
                                                             required with several nodes; one node: localhost:0]
  --rdzv-id ID          the job's name at the endpoint: the same on every node, new for every job
                                                  [RDZV_ID; required with several nodes; one node: a random one]
  --rdzv-backend B      c10d, or static (fixed node ranks, no re-rendezvous)       [RDZV_BACKEND; default c10d]
  --node-rank R         this node's rank; static backend only (c10d numbers the nodes itself)  [NODE_RANK; default 0]
  --max-restarts N      times all ranks are restarted after one fails; each restart resumes from
                        the latest checkpoint                                          [MAX_RESTARTS; default 3]
  --shutdown-timeout S  after a SIGTERM, seconds the ranks get to finish their step and save a checkpoint
                        before torchrun kills them (torchrun's own default is 30)  [SHUTDOWN_TIMEOUT; default 300]
  -h, --help            this message

PYTHON names the interpreter that has megads and torch (default: python3).

Example (two nodes of 8 GPUs; node1 serves the rendezvous):
  # on node1 and on node2:
  tools/launch/torchrun_multinode.sh --nnodes 2 --nproc-per-node 8 --rdzv-endpoint node1:29400 \
      --rdzv-id run42 train examples/configs/tiny.yaml --set parallel.tensor_parallel=8 train.global_batch_size=16
EOF
}

die() {  # a missing or malformed value: one sentence, exit status 2 (as megads's configuration errors)
  echo "torchrun_multinode.sh: $1" >&2
  echo "Run tools/launch/torchrun_multinode.sh --help for the options." >&2
  exit 2
}

nnodes=${NNODES:-1}
nproc_per_node=${NPROC_PER_NODE:-}
rdzv_endpoint=${RDZV_ENDPOINT:-}
if [[ -z "$rdzv_endpoint" && -n "${MASTER_ADDR:-}" && -n "${MASTER_PORT:-}" ]]; then
  rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT"
fi
rdzv_id=${RDZV_ID:-}
rdzv_backend=${RDZV_BACKEND:-c10d}
node_rank=${NODE_RANK:-0}
max_restarts=${MAX_RESTARTS:-3}
shutdown_timeout=${SHUTDOWN_TIMEOUT:-300}

while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --nnodes|--nproc-per-node|--rdzv-endpoint|--rdzv-id|--rdzv-backend|--node-rank|--max-restarts|--shutdown-timeout)
      [[ $# -ge 2 ]] || die "$1 needs a value."
      case "$1" in
        --nnodes) nnodes=$2 ;;
        --nproc-per-node) nproc_per_node=$2 ;;
        --rdzv-endpoint) rdzv_endpoint=$2 ;;
        --rdzv-id) rdzv_id=$2 ;;
        --rdzv-backend) rdzv_backend=$2 ;;
        --node-rank) node_rank=$2 ;;
        --max-restarts) max_restarts=$2 ;;
        --shutdown-timeout) shutdown_timeout=$2 ;;
      esac
      shift 2 ;;
    --) shift; break ;;
    -*) die "unknown option $1." ;;
    *) break ;;
  esac
done

[[ $# -ge 2 ]] || { usage >&2; die "COMMAND and CONFIG are required (e.g. train examples/configs/tiny.yaml)."; }

if [[ -z "$nproc_per_node" ]]; then
  # One rank per GPU this node lets us see: CUDA_VISIBLE_DEVICES (SLURM sets it for --gpus-per-node),
  # else nvidia-smi's list; a node without GPUs runs one rank (CPU, gloo).
  if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
    IFS=, read -ra visible <<<"$CUDA_VISIBLE_DEVICES"
    nproc_per_node=${#visible[@]}
  else
    nproc_per_node=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    [[ "$nproc_per_node" -gt 0 ]] 2>/dev/null || nproc_per_node=1
  fi
fi

for pair in "nnodes:$nnodes" "nproc-per-node:$nproc_per_node" "node-rank:$node_rank" "max-restarts:$max_restarts" \
            "shutdown-timeout:$shutdown_timeout"; do
  [[ "${pair#*:}" =~ ^[0-9]+$ ]] || die "--${pair%%:*} must be a whole number, got '${pair#*:}'."
done
[[ "$nnodes" -ge 1 && "$nproc_per_node" -ge 1 ]] || die "--nnodes and --nproc-per-node must be at least 1."
[[ "$rdzv_backend" == c10d || "$rdzv_backend" == static ]] || die "--rdzv-backend must be c10d or static, got '$rdzv_backend'."

if [[ "$nnodes" -gt 1 ]]; then
  # Guessing either would let the nodes of one job wait for each other forever, or join another job.
  [[ -n "$rdzv_endpoint" ]] || die "--rdzv-endpoint (or RDZV_ENDPOINT, or MASTER_ADDR and MASTER_PORT) is required with $nnodes nodes."
  [[ -n "$rdzv_id" ]] || die "--rdzv-id (or RDZV_ID) is required with $nnodes nodes: the same on every node of the job."
else
  rdzv_endpoint=${rdzv_endpoint:-localhost:0}   # what torchrun --standalone uses: a free port here
  rdzv_id=${rdzv_id:-megads-$$-$RANDOM}
fi
[[ "$rdzv_endpoint" == *:* ]] || die "--rdzv-endpoint must be HOST:PORT, got '$rdzv_endpoint'."
[[ "$node_rank" -lt "$nnodes" ]] || die "--node-rank ($node_rank) must be below --nnodes ($nnodes)."

args=(--nnodes "$nnodes" --nproc-per-node "$nproc_per_node" --rdzv-backend "$rdzv_backend"
      --rdzv-endpoint "$rdzv_endpoint" --rdzv-id "$rdzv_id" --max-restarts "$max_restarts"
      --shutdown-timeout "$shutdown_timeout")
if [[ "$rdzv_backend" == static ]]; then  # c10d numbers the nodes itself (torchrun warns about a --node-rank)
  args+=(--node-rank "$node_rank")
fi

python=${PYTHON:-python3}
# The config and its layout on nnodes x nproc-per-node ranks, checked once here: a problem is then one
# sentence (exit 2, as from megads) instead of one per rank per restart, since restarting never fixes it.
"$python" "$(dirname "${BASH_SOURCE[0]}")/check_config.py" "$((nnodes * nproc_per_node))" "$@" || exit $?

# exec: SIGTERM (SLURM's time limit or preemption, scancel, kill) reaches torchrun itself, which
# passes it to every rank; megads finishes the step, saves a checkpoint and exits 143.
exec "$python" -m torch.distributed.run "${args[@]}" -m megads.cli "$@"

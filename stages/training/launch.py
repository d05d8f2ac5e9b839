"""The launch piece: a training stage's command line for its allocation, from the rule's resources.

    1 process (CPU, one GPU)   python -m stages.pretrain ARGS
    1 node, G GPUs             torchrun --standalone --nproc-per-node=G -m stages.pretrain ARGS
    N nodes, G GPUs each       srun --nodes=N --ntasks-per-node=1 --kill-on-bad-exit=1 torchrun --nnodes=N
                                 --nproc-per-node=G --rdzv-backend=c10d --rdzv-endpoint=<first node>:PORT
                                 --rdzv-id=$SLURM_JOB_ID -m stages.pretrain ARGS

srun starts one torchrun per node inside the SLURM allocation; the torchruns meet at the c10d rendezvous on the
job's first node and start G ranks each (RANK / WORLD_SIZE / LOCAL_RANK, read by stages/training/parallel.World).
The same stage CLI runs in every case; the backend (pretrain.backend) picks FSDP2 or Megatron-core inside.

    python -m stages.training.launch --nodes 4 --gpus-per-node 8 -- python -m stages.pretrain --plan ...
prints the command (a sbatch script or the rule's shell uses it).
"""
from __future__ import annotations

import argparse
import shlex

FIRST_NODE = '$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)'


def launch_prefix(module: str, nodes: int = 1, gpus_per_node: int = 0, port: int = 29500) -> str:
    """The command that runs `python -m module` on nodes x gpus_per_node ranks (the stage's arguments follow)."""
    if nodes < 1 or gpus_per_node < 0:
        raise ValueError(f"launch: nodes={nodes}, gpus_per_node={gpus_per_node}")
    if nodes == 1 and gpus_per_node <= 1:
        return f"python -m {module}"
    if nodes == 1:
        return f"torchrun --standalone --nproc-per-node={gpus_per_node} -m {module}"
    return (f"srun --nodes={nodes} --ntasks-per-node=1 --kill-on-bad-exit=1 torchrun --nnodes={nodes} "
            f"--nproc-per-node={gpus_per_node} --rdzv-backend=c10d --rdzv-endpoint={FIRST_NODE}:{port} "
            f"--rdzv-id=$SLURM_JOB_ID -m {module}")


def launch_command(cli: list[str], nodes: int = 1, gpus_per_node: int = 0, port: int = 29500) -> str:
    """`cli` = ["python", "-m", module, *args] as the launch line (args shell-quoted)."""
    if cli[:2] != ["python", "-m"] or len(cli) < 3:
        raise ValueError(f"launch: expected python -m <module> ..., got {cli[:3]}")
    return " ".join([launch_prefix(cli[2], nodes, gpus_per_node, port), *map(shlex.quote, cli[3:])])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--gpus-per-node", type=int, default=0)
    ap.add_argument("--port", type=int, default=29500)
    ap.add_argument("cli", nargs=argparse.REMAINDER, help="-- python -m stages.<stage> ARGS")
    args = ap.parse_args()
    cli = args.cli[1:] if args.cli[:1] == ["--"] else args.cli
    print(launch_command(cli, args.nodes, args.gpus_per_node, args.port))


if __name__ == "__main__":
    main()

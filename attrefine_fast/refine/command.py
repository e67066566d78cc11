"""``attrefine-fast refine``: train one model (ERM, PGD-AT or refinement) from a config file and
flags; runs as is under ``torchrun --nproc_per_node N`` (DDP, gloo on CPU, NCCL on GPU)."""
from __future__ import annotations

import argparse
import json

from .config import add_config_arguments, config_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--resume", action="store_true",
                        help="continue exactly from OUT/checkpoint.pt when it exists (give the same settings as the "
                             "interrupted run: a different one is refused); without it a run in a used OUT starts afresh")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads per process (default: torch's choice)")
    parser.add_argument("--stop-after", type=int, default=None, help="stop once this many epochs are complete (resume later)")


def run(args: argparse.Namespace) -> None:
    from .trainer import Refiner

    cfg = config_from_args(args)
    if args.stop_after is not None and args.stop_after < 1:
        raise ValueError(f"--stop-after must be >= 1, got {args.stop_after}")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    refiner = Refiner(cfg)
    refiner.fit(resume=args.resume, stop_after=args.stop_after)
    if refiner.rank == 0:
        print(json.dumps({"out": cfg.out, "mode": cfg.mode, "epochs_done": refiner.epoch, "epochs": cfg.epochs}))
    if refiner.world_size > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()

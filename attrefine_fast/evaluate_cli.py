"""``attrefine-fast evaluate``: the robustness report of a checkpoint (or a freshly built model).

    attrefine-fast evaluate --checkpoint runs/erm/model.pt --dataset digits --out eval/
    attrefine-fast evaluate --checkpoint wrn.pt --dataset cifar10 --data-dir data/ \\
        --cifar-c-dir data/ --autoattack --out eval/

Writes ``report.json`` and the PNG plots to ``--out`` and prints the table.
"""
from __future__ import annotations

import argparse
import json
import os
from fractions import Fraction

from .checks import check_device


def parse_eps(text: str) -> float:
    """'8/255', '0.5' or '8' with a '/255' suffix elsewhere: a radius as a float."""
    try:
        return float(Fraction(text.strip()))
    except (ValueError, ZeroDivisionError) as e:
        raise argparse.ArgumentTypeError(f"not a radius: {text!r} (write e.g. 8/255 or 0.5)") from e


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .corruptions import CORRUPTIONS
    from .data import DATASETS
    from .models import MODELS

    src = parser.add_argument_group("model (one of)")
    src.add_argument("--checkpoint", help="a checkpoint written by attrefine_fast.models.save_checkpoint")
    src.add_argument("--arch", help=f"build a randomly initialized model instead (a smoke test): {', '.join(MODELS)}")
    src.add_argument("--num-classes", type=int, help="with --arch: outputs (default: the dataset's classes)")
    src.add_argument("--normalization", help="with --arch: 'cifar10', 'cifar100' or none (default)")
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", default="digits", choices=DATASETS, help="default: digits (embedded, no files)")
    data.add_argument("--data-dir", help="folder with the CIFAR python archive or its extracted folder")
    data.add_argument("--split", default="test", choices=("train", "test"), help="(default test)")
    data.add_argument("--cifar-c-dir", help="read corruptions from the CIFAR-10-C / CIFAR-100-C .npy files here "
                      "instead of generating them")
    data.add_argument("--cifar-md5", help="a JSON file {file name: md5} for a CIFAR copy other than the standard "
                      "release (the published checksums are checked otherwise)")
    data.add_argument("--max-samples", type=int, help="evaluate on the first n samples only")
    att = parser.add_argument_group("attacks")
    att.add_argument("--norm", default="linf", choices=("linf", "l2"), help="threat model (default linf)")
    att.add_argument("--eps", type=parse_eps, nargs="+", default=None,
                     help="radii, e.g. 8/255 (default 2/255 4/255 8/255 16/255 for linf, 0.25 0.5 1 for l2)")
    att.add_argument("--pgd-steps", type=int, nargs="*", default=[10, 50], help="PGD iteration counts (default 10 50)")
    att.add_argument("--no-fgsm", action="store_true", help="skip FGSM")
    att.add_argument("--autoattack", action="store_true", help="add torchattacks' AutoAttack (slow)")
    att.add_argument("--autoattack-eps", type=parse_eps, default=None, help="default 8/255 (linf) or 0.5 (l2)")
    cor = parser.add_argument_group("corruptions")
    cor.add_argument("--corruptions", nargs="*", default=None,
                     help=f"names (default: the standard set; none given: skip). Generated: {', '.join(CORRUPTIONS)}")
    cor.add_argument("--severities", type=int, nargs="+", default=[1, 2, 3, 4, 5], help="1 to 5 (default: all five)")
    run_ = parser.add_argument_group("run")
    run_.add_argument("--batch-size", type=int, default=256, help="images per forward pass (default 256)")
    run_.add_argument("--seed", type=int, default=0, help="seeds the attacks' random starts and the corruptions (default 0)")
    run_.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    run_.add_argument("--out", default="eval", help="output folder (default: eval)")
    run_.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> dict:
    import torch

    from .cifar import read_md5_file
    from .data import load_dataset
    from .evaluate import evaluate, format_table, plot_report
    from .models import build_model, load_checkpoint, move_to_device

    if (args.checkpoint is None) == (args.arch is None):
        raise SystemExit("evaluate: give exactly one of --checkpoint PATH or --arch NAME")
    device = check_device("--device", args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    os.makedirs(args.out, exist_ok=True)  # before the work: a bad --out fails at once
    extra = {}
    if args.cifar_md5 is not None:
        extra["md5"] = read_md5_file(args.cifar_md5)
    if args.checkpoint is not None:
        model, ckpt = load_checkpoint(args.checkpoint, device=device)
        trained_at = ckpt.get("image_size")  # (H, W) of the training images, where refine wrote the checkpoint
        if args.dataset == "digits" and trained_at is not None and trained_at[0] == trained_at[1]:
            extra["size"] = int(trained_at[0])  # the digits at the size the model was trained at
    dataset = load_dataset(args.dataset, args.split, args.data_dir, **extra)
    if args.checkpoint is not None:
        if int(ckpt["num_classes"]) != dataset.num_classes:
            raise SystemExit(f"evaluate: the checkpoint has {ckpt['num_classes']} classes, {args.dataset} has {dataset.num_classes}")
        source = os.fspath(args.checkpoint)
    else:
        normalization = None if args.normalization in (None, "none") else args.normalization
        num_classes = dataset.num_classes if args.num_classes is None else args.num_classes
        model = move_to_device(build_model(args.arch, num_classes, normalization=normalization), args.arch, device)
        source = f"{args.arch} (random initialization)"
        print(f"note: {source}: the numbers below describe an untrained model")
    cifar_c = None
    if args.cifar_c_dir is not None:
        if args.dataset not in ("cifar10", "cifar100"):
            raise SystemExit("evaluate: --cifar-c-dir needs --dataset cifar10 or cifar100")
        cifar_c = (args.dataset, args.cifar_c_dir)
    report = evaluate(
        model, dataset,
        eps=args.eps if args.eps is not None else ((2 / 255, 4 / 255, 8 / 255, 16 / 255) if args.norm == "linf" else (0.25, 0.5, 1.0)),
        norm=args.norm,
        pgd_steps=args.pgd_steps, fgsm=not args.no_fgsm, autoattack=args.autoattack,
        autoattack_eps=args.autoattack_eps if args.autoattack_eps is not None else (8 / 255 if args.norm == "linf" else 0.5),
        corruptions=None if args.corruptions is None else tuple(args.corruptions),
        severities=tuple(args.severities), max_samples=args.max_samples, batch_size=args.batch_size,
        seed=args.seed, progress=not args.no_progress, device=device, cifar_c=cifar_c,
    )
    report["model"] = source
    path = os.path.join(args.out, "report.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    plots = plot_report(report, args.out)
    print(format_table(report))
    print(f"\nwrote {path}" + "".join(f", {p}" for p in plots))
    return report

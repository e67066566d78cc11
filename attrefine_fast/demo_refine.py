"""``attrefine-fast demo``: the main job. Standard training (ERM), PGD adversarial training and
attribution-aware refinement of the same small CNN on the embedded digits (32x32x3), at equal
epochs and attack budget, on the CPU; then clean, FGSM and PGD accuracy over epsilon, corruption
accuracy and the attribution-aware bound of each model, as one table, report.json and PNGs.
``--spurious-patch P`` gives the digits a class-coloured corner square that agrees with the label
with probability P, and scores each model on the same digits with the square in a random colour.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
import warnings

from .refine.config import FILLS

MODES = ("erm", "pgd_at", "refine")
# The ablation: the refinement loop with no flags ever (clean CE + alpha * PGD CE), to tell
# what the LIME-guided terms add to the clean term refinement has and PGD-AT has not.
NAMES = {"erm": "ERM", "pgd_at": "PGD-AT", "refine": "Refined", "no_flags": "NoFlags"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="outputs/demo", help="folder of report.json, the PNGs and the runs")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per model (default 10; --quick: 2)")
    parser.add_argument("--cycles", type=int, default=None, help="refinement cycles the epochs are split into, >= 2 (the refinement explains from its second cycle on); must divide --epochs (default: the most up to 5, --quick 2, that do)")
    parser.add_argument("--eps", type=float, default=0.05, help="L-inf training attack radius shared by PGD-AT and refinement (default 0.05)")
    parser.add_argument("--eval-samples", type=int, default=None, help="test images evaluated (default 450: all; --quick: 32)")
    parser.add_argument("--bound-samples", type=int, default=None, help="test images for the bound (default 64; --quick: 8)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the models, the data order and the explanations (default 0)")
    parser.add_argument("--ablation", action="store_true", help="also train the refinement loop without flags (NoFlags)")
    parser.add_argument("--spurious-patch", type=float, default=None, metavar="CORRELATION",
                        help="give the digits a spurious feature: a corner square coloured after the class with this "
                             "probability (train and test alike), and report accuracy when its colour is random ('shuffled')")
    parser.add_argument("--fill", default="mean", choices=FILLS,
                        help="what replaces flagged superpixels in refinement's masked term (default mean: each one's mean colour)")
    parser.add_argument("--lam", type=float, default=None,
                        help="weight of refinement's input-gradient penalty on the flagged pixels (default: RefineConfig's, 10)")
    parser.add_argument("--tau", type=float, default=None,
                        help="detection: a superpixel below this relevance and above --eps-s sensitivity is flagged (default: RefineConfig's, 0.02)")
    parser.add_argument("--eps-s", type=float, default=None, help="detection: the sensitivity threshold (default: RefineConfig's, 0.08)")
    parser.add_argument("--delta", type=float, default=None,
                        help="detection: a superpixel whose relevance moves more than this under attack is flagged (default: RefineConfig's, 0.15)")
    parser.add_argument("--quick", action="store_true", help="a tiny run for smoke tests (well under a minute)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--device", default="cpu", help="where to train and evaluate (default cpu: the main job is a CPU run)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on these small convolutions one thread is faster, and many times "
                             "faster on a busy machine, where threads wait for each other)")


def _given(args, name: str, default: int) -> int:
    value = getattr(args, name)
    if value is not None and value < 1:
        raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    return default if value is None else value


def _cycles(epochs: int, given: int | None, default: int) -> int:
    """The cycles the epochs are split into: as given (which must divide them), else the most
    cycles up to the default that divide them; at least 2, since the refinement explains from its
    second cycle on (with one it would train as the no-flags ablation, under the refined name)."""
    if given is None:
        fits = [c for c in range(2, min(default, epochs) + 1) if epochs % c == 0]
        if not fits:
            raise ValueError(f"--epochs {epochs} does not split into 2 to {default} equal cycles, and the refinement "
                             "explains from its second cycle on: give --cycles (>= 2, dividing --epochs) or other --epochs")
        return max(fits)
    if given < 2:
        raise ValueError(f"--cycles must be >= 2: the refinement explains from its second cycle on, got {given}")
    if epochs % given:
        raise ValueError(f"--epochs {epochs} must be a multiple of --cycles {given} (every cycle has the same epochs)")
    return given


def _settings(args) -> dict:
    quick = args.quick
    epochs = _given(args, "epochs", 2 if quick else 10)
    return {
        "epochs": epochs,
        "cycles": _cycles(epochs, None if args.cycles is None else _given(args, "cycles", 0), 2 if quick else 5),
        "train_subset": 128 if quick else None,
        "eval_samples": _given(args, "eval_samples", 32 if quick else 450),
        "bound_samples": _given(args, "bound_samples", 8 if quick else 64),
        "eval_eps": [0.03, 0.1] if quick else [0.02, 0.05, 0.1, 0.15],
        "corruptions": ["gaussian_noise"] if quick else ["gaussian_noise", "impulse_noise", "defocus_blur", "contrast", "pixelate"],
        "severities": [3] if quick else [1, 3, 5],
        "lime_samples": 24 if quick else 64,
        "refresh_fraction": 0.25 if quick else 0.2,
        "heatmap_images": 3 if quick else 6,
    }


def _patched(train, test, correlation):
    """The train and test digits with the spurious patch at ``correlation``, and the test digits
    with its colour random (correlation 0); each drawn from its own fixed seed."""
    from .data import add_spurious_patch

    return (add_spurious_patch(train, correlation, seed=0), add_spurious_patch(test, correlation, seed=1),
            add_spurious_patch(test, 0.0, seed=2))


def _config(name: str, s: dict, args):
    from .refine import RefineConfig

    cycles = s["cycles"]
    mode = "refine" if name == "no_flags" else name
    never = {"explain_from_cycle": cycles} if name == "no_flags" else {}
    return RefineConfig(
        mode=mode, cycles=cycles, **never, epochs_per_cycle=s["epochs"] // cycles, train_subset=s["train_subset"],
        width=16, batch_size=64, lr=0.1, eps=args.eps, attack_steps=3, lime_samples=s["lime_samples"], refresh_fraction=s["refresh_fraction"],
        seed=args.seed, out=os.path.join(args.out, "runs", name), progress=not args.no_progress, device=args.device,
        spurious_patch=args.spurious_patch, fill=args.fill,
        **{k: getattr(args, k) for k in ("lam", "tau", "eps_s", "delta") if getattr(args, k) is not None},
    )


def _detect(model, cfg, images, labels, seed):
    """Flags of ``images`` for ``model`` with the run's detection settings."""
    from .refine import detect_spurious
    from .segmentation import segment

    segments, counts = segment(images, cfg.segmentation, **cfg.segmentation_params)
    return detect_spurious(model, images, labels, segments, counts, seed=seed, **cfg.detect_kwargs())


def _patch_detection(det) -> dict:
    """What the detection and LIME see of the spurious patch: the share of images with a flagged
    superpixel on it, and LIME's mean share of |weight| on the superpixels it covers."""
    import torch

    from .data import SPURIOUS_PATCH_SIZE as size

    b = det.segments.shape[0]
    on_patch = torch.zeros_like(det.flags).scatter_(1, det.segments[:, :size, :size].reshape(b, -1).long(), True)
    return {"flagged": float((det.flags & on_patch).any(dim=1).float().mean()),
            "relevance_share": float((det.relevance.abs() * on_patch).sum(dim=1).mean())}


def _bound(model, cfg, det, images, labels, seed) -> dict:
    """The bound on ``images`` with the model's own flags ``det``, beside the empirical flipping eps."""
    from .refine import attribution_bound, correlation, empirical_min_eps

    b = attribution_bound(model, images, labels, det.pixel_mask(), norm=cfg.norm)
    emp, flipped = empirical_min_eps(model, images, labels, eps_max=0.3, iterations=5, steps=10, norm=cfg.norm, seed=seed)
    keep = (b["margin"] > 0).cpu() & flipped
    est = b["estimate"].cpu()
    corr = correlation(est[keep].tolist(), emp[keep].tolist())
    return {
        "samples": len(labels), "used": int(keep.sum()), "eps_max": 0.3,
        "mean_estimate": float(est[keep].mean()) if keep.any() else float("nan"),
        "mean_empirical_eps": float(emp[keep].mean()) if keep.any() else float("nan"),
        "median_empirical_eps_all": float(emp.median()), "not_flipped_at_eps_max": int((~flipped).sum()),
        "mean_rho": float(b["rho"].mean()), "flagged_fraction": float(det.flags.sum()) / float(det.counts.sum()),
        "pearson": corr["pearson"], "spearman": corr["spearman"],
        "per_sample": {"estimate": est.tolist(), "empirical_eps": emp.tolist(), "flipped": flipped.tolist(),
                       "rho": b["rho"].tolist(), "margin": b["margin"].tolist()},
    }


def _table(results: dict, eps: list) -> str:
    def pct(v):
        return "   -  " if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:6.1f}"

    def num(v, fmt="{:7.3f}"):
        return "    -  " if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)

    shuffled = any("shuffled_patch_accuracy" in r for r in results.values())
    cols = ["clean"] + (["shuffled", "patch flg"] if shuffled else []) + [f"FGSM {e:g}" for e in eps] + [f"PGD10 {e:g}" for e in eps]
    cols += ["corrupt", "est.eps", "emp.eps", "spear", "rho", "train s"]
    lines = [f"{'model':<9}" + "".join(f"{c:>11}" for c in cols)]
    for mode, r in results.items():
        ev, bd = r["evaluation"], r["bound"]
        cells = [pct(ev["clean_accuracy"])]
        if shuffled:
            cells += [pct(r["shuffled_patch_accuracy"]), pct(r["patch_detection"]["flagged"])]
        cells += [pct(a) for a in ev["fgsm"]] + [pct(a) for a in ev["pgd"]["PGD-10"]]
        cells += [pct((ev["corruptions"] or {}).get("mean")), num(bd["mean_estimate"]), num(bd["mean_empirical_eps"]),
                  num(bd["spearman"], "{:7.2f}"), num(bd["mean_rho"], "{:7.2f}"), f"{r['train_seconds']:7.0f}"]
        lines.append(f"{NAMES[mode]:<9}" + "".join(f"{c:>11}" for c in cells))
    lines.append("accuracy in % (L-inf eps on [0, 1] pixels); corrupt: mean corruption accuracy; est.eps: mean margin/(L_R+L_S)")
    lines.append("(first-order estimate, not a certificate); emp.eps: mean smallest PGD eps that flips (bisection); spear: their")
    lines.append("Spearman correlation over samples; rho: mean alignment L_R/(L_R+L_S) on the model's own flags.")
    if shuffled:
        lines.append("shuffled: clean accuracy on the test digits with the spurious patch in a random colour; patch flg: share of the")
        lines.append("bound's images whose flags (the model's own detection) cover part of the patch.")
    return "\n".join(lines)


def _plot_accuracy(results: dict, eps: list, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [0.0] + list(eps)
    for mode, r in results.items():
        ev = r["evaluation"]
        line = ax.plot(xs, [ev["clean_accuracy"]] + ev["pgd"]["PGD-10"], marker="o", label=f"{NAMES[mode]} PGD-10")[0]
        ax.plot(xs, [ev["clean_accuracy"]] + ev["fgsm"], marker="x", linestyle="--", color=line.get_color(), label=f"{NAMES[mode]} FGSM")
    ax.set_xlabel("L-inf epsilon"), ax.set_ylabel("accuracy"), ax.set_ylim(0, 1), ax.grid(alpha=0.3), ax.legend(fontsize=7)
    ax.set_title("digits 32x32: accuracy vs attack radius")
    fig.tight_layout(), fig.savefig(path, dpi=120), plt.close(fig)


def _plot_explanations(images, panels: list, path: str) -> None:
    """One row per image: the image, then per model its LIME heat map with flagged superpixels outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    n = images.shape[0]
    fig, axes = plt.subplots(n, 1 + len(panels), figsize=(2 * (1 + len(panels)), 2 * n), squeeze=False)
    for i in range(n):
        axes[i, 0].imshow(images[i].permute(1, 2, 0).numpy())
        axes[i, 0].set_title("image" if i == 0 else "", fontsize=8)
        for k, (title, heat, flagged) in enumerate(panels):
            ax = axes[i, k + 1]
            lim = float(np.abs(heat[i]).max()) or 1.0
            ax.imshow(heat[i], cmap="RdBu_r", vmin=-lim, vmax=lim)
            if flagged[i].any():
                ax.contour(flagged[i], levels=[0.5], colors="yellow", linewidths=1.2)
            ax.set_title(title if i == 0 else "", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([]), ax.set_yticks([])
    fig.tight_layout(), fig.savefig(path, dpi=110), plt.close(fig)


def run(args: argparse.Namespace) -> None:
    import torch

    from .data import load_digits
    from .evaluate import accuracy, evaluate
    from .refine import Refiner

    start = time.perf_counter()
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.spurious_patch is not None and not 0.0 <= args.spurious_patch <= 1.0:
        raise ValueError(f"--spurious-patch must be a correlation in [0, 1], got {args.spurious_patch}")
    torch.set_num_threads(args.threads)
    s = _settings(args)
    os.makedirs(args.out, exist_ok=True)
    train, test = load_digits("train", size=32), load_digits("test", size=32).subset(s["eval_samples"])
    shuffled = None
    if args.spurious_patch is not None:
        train, test, shuffled = _patched(train, test, args.spurious_patch)
    print(f"digits 32x32x3: {len(train) if s['train_subset'] is None else s['train_subset']} training images, {len(test)} test images; "
          f"{s['epochs']} epochs per model, training attack: PGD-3 at L-inf eps={args.eps}"
          + ("" if shuffled is None else f"; a spurious patch agreeing with the class at p={args.spurious_patch:g}"), flush=True)
    results: dict = {}
    models: dict = {}
    for mode in MODES + (("no_flags",) if args.ablation else ()):
        cfg = _config(mode, s, args)
        print(f"[{time.perf_counter() - start:6.0f}s] training {NAMES[mode]} ({cfg.cycles} cycles x {cfg.epochs_per_cycle} epochs)", flush=True)
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            if mode == "no_flags":  # the ablation never explains, on purpose
                warnings.filterwarnings("ignore", "mode='refine' explains from cycle", UserWarning)
            refiner = Refiner(cfg, train=train)
        model = refiner.fit().eval()
        models[mode] = (model, cfg)
        metrics = [json.loads(line) for line in open(os.path.join(cfg.out, "metrics.jsonl"))]
        results[mode] = {"train_seconds": time.perf_counter() - t0, "config": cfg.to_dict(), "metrics": metrics}
    device = next(models["erm"][0].parameters()).device
    bx, by = test.tensors(device)
    bx, by = bx[: s["bound_samples"]], by[: s["bound_samples"]]
    detections = {}
    for mode, (model, cfg) in models.items():
        print(f"[{time.perf_counter() - start:6.0f}s] evaluating {NAMES[mode]}", flush=True)
        results[mode]["evaluation"] = evaluate(
            model, test, eps=s["eval_eps"], device=device, pgd_steps=(10,), fgsm=True, corruptions=s["corruptions"], severities=s["severities"],
            batch_size=256, seed=args.seed, progress=not args.no_progress,
        )
        det = detections[mode] = _detect(model, cfg, bx, by, args.seed)
        results[mode]["bound"] = _bound(model, cfg, det, bx, by, args.seed)
        if shuffled is not None:
            results[mode]["shuffled_patch_accuracy"] = accuracy(model, shuffled, device=device)
            results[mode]["patch_detection"] = _patch_detection(det)

    # Explanations before (the ERM model) and after refinement, on the first of the bound's images,
    # with the detection the bound used.
    k = s["heatmap_images"]
    panels = []
    for mode in ("erm", "refine"):
        det = detections[mode]
        segments = det.segments[:k]
        heat = torch.gather(det.relevance[:k], 1, segments.flatten(1)).reshape(segments.shape)
        panels.append((f"{NAMES[mode]}: LIME, flagged", heat.cpu().numpy(), det.pixel_mask()[:k].cpu().numpy()))
    _plot_explanations(bx[:k].cpu(), panels, os.path.join(args.out, "explanations_before_after.png"))
    _plot_accuracy(results, s["eval_eps"], os.path.join(args.out, "accuracy_vs_eps.png"))

    table = _table(results, s["eval_eps"])
    total = time.perf_counter() - start
    report = {"settings": s, "eps_train": args.eps, "seed": args.seed, "spurious_patch": args.spurious_patch, "seconds": total, "table": table,
              "torch_threads": torch.get_num_threads(), "models": results}
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump(report, f, indent=1, default=float)
    print("\n" + table)
    print(f"\nwrote {os.path.join(args.out, 'report.json')}, accuracy_vs_eps.png, explanations_before_after.png "
          f"in {total:.0f} s", flush=True)

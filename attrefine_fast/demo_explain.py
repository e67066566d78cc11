"""``attrefine-fast explain-demo``: explain scikit-image's bundled photos with our engine and
with the reference ``lime`` package; print the time of each and their agreement, and write
explanation overlays as PNGs."""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


def load_photos(names=PHOTOS, size: int = 128) -> list[np.ndarray]:
    """scikit-image's bundled photos, resized to size x size, uint8 (H, W, 3)."""
    import skimage.data
    from skimage.transform import resize

    return [(resize(getattr(skimage.data, n)(), (size, size), anti_aliasing=True) * 255).astype(np.uint8) for n in names]


def make_classifier(seed: int = 0):
    """A fixed, seeded SmallCNN with softmax outputs, as a torch module and as lime's numpy
    function of (n, H, W, 3) uint8 arrays."""
    from .models import SmallCNN

    torch.manual_seed(seed)
    net = torch.nn.Sequential(SmallCNN(num_classes=10, width=16), torch.nn.Softmax(dim=1)).eval()

    class Pixels(torch.nn.Module):  # the model sees [0, 1] pixels; images hold 0..255
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x.float() / 255.0).double()

    module = Pixels().eval()

    def classifier_fn(batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2)).numpy()

    return module, classifier_fn


def agreement(a, b) -> dict:
    """Largest coefficient / intercept / score difference and top-5 overlap of two lime-style
    explanations over their common labels."""
    coef = icpt = 0.0
    overlap = []
    for label in a.local_exp:
        wa, wb = dict(a.local_exp[label]), dict(b.local_exp[label])
        coef = max(coef, max(abs(wa[f] - wb.get(f, 0.0)) for f in wa))
        icpt = max(icpt, abs(a.intercept[label] - b.intercept[label]))
        top_a = {f for f, _ in a.local_exp[label][:5]}
        top_b = {f for f, _ in b.local_exp[label][:5]}
        overlap.append(len(top_a & top_b) / max(1, len(top_a)))
    return {"coef": coef, "intercept": icpt, "score": abs(a.score - b.score), "top5_overlap": float(np.mean(overlap))}


def save_overlay(path: str, image: np.ndarray, explanations: dict, label) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from skimage.segmentation import mark_boundaries

    fig, axes = plt.subplots(1, 1 + len(explanations), figsize=(3.2 * (1 + len(explanations)), 3.4))
    axes[0].imshow(image)
    axes[0].set_title("image")
    for ax, (name, exp) in zip(axes[1:], explanations.items()):
        weights = dict(exp.local_exp[label])
        heat = np.vectorize(lambda s: weights.get(s, 0.0))(exp.segments)
        lim = max(1e-12, np.abs(heat).max())
        ax.imshow(mark_boundaries(image, exp.segments))
        ax.imshow(heat, cmap="RdBu_r", vmin=-lim, vmax=lim, alpha=0.55)
        ax.set_title(f"{name}: class {label}")
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    p.add_argument("--num-samples", type=int, default=1000, help="perturbed samples per image (default 1000, lime's)")
    p.add_argument("--seed", type=int, default=0, help="seeds the model and the samples (default 0)")
    p.add_argument("--out", default="outputs/explain-demo", help="folder for the overlay PNGs (default: outputs/explain-demo)")
    p.add_argument("--no-lime", action="store_true", help="skip the reference lime package")


def run(args) -> None:
    import attrefine_fast
    from . import lime as ours
    from .benchmarking.inputs import quiet_lime
    from .explain import explain

    if args.size < 8 or args.num_samples < 2:
        raise ValueError(f"need --size >= 8 and --num-samples >= 2, got {args.size} and {args.num_samples}")
    os.makedirs(args.out, exist_ok=True)
    photos = load_photos(size=args.size)
    module, classifier_fn = make_classifier(args.seed)
    try:
        from lime import lime_image
    except ImportError:
        lime_image = None
        print("lime is not installed (pip install lime==0.2.0.1): showing our engine only")
    use_lime = lime_image is not None and not args.no_lime
    print(f"Explaining {len(photos)} photos ({args.size}x{args.size}, N={args.num_samples}, top 5 labels), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'photo':10s} {'segs':>4s} {'lime s':>7s} {'ours s':>7s} {'speedup':>7s} {'max|dcoef|':>10s} {'top5':>5s}")
    totals = {"lime": 0.0, "ours": 0.0}
    for name, image in zip(PHOTOS, photos):
        exps, times = {}, {}
        if use_lime:
            t = time.perf_counter()
            with quiet_lime():  # lime's per-sample bar, for this call only
                exps["lime"] = lime_image.LimeImageExplainer(random_state=args.seed).explain_instance(
                    image, classifier_fn, num_samples=args.num_samples, top_labels=5)
            times["lime"] = time.perf_counter() - t
        t = time.perf_counter()
        exps["attrefine_fast"] = ours.LimeImageExplainer(random_state=args.seed).explain_instance(
            image, module, num_samples=args.num_samples, top_labels=5, channels_last=True)
        times["ours"] = time.perf_counter() - t
        totals["ours"] += times["ours"]
        segs = int(exps["attrefine_fast"].segments.max()) + 1
        if use_lime:
            totals["lime"] += times["lime"]
            agree = agreement(exps["lime"], exps["attrefine_fast"])
            print(f"{name:10s} {segs:4d} {times['lime']:7.2f} {times['ours']:7.2f} {times['lime'] / times['ours']:6.1f}x "
                  f"{agree['coef']:10.1e} {agree['top5_overlap']:5.2f}")
        else:
            print(f"{name:10s} {segs:4d} {'-':>7s} {times['ours']:7.2f}")
        save_overlay(os.path.join(args.out, f"{name}.png"), image, exps, exps["attrefine_fast"].top_labels[0])

    photos_u8 = torch.stack([torch.from_numpy(p).permute(2, 0, 1) for p in photos])
    t = time.perf_counter()
    # The uint8 photos, as lime segments them: quickshift reads uint8 as [0, 1] but takes float
    # values as they are, so 0..255 floats would give far finer superpixels than the rows above.
    segments, _ = attrefine_fast.segment(photos_u8)
    t_seg = time.perf_counter() - t
    images = photos_u8.float()
    t = time.perf_counter()
    batched = explain(lambda x: module(x).float(), images, segments=segments, num_samples=args.num_samples,
                      top_labels=5, seed=args.seed, output="identity", channels_last=True)
    t_batch = time.perf_counter() - t
    print(f"\nbatched API: all {len(photos)} photos in one call: {t_batch:.2f} s (+ {t_seg:.2f} s segmentation), "
          f"mean weighted R^2 {float(batched.score.mean()):.3f}, segments {batched.num_segments.tolist()}")
    if use_lime:
        print(f"total: lime {totals['lime']:.2f} s, ours {totals['ours']:.2f} s ({totals['lime'] / totals['ours']:.1f}x); "
              "the same samples and coefficients (max|dcoef| is the largest difference)")
    print(f"overlays written to {args.out}/")

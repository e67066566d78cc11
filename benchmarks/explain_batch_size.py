"""Wall time of one explain() call against its forward batch size and input layout, each setting
in a fresh process (the allocator's state left by earlier calls changes the model's own time).

    python benchmarks/explain_batch_size.py [--runs R] [--settings 32:0,256:0,32:1,256:1]

Two cases: the tiny CNN on one 224x224 photo (N=1000, 5 labels: the CPU target's case) and
explain-demo's SmallCNN (width 16) on its four 128x128 photos (N=1000, 5 labels). A setting is
``batch:channels_last``. Prints, per case and setting, the R wall times of consecutive calls in
one process (the first pays the warm-up).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

CASES = ("tiny_cnn_224", "demo_photos_128")


def run_case(case: str, batch: int, channels_last: bool, runs: int) -> list[float]:
    import time

    import torch

    from attrefine_fast import explain, segment

    if case == "tiny_cnn_224":
        from attrefine_fast.benchmarking.inputs import build_model, photo_batch

        model, images = build_model("tiny_cnn", torch.device("cpu")), photo_batch(224, 1)
        kwargs = {}
    else:
        from attrefine_fast.demo_explain import load_photos, make_classifier

        module, _ = make_classifier(0)
        images = torch.stack([torch.from_numpy(p).permute(2, 0, 1) for p in load_photos(size=128)]).float()

        def model(x):
            return module(x).float()

        kwargs = {"output": "identity"}
    segments, _ = segment(images)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        explain(model, images, segments=segments, num_samples=1000, top_labels=5, seed=0, batch_size=batch,
                channels_last=channels_last, **kwargs)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--settings", default="32:0,256:0,32:1,256:1")
    parser.add_argument("--child", nargs=3, metavar=("CASE", "BATCH", "CHANNELS_LAST"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        case, batch, cl = args.child
        print(json.dumps(run_case(case, int(batch), cl == "1", args.runs)))
        return
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; wall seconds per explain() call")
    for case in CASES:
        for setting in args.settings.split(","):
            batch, cl = setting.split(":")
            out = subprocess.run([sys.executable, __file__, "--runs", str(args.runs), "--child", case, batch, cl],
                                 check=True, capture_output=True, text=True).stdout
            times = json.loads(out.strip().splitlines()[-1])
            layout = "channels-last" if cl == "1" else "NCHW"
            print(f"{case:16s} batch {int(batch):4d} {layout:13s} " + "  ".join(f"{t:6.2f}" for t in times))


if __name__ == "__main__":
    main()

"""The flagged superpixels of the whole training set, stored compactly (segments + one bool, a
byte, per superpixel), refreshed on a fraction of the set each cycle and shared by every DDP rank."""
from __future__ import annotations

import torch

from ..checks import check_segment_counts
from ..segmentation import segment
from .detect import detect_spurious, flags_to_pixels, gradient_share, input_gradient, superpixel_sums


class FlagStore:
    """segments (N, H, W) uint8/int16/int32 (the smallest that holds the labels), counts (N,),
    flags (N, M) bool, refreshed (N,) int32 (the cycle of each image's last refresh, -1 for never)."""

    def __init__(self, segments: torch.Tensor, counts: torch.Tensor):
        check_segment_counts(segments, counts)
        m = int(counts.max())
        small = torch.uint8 if m <= 256 else torch.int16 if m <= 32768 else torch.int32
        self.segments = segments.to(small).cpu()
        self.counts = counts.long().cpu()
        self.flags = torch.zeros(len(counts), m, dtype=torch.bool)
        self.refreshed = torch.full((len(counts),), -1, dtype=torch.int32)

    @classmethod
    def from_images(cls, images: torch.Tensor, method: str, params: dict) -> "FlagStore":
        segments, counts = segment(images.cpu(), method, **params)
        return cls(segments, counts)

    def __len__(self) -> int:
        return self.flags.shape[0]

    def pixel_mask(self, index: torch.Tensor, device=None) -> torch.Tensor:
        """(B, H, W) float 0/1: the flagged pixels of the training images ``index``."""
        index = index.cpu()
        return flags_to_pixels(self.flags[index], self.segments[index].long()).to(device)

    def flagged_fraction(self) -> float:
        """Flagged superpixels / superpixels, over the images refreshed at least once."""
        seen = self.refreshed >= 0
        if not bool(seen.any()):
            return 0.0
        return float(self.flags[seen].sum()) / float(self.counts[seen].sum())

    def state_dict(self) -> dict:
        return {"segments": self.segments, "counts": self.counts, "flags": self.flags, "refreshed": self.refreshed}

    def load_state_dict(self, state: dict) -> None:
        for name in ("segments", "counts", "flags", "refreshed"):
            setattr(self, name, state[name].detach().cpu().clone())  # the store lives on the CPU

    def refresh(self, model, images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor, *, cycle: int, chunk_size: int,
                detect_kwargs: dict, seed: int, device, rank: int = 0, world_size: int = 1, progress=None) -> None:
        """Re-explain the training images ``index`` with the current model and replace their flags.

        The images are cut into chunks of ``chunk_size``; chunk c uses LIME seed ``seed + c`` and goes
        to rank c mod world_size, so the flags do not depend on the number of ranks. Each rank's
        flags are summed over ranks (the chunks are disjoint), so every rank ends with all of them.
        """
        index = index.cpu()
        new_flags = torch.zeros(len(index), self.flags.shape[1], dtype=torch.uint8)
        chunks = list(range(0, len(index), chunk_size))
        for c, start in enumerate(chunks):
            if c % world_size == rank:
                rows = index[start : start + chunk_size]
                det = detect_spurious(
                    model, images[rows].to(device), labels[rows].to(device), self.segments[rows].long(), self.counts[rows],
                    seed=seed + c, **detect_kwargs,
                )
                new_flags[start : start + len(rows), : det.flags.shape[1]] = det.flags.cpu().to(torch.uint8)
            if progress is not None:
                progress(c + 1, len(chunks))
        if world_size > 1:
            import torch.distributed as dist

            new_flags = new_flags.to(device)  # NCCL reduces CUDA tensors only
            dist.all_reduce(new_flags, op=dist.ReduceOp.SUM)
            new_flags = new_flags.cpu()
        self.flags[index] = new_flags.bool()
        self.refreshed[index] = cycle

    def flagged_gradient_mass(self, model, images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor, device, batch_size: int = 256) -> dict:
        """Input-gradient mass of ``index`` on flagged pixels: the mean per image of
        sum |grad| over S, and of the share of sum |grad| falling in S."""
        mass, share = [], []
        for start in range(0, len(index), batch_size):
            rows = index[start : start + batch_size].cpu()
            x, y = images[rows].to(device), labels[rows].to(device)
            grad = input_gradient(model, x, y)
            seg = self.segments[rows].long().to(device)
            counts = self.counts[rows].to(device)
            m = self.flags.shape[1]
            per_sp = superpixel_sums(grad.abs().sum(dim=1), seg, m)
            flags = self.flags[rows].to(device)
            mass.append((per_sp * flags).sum(dim=1))
            share.append((gradient_share(grad, seg, counts)[:, :m] * flags[:, : int(counts.max())]).sum(dim=1))
        return {"flagged_grad_mass": float(torch.cat(mass).mean()), "flagged_grad_share": float(torch.cat(share).mean())}

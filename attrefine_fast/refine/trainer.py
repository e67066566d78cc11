"""One training loop for standard training ("erm"), PGD adversarial training ("pgd_at") and
attribution-aware refinement ("refine"), with checkpoints, exact resume, JSON-lines metrics,
progress bars and DDP.

    refiner = Refiner(RefineConfig(mode="refine", out="runs/r"))
    model = refiner.fit()                 # or refiner.fit(resume=True) after an interruption

Reproducibility: the epoch's order is drawn from (seed, epoch), one order shared by every rank
before it takes its shard; the epoch's other draws (attack starts, noise fills, dropout) come
from generators seeded by (seed, epoch, rank), and every LIME refresh from (seed, cycle, chunk);
so a run resumed from an epoch checkpoint (model, optimizer, scheduler, flags, epoch) continues
exactly as the uninterrupted run would have.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
import warnings

import torch

from ..checks import check_device
from ..cifar import read_md5_file
from ..data import ImageDataset, add_spurious_patch, load_dataset
from ..atomic_files import write_atomically, write_lines_atomically
from ..models import build_model, move_to_device, read_torch_file, save_checkpoint
from .config import RefineConfig
from .flags import FlagStore
from .folder_lock import folder_lock
from .loss import batch_loss, segment_mean_images

# Config keys a resumed run may change: where it runs and how it reports, not what it computes.
RESUMABLE_CHANGES = ("out", "device", "progress")
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
FINAL = "model.pt"
# Training images whose flagged-gradient mass is measured at each refresh and cycle end.
GRAD_MASS_SAMPLES = 256


def _mix(*values: int) -> int:
    """A seed from several integers (stable across runs and processes)."""
    h = 0
    for v in values:
        h = (h * 1_000_003 + int(v) + 0x9E3779B1) % (2**62)
    return h


def _distributed_context(device_name: str):
    """(rank, world_size, device): joins the torchrun process group when WORLD_SIZE > 1."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = torch.cuda.is_available() and (device_name == "auto" or str(device_name).startswith("cuda"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    if device_name == "auto":
        device_name = "cuda" if use_cuda else "cpu"
    device = check_device("device", device_name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return rank, world, device


class Refiner:
    """Train a classifier with one of the three modes of :class:`RefineConfig`.

    Args:
        cfg: the settings (``cfg.out`` is the run folder: checkpoint.pt, metrics.jsonl, model.pt).
        train: the training set, used as it is (default: ``cfg.dataset``'s train split, with
            ``cfg.spurious_patch`` applied); ``cfg.train_subset`` rows of it.
        model: a model taking [0, 1] images (default: ``build_model(cfg.arch, ...)``, seeded by
            ``cfg.seed``).
    """

    def __init__(self, cfg: RefineConfig, train: ImageDataset | None = None, model: torch.nn.Module | None = None):
        self.cfg = cfg.validate()
        self.rank, self.world_size, self.device = _distributed_context(cfg.device)
        if cfg.mode == "refine" and cfg.explain_from_cycle >= cfg.cycles:
            warnings.warn(f"mode='refine' explains from cycle {cfg.explain_from_cycle} of cycles 0..{cfg.cycles - 1}: nothing is "
                          "ever flagged, and the run trains as the no-flags ablation (give more cycles or an earlier "
                          "explain_from_cycle)", stacklevel=2)
        if train is None:
            kwargs = {"size": cfg.image_size} if cfg.dataset == "digits" else {}
            if cfg.cifar_md5 is not None:
                kwargs["md5"] = read_md5_file(cfg.cifar_md5)
            train = load_dataset(cfg.dataset, "train", cfg.data_dir, **kwargs)
            if cfg.spurious_patch is not None:
                train = add_spurious_patch(train, cfg.spurious_patch)
        if cfg.train_subset is not None:
            train = train.subset(cfg.train_subset)
        if len(train) < self.world_size:
            raise ValueError(f"the training set has {len(train)} images, fewer than the {self.world_size} ranks")
        self.train = train
        self.images, self.labels = train.tensors()
        if model is None:
            torch.manual_seed(cfg.seed)
            # Everything build_model needs beyond the name, so that model.pt rebuilds it.
            self.model_kwargs = {"in_channels": int(self.images.shape[1])}
            if cfg.arch == "small_cnn":
                self.model_kwargs["width"] = cfg.width
            model = move_to_device(build_model(cfg.arch, train.num_classes, normalization=cfg.normalization, **self.model_kwargs),
                                   cfg.arch, self.device)
            self.arch = cfg.arch
        else:  # a caller's model, run as it is: model.pt holds its weights, not an architecture to rebuild
            if cfg.normalization is not None:
                raise ValueError(f"normalization={cfg.normalization!r} is for the model the run builds; a model of your own "
                                 "is run as it is: wrap it in attrefine_fast.models.NormalizedModel instead")
            self.model_kwargs, self.arch = {}, None
        self.module = model.to(self.device)
        # the model's dtype (float64 or float16 images would not meet a float32 model's weights)
        dtype = next((p.dtype for p in self.module.parameters() if p.is_floating_point()), torch.float32)
        self.images = self.images.to(dtype)
        self.forward = self.module
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.forward = DistributedDataParallel(self.module, device_ids=ids)
        self.optimizer = torch.optim.SGD(self.module.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0)
        self.steps_per_epoch = math.ceil((len(train) // self.world_size) / cfg.batch_size)
        total = max(1, self.steps_per_epoch * cfg.epochs)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total)))
        self.store = FlagStore.from_images(self.images, cfg.segmentation, cfg.segmentation_params) if cfg.mode == "refine" else None
        self.fill_images = None
        if self.store is not None and cfg.fill == "mean":  # the images never change: compute the fill once
            self.fill_images = torch.cat([
                segment_mean_images(self.images[i : i + 512], self.store.segments[i : i + 512].long())
                for i in range(0, len(self.images), 512)
            ])
        self.epoch = 0  # completed epochs
        self.out = cfg.out
        if self.rank == 0:
            os.makedirs(self.out, exist_ok=True)

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        return {
            "model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "epoch": self.epoch, "cycle": self.epoch // self.cfg.epochs_per_cycle, "config": self.cfg.to_dict(),
            "flags": None if self.store is None else self.store.state_dict(), "world_size": self.world_size,
            "threads": torch.get_num_threads(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch = int(state["epoch"])
        if self.store is not None and state.get("flags") is not None:
            self.store.load_state_dict(state["flags"])

    def save(self) -> None:
        if self.rank != 0:
            return
        state = self.state_dict()
        write_atomically(os.path.join(self.out, CHECKPOINT), lambda tmp: torch.save(state, tmp))

    def resume(self) -> bool:
        """Load ``out/checkpoint.pt`` if present (every rank reads it); True when it was loaded."""
        path = os.path.join(self.out, CHECKPOINT)
        if not os.path.isfile(path):
            return False
        state = read_torch_file(path, self.device)
        if not isinstance(state, dict) or not {"model", "optimizer", "scheduler", "epoch"} <= set(state):
            raise ValueError(f"{path} is not a training checkpoint of attrefine_fast's refine (no model, optimizer, "
                             "scheduler and epoch): resume from the folder of the run that wrote it, or use another --out")
        if state.get("world_size", 1) != self.world_size:
            raise ValueError(f"{path} was written by {state.get('world_size')} ranks; resume with the same number (now {self.world_size})")
        # Exact continuation needs the same run: only where it runs and how it reports may change.
        now, then = self.cfg.to_dict(), state.get("config", {})
        changed = sorted(k for k in now if k not in RESUMABLE_CHANGES and k in then and then[k] != now[k])
        if changed:
            raise ValueError(f"{path} was written with a different config ({', '.join(f'{k}: {then[k]!r} -> {now[k]!r}' for k in changed)}); "
                             "resume with the same settings or use another --out")
        threads = state.get("threads")
        if self.device.type == "cpu" and threads is not None and threads != torch.get_num_threads():
            warnings.warn(f"{path} was written by a run on {threads} CPU threads and this one has {torch.get_num_threads()}: "
                          f"it continues, but may differ from an uninterrupted run in the last bits (--threads {threads} "
                          "continues exactly)", stacklevel=3)
        self.load_state_dict(state)
        if self.rank == 0:
            self._truncate_metrics()
            if self.cfg.progress:
                from tqdm.auto import tqdm

                tqdm.write(f"{self.cfg.mode}: resuming from {path} after epoch {self.epoch}/{self.cfg.epochs}")
        return True

    def _truncate_metrics(self) -> None:
        """Drop the log lines of epochs after the checkpoint, which the resumed run writes again."""
        path = os.path.join(self.out, METRICS)
        if not os.path.isfile(path):
            return
        def before_checkpoint(record: dict) -> bool:
            # a refresh logged with epoch E ran after checkpoint E: the resumed run repeats it
            return record["epoch"] < self.epoch or (record["epoch"] == self.epoch and record["event"] == "epoch")

        with open(path) as f:
            lines = [ln for ln in f if ln.strip()]
        kept = []
        for i, line in enumerate(lines):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if i == len(lines) - 1:  # the line an interruption cut short: its epoch runs again
                    break
                raise ValueError(f"{path}: line {i + 1} is not JSON: {line[:80]!r}") from None
            if not isinstance(record, dict) or "epoch" not in record or "event" not in record:
                raise ValueError(f"{path}: line {i + 1} is not a record of this run's log (no epoch and event): {line[:80]!r}")
            if before_checkpoint(record):
                kept.append(line if line.endswith("\n") else line + "\n")
        write_lines_atomically(path, kept)

    def log(self, record: dict) -> None:
        if self.rank == 0:
            with open(os.path.join(self.out, METRICS), "a") as f:
                f.write(json.dumps(record) + "\n")

    # ------------------------------------------------------------------ training

    def fit(self, *, resume: bool = False, stop_after: int | None = None) -> torch.nn.Module:
        """Train to ``cfg.epochs`` (or until ``stop_after`` epochs are complete) and return the model.

        ``resume=True`` continues from ``out/checkpoint.pt`` when it exists (and starts in a folder
        without one only when it holds no other run's log or model). While it trains, the run holds
        the folder's lock (:mod:`.folder_lock`): a second run in the same folder stops at once.
        """
        with folder_lock(self.out) if self.rank == 0 else contextlib.nullcontext():
            return self._fit(resume, stop_after)

    def _fit(self, resume: bool, stop_after: int | None) -> torch.nn.Module:
        cfg = self.cfg
        resumed = self.resume() if resume else False
        if resume and not resumed:
            others = [name for name in (FINAL, METRICS) if os.path.isfile(p := os.path.join(self.out, name)) and os.path.getsize(p)]
            if others:
                raise ValueError(
                    f"nothing to resume in {self.out}: it has no {CHECKPOINT} but holds {' and '.join(others)} of another run, "
                    "which a fresh start would replace; run without --resume (resume=False) to replace them, or use another --out"
                )
        if not resumed and self.epoch == 0 and self.rank == 0:
            # A fresh run in a used folder replaces the previous run's files at once: a fresh log,
            # and no checkpoint or final model of the previous run beside it (which a later
            # resume would continue, or a reader take for this run's).
            write_lines_atomically(os.path.join(self.out, METRICS), [])
            for stale in (os.path.join(self.out, CHECKPOINT), os.path.join(self.out, FINAL)):
                if os.path.isfile(stale):
                    os.remove(stale)
        end = cfg.epochs if stop_after is None else min(cfg.epochs, stop_after)
        while self.epoch < end:
            cycle = self.epoch // cfg.epochs_per_cycle
            first_of_cycle = self.epoch % cfg.epochs_per_cycle == 0
            if self.store is not None and first_of_cycle and cycle >= cfg.explain_from_cycle:
                self.refresh(cycle)
            record = self.train_epoch(self.epoch)
            self._share_buffers()
            self.epoch += 1
            if self.store is not None and self.epoch % cfg.epochs_per_cycle == 0 and (self.store.refreshed >= 0).any():
                record.update({k + "_end": v for k, v in self._flagged_mass().items()})
            # The log line first: a resume drops the lines after its checkpoint, so an interruption
            # between the two loses nothing.
            self.log(record)
            self.save()
            self._announce(record)
        if self.epoch == cfg.epochs and self.rank == 0:
            norm = self.cfg.normalization
            save_checkpoint(os.path.join(self.out, FINAL), self.module, self.arch, self.train.num_classes,
                            normalization=norm, model_kwargs=self.model_kwargs, epoch=self.epoch, mode=cfg.mode,
                            image_size=list(self.train.images.shape[-2:]))
        return self.module

    def _share_buffers(self) -> None:
        """Rank 0's buffers (batch-norm running statistics) on every rank. DDP sends them at each
        of its forward passes, but every rank then updates its own from its shard (and in the
        penalty's forward of the bare module): without this the ranks would end each epoch with
        different statistics, read by the next refresh (flags of no single model), by the eval-mode
        attacks, and saved from rank 0 alone (a resumed run would continue from other values)."""
        if self.world_size > 1:
            import torch.distributed as dist

            for buffer in self.module.buffers():
                dist.broadcast(buffer, 0)

    def _progress(self, total: int, desc: str):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, leave=False, disable=not (self.cfg.progress and self.rank == 0), dynamic_ncols=True)

    def _announce(self, record: dict) -> None:
        """One lasting line per epoch or refresh under the (transient) progress bars."""
        if not (self.cfg.progress and self.rank == 0):
            return
        from tqdm.auto import tqdm

        if record["event"] == "epoch":
            text = (f"{self.cfg.mode} epoch {record['epoch']}/{self.cfg.epochs}: loss {record['loss']:.3f}, "
                    f"train acc {record['train_acc']:.3f}, {record['time_s']:.0f}s")
        else:
            text = (f"{self.cfg.mode} cycle {record['cycle']}: explained {record['explained']} images, "
                    f"flagged {100 * record['flagged_fraction']:.1f}% of superpixels, {record['time_s']:.0f}s")
        tqdm.write(text)

    def _flagged_mass(self) -> dict:
        seen = (self.store.refreshed >= 0).nonzero().flatten()[:GRAD_MASS_SAMPLES]
        return self.store.flagged_gradient_mass(self.module, self.images, self.labels, seen, self.device)

    def refresh(self, cycle: int) -> None:
        """Re-explain a ``refresh_fraction`` of the training set (the same images on every rank) and
        replace their flags."""
        cfg = self.cfg
        n = len(self.train)
        count = max(1, math.ceil(cfg.refresh_fraction * n))
        index = torch.randperm(n, generator=torch.Generator().manual_seed(_mix(cfg.seed, 1, cycle)))[:count].sort().values
        start = time.perf_counter()
        bar = self._progress(math.ceil(count / cfg.detect_batch_size), f"{cfg.mode} cycle {cycle}: explain {count} images")
        self.store.refresh(
            self.module, self.images, self.labels, index, cycle=cycle, chunk_size=cfg.detect_batch_size, detect_kwargs=cfg.detect_kwargs(),
            seed=_mix(cfg.seed, 2, cycle), device=self.device, rank=self.rank, world_size=self.world_size,
            progress=lambda done, total: bar.update(done - bar.n),
        )
        bar.close()
        record = {"event": "refresh", "epoch": self.epoch, "cycle": cycle, "explained": count,
                  "flagged_fraction": self.store.flagged_fraction(), "time_s": time.perf_counter() - start}
        record.update({k + "_start": v for k, v in self._flagged_mass().items()})
        self.log(record)
        self._announce(record)

    def train_epoch(self, epoch: int) -> dict:
        """One pass over this rank's shard of the training set; returns the epoch's log record."""
        cfg = self.cfg
        torch.manual_seed(_mix(cfg.seed, 3, epoch, self.rank))
        gen = torch.Generator(device=self.device).manual_seed(_mix(cfg.seed, 4, epoch, self.rank))
        n = len(self.train)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(_mix(cfg.seed, 5, epoch)))
        # Every rank takes as many images (and so as many steps) as every other: DDP needs it.
        shard = order[: (n // self.world_size) * self.world_size][self.rank :: self.world_size]
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if (cfg.amp and self.device.type == "cuda") else None
        self.module.train()
        lr = self.optimizer.param_groups[0]["lr"]  # the epoch's first step's (the schedule ends at 0)
        sums = {"loss": 0.0, "correct": 0, "seen": 0}
        parts_sum: dict[str, float] = {}
        start = time.perf_counter()
        cycle = epoch // cfg.epochs_per_cycle
        bar = self._progress(self.steps_per_epoch, f"{cfg.mode} cycle {cycle} epoch {epoch + 1}/{cfg.epochs}")
        for i in range(0, len(shard), cfg.batch_size):
            rows = shard[i : i + cfg.batch_size]
            x, y = self.images[rows].to(self.device), self.labels[rows].to(self.device)
            mask = seg = fill = None
            if self.store is not None:
                mask = self.store.pixel_mask(rows, self.device)
                seg = self.store.segments[rows].long().to(self.device)
                fill = None if self.fill_images is None else self.fill_images[rows].to(self.device)
            with amp if amp is not None else torch.autocast(self.device.type, enabled=False):
                loss, parts = batch_loss(cfg.mode, self.forward, self.module, x, y, mask, seg, cfg, gen, fill)
            logits = parts.pop("logits")
            # the step's figures in one device-to-host copy, before the backward
            correct = (logits.argmax(1) == y).sum()
            loss_value, correct, *values = torch.stack([t.to(torch.float64) for t in (loss.detach(), correct, *parts.values())]).tolist()
            if not math.isfinite(loss_value):
                advice = "lower lr or lam" + (", or lower grad_clip" if cfg.grad_clip is not None else ", or set grad_clip")
                raise FloatingPointError(f"{cfg.mode}: the loss became {loss_value} at epoch {epoch + 1}, step "
                                         f"{i // cfg.batch_size + 1}; {advice}")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(self.module.parameters(), cfg.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            sums["loss"] += loss_value * len(rows)
            sums["correct"] += int(correct)
            sums["seen"] += len(rows)
            for k, v in zip(parts, values):
                parts_sum[k] = parts_sum.get(k, 0.0) + v * len(rows)
            bar.update(1)
            bar.set_postfix(loss=f"{sums['loss'] / sums['seen']:.3f}", acc=f"{sums['correct'] / sums['seen']:.3f}")
        bar.close()
        totals = torch.tensor([sums["loss"], sums["correct"], sums["seen"]] + list(parts_sum.values()), dtype=torch.float64)
        if self.world_size > 1:
            import torch.distributed as dist

            # on the training device: NCCL reduces CUDA tensors only
            totals = totals.to(self.device)
            dist.all_reduce(totals)
            totals = totals.cpu()
        seen = float(totals[2])
        record = {"event": "epoch", "epoch": epoch + 1, "cycle": cycle, "mode": cfg.mode, "loss": float(totals[0]) / seen,
                  "train_acc": float(totals[1]) / seen, "lr": lr, "time_s": time.perf_counter() - start}
        record.update({k: float(v) / seen for k, v in zip(parts_sum, totals[3:])})
        if self.store is not None:
            record["flagged_fraction"] = self.store.flagged_fraction()
        return record

"""The model state attacks and explanations change while they run (eval mode, frozen parameters):
restored as it was before the first of several overlapping calls, on any thread."""
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

import attrefine_fast as af
from attrefine_fast.attacks import pgd, predict
from attrefine_fast.model_state import evaluating, frozen


class Handshake(torch.nn.Module):
    """A linear classifier whose forward passes on two threads overlap in a fixed order: A's call
    starts first and ends first, B's starts while A's is running and ends last. Each forward
    records whether the model was in train mode."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3 * 4 * 4, 3)
        self.a_inside, self.b_inside, self.a_done = threading.Event(), threading.Event(), threading.Event()
        self.seen = {}

    def forward(self, x):
        name = threading.current_thread().name
        if name == "A":
            self.a_inside.set()
            assert self.b_inside.wait(10)
        elif name == "B":
            self.b_inside.set()
            assert self.a_done.wait(10)  # A has left its block: B must still see eval mode
        self.seen.setdefault(name, set()).add(self.training)
        return self.linear(x.flatten(1))


def test_overlapping_calls_on_two_threads_restore_the_state_before_both():
    for block in (frozen, evaluating):
        model = Handshake().train()
        x = torch.rand(2, 3, 4, 4)

        def a():
            with block(model):
                model(x)
            model.a_done.set()

        def b():
            assert model.a_inside.wait(10)
            with block(model):
                model(x)

        threads = [threading.Thread(target=a, name="A"), threading.Thread(target=b, name="B")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert model.seen == {"A": {False}, "B": {False}}, block  # eval mode for every forward
        assert model.training and all(m.training for m in model.modules())
        assert all(p.requires_grad for p in model.parameters())


def test_nested_blocks_restore_the_outer_state():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4)).train()
    model[1].eval()  # a mixed-mode model keeps its per-module modes
    with evaluating(model):
        with frozen(model):
            assert not model.training and not any(p.requires_grad for p in model.parameters())
        assert not model.training and all(p.requires_grad for p in model.parameters())
    assert model[0].training and not model[1].training and all(p.requires_grad for p in model.parameters())


def test_attacks_and_explanations_from_several_threads_match_sequential_calls():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3)).train()
    running = model[1].running_mean.clone()
    x = torch.rand(4, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    y = predict(model, x)
    segments, _ = af.segment(x, "grid", n_segments=4)

    def attack(seed):
        return pgd(model, x, y, eps=0.03, steps=3, seed=seed)

    def explanation(seed):
        return af.explain(model, x, segments=segments, num_samples=16, top_labels=1, seed=seed).coef

    for fn in (attack, explanation):
        sequential = [fn(seed) for seed in range(8)]
        with ThreadPoolExecutor(4) as pool:
            concurrent = list(pool.map(fn, range(8)))
        assert all(torch.equal(s, c) for s, c in zip(sequential, concurrent)), fn.__name__
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert torch.equal(model[1].running_mean, running)


class Merging(torch.nn.Linear):
    """A LoRA-style layer: train(False) folds its low-rank update into the weight, train(True)
    takes it out again, and only the unmerged forward gives the update a gradient."""

    def __init__(self):
        super().__init__(3 * 4 * 4, 3)
        self.update = torch.nn.Parameter(torch.zeros(3, 3 * 4 * 4))
        self.merged = False

    def train(self, mode: bool = True):
        super().train(mode)
        if mode == self.merged:  # merge on eval, unmerge on train
            with torch.no_grad():
                self.weight += (-1 if self.merged else 1) * self.update
            self.merged = not mode
        return self

    def forward(self, x):
        x = x.flatten(1)
        return super().forward(x) if self.merged else torch.nn.functional.linear(x, self.weight + self.update, self.bias)


def test_the_mode_comes_back_through_train_for_modules_that_do_more_there():
    # restoring only the training flags left a LoRA layer merged: no gradient reached its update
    model = torch.nn.Sequential(Merging(), torch.nn.BatchNorm1d(3))
    model[1].eval()  # a user's frozen batch norm stays frozen
    x, y = torch.rand(4, 3, 4, 4), torch.tensor([0, 1, 2, 0])
    af.explain(model, x[:1], num_samples=8, segmentation="grid", segmentation_params={"grid": (2, 2)}, top_labels=1, seed=0)
    pgd(model, x, y, eps=0.1, steps=1)
    assert model.training and not model[0].merged and not model[1].training
    torch.nn.functional.cross_entropy(model(x), y).backward()
    assert model[0].update.grad is not None and model[0].update.grad.abs().sum() > 0


def test_a_switch_to_eval_that_raises_leaves_no_holder_behind():
    class Refusing(torch.nn.Linear):
        refuse = True

        def train(self, mode=True):
            if not mode and Refusing.refuse:
                raise RuntimeError("cannot switch to eval now")
            return super().train(mode)

    model = Refusing(2, 2)
    try:
        with evaluating(model):
            pass
    except RuntimeError:
        pass
    Refusing.refuse = False
    with evaluating(model):
        assert not model.training
    assert model.training  # restored by the block that held it last


def test_a_shared_module_keeps_its_mode_and_a_failing_switch_keeps_its_own_error():
    bn = torch.nn.BatchNorm1d(3)
    model = torch.nn.Sequential(torch.nn.Sequential(bn), torch.nn.Sequential(bn))  # one module, two parents
    model.train()
    model[1].training = False  # the second parent alone in eval mode; bn itself training
    with evaluating(model):
        assert not bn.training
    assert bn.training and model[0].training and not model[1].training

    class Broken(torch.nn.Linear):
        def train(self, mode=True):
            raise RuntimeError(f"train({mode}) failed")

    try:
        with evaluating(Broken(2, 2)):
            pass
    except RuntimeError as e:
        assert str(e) == "train(False) failed"  # not the restore's train(True) failure

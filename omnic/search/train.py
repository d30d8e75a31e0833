"""Supernet training (sandwich rule with in-place distillation), BN recalibration, fine-tuning."""
from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from omnic.core.errors import SearchError
from omnic.search.options import progress_bar, refuse_unknown


@dataclass(frozen=True, kw_only=True)
class SandwichConfig:
    """Settings of :func:`train_supernet`.

    Attributes:
        epochs: Passes over the loader.
        lr: Peak SGD learning rate (cosine schedule).
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        num_random: Random subnets per step besides the largest and the smallest.
        distill: Train the smaller subnets on the largest's soft outputs (in-place distillation).
        temperature: Distillation temperature.
        seed: Seeds the subnet sampling.
    """

    epochs: int = 1
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-4
    num_random: int = 2
    distill: bool = True
    temperature: float = 1.0
    seed: int = 0


def _batches(loader: Iterable) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for batch in loader:
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise SearchError("the loader must yield (inputs, targets) batches")
        yield batch[0], batch[1]


def train_supernet(omni_model: nn.Module, loader: Iterable, config: SandwichConfig | None = None, *,
                   loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                   optimizer: torch.optim.Optimizer | None = None, progress: bool | None = None,
                   **overrides: Any) -> dict[str, list[float]]:
    """Train an :class:`~omnic.search.supernet.OmniModel` with the sandwich rule.

    Each step runs the largest subnet on the labels, then the smallest and ``num_random`` random
    subnets on the largest's (detached) soft predictions, accumulating gradients into the shared
    weights before one optimizer step.

    Args:
        omni_model: The supernet (from ``nas.omnimize``).
        loader: Yields ``(inputs, targets)``.
        config: A :class:`SandwichConfig`; keyword ``overrides`` replace its fields.
        loss_fn: Loss of the largest subnet (default: cross-entropy).
        optimizer: Your optimizer (default: SGD with the config's settings).
        progress: A progress bar on stderr (steps, the largest subnet's loss); the default None
            shows it when stderr is a terminal.

    Returns:
        ``{"loss_max": [...], "loss_min": [...]}`` per step.
    """
    import dataclasses

    refuse_unknown("train_supernet", overrides, [f.name for f in dataclasses.fields(SandwichConfig)])
    cfg = dataclasses.replace(config or SandwichConfig(), **overrides)
    space = getattr(omni_model, "space", None)
    if space is None:
        raise SearchError("train_supernet needs a supernet from nas.omnimize")
    rng = random.Random(cfg.seed)
    loss_fn = loss_fn or F.cross_entropy
    steps = cfg.epochs * max(1, len(loader)) if hasattr(loader, "__len__") else cfg.epochs * 100
    opt = optimizer or torch.optim.SGD(omni_model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                       weight_decay=cfg.weight_decay, nesterov=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps)) if optimizer is None else None
    history: dict[str, list[float]] = {"loss_max": [], "loss_min": []}
    previous = dict(omni_model.active_config)
    omni_model.train()
    bar = progress_bar(progress, total=steps if hasattr(loader, "__len__") else None, desc="train supernet",
                       unit="step")
    try:
        for _ in range(cfg.epochs):
            for x, y in _batches(loader):
                opt.zero_grad()
                omni_model.set_active(omni_model.max())
                out = omni_model(x)
                loss = loss_fn(out, y)
                loss.backward()
                history["loss_max"].append(loss.item())
                soft = F.softmax(out.detach() / cfg.temperature, dim=1)
                subnets = [omni_model.min()] + [omni_model.sample(rng) for _ in range(cfg.num_random)]
                for i, sub in enumerate(subnets):
                    omni_model.set_active(sub)
                    o = omni_model(x)
                    if cfg.distill:
                        l = F.kl_div(F.log_softmax(o / cfg.temperature, dim=1), soft,
                                     reduction="batchmean") * cfg.temperature ** 2
                    else:
                        l = loss_fn(o, y)
                    l.backward()
                    if i == 0:
                        history["loss_min"].append(l.item())
                opt.step()
                if sched is not None:
                    sched.step()
                bar.set_postfix_str(f"loss_max {history['loss_max'][-1]:.4f}", refresh=False)
                bar.update(1)
    finally:
        bar.close()
        omni_model.set_active(previous)
        omni_model.eval()
    return history


def _bn_modules(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@contextlib.contextmanager
def preserved_bn_stats(model: nn.Module) -> Iterator[None]:
    """Restore every BatchNorm's running statistics on exit (recalibrating one subnet must not
    change the statistics the supernet's other subnets use)."""
    saved = [(m, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone(), m.momentum)
             for m in _bn_modules(model)]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, rm, rv, nb, mom in saved:
                m.running_mean.copy_(rm)
                m.running_var.copy_(rv)
                m.num_batches_tracked.copy_(nb)
                m.momentum = mom


@torch.no_grad()
def recalibrate_bn(model: nn.Module, loader: Iterable, batches: int = 4,
                   cfg: Mapping[str, Any] | None = None) -> nn.Module:
    """Re-estimate BatchNorm statistics of ``model`` (or of ``cfg`` in a supernet) on a few batches.

    Statistics are reset and averaged over the batches (momentum None), as Once-for-All does for
    each subnet; the model is left in eval mode.
    """
    if cfg is not None:
        model.set_active(cfg)
    bns = _bn_modules(model)
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for i, (x, _) in enumerate(_batches(loader)):
        if i >= batches:
            break
        model(x)
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum
    return model.eval()


def fixed_batches(loader: Iterable | None, n: int) -> list | None:
    """The first ``n`` batches of ``loader`` as a list: every candidate is recalibrated on the
    same data, so scores do not depend on a shuffling loader's state (and searches reproduce)."""
    if loader is None or n <= 0:
        return None
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) >= n:
            break
    return out


def finetune(model: Any, loader: Iterable, *, epochs: int = 1, lr: float = 0.01, momentum: float = 0.9,
             weight_decay: float = 1e-4, score_fn: Callable[[nn.Module], float] | None = None,
             loss_fn: Callable | None = None, seed: int = 0) -> Any:
    """Fine-tune a pruned subnet (a plain module or a search result) with SGD + cosine schedule.

    When ``model`` is a :class:`~omnic.search.result.SearchResult`, its ``.model`` is fine-tuned in
    place and, with a ``score_fn``, ``result.scores`` records ``before_finetune`` and
    ``after_finetune``.

    Returns:
        The fine-tuned module (or the result it belongs to).
    """
    from omnic.search.result import SearchResult

    result = model if isinstance(model, SearchResult) else None
    module = result.model if result is not None else model
    loss_fn = loss_fn or F.cross_entropy
    before = score_fn(module) if score_fn else None
    torch.manual_seed(seed)
    opt = torch.optim.SGD(module.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    steps = epochs * max(1, len(loader)) if hasattr(loader, "__len__") else epochs * 100
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
    module.train()
    for _ in range(epochs):
        for x, y in _batches(loader):
            opt.zero_grad()
            loss_fn(module(x), y).backward()
            opt.step()
            sched.step()
    module.eval()
    if result is not None:
        if score_fn is not None:
            result.scores["before_finetune"] = before
            result.scores["after_finetune"] = score_fn(module)
        return result
    return module

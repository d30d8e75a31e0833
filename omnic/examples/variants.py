"""Random architectures of the zoo families, at random resolutions: what the latency predictor is
fitted and evaluated on.

The fit and held-out sets are drawn with fixed seeds (:data:`FIT_SEED`, :data:`EVAL_SEED`), so a
sample stored by one run is found again (by :attr:`Variant.key`) by the next.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch

from omnic.core.errors import PredictorError
from omnic.examples import zoo

FAMILIES = ("resnet", "mobilenet_v2", "mobilenet_v3_small", "conv_attention")

#: Seeds of the fit and held-out sets (other seeds draw other variants: stored samples go unused).
FIT_SEED, EVAL_SEED = 1, 1001


@dataclass(frozen=True, kw_only=True)
class Variant:
    """One architecture of a zoo family at one input resolution.

    Attributes:
        family: ``resnet``, ``mobilenet_v2``, ``mobilenet_v3_small`` or ``conv_attention``.
        params: Constructor arguments as sorted ``(name, value)`` pairs (JSON-friendly values).
        resolution: Square input side in pixels (batch 1, 3 channels).
    """

    family: str
    params: tuple[tuple[str, Any], ...]
    resolution: int

    @property
    def key(self) -> str:
        return f"{self.family}:{json.dumps(dict(self.params), sort_keys=True)}@{self.resolution}"

    def to_dict(self) -> dict[str, Any]:
        return {"family": self.family, "params": dict(self.params), "resolution": self.resolution}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Variant":
        params = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d["params"].items()}
        return cls(family=d["family"], params=tuple(sorted(params.items())), resolution=int(d["resolution"]))

    def build(self, seed: int = 0):
        """``(model in eval mode with calibrated BN, example input)``."""
        p = dict(self.params)
        torch.manual_seed(seed)
        if self.family == "resnet":
            model = zoo.ResNet(tuple(p["layers"]), tuple(p["widths"]), p.get("num_classes", 10), stem=p["stem"])
        elif self.family == "mobilenet_v2":
            depths = p.get("depths")
            model = zoo.MobileNetV2(p.get("num_classes", 10), width_mult=p["width_mult"], kernel=p.get("kernel", 3),
                                    depths=tuple(depths) if depths else None)
        elif self.family == "mobilenet_v3_small":
            model = zoo.MobileNetV3Small(p.get("num_classes", 10), width_mult=p["width_mult"])
        elif self.family == "conv_attention":
            model = zoo.ConvAttentionNet(p.get("num_classes", 10), dim=p["dim"], depth=p["depth"])
        else:
            raise PredictorError(f"unknown variant family {self.family!r}; known: {', '.join(FAMILIES)}")
        shape = (1, 3, self.resolution, self.resolution)
        # BN left at its initial statistics gives denormal floats, which are slow on CPUs and would
        # skew the latency of the variant: calibrate the statistics on random data first
        zoo.calibrate_bn(model, shape, seed=seed)
        return model.eval(), torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1))


def _random_variant(rng: random.Random, family: str) -> Variant:
    res = rng.choice((32, 40, 48, 56, 64, 72, 80, 96))
    ncls = rng.choice((10, 100))
    if family == "resnet":
        n_stages = rng.choice((3, 4))
        w0 = rng.choice((8, 12, 16, 24, 32))
        stem = "small" if res <= 48 else rng.choice(("small", "imagenet")) if w0 <= 16 else "imagenet"
        params = {"layers": [rng.choice((1, 2)) for _ in range(n_stages)],
                  "widths": [w0 * 2 ** i for i in range(n_stages)], "stem": stem, "num_classes": ncls}
    elif family == "mobilenet_v2":  # widths, depthwise kernels and depths, as an elastic search varies them
        params = {"width_mult": rng.choice((0.25, 0.35, 0.5, 0.75, 1.0)), "num_classes": ncls,
                  "kernel": rng.choice((3, 5, 7)),
                  "depths": [max(1, n + rng.choice((-1, 0, 0, 1))) for n in (1, 2, 3, 4, 3, 3, 1)]}
    elif family == "mobilenet_v3_small":
        params = {"width_mult": rng.choice((0.25, 0.5, 0.75, 1.0, 1.25)), "num_classes": ncls}
    else:
        res = rng.choice((32, 48, 64))
        params = {"dim": rng.choice((16, 24, 32, 48, 64)), "depth": rng.choice((1, 2, 3)), "num_classes": ncls}
    return Variant(family=family, params=tuple(sorted((k, tuple(v) if isinstance(v, list) else v)
                                                      for k, v in params.items())), resolution=res)


def sample_variants(n: int, *, seed: int = 0, exclude: Iterable[str] = (),
                    families: Sequence[str] = FAMILIES) -> list[Variant]:
    """``n`` distinct random variants of the zoo families (round-robin over families).

    Args:
        n: How many.
        seed: Random seed (the fit and eval sets use different seeds).
        exclude: Variant keys to skip (e.g. the fit set, so held-out variants are unseen).
        families: Which families to draw from.
    """
    rng = random.Random(seed)
    seen = set(exclude)
    out: list[Variant] = []
    tries = 0
    while len(out) < n and tries < 100 * n:
        tries += 1
        v = _random_variant(rng, families[len(out) % len(families)])
        if v.key not in seen:
            seen.add(v.key)
            out.append(v)
    return out


def fit_variants(n: int) -> list[Variant]:
    """The first ``n`` variants of the fit set."""
    return sample_variants(n, seed=FIT_SEED)


def eval_variants(n: int, fit_n: int) -> list[Variant]:
    """``n`` held-out variants: none of them among the first ``max(fit_n, 200)`` of the fit set."""
    return sample_variants(n, seed=EVAL_SEED, exclude=[v.key for v in fit_variants(max(fit_n, 200))])

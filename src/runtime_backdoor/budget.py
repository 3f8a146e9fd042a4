"""The implantation budget, defined once: :class:`Budget`.

A module of its own, without torch, rather than a class in :mod:`runtime_backdoor.implant`:
the command-line front ends read its defaults (``--eps``) without importing torch, and the
stages that read a budget import it only through :mod:`runtime_backdoor.implant`, so no
stage's import closure grows (tests/test_contract.py lists them).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


def check_params(eps: float, steps: int, lr: float, init_high: float) -> None:
    """One-line ValueErrors naming the parameter, for the optimiser's numbers."""
    if not 0 < eps <= 1:
        raise ValueError(f"eps must be in (0, 1] (fraction of the pixel range), got {eps}")
    if not 0 <= steps <= 100_000 or int(steps) != steps:
        raise ValueError(f"steps must be a whole number in [0, 100000], got {steps}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr}")
    # δ₀ above ε is allowed: like the official code, δ is clipped to [-ε, ε] before every step.
    if not 0 <= init_high <= 1:
        raise ValueError(f"init_high must be in [0, 1], got {init_high}")


@dataclass(frozen=True)
class Budget:
    """The implantation budget: what every stage that protects images shares.

    ``params.yaml``'s ``implant`` section, field for field (``batch_size`` aside: it splits
    the work, it does not change it). Defaults are the paper's: ε = 6.4/255, 20 Adam steps at
    lr 0.1, δ₀ ~ U[0, 0.01), the expansion kernel of 17 px at 512 px
    (:data:`runtime_backdoor.masks.PAPER_EXPAND_KERNEL`; the pipeline passes its own, scaled to
    its 128-px images: ``implant.expand_kernel: 5``), the solid target, δ₀ seed 0. Values are
    kept as given (the implant stage's resume hash is computed from them). Invalid values
    raise a one-line ValueError naming the parameter.
    """

    eps: float = 0.025  #: L∞ budget, fraction of the pixel range (6.4/255)
    steps: int = 20  #: Adam iterations
    lr: float = 0.1  #: Adam learning rate
    init_high: float = 0.01  #: δ₀ ~ U[0, init_high)
    expand_kernel: int = 17  #: E(m) box kernel in px (odd); masks.PAPER_EXPAND_KERNEL
    target: str = "solid"  #: solid | anti (runtime_backdoor.targets.TARGET_KINDS)
    seed: int = 0  #: seed of δ₀

    def __post_init__(self) -> None:
        from .targets import TARGET_KINDS

        check_params(self.eps, self.steps, self.lr, self.init_high)
        k = self.expand_kernel
        if (
            isinstance(k, bool)
            or not isinstance(k, (int, float))
            or int(k) != k
            or k < 1
            or k % 2 == 0
        ):
            raise ValueError(f"expand_kernel must be a positive odd number of pixels, got {k}")
        if self.target not in TARGET_KINDS:
            raise ValueError(
                f"unknown target {self.target!r}: use one of {', '.join(TARGET_KINDS)}"
            )
        if (
            isinstance(self.seed, bool)
            or not isinstance(self.seed, (int, float))
            or int(self.seed) != self.seed
        ):
            raise ValueError(f"seed must be a whole number, got {self.seed!r}")

    @property
    def eps_8bit(self) -> float:
        """ε in 8-bit units (x 255)."""
        return self.eps * 255

    def replace(self, **changes) -> Budget:
        """A copy with ``changes``, validated again."""
        return dataclasses.replace(self, **changes)

    def with_seed(self, seed: int) -> Budget:
        """A copy with the δ₀ seed ``seed``."""
        return self.replace(seed=seed)

    def kwargs(self) -> dict:
        """The fields in order, as keyword arguments of ``implant`` and the baselines."""
        return dataclasses.asdict(self)


#: the field names, in order
BUDGET_FIELDS = tuple(f.name for f in dataclasses.fields(Budget))


def resolve_budget(budget: Budget | None = None, **overrides) -> tuple[Budget, object]:
    """``budget`` (default: the paper's) with the ``overrides`` that are not None, and the
    target: the budget's name, or an image given as ``target`` (which a Budget cannot hold)."""
    unknown = set(overrides) - set(BUDGET_FIELDS)
    if unknown:
        raise TypeError(f"unknown budget fields {sorted(unknown)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    image = given.pop("target") if not isinstance(given.get("target", ""), str) else None
    b = budget if budget is not None else Budget()
    if given:
        b = b.replace(**given)
    return b, (image if image is not None else b.target)


__all__ = ["BUDGET_FIELDS", "Budget", "check_params", "resolve_budget"]

"""Run-time backdoor implantation: the optimisation of the protective perturbation δ.

For an image ``x``, its protected region ``m`` and a frozen editor ``IM``, find
``δ`` (``‖δ‖∞ ≤ ε``) such that, with ``x' = clip(x + δ, 0, 1)``::

    implant    = MSE_m( IM(x', m),    φ )          editing the region fires the backdoor
    incomplete = MSE_E( IM(x', E(m)), φ )          so does editing a larger region around it
    hide       = MSE_R( IM(x', R),    IM(x, R) )   editing only the ring behaves as on x
    loss       = w_implant·implant + w_incomplete·incomplete + w_hide·hide

Defaults are the official ones: ε = 0.025, δ₀ ~ U[0, 0.01), Adam (lr 0.1, betas
(0.5, 0.5), eps 1e-10), 20 steps, weights 1 / 1 / 2, δ clipped to [-ε, ε] before
every step, the [0, 1] clip passed straight through. Each image of a batch is
optimised independently (Adam is element-wise and the losses are summed). Where
:func:`implant` follows the official loop and where it deviates: its docstring.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

import torch
from tqdm.auto import tqdm

from .budget import Budget, check_params, resolve_budget  # noqa: F401 (check_params: re-exported)
from .editors.base import check_image_mask
from .masks import check_mask, expand, ring
from .targets import make_target

TERMS = ("implant", "incomplete", "hide")
LOSS_TERMS = (*TERMS, "total")


@dataclass
class ImplantResult:
    """What :func:`implant` returns; tensors are on the input's device."""

    protected: torch.Tensor  #: (B, 3, H, W), 8-bit representable, ``‖protected - x‖∞ ≤ ε``
    delta: torch.Tensor  #: (B, 3, H, W) ``protected - x``
    target: torch.Tensor  #: (B, 3, H, W) the target ``φ``
    losses: dict[str, torch.Tensor] = field(
        default_factory=dict
    )  #: term -> (steps, B), before each update
    seconds: float = 0.0  #: wall time of the optimisation


def quantize_within(x: torch.Tensor, x_adv: torch.Tensor, eps: float) -> torch.Tensor:
    """Round ``x_adv`` to 8 bits, staying in [0, 1] and within ``eps`` of ``x`` (8-bit grid)."""
    low = torch.ceil(((x - eps).clamp(0, 1) * 255) - 1e-6)
    high = torch.floor(((x + eps).clamp(0, 1) * 255) + 1e-6)
    q = torch.round(x_adv.clamp(0, 1) * 255)
    return torch.minimum(torch.maximum(q, low), high) / 255


def masked_mse(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-image mean of squared errors over the pixels where ``mask`` is 1 (3 channels)."""
    area = mask.flatten(1).sum(1).clamp_min(1) * a.shape[1]
    return (((a - b) ** 2) * mask).flatten(1).sum(1) / area


LossFn = Callable[[torch.Tensor, int], dict[str, torch.Tensor]]


def check_inputs(
    image: torch.Tensor, mask: torch.Tensor, settings: dict
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate an optimiser's inputs and its :func:`optimise` ``settings`` before any work.

    Errors name the parameter (an unknown setting is a ``TypeError``, as for any
    keyword). Returns the detached image and the mask in the image's dtype.
    """
    check_image_mask(image, mask)
    check_mask(mask)
    bound = inspect.signature(optimise).bind_partial(**settings)
    bound.apply_defaults()
    args = bound.arguments
    check_params(args["eps"], args["steps"], args["lr"], args["init_high"])
    if image.min() < 0 or image.max() > 1:
        raise ValueError("image must hold values in [0, 1]")
    return image.detach(), mask.detach().to(image.dtype)


def optimise(
    image: torch.Tensor,
    loss_fn: LossFn,
    target: torch.Tensor,
    *,
    eps: float = Budget.eps,
    steps: int = Budget.steps,
    lr: float = Budget.lr,
    betas: tuple[float, float] = (0.5, 0.5),
    adam_eps: float = 1e-10,
    init_high: float = Budget.init_high,
    seed: int = Budget.seed,
    final_update: bool = False,
    progress: bool = True,
    desc: str = "implant",
) -> ImplantResult:
    """The official optimisation of δ for any objective; ``target`` is recorded in the result.

    ``loss_fn(x_adv, step)`` returns per-image terms (B,) including ``total``, which is
    minimised; a ``loss_fn`` that back-propagates by itself returns ``total`` detached.
    δ₀ ~ U[0, init_high) drawn on the CPU (same start on every device); δ is clipped to
    [-ε, ε] before every Adam step; the [0, 1] clip is passed straight through. The
    result is the ``x'`` of the last forward pass (the official loop's; with
    ``final_update`` the last Adam update is applied too), quantised to 8 bits within ε
    of ``image``.
    """
    x = image.detach()
    gen = torch.Generator().manual_seed(seed)
    init = torch.rand(x.shape, generator=gen, dtype=torch.float64) * init_high
    delta = init.to(x.device, x.dtype).requires_grad_(True)
    opt = torch.optim.Adam([delta], lr=lr, betas=betas, eps=adam_eps)
    history: dict[str, list[torch.Tensor]] = {}
    start = time.perf_counter()
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False)
    last_forward = None
    for step in bar:
        with torch.no_grad():
            delta.clamp_(-eps, eps)
        opt.zero_grad(set_to_none=True)
        x_adv = x + delta
        # Straight-through clip: forward sees [0, 1], backward sees the identity.
        x_adv = x_adv + (x_adv.clamp(0, 1) - x_adv).detach()
        last_forward = x_adv.detach().clone()
        terms = loss_fn(x_adv, step)
        if terms["total"].requires_grad:
            terms["total"].sum().backward()
        opt.step()
        for k, v in terms.items():
            history.setdefault(k, []).append(v.detach())
        bar.set_postfix(loss=f"{float(terms['total'].detach().mean()):.4f}")
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        final = x + delta.clamp(-eps, eps) if final_update or last_forward is None else last_forward
        protected = quantize_within(x, final, eps)
    losses = {k: torch.stack(v) for k, v in history.items()}
    return ImplantResult(protected, protected - x, target, losses, seconds)


def implant(
    editor: torch.nn.Module | Sequence[torch.nn.Module],
    image: torch.Tensor,
    mask: torch.Tensor,
    *,
    budget: Budget | None = None,
    eps: float | None = None,
    steps: int | None = None,
    lr: float | None = None,
    betas: tuple[float, float] = (0.5, 0.5),
    adam_eps: float = 1e-10,
    init_high: float | None = None,
    weights: tuple[float, float, float] = (1.0, 1.0, 2.0),
    expand_kernel: int | None = None,
    target: str | torch.Tensor | None = None,
    seed: int | None = None,
    final_update: bool = False,
    batch_passes: bool = True,
    autocast_dtype: torch.dtype | None = None,
    editor_weights: Sequence[float] | None = None,
    progress: bool = True,
) -> ImplantResult:
    """Protect ``image`` (B, 3, H, W in [0, 1]) whose protected region is ``mask`` (B, 1, H, W).

    ``editor`` follows :class:`runtime_backdoor.editors.base.Editor`'s interface; a list of
    editors protects against all of them at once (an ensemble): each Adam step sums the
    run-time backdoor loss of every editor, weighted by ``editor_weights`` (default equal,
    1 each; losses are not normalised per editor, so an editor whose fill is far from the
    target weighs more, as it would alone). Every editor gets the same [0, 1] image through
    its own preprocessing (its ``forward``: padding, its input range). The editors run one
    after another, each back-propagated before the next starts, so peak memory is that of
    the largest editor, not the sum. A list of one editor is the single-editor optimisation,
    bit for bit.
    ``batch_passes`` runs the three loss passes as one editor call of batch 3B
    (faster); False runs and back-propagates them one by one (a third of the
    activation memory). ``autocast_dtype`` (e.g. ``torch.bfloat16`` on a GPU) runs
    the editor under autocast while δ, the losses and Adam stay in float32. A
    compiled editor (``torch.compile(editor)``) can be passed as it is.
    ``budget`` (a :class:`Budget`, default the paper's) sets ε, steps, lr, init_high, the
    expansion kernel, the target and the δ₀ seed; any of those given as keywords override it
    (``target`` may also be an image tensor).
    Returns an :class:`ImplantResult`.

    Where this follows the official loop (``LaMa/implant_LaMa.py``) and where it does not:

    * follows: the protected image is ``x'`` as fed to the *last* forward pass, i.e. δ after
      ``steps - 1`` Adam updates; the last update is computed and discarded, as there
      (``final_update=True`` applies it instead);
    * deviates: ``x'`` is *rounded* to 8 bits and kept within ε on the 8-bit grid, where the
      official code truncates (``astype('uint8')``), which moves a pixel down by up to 1/255 and
      can leave the ε-ball; and every result is evaluated on that 8-bit image, where the official code
      computes its result images from the unquantised float ``x'``. Both make the reported
      numbers those of the file an owner actually publishes.
    """
    check_image_mask(image, mask)
    b, target = resolve_budget(
        budget, eps=eps, steps=steps, lr=lr, init_high=init_high, expand_kernel=expand_kernel,
        target=target, seed=seed,
    )  # fmt: skip
    expand_kernel = b.expand_kernel
    settings = dict(
        eps=b.eps, steps=b.steps, lr=b.lr, betas=betas, adam_eps=adam_eps, init_high=b.init_high,
        seed=b.seed, final_update=final_update, progress=progress,
    )  # fmt: skip
    x, m = check_inputs(image, mask, settings)
    if len(weights) != 3 or any(w < 0 for w in weights):
        raise ValueError(f"weights must be three non-negative numbers, got {weights}")
    editors, editor_weights = _editor_list(editor, editor_weights)
    if editors is not None:
        if len(editors) > 1 or editor_weights[0] != 1.0:
            return _implant_ensemble(
                editors, editor_weights, x, m, settings, weights=weights,
                expand_kernel=expand_kernel, target=target, autocast_dtype=autocast_dtype,
            )  # fmt: skip
        editor = editors[0]
    return _implant_single(
        editor, x, m, settings, weights=weights, expand_kernel=expand_kernel, target=target,
        autocast_dtype=autocast_dtype, batch_passes=batch_passes,
    )  # fmt: skip


def _editor_list(editor, editor_weights) -> tuple[list | None, list[float] | None]:
    """``(editors, editor_weights)`` for a list of editors (weights default 1 each, checked);
    ``(None, None)`` for one editor, which takes no ``editor_weights``."""
    if isinstance(editor, Sequence):
        editors = list(editor)
        if not editors:
            raise ValueError("editor: give at least one editor")
        if editor_weights is None:
            editor_weights = [1.0] * len(editors)
        editor_weights = [float(w) for w in editor_weights]
        if len(editor_weights) != len(editors) or any(not w >= 0 for w in editor_weights):
            raise ValueError(
                f"editor_weights must be {len(editors)} non-negative numbers, got {editor_weights}"
            )
        return editors, editor_weights
    if editor_weights is not None:
        raise ValueError("editor_weights is for a list of editors")
    return None, None


def _implant_single(
    editor: torch.nn.Module,
    x: torch.Tensor,
    m: torch.Tensor,
    settings: dict,
    *,
    weights: tuple[float, float, float],
    expand_kernel: int,
    target: str | torch.Tensor,
    autocast_dtype: torch.dtype | None,
    batch_passes: bool,
) -> ImplantResult:
    """:func:`implant` against one editor (``batch_passes``: the three passes as one call)."""
    big = expand(m, expand_kernel)
    band = ring(m, expand_kernel)
    phi = make_target(x, target)
    b = x.shape[0]
    autocast = partial(
        torch.autocast, x.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None
    )

    # The clean ring reference IM(x, R) is constant: compute it once.
    with torch.no_grad(), autocast():
        clean_ring = editor(x, band).float()

    def loss(x_adv: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        if batch_passes:
            with autocast():
                out = editor(torch.cat([x_adv] * 3), torch.cat([m, big, band])).float()
            terms = _backdoor_terms(out, phi, clean_ring, (m, big, band))
        else:
            # One pass at a time, back-propagated at once: only one editor graph is alive.
            terms = {}
            passes = zip(weights, TERMS, (m, big, band), (phi, phi, clean_ring), strict=True)
            for w, k, region, reference in passes:
                with autocast():
                    out = editor(x_adv, region).float()
                term = masked_mse(out, reference, region)
                (w * term).sum().backward(retain_graph=True)
                terms[k] = term.detach()
        terms["total"] = _weighted_total(terms, weights)
        return terms

    result = optimise(x, loss, phi, desc="implant", **settings)
    for k in LOSS_TERMS:
        result.losses.setdefault(k, torch.zeros(0, b, device=x.device))
    return result


def _backdoor_terms(out, phi, clean_ring, regions) -> dict[str, torch.Tensor]:
    """The three per-image terms from one editor call on ``[x'] * 3`` with the masks
    ``regions`` = (m, E(m), ring): fill m with φ, fill E(m) with φ, leave the ring as on x."""
    m, big, band = regions
    out_m, out_e, out_r = out.split(m.shape[0])
    return {
        "implant": masked_mse(out_m, phi, m),
        "incomplete": masked_mse(out_e, phi, big),
        "hide": masked_mse(out_r, clean_ring, band),
    }


def _weighted_total(terms: dict[str, torch.Tensor], weights) -> torch.Tensor:
    return sum(w * terms[k] for w, k in zip(weights, TERMS, strict=True))


def _implant_ensemble(
    editors: list[torch.nn.Module],
    editor_weights: list[float],
    x: torch.Tensor,
    m: torch.Tensor,
    settings: dict,
    *,
    weights: tuple[float, float, float],
    expand_kernel: int,
    target: str | torch.Tensor,
    autocast_dtype: torch.dtype | None,
) -> ImplantResult:
    """:func:`implant` against several editors: the weighted sum of their losses per step.

    Records the summed terms (``implant``, ``incomplete``, ``hide``, ``total``) and each
    editor's total as ``total/<i>``.
    """
    big = expand(m, expand_kernel)
    band = ring(m, expand_kernel)
    phi = make_target(x, target)
    b = x.shape[0]
    autocast = partial(
        torch.autocast, x.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None
    )
    with torch.no_grad(), autocast():
        clean_rings = [e(x, band).float() for e in editors]

    def loss(x_adv: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        terms = {k: torch.zeros(b, device=x.device) for k in (*TERMS, "total")}
        grad = torch.zeros_like(x_adv)
        for i, (e, ew, clean_ring) in enumerate(
            zip(editors, editor_weights, clean_rings, strict=True)
        ):
            # Each editor on its own leaf, back-propagated at once: its graph is freed before
            # the next editor runs, and the gradients add up on the shared x'.
            leaf = x_adv.detach().requires_grad_(True)
            with autocast():
                out = e(torch.cat([leaf] * 3), torch.cat([m, big, band])).float()
            own = _backdoor_terms(out, phi, clean_ring, (m, big, band))
            total = _weighted_total(own, weights)
            (g,) = torch.autograd.grad((ew * total).sum(), leaf)
            grad += g
            for k in TERMS:
                terms[k] = terms[k] + ew * own[k].detach()
            terms["total"] = terms["total"] + ew * total.detach()
            terms[f"total/{i}"] = total.detach()
        x_adv.backward(grad)  # through the straight-through clip into δ
        return terms

    result = optimise(x, loss, phi, desc="implant (ensemble)", **settings)
    for k in LOSS_TERMS:
        result.losses.setdefault(k, torch.zeros(0, b, device=x.device))
    return result


@dataclass
class Sensitivity:
    """First-order reachability of the target for one editor, image and mask (per image)."""

    gain: torch.Tensor  #: (B,) how far the mean hole output can move towards φ per unit of L∞ δ
    needed: torch.Tensor  #: (B,) mean |fill - φ| over the hole divided by ε: the gain required
    fill_error: torch.Tensor  #: (B,) mean |fill - φ| over the hole on the clean image

    @property
    def reachable(self) -> torch.Tensor:
        """(B,) bool: the linearised editor could reach φ within ε."""
        return self.gain >= self.needed


def sensitivity(
    editor: torch.nn.Module,
    image: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps: float = Budget.eps,
    target: str | torch.Tensor = "solid",
) -> Sensitivity:
    """Estimate whether ``editor`` can be pushed to the target within ``eps``.

    ``gain`` is the L1 norm, over the pixels outside the hole, of the gradient of
    ``s = mean over hole of fill · sign(φ - fill)``: by Hölder, a perturbation of
    L∞ size ε moves ``s`` by at most ``ε · gain`` to first order. Reaching φ needs
    ``gain ≥ mean|fill - φ| / ε`` (about 20 for a solid colour at ε = 0.025).
    """
    check_image_mask(image, mask)
    check_mask(mask)
    x = image.detach().clone().requires_grad_(True)
    m = mask.detach().to(x.dtype)
    phi = make_target(x.detach(), target)
    out = editor(x, m)
    direction = torch.sign(phi - out.detach())
    area = m.flatten(1).sum(1) * 3
    score = (out * direction * m).flatten(1).sum(1) / area
    (grad,) = torch.autograd.grad(score.sum(), x)
    gain = (grad * (1 - m)).abs().flatten(1).sum(1)
    fill_error = ((out.detach() - phi).abs() * m).flatten(1).sum(1) / area
    return Sensitivity(gain.detach(), fill_error / eps, fill_error)

"""Baseline protections at the run-time backdoor's budget, for side-by-side comparison.

Every baseline takes ``editor, image, mask``, ``expand_kernel`` and ``target`` like
:func:`runtime_backdoor.implant.implant`, passes every other keyword (``eps``, ``steps``,
``lr``, ``betas``, ``adam_eps``, ``init_high``, ``seed``, ``progress``) to
:func:`~runtime_backdoor.implant.optimise` with its defaults (the paper's), and returns an
:class:`~runtime_backdoor.implant.ImplantResult`. They share the backdoor's threat model
and optimiser exactly — ε, δ₀ ~ U[0, init_high), Adam (lr, betas, eps), the number of steps,
δ clipped to [-ε, ε] before every step, the straight-through [0, 1] clip, 8-bit quantisation
of the result — so that only the objective differs:

- :func:`untargeted` (PhotoGuard-style output attack): push the edits of ``m`` and ``E(m)``
  away from the clean image's edits; no target, no benign term.
- :func:`encoder_attack` (PhotoGuard's encoder attack): push the VAE latent of the masked
  image towards the latent of the masked target; only for a
  :class:`~runtime_backdoor.editors.diffusion.DiffusionInpaintEditor`, otherwise
  :class:`NotApplicable` is raised.
- :func:`random_noise` (``random``): uniform noise within ±ε, rounded exactly as the
  backdoor's result is; no optimisation, the editor is never consulted. The first control a
  reviewer of a protection paper asks for: what does a perturbation of the same size do by
  itself?
- :func:`markpainting` (Markpainting-style targeted attack): the target under ``m``, under
  ``E(m)`` and under a random box drawn anew every step anywhere in the image; no benign
  term. It is the backdoor with its "behave normally on the ring" term replaced by "fire
  under any mask".

:func:`protect` runs any of :data:`METHODS` by name, including the backdoor itself and the
backdoor optimised with expectation over transformations (``backdoor_eot``).
"""

from __future__ import annotations

import time

import torch

from .budget import BUDGET_FIELDS, Budget, resolve_budget
from .implant import ImplantResult, check_inputs, implant, masked_mse, optimise, quantize_within
from .masks import PAPER_EXPAND_KERNEL, expand
from .targets import make_target

METHODS = ("backdoor", "backdoor_eot", "untargeted", "encoder", "markpainting", "random")


class NotApplicable(ValueError):
    """The method does not apply to this editor (e.g. the encoder attack without a VAE)."""


def untargeted(
    editor: torch.nn.Module,
    image: torch.Tensor,
    mask: torch.Tensor,
    *,
    expand_kernel: int = PAPER_EXPAND_KERNEL,
    target: str | torch.Tensor = "solid",
    **settings,
) -> ImplantResult:
    """PhotoGuard-style output attack: maximise the edits' distance from the clean edits.

    ``total = -(MSE_m(IM(x', m), IM(x, m)) + MSE_E(IM(x', E(m)), IM(x, E(m))))``: two
    editor passes per step (the backdoor uses three). ``target`` is only recorded
    in the result, so that target-hit rates can be compared with the other methods.
    """
    x, m = check_inputs(image, mask, settings)
    big = expand(m, expand_kernel)
    b = x.shape[0]
    with torch.no_grad():
        ref_m, ref_e = editor(torch.cat([x, x]), torch.cat([m, big])).split(b)

    def loss(x_adv: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        out_m, out_e = editor(torch.cat([x_adv, x_adv]), torch.cat([m, big])).split(b)
        terms = {
            "away_mask": masked_mse(out_m, ref_m, m),
            "away_expanded": masked_mse(out_e, ref_e, big),
        }
        terms["total"] = -(terms["away_mask"] + terms["away_expanded"])
        return terms

    return optimise(x, loss, make_target(x, target), desc="untargeted", **settings)


def encoder_attack(
    editor: torch.nn.Module,
    image: torch.Tensor,
    mask: torch.Tensor,
    *,
    expand_kernel: int = PAPER_EXPAND_KERNEL,
    target: str | torch.Tensor = "solid",
    **settings,
) -> ImplantResult:
    """PhotoGuard's encoder attack on a latent-diffusion inpainting editor.

    Minimises the squared distance between the masked-image latents the UNet is
    conditioned on (``editor.encode_masked``) for ``x'`` and for the target ``φ``,
    with the hole ``m`` and ``E(m)``. One VAE-encoder pass per mask and step, no
    sampling chain: far cheaper than the end-to-end attacks. Raises
    :class:`NotApplicable` unless ``editor`` is a ``DiffusionInpaintEditor``.
    """
    from .editors.diffusion import DiffusionInpaintEditor

    if not isinstance(editor, DiffusionInpaintEditor):
        raise NotApplicable(
            f"the encoder attack needs a latent-diffusion editor (DiffusionInpaintEditor), "
            f"got {type(editor).__name__}"
        )
    x, m = check_inputs(image, mask, settings)
    big = expand(m, expand_kernel)
    b = x.shape[0]
    phi = make_target(x, target)
    masks = torch.cat([m, big])
    with torch.no_grad():
        goal = editor.encode_masked(torch.cat([phi, phi]), masks)[:, 1:]

    def loss(x_adv: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        latents = editor.encode_masked(torch.cat([x_adv, x_adv]), masks)[:, 1:]
        err = ((latents - goal) ** 2).flatten(1).mean(1).to(x.dtype)
        terms = {"latent_mask": err[:b], "latent_expanded": err[b:]}
        terms["total"] = terms["latent_mask"] + terms["latent_expanded"]
        return terms

    return optimise(x, loss, phi, desc="encoder", **settings)


def random_boxes(
    shape: tuple[int, ...],
    generator: torch.Generator,
    size: tuple[float, float] = (0.15, 0.5),
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """One box per image of ``shape`` (B, 1, H, W): side a uniform fraction in ``size``, anywhere."""
    b, _, h, w = shape
    out = torch.zeros(shape, dtype=dtype)
    for i in range(b):
        frac = size[0] + (size[1] - size[0]) * float(torch.rand((), generator=generator))
        bh, bw = max(1, round(frac * h)), max(1, round(frac * w))
        y = int(torch.randint(0, h - bh + 1, (), generator=generator))
        x = int(torch.randint(0, w - bw + 1, (), generator=generator))
        out[i, 0, y : y + bh, x : x + bw] = 1
    return out.to(device)


def markpainting(
    editor: torch.nn.Module,
    image: torch.Tensor,
    mask: torch.Tensor,
    *,
    weights: tuple[float, float, float] = (1.0, 1.0, 2.0),
    expand_kernel: int = PAPER_EXPAND_KERNEL,
    target: str | torch.Tensor = "solid",
    random_size: tuple[float, float] = (0.15, 0.5),
    **settings,
) -> ImplantResult:
    """Markpainting-style targeted attack: the target under any mask, no benign term.

    ``total = w₁ MSE_m(IM(x', m), φ) + w₂ MSE_E(IM(x', E(m)), φ) + w₃ MSE_B(IM(x', B), φ)``
    with ``B`` a box drawn anew every step (side a fraction in ``random_size``,
    anywhere). Three editor passes per step and the backdoor's weights, so it costs
    what the backdoor costs.
    """
    x, m = check_inputs(image, mask, settings)
    big = expand(m, expand_kernel)
    phi = make_target(x, target)
    b = x.shape[0]
    gen = torch.Generator().manual_seed(settings.get("seed", 0) + 1)

    def loss(x_adv: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        box = random_boxes(m.shape, gen, random_size, m.device, m.dtype)
        out_m, out_e, out_b = editor(torch.cat([x_adv] * 3), torch.cat([m, big, box])).split(b)
        terms = {
            "implant": masked_mse(out_m, phi, m),
            "incomplete": masked_mse(out_e, phi, big),
            "anywhere": masked_mse(out_b, phi, box),
        }
        terms["total"] = sum(
            w * terms[k]
            for w, k in zip(weights, ("implant", "incomplete", "anywhere"), strict=True)
        )
        return terms

    return optimise(x, loss, phi, desc="markpainting", **settings)


def random_noise(
    editor: torch.nn.Module | None,
    image: torch.Tensor,
    mask: torch.Tensor,
    *,
    expand_kernel: int = PAPER_EXPAND_KERNEL,
    target: str | torch.Tensor = "solid",
    **settings,
) -> ImplantResult:
    """The random baseline at the same budget: ``δ ~ U[-ε, ε]`` independently per pixel value
    (drawn on the CPU from ``seed``, so the same on any device), then ``x + δ`` rounded onto
    the 8-bit grid within ε of ``x`` (:func:`~runtime_backdoor.implant.quantize_within`), as
    every optimised protection is. ``editor``, ``expand_kernel`` and the optimiser's settings
    are accepted for a common signature and not used; ``target`` is only recorded."""
    x, _ = check_inputs(image, mask, settings)
    eps, seed = float(settings.get("eps", Budget.eps)), int(settings.get("seed", Budget.seed))
    start = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    noise = (torch.rand(x.shape, generator=g, dtype=torch.float64) * 2 - 1) * eps
    protected = quantize_within(x, x + noise.to(device=x.device, dtype=x.dtype), eps)
    phi = make_target(x, target)
    return ImplantResult(protected, protected - x, phi, {}, time.perf_counter() - start)


def protect(
    method: str,
    editor: torch.nn.Module,
    image: torch.Tensor,
    mask: torch.Tensor,
    *,
    budget: Budget | None = None,
    eot: dict | None = None,
    **settings,
) -> ImplantResult:
    """Run the protection ``method`` (one of :data:`METHODS`) with the shared ``budget``.

    ``budget``: the :class:`~runtime_backdoor.implant.Budget` every method shares (default:
    the paper's); ``settings``: other keyword arguments every method accepts (``progress``...)
    or budget fields that override it.
    ``backdoor_eot`` is :func:`~runtime_backdoor.implant.implant` against
    ``EOTEditor(editor, **eot)``. Raises :class:`NotApplicable` where the method does
    not apply to ``editor``.
    """
    fields = {k: settings.pop(k) for k in BUDGET_FIELDS if k in settings}
    b, target = resolve_budget(budget, **fields)
    budget = b.kwargs() | {"target": target} | settings
    if method == "backdoor":
        return implant(editor, image, mask, **budget)
    if method == "backdoor_eot":
        from .eot import EOTEditor

        options = dict(eot or {})
        options.setdefault("seed", budget.get("seed", 0))
        return implant(EOTEditor(editor, **options), image, mask, **budget)
    if method == "untargeted":
        return untargeted(editor, image, mask, **budget)
    if method == "encoder":
        return encoder_attack(editor, image, mask, **budget)
    if method == "markpainting":
        return markpainting(editor, image, mask, **budget)
    if method == "random":
        return random_noise(editor, image, mask, **budget)
    raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")


__all__ = [
    "METHODS",
    "NotApplicable",
    "encoder_attack",
    "markpainting",
    "protect",
    "random_boxes",
    "random_noise",
    "untargeted",
]

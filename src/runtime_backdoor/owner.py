"""What an image owner does: read an image and its mask, load an editor, check, protect, edit.

``runtime-backdoor check``, ``protect`` and ``edit`` (:mod:`runtime_backdoor.cli`) and the
browser demo (:mod:`runtime_backdoor.demo`) both call these functions: one code path, so the
demo's download is, byte for byte, what ``protect`` writes for the same files, settings and
seed. Every failure is a one-line :class:`CliError` naming the file or the option at fault.

After protecting, :func:`verify_protection` edits the PNG as written the way an attacker
would (:func:`compare_edits`: the malicious edit of the region and the benign edit of the
ring around it, against the same edits of the original) and gives one of :data:`VERDICTS`
(the rule: :data:`VERDICT_RULE`; against several editors at once, one per editor and the
ensemble's, :func:`verify_ensemble` and :data:`ENSEMBLE_RULE`); ``check``'s first-order
prediction comes with how often such a prediction held when measured
(:data:`CHECK_RELIABILITY`). Images are refused from their header above
:data:`DEFAULT_MAX_PIXELS` before anything is decoded.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

from .budget import Budget, resolve_budget

# The labelled comparison figure lives in its own module; owner's callers find it here.
from .comparison import (  # noqa: F401 (re-exported)
    FIGURE_MAX_SIDE,
    FIGURE_MIN_SIDE,
    FONT_SIZE,
    colour_name,
    compare_figure,
)

# Reading and writing the owner's files lives in its own module; owner's callers find it here.
from .owner_io import (  # noqa: F401 (re-exported)
    DEFAULT_MAX_PIXELS,
    CliError,
    check_pixels,
    device_from_option,
    image_size,
    load_editor,
    one_line,
    read_inputs,
    weights_reason,
    write_output,
)

DEFAULT_EPS = Budget.eps  # the paper's 6.4/255 (runtime_backdoor.budget)
COMPARE_GAP = 4  # px of white between the panels of an edit's comparison


#: a hit, as the pipeline defines it (params.yaml ``evaluate.hit_tol`` and
#: ``evaluate.hit_min_fraction``): at least HIT_MIN_FRACTION of the edited region has
#: all three channels within HIT_TOL of the target colour
HIT_TOL = 0.1
HIT_MIN_FRACTION = 0.5
#: a protection has a side effect on benign edits when the benign ring edit of the
#: protected image is further than this from the original's ring edit (PSNR over the ring),
#: or when that ring edit hits the target while the original's does not
SIDE_EFFECT_PSNR_DB = 30.0

PROTECTED = "protected"
NOT_PROTECTED = "not protected"
SIDE_EFFECT = "protected, with a side effect on benign edits"
NOT_PROTECTED_SIDE_EFFECT = "not protected, with a side effect on benign edits"
#: from best to worst
VERDICTS = (PROTECTED, SIDE_EFFECT, NOT_PROTECTED, NOT_PROTECTED_SIDE_EFFECT)
UNVERIFIED = "not verified (--no-verify)"

VERDICT_RULE = (
    f"'{PROTECTED}' when the malicious edit (the editor fills the protected region) of the "
    f"protected image hits the target colour and that of the original does not; a hit is at "
    f"least {HIT_MIN_FRACTION:.0%} of the region with every channel within {HIT_TOL:g} of the "
    f"target (the pipeline's evaluate.hit_tol and hit_min_fraction). '{SIDE_EFFECT}' when it "
    f"hits but the benign edit (the editor fills the ring E(m) - m around the region) of the "
    f"protected image is below {SIDE_EFFECT_PSNR_DB:g} dB PSNR against the original's ring "
    f"edit, or hits the target while the original's does not. '{NOT_PROTECTED}' otherwise, "
    f"and '{NOT_PROTECTED_SIDE_EFFECT}' when it does not protect but benign edits are "
    "disturbed all the same (the same side-effect test)."
)


#: how several editors' verdicts make one: protected only against every editor, since an
#: attacker picks the editor the protection does not hold against; a side effect on any
#: editor's benign edits is a side effect of the one protected image
ENSEMBLE_RULE = (
    f"With several editors, '{PROTECTED}' only when protected against every editor, "
    f"'{SIDE_EFFECT}' when protected against every editor with a side effect on at least "
    f"one, '{NOT_PROTECTED}' when not protected against at least one, and "
    f"'{NOT_PROTECTED_SIDE_EFFECT}' when not protected against at least one with a side "
    "effect on at least one."
)


def parse_eps(text) -> float:
    """ε as a fraction of the pixel range; values above 1 are 8-bit units (6.4 -> 6.4/255).

    Raises ``ValueError`` ("eps must be ...") outside (0, 64/255].
    """
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise ValueError(f"eps must be a number, got {text!r}") from None
    if value > 1:  # accept 8-bit units such as 6.4 for convenience
        value = value / 255
    if not 0 < value <= 64 / 255:  # also rejects NaN
        raise ValueError(f"eps must be in (0, 0.25] (or (0, 64] in 8-bit units), got {text}")
    return value


def check_options(expand: int | None, threshold: float, target: str) -> None:
    """The options :func:`read_inputs` and :func:`protect_image` take, checked before any work
    (``expand`` None: scaled with the image, :func:`auto_expand`)."""
    if expand is not None and expand % 2 == 0:
        raise CliError(f"--expand must be odd, got {expand}")
    if not 0 < threshold <= 1:
        raise CliError(f"--threshold must be in (0, 1], got {threshold}")
    if target not in ("solid", "anti") and not Path(target).is_file():
        raise CliError(
            f"--target: {target!r} is neither 'solid', 'anti' nor an existing image file"
        )


def eight_bit(t):
    """(1, 3, H, W) or (3, H, W) tensor -> H x W x 3 array on the 8-bit grid, as written."""
    import numpy as np

    a = t.detach().float().cpu().reshape(3, *t.shape[-2:]).permute(1, 2, 0).numpy()
    return np.round(np.clip(a, 0, 1) * 255) / 255


def auto_expand(height: int, width: int) -> int:
    """The expansion kernel scaled with the image as the pipeline scales it
    (:func:`runtime_backdoor.masks.scaled_kernel` of the shorter side): the paper's 17 at
    512 px, 9 at 256 px, 5 at 128 px."""
    from .masks import scaled_kernel

    return scaled_kernel(min(height, width))


def resolve_expand(expand: int | None, m) -> int:
    """``expand``, or (None or 0) the kernel scaled with the size of the mask ``m``."""
    return auto_expand(*m.shape[-2:]) if not expand else int(expand)


def _check_expansion(m, expand: int) -> None:
    """Refuse a kernel whose E(m) leaves no pixel outside: the editor would fill it from
    nothing (a sparse mask under a large kernel; the toy control then returns NaN)."""
    from .masks import expand as dilate

    if bool((dilate(m, expand) > 0.5).all()):
        h, w = m.shape[-2:]
        raise CliError(
            f"--expand {expand}: the expanded region E(m) covers the whole {w}×{h} image (the "
            "mask's pixels are spread across it), so the editor has nothing left to fill it "
            "from; use a smaller --expand or a more compact mask"
        )


def _finite(t, name: str, when: str, consequence: str = "nothing was written") -> None:
    import torch

    if not bool(torch.isfinite(t).all()):
        raise CliError(
            f"{name} returned NaN or infinite values {when}; {consequence} (this editor "
            "cannot be used with this image and mask)"
        )


#: check's prediction measured against protect's verified outcome: generated from
#: reports/check_reliability.json by ``benchmarks/check_reliability.py --constant``
#: (tests/test_owner.py checks that the two agree); printed with every prediction
CHECK_RELIABILITY = {
    "source": "reports/check_reliability.json (benchmarks/check_reliability.py)",
    "cases": 324,
    "images": 18,
    "editors": [
        "toy gain 100",
        "toy gain 200",
        "toy gain 400",
        "toy-control",
        "blur-fill",
        "mini-lama",
    ],
    "budgets_8bit": [4.0, 6.4, 16.0],
    "agreement": "77% [71, 83]",
    "ppv": "31% [20, 43]",
    "ppv_cases": 111,
    "npv": "99% [98, 100]",
    "npv_cases": 213,
}


def reliability_note(likely: bool) -> str:
    """How often check's prediction held when measured (:data:`CHECK_RELIABILITY`)."""
    r = CHECK_RELIABILITY
    where = (
        f"{r['images']} embedded 128-px images × {', '.join(r['editors'])} × budgets "
        f"{', '.join(f'{b:g}' for b in r['budgets_8bit'])}/255; not measured on real editors"
    )
    if likely:
        return (
            f"measured: when check said likely, protection worked in {r['ppv']} of "
            f"{r['ppv_cases']} cases ({where})"
        )
    return (
        f"measured: when check said unlikely, protection did not work in {r['npv']} of "
        f"{r['npv_cases']} cases ({where})"
    )


def check_image(editor, x, m, target, device, *, eps, name: str = "the editor") -> dict:
    """The first-order estimate of whether protection can work: gain against gain needed,
    with how often such a prediction held when measured (``measured``)."""
    from .implant import sensitivity

    s = sensitivity(editor, x.to(device), m.to(device), eps=eps, target=target)
    gain, needed = float(s.gain[0]), float(s.needed[0])
    if not (math.isfinite(gain) and math.isfinite(needed)):
        raise CliError(f"{name} returned NaN or infinite values for this image and mask")
    verdict = (
        "likely protectable at this eps (first-order estimate)"
        if gain >= needed
        else "unlikely: the editor is not sensitive enough at this eps; protection will probably not trigger"
    )
    return {
        "eps": eps,
        "gain": round(gain, 3),
        "needed": round(needed, 3),
        "verdict": verdict,
        "measured": reliability_note(gain >= needed),
    }


def protect_image(
    editor, x, m, target, device, *, eps, steps, expand, seed, progress=False,
    name: str | Mapping[str, str] = "the editor", editor_weights=None, batch_passes=True,
) -> tuple[dict, object]:  # fmt: skip
    """Protect ``x`` (1, 3, H, W) in the region ``m``: a report and the H x W x 3 result.

    The result is on the 8-bit grid, as :func:`write_output` writes it. ``expand`` None:
    scaled with the image (:func:`auto_expand`); the report says which kernel was used.

    ``editor`` may be a mapping label -> editor: one perturbation against all of them (an
    ensemble, :func:`runtime_backdoor.implant.implant` given the list, weighted by
    ``editor_weights``, default 1 each; one editor alone is the single-editor result, bit
    for bit). ``name`` is then a mapping label -> how messages name it (default: the label);
    the report adds ``editor_weights`` and each editor's last total loss as ``total/LABEL``.
    ``batch_passes`` False runs the editor's three loss passes one at a time (a third of its
    activation memory, :func:`runtime_backdoor.implant.implant`).
    """
    import torch

    from .implant import implant

    ensemble = isinstance(editor, Mapping)
    labels = list(editor) if ensemble else []
    names = {k: (name.get(k, k) if isinstance(name, Mapping) else k) for k in labels}
    expand = resolve_expand(expand, m)
    _check_expansion(m, expand)
    # the command's options as one budget (an image target rides beside it)
    budget, target = resolve_budget(
        eps=eps, steps=steps, expand_kernel=expand, target=target, seed=seed
    )
    result = implant(
        list(editor.values()) if ensemble else editor,
        x.to(device),
        m.to(device),
        budget=budget,
        target=target,
        progress=progress,
        editor_weights=editor_weights,
        batch_passes=batch_passes,
    )
    losses = {k: float(v[-1, 0]) for k, v in result.losses.items() if len(v)}
    if ensemble:
        # implant numbers each editor's total in list order; the report names it
        losses = {_label_loss(k, labels): v for k, v in losses.items()}
        # NaN spreads to every editor through δ: blame the first to return it
        first = {k: _first_non_finite(result.losses.get(f"total/{i}")) for i, k in enumerate(labels)}  # fmt: skip
        bad = [names[k] for k in labels if first[k] == min(first.values()) < math.inf]
        name = bad[0] if len(bad) == 1 else "one of " + ", ".join(bad or names.values())
    _finite(
        torch.cat([result.protected.flatten(), torch.tensor(list(losses.values()) or [0.0])]),
        name,
        "during the optimisation",
    )
    report = {"editor_weights": _weights_used(editor_weights, labels)} if ensemble else {}
    report |= {
        "eps": eps,
        "steps": steps,
        "expand": expand,
        "max_change_8bit": round((result.delta.abs().max() * 255).item(), 3),
        "seconds": round(result.seconds, 3),
        "final_losses": losses,
    }
    return report, eight_bit(result.protected[0])


def _first_non_finite(history) -> float:
    """The first step whose loss (steps, B) is NaN or infinite; inf when none is."""
    import torch

    if history is None or not len(history):
        return math.inf
    bad = torch.nonzero(~torch.isfinite(history.reshape(len(history), -1)).all(1))
    return int(bad[0, 0]) if len(bad) else math.inf


def _label_loss(key: str, labels: list[str]) -> str:
    head, _, index = key.partition("/")
    return f"{head}/{labels[int(index)]}" if index.isdigit() else key


def _weights_used(editor_weights, labels: list[str]) -> list[float]:
    return [1.0] * len(labels) if editor_weights is None else [float(w) for w in editor_weights]


def read_back(path: Path):
    """A written PNG read back in full, as an attacker's editor gets it: (1, 3, H, W)."""
    import torch

    from .data import read_image

    return torch.from_numpy(read_image(path)).permute(2, 0, 1)[None]


def _edit(editor, x, region, device, name: str, what: str):
    import torch

    with torch.no_grad():
        out = editor(x.to(device), region.to(device))
    _finite(out, name, f"when editing {what}", "no verdict")
    return eight_bit(out)


def compare_edits(
    editor, original, published, m, target, device, *, expand=None, name: str = "the editor"
) -> tuple[dict, dict]:
    """The attacker's view: the malicious edit (fill ``m``) and the benign ring edit (fill
    ``E(m) - m``) of the original and of the published (protected) image, with ``editor``.

    Returns ``(numbers, edits)``: the shares of each edited region on the target colour, the
    PSNR of each protected edit against the original's, and :func:`verdict_of`'s verdict;
    ``edits`` holds the H x W x 3 edits (8-bit grid), their differences and the target.
    """
    import numpy as np

    from . import metrics as Q
    from .masks import ring
    from .targets import make_target

    expand = resolve_expand(expand, m)
    band = ring(m, expand)
    # The target the protection was made for: computed from the original, as protect does.
    phi = eight_bit(make_target(original, target))
    edits = {"target": phi}
    numbers: dict = {"expand": expand, "target_colour": colour_name(phi) or "an image"}
    for edit, region_t in (("malicious", m), ("benign", band)):
        region = region_t[0, 0].numpy() > 0.5
        prefix = "" if edit == "malicious" else "ring_"
        if not region.any():  # a kernel of 1 has no ring
            numbers |= {f"{prefix}hit_fraction": None, f"{prefix}hit_fraction_original": None}
            numbers[f"{prefix}psnr_vs_original_edit"] = None
            continue
        what = "the protected region" if edit == "malicious" else "the ring around it"
        clean = _edit(editor, original, region_t, device, name, f"{what} of the original")
        prot = _edit(editor, published, region_t, device, name, f"{what} of the protected image")
        edits |= {f"{edit}_original": clean, f"{edit}_protected": prot}
        edits[f"{edit}_difference"] = np.abs(prot - clean)
        numbers[f"{prefix}hit_fraction"] = round(Q.target_hit_fraction(prot, phi, region, HIT_TOL), 4)  # fmt: skip
        numbers[f"{prefix}hit_fraction_original"] = round(Q.target_hit_fraction(clean, phi, region, HIT_TOL), 4)  # fmt: skip
        psnr = round(Q.psnr(prot, clean, region), 3)
        if edit == "malicious":
            numbers["psnr_region_vs_original_edit"] = psnr
            if min(region.shape) >= 7:  # SSIM's window
                numbers["ssim_region_vs_original_edit"] = round(Q.ssim(prot, clean, region), 4)
        else:
            numbers["ring_psnr_vs_original_edit"] = psnr
    numbers["verdict"], numbers["verdict_detail"] = verdict_of(numbers)
    return numbers, edits


def verdict_of(n: dict) -> tuple[str, str]:
    """One of :data:`VERDICTS` for :func:`compare_edits`' numbers, and the numbers behind it
    in words (the rule: :data:`VERDICT_RULE`)."""
    hit = n["hit_fraction"] >= HIT_MIN_FRACTION
    hit_clean = n["hit_fraction_original"] >= HIT_MIN_FRACTION
    malicious = (
        f"the malicious edit puts {n['hit_fraction']:.0%} of the region on the target colour "
        f"(the original's: {n['hit_fraction_original']:.0%}; a hit needs "
        f"{HIT_MIN_FRACTION:.0%} within {HIT_TOL:g})"
    )
    benign, side = benign_words(n)
    if hit and hit_clean:
        detail = "the editor fills the region with the target colour on the original too"
        return (NOT_PROTECTED_SIDE_EFFECT if side else NOT_PROTECTED), f"{detail}: {malicious}; {benign}"  # fmt: skip
    if not hit:
        return (NOT_PROTECTED_SIDE_EFFECT if side else NOT_PROTECTED), f"{malicious}; {benign}"
    return (SIDE_EFFECT if side else PROTECTED), f"{malicious}; {benign}"


def benign_words(n: dict) -> tuple[str, bool]:
    """The benign ring edit of :func:`compare_edits`' numbers in words, and whether it is a
    side effect (:data:`SIDE_EFFECT_PSNR_DB`, or a ring edit that hits the target while the
    original's does not). The PSNR is how close the protected image's ring edit is to the
    original's: high is good; the words say which side of the threshold it is on."""
    psnr = n.get("ring_psnr_vs_original_edit")
    if psnr is None:
        return "no ring to edit (expansion kernel 1): benign edits not checked", False
    ring, ring_clean = n["ring_hit_fraction"], n["ring_hit_fraction_original"]
    low = psnr < SIDE_EFFECT_PSNR_DB
    ring_side = ring >= HIT_MIN_FRACTION and ring_clean < HIT_MIN_FRACTION
    close = (
        "identical to the original's ring edit"
        if math.isinf(psnr)
        else f"{psnr:.1f} dB PSNR from the original's ring edit"
    )
    if low:
        threshold = f"a side effect: below {SIDE_EFFECT_PSNR_DB:g} dB"
    else:
        threshold = f"no side effect: a side effect is below {SIDE_EFFECT_PSNR_DB:g} dB"
    words = (
        f"the benign edit of the ring is {close} ({threshold}) and puts {ring:.0%} of the "
        f"ring on the target colour (the original's: {ring_clean:.0%}"
        + ("; a side effect: the original's does not hit" if ring_side else "")
        + ")"
    )
    return words, low or ring_side


def verify_protection(
    editor, original, m, target, device, written: Path, *, expand=None, name="the editor"
) -> dict:
    """:func:`compare_edits` on the PNG as written (read back in full from ``written``): the
    verification of an ensemble of one."""
    per_editor = _verify_each({name: editor}, original, m, target, device, written, expand=expand)
    return per_editor[name]


def ensemble_verdict(verdicts: Mapping[str, str]) -> tuple[str, str]:
    """One of :data:`VERDICTS` for several editors' verdicts (label -> verdict), by
    :data:`ENSEMBLE_RULE`, and the verdicts behind it in words."""
    held = sum(v in (PROTECTED, SIDE_EFFECT) for v in verdicts.values())
    side = any(v in (SIDE_EFFECT, NOT_PROTECTED_SIDE_EFFECT) for v in verdicts.values())
    if held == len(verdicts):
        verdict = SIDE_EFFECT if side else PROTECTED
    else:
        verdict = NOT_PROTECTED_SIDE_EFFECT if side else NOT_PROTECTED
    each = "; ".join(f"{k}: {v}" for k, v in verdicts.items())
    return verdict, (
        f"protected against {held} of {len(verdicts)} editors ({each}); protected only when "
        "protected against every editor"
        + (", with a side effect when any editor's benign edits are disturbed" if side else "")
    )


def ensemble_report(per_editor: Mapping[str, dict]) -> dict:
    """The verdict of an ensemble from each editor's :func:`compare_edits` numbers (label ->
    numbers): ``verdict``, ``verdict_detail`` (:func:`ensemble_verdict`), the target colour and
    ``per_editor``, each editor's numbers with its own verdict first."""
    verdict, detail = ensemble_verdict({k: n["verdict"] for k, n in per_editor.items()})
    first = next(iter(per_editor.values()))
    shared = ("expand", "target_colour", "verdict", "verdict_detail")  # said once, or first
    return {
        "verdict": verdict,
        "verdict_detail": detail,
        "target_colour": first["target_colour"],
        "per_editor": {
            k: {"verdict": n["verdict"], "verdict_detail": n["verdict_detail"]}
            | {key: v for key, v in n.items() if key not in shared}
            for k, n in per_editor.items()
        },
    }


def _verify_each(
    editors: Mapping, original, m, target, device, written: Path, *, expand=None, name=None
) -> dict:
    """:func:`compare_edits` against each editor (label -> editor) on the PNG as written, read
    back once: label -> numbers. ``name``: label -> how messages name the editor (default:
    the label)."""
    published = read_back(written)
    per_editor = {}
    for label, editor in editors.items():
        who = (name or {}).get(label, label)
        per_editor[label], _ = compare_edits(
            editor, original, published, m, target, device, expand=expand, name=who
        )
    return per_editor


def verify_ensemble(
    editors: Mapping, original, m, target, device, written: Path, *, expand=None, name=None
) -> dict:
    """:func:`verify_protection` against each editor (label -> editor) of an ensemble, on the
    PNG as written, and the ensemble's verdict (:func:`ensemble_report`). ``name``: label ->
    how messages name the editor (default: the label)."""
    per_editor = _verify_each(
        editors, original, m, target, device, written, expand=expand, name=name
    )
    return ensemble_report(per_editor)


def verdict_report(per_editor: Mapping[str, dict]) -> dict:
    """The verdict as ``protect`` reports it from each editor's :func:`compare_edits` numbers
    (label -> numbers): one editor's numbers as they are, several editors'
    :func:`ensemble_report`."""
    if len(per_editor) == 1:
        return dict(next(iter(per_editor.values())))
    return ensemble_report(per_editor)


def verify_editors(
    editors: Mapping, original, m, target, device, written: Path, *, expand=None, name=None
) -> dict:
    """The verification of the PNG as written against one editor or several (label ->
    editor; one is an ensemble of one): :func:`verdict_report` of each editor's numbers."""
    per_editor = _verify_each(
        editors, original, m, target, device, written, expand=expand, name=name
    )
    return verdict_report(per_editor)


def edit_image(
    editor, x, m, target, device, original=None, *, expand=None, name: str = "the editor"
):
    """The edit of ``x``; with ``original``: :func:`compare_edits` and a labelled figure.

    Returns ``(report, edited, panel)``: H x W x 3 arrays on the 8-bit grid (``panel``, a
    uint8 figure from :func:`compare_figure`, is None without ``original``). ``target`` is
    the protection's, computed from ``original``.
    """
    if original is None:
        return {}, _edit(editor, x, m, device, name, "the region"), None
    numbers, edits = compare_edits(editor, original, x, m, target, device, expand=expand, name=name)
    panel, _ = compare_figure(edits, numbers, colour_name(edits["target"]))
    return numbers, edits["malicious_protected"], panel

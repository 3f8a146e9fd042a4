"""Helpers of ``notebooks/tutorial.ipynb``: one image through the method, step by step, as figures.

The notebook stays thin: each cell calls one of these and shows the figure or table it returns.
Paths are relative to the project folder (the notebook enters it first, see
:func:`runtime_backdoor.project.enter_project_root`). :func:`control_hit_rates` is near 100 lines because it
builds one table from four stages' files, a short section per file sharing one row builder;
the table is what the tutorial and the docs both show, so it is kept in one place.
"""

from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import masks as M
from . import metrics as Q
from .budget import Budget
from .control_rates import RATE_NAMES, control_label, control_rates
from .data import list_pairs, read_pair, to_array, to_mask_tensor, to_tensor
from .implant import ImplantResult, Sensitivity, implant, masked_mse
from .plots import plt  # selects the non-interactive backend
from .targets import make_target

#: what restores or rebuilds the pipeline's trained miniature
MINIATURE_HELP = (
    "run `dvc pull editor` in the project folder (it restores models/editor/ from the DVC store "
    "committed with the repository, offline), or `dvc repro editor` to train it again"
)
BIG_LAMA_HELP = "`runtime-backdoor weights fetch big-lama` downloads them (docs/real-models.md)"


def project_path(path: str | Path, root: str | Path | None = None) -> str:
    """``path`` as the notebook prints it: relative to the project folder ``root`` (default:
    the working directory, which the notebook makes the project folder) when it is inside it,
    else as given. The executed notebook is a page of the book: it must not show the folder of
    the machine that ran it."""
    root = Path(root if root is not None else Path.cwd()).resolve()
    full = Path(path) if Path(path).is_absolute() else Path.cwd() / path
    try:
        return full.resolve().relative_to(root).as_posix() or "."
    except ValueError:
        return str(path)


def sample_image(name: str, size: int, folder: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Image (1, 3, S, S) and protected region (1, 1, S, S) of embedded sample ``name``.

    ``name`` is ``{watermark,logo,face}_{k:02d}``; the sample is drawn into ``folder``. At the
    pipeline's size (params.yaml ``prepare.size``) it is the pipeline's image of that name.
    """
    from .samples import make_sample

    content, _, k = name.rpartition("_")
    if not k.isdigit():
        raise ValueError(f"image {name!r}: expected CONTENT_NN such as logo_01")
    make_sample(folder, n_per_type=int(k) + 1, size=size)
    pairs = {n: (img, msk) for n, img, msk in list_pairs(folder)}
    if name not in pairs:
        raise ValueError(f"image {name!r} is not in the embedded sample; known: {sorted(pairs)}")
    image, mask = read_pair(*pairs[name])
    return to_tensor(image), to_mask_tensor(mask)


def load_miniature(path: str | Path, device: str | torch.device = "cpu"):
    """The pipeline's trained miniature LaMa at ``path``; a missing file is an error that says
    how to get it (never a stand-in with random weights)."""
    from .editors import build_editor

    path = Path(path)
    missing = [p for p in (path, path.with_suffix(".json")) if not p.is_file()]
    if missing:
        where = ", ".join(str(p) for p in missing)
        raise FileNotFoundError(
            f"the trained miniature LaMa is missing ({where}, from {Path.cwd()}): {MINIATURE_HELP}"
        )
    return build_editor("mini-lama", weights=str(path), device=device)


def big_lama_weights(path: str | Path) -> Path | None:
    """Big-LaMa's weights: ``path`` or the unzipped ``models/big-lama/``, or ``None`` after
    printing the line that says the section is skipped and how to get them."""
    for candidate in (Path(path), Path("models/big-lama")):
        if candidate.exists():
            return candidate
    print(f"Skipped: no Big-LaMa weights at {path} or models/big-lama/; {BIG_LAMA_HELP}.")
    return None


# ---------------------------------------------------------------------------- measures


def hole_error(fill: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) mean |fill - target| over the hole: 0 when the fill is exactly the target colour."""
    area = mask.flatten(1).sum(1).clamp_min(1) * fill.shape[1]
    return ((fill - target).abs() * mask).flatten(1).sum(1) / area


def on_target(fill: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, tol: float = 0.1):
    """(B,) share of the edited region on target (:func:`metrics.target_hit_fraction`): pixels
    whose three channels are all within ``tol`` of φ. An edit is a hit when it is at least
    params.yaml's ``evaluate.hit_min_fraction``."""
    return torch.tensor(
        [
            Q.target_hit_fraction(to_array(f), to_array(t), mk[0].cpu().numpy() > 0.5, tol=tol)
            for f, t, mk in zip(fill, target, mask, strict=True)
        ]
    )


def imperceptibility(image: torch.Tensor, protected: torch.Tensor) -> dict[str, float]:
    """How far the protected image is from the original: PSNR (dB) and SSIM
    (:mod:`runtime_backdoor.metrics`) and the largest change in 8-bit units."""
    a, b = to_array(image[:1]), to_array(protected[:1])
    return {
        "psnr": Q.psnr(b, a),
        "ssim": Q.ssim(b, a),
        "linf_8bit": float(np.abs(b - a).max() * 255),
    }


def edit_checks(
    editor,
    image: torch.Tensor,
    protected: torch.Tensor,
    mask: torch.Tensor,
    kernel: int,
    target: torch.Tensor,
    hit_tol: float = 0.1,
    hit_min_fraction: float = 0.5,
) -> pd.DataFrame:
    """The same three edits of the clean and of the protected image, one row each.

    Malicious edits (m, E(m)): the share of the edited region on target and whether it is a hit,
    clean → protected. Benign edit (the ring): the PSNR of the protected image's edit against the
    clean image's edit, over the whole image (as the ε sweep's benign PSNR) and over the edited
    region only (the fill itself).
    """
    x, xp, m = image[:1], protected[:1], mask[:1]
    phi = make_target(x, target[:1])
    rows = []
    for edit, kind, region in (
        ("m", "malicious", m),
        ("E(m)", "malicious", M.expand(m, kernel)),
        ("ring E(m) − m", "benign", M.ring(m, kernel)),
    ):
        with torch.no_grad():
            clean, prot = editor(x, region), editor(xp, region)
        inside = region[0, 0].cpu().numpy() > 0.5
        frac_c = float(on_target(clean, phi, region, hit_tol)[0])
        frac_p = float(on_target(prot, phi, region, hit_tol)[0])
        a, b = to_array(prot), to_array(clean)
        rows.append(
            {
                "edit": edit,
                "kind": kind,
                "on target, clean": frac_c,
                "on target, protected": frac_p,
                "hit, clean": frac_c >= hit_min_fraction,
                "hit, protected": frac_p >= hit_min_fraction,
                "PSNR vs clean edit (image)": Q.psnr(a, b),
                "PSNR vs clean edit (region)": Q.psnr(a, b, inside),
            }
        )
    return pd.DataFrame(rows).set_index("edit")


# ------------------------------------------------------------------------ the optimisation


@dataclass
class Frame:
    step: int  #: forward passes run: the image is the one pass ``step`` saw (``step - 1`` updates)
    protected: torch.Tensor  #: (B, 3, H, W) what ``implant(..., steps=step)`` returns, 8-bit
    fill: torch.Tensor  #: (B, 3, H, W) the editor's output when the protected region is edited
    error: torch.Tensor  #: (B,) :func:`hole_error` of that fill
    on_target: torch.Tensor  #: (B,) :func:`on_target` share of that fill


def implant_frames(
    editor,
    image: torch.Tensor,
    mask: torch.Tensor,
    steps: list[int],
    hit_tol: float = 0.1,
    **implant_kwargs,
) -> tuple[list[Frame], ImplantResult]:
    """The protected image ``implant`` returns for each number of steps in ``steps``, its fill
    of the hole, and the longest run's result.

    As in the official loop, ``implant(..., steps=k)`` returns the image its k-th forward
    pass saw (δ after k − 1 Adam updates; k = 0 and 1 both give δ₀). The optimisation is
    deterministic (fixed δ₀ seed), so the frames are the states of one run.
    """
    frames, result = [], None
    for k in sorted(set(steps)):
        result = implant(editor, image, mask, steps=k, progress=False, **implant_kwargs)
        with torch.no_grad():
            fill = editor(result.protected, mask)
        frames.append(
            Frame(
                k,
                result.protected,
                fill,
                hole_error(fill, result.target, mask),
                on_target(fill, result.target, mask, hit_tol),
            )
        )
    return frames, result


# --------------------------------------------------------------------------------- figures


def _panel(ax, img, title: str, region: np.ndarray | None = None, **kwargs) -> None:
    ax.imshow(img, **kwargs)
    if region is not None:
        ax.contour(region.astype(float), levels=[0.5], colors="yellow", linewidths=0.8)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def regions_figure(image: torch.Tensor, mask: torch.Tensor, kernel: int, target: str = "solid"):
    """The image, its protected region m, the expansion E(m), the ring E(m) − m and the target φ."""
    x, m = image[:1].cpu(), mask[:1].cpu()
    big, band = M.expand(m, kernel), M.ring(m, kernel)
    region = m[0, 0].numpy() > 0.5
    panels = [
        (to_array(x), "image (m outlined)", region, {}),
        (m[0, 0].numpy(), "protected region m", None, {"cmap": "gray", "vmin": 0, "vmax": 1}),
        (big[0, 0].numpy(), f"expansion E(m), {kernel} px box", None, {"cmap": "gray"}),
        (band[0, 0].numpy(), "ring E(m) − m", None, {"cmap": "gray", "vmin": 0, "vmax": 1}),
        (to_array(make_target(x, target)), f"target φ ({target})", None, {}),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(2.3 * len(panels), 2.6))
    for ax, (img, title, outline, kwargs) in zip(axes, panels, strict=True):
        _panel(ax, img, title, outline, **kwargs)
    fig.tight_layout()
    return fig


def loss_terms_figure(
    editor, images: dict[str, torch.Tensor], mask: torch.Tensor, kernel: int, target="solid"
):
    """What each loss term compares: one row per image (the editor's output under the term's
    mask, with the term's value) and a last row with what the term wants it to be."""
    m = mask[:1]
    first = next(iter(images.values()))[:1]
    big, band = M.expand(m, kernel), M.ring(m, kernel)
    phi = make_target(first, target)
    with torch.no_grad():
        clean_ring = editor(first, band)
    terms = [
        ("implant", m, phi, "φ inside m"),
        ("incomplete", big, phi, "φ inside E(m)"),
        ("hide", band, clean_ring, "the clean image's\nring edit, in the ring"),
    ]
    rows = len(images) + 1
    fig, axes = plt.subplots(rows, 3, figsize=(7.2, 2.5 * rows), squeeze=False)
    for r, (label, x) in enumerate(images.items()):
        for c, (term, region, reference, _) in enumerate(terms):
            with torch.no_grad():
                out = editor(x[:1], region)
            value = float(masked_mse(out, reference, region)[0])
            title = f"{label}: edit under {('m', 'E(m)', 'ring')[c]}\n{term} = {value:.4f}"
            _panel(axes[r, c], to_array(out), title, region[0, 0].cpu().numpy() > 0.5)
    for c, (term, region, reference, wants) in enumerate(terms):
        outline = region[0, 0].cpu().numpy() > 0.5
        _panel(axes[-1, c], to_array(reference), f"{term} wants\n{wants}", outline)
    fig.tight_layout()
    return fig


def _amplified(image: torch.Tensor, protected: torch.Tensor, amplify: float) -> np.ndarray:
    return np.clip(0.5 + amplify * (to_array(protected[:1]) - to_array(image[:1])), 0, 1)


def frames_figure(image: torch.Tensor, mask: torch.Tensor, frames: list[Frame], amplify=20):
    """A strip over the forward passes: δ (× ``amplify``, grey = 0) above the fill of the hole,
    with its hole error and the share of the hole on target."""
    x, region = image[:1], mask[0, 0].cpu().numpy() > 0.5
    fig, axes = plt.subplots(2, len(frames), figsize=(1.9 * len(frames), 4.3), squeeze=False)
    for c, f in enumerate(frames):
        _panel(axes[0, c], _amplified(x, f.protected, amplify), f"pass {f.step}: δ ×{amplify}")
        title = f"error {float(f.error[0]):.2f}\non target {float(f.on_target[0]):.0%}"
        _panel(axes[1, c], to_array(f.fill[:1]), title, region)
    fig.tight_layout()
    return fig


def protection_figure(image: torch.Tensor, protected: torch.Tensor, amplify: float = 20):
    """The original, the protected image (with PSNR and SSIM against the original) and δ
    amplified ``amplify`` times (grey = 0)."""
    q = imperceptibility(image, protected)
    panels = [
        (to_array(image[:1]), "original x"),
        (to_array(protected[:1]), f"protected x′ (8-bit PNG)\nPSNR {q['psnr']:.1f} dB, SSIM {q['ssim']:.3f}"),
        (_amplified(image, protected, amplify), f"δ = x′ − x, ×{amplify}\nlargest |δ|: {q['linf_8bit']:.0f}/255"),
    ]  # fmt: skip
    fig, axes = plt.subplots(1, 3, figsize=(7.5, 2.9))
    for ax, (img, title) in zip(axes, panels, strict=True):
        _panel(ax, img, title)
    fig.tight_layout()
    return fig


def loss_curves(result: ImplantResult):
    """The three loss terms of ``result`` (first image) over the Adam steps, log scale."""
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for term in ("implant", "incomplete", "hide"):
        values = result.losses[term][:, 0].cpu().numpy()
        ax.plot(np.arange(1, len(values) + 1), values, marker=".", label=term)
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("forward pass")
    ax.set_ylabel("masked MSE")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def gain_figure(sensitivities: dict[str, Sensitivity]):
    """Per editor: the first-order gain towards φ against the gain reaching φ needs (log scale)."""
    labels = list(sensitivities)
    gain = [float(s.gain[0]) for s in sensitivities.values()]
    needed = [float(s.needed[0]) for s in sensitivities.values()]
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(labels), 3.4))
    pos = np.arange(len(labels))
    floor = 0.05  # a log axis cannot show 0: smaller gains are drawn at the floor, labelled
    ax.bar(pos - 0.2, np.maximum(gain, floor), 0.4, label="gain of the editor", color="tab:blue")
    ax.bar(pos + 0.2, needed, 0.4, label="gain needed to reach φ", color="tab:grey")
    for p, g, n in zip(pos, gain, needed, strict=True):
        ax.text(p - 0.2, max(g, floor), f"{g:.2g}", ha="center", va="bottom", fontsize=8)
        ax.text(p + 0.2, n, f"{n:.2g}", ha="center", va="bottom", fontsize=8)
    ax.set_ylim(floor, 10 * max(gain + needed))  # headroom for the legend
    ax.set_xticks(pos, labels)
    ax.set_yscale("log")
    ax.set_ylabel("mean fill change per unit of ε")
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    return fig


# ------------------------------------------------------------ the control's hit rates, by name

# RATE_NAMES (imported above): one name per definition of "how often the control is hit"; the
# notebook explains each. The rates themselves: control_rates.control_rates, as the docs show.


def _seed_hits(hits: pd.Series) -> str:
    return f"{int(hits.sum())}/{len(hits)} δ₀" if len(hits) else "not in that run"


def control_hit_rates(
    image: str,
    notebook_hit: bool,
    notebook_hit_clean: bool,
    eps: float,
    control: str = "control",
    hit_min_fraction: float = 0.5,
    reports: str | Path = "reports",
    params: str | Path = "params.yaml",
) -> pd.DataFrame:
    """The control's committed hit rates, one row per definition (:data:`RATE_NAMES`), read from
    the stages' files, with this notebook's single image as the last row.

    Columns: the rate on protected images and on clean ones (the control is sometimes hit
    without protection), its 95 % interval over images, what is edited, the budget, images × δ₀
    seeds, how ``image`` fared in that run, and the file. Rates are means over images of the
    share of δ₀ seeds that hit (seeds averaged within an image first). A file that is not
    there gives a row that says so. ``control`` is the control's label or its spec
    (``label:name(key:value,...)``, as in params.yaml).
    """
    import yaml

    control = control_label(control)
    reports = Path(reports)
    rows = []

    def row(
        key, file, edited, eps_8bit, runs, this, rate=np.nan, clean=np.nan, low=np.nan, high=np.nan
    ):
        rows.append({
            "name": RATE_NAMES[key], "protected": rate, "clean": clean, "low": low, "high": high,
            "edited region": edited, "ε (8-bit)": eps_8bit, "images × δ₀": runs,
            f"{image} in that run": this, "file": str(file),
        })  # fmt: skip

    # ε sweep: edit of exactly m, at the budget nearest the paper's 6.4/255
    summary, per_image = reports / "eps_sweep.json", reports / "eps_sweep.csv"
    if summary.is_file() and per_image.is_file():
        s = json.loads(summary.read_text())
        d = pd.read_csv(per_image)
        d = d[d["editor"] == control]
        at = d["eps_8bit"].iloc[(d["eps_8bit"] - Budget().eps_8bit).abs().argsort()].iloc[0]
        d = d[np.isclose(d["eps_8bit"], at)]
        clean = (d["hit_fraction_clean"] >= hit_min_fraction).groupby(d["name"]).mean().mean()
        (r,) = control_rates(s, None, None, control)
        row(
            "sweep", summary, "m", round(float(at), 3),
            f"{s['n_images']} × {s[f'{control}_seeds']}", _seed_hits(d.loc[d["name"] == image, "hit"]),
            r["protected"], clean, r["protected_low"], r["protected_high"],
        )  # fmt: skip
    else:
        row("sweep", summary, "m", "", "", "file not found")

    # beyond: the backdoor against the control, edited with the control, no transformation;
    # its budget is the implant stage's
    params = Path(params)
    beyond_eps = (
        yaml.safe_load(params.read_text())["implant"]["eps"] * 255 if params.is_file() else ""
    )
    fair_csv, base_csv = reports / "beyond" / "fair_masks.csv", reports / "beyond" / "baselines.csv"
    per_edit = reports / "beyond" / "per_edit.csv"
    if fair_csv.is_file() and base_csv.is_file() and per_edit.is_file():
        p = pd.read_csv(per_edit)
        p = p[
            (p["source"] == control) & (p["editor"] == control)
            & (p["method"] == "backdoor") & (p["transform"] == "none")
        ]  # fmt: skip
        mine = p[p["name"] == image]
        runs = f"{p['name'].nunique()} × {p['seed'].nunique()}"
        fair_kinds = p.loc[(p["kind"] == "malicious") & (p["family"] == "fair"), "scenario"]
        shared = {
            r["key"]: r
            for r in control_rates(None, pd.read_csv(fair_csv), pd.read_csv(base_csv), control)
        }
        groups = [
            ("mask", fair_csv, "m", mine["scenario"] == "mask"),
            ("official", base_csv, "m, E(m), incomplete",
             (mine["kind"] == "malicious") & (mine["family"] == "official")),
            ("fair", base_csv, f"{fair_kinds.nunique()} fair masks",
             (mine["kind"] == "malicious") & (mine["family"] == "fair")),
        ]  # fmt: skip
        for key, file, edited, select in groups:
            r = shared[key]
            row(
                key, file, edited, beyond_eps and round(beyond_eps, 3), runs,
                "not in that run" if mine.empty
                else _seed_hits(mine.loc[select, "hit_protected"]) if key == "mask"
                else f"{mine.loc[select, 'hit_protected'].mean():.0%} of its edits",
                r["protected"], r["clean"], r["protected_low"], r["protected_high"],
            )  # fmt: skip
    else:
        for key in ("mask", "official", "fair"):
            row(key, reports / "beyond", "", "", "", "file not found")

    row(
        "notebook", "—", "m", round(eps * 255, 3), "1 × 1",
        "hit" if notebook_hit else "not hit", float(notebook_hit), float(notebook_hit_clean),
    )  # fmt: skip
    return pd.DataFrame(rows).set_index("name")


# ------------------------------------------------------------------------------- summary


def _fmt(value, spec: str = ".2f") -> str:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return "?"
    return "not measured" if value != value else format(value, spec)


def _editor_line(label: str, key: str, results: dict) -> str:
    """One editor's outcome in ``results``: the hole error over the optimisation, the hit,
    and what protecting cost."""
    start, final = results.get(f"{key}_error_start"), results.get(f"{key}_error_final")
    name = "control" if key == "control" else "miniature LaMa"
    hit = (results.get("hit") or {}).get(name)
    hit_clean = (results.get("hit_clean") or {}).get(name)
    quality = (results.get("protection") or {}).get(name) or {}
    ring = (results.get("ring_psnr") or {}).get(name)
    if hit and not hit_clean:
        outcome = "a hit on the protected image and not on the clean one: protected"
    elif hit:
        outcome = "a hit on the clean image too: the editor is hit without protection"
    else:
        outcome = "not a hit: not protected"
    return (
        f"- {label}: the hole error went from {_fmt(start)} to {_fmt(final)} (0 is the target "
        f"colour); the malicious edit of m is {outcome}. The protected image is "
        f"{_fmt(quality.get('psnr'), '.1f')} dB from the original (PSNR) and its benign ring "
        f"edit {_fmt(ring, '.1f')} dB from the clean image's."
    )


def summary(results: dict, saved: str | Path | None = None, width: int = 88) -> str:
    """The tutorial's closing summary, made from its ``results`` (the dict it writes to
    ``tutorial.json``), never typed: what happened on each editor, why (its gain against the
    gain reaching φ needs) and how often the control is hit across the study's images.
    ``saved``: where the full results were written; lines are wrapped at ``width``. The
    notebook's last cell then says where to go next."""
    lines = [
        f"What this run showed on {results.get('image', '?')} ({results.get('size', '?')} px):",
        _editor_line("The sensitive control", "control", results),
        _editor_line(
            f"The {results.get('miniature', 'trained')} miniature LaMa", "miniature", results
        ),
    ]
    gain, needed = results.get("gain") or {}, results.get("needed") or {}
    why = []
    for editor, g in gain.items():
        n = needed.get(editor)
        if n is None:
            continue
        verdict = "enough to reach φ" if float(g) >= float(n) else "too little to reach φ"
        why.append(f"{editor} {_fmt(g, '.3g')} against {_fmt(n, '.3g')} needed ({verdict})")
    if why:
        lines.append("- Why, the editor's gain: " + "; ".join(why) + ".")
    if not results.get("big_lama", False):
        lines.append("- Big-LaMa: skipped, no weights on this machine.")
    rate = (results.get("control_hit_rates") or {}).get(RATE_NAMES["sweep"])
    if rate is not None:
        across = (
            "not in this checkout's reports"
            if _fmt(rate) in ("?", "not measured")
            else f"{_fmt(float(rate) * 100, '.0f')}%"
        )
        lines.append(
            f"- One image is one draw: across the study's images the control's "
            f"{RATE_NAMES['sweep']} is {across} (section 6 gives every definition)."
        )
    if saved is not None:
        lines.append(f"Every number above, and more: {saved}")
    # printed: wrapped to the width of a notebook's output (and of the book's column)
    wrap = dict(subsequent_indent="  ", break_long_words=False, break_on_hyphens=False)
    return "\n".join(textwrap.fill(line, width, **wrap) for line in lines)


__all__ = [
    "BIG_LAMA_HELP",
    "MINIATURE_HELP",
    "RATE_NAMES",
    "Frame",
    "big_lama_weights",
    "control_hit_rates",
    "edit_checks",
    "frames_figure",
    "gain_figure",
    "hole_error",
    "imperceptibility",
    "implant_frames",
    "load_miniature",
    "loss_curves",
    "loss_terms_figure",
    "on_target",
    "project_path",
    "protection_figure",
    "regions_figure",
    "sample_image",
    "summary",
]

"""One vocabulary for everything applied to an image before it is edited.

The ``beyond`` stage's robustness transforms (:mod:`runtime_backdoor.robustness`), the
``purify`` stage's purifiers (:mod:`runtime_backdoor.purifiers`) and the random draws of the
EOT editor (:mod:`runtime_backdoor.eot`) are all written ``word`` or ``word:value``, with ONE
unit per word. :data:`TABLE` is the specification; :func:`parse` reads a spec against it,
:attr:`Spec.name` writes it back (``parse(s.name) == s``), and every refusal is one line
naming the accepted forms. The operations themselves stay in their modules.

======================  =========================  ================  ==========================================  ======================
form                    unit                       range             what it does                                EOT draw when bare
======================  =========================  ================  ==========================================  ======================
``none``                —                          —                 the 8-bit image itself                      —
``jpeg:Q``              JPEG quality               integer 1–100     PIL JPEG round trip (4:2:0 chroma)           Q uniform in 50–95
``resize:S``            scale                      (0, 1]            downscale by S and back (PIL bicubic)       S uniform in [0.5, 1)
``lanczos:S``           scale                      (0, 1]            downscale by S and back (PIL Lanczos)       —
``blur:σ``              σ in px                    > 0               Gaussian blur, radius 3σ                    —
``noise:σ``             σ in 8-bit levels          0, or 1–255       Gaussian noise of σ/255 on [0, 1], seeded   σ = 2
``crop:Npx``            px per side                integer >= 0      N px cut off every side: the image shrinks  —
``crop:P%``             % of the side              [0, 100)          central (100 − P) % kept, resized back      —
``adverse-cleaner``     —                          —                 AdverseCleaner (bilateral + guided)         —
``dilate:N``            px                         integer >= 1      EOT only: edit mask grown by 1..N px        N = 2
``shift:N``             px                         integer >= 0      EOT only: image and mask moved by ≤ N px    N = 4
``noisy-upscale:L``     SD ×4 noise_level          integer >= 0      ×4 down, noise σ 0.1, SD ×4 upscaler        —
``upscale:L``           SD ×4 noise_level          integer >= 0      ×4 down, SD ×4 upscaler                     —
``diffpure:T``          diffusion strength         (0, 1]            SD 1.5 img2img DiffPure                     —
``gridpure:T``          diffusion strength         (0, 1]            GrIDPure on 256-px tiles (bare: T = 0.1)    —
``img2img-denoise:S``   diffusion strength         (0, 1)            SD 1.5 img2img "Denoise the image" (0.15)   —
``vae-roundtrip``       —                          —                 SD 1.5 VAE encode (mode) and decode         —
======================  =========================  ================  ==========================================  ======================

``crop`` is the one word with two operations, so it always carries its unit: ``crop:6px``
(beyond) or ``crop:10%`` (purify); a bare number (``crop:0.1``, ``crop:6``) is refused.
``noise`` values strictly between 0 and 1 level are refused: they read like the old [0, 1]
unit (``noise:0.05`` is now ``noise:12.75``). Each consumer accepts a subset of the forms
(:data:`BEYOND`, :data:`PURIFY`, :data:`EOT`).

**Chains** (purify only): classical steps joined by ``+``, run left to right, each stored in
8 bits, e.g. ``jpeg:75+lanczos:0.5`` (JPEG 75, then 0.5× Lanczos down and back) or
``resize:0.75+jpeg:90``; each step is a form of :data:`CHAIN` written in its own unit. A chain
needs at least two steps, no empty step, no spaces and no step that moves the content
(``crop``) or needs weights (:func:`parse_chain`); a lone ``resize:S``/``lanczos:S`` is a
purifier of its own.

Old spellings: beyond ``crop:6`` → ``crop:6px`` (``noise:2`` unchanged: it was already 8-bit);
purify ``noise:0.05`` → ``noise:12.75``, ``noise:0.1`` → ``noise:25.5``, ``crop:0.1`` →
``crop:10%``; EOT's ``noise`` σ (was 2/255 on [0, 1]) is 2 levels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Form:
    """One row of :data:`TABLE`: a word, its unit suffix (only ``crop`` has one), the unit, the
    accepted range (as a check and its words) and what the operation does."""

    word: str
    suffix: str  # "" or the literal unit suffix ("px", "%")
    unit: str  # "" when the word takes no value
    range: str
    what: str
    integer: bool = False
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    eot_default: str = "—"

    @property
    def key(self) -> str:
        return f"{self.word}:{self.suffix}" if self.suffix else self.word

    @property
    def form(self) -> str:
        if not self.unit:
            return self.word
        symbol = {"px": "N", "%": "P"}.get(self.suffix) or _SYMBOL.get(self.word, "V")
        return f"{self.word}:{symbol}{self.suffix}"

    def check(self, v: float) -> bool:
        if self.integer and v != int(v):
            return False
        above = v > self.low if self.low_open else v >= self.low
        below = v < self.high if self.high_open else v <= self.high
        return above and below

    def describe(self) -> str:
        return self.form if not self.unit else f"{self.form} ({self.unit}, {self.range})"


_SYMBOL = {"jpeg": "Q", "resize": "S", "lanczos": "S", "blur": "σ", "noise": "σ", "dilate": "N",
           "shift": "N", "noisy-upscale": "L", "upscale": "L", "diffpure": "T", "gridpure": "T",
           "img2img-denoise": "S"}  # fmt: skip

#: the specification: every form of the vocabulary (see the module text for the table)
TABLE: tuple[Form, ...] = (
    Form("none", "", "", "—", "the 8-bit image itself"),
    Form("jpeg", "", "JPEG quality", "integer 1-100", "PIL JPEG round trip (4:2:0 chroma)",
         integer=True, low=1, high=100, eot_default="Q uniform in 50-95"),
    Form("resize", "", "scale", "(0, 1]", "downscale by S and back to the size",
         low=0, high=1, low_open=True, eot_default="S uniform in [0.5, 1)"),
    Form("lanczos", "", "scale", "(0, 1]", "downscale by S and back to the size (PIL Lanczos)",
         low=0, high=1, low_open=True),
    Form("blur", "", "sigma in px", "> 0", "Gaussian blur, radius 3 sigma", low=0, low_open=True),
    Form("noise", "", "sigma in 8-bit levels", "0 or 1-255",
         "Gaussian noise of sigma/255 on [0, 1], seeded", low=0, high=255, eot_default="sigma = 2"),
    Form("crop", "px", "px per side", "integer >= 0",
         "N px cut off every side: the image shrinks", integer=True, low=0),
    Form("crop", "%", "% of the side", "[0, 100)", "the central (100 - P) % kept, resized back",
         low=0, high=100, high_open=True),
    Form("adverse-cleaner", "", "", "—", "AdverseCleaner (64 bilateral + 4 guided filters)"),
    Form("dilate", "", "px", "integer >= 1", "EOT only: the edit mask grown by 1..N px",
         integer=True, low=1, eot_default="N = 2"),
    Form("shift", "", "px", "integer >= 0", "EOT only: image and mask moved by up to N px",
         integer=True, low=0, eot_default="N = 4"),
    Form("noisy-upscale", "", "SD x4 noise_level", "integer >= 0",
         "x4 down, noise sigma 0.1, SD x4 upscaler", integer=True, low=0),
    Form("upscale", "", "SD x4 noise_level", "integer >= 0", "x4 down, SD x4 upscaler",
         integer=True, low=0),
    Form("diffpure", "", "diffusion strength", "(0, 1]", "SD 1.5 img2img DiffPure",
         low=0, high=1, low_open=True),
    Form("gridpure", "", "diffusion strength", "(0, 1]", "GrIDPure on 256-px tiles",
         low=0, high=1, low_open=True),
    Form("img2img-denoise", "", "diffusion strength", "(0, 1)",
         "SD 1.5 img2img, 'Denoise the image' vs an adversarial negative prompt",
         low=0, high=1, low_open=True, high_open=True),
    Form("vae-roundtrip", "", "", "—", "SD 1.5 VAE: encode (posterior mode) and decode"),
)  # fmt: skip
FORMS = {f.key: f for f in TABLE}
WORDS = tuple(dict.fromkeys(f.word for f in TABLE))

#: the forms each consumer accepts
BEYOND = ("none", "jpeg", "resize", "blur", "noise", "crop:px")
PURIFY = ("none", "jpeg", "noise", "crop:%", "adverse-cleaner", "resize", "lanczos",
          "noisy-upscale", "upscale", "diffpure", "gridpure", "img2img-denoise",
          "vae-roundtrip")  # fmt: skip
#: the forms a step of a purify chain takes (classical, keeping the geometry)
CHAIN = ("jpeg", "resize", "lanczos", "noise", "adverse-cleaner")
EOT = ("none", "jpeg", "resize", "blur", "noise", "crop:%", "adverse-cleaner", "dilate", "shift")


@dataclass(frozen=True)
class Spec:
    """A parsed spec: ``word``, ``value`` in the word's unit (``None``: bare word) and the unit
    suffix (``"px"`` / ``"%"`` for ``crop``, else ``""``)."""

    word: str
    value: float | None = None
    suffix: str = ""

    @property
    def key(self) -> str:
        return f"{self.word}:{self.suffix}" if self.suffix else self.word

    @property
    def name(self) -> str:
        return self.word if self.value is None else f"{self.word}:{number(self.value)}{self.suffix}"


def number(v: float) -> str:
    """The shortest text that reads back as ``v`` (``95``, ``12.75``, ``0.1``)."""
    v = float(v)
    return str(int(v)) if v == int(v) and abs(v) < 1e15 else repr(v)


def accepted(forms=tuple(FORMS)) -> str:
    """The accepted forms of a consumer, for error messages."""
    return "; ".join(FORMS[k].describe() for k in forms)


def parse(
    text: str | Spec,
    forms=tuple(FORMS),
    *,
    what: str = "transform",
    bare=(),
    defaults: dict | None = None,
) -> Spec:
    """Read ``word`` or ``word:value`` against :data:`TABLE`, accepting only ``forms``.

    A word without a value is accepted when it takes none (``none``, ``adverse-cleaner``), when
    it is in ``bare`` (returned with ``value=None``: the consumer draws or defaults it) or in
    ``defaults`` (word -> value). ``ValueError`` (one line, naming the accepted forms) on an
    unknown word, a form the consumer does not take, a missing or ambiguous unit, a value that
    is not a number or out of range.
    """
    if isinstance(text, Spec):
        text = text.name
    s = str(text).strip()
    word, colon, raw = s.partition(":")
    ok = f"accepted: {accepted(forms)}"

    def refuse(why: str):
        return ValueError(f"{what} {s!r}: {why}; {ok}")

    if "+" in s:
        raise refuse("a chain (step+step) is not taken here")
    if word not in WORDS:
        raise refuse(f"unknown word {word!r}")
    takes = [k for k in forms if FORMS[k].word == word]
    if not takes:
        raise refuse(f"{word!r} is not taken here")
    if not colon:
        valueless = [k for k in takes if not FORMS[k].unit]
        if valueless:
            return Spec(word)
        if word in (defaults or {}):
            return Spec(word, float(defaults[word]), FORMS[takes[0]].suffix)
        if word in bare:
            return Spec(word, None, FORMS[takes[0]].suffix if len(takes) == 1 else "")
        raise refuse(f"{word!r} needs a value")
    if all(not FORMS[k].unit for k in takes):
        raise refuse(f"{word!r} takes no value")
    suffix = next((x for x in ("px", "%") if raw.endswith(x)), "")
    number = raw[: len(raw) - len(suffix)] if suffix else raw
    key = f"{word}:{suffix}" if suffix else word
    if key not in FORMS:
        if word == "crop":
            raise refuse(
                "crop needs its unit: crop:Npx (px cut per side) or crop:P% (% of the side)"
            )
        raise refuse(f"{word!r} takes a plain number in {FORMS[word].unit}, no {suffix!r}")
    if key not in takes:
        raise refuse(f"{FORMS[key].form} is not taken here")
    form = FORMS[key]
    try:
        v = float(number)
    except ValueError:
        raise refuse(f"{number!r} is not a number") from None
    if not math.isfinite(v) or not form.check(v):
        raise refuse(f"{form.form} must be {form.unit}, {form.range}")
    if word == "noise" and 0 < v < 1:
        raise refuse(
            "noise sigma is in 8-bit levels; below 1 level reads like the old [0, 1] unit "
            f"(sigma {v:g} on [0, 1] is noise:{v * 255:g})"
        )
    return Spec(word, v, suffix)


def parse_chain(text: str, forms=CHAIN, *, what: str = "purifier chain") -> tuple[Spec, ...]:
    """Read ``step+step+...`` (at least two steps, each a form of ``forms`` in its own unit,
    no spaces). ``ValueError`` (one line, naming the accepted step forms) on an empty step, a
    single step, a space, or a step the grammar refuses."""
    s = str(text).strip()
    ok = f"accepted: two or more steps joined by '+', e.g. jpeg:75+lanczos:0.5, each one of {accepted(forms)}"

    def refuse(why: str):
        return ValueError(f"{what} {s!r}: {why}; {ok}")

    parts = s.split("+")
    if any(c.isspace() for c in s):
        raise refuse("no spaces inside a chain")
    if any(not p for p in parts):
        raise refuse("empty step")
    if len(parts) < 2:
        raise refuse("a chain needs at least two steps")
    steps = []
    for p in parts:
        try:
            steps.append(parse(p, forms, what="step"))
        except ValueError as err:
            raise refuse(str(err).split(";")[0]) from None
    return tuple(steps)


def parse_list(text: str | list, forms=tuple(FORMS), **kwargs) -> list[Spec]:
    """A space-separated string (as ``params.yaml`` holds it) or a list of specs."""
    items = text.split() if isinstance(text, str) else list(text)
    return [parse(s, forms, **kwargs) for s in items]


def table_markdown() -> str:
    """:data:`TABLE` as a markdown table (for the docs)."""
    head = "| form | unit | range | what it does | EOT draw when bare |\n|---|---|---|---|---|"
    rows = [
        f"| `{f.form}` | {f.unit or '—'} | {f.range} | {f.what} | {f.eot_default} |" for f in TABLE
    ]
    return "\n".join([head, *rows])


__all__ = [
    "BEYOND",
    "CHAIN",
    "EOT",
    "FORMS",
    "PURIFY",
    "TABLE",
    "WORDS",
    "Form",
    "Spec",
    "accepted",
    "number",
    "parse",
    "parse_chain",
    "parse_list",
    "table_markdown",
]

"""The demo page's layout (Gradio): one function per part of the page, and the handlers that
connect it to :class:`.work.Demo`. Gradio is imported only here, when the page is built."""

from __future__ import annotations

import os
import shutil
from types import SimpleNamespace

from .. import owner
from ..budget import Budget
from .views import AMPLIFY, PAINT_COLOUR, PAINT_OPACITY, page_message

INTRO = (
    "## Protect a region of your image against inpainting\n"
    "An imperceptible change (at most ε per pixel value) makes the chosen editor fill "
    "the region with a solid colour when somebody asks it to replace that region, "
    "while other edits work as usual. Protection is specific to the editor it is made "
    "against; tick more editors to protect against several at once. Everything runs "
    "on this machine."
)


def _image_column(gr) -> dict:
    """1 and 2: the image upload, its note, the painting canvas and the drawn mask."""
    image_file = gr.File(
        label="1. Image (PNG or JPEG)",
        file_types=[".png", ".jpg", ".jpeg"],
        height=120,
        elem_id="image-file",
    )
    note = gr.Markdown(elem_id="image-note")
    painter = gr.ImageEditor(
        label="2. Paint the region to protect (brush; eraser to correct)",
        type="numpy",
        image_mode="RGBA",
        sources=[],
        format="png",
        brush=gr.Brush(colors=[(PAINT_COLOUR, PAINT_OPACITY)], color_mode="fixed", default_size=12),
        transforms=[],
        layers=False,
        height=420,
        elem_id="painter",
    )
    mask_view = gr.Image(
        label="2. The uploaded mask, drawn on the image (remove the mask file to paint instead)",
        format="png",
        interactive=False,
        visible=False,
        height=420,
        elem_id="mask-view",
    )
    return dict(image_file=image_file, note=note, painter=painter, mask_view=mask_view)


def _options_column(gr, labels: list[str]) -> dict:
    """The mask upload, 3: the editors and the settings, the verdict and 4: Protect."""
    mask_file = gr.File(
        label="... or a mask PNG (white = protect), used instead of the painting",
        file_types=[".png"],
        height=120,
        elem_id="mask-file",
    )
    editor = gr.Dropdown(
        labels,
        value=labels[0],  # the most capable on offer (available_editors)
        label="3. Editor to protect against",
        elem_id="editor",
    )
    also = gr.CheckboxGroup(
        labels,
        value=[],
        label="... and also against (optional): one perturbation for all the "
        "editors ticked, each tested after protecting",
        elem_id="also",
    )
    eps = gr.Number(
        owner.DEFAULT_EPS,
        label=f"ε: fraction of the range, or 8-bit units above 1 ({owner.DEFAULT_EPS:g} = "
        f"{owner.DEFAULT_EPS * 255:.1f}/255, the paper's)",
        elem_id="eps",
    )
    with gr.Row():
        steps = gr.Number(Budget.steps, precision=0, label="steps", elem_id="steps")
        seed = gr.Number(0, precision=0, label="seed", elem_id="seed")
        expand = gr.Number(
            0,
            precision=0,
            label="expansion kernel (px; 0: scaled with the image, 17 at 512 px)",
            elem_id="expand",
        )
    verdict = gr.Markdown("Upload an image to start.", elem_id="verdict")
    go = gr.Button("4. Protect", variant="primary", elem_id="protect")
    return dict(mask_file=mask_file, editor=editor, also=also, eps=eps, steps=steps, seed=seed,
                expand=expand, verdict=verdict, go=go)  # fmt: skip


def _results(gr) -> dict:
    """The panels, the comparison, the numbers and 5: the downloads."""
    images = dict(format="png", interactive=False, height=260)
    with gr.Row():
        original = gr.Image(label="original", elem_id="original", **images)
        protected = gr.Image(label="protected", elem_id="protected", **images)
        delta = gr.Image(label=f"δ ×{AMPLIFY}", elem_id="delta", **images)
    comparison = gr.Image(
        label="the edits an attacker would make, on the original and on the protected PNG",
        elem_id="comparison",
        show_label=False,  # the figure has its own titles and labels
        **(images | {"height": None}),
    )
    table = gr.Markdown(elem_id="results")
    with gr.Row():
        download = gr.DownloadButton(
            "5. Download the protected PNG", interactive=False, elem_id="download"
        )
        download_mask = gr.DownloadButton(
            "Download the mask PNG", interactive=False, elem_id="download-mask"
        )
    previous = gr.State(None, delete_callback=lambda p: p and shutil.rmtree(p, True))
    return dict(original=original, protected=protected, delta=delta, comparison=comparison,
                table=table, download=download, download_mask=download_mask, previous=previous)  # fmt: skip


def _chosen(label, also):
    """The editor, or with others ticked the list of them all (an ensemble)."""
    picked = list(dict.fromkeys(c for c in [label, *(also or ())] if c))
    return picked[0] if len(picked) == 1 else picked


def _upload_handlers(gr, demo) -> tuple:
    """``on_image`` and ``on_mask``: what an upload changes on the page."""

    # An uploaded mask is shown drawn on the image in place of the canvas (hidden meanwhile):
    # giving the canvas a new picture after a brush stroke could leave it blank and
    # "processing" (Gradio's ImageEditor, seen in about 1 of 5 tries); removing the mask
    # brings the canvas back with its paint.
    def shown(drawn):
        return (
            gr.Image(value=drawn, visible=drawn is not None),
            gr.ImageEditor(visible=drawn is None),
        )

    def on_image(image_file, mask_file):
        """A new image: a new canvas (and the mask drawn on it, if any)."""
        if not image_file:
            return None, "", gr.Number(), gr.Image(value=None, visible=False)
        try:
            value, note, kernel, drawn = demo.preview(image_file, mask_file)
        except Exception as err:
            return None, f"⚠ {page_message(err, demo.folder)}", gr.Number(), gr.Image(visible=False)  # fmt: skip
        view, _ = shown(drawn)
        return gr.ImageEditor(value=value, visible=drawn is None), note, kernel, view

    def on_mask(image_file, mask_file):
        """A mask uploaded or removed: the canvas keeps its picture and paint."""
        if not image_file:
            return "", gr.Number(), *shown(None)
        try:
            _, note, kernel, drawn = demo.preview(image_file, mask_file)
        except Exception as err:
            return f"⚠ {page_message(err, demo.folder)}", gr.Number(), *shown(None)
        return note, kernel, *shown(drawn)

    return on_image, on_mask


def _work_handlers(gr, demo) -> tuple:
    """``on_check`` and ``on_protect``: the verdict as the inputs change, and Protect."""

    def on_page_errors(fn):
        def run(*args):
            try:
                return fn(*args)
            except Exception as err:  # every failure is one line on the page
                raise gr.Error(page_message(err, demo.folder), print_exception=False) from None

        return run

    def on_check(image_file, mask_file, painted, label, eps, also):
        if not image_file:
            return "Upload an image to start."
        try:
            return demo.check(image_file, mask_file, painted, _chosen(label, also), eps)
        except Exception as err:
            return f"⚠ {page_message(err, demo.folder)}"

    def on_protect(
        image_file, mask_file, painted, label, eps, also, steps, seed, expand, previous,
        progress=gr.Progress(track_tqdm=True),  # noqa: B008 (how Gradio attaches a bar)
    ):  # fmt: skip
        progress(0, desc="checking and preparing")
        r = on_page_errors(demo.protect)(
            image_file, mask_file, painted, _chosen(label, also), eps, steps, seed, expand
        )
        if previous:  # the session's previous results are no longer shown
            shutil.rmtree(previous, ignore_errors=True)
        return (
            r["verdict"], r["original"], r["protected"], r["delta"], r["comparison"],
            r["table"], gr.DownloadButton(value=str(r["file"]), interactive=True),
            gr.DownloadButton(value=str(r["mask"]), interactive=True), str(r["folder"]),
        )  # fmt: skip

    return on_check, on_protect


def _wire(gr, demo, c: SimpleNamespace) -> None:
    """Which change runs which handler: an upload redraws, every input re-checks."""
    on_image, on_mask = _upload_handlers(gr, demo)
    on_check, on_protect = _work_handlers(gr, demo)
    check_inputs = [c.image_file, c.mask_file, c.painter, c.editor, c.eps, c.also]
    uploads = [c.image_file, c.mask_file]
    c.image_file.change(on_image, uploads, [c.painter, c.note, c.expand, c.mask_view]).then(
        on_check, check_inputs, c.verdict
    )
    c.mask_file.change(on_mask, uploads, [c.note, c.expand, c.mask_view, c.painter]).then(
        on_check, check_inputs, c.verdict
    )
    for trigger in (c.painter.change, c.editor.change, c.eps.change, c.also.change):
        trigger(
            on_check, check_inputs, c.verdict, trigger_mode="always_last", show_progress="hidden"
        )
    c.go.click(
        on_protect,
        [*check_inputs, c.steps, c.seed, c.expand, c.previous],
        [c.verdict, c.original, c.protected, c.delta, c.comparison, c.table, c.download,
         c.download_mask, c.previous],
    )  # fmt: skip


def build_app(demo):
    """The Gradio page around ``demo`` (a :class:`.work.Demo`; imports Gradio)."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    import gradio as gr

    system = ["ui-sans-serif", "system-ui", "sans-serif"]  # no web fonts: nothing from outside
    theme = gr.themes.Default(font=system, font_mono=["ui-monospace", "monospace"])
    with gr.Blocks(title="runtime-backdoor: protect an image", delete_cache=(600, 3600)) as app:
        gr.Markdown(INTRO)
        with gr.Row():
            with gr.Column(scale=3):
                parts = _image_column(gr)
            with gr.Column(scale=2):
                parts |= _options_column(gr, list(demo.choices))
        parts |= _results(gr)
        _wire(gr, demo, SimpleNamespace(**parts))
    return app, theme

"""``runtime-backdoor demo``: the owner's commands on one browser page (Gradio).

Upload an image, paint the region to protect (or upload a mask), pick an editor and ε, read
``check``'s verdict, protect, compare the edits of the original and the protected image,
download the protected PNG. Every step calls the functions ``runtime-backdoor check``,
``protect`` and ``edit --compare`` call (:mod:`runtime_backdoor.owner`), so the download is,
byte for byte, what ``protect`` writes for the same files, settings and seed.

After protecting, the page replaces ``check``'s prediction with the verdict ``protect`` gives
(:func:`runtime_backdoor.owner.compare_edits` on the PNG as written) and shows the labelled
comparison ``edit --compare`` writes. Several editors chosen at once are one perturbation
against all of them (``protect --editor A,B``): the page gives each editor's prediction, then
each editor's verdict, comparison and numbers, and the ensemble's verdict
(:data:`runtime_backdoor.owner.ENSEMBLE_RULE`).

The app serves this machine only (no share link, no analytics, no font or script from the
internet), refuses requests for other host names (a foreign name pointed at this machine,
DNS rebinding, gets 403), requests from other origins (a page elsewhere cannot drive it) and
uploads over :data:`MAX_UPLOAD_BYTES`, refuses images over ``max_pixels`` from their header,
runs one request at a time (others wait in a queue) and writes nothing outside one
temporary folder, which is removed when it stops. Gradio is imported only here.

The package: :mod:`.work` does the page's work without Gradio (:class:`Demo`), :mod:`.views`
makes what the page shows (texts, tables, pictures), :mod:`.page` lays the page out and
connects it to the work, :mod:`.guard` refuses foreign and oversized requests; this module
serves it.
"""

from __future__ import annotations

import signal
from pathlib import Path

from .. import owner
from ..editors import EDITORS
from .guard import RequestGuard
from .page import build_app
from .views import (
    AMPLIFY,
    DISPLAY_SIDE,
    MAX_REQUEST_BYTES,
    MAX_UPLOAD_BYTES,
    OUTCOME_HEAD,
    PAINT_COLOUR,
    PAINT_OPACITY,
    SMALL_SIDE,
    WORKSPACE_PREFIX,
    PageError,
    ensemble_outcome_text,
    ensemble_table,
    ensemble_verdict_text,
    outcome_text,
    overlay,
    page_message,
    painted_region,
    results_table,
    stacked,
    titled,
    to_display,
    verdict_text,
)
from .work import (
    MINIATURE_NOTE,
    WITHOUT_WEIGHTS,
    Demo,
    EditorChoice,
    Inputs,
    available_editors,
    workspace,
)

__all__ = [
    "AMPLIFY", "DISPLAY_SIDE", "MAX_REQUEST_BYTES", "MAX_UPLOAD_BYTES", "MINIATURE_NOTE",
    "OUTCOME_HEAD", "PAINT_COLOUR", "PAINT_OPACITY", "SMALL_SIDE", "WITHOUT_WEIGHTS",
    "WORKSPACE_PREFIX", "Demo", "EditorChoice", "Inputs", "PageError", "RequestGuard",
    "available_editors", "build_app", "ensemble_outcome_text", "ensemble_table",
    "ensemble_verdict_text", "outcome_text", "overlay", "owner", "page_message",
    "painted_region", "results_table", "serve", "stacked", "titled", "to_display",
    "verdict_text", "workspace",
]  # fmt: skip


def serve(
    host: str = "127.0.0.1",
    port: int | None = None,
    editor: str | None = None,
    weights_path: Path | None = None,
    device: str = "auto",
    max_pixels: int = owner.DEFAULT_MAX_PIXELS,
) -> int:
    """Serve the page until interrupted (Ctrl+C or SIGTERM); then remove the temporary folder."""
    if editor is not None and editor not in EDITORS:
        raise owner.CliError(f"--editor: unknown editor {editor!r}; known editors: {', '.join(EDITORS)}")  # fmt: skip
    if editor is None and weights_path is not None:
        raise owner.CliError("--weights needs --editor: the editor they are for")
    signal.signal(signal.SIGTERM, _interrupt)
    with workspace() as folder:
        choices = available_editors(editor=editor, weights_path=weights_path)
        demo = Demo(choices, folder, device, max_pixels)
        if editor is not None:
            demo.editor(next(iter(demo.choices)))  # fail now on weights that do not load
        app, theme = build_app(demo)
        print(f"runtime-backdoor demo: temporary files in {folder} (removed on exit)", flush=True)
        app.queue(default_concurrency_limit=1, max_size=32)
        from starlette.middleware import Middleware

        app.launch(
            server_name=host, server_port=port, share=False, inbrowser=False, theme=theme,
            show_error=True, allowed_paths=[str(folder)], max_file_size=MAX_UPLOAD_BYTES,
            app_kwargs={"middleware": [Middleware(RequestGuard, max_body=MAX_REQUEST_BYTES, host=host)]},
        )  # fmt: skip
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # Gradio closes its server on it; the workspace is removed after

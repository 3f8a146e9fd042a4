"""The documentation: the README as a front page, the docs pages' links, and the study book.

Fast tier: the README's size, its two commands first, its stage table against the pipeline,
every relative link of README.md and docs/*.md, and the book's page order. Slow tier: the book
built from a small copy of the project and opened in headless Chromium (every page loads,
every internal link and image resolves, nothing is fetched from elsewhere).
"""

from __future__ import annotations

import base64
import functools
import http.server
import importlib.util
import os
import re
import shutil
import socket
import sys
import threading
from pathlib import Path
from urllib.parse import unquote, urlsplit

import nbformat
import pytest
import yaml

from runtime_backdoor.pipeline import STAGES

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
MAX_README_BYTES = 12 * 1024
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
IMG_SRC = re.compile(r'<img\s[^>]*src="([^"]+)"')
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def build_module():
    """docs/build.py, imported from its file (it is not part of the package)."""
    spec = importlib.util.spec_from_file_location("docs_build", ROOT / "docs" / "build.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def prose(text: str) -> str:
    """``text`` without fenced code blocks and inline code (links there are not links)."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def local_links(path: Path) -> list[str]:
    """The relative link and image targets of a markdown file, anchors dropped."""
    text = prose(path.read_text())
    found = []
    for target in LINK.findall(text) + IMG_SRC.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE) or target.startswith("#"):
            continue
        found.append(unquote(target.partition("#")[0]))
    return found


# ---------------------------------------------------------------------------------- README


def test_readme_is_a_front_page_of_at_most_12_kb():
    size = README.stat().st_size
    assert size <= MAX_README_BYTES, (
        f"README.md is {size} bytes (at most {MAX_README_BYTES}): move detail into docs/*.md"
    )


def test_the_two_commands_come_before_any_other_code():
    text = README.read_text()
    first = re.search(r"^```[^\n]*\n(.*?)^```", text, re.MULTILINE | re.DOTALL)
    assert first is not None, "README.md has no code block"
    commands = [ln.split("#")[0].strip() for ln in first[1].splitlines() if ln.strip()]
    assert commands[:2] == ["make reproduce", "make test"], (
        f"the README's first code block must start with `make reproduce` then `make test`, "
        f"got {commands[:2]}"
    )
    assert "make test-all" in text  # the other tier is named too


def stage_table() -> list[list[str]]:
    lines = README.read_text().splitlines()
    start = next(i for i, ln in enumerate(lines) if re.match(r"^\|\s*stage\s*\|", ln))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    assert header == ["stage", "notebook", "module", "outputs", "test"], header
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def dvc_outputs(stage: str) -> list[str]:
    entry = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]
    outs = []
    for section in ("outs", "metrics", "plots"):
        for out in entry.get(section) or []:
            outs.append(next(iter(out)) if isinstance(out, dict) else out)
    return outs


def test_the_stage_table_lists_the_pipeline():
    rows = stage_table()
    assert [r[0].strip("`") for r in rows] == list(STAGES), (
        "the README's stage table must list runtime_backdoor.pipeline.STAGES, in order"
    )
    for stage, notebook, module, outputs, test in rows:
        stage = stage.strip("`")
        expected = {
            "notebook": (notebook, STAGES[stage]),
            "module": (module, f"src/runtime_backdoor/pipeline/{stage}.py"),
            "test": (test, f"tests/pipeline/test_{stage}.py"),
        }
        for column, (cell, path) in expected.items():
            targets = LINK.findall(cell)
            assert targets == [path], f"{stage}: the {column} column links {targets}, not {path}"
            assert (ROOT / path).is_file(), f"{stage}: {path} does not exist"
        listed = re.findall(r"`([^`]+)`", outputs)
        assert listed, f"{stage}: no outputs listed"
        declared = dvc_outputs(stage)
        for out in listed:
            ok = any(
                out == d
                or out.startswith(d.rstrip("/") + "/")
                or d.startswith(out.rstrip("/") + "/")
                for d in declared
            )
            assert ok, f"{stage}: {out} is not an output of the stage in dvc.yaml ({declared})"


def test_the_readme_links_every_docs_page():
    linked = {(ROOT / t).resolve() for t in local_links(README)}
    missing = [p.name for p in DOCS if p.resolve() not in linked]
    assert not missing, f"README.md does not link docs pages {missing}"


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve_to_files(page):
    broken = []
    for target in local_links(page):
        path = (page.parent / target).resolve()
        if not path.is_file() or ROOT.resolve() not in path.parents:
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)} links to files that do not exist: {broken}"


def test_the_book_follows_the_pipeline():
    """Every stage's executed notebook in pipeline order, every docs page, and the parts in
    the reading order method -> stages -> owner's tools -> real models -> performance ->
    reproducibility."""
    build = build_module()
    parts, unlisted = build.pages(ROOT, tutorial="skip")
    assert unlisted == [], f"docs pages missing from the book: {unlisted}"
    order = [p.path for _, ps in parts for p in ps]
    stage_pages = [build.executed(n) for n in STAGES.values()]
    assert [p for p in order if p in stage_pages] == stage_pages
    sequence = ["docs/method.md", *stage_pages, "docs/owners.md", "docs/real-models.md",
                "docs/performance.md", "docs/reproducibility.md"]  # fmt: skip
    positions = [order.index(p) for p in sequence]
    assert positions == sorted(positions), order
    for page in (p for _, ps in parts for p in ps):
        assert page.note, f"{page.path}: no note saying where it comes from"


# --------------------------------------------------------------------------------- staging


def executed_stage_notebook() -> nbformat.NotebookNode:
    """An executed stage notebook as papermill leaves one: the notebook's ``parameters`` cell
    (defaults with comments) and papermill's ``injected-parameters`` cell after it."""
    nb = tiny_notebook("prepare (tiny)", b"")
    nb.cells[1].source = (
        'raw_dir = "data/raw"  # folder in the official layout\n'
        "size = 16  # image side\n"
        "limit = 0  # first N images only"
    )
    injected = nbformat.v4.new_code_cell('# Parameters\nraw_dir = "data/raw"\nsize = 128\n')
    injected.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(2, injected)
    return nb


def staged(build, root: Path, stage: Path, nb, path="reports/notebooks/01_prepare.ipynb"):
    """``nb`` staged as the book stages an executed notebook; the staged copy."""
    stager = build.Stager(root, stage, {path}, {})
    stager.notebook(build.Page(path, path, "note", "notebooks", nb=nb))
    return nbformat.read(stage / path, as_version=4)


def parameter_cells(nb) -> list:
    tags = {"parameters", "injected-parameters"}
    return [c for c in nb.cells if tags & set(c.get("metadata", {}).get("tags", []))]


def test_a_staged_stage_notebook_shows_one_parameters_cell(tmp_path):
    """The values the run used (papermill's cell), with the meaning the notebook gives each,
    the default where the run used another value, and the parameters it did not set."""
    build = build_module()
    page = staged(build, tmp_path, tmp_path / "stage", executed_stage_notebook())
    (cell,) = parameter_cells(page)
    assert cell.metadata["tags"] == ["injected-parameters"]
    lines = cell.source.splitlines()
    assert lines[0].startswith("# The parameters this run used")
    assert 'raw_dir = "data/raw"  # folder in the official layout' in lines
    assert "size = 128  # image side (the notebook's default: 16)" in lines
    assert "limit = 0  # first N images only (not set by this run: the notebook's default)" in lines
    assert [c.source.splitlines()[0] for c in page.cells[2:]] == ["show()"]  # the rest as it was
    # The executed notebooks of this checkout, where it has them: one parameters cell each.
    for executed in sorted((ROOT / "reports/notebooks").glob("*.ipynb")):
        nb = nbformat.read(executed, as_version=4)
        shown = staged(build, ROOT, tmp_path / "real", nb, f"reports/notebooks/{executed.name}")
        assert len(parameter_cells(shown)) == 1, executed.name
        assert len(shown.cells) == len(nb.cells) - (len(parameter_cells(nb)) - 1)


def test_a_parameters_cell_that_is_not_plain_assignments_is_kept_as_written(tmp_path):
    build = build_module()
    nb = executed_stage_notebook()
    nb.cells[1].source = "# the image\nsize = 16; limit = 0"
    (cell,) = parameter_cells(staged(build, tmp_path, tmp_path / "stage", nb))
    assert "size = 128" in cell.source and "size = 16; limit = 0" in cell.source
    assert cell.source.count("# Parameters") == 0  # papermill's own title is replaced


def test_no_page_shows_the_absolute_path_of_the_build_root(tmp_path):
    """What a notebook prints itself must be project-relative (the build fails otherwise);
    warnings and tracebacks from libraries under the project are made relative when staged."""
    build = build_module()
    root = tmp_path / "project"
    root.mkdir()
    nb = tiny_notebook("tutorial (tiny)", b"")
    nb.cells[2].outputs = [
        nbformat.v4.new_output("stream", name="stderr",
                               text=f"{root}/.venv/lib/torch/nn.py:12: UserWarning: slow\n"),
        nbformat.v4.new_output("stream", name="stdout", text="figures: reports/tutorial/\n"),
    ]  # fmt: skip
    stage = tmp_path / "book" / "source"
    page = staged(build, root, stage, nb, "notebooks/tutorial.ipynb")
    assert page.cells[2].outputs[0]["text"].startswith(".venv/lib/torch/nn.py:12:")
    (stage / "docs").mkdir()
    (stage / "docs" / "method.md").write_text(f"# Method\n\nRun it in `{root}-old`.\n")
    assert build.absolute_paths(stage, root) == []  # another folder whose name starts alike
    nb.cells[2].outputs[1]["text"] = f"figures: {root}/reports/tutorial\n"
    staged(build, root, stage, nb, "notebooks/tutorial.ipynb")
    (stage / "docs" / "method.md").write_text(f"# Method\n\nThe project: {root}\n")
    found = build.absolute_paths(stage, root)
    assert [f.split(": ")[0] for f in found] == ["docs/method.md", "notebooks/tutorial.ipynb"]
    assert f"figures: {root}/reports/tutorial" in found[1]


def test_the_tutorial_prints_paths_relative_to_the_project():
    """The tutorial's own prints use project-relative paths (the executed tutorial is a page)."""
    from runtime_backdoor.tutorial import project_path

    source = "".join(
        "".join(c["source"]) for c in nbformat.read(ROOT / "notebooks/tutorial.ipynb", 4).cells
        if c["cell_type"] == "code"
    )  # fmt: skip
    assert ".resolve()" not in source and "{root}" not in source
    assert project_path(ROOT / "reports" / "tutorial", ROOT) == "reports/tutorial"
    assert project_path(ROOT, ROOT) == "."
    assert project_path("/elsewhere/out", ROOT) == "/elsewhere/out"  # outside: as given


def test_the_book_style_lets_wide_tables_scroll_and_every_page_loads_it(tmp_path):
    build = build_module()
    conf = {}
    exec((ROOT / "docs" / "conf.py").read_text(), conf)
    assert build.STYLE in conf["html_css_files"] and conf["html_static_path"] == ["_static"]
    css = (ROOT / "docs" / "_static" / build.STYLE).read_text()
    rule = re.search(r"([^{}]*)\{[^}]*overflow-x:\s*auto[^}]*\}", css)
    assert rule and ".output.text_html" in rule[1] and "table-container" in rule[1], css
    html = tmp_path / "html"
    (html / "_static").mkdir(parents=True)
    (html / "index.html").write_text(f'<link rel="stylesheet" href="_static/{build.STYLE}?v=1" />')
    (html / "docs").mkdir()
    (html / "docs" / "method.html").write_text("<p>no style</p>")
    assert build.unstyled(html) == [f"_static/{build.STYLE}"]  # not copied by the build
    (html / "_static" / build.STYLE).write_text(css)
    assert build.unstyled(html) == ["docs/method.html"]


def test_the_headline_names_the_editor_protection_costs_against():
    """`reports/metrics.json`'s protection PSNR is of the implant stage's images, optimised
    against the pipeline's editor: the headline says so."""
    from runtime_backdoor import docs_text

    metrics = {"n_images": 18, "protection_linf_8bit_max": 6.0}
    for key in ("malicious_mask_hit_rate_clean", "malicious_mask_hit_rate_protected",
                "protection_psnr"):  # fmt: skip
        metrics |= {key: 0.5, f"{key}_low": 0.4, f"{key}_high": 0.6}
    sweep = {"n_images": 18, "control_seeds": 3, "control_hit_rate_at_paper_eps": 0.4,
             "control_hit_rate_at_paper_eps_low": 0.2, "control_hit_rate_at_paper_eps_high": 0.6}  # fmt: skip
    block = docs_text.headline_block(metrics, sweep, {}, 0.025)
    (cost,) = [ln for ln in block.splitlines() if "Cost of protecting" in ln]
    assert "the pipeline's editor, the miniature LaMa" in cost and "reports/metrics.json" in cost


# --------------------------------------------------------------------------- install stamp


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_the_install_stamp_follows_pyproject_contents_not_its_time(tmp_path):
    """A fresh clone sharing an installed venv (`make docs VENV=...`) has a newer
    pyproject.toml, not another one: nothing is installed. Another pyproject.toml, or no
    venv, installs."""
    import hashlib
    import subprocess
    import time

    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp_path / name)
    venv = tmp_path / "shared-venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("#!/bin/sh\n")
    (venv / "bin" / "python").chmod(0o755)
    pyproject = tmp_path / "pyproject.toml"

    def installs(venv_dir: Path) -> bool:
        done = subprocess.run(
            ["make", "-n", "install", f"VENV={venv_dir}"], cwd=tmp_path, capture_output=True,
            text=True, check=True,
        )  # fmt: skip
        return "pip install" in done.stdout

    assert installs(venv)  # no stamp yet
    (venv / ".installed").write_text(hashlib.sha256(pyproject.read_bytes()).hexdigest() + "\n")
    later = time.time() + 60
    os.utime(pyproject, (later, later))  # checked out after the venv was installed
    assert not installs(venv)
    pyproject.write_text(pyproject.read_text() + "\n# another dependency\n")
    assert installs(venv)
    assert installs(tmp_path / "no-venv")


# ------------------------------------------------------------------------------------ book


def tiny_notebook(title: str, png: bytes) -> nbformat.NotebookNode:
    """An executed notebook as papermill leaves one: a title, a parameters cell, a printed
    line, a table and a figure."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nb.metadata["papermill"] = {"end_time": "2026-01-01T12:00:00.000000"}
    code = nbformat.v4.new_code_cell("size = 16  # image side", execution_count=1)
    code.metadata["tags"] = ["parameters"]
    shown = nbformat.v4.new_code_cell("show()", execution_count=2)
    shown.outputs = [
        nbformat.v4.new_output("stream", name="stdout", text="2 images\n"),
        nbformat.v4.new_output(
            "display_data",
            data={
                "text/html": "<table><tr><td>hit</td><td>0.5</td></tr></table>",
                "text/plain": "hit 0.5",
            },
        ),  # fmt: skip
        nbformat.v4.new_output(
            "display_data",
            data={"image/png": base64.b64encode(png).decode(), "text/plain": "fig"},
        ),
    ]
    nb.cells = [
        nbformat.v4.new_markdown_cell(f"# {title}\n\nA tiny executed notebook."),
        code,
        shown,
    ]
    return nb


def small_copy(dest: Path) -> Path:
    """The pages of the book, the reports' figures and tables, everything the pages link to,
    two tiny executed stage notebooks (the others missing, as in a checkout that has not run
    them) and, where this checkout has one, the executed tutorial."""
    for rel in ["README.md", "dvc.yaml", "params.yaml", "benchmarks/README.md",
                "notebooks/tutorial.ipynb", *STAGES.values()]:  # fmt: skip
        if (ROOT / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / rel, dest / rel)
    shutil.copytree(ROOT / "docs", dest / "docs", ignore=shutil.ignore_patterns("__pycache__"))
    for folder in ("reports/figures", "reports/miniature"):
        shutil.copytree(ROOT / folder, dest / folder)
    for md in ("reports/results.md", "reports/beyond/results.md", "reports/stability.md"):
        (dest / md).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / md, dest / md)
    for page in [README, *DOCS]:
        for target in local_links(page):
            src = (page.parent / target).resolve()
            if src.is_file() and ROOT.resolve() in src.parents:
                rel = src.relative_to(ROOT.resolve())
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(src, dest / rel)
    png = (ROOT / "reports/figures/scenarios.png").read_bytes()
    stages = list(STAGES.items())
    for stage, notebook in (stages[0], stages[4]):
        out = dest / "reports/notebooks" / Path(notebook).name
        out.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(tiny_notebook(f"{stage} (tiny)", png), out)
    tutorial = ROOT / "reports/tutorial/tutorial.ipynb"
    if tutorial.is_file():  # git-ignored: only where `make docs` has run it
        (dest / "reports/tutorial").mkdir(parents=True)
        shutil.copy(tutorial, dest / "reports/tutorial/tutorial.ipynb")
    return dest


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def served_book(tmp_path):
    """The book built from a small copy of the project, served on a free port of 127.0.0.1."""
    build = build_module()
    root = small_copy(tmp_path / "project")
    html = build.build(root, out=tmp_path / "book", tutorial="skip", jobs="1")
    missing = {build.executed(n) for n in STAGES.values()} - {
        f"reports/notebooks/{p.name}" for p in (root / "reports/notebooks").glob("*.ipynb")
    }
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    handler = functools.partial(QuietHandler, directory=str(html))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield html, f"http://127.0.0.1:{port}/", missing
    server.shutdown()
    server.server_close()


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_the_book_is_offline_and_every_link_and_image_resolves(served_book, tmp_path):
    from playwright.sync_api import sync_playwright

    html, base, missing = served_book
    pages = sorted(p.relative_to(html).as_posix() for p in html.rglob("*.html"))
    assert "index.html" in pages and "notebooks/tutorial.html" in pages
    front = (html / "index.html").read_text()
    assert "_static/book.css" in front  # the book's style: wide tables scroll in the column
    for out in missing:  # a missing executed notebook is listed, not silently dropped
        assert out in front, f"{out} is missing but the front page does not say so"
    outside, broken, unloaded = [], [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on(
            "request",
            lambda r: None if r.url.startswith((base, "data:", "blob:", "about:")) else outside.append(r.url),
        )  # fmt: skip
        for rel in pages:
            response = page.goto(base + rel, wait_until="load")
            assert response is not None and response.ok, f"{rel}: {response and response.status}"
            for src in page.eval_on_selector_all(
                "img", "els => els.filter(e => !(e.complete && e.naturalWidth > 0)).map(e => e.src)"
            ):
                unloaded.append(f"{rel}: {src}")
            for href in page.eval_on_selector_all("a[href]", "els => els.map(e => e.href)"):
                if not href.startswith(base):
                    continue  # links to elsewhere are links, not requests
                path = unquote(urlsplit(href).path)[len(urlsplit(base).path) :]
                target = html / path
                if target.is_dir():
                    target = target / "index.html"
                if not target.is_file():
                    broken.append(f"{rel}: {href}")
        # The tutorial for the README: the book's contents beside the optimisation's figure.
        page.goto(base + "notebooks/tutorial.html", wait_until="load")
        steps = page.get_by_role("heading", name=re.compile("Twenty Adam steps"))
        if steps.count():
            steps.first.evaluate("e => { e.scrollIntoView(); window.scrollBy(0, -70); }")
        shot = Path(os.environ.get("BOOK_SCREENSHOT") or tmp_path / "book.png")
        shot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(shot))
        browser.close()
    assert not outside, f"requests left the machine: {sorted(set(outside))[:10]}"
    assert not unloaded, f"images that did not load: {unloaded[:10]}"
    assert not broken, f"internal links that do not resolve: {broken[:10]}"

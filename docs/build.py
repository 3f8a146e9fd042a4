"""Build the study book: ``make docs`` (``python docs/build.py``).

The book is made of the pages the project already has, in the pipeline's order: docs/*.md, the
README as its front page, notebooks/tutorial.ipynb, each stage's EXECUTED notebook from
reports/notebooks/ (as ``make reproduce`` left it: nothing is re-run here) and the reports'
generated tables. They are staged into ``OUT/source``, a mirror of the repository's paths (so
the pages' relative links and images resolve as they do on a code host), each with a note
saying where it comes from and which command regenerates it; then Sphinx (docs/conf.py)
writes ``OUT/html``. A stage whose executed notebook is missing gets its source notebook with
a warning saying how to make it (``make reproduce`` or ``dvc pull``), and the build lists it.

The tutorial is not a stage: its executed copy is ``reports/tutorial/tutorial.ipynb``
(git-ignored). ``--tutorial auto`` (the default) runs it with papermill when that copy is
missing or older than the notebook or ``runtime_backdoor/tutorial.py`` (well under a minute on
a CPU); ``skip`` never runs it (the source without outputs when there is no copy); ``run``
always does.

An executed stage notebook shows one parameters cell: papermill's cell of the values the run
used, with the comments of the notebook's own defaults cell (:func:`one_parameters_cell` says
why). Pages show project-relative paths only: the build fails if a staged page shows the
absolute path of ROOT (warnings and tracebacks from libraries under ROOT are made relative).

Offline: nothing is downloaded when the book is built, and every page is checked for scripts
or style sheets from elsewhere (the build fails if one is found) and for the book's own style
sheet, ``docs/_static/book.css`` (wide tables scroll within the column).

    python docs/build.py [--root ROOT] [--out OUT] [--tutorial auto|skip|run]
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import os
import posixpath
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import nbformat
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TUTORIAL = "notebooks/tutorial.ipynb"
TUTORIAL_EXECUTED = "reports/tutorial/tutorial.ipynb"
TUTORIAL_DEPS = (TUTORIAL, "src/runtime_backdoor/tutorial.py")
NOTEBOOK = "@notebook"  # a stage's executed notebook, in STAGE_PAGES
STYLE = "book.css"  # the book's own style sheet, in docs/_static/ (docs/conf.py loads it)

#: Pages shown with a stage, in reading order (default: its notebook only). Pages of a stage
#: that has not been added yet, and reports a checkout does not have, are left out.
STAGE_PAGES = {
    "editor": [NOTEBOOK, "reports/miniature/README.md"],
    "figures": [NOTEBOOK, "reports/results.md", "docs/results.md"],
    "beyond": ["docs/beyond.md", NOTEBOOK, "reports/beyond/results.md"],
    "purify": [NOTEBOOK, "reports/purification/results.md"],
    "ensemble": [NOTEBOOK, "reports/ensemble/results.md"],
}
#: The book's parts: (caption, pages); "@stages" is every pipeline stage in order.
PARTS = [
    ("The study", ["docs/method.md", TUTORIAL]),
    ("The pipeline, stage by stage", ["@stages"]),
    ("For image owners", ["docs/owners.md", "docs/real-models.md", "docs/scale-out.md"]),
    (
        "Cost and trust",
        [
            "docs/performance.md",
            "benchmarks/README.md",
            "docs/reproducibility.md",
            "reports/stability.md",
            "docs/reviewers.md",
        ],
    ),
    ("About", ["docs/install.md", "docs/about.md"]),
]
#: Titles the book gives generated pages (in place of their own, or where they have none).
TITLES = {
    "reports/results.md": "The results table",
    "reports/miniature/README.md": "The miniature editor study",
    "reports/beyond/results.md": "The beyond stage's tables",
    "reports/purification/results.md": "The purification stage's tables",
    "reports/ensemble/results.md": "The ensemble stage's tables",
}
#: Where pages that no DVC stage writes come from.
MADE_BY = {
    "reports/stability.md": "`make stability` (`benchmarks/stability.py`)",
    "reports/miniature/README.md": "`benchmarks/miniature_study.py`",
}
LINK = re.compile(r"(!?\[[^\]]*\]\()([^)\s]+)(\))")
IMG_SRC = re.compile(r'(<img\s[^>]*src=")([^"]+)(")')
EXTERNAL = re.compile(
    r"<(?:script|link)\b[^>]*\b(?:src|href)=[\"'](?:https?:)?//[^\"']*[\"']", re.IGNORECASE
)


@dataclass
class Page:
    """One page of the book: where it sits in the staged tree and where it comes from."""

    path: str  # staged path (repository-relative), e.g. reports/notebooks/03_implant.ipynb
    source: str | None  # the repository file it is made from (None: generated here)
    note: str  # "where this page comes from", markdown
    origin: str = ""  # the folder its relative links are written from
    missing: str | None = None  # what is missing, for the build's summary
    nb: nbformat.NotebookNode | None = field(default=None, repr=False)


def stages() -> dict[str, str]:
    """The pipeline's stages and their source notebooks, in order."""
    from runtime_backdoor.pipeline import STAGES

    return dict(STAGES)


def executed(notebook: str) -> str:
    """The executed copy of a stage's source notebook (a DVC output)."""
    return f"reports/notebooks/{Path(notebook).name}"


def stage_of_output(root: Path, path: str) -> str | None:
    """The DVC stage of ``root/dvc.yaml`` that writes ``path``, if any."""
    dvc = root / "dvc.yaml"
    if not dvc.exists():
        return None
    for name, stage in (yaml.safe_load(dvc.read_text()).get("stages") or {}).items():
        for section in ("outs", "metrics", "plots"):
            for out in stage.get(section) or []:
                out = next(iter(out)) if isinstance(out, dict) else out
                if path == out or path.startswith(out.rstrip("/") + "/"):
                    return name
    return None


def first_heading(nb) -> str:
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                if line.startswith("# "):
                    return line[2:].strip()
    return "Untitled"


def note_cell(kind: str, text: str):
    return nbformat.v4.new_markdown_cell(f"```{{{kind}}}\n{text}\n```")


def with_note(nb, kind: str, text: str):
    """A copy of ``nb`` with a note right under its title (the first heading of the first
    markdown cell; a cell of its own at the top when there is none)."""
    nb = copy.deepcopy(nb)
    note = f"```{{{kind}}}\n{text}\n```"
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            lines = cell.source.splitlines()
            if lines and lines[0].startswith("# "):
                cell.source = "\n".join([lines[0], "", note, "", *lines[1:]])
                return nb
            break
    nb.cells.insert(0, note_cell(kind, text))
    return nb


def _when(nb) -> str:
    """`` on DATE TIME UTC`` from papermill's record of a run, or nothing."""
    end = (nb.metadata.get("papermill") or {}).get("end_time")
    return f" on {end[:10]} {end[11:16]} UTC" if end and len(end) >= 16 else ""


def _failed(path: Path) -> bool:
    """Whether papermill recorded an exception in the notebook at ``path``."""
    nb = nbformat.read(path, as_version=4)
    return bool((nb.metadata.get("papermill") or {}).get("exception"))


def _newer(path: Path, than: list[Path]) -> bool:
    return path.exists() and all(
        path.stat().st_mtime >= p.stat().st_mtime for p in than if p.exists()
    )


def run_tutorial(root: Path) -> str | None:
    """Execute the tutorial into its git-ignored copy; None when done, else why not."""
    out = root / TUTORIAL_EXECUTED
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "papermill", "-k", "python3", "--log-level", "WARNING",
           "--no-progress-bar", TUTORIAL, TUTORIAL_EXECUTED]  # fmt: skip
    env = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    print(f"running the tutorial: {' '.join(cmd[2:])}", flush=True)
    try:
        done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"{type(err).__name__}: {err}"
    if done.returncode != 0:
        out.unlink(missing_ok=True)  # papermill writes the failed run too: never show it as done
        lines = [ln for ln in (done.stderr or done.stdout).splitlines() if ln.strip()]
        return lines[-1] if lines else f"papermill exited with {done.returncode}"
    return None


def tutorial_page(root: Path, mode: str) -> Page:
    source, out = root / TUTORIAL, root / TUTORIAL_EXECUTED
    failed = None
    stale = not _newer(out, [root / p for p in TUTORIAL_DEPS]) or _failed(out)
    if mode == "run" or (mode == "auto" and stale):
        failed = run_tutorial(root)
    regenerate = (
        "`make docs` runs it when that copy is missing or older than the notebook "
        "(`python docs/build.py --tutorial run` always does)"
    )
    if out.exists() and failed is None and not _failed(out):
        when = _when(nbformat.read(out, as_version=4))
        note = (
            f"**Where this page comes from.** `{TUTORIAL}`, executed by papermill into "
            f"`{TUTORIAL_EXECUTED}` (git-ignored){when}: "
            f"{regenerate}. It is not a pipeline stage; its helpers are in "
            "`src/runtime_backdoor/tutorial.py`, its test is `tests/test_tutorial.py`."
        )
        return Page(TUTORIAL, TUTORIAL_EXECUTED, note, "notebooks",
                    nb=with_note(nbformat.read(out, as_version=4), "note", note))  # fmt: skip
    why = f" (running it failed: {failed})" if failed else ""
    note = (
        f"**Not run yet{why}.** This is the source notebook `{TUTORIAL}`, without outputs. "
        f"{regenerate[0].upper()}{regenerate[1:]}; it needs the trained miniature "
        "(`make reproduce`, or `.venv/bin/dvc pull editor`)."
    )
    return Page(TUTORIAL, TUTORIAL, note, "notebooks", missing=f"{TUTORIAL_EXECUTED}{why}",
                nb=with_note(nbformat.read(source, as_version=4), "warning", note))  # fmt: skip


def stage_notebook_page(root: Path, stage: str, notebook: str) -> Page:
    out = executed(notebook)
    module = f"src/runtime_backdoor/pipeline/{stage}.py"
    test = f"tests/pipeline/test_{stage}.py"
    where = (
        f"Source notebook `{notebook}`, code `{module}`, test `{test}`; "
        f"`make reproduce` (or `.venv/bin/dvc repro {stage}`) regenerates it, `make docs` this page."
    )
    if (root / out).exists():
        nb = nbformat.read(root / out, as_version=4)
        when = _when(nb)
        note = (
            f"**Where this page comes from.** The executed notebook `{out}`, written by the DVC "
            f"stage `{stage}`{when}. {where}"
        )
        if (nb.metadata.get("papermill") or {}).get("exception"):
            note = note.replace("**Where this page comes from.**", "**This run failed.**", 1)
            return Page(out, out, note, "notebooks", missing=f"{out} (its run failed)",
                        nb=with_note(nb, "warning", note))  # fmt: skip
        return Page(out, out, note, "notebooks", nb=with_note(nb, "note", note))
    note = (
        f"**Not run in this checkout.** The executed notebook `{out}` is missing: `make reproduce` "
        f"writes it (the whole pipeline, offline), or `.venv/bin/dvc pull` restores it when the "
        f"DVC remote holds it; then `make docs`. Below: the source notebook `{notebook}`, "
        f"without outputs. Code `{module}`, test `{test}`."
    )
    nb = nbformat.read(root / notebook, as_version=4) if (root / notebook).exists() else None
    if nb is None:
        nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell(f"# {stage}")])
    return Page(out, notebook, note, "notebooks", missing=out,
                nb=with_note(nb, "warning", note))  # fmt: skip


def markdown_page(root: Path, path: str) -> Page | None:
    if not (root / path).exists():
        return None
    if path.startswith("docs/"):
        note = (
            f"**Where this page comes from.** Written in `{path}`; `make docs` rebuilds this page."
        )
        if path == "docs/results.md":
            note += (
                " Its table of the control's rates and its list of conclusions are generated "
                "from the committed reports by `python -m runtime_backdoor.docs_text`."
            )
    elif path.startswith("reports/"):
        stage = stage_of_output(root, path)
        by = (
            f"the DVC stage `{stage}` (`make reproduce`, or `.venv/bin/dvc repro {stage}`)"
            if stage
            else MADE_BY.get(path, "a script of the project")
        )
        note = f"**Where this page comes from.** `{path}`, generated by {by}; `make docs` rebuilds this page."
    else:
        note = f"**Where this page comes from.** `{path}`; `make docs` rebuilds this page."
    return Page(path, path, note, posixpath.dirname(path))


def pages(root: Path, tutorial: str) -> tuple[list[tuple[str, list[Page]]], list[str]]:
    """The book's parts with their pages, in reading order, and the docs/*.md pages that no
    part lists (an error: every page of docs/ belongs in the book)."""
    parts = []
    listed = set()
    for caption, entries in PARTS:
        got: list[Page] = []
        for entry in entries:
            if entry == "@stages":
                for stage, notebook in stages().items():
                    for item in STAGE_PAGES.get(stage, [NOTEBOOK]):
                        page = (
                            stage_notebook_page(root, stage, notebook)
                            if item == NOTEBOOK
                            else markdown_page(root, item)
                        )
                        if page is not None:
                            got.append(page)
                            listed.add(item)
            elif entry == TUTORIAL:
                got.append(tutorial_page(root, tutorial))
            else:
                page = markdown_page(root, entry)
                listed.add(entry)
                if page is not None:
                    got.append(page)
                elif entry.startswith("docs/"):
                    raise FileNotFoundError(f"{entry}: a page of the book is missing")
        parts.append((caption, got))
    unlisted = sorted(
        p.relative_to(root).as_posix()
        for p in (root / "docs").glob("*.md")
        if p.relative_to(root).as_posix() not in listed
    )
    return parts, unlisted


# ------------------------------------------------------------------------------ staging

PARAMETERS, INJECTED = "parameters", "injected-parameters"


def _tags(cell) -> list[str]:
    return list((cell.get("metadata") or {}).get("tags") or [])


def _assignments(source: str) -> dict[str, tuple[str, str]] | None:
    """``name -> (value as written, trailing comment)`` of a parameters cell made only of
    one-name assignments (and papermill's ``# Parameters`` line); None for anything else."""
    try:
        body = ast.parse(source).body
    except SyntaxError:
        return None
    lines = source.splitlines()
    statements = {n for b in body for n in range(b.lineno, b.end_lineno + 1)}
    others = [
        ln for i, ln in enumerate(lines, 1)
        if i not in statements and ln.strip() and ln.strip() != "# Parameters"
    ]  # fmt: skip
    if others:
        return None  # comment lines of their own: keep the cells' text as written
    found = {}
    for b in body:
        if not (isinstance(b, ast.Assign) and len(b.targets) == 1
                and isinstance(b.targets[0], ast.Name)):  # fmt: skip
            return None
        rest = lines[b.end_lineno - 1][b.value.end_col_offset :].strip()
        if rest and not rest.startswith("#"):
            return None  # more than one statement on the line
        found[b.targets[0].id] = (ast.get_source_segment(source, b.value), rest)
    return found


def _same_value(a: str, b: str) -> bool:
    try:
        return ast.literal_eval(a) == ast.literal_eval(b)
    except (ValueError, SyntaxError, TypeError):
        return a == b


def one_parameters_cell(nb):
    """A copy of the executed notebook ``nb`` with one parameters cell instead of two.

    Papermill keeps the notebook's ``parameters`` cell (its defaults, each with a comment saying
    what it is) and adds an ``injected-parameters`` cell after it (the values ``dvc repro``
    passed from params.yaml, without comments). Shown as they are, a reader sees every
    parameter twice, sometimes with two values, and has to know which cell won. What a reader
    wants is the values the run used, with what each means: the injected cell is kept (at the
    defaults' place) with the defaults' comments on its lines, the notebook's default named
    where the run used another value, and the parameters the run did not set listed at their
    defaults (they were in force too). A cell that is not plain ``name = value`` lines is kept
    as written, under the values used. A notebook without both cells is returned as it is.
    """
    defaults = [i for i, c in enumerate(nb.cells) if PARAMETERS in _tags(c)]
    injected = [i for i, c in enumerate(nb.cells) if INJECTED in _tags(c)]
    if not defaults or not injected:
        return nb
    nb = copy.deepcopy(nb)
    default_cell, used_cell = nb.cells[defaults[0]], nb.cells[injected[0]]
    meaning, given = _assignments(default_cell.source), _assignments(used_cell.source)
    head = (
        "# The parameters this run used (papermill injected them),\n# with the notebook's comments"
    )
    if meaning is None or given is None:
        used = re.sub(r"^# Parameters\n", "", used_cell.source.strip())
        lines = [head, used, "",
                 "# The notebook's defaults (the values above replace them):",
                 default_cell.source.strip()]  # fmt: skip
    else:
        lines = [head]
        for name, (default, comment) in meaning.items():
            value = given.get(name, (default, ""))[0]
            note = ""
            if name not in given:
                note = "(not set by this run: the notebook's default)"
            elif not _same_value(value, default):
                note = f"(the notebook's default: {default})"
            comment = f"{comment} {note}".strip() if comment else (f"# {note}" if note else "")
            lines.append(f"{name} = {value}" + (f"  {comment}" if comment else ""))
        lines += [f"{name} = {value}" for name, (value, _) in given.items() if name not in meaning]
    used_cell.source = "\n".join(lines)
    nb.cells[defaults[0]] = used_cell
    del nb.cells[injected[0]]
    return nb


def _project_relative(text: str, root: Path) -> str:
    """``text`` with the absolute path of ``root`` (and of the folder it resolves to) taken out
    of the paths under it: project-relative paths, as the rest of the page writes them."""
    for folder in dict.fromkeys([str(root), str(root.resolve())]):
        text = text.replace(folder.rstrip("/") + "/", "")
    return text


def unmade_paths(nb, root: Path):
    """``nb`` with ``root``'s absolute path removed from the outputs nobody prints on purpose:
    warnings on stderr and tracebacks (a library's file, under the project's .venv). What a
    notebook prints itself is fixed where it is printed (paths relative to the project folder);
    :func:`absolute_paths` fails the build on any left."""
    for cell in nb.cells:
        for out in cell.get("outputs") or []:
            if out.get("output_type") == "stream" and out.get("name") == "stderr":
                out["text"] = _project_relative(out["text"], root)
            elif out.get("output_type") == "error":
                out["traceback"] = [_project_relative(t, root) for t in out["traceback"]]
                out["evalue"] = _project_relative(out["evalue"], root)
    return nb


def _shown(nb) -> list[tuple[str, str]]:
    """(where, text) of everything a notebook page shows: each cell's source and outputs."""
    shown = []
    for n, cell in enumerate(nb.cells, 1):
        shown.append((f"cell {n}", cell.source))
        for out in cell.get("outputs") or []:
            texts = [out.get("text", ""), out.get("evalue", ""), *(out.get("traceback") or [])]
            for mime, data in (out.get("data") or {}).items():
                if mime.startswith("text/") or mime.endswith(("json", "javascript")):
                    texts.append(data if isinstance(data, str) else json.dumps(data))
            shown += [(f"cell {n} output", t) for t in texts if t]
    return shown


def absolute_paths(stage: Path, root: Path) -> list[str]:
    """Where a staged page shows the absolute path of ``root`` (the project the book is built
    from): ``page: place: line``. A page must not show the folder of the machine that built it;
    notebooks are read for what they show (sources and outputs, not their metadata). A root
    of fewer than two folders (``/work``) is not checked: that text is too common."""
    folders = {f.rstrip("/") for f in (str(root), str(root.resolve())) if len(Path(f).parts) > 2}
    pattern = re.compile("|".join(re.escape(f) + r"(?![\w.-])" for f in sorted(folders)))
    found = []
    for page in sorted(stage.rglob("*")):
        if not folders or not page.is_file() or page.suffix not in (".md", ".ipynb"):
            continue
        text = page.read_text(errors="replace")
        if page.suffix == ".md":
            places = [("", text)]
        else:
            places = _shown(nbformat.reads(text, as_version=4))
        for place, shown in places:
            for line in shown.splitlines():
                if pattern.search(line):
                    where = f"{page.relative_to(stage).as_posix()}: {place}".rstrip(": ")
                    found.append(f"{where}: {line.strip()[:160]}")
    return found


class Stager:
    """Writes pages into the staged tree, rewriting their relative links to staged paths and
    copying what they link to (images, code, data files) alongside."""

    def __init__(self, root: Path, stage: Path, page_paths: set[str], notebook_map: dict[str, str]):
        self.root, self.stage = root, stage
        self.page_paths = page_paths  # staged paths of the book's pages
        self.notebook_map = notebook_map  # source notebook -> its page (the executed copy)
        self.written: set[str] = set()

    def target(self, link: str, origin: str, at: str) -> str:
        """``link`` as written from ``origin`` (a repository folder), for a page staged at ``at``."""
        if re.match(r"^[a-z][a-z0-9+.-]*:", link, re.IGNORECASE) or link.startswith(("#", "/")):
            return link
        path, _, anchor = link.partition("#")
        repo = posixpath.normpath(posixpath.join(origin, path))
        if repo.startswith(".."):
            return link
        if repo == "README.md":
            repo = "index.md"
        repo = self.notebook_map.get(repo, repo)
        if repo not in self.page_paths and repo != "index.md":
            src = self.root / repo
            if not src.is_file():
                return link  # Sphinx says so; tests/test_docs.py checks the docs' links
            self.copy(repo)
        rel = posixpath.relpath(repo, posixpath.dirname(at) or ".")
        return rel + (f"#{anchor}" if anchor else "")

    def rewrite(self, text: str, origin: str, at: str) -> str:
        text = LINK.sub(lambda m: m[1] + self.target(m[2], origin, at) + m[3], text)
        return IMG_SRC.sub(lambda m: m[1] + self.target(m[2], origin, at) + m[3], text)

    def put(self, path: str, data: bytes) -> None:
        """Write a staged file, leaving it (and its time stamp) alone when unchanged, so that
        Sphinx rebuilds only what changed."""
        dest = self.stage / path
        self.written.add(path)
        if dest.exists() and dest.read_bytes() == data:
            return
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)

    def copy(self, path: str) -> None:
        if path in self.written:
            return
        data = (self.root / path).read_bytes()
        if path.endswith((".md", ".ipynb")):  # a page outside the book: shown, not in the nav
            if path.endswith(".md"):
                data = b"---\norphan: true\n---\n" + data
            else:
                nb = nbformat.reads(data.decode(), as_version=4)
                nb.metadata["orphan"] = True
                data = nbformat.writes(nb).encode()
        self.put(path, data)

    def markdown(self, page: Page, text: str) -> None:
        text = self.rewrite(text, page.origin, page.path)
        lines = text.splitlines()
        title = next((i for i, ln in enumerate(lines) if ln.startswith("# ")), None)
        if page.path in TITLES:
            if title is None:
                lines[:0] = [""]
                title = 0
            lines[title] = f"# {TITLES[page.path]}"
        elif title is None:
            lines[:0] = [f"# {page.path}", ""]
            title = 0
        lines.insert(title + 1, f"\n```{{note}}\n{page.note}\n```\n")
        self.put(page.path, ("\n".join(lines) + "\n").encode())

    def notebook(self, page: Page) -> None:
        nb = unmade_paths(one_parameters_cell(copy.deepcopy(page.nb)), self.root)
        for cell in nb.cells:
            if cell.cell_type == "markdown":
                cell.source = self.rewrite(cell.source, page.origin, page.path)
        self.put(page.path, nbformat.writes(nb).encode())


def toctree(caption: str, docs: list[str]) -> str:
    body = "\n".join(docs)
    return f"```{{toctree}}\n:caption: {caption}\n:hidden:\n:maxdepth: 1\n\n{body}\n```\n"


def stage_book(root: Path, stage: Path, tutorial: str = "auto") -> tuple[list[str], list[str]]:
    """Stage every page under ``stage``; returns the pages' staged paths and what is missing."""
    parts, unlisted = pages(root, tutorial)
    if unlisted:
        raise SystemExit(
            f"docs pages not in the book (add them to PARTS in docs/build.py): {unlisted}"
        )
    all_pages = [p for _, ps in parts for p in ps]
    notebook_map = {n: executed(n) for n in stages().values()}
    stager = Stager(root, stage, {p.path for p in all_pages}, notebook_map)
    for page in all_pages:
        if page.nb is not None:
            stager.notebook(page)
        else:
            stager.markdown(page, (root / page.source).read_text())
    missing = [p.missing for p in all_pages if p.missing]

    # The front page: the README, with the book's contents.
    readme = (root / "README.md").read_text()
    front = Page("index.md", "README.md", (
        "**Where this page comes from.** The project's `README.md`; `make docs` rebuilds this "
        "book (docs/about.md says how)."
    ), "")  # fmt: skip
    status = ""
    if missing:
        items = "\n".join(f"- `{m}`" for m in missing)
        status = (
            "\n```{warning}\n**Missing from this build** (`make reproduce`, or "
            f"`.venv/bin/dvc pull`, then `make docs`):\n\n{items}\n```\n"
        )
    trees = "\n".join(
        toctree(caption, [posixpath.splitext(p.path)[0] for p in ps]) for caption, ps in parts if ps
    )
    stager.markdown(front, readme + status + "\n" + trees)

    # Whatever an earlier build staged and this one did not is removed.
    for path in sorted(stage.rglob("*"), reverse=True):
        rel = path.relative_to(stage).as_posix()
        if path.is_file() and rel not in stager.written:
            path.unlink()
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()
    return [p.path for p in all_pages], missing


def external_resources(html: Path) -> list[str]:
    """Every ``<script src>`` / ``<link href>`` of the built pages that points elsewhere."""
    found = []
    for page in html.rglob("*.html"):
        for m in EXTERNAL.finditer(page.read_text(errors="replace")):
            found.append(f"{page.relative_to(html)}: {m[0]}")
    return found


def unstyled(html: Path) -> list[str]:
    """The built pages that do not load the book's own style sheet (:data:`STYLE`, listed in
    docs/conf.py's ``html_css_files``: wide tables scroll within the column), or the sheet
    itself when the build did not copy it."""
    if not (html / "_static" / STYLE).is_file():
        return [f"_static/{STYLE}"]
    link = re.compile(r'<link\b[^>]*href="[^"]*_static/' + re.escape(STYLE) + r'(?:\?[^"]*)?"')
    return sorted(
        page.relative_to(html).as_posix()
        for page in html.rglob("*.html")
        if page.relative_to(html).parts[0] != "_static"  # the theme's templates, not pages
        and not link.search(page.read_text(errors="replace"))
    )


def build(
    root: Path = ROOT, out: Path | None = None, tutorial: str = "auto", jobs: str = "auto"
) -> Path:
    """Stage and build the book; returns the folder of its HTML (``index.html`` inside)."""
    root = Path(root).resolve()
    out = Path(out).resolve() if out is not None else root / "_build"
    start = time.monotonic()
    staged, missing = stage_book(root, out / "source", tutorial)
    shown = absolute_paths(out / "source", root)
    if shown:
        raise SystemExit(
            f"pages show the project folder's absolute path ({root}): print paths relative to "
            "it (runtime_backdoor.tutorial.project_path):\n" + "\n".join(shown)
        )
    cmd = [sys.executable, "-m", "sphinx", "-b", "html", "-q", "-j", jobs, "-c", str(HERE),
           "-d", str(out / "doctrees"), str(out / "source"), str(out / "html")]  # fmt: skip
    done = subprocess.run(cmd, text=True, capture_output=True)
    warnings = [ln for ln in done.stderr.splitlines() if ln.strip()]
    if done.returncode != 0:
        raise SystemExit("sphinx-build failed:\n" + "\n".join(warnings))
    for line in warnings:
        print(line)
    outside = external_resources(out / "html")
    if outside:
        raise SystemExit("pages load resources from elsewhere:\n" + "\n".join(outside))
    plain = unstyled(out / "html")
    if plain:
        raise SystemExit(
            f"pages without the book's style sheet (docs/_static/{STYLE}, html_css_files in "
            "docs/conf.py):\n" + "\n".join(plain[:10])
        )
    print(f"book: {out / 'html' / 'index.html'} ({len(staged) + 1} pages, "
          f"{time.monotonic() - start:.0f} s)")  # fmt: skip
    if missing:
        print("missing (the pages say so): run `make reproduce` (or `.venv/bin/dvc pull`), then "
              "`make docs`:\n" + "\n".join(f"  {m}" for m in missing))  # fmt: skip
    return out / "html"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="the project folder")
    parser.add_argument("--out", type=Path, help="build folder (default ROOT/_build)")
    parser.add_argument("--tutorial", choices=("auto", "skip", "run"), default="auto")
    parser.add_argument("--jobs", default="auto", help="Sphinx's -j")
    args = parser.parse_args(argv)
    build(args.root, args.out, args.tutorial, args.jobs)


if __name__ == "__main__":
    main()

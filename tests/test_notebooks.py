"""Notebooks safe to open: every notebook has a py:percent twin that holds its code cells, the
twin is what DVC depends on and runs (dvc.yaml), and a save from JupyterLab (outputs, kernel
metadata, cell ids) leaves the twin byte for byte as it was. notebooks/jupytext.toml says how
they are paired; tests/test_pipeline.py checks `dvc status` in a scratch clone after such saves.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import jupytext
import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def cells(nb) -> list[tuple]:
    """What the twin must carry: each cell's type, source and tags."""
    return [(c.cell_type, c.source.strip(), tuple(c.metadata.get("tags", []))) for c in nb.cells]


def jupyterlab_save(folder: Path, name: str, edit=None) -> None:
    """Open ``name`` in ``folder``, 'run' it and save it through jupytext's contents manager,
    as JupyterLab does with jupytext installed: a kernel's metadata, outputs, execution counts
    and fresh cell ids; ``edit(nb)`` changes anything else before the save."""
    from jupytext import AsyncTextFileContentsManager

    manager = AsyncTextFileContentsManager(root_dir=str(folder))

    async def run():
        nb = (await manager.get(name))["content"]
        nb.metadata["kernelspec"] = {
            "display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"
        }  # fmt: skip
        nb.metadata["language_info"] = {
            "name": "python",
            "version": "3.11.9",
            "mimetype": "text/x-python",
        }
        nb.nbformat_minor = max(nb.nbformat_minor, 5)  # JupyterLab upgrades to 4.5: cells get ids
        for i, cell in enumerate(nb.cells):
            cell["id"] = f"opened-{i}"
            if cell.cell_type == "code":
                cell.execution_count = i + 1
                cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="ran\n")]
        if edit is not None:
            edit(nb)
        await manager.save({"type": "notebook", "format": "json", "content": nb}, name)

    asyncio.run(run())


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_every_notebook_has_its_twin_with_the_same_cells(notebook):
    twin = notebook.with_suffix(".py")
    assert twin.is_file(), f"{twin.name} missing: `jupytext --sync notebooks/{notebook.name}`"
    assert cells(jupytext.read(twin)) == cells(nbformat.read(notebook, as_version=4)), (
        f"{notebook.name} and {twin.name} differ: save it in JupyterLab (jupytext installed) or run "
        f"`jupytext --sync notebooks/{notebook.name}`"
    )


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_the_twin_is_what_jupytext_writes_from_the_notebook(notebook):
    """No drift in formatting either: re-pairing rewrites no twin."""
    config = jupytext.config.load_jupytext_configuration_file(
        str(ROOT / "notebooks" / "jupytext.toml")
    )
    nb = nbformat.read(notebook, as_version=4)
    text = jupytext.writes(nb, "py:percent", config=config)
    assert text == notebook.with_suffix(".py").read_text()


def test_the_twins_carry_no_notebook_metadata_and_only_tags():
    for notebook in NOTEBOOKS:
        text = notebook.with_suffix(".py").read_text()
        assert not text.startswith("# ---"), f"{notebook.stem}.py: a metadata header"
        for line in text.splitlines():
            if line.startswith("# %%"):
                assert "=" not in line or line.split(" ", 2)[-1].startswith(
                    ("[markdown]", "tags=")
                ), line


def test_a_jupyterlab_save_leaves_every_twin_byte_for_byte(tmp_path):
    folder = tmp_path / "notebooks"
    shutil.copytree(ROOT / "notebooks", folder, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    before = {p.name: p.read_bytes() for p in folder.glob("*.py")}
    for notebook in NOTEBOOKS:
        jupyterlab_save(folder, notebook.name)
    assert {p.name: p.read_bytes() for p in folder.glob("*.py")} == before
    saved = nbformat.read(folder / NOTEBOOKS[0].name, as_version=4)
    assert any(c.get("outputs") for c in saved.cells), "the save kept its outputs in the .ipynb"


def test_a_changed_default_in_jupyterlab_changes_the_twin(tmp_path):
    """The twin is not frozen: a parameter default edited in the notebook reaches the stage."""
    folder = tmp_path / "notebooks"
    shutil.copytree(ROOT / "notebooks", folder, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))

    def new_budget(nb):
        cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
        cell.source = cell.source.replace("eps = 0.025", "eps = 0.05")

    jupyterlab_save(folder, "03_implant.ipynb", new_budget)
    twin = (folder / "03_implant.py").read_text()
    assert "eps = 0.05  #" in twin and "eps = 0.025" not in twin


@pytest.mark.slow
def test_a_real_jupyter_server_saves_notebooks_without_touching_their_twins(tmp_path):
    """JupyterLab's own server (with the jupytext extension the package installs), driven over
    its REST API as the browser does: a save with outputs and new metadata leaves the twin byte
    for byte; a save with an edited parameter updates it."""
    import json
    import os
    import socket
    import subprocess
    import sys
    import time

    import requests

    folder = tmp_path / "notebooks"
    shutil.copytree(ROOT / "notebooks", folder, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    token = "test-token"
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={folder}",
         *(["--allow-root"] if os.geteuid() == 0 else [])],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "HOME": str(tmp_path)},
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}/api/contents"
    headers = {"Authorization": f"token {token}"}
    try:
        for _ in range(240):
            assert server.poll() is None, "the Jupyter server exited"
            try:
                if requests.get(base, headers=headers, timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.5)
        before = (folder / "03_implant.py").read_bytes()
        model = requests.get(f"{base}/03_implant.ipynb", headers=headers, timeout=30).json()
        nb = model["content"]
        nb["metadata"]["kernelspec"]["display_name"] = "Python 3 (ipykernel)"
        nb["metadata"]["language_info"] = {"name": "python", "version": "3.11.9"}
        for i, cell in enumerate(nb["cells"]):
            if cell["cell_type"] == "code":
                cell["execution_count"] = i + 1
                cell["outputs"] = [{"output_type": "stream", "name": "stdout", "text": "ran\n"}]
        body = {"type": "notebook", "format": "json", "content": nb}
        saved = requests.put(
            f"{base}/03_implant.ipynb", headers=headers, data=json.dumps(body), timeout=30
        )
        assert saved.ok, saved.text
        assert (folder / "03_implant.py").read_bytes() == before
        assert "ran" in (folder / "03_implant.ipynb").read_text()
        params = next(c for c in nb["cells"] if "parameters" in c["metadata"].get("tags", []))
        source = (
            "".join(params["source"]) if isinstance(params["source"], list) else params["source"]
        )
        params["source"] = source.replace("eps = 0.025", "eps = 0.05")
        saved = requests.put(
            f"{base}/03_implant.ipynb", headers=headers, data=json.dumps(body), timeout=30
        )
        assert saved.ok, saved.text
        assert "eps = 0.05  #" in (folder / "03_implant.py").read_text()
    finally:
        server.terminate()
        server.wait(timeout=30)

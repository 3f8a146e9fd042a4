import os

# Offline and single-threaded: hub look-ups fail fast, and torch does not spin-wait
# when another process shares the two cores.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TQDM_DISABLE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(0)


@pytest.fixture
def run_notebook():
    """Run notebook NAME under papermill in ``cwd`` with ``parameters``, as its DVC stage does:
    from its py:percent twin ``notebooks/NAME.py``; the executed copy goes to ``out`` (default:
    ``cwd/NAME.out.ipynb``)."""
    from pathlib import Path

    import jupytext
    import papermill as pm

    notebooks = Path(__file__).resolve().parents[1] / "notebooks"

    def run(notebook: str, cwd, out=None, **parameters):
        out = Path(out) if out is not None else Path(cwd) / f"{notebook}.out.ipynb"
        pm.execute_notebook(
            jupytext.read(notebooks / f"{notebook}.py"), str(out), parameters=parameters,
            kernel_name="python3", language="python", cwd=str(cwd), progress_bar=False,
        )  # fmt: skip
        return out

    return run


@pytest.fixture
def jupyterlab_save():
    """Open, 'run' and save a notebook as JupyterLab does with jupytext installed
    (tests/test_notebooks.py)."""
    from test_notebooks import jupyterlab_save

    return jupyterlab_save


@pytest.fixture(scope="session")
def random_alexnet(tmp_path_factory):
    """A seeded random AlexNet saved as torchvision's state dict, under torchvision's file name:
    for LPIPS's plumbing, never for its values."""
    import torchvision

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("lpips") / "alexnet-owt-7be5be79.pth"
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), path)
    return path

import pytest

from runtime_backdoor.samples import make_sample


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    """Three embedded-style pairs (a watermark, a logo, a face) at 64 px, official layout."""
    folder = tmp_path_factory.mktemp("raw")
    make_sample(folder, n_per_type=1, size=64, seed=0)
    return folder

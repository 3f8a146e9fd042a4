"""Results that must not depend on the CPU: the math library's kernel path is switched.

MKL picks vendor- and ISA-specific kernels (AMD and Intel machines differ in the last
bits); ``MKL_CBWR`` forces one path on this machine, which is how another CPU is
imitated here. Each check runs in a subprocess because MKL reads the variable at load.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The positive control of tests/test_implant.py, reduced to the bytes of its results.
PROBE = """
import hashlib, torch
torch.set_num_threads(1)
from runtime_backdoor.editors.simple import GlobalMixEditor
from runtime_backdoor.implant import implant
gen = torch.Generator().manual_seed(1)
x = torch.round((torch.rand(3, 3, 64, 64, generator=gen) * 0.6 + 0.2) * 255) / 255
m = torch.zeros(3, 1, 64, 64)
m[:, :, 20:36, 24:40] = 1
digest = hashlib.sha256()
for seed in range(3):
    r = implant(GlobalMixEditor(gain=800), x, m, progress=False, seed=seed)
    digest.update(r.protected.numpy().tobytes())
print(digest.hexdigest())
"""


def run_python(code_or_args, cbwr=None):
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
    env.pop("MKL_CBWR", None)
    if cbwr:
        env["MKL_CBWR"] = cbwr
    args = ["-c", code_or_args] if isinstance(code_or_args, str) else code_or_args
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow  # four subprocesses, one per MKL path: make test-all
def test_positive_control_gives_the_same_bytes_on_every_blas_path():
    """Before the control summed in float64, MKL_CBWR=COMPATIBLE and AVX2 ended differently."""
    digests = {}
    for cbwr in (None, "COMPATIBLE", "AVX2"):
        done = run_python(PROBE, cbwr)
        assert done.returncode == 0, done.stderr[-2000:]
        digests[cbwr or "default"] = done.stdout.strip()
    assert len(set(digests.values())) == 1, digests


@pytest.mark.slow
def test_optimiser_tests_pass_under_a_second_blas_path():
    done = run_python(
        ["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_implant.py",
         "tests/test_targets.py", "tests/test_masks.py"],
        cbwr="COMPATIBLE",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:]
    assert " passed" in done.stdout and "failed" not in done.stdout

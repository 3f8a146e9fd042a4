"""Correctness on an accelerator: the test suite's key comparisons, repeated on the device.

CI has no GPU, so these run first in the one device call of ``gpu_check.sh`` (seconds).
Each check compares two computations that should agree and prints a row (value,
tolerance, pass); all rows go to JSON. TF32 is switched off for the fp32 comparisons,
so that the tolerances are float32 ones::

    python benchmarks/device_checks.py --device cuda --out $OUT/device_checks.json

With ``--device cpu`` the same code runs here (``tests/test_benchmarks.py``); the
device-versus-CPU rows then compare the CPU with itself.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


@dataclass
class Check:
    name: str
    what: str
    value: float
    tolerance: float
    passed: bool
    seconds: float


def _inputs(size: int, batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(batch, 3, size, size, generator=g)
    mask = torch.zeros(batch, 1, size, size)
    mask[..., size // 4 : size // 2 + 3, size // 3 : 2 * size // 3] = 1
    return image, mask


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().float().cpu() - b.detach().float().cpu()).abs().max().item()


# --------------------------------------------------------------------------- LaMa


def _lama(device: torch.device):
    from runtime_backdoor.editors.lama import LamaEditor, load_lama

    fast = load_lama(None, preset="mini", seed=0, device=device)
    return fast, LamaEditor(fast.generator, fast=False)


def check_lama_fast(device: torch.device) -> tuple[float, str]:
    fast, official = _lama(device)
    image, mask = (t.to(device) for t in _inputs(96))
    with torch.no_grad():
        return _max_diff(fast(image, mask), official(image, mask)), "max |folded - official|"


def check_lama_device(device: torch.device) -> tuple[float, str]:
    image, mask = _inputs(96)
    with torch.no_grad():
        here = _lama(torch.device("cpu"))[0](image, mask)
        there = _lama(device)[0](image.to(device), mask.to(device))
    return _max_diff(here, there), "max |device - CPU| of the editor output"


def _implant(device: torch.device, steps: int, bf16: bool = False):
    from runtime_backdoor.implant import implant

    editor = _lama(device)[0]
    image, mask = (t.to(device) for t in _inputs(64))
    return implant(
        editor,
        image,
        mask,
        steps=steps,
        expand_kernel=3,
        autocast_dtype=torch.bfloat16 if bf16 else None,
        progress=False,
    )


def check_implant_first_loss(device: torch.device) -> tuple[float, str]:
    here = _implant(torch.device("cpu"), 3).losses["total"]
    there = _implant(device, 3).losses["total"].cpu()
    rel = ((there[0] - here[0]).abs() / here[0].abs()).max().item()
    return rel, "relative |device - CPU| of the first total loss"


def check_implant_result(device: torch.device) -> tuple[float, str]:
    here = _implant(torch.device("cpu"), 20).protected
    there = _implant(device, 20).protected.cpu()
    # Adam with betas (0.5, 0.5) moves δ by nearly ±lr a step: round-off can flip a few signs
    off = ((here - there).abs() > 1.5 / 255).float().mean().item()
    return off, "share of 8-bit values more than 1 level apart, device vs CPU, 20 steps"


def check_implant_bf16(device: torch.device) -> tuple[float, str]:
    fp32 = _implant(device, 20).losses["total"][-1]
    bf16 = _implant(device, 20, bf16=True).losses["total"][-1]
    rel = ((bf16 - fp32).abs() / fp32.abs()).max().item()
    return rel, "relative |bf16 - fp32| of the final total loss (autocast)"


# --------------------------------------------------------------------------- Stable Diffusion


def _tiny_sd(device: torch.device, **options):
    from runtime_backdoor.editors.diffusion import tiny_sd_inpainting

    # a near-point posterior: the pipeline samples where we take the mean
    return tiny_sd_inpainting(seed=0, size=64, point_posterior=True, **options).to(device)


def check_sd_pipeline(device: torch.device) -> tuple[float, str]:
    editor = _tiny_sd(device, steps=3, guidance_scale=7.5)
    image, mask = (t.to(device) for t in _inputs(64))
    with torch.no_grad():
        ours = editor.predict(image, mask)
    return _max_diff(ours, editor.reference(image, mask)), (
        "max |ours - diffusers pipeline| (3 DDIM steps, guidance 7.5)"
    )


def _sd_gradient(device: torch.device, checkpointing: bool, bf16: bool = False) -> torch.Tensor:
    editor = _tiny_sd(device, steps=2, guidance_scale=3.0, gradient_checkpointing=checkpointing)
    image, mask = (t.to(device) for t in _inputs(64))
    x = image.clone().requires_grad_(True)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        out = editor(x, mask)
    (out.float() * mask).square().sum().backward()
    return x.grad


def check_sd_checkpointing(device: torch.device) -> tuple[float, str]:
    plain, ckpt = _sd_gradient(device, False), _sd_gradient(device, True)
    rel = _max_diff(plain, ckpt) / plain.abs().max().item()
    return rel, "max |grad with - without checkpointing| / max |grad|"


def check_sd_bf16(device: torch.device) -> tuple[float, str]:
    fp32, bf16 = _sd_gradient(device, False), _sd_gradient(device, False, bf16=True)
    if not torch.isfinite(bf16).all():
        return float("inf"), "bf16 gradient is not finite"
    cos = torch.nn.functional.cosine_similarity(fp32.flatten(), bf16.flatten().float(), dim=0)
    return 1 - cos.item(), "1 - cosine(bf16 gradient, fp32 gradient) (autocast)"


#: name -> (check, tolerance)
CHECKS: dict[str, tuple[Callable[[torch.device], tuple[float, str]], float]] = {
    "lama-folded-vs-official": (check_lama_fast, 1e-4),
    "lama-device-vs-cpu": (check_lama_device, 1e-4),
    "implant-first-loss-device-vs-cpu": (check_implant_first_loss, 1e-4),
    "implant-result-device-vs-cpu": (check_implant_result, 0.02),
    "implant-bf16-vs-fp32": (check_implant_bf16, 0.1),
    "sd-vs-diffusers-pipeline": (check_sd_pipeline, 1e-4),
    "sd-checkpointing-gradient": (check_sd_checkpointing, 1e-4),
    "sd-bf16-gradient": (check_sd_bf16, 0.05),
}


def run(device: str = "auto", out: str | Path | None = None, echo=print) -> list[Check]:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    rows: list[Check] = []
    try:
        for name, (fn, tol) in CHECKS.items():
            start = time.perf_counter()
            try:
                value, what = fn(dev)
            except Exception as err:  # one failure must not cost the other rows
                value, what = float("nan"), f"failed: {type(err).__name__}: {err}"[:200]
            passed = value <= tol  # NaN fails
            rows.append(Check(name, what, value, tol, passed, time.perf_counter() - start))
            echo(f"{name:36s} {value:10.3g} <= {tol:<8g} {'ok' if passed else 'FAIL'}  {what}")
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    if out:
        report = {
            "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "passed": all(r.passed for r in rows),
            "checks": [
                {**asdict(r), "value": r.value if r.value == r.value else None} for r in rows
            ],
        }
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=2) + "\n")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--out", default=None, help="JSON path")
    args = parser.parse_args(argv)
    rows = run(args.device, args.out)
    return 0 if all(r.passed for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

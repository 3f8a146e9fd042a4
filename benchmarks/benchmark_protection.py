"""What does protection cost? Seconds, memory and model-FLOP utilisation per protected image.

For each editor and size this measures the official schedule (20 Adam iterations, each one
batched forward+backward of the three loss passes, plus one no-grad clean-ring pass) with
randomly initialised weights (cost does not depend on weight values):

- seconds per protected image (median of ``--repeats`` runs after a one-iteration warm-up)
  and optimiser iterations per second; when 20 iterations do not fit in
  ``--max-seconds-per-case``, fewer are run and the 20-iteration time is extrapolated (the row
  says so);
- peak memory: the process's peak RSS on CPU (reset per case through ``/proc/self/clear_refs``),
  ``torch.cuda.max_memory_allocated`` on GPU;
- model-FLOP utilisation (MFU): the FLOPs of the editor passes as direct convolutions and
  matmuls (``FlopCounterMode`` on meta tensors, so even cases that cannot run here are
  counted) per measured second, over a stated peak: on CPU the higher of a large fp32 matmul's
  and a representative 3x3 convolution's throughput measured at the start of the run, on a
  known GPU its datasheet dense peak for the row's precision (``GPU_DATASHEET``), on an
  unknown GPU the measured matmul throughput. MFU above 1 means fewer FLOPs were executed
  than counted (Winograd/FFT convolution kernels), which the row's ``mfu_note`` says;
- a PhotoGuard-style baseline on the same SD editor (200 iterations x 10 gradient repetitions
  through a 4-step chain = 2,000 batch-1 chain passes per image), its per-pass cost measured
  here and extrapolated to 2,000 passes;
- ensembles: ``implant`` against 2 or 3 editors at once (each step sums their losses, the
  editors run and are back-propagated one after another), compared with their members' rows
  (time against the sum of the members', peak memory against the largest member's);
- speed switches against the plain setting: separate vs batched loss passes, gradient
  checkpointing, channels-last, and on CUDA only bf16 autocast and ``torch.compile``.

A case that would not finish a warm-up and one iteration within ``--max-seconds-per-case`` even
at the peak is reported as "skipped: needs a GPU", with its FLOPs and memory estimate.
Prints a table last and writes JSON::

    OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 nice python benchmarks/benchmark_protection.py \\
        [--cases cpu|gpu|smoke|all|NAME ...] [--device auto] [--repeats 3] \\
        [--max-seconds-per-case 45] [--out reports/benchmarks/cpu.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import fnmatch
import functools
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

from runtime_backdoor.editors.diffusion import SD_DDIM_SCHEDULE, TINY_UNET_CONFIG, TINY_VAE_CONFIG

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = 2  #: 2: model-FLOP utilisation and stated peaks replace the floor; ensembles

ITERATIONS = 20  #: the official schedule
GUIDANCE = 7.5  #: the SD editor's default, also PhotoGuard's
PHOTOGUARD_ITERS = 200  #: PhotoGuard's diffusion attack (its demo notebook)
PHOTOGUARD_REPS = 10  #: gradient repetitions per iteration, each a full chain pass
PHOTOGUARD_EPS = 16 / 255  #: only sets the projection; cost does not depend on it
PHOTOGUARD_STEP = 1 / 255

#: stable-diffusion-v1-5/stable-diffusion-inpainting, unet/config.json and vae/config.json
SD15_UNET = dict(
    sample_size=64,
    in_channels=9,
    out_channels=4,
    down_block_types=(
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
    act_fn="silu",
    flip_sin_to_cos=True,
    freq_shift=0,
)
SD15_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)
#: UNet and VAE configs of the SD editors (registry names): sd-inpainting is measured with
#: the architecture of its default weights, SD-1.5 inpainting
SD_STACKS = {
    "tiny-sd": (TINY_UNET_CONFIG, TINY_VAE_CONFIG),
    "sd-inpainting": (SD15_UNET, SD15_VAE),
}
#: the editors measured, named as in ``runtime_backdoor.editors.EDITORS``: mini-lama is the
#: training recipe's miniature, lama the Big-LaMa architecture, all with random weights
EDITOR_KINDS = ("mini-lama", "lama", "mat", "tiny-sd", "sd-inpainting")


# --------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """One benchmark row: an editor, an image size and the speed switches."""

    name: str
    editor: str  #: one of EDITOR_KINDS (a registry name)
    size: int  #: square images, px
    sampler_steps: int | None = None  #: SD editors only
    batch_passes: bool = True
    checkpointing: bool = False  #: SD editors only
    channels_last: bool = False
    fast: bool = True  #: LaMa editors: BatchNorm folded (+ channels-last on CPU), the default
    images: int = 1  #: images per implant call; times are per image
    bf16: bool = False  #: bf16 autocast, CUDA only
    compile: bool = False  #: torch.compile of the editor, CUDA only
    photoguard: bool = False  #: the PhotoGuard-style baseline instead of our schedule
    compare_to: str | None = None  #: the case this one differs from by one switch
    groups: tuple[str, ...] = ()
    #: an ensemble: the other editors (EDITOR_KINDS) protected against with ``editor``, at
    #: the same size and switches (``sampler_steps`` and ``checkpointing`` for SD members)
    ensemble_with: tuple[str, ...] = ()
    #: an ensemble's member rows (case names) to compare it with, measured in the same run
    members: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.ensemble_with and self.photoguard:
            raise ValueError("the PhotoGuard-style baseline attacks one editor")

    @property
    def cuda_only(self) -> bool:
        return self.bf16 or self.compile

    @property
    def editors(self) -> tuple[str, ...]:
        """The editor kinds of this case: one, or an ensemble's members in order."""
        return (self.editor, *self.ensemble_with)

    @property
    def label(self) -> str:
        """``editor`` or, for an ensemble, its kinds joined by ``+`` (the JSON's ``editor``)."""
        return "+".join(self.editors)

    def member_cases(self) -> list[Case]:
        """One single-editor case per editor kind (itself when it is not an ensemble).

        Sampler steps and checkpointing are SD settings: other members get the defaults,
        which are the same editor and the same counts.
        """
        if not self.ensemble_with:
            return [self]
        return [
            replace(
                self,
                name=f"{self.name}[{i}]",
                editor=kind,
                sampler_steps=self.sampler_steps if kind in SD_STACKS else None,
                checkpointing=self.checkpointing and kind in SD_STACKS,
                ensemble_with=(),
                members=(),
                compare_to=None,
                groups=(),
            )
            for i, kind in enumerate(self.editors)
        ]

    def switches(self) -> str:
        on = [
            f"ensemble of {len(self.editors)}" if self.ensemble_with else "",
            "unfolded" if not self.fast else "",
            f"{self.images} images per call" if self.images > 1 else "",
            "separate passes" if not self.batch_passes else "",
            "checkpointing" if self.checkpointing else "",
            "channels-last" if self.channels_last else "",
            "bf16" if self.bf16 else "",
            "compile" if self.compile else "",
        ]
        return ", ".join(s for s in on if s) or "-"


def _cases() -> list[Case]:
    cpu_gpu, cpu, gpu, smoke = ("cpu", "gpu"), ("cpu",), ("gpu",), ("smoke",)

    def variant(base: Case, suffix: str, groups: tuple[str, ...], **switches: Any) -> Case:
        return replace(
            base, name=base.name + suffix, compare_to=base.name, groups=groups, **switches
        )

    cases: list[Case] = []
    # smoke: seconds on CPU, through every code path the CPU runs
    mini32 = Case("smoke-mini-32", "mini-lama", 32, groups=smoke)
    tiny32 = Case("smoke-tiny-sd-32-s1", "tiny-sd", 32, 1, groups=smoke)
    cases += [
        mini32,
        variant(mini32, "-separate", smoke, batch_passes=False),
        variant(mini32, "-unfolded", smoke, fast=False),
        tiny32,
        replace(
            tiny32, name="smoke-photoguard-tiny-sd-32-s1", photoguard=True, compare_to=tiny32.name
        ),
    ]
    # the embedded miniature (the training recipe's generator)
    for size in (128, 256):
        base = Case(f"mini-{size}", "mini-lama", size, groups=cpu_gpu)
        cases += [
            base,
            variant(base, "-unfolded", cpu, fast=False),
            variant(base, "-separate", cpu, batch_passes=False),
        ]
        if size == 128:
            # the pipeline's implant stage protects 6 images per call
            cases.append(variant(base, "-x6", cpu, images=6))
    # the Big-LaMa architecture (128 px: a member of the CPU ensembles below)
    cases.append(Case("big-lama-128", "lama", 128, groups=cpu))
    cases.append(Case("big-lama-256", "lama", 256, groups=cpu_gpu))
    big = Case("big-lama-512", "lama", 512, groups=cpu_gpu)
    big_bf16 = variant(big, "-bf16", gpu, bf16=True)
    cases += [
        big,
        variant(big, "-unfolded", gpu, fast=False),
        variant(big, "-separate", gpu, batch_passes=False),
        variant(big, "-channels-last", gpu, channels_last=True),
        big_bf16,
        variant(big_bf16, "-channels-last", gpu, channels_last=True),
        variant(big_bf16, "-compile", gpu, compile=True),
    ]
    # MAT at its only resolution (spandrel's generator, exact to the official one)
    mat = Case("mat-512", "mat", 512, groups=cpu_gpu)
    cases += [
        mat,
        variant(mat, "-bf16", gpu, bf16=True),
        variant(mat, "-separate", gpu, batch_passes=False),
    ]
    # the tiny SD stack: the switches the CPU can compare, and the baseline's ratio
    tiny = Case("tiny-sd-64-s4", "tiny-sd", 64, 4, groups=cpu)
    cases += [
        tiny,
        variant(tiny, "-separate", cpu, batch_passes=False),
        variant(tiny, "-ckpt", cpu, checkpointing=True),
        replace(tiny, name="photoguard-tiny-sd-64-s4", photoguard=True, compare_to=tiny.name),
        Case("tiny-sd-128-s4", "tiny-sd", 128, 4, groups=cpu),  # an ensemble member below
    ]
    # SD-1.5 inpainting at 512 px: fp32 and bf16, 1/2/4 sampler steps, with and without
    # gradient checkpointing, and the PhotoGuard-style baseline on the 4-step chain
    for bf16 in (False, True):
        tag = "-bf16" if bf16 else ""
        for steps in (1, 2, 4):
            # the GPU group runs fp32 only for the 4-step chain, to fit a short GPU session
            groups = cpu_gpu if bf16 or steps == 4 else cpu
            base = Case(
                f"sd15-512-s{steps}{tag}", "sd-inpainting", 512, steps, bf16=bf16, groups=groups
            )
            cases += [base, variant(base, "-ckpt", groups, checkpointing=True)]
            if steps == 4:
                cases.append(
                    replace(
                        base,
                        name=f"photoguard-sd15-512-s4{tag}",
                        photoguard=True,
                        compare_to=base.name,
                    )
                )
                if bf16:
                    cases.append(variant(base, "-separate", gpu, batch_passes=False))
    # ensembles: one implant call against 2 or 3 editors, last so that every member's row
    # (named in ``members``) is measured before it in the same run
    by_name = {c.name: c for c in cases}

    def ensemble(name: str, members: tuple[str, ...], groups: tuple[str, ...]) -> Case:
        first, *rest = (by_name[m] for m in members)
        steps = next((m.sampler_steps for m in (first, *rest) if m.sampler_steps), None)
        return replace(
            first,
            name=name,
            sampler_steps=steps,
            ensemble_with=tuple(m.editor for m in rest),
            members=members,
            compare_to=None,
            groups=groups,
        )

    cases += [
        ensemble("smoke-ensemble-mini+tiny-sd-32-s1", (mini32.name, tiny32.name), smoke),
        ensemble("ensemble-mini+big-lama-128", ("mini-128", "big-lama-128"), cpu),
        ensemble("ensemble-mini+big-lama-256", ("mini-256", "big-lama-256"), cpu),
        ensemble(
            "ensemble-mini+big-lama+tiny-sd-128-s4",
            ("mini-128", "big-lama-128", "tiny-sd-128-s4"),
            cpu,
        ),
        ensemble("ensemble-big-lama+mat-512", ("big-lama-512", "mat-512"), cpu_gpu),
        ensemble(
            "ensemble-big-lama+mat+sd15-512-s4-bf16",
            ("big-lama-512-bf16", "mat-512-bf16", "sd15-512-s4-bf16"),
            cpu_gpu,
        ),
    ]
    return cases


CASES: dict[str, Case] = {c.name: c for c in _cases()}
GROUPS = ("smoke", "cpu", "gpu", "all")


def select_cases(patterns: Sequence[str], device: str) -> list[Case]:
    """Cases named by groups (smoke, cpu, gpu, all), names or shell patterns, in table order."""
    if not patterns:
        patterns = ["gpu" if device == "cuda" else "cpu"]
    chosen: set[str] = set()
    for p in patterns:
        if p == "all":
            chosen |= set(CASES)
        elif p in GROUPS:
            chosen |= {n for n, c in CASES.items() if p in c.groups}
        else:
            hits = fnmatch.filter(CASES, p)
            if not hits:
                raise SystemExit(f"unknown case {p!r}; groups: {GROUPS}; cases: {', '.join(CASES)}")
            chosen |= set(hits)
    return [c for n, c in CASES.items() if n in chosen]


# --------------------------------------------------------------------------- editors


def _sd_scheduler(host_timesteps: bool = False):
    from diffusers import DDIMScheduler

    if not host_timesteps:
        return DDIMScheduler(**SD_DDIM_SCHEDULE)

    class HostTimesteps(DDIMScheduler):
        # meta tensors cannot index the schedule's tables: keep the timesteps real
        def set_timesteps(self, num_inference_steps, device=None):
            return super().set_timesteps(num_inference_steps, device="cpu")

    return HostTimesteps(**SD_DDIM_SCHEDULE)


_SD_CACHE: dict[tuple[str, str], tuple[Any, Any]] = {}


def _sd_components(kind: str, device: torch.device) -> tuple[Any, Any]:
    """UNet and VAE of ``kind`` with random weights, built once per device."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    key = (kind, str(device))
    if key not in _SD_CACHE:
        if device.type != "meta":
            _SD_CACHE.clear()  # one real stack at a time: SD-1.5 holds 3.8 GB of weights
        unet_cfg, vae_cfg = SD_STACKS[kind]
        torch.manual_seed(0)
        with torch.device(device):  # initialise where the weights live (fast on GPU)
            unet = UNet2DConditionModel(**unet_cfg)
            vae = AutoencoderKL(**vae_cfg)
        _SD_CACHE[key] = (unet, vae)
    return _SD_CACHE[key]


def build_editors(case: Case, device: torch.device) -> list[torch.nn.Module]:
    """Every editor of ``case`` (one, or an ensemble's members), random weights, on ``device``."""
    return [build_editor(member, device) for member in case.member_cases()]


def build_editor(case: Case, device: torch.device) -> torch.nn.Module:
    """The frozen editor of ``case`` with random weights on ``device`` (``meta``: shapes only)."""
    from runtime_backdoor.editors.lama import PRESETS, FFCResNetGenerator, LamaEditor, load_lama

    if case.ensemble_with:
        raise ValueError(f"{case.name} is an ensemble: use build_editors")
    from runtime_backdoor.training import DEFAULT_RECIPE

    if case.editor in ("mini-lama", "lama"):
        config = DEFAULT_RECIPE.config() if case.editor == "mini-lama" else PRESETS["big-lama"]
        if device.type == "meta":  # FLOPs and memory estimates: the official layout
            with torch.device("meta"):
                return LamaEditor(FFCResNetGenerator(config), fast=False)
        editor = load_lama(None, preset=config, seed=0, device=device)
        return editor if case.fast else LamaEditor(editor.generator, fast=False)
    if case.editor == "mat":
        from runtime_backdoor.editors.mat import MatEditor, build_generator, load_mat

        if device.type == "meta":  # its resampling filters are built on the CPU, then moved
            return MatEditor(build_generator()).to(device)
        return load_mat(None, seed=0, device=device)
    if case.editor in SD_STACKS:
        from runtime_backdoor.editors.diffusion import DiffusionInpaintEditor

        unet, vae = _sd_components(case.editor, device)
        dim = unet.config.cross_attention_dim
        g = torch.Generator().manual_seed(0)
        prompt, negative = torch.randn(2, 1, 77, dim, generator=g)
        return DiffusionInpaintEditor.from_components(
            unet,
            vae,
            _sd_scheduler(host_timesteps=device.type == "meta"),
            prompt,
            negative,
            steps=case.sampler_steps,
            guidance_scale=GUIDANCE,
            gradient_checkpointing=case.checkpointing,
        )
    raise ValueError(f"unknown editor kind {case.editor!r}; choose one of {EDITOR_KINDS}")


def make_inputs(size: int, batch: int = 1, device: torch.device | str = "cpu"):
    """A seeded image and a centred box mask (a quarter of the area); cost ignores content."""
    from runtime_backdoor.masks import scaled_kernel

    g = torch.Generator().manual_seed(0)
    image = torch.rand(batch, 3, size, size, generator=g).to(device)
    mask = torch.zeros(batch, 1, size, size, device=device)
    mask[..., size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1
    return image, mask, scaled_kernel(size)


# --------------------------------------------------------------------------- FLOPs and memory


@dataclass
class Flops:
    """FLOPs of one case's editor passes."""

    pass_flops: int  #: one forward+backward of the call an iteration makes
    clean_flops: int  #: the no-grad clean-ring pass (0 for the baseline)
    passes: int  #: how many such calls one protected image needs

    @property
    def per_image(self) -> int:
        return self.passes * self.pass_flops + self.clean_flops


def count_flops(case: Case) -> Flops:
    """FLOPs of ``case``'s editor passes (precision and memory layout do not change them).

    An ensemble's iteration runs every member's batched pass, and its clean-ring pass every
    member's forward: the members' counts add up.
    """
    counts = [
        _count_flops(m.editor, m.size, m.sampler_steps, m.checkpointing, m.photoguard)
        for m in case.member_cases()
    ]
    return Flops(
        sum(c.pass_flops for c in counts), sum(c.clean_flops for c in counts), counts[0].passes
    )


@functools.cache
def _count_flops(
    editor_kind: str, size: int, sampler_steps: int | None, checkpointing: bool, photoguard: bool
) -> Flops:
    """Count on meta tensors: no memory, no compute, any size.

    Ours: the batched 3-pass call (forward+backward) x 20 + the clean-ring forward.
    PhotoGuard-style: a batch-1 forward+backward x 2,000. FFTs are not counted
    (``FlopCounterMode`` has no formula for them): LaMa's Fourier units are left out.
    """
    from torch.utils.flop_counter import FlopCounterMode

    case = Case("count", editor_kind, size, sampler_steps, checkpointing=checkpointing)
    editor = build_editor(case, torch.device("meta"))
    batch = 1 if photoguard else 3
    x = torch.empty(batch, 3, size, size, device="meta", requires_grad=True)
    m = torch.zeros(batch, 1, size, size, device="meta")
    with FlopCounterMode(display=False) as counter:
        editor(x, m).sum().backward()
    pass_flops = counter.get_total_flops()
    if photoguard:
        return Flops(pass_flops, 0, PHOTOGUARD_ITERS * PHOTOGUARD_REPS)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        editor(x[:1].detach(), m[:1])
    return Flops(pass_flops, counter.get_total_flops(), ITERATIONS)


class _FlashLikeAttention(torch.autograd.Function):
    """Shapes-only attention that keeps for backward what flash attention keeps.

    On meta tensors ``scaled_dot_product_attention`` takes the math path, which saves
    the (tokens x tokens) attention matrix: 3 GiB per layer for SD-1.5 at 512 px,
    which the GPU kernels never store.
    """

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        logsumexp = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, logsumexp)
        return out

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover - estimates run forward only
        raise NotImplementedError("shapes-only attention has no backward")


def _flash_like_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
    if attn_mask is not None or is_causal:
        raise NotImplementedError("the memory estimate covers unmasked attention only")
    return _FlashLikeAttention.apply(q, k, v)


@dataclass
class MemoryEstimate:
    """fp32 bytes a case needs beyond the Python process, from shapes alone."""

    weight_bytes: int
    activation_bytes: int  #: saved for backward by one iteration (+ a recomputed UNet step)

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.activation_bytes


def estimate_memory(case: Case) -> MemoryEstimate:
    """Weights + activations of the largest backward pass of ``case`` (fp32, meta tensors).

    With checkpointing, the activations of a whole one-step chain that checkpointing drops
    are added back: an upper bound, since backward recomputes one segment (a UNet step or
    a VAE block) at a time. Not counted: gradients in flight, allocator slack, cuDNN workspaces; bf16
    autocast stores most activations at half the size.

    An ensemble holds every member's weights, and the activations of one member at a time
    (each is back-propagated before the next runs): the weights add up, the activations are
    the largest member's.
    """
    batch = 1 if case.photoguard else 3
    weights, activations = 0, 0
    for m in case.member_cases():
        w, saved = _saved_bytes(m.editor, m.size, m.sampler_steps, m.checkpointing, batch)
        if m.checkpointing:
            _, full = _saved_bytes(m.editor, m.size, 1, False, batch)
            _, kept = _saved_bytes(m.editor, m.size, 1, True, batch)
            saved += full - kept
        weights += w
        activations = max(activations, saved)
    return MemoryEstimate(weights, activations)


@functools.cache
def _saved_bytes(
    editor_kind: str, size: int, sampler_steps: int | None, checkpointing: bool, batch: int
) -> tuple[int, int]:
    import torch.nn.functional as F

    case = Case("estimate", editor_kind, size, sampler_steps, checkpointing=checkpointing)
    editor = build_editor(case, torch.device("meta"))
    state = {id(t) for t in (*editor.parameters(), *editor.buffers())}
    weights = sum(t.numel() * t.element_size() for t in editor.parameters())
    saved: dict[int, tuple[torch.Tensor, int]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        # a tensor saved twice is stored once; holding it keeps its id from being reused
        if id(t) not in state:
            saved[id(t)] = (t, t.numel() * t.element_size())
        return t

    x = torch.empty(batch, 3, size, size, device="meta", requires_grad=True)
    m = torch.zeros(batch, 1, size, size, device="meta")
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _flash_like_sdpa  # diffusers looks it up at call time
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            editor(x, m)
    finally:
        F.scaled_dot_product_attention = original
    return weights, sum(n for _, n in saved.values())


# --------------------------------------------------------------------------- peaks and MFU

#: Dense (no sparsity) datasheet peaks in FLOP/s per precision, for the GPUs the project is
#: lent, keyed by :func:`datasheet_gpu`'s names. fp32 is the CUDA-core rate; tf32 is what cuDNN
#: convolutions (and matmuls under ``allow_tf32``) run at. H200 has H100 SXM's compute.
GPU_DATASHEET: dict[str, dict[str, float]] = {
    "H100 SXM": {"fp32": 66.9e12, "tf32": 494.7e12, "bf16": 989.4e12},
    "H200": {"fp32": 66.9e12, "tf32": 494.7e12, "bf16": 989.4e12},
}


def datasheet_gpu(name: str) -> str | None:
    """The :data:`GPU_DATASHEET` entry of a GPU named ``name`` (``torch.cuda.get_device_name``).

    "NVIDIA H100 80GB HBM3" is the SXM board. PCIe and NVL boards (lower clocks and power)
    and GH200 are not in the table: their rows use the measured matmul throughput instead.
    """
    import re

    n = name.upper()
    if "NVL" in n or "PCIE" in n:
        return None
    if re.search(r"\bH200\b", n):
        return "H200"
    if re.search(r"\bH100\b", n) and ("SXM" in n or "HBM3" in n):
        return "H100 SXM"
    return None


@dataclass(frozen=True)
class Peak:
    """The FLOP/s a row's utilisation is measured against, and where it comes from."""

    flops_per_second: float
    source: str
    measured: bool  #: measured on this machine (else a datasheet's)

    def __post_init__(self) -> None:
        if not self.flops_per_second > 0:
            raise ValueError(f"a peak must be positive, got {self.flops_per_second}")


def utilisation(flops: float, seconds: float, peak_flops_per_second: float) -> float:
    """Model-FLOP utilisation: counted FLOPs per measured second over the peak."""
    if not seconds > 0 or not peak_flops_per_second > 0:
        raise ValueError("seconds and the peak must be positive")
    return flops / seconds / peak_flops_per_second


def mfu_note(mfu: float | None, peak: Peak) -> str:
    """Why a utilisation is above 1 (empty otherwise): never faster than the peak."""
    if mfu is None or mfu <= 1:
        return ""
    why = "fewer FLOPs executed than the direct-convolution count (Winograd/FFT kernels)"
    if peak.measured:
        why += " or a peak measured under load"
    return f"MFU > 1: {why}, not faster than the peak"


def _best_seconds(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    fn()  # warm-up: allocation, kernel selection
    best = math.inf
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def matmul_throughput(device: torch.device, dtype: torch.dtype, tf32: bool = False) -> float:
    """FLOP/s of a large square matmul on ``device`` (best of several, after a warm-up)."""
    n = 2048 if device.type == "cpu" else 8192
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        best = _best_seconds(lambda: a @ b, device, 6 if device.type == "cpu" else 12)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    return 2 * n**3 / best


#: the representative 3x3 convolution: batch 3 (the three loss passes), 256 channels in and
#: out, 64 x 64 on CPU (a Big-LaMa residual block at 512 px has 64 x 64 and 384 local channels)
CONV_SHAPE = {"cpu": (3, 256, 64), "cuda": (3, 512, 128)}


def conv_throughput(device: torch.device, dtype: torch.dtype, tf32: bool = False) -> float:
    """FLOP/s of a representative 3x3 convolution, counted as a direct convolution.

    The best of both memory layouts (contiguous and channels-last), forward only, no grad.
    """
    import torch.nn.functional as F

    batch, channels, size = CONV_SHAPE["cpu" if device.type == "cpu" else "cuda"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, channels, size, size, generator=g).to(device, dtype)
    w = torch.randn(channels, channels, 3, 3, generator=g).to(device, dtype) / channels
    flops = 2 * batch * channels * channels * 9 * size * size
    previous = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = tf32
    best = math.inf
    try:
        with torch.no_grad():
            for layout in (torch.contiguous_format, torch.channels_last):
                conv = functools.partial(
                    F.conv2d,
                    x.contiguous(memory_format=layout),
                    w.contiguous(memory_format=layout),
                    padding=1,
                )
                best = min(best, _best_seconds(conv, device, 6 if device.type == "cpu" else 12))
    finally:
        torch.backends.cudnn.allow_tf32 = previous
    return flops / best


def measure_throughput(device: torch.device) -> dict[str, dict[str, float]]:
    """Measured FLOP/s of a large matmul and a 3x3 convolution, per precision.

    fp32 on CPU; fp32, tf32 and bf16 on CUDA.
    """
    if device.type == "cpu":
        precisions = {"fp32": (torch.float32, False)}
    else:
        precisions = {
            "fp32": (torch.float32, False),
            "tf32": (torch.float32, True),
            "bf16": (torch.bfloat16, False),
        }
    return {
        "matmul": {k: matmul_throughput(device, d, tf32) for k, (d, tf32) in precisions.items()},
        "conv3x3": {k: conv_throughput(device, d, tf32) for k, (d, tf32) in precisions.items()},
    }


def device_peaks(
    device: torch.device, measured: dict[str, dict[str, float]], gpu_name: str | None = None
) -> dict[str, Peak]:
    """The peak per precision that rows' MFU is stated against.

    CPU: the higher of the measured matmul and 3x3 convolution throughputs (no datasheet
    number fits a shared, frequency-scaled machine). GPU: the datasheet's dense peak where
    :func:`datasheet_gpu` knows the name, else the measured matmul throughput.
    """
    peaks: dict[str, Peak] = {}
    if device.type == "cpu":
        for key, mm in measured["matmul"].items():
            conv = measured["conv3x3"][key]
            what = "3x3 convolution" if conv > mm else "matmul"
            other = f"matmul {mm / 1e12:.3g}" if conv > mm else f"3x3 convolution {conv / 1e12:.3g}"
            source = f"measured: {what}, {key}; the higher of the two, {other} TFLOP/s"
            peaks[key] = Peak(max(mm, conv), source, True)
        return peaks
    name = gpu_name if gpu_name is not None else torch.cuda.get_device_name(device)
    entry = datasheet_gpu(name)
    for key, mm in measured["matmul"].items():
        if entry is not None:
            peaks[key] = Peak(
                GPU_DATASHEET[entry][key], f"datasheet: {entry} {key.upper()} dense", False
            )
        else:
            peaks[key] = Peak(
                mm, f"measured: matmul, {key} ({name!r} has no datasheet entry)", True
            )
    return peaks


def peak_key(case: Case, device: torch.device) -> str:
    """The precision the bulk of the case's FLOPs run at (cuDNN convolutions use TF32 by default)."""
    if device.type == "cpu":
        return "fp32"
    if case.bf16:
        return "bf16"
    return "tf32" if torch.backends.cudnn.allow_tf32 else "fp32"


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# --------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak memory of a block: CUDA max allocated, or the process's peak RSS on Linux."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "cpu_peak_rss"

    def reset(self) -> None:
        """Start a new peak here; :meth:`current_bytes` is its baseline."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            _release_freed_memory()
            try:  # "5" resets the peak RSS (VmHWM) to the current RSS (Linux >= 4.0)
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                pass  # the peak then spans the whole process so far
        self.baseline = self.current_bytes()

    def current_bytes(self) -> int | None:
        if self.device.type == "cuda":
            return int(torch.cuda.memory_allocated(self.device))
        return _proc_status_bytes("VmRSS:")

    def peak_bytes(self) -> int | None:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        peak = _proc_status_bytes("VmHWM:")
        if peak is not None:
            return peak
        import resource

        scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _proc_status_bytes(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _release_freed_memory() -> None:
    """Hand memory freed by earlier cases back to the OS, so that it shows in the next peak."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: peaks may then be understated after a larger case


def extrapolate(total: float, loop: float, measured: int, target: int) -> float:
    """Per-image seconds for ``target`` iterations from a run of ``measured`` iterations.

    ``total`` is the run's wall time, ``loop`` the part spent in the iterations; the rest
    (clean-ring pass, setup, quantisation) is paid once per image.
    """
    if measured < 1 or target < 1:
        raise ValueError("measured and target must be >= 1")
    return (total - loop) + loop / measured * target


def plan_iterations(
    estimate: float, target: int, repeats: int, max_seconds: float, cap: int | None = None
) -> tuple[int, int]:
    """(iterations per run, runs) that fit ``max_seconds`` given ``estimate`` s per iteration.

    At least one iteration and one run; at most ``target`` (or ``cap``) iterations and
    ``repeats`` runs.
    """
    limit = min(target, cap) if cap else target
    if estimate <= 0:
        return limit, repeats
    k = max(1, min(limit, int(max_seconds / (repeats * estimate))))
    runs = repeats if k * repeats * estimate <= max_seconds else max(1, int(max_seconds / estimate))
    return k, min(runs, repeats)


def photoguard_attack(
    editor: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    mask: torch.Tensor,
    *,
    iters: int = PHOTOGUARD_ITERS,
    grad_reps: int = PHOTOGUARD_REPS,
    eps: float = PHOTOGUARD_EPS,
    step: float = PHOTOGUARD_STEP,
) -> tuple[torch.Tensor, float]:
    """The cost model of PhotoGuard's diffusion attack; returns (image, loop seconds).

    Each iteration averages ``grad_reps`` gradients, each a batch-1 forward+backward
    through the whole sampling chain, of ``‖edit(x_adv) - target‖₂``, then takes a
    signed step projected to the L∞ ball. It is here to be timed, not to compare
    protection strength.
    """
    target = torch.full_like(image, 0.5)
    x_adv = image.clone()
    _sync(image.device)
    start = time.perf_counter()
    for _ in range(iters):
        grad = torch.zeros_like(image)
        for _ in range(grad_reps):
            x = x_adv.clone().requires_grad_(True)
            loss = (editor(x, mask) - target).norm()
            grad += torch.autograd.grad(loss, x)[0]
        with torch.no_grad():
            x_adv = x_adv - step * grad.sign()
            x_adv = (image + (x_adv - image).clamp(-eps, eps)).clamp(0, 1)
    _sync(image.device)
    return x_adv, time.perf_counter() - start


@dataclass
class Row:
    """One line of the table and of the JSON ``rows``."""

    case: str
    editor: str
    size: int
    sampler_steps: int | None
    switches: str
    schedule: str
    status: str = "ok"
    note: str = ""
    seconds_per_image: float | None = None
    seconds_per_image_runs: list[float] = field(default_factory=list)
    iterations_per_second: float | None = None
    iterations_measured: int | None = None
    extrapolated: bool = False
    peak_memory_gib: float | None = None  #: process RSS / CUDA allocated, weights included
    working_memory_gib: float | None = None  #: peak minus the memory held before the run
    memory_kind: str = ""
    gflop_per_image: float | None = None  #: counted as direct convolutions and matmuls
    gflop_per_pass: float | None = None
    estimate_gib: float | None = None  #: fp32 weights + activations from shapes (meta)
    tflop_per_second: float | None = None  #: counted FLOPs per image / measured seconds
    mfu: float | None = None  #: model-FLOP utilisation: tflop_per_second / peak
    mfu_note: str = ""  #: why an MFU is above 1
    peak_precision: str = ""  #: fp32, tf32 or bf16: the peak the row is measured against
    peak_flops_per_second: float | None = None
    peak_source: str = ""  #: "measured: ..." or "datasheet: ..."
    load_average_1m: float | None = None
    compare_to: str | None = None
    members: list[str] = field(default_factory=list)  #: an ensemble's member rows

    @property
    def seconds_at_peak(self) -> float | None:
        """Per-image seconds if the counted FLOPs ran at the peak (a planning number only)."""
        if self.gflop_per_image is None or not self.peak_flops_per_second:
            return None
        return self.gflop_per_image * 1e9 / self.peak_flops_per_second


@dataclass(frozen=True)
class Budget:
    """How much measuring a case may cost."""

    repeats: int = 3  #: timed runs per case (the median is reported)
    max_seconds: float = 45.0  #: for a case's timed runs; beyond it, measure fewer iterations
    max_iterations: int | None = None  #: cap on measured iterations (smoke tests)

    def __post_init__(self) -> None:
        if self.repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {self.repeats}")
        if not self.max_seconds > 0:
            raise ValueError(f"max_seconds must be positive, got {self.max_seconds}")
        if self.max_iterations is not None and self.max_iterations < 1:
            raise ValueError(f"max_iterations must be >= 1, got {self.max_iterations}")

    def plan(self, estimate: float, target: int) -> tuple[int, int]:
        return plan_iterations(
            estimate, target, self.repeats, self.max_seconds, self.max_iterations
        )


def _run_ours(
    case: Case, editor, image, mask, kernel, device, budget: Budget, estimate: float
) -> tuple[list[float], list[float], int]:
    from runtime_backdoor.implant import implant

    def once(steps: int) -> tuple[float, float]:
        _sync(device)
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=case.bf16):
            result = implant(
                editor,
                image,
                mask,
                steps=steps,
                expand_kernel=kernel,
                batch_passes=case.batch_passes,
                progress=False,
            )
        _sync(device)
        return time.perf_counter() - start, result.seconds

    warm_total, _ = once(1)  # allocator, kernel selection, compilation
    # the warm-up ran the clean pass and one iteration: about twice an iteration
    k, runs = budget.plan(max(estimate, warm_total / 2), ITERATIONS)
    totals, loops = zip(*(once(k) for _ in range(runs)), strict=True)
    return list(totals), list(loops), k


def _run_photoguard(
    case: Case, editor, image, mask, device, budget: Budget, estimate: float
) -> tuple[list[float], list[float], int]:
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=case.bf16):
        _, warm = photoguard_attack(editor, image, mask, iters=1, grad_reps=1)
        # one attack iteration (10 chain passes) shows the per-pass cost
        k, runs = budget.plan(max(estimate, warm), PHOTOGUARD_REPS)
        loops = [
            photoguard_attack(editor, image, mask, iters=1, grad_reps=k)[1] for _ in range(runs)
        ]
    return loops, loops, k


def run_case(
    case: Case,
    device: torch.device,
    peaks: Mapping[str, Peak | float],
    budget: Budget,
) -> Row:
    """Measure one case (or explain why not) and return its row.

    ``peaks``: per precision, the :class:`Peak` rows are measured against (a bare number is
    taken as a measured peak of unstated source).
    """
    passes = PHOTOGUARD_ITERS * PHOTOGUARD_REPS if case.photoguard else ITERATIONS
    one = "chain pass" if case.photoguard else "iteration"
    unit = "chain passes" if case.photoguard else "iterations"
    row = Row(
        case.name,
        case.label,
        case.size,
        case.sampler_steps,
        case.switches(),
        f"PhotoGuard-style {PHOTOGUARD_ITERS}x{PHOTOGUARD_REPS}"
        if case.photoguard
        else f"ours {ITERATIONS} it",
        compare_to=case.compare_to,
        members=list(case.members),
        load_average_1m=round(os.getloadavg()[0], 2),
    )
    flops = count_flops(case)
    key = peak_key(case, device)
    peak = peaks[key]
    if not isinstance(peak, Peak):
        peak = Peak(float(peak), "given", True)
    row.gflop_per_pass = flops.pass_flops / 1e9
    row.gflop_per_image = flops.per_image / 1e9
    row.peak_precision = key
    row.peak_flops_per_second = peak.flops_per_second
    row.peak_source = peak.source
    row.estimate_gib = estimate_memory(case).total_bytes / 2**30
    estimate = flops.pass_flops / peak.flops_per_second  # per iteration / chain pass, at best

    if case.cuda_only and device.type != "cuda":
        row.status = "skipped: needs a GPU"
        row.note = "CUDA-only switch"
        return row
    if 2 * estimate > budget.max_seconds:  # a warm-up and one measured iteration do not fit
        row.status = "skipped: needs a GPU" if device.type == "cpu" else "skipped: too slow"
        row.note = (
            f"{estimate:.0f} s per {one} even at the peak "
            f"({peak.flops_per_second / 1e12:.3g} TFLOP/s), "
            f"over half of --max-seconds-per-case {budget.max_seconds:g}"
        )
        return row

    memory = PeakMemory(device)
    editor = editors = None
    try:
        editors = build_editors(case, device)
        image, mask, kernel = make_inputs(case.size, case.images, device)
        if case.channels_last:
            editors = [e.to(memory_format=torch.channels_last) for e in editors]
            image = image.contiguous(memory_format=torch.channels_last)
            mask = mask.contiguous(memory_format=torch.channels_last)
        for e in editors:  # LaMa's folded copy is made at the first call: count it as weights
            if hasattr(e, "inference_generator"):
                e.inference_generator(image.device)
        if case.compile:
            editors = [torch.compile(e) for e in editors]
        editor = editors if case.ensemble_with else editors[0]
        memory.reset()
        if case.photoguard:
            totals, loops, k = _run_photoguard(case, editor, image, mask, device, budget, estimate)
        else:
            totals, loops, k = _run_ours(
                case, editor, image, mask, kernel, device, budget, estimate
            )
        held = memory.peak_bytes()
        if held is not None:
            row.peak_memory_gib = held / 2**30
            if memory.baseline is not None:
                row.working_memory_gib = max(0, held - memory.baseline) / 2**30
        row.memory_kind = memory.kind
    except torch.cuda.OutOfMemoryError as err:
        row.status = "failed: out of memory"
        row.note = str(err).splitlines()[0][:120]
        return row
    except Exception as err:  # one broken case must not lose a scarce GPU session's other rows
        row.status = f"failed: {type(err).__name__}"
        row.note = str(err).splitlines()[0][:160] if str(err) else ""
        return row
    finally:
        del editor, editors
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    per_image = [
        extrapolate(t, s, k, passes) / case.images for t, s in zip(totals, loops, strict=True)
    ]
    row.seconds_per_image_runs = per_image
    row.seconds_per_image = statistics.median(per_image)
    row.iterations_measured = k
    loop = statistics.median(loops)
    if case.photoguard:
        row.iterations_per_second = k / loop / PHOTOGUARD_REPS  # attack iterations
    else:
        row.iterations_per_second = k / loop
    row.extrapolated = k < passes
    notes = [f"median of {len(per_image)} run{'s' if len(per_image) > 1 else ''}"]
    if row.extrapolated:
        notes.append(f"extrapolated from {k} {unit if k > 1 else one} (of {passes})")
    row.note = "; ".join(notes)
    row.tflop_per_second = flops.per_image / row.seconds_per_image / 1e12
    row.mfu = utilisation(flops.per_image, row.seconds_per_image, peak.flops_per_second)
    row.mfu_note = mfu_note(row.mfu, peak)
    return row


def compare(rows: Sequence[Row], references: Sequence[Row] = ()) -> list[dict[str, Any]]:
    """Each case against its ``compare_to`` partner: time and memory ratios.

    An ensemble is compared with its members' rows: its time with the sum of theirs (it runs
    every member each iteration), its peak and working memory with the largest member's (it
    holds one member's activations at a time). Partners are looked up in ``rows``, then in
    ``references`` (rows of an earlier run on the same machine, ``--compare-with``).
    """
    by_name = {r.case: r for r in (*references, *rows)}
    out = []
    for r in rows:
        if r.seconds_per_image is None:
            continue
        if r.members:
            members = [by_name.get(m) for m in r.members]
            if any(m is None or m.seconds_per_image is None for m in members):
                continue
            entry = {
                "case": r.case,
                "reference": " + ".join(r.members),
                "what": f"ensemble of {len(members)}: time / sum of members', "
                "memory / largest member's",
                "time_ratio": r.seconds_per_image / sum(m.seconds_per_image for m in members),
            }
            peaks = [m.peak_memory_gib for m in members]
            if r.peak_memory_gib and all(peaks):
                entry["peak_memory_ratio"] = r.peak_memory_gib / max(peaks)
            works = [m.working_memory_gib for m in members]
            if r.working_memory_gib and all(works):
                entry["working_memory_ratio"] = r.working_memory_gib / max(works)
            out.append(entry)
            continue
        ref = by_name.get(r.compare_to or "")
        if ref is None or ref.seconds_per_image is None:
            continue
        entry = {
            "case": r.case,
            "reference": ref.case,
            "what": "PhotoGuard-style / ours" if "PhotoGuard" in r.schedule else r.switches,
            "time_ratio": r.seconds_per_image / ref.seconds_per_image,
        }
        if r.peak_memory_gib and ref.peak_memory_gib:
            entry["peak_memory_ratio"] = r.peak_memory_gib / ref.peak_memory_gib
        if r.working_memory_gib and ref.working_memory_gib:
            entry["working_memory_ratio"] = r.working_memory_gib / ref.working_memory_gib
        out.append(entry)
    return out


# --------------------------------------------------------------------------- report


def environment(device: torch.device, threads: int) -> dict[str, Any]:
    info: dict[str, Any] = {
        "type": device.type,
        "name": cpu_model(),
        "cpu_model": cpu_model(),  #: the host's CPU, also on a GPU machine
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, memory_gib=props.total_memory / 2**30)
        info["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import diffusers

        versions["diffusers"] = diffusers.__version__
    except ImportError:
        versions["diffusers"] = None
    return {"device": info, "versions": versions}


def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None:
        return ""
    if value >= 100:
        return f"{value:.0f}"
    return f"{value:.{digits}f}" if value >= 0.01 else f"{value:.2g}"


def table(rows: Sequence[Row], comparisons: Sequence[dict[str, Any]]) -> str:
    headers = [
        "case",
        "switches",
        "s/image",
        "it/s",
        "peak GiB",
        "work GiB",
        "est. GiB",
        "TFLOP/image",
        "TFLOP/s",
        "MFU",
        "status / note",
        "MFU note",
    ]
    body = [
        [
            r.case,
            r.switches,
            _fmt(r.seconds_per_image) + ("*" if r.extrapolated else ""),
            _fmt(r.iterations_per_second),
            _fmt(r.peak_memory_gib),
            _fmt(r.working_memory_gib),
            _fmt(r.estimate_gib),
            f"{r.gflop_per_image / 1e3:.3g}" if r.gflop_per_image is not None else "",
            f"{r.tflop_per_second:.3g}" if r.tflop_per_second is not None else "",
            f"{r.mfu:.2g}" if r.mfu is not None else "",
            r.note if r.status == "ok" else f"{r.status} ({r.note})",
            r.mfu_note,
        ]
        for r in rows
    ]
    cmp_headers = ["case", "vs", "what", "time ratio", "peak-memory ratio", "work-memory ratio"]
    cmp_body = [
        [
            c["case"],
            c["reference"],
            c["what"],
            _fmt(c["time_ratio"]),
            _fmt(c.get("peak_memory_ratio")),
            _fmt(c.get("working_memory_ratio")),
        ]
        for c in comparisons
    ]
    peaks = sorted({(r.peak_precision, r.peak_flops_per_second, r.peak_source) for r in rows
                    if r.peak_flops_per_second})  # fmt: skip
    try:
        from tabulate import tabulate

        text = tabulate(body, headers, tablefmt="github")
        if cmp_body:
            text += "\n\n" + tabulate(cmp_body, cmp_headers, tablefmt="github")
    except ImportError:
        text = "\n".join(" | ".join(map(str, line)) for line in [headers, *body])
        if cmp_body:
            text += "\n\n" + "\n".join(
                " | ".join(map(str, line)) for line in [cmp_headers, *cmp_body]
            )
    return (
        text
        + "\n(* extrapolated to the full schedule; work GiB: peak minus the memory held before "
        "the run; est. GiB: fp32 weights + activations kept for backward, from shapes; "
        "TFLOP/s: FLOPs counted as direct convolutions and matmuls per measured second; "
        "MFU: TFLOP/s over the peak)\n"
        + "\n".join(f"peak {k}: {v / 1e12:.3g} TFLOP/s, {src}" for k, v, src in peaks)
    )


def load_rows(paths: Sequence[str | Path]) -> list[Row]:
    """The rows of earlier reports that exist (fields this version does not know are dropped)."""
    known = {f.name for f in fields(Row)}
    return [
        Row(**{k: v for k, v in r.items() if k in known})
        for path in paths
        if Path(path).is_file()
        for r in json.loads(Path(path).read_text()).get("rows", [])
    ]


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def run(
    cases: Sequence[str] = (),
    device: str = "auto",
    budget: Budget | None = None,
    out: str | Path | None = None,
    threads: int | None = None,
    echo: Callable[[str], None] = print,
    deadline: float | None = None,
    compare_with: Sequence[str | Path] = (),
) -> dict[str, Any]:
    """Run the selected cases, write the JSON report to ``out`` and return it.

    ``deadline``: seconds after which no further case starts (they are reported as
    skipped), so that a time-limited GPU call ends with its JSON written.
    ``compare_with``: earlier reports whose rows serve as comparison partners (an
    ensemble's members measured in another call on the same machine).
    """
    references = load_rows(compare_with)
    for path in compare_with:
        if not Path(path).is_file():
            echo(f"--compare-with {path}: no such file; its rows are not compared")
    budget = budget or Budget()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    dev = torch.device(device)
    if threads:
        torch.set_num_threads(threads)
    selected = select_cases(cases, device)
    out = Path(out) if out else ROOT / "reports" / "benchmarks" / f"{device}.json"

    load_before = os.getloadavg()
    started = time.perf_counter()
    measured = measure_throughput(dev)
    peaks = device_peaks(dev, measured)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_model()
    echo(
        f"{device} ({name}): measured "
        + "; ".join(
            f"{op} " + ", ".join(f"{k} {v / 1e12:.3g}" for k, v in by_key.items())
            for op, by_key in measured.items()
        )
        + f" TFLOP/s; load average {load_before[0]:.2f}"
    )
    for key, peak in peaks.items():
        echo(f"  peak {key}: {peak.flops_per_second / 1e12:.4g} TFLOP/s ({peak.source})")
    settings = {
        "cases": [c.name for c in selected],
        "repeats": budget.repeats,
        "max_seconds_per_case": budget.max_seconds,
        "max_iterations": budget.max_iterations,
        "iterations": ITERATIONS,
        "photoguard": {
            "iterations": PHOTOGUARD_ITERS,
            "grad_reps": PHOTOGUARD_REPS,
            "sampler_steps": 4,
        },
        "guidance_scale": GUIDANCE,
        "weights": "random",
        "image": "centred box mask of a quarter of the area; 1 image per call unless the row says",
        "deadline_seconds": deadline,
        "compare_with": [str(p) for p in compare_with],
    }
    rows: list[Row] = []

    def report() -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            **environment(dev, torch.get_num_threads()),
            "settings": settings,
            "matmul_flops_per_second": measured["matmul"],
            "conv3x3_flops_per_second": measured["conv3x3"],
            "conv3x3_shape": dict(
                zip(("batch", "channels", "size"), CONV_SHAPE[dev.type], strict=True)
            ),
            "peak_flops_per_second": {
                k: {"value": p.flops_per_second, "source": p.source, "measured": p.measured}
                for k, p in peaks.items()
            },
            "load_average": {"before": list(load_before), "after": list(os.getloadavg())},
            "wall_seconds": time.perf_counter() - started,
            "complete": len(rows) == len(selected),
            "rows": [asdict(r) for r in rows],
            "comparisons": compare(rows, references),
        }

    out.parent.mkdir(parents=True, exist_ok=True)
    result = report()
    for case in selected:
        if deadline is not None and time.perf_counter() - started > deadline:
            row = Row(case.name, case.label, case.size, case.sampler_steps, case.switches(), "")
            row.status, row.note = "skipped: out of time", f"--deadline-seconds {deadline:g}"
        else:
            row = run_case(case, dev, peaks, budget)
        echo(
            f"  {case.name}: {row.status}"
            + (f", {row.seconds_per_image:.3g} s/image" if row.seconds_per_image else "")
            + (f", MFU {row.mfu:.2g}" if row.mfu is not None else "")
            + (f", peak {row.peak_memory_gib:.2f} GiB" if row.peak_memory_gib else "")
        )
        rows.append(row)
        # after every row: a run cut short (GPU time limit) keeps what it measured
        result = report()
        out.write_text(json.dumps(_json_safe(result), indent=2) + "\n")
    echo(f"wrote {out}")
    echo(table(rows, result["comparisons"]))
    return result


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cases",
        nargs="*",
        default=[],
        help="groups (smoke, cpu, gpu, all), case names or shell patterns; "
        "default: cpu or gpu after the device",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per case (median)")
    parser.add_argument(
        "--max-seconds-per-case",
        type=float,
        default=45.0,
        help="time budget of a case's timed runs; beyond it fewer iterations run and the "
        "per-image time is extrapolated",
    )
    parser.add_argument(
        "--max-iterations",
        type=int,
        default=None,
        help="measure at most this many iterations per run and extrapolate (quick checks)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--deadline-seconds",
        type=float,
        default=None,
        help="start no case after this many seconds (the rest are reported as skipped)",
    )
    parser.add_argument(
        "--out", default=None, help="JSON path (default reports/benchmarks/DEVICE.json)"
    )
    parser.add_argument(
        "--compare-with",
        nargs="*",
        default=[],
        help="earlier reports (same machine) whose rows are comparison partners, e.g. an "
        "ensemble's members",
    )
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    args = parser.parse_args(argv)
    if args.list:
        for c in CASES.values():
            print(f"{c.name:40s} {','.join(c.groups):14s} {c.switches()}")
        return
    budget = Budget(args.repeats, args.max_seconds_per_case, args.max_iterations)
    run(
        args.cases,
        args.device,
        budget,
        args.out,
        args.threads,
        deadline=args.deadline_seconds,
        compare_with=args.compare_with,
    )


if __name__ == "__main__":
    main()

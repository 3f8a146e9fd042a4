# %% [markdown]
# # 2 · The editing model
#
# The run-time backdoor is optimised against one frozen editor. This stage materialises it and records
# what was used in `models/editor/editor.json`, which the later stages load:
#
# - `mini-lama` (the embedded default): a miniature of LaMa's own generator (the same FFC-ResNet class
#   as Big-LaMa, fewer channels and blocks), trained here from scratch on photos that ship with
#   scikit-image — never on the images the study evaluates;
# - `lama`: Big-LaMa from the official checkpoint (`weights` = `best.ckpt` or `big-lama.pt`);
# - `sd-inpainting`: a diffusers inpainting pipeline (`weights` = local folder or cached hub id);
# - `blur-fill`: a classical fill, for reference (it cannot be protected against: it is not sensitive).
#
# It also measures the editor's **sensitivity** (`runtime_backdoor.implant.sensitivity`): how far the fill
# can move per unit of L∞ perturbation outside the hole, against the gain a solid target needs at the
# paper's ε. Protection can only work where that ratio is above 1.

# %% tags=["parameters"]
name = "mini-lama"  # mini-lama | lama | mat | sd-inpainting | blur-fill (runtime_backdoor.editors.EDITORS)
weights = ""  # checkpoint file / folder / hub id; empty for mini-lama: train it here
train_steps = 300  # mini-lama: optimiser steps
train_seconds = 0  # mini-lama: wall-clock cap in seconds (0: no cap)
train_size = 64  # mini-lama: training crop size in pixels
seed = 0  # training seed
eps = 0.025  # budget of the sensitivity check (params.yaml editor.check_eps: the paper's)
check_size = 128  # image side of the sensitivity check (params.yaml editor.check_size)
device = "auto"  # auto | cpu | cuda
out_dir = "models/editor"  # written by this stage

# %%
from runtime_backdoor.project import enter_project_root

root = enter_project_root()  # JupyterLab starts kernels in notebooks/: every path is from the project folder

from runtime_backdoor.pipeline import editor

# %%
stage = editor.run(
    out_dir, name=name, weights=weights, train_steps=train_steps, train_seconds=train_seconds,
    train_size=train_size, seed=seed, eps=eps, check_size=check_size, device=device,
)
summary = stage["summary"]
print(f"{name}: {summary['parameters'] / 1e6:.2f} M parameters")

# %% [markdown]
# Sensitivity on held-out *training-side* photos (not the evaluation images), with a centred square hole:

# %%
print("gain:", stage["check"]["gain"], " needed:", stage["check"]["needed"])

# %%
{k: v for k, v in summary.items() if k != "training"}  # recorded in models/editor/summary.json

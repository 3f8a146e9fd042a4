# %% [markdown]
# # Tutorial · the run-time backdoor, step by step on one image
#
# An image owner wants an inpainting model to refuse one edit: filling in the **protected region**
# (a watermark, a logo, a face) should give a flat target colour instead of a plausible fill, while
# every other edit keeps working. The method adds a small perturbation δ to the image, found by 20
# steps of gradient descent against a frozen editor. Nothing in the editor changes: the "backdoor"
# lives in the pixels.
#
# On one image from the embedded sample:
#
# 1. the protected region *m*, its expansion *E(m)*, the ring around it and the target colour;
# 2. the three loss terms and what each one asks for;
# 3. δ and the fill over the 20 steps on a deliberately sensitive **control** editor, where it works;
# 4. the protected image beside the original;
# 5. malicious and benign edits of the protected image against the same edits of the clean one;
# 6. how often the control is hit across the study's images, by each definition the repository uses;
# 7. the same steps on the pipeline's trained **miniature LaMa**, where it does not work;
# 8. why: the editor's **gain**;
# 9. Big-LaMa, when its weights are on this machine.
# 10. what the run showed, in a few lines, and where to go next.
#
# It is not a pipeline stage; it runs in well under a minute on a CPU. Figures and `tutorial.json`
# go to `out_dir` (`reports/tutorial/`, not tracked by git).

# %% tags=["parameters"]
image = "logo_01"  # an embedded sample image: watermark_NN, logo_NN or face_NN
size = 128  # image side in pixels (params.yaml prepare.size; the paper works at 512)
eps = 0.025  # L-infinity budget, fraction of the pixel range (params.yaml implant.eps: the paper's 6.4/255)
steps = 20  # Adam steps (params.yaml implant.steps: the paper's 20)
expand_kernel = 5  # E(m) box kernel in px (params.yaml implant.expand_kernel: the paper's 17 at 512 px scaled to 128 px; other sizes: masks.scaled_kernel(size))
target = "solid"  # the target φ: solid | anti (params.yaml implant.target)
seed = 0  # seed of the initial δ₀ (params.yaml implant.seed)
hit_tol = 0.1  # per-channel distance to φ that counts as on target (params.yaml evaluate.hit_tol)
hit_min_fraction = 0.5  # share of the edited region on target for a hit (params.yaml evaluate.hit_min_fraction)
amplify = 20  # δ is drawn this many times larger (params.yaml figures.amplify)
frames = [1, 2, 3, 5, 10, 20]  # forward passes shown in the strips (at most steps)
control = "control:global-mix(gain:800,reach:8)"  # the sensitive control editor, as in params.yaml beyond.editors
miniature = "models/editor/mini-lama.safetensors"  # the pipeline's trained miniature; missing: run `dvc pull editor`
big_lama = "models/big-lama.pt"  # Big-LaMa weights (or the unzipped models/big-lama/); the section is skipped without them
out_dir = "reports/tutorial"  # figures and tutorial.json (git-ignored)
device = "auto"  # auto | cpu | cuda (params.yaml device)

# %%
from runtime_backdoor.project import enter_project_root
root = enter_project_root()  # JupyterLab starts kernels in notebooks/: every path below is from the project folder

from pathlib import Path

from IPython.display import Image, display

from runtime_backdoor import tutorial
from runtime_backdoor.data import write_json
from runtime_backdoor.editors.specs import build_from_spec
from runtime_backdoor.implant import sensitivity
from runtime_backdoor.plots import save_figure
from runtime_backdoor.project import resolve_device

dev = resolve_device(device)
out = Path(out_dir)
x, m = tutorial.sample_image(image, size, out / "sample")
x, m = x.to(dev), m.to(dev)
shown = sorted({k for k in frames if k <= steps} | {steps})  # the strips end at the last step
budget = dict(eps=eps, expand_kernel=expand_kernel, target=target, seed=seed)  # as the implant stage
written = []


def show(fig, name):
    written.append(save_figure(fig, out / name))
    display(Image(str(written[-1])))


print(f"figures and tutorial.json: {tutorial.project_path(out, root)}/ (paths are from the project folder)")

# %% [markdown]
# ## The threat model
#
# - **The owner** publishes an image and wants one region *m* of it (a watermark, a logo, a face)
#   to resist editing. Before publishing, they optimise δ against **a known editor**: they have its
#   weights and back-propagate through it (white box). Here that editor is the control, then the
#   miniature LaMa.
# - **What the owner controls: only the pixels.** The published image is x′ = x + δ with
#   |δ| ≤ ε in every pixel value (L∞ budget `eps`), saved as an 8-bit PNG. Not the editor, not the
#   mask, not what happens to the image afterwards.
# - **The attacker** takes x′ after it is published, **draws the mask** and runs the editor the owner
#   optimised against. A malicious edit masks the protected content: here exactly *m*, or *m* grown
#   to *E(m)*. A benign edit leaves it alone: here the ring around *m*.
# - **Success, for the owner**: a malicious edit of x′ is a **hit** (below) where the same edit of x
#   is not; a benign edit of x′ gives nearly what the same edit of x gives (PSNR between the two);
#   and x′ looks like x (PSNR, SSIM).
#
# Not tested here: masks drawn without knowing *m*, editors the owner did not optimise against,
# JPEG or resizing before the edit. The pipeline's `beyond` stage tests them (`reports/beyond/`).

# %% [markdown]
# ## What counts as a hit
#
# The pipeline's definition (`runtime_backdoor.metrics.target_hit_fraction`; params.yaml `evaluate`):
# a pixel of the edited region is **on target** when each of its three channels is within `hit_tol`
# of φ, and an edit is a **hit** when at least `hit_min_fraction` of the edited region is on target.
# The strips below also give the **hole error**, the mean |fill − φ| over the hole: 0 is exactly φ,
# about 0.5 is a fill unrelated to it. It measures how far a fill is from a hit.

# %%
print(f"on target: within {hit_tol} ({hit_tol * 255:.1f}/255) of φ in R, G and B; "
      f"hit: at least {hit_min_fraction:.0%} of the edited region on target")

# %% [markdown]
# ## 1 · What is protected, and what an edit of it should give
#
# - **m**, the protected region: the pixels a malicious user would erase and ask the editor to fill.
# - **E(m)**, m grown by a box of `expand_kernel` pixels: a user rarely draws the mask exactly, so a
#   slightly larger mask should fire the backdoor too.
# - **the ring** E(m) − m: a benign edit next to the protected content. It must behave as on the
#   clean image, otherwise the protection would break ordinary edits.
# - **φ**, the target: a solid colour (pure red, green or blue, whichever is farthest from the
#   image's mean colour). A fill that turns into φ is impossible to miss.

# %%
show(tutorial.regions_figure(x, m, expand_kernel, target), "regions.png")

# %% [markdown]
# ## 2 · Three loss terms
#
# δ is chosen to minimise `1·implant + 1·incomplete + 2·hide` (the paper's weights), each a mean
# squared error inside one region of one edit of the perturbed image x′ = x + δ:
#
# - **implant**: fill m, compare the fill with φ inside m. This is the backdoor itself.
# - **incomplete**: fill E(m), compare with φ inside E(m). It makes the backdoor survive a loose mask.
# - **hide**: fill only the ring, compare with the clean image's ring fill. It keeps benign edits
#   unchanged; with weight 2 it is the strongest pull.
#
# Below, the control editor on the clean image: the first two terms are large (its fills are
# nowhere near φ), the hide term is 0 (nothing is perturbed yet). The control is a toy, not an
# inpainter: its fill is one flat colour computed from the known pixels near the hole, which makes
# it very sensitive to them.

# %%
control_editor = build_from_spec(control, device=dev)
show(tutorial.loss_terms_figure(control_editor, {"clean": x}, m, expand_kernel, target), "terms_clean.png")

# %% [markdown]
# ## 3 · Twenty Adam steps on the sensitive control
#
# δ starts as small uniform noise; each step runs the editor on x + δ (one forward pass for the
# three terms together), computes the loss and lets Adam (learning rate 0.1) move δ, clipped to
# [−ε, ε]. As in the authors' code, the result is the image the last pass saw, rounded to 8 bits.
# Each frame shows the image pass k saw (δ after k − 1 updates; the last frame is the protected
# image). Top row: δ, amplified `amplify` times (grey is 0). Bottom row: what the editor fills into
# m on that image, its hole error and the share of the hole on target (a hit from `hit_min_fraction`).

# %%
control_frames, control_result = tutorial.implant_frames(control_editor, x, m, shown, hit_tol=hit_tol, **budget)
show(tutorial.frames_figure(x, m, control_frames, amplify), "control_steps.png")

# %% [markdown]
# The control does not fire on every image, nor from every δ₀: its fill is a steep function of the
# pixels, and from some starting points Adam ends with one colour channel wrong (a hole error near
# 0.33). Section 6 reads how often from the pipeline's files; try another `image` or `seed` to see
# a miss.
#
# The loss terms over the same steps (log scale): implant and incomplete collapse within a few
# steps, and may jump back up for a step or two later on, because Adam with the paper's settings
# (betas 0.5, 0.5) keeps taking nearly full-size steps on a steep fill; hide may jump with them,
# and settles back.

# %%
show(tutorial.loss_curves(control_result), "control_losses.png")

# %% [markdown]
# ## 4 · The protected image
#
# What the owner publishes, beside the original: PSNR (dB; higher is closer) and SSIM (1 is
# identical) from `runtime_backdoor.metrics`, and δ amplified `amplify` times. Every pixel may
# change, by at most ε.

# %%
show(tutorial.protection_figure(x, control_result.protected, amplify), "control_protected.png")

# %% [markdown]
# ## 5 · Malicious and benign edits
#
# The three edits again, on the clean and on the protected image. The table gives, per edit, the
# share of the edited region on target and the hit, clean → protected. For the benign ring edit what
# matters is the last two columns: the PSNR of the protected image's edit against the clean image's
# edit, over the whole image (the ε sweep's benign PSNR; δ outside the ring counts too) and over the
# ring only (the fill itself). A hit under a benign edit is a false alarm: the protection is to blame
# only where the protected image is hit and the clean one is not (a toy editor whose ring fill is
# already close to φ is hit on the clean image too).

# %%
images = {"clean": x, "protected": control_result.protected}
show(tutorial.loss_terms_figure(control_editor, images, m, expand_kernel, target), "control_terms.png")
control_checks = tutorial.edit_checks(control_editor, x, control_result.protected, m, expand_kernel, control_result.target, hit_tol, hit_min_fraction)
control_checks.round(3)

# %% [markdown]
# ## 6 · How often is the control hit?
#
# One image says yes or no. The repository measures rates, and quotes several: each is a different
# measurement, so each gets its own name here. All use the hit defined above; a rate is the mean over
# images of the share of δ₀ seeds whose edit is a hit; the interval is the 95 % interval over images;
# `clean` is the same rate on unprotected images (the control is sometimes hit without protection).
#
# - **ε-sweep hit rate** (`reports/eps_sweep.json`, `control_hit_rate_at_paper_eps`): the ε-sweep
#   stage protects every image against the control at the budget nearest 6.4/255, from several δ₀
#   seeds, and edits exactly m.
# - **beyond: hit rate, edit m** (`reports/beyond/fair_masks.csv`, scenario `mask`): the same edit and
#   the same definition, measured by the beyond stage on its own protections at `implant.eps`:
#   a second, separate measurement of the same rate.
# - **beyond: official malicious hit rate** (`reports/beyond/baselines.csv`, family `official`): the
#   mean over the three official malicious edits, m, E(m) and the incomplete mask (half of m with
#   half of E(m)); the methods table in docs/beyond.md quotes it.
# - **beyond: fair-mask malicious hit rate** (same file, family `fair`): the mean over the masks an
#   attacker would draw from the content alone (boxes, brush strokes, hulls, ellipses).
# - **this notebook**: one image, one δ₀ — a yes or no, not a rate.
#
# The generated conclusions (docs/results.md) also quote differences of these rates, protected − clean. The column
# `image in that run` shows the notebook's image in each of the pipeline's runs (at the pipeline's
# `size` it is the same picture).

# %%
rates = tutorial.control_hit_rates(
    image, bool(control_checks.loc["m", "hit, protected"]), bool(control_checks.loc["m", "hit, clean"]),
    eps, control, hit_min_fraction,
)
rates.round(3)

# %%
a, b = rates.iloc[0], rates.iloc[1]  # the two measurements of the same rate
overlap = max(a["low"], b["low"]) <= min(a["high"], b["high"])
print(f"{a.name}: {a['protected']:.0%} [{a['low']:.0%}, {a['high']:.0%}]; {b.name}: {b['protected']:.0%} "
      f"[{b['low']:.0%}, {b['high']:.0%}]: the intervals {'overlap' if overlap else 'do not overlap'}.")

# %% [markdown]
# ## 7 · The same on the miniature LaMa
#
# The pipeline's default editor is a miniature of LaMa (the same FFC-ResNet generator as Big-LaMa,
# 178 k parameters instead of 27 M), trained by the `editor` stage. Its weights are a DVC output: if
# they are missing, the next cell stops and says how to get them (`dvc pull editor`). The same 20
# steps, the same budget:

# %%
mini_editor = tutorial.load_miniature(miniature, device=dev)
mini_frames, mini_result = tutorial.implant_frames(mini_editor, x, m, shown, hit_tol=hit_tol, **budget)
show(tutorial.frames_figure(x, m, mini_frames, amplify), "miniature_steps.png")

# %% [markdown]
# δ now spreads over the whole image (LaMa's Fourier convolutions see every pixel), yet the fill
# barely moves: the hole error stays near where it started. The protected image, and the same
# malicious and benign checks as for the control:

# %%
show(tutorial.protection_figure(x, mini_result.protected, amplify), "miniature_protected.png")
images = {"clean": x, "protected": mini_result.protected}
show(tutorial.loss_terms_figure(mini_editor, images, m, expand_kernel, target), "miniature_terms.png")
mini_checks = tutorial.edit_checks(mini_editor, x, mini_result.protected, m, expand_kernel, mini_result.target, hit_tol, hit_min_fraction)
mini_checks.round(3)

# %% [markdown]
# ## 8 · Why: the editor's gain
#
# `runtime_backdoor.implant.sensitivity` asks, to first order, how far the mean fill of the hole can
# move towards φ when every known pixel may change by ε: that distance is `gain · ε`. To reach φ
# from the clean fill the gain must be at least *needed* = hole error / ε, about 20 for a solid
# colour at the paper's ε (more in practice, since the hide term pulls the other way).
# The control is built steep; a trained inpainter makes smooth fills, which is what makes it good
# at inpainting and hard to steer. The pipeline's `check` command prints the same numbers for any
# editor and image.

# %%
gains = {
    "control": sensitivity(control_editor, x, m, eps=eps, target=target),
    "miniature LaMa\n(trained)": sensitivity(mini_editor, x, m, eps=eps, target=target),
}
show(tutorial.gain_figure(gains), "gain.png")

# %% [markdown]
# ## 9 · Big-LaMa
#
# With the authors' Big-LaMa weights on this machine (`models/big-lama.pt`, or the unzipped
# `models/big-lama/`; see docs/real-models.md), the same steps run on it here
# (about a minute on a CPU at 128 px, seconds on a GPU).

# %%
found = tutorial.big_lama_weights(big_lama)  # None, with a line saying how to get them, when absent
if found:
    from runtime_backdoor.editors import build_editor

    big_editor = build_editor("lama", weights=str(found), device=dev)
    big_frames, big_result = tutorial.implant_frames(big_editor, x, m, shown, hit_tol=hit_tol, **budget)
    show(tutorial.frames_figure(x, m, big_frames, amplify), "big_lama_steps.png")
    gains["Big-LaMa"] = sensitivity(big_editor, x, m, eps=eps, target=target)
    show(tutorial.gain_figure(gains), "gain_with_big_lama.png")
    display(tutorial.edit_checks(big_editor, x, big_result.protected, m, expand_kernel, big_result.target, hit_tol, hit_min_fraction).round(3))

# %% [markdown]
# ## 10 · What this run showed
#
# The run's numbers are recorded in one dict, `results` (written to `tutorial.json` in `out_dir`;
# the tests read it). In a few lines, from those numbers:

# %%
# Recorded for the tests: hole errors before and after, hits, image quality, gains, figures.
checks = {"control": control_checks, "miniature LaMa": mini_checks}
results = {
    "image": image,
    "size": size,
    "miniature": "trained",  # a missing miniature stops the notebook: never a stand-in
    "miniature_weights": miniature,
    "big_lama": bool(found),
    "control_error_start": float(control_frames[0].error[0]),
    "control_error_final": float(control_frames[-1].error[0]),
    "miniature_error_start": float(mini_frames[0].error[0]),
    "miniature_error_final": float(mini_frames[-1].error[0]),
    "linf_8bit_max": float(max(r.delta.abs().max() for r in (control_result, mini_result)) * 255),
    "protection": {k: tutorial.imperceptibility(x, r.protected) for k, r in (("control", control_result), ("miniature LaMa", mini_result))},
    "hit": {k: bool(c.loc["m", "hit, protected"]) for k, c in checks.items()},
    "hit_clean": {k: bool(c.loc["m", "hit, clean"]) for k, c in checks.items()},
    "ring_psnr": {k: float(c.loc["ring E(m) − m", "PSNR vs clean edit (image)"]) for k, c in checks.items()},
    "gain": {k.split("\n")[0]: float(s.gain[0]) for k, s in gains.items()},
    "needed": {k.split("\n")[0]: float(s.needed[0]) for k, s in gains.items()},
    "control_hit_rates": rates["protected"].to_dict(),
    "figures": [str(p) for p in written],
}
saved = write_json(out / "tutorial.json", results)  # every number; `results` holds the same dict
print(tutorial.summary(results, saved=tutorial.project_path(saved, root)))

# %% [markdown]
# ## Where to go next
#
# - **Every image and every measurement**: the pipeline, one notebook per stage, in order:
#   [01_prepare](01_prepare.ipynb), [02_editor](02_editor.ipynb), [03_implant](03_implant.ipynb),
#   [04_edit](04_edit.ipynb), [05_evaluate](05_evaluate.ipynb), [06_figures](06_figures.ipynb),
#   [07_beyond](07_beyond.ipynb), [08_eps_sweep](08_eps_sweep.ipynb), [09_purify](09_purify.ipynb),
#   [10_ensemble](10_ensemble.ipynb) (`make reproduce` runs them; their executed copies are in
#   `reports/notebooks/`).
# - **Your own images**: the owner's commands, `runtime-backdoor check`, `protect` and `edit`, in the
#   README's [Protect an image](../README.md#protect-an-image) and in [docs/owners.md](../docs/owners.md).
# - **Real editors**: Big-LaMa, MAT and Stable Diffusion, their weights and the paper's settings, in
#   [docs/real-models.md](../docs/real-models.md).

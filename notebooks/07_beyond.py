# %% [markdown]
# # 7 · Beyond the paper: fair masks, robustness, EOT, baselines and transfer
#
# The official test masks are derived from the optimisation masks, every edit is made on the PNG the
# protector wrote, and the paper compares with no baseline. This stage tests what reviewers asked for
# (`runtime_backdoor.pipeline.beyond`, `robustness`, `baselines`):
#
# - **fair masks** an editing user would draw, from the protected region alone: a loose box, a brush
#   stroke over the content, its convex hull, a covering ellipse, the hull shifted by a few pixels, and
#   benign boxes of three sizes at random places away from the content;
# - **robustness**: JPEG (95, 75, 50), downscale to 0.5× and back, Gaussian blur (σ 1 px), Gaussian
#   noise (σ 2/255) and a border crop, applied to the image before it is edited; and the backdoor
#   optimised with **expectation over transformations** (`backdoor_eot`: random JPEG with straight-through
#   gradients, resize, mask dilation), to see what it buys and what it costs;
# - **baselines at the same budget** (ε, steps, optimiser, images, masks, editors): a PhotoGuard-style
#   untargeted output attack, PhotoGuard's encoder attack (latent-diffusion editors only, otherwise
#   recorded as not applicable) and a Markpainting-style targeted attack (the target under any mask);
# - **transfer**: protect against one editor, edit with another.
#
# Fair masks and robustness run on every image protected by the `implant` stage; the methods and the
# transfer run on a `subset` of images (round-robin over content types). Each edit is compared with the
# same edit of the clean image after the same transformation. The `control` editor is a deliberately
# sensitive toy (`GlobalMixEditor`): it shows how the methods differ where protection is possible at all;
# the pipeline's editor shows what happens on the embedded miniature.

# %% tags=["parameters"]
prepared_dir = "data/prepared"  # from the prepare stage
protected_dir = "data/protected"  # from the implant stage: the backdoor against the pipeline editor
editor_record = "models/editor/editor.json"  # from the editor stage
reports_dir = "reports"  # tables go to reports/beyond, figures to reports/figures/beyond
editors = "pipeline control:global-mix(gain:800,reach:8)"  # protected against and edited with (space-separated specs, optional label before a colon)
transfer_editors = "lama-s1:lama(preset:mini,seed:1) control-s1:global-mix(gain:800,reach:8,seed:1)"  # extra editors that only edit, for the transfer table
methods = "backdoor backdoor_eot untargeted encoder markpainting random"  # protections compared side by side
subset = 0  # images for the methods and the transfer, round-robin over content types (0 for all)
transforms = "none jpeg:95 jpeg:75 jpeg:50 resize:0.5 blur:1 noise:2 crop:6px"  # applied to the image before editing
robust_scenarios = "mask fair_box fair_brush ring"  # scenarios run under each transform
eot_transforms = "jpeg resize dilate"  # random transformations of the backdoor_eot optimisation
shift_px = 4  # shift of the fair_hull_shifted mask in pixels
eps = 0.025  # L-infinity budget shared by every method (the implant stage's)
steps = 20  # optimiser steps shared by every method
lr = 0.1  # Adam learning rate shared by every method
init_high = 0.01  # delta starts uniform in [0, init_high)
expand_kernel = 5  # E(m) box kernel in px
target = "solid"  # solid or anti
seed = 0  # seeds the initial delta, the EOT draws and the fair masks
seeds = 3  # δ₀ seeds (seed, seed+1, ...) of every method against every source but the pipeline editor
hit_tol = 0.1  # per-channel distance to the target colour that counts as on target
hit_min_fraction = 0.5  # share of the edited region on target for a hit
batch_size = 12  # images per editor call when editing
lpips_backbone = "models/lpips/alexnet-owt-7be5be79.pth"  # torchvision AlexNet for LPIPS-alex (the evaluate stage's); missing: the report says so
device = "auto"  # auto, cpu or cuda

# %%
from runtime_backdoor.budget import Budget

budget = Budget(eps=eps, steps=steps, lr=lr, init_high=init_high, expand_kernel=expand_kernel, target=target, seed=seed)

# %%
from runtime_backdoor.project import enter_project_root

root = enter_project_root()  # JupyterLab starts kernels in notebooks/: every path is from the project folder

from IPython.display import Image, Markdown, display

from runtime_backdoor.pipeline import beyond

# %% [markdown]
# Run every method against every source editor, and edit under every scenario and transformation (the expensive cell):

# %%
stage = beyond.run(
    reports_dir, prepared_dir=prepared_dir, protected_dir=protected_dir, editor_record=editor_record,
    editors=editors, transfer_editors=transfer_editors, methods=methods, subset=subset,
    transforms=transforms, robust_scenarios=robust_scenarios, eot_transforms=eot_transforms,
    shift_px=shift_px, budget=budget, seeds=seeds, hit_tol=hit_tol, hit_min_fraction=hit_min_fraction,
    batch_size=batch_size, lpips_backbone=lpips_backbone, device=device,
)
tables, shown = stage["tables"], {p.stem: p for p in stage["figures"]}
print(f"{stage['recorded']['n_edits']} edits evaluated in {stage['recorded']['stage_seconds']:.0f} s")

# %% [markdown]
# ## Fair masks
#
# The fair scenarios drawn for the first image of each content type (protected region outlined in cyan):

# %%
display(Image(str(shown["fair_masks"])), tables["fair_masks"].round(3))

# %% [markdown]
# ## Robustness and EOT
#
# The malicious hit rate after each transformation, its *survival* (share of the untransformed hit rate), and the benign side effects; then the backdoor with and without EOT on the same images, with the optimisation's cost:

# %%
display(tables["robustness"].round(3), tables["eot"].round(3), Image(str(shown["robustness"])))

# %% [markdown]
# ## Methods side by side
#
# Same images, editor, masks and budget; no transformation. Malicious edits should hit the target (or at least move far from the clean edit: low SSIM); benign edits should not (SSIM near 1):

# %%
display(tables["baselines"].round(3), Image(str(shown["baselines"])))

# %% [markdown]
# ## Transfer
#
# Protected against the row's editor, edited with the column's:

# %%
display(tables["transfer"].round(3))
if "transfer" in shown:
    display(Image(str(shown["transfer"])))

# %% [markdown]
# ## Results table

# %%
display(Markdown(stage["markdown"]))

# %%
stage["recorded"]  # reports/beyond/metrics.json holds the flat summary

# %% [markdown]
# # 9 · Does protection survive purification?
#
# An attacker who wants to remove protected content can first *clean* the protected image and then
# edit it. This stage runs the field's standard purification suite before the edit
# (`runtime_backdoor.purifiers`): JPEG 95/75/50, Gaussian noise σ 0.05 and 0.1, a 10 % crop resized
# back, AdverseCleaner (64 bilateral + 4 guided filters), and — where their weights are — noisy
# upscaling with the SD ×4 upscaler, DiffPure (SD 1.5 image-to-image at strength 0.1 and 0.2) and
# GrIDPure. For every editor protected against (the study's editor with the implant stage's images;
# blur-fill and the sensitive toy `control` protected here at the same budget) it edits the purified
# protected image over the protected region (malicious) and over the ring around it (benign) and
# compares with the same edits of the clean image and of the purified clean image.
#
# The worst case follows BlurGuard: per image the attacker's best purifier for each metric, then the
# mean over images with 95 % intervals. The optional adaptive defence (`adaptive`) re-optimises the
# backdoor with expectation over the classical purifiers (kornia's differentiable JPEG; the filters
# straight through).

# %% tags=["parameters"]
prepared_dir = "data/prepared"  # from the prepare stage
protected_dir = "data/protected"  # the implant stage's protected images (the pipeline editor's)
editor_record = "models/editor/editor.json"  # from the editor stage
reports_dir = "reports"  # purification/ (tables, conclusions, results.md, metrics.json) and figures/purification.png
editors = "pipeline blur-fill control:global-mix(gain:800,reach:8)"  # specs (editors.specs); pipeline: the editor stage's, the others are protected here
purifiers = "jpeg:95 jpeg:75 jpeg:50 noise:12.75 noise:25.5 crop:10% adverse-cleaner jpeg:75+lanczos:0.5 resize:0.75+jpeg:90"  # classical purifiers and chains (runtime_backdoor.purifiers.parse_purifier)
diffusion = "noisy-upscale:20 upscale:320 diffpure:0.1 diffpure:0.2 gridpure:0.1 img2img-denoise:0.15 vae-roundtrip"  # diffusion purifiers: run where their weights are, else reported unavailable
adaptive = "control"  # editor labels also protected with expectation over the classical purifiers (empty: none)
baselines = "random"  # protections beside the backdoor against every editor: random is uniform noise within ±ε (empty: none)
seeds = 3  # δ₀ seeds (seed + 0, 1, …) of every protection made here
eps = 0.025  # L∞ budget of the editors protected here (the implant stage's)
steps = 20  # Adam iterations (the implant stage's)
lr = 0.1  # Adam learning rate (the implant stage's)
init_high = 0.01  # δ₀ ~ U[0, init_high) (the implant stage's)
expand_kernel = 5  # E(m) kernel in px (the implant stage's); the benign ring is E(m) - m
target = "solid"  # solid | anti (the implant stage's)
seed = 0  # the first δ₀ seed, and the seed of the noise purifiers
hit_tol = 0.1  # per-channel distance to the target that counts as on target (the evaluate stage's)
hit_min_fraction = 0.5  # share of the region on target for a hit (the evaluate stage's)
batch_size = 18  # images per editor, purifier and implant call
device = "auto"  # auto | cpu | cuda

# %%
from runtime_backdoor.budget import Budget

budget = Budget(eps=eps, steps=steps, lr=lr, init_high=init_high, expand_kernel=expand_kernel, target=target, seed=seed)

# %%
from runtime_backdoor.project import enter_project_root

root = enter_project_root()  # JupyterLab starts kernels in notebooks/: every path is from the project folder

from IPython.display import Image, Markdown, display

from runtime_backdoor.pipeline import purify

# %%
stage = purify.run(
    reports_dir, prepared_dir=prepared_dir, protected_dir=protected_dir, editor_record=editor_record,
    editors=editors, purifiers=purifiers, diffusion=diffusion, adaptive=adaptive, baselines=baselines,
    seeds=seeds, budget=budget, hit_tol=hit_tol,
    hit_min_fraction=hit_min_fraction, batch_size=batch_size, device=device,
)
stage["status"]  # diffusion purifiers: ok, or unavailable with the command that fetches their weights

# %%
display(Image(str(stage["figure"])))

# %%
display(Markdown(stage["markdown"]))  # reports/purification/results.md

# %%
stage["protection"]  # seconds of each protection made here and its L∞ in 8-bit units

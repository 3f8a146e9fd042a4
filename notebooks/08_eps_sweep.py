# %% [markdown]
# # 8 · How much budget does protection need? (ε sweep)
#
# The paper fixes ε = 0.025 (6.4/255). Whether the backdoor can be implanted at that budget depends on
# how sensitive the editor is. This stage protects a subset of the images at several budgets and
# reports, per ε: the share of images whose protected region turns into the target when edited
# (malicious), the ring edit of the protected image against the same edit of the clean image (benign,
# PSNR; 30 dB line) and the protection's own PSNR (32 dB line) — for the study's editor, the classical
# fill (insensitive) and a deliberately sensitive toy editor (`control`, the optimiser's positive
# control) as references. The paper has no such curve.

# %% tags=["parameters"]
prepared_dir = "data/prepared"  # from the prepare stage
editor_record = "models/editor/editor.json"  # from the editor stage
reports_dir = "reports"  # eps_sweep.csv, eps_sweep.json, figures/eps_sweep.png
eps_8bit = "1,2,4,6.4,8,16,32"  # budgets in 8-bit units, comma-separated
editors = "pipeline blur-fill control:global-mix(gain:800,reach:8)"  # space-separated specs (see editors.specs.parse_editor_spec); pipeline is the editor stage's
images_per_type = 0  # images of each content type (0 keeps all)
seeds = 3  # δ₀ seeds for the editors in `seeded`
seeded = "control"  # labels run over `seeds` δ₀ seeds (the chaotic toy); the others run `seed` only, to bound the cost
eps = 0.025  # the implant stage's budget; the sweep replaces its ε by each of eps_8bit
steps = 20  # Adam iterations (the implant stage's)
lr = 0.1  # Adam learning rate (the implant stage's)
init_high = 0.01  # δ₀ ~ U[0, init_high) (the implant stage's)
expand_kernel = 5  # E(m) kernel in px (the implant stage's)
target = "solid"  # solid | anti (the implant stage's)
seed = 0  # seed of the initial δ (the implant stage's)
hit_tol = 0.1  # per-channel distance to the target that counts as on target (the evaluate stage's)
hit_min_fraction = 0.5  # share of the region on target for a hit (the evaluate stage's)
device = "auto"  # auto | cpu | cuda

# %%
from runtime_backdoor.budget import Budget

budget = Budget(eps=eps, steps=steps, lr=lr, init_high=init_high, expand_kernel=expand_kernel, target=target, seed=seed)

# %%
from runtime_backdoor.project import enter_project_root

root = enter_project_root()  # JupyterLab starts kernels in notebooks/: every path is from the project folder

from IPython.display import Image, display

from runtime_backdoor.pipeline import eps_sweep

# %%
stage = eps_sweep.run(
    reports_dir, prepared_dir=prepared_dir, editor_record=editor_record, eps_8bit=eps_8bit,
    editors=editors, images_per_type=images_per_type, seeds=seeds, seeded=seeded,
    budget=budget, hit_tol=hit_tol, hit_min_fraction=hit_min_fraction, device=device,
)
display(stage["table"].round(3))

# %%
display(Image(str(stage["figure"])))

# %%
stage["summary"]  # reports/eps_sweep.json: the smallest budget with ≥ 80 % of images hit, and the hit rate at the paper's ε

# %% [markdown]
# # 10 · Protect against the editor you don't know (ensembles, leave one out)
#
# An owner rarely knows which inpainting model an attacker will use. `runtime_backdoor.implant.implant`
# accepts a list of editors: each Adam step sums their run-time backdoor losses (equal weights), within
# the same ε and the same official schedule, one editor at a time so that memory is that of the largest.
# This stage asks whether that generalises: for each editor E, the images are protected against E alone,
# against the ensemble of all the *others* (E left out: the owner did not know it), and against all of
# them, and then edited with E (`runtime_backdoor.pipeline.ensemble`).
#
# On the embedded default the editors are differently seeded instances of the sensitive toy control
# (the only editors offline that a backdoor can fire on): this shows the mechanics and whether protection
# transfers between *related* editors, not between real architectures. With real weights the list can
# hold `lama`, `mat` and `sd-inpainting` (editor specs with `weights:PATH`).

# %% tags=["parameters"]
prepared_dir = "data/prepared"  # from the prepare stage
reports_dir = "reports"  # tables go to reports/ensemble, the figure to reports/figures/ensemble.png
editors = "c0:global-mix(gain:800,reach:8,seed:0) c1:global-mix(gain:800,reach:8,seed:1) c2:global-mix(gain:800,reach:8,seed:2)"  # editor specs (editors.specs.parse_editor_spec), at least two
images_per_type = 0  # images of each content type (0 keeps all)
seeds = 3  # δ₀ seeds (seed + 0, 1, …) of every protection; an image's outcome is the share of its seeds that hit
eps = 0.025  # L-infinity budget (the implant stage's)
steps = 20  # Adam iterations (the implant stage's)
lr = 0.1  # Adam learning rate (the implant stage's)
init_high = 0.01  # δ starts uniform in [0, init_high)
expand_kernel = 5  # E(m) box kernel in px
target = "solid"  # solid or anti
seed = 0  # seed of the initial δ
hit_tol = 0.1  # per-channel distance to the target colour that counts as on target
hit_min_fraction = 0.5  # share of the edited region on target for a hit
device = "auto"  # auto | cpu | cuda

# %%
from runtime_backdoor.budget import Budget

budget = Budget(eps=eps, steps=steps, lr=lr, init_high=init_high, expand_kernel=expand_kernel, target=target, seed=seed)

# %%
from runtime_backdoor.project import enter_project_root

root = enter_project_root()  # JupyterLab starts kernels in notebooks/: every path is from the project folder

from IPython.display import Image, Markdown, display

from runtime_backdoor.pipeline import ensemble

# %%
stage = ensemble.run(
    reports_dir, prepared_dir=prepared_dir, editors=editors, images_per_type=images_per_type,
    budget=budget, seeds=seeds, hit_tol=hit_tol, hit_min_fraction=hit_min_fraction, device=device,
)
display(Image(str(stage["figure"])))

# %%
display(Markdown(stage["markdown"]))  # reports/ensemble/results.md

# %% [markdown]
# # 3 · Implant the run-time backdoor
#
# For every prepared image, optimise the perturbation δ (‖δ‖∞ ≤ ε) against the editor chosen in the
# `editor` stage, so that filling the protected region *m* or its expansion *E(m)* produces the target
# colour, while filling only the ring *E(m) − m* behaves as on the clean image
# (`runtime_backdoor.implant.implant`; defaults are the official ones). Protected images are saved as
# 8-bit PNGs; an interrupted run resumes with the images it has not finished.

# %% tags=["parameters"]
prepared_dir = "data/prepared"  # from the prepare stage
editor_record = "models/editor/editor.json"  # from the editor stage
out_dir = "data/protected"  # written by this stage
figure = "reports/figures/loss_curves.png"  # the loss curves
curves = "reports/plots/loss_curves.csv"  # their medians per step, for `dvc plots`
eps = 0.025  # L-infinity budget (fraction of the pixel range): 6.4/255, the paper's
steps = 20  # Adam iterations (paper: 20)
lr = 0.1  # Adam learning rate (paper: 0.1)
init_high = 0.01  # δ starts uniform in [0, init_high) (paper: 0.01)
expand_kernel = 5  # E(m) box kernel in px: the paper's 17 px at 512 px, scaled to 128 px
target = "solid"  # "solid" (green/red/blue farthest from the mean colour) or "anti" (1 - x)
batch_size = 6  # images optimised together
seed = 0  # seed of the initial δ
device = "auto"  # auto | cpu | cuda
launcher = "none"  # none (this process) | accelerate launch ... (one process per GPU; docs/scale-out.md)

# %%
from runtime_backdoor.budget import Budget

budget = Budget(eps=eps, steps=steps, lr=lr, init_high=init_high, expand_kernel=expand_kernel, target=target, seed=seed)

# %%
from runtime_backdoor.project import enter_project_root

root = enter_project_root()  # JupyterLab starts kernels in notebooks/: every path is from the project folder

from IPython.display import Image, display

from runtime_backdoor.pipeline import implant

# %%
stage = implant.run(
    out_dir, prepared_dir=prepared_dir, editor_record=editor_record, figure=figure, curves=curves,
    batch_size=batch_size, device=device, launcher=launcher,
    budget=budget,
)
display(stage["manifest"][["name", "content", "linf_8bit", "final_implant", "final_hide", "seconds"]].round(4))

# %% [markdown]
# How the three loss terms evolve (median and interquartile band over images):

# %%
display(Image(str(stage["figure"])))

# %%
stage["summary"]  # recorded in data/protected/summary.json

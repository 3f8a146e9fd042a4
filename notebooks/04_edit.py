# %% [markdown]
# # 4 · Edit: malicious and benign scenarios
#
# Every scenario runs on the clean **and** the protected image with the same mask:
#
# | kind | scenario | mask |
# |---|---|---|
# | malicious | `mask` | the protected region *m* |
# | malicious | `expanded` | *E(m)* |
# | malicious | `incomplete` | half(*m*) ∪ half(*E(m)*) |
# | benign | `ring` | *E(m)* − *m* |
# | benign | `half_ring` | half of the ring (the official "wot") |
# | benign | `elsewhere` | a square that does not touch *E(m)* (added by this study) |

# %% tags=["parameters"]
prepared_dir = "data/prepared"  # from the prepare stage
protected_dir = "data/protected"  # from the implant stage
editor_record = "models/editor/editor.json"  # from the editor stage
out_dir = "data/edited"  # written by this stage
expand_kernel = 5  # must match the implant stage's
elsewhere_size = 0.2  # side of the benign square elsewhere, fraction of the image side
batch_size = 6  # images edited together
device = "auto"  # auto | cpu | cuda
launcher = "none"  # none (this process) | accelerate launch ... (one process per GPU; docs/scale-out.md)

# %%
from runtime_backdoor.project import enter_project_root

root = enter_project_root()  # JupyterLab starts kernels in notebooks/: every path is from the project folder

from IPython.display import display

from runtime_backdoor.pipeline import edit

# %%
stage = edit.run(
    out_dir, prepared_dir=prepared_dir, protected_dir=protected_dir, editor_record=editor_record,
    expand_kernel=expand_kernel, elsewhere_size=elsewhere_size, batch_size=batch_size,
    device=device, launcher=launcher,
)
display(stage["edits"].groupby(["kind", "scenario"])["edited_fraction"].mean().round(3))

# %%
stage["summary"]  # recorded in data/edited/summary.json

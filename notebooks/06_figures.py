# %% [markdown]
# # 6 · Figures and the results table
#
# A grid per content type (original | protected | δ amplified | malicious edit of the clean and the
# protected image | benign edit of both), the scenario plot, and the results table in the layout of the
# paper's claims.

# %% tags=["parameters"]
prepared_dir = "data/prepared"  # from the prepare stage
protected_dir = "data/protected"  # from the implant stage
edited_dir = "data/edited"  # from the edit stage
reports_dir = "reports"  # metrics.json and per_edit.csv from the evaluate stage; figures go to reports/figures
rows_per_grid = 3  # images per content type in the grids
amplify = 20  # δ is shown as 0.5 + amplify·δ

# %%
from runtime_backdoor.project import enter_project_root

root = enter_project_root()  # JupyterLab starts kernels in notebooks/: every path is from the project folder

from IPython.display import Image, Markdown, display

from runtime_backdoor.pipeline import figures

# %%
stage = figures.run(
    reports_dir, prepared_dir=prepared_dir, protected_dir=protected_dir, edited_dir=edited_dir,
    rows_per_grid=rows_per_grid, amplify=amplify,
)
for content, path in stage["grids"].items():
    display(Markdown(f"**{content}**"), Image(str(path)))

# %%
display(Image(str(stage["scenarios"])))

# %%
# The comparisons the text states, decided from the per-image values (reports/conclusions.json).
display(Markdown(stage["table"]))

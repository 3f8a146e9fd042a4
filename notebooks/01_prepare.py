# %% [markdown]
# # 1 · Prepare the images
#
# Reads every image/mask pair in the official layout (`NAME_example.png` + `NAME_example_mask.png`),
# checks it (sizes match, mask binary and neither empty nor full, RGB 8-bit), resizes it to a square
# of `size` pixels and writes `data/prepared/NAME.png` + `NAME_mask.png` with a manifest.
# The embedded sample (`data/raw`, restored by DVC) holds watermarks, logos and faces drawn onto
# photos that ship with scikit-image; point `raw_dir` at a folder of the paper's data to use it instead.

# %% tags=["parameters"]
raw_dir = "data/raw"  # folder in the official layout (+ optional manifest.csv with a `content` column)
out_dir = "data/prepared"  # written by this stage
size = 128  # side of the square images in pixels (0 keeps the original size)
limit = 0  # keep only the first N images (0 keeps all)

# %%
from runtime_backdoor.project import enter_project_root

root = enter_project_root()  # JupyterLab starts kernels in notebooks/: every path is from the project folder

from IPython.display import display

from runtime_backdoor.pipeline import prepare

# %%
stage = prepare.run(raw_dir, out_dir, size=size, limit=limit)
manifest = stage["manifest"]
display(manifest.groupby("content").agg(images=("name", "count"), protected_fraction=("protected_fraction", "mean")))

# %% [markdown]
# The first image of each content type, with its protected region in white:

# %%
prepare.preview_figure(manifest, out_dir);

# %%
stage["summary"]  # recorded in data/prepared/summary.json for the tests and the next stages

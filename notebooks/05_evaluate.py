# %% [markdown]
# # 5 · Evaluate
#
# Per image and scenario (`reports/per_edit.csv`):
# - **target hit**: share of the edited region within `hit_tol` of the target colour in every channel;
#   an edit *hits* when at least `hit_min_fraction` of the region does;
# - **SSIM / PSNR of the protected image's edit against the clean image's same edit** — low under
#   malicious edits means the protection works, high under benign edits means it has no side effect;
# - **SSIM against the original image**, for clean and protected edits;
# - the protection's imperceptibility: PSNR / SSIM / L∞ of protected vs original (`reports/imperceptibility.csv`);
# - **CLIP-FID** (Fréchet distance of CLIP ViT-B/32 image features, edited outputs vs originals): needs
#   pretrained CLIP weights; without them it is recorded as unavailable, with the reason.

# %% tags=["parameters"]
prepared_dir = "data/prepared"  # from the prepare stage
protected_dir = "data/protected"  # from the implant stage
edited_dir = "data/edited"  # from the edit stage
reports_dir = "reports"  # metrics.json, per_edit.csv, imperceptibility.csv, clip_fid.json
hit_tol = 0.1  # per-channel distance to the target colour that counts as "on target"
hit_min_fraction = 0.5  # share of the edited region on target for an edit to count as a hit
clip_weights = "models/clip/ViT-B-32-quickgelu/open_clip_pytorch_model.bin"  # OpenAI CLIP ViT-B/32 for CLIP-FID, clean-fid's network (empty string: none)
lpips_backbone = "models/lpips/alexnet-owt-7be5be79.pth"  # torchvision AlexNet for LPIPS-alex (empty string: none)
device = "auto"  # auto | cpu | cuda

# %%
from runtime_backdoor.project import enter_project_root

root = enter_project_root()  # JupyterLab starts kernels in notebooks/: every path is from the project folder

from IPython.display import display

from runtime_backdoor.pipeline import evaluate

# %%
stage = evaluate.run(
    reports_dir, prepared_dir=prepared_dir, protected_dir=protected_dir, edited_dir=edited_dir,
    hit_tol=hit_tol, hit_min_fraction=hit_min_fraction, clip_weights=clip_weights,
    lpips_backbone=lpips_backbone, device=device,
)
clip = stage["clip"]
print("CLIP-FID:", "computed" if clip["available"] else "unavailable: " + clip["reason"])
print("LPIPS:", "computed" if stage["summary"]["lpips_available"] else "unavailable: " + stage["summary"]["lpips_unavailable"])

# %%
cols = ["hit_protected", "hit_clean", "ssim_vs_clean_edit", "psnr_vs_clean_edit"]
display(stage["per_edit"].groupby(["kind", "scenario"])[cols].mean().round(3))

# %%
stage["summary"]  # reports/metrics.json

"""The one editor registry: every name builds, a spec of that name is the same editor, the
other modules take their editor names and weight files from it, and the owner's actions sit
in a module that neither the CLI nor the demo circles through."""

import ast
import dataclasses
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from runtime_backdoor import demo, runs, weights
from runtime_backdoor.editors import EDITORS, WEIGHT_KINDS, build_editor
from runtime_backdoor.editors.simple import BlurFillEditor
from runtime_backdoor.editors.specs import PIPELINE, build_from_spec, parse_editor_spec
from runtime_backdoor.weights import default_weights, weight_paths

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src" / "runtime_backdoor"
NAMES = {"lama", "mini-lama", "sd-inpainting", "tiny-sd", "mat", "blur-fill", "toy-control", "global-mix"}  # fmt: skip


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def inputs(size: int = 32):
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    m = torch.zeros(1, 1, size, size)
    m[..., size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1
    return x, m


def frozen(editor) -> bool:
    return not editor.training and not any(p.requires_grad for p in editor.parameters())


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(spec.name, None)
    return module


# --------------------------------------------------------------------------- the registry


def test_registry_names_weight_kinds_and_default_files(tmp_path):
    assert set(EDITORS) == NAMES
    for name, entry in EDITORS.items():
        assert entry.weight_kind in WEIGHT_KINDS and entry.title and entry.description
        assert all(key in weights.REGISTRY for key in entry.weights), name
        assert entry.needs_weights == bool(entry.weights or entry.default_path), name
    models = tmp_path / "models"
    assert default_weights("lama", models) == models / "big-lama.pt"
    assert default_weights("mat", models) == models / "mat" / "Places_512_FullData_G.pth"
    assert default_weights("sd-inpainting", models) == models / "sd15-inpainting"
    assert default_weights("mini-lama", models) == models / "editor" / "mini-lama.safetensors"
    for name in ("tiny-sd", "blur-fill", "toy-control", "global-mix"):
        assert EDITORS[name].weight_kind == "none" and default_weights(name, models) is None
    assert [k for k, _ in weight_paths("lama", models)] == ["big-lama", "big-lama-ckpt"]
    assert [k for k, _ in weight_paths("mini-lama", models)] == [""]  # the pipeline makes it


def test_every_editor_weights_file_belongs_to_one_editor():
    """Each model file of weights.py is read by exactly one editor (CLIP is the evaluation's,
    the diffusion purifiers' sets the purify stage's, LPIPS's backbones the metrics')."""
    from runtime_backdoor.metrics import LPIPS_BACKBONES
    from runtime_backdoor.purifiers import WEIGHT_SETS

    readers = [key for entry in EDITORS.values() for key in entry.weights]
    assert len(readers) == len(set(readers))
    lpips = {entry for entry, _ in LPIPS_BACKBONES.values()}
    assert set(readers) == set(weights.REGISTRY) - {"clip-vit-b-32", *WEIGHT_SETS, *lpips}


@pytest.mark.parametrize("name", sorted(NAMES))
def test_a_spec_of_each_name_calls_that_names_builder(monkeypatch, name):
    calls = []

    def build(weights=None, **options):
        calls.append((weights, options))
        return BlurFillEditor()

    monkeypatch.setitem(EDITORS, name, dataclasses.replace(EDITORS[name], build=build))
    weights_option = "weights:/w/x.pt," if EDITORS[name].needs_weights else ""
    spec = parse_editor_spec(f"label:{name}({weights_option}seed:3,gain:1.5)")
    assert (spec.label, spec.name) == ("label", name)
    editor = build_from_spec(spec)
    expected = "/w/x.pt" if weights_option else None
    assert calls == [(expected, {"seed": 3, "gain": 1.5})]
    assert frozen(editor)
    if not EDITORS[name].needs_weights:
        with pytest.raises(ValueError, match="has no weights"):
            build_from_spec(f"{name}(weights:/w/x.pt)")


@pytest.mark.parametrize(
    "name, options, spec",
    [
        ("blur-fill", {}, "blur-fill"),
        ("toy-control", {}, "toy-control"),
        ("global-mix", {"gain": 800, "reach": 8, "seed": 2}, "global-mix(gain:800,reach:8,seed:2)"),
        ("lama", {"preset": "mini", "seed": 1}, "lama(preset:mini,seed:1)"),
        ("tiny-sd", {"seed": 0}, "tiny-sd(seed:0)"),
    ],
)
def test_editors_without_weight_files_build_the_same_by_name_and_by_spec(name, options, spec):
    by_name, by_spec = build_editor(name, **options), build_from_spec(spec)
    assert type(by_name) is type(by_spec) and same_weights(by_name, by_spec)
    assert frozen(by_name) and frozen(by_spec)
    x, m = inputs()
    with torch.no_grad():
        a, b = by_name(x, m), by_spec(x, m)
    assert a.shape == (1, 3, 32, 32) and torch.equal(a, b)
    assert torch.equal(a * (1 - m), x * (1 - m))  # outside the hole: the image


def test_toy_control_is_global_mix_with_the_pipelines_control_settings():
    toy, mix = build_editor("toy-control"), build_from_spec("global-mix(gain:800,reach:8)")
    assert (toy.gain, toy.reach) == (800.0, 8) and same_weights(toy, mix)
    assert build_editor("global-mix").gain == 400.0  # its own default


def test_lama_random_presets_and_weight_files(tmp_path):
    from safetensors.torch import save_file

    from runtime_backdoor.editors.lama import PRESETS

    small = build_from_spec("lama(seed:1,ngf:8)")  # random weights default to the miniature
    assert small.generator.config == dataclasses.replace(PRESETS["mini"], ngf=8)
    with pytest.raises(ValueError, match="seed"):
        build_editor("lama", preset="mini")  # random weights only when asked for
    source = build_editor("lama", preset="mini", seed=4)
    path = tmp_path / "mini-generator.safetensors"
    save_file({k: v.contiguous() for k, v in source.generator.state_dict().items()}, path)
    by_name = build_editor("lama", weights=path, preset="mini")
    by_spec = build_from_spec(f"lama(weights:{path},preset:mini)")
    assert same_weights(by_name, source) and same_weights(by_spec, source)


def test_mini_lama_reads_the_pipelines_miniature(tmp_path):
    from runtime_backdoor.editors.mini import save_miniature

    source = build_editor("lama", preset="mini", seed=2)
    path = save_miniature(source, tmp_path / "editor" / "mini-lama.safetensors")
    assert path == default_weights("mini-lama", tmp_path)
    by_name, by_spec = build_editor("mini-lama", weights=path), build_from_spec(f"mini-lama(weights:{path})")  # fmt: skip
    assert same_weights(by_name, source) and same_weights(by_spec, source)
    with pytest.raises(ValueError, match="trained weights"):
        build_from_spec("mini-lama")


def test_mat_is_a_spec_with_random_weights_so_it_can_be_a_transfer_editor():
    from runtime_backdoor.editors.mat import MatEditor

    specs = [parse_editor_spec(s) for s in ("pipeline", "m:mat(seed:0)")]
    assert [(s.label, s.name, s.kwargs) for s in specs] == [
        (PIPELINE, PIPELINE, {}),
        ("m", "mat", {"seed": 0}),
    ]
    by_spec = build_from_spec(specs[1])
    assert isinstance(by_spec, MatEditor) and frozen(by_spec)
    assert same_weights(by_spec, build_editor("mat", seed=0))
    assert not same_weights(by_spec, build_from_spec("mat(seed:1)"))
    with pytest.raises(ValueError, match="needs its weights"):
        build_from_spec("mat")


def test_sd_inpainting_reads_a_diffusers_folder(tmp_path):
    tiny = build_editor("tiny-sd", seed=0)
    for part in ("unet", "vae", "scheduler"):
        getattr(tiny, part).save_pretrained(tmp_path / part)
    sd = build_editor(
        "sd-inpainting", weights=tmp_path, prompt_embeds=tiny.prompt_embeds, steps=2,
        guidance_scale=1.0, seed=0,
    )  # fmt: skip
    assert frozen(sd) and same_weights(sd, tiny)
    x, m = inputs()
    with torch.no_grad():
        assert torch.allclose(sd(x, m), tiny(x, m), atol=1e-6)
    missing = tmp_path / "nowhere" / "sd"
    with pytest.raises(FileNotFoundError) as by_name:
        build_editor("sd-inpainting", weights=missing)
    with pytest.raises(FileNotFoundError) as by_spec:
        build_from_spec(f"sd-inpainting(weights:{missing})")
    assert str(by_spec.value) == str(by_name.value)


# --------------------------------------------------------------------------- one table


def test_runs_demo_and_benchmarks_take_their_names_from_the_registry(tmp_path):
    assert runs.RUN_EDITORS == tuple(n for n, e in EDITORS.items() if e.weights)
    assert set(demo.WITHOUT_WEIGHTS) <= set(EDITORS)
    assert not any(EDITORS[n].needs_weights for n in demo.WITHOUT_WEIGHTS)
    models = tmp_path / "models"
    for name in EDITORS:  # every weight file of every editor, where `weights fetch` puts it
        for key, path in weight_paths(name, models):
            kind = weights.REGISTRY[key].kind if key else "file"
            marker = path / weights.REGISTRY[key].check if kind == "zip" else path
            marker = path / "model_index.json" if kind == "hub" else marker
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
    choices = demo.available_editors(models)
    offered = [c.name for c in choices]
    # Every editor with its weights present is offered (each weight set once), the real ones
    # first (the most capable is the default), then the toys, the insensitive miniature last.
    assert sorted(offered) == sorted(
        ["mini-lama", "toy-control", "blur-fill", "lama", "lama", "sd-inpainting",
         "sd-inpainting", "mat"]
    )  # fmt: skip
    real = [n for n in offered if n in ("lama", "sd-inpainting", "mat")]
    assert offered[: len(real)] == real and offered[-1] == "mini-lama"
    toy = next(c for c in choices if c.name == "toy-control")
    assert toy.label.startswith("toy-control") and "toy" in toy.label.lower()

    bench = load_script("benchmark_protection")
    assert set(bench.EDITOR_KINDS) <= set(EDITORS) and set(bench.SD_STACKS) <= set(EDITORS)
    assert {c.editor for c in bench.CASES.values()} == set(bench.EDITOR_KINDS)
    rehearse = load_script("rehearse_pipeline")
    assert set(rehearse.EDITORS) <= set(EDITORS)
    assert {rehearse.Settings().sd_stack, rehearse.DRY_RUN.sd_stack} <= set(bench.SD_STACKS)


def _string_constants(path: Path) -> set[str]:
    return {
        node.value
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    }


def test_no_module_keeps_its_own_editor_to_weights_table():
    """Editors' weight files are looked up through the registry, never named beside them."""
    editor_weights = {key for entry in EDITORS.values() for key in entry.weights}
    for module in ("cli.py", "batch.py", "owner.py", "demo", "runs.py"):
        named = set().union(*map(_string_constants, _sources(module))) & editor_weights
        assert not named, (module, named)
    scripts = [*sorted((ROOT / "benchmarks").glob("*.py")), ROOT / "benchmarks" / "gpu_check.sh"]
    for path in [*SRC.rglob("*.py"), *scripts]:
        assert "sd-tiny" not in path.read_text(), path  # the tiny SD has one name: tiny-sd


# --------------------------------------------------------------------------- import graph


def _sources(module: str) -> list[Path]:
    """The files of the package's module ``module`` (``x.py``) or subpackage (``x``)."""
    return [SRC / module] if module.endswith(".py") else sorted((SRC / module).glob("*.py"))


def _module_level_imports(module: str) -> set[str]:
    """Modules of the package that ``module`` (``x.py``, or a subpackage ``x``: all its files)
    imports at module level (not inside functions); a subpackage's imports of its own files
    are left out."""
    found = set()
    depth = 1 if module.endswith(".py") else 2  # the relative level of the package itself
    for path in _sources(module):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom) and node.level == depth:
                found |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}  # fmt: skip
            elif isinstance(node, ast.ImportFrom) and node.level:
                continue  # inside the subpackage
            elif isinstance(node, ast.ImportFrom | ast.Import):
                names = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]  # fmt: skip
                found |= {n.split(".")[1] for n in names if n and n.startswith("runtime_backdoor.")}
    return found


def test_cli_and_demo_share_owner_and_do_not_import_each_other():
    cli, batch, page, owner = map(_module_level_imports, ("cli.py", "batch.py", "demo", "owner.py"))
    assert "owner" in cli and "owner" in batch and "owner" in page
    assert "demo" not in cli | batch and not {"cli", "batch"} & page
    assert not {"cli", "batch", "demo", "study"} & owner
    assert "study" not in cli | batch | page
    # and not through other modules: a fresh interpreter loads each without the other
    check = (
        "import sys, runtime_backdoor.owner; "
        "assert not {'runtime_backdoor.cli', 'runtime_backdoor.demo'} & set(sys.modules); "
        "import runtime_backdoor.demo; assert 'runtime_backdoor.cli' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", check], check=True, timeout=120)
    check = "import sys, runtime_backdoor.cli; assert 'runtime_backdoor.demo' not in sys.modules"
    subprocess.run([sys.executable, "-c", check], check=True, timeout=120)

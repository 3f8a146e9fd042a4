"""The study's DVC stages, one module each: ``notebooks/NN_<stage>.ipynb`` calls
``runtime_backdoor.pipeline.<stage>.run`` with its parameters and displays what it returns.

    data/raw --prepare--> data/prepared --implant--> data/protected --edit--> data/edited
    editor --> models/editor/            evaluate --> reports/  figures --> reports/figures/
    beyond --> reports/beyond/           eps_sweep --> reports/eps_sweep.*
    purify --> reports/purification/     ensemble --> reports/ensemble/

Paths are relative to the project folder (:func:`runtime_backdoor.project.enter_project_root`).
"""

#: stage name -> its notebook, in pipeline order (``dvc.yaml`` has the same stages)
STAGES = {
    "prepare": "notebooks/01_prepare.ipynb",
    "editor": "notebooks/02_editor.ipynb",
    "implant": "notebooks/03_implant.ipynb",
    "edit": "notebooks/04_edit.ipynb",
    "evaluate": "notebooks/05_evaluate.ipynb",
    "figures": "notebooks/06_figures.ipynb",
    "beyond": "notebooks/07_beyond.ipynb",
    "eps_sweep": "notebooks/08_eps_sweep.ipynb",
    "purify": "notebooks/09_purify.ipynb",
    "ensemble": "notebooks/10_ensemble.ipynb",
}

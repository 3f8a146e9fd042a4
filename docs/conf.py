"""Sphinx configuration of the study book (`make docs`; docs/about.md says why Sphinx).

docs/build.py stages the pages (docs/*.md, the tutorial, the executed stage notebooks in
reports/notebooks/, the reports' figures and tables) into a mirror of the repository's paths
and runs Sphinx on it with this file. Nothing is executed here (``nb_execution_mode = "off"``):
the book shows the notebooks as ``make reproduce`` left them. Nothing is fetched when the book
is built or read: no web fonts, no CDN scripts (docs/build.py checks every page).
"""

project = "Attack as Defense, reproduced: a study book"
author = "runtime_backdoor contributors"
copyright = "runtime_backdoor contributors (MIT licence)"

extensions = ["myst_nb"]
root_doc = "index"
source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["**.ipynb_checkpoints", "_build"]

# MyST: `#anchor` links to headings; no dollar math (nothing here needs MathJax, which would come
# from a CDN).
myst_enable_extensions = ["colon_fence"]
myst_heading_anchors = 3

# Notebooks: shown as executed, never run at build time.
nb_execution_mode = "off"
nb_merge_streams = True
# Saved widget state would make each page load require.js and the widget manager from a CDN.
nb_ipywidgets_js = {}

html_theme = "sphinx_book_theme"
html_title = "Attack as Defense, reproduced"
html_theme_options = {
    "home_page_in_toc": True,
    "show_navbar_depth": 1,
    "show_toc_level": 2,
    "use_download_button": True,
    "use_fullscreen_button": False,
    "use_repository_button": False,
    "navigation_with_keys": False,
    "navbar_persistent": [],  # one search field (the sidebar's), not a second in the header
}
# docs/_static/book.css: wide tables scroll within the column (docs/build.py checks every page
# loads it; its name is build.STYLE).
html_static_path = ["_static"]
html_css_files = ["book.css"]
html_show_sourcelink = False
html_last_updated_fmt = None

# Pages staged from outside docs/ (the README, reports, benchmarks) and the executed notebooks
# carry text Sphinx would otherwise warn about without harm.
suppress_warnings = ["myst.header", "mystnb.unknown_mime_type", "misc.highlighting_failure"]

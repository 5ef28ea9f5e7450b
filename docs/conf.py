"""Sphinx configuration of the memjax documentation (API reference from the docstrings + guides).

Build: ``pip install -e ".[docs]"`` (or sphinx and myst-parser) then
``sphinx-build -W --keep-going -b html docs docs/_build/html``; warnings are errors (CI runs the
same command in ``tests/test_docs.py``). The pages under ``api/`` come from ``docs/gen_api.py``.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # document the checkout, also when memjax is not installed
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # importing memjax for autodoc must not grab an accelerator

project = "memjax"
author = "the memjax authors"
copyright = "2026, the memjax authors"
release = "0.1.0"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "myst_parser",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "gen_api.py"]

# MyST: $...$ maths, ::: fences, headings as link targets
myst_enable_extensions = ["dollarmath", "colon_fence"]
myst_heading_anchors = 3

# autodoc: members in source order, signatures with their type hints in the description
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
autodoc_default_options = {"exclude-members": "__init__, __new__"}
napoleon_google_docstring = True
napoleon_numpy_docstring = True
napoleon_use_rtype = False

# memjax's docstrings write shapes and equations in ``literal`` spans; the few names they cross-reference
# (``:func:`...```) that live outside the documented modules are left unresolved rather than guessed
nitpicky = False

html_theme = "alabaster"
html_title = "memjax"
html_theme_options = {"description": "Memory in neural networks, for JAX and Flax", "fixed_sidebar": True}

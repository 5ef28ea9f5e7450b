"""Every notebook in ``colab/`` runs end to end in a fresh Jupyter kernel (nbclient + ipykernel).

``MEMJAX_NOTEBOOK_SMALL=1`` makes each notebook pick its tiny sizes and ``MPLBACKEND=Agg`` draws
plots without a display. A cell that raises fails the test with the cell's source and
traceback. Notebooks are stored without outputs (the Colab badge, the install cell and the runtime
cell are checked here too); each one is a separate test, so ``pytest -n 2`` runs two at a time.
"""
import glob
import importlib.util
import json
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLAB = os.path.join(ROOT, "colab")
NOTEBOOKS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(COLAB, "*.ipynb")))
EXPECTED = {"quickstart.ipynb", "memory_modules.ipynb", "train_and_compare.ipynb", "memory_layers.ipynb",
            "tpu_pod_planning.ipynb"}
# CPU seconds of each notebook in small mode (2-core x86, 2026-12-06): the longest start first, so that
# `pytest -n 2` keeps both workers busy until the end
COST = {"train_and_compare.ipynb": 58, "quickstart.ipynb": 47, "tpu_pod_planning.ipynb": 35,
        "memory_modules.ipynb": 20, "memory_layers.ipynb": 13}
BY_COST = sorted(NOTEBOOKS, key=lambda n: -COST.get(n, 100))


def _load(name: str) -> dict:
    with open(os.path.join(COLAB, name)) as f:
        return json.load(f)


def test_every_notebook_is_listed():
    assert EXPECTED <= set(NOTEBOOKS), EXPECTED - set(NOTEBOOKS)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_stripped_with_badge_install_and_runtime_cells(name):
    nb = _load(name)
    assert nb["nbformat"] == 4
    first = "".join(nb["cells"][0]["source"])
    assert nb["cells"][0]["cell_type"] == "markdown" and "colab-badge.svg" in first
    assert f"colab.research.google.com/github/memjax/memjax/blob/main/colab/{name}" in first
    code = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    assert "except ImportError:" in code[0] and re.search(r"[%!]pip install .*git\+https://", code[0]), code[0]
    assert "MEMJAX_NOTEBOOK_SMALL" in code[1] and "default_backend()" in code[1], "the runtime cell comes second"
    for c in nb["cells"]:
        if c["cell_type"] == "code":
            assert c.get("outputs", []) == [] and c.get("execution_count") is None, f"{name}: outputs not stripped"


# The default suite runs the entry notebook; the others (training comparisons, memory layers,
# TPU slice planning: their code paths have their own tests) run under -m slow, to keep CI's suite
# within its time.
DEFAULT_RUN = {"quickstart.ipynb"}


@pytest.mark.parametrize("name", [n if n in DEFAULT_RUN else pytest.param(n, marks=pytest.mark.slow) for n in BY_COST])
def test_notebook_runs_in_a_kernel(name, tmp_path):
    nbformat = pytest.importorskip("nbformat", reason="needs nbformat (pip install -e '.[test]')")
    nbclient = pytest.importorskip("nbclient", reason="needs nbclient (pip install -e '.[test]')")
    pytest.importorskip("ipykernel", reason="needs ipykernel (pip install -e '.[test]')")
    from nbclient.exceptions import CellExecutionError

    if name == "tpu_pod_planning.ipynb" and importlib.util.find_spec("libtpu") is None:
        # .[test] installs libtpu on Linux x86-64 (CI included); other hosts cannot compile for a TPU
        pytest.skip("compiling for a TPU slice needs libtpu (Linux x86-64: pip install -e '.[test]' or '.[tpu]')")

    nb = nbformat.read(os.path.join(COLAB, name), as_version=4)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    # the kernel is a fresh process: the same 8 fake CPU devices as the tests (conftest), tiny sizes, no display
    env.update(MEMJAX_NOTEBOOK_SMALL="1", MPLBACKEND="Agg", JAX_PLATFORMS="cpu",
               PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""))
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})  # cwd: a scratch dir
    try:
        client.execute(env=env)  # passed on to the kernel manager's start_kernel
    except CellExecutionError as e:
        pytest.fail(f"{name}: a cell failed\n{str(e)[-6000:]}", pytrace=False)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors

"""Write one API page per memjax module into ``docs/api`` (``python docs/gen_api.py``).

``python docs/gen_api.py --check`` writes nothing and exits 1 listing the pages that are missing,
stale or left over from a removed module (``tests/test_docs.py`` runs it), so that a new module
cannot land without its page. Pages are plain MyST files: a package page shows the package
docstring and a table of contents of its modules; a module page runs ``automodule`` with its
members (autodoc + napoleon read the docstrings).
"""
import os
import sys

DOCS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(DOCS)
API = os.path.join(DOCS, "api")
PACKAGE = "memjax"


def modules() -> list[tuple[str, bool]]:
    """``(dotted name, is_package)`` for every module of the source tree, sorted (no import needed)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, PACKAGE)):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(("_", ".")))
        rel = os.path.relpath(dirpath, ROOT).replace(os.sep, ".")
        for f in sorted(filenames):
            if not f.endswith(".py"):
                continue
            if f == "__init__.py":
                out.append((rel, True))
            elif not f.startswith("_"):
                out.append((f"{rel}.{f[:-3]}", False))
    return sorted(out)


def page(name: str, is_package: bool, children: list[str]) -> str:
    lines = [f"# `{name}`", ""]
    if is_package:
        lines += ["```{eval-rst}", f".. automodule:: {name}", "   :no-members:", "```", ""]
        if children:
            lines += ["```{toctree}", ":maxdepth: 1", ""] + children + ["```", ""]
    else:
        lines += ["```{eval-rst}", f".. automodule:: {name}", "   :members:", "   :show-inheritance:", "```", ""]
    return "\n".join(lines)


def expected_pages() -> dict[str, str]:
    mods = modules()
    pages = {}
    for name, is_package in mods:
        children = [child for child, _ in mods
                    if child.startswith(name + ".") and "." not in child[len(name) + 1:]] if is_package else []
        pages[f"{name}.md"] = page(name, is_package, children)
    return pages


def main(argv: list[str]) -> int:
    check = "--check" in argv
    pages = expected_pages()
    present = {f for f in os.listdir(API) if f.endswith(".md")} if os.path.isdir(API) else set()
    problems = []
    for fname, text in pages.items():
        path = os.path.join(API, fname)
        old = open(path).read() if os.path.exists(path) else None
        if old != text:
            problems.append(f"{'stale' if old is not None else 'missing'}: docs/api/{fname}")
            if not check:
                os.makedirs(API, exist_ok=True)
                with open(path, "w") as f:
                    f.write(text)
    for fname in sorted(present - set(pages)):
        problems.append(f"no such module: docs/api/{fname}")
        if not check:
            os.remove(os.path.join(API, fname))
    if check and problems:
        print("API pages out of date (run `python docs/gen_api.py`):\n  " + "\n  ".join(problems))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

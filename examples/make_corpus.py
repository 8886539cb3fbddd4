"""Write a small English corpus (JSONL) from the Python standard library's own docstrings.

The quickstart needs real text without network access; the docstrings of the stdlib that ships
with every Python are plenty for a tiny model to show a falling loss.

    python examples/make_corpus.py --output examples/data/corpus.jsonl --max-docs 4000
"""

import argparse
import importlib
import inspect
import json
import pkgutil
import warnings

SKIP = ("test", "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip", "antigravity", "this")


def iter_docstrings(min_chars: int):
    """Yield (name, docstring) pairs from importable stdlib modules, their classes and functions."""
    warnings.simplefilter("ignore")
    for info in sorted(pkgutil.iter_modules(), key=lambda m: m.name):
        if info.name.startswith(("_",) + SKIP) or not info.module_finder.path.endswith("python3.11"):
            continue
        try:
            mod = importlib.import_module(info.name)
        except Exception:  # noqa: BLE001 - some modules need platform features; skip them
            continue
        objects = [(info.name, mod)] + [
            (f"{info.name}.{n}", o)
            for n, o in inspect.getmembers(mod)
            if (inspect.isclass(o) or inspect.isfunction(o)) and getattr(o, "__module__", "") == info.name
        ]
        for name, obj in objects:
            doc = inspect.getdoc(obj)
            if doc and len(doc) >= min_chars:
                yield name, doc


def main() -> None:
    """Parse flags and write the corpus."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", required=True)
    p.add_argument("--max-docs", type=int, default=4000)
    p.add_argument("--min-chars", type=int, default=200)
    args = p.parse_args()
    n = 0
    with open(args.output, "w") as f:
        for name, doc in iter_docstrings(args.min_chars):
            f.write(json.dumps({"id": name, "text": doc}) + "\n")
            n += 1
            if n >= args.max_docs:
                break
    print(f"wrote {n} documents to {args.output}")


if __name__ == "__main__":
    main()

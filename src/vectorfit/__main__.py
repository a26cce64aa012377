"""``python -m vectorfit``: the same command-line interface as the ``vectorfit`` command."""

from vectorfit_recipes.cli import main

if __name__ == "__main__":
    raise SystemExit(main())

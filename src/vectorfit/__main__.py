"""``python -m vectorfit``: the same command-line interface as the ``vectorfit`` command."""

import os
import sys

if __name__ == "__main__":
    if "OMP_WAIT_POLICY" not in os.environ:
        # `python -m vectorfit` imports the vectorfit package, and with it torch and its OpenMP
        # runtime, before this file runs: too late for the runtime to see the setting the command
        # uses (vectorfit_recipes.cli.set_passive_openmp). Start again, with it set, as
        # `python -m vectorfit_recipes`, which is the same command and loads torch later.
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        os.execv(sys.executable, [sys.executable, "-m", "vectorfit_recipes", *sys.argv[1:]])
    from vectorfit_recipes.cli import main

    raise SystemExit(main())

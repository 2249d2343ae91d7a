"""Tools that use trained prompts: predict, interpret, summarise, reproduce (see README.md).

Run them from the repository root as scripts, e.g. `python tools/predict.py --help`."""

"""The search service's library: what search.py and worker.py share (opening a study, ranking trials,
recording them for the dashboard) and the one adapter over Optuna's private APIs. Nothing here trains:
the worker turns a trial into an `mtbert` training run."""

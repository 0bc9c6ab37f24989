"""Evaluation harness: benchmark loaders, prompt building, answer extraction, scoring, sharded runs, reports.

Entry points: ``keye eval`` / ``python -m eval`` (``eval.cli``), ``eval.runner.run_eval(cfg, engine=None)`` and
``keye eval-filter`` (``eval.filter.run_filter``). The model is reached only through the engine seam
(``eval.engine``), so this package never imports the model stack unless ``engine == "keye"``.
"""

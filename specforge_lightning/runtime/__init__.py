"""Run-time decisions shared by every command: precision per stage, progress output, the time budget.

Stdlib, torch and rich only (``fit_progress`` adds Lightning); nothing here imports another
specforge_lightning package, so any layer may use it.
"""

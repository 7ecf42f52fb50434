"""Structured pruning that makes a decoder genuinely smaller: whole decoder blocks or single attention/MLP
sublayers removed (``layers``: the model surgery and its record; ``scores``: block influence and the greedy
divergence-driven search on calibration data; ``apply``: the recipe transform).

Import the submodules directly (runtimes import ``layers`` alone to rebuild a pruned model from its config).
"""

"""Steering baked into weights: directions from contrasting prompt sets, then add / ablate / clamp."""

from .apply import (
    SteerConfig,
    added_to_stream,
    apply_steering,
    directions,
    prompt_activations,
    search_strength,
)
from .bake import ablate, add_bias, project_out_cols, project_out_rows, untie_lm_head
from .directions import mean_difference, pca_of_differences, unit

__all__ = [
    "SteerConfig", "ablate", "add_bias", "added_to_stream", "apply_steering", "directions", "mean_difference",
    "pca_of_differences", "project_out_cols", "project_out_rows", "prompt_activations", "search_strength",
    "unit", "untie_lm_head",
]

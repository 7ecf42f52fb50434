"""Weight sparsity: the compressed sparse format (``format``), pruning scores and masks (``masks``),
SparseGPT (``sparsegpt``) and the recipe transform (``apply``).

Import the submodules directly; this package imports nothing eagerly so that the quantizers can
import ``format`` (to keep pruned weights zero) without an import cycle.
"""

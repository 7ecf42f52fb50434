"""Weight quantization: packed formats (with their pure-torch reference) and the RTN transform."""

from .formats import BlockQuantizedTensor, QuantScheme, quantize_blockwise
from .modules import QuantEmbedding, QuantLinear
from .rtn import RTNConfig, apply_rtn

__all__ = ["BlockQuantizedTensor", "QuantEmbedding", "QuantLinear", "QuantScheme", "RTNConfig", "apply_rtn",
           "quantize_blockwise"]

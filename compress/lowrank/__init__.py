"""Low-rank error compensation (EoRA / plain SVD) for compressed linear layers."""

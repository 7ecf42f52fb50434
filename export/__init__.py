"""Exporters: ONNX (KV-cache decoder with MatMulNBits / GatherBlockQuantized / QDQ)."""

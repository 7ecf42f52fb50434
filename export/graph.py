"""A small ONNX graph builder: named initializers, auto-named node outputs, opset bookkeeping."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MS_DOMAIN = "com.microsoft"


class GraphBuilder:
    def __init__(self, name: str, opset: int = 21):
        self.name = name
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: dict[str, onnx.TensorProto] = {}
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.value_info: list[onnx.ValueInfoProto] = []
        self.domains: dict[str, int] = {"": opset}
        self._names: Counter[str] = Counter()
        self.functions: list[onnx.FunctionProto] = []

    def unique(self, base: str) -> str:
        self._names[base] += 1
        n = self._names[base]
        return base if n == 1 else f"{base}_{n - 1}"

    def initializer(self, name: str, array: np.ndarray) -> str:
        if name in self.initializers:
            raise ValueError(f"duplicate initializer {name}")
        array = np.asarray(array)  # (np.ascontiguousarray would turn a 0-d scalar into shape [1])
        self.initializers[name] = numpy_helper.from_array(array if array.flags.c_contiguous else array.copy(), name)
        return name

    def const(self, base: str, array: np.ndarray) -> str:
        return self.initializer(self.unique(base), np.asarray(array))

    def input(self, name: str, elem_type: int, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def output(self, name: str, elem_type: int, shape: list) -> None:
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, shape))

    def node(self, op: str, inputs: list[str], n_out: int = 1, *, name: str | None = None,
             domain: str = "", outputs: list[str] | None = None, **attrs) -> list[str]:
        node_name = self.unique(name or op)
        if outputs is None:
            outputs = [f"{node_name}/out{i}" for i in range(n_out)]
        if domain and domain not in self.domains:
            self.domains[domain] = 1
        self.nodes.append(helper.make_node(op, inputs, outputs, name=node_name, domain=domain, **attrs))
        return outputs

    def op(self, op: str, *inputs: str, name: str | None = None, domain: str = "", **attrs) -> str:
        return self.node(op, list(inputs), 1, name=name, domain=domain, **attrs)[0]

    def model(self, producer: str = "edgecompress") -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs,
                                  list(self.initializers.values()), value_info=self.value_info)
        opsets = [helper.make_opsetid(d, v) for d, v in self.domains.items()]
        m = helper.make_model(graph, opset_imports=opsets, producer_name=producer,
                              functions=self.functions)
        m.ir_version = 10
        return m


def np_dtype(elem_type: int) -> np.dtype:
    return helper.tensor_dtype_to_np_dtype(elem_type)


FLOAT = TensorProto.FLOAT
INT64 = TensorProto.INT64
INT32 = TensorProto.INT32

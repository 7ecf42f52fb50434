"""Online Hadamard rotation of a linear layer's input, for static activation quantization.

QuaRot (Ashkboos et al. 2024, "QuaRot: Outlier-Free 4-Bit Inference in Rotated LLMs"): for an
orthogonal ``R``, ``y = x Wᵀ = (x R)(W R)ᵀ``. A Hadamard ``R`` spreads every channel's outliers over
all channels, so the rotated input ``x R`` has a much smaller per-tensor range than ``x`` for the
same energy, and one static uint8 scale fits it far better. Where ``R`` cannot be folded into the op
that produces ``x`` (down_proj's input is ``silu(gate) * up``, an elementwise product), ``x R`` is
computed online. With ``R = A ⊗ B`` (a Kronecker product of two small Hadamard matrices), ``x R`` is
two small matmuls on ``x`` viewed as an ``[a, b]`` matrix: ``Aᵀ X B`` — ``n (a + b)`` multiply-adds
per token instead of ``n²`` (1536 inputs: 12 x 128, 140 per input element).
:func:`factor_pair` follows QuaRot's construction: the Paley factor times one Sylvester factor.

Hadamard matrices of order ``2^k`` (Sylvester) and of orders 12 and 20 (Paley's construction from
the quadratic residues mod 11 and 19), and Kronecker products of these, are built here.

Pure core: :func:`hadamard`, :class:`HadamardRotation`. Thin adapter: :func:`rotate_linear_inputs_`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn

from edgecompress.errors import EdgeCompressError

_PALEY = (12, 20)  # Paley I orders q + 1 for the primes q = 11, 19 (q = 3 mod 4)


def _paley(order: int) -> torch.Tensor:
    q = order - 1
    residues = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0] + [1 if a in residues else -1 for a in range(1, q)], dtype=torch.float64)
    jacobsthal = chi[(torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q]
    s = torch.zeros(order, order, dtype=torch.float64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, jacobsthal
    return s + torch.eye(order, dtype=torch.float64)


def _constructible(n: int) -> bool:
    if n >= 1 and n & (n - 1) == 0:
        return True
    return any(n % m == 0 and _constructible(n // m) for m in _PALEY)


@lru_cache(maxsize=32)
def _hadamard(n: int) -> torch.Tensor:
    if n & (n - 1) == 0:
        h = torch.ones(1, 1, dtype=torch.float64)
        while h.shape[0] < n:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
        return h
    m = next(m for m in _PALEY if n % m == 0 and _constructible(n // m))
    return torch.kron(_paley(m), _hadamard(n // m))


def hadamard(n: int) -> torch.Tensor:
    """The orthonormal Hadamard matrix ``H / sqrt(n)`` of order ``n`` (float64), ``n = 2^k`` times a
    product of 12s and 20s; a clear error for other orders."""
    if not _constructible(n):
        raise EdgeCompressError(f"no Hadamard matrix of order {n} is built here (orders 2^k x 12^i x 20^j are)",
                                hint="leave this layer out of activations.hadamard")
    return _hadamard(n) / n ** 0.5


def factor_pair(n: int) -> tuple[int, int]:
    """``(a, b)`` with ``a * b = n``: QuaRot's construction ``H_a ⊗ H_b`` with ``a`` the Paley part
    (a product of 12s and 20s) and ``b`` the Sylvester part ``2^k`` (1536 = 12 x 128); for ``n = 2^k``,
    where every split gives the same Sylvester matrix, the most balanced split (the least online cost)."""
    a, rest = 1, n
    while rest & (rest - 1):
        m = next((m for m in _PALEY if rest % m == 0 and _constructible(rest // m)), None)
        if m is None:
            hadamard(n)  # raises the error naming the order
        a, rest = a * m, rest // m
    if a == 1:
        a = 1 << ((n.bit_length() - 1) // 2)
        return a, n // a
    return a, rest


@dataclass(frozen=True)
class HadamardRotation:
    """``x -> x (A ⊗ B)`` for orthonormal Hadamard ``A [a, a]``, ``B [b, b]``, applied to the last axis."""

    a: int
    b: int

    @classmethod
    def of_size(cls, n: int) -> HadamardRotation:
        return cls(*factor_pair(n))

    @property
    def size(self) -> int:
        return self.a * self.b

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 ``(A, B)``."""
        return hadamard(self.a).float(), hadamard(self.b).float()

    def matrix(self) -> torch.Tensor:
        """The dense ``[n, n]`` rotation (float64): the reference :meth:`apply` is tested against."""
        return torch.kron(hadamard(self.a), hadamard(self.b))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``x R`` as ``Aᵀ X B`` on the ``[a, b]`` view of the last axis (what the ONNX graph computes)."""
        A, B = (f.to(x.dtype) for f in self.factors())
        y = x.reshape(*x.shape[:-1], self.a, self.b) @ B
        return (A.T @ y).reshape(x.shape)

    def to_dict(self) -> dict:
        return {"kind": "hadamard", "size": self.size, "factors": [self.a, self.b]}


@torch.no_grad()
def rotate_linear_inputs_(model: nn.Module, patterns: tuple[str, ...],
                          quantized: Callable[[str], bool] = lambda _name: True) -> dict[str, HadamardRotation]:
    """Rotate the weights of the float ``nn.Linear`` layers whose names match any regex in ``patterns``
    (``W <- W R``) and return ``{name: rotation}``; each layer must then apply ``rotation`` to its input
    (``QuantLinear.rotation``) before it runs again. Everything is checked before any weight changes: a
    pattern matching no float linear, a tied weight, an order without a Hadamard matrix, or a layer that
    ``quantized(name)`` says the caller will leave unquantized is an error."""
    owners: dict[int, list[str]] = {}
    for n, m in model.named_modules():
        for param in m.parameters(recurse=False):
            owners.setdefault(id(param), []).append(n)
    chosen: dict[str, tuple[nn.Linear, HadamardRotation]] = {}
    for p in patterns:
        hits = [(n, m) for n, m in model.named_modules() if re.search(p, n) and type(m) is nn.Linear]
        if not hits:
            names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
            raise EdgeCompressError(f"activations.hadamard pattern {p!r} matches no float linear layer",
                                    hint=f"linear layer names end in: {', '.join(names)}")
        for name, mod in hits:
            shared = [o for o in owners[id(mod.weight)] if o != name]
            if shared:
                raise EdgeCompressError(f"activations.hadamard: {name}'s weight is tied to {shared[0]}; rotating it "
                                        "would rotate both", hint=f"leave {name} out of activations.hadamard")
            if not quantized(name):
                raise EdgeCompressError(f"activations.hadamard names {name}, which this step's targets/ignore "
                                        "leave unquantized", hint="quantize every layer activations.hadamard names")
            chosen[name] = (mod, HadamardRotation.of_size(mod.in_features))
    for mod, rot in chosen.values():
        mod.weight.data = (mod.weight.data.double() @ rot.matrix()).to(mod.weight.dtype)
    return {name: rot for name, (_, rot) in chosen.items()}

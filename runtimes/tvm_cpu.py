"""TVM on the CPU: the KV-cache decoder compiled by :mod:`edgecompress.export.tvm`, run by the Relax VM.

It runs two kinds of causal-LM artifact:

* a **TVM artifact** (``export: [{format: tvm, target: llvm}]`` in a recipe, or ``edgecompress
  export ARTIFACT --to tvm``): ``model.so`` + ``params.safetensors``. The TVM version, CPU and
  calling convention in its manifest are compared with this process *before* the library is
  loaded; a library built for another TVM or CPU is refused (it could fail to load, crash, or
  execute instructions this CPU lacks);
* an **ONNX artifact**: compiled for this machine's CPU on first use (seconds for SmolLM2-135M)
  into the cache, ``~/.cache/edgecompress/tvm/<key>`` (or ``$EDGECOMPRESS_CACHE/tvm``), keyed by
  the ONNX files' sha256, the TVM version, the CPU, the calling convention and the compiler's own
  source (``export/tvm*.py``), and reused after.

Both run the same library, ``main(input_ids, *kv_cache_views, *params) -> logits`` (and
``decode``, the same for one new token with static shapes): the runtime
allocates one ``[positions, kv_heads, head_dim]`` buffer per layer and key/value for the whole
generation and passes views of its first ``past + new`` rows; the library writes the new rows in
place (no cache copies per token). The parameters are loaded once.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgecompress.artifact import Artifact, atomic_folder
from edgecompress.errors import ArtifactError, EdgeCompressError

from .base import Generation, Runtime, Timer

log = logging.getLogger(__name__)

INFO_FILE = "tvm.json"  # the ``tvm`` manifest section of a library compiled into the cache


def host() -> dict[str, str]:
    """TVM version, LLVM host triple and CPU of this process."""
    from edgecompress.export.tvm_kernels import host as _host

    return _host()


def check_compatible(info: dict[str, Any], folder: Path) -> None:
    """Refuse (ArtifactError) a library whose manifest names another TVM, CPU or calling convention."""
    from edgecompress.export.tvm import INTERFACE

    here = host()
    problems = []
    if info.get("interface") != INTERFACE:
        problems.append(f"calling convention {info.get('interface')!r} (this edgecompress expects {INTERFACE!r})")
    if info.get("tvm_version") != here["tvm_version"]:
        problems.append(f"TVM {info.get('tvm_version')} (this process has TVM {here['tvm_version']})")
    if str(info.get("triple", "")).split("-")[0] != here["triple"].split("-")[0]:
        problems.append(f"{info.get('triple')} (this machine is {here['triple']})")
    if info.get("mcpu") != here["mcpu"]:
        problems.append(f"CPU {info.get('mcpu')!r} (this machine's CPU is {here['mcpu']!r})")
    if problems:
        source = (info.get("source") or {}).get("artifact") or "ONNX_ARTIFACT"
        raise ArtifactError(
            f"{folder / info.get('library', 'model.so')} was compiled for {'; '.join(problems)}: not loading it",
            hint=f"compile it again here: `edgecompress export {source} --to tvm --target llvm -o OUT --force`, "
                 "or run the ONNX artifact with --runtime tvm-cpu (compiled on first use) or ort-cpu")


def _cache_key(artifact: Artifact) -> str:
    from edgecompress.export.tvm import INTERFACE

    files = artifact.manifest.get("files", {})
    onnx_files = {k: v.get("sha256") for k, v in files.items() if k.startswith(artifact.onnx_path.name)}
    # the graph file itself is always hashed (small: the weights are external data), so an edited
    # graph loaded without verification (--no-verify) does not reuse another graph's library
    onnx_files[artifact.onnx_path.name] = hashlib.sha256(artifact.onnx_path.read_bytes()).hexdigest()
    import edgecompress.export.tvm as compiler

    # every compiler module (tvm.py, tvm_kernels.py, the tvm_* rewrites): a new kernel recompiles
    sources = sorted(Path(compiler.__file__).parent.glob("tvm*.py"))
    code = hashlib.sha256(b"".join(p.name.encode() + p.read_bytes() for p in sources)).hexdigest()
    blob = json.dumps({"onnx": onnx_files, "host": host(), "interface": INTERFACE, "compiler": code}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def compiled_library(artifact: Artifact, cache_dir: Path | None = None) -> tuple[Path, dict[str, Any]]:
    """(folder, ``tvm`` section) of the library that runs ``artifact``: the TVM artifact itself
    (checked against this machine), or the ONNX artifact compiled into the cache."""
    if artifact.format == "tvm":
        info = artifact.manifest.get("tvm")
        if not info:
            raise ArtifactError(f"{artifact.path} is a TVM artifact without a 'tvm' section in its manifest",
                                hint="re-export it")
        check_compatible(info, artifact.path)
        return artifact.path, info
    if artifact.task != "causal-lm":
        raise EdgeCompressError(f"runtime tvm-cpu runs causal-LM decoders, not {artifact.task} artifacts",
                                hint="use --runtime ort-cpu")
    from edgecompress.export.tvm import build_decoder
    from edgecompress.models import cache_root
    from edgecompress.progress import console

    folder = cache_root(cache_dir) / "tvm" / _cache_key(artifact)
    if (folder / INFO_FILE).is_file():
        info = json.loads((folder / INFO_FILE).read_text())
        check_compatible(info, folder)
        log.info("TVM library from the cache: %s", folder)
        return folder, info
    console.log(f"compiling {artifact.path} with TVM for this CPU (once; cached in {folder})")
    with atomic_folder(folder, force=True) as tmp:
        info = build_decoder(artifact.onnx_path, tmp)
        info["source"] = {"artifact": str(artifact.path)}
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2))
    console.log(f"compiled in {info['import_seconds'] + info['compile_seconds']:.1f} s")
    return folder, info


class TvmCpuRuntime(Runtime):
    """A causal-LM artifact (TVM, or ONNX compiled on first use) on the Relax VM, on the CPU."""

    name = "tvm-cpu"

    def __init__(self, artifact: Artifact, *, threads: int | None = None):
        super().__init__(artifact, threads=threads)
        if self.prefix is not None:
            raise ArtifactError(f"{artifact.path} starts every sequence from a shipped float prefix (W8A8 "
                                "float_prefix), which the tvm-cpu runtime does not load",
                                hint="run it with --runtime ort-cpu")
        import tvm
        from safetensors.numpy import load_file
        from tvm import relax

        from edgecompress.export.tvm_kernels import set_threads

        folder, self.info = compiled_library(artifact)
        set_threads(threads)
        self.dev = tvm.cpu()
        self._tensor = tvm.runtime.tensor
        self.vm = relax.VirtualMachine(tvm.runtime.load_module(str(folder / self.info["library"])), self.dev)
        self._main, self._decode = self.vm["main"], self.vm["decode"]
        stored = load_file(str(folder / self.info["params_file"]))
        self.params = [self._tensor(stored[k], self.dev) for k in sorted(stored)]
        kv = self.info["kv_cache"]
        self.n_layers, self.kv_heads, self.head_dim = kv["layers"], kv["kv_heads"], kv["head_dim"]
        self.max_positions = kv.get("max_positions")

    def _cache(self, capacity: int) -> list:
        """Zeroed KV buffers ``[capacity, kv_heads, head_dim]``, one per layer and key/value."""
        return [self._tensor(np.zeros((capacity, self.kv_heads, self.head_dim), np.float32), self.dev)
                for _ in range(2 * self.n_layers)]

    def _step(self, ids: np.ndarray, cache: list, total: int):
        """One call of ``main`` on the first ``total`` positions of ``cache`` (past + the new
        tokens, which it writes there in place); returns the logits ``[1, S, vocab]``."""
        if self.max_positions and total > self.max_positions:
            raise EdgeCompressError(f"{total} tokens exceed the {self.max_positions} positions this decoder "
                                    "was exported for", hint="use a shorter prompt or fewer new tokens")
        shape = (total, self.kv_heads, self.head_dim)
        fn = self._decode if ids.shape[1] == 1 else self._main  # decode: static shapes for one token
        return fn(self._tensor(ids, self.dev), *[c._create_view(shape) for c in cache], *self.params)

    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(input_ids, np.int64).reshape(1, -1)
        return self._step(ids, self._cache(ids.shape[1]), ids.shape[1]).numpy()[0]

    def generate(self, prompt_ids: list[int], max_new_tokens: int, *, eos_token_id: int | None = None,
                 on_token: Callable[[int], None] | None = None) -> Generation:
        p = len(prompt_ids)
        cache = self._cache(p + max_new_tokens)
        ids = np.asarray(prompt_ids, np.int64).reshape(1, p)
        with Timer() as prefill:
            tok = int(self._step(ids, cache, p).numpy()[0, -1].argmax())
        tokens = [tok]
        if on_token:
            on_token(tok)
        cur = np.zeros((1, 1), np.int64)
        with Timer() as decode:
            for t in range(p, p + max_new_tokens - 1):
                if eos_token_id is not None and tok == eos_token_id:
                    break
                cur[0, 0] = tok
                tok = int(self._step(cur, cache, t + 1).numpy()[0, -1].argmax())
                tokens.append(tok)
                if on_token:
                    on_token(tok)
        return Generation(tokens, p, prefill.seconds, decode.seconds)

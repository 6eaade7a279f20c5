"""One-time ONNX export of a packaged sentence-transformers model, cached on disk.

The ONNX embedder (:mod:`ragline.embed.onnx`) never downloads anything: the first time it meets a
model it exports the installed weights with ``torch.onnx.export`` (the TorchScript exporter,
``dynamo=False``: it needs ``onnx`` but not ``onnxscript``), optionally quantises the graph to int8
with ONNX Runtime's dynamic quantisation, and keeps the file in a cache directory
(``$RAGLINE_CACHE_DIR/onnx``, else ``$XDG_CACHE_HOME/ragline/onnx``, else ``~/.cache/ragline/onnx``).

The cache key hashes the weights, the model config and every export option, so new weights or a new
exporter revision never reuse a stale file.  Writes are atomic (a temporary file renamed into place)
and serialised by a lock file: two workers starting at once export once, the second one waits and
reuses the first one's file.  torch and transformers are imported only inside :func:`export`, so a
process that finds its model in the cache never imports them (start-up in well under a second).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from ragline.errors import ConfigError

__all__ = ["EXPORT_VERSION", "OPSET", "cache_root", "ensure_onnx", "export", "weights_key"]

log = logging.getLogger("ragline.embed.onnx")

EXPORT_VERSION = 2
"""Bumped whenever the exported graph changes (inputs, outputs, exporter settings).  2: the fp32 graph
is fused by ONNX Runtime's transformer optimizer (see :func:`_fuse`)."""
OPSET = 17
INT8_RECIPE = "dynamic-quint8-per-channel-const-b-matmul"
"""How int8 is made (part of its cache key).  Measured on SciFact chunks against fp32 (median / min
cosine): quantize_dynamic's defaults 0.944 / 0.905 (every MatMul, the attention products included,
per-tensor); QInt8 per-channel, weight MatMuls only 0.992 / 0.986; QUInt8 likewise 0.995 / 0.992."""
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_CONFIG_FILES = ("config.json", "sentence_bert_config.json")


def cache_root() -> Path:
    """Where exported models live: ``$RAGLINE_CACHE_DIR/onnx`` or the user's cache dir."""
    env = os.environ.get("RAGLINE_CACHE_DIR")
    if env:
        return Path(env).expanduser() / "onnx"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "ragline" / "onnx"


def weights_key(model_dir: Path, quantize: str) -> str:
    """A short hash of the weights, the model config and the export options (the cache key).

    The weights are hashed in full (~0.1 s for MiniLM's 90 MB): a size and mtime would let two
    different copies of the same model collide, or a touched file miss the cache.
    """
    h = hashlib.blake2b(digest_size=12)
    found = False
    for name in _WEIGHT_FILES:
        p = model_dir / name
        if p.is_file():
            with p.open("rb") as f:
                h.update(hashlib.file_digest(f, "blake2b").digest())
            found = True
            break
    if not found:
        raise ConfigError(f"no model weights ({' or '.join(_WEIGHT_FILES)}) in {model_dir}")
    for name in _CONFIG_FILES:
        p = model_dir / name
        if p.is_file():
            h.update(p.read_bytes())
    options: dict[str, object] = {"v": EXPORT_VERSION, "opset": OPSET, "quantize": quantize}
    if quantize != "none":
        options["recipe"] = INT8_RECIPE
    h.update(orjson.dumps(options))
    return h.hexdigest()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (a lock file) for the duration; other exporters wait."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _atomic_target(final: Path) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=final.name + ".", suffix=".tmp", dir=final.parent)
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the export from other users of a shared cache dir
    return Path(tmp)


def ensure_onnx(model_dir: Path, quantize: str = "none", root: Path | None = None) -> Path:
    """The cached ONNX file of ``model_dir`` (exported, and quantised, on first use)."""
    root = root or cache_root()
    key = weights_key(model_dir, quantize)
    final = root / key / "model.onnx"
    if final.is_file():
        return final
    with _locked(root / f"{key}.lock"):
        if final.is_file():  # another process exported it while we waited
            return final
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = _atomic_target(final)
        try:
            log.warning("exporting %s to ONNX once (cached in %s)", model_dir, final.parent)
            plain = tmp.with_suffix(".plain.onnx")
            try:
                export(model_dir, plain)
                if quantize == "none":
                    _fuse(model_dir, plain, tmp)
                else:  # the int8 recipe was measured on the unfused graph: it quantises that one
                    _quantize(plain, tmp, quantize)
            finally:
                plain.unlink(missing_ok=True)
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        meta = {"model_dir": str(model_dir), "quantize": quantize, "export_version": EXPORT_VERSION, "opset": OPSET}
        (final.parent / "export.json").write_bytes(orjson.dumps(meta, option=orjson.OPT_INDENT_2))
    return final


def export(model_dir: Path, out: Path) -> None:
    """Export the transformer of ``model_dir`` to ONNX at ``out``: inputs ``input_ids``,
    ``attention_mask``, ``token_type_ids`` (batch x sequence, int64), output the last hidden state
    (batch x sequence x dim); pooling and normalisation happen outside the graph."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import torch
        from transformers import AutoModel
    except ImportError:
        raise ConfigError(
            "the first use of embedder.provider onnx exports the model once and needs torch and transformers "
            "(pip install torch transformers); or set embedder.provider: local"
        ) from None
    try:
        import onnx  # noqa: F401  # the TorchScript exporter serialises through it
    except ImportError:
        raise ConfigError("the one-time ONNX export needs the onnx package (pip install onnx)") from None

    model: Any = AutoModel.from_pretrained(str(model_dir), local_files_only=True, attn_implementation="eager")
    model.eval()

    class _Hidden(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            return self.inner(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state

    ids = torch.ones((2, 16), dtype=torch.long)
    mask = torch.ones((2, 16), dtype=torch.long)
    mask[1, 10:] = 0  # a padded row, so the traced mask arithmetic is the general one
    types = torch.zeros((2, 16), dtype=torch.long)
    axes = {0: "batch", 1: "sequence"}
    with torch.no_grad():
        torch.onnx.export(
            _Hidden(model),
            (ids, mask, types),
            str(out),
            input_names=["input_ids", "attention_mask", "token_type_ids"],
            output_names=["last_hidden_state"],
            dynamic_axes={"input_ids": axes, "attention_mask": axes, "token_type_ids": axes, "last_hidden_state": axes},
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )


def _fuse(model_dir: Path, src: Path, out: Path) -> None:
    """Fuse the exported BERT graph with ONNX Runtime's transformer optimizer (one Attention op per
    layer, SkipLayerNormalization, BiasGelu, EmbedLayerNormalization) into ``out``.

    Measured on a 2-core AVX2 host (``benchmarks/onnx_embedder.py``): one short query 9.9 → 5.9 ms
    with 2 threads, the same vectors (cosine 1.0000 against the unfused graph on 128 SciFact chunks).
    A model the optimizer cannot fuse (another architecture, or no ``onnxruntime.transformers``)
    keeps the unfused graph, which gives the same vectors, only slower."""
    import shutil

    try:
        from onnxruntime.transformers.optimizer import optimize_model

        config = orjson.loads((model_dir / "config.json").read_bytes())
        if config.get("model_type") != "bert":
            raise ValueError(f"model_type {config.get('model_type')!r} is not bert")
        model = optimize_model(
            str(src),
            model_type="bert",
            num_heads=int(config["num_attention_heads"]),
            hidden_size=int(config["hidden_size"]),
            opt_level=1,  # fusions only: level 2+ bakes CPU-specific kernels into the file
        )
        fused = model.get_fused_operator_statistics()
        if not fused.get("Attention"):
            raise ValueError(f"nothing fused: {fused}")
        model.save_model_to_file(str(out))
    except Exception as e:  # any failure here only costs speed
        log.warning("keeping the unfused ONNX graph (%s: %s)", type(e).__name__, e)
        shutil.copyfile(src, out)


def _quantize(src: Path, out: Path, mode: str) -> None:
    """Dynamic int8 quantisation of ``src`` (see ``INT8_RECIPE``): the weight matrices per output
    channel, activations at run time; the attention's activation-by-activation products stay fp32."""
    if mode != "int8":
        raise ConfigError(f"embedder.quantize {mode!r} is not supported (none or int8)")
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError:
        raise ConfigError("embedder.quantize int8 needs onnxruntime with its quantization tools and onnx") from None
    log.warning("quantising %s to int8 once", src)
    quantize_dynamic(
        str(src),
        str(out),
        op_types_to_quantize=["MatMul", "Gemm"],
        per_channel=True,
        weight_type=QuantType.QUInt8,
        extra_options={"MatMulConstBOnly": True},
    )

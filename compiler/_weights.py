"""Weights stored once: one file that every ONNX part of a bundle reads its initializers from.

A model cut at k points has 2k + 1 parts (and as many ONNX Runtime-optimized forms); stored
naively each carries its own copy of the weights it reads, and a 47 MB ResNet-18 becomes a
446 MB bundle. Here every initializer of at least :data:`MIN_EXTERNAL_BYTES` is written once
into :class:`WeightStore`'s file and every part references it through ONNX external data
(``location``, ``offset``, ``length``), so a part loads only the byte ranges of its own
weights, and the bundle is about one model's weights plus the graphs, whatever the number of
cuts.

Each part saved so carries ``tandem.weights_sha256`` in its ``metadata_props``: a digest of the
content of every initializer it reads, so the part file's own sha256 (an engine cache key)
changes whenever its weights do, although the weights are elsewhere.

Tensors are deduplicated by content (ONNX type, dims and a sha256 of the bytes), so a weight
that ONNX Runtime's ahead-of-time optimization leaves as it was is not stored twice; a tensor the
optimization *creates* (a folded or packed weight) is new content and is added. Large tensors
start on a 4096-byte boundary (ONNX Runtime can map those pages), others on 64 bytes.

ONNX Runtime refuses external data outside the model file's directory, so the store's file and
every ONNX file that reads it live in one directory (``parts/`` in a bundle).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

from tandem.protocol.lazy import require

if TYPE_CHECKING:  # pragma: no cover
    from onnx import ModelProto, TensorProto

__all__ = ["MIN_EXTERNAL_BYTES", "WEIGHTS_DIGEST_KEY", "WeightStore"]

MIN_EXTERNAL_BYTES = 1024
#: metadata_props key of each part: sha256 over its initializers' content
WEIGHTS_DIGEST_KEY = "tandem.weights_sha256"
_PAGE = 4096
_PAGE_ALIGNED_FROM = 64 * 1024


class WeightStore:
    """The shared weights file at ``path`` (created empty); :meth:`save` writes an ONNX model
    beside it with its large initializers moved into the file."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_bytes(b"")
        self._offsets: dict[tuple, tuple[int, int]] = {}  # content key -> (offset, length)
        self.size = 0

    def save(self, model: ModelProto, path: str | os.PathLike) -> Path:
        """Write ``model`` to ``path`` (in the store's directory) with every initializer of at
        least :data:`MIN_EXTERNAL_BYTES` read from the store, and without the nodes' debug
        metadata (``doc_string`` and ``metadata_props``: exporters put stack traces there, 90 %
        of a torch export's graph bytes). ``model`` is not changed."""
        onnx = require("onnx")
        path = Path(path)
        if path.parent.resolve() != self.path.parent.resolve():
            raise ValueError(f"{path} must be in {self.path.parent} to read {self.path.name}")
        out = _without_initializers(model)
        has_metadata = "metadata_props" in onnx.NodeProto.DESCRIPTOR.fields_by_name  # onnx>=1.16
        for node in out.graph.node:
            node.ClearField("doc_string")
            if has_metadata:
                node.ClearField("metadata_props")
        digest = hashlib.sha256()
        with open(self.path, "r+b") as store:
            for tensor in model.graph.initializer:
                ref, key = self._reference(tensor, store)
                out.graph.initializer.append(ref)
                digest.update(key)
        # the part's own bytes name its weights' content, so anything keyed by the part file's
        # digest (an engine cache) changes when its weights do
        for prop in list(out.metadata_props):
            if prop.key == WEIGHTS_DIGEST_KEY:
                out.metadata_props.remove(prop)
        entry = out.metadata_props.add()
        entry.key, entry.value = WEIGHTS_DIGEST_KEY, digest.hexdigest()
        tmp = path.with_name(f".{path.name}.tmp")
        onnx.save_model(out, str(tmp))
        os.replace(tmp, path)
        return path

    def adopt(self, path: str | os.PathLike) -> Path:
        """Rewrite the ONNX file at ``path`` (whose external data, if any, sits beside it) to
        read its initializers from the store; its own data files are removed."""
        onnx = require("onnx")
        path = Path(path)
        model = onnx.load(str(path), load_external_data=False)
        own = {e.value for t in model.graph.initializer
               if t.data_location == onnx.TensorProto.EXTERNAL
               for e in t.external_data if e.key == "location"}
        if own:
            onnx.external_data_helper.load_external_data_for_model(model, str(path.parent))
        self.save(model, path)
        for location in own:
            data = path.parent / location
            if data.resolve() != self.path.resolve():
                data.unlink(missing_ok=True)
        return path

    def mark(self) -> int:
        """A point to :meth:`rollback` to: the file's current size."""
        return self.size

    def rollback(self, mark: int) -> None:
        """Forget every tensor added after ``mark`` and cut the file back to it."""
        self._offsets = {k: v for k, v in self._offsets.items() if v[0] + v[1] <= mark}
        with open(self.path, "r+b") as f:
            f.truncate(mark)
        self.size = mark

    def _reference(self, tensor: TensorProto, store) -> tuple[TensorProto, bytes]:
        onnx = require("onnx")
        from onnx import numpy_helper

        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            raise ValueError(f"initializer {tensor.name!r} has no data loaded")
        if tensor.data_type == onnx.TensorProto.STRING:
            return tensor, hashlib.sha256(tensor.SerializeToString()).digest()
        raw = tensor.raw_data if tensor.HasField("raw_data") else \
            numpy_helper.from_array(numpy_helper.to_array(tensor)).raw_data
        if len(raw) < MIN_EXTERNAL_BYTES:
            return tensor, hashlib.sha256(raw).digest()
        key = (tensor.data_type, tuple(tensor.dims), hashlib.sha256(raw).digest())
        where = self._offsets.get(key)
        if where is None:
            align = _PAGE if len(raw) >= _PAGE_ALIGNED_FROM else 64
            offset = -(-self.size // align) * align
            store.seek(offset)
            store.write(raw)
            self.size = offset + len(raw)
            where = self._offsets[key] = (offset, len(raw))
        ref = onnx.TensorProto()
        ref.name = tensor.name
        ref.data_type = tensor.data_type
        ref.dims.extend(tensor.dims)
        ref.doc_string = tensor.doc_string
        ref.data_location = onnx.TensorProto.EXTERNAL
        for k, v in (("location", self.path.name), ("offset", str(where[0])),
                     ("length", str(where[1]))):
            entry = ref.external_data.add()
            entry.key, entry.value = k, v
        return ref, key[2]


def _without_initializers(model: ModelProto) -> ModelProto:
    """A copy of ``model`` with an empty initializer list (the weights are not copied)."""
    onnx = require("onnx")
    out = onnx.ModelProto()
    _copy_fields(model, out, skip="graph")
    _copy_fields(model.graph, out.graph, skip="initializer")
    return out


def _copy_fields(src, dst, skip: str) -> None:
    for field, value in src.ListFields():
        if field.name == skip:
            continue
        if isinstance(value, (str, bytes, int, float)):
            setattr(dst, field.name, value)
        elif hasattr(value, "CopyFrom"):  # a message field
            getattr(dst, field.name).CopyFrom(value)
        else:  # a repeated field
            getattr(dst, field.name).extend(value)

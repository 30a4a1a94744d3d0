"""`gantk info`: what a checkpoint, ONNX file, TorchScript file or digit classifier holds, as one plain dict.

Every kind reports kind, path, size, sha256, inputs and outputs (name, shape, dtype) and metadata;
checkpoints add config, step and images seen, classifiers their training data and held-out accuracy.
Anything that is not a gantk artefact raises CheckpointError with a one-line reason.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gantk.errors import CheckpointError

from . import check_crcs, export_kind, read_metadata
from .base import INPUT_NAME, OUTPUT_NAME

IMAGE_SHAPE = [1, 32, 32]
ONNX_TYPES = {1: "float32", 10: "float16", 11: "float64", 7: "int64", 6: "int32"}


def describe(path: str | Path) -> dict[str, Any]:
    from gantk.checkpoint import resolve

    path = Path(path)
    if path.is_dir():
        path = resolve(path)
    if not path.is_file():
        raise CheckpointError(f"not found: {path}")
    kind = export_kind(path)
    try:
        body = {"checkpoint": _checkpoint, "onnx": _onnx, "torchscript": _torchscript}[kind](path)
    except CheckpointError:
        body = _classifier(path) if kind == "checkpoint" else None
        if body is None:
            raise
        kind = "classifier"
    return {"kind": kind, **_file(path), **body}


def _file(path: Path) -> dict[str, Any]:
    from gantk.checkpoint import sha256

    return {"path": str(path), "size_bytes": path.stat().st_size, "sha256": sha256(path)}


def _io(latent_shape: list[int], dtype: str = "float32") -> dict[str, Any]:
    return {"inputs": [{"name": INPUT_NAME, "shape": ["N", *latent_shape], "dtype": dtype}],
            "outputs": [{"name": OUTPUT_NAME, "shape": ["N", *IMAGE_SHAPE], "dtype": dtype}]}


def _checkpoint(path: Path) -> dict[str, Any]:
    from gantk.checkpoint import generator_from, load

    s = load(path)
    return {**_io(list(s["latent_shape"])), "arch": s["config"]["arch"], "step": s["step"],
            "epoch": s.get("epoch"), "images_seen": s.get("images_seen"), "ema": s.get("ema") is not None,
            "world_size": s.get("world_size", 1), "global_batch": s["config"]["batch_size"] * s.get("world_size", 1),
            "compute_dtype": s.get("compute_dtype"), "best_fid": s.get("best_fid"),
            "generator_parameters": sum(p.numel() for p in generator_from(s).parameters()),  # not BN statistics
            "versions": s.get("versions", {}), "config": s["config"]}


def _classifier(path: Path) -> dict[str, Any] | None:
    """A digit classifier's description (`gantk classifier train`); None where `path` holds none."""
    from gantk import classifier

    try:
        c = classifier.load(path)
    except CheckpointError:
        return None
    m = c.meta
    return {"inputs": [{"name": "images", "shape": ["N", 32, 32], "dtype": "uint8"}],
            "outputs": [{"name": "features", "shape": ["N", m["feature_dim"]], "dtype": "float32"},
                        {"name": "probabilities", "shape": ["N", 10], "dtype": "float32"}],
            "heldout_accuracy": m.get("heldout_accuracy"), "data": m.get("source"),
            "data_sha256": m.get("data_sha256"), "train_images": m.get("n_train"),
            "heldout_images": m.get("n_heldout"), "epochs": m.get("epochs"),
            "parameters": int(sum(p.numel() for p in c.model.parameters())), "versions": m.get("versions", {})}


def _onnx(path: Path) -> dict[str, Any]:
    import onnx

    meta = read_metadata(path)
    model = onnx.load(str(path), load_external_data=False)
    ops: dict[str, int] = {}
    for node in model.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    return {"inputs": [_value(v) for v in model.graph.input], "outputs": [_value(v) for v in model.graph.output],
            "opset": opset, "producer": f"{model.producer_name} {model.producer_version}".strip(),
            "ops": ops, "metadata": _decoded(meta)}


def _value(v) -> dict[str, Any]:
    t = v.type.tensor_type
    shape = [d.dim_param or d.dim_value for d in t.shape.dim]
    return {"name": v.name, "shape": shape, "dtype": ONNX_TYPES.get(t.elem_type, str(t.elem_type))}


def _torchscript(path: Path) -> dict[str, Any]:
    """Metadata from the zip; names from the loaded module's forward schema."""
    from .torchscript import _quiet_jit

    meta = read_metadata(path)
    check_crcs(path, "TorchScript file")
    import torch

    try:
        with _quiet_jit():
            module = torch.jit.load(str(path), map_location="cpu")
    except Exception as e:
        raise CheckpointError(f"{path}: TorchScript file does not load ({str(e).splitlines()[0][:160]})") from None
    args = [a.name for a in module.forward.schema.arguments][1:]
    io = _io(json.loads(meta["latent_shape"]))
    io["inputs"][0]["name"] = args[0] if args else INPUT_NAME
    return {**io, "frozen": not any(True for _ in module.parameters()), "metadata": _decoded(meta)}


def _decoded(meta: dict[str, str]) -> dict[str, Any]:
    """Metadata with its JSON-valued entries (latent_shape, versions, output_range) decoded for reading."""
    out: dict[str, Any] = {}
    for k, v in meta.items():
        try:
            out[k] = json.loads(v) if v[:1] in "[{" else v
        except ValueError:
            out[k] = v
    return out

"""ONNX graph helpers of the INT8/FP16 export: loading, node naming, metadata copy, atomic save, the head's
decode nodes that stay float, and the exact rewrites applied before static INT8 (``REWRITES``).

Used by ``damage.tasks.export.quantize`` and ``damage.tasks.export.nncf_quant``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from damage.tasks.core.atomic import atomic_write
from damage.tasks.core.errors import DamageError
from damage.tasks.serving.metadata import encode, raw_props, set_props

# Ops that are decode / post-processing when they lie between the last Conv and an output.
DECODE_OPS = {"Concat", "Sigmoid", "Mul", "Add", "Sub", "Div", "Split", "Softmax", "Reshape", "Transpose",
              "Slice", "Gather", "Shape", "Unsqueeze", "Squeeze", "Cast", "Expand", "Range", "ConstantOfShape",
              "Tile", "Identity", "Constant", "Flatten", "Resize", "Sqrt", "Pow", "Equal", "Where"}


def load_onnx(path: Path):
    import onnx

    path = Path(path)
    if not path.is_file():
        raise DamageError(f"{path}: ONNX file not found")
    try:
        return onnx.load(str(path))
    except Exception as e:
        raise DamageError(f"{path}: not a readable ONNX model: {e}") from e


def model_opset(model) -> int:
    """The default-domain opset of an ONNX ModelProto."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 0


def head_postprocess_nodes(model) -> list[str]:
    """Names of the nodes between the last Conv of each head branch and the graph outputs.

    Walks producers backwards from every graph output; a Conv ends the walk (it stays
    quantizable) except the DFL expectation Conv (fed by a Softmax, fixed 0..reg_max-1
    weights), which is part of the box decode. Every node reached is decode/post-processing
    and must stay float: boxes in pixels and scores in 0..1 share Concats, and one uint8 scale
    for both zeroes the scores.
    """
    producer = {o: n for n in model.graph.node for o in n.output}
    seen: set[str] = set()
    names: list[str] = []
    stack = [o.name for o in model.graph.output]
    while stack:
        t = stack.pop()
        n = producer.get(t)
        if n is None:
            continue
        key = n.name or f"{n.op_type}:{n.output[0]}"
        if key in seen:
            continue
        seen.add(key)
        if n.op_type == "Conv":
            src = producer.get(n.input[0])
            if src is None or src.op_type not in ("Softmax", "Transpose", "Reshape"):
                continue  # last Conv of a learned branch: the walk stops here
            # DFL conv: Softmax -> (Transpose) -> Conv; keep walking through it
            if not _reaches_softmax(src, producer, depth=3):
                continue
        names.append(n.name)
        if n.op_type == "Shape":  # depends on the input's shape only, not its values
            continue
        stack.extend(i for i in n.input if i)
    return [n for n in names if n]


def _reaches_softmax(node, producer: dict, depth: int) -> bool:
    cur = node
    for _ in range(depth):
        if cur is None:
            return False
        if cur.op_type == "Softmax":
            return True
        cur = producer.get(cur.input[0]) if cur.input else None
    return False


def _attrs(node) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _forget_shapes(model, tensors: set[str]) -> None:
    """Drop the inferred shapes of ``tensors`` (a rewrite changed them; ORT re-infers)."""
    keep = [v for v in model.graph.value_info if v.name not in tensors]
    del model.graph.value_info[:]
    model.graph.value_info.extend(keep)


def rewrite_convtranspose(model) -> int:
    """Each ConvTranspose whose kernel equals its stride (no overlap: the mask prototype's 2x2/2 upsampling)
    becomes a 1x1 Conv to ``k*k`` times the channels and a DepthToSpace (CRD), in place; returns the count.

    Exact: output pixel ``(2i+di, 2j+dj)`` of channel ``co`` is ``sum_ci x[ci, i, j] W[ci, co, di, dj] + b[co]``,
    which is the 1x1 Conv's channel ``co*k*k + di*k + dj`` moved into place. The CPU provider has no int8
    ConvTranspose (a quantized one dequantizes its weights and runs in float); the 1x1 Conv becomes a
    QLinearConv and DepthToSpace moves uint8 bytes.
    """
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    users: dict[str, int] = {}
    for n in model.graph.node:
        for i in n.input:
            users[i] = users.get(i, 0) + 1
    done, changed = 0, set()
    for idx, n in reversed(list(enumerate(model.graph.node))):
        if n.op_type != "ConvTranspose" or len(n.input) < 2 or n.input[1] not in inits:
            continue
        a = _attrs(n)
        w = numpy_helper.to_array(inits[n.input[1]])
        if w.ndim != 4 or w.shape[2] != w.shape[3]:
            continue
        k = int(w.shape[2])
        if (list(a.get("strides", [1, 1])) != [k, k] or int(a.get("group", 1)) != 1
                or any(a.get("pads", [0, 0, 0, 0])) or any(d != 1 for d in a.get("dilations", [1, 1]))
                or any(a.get("output_padding", [0, 0])) or "output_shape" in a
                or a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")):
            continue
        cin, cout = int(w.shape[0]), int(w.shape[1])
        wc = np.ascontiguousarray(w.transpose(1, 2, 3, 0).reshape(cout * k * k, cin, 1, 1))
        ins = [n.input[0], f"{n.name}/as_conv.weight"]
        new_inits = [numpy_helper.from_array(wc, ins[1])]
        if len(n.input) > 2 and n.input[2]:
            b = numpy_helper.to_array(inits[n.input[2]])
            ins.append(f"{n.name}/as_conv.bias")
            new_inits.append(numpy_helper.from_array(np.repeat(b, k * k).astype(b.dtype), ins[2]))
        mid = f"{n.output[0]}/as_conv"
        conv = helper.make_node("Conv", ins, [mid], name=f"{n.name}/as_conv", kernel_shape=[1, 1])
        d2s = helper.make_node("DepthToSpace", [mid], [n.output[0]], name=f"{n.name}/depth_to_space",
                               blocksize=k, mode="CRD")
        model.graph.node.remove(n)
        model.graph.node.insert(idx, d2s)
        model.graph.node.insert(idx, conv)
        model.graph.initializer.extend(new_inits)
        for t in n.input[1:]:
            if t and users.get(t) == 1:
                model.graph.initializer.remove(inits[t])
        changed.add(n.output[0])
        done += 1
    _forget_shapes(model, changed)
    return done


def rewrite_dfl_softmax(model) -> int:
    """The DFL's ``Transpose(0,2,1,3) -> Softmax(axis=1) -> Conv(1x1, weights 0..15)`` becomes
    ``Transpose(0,1,3,2) -> Softmax(axis=-1) -> MatMul(weights)``, in place; returns the count.

    Same float maths on the same values: the softmax runs over the innermost axis (ORT's Softmax on
    another axis transposes its input and output around the computation), and the MatMul's
    ``(b, 4, anchors, 1)`` has the Conv's ``(b, 1, 4, anchors)`` memory order, so the Reshape after
    it is unchanged. It stays float: it is the box decode.
    """
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    done, changed = 0, set()
    for sm in [n for n in model.graph.node if n.op_type == "Softmax"]:
        tr = producer.get(sm.input[0])
        after = consumers.get(sm.output[0], [])
        if (tr is None or tr.op_type != "Transpose" or list(_attrs(tr).get("perm", [])) != [0, 2, 1, 3]
                or len(consumers.get(tr.output[0], [])) != 1 or _attrs(sm).get("axis") != 1
                or len(after) != 1 or after[0].op_type != "Conv" or len(after[0].input) != 2
                or after[0].input[1] not in inits):
            continue
        conv = after[0]
        w = numpy_helper.to_array(inits[conv.input[1]])
        if w.ndim != 4 or w.shape[0] != 1 or w.shape[2:] != (1, 1) or int(_attrs(conv).get("group", 1)) != 1:
            continue
        if not all(c.op_type == "Reshape" for c in consumers.get(conv.output[0], [])):
            continue  # only a Reshape may read the (b, 1, 4, a) -> (b, 4, a, 1) change of shape
        for a in tr.attribute:
            if a.name == "perm":
                a.ints[:] = [0, 1, 3, 2]
        for a in sm.attribute:
            if a.name == "axis":
                a.i = -1
        wname = f"{conv.name}/as_matmul.weight"
        model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w.reshape(-1, 1)), wname))
        mm = helper.make_node("MatMul", [sm.output[0], wname], [conv.output[0]], name=conv.name)
        idx = list(model.graph.node).index(conv)
        model.graph.node.remove(conv)
        model.graph.node.insert(idx, mm)
        if not any(conv.input[1] in n.input for n in model.graph.node):
            model.graph.initializer.remove(inits[conv.input[1]])
        changed |= {tr.output[0], sm.output[0], conv.output[0]}
        done += 1
    _forget_shapes(model, changed)
    return done


# Exact rewrites of the graph ``int8-static`` quantizes (the float export is untouched), by name.
REWRITES: dict[str, Callable[[Any], int]] = {"convtranspose": rewrite_convtranspose, "dfl_softmax": rewrite_dfl_softmax}


def ensure_node_names(model) -> None:
    """Give every unnamed node a stable name (exclusion lists refer to nodes by name)."""
    used = {n.name for n in model.graph.node if n.name}
    for i, n in enumerate(model.graph.node):
        if not n.name:
            name = f"{n.op_type}_{i}"
            while name in used:
                name += "_"
            n.name = name
            used.add(name)


def copy_metadata(src, dst, extra: dict[str, Any]) -> None:
    """Copy metadata_props (names, imgsz, stride, thresholds) and add ``extra`` (``damage.*`` JSON)."""
    set_props(dst, {**raw_props(src), **encode(extra)})


def save_onnx_atomic(model, out: Path) -> Path:
    import onnx

    return atomic_write(out, lambda tmp: onnx.save(model, tmp))


def graph_input_name(model) -> str:
    """The graph input that is not an initializer (the image tensor)."""
    inits = {i.name for i in model.graph.initializer}
    return next(i.name for i in model.graph.input if i.name not in inits)

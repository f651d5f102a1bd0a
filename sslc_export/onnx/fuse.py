"""Fuse optimum's unfused decoder graph into onnxruntime's contrib operators (com.microsoft).

    fused = fuse(model, config)   # after the MatMul rewrite and quantization, before saving

What is fused, per decoder layer of a LLaMA / Qwen2 / Mistral export (task text-generation-with-past):
- attention: the rotary embedding of q and k, the KV-cache Concat, repeat_kv, the scaled scores, the causal
  and padding mask, Softmax and the weighted sum become one GroupQueryAttention (do_rotary=1, its own
  cos/sin cache computed from the config), fed by the q, k and v projection outputs, as onnxruntime-genai's
  model builder does. seqlens_k and total_sequence_length come from attention_mask, once per graph.
- RMSNorm: Pow/ReduceMean/Add/Sqrt/Div/Mul (and optimum's fp32 Casts) becomes SimplifiedLayerNormalization,
  and SkipSimplifiedLayerNormalization where a residual Add feeds it (the Add's sum comes out of the fused
  node's fourth output).

- q/k/v packing: where q, k and v are three weight nodes on one input (MatMul, MatMulNBits with equal
  settings, or our `ai.sslc` operators of one kind, each with an optional bias Add: the dense and int4
  baselines, the sparse formats), they become one node whose output GroupQueryAttention reads as its packed
  query, as in the model builder's graph. `ai.sslc` nodes merge exactly (sparse_rows.merge).
- gated MLP: where gate_proj and up_proj are `ai.sslc` nodes on one input and the graph computes
  silu(gate)·up (optimum's Sigmoid and two Muls), the five nodes become one `ai.sslc` node with
  activation "swiglu" (onnxruntime has no CPU SwiGLU operator for plain MatMuls to use).

What is never touched: the joined/structured layouts' MatMul chains (each projection on its own input,
so never packed), the o_proj, the down_proj and the lm_head; they only get new neighbours. About half of
a decode step is per-node cost, so fewer, larger nodes pay twice. The fusion reads no shapes and creates
no onnxruntime session: it matches node patterns by their structure (anchored on the graph outputs
present.N.key / present.N.value), so it works on graphs onnxruntime could not even load without our
custom-op library. A layer whose attention does not match the expected structure is left unfused
(and reported by `fused_op_counts`), never half-rewritten.

The graph's inputs and outputs keep their names, order and shapes (position_ids stays an input even though
the fused graph reads positions from attention_mask), so optimum's ORTModelForCausalLM, our
runtimes.session.OnnxCausalLM and onnxruntime-genai (through the folder's genai_config.json) drive it
unchanged. Batch 1 and unpadded batches are exact; GroupQueryAttention treats padding as onnxruntime-genai
does (a right-aligned attention_mask), which differs from optimum's unfused graph for left-padded batches.
"""
from __future__ import annotations

import heapq
from collections import Counter, deque

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from transformers import PretrainedConfig

from sslc_export.sparse_rows import DOMAIN as SPARSE_DOMAIN
from sslc_export.sparse_rows import SparseRows, merge

MS_DOMAIN = "com.microsoft"
FUSED_OPS = ("GroupQueryAttention", "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization")
_BNSH = [0, 2, 1, 3]  # (batch, seq, heads, dim) <-> (batch, heads, seq, dim)
_SEARCH_LIMIT = 400  # nodes visited per bounded walk: a layer's attention core is ~100 nodes


def fuse(model: onnx.ModelProto, config: PretrainedConfig, attention: bool = True, norms: bool = True,
         pack_qkv: bool = True, gated_mlp: bool = True) -> onnx.ModelProto:
    """Return `model` (changed in place) with attention, RMSNorm and gated MLPs fused; see the module docstring.
    `attention`: the model family's word that GroupQueryAttention computes its attention (models/architectures.py)."""
    if not _fp32(model):
        return model  # the patterns below skip optimum's Casts to float, which are identities only on an fp32 graph
    graph = _Graph(model)
    if attention:
        _fuse_attention(graph, config, pack_qkv)
    if norms:
        _fuse_rms_norms(graph)
    if gated_mlp:
        _fuse_gated_mlps(graph)
    graph.finish()
    if not any(opset.domain == MS_DOMAIN for opset in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return model


def _fp32(model: onnx.ModelProto) -> bool:
    logits = [o for o in model.graph.output if o.name == "logits"]
    return bool(logits) and logits[0].type.tensor_type.elem_type == TensorProto.FLOAT


def fused_op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """How many of each fused operator the graph holds, how many attentions read one packed q/k/v
    projection, and how many gated MLPs run as one swiglu node."""
    counts = Counter(node.op_type for node in model.graph.node if node.domain in ("", MS_DOMAIN))
    packed = sum(1 for node in model.graph.node if node.op_type == "GroupQueryAttention" and len(node.input) > 1 and not node.input[1])
    swiglu = sum(1 for node in model.graph.node if node.domain == SPARSE_DOMAIN and _attr(node, "activation") == b"swiglu")
    return {**{op: counts.get(op, 0) for op in FUSED_OPS}, "packed_qkv": packed, "swiglu": swiglu}


class _Graph:
    """Producer/consumer maps over a mutable node list; removed nodes are dropped by `finish`."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.graph = model.graph
        self.nodes: list[onnx.NodeProto] = list(self.graph.node)
        self.initializers = {init.name: init for init in self.graph.initializer}
        self.inputs = {i.name for i in self.graph.input}
        self.outputs = [o.name for o in self.graph.output]
        self.added_initializers: list[onnx.TensorProto] = []
        self.reindex()

    def reindex(self) -> None:
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in self.nodes:
            for name in node.output:
                if name:
                    self.producer[name] = node
            for name in node.input:
                if name:
                    self.consumers.setdefault(name, []).append(node)

    def parent(self, node: onnx.NodeProto, index: int) -> onnx.NodeProto | None:
        return self.producer.get(node.input[index]) if index < len(node.input) else None

    def constant(self, name: str) -> np.ndarray | None:
        """The value of an initializer or Constant node output (through Identity), else None."""
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        node = self.producer.get(name)
        if node is None:
            return None
        if node.op_type == "Identity":
            return self.constant(node.input[0])
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t)
                if attr.name in ("value_float", "value_int"):
                    return np.array(helper.get_attribute_value(attr))
                if attr.name in ("value_floats", "value_ints"):
                    return np.array(helper.get_attribute_value(attr))
        return None

    def unique(self, prefix: str) -> str:
        taken = getattr(self, "_taken", None)
        if taken is None:
            taken = self._taken = {n.name for n in self.nodes} | set(self.producer) | set(self.initializers) | self.inputs
        name, i = prefix, 0
        while name in taken:
            i += 1
            name = f"{prefix}_{i}"
        taken.add(name)
        return name

    def finish(self) -> None:
        """Drop every node no graph output depends on, unused initializers, then sort topologically."""
        needed = set(self.outputs)
        keep: list[onnx.NodeProto] = []
        for node in reversed(_topological(self.nodes)):
            if any(name in needed for name in node.output if name):
                keep.append(node)
                needed.update(name for name in node.input if name)
                needed.update(_subgraph_inputs(node))
        keep.reverse()
        del self.graph.node[:]
        self.graph.node.extend(keep)
        self.graph.initializer.extend(self.added_initializers)
        used = {name for node in keep for name in node.input} | set(self.outputs) | {n for node in keep for n in _subgraph_inputs(node)}
        kept_initializers = [init for init in self.graph.initializer if init.name in used]
        del self.graph.initializer[:]
        self.graph.initializer.extend(kept_initializers)
        # shapes recorded by the exporter for tensors that no longer exist would only mislead
        produced = {name for node in keep for name in node.output}
        kept_info = [vi for vi in self.graph.value_info if vi.name in produced]
        del self.graph.value_info[:]
        self.graph.value_info.extend(kept_info)


def _subgraph_inputs(node: onnx.NodeProto) -> set[str]:
    """Outer-scope names read inside If/Loop/Scan bodies (optimum's decoder graphs have none, but be safe)."""
    names: set[str] = set()
    for attr in node.attribute:
        for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
            for inner in sub.node:
                names.update(inner.input)
                names.update(_subgraph_inputs(inner))
    return names


def _topological(nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """Kahn's order, stable with respect to the given order (rewritten subgraphs keep their layout)."""
    produced_by = {name: i for i, node in enumerate(nodes) for name in node.output if name}
    waiting = [0] * len(nodes)
    dependents: dict[int, list[int]] = {}
    for i, node in enumerate(nodes):
        deps = {produced_by[name] for name in list(node.input) + sorted(_subgraph_inputs(node)) if name in produced_by}
        deps.discard(i)
        waiting[i] = len(deps)
        for d in deps:
            dependents.setdefault(d, []).append(i)
    ready = [i for i, count in enumerate(waiting) if count == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(nodes[i])
        for j in dependents.get(i, []):
            waiting[j] -= 1
            if waiting[j] == 0:
                heapq.heappush(ready, j)
    if len(order) != len(nodes):
        raise ValueError("the graph has a cycle after fusion: refusing to write it")
    return order


def _perm(node: onnx.NodeProto) -> list[int] | None:
    for attr in node.attribute:
        if attr.name == "perm":
            return list(attr.ints)
    return None


def _attr(node: onnx.NodeProto, name: str, default=None):
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


# ---------------------------------------------------------------- attention -> GroupQueryAttention


def _head_split_source(g: _Graph, start: str) -> str | None:
    """Walk up from `start` (a (B, heads, S, D) tensor, possibly after rotary) to the one
    Transpose(0,2,1,3) <- Reshape that splits heads; return the Reshape's data input (B, S, heads*D)."""
    found: set[str] = set()
    seen: set[str] = set()
    queue = deque([start])
    while queue and len(seen) < _SEARCH_LIMIT:
        name = queue.popleft()
        node = g.producer.get(name)
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        if node.op_type == "Transpose" and _perm(node) == _BNSH:
            reshape = g.parent(node, 0)
            if reshape is not None and reshape.op_type == "Reshape":
                found.add(reshape.input[0])
                continue  # never walk past the head split: that is the projection, left untouched
        queue.extend(i for i in node.input if i)
    return found.pop() if len(found) == 1 else None


def _descendant_matmuls(g: _Graph, start: str) -> tuple[set[str], list[onnx.NodeProto]]:
    """Tensors reachable downward from `start` before any MatMul, and the MatMuls that stop the walk."""
    reached: set[str] = {start}
    matmuls: list[onnx.NodeProto] = []
    queue = deque([start])
    visited = 0
    while queue and visited < _SEARCH_LIMIT:
        name = queue.popleft()
        for node in g.consumers.get(name, []):
            visited += 1
            if node.op_type == "MatMul":
                if node not in matmuls:
                    matmuls.append(node)
                continue
            for out in node.output:
                if out and out not in reached:
                    reached.add(out)
                    queue.append(out)
    return reached, matmuls


def _rope_caches(config: PretrainedConfig, head_dim: int) -> tuple[np.ndarray, np.ndarray] | None:
    """cos/sin caches (max_positions, rotary_dim/2) exactly as transformers computes them, or None for
    rope variants whose frequencies depend on the sequence length (GroupQueryAttention has one cache)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = getattr(config, "rope_scaling", None) or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in ("default", "linear", "llama3", "yarn") or rope_type not in ROPE_INIT_FUNCTIONS:
        return None
    if rope_type == "default":
        import torch

        base = getattr(config, "rope_theta", 10000.0)
        dim = int(head_dim * getattr(config, "partial_rotary_factor", 1.0))
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        factor = 1.0
    else:
        inv_freq, factor = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
    if inv_freq.shape[0] * 2 != head_dim:
        return None  # partial rotary: not what optimum's pattern below was checked against
    positions = np.arange(config.max_position_embeddings, dtype=np.float32)
    freqs = np.outer(positions, inv_freq.float().numpy().astype(np.float32))
    return (np.cos(freqs) * factor).astype(np.float32), (np.sin(freqs) * factor).astype(np.float32)


def _fuse_attention(g: _Graph, config: PretrainedConfig, pack_qkv: bool = True) -> int:
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if "attention_mask" not in g.inputs:
        return 0
    caches = _rope_caches(config, head_dim)
    if caches is None:
        return 0
    plans = []
    for layer in range(config.num_hidden_layers):
        plan = _match_attention(g, layer)
        if plan is not None:
            plans.append(plan)
    if not plans:
        return 0

    cos_name, sin_name = g.unique("gqa_cos_cache"), g.unique("gqa_sin_cache")
    g.added_initializers += [numpy_helper.from_array(caches[0], cos_name), numpy_helper.from_array(caches[1], sin_name)]
    seqlens, total = g.unique("/model/gqa/seqlens_k"), g.unique("/model/gqa/total_sequence_length")
    one, axis_one = g.unique("/model/gqa/one"), g.unique("/model/gqa/axis_one")
    g.added_initializers += [numpy_helper.from_array(np.array(1, np.int64), one),
                             numpy_helper.from_array(np.array([1], np.int64), axis_one)]
    mask_sum, mask_last, mask_shape, mask_len = (g.unique(f"/model/gqa/{n}") for n in ("sum", "last", "shape", "length"))
    setup = [
        helper.make_node("ReduceSum", ["attention_mask", axis_one], [mask_sum], name=mask_sum, keepdims=0),
        helper.make_node("Sub", [mask_sum, one], [mask_last], name=mask_last),
        helper.make_node("Cast", [mask_last], [seqlens], name=seqlens, to=TensorProto.INT32),
        helper.make_node("Shape", ["attention_mask"], [mask_shape], name=mask_shape),
        helper.make_node("Gather", [mask_shape, one], [mask_len], name=mask_len, axis=0),
        helper.make_node("Cast", [mask_len], [total], name=total, to=TensorProto.INT32),
    ]
    removed: set[int] = set()
    fused = []
    for layer, q, k, v, out, out_node, concat_k, concat_v in plans:
        removed.update(id(n) for n in (out_node, concat_k, concat_v))
        packed = _pack_qkv(g, layer, q, k, v) if pack_qkv else None
        if packed is not None:
            fused += packed[1]
            q, k, v = packed[0], "", ""
        fused.append(helper.make_node(
            "GroupQueryAttention",
            [q, k, v, concat_k.input[0], concat_v.input[0], seqlens, total, cos_name, sin_name],
            [out, concat_k.output[0], concat_v.output[0]],
            name=f"/model/layers.{layer}/self_attn/GroupQueryAttention", domain=MS_DOMAIN,
            num_heads=heads, kv_num_heads=kv_heads, scale=float(head_dim ** -0.5),
            do_rotary=1, rotary_interleaved=0, local_window_size=-1,
        ))
    g.nodes = setup + [n for n in g.nodes if id(n) not in removed] + fused
    g.reindex()
    return len(fused)


def _projection(g: _Graph, name: str):
    """(weight node, bias or None) when `name` = [Add(bias)] of a MatMul / MatMulNBits with constant weights."""
    node, bias = g.producer.get(name), None
    if node is not None and node.op_type == "Add":
        for i in (0, 1):
            b = g.constant(node.input[i])
            if b is not None and b.ndim == 1:
                bias, node = b, g.producer.get(node.input[1 - i])
                break
        else:
            return None
        if node is None or len(g.consumers.get(node.output[0], [])) != 1:
            return None
    if node is None or node.domain not in ("", MS_DOMAIN, SPARSE_DOMAIN):
        return None
    if node.domain == SPARSE_DOMAIN:
        return (node, bias) if all(i in g.initializers for i in node.input[1:]) else None
    if node.op_type == "MatMul" and node.input[1] in g.initializers:
        return node, bias
    if node.op_type == "MatMulNBits" and len(node.input) == 3 and all(i in g.initializers for i in node.input[1:]):
        return node, bias
    return None


def _pack_qkv(g: _Graph, layer: int, q: str, k: str, v: str):
    """One MatMul (or MatMulNBits) for q, k and v when all three are plain weight nodes on the same input:
    GroupQueryAttention then takes the packed projection. Rewritten layers (their own subgraphs, each on
    its own input) never qualify and are left as they are."""
    parts = [_projection(g, t) for t in (q, k, v)]
    if any(p is None for p in parts):
        return None
    nodes = [p[0] for p in parts]
    biases = [p[1] for p in parts]
    if len({n.op_type for n in nodes}) != 1 or len({n.input[0] for n in nodes}) != 1 or len({b is None for b in biases}) != 1:
        return None
    prefix = f"/model/layers.{layer}/self_attn/qkv_proj"
    packed = g.unique(prefix + "/output_0")
    matmul_out = g.unique(prefix + "/MatMul_output_0") if biases[0] is not None else packed
    new: list[onnx.NodeProto] = []
    if nodes[0].domain == SPARSE_DOMAIN:
        merged = _merged_sparse(g, nodes, interleave=False)
        if merged is None:
            return None
        new.append(_sparse_node(g, prefix, nodes[0].input[0], matmul_out, merged))
    elif nodes[0].op_type == "MatMul":
        weights = [numpy_helper.to_array(g.initializers[n.input[1]]) for n in nodes]
        if any(w.ndim != 2 or w.shape[0] != weights[0].shape[0] for w in weights):
            return None
        weight = g.unique(prefix + ".weight")
        g.added_initializers.append(numpy_helper.from_array(np.concatenate(weights, axis=1), weight))
        new.append(helper.make_node("MatMul", [nodes[0].input[0], weight], [matmul_out], name=g.unique(prefix + "/MatMul")))
    else:
        attrs = [{a.name: helper.get_attribute_value(a) for a in n.attribute} for n in nodes]
        if any({k: a[k] for k in a if k != "N"} != {k: attrs[0][k] for k in attrs[0] if k != "N"} for a in attrs):
            return None
        packed_inputs = [nodes[0].input[0]]
        for index, suffix in ((1, "_Q"), (2, "_scales")):
            arrays = [numpy_helper.to_array(g.initializers[n.input[index]]) for n in nodes]
            if any(a.shape[1:] != arrays[0].shape[1:] for a in arrays):
                return None
            name = g.unique(prefix + ".weight" + suffix)
            g.added_initializers.append(numpy_helper.from_array(np.concatenate(arrays, axis=0), name))
            packed_inputs.append(name)
        merged = {**attrs[0], "N": sum(a["N"] for a in attrs)}
        new.append(helper.make_node("MatMulNBits", packed_inputs, [matmul_out], name=g.unique(prefix + "/MatMulNBits"),
                                    domain=MS_DOMAIN, **merged))
    if biases[0] is not None:
        bias = g.unique(prefix + ".bias")
        g.added_initializers.append(numpy_helper.from_array(np.concatenate(biases).astype(np.float32), bias))
        new.append(helper.make_node("Add", [matmul_out, bias], [packed], name=g.unique(prefix + "/Add")))
    return packed, new


def _sparse_packing(g: _Graph, node: onnx.NodeProto) -> SparseRows:
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return SparseRows.from_node(node.op_type, [numpy_helper.to_array(g.initializers[i]) for i in node.input[1:]], attributes)


def _merged_sparse(g: _Graph, nodes: list[onnx.NodeProto], interleave: bool) -> SparseRows | None:
    """The ai.sslc nodes' packings merged into one, or None when they are not of one kind."""
    try:
        return merge([_sparse_packing(g, n) for n in nodes], interleave=interleave)
    except ValueError:
        return None


def _sparse_node(g: _Graph, prefix: str, x: str, output: str, packed: SparseRows) -> onnx.NodeProto:
    from sslc_export.onnx.formats.sparse import INPUT_NAMES

    names = []
    for suffix, array in zip(INPUT_NAMES[packed.bits], packed.inputs(), strict=True):
        names.append(g.unique(f"{prefix}.{suffix}"))
        g.added_initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), names[-1]))
    return helper.make_node(packed.op_type, [x, *names], [output], name=g.unique(prefix + "/sparse_matmul"),
                            domain=SPARSE_DOMAIN, **packed.attributes())


# ---------------------------------------------------------------- gate_proj, up_proj, silu(gate)·up -> one ai.sslc node


def _fuse_gated_mlps(g: _Graph) -> int:
    """Mul(Mul(a, Sigmoid(a)), b) with a = gate_proj(x), b = up_proj(x) two ai.sslc nodes (no bias) on one x,
    no other reader of any intermediate: one node with interleaved rows and activation "swiglu"."""
    fused = 0
    removed: set[int] = set()
    added: list[onnx.NodeProto] = []
    for mul in g.nodes:
        if mul.op_type != "Mul" or mul.domain or id(mul) in removed:
            continue
        match = _match_gated_mlp(g, mul)
        if match is None:
            continue
        gate, up, silu_nodes = match
        merged = _merged_sparse(g, [gate, up], interleave=True)
        if merged is None:
            continue
        scope = gate.name.rsplit("/", 1)[0]  # model.layers.N.mlp.gate_proj
        prefix = scope.replace("gate_proj", "gate_up_proj") if "gate_proj" in scope else scope + ".gate_up"
        added.append(_sparse_node(g, prefix, gate.input[0], mul.output[0], merged))
        removed.update(id(n) for n in (gate, up, mul, *silu_nodes))
        fused += 1
    g.nodes = [n for n in g.nodes if id(n) not in removed] + added
    g.reindex()
    return fused


def _match_gated_mlp(g: _Graph, mul: onnx.NodeProto):
    """(gate node, up node, [Sigmoid, Mul]) when `mul` computes silu(gate(x))·up(x), else None."""
    def only_reader(name: str, reader: onnx.NodeProto) -> bool:
        return name not in g.outputs and [id(n) for n in g.consumers.get(name, [])] == [id(reader)]

    for silu_out, up_out in (mul.input, reversed(mul.input)):
        silu = g.producer.get(silu_out)
        up = g.producer.get(up_out)
        if silu is None or up is None or silu.op_type != "Mul" or silu.domain or up.domain != SPARSE_DOMAIN:
            continue
        for gate_out, sigmoid_out in (silu.input, reversed(silu.input)):
            sigmoid, gate = g.producer.get(sigmoid_out), g.producer.get(gate_out)
            if (sigmoid is None or gate is None or sigmoid.op_type != "Sigmoid" or sigmoid.input[0] != gate_out
                    or gate.domain != SPARSE_DOMAIN or gate.input[0] != up.input[0] or gate is up):
                continue
            readers = sorted(id(n) for n in g.consumers.get(gate_out, []))
            if (gate_out in g.outputs or readers != sorted((id(sigmoid), id(silu))) or not only_reader(sigmoid_out, silu)
                    or not only_reader(silu_out, mul) or not only_reader(up_out, mul)):
                continue
            if not all(i in g.initializers for i in [*gate.input[1:], *up.input[1:]]):
                continue
            return gate, up, [sigmoid, silu]
    return None


def _match_attention(g: _Graph, layer: int):
    """Find one layer's attention core by structure; None (layer left as it is) on any surprise."""
    present_k, present_v = f"present.{layer}.key", f"present.{layer}.value"
    past_k, past_v = f"past_key_values.{layer}.key", f"past_key_values.{layer}.value"
    concat_k, concat_v = g.producer.get(present_k), g.producer.get(present_v)
    for concat, past in ((concat_k, past_k), (concat_v, past_v)):
        if concat is None or concat.op_type != "Concat" or len(concat.input) != 2 or concat.input[0] != past:
            return None
        if _attr(concat, "axis") not in (2, -2) or past not in g.inputs:
            return None
    # v: Concat <- Transpose(0,2,1,3) <- Reshape(v_proj); k: the same under the rotary embedding
    v_split = g.parent(concat_v, 1)
    if v_split is None or v_split.op_type != "Transpose" or _perm(v_split) != _BNSH:
        return None
    v_reshape = g.parent(v_split, 0)
    if v_reshape is None or v_reshape.op_type != "Reshape":
        return None
    v = v_reshape.input[0]
    k = _head_split_source(g, concat_k.input[1])
    k_direct = g.parent(concat_k, 1)
    if k is None or (k_direct is not None and k_direct.op_type == "Transpose"):
        return None  # no rotary between the head split and the cache: not the pattern GroupQueryAttention computes
    # the scores MatMul reads the cached keys, the weighted sum reads the cached values
    key_side, key_matmuls = _descendant_matmuls(g, present_k)
    value_side, value_matmuls = _descendant_matmuls(g, present_v)
    qk = [m for m in key_matmuls if m.input[1] in key_side and m.input[0] not in key_side]
    av = [m for m in value_matmuls if m.input[1] in value_side]
    if len(qk) != 1 or len(av) != 1:
        return None
    qk, av = qk[0], av[0]
    q = _head_split_source(g, qk.input[0])
    if q is None or q in (k, v):
        return None
    # the weighted sum must come from a Softmax over the scores
    softmax_side, _ = _descendant_matmuls(g, qk.output[0])
    softmax = any(g.producer.get(t) is not None and g.producer[t].op_type == "Softmax" for t in softmax_side)
    if av.input[0] not in softmax_side or not softmax:
        return None
    # output: MatMul -> Transpose(0,2,1,3) -> Reshape to (B, S, heads*D)
    users = g.consumers.get(av.output[0], [])
    if len(users) != 1 or users[0].op_type != "Transpose" or _perm(users[0]) != _BNSH:
        return None
    merge = g.consumers.get(users[0].output[0], [])
    if len(merge) != 1 or merge[0].op_type != "Reshape":
        return None
    out_node = merge[0]
    # nothing outside the attention core may read its intermediate tensors (they are about to disappear)
    core_outputs = key_side | value_side | softmax_side
    core_outputs.discard(present_k)
    core_outputs.discard(present_v)
    if any(name in g.outputs for name in core_outputs):
        return None
    return layer, q, k, v, out_node.output[0], out_node, concat_k, concat_v


# ---------------------------------------------------------------- RMSNorm -> (Skip)SimplifiedLayerNormalization


def _skip_casts(g: _Graph, name: str) -> str:
    """optimum wraps the fp32 RMSNorm in Casts to float; on an fp32 graph they are identities."""
    node = g.producer.get(name)
    while node is not None and node.op_type == "Cast" and _attr(node, "to") == TensorProto.FLOAT:
        name = node.input[0]
        node = g.producer.get(name)
    return name


def _match_rms_norm(g: _Graph, final: onnx.NodeProto):
    """final = Mul(weight, [Cast] Mul([Cast] x, Div(1, Sqrt(Add(ReduceMean(Pow([Cast] x, 2)), eps)))))."""
    if final.op_type != "Mul" or len(final.input) != 2:
        return None
    for w_index in (0, 1):
        weight = final.input[w_index]
        w = g.constant(weight)
        if w is None or w.ndim != 1:
            continue
        scaled = g.producer.get(_skip_casts(g, final.input[1 - w_index]))
        if scaled is None or scaled.op_type != "Mul":
            continue
        for d_index in (0, 1):
            div = g.producer.get(scaled.input[d_index])
            if div is None or div.op_type != "Div":
                continue
            numerator = g.constant(div.input[0])
            if numerator is None or numerator.size != 1 or float(numerator.reshape(-1)[0]) != 1.0:
                continue
            sqrt = g.parent(div, 1)
            add = g.parent(sqrt, 0) if sqrt is not None and sqrt.op_type == "Sqrt" else None
            if add is None or add.op_type != "Add":
                continue
            eps_index = next((i for i in (0, 1) if g.constant(add.input[i]) is not None), None)
            if eps_index is None:
                continue
            eps = float(g.constant(add.input[eps_index]).reshape(-1)[0])
            mean = g.parent(add, 1 - eps_index)
            if mean is None or mean.op_type != "ReduceMean" or _attr(mean, "keepdims", 1) != 1:
                continue
            axes = _attr(mean, "axes")
            if axes is None and len(mean.input) > 1:
                axes = g.constant(mean.input[1])
            if axes is None or list(np.array(axes).reshape(-1)) != [-1]:
                continue
            power = g.parent(mean, 0)
            if power is None or power.op_type != "Pow":
                continue
            exponent = g.constant(power.input[1])
            if exponent is None or exponent.size != 1 or float(exponent.reshape(-1)[0]) != 2.0:
                continue
            x = _skip_casts(g, power.input[0])
            if _skip_casts(g, scaled.input[1 - d_index]) != x:
                continue
            if not 0 < eps <= 1e-3:
                continue
            return x, weight, eps
    return None


def _scope(name: str) -> str:
    return name.rsplit("/", 1)[0] + "/" if "/" in name else ""


def _fuse_rms_norms(g: _Graph) -> int:
    fused = 0
    replaced: dict[int, onnx.NodeProto] = {}
    dropped: set[int] = set()
    for node in g.nodes:
        match = _match_rms_norm(g, node)
        if match is None:
            continue
        x, weight, eps = match
        add = g.producer.get(x)
        residual = (
            add is not None and add.op_type == "Add" and id(add) not in dropped
            and all(g.constant(i) is None for i in add.input) and add.input[0] != add.input[1]
            and x not in g.outputs and all(g.producer.get(i) is not None or i in g.inputs for i in add.input)
        )
        if residual:
            a, b = (_skip_casts(g, i) for i in add.input)  # optimum feeds the residual through an fp32 Cast
            new = helper.make_node(
                "SkipSimplifiedLayerNormalization", [a, b, weight], [node.output[0], "", "", x],
                name=g.unique(_scope(node.name) + "SkipSimplifiedLayerNormalization"),
                domain=MS_DOMAIN, epsilon=eps,
            )
            dropped.add(id(add))
        else:
            new = helper.make_node(
                "SimplifiedLayerNormalization", [x, weight], [node.output[0]],
                name=g.unique(_scope(node.name) + "SimplifiedLayerNormalization"),
                axis=-1, epsilon=eps, stash_type=1,
            )
        replaced[id(node)] = new
        fused += 1
    g.nodes = [replaced.get(id(n), n) for n in g.nodes if id(n) not in dropped]
    g.reindex()
    return fused

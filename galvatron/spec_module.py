"""``ModelSpec.from_module``: describe a live ``nn.Module`` without touching its weights.

The module is copied onto the meta device (parameters replaced by meta tensors through the
deepcopy memo, so no memory is allocated), its forward runs once on a meta copy of the example
batch under ``FlopCounterMode``, and a saved-tensor hook counts the bytes kept for backward per
block. Blocks are the children of the largest ``nn.ModuleList`` of same-class modules.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_map

from galvatron.errors import ModelSpecError
from galvatron.spec import LayerKind, LayerSpec, ModelSpec

_HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_head", "n_heads")
_KV_HEAD_ATTRS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads")
_EXPERT_ATTRS = ("num_experts", "num_local_experts", "n_routed_experts")
_TOP_K_ATTRS = ("top_k", "num_experts_per_tok", "num_experts_per_token")


def spec_from_module(module: nn.Module, example_batch: Any, *, name: str | None = None) -> ModelSpec:
    meta = meta_copy(module)
    block_path, blocks = find_blocks(meta)
    owner = _param_owners(meta, block_path, len(blocks))
    impls = {i: _experts_implementation(block) for i, block in enumerate(blocks)}  # before _measure redirects them
    flops, attn_flops, saved, tokens, seq_len, fused_norms = _measure(meta, blocks, example_batch)
    config = getattr(module, "config", None)
    notes: list[str] = []
    block_layers = [_block_layer(block, f"{block_path}.{i}", owner.get(i, 0), flops.get(i, 0.0),
                                 attn_flops.get(i, 0.0), saved.get(i, 0.0), tokens, config, notes,
                                 fused_norm=i in fused_norms, implementation=impls[i])
                    for i, block in enumerate(blocks)]
    hidden = _first(block_layers, "hidden")
    layers = [_edge_layer(LayerKind.EMBEDDING, "embedding", owner, flops, saved, tokens, hidden), *block_layers,
              _edge_layer(LayerKind.NORM, "norm", owner, flops, saved, tokens, hidden),
              _edge_layer(LayerKind.HEAD, "head", owner, flops, saved, tokens, hidden)]
    counted = sum(layer.params for layer in layers)
    total = sum(p.numel() for p in meta.parameters())
    if counted != total:
        raise ModelSpecError(f"internal: attributed {counted} of {total} parameters")
    vocab = _vocab(meta)
    if vocab is None:
        notes.append("no nn.Embedding found: vocabulary size unknown (0)")
    return ModelSpec(
        name=name or type(module).__name__,
        layers=tuple(layers),
        seq_len=seq_len,
        vocab=vocab or 0,
        hidden=hidden,
        tied_embeddings=_tied(meta),
        block_path=block_path,
        notes=tuple(dict.fromkeys(notes)),
    )


def meta_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose parameters and buffers are meta tensors (no memory)."""
    memo: dict[int, Any] = {}
    for p in module.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in module.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(module, memo)


def structural_spec(module: nn.Module, reason: str) -> ModelSpec:
    """The module's blocks with their head and expert counts, read from modules and config only
    (no forward run, no costs): for models that cannot run on the meta device."""
    path, blocks = find_blocks(module)
    config, notes = getattr(module, "config", None), [f"structure only, costs unknown: {reason}"]
    layers = tuple(_block_layer(b, f"{path}.{i}", sum(p.numel() for p in b.parameters()), 0.0, 0.0, 0.0, 1,
                                config, notes) for i, b in enumerate(blocks))
    return ModelSpec(name=type(module).__name__, layers=layers, seq_len=0, vocab=_vocab(module) or 0,
                     hidden=layers[0].hidden, block_path=path, notes=tuple(notes))


def find_blocks(module: nn.Module) -> tuple[str, list[nn.Module]]:
    """The dotted path and children of the largest ``ModuleList``/``Sequential`` of same-class modules."""
    best: tuple[int, str, list[nn.Module]] | None = None
    for path, child in module.named_modules():
        if not isinstance(child, (nn.ModuleList, nn.Sequential)) or len(child) < 2:
            continue
        members = list(child)
        if len({type(m) for m in members}) != 1:
            continue
        size = sum(p.numel() for p in child.parameters())
        if size and (best is None or size > best[0]):
            best = (size, path, members)
    if best is None:
        raise ModelSpecError(
            f"{type(module).__name__} has no nn.ModuleList of repeated blocks; galvatron plans per block, "
            "so keep the model's layers in an nn.ModuleList"
        )
    return best[1], best[2]


def _block_index(path: str, block_path: str) -> int | None:
    prefix = f"{block_path}." if block_path else ""
    if not path.startswith(prefix):
        return None
    head = path[len(prefix):].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def _param_owners(meta: nn.Module, block_path: str, n_blocks: int) -> dict[Any, int]:
    """Parameters per owner: block index, or 'embedding' / 'norm' / 'head' for the rest.
    Shared parameters count once, with their first owner."""
    owners: dict[Any, int] = {}
    seen: set[int] = set()
    for mod_path, mod in meta.named_modules():
        for p in mod.parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            owner = _block_index(mod_path, block_path)
            if owner is None:
                owner = _edge_kind(mod)
            owners[owner] = owners.get(owner, 0) + p.numel()
    return owners


def _edge_kind(mod: nn.Module) -> str:
    if isinstance(mod, nn.Embedding):
        return "embedding"
    if "norm" in type(mod).__name__.lower():
        return "norm"
    return "head"


class _Tracker:
    """Attributes FLOPs and saved bytes to the part of the model running: 'embedding' before the
    blocks, block ``i``, 'tail' after them. FLOPs are charged at each transition from the
    counter's running totals."""

    def __init__(self, counter: Any) -> None:
        self.counter = counter
        self.where: Any = "embedding"
        self.flops: dict[Any, float] = {}
        self.attn: dict[Any, float] = {}
        self.saved: dict[Any, float] = {}
        self._last = (0.0, 0.0)
        self.attn_running = 0.0
        self.discount = 0.0
        self.saved_scale = 1.0

    def _totals(self) -> tuple[float, float]:
        return float(self.counter.get_total_flops()) - self.discount, self.attn_running

    @contextmanager
    def scaled(self, factor: float) -> Iterator[None]:
        """FLOPs and saved bytes inside this block count ``factor`` times."""
        before, self.saved_scale = self.counter.get_total_flops(), factor
        yield
        self.saved_scale = 1.0
        self.discount += (1.0 - factor) * float(self.counter.get_total_flops() - before)

    @contextmanager
    def attention(self) -> Iterator[None]:
        """FLOPs counted inside this block are the attention core's."""
        before = self.counter.get_total_flops()
        yield
        self.attn_running += float(self.counter.get_total_flops() - before)

    def move(self, where: Any) -> None:
        total, attn = self._totals()
        self.flops[self.where] = self.flops.get(self.where, 0.0) + (total - attn) - (self._last[0] - self._last[1])
        self.attn[self.where] = self.attn.get(self.where, 0.0) + attn - self._last[1]
        self._last = (total, attn)
        self.where = where

    def add_saved(self, nbytes: float) -> None:
        self.saved[self.where] = self.saved.get(self.where, 0.0) + nbytes * self.saved_scale


def _measure(meta: nn.Module, blocks: list[nn.Module], batch: Any) -> tuple[
        dict[Any, float], dict[Any, float], dict[Any, float], int, int, set[Any]]:
    """Forward FLOPs, attention FLOPs and saved bytes (16-bit floats) per block/edge, tokens, seq len,
    and the blocks whose norms called ``F.rms_norm`` (the fused kernel on a GPU)."""
    from torch.utils.flop_counter import FlopCounterMode

    meta_batch = tree_map(lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t, batch)
    tokens, seq_len = _token_shape(meta_batch)
    params = {id(p) for p in meta.parameters()}
    seen: set[int] = set()
    counter = FlopCounterMode(display=False)
    tracker = _Tracker(counter)

    stand_ins: dict[int, torch.Tensor] = {}  # copies the attention runs on -> the tensors a GPU keeps
    counted: list[torch.Tensor] = []  # stand-ins nothing else keeps alive: their ids must stay unique in `seen`

    def pack(t: torch.Tensor) -> torch.Tensor:
        base = t._base if t._base is not None else t
        if id(base) in stand_ins:
            kept = stand_ins[id(base)]
            base = kept._base if kept._base is not None else kept
            counted.append(base)
        if id(base) not in params and id(base) not in seen:
            seen.add(id(base))
            tracker.add_saved(base.numel() * (2 if base.is_floating_point() else base.element_size()))
        return t

    handles = _expert_hooks(meta, tracker)
    for i, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(lambda m, a, i=i: tracker.move(i)))
        handles.append(block.register_forward_hook(lambda m, a, o: tracker.move("tail")))
    sdpa, rms_norm = F.scaled_dot_product_attention, F.rms_norm

    def counted_sdpa(*args: Any, **kwargs: Any) -> torch.Tensor:
        with tracker.attention():
            return _fused_attention(sdpa, stand_ins, *args, **kwargs)

    fused_norms: set[Any] = set()

    def counted_rms_norm(*args: Any, **kwargs: Any) -> torch.Tensor:
        fused_norms.add(tracker.where)
        return _fused_rms_norm(*args, **kwargs)

    F.scaled_dot_product_attention = counted_sdpa
    F.rms_norm = counted_rms_norm
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), counter, _nonzero_all():
            _call(meta, meta_batch)
            tracker.move("tail")
    except Exception as err:
        raise ModelSpecError(
            f"running {type(meta).__name__} on the meta device failed ({type(err).__name__}: {err}); "
            "pass an example batch the model's forward accepts"
        ) from err
    finally:
        F.scaled_dot_product_attention, F.rms_norm = sdpa, rms_norm
        for h in handles:
            h.remove()
    return tracker.flops, tracker.attn, tracker.saved, tokens, seq_len, fused_norms


def _fused_attention(composite: Any, stand_ins: dict[int, torch.Tensor], q: torch.Tensor, k: torch.Tensor,
                     v: torch.Tensor, attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                     is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` as a GPU runs it without a mask: a fused kernel (FlashAttention's
    op, whose meta function gives the GPU's output layout) that keeps q, k, v, its output and the
    softmax statistics, where the meta device's composite would keep the s x s scores. GQA's fewer
    K/V heads (``enable_gqa``), which the GPU's kernel takes as they are, run on copies for every
    query head (the FLOP counter's formula wants equal heads; torch 2.11 asserts it), which
    ``stand_ins`` maps back to K and V for the saved-bytes count."""
    if attn_mask is not None:
        return composite(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                         enable_gqa=enable_gqa)
    if k.shape[-3] != q.shape[-3]:
        groups = q.shape[-3] // k.shape[-3]
        k_all, v_all = k.repeat_interleave(groups, dim=-3), v.repeat_interleave(groups, dim=-3)
        for copy_, kept in ((k_all, k), (v_all, v)):
            stand_ins[id(copy_._base if copy_._base is not None else copy_)] = kept
        k, v = k_all, v_all
    try:
        return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, False, scale=scale)[0]
    finally:
        stand_ins.clear()


class FusedRMSNorm(torch.autograd.Function):
    """What ``aten._fused_rms_norm`` (CUDA, input and weight of one dtype) allocates and keeps: the
    output, the fp32 inverse RMS per row and the input; backward: the input's and the weight's
    gradients. No values: for meta and fake tensors, whose composite ``rms_norm`` would keep its
    temporaries instead."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor | None, dims: int) -> torch.Tensor:
        rstd = x.new_empty((*x.shape[:-dims], *(1,) * dims), dtype=torch.float32)
        ctx.save_for_backward(x, rstd, weight)
        return torch.empty_like(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, None]:
        x, _, weight = ctx.saved_tensors
        return torch.empty_like(x), None if weight is None else torch.empty_like(weight), None


def _fused_rms_norm(x: torch.Tensor, normalized_shape: Any, weight: torch.Tensor | None = None,
                    eps: float | None = None) -> torch.Tensor:
    return FusedRMSNorm.apply(x, weight, len(normalized_shape))


@contextmanager
def _nonzero_all() -> Iterator[None]:
    """Let data-dependent ``nonzero`` run on meta tensors (every element counted as non-zero):
    MoE dispatch then routes every token to every expert, which ``_expert_hooks`` scales back."""
    import torch.fx.experimental._config as fx_config

    with fx_config.patch(meta_nonzero_assume_all_nonzero=True):
        yield


def _expert_hooks(meta: nn.Module, tracker: _Tracker) -> list[Any]:
    """On meta every expert sees every routed token: scale the routed loop by 1/experts (balanced
    routing), from the first expert's call until the MoE module runs anything else or returns, so
    what the loop does around each expert (a gather, the routing weight's product, which keeps the
    expert's output) scales with it. Fused experts (3-D weight tensors, transformers 5) run through
    their batched implementation and count 0 here: ``_block_layer`` adds them analytically."""
    handles = []
    modules = dict(meta.named_modules())
    for path, m in meta.named_modules():
        if path.rsplit(".", 1)[-1] != "experts":
            continue
        state: dict[str, Any] = {}

        def enter(mod: nn.Module, args: Any, factor: float, state: dict = state) -> None:
            if "ctx" not in state:
                state["ctx"] = tracker.scaled(factor)
                state["ctx"].__enter__()

        def leave(*_: Any, state: dict = state) -> None:
            if "ctx" in state:
                state.pop("ctx").__exit__(None, None, None)

        if not isinstance(m, nn.ModuleList):
            if hasattr(getattr(m, "config", None), "_experts_implementation"):
                m.config._experts_implementation = "batched_mm"  # the meta copy's own config
            handles += [m.register_forward_pre_hook(partial(enter, factor=0.0)), m.register_forward_hook(leave)]
            continue
        factor = 1.0 / max(len(m), 1)
        handles += [e.register_forward_pre_hook(partial(enter, factor=factor)) for e in m]
        parent = modules[path.rpartition(".")[0]]
        routed = {id(x) for x in m.modules()}
        handles += [x.register_forward_pre_hook(leave) for x in parent.modules()
                    if x is not parent and id(x) not in routed]
        handles.append(parent.register_forward_hook(leave))
    return handles


def _call(module: nn.Module, batch: Any) -> Any:
    if isinstance(batch, dict):
        return module(**batch)
    if isinstance(batch, (tuple, list)):
        return module(*batch)
    return module(batch)


def _token_shape(batch: Any) -> tuple[int, int]:
    """(tokens, sequence length) of the first tensor of at least two dims in the batch."""
    found: list[torch.Tensor] = []
    tree_map(lambda t: found.append(t) if isinstance(t, torch.Tensor) and t.dim() >= 2 else None, batch)
    if not found:
        raise ModelSpecError("the example batch holds no (batch, sequence, ...) tensor")
    b, s = found[0].shape[:2]
    return b * s, s


def _edge_layer(kind: LayerKind, key: str, owner: dict[Any, int], flops: dict[Any, float],
                saved: dict[Any, float], tokens: int, hidden: int) -> LayerSpec:
    """Embedding, norm and head: FLOPs before the blocks go to the embedding, after them to the head."""
    where = {"embedding": "embedding", "norm": None, "head": "tail"}[key]
    return LayerSpec(
        kind=kind, name=key, params=owner.get(key, 0), hidden=hidden,
        flops_per_token=flops.get(where, 0.0) / tokens if where else 0.0,
        activation_bytes_per_token=saved.get(where, 0.0) / tokens if where else 0.0,
    )


def _block_layer(block: nn.Module, name: str, params: int, flops: float, attn_flops: float, saved: float,
                 tokens: int, config: Any, notes: list[str], fused_norm: bool = True,
                 implementation: str | None = None) -> LayerSpec:
    heads = _attr(block, config, _HEAD_ATTRS)
    kv_heads = _attr(block, config, _KV_HEAD_ATTRS) or heads
    experts_list = _experts(block)
    experts = len(experts_list) if experts_list is not None else _attr(block, config, _EXPERT_ATTRS)
    has_attention = heads > 0 or any("attention" in type(m).__name__.lower() for m in block.modules())
    if has_attention and not heads:
        notes.append(f"{name}: attention found but its head count is unknown (0)")
    kind = LayerKind.MOE if experts else LayerKind.ATTENTION if has_attention else LayerKind.MLP
    hidden = _hidden(block)
    expert_params = sum(p.numel() for p in experts_list.parameters()) if experts_list is not None else 0
    top_k = _attr(block, config, _TOP_K_ATTRS) if experts else 0
    flops, saved = flops / tokens, saved / tokens
    norm = _norm_kind(block)
    if experts and experts_list is None:
        expert_params = _fused_expert_params(block)
        flops, saved = _add_fused_experts(flops, saved, expert_params // experts, top_k, hidden)
        notes.append(f"{name}: fused experts costed analytically (2 FLOPs per weight, SwiGLU activations)")
    ffn_hidden, shared = (_expert_widths(block, hidden, experts_list, expert_params // experts) if experts
                          else (_ffn_hidden(block, hidden), 0))
    return LayerSpec(
        kind=kind, name=name, params=params, flops_per_token=flops,
        attention_flops_per_token=attn_flops / tokens, activation_bytes_per_token=saved,
        hidden=hidden, heads=heads, kv_heads=kv_heads if heads else 0,
        head_dim=hidden // heads if heads and hidden else 0,
        experts=experts, top_k=top_k, shared_experts=shared,
        expert_params=expert_params, norm=norm,
        norm_composite=bool(flops) and norm == "rmsnorm" and not fused_norm,
        bias=any(isinstance(m, nn.Linear) and m.bias is not None for m in block.modules()),
        rope=bool(heads) and _rope(config),
        ffn_hidden=ffn_hidden,
        activations_measured=bool(flops),
        experts_outside_autocast=bool(experts) and implementation == "grouped_mm",
        experts_sliced=bool(experts) and implementation == "eager",
        **_fused_projections(block, hidden, heads, kv_heads),
    )


def _linear_shapes(block: nn.Module) -> list[tuple[int, int]]:
    """(in, out) features of the block's linear layers: ``nn.Linear`` and transformers' ``Conv1D``
    (GPT-2's, weight stored as (in, out) with an ``nf`` output width)."""
    shapes = []
    for m in block.modules():
        if isinstance(m, nn.Linear):
            shapes.append((m.in_features, m.out_features))
        elif type(m).__name__ == "Conv1D" and hasattr(m, "nf") and getattr(m, "weight", None) is not None:
            shapes.append((m.weight.shape[0], m.nf))
    return shapes


def _fused_projections(block: nn.Module, hidden: int, heads: int, kv_heads: int) -> dict[str, bool]:
    """Whether one linear layer computes q, k and v together (out = q + 2 kv widths from the hidden
    size), and one the gate and up projections of a gated MLP (out = twice the down projection's
    input)."""
    if not hidden:
        return {}
    shapes = _linear_shapes(block)
    head_dim = hidden // heads if heads else 0
    qkv = (heads + 2 * kv_heads) * head_dim
    fused_qkv = bool(heads) and any(i == hidden and o == qkv for i, o in shapes)
    downs = _down_widths(shapes, hidden)
    fused_gate_up = any(i == hidden and o % 2 == 0 and o // 2 in downs for i, o in shapes)
    return {"fused_qkv": fused_qkv, "fused_gate_up": fused_gate_up}


def _down_widths(shapes: list[tuple[int, int]], hidden: int) -> set[int]:
    """Input widths of the linear layers that map another width back to ``hidden`` (down projections)."""
    return {i for i, o in shapes if o == hidden and i != hidden}


def _ffn_hidden(block: nn.Module, hidden: int) -> int:
    """A dense block's FFN width: the input width of its one down projection; 0 where that is not one
    width (the cost model then prices the block's GEMMs by their FLOPs)."""
    downs = _down_widths(_linear_shapes(block), hidden) if hidden else set()
    return downs.pop() if len(downs) == 1 else 0


def _expert_widths(block: nn.Module, hidden: int, experts: nn.ModuleList | None, per_expert: int) -> tuple[int, int]:
    """A MoE block's expert FFN width and how many always-on experts of that width its shared FFNs
    make: the width is the input of a listed expert's down projection (fused 3-D experts: a gated
    expert's weights over ``3 * hidden``); the shared FFNs are the down projections outside the
    experts and the attention (one wide FFN, as DeepSeek's ``shared_experts`` and Qwen's
    ``shared_expert``, counts as its width over the experts'). (0, 0) where a width is not one number
    or the shared width is not a multiple of it: the cost model then prices the block's GEMMs by their
    FLOPs."""
    if not hidden:
        return 0, 0
    if experts is not None:
        widths = _down_widths(_linear_shapes(experts[0]), hidden)
        width = widths.pop() if len(widths) == 1 else 0
    else:
        width = _fused_width(per_expert, hidden)
    routed = experts if experts is not None else _experts_module(block)
    inside = {id(m) for m in routed.modules()} if routed is not None else set()
    inside |= {id(m) for a in block.modules() if "attention" in type(a).__name__.lower() for m in a.modules()}
    outside = [m for m in block.modules() if id(m) not in inside and isinstance(m, nn.Linear)]
    shared = sum(i for i, o in ((m.in_features, m.out_features) for m in outside) if o == hidden and i != hidden)
    if not width or shared % width:
        return 0, 0
    return width, shared // width


def _rope(config: Any) -> bool:
    """Whether the model's attention rotates q and k (RoPE), from its config: galvatron's
    ``GPTConfig.position``, or a rotary base or scaling as Hugging Face configs carry (Llama,
    Mistral, Mixtral, Qwen: ``rope_theta``; GPT-NeoX: ``rotary_emb_base``)."""
    if config is None:
        return False
    position = getattr(config, "position", None)
    if isinstance(position, str):
        return position == "rope"
    return any(getattr(config, n, None) is not None for n in ("rope_theta", "rotary_emb_base", "rope_scaling"))


def _norm_kind(block: nn.Module) -> str:
    """``rmsnorm`` when the block holds an RMSNorm module (``nn.RMSNorm``, Llama's ``RMSNorm``)."""
    return "rmsnorm" if any("rmsnorm" in type(m).__name__.lower() for m in block.modules()) else "layernorm"


def _add_fused_experts(flops: float, saved: float, per_expert: int, top_k: int, hidden: int) -> tuple[float, float]:
    """Per-token FLOPs and saved bytes of ``top_k`` gated experts of ``per_expert`` weights:
    2 FLOPs per weight; input 2h, gate/up output 4f and activation output 2f bytes (16-bit)."""
    ffn = _fused_width(per_expert, hidden)
    return flops + 2.0 * per_expert * top_k, saved + top_k * (2.0 * hidden + 6.0 * ffn)


def _attr(block: nn.Module, config: Any, names: tuple[str, ...]) -> int:
    """First integer attribute of that name on the block's modules, else on the model config."""
    for m in block.modules():
        for n in names:
            value = getattr(m, n, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    for n in names:
        value = getattr(config, n, None)
        if isinstance(value, int) and value > 0:
            return value
    return 0


def _experts(block: nn.Module) -> nn.ModuleList | None:
    """A ModuleList named like experts inside the block (reference MoE, older HF MoE layouts)."""
    for path, m in block.named_modules():
        if isinstance(m, nn.ModuleList) and path.rsplit(".", 1)[-1] == "experts" and len(m) > 1:
            return m
    return None


def _experts_module(block: nn.Module) -> nn.Module | None:
    """The block's module named like experts (a ModuleList, or one holding all experts in 3-D tensors)."""
    return next((m for path, m in block.named_modules() if path.rsplit(".", 1)[-1] == "experts"), None)


def _experts_implementation(block: nn.Module) -> str | None:
    """How Hugging Face runs the block's fused experts (3-D weight tensors), from their config:
    ``grouped_mm`` (transformers' default where the GPU has grouped GEMMs) casts the routed tokens to
    the weights' dtype and calls the grouped GEMM outside autocast
    (``LayerSpec.experts_outside_autocast``); ``eager`` loops over the experts, indexing the weights
    (``LayerSpec.experts_sliced``). None: no fused experts, or not Hugging Face's."""
    m = _experts_module(block)
    if m is None or isinstance(m, nn.ModuleList):
        return None
    impl = getattr(getattr(m, "config", None), "_experts_implementation", None)
    return impl if isinstance(impl, str) else None


def _fused_expert_params(block: nn.Module) -> int:
    """Parameters of an ``experts`` module that stores all experts in 3-D tensors."""
    m = _experts_module(block)
    return sum(p.numel() for p in m.parameters()) if m is not None else 0


def _fused_width(per_expert: int, hidden: int) -> int:
    """The FFN width of a gated expert of ``per_expert`` weights (``3 x hidden x width``)."""
    return per_expert // (3 * hidden) if hidden else 0


def _hidden(block: nn.Module) -> int:
    for m in block.modules():
        if isinstance(m, nn.Linear):
            return m.in_features
        weight = getattr(m, "weight", None)
        if type(m).__name__ == "Conv1D" and weight is not None:  # GPT-2 stores Linear transposed
            return int(weight.shape[0])
    return 0


def _vocab(meta: nn.Module) -> int | None:
    embeddings = [m for m in meta.modules() if isinstance(m, nn.Embedding)]
    return max(e.num_embeddings for e in embeddings) if embeddings else None


def _tied(meta: nn.Module) -> bool:
    embeddings = {id(m.weight) for m in meta.modules() if isinstance(m, nn.Embedding)}
    return any(id(m.weight) in embeddings for m in meta.modules() if isinstance(m, nn.Linear))


def _first(layers: list[LayerSpec], field: str) -> int:
    return next((getattr(layer, field) for layer in layers if getattr(layer, field)), 0)

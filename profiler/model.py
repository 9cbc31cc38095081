"""The model profiler: per-layer forward/backward time and memory of a real module, in one process.

``profile_model(model)`` copies the module's embedding, head and one block of each distinct shape
onto the device (the other blocks are never copied), then for every micro-batch size, sequence
length and recompute mode runs each distinct block forward and backward on random inputs of the
right shape: warm-up runs, one memory run, then timed runs whose medians are kept (see
:mod:`galvatron.profiler.measure` for how time and memory are taken). The embedding (everything
before the first block) and the head (everything after the last block, with the cross-entropy
loss) are measured the same way. The optimizer step is timed on two parameter counts.

Blocks run as the model runs them: their arguments (rotary tables, masks) are captured from a
forward of the model that stops at the first block; recomputation is applied with the runtime's own
:func:`galvatron.runtime.recompute.apply_recompute`.
"""

from __future__ import annotations

import copy
import dataclasses
import platform
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from galvatron.profiler.measure import _LOW_PRECISION, Clock, autocast, measure_memory, storage_ptrs
from galvatron.profiler.progress import Progress, human_bytes, table
from galvatron.profiler.schema import (
    SPLIT_FIELDS,
    DeviceInfo,
    LayerProfile,
    Measurement,
    ModelProfile,
    OptimizerProfile,
    ProfileError,
)
from torch import nn
from torch.utils._pytree import tree_map

from galvatron.plan import DType, Recompute
from galvatron.runtime.recompute import apply_recompute
from galvatron.runtime.tensor import apply_input_casts
from galvatron.spec import LayerKind, LayerSpec, ModelSpec
from galvatron.spec_module import find_blocks

_MAX_POSITION_ATTRS = ("seq_len", "max_position_embeddings", "n_positions", "max_seq_len")
LONGEST_DEFAULT = 8192
"""Longest sequence profiled when none is asked for."""


@dataclass(frozen=True, kw_only=True)
class ProfileOptions:
    """What to measure and how often."""

    micro_batches: tuple[int, ...] = (1, 2, 4)
    seq_lens: tuple[int, ...] = ()
    """Sequence lengths; empty: :func:`default_seq_lens`."""
    recompute: tuple[Recompute, ...] = tuple(Recompute)
    dtype: DType | None = None
    """Compute dtype under autocast; None: bf16 on GPU, fp32 on CPU."""
    warmup: int = 2
    repeats: int = 5
    optimizer: bool = True
    """Also time a fused AdamW step (per parameter)."""

    def __post_init__(self) -> None:
        for name in ("micro_batches", "seq_lens"):
            values = tuple(getattr(self, name))
            if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
                raise ProfileError(f"{name} must be positive integers, got {values}")
            object.__setattr__(self, name, tuple(sorted(set(values))))
        if not self.micro_batches:
            raise ProfileError("micro_batches must not be empty")
        try:
            object.__setattr__(self, "recompute", tuple(dict.fromkeys(Recompute(r) for r in self.recompute)))
            object.__setattr__(self, "dtype", DType(self.dtype) if self.dtype is not None else None)
        except ValueError as err:
            raise ProfileError(str(err)) from None
        if not self.recompute:
            raise ProfileError("recompute must name at least one mode")
        if self.dtype is DType.FP8:
            raise ProfileError("fp8 cannot be profiled under autocast; profile bf16")
        if self.warmup < 0 or self.repeats < 1:
            raise ProfileError(f"warmup must be >= 0 and repeats >= 1, got {self.warmup}, {self.repeats}")


CPU_WORKER_MICRO_BATCHES = (1, 2, 4, 8)
"""Micro-batch sizes :func:`cpu_worker_options` profiles (the fit is linear in tokens beyond them)."""


CPU_WORKER_TIMING = {"warmup": 3, "repeats": 15}
"""Runs per point when profiling for CPU workers. A CPU timing's run-to-run noise is slow (windows of
25 runs of a ``gpt-demo`` block differ by up to 8%): with the default 2 + 5 runs the demo's block
(forward and backward, 4 x 64 tokens) came out 6.3 to 9.2 ms over twelve profiles where a long loop
runs it in about 6.3; with these, 6.2 to 6.8 over six."""


def cpu_worker_options(seq_len: int) -> ProfileOptions:
    """How a model is profiled for a search over CPU workers (the launcher's and ``wrap(plan="auto")``'s):
    at the run's sequence length, micro-batches :data:`CPU_WORKER_MICRO_BATCHES`, every recompute mode,
    :data:`CPU_WORKER_TIMING` runs per point."""
    return ProfileOptions(micro_batches=CPU_WORKER_MICRO_BATCHES, seq_lens=(seq_len,), **CPU_WORKER_TIMING)


def profile_flops(spec: ModelSpec, options: ProfileOptions) -> float:
    """Roughly the training FLOPs a profile of ``spec`` under ``options`` runs (at its first sequence
    length, else ``spec``'s): about two blocks (one of each kind) and the embedding and head, at every
    micro-batch, recompute mode (recomputation adds a forward) and warm-up or timed run. Over a
    rate, how long the profile will take."""
    seq = options.seq_lens[0] if options.seq_lens else spec.seq_len
    share = min(1.0, 3 / max(1, spec.num_blocks))
    runs = (options.warmup + options.repeats) * (len(options.recompute) + 1)
    return spec.flops_per_token() * seq * sum(options.micro_batches) * share * runs


def profile_on_one_thread(model: nn.Module, options: ProfileOptions, *, name: str | None = None,
                          progress: bool = False) -> ModelProfile:
    """:func:`profile_model` on CPU with one intra-op thread, as each CPU worker runs (the setting
    is restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return profile_model(model, options=options, device="cpu", name=name, progress=progress)
    finally:
        torch.set_num_threads(threads)


def profile_model(model: nn.Module, *, options: ProfileOptions | None = None,
                  device: str | torch.device | None = None, name: str | None = None,
                  progress: bool = True) -> ModelProfile:
    """Measure ``model`` (a language model taking token ids ``(batch, seq)``) on ``device``
    (default: the current GPU, else CPU). The module itself is not modified or moved."""
    options = options or ProfileOptions()
    dev = torch.device(device) if device is not None else _default_device()
    dtype = options.dtype or (DType.BF16 if dev.type == "cuda" else DType.FP32)
    started = time.perf_counter()
    if any(p.is_meta for p in model.parameters()):
        raise ProfileError("the model is on the meta device: build it on a real device to profile it")
    seq_lens = options.seq_lens or default_seq_lens(model)
    limit = max_positions(model)
    if limit and max(seq_lens) > limit:
        raise ProfileError(f"sequence length {max(seq_lens)} exceeds the model's {limit} positions")
    block_path, blocks = find_blocks(model)
    kinds = _distinct(blocks)
    spec = ModelSpec.from_module(model, torch.zeros(1, max(seq_lens), dtype=torch.long), name=name)
    units = len(options.micro_batches) * len(seq_lens) * (1 + len(kinds) * len(options.recompute))
    bar = Progress(units + int(options.optimizer), f"profile {spec.name}", enabled=progress)
    # sleep kernels, events and memory statistics go to the current device: make it the profiled one
    with torch.cuda.device(dev) if dev.type == "cuda" else nullcontext():
        job = _Job(model, block_path, [blocks[k.first] for k in kinds], dev, dtype, options, spec)
        layers = job.run(kinds, seq_lens, bar)
        optimizer = job.optimizer(bar) if options.optimizer else None
    return ModelProfile(
        model=spec.name, device=_device_info(dev), dtype=dtype, layers=tuple(layers), optimizer=optimizer,
        hidden=spec.hidden, vocab=spec.vocab, causal=spec.causal, profiled_blocks=len(blocks),
        seconds=time.perf_counter() - started, notes=tuple(job.notes),
    )


def lm_loss(output: Any, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of a language model's output (logits, a tuple starting with them, or an object
    with ``.logits``) against ``targets``, in fp32: the loss the profiler's head measurement uses."""
    logits = getattr(output, "logits", None)
    if logits is None:
        logits = output[0] if isinstance(output, (tuple, list)) else output
    return F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten())


def summary(profile: ModelProfile) -> str:
    """A table of every measurement: times, memory and achieved model TFLOP/s."""
    rows = []
    for layer in profile.layers:
        for m in layer.measurements:
            flops = 3 * m.tokens * (layer.spec.flops_per_token + layer.attention_flops_per_token_per_seq * m.seq_len)
            total = m.forward_s + m.backward_s
            rows.append([layer.key, m.micro_batch, m.seq_len, m.recompute.value, m.forward_s * 1e3,
                         m.backward_s * 1e3, human_bytes(m.activation_bytes), human_bytes(m.temporary_bytes),
                         flops / total / 1e12 if total > 0 else 0.0])
    head = (f"{profile.model} on {profile.device.name} ({profile.dtype.value}), "
            f"profiled in {profile.seconds:.1f} s")
    lines = [head, table(["layer", "mb", "seq", "recompute", "fwd ms", "bwd ms", "activations", "temporaries",
                          "TFLOP/s"], rows)]
    if profile.optimizer:
        opt = profile.optimizer
        lines.append(f"optimizer {opt.name}: {opt.seconds_per_param * 1e9:.3f} ns/param "
                     f"+ {opt.intercept_s * 1e3:.3f} ms")
    lines += [f"note: {n}" for n in profile.notes]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- internals
@dataclass
class _Kind:
    """Blocks of one shape: the first one's index, how many, the measurements so far."""

    signature: tuple
    first: int
    count: int = 1
    measurements: list[Measurement] = field(default_factory=list)


def _distinct(blocks: Sequence[nn.Module]) -> list[_Kind]:
    """Blocks grouped by class and parameter shapes (a dense and a MoE block of one class differ)."""
    kinds: dict[tuple, _Kind] = {}
    for i, block in enumerate(blocks):
        sig = (type(block).__name__, tuple((n, tuple(p.shape)) for n, p in block.named_parameters()))
        if sig in kinds:
            kinds[sig].count += 1
        else:
            kinds[sig] = _Kind(signature=sig, first=i)
    return list(kinds.values())


class _Stop(Exception):
    """Raised by the hook on the first block once its arguments are captured."""


class _Call(nn.Module):
    """A module calling ``block``: recomputation wraps this, never the block itself."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.block(*args, **kwargs)


class _Job:
    """One profiling run: the trimmed copy on the device and what was measured."""

    def __init__(self, model: nn.Module, block_path: str, members: list[nn.Module], device: torch.device,
                 dtype: DType, options: ProfileOptions, spec: ModelSpec) -> None:
        self.device, self.dtype, self.options, self.spec = device, dtype, options, spec
        self.block_path = block_path
        with _blocks_replaced(model, block_path, members):
            self.shell = copy.deepcopy(model).to(device)
        self.shell.train()
        config = getattr(self.shell, "config", None)
        if config is not None and hasattr(config, "use_cache"):
            config.use_cache = False  # a key/value cache would grow with every timed forward
        self.blocks = list(self.shell.get_submodule(block_path))
        self.clock = Clock(device)
        self.notes: list[str] = []
        self.edges: dict[str, list[Measurement]] = {"embedding": [], "head": []}

    # ---------------------------------------------------------------- the grid
    def run(self, kinds: list[_Kind], seq_lens: Sequence[int], bar: Progress) -> list[LayerProfile]:
        for s in seq_lens:
            for mb in self.options.micro_batches:
                tokens = torch.randint(0, max(self.spec.vocab, 1), (mb, s), device=self.device)
                self._guard(f"embedding/head mb={mb} s={s}", self._edges, tokens)
                bar.step(f"embedding/head mb={mb} s={s}")
                call = self._guard(f"block inputs mb={mb} s={s}", self._capture, tokens)
                for kind, block in zip(kinds, self.blocks):
                    for mode in self.options.recompute:
                        label = f"block {kind.first} mb={mb} s={s} {mode.value}"
                        found = self._guard(label, self._block, block, call, mode, mb, s) if call else None
                        if found is not None:
                            kind.measurements.append(found)
                        bar.step(label)
        return self._edge_profiles() + self._block_profiles(kinds)

    def _capture(self, tokens: torch.Tensor) -> _BlockCall:
        with autocast(self.device, self.dtype):
            return _BlockCall.capture(self, tokens)

    def _guard(self, label: str, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)``, or None with a note when the device runs out of memory or the model raises
        (e.g. a recompute mode the model does not support): one failure does not end the profile."""
        try:
            return fn(*args)
        except torch.OutOfMemoryError:
            self.notes.append(f"{label}: out of memory, not measured")
        except RuntimeError as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            self.notes.append(f"{label}: failed, not measured ({first})")
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return None

    def _measure(self, mb: int, s: int, mode: Recompute, forward: Callable[[], Any],
                 backward: Callable[[Any], None], ignore: set[int]) -> Measurement:
        for _ in range(self.options.warmup):
            backward(forward())
        act, temp = measure_memory(self.device, forward, backward, ignore)
        t = self.clock.medians([lambda _: forward(), backward], self.options.repeats)
        return Measurement(micro_batch=mb, seq_len=s, recompute=mode, forward_s=t.slower[0], backward_s=t.slower[1],
                           activation_bytes=act, temporary_bytes=temp, host_forward_s=t.host[0],
                           host_backward_s=t.host[1], device_forward_s=t.device[0], device_backward_s=t.device[1])

    # ---------------------------------------------------------------- blocks
    def _block(self, block: nn.Module, call: _BlockCall, mode: Recompute, mb: int, s: int) -> Measurement:
        # as the native runtime runs a 16-bit block: each module's input cast once (tensor.apply_input_casts)
        casts = apply_input_casts(block) if self.dtype in _LOW_PRECISION else []
        try:
            return self._block_measure(block, call, mode, mb, s)
        finally:
            for handle in casts:
                handle.remove()

    def _block_measure(self, block: nn.Module, call: _BlockCall, mode: Recompute, mb: int, s: int) -> Measurement:
        runner = _Call(block)
        apply_recompute(runner, mode)
        x = call.hidden.detach().clone().normal_().requires_grad_(True)
        args, kwargs = call.with_hidden(x)
        grad = torch.randn_like(x)

        def forward() -> Any:
            with autocast(self.device, self.dtype):
                return _first_tensor(runner(*args, **kwargs))

        def backward(out: Any) -> None:
            out.backward(grad)

        ignore = storage_ptrs([*block.parameters(), *block.buffers(), args, kwargs, grad])
        return self._measure(mb, s, mode, forward, backward, ignore)

    def _block_profiles(self, kinds: list[_Kind]) -> list[LayerProfile]:
        """One entry per distinct block; the key is its kind, suffixed by its first index when the
        model has several shapes of that kind."""
        per_kind = Counter(self.spec.blocks[k.first].kind for k in kinds)
        out = []
        for kind, block in zip(kinds, self.blocks):
            spec = self.spec.blocks[kind.first]
            key = spec.kind.value if per_kind[spec.kind] == 1 else f"{spec.kind.value}-{kind.first}"
            out.append(self._layer_profile(key, spec, type(block).__name__, list(block.parameters()), kind.count,
                                           kind.measurements))
        return out

    def _layer_profile(self, key: str, spec: LayerSpec, module: str, params: list[nn.Parameter], count: int,
                       measurements: list[Measurement]) -> LayerProfile:
        full = dataclasses.replace(spec, hidden=spec.hidden or self.spec.hidden)
        return LayerProfile(
            key=key, kind=spec.kind, module=module, spec=full, params=sum(p.numel() for p in params),
            param_bytes=sum(p.numel() * p.element_size() for p in params), count=count,
            attention_flops_per_token_per_seq=spec.attention_flops_per_token / self.spec.seq_len,
            measurements=tuple(measurements),
        )

    # ---------------------------------------------------------------- embedding and head
    def _edges(self, tokens: torch.Tensor) -> None:
        """Embedding: the model's forward up to the first block, and its backward. Head: the model
        with no blocks, forward and backward through the loss, minus the embedding's share."""
        mb, s = tokens.shape
        targets = torch.randint(0, max(self.spec.vocab, 1), tokens.shape, device=self.device)
        params = storage_ptrs([*self.shell.parameters(), *self.shell.buffers(), tokens, targets])
        grad = torch.randn_like(self._capture(tokens).hidden)

        def embed() -> Any:
            with autocast(self.device, self.dtype):
                return _BlockCall.capture(self, tokens, keep_graph=True).hidden

        emb = self._measure(mb, s, Recompute.NONE, embed, lambda h: h.backward(grad), params | storage_ptrs([grad]))

        def whole() -> Any:
            with autocast(self.device, self.dtype):
                return lm_loss(self.shell(tokens), targets)

        with _blocks_replaced(self.shell, self.block_path, []):
            both = self._measure(mb, s, Recompute.NONE, whole, lambda loss: loss.backward(), params)
        split = {}
        if both.split and emb.split:
            for key in SPLIT_FIELDS:
                split[key] = max(getattr(both, key) - getattr(emb, key), 0.0)
        head = Measurement(
            micro_batch=mb, seq_len=s, recompute=Recompute.NONE,
            forward_s=max(both.forward_s - emb.forward_s, 0.0), backward_s=max(both.backward_s - emb.backward_s, 0.0),
            activation_bytes=max(both.activation_bytes - emb.activation_bytes, 0.0),
            temporary_bytes=both.temporary_bytes, **split,
        )
        self.edges["embedding"].append(emb)
        self.edges["head"].append(head)

    def _edge_profiles(self) -> list[LayerProfile]:
        blocks = {id(p) for b in self.blocks for p in b.parameters()}
        edge = [p for p in self.shell.parameters() if id(p) not in blocks]
        embedding = {id(p) for m in self.shell.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
        out = []
        for key, kind, params in (("embedding", LayerKind.EMBEDDING, [p for p in edge if id(p) in embedding]),
                                  ("head", LayerKind.HEAD, [p for p in edge if id(p) not in embedding])):
            spec = self.spec.layers_of(kind)[0]
            out.append(self._layer_profile(key, spec, kind.value, params, 1, self.edges[key]))
        return out

    # ---------------------------------------------------------------- optimizer
    def optimizer(self, bar: Progress) -> OptimizerProfile | None:
        """Fused AdamW (foreach on CPU) over one block's parameters and over all profiled ones."""
        fused = self.device.type == "cuda"
        sets = (list(self.blocks[0].parameters()), list(self.shell.parameters()))
        points = [(sum(p.numel() for p in params), self._time_optimizer(params, fused)) for params in sets]
        bar.step("optimizer")
        return OptimizerProfile.of("adamw-fused" if fused else "adamw-foreach", points)

    def _time_optimizer(self, params: list[nn.Parameter], fused: bool) -> float:
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        opt = torch.optim.AdamW(params, lr=1e-9, fused=fused)
        for _ in range(max(self.options.warmup, 1)):
            opt.step()
        (seconds,) = self.clock.median([lambda _: opt.step()], self.options.repeats)
        return seconds


class _BlockCall:
    """The arguments the model passes its first block, with the hidden states replaceable."""

    def __init__(self, args: tuple, kwargs: dict, hidden: torch.Tensor, positional: bool) -> None:
        self.args, self.kwargs, self.hidden, self.positional = args, kwargs, hidden, positional

    @classmethod
    def capture(cls, job: _Job, tokens: torch.Tensor, keep_graph: bool = False) -> _BlockCall:
        """Run the model until its first block. ``keep_graph``: keep the hidden states attached to the
        embedding's autograd graph (for its backward); else everything is detached."""
        seen: dict[str, Any] = {}

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            seen["args"], seen["kwargs"] = args, kwargs
            raise _Stop

        handle = job.blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            with torch.set_grad_enabled(keep_graph):
                job.shell(tokens)
        except _Stop:
            pass
        finally:
            handle.remove()
        if not seen:
            raise ProfileError("the model's forward returned without calling its first block")
        args, kwargs = seen["args"], seen["kwargs"]
        positional = bool(args) and isinstance(args[0], torch.Tensor)
        hidden = args[0] if positional else kwargs.get("hidden_states")
        if not isinstance(hidden, torch.Tensor):
            raise ProfileError("cannot find the hidden states among the first block's arguments")
        if not keep_graph:
            args, kwargs = tree_map(_detach, (args, kwargs))
        return cls(args, kwargs, hidden, positional)

    def with_hidden(self, x: torch.Tensor) -> tuple[tuple, dict]:
        """The captured arguments with ``x`` as the hidden states."""
        if self.positional:
            return (x, *self.args[1:]), dict(self.kwargs)
        return tuple(self.args), {**self.kwargs, "hidden_states": x}


def _detach(value: Any) -> Any:
    return value.detach() if isinstance(value, torch.Tensor) else value


def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise ProfileError(f"a block returned {type(out).__name__}; expected a tensor or a tuple starting with one")


@contextmanager
def _blocks_replaced(model: nn.Module, path: str, members: Sequence[nn.Module]) -> Iterator[None]:
    """Temporarily replace the block container at ``path`` with one holding ``members``."""
    if not path:
        raise ProfileError("the model itself is the list of blocks: wrap it in a module with an embedding")
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path)
    original = getattr(parent, attr)
    replacement = nn.Sequential(*members) if isinstance(original, nn.Sequential) else nn.ModuleList(members)
    setattr(parent, attr, replacement)
    try:
        yield
    finally:
        setattr(parent, attr, original)


def default_seq_lens(model: nn.Module) -> tuple[int, ...]:
    """The model's sequence length (at most :data:`LONGEST_DEFAULT`: Hugging Face configs state their
    longest context), its half and its quarter."""
    longest = max_positions(model)
    if longest is None:
        raise ProfileError("the model states no sequence length: pass seq_lens")
    longest = min(longest, LONGEST_DEFAULT)
    return tuple(sorted({max(longest // 4, 1), max(longest // 2, 1), longest}))


def max_positions(model: nn.Module) -> int | None:
    """The longest sequence the model's config allows (position table, RoPE cache), if it says."""
    config = getattr(model, "config", None)
    for attr in _MAX_POSITION_ATTRS:
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _device_info(device: torch.device) -> DeviceInfo:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return DeviceInfo(type="cuda", name=props.name, memory_bytes=int(props.total_memory),
                          torch=torch.__version__, cuda=str(torch.version.cuda))
    return DeviceInfo(type=device.type, name=platform.processor() or platform.machine() or device.type,
                      torch=torch.__version__)

"""The native runtime: runs a :class:`~galvatron.plan.Plan` on PyTorch's own distributed stack.

One file per parallelism: ``mesh`` (rank grid and device meshes), ``data`` (DP / ZeRO),
``optim`` (ZeRO-1 optimizer), ``tensor`` (TP / SP / vocabulary parallel), ``recompute``,
``relayout`` (activations between layer groups), ``pipeline``, ``context``, ``expert``,
``checkpoint``; ``apply`` reads a plan once (``galvatron.wrap``). Nothing is imported here:
``import galvatron`` stays light.
"""

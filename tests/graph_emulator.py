"""CUDA graph semantics on a CPU, for tests of code that a CUDA graph will replay.

A CUDA graph capture records the kernels a function launches without running them, with the
memory they read and write and their scalar arguments as they were; a replay launches those
kernels again, on that memory, with those scalars. Three things follow that rerunning the
Python function (what a simple stand-in does) would hide:

* a Python value the function reads (a learning rate, a step counter) is frozen at the capture;
* a tensor replaced outside the graph (``p.grad = None``, a new buffer) is no longer the one the
  graph writes or reads, and one given other memory (``p.data = ...``) is refused at the next
  replay;
* the capture changes nothing: a buffer updated in place (BatchNorm's running statistics) is
  updated by the replays only.

And two things a capture refuses: reading a value back to the host (``.item()``, a boolean
test of a tensor, an operator whose output size depends on the data), and building a tensor
from host data (``torch.tensor([...])``, on CUDA a host-to-device copy).

:func:`emulated_capture` has the signature of :data:`kdlib.step.Capture`. It records every
ATen operator the function dispatches (forward and backward: the autograd engine dispatches
through the same mode), runs them once to learn their results, then puts back the values of
the tensors from outside that they met (and the CPU random state), so the capture leaves no
trace. Its replay runs the recorded operators again with the recorded arguments and writes each
result into the tensor the capture produced: the graph's fixed memory. Its own tests are in
``tests/test_graph_emulator.py``.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

HOST_READS = (torch.Tag.data_dependent_output, torch.Tag.dynamic_output_shape)
HOST_DATA = (torch.ops.aten.lift_fresh.default, torch.ops.aten.lift_fresh_copy.default)


class CaptureError(RuntimeError):
    """The function does something a CUDA graph capture refuses."""


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list = []  # (operator, args, kwargs, the tensors it returned)
        self.made: set[int] = set()  # storages the capture allocated (the graph's memory)
        # (tensor, its value when the capture first met it), for every tensor from outside:
        # operators' schemas do not all declare what they write (native_batch_norm updates
        # the running statistics undeclared), so every one is kept and put back
        self.before: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.seen: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if any(tag in func.tags for tag in HOST_READS):
            raise CaptureError(f"{func} reads a tensor's value back to the host (or sizes its "
                               "output by it), which a CUDA graph capture cannot do")
        if func in HOST_DATA:
            raise CaptureError(f"{func}: a tensor built from host data inside the captured step "
                               "(on CUDA a host-to-device copy, which a capture refuses)")
        for t in tree_leaves((args, kwargs)):
            if (isinstance(t, torch.Tensor) and _storage(t) not in self.made
                    and id(t) not in self.seen):
                self.seen.add(id(t))  # the recorded operators keep t alive: ids stay unique
                self.before.append((t, t.detach().clone()))
        out = func(*args, **kwargs)
        self.made.update(_storage(t) for t in tree_leaves(out) if isinstance(t, torch.Tensor))
        self.ops.append((func, args, kwargs, out))
        return out


def emulated_capture(fn: Callable[[], None], stream=None) -> Callable[[], None]:
    """``fn`` recorded as a CUDA graph records it (see the module's docstring); returns its
    replay. ``stream`` is accepted for the signature of :data:`kdlib.step.Capture`."""
    rng = torch.get_rng_state()
    recorder = _Recorder()
    with recorder:
        fn()
    with torch.inference_mode():  # the capture ran nothing: undo it, newest first
        for t, value in reversed(recorder.before):
            t.copy_(value)
    torch.set_rng_state(rng)
    ops = recorder.ops
    addresses = [(t, _storage(t)) for t, _ in recorder.before]

    def replay() -> None:
        for t, address in addresses:  # a graph reads and writes fixed addresses
            if _storage(t) != address:
                raise CaptureError(f"a {tuple(t.shape)} tensor the graph uses was given other "
                                   "memory since the capture (``.data =``, ``set_``): a CUDA "
                                   "graph would still use the old")
        # inference mode: no autograd bookkeeping (the recorded backward is replayed as the
        # operators it was), and writes into inference tensors (a teacher's logits) allowed
        with torch.inference_mode():
            for func, args, kwargs, out in ops:
                result = func(*args, **kwargs)
                for kept, new in zip(tree_leaves(out), tree_leaves(result)):
                    if isinstance(kept, torch.Tensor) and _storage(new) != _storage(kept):
                        kept.copy_(new)  # into the graph's memory (a view or in-place op
                        # already wrote there)

    replay.ops = ops
    return replay

"""`no_host_reads()`: a guard that fails on anything in a block of code that would make a GPU wait for the host.

On a GPU, the training step stalls whenever Python needs a value that lives on the device: `bool(t)`, `t.item()`,
`t.tolist()`, `int(t)`, `float(t)`, `t.numpy()`, an op whose output shape depends on the data (`nonzero`, boolean
indexing, `unique`, `masked_select`, `repeat_interleave` without `output_size`), or a tensor built from Python data
(`torch.tensor([...], device=...)`, a blocking host-to-device copy). On a CPU none of these waits for anything, so
the guard makes each of them raise, and a CPU test can prove that a block of code makes none of them.

Two layers, because some reads happen in C++ below Python: the Python methods of `torch.Tensor` are replaced for
the block, and a `TorchDispatchMode` sees every aten op the block runs (`aten._local_scalar_dense` is what every
scalar read calls, from Python or C++). `torch._assert_async` is allowed: it reads on the CPU but not on a GPU.
"""

import contextlib
from collections.abc import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

READ_METHODS = ("__bool__", "item", "tolist", "__int__", "__float__", "__index__", "numpy", "__array__")


class HostRead(AssertionError):
    """Code inside `no_host_reads()` read a tensor's value on the host, or made a tensor from host data."""


def _boolean_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(index, torch.Tensor) and index.dtype in (torch.bool, torch.uint8) for index in indices)


class _HostReadMode(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        packet = func.overloadpacket
        if torch.Tag.data_dependent_output in func.tags:
            raise HostRead(f"{func} reads a tensor's value on the host (a device-to-host sync on a GPU).")
        if torch.Tag.dynamic_output_shape in func.tags:
            # Advanced indexing with integer tensors has a static output shape; boolean masks do not.
            if packet not in (torch.ops.aten.index, torch.ops.aten.index_put, torch.ops.aten.index_put_) \
                    or _boolean_index(args):
                raise HostRead(f"{func} has a data-dependent output shape (a device-to-host sync on a GPU).")
        if packet is torch.ops.aten.lift_fresh:
            raise HostRead("a tensor was made from host data inside the step (`torch.tensor(...)`: a blocking "
                           "host-to-device copy on a GPU); build it once outside, or from device ops.")
        return func(*args, **(kwargs or {}))


def _raiser(name: str):
    def read(self, *args, **kwargs):
        raise HostRead(f"Tensor.{name} read a {tuple(self.shape)} {self.dtype} tensor on the host (a device-to-host "
                       "sync on a GPU).")
    return read


@contextlib.contextmanager
def no_host_reads() -> Iterator[None]:
    """Within the block, every host read of a tensor's value (and every tensor made from host data) raises
    `HostRead`. Not thread-safe: it patches `torch.Tensor` for the whole process while it is active."""
    saved = {name: torch.Tensor.__dict__.get(name) for name in READ_METHODS}
    for name in READ_METHODS:
        setattr(torch.Tensor, name, _raiser(name))
    try:
        with _HostReadMode():
            yield
    finally:
        for name, method in saved.items():
            if method is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, method)

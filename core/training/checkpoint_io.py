"""How checkpoint bytes move: host staging reused across saves, parallel DCP writes, one background writer.

Where a save's time went at first (gpt 356m, one H200, 4.56 GiB): DCP's writer copied each CUDA
tensor to pageable host memory (1.1-1.3 GiB/s), ran torch.save's CRC32 over every byte on one
thread, and wrote on that same thread, all in series. Here the state is first copied into host
buffers allocated once (pinned on CUDA: the copy runs at tens of GiB/s), then written by several
threads, one file each, one fsync per file, each tensor as its own bytes straight from the staged
block (``raw_tensor_files``: no per-tensor archive, no second copy); a load reads each file on its
own thread straight into the tensors that receive it.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable, Iterator

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed._state_dict_utils import _copy_state_dict, _create_cpu_state_dict

from core.training.raw_tensor_files import RawReader, RawWriter

WRITE_THREADS = 8
"""Files (and threads) per rank, for writing and for reading: on the H200 machine's disk 8 files
wrote 1.13-1.15 x its single-stream fdatasync rate where 4 wrote 0.90-1.12 x and 1 wrote 0.79 x
(bench/checkpoint_io.py --files); more files cost metadata and small tail writes."""


def state_bytes(state: dict) -> int:
    """Bytes of the tensors in a (nested) state dict: what a host copy of it costs."""
    total = 0
    for v in state.values():
        if isinstance(v, dict):
            total += state_bytes(v)
        elif isinstance(v, torch.Tensor):
            local = getattr(v, "_local_tensor", v)  # a DTensor's own shard
            total += local.numel() * local.element_size()
    return total


def host_memory_available() -> int:
    """MemAvailable from /proc/meminfo (bytes); a large number where the file does not exist."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def _signature(state: dict) -> tuple:
    """Keys, shapes and dtypes: when they change (another model, a new optimizer field), the host
    buffers are allocated again."""
    out = []
    for k, v in state.items():
        if isinstance(v, dict):
            out.append((k, _signature(v)))
        elif isinstance(v, torch.Tensor):
            out.append((k, tuple(v.shape), v.dtype))
        else:
            out.append((k, type(v).__name__))
    return tuple(out)


class HostStage:
    """One host copy of a rank's state, allocated at first use and reused by every later save
    (and by a resume's load), so a save pays only the device-to-host copy: pinned on CUDA, plain
    CPU tensors on CPU (the same code path, so CI exercises reuse and overlap)."""

    def __init__(self, pinned: bool) -> None:
        self.pinned = pinned
        self.buffers: dict | None = None
        self.nbytes = 0
        self._sig: tuple | None = None
        self._unpin: weakref.finalize | None = None

    def release(self) -> None:
        """Give the host memory back (page-locked memory is scarce: it cannot be swapped)."""
        self.buffers, self._sig, self.nbytes = None, None, 0
        if self._unpin is not None:
            self._unpin()
            self._unpin = None

    def ensure(self, state: dict) -> tuple[dict, bool]:
        """The buffers for ``state`` (allocated now if they do not match it) and whether they were."""
        sig = _signature(state)
        if self.buffers is not None and sig == self._sig:
            return self.buffers, False
        self.release()  # the old copy goes before the new one is allocated
        buffers = _create_cpu_state_dict(state)  # the structure, plain CPU tensors (not yet touched)
        if self.pinned:
            self._unpin = weakref.finalize(self, _pin_in_one_block(buffers))
        self.buffers, self._sig, self.nbytes = buffers, sig, state_bytes(state)
        return self.buffers, True

    @torch.no_grad()
    def stage(self, state: dict) -> dict:
        """Copy ``state`` into the host buffers; returns the staged state dict (the buffers' tensors
        with ``state``'s current plain values: a learning rate, a step count) once the copy is done."""
        buffers, _ = self.ensure(state)
        staged = _copy_state_dict(state, buffers, non_blocking=self.pinned)
        if self.pinned:
            torch.cuda.synchronize()
        return staged

    @torch.no_grad()
    def restore(self, loaded: dict, state: dict) -> dict:
        """Copy loaded host buffers into ``state``'s tensors (pinned: at the link's rate); returns
        ``state``'s tensors with the loaded plain values, for set_*_state_dict."""
        out = _copy_state_dict(loaded, state, non_blocking=self.pinned)
        if self.pinned:
            torch.cuda.synchronize()
        return out


def _local_tensors(state: dict) -> Iterator[torch.Tensor]:
    for v in state.values():
        if isinstance(v, dict):
            yield from _local_tensors(v)
        elif isinstance(v, torch.Tensor):
            t = getattr(v, "_local_tensor", v)
            if t.dim() > 0 and t.numel() > 0:
                yield t


def _pin_in_one_block(buffers: dict) -> Callable[[], None]:
    """Re-point every tensor of ``buffers`` into one page-locked block: one registration of the exact
    size (the caching host allocator would round each tensor up to a power of two, up to 2x the
    memory) and one pass of page faults, instead of hundreds."""
    tensors = list(_local_tensors(buffers))
    sizes = [(t.numel() * t.element_size() + 63) // 64 * 64 for t in tensors]  # 64-byte aligned views
    block = torch.empty(max(sum(sizes), 1), dtype=torch.uint8)
    cudart = torch.cuda.cudart()
    ptr = block.data_ptr()
    if cudart.cudaHostRegister(ptr, block.numel(), 0) != 0:
        raise RuntimeError("cudaHostRegister failed: no page-locked host memory for checkpoint staging")
    offset = 0
    for t, size in zip(tensors, sizes):
        n = t.numel() * t.element_size()
        t.set_(block[offset : offset + n].view(t.dtype).view(t.shape))
        offset += size
    # unregistered before the memory can go: the closure keeps the block alive until it runs
    return lambda: cudart.cudaHostUnregister(block.data_ptr())


def write(state: dict, path: str, group: object | None, threads: int = WRITE_THREADS) -> None:
    """``dcp.save`` of host tensors into ``path``: ``threads`` files per rank, each tensor written as
    its own bytes from where it lies, each file fsynced once."""
    # dcp.save looked up at call time: tests replace it to kill a rank inside a save
    dcp.save(state, storage_writer=RawWriter(path, threads), process_group=group, no_dist=not _dist_on())


def read(state: dict, path: str, threads: int = WRITE_THREADS) -> None:
    """``dcp.load`` into ``state`` (host buffers or the live tensors), one reading thread per file."""
    dcp.load(state, storage_reader=RawReader(path, threads), no_dist=not _dist_on())


def read_whole(path: str) -> dict:
    """Every tensor and value of the checkpoint in ``path`` as one nested plain state dict, in the
    shapes they had as a whole (the shards put together): what ``--export`` writes."""
    # torch's own dcp_to_torch_save does exactly this, with its stock reader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    whole: dict = {}
    _load_state_dict(
        whole, storage_reader=RawReader(path, WRITE_THREADS), planner=_EmptyStateDictLoadPlanner(), no_dist=True
    )
    return whole


def _dist_on() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)

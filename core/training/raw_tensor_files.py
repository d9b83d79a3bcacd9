"""DCP storage that keeps each tensor as its own bytes: one large write per tensor, one read into
the tensor that receives it.

torch.distributed.checkpoint still plans the save and the load (which rank holds which chunk, the
``.metadata`` index, resharding into any layout); only the bytes of a tensor item change form.
DCP's FileSystemWriter wraps every tensor in its own ``torch.save`` archive and, first, copies any
tensor that is a view of a larger storage (our staged state is views of one page-locked block: a
second copy of the whole state into fresh pageable memory per save). Its reader opens each item's
archive with ``torch.load`` into a new tensor and copies that into the target, one item after the
other. Here a tensor item is its row-major bytes, written straight from the staged memory and read
straight into the destination (``preadv`` with the GIL released, one thread per file), which is
what lets a save and a load move at the disk's rate.

An item written this way is marked in the index (``transform_descriptors = ["raw-bytes"]``), so a
checkpoint written by plain ``dcp.save`` (no mark) is still read, through DCP's own per-item path;
a stock FileSystemReader refuses a raw item (unknown transform) rather than misreading it: read
these folders with :func:`read` or ``--export`` them to one plain state dict.
"""

from __future__ import annotations

import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor

import torch
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, SavePlan, SavePlanner, WriteItemType
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

RAW = "raw-bytes"
"""The index's mark on an item stored as its tensor's bytes, row-major, no header."""

IO_CHUNK = 1 << 30
"""Bytes per write/read call: Linux moves at most ~2 GiB per call; large calls keep the disk busy."""


def _storage_info(name: str, offset: int, length: int, raw: bool):
    # DCP's record of where an item lies (private dataclass; its fields are stable since torch 2.7)
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    return _StorageInfo(name, offset, length, transform_descriptors=[RAW] if raw else None)


def _bytes_of(t: torch.Tensor) -> memoryview:
    """The row-major bytes of a contiguous CPU tensor, without a copy."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _write_all(fd: int, data: memoryview) -> None:
    done = 0
    while done < len(data):
        done += os.write(fd, data[done : done + IO_CHUNK])


def _read_exact(fd: int, into: memoryview, offset: int, path: str) -> None:
    done = 0
    while done < len(into):
        n = os.preadv(fd, [into[done : done + IO_CHUNK]], offset + done)
        if n == 0:
            raise OSError(f"{path} ends at {offset + done:,} bytes, before the {len(into):,} recorded at {offset:,}")
        done += n


def _item_bytes(wi) -> int:
    return wi.tensor_data.size.numel() * wi.tensor_data.properties.dtype.itemsize


def _buckets(items: list, n: int) -> list[list]:
    """``n`` files of about equal bytes: the largest tensors first, each to the lightest file."""
    out: list[list] = [[] for _ in range(n)]
    load = [0] * n
    tensors = sorted((wi for wi in items if wi.type != WriteItemType.BYTE_IO), key=_item_bytes, reverse=True)
    other = [wi for wi in items if wi.type == WriteItemType.BYTE_IO]
    for i, wi in enumerate(other):
        out[i % n].append(wi)
    for wi in tensors:
        i = load.index(min(load))
        out[i].append(wi)
        load[i] += _item_bytes(wi)
    return [b for b in out if b]


class RawWriter(FileSystemWriter):
    """``threads`` files per rank, each written by its own thread and fsynced once."""

    def __init__(self, path: str, threads: int) -> None:
        super().__init__(path, single_file_per_rank=True, sync_files=True, thread_count=threads)

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        prefix = plan.storage_data.prefix
        files = [(f"{prefix}{i}.distcp", bucket) for i, bucket in enumerate(_buckets(plan.items, self.thread_count))]
        with ThreadPoolExecutor(max(len(files), 1), thread_name_prefix="checkpoint-file") as pool:
            parts = list(pool.map(lambda f: self._write_file(f[0], f[1], planner), files))
        fut: Future = Future()
        fut.set_result([r for part in parts for r in part])
        return fut

    def _write_file(self, name: str, items: list, planner: SavePlanner) -> list[WriteResult]:
        results, offset = [], 0
        fd = os.open(os.path.join(self.path, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for wi in items:
                data = planner.resolve_data(wi)
                raw = wi.type != WriteItemType.BYTE_IO
                if raw:
                    data = _bytes_of(data.detach().cpu().contiguous())
                else:  # a plain value DCP pickled (a step count, a learning rate)
                    data = data.getbuffer()
                _write_all(fd, data)
                info = _storage_info(name, offset, len(data), raw)
                results.append(WriteResult(index=wi.index, size_in_bytes=len(data), storage_data=info))
                offset += len(data)
            os.fsync(fd)
        finally:
            os.close(fd)
        return results


class RawReader(FileSystemReader):
    """Reads raw items one thread per file, straight into the destination where it is a contiguous
    CPU tensor of the saved chunk (otherwise through one temporary of the chunk's shape); other
    items (a plain dcp.save's) through DCP's own reader."""

    def __init__(self, path: str, threads: int) -> None:
        super().__init__(path)
        self.threads = threads
        self._chunks: dict[tuple, tuple] = {}

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args, **kwargs) -> None:
        super().set_up_storage_reader(metadata, is_coordinator, *args, **kwargs)
        for fqn, md in metadata.state_dict_metadata.items():
            if isinstance(md, TensorStorageMetadata):
                for c in md.chunks:
                    self._chunks[(fqn, tuple(c.offsets))] = (md.properties.dtype, tuple(c.sizes))

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        raw: dict[str, list] = {}
        other = []
        for req in plan.items:
            info = self.storage_data[req.storage_index]
            if RAW in (info.transform_descriptors or ()):
                raw.setdefault(info.relative_path, []).append((info.offset, req))
            else:
                other.append(req)
        if other:
            super().read_data(dataclasses.replace(plan, items=other), planner).wait()
        if raw:
            with ThreadPoolExecutor(min(self.threads, len(raw)), thread_name_prefix="checkpoint-read") as pool:
                list(
                    pool.map(lambda kv: self._read_file(kv[0], sorted(kv[1], key=lambda r: r[0]), planner), raw.items())
                )
        fut: Future = Future()
        fut.set_result(None)
        return fut

    def _read_file(self, name: str, reqs: list, planner: LoadPlanner) -> None:
        path = os.path.join(self.path, name)
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)  # a larger read-ahead: the file is read in order
        try:
            for offset, req in reqs:
                idx = req.storage_index
                dtype, sizes = self._chunks[(idx.fqn, tuple(idx.offset))]
                target = planner.resolve_tensor(req).detach()
                if tuple(target.shape) != tuple(req.lengths):
                    raise ValueError(
                        f"{path}: {idx.fqn} is {tuple(req.lengths)} in the checkpoint, {tuple(target.shape)} here"
                    )
                whole = tuple(req.lengths) == sizes and not any(req.storage_offsets)
                if whole and target.is_cpu and target.is_contiguous() and target.dtype == dtype:
                    _read_exact(fd, _bytes_of(target), offset, path)
                else:
                    chunk = torch.empty(sizes, dtype=dtype)
                    _read_exact(fd, _bytes_of(chunk), offset, path)
                    for dim, (start, length) in enumerate(zip(req.storage_offsets, req.lengths)):
                        chunk = chunk.narrow(dim, start, length)
                    target.copy_(chunk)
                planner.commit_tensor(req, target)
        finally:
            os.close(fd)

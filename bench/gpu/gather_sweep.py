"""Why the zero-copy gather of the decode step reads pinned host memory at ~57% of a pinned memcpy on the H100
box (30.9 GB/s against 54.2 in decode_64k_equal_memory_h100.json) where the H200 box reached 89-91%.

The engine's gather (`nosa.ops.kernels.gather.gather_blocks`) runs one program per (block, KV head) entry,
reading a 64-token x 128-dim bf16 block of K and of V (16 KiB each) straight from pinned host memory through
unified addressing. Each hypothesis below changes one thing and is timed against a plain pinned -> device
copy of the same bytes, in the same process, with CUDA events (median of `--reps`):

  order     random entries (the engine's case), sorted by source address, sequential pages: whether the
            host side (IOMMU translation, DRAM pages) penalises scattered reads
  size      entries per launch: 256 (~8 MB, one layer's misses in the cached 64K step), 1024, 4096
  warps     num_warps 1 / 2 / 4 (the default) / 8 at the default tile: requests in flight per program
  tile      tokens per tile 16 / 32 / 64 at 4 warps
  kv_first  a variant that issues the K and V loads of a tile before either store (twice the bytes in flight)
  memory    the host buffer from torch (cudaHostAlloc through the caching host allocator) against the host
            store's `nosa.engine.pinned.PinnedBuffer` (an mmap'd buffer with transparent huge pages asked
            for, registered with cudaHostRegister), and a cudaHostAlloc'd write-combined buffer (non-snooped
            reads), where the runtime allows

Writes one JSON file (argv[1]) with every timing and the machine header; prints a table. Exactness: every
variant's destination is compared with the host blocks it should hold."""

from __future__ import annotations

import ctypes
import glob
import json
import os
import sys

import torch
import triton
import triton.language as tl

from nosa.bench.common import cuda_median_ms
from nosa.engine.pinned import PinnedBuffer
from nosa.ops.kernels import gather as kernels

BLOCK, DIM, HEADS, PAGES = 64, 128, 2, 8192


@triton.jit
def _gather_kv_first_kernel(src_k, src_v, dst_k, dst_v, src_page_ptr, dst_page_ptr, head_ptr,
                            s_page, s_head, s_tok, s_dim, d_page, d_head, d_tok, d_dim,
                            BLOCK_TOKENS: tl.constexpr, HEAD_DIM: tl.constexpr, TILE_TOKENS: tl.constexpr):
    entry = tl.program_id(0)
    src_page = tl.load(src_page_ptr + entry).to(tl.int64)
    dst_page = tl.load(dst_page_ptr + entry).to(tl.int64)
    head = tl.load(head_ptr + entry).to(tl.int64)
    toks = tl.arange(0, TILE_TOKENS)
    dims = tl.arange(0, HEAD_DIM)
    for t0 in range(0, BLOCK_TOKENS, TILE_TOKENS):
        t = t0 + toks
        src_off = src_page * s_page + head * s_head + t[:, None] * s_tok + dims[None, :] * s_dim
        dst_off = dst_page * d_page + head * d_head + t[:, None] * d_tok + dims[None, :] * d_dim
        k = tl.load(src_k + src_off)
        v = tl.load(src_v + src_off)
        tl.store(dst_k + dst_off, k)
        tl.store(dst_v + dst_off, v)


def launch_default(host_k, host_v, dst_k, dst_v, src_page, dst_page, head, num_warps=None, tile=None):
    if num_warps is None and tile is None:
        return kernels.gather_blocks(host_k, host_v, dst_k, dst_v, src_page, dst_page, head)
    tile = tile or max(1, min(BLOCK, 8192 // DIM))
    kernels._gather_blocks_kernel[(src_page.numel(),)](
        host_k, host_v, dst_k, dst_v, src_page, dst_page, head, *host_k.stride(), *dst_k.stride(),
        BLOCK_TOKENS=BLOCK, HEAD_DIM=DIM, TILE_TOKENS=tile, TILE_DIM=DIM, num_warps=num_warps or 4)


def launch_kv_first(host_k, host_v, dst_k, dst_v, src_page, dst_page, head, tile=32, num_warps=4):
    _gather_kv_first_kernel[(src_page.numel(),)](
        host_k, host_v, dst_k, dst_v, src_page, dst_page, head, *host_k.stride(), *dst_k.stride(),
        BLOCK_TOKENS=BLOCK, HEAD_DIM=DIM, TILE_TOKENS=tile, num_warps=num_warps)


def cudart_library():
    """libcudart through ctypes (the torch wheel's or the system's), or None."""
    candidates = []
    for root in sys.path:
        candidates += glob.glob(os.path.join(root, "nvidia", "*", "lib", "libcudart.so*"))
        candidates += glob.glob(os.path.join(root, "nvidia", "cuda_runtime", "lib", "libcudart.so*"))
    candidates += glob.glob("/usr/local/cuda*/lib64/libcudart.so*")
    for path in candidates:
        try:
            return ctypes.CDLL(path), path
        except OSError:
            continue
    return None, None


def tensor_at(address: int, nbytes: int) -> torch.Tensor:
    """A CPU bf16 tensor over `nbytes` at `address` (cudaHostAlloc'd: never freed while the sweep runs)."""
    return torch.frombuffer((ctypes.c_uint8 * nbytes).from_address(address), dtype=torch.uint8).view(torch.bfloat16)


def host_buffers(kind: str, shape, lib):
    """(two host tensors of `shape` bf16 (K and V) of the given kind or None if not possible, a description,
    what keeps them registered)."""
    nbytes = 2 * int(torch.tensor(shape).prod())
    if kind == "torch_pinned":
        return [torch.empty(shape, dtype=torch.bfloat16, pin_memory=True) for _ in range(2)], "torch pin_memory (caching host allocator)", None
    if kind == "engine_pinned_buffer":
        buffers = [PinnedBuffer(nbytes) for _ in range(2)]
        tensors = [b.tensor(shape, torch.bfloat16) for b in buffers]
        return tensors, "nosa.engine.pinned.PinnedBuffer (mmap, MADV_HUGEPAGE, cudaHostRegister): the host store's", buffers
    if kind == "write_combined":
        if lib is None:
            return None, "no libcudart found", None
        out = []
        for _ in range(2):
            ptr = ctypes.c_void_p()
            err = lib.cudaHostAlloc(ctypes.byref(ptr), ctypes.c_size_t(nbytes), ctypes.c_uint(0x04 | 0x02))
            if err != 0:
                return None, f"cudaHostAlloc(WriteCombined|Mapped) failed: {err}", None
            out.append(tensor_at(ptr.value, nbytes).view(shape))
        return out, "cudaHostAlloc(cudaHostAllocWriteCombined | cudaHostAllocMapped)", None
    raise ValueError(kind)


def main() -> int:
    path = sys.argv[1]
    reps = int(os.environ.get("REPS", "20"))
    torch.manual_seed(0)
    lib, lib_path = cudart_library()
    shape = (PAGES, HEADS, BLOCK, DIM)
    results = {"machine": {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                           "cuda": torch.version.cuda, "cudart_ctypes": lib_path},
               "parameters": {"block_tokens": BLOCK, "head_dim": DIM, "heads": HEADS, "host_pages": PAGES,
                              "entry_bytes_k_plus_v": 2 * BLOCK * DIM * 2, "reps": reps}, "memory": {}, "runs": []}
    for kind in ("torch_pinned", "engine_pinned_buffer", "write_combined"):
        try:
            buffers, description, owner = host_buffers(kind, shape, lib)
        except Exception as err:  # noqa: BLE001 - a diagnostic: record and go on
            buffers, description, owner = None, f"{type(err).__name__}: {err}", None
        results["memory"][kind] = description
        print(f"{kind}: {description}", flush=True)
        if buffers is None:
            continue
        host_k, host_v = buffers
        host_k.view(torch.int16).random_(-2**15, 2**15 - 1)
        host_v.view(torch.int16).random_(-2**15, 2**15 - 1)
        for entries in (256, 1024, 4096):
            dst_k = torch.empty((entries, BLOCK, HEADS, DIM), dtype=torch.bfloat16, device="cuda").transpose(1, 2)
            dst_v = torch.empty_like(dst_k)
            nbytes = 2 * entries * BLOCK * DIM * 2
            flat_src = host_k.view(-1)[: nbytes // 2]
            flat_dst = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda")
            memcpy_ms = cuda_median_ms(lambda: flat_dst.copy_(flat_src, non_blocking=True), reps=reps)
            g = torch.Generator().manual_seed(entries)
            pick = torch.randperm(PAGES * HEADS, generator=g)[:entries]
            orders = {"random": pick, "sorted": pick.sort().values, "sequential": torch.arange(entries)}
            variants = [("default", {})] if kind != "torch_pinned" or entries != 1024 else (
                [("default", {})] + [(f"warps{w}", {"num_warps": w}) for w in (1, 2, 8)]
                + [(f"tile{t}", {"tile": t}) for t in (16, 32)] + [("kv_first_t32", "kv"), ("kv_first_t16", "kv16")])
            for order, src in orders.items():
                src_page = (src // HEADS).int().cuda()
                head = (src % HEADS).int().cuda()
                dst_page = torch.arange(entries, dtype=torch.int32, device="cuda")
                for name, options in variants:
                    if options == "kv":
                        fn = lambda: launch_kv_first(host_k, host_v, dst_k, dst_v, src_page, dst_page, head, tile=32)  # noqa: E731
                    elif options == "kv16":
                        fn = lambda: launch_kv_first(host_k, host_v, dst_k, dst_v, src_page, dst_page, head, tile=16)  # noqa: E731
                    else:
                        fn = lambda o=options: launch_default(host_k, host_v, dst_k, dst_v, src_page, dst_page, head, **o)  # noqa: E731
                    try:
                        ms = cuda_median_ms(fn, reps=reps)
                        sample = torch.arange(min(16, entries))
                        pages, heads = src_page[:16].long().cpu(), head[:16].long().cpu()
                        correct = all(  # bits, K and V: NaNs too
                            torch.equal(dst[sample.cuda(), head[:16].long()].cpu().view(torch.int16),
                                        src[pages, heads].view(torch.int16))
                            for dst, src in ((dst_k, host_k), (dst_v, host_v)))
                    except Exception as err:  # noqa: BLE001
                        results["runs"].append({"memory": kind, "entries": entries, "order": order, "variant": name,
                                                "error": f"{type(err).__name__}: {err}"})
                        print(f"  {kind} {entries} {order} {name}: {type(err).__name__}: {err}", flush=True)
                        continue
                    run = {"memory": kind, "entries": entries, "bytes": nbytes, "order": order, "variant": name,
                           "gather_ms": ms, "memcpy_ms": memcpy_ms, "gather_gb_s": nbytes / ms / 1e6,
                           "memcpy_gb_s": nbytes / memcpy_ms / 1e6, "gather_vs_memcpy": memcpy_ms / ms, "correct": correct}
                    results["runs"].append(run)
                    print(f"  {kind:15s} {entries:5d} {order:10s} {name:13s} {run['gather_gb_s']:6.1f} GB/s "
                          f"(memcpy {run['memcpy_gb_s']:5.1f}, {run['gather_vs_memcpy']:.2f}) {'ok' if correct else 'WRONG'}",
                          flush=True)
        host_k = host_v = buffers = None  # frees (and unregisters) before the next kind
        del owner
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

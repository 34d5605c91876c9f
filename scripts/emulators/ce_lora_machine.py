"""The loss/LoRA emulator's (scripts/emulate_ce_lora.py) side of the simulated machine: launches over
[blocks, threads], device buffers and the pointers kernels get (bounds, vector alignment, stores of
non-bf16 values into bf16 buffers, reads of what another thread wrote in the launch), and the
adapters that run gpu.py's shared memory, block reductions and mma fragments on that layout. Every
problem is counted per launch in Launch.errors."""
import weakref
from collections import Counter

import numpy as np

from . import gpu
from .gpu import F32

# ----------------------------------------------------------------------------------------------
# Launch, global and shared memory
# ----------------------------------------------------------------------------------------------
class Launch:
    """One kernel launch: B blocks (blockIdx.x fastest) of T threads, vectorised [B, T]."""

    def __init__(self, name, grid, block, shared_bytes=0):
        gx, gy, gz = grid
        assert shared_bytes == 0
        self.name, self.grid, self.T = name, grid, block
        self.B = gx * gy * gz
        bid = np.arange(self.B)
        self.bx = (bid % gx)[:, None]
        self.by = (bid // gx % gy)[:, None]
        self.tid = np.arange(block)[None, :]
        self.gtid = bid[:, None] * block + self.tid  # a global thread id, for hazard tracking
        self.errors = Counter()
        self.smems = []
        self.static_smem = 0

    def err(self, msg, n=1):
        if n:
            self.errors[msg] += int(n)

    def full(self, mask=True):
        return np.broadcast_to(np.asarray(mask), (self.B, self.T)).copy()

    def sync(self):
        for s in self.smems:
            s.barrier()

    def smem(self, name, shape, dtype=F32, esize=4):
        s = Smem(self, name, shape, dtype)
        self.smems.append(s)
        self.static_smem += int(np.prod(shape)) * esize
        return s

    def strided(self, n, mask=True):
        """for (int i = threadIdx.x; i < n; i += blockDim.x) under `mask`: (i, active) per iteration."""
        return gpu.strided(self.tid, self.T, n, self.full(mask))


ALL_BUFS = weakref.WeakSet()  # every allocation: write tracking restarts at each launch


class Buf:
    """A device allocation (flat). kind: bf16 (values held in float32), f32, i32."""

    def __init__(self, name, data, kind):
        self.name, self.kind = name, kind
        dt = np.int32 if kind == "i32" else F32
        self.data = np.array(data, dtype=dt).ravel().copy()
        if kind == "bf16":
            assert gpu.is_bf16(self.data).all() or np.isnan(self.data).any(), name
        self.esize = 2 if kind == "bf16" else 4
        self.begin()
        ALL_BUFS.add(self)

    def begin(self):
        """A new launch: no writes counted, no writers recorded (global thread ids)."""
        if hasattr(self, "writers"):
            self.writers.reset()
        else:
            self.writers = gpu.Hazards(self.data.size)
        self.wcount = np.zeros(self.data.size, np.int32)

    def ptr(self, lo=0, hi=None):
        return Ptr(self, lo, lo, self.data.size if hi is None else hi)


class Ptr:
    """A device pointer: buffer + element offset, valid over the view [lo, hi) (a wrapper's slice)."""

    def __init__(self, buf, off, lo, hi):
        self.buf, self.off, self.lo, self.hi = buf, off, lo, hi

    def __add__(self, k):
        return Ptr(self.buf, self.off + int(k), self.lo, self.hi)

    def _idx(self, L, idx, mask, what, width=1):
        idx = np.asarray(idx, np.int64) + self.off
        shape = np.broadcast_shapes(idx.shape, np.shape(mask))
        idx = np.broadcast_to(idx, shape)
        mask = np.broadcast_to(mask, shape)
        sel = idx[mask]
        bad = gpu.out_of_range(sel, self.lo, self.hi, width)
        L.err(f"{what} out of bounds of {self.buf.name}[{self.lo}:{self.hi}]", bad.sum())
        return idx, mask, np.clip(sel, 0, self.buf.data.size - 1)

    def ld(self, L, idx, mask, width=1):
        """Scalar loads (width 1) or `width`-element vector loads (16 bytes: alignment checked)."""
        nd = max(np.ndim(idx), np.ndim(mask), 2)
        gt = gpu.expand_to(L.gtid, nd)
        idx, mask, sel = self._idx(L, idx, mask, "global read", width)
        if width > 1:
            L.err(f"unaligned {width * self.buf.esize}-byte load of {self.buf.name}",
                  gpu.misaligned(sel, width).sum())
            sel = np.clip(sel[:, None] + np.arange(width), 0, self.buf.data.size - 1)
        g = np.broadcast_to(gt, idx.shape)[mask]
        if width > 1:
            g = g[:, None]
        L.err(f"global read of {self.buf.name} written by another thread in this launch",
              self.buf.writers.others_wrote(sel, g).sum())
        out = np.zeros(idx.shape + ((width,) if width > 1 else ()), self.buf.data.dtype)
        out[mask] = self.buf.data[sel]
        return out

    def st(self, L, idx, vals, mask):
        nd = max(np.ndim(idx), np.ndim(mask), 2)
        gt = gpu.expand_to(L.gtid, nd)
        idx, mask, sel = self._idx(L, idx, mask, "global write")
        v = np.broadcast_to(np.asarray(vals, self.buf.data.dtype), idx.shape)[mask]
        if self.buf.kind == "bf16":
            L.err(f"non-bf16 value stored into bf16 {self.buf.name}", (~gpu.is_bf16(v) & ~np.isnan(v)).sum())
        np.add.at(self.buf.wcount, sel, 1)
        self.buf.writers.note_write(sel, np.broadcast_to(gt, idx.shape)[mask])
        self.buf.data[sel] = v



_SMEM_ERRORS = {
    "range": "shared {name} index out of range",
    "align": "unaligned vector access to shared {name}",
    "unwritten": "read of unwritten shared {name}",
    "raw": "shared {name}: read of a location another thread wrote since the last barrier",
    "war": "shared {name}: write to a location another thread read since the last barrier",
    "waw": "shared {name}: two threads wrote one location between barriers",
}


class Smem(gpu.Shared):
    """A __shared__ array of every block of launch L, NaN-filled; each problem counted in L.errors
    (per access)."""

    def __init__(self, L, name, shape, dtype):
        def report(event, op, locs, width, tag):
            L.err(_SMEM_ERRORS[event].format(name=name), locs.size)

        super().__init__(name, int(np.prod(shape)), dtype, np.nan, L.tid, np.arange(L.B)[:, None], L.B, report)


# ----------------------------------------------------------------------------------------------
# kernels/common.cuh, kernels/mma.cuh
# ----------------------------------------------------------------------------------------------
def _block_reduce(L, v, scratch, warp_fn, ident):
    lane, warp = L.tid % 32, L.tid // 32
    return gpu.block_reduce(v, lambda x: warp_fn(x, 1, F32), scratch, L.sync, lane, warp, L.T // 32, ident)


def block_sum(L, v, scratch):
    return _block_reduce(L, v, scratch, gpu.warp_sum, 0.0)


def block_max(L, v, scratch):
    return _block_reduce(L, v, scratch, gpu.warp_max, -np.inf)


def ld_pair(S, addr, mask):
    """*(const uint32_t*)&S[addr]: two bf16 (held as f32 in S), the lower index in the low half."""
    v = S.ld(addr, mask, width=2)
    return gpu.pack_pair(gpu.bf16_bits(v[..., 0]), gpu.bf16_bits(v[..., 1]))


def mma_bf16(c, a, b):
    """gpu.mma_bf16 with the registers on the first axis and the threads of a block on the last:
    c [4, B, T] f32, a [4, B, T] u32, b [2, B, T] u32 -> d [4, B, T]."""
    _, B, T = c.shape

    def warps(x):
        return np.moveaxis(x, 0, -1).reshape(B, T // 32, 32, x.shape[0])

    return np.moveaxis(gpu.mma_bf16(warps(c), warps(a), warps(b)).reshape(B, T, 4), -1, 0)

"""The NF4 emulator's (scripts/emulate_nf4.py) side of the simulated machine: the checking context
that collects flags per launch, global buffers sized as the wrappers allocate them (bounds, vector
alignment, poisoned and write-counted outputs), and the adapters that run gpu.py's shared memory,
warp and block reductions and mma fragments with one block's threads on axis 0."""
import numpy as np

from . import gpu

f32 = np.float32
np.seterr(all="ignore")


# ----------------------------------------------------------------------------- numeric helpers
def same_bits(a, b):
    """Exact equality, NaN equal to NaN (bit patterns for floats)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        return False, -1
    if a.dtype == f32:
        d = a.view(np.uint32) != b.view(np.uint32)
        d &= ~(np.isnan(a) & np.isnan(b))
    else:
        d = a != b
    return not d.any(), int(d.sum())


# ----------------------------------------------------------------------------- checking context
class Ctx:
    def __init__(self, name):
        self.name = name
        self.flags = {}

    def flag(self, kind, detail="", n=1):
        if kind not in self.flags:
            self.flags[kind] = [0, detail]
        self.flags[kind][0] += n

    def summary(self):
        return "; ".join(f"{k} x{v[0]} ({v[1]})" for k, v in self.flags.items())


class GBuf:
    """A global buffer, sized as allocated by the wrapper."""

    def __init__(self, ctx, name, arr, out=False):
        self.ctx, self.name = ctx, name
        self.a = np.array(arr).copy()
        self.n = len(self.a)
        self.esz = self.a.itemsize
        self.out = out
        if out:
            if self.a.dtype == f32:
                self.a[:] = np.nan
            elif self.a.dtype == np.uint16:
                self.a[:] = 0x7FBF  # a bf16 NaN the kernel never writes
            else:
                self.a[:] = 0xA5
            self.cnt = np.zeros(self.n, np.int64)

    def _sel(self, idx, mask, what):
        idx = np.asarray(idx, np.int64)
        mask = np.broadcast_to(np.asarray(mask, bool), idx.shape)
        sel = idx[mask]
        bad = gpu.out_of_range(sel, 0, self.n)
        if bad.any():
            self.ctx.flag(f"OOB {what} {self.name}", f"e.g. index {sel[bad][0]} of {self.n}")
        return idx, mask, np.clip(sel, 0, max(self.n - 1, 0)), bad

    def read(self, idx, mask=True):
        idx, mask, sel, bad = self._sel(idx, mask, "read")
        out = np.zeros(idx.shape, self.a.dtype)
        vals = self.a[sel] if self.n else np.zeros(len(sel), self.a.dtype)
        out[mask] = vals
        return out

    def vread(self, idx, nelem, mask=True):
        """A vector load (uint2/uint4) of nelem elements starting at element idx."""
        idx = np.asarray(idx, np.int64)
        mask = np.broadcast_to(np.asarray(mask, bool), idx.shape)
        mis = gpu.misaligned(idx, nelem) & mask
        if mis.any():
            self.ctx.flag(f"misaligned {nelem * self.esz}B load {self.name}", f"element {idx[mis][0]}")
        full = idx[..., None] + np.arange(nelem)
        return self.read(full, mask[..., None])

    def write(self, idx, vals, mask=True):
        assert self.out, self.name
        idx, mask, sel, bad = self._sel(idx, mask, "write")
        vals = np.broadcast_to(np.asarray(vals).astype(self.a.dtype), idx.shape)[mask]
        ok = ~bad
        np.add.at(self.cnt, sel[ok], 1)
        self.a[sel[ok]] = vals[ok]

    def check_written(self):
        un = int((self.cnt == 0).sum())
        multi = int((self.cnt > 1).sum())
        if un:
            self.ctx.flag(f"unwritten {self.name}", f"{un} of {self.n}, first {np.argmax(self.cnt == 0)}")
        if multi:
            self.ctx.flag(f"written twice {self.name}", f"{multi}")
        return un, multi



# ----------------------------------------------------------------------------- shared memory
_SMEM_FLAGS = {"range": "smem OOB {op} {name}", "align": "smem misaligned {nbytes}B {op} {name}",
               "unwritten": "smem uninitialised read {name}", "raw": "smem read-after-write race {name}",
               "war": "smem write-after-read race {name}", "waw": "smem write/write race {name}"}


def Smem(ctx, name, size, dtype, tid):
    """Shared memory of one block whose threads are `tid` (axis 0): NaN-filled (uint16: a bf16 NaN
    the kernels never write; other integers: -1); each kind of problem flagged in ctx."""
    dtype = np.dtype(dtype)
    fill = np.nan if dtype.kind == "f" else (0x7FBF if dtype == np.uint16 else -1)

    def report(event, op, locs, width, tag):
        kind = _SMEM_FLAGS[event].format(op="read" if op == "load" else "write", name=name,
                                         nbytes=width * dtype.itemsize)
        ctx.flag(kind, f"{locs[0]}")

    return gpu.Shared(name, size, dtype, fill, tid, report=report)


# ----------------------------------------------------------------------------- warps and blocks
def _check_lanes(ctx, active):
    """A full-mask shuffle with inactive lanes: flagged once for each of a reduction's five shuffles."""
    if active is not None and gpu.partial_warps(active):
        ctx.flag("full-mask shuffle with inactive lanes", "", 5)


def warp_max(ctx, v, active=None):  # common.cuh warp_max
    _check_lanes(ctx, active)
    return gpu.warp_max(v)


def warp_sum(ctx, v, active=None):  # common.cuh warp_sum
    _check_lanes(ctx, active)
    return gpu.warp_sum(v)


def block_max(ctx, v, scratch, tid, B):  # common.cuh:140
    return gpu.block_reduce(v, gpu.warp_max, scratch, scratch.barrier, tid % 32, tid // 32, B // 32, -np.inf)


# ----------------------------------------------------------------------------- mma.sync fragments
def ld_pair(sm, idx):
    """*(const uint32_t*)&S[idx]: two bf16 (uint16 shared memory), the lower index in the low half."""
    v = sm.ld(idx, True, width=2)
    return gpu.pack_pair(v[..., 0], v[..., 1])


def pack8_store(sm, idx, v8, mask):
    # *reinterpret_cast<uint4*>(&S[..]) = pack8(v): 8 bf16, lower index in the low half of each word
    sm.st(idx, v8, mask, width=8)

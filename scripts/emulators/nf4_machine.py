"""The simulated machine of the NF4 emulator (scripts/emulate_nf4.py): f32/bf16 numerics, the
checking context, global buffers and shared memory with bounds, alignment, write and race tracking,
warp shuffles and the reductions of common.cuh, and the mma.sync m16n8k16 bf16 fragments."""
import numpy as np

f32 = np.float32
np.seterr(all="ignore")


# ----------------------------------------------------------------------------- numeric helpers
def bf2f(u):
    return (np.asarray(u).astype(np.uint32) << 16).view(f32)


def f2bf(x):
    x = np.asarray(x, f32)
    b = x.view(np.uint32).astype(np.uint64)
    r = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FFF), r)


def fma(a, b, c):
    return (np.asarray(a, np.float64) * np.asarray(b, np.float64) + np.asarray(c, np.float64)).astype(f32)


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

    def flag(self, kind, detail=""):
        if kind not in self.flags:
            self.flags[kind] = [0, detail]
        self.flags[kind][0] += 1

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
        bad = (sel < 0) | (sel >= self.n)
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
        nbytes = nelem * self.esz
        mis = ((idx * self.esz) % nbytes != 0) & mask
        if mis.any():
            self.ctx.flag(f"misaligned {nbytes}B load {self.name}", f"element {idx[mis][0]}")
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


def _cross_thread_dups(idx, tid):
    """Indices touched by more than one thread within one vectorised access."""
    if len(idx) < 2:
        return idx[:0]
    o = np.lexsort((tid, idx))
    i, t = idx[o], tid[o]
    same = (i[1:] == i[:-1]) & (t[1:] != t[:-1])
    return np.unique(i[1:][same])


class Smem:
    """Shared memory of one block with race / uninitialised-read detection per barrier interval."""

    def __init__(self, ctx, name, size, dtype):
        self.ctx, self.name = ctx, name
        self.dtype = np.dtype(dtype)
        fill = np.nan if self.dtype.kind == "f" else (0x7FBF if self.dtype == np.uint16 else -1)
        self.d = np.full(size, fill, self.dtype)
        self.written = np.zeros(size, bool)
        self.writer = np.full(size, -1, np.int64)
        self.reader = np.full(size, -1, np.int64)  # -2: several threads
        self.esz = self.dtype.itemsize

    def sync(self):
        self.writer[:] = -1
        self.reader[:] = -1

    def _prep(self, idx, tid, mask, what, align_elems=1):
        idx = np.asarray(idx, np.int64)
        tid = np.broadcast_to(np.asarray(tid, np.int64).reshape(tid.shape + (1,) * (idx.ndim - np.ndim(tid))), idx.shape)
        mask = np.broadcast_to(np.asarray(mask, bool).reshape(np.shape(mask) + (1,) * (idx.ndim - np.ndim(mask))), idx.shape)
        s, t = idx[mask], tid[mask]
        bad = (s < 0) | (s >= len(self.d))
        if bad.any():
            self.ctx.flag(f"smem OOB {what} {self.name}", f"{s[bad][0]}")
        if align_elems > 1:
            base = idx[..., 0][mask[..., 0]]
            mis = (base * self.esz) % (align_elems * self.esz) != 0
            if mis.any():
                self.ctx.flag(f"smem misaligned {align_elems * self.esz}B {what} {self.name}", f"{base[mis][0]}")
        return idx, mask, np.clip(s, 0, len(self.d) - 1), t

    def write(self, idx, tid, vals, mask=True, align_elems=1):
        idx, mask, s, t = self._prep(idx, tid, mask, "write", align_elems)
        v = np.broadcast_to(np.asarray(vals).astype(self.dtype), idx.shape)[mask]
        d = _cross_thread_dups(s, t)
        if len(d):
            self.ctx.flag(f"smem write/write same op {self.name}", f"{d[0]}")
        w = self.writer[s]
        if ((w != -1) & (w != t)).any():
            self.ctx.flag(f"smem write/write race {self.name}", f"{s[(w != -1) & (w != t)][0]}")
        r = self.reader[s]
        if ((r != -1) & (r != t)).any():
            self.ctx.flag(f"smem write-after-read race {self.name}", f"{s[(r != -1) & (r != t)][0]}")
        self.writer[s] = t
        self.written[s] = True
        self.d[s] = v

    def read(self, idx, tid, mask=True, align_elems=1):
        idx, mask, s, t = self._prep(idx, tid, mask, "read", align_elems)
        if (~self.written[s]).any():
            self.ctx.flag(f"smem uninitialised read {self.name}", f"{s[~self.written[s]][0]}")
        w = self.writer[s]
        if ((w != -1) & (w != t)).any():
            self.ctx.flag(f"smem read-after-write race {self.name}", f"{s[(w != -1) & (w != t)][0]}")
        r = self.reader[s]
        self.reader[s] = np.where((r == -1) | (r == t), t, -2)
        d = _cross_thread_dups(s, t)
        if len(d):
            self.reader[d] = -2
        out = np.zeros(idx.shape, self.dtype)
        out[mask] = self.d[s]
        return out


def strided(tid, limit, stride):
    """for (i = tid; i < limit; i += stride): yields (i, active) per iteration (all lanes together)."""
    i = np.asarray(tid, np.int64).copy()
    while True:
        act = i < limit
        if not act.any():
            return
        yield i.copy(), act
        i += stride


def shfl_xor(ctx, v, o, active=None):
    """__shfl_xor_sync(0xffffffff, v, o) for a thread axis 0 of length a multiple of 32."""
    if active is not None:
        a = np.asarray(active, bool).reshape(-1, 32)
        partial = a.any(1) & ~a.all(1)
        if partial.any():
            ctx.flag("full-mask shuffle with inactive lanes", "")
    sh = v.shape
    w = v.reshape((-1, 32) + sh[1:])
    return w[:, np.arange(32) ^ o].reshape(sh)


def warp_max(ctx, v, active=None):  # common.cuh warp_max
    for o in (16, 8, 4, 2, 1):
        v = np.fmax(v, shfl_xor(ctx, v, o, active)).astype(v.dtype)
    return v


def warp_sum(ctx, v, active=None):  # common.cuh warp_sum
    for o in (16, 8, 4, 2, 1):
        v = (v + shfl_xor(ctx, v, o, active)).astype(v.dtype)
    return v


def block_max(ctx, v, scratch, tid, B):  # common.cuh:140
    lane, warp, warps = tid % 32, tid // 32, B // 32
    v = warp_max(ctx, v)
    scratch.sync()
    scratch.write(warp, tid, v, lane == 0)
    scratch.sync()
    v = np.where(lane < warps, scratch.read(np.minimum(lane, 31), tid, lane < warps), f32(-np.inf)).astype(f32)
    return warp_max(ctx, v)


# ----------------------------------------------------------------------------- mma.sync fragments
_l = np.arange(32)
_g, _c = _l // 4, _l % 4
# PTX ISA, mma.m16n8k16 .bf16 fragments: [lane, reg, half]
A_ROW = np.empty((32, 4, 2), np.int64); A_COL = np.empty((32, 4, 2), np.int64)
B_K = np.empty((32, 2, 2), np.int64); B_N = np.empty((32, 2, 2), np.int64)
C_ROW = np.empty((32, 4), np.int64); C_COL = np.empty((32, 4), np.int64)
for _i in range(4):
    for _h in range(2):
        A_ROW[:, _i, _h] = _g + 8 * (_i % 2)          # a0,a1 / a4,a5: g; a2,a3 / a6,a7: g + 8
        A_COL[:, _i, _h] = 2 * _c + _h + 8 * (_i // 2)  # +8 for a4..a7
    C_ROW[:, _i] = _g + 8 * (_i // 2)
    C_COL[:, _i] = 2 * _c + (_i % 2)
for _i in range(2):
    for _h in range(2):
        B_K[:, _i, _h] = 2 * _c + _h + 8 * _i
        B_N[:, _i, _h] = _g
assert len(set(zip(A_ROW.ravel(), A_COL.ravel()))) == 256
assert len(set(zip(B_K.ravel(), B_N.ravel()))) == 128
assert len(set(zip(C_ROW.ravel(), C_COL.ravel()))) == 128


def mma_bf16(c, a, b):
    """c: [W, 32, 4] f32; a: [W, 32, 4] u32; b: [W, 32, 2] u32 -> new c (mma.sync m16n8k16 row.col)."""
    W = c.shape[0]
    ah = np.stack([bf2f(a & 0xFFFF), bf2f(a >> 16)], -1)  # [W,32,4,2]: lower index in the low half
    bh = np.stack([bf2f(b & 0xFFFF), bf2f(b >> 16)], -1)
    A = np.full((W, 16, 16), np.nan, f32)
    Bm = np.full((W, 16, 8), np.nan, f32)
    C = np.full((W, 16, 8), np.nan, f32)
    A[:, A_ROW, A_COL] = ah
    Bm[:, B_K, B_N] = bh
    C[:, C_ROW, C_COL] = c
    D = (np.matmul(A, Bm) + C).astype(f32)
    return D[:, C_ROW, C_COL]


def ld_pair(sm, idx, tid):
    v = sm.read(np.asarray(idx)[..., None] + np.arange(2), tid, True, align_elems=2)
    return v[..., 0].astype(np.uint32) | (v[..., 1].astype(np.uint32) << 16)


def pack8_store(sm, idx, tid, v8, mask):
    # *reinterpret_cast<uint4*>(&S[..]) = pack8(v): 8 bf16, lower index in the low half of each word
    sm.write(np.asarray(idx)[..., None] + np.arange(8), tid, v8, mask, align_elems=8)

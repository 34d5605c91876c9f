"""The simulated GPU that every lane-level kernel emulator (scripts/emulate_*.py) runs on: the pieces
of device behaviour they share, each written once.

  * f32 / bf16 numerics: bf16 conversion (round to nearest even), fmaf, __expf, logf, rsqrtf, sincosf;
  * lock-step loops: strided (`for (i = start; i < n; i += step)` over all threads at once);
  * warps: shfl_xor, warp_sum, warp_max (the butterflies of kernels/common.cuh), partial_warps;
  * blocks: block_reduce (block_sum / block_max of kernels/common.cuh);
  * memory checks: out_of_range, misaligned, Hazards (which threads wrote and read each location
    since the last barrier or launch), Shared (a __shared__ array with bounds, alignment,
    uninitialised-read and race checks);
  * mma.sync.m16n8k16 with bf16 inputs and f32 accumulators: the PTX fragment layout and mma_bf16.

Threads are numpy axes. An emulator decides the layout (one block of threads on axis 0, or
[blocks, threads], or [warps, lanes]); the functions here take the axis of the threads (warp
functions) or arrays that broadcast against the accesses (Shared). What differs between the
emulators (how a problem is reported, how a launch is organised, global buffers) stays in their own
machine modules and calls these functions."""
import numpy as np

F32, F64 = np.float32, np.float64


# ----------------------------------------------------------------------------------------------
# f32 / bf16 numerics
# ----------------------------------------------------------------------------------------------
LOG2E = F32(1.4426950408889634)  # the f32 constant __expf scales by (libdevice __nv_fast_expf)
FLT_MIN = F32(1.1754943508222875e-38)  # smallest normal f32: ex2.approx.ftz flushes results below it


def bf16_bits(x, quiet_nan=False):
    """float32 -> bf16 bit patterns (uint16), rounded to nearest, ties to even, as __float2bfloat16_rn.
    A NaN becomes 0x7FFF, the canonical NaN of the device's cvt.rn.bf16.f32; with quiet_nan=True it
    keeps its sign and top payload bits and gets the quiet bit, as the host's half::bf16::from_f32.
    The shape of x is kept (a 0-d input gives a 0-d result)."""
    x = np.asarray(x, F32)
    u = np.atleast_1d(x).view(np.uint32)  # an array, so the (discarded) wrap-around of NaN bits is silent
    r = ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(np.atleast_1d(x))
    if nan.any():
        r[nan] = ((u[nan] >> np.uint32(16)) | np.uint32(0x40)).astype(np.uint16) if quiet_nan else 0x7FFF
    return r.reshape(x.shape)


def bf16_to_f32(bits):
    """bf16 bit patterns -> their float32 values (exact)."""
    return (np.asarray(bits).astype(np.uint32) << np.uint32(16)).view(F32)


def round_bf16(x, quiet_nan=False):
    """The bf16 value nearest x, held in a float32 (bf16_bits, then back)."""
    return bf16_to_f32(bf16_bits(x, quiet_nan))


def is_bf16(x):
    """Whether each float32 is a bf16 value (its low 16 bits are zero)."""
    return (np.asarray(x, F32).view(np.uint32) & np.uint32(0xFFFF)) == 0


def fma(a, b, c, exact=False):
    """fmaf(a, b, c) on f32 inputs; the product of two f32 is exact in float64. exact=False rounds the
    float64 sum to f32: two roundings, so where the first lands halfway between two f32 values the
    result can be one unit in the last place off fmaf's (the NF4 and loss/LoRA emulators use this;
    it is far inside their tolerances). exact=True first makes the float64 sum round-to-odd (from its
    TwoSum error term), after which rounding to f32 gives the single rounding of the exact a*b + c."""
    a, b, c = np.asarray(a, F64), np.asarray(b, F64), np.asarray(c, F64)
    p = a * b
    s = p + c
    if not exact:
        return s.astype(F32)
    bb = s - p
    e = (p - (s - bb)) + (c - bb)
    si = np.ascontiguousarray(s).view(np.int64)
    need = (e != 0) & ((si & 1) == 0) & np.isfinite(s)
    step = np.where((e > 0) == (s > 0), 1, -1).astype(np.int64)
    si = np.where(need, si + step, si)
    return si.view(F64).astype(F32)


def expf_fast(x, wide=False):
    """__expf: ex2.approx.ftz.f32(x * LOG2E), the product rounded to f32, results under FLT_MIN
    flushed to zero. ex2.approx is taken as numpy's float32 exp2 or, with wide=True, as the float64
    exp2 rounded to f32 (correctly rounded in practice)."""
    y = (np.asarray(x, F32) * LOG2E).astype(F32)
    with np.errstate(over="ignore", under="ignore"):
        r = (np.exp2(y.astype(F64)) if wide else np.exp2(y)).astype(F32)
    return np.where(np.abs(r) < FLT_MIN, F32(0), r).astype(F32)


def logf(x, wide=False):
    """logf: numpy's float32 log or, with wide=True, the float64 log rounded to f32."""
    x = np.asarray(x, F32)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log(x.astype(F64) if wide else x).astype(F32)


def rsqrtf(x):
    """rsqrtf as the correctly rounded 1/sqrt(x) (float64, rounded to f32)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return (1.0 / np.sqrt(np.asarray(x, F32).astype(F64))).astype(F32)


def sincosf(a):
    """sincosf as the float64 sin and cos rounded to f32."""
    a = np.asarray(a, F32).astype(F64)
    return np.sin(a).astype(F32), np.cos(a).astype(F32)


# ----------------------------------------------------------------------------------------------
# Lock-step loops
# ----------------------------------------------------------------------------------------------
def strided(start, step, n, active=True):
    """for (i = start; i < n; i += step) run by all threads together: yields (i, act) per iteration,
    act = active & (i < n), for as long as any thread is still in the loop. start (per thread),
    active and n broadcast together; i comes with their common shape."""
    start = np.asarray(start, np.int64)
    i = np.array(np.broadcast_to(start, np.broadcast_shapes(start.shape, np.shape(active))))
    while True:
        act = active & (i < n)
        if not act.any():
            return
        yield i, act
        i = i + step


# ----------------------------------------------------------------------------------------------
# Warps (kernels/common.cuh)
# ----------------------------------------------------------------------------------------------
LANE = np.arange(32)


def _warps(v, axis):
    """v with its thread axis (a multiple of 32 long) split into (warps, 32 lanes); the lane axis."""
    axis %= v.ndim
    return v.reshape(v.shape[:axis] + (v.shape[axis] // 32, 32) + v.shape[axis + 1:]), axis + 1


def shfl_xor(v, o, axis=0):
    """__shfl_xor_sync(0xffffffff, v, o): each lane takes the value of lane ^ o of its warp. The
    threads run along `axis`, warps being consecutive groups of 32."""
    v = np.asarray(v)
    w, lanes = _warps(v, axis)
    return np.take(w, LANE ^ o, axis=lanes).reshape(v.shape)


def _butterfly(v, op, axis, dtype):
    v = np.asarray(v, dtype)
    w, lanes = _warps(v, axis)
    for o in (16, 8, 4, 2, 1):
        w = op(w, np.take(w, LANE ^ o, axis=lanes)).astype(v.dtype, copy=False)
    return w.reshape(v.shape)


def warp_sum(v, axis=0, dtype=None):
    """warp_sum of common.cuh: v += shfl_xor(v, o) for o = 16, 8, 4, 2, 1, in dtype (default v's)."""
    return _butterfly(v, np.add, axis, dtype)


def warp_max(v, axis=0, dtype=None):
    """warp_max of common.cuh: v = fmaxf(v, shfl_xor(v, o)) for o = 16, 8, 4, 2, 1."""
    return _butterfly(v, np.fmax, axis, dtype)


def partial_warps(active, axis=0):
    """How many warps have some but not all of their lanes active: a full-mask shuffle (0xffffffff)
    or a warp-wide reduction there is undefined behaviour."""
    w, lanes = _warps(np.asarray(active, bool), axis)
    per = w.sum(lanes)
    return int(((per > 0) & (per < 32)).sum())


# ----------------------------------------------------------------------------------------------
# Blocks (kernels/common.cuh)
# ----------------------------------------------------------------------------------------------
def block_reduce(v, warp_fn, scratch, sync, lane, warp, warps, ident, dtype=F32, first_sync=True):
    """block_sum / block_max of common.cuh as written: reduce within each warp (warp_fn), barrier,
    lane 0 of each warp stores its result to scratch[warp] (a Shared), barrier, lanes below the warp
    count load scratch[lane] (the others take ident), reduce within each warp again. sync runs
    __syncthreads(); first_sync=False leaves out the first barrier (an emulator's injected bug)."""
    v = warp_fn(v)
    if first_sync:
        sync()
    scratch.st(warp, v, lane == 0)
    sync()
    m = lane < warps
    v = np.where(m, scratch.ld(lane, m), dtype(ident)).astype(dtype)
    return warp_fn(v)


# ----------------------------------------------------------------------------------------------
# Memory checks
# ----------------------------------------------------------------------------------------------
def out_of_range(first, lo, hi, width=1):
    """Accesses of `width` consecutive locations starting at `first` that leave [lo, hi)."""
    first = np.asarray(first)
    return (first < lo) | (first > hi - width)


def misaligned(first, width):
    """Vector accesses of `width` locations whose first location is not a multiple of `width`
    (the base of the buffer being aligned to at least the vector size)."""
    return np.asarray(first) % width != 0


class Hazards:
    """For each of n locations, the lowest and highest id of the threads that wrote it and of those
    that read it since the last reset() (a barrier for shared memory, a launch for global memory).
    Two threads touching one location race unless a reset comes between them."""

    def __init__(self, n, dtype=np.int64):
        self.n, self.none = n, np.iinfo(dtype).max
        self.wmin, self.rmin = np.full(n, self.none, dtype), np.full(n, self.none, dtype)
        self.wmax, self.rmax = np.full(n, -1, dtype), np.full(n, -1, dtype)
        self.touched, self.ntouched = [], 0

    def reset(self):
        """Forget every access: clears the locations touched since the last reset, or every location
        when more accesses than locations were recorded."""
        if self.ntouched >= self.n:
            for a, v in ((self.wmin, self.none), (self.rmin, self.none), (self.wmax, -1), (self.rmax, -1)):
                a[:] = v
        elif self.touched:
            k = np.concatenate(self.touched)
            self.wmin[k], self.rmin[k], self.wmax[k], self.rmax[k] = self.none, self.none, -1, -1
        self.touched, self.ntouched = [], 0

    def _touch(self, k):
        self.touched.append(np.ravel(k))
        self.ntouched += np.size(k)

    def others_wrote(self, k, t):
        """Per access: a thread other than t wrote location k."""
        return (self.wmax[k] >= 0) & ((self.wmin[k] != t) | (self.wmax[k] != t))

    def others_read(self, k, t):
        """Per access: a thread other than t read location k."""
        return (self.rmax[k] >= 0) & ((self.rmin[k] != t) | (self.rmax[k] != t))

    def note_read(self, k, t):
        if np.shape(t) != np.shape(k):
            t = np.broadcast_to(t, np.shape(k))
        np.minimum.at(self.rmin, k, t)
        np.maximum.at(self.rmax, k, t)
        self._touch(k)

    def note_write(self, k, t):
        """Records the writes; returns, per access, whether its location now has two writers (this
        access included, so two threads of one vectorised store count as well)."""
        if np.shape(t) != np.shape(k):
            t = np.broadcast_to(t, np.shape(k))
        np.minimum.at(self.wmin, k, t)
        np.maximum.at(self.wmax, k, t)
        self._touch(k)
        return self.wmin[k] != self.wmax[k]


def _pick(x, shape, m, vec=()):
    """x broadcast to shape + vec, at the places of `shape` that m selects (m None: all of them),
    flattened: [selected places] + vec."""
    if x.shape != shape + vec:
        x = np.broadcast_to(x, shape + vec)
    return x[m] if m is not None else x.reshape((-1,) + vec)


def expand_to(a, nd):
    """a with trailing axes of length 1 up to nd axes (thread axes lead; an access may add axes)."""
    a = np.asarray(a)
    return a.reshape(a.shape + (1,) * (nd - a.ndim))


class Shared:
    """A __shared__ array: `size` locations for each of `blocks` blocks, filled with `fill` (a NaN
    or a poison pattern), that checks every access:
      * "range": an access that leaves the array, or the window `view` of it (the access is dropped;
        a load there gives 0);
      * "align": a vector access (`width` consecutive locations) not aligned to its width;
      * "unwritten": a load of a location no thread of its block has written;
      * "raw" / "war": a load of a location another thread wrote, a store to a location another
        thread read, since the last barrier;
      * "waw": a store to a location another thread wrote since the last barrier, or that two threads
        of the same store write.
    `tid` and `blk` give the thread and block of each access: arrays whose leading axes are those of
    the threads, broadcasting against the accesses (trailing axes of an access are one thread's
    batched loop, or the locations of a vector). Loads and stores run for the threads whose `mask`
    is set. report(event, op, locations, width, tag) is called once per event an access raises, with
    the locations concerned (first locations for "range" / "align"), op "load" or "store", and the
    caller's `tag` for the access."""

    def __init__(self, name, size, dtype, fill, tid, blk=0, blocks=1, report=None):
        self.name, self.size = name, int(size)
        self.tid, self.blk = np.asarray(tid, np.int32), np.asarray(blk, np.int64)
        n = blocks * self.size
        self.vals = np.full(n, fill, dtype)
        self.written = np.zeros(n, bool)
        self.hazards = Hazards(n, np.int32)
        self.report = report or (lambda *args: None)

    def barrier(self):
        """__syncthreads(): accesses before it no longer race with accesses after it."""
        self.hazards.reset()

    def _access(self, addr, mask, width, op, view, tag):
        """The access's shape, its selection (None: every place), the in-range entries among those
        selected (None: all), and the flat locations and thread ids it touches."""
        addr, mask = np.asarray(addr, np.int64), np.asarray(mask, bool)
        nd = max(addr.ndim, mask.ndim, self.tid.ndim)
        tid, blk = expand_to(self.tid, nd), expand_to(self.blk, nd)
        shape = np.broadcast_shapes(addr.shape, mask.shape, tid.shape, blk.shape)
        m = (None if mask else np.zeros(shape, bool)) if mask.ndim == 0 else mask
        if m is not None and m.shape != shape:
            m = np.broadcast_to(m, shape)
        a, t = _pick(addr, shape, m), _pick(tid, shape, m)
        b = _pick(blk, shape, m) if blk.ndim else blk
        lo, hi = view if view is not None else (0, self.size)
        bad = out_of_range(a, lo, hi, width)
        keep = None
        if bad.any():
            self.report("range", op, a[bad], width, tag)
            keep = ~bad
        if width > 1:
            mis = misaligned(a, width)
            if mis.any():
                self.report("align", op, a[mis], width, tag)
        if keep is not None:
            a, t = a[keep], t[keep]
            b = b[keep] if b.ndim else b
        k = b * self.size + a
        if width > 1:
            k = (k[:, None] + np.arange(width)).ravel()
            t = np.repeat(t, width)
        return shape, m, keep, k, t

    def _flag(self, event, op, hit, k, width, tag):
        if hit.any():
            self.report(event, op, k[hit] % self.size, width, tag)

    def ld(self, addr, mask=True, width=1, view=None, tag=None):
        """Per-thread loads of `width` consecutive locations at addr (a trailing axis of `width` when
        width > 1); 0 where the mask is off or the access was out of range."""
        shape, m, keep, k, t = self._access(addr, mask, width, "load", view, tag)
        if k.size:
            self._flag("unwritten", "load", ~self.written[k], k, width, tag)
            self._flag("raw", "load", self.hazards.others_wrote(k, t), k, width, tag)
            self.hazards.note_read(k, t)
        vec = (width,) if width > 1 else ()
        got = self.vals[k].reshape((-1,) + vec)
        if keep is not None:
            got, sel = np.zeros((keep.size,) + vec, self.vals.dtype), got
            got[keep] = sel
        if m is None:
            return got.reshape(shape + vec)
        out = np.zeros(shape + vec, self.vals.dtype)
        out[m] = got
        return out

    def st(self, addr, vals, mask=True, width=1, view=None, tag=None):
        """Per-thread stores of `width` consecutive locations at addr (vals with a trailing axis of
        `width` when width > 1, broadcast against the access)."""
        shape, m, keep, k, t = self._access(addr, mask, width, "store", view, tag)
        vec = (width,) if width > 1 else ()
        v = _pick(np.asarray(vals), shape, m, vec)
        if keep is not None:
            v = v[keep]
        if not k.size:
            return
        self._flag("war", "store", self.hazards.others_read(k, t), k, width, tag)
        self._flag("waw", "store", self.hazards.note_write(k, t), k, width, tag)
        self.vals[k] = v.ravel()
        self.written[k] = True


# ----------------------------------------------------------------------------------------------
# mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 (kernels/mma.cuh)
# ----------------------------------------------------------------------------------------------
# The PTX ISA fragment layout, per lane: g = lane / 4, c = lane % 4. Each 32-bit A or B register
# holds two bf16, the lower column (A) or k (B) in the low half.
#   A (16 x 16, row major), register i, half h: row g + 8 (i % 2), column 2c + h + 8 (i / 2)
#   B (16 x 8, k x n), register i, half h:      k 2c + h + 8 i, column g
#   C and D (16 x 8, f32), register i:           row g + 8 (i / 2), column 2c + i % 2
_G, _C = LANE // 4, LANE % 4
A_ROW, A_COL = np.empty((32, 4, 2), np.int64), np.empty((32, 4, 2), np.int64)  # [lane, register, half]
B_K, B_N = np.empty((32, 2, 2), np.int64), np.empty((32, 2, 2), np.int64)
C_ROW, C_COL = np.empty((32, 4), np.int64), np.empty((32, 4), np.int64)  # [lane, register]
for _i in range(4):
    for _h in range(2):
        A_ROW[:, _i, _h], A_COL[:, _i, _h] = _G + 8 * (_i % 2), 2 * _C + _h + 8 * (_i // 2)
    C_ROW[:, _i], C_COL[:, _i] = _G + 8 * (_i // 2), 2 * _C + _i % 2
for _i in range(2):
    for _h in range(2):
        B_K[:, _i, _h], B_N[:, _i, _h] = 2 * _C + _h + 8 * _i, _G
assert len(set(zip(A_ROW.ravel(), A_COL.ravel()))) == 256
assert len(set(zip(B_K.ravel(), B_N.ravel()))) == 128
assert len(set(zip(C_ROW.ravel(), C_COL.ravel()))) == 128


def pack_pair(lo, hi):
    """Two bf16 bit patterns in one 32-bit register, lo in the low half."""
    return np.asarray(lo).astype(np.uint32) | (np.asarray(hi).astype(np.uint32) << np.uint32(16))


def mma_bf16(c, a, b, f64=False):
    """One mma.sync per warp: c [..., 32, 4] f32, a [..., 32, 4] and b [..., 32, 2] uint32 fragments
    (leading axes: the warps; then the lane; then the register) -> d = A @ B + C, [..., 32, 4]. The
    sum is numpy's float32 matmul (its own order of the 16 products) plus C, or with f64=True the
    float64 product plus C rounded once to f32."""
    lead = np.shape(c)[:-2]
    a, b = np.asarray(a, np.uint32), np.asarray(b, np.uint32)
    A = np.full(lead + (16, 16), np.nan, F32)
    Bm = np.full(lead + (16, 8), np.nan, F32)
    C = np.full(lead + (16, 8), np.nan, F32)
    A[..., A_ROW, A_COL] = np.stack([bf16_to_f32(a & 0xFFFF), bf16_to_f32(a >> 16)], -1)
    Bm[..., B_K, B_N] = np.stack([bf16_to_f32(b & 0xFFFF), bf16_to_f32(b >> 16)], -1)
    C[..., C_ROW, C_COL] = c
    if f64:
        D = (np.matmul(A.astype(F64), Bm.astype(F64)) + C).astype(F32)
    else:
        D = (np.matmul(A, Bm) + C).astype(F32)
    return D[..., C_ROW, C_COL]


def check_mma_layout(A, B, C, f64=False):
    """Asserts mma_bf16 against A @ B + C in float64 for matrices A [W, 16, 16], B [W, 16, 8] (bf16
    values) and C [W, 16, 8], with the fragments packed lane by lane from the PTX ISA listing (a path
    independent of the tables mma_bf16 uses)."""
    W = A.shape[0]
    Ab, Bb = bf16_bits(A), bf16_bits(B)
    a, b = np.zeros((W, 32, 4), np.uint32), np.zeros((W, 32, 2), np.uint32)
    c = np.zeros((W, 32, 4), F32)
    for w in range(W):
        for lane in range(32):
            g, t = lane // 4, lane % 4
            for i, (row, col) in enumerate([(g, 2 * t), (g + 8, 2 * t), (g, 2 * t + 8), (g + 8, 2 * t + 8)]):
                a[w, lane, i] = pack_pair(Ab[w, row, col], Ab[w, row, col + 1])
            for i, k in enumerate([2 * t, 2 * t + 8]):
                b[w, lane, i] = pack_pair(Bb[w, k, g], Bb[w, k + 1, g])
            for i, (row, col) in enumerate([(g, 2 * t), (g, 2 * t + 1), (g + 8, 2 * t), (g + 8, 2 * t + 1)]):
                c[w, lane, i] = C[w, row, col]
    d = mma_bf16(c, a, b, f64)
    want = A.astype(F64) @ B.astype(F64) + C
    for w in range(W):
        for lane in range(32):
            g, t = lane // 4, lane % 4
            exp = [want[w, g, 2 * t], want[w, g, 2 * t + 1], want[w, g + 8, 2 * t], want[w, g + 8, 2 * t + 1]]
            assert np.allclose(d[w, lane], exp, rtol=1e-5, atol=1e-4), "mma fragment layout"

"""The simulated machine of the simple-kernels emulator (scripts/emulate_simple_kernels.py): f32/bf16
numerics (FMA, __expf, rsqrtf, logf, sincosf), the problems and results a run collects, device buffers
and the views kernels get, shared memory with bounds, write and race tracking, the launch over
[blocks, threads], and the warp and block reductions of kernels/common.cuh. INJECT holds the
deliberately broken variants chosen with --inject; PROBLEMS, RESULTS, LAUNCHES and ATTACHED are the
state of the run (use them as machine.NAME)."""
import numpy as np

F32, F64 = np.float32, np.float64
I64 = np.int64
INJECT = set()


# ----------------------------------------------------------------------------------------------
# Numerics
# ----------------------------------------------------------------------------------------------
def bf16_bits(x):
    """__float2bfloat16_rn / half::bf16::from_f32: round to nearest even; NaN -> quiet NaN."""
    x = np.ascontiguousarray(x, dtype=F32)
    u = x.view(np.uint32)
    r = ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(x)
    r[nan] = ((u[nan] >> np.uint32(16)) | np.uint32(0x40)).astype(np.uint16)
    return r


def bits_f32(b):
    return (np.asarray(b).astype(np.uint32) << np.uint32(16)).view(F32)


def to_bf16(x):
    """to_bf16(x) held in a float32 (exact)."""
    return bits_f32(bf16_bits(x))


def cvt_bf16(x):
    """The device's __float2bfloat16_rn (cvt.rn.bf16.f32): as to_bf16, but NaN -> canonical 0x7FFF."""
    x = np.asarray(x, F32)
    return np.where(np.isnan(x), bits_f32(np.uint16(0x7FFF)), to_bf16(x)).astype(F32)


def is_bf16(x):
    return (np.asarray(x, F32).view(np.uint32) & np.uint32(0xFFFF)) == 0


def fma32(a, b, c):
    """fmaf(a, b, c): one rounding of the exact a*b + c. The f32 x f32 product is exact in float64;
    the float64 sum is made round-to-odd (TwoSum error term), so rounding it to f32 is exact."""
    a, b, c = np.asarray(a, F64), np.asarray(b, F64), np.asarray(c, F64)
    p = a * b
    s = p + c
    bb = s - p
    e = (p - (s - bb)) + (c - bb)
    si = np.ascontiguousarray(s).view(np.int64)
    need = (e != 0) & ((si & 1) == 0) & np.isfinite(s)
    step = np.where((e > 0) == (s > 0), 1, -1).astype(np.int64)
    si = np.where(need, si + step, si)
    return si.view(F64).astype(F32)


LOG2E = F32(1.4426950408889634)  # libdevice __nv_fast_expf: x * 0x3FF7154760000000
FLT_MIN = F32(1.1754943508222875e-38)


def expf_fast(x):
    """__expf: ex2.approx.ftz.f32(x * log2e); ex2 taken correctly rounded, denormals flushed."""
    y = (np.asarray(x, F32) * LOG2E).astype(F32)
    with np.errstate(over="ignore", under="ignore"):
        r = np.exp2(y.astype(F64)).astype(F32)
    return np.where(np.abs(r) < FLT_MIN, F32(0), r).astype(F32)


def rsqrtf(x):
    with np.errstate(divide="ignore", invalid="ignore"):
        return (1.0 / np.sqrt(np.asarray(x, F32).astype(F64))).astype(F32)


def logf(x):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log(np.asarray(x, F32).astype(F64)).astype(F32)


def sincosf(a):
    a = np.asarray(a, F32).astype(F64)
    return np.sin(a).astype(F32), np.cos(a).astype(F32)


def rel_err(got, want):
    """src/backend/cuda/mod.rs rel_err: inf on a non-finite value or a length mismatch."""
    got, want = np.asarray(got, F64).ravel(), np.asarray(want, F64).ravel()
    if got.size != want.size or not np.isfinite(got).all():
        return np.inf
    return float(np.sqrt(((got - want) ** 2).sum() / max((want ** 2).sum(), 1e-30)))


# ----------------------------------------------------------------------------------------------
# Problems, results
# ----------------------------------------------------------------------------------------------
PROBLEMS = []  # (launch name, message, count)
RESULTS = []  # (op, case, err, tol, problems)
LAUNCHES = {}  # name -> (block, static smem bytes, count)


def problem(where, msg, n=1):
    if n:
        PROBLEMS.append((where, msg, int(n)))


ATTACHED = set()  # indices of PROBLEMS reported with a check


def take_problems(start):
    agg = {}
    ATTACHED.update(range(start, len(PROBLEMS)))
    for w, m, n in PROBLEMS[start:]:
        agg[(w, m)] = agg.get((w, m), 0) + n
    return [f"{w}: {m} (x{n})" for (w, m), n in agg.items()]


def record(op, case, err, tol, probs=()):
    RESULTS.append((op, case, float(err), float(tol), list(probs)))


# ----------------------------------------------------------------------------------------------
# Device memory
# ----------------------------------------------------------------------------------------------
class Buf:
    """A device allocation (flat). kind: bf16 (values held in float32, exact), f32, i32, u64.
    track: record per-launch readers / writers (global thread ids) to catch in-place races;
    count_reads: count loads per element."""

    def __init__(self, name, data, kind, track=False, count_reads=False):
        self.name, self.kind, self.track, self.count_reads = name, kind, track, count_reads
        self.last = {}  # kernel name -> write counts of its last launch
        dt = {"bf16": F32, "f32": F32, "i32": np.int32}[kind]
        self.data = np.array(data, dtype=dt).ravel().copy()
        if kind == "bf16":
            ok = is_bf16(self.data) | np.isnan(self.data)
            assert ok.all(), f"{name}: not bf16"
        self.begin()

    def begin(self):
        n = self.data.size
        self.writes = np.zeros(n, np.int32)
        if self.count_reads:
            self.reads = np.zeros(n, np.int32)
        if self.track:
            self.wmin = np.full(n, 2 ** 62, I64)
            self.wmax = np.full(n, -1, I64)
            self.rmin = np.full(n, 2 ** 62, I64)
            self.rmax = np.full(n, -1, I64)

    def view(self, lo=0, hi=None):
        return View(self, lo, self.data.size - lo if hi is None else hi - lo)


class View:
    """What a kernel's pointer argument sees: buffer elements [off, off + n) (a wrapper's slice, or
    the whole allocation)."""

    def __init__(self, buf, off, n):
        self.buf, self.off, self.n = buf, off, n


def _bc(ctx, a, dtype=None):
    a = np.asarray(a) if dtype is None else np.asarray(a, dtype)
    return np.broadcast_to(a, ctx.shape)


def ld(ctx, v, idx, mask=True):
    """Per-thread global load v[idx] by the active, masked threads (others get a dummy value)."""
    m = _bc(ctx, mask) & ctx.active
    idx = _bc(ctx, idx, I64)
    bad = m & ((idx < 0) | (idx >= v.n))
    if bad.any():
        problem(ctx.name, f"global read out of range of {v.buf.name}[{v.off}:{v.off + v.n}]", bad.sum())
        m = m & ~bad
    gi = np.where(m, idx, 0) + v.off
    if v.buf.data.size == 0:
        return np.zeros(ctx.shape, v.buf.data.dtype)
    out = v.buf.data[np.minimum(gi, v.buf.data.size - 1)]
    if v.buf.count_reads or v.buf.track:
        k = gi[m]
        if v.buf.count_reads:
            np.add.at(v.buf.reads, k, 1)
        if v.buf.track:
            t = ctx.gtid_b[m]
            b = v.buf
            race = (b.wmax[k] >= 0) & ((b.wmin[k] != t) | (b.wmax[k] != t))
            problem(ctx.name, f"global read of {b.name} written by another thread in the launch", race.sum())
            np.minimum.at(b.rmin, k, t)
            np.maximum.at(b.rmax, k, t)
    return out


def st(ctx, v, idx, val, mask=True):
    m = _bc(ctx, mask) & ctx.active
    idx = _bc(ctx, idx, I64)
    bad = m & ((idx < 0) | (idx >= v.n))
    if bad.any():
        problem(ctx.name, f"global write out of range of {v.buf.name}[{v.off}:{v.off + v.n}]", bad.sum())
        m = m & ~bad
    k = idx[m] + v.off
    val = _bc(ctx, val)[m]
    b = v.buf
    if b.kind == "bf16":
        nb = ~(is_bf16(val) | np.isnan(val))
        problem(ctx.name, f"store of a non-bf16 value into {b.name}", nb.sum())
    np.add.at(b.writes, k, 1)
    if b.track:
        t = ctx.gtid_b[m]
        race = (b.rmax[k] >= 0) & ((b.rmin[k] != t) | (b.rmax[k] != t))
        problem(ctx.name, f"global write of {b.name} read by another thread in the launch", race.sum())
        np.minimum.at(b.wmin, k, t)
        np.maximum.at(b.wmax, k, t)
    b.data[k] = val.astype(b.data.dtype)


class Shared:
    """One __shared__ array (per block of the batch), NaN-filled; tracks, per barrier interval, the
    threads that wrote / read each element."""

    def __init__(self, ctx, name, size, dynamic, dtype=F32):
        self.ctx, self.name, self.size, self.dynamic = ctx, name, size, dynamic
        nb = ctx.shape[0]
        n = nb * max(size, 1)
        self.data = np.full(n, np.nan, dtype)
        self.written = np.zeros(n, bool)
        self.wmin = np.full(n, 1 << 30, np.int32)
        self.wmax = np.full(n, -1, np.int32)
        self.rmin = np.full(n, 1 << 30, np.int32)
        self.rmax = np.full(n, -1, np.int32)
        self.rows = (np.arange(nb, dtype=I64) * max(size, 1))[:, None]
        self.touched = []

    def _keys(self, idx, mask, what):
        ctx = self.ctx
        m = _bc(ctx, mask) & ctx.active
        idx = _bc(ctx, idx, I64)
        bad = m & ((idx < 0) | (idx >= self.size))
        if bad.any():
            kind = "dynamic " if self.dynamic else ""
            problem(ctx.name, f"shared {what} out of range of {kind}{self.name}[{self.size}]", bad.sum())
            m = m & ~bad
        key = self.rows + np.where(m, idx, 0)
        return m, key

    def ld(self, idx, mask=True):
        ctx = self.ctx
        m, key = self._keys(idx, mask, "read")
        out = self.data[key]
        k = key[m]
        t = ctx.tid_b[m].astype(np.int32)
        problem(ctx.name, f"read of unwritten shared {self.name}", (~self.written[k]).sum())
        race = (self.wmax[k] >= 0) & ((self.wmin[k] != t) | (self.wmax[k] != t))
        problem(ctx.name, f"shared {self.name}: read of an element another thread wrote since the last barrier",
                race.sum())
        np.minimum.at(self.rmin, k, t)
        np.maximum.at(self.rmax, k, t)
        self.touched.append(k)
        return out

    def st(self, idx, val, mask=True):
        ctx = self.ctx
        m, key = self._keys(idx, mask, "write")
        k = key[m]
        t = ctx.tid_b[m].astype(np.int32)
        race = (self.rmax[k] >= 0) & ((self.rmin[k] != t) | (self.rmax[k] != t))
        problem(ctx.name, f"shared {self.name}: write of an element another thread read since the last barrier",
                race.sum())
        race = (self.wmax[k] >= 0) & ((self.wmin[k] != t) | (self.wmax[k] != t))
        np.minimum.at(self.wmin, k, t)
        np.maximum.at(self.wmax, k, t)
        race |= self.wmin[k] != self.wmax[k]
        problem(ctx.name, f"shared {self.name}: two threads write one element between barriers", race.sum())
        self.data[k] = _bc(ctx, val)[m].astype(self.data.dtype)
        self.written[k] = True
        self.touched.append(k)

    def barrier(self):
        if self.touched:
            k = np.concatenate(self.touched)
            self.wmin[k] = 1 << 30
            self.wmax[k] = -1
            self.rmin[k] = 1 << 30
            self.rmax[k] = -1
            self.touched = []


class Ctx:
    """The blocks of one launch that run together: shape [blocks, threads]."""

    def __init__(self, name, grid, block, dyn_bytes, bids):
        self.name, self.grid, self.NT, self.dyn_bytes = name, grid, block, dyn_bytes
        self.bid = np.asarray(bids, I64)[:, None]
        self.tid = np.arange(block, dtype=I64)[None, :]
        self.shape = (self.bid.shape[0], block)
        self.lane, self.warp, self.warps = self.tid % 32, self.tid // 32, block // 32
        self.tid_b = np.broadcast_to(self.tid, self.shape)
        self.gtid_b = np.broadcast_to(self.bid * block + self.tid, self.shape)
        self.active = np.ones(self.shape, bool)
        self.smem = {}
        self.static_bytes = 0

    def shared(self, name, size, dtype=F32):
        if name not in self.smem:
            self.smem[name] = Shared(self, name, size, False, dtype)
            self.static_bytes += np.dtype(dtype).itemsize * size
        return self.smem[name]

    def dyn(self):
        if "dyn" not in self.smem:
            self.smem["dyn"] = Shared(self, "extern p[]", self.dyn_bytes // 4, True)
        return self.smem["dyn"]

    def exit(self, cond):
        self.active = self.active & ~_bc(self, cond, bool)

    def sync(self):
        part = self.active.any(1) & ~self.active.all(1)
        problem(self.name, "__syncthreads() reached by part of a block", part.sum())
        for s in self.smem.values():
            s.barrier()

    def zeros(self, dtype=F32):
        return np.zeros(self.shape, dtype)


def launch(name, kernel, grid, block, dyn_bytes, args, order=None, batch=None):
    """Run `kernel(ctx, *args)` over the grid (optionally in batches of blocks, in `order`)."""
    assert block % 32 == 0 and 0 < block <= 1024
    for a in args:
        if isinstance(a, View):
            a.buf.begin()
    bids = np.arange(grid) if order is None else np.asarray(order)
    assert sorted(bids.tolist()) == list(range(grid))
    batch = batch or max(grid, 1)
    static = 0
    for lo in range(0, grid, batch):
        ctx = Ctx(name, grid, block, dyn_bytes, bids[lo:lo + batch])
        kernel(ctx, *args)
        static = max(static, ctx.static_bytes)
    for a in args:
        if isinstance(a, View):
            a.buf.last[name] = a.buf.writes.copy()
    _, _, c = LAUNCHES.get(name, (0, 0, 0))
    LAUNCHES[name] = (block, static, c + 1)


def check_writes(name, buf, expect):
    """Every element in `expect` (bool mask over the buffer) written once, no other written, by the
    last launch of kernel `name`."""
    w = buf.last.get(name, np.zeros(buf.data.size, np.int32))
    problem(name, f"{buf.name}: element never written", (expect & (w == 0)).sum())
    problem(name, f"{buf.name}: element written more than once", (expect & (w > 1)).sum())
    problem(name, f"{buf.name}: element outside the output written", (~expect & (w > 0)).sum())


def mask_of(n, lo, hi):
    m = np.zeros(n, bool)
    m[lo:hi] = True
    return m


def blocks_for(n):
    return max(-(-n // 256), 1), 256


def block_per_row(rows):
    return rows, 256


# ----------------------------------------------------------------------------------------------
# common.cuh
# ----------------------------------------------------------------------------------------------
LANES = np.arange(32)


def _shfl_check(ctx, act, what):
    a = _bc(ctx, act, bool) & ctx.active
    per = a.reshape(ctx.shape[0], ctx.warps, 32).sum(2)
    problem(ctx.name, f"{what}: __shfl_xor_sync(0xffffffff) with part of a warp", ((per > 0) & (per < 32)).sum())


def warp_sum(ctx, v, act=True, dtype=F32):
    _shfl_check(ctx, act, "warp_sum")
    v = np.asarray(_bc(ctx, v), dtype).reshape(ctx.shape[0], ctx.warps, 32)
    for o in (16, 8, 4, 2, 1):
        v = v + v[:, :, LANES ^ o]
    return v.reshape(ctx.shape)


def warp_max(ctx, v, act=True):
    _shfl_check(ctx, act, "warp_max")
    v = np.asarray(_bc(ctx, v), F32).reshape(ctx.shape[0], ctx.warps, 32)
    for o in (16, 8, 4, 2, 1):
        v = np.fmax(v, v[:, :, LANES ^ o])
    return v.reshape(ctx.shape)


def block_sum(ctx, v, scratch, dtype=F32):
    """block_sum<T> of common.cuh; T = dtype (the scratch holds the same type)."""
    lane, warp, warps = ctx.lane, ctx.warp, ctx.warps
    v = warp_sum(ctx, v, dtype=dtype)
    if "bsum_nosync" not in INJECT:
        ctx.sync()
    scratch.st(warp, v, lane == 0)
    ctx.sync()
    v = np.where(lane < warps, scratch.ld(lane, lane < warps), dtype(0)).astype(dtype)
    return warp_sum(ctx, v, dtype=dtype)


def block_max(ctx, v, scratch):
    lane, warp, warps = ctx.lane, ctx.warp, ctx.warps
    v = warp_max(ctx, v)
    ctx.sync()
    scratch.st(warp, v, lane == 0)
    ctx.sync()
    v = np.where(lane < warps, scratch.ld(lane, lane < warps), F32(-np.inf)).astype(F32)
    return warp_max(ctx, v)


def strided(ctx, start, step, n):
    """for (i = start; i < n; i += step): yields (i, active) while any thread is still in the loop."""
    i = _bc(ctx, start, I64)
    while True:
        act = (i < n) & ctx.active
        if not act.any():
            return
        yield i, act
        i = i + step


"""The simple-kernels emulator's (scripts/emulate_simple_kernels.py) side of the simulated machine: the
problems and results a run collects, device buffers and the views kernels get (bounds, stores of
non-bf16 values into bf16 buffers, optional in-place race tracking), the launch over [blocks, threads]
with threads that exit early (ctx.active), and the adapters that run gpu.py's shared memory, warp and
block reductions and lock-step loops on that layout. INJECT holds the deliberately broken variants
chosen with --inject; PROBLEMS, RESULTS, LAUNCHES and ATTACHED are the state of the run (use them as
machine.NAME)."""
import numpy as np

from . import gpu

F32, F64 = np.float32, np.float64
I64 = np.int64
INJECT = set()


# ----------------------------------------------------------------------------------------------
# Problems, results
# ----------------------------------------------------------------------------------------------
def rel_err(got, want):
    """src/engine/cuda/mod.rs rel_err: inf on a non-finite value or a length mismatch."""
    got, want = np.asarray(got, F64).ravel(), np.asarray(want, F64).ravel()
    if got.size != want.size or not np.isfinite(got).all():
        return np.inf
    return float(np.sqrt(((got - want) ** 2).sum() / max((want ** 2).sum(), 1e-30)))


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
    track: record per-launch readers / writers (global thread ids, gpu.Hazards) to catch in-place races;
    count_reads: count loads per element."""

    def __init__(self, name, data, kind, track=False, count_reads=False):
        self.name, self.kind, self.track, self.count_reads = name, kind, track, count_reads
        self.last = {}  # kernel name -> write counts of its last launch
        dt = {"bf16": F32, "f32": F32, "i32": np.int32}[kind]
        self.data = np.array(data, dtype=dt).ravel().copy()
        if kind == "bf16":
            ok = gpu.is_bf16(self.data) | np.isnan(self.data)
            assert ok.all(), f"{name}: not bf16"
        self.begin()

    def begin(self):
        n = self.data.size
        self.writes = np.zeros(n, np.int32)
        if self.count_reads:
            self.reads = np.zeros(n, np.int32)
        if self.track:
            self.hazards = gpu.Hazards(n)

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


def _in_view(ctx, v, idx, mask, what):
    """The threads that access v[idx] (active, masked, inside the view: those outside are recorded and
    left out) and idx, both [blocks, threads]."""
    m = _bc(ctx, mask) & ctx.active
    idx = _bc(ctx, idx, I64)
    bad = m & gpu.out_of_range(idx, 0, v.n)
    if bad.any():
        problem(ctx.name, f"global {what} out of range of {v.buf.name}[{v.off}:{v.off + v.n}]", bad.sum())
        m = m & ~bad
    return m, idx


def ld(ctx, v, idx, mask=True):
    """Per-thread global load v[idx] by the active, masked threads (others get a dummy value)."""
    m, idx = _in_view(ctx, v, idx, mask, "read")
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
            race = b.hazards.others_wrote(k, t)
            problem(ctx.name, f"global read of {b.name} written by another thread in the launch", race.sum())
            b.hazards.note_read(k, t)
    return out


def st(ctx, v, idx, val, mask=True):
    """Per-thread global store v[idx] = val by the active, masked threads."""
    m, idx = _in_view(ctx, v, idx, mask, "write")
    k = idx[m] + v.off
    val = _bc(ctx, val)[m]
    b = v.buf
    if b.kind == "bf16":
        nb = ~(gpu.is_bf16(val) | np.isnan(val))
        problem(ctx.name, f"store of a non-bf16 value into {b.name}", nb.sum())
    np.add.at(b.writes, k, 1)
    if b.track:
        t = ctx.gtid_b[m]
        race = b.hazards.others_read(k, t)
        problem(ctx.name, f"global write of {b.name} read by another thread in the launch", race.sum())
        b.hazards.note_write(k, t)
    b.data[k] = val.astype(b.data.dtype)


_SHARED_PROBLEMS = {
    "range": "shared {op} out of range of {kind}{name}[{size}]",
    "unwritten": "read of unwritten shared {name}",
    "raw": "shared {name}: read of an element another thread wrote since the last barrier",
    "war": "shared {name}: write of an element another thread read since the last barrier",
    "waw": "shared {name}: two threads write one element between barriers",
}


class Shared(gpu.Shared):
    """One __shared__ array (per block of the batch), NaN-filled; accesses by the threads that have
    not exited; each problem recorded (per access) against the launch."""

    def __init__(self, ctx, name, size, dynamic, dtype=F32):
        self.ctx, self.dynamic = ctx, dynamic

        def report(event, op, locs, width, tag):
            msg = _SHARED_PROBLEMS[event].format(op="read" if op == "load" else "write", name=name, size=size,
                                                 kind="dynamic " if dynamic else "")
            problem(ctx.name, msg, locs.size)

        nb = ctx.shape[0]
        super().__init__(name, size, dtype, np.nan, ctx.tid_b, np.arange(nb, dtype=I64)[:, None], nb, report)

    def ld(self, idx, mask=True):
        return super().ld(idx, _bc(self.ctx, mask) & self.ctx.active)

    def st(self, idx, val, mask=True):
        super().st(idx, val, _bc(self.ctx, mask) & self.ctx.active)


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
def _shfl_check(ctx, act, what):
    a = _bc(ctx, act, bool) & ctx.active
    problem(ctx.name, f"{what}: __shfl_xor_sync(0xffffffff) with part of a warp", gpu.partial_warps(a, axis=1))


def warp_sum(ctx, v, act=True, dtype=F32):
    _shfl_check(ctx, act, "warp_sum")
    return gpu.warp_sum(_bc(ctx, v), axis=1, dtype=dtype)


def warp_max(ctx, v, act=True):
    _shfl_check(ctx, act, "warp_max")
    return gpu.warp_max(_bc(ctx, v), axis=1, dtype=F32)


def block_sum(ctx, v, scratch, dtype=F32):
    """block_sum<T> of common.cuh; T = dtype (the scratch holds the same type)."""
    return gpu.block_reduce(v, lambda x: warp_sum(ctx, x, dtype=dtype), scratch, ctx.sync, ctx.lane, ctx.warp,
                            ctx.warps, 0, dtype, first_sync="bsum_nosync" not in INJECT)


def block_max(ctx, v, scratch):
    return gpu.block_reduce(v, lambda x: warp_max(ctx, x), scratch, ctx.sync, ctx.lane, ctx.warp, ctx.warps,
                            -np.inf)


def strided(ctx, start, step, n):
    """for (i = start; i < n; i += step) by the threads that have not exited: (i, active) per iteration."""
    return gpu.strided(start, step, n, ctx.active)

"""Exact threshold searches behind the simplex and box-sum projections (private).

Both projections have the form ``y = clamp(x - tau, lower, upper)`` with one scalar
``tau`` per row, the root of a non-increasing piecewise-linear function of ``tau``.
The functions here find that root exactly (up to rounding); the differentiable
output is then built from it in :mod:`sumto.functional`.

On CPU in eager mode the searches below run: sort-free, with pruning and an early
exit per row (data-dependent loop counts and shapes, and a few tiny host
synchronisations, which cost nothing on CPU). Everywhere else the sort-based
algorithms of :mod:`sumto.functional` run instead, see Note [Threshold search off
eager CPU].

Note [Simplex threshold by Newton's method]
For a row ``x`` (shifted so that ``max(x) = 0``) and a total ``c > 0`` the simplex
projection is ``max(x - tau, 0)`` with ``tau`` the root of the convex, strictly
decreasing, piecewise-linear ``f(t) = sum_i max(x_i - t, 0) - c``. The root lies in
``[max(-c, (sum(x) - c) / n), -c / n]``. A Newton step from any point ``p`` below
``max(x)``, ``p + f(p) / #{x_i > p}``, is a lower bound of the root, because the
tangent of a convex function lies below it. Newton from a lower bound (Michelot's
algorithm) therefore climbs monotonically; it stops at the root as soon as the
support ``{x_i > t}`` no longer changes, after at most ``n`` steps and in practice
a handful. Two tricks make each step cheap on CPU:

* counts are sums of ``sign(max(x - t, 0))`` in the row's float dtype, never
  boolean reductions (very slow on CPU), and all full-size work reuses one buffer
  (fresh large temporaries cost page faults);
* pruning: split each row into ``_GROUP`` interleaved stripes and take the
  elementwise max over the stripes, ``m_j = max_s x[s * k + j]``. Since every
  group contributes at least its max, ``sum_j max(m_j - t, 0) <= f(t) + c``, so the
  root of the coarse problem on ``m`` (solved recursively) is a lower bound of
  ``tau``. Entries of groups whose max is below that bound can never be in the
  support; the remaining groups are gathered into a small dense matrix on which
  Newton's method finishes exactly.

Note [Box threshold by safeguarded secant]
For bounds ``l < u`` the box-sum projection is ``clamp(x - tau, l, u)`` with
``h(tau) = c``, ``h(t) = sum_i clamp(x_i - t, l, u)``, continuous, non-increasing
and piecewise linear with slope ``-#free(t)``. One evaluation of ``h`` costs three
passes (subtract, clamp in place, sum), as one step of bisection does; counting the
free entries costs as much again, so the search below evaluates ``h`` alone:

* start: the same problem on a strided subsample (total scaled by the sampling
  ratio) solved loosely by a few secant steps, and the subsample's average slope
  over a window of about the sampling error (two more subsample evaluations);
* first step: Newton's step with that average slope. On narrow boxes the local
  slope (a few free entries) is useless far from the root, the average one is not;
* then secant steps through the last two iterates, kept inside a bracket
  ``[lo, hi]`` (``h(lo) >= c > h(hi)``): a step that leaves it is replaced by
  regula falsi with the Anderson-Bjorck weight on the bracket (and by bisection
  every eighth step). Two iterates on the root's linear piece give the root;
* a row is finished when ``|h(t) - c| <= rho`` (about the rounding of ``h``), when
  the step no longer changes ``t`` or when the bracket has shrunk to adjacent
  floats. Finished rows are dropped from the working set.

Since every ``clamp(x_i - t, l, u)`` is non-increasing in ``t``, the output at ``t``
differs from the solution by at most ``|h(t) - c|`` in every entry (and in sum).
Rows where that exceeds ``eps / 2 * max(|x|, |l|, |u|, |c|)``, about the rounding
of ``x - t`` itself (most rows of a wide box, where ``rho`` grows with ``n``; one in
ten of a narrow one), end with one Newton step from
the classification at ``t``, ``t + (h(t) - c) / #free(t)``: exact when ``t`` lies on
the root's linear piece (up to the rounding of ``h``), and a move of at most
``rho / #free`` otherwise.
``#free`` is counted in one chain of passes as
``(n - sum(sign(|x - t - m| - r))) / 2`` with ``m, r`` the box's centre and radius.
Unlike the simplex search, this one is exact up to rounding, not bit for bit:
``h`` sums entries of different magnitudes, so a residual below the rounding of
the largest ones goes unseen.

Every full-size pass of the secant search runs block of rows by block
(``_BLOCK_BYTES`` of work buffer): the three passes of an evaluation then hit the
cache, which made an evaluation on a (4096, 1024) float32 matrix about a quarter
faster.

Note [Box threshold on small inputs]
On small inputs (up to ``_SMALL_ENTRIES`` entries) a step costs mostly its
per-operation overhead, not its passes, and the fewest operations win. There
``_SMALL_BISECTIONS`` plain bisection steps from ``[min(x) - u, max(x) - l]`` (a
few operations each) bring ``t`` close, then Newton's method finishes: each step
also counts the entries at each bound (``sign`` sums, nine passes in all) and takes
Newton's step, kept inside the bracket and replaced by bisection when it leaves it
(and every eighth step). A row is finished when a Newton step does not change the
classification of any entry (the sets move monotonically, so equal counts mean
equal sets), when the step no longer changes ``t``, or when the bracket has shrunk
to adjacent floats; its ``tau`` is then one Newton step from its classification,
exact up to rounding. On (64, 1024) float32 rows in a narrow box this took 1.3 ms
where Newton from a subsample's root took 4 ms (60-step bisection: 1.8 ms).

Note [Threshold search off eager CPU]
On other devices, while ``torch.compile``/``torch.export``/``torch.jit.trace``
record, and under ``torch.func`` transforms, the data-dependent loops above would
synchronise with the device, break the graph or be baked into a trace. There the
sort-based algorithms run: exact, free of host synchronisation, and small graphs
(a fixed-step bisection on the bit patterns of ``tau`` is exact too, but its 32 to
64 unrolled steps made compiling a model several times slower, and the tracer of
``torch.jit.trace`` cannot record its bit casts). The same exact fallback finishes
the rare rows that the CPU searches have not settled after ``_MAX_STEPS`` steps,
which bounds their cost on adversarial inputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from sumto._compat import is_compiling

__all__: list[str] = []

# Stripe count of the coarse simplex problem, and the row length below which the
# simplex search runs on the full row directly.
_GROUP = 16
_MIN_PRUNE = 256
# Subsampling stride of the box search's starting point, the row length below which
# the starting point is the affine projection's shift instead, the number of secant
# steps on the subsample, and the half-width of the window of the subsample's
# average slope, in units of (range of the row) / sqrt(subsample length).
_STRIDE = 8
_MIN_SUBSAMPLE = 256
_SAMPLE_STEPS = 3
_SLOPE_WINDOW = 0.25
# Every _BISECT_EVERY-th box step is a bisection step; rows still running after
# _MAX_STEPS steps of a CPU search finish with the sort-based search.
_BISECT_EVERY = 8
_MAX_STEPS = 64
# Size of the work buffer of the box search: its passes run block of rows by block.
_BLOCK_BYTES = 1 << 21
# Inputs of at most this many entries take the small-input box search, which
# starts with this many bisection steps.
_SMALL_ENTRIES = 1 << 18
_SMALL_BISECTIONS = 16


# ---------------------------------------------------------------------------
# dispatch helpers
# ---------------------------------------------------------------------------


def _is_functorch_wrapped(x: Tensor) -> bool:
    check = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return bool(check(x)) if check is not None else False


def _jit_tracing() -> bool:
    return bool(torch._C._get_tracing_state())


def use_adaptive(x: Tensor) -> bool:
    """Whether the data-dependent (early-exit) search may run on ``x``.

    Only on CPU in plain eager mode: not while compiling or exporting, not while
    ``torch.jit.trace`` records (the loop counts would be baked into the trace),
    and not under ``torch.func`` transforms.
    """
    return (
        x.device.type == "cpu"
        and not is_compiling()
        and not _jit_tracing()
        and not _is_functorch_wrapped(x)
    )


def _as_matrix(rows: Tensor) -> Tensor:
    """``rows`` (..., n) as a contiguous (R, n) matrix (a view when possible)."""
    return rows.reshape(-1, rows.shape[-1]).contiguous()


def _total_column(total: Tensor | float, rows: Tensor, count: int) -> Tensor | float:
    """The total as a float or a (R, 1) tensor aligned with :func:`_as_matrix`."""
    if not isinstance(total, Tensor):
        return float(total)
    t = total.to(dtype=rows.dtype, device=rows.device)
    return t.expand(*rows.shape[:-1], 1).reshape(count, 1)


# ---------------------------------------------------------------------------
# simplex: see Note [Simplex threshold by Newton's method]
# ---------------------------------------------------------------------------


def simplex_threshold(rows: Tensor, total: Tensor | float) -> tuple[Tensor, Tensor]:
    """Threshold and support size of the simplex projection of each row.

    Args:
        rows: Tensor ``(..., n)`` (float32 or float64) whose rows have max exactly 0.
        total: Positive float, or tensor broadcastable to ``(..., 1)``.

    Returns:
        ``(tau, count)``, both of shape ``(..., 1)`` and ``rows``' dtype:
        ``max(rows - tau, 0)`` sums to ``total`` and has ``count`` positive entries.
    """
    with torch.no_grad():
        x = _as_matrix(rows.detach())
        c = _total_column(total, rows, x.shape[0])
        if use_adaptive(x):
            tau, count = _simplex_adaptive(x, c)
        else:
            tau, count = _simplex_sorted(x, c)
        out_shape = (*rows.shape[:-1], 1)
        return tau.reshape(out_shape), count.reshape(out_shape)


def _simplex_lower_bound(x: Tensor, c: Tensor | float) -> Tensor:
    n = x.shape[1]
    mean_bound = (x.sum(-1, keepdim=True) - c) / n
    if isinstance(c, Tensor):
        return torch.maximum(mean_bound, -c)
    return mean_bound.clamp_min(-c)


def _simplex_adaptive(x: Tensor, c: Tensor | float) -> tuple[Tensor, Tensor]:
    """Exact threshold with pruning and early exit (eager CPU)."""
    rows, n = x.shape
    lo = _simplex_lower_bound(x, c)
    if rows == 0 or n < _MIN_PRUNE:
        return _simplex_newton(x, c, lo)
    k = n // _GROUP
    head = x[:, : k * _GROUP].view(rows, _GROUP, k)
    tail = x[:, k * _GROUP :]
    group_max = head.amax(1)
    coarse = torch.cat([group_max, tail], 1) if tail.shape[1] > 0 else group_max
    coarse_tau, _ = _simplex_adaptive(coarse, c)
    lo = torch.maximum(lo, coarse_tau)
    candidate = group_max > lo
    per_row = candidate.view(torch.uint8).sum(-1, dtype=torch.int32)
    kmax = int(per_row.max())
    width = kmax * _GROUP + tail.shape[1]
    if 2 * width > n:
        return _simplex_newton(x, c, lo)
    # Gather the candidate groups into a dense (rows, width) matrix padded with lo:
    # padding never exceeds a threshold t >= lo, so it never enters the support.
    index = candidate.nonzero()
    row_id, group_id = index[:, 0], index[:, 1]
    starts = (per_row.cumsum(0) - per_row).to(torch.int64)
    position = torch.arange(index.shape[0], device=x.device) - starts[row_id]
    dense = lo.view(rows, 1, 1).expand(rows, kmax, _GROUP).clone()
    dense[row_id, position] = head[row_id, :, group_id]
    packed = dense.view(rows, kmax * _GROUP)
    if tail.shape[1] > 0:
        packed = torch.cat([packed, tail], 1)
    return _simplex_newton(packed, c, lo)


def _rows(value: Tensor, keep: Tensor) -> Tensor:
    """The rows ``keep`` of ``value`` (``index_select`` is much faster than ``value[keep]``)."""
    return torch.index_select(value, 0, keep)


def _take(value: Tensor | float, keep: Tensor) -> Tensor | float:
    return _rows(value, keep) if isinstance(value, Tensor) else value


def _simplex_newton(x: Tensor, c: Tensor | float, lo: Tensor) -> tuple[Tensor, Tensor]:
    """Michelot/Newton iterations from the lower bound ``lo`` until the support is stable.

    On long rows, converged rows are written out and, once they are at least half of
    the working set, dropped from it. Rows still running after ``_MAX_STEPS`` steps
    (adversarial inputs; typical rows need fewer than 12) finish by sorting.
    """
    n = x.shape[1]
    long_rows = n >= _MIN_PRUNE
    tau_out = torch.empty_like(lo)
    count_out = torch.empty_like(lo)
    ids: Tensor | None = None  # working row -> output row (None: identity)
    work = torch.empty_like(x)
    t = lo
    previous: Tensor | None = None
    for _ in range(_MAX_STEPS):
        active = x.shape[0]
        buffer = work[:active]
        torch.sub(x, t, out=buffer).clamp_min_(0.0)
        above = buffer.sum(-1, keepdim=True)
        count = buffer.sign_().sum(-1, keepdim=True)
        # count >= 1 below max(x) = 0; count = 0 only for total = 0, where tau = 0
        step = torch.addcdiv(t, above - c, count.clamp_min(1.0))
        done = ~(step > t)  # no progress; also stops rows with NaN entries
        if previous is not None:
            done |= count == previous
        if long_rows:
            finished = int(done.sum())
            if finished == active:
                _write(tau_out, step, ids, None)
                _write(count_out, count, ids, None)
                return tau_out, count_out
            if 2 * finished >= active:
                _write(tau_out, step, ids, done)
                _write(count_out, count, ids, done)
                keep = (~done).nonzero()[:, 0]
                ids = keep if ids is None else ids[keep]
                x, c = _rows(x, keep), _take(c, keep)
                t, previous = _rows(step, keep), _rows(count, keep)
                continue
        elif bool(done.all()):
            _write(tau_out, step, ids, None)
            _write(count_out, count, ids, None)
            return tau_out, count_out
        # Converged rows stay converged: at their root, step <= t or the count repeats.
        t = torch.maximum(t, step)
        previous = count
    tau, count = _simplex_sorted(x, c)
    _write(tau_out, tau, ids, None)
    _write(count_out, count, ids, None)
    return tau_out, count_out


def _write(out: Tensor, value: Tensor, ids: Tensor | None, mask: Tensor | None) -> None:
    """``out[ids[mask]] = value[mask]`` with ``None`` meaning all rows."""
    if mask is not None:
        value = value[mask[:, 0]]
        if ids is None:
            out[mask[:, 0]] = value
            return
        ids = ids[mask[:, 0]]
    if ids is None:
        out.copy_(value)
    else:
        out[ids] = value


# ---------------------------------------------------------------------------
# box: see Note [Box threshold by safeguarded secant]
# ---------------------------------------------------------------------------


def box_threshold(
    rows: Tensor,
    total: Tensor | float,
    lower: float,
    upper: float,
    scratch: Tensor | None = None,
) -> Tensor:
    """Shift ``tau`` of the projection ``clamp(rows - tau, lower, upper)`` onto a fixed sum.

    Args:
        rows: Tensor ``(..., n)``, float32 or float64.
        total: Float or tensor broadcastable to ``(..., 1)``, with
            ``n * lower <= total <= n * upper``.
        lower: Finite lower bound.
        upper: Finite upper bound, ``upper >= lower``.
        scratch: Optional contiguous tensor with ``rows``' dtype and number of
            entries, used as the search's work buffer when the rows fit in one
            block of ``_BLOCK_BYTES`` (e.g. the output's storage); larger inputs
            use a block-sized buffer.

    Returns:
        ``tau`` of shape ``(..., 1)``: ``clamp(rows - tau, lower, upper)`` sums to
        ``total`` and is the projection, up to rounding (entries within rounding
        of a bound may be classified either way).
    """
    with torch.no_grad():
        x = _as_matrix(rows.detach())
        c = _total_column(total, rows, x.shape[0])
        if use_adaptive(x):
            work = None if scratch is None else scratch.view(x.shape)
            tau = _box_adaptive(x, c, lower, upper, work)
        else:
            tau = _box_sorted(x, c, lower, upper)
        return tau.reshape(*rows.shape[:-1], 1)


def _block_rows(x: Tensor) -> int:
    """Rows per block of the box search's full-size passes (see :func:`_row_sums`)."""
    return max(1, _BLOCK_BYTES // max(1, x.shape[1] * x.element_size()))


def _row_sums(
    x: Tensor, t: Tensor, chain: Callable[[Tensor, Tensor, Tensor], Tensor], work: Tensor
) -> Tensor:
    """``chain(x, t, work).sum(-1, keepdim=True)``, block of rows by block of rows.

    ``chain`` writes into ``work`` (``(block, n)``, at most ``_BLOCK_BYTES``), so a
    block's passes run in cache: on (4096, 1024) float32 rows this made one
    evaluation a quarter faster than passes over the whole matrix.
    """
    rows, block = x.shape[0], work.shape[0]
    if rows <= block:
        return chain(x, t, work[:rows]).sum(-1, keepdim=True)
    out = x.new_empty(rows, 1)
    for start in range(0, rows, block):
        stop = min(start + block, rows)
        part = chain(x[start:stop], t[start:stop], work[: stop - start])
        torch.sum(part, -1, keepdim=True, out=out[start:stop])
    return out


def _box_value(x: Tensor, t: Tensor, lower: float, upper: float, work: Tensor) -> Tensor:
    """``h(t) = sum(clamp(x - t, lower, upper))`` per row: three passes over ``work``."""

    def chain(xb: Tensor, tb: Tensor, wb: Tensor) -> Tensor:
        return torch.sub(xb, tb, out=wb).clamp_(lower, upper)

    return _row_sums(x, t, chain, work)


def _box_free_count(x: Tensor, t: Tensor, lower: float, upper: float, work: Tensor) -> Tensor:
    """Number of entries with ``lower < x - t < upper`` per row, in ``x``'s dtype.

    An entry exactly on a bound (after rounding) counts one half: the count only
    serves a Newton step that moves ``t`` by a rounding-sized amount.
    """
    centre = 0.5 * lower + 0.5 * upper
    radius = 0.5 * upper - 0.5 * lower

    def chain(xb: Tensor, tb: Tensor, wb: Tensor) -> Tensor:
        return torch.sub(xb, tb + centre, out=wb).abs_().sub_(radius).sign_()

    return (x.shape[1] - _row_sums(x, t, chain, work)) * 0.5


def _box_bracket(
    x: Tensor, c: Tensor | float, lower: float, upper: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(lo, hi, h(lo) - c, h(hi) - c)``: every entry is at ``upper`` at ``lo``, at ``lower`` at ``hi``."""
    n = x.shape[1]
    lo = x.amin(-1, keepdim=True) - upper
    hi = x.amax(-1, keepdim=True) - lower
    return lo, hi, (n * upper) - c + torch.zeros_like(lo), (n * lower) - c + torch.zeros_like(hi)


def _box_secant(
    x: Tensor,
    c: Tensor | float,
    lower: float,
    upper: float,
    t: Tensor,
    slope: Tensor,
    bracket: tuple[Tensor, Tensor, Tensor, Tensor],
    rho: Tensor | float,
    steps: int,
    work: Tensor,
    prune: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Safeguarded secant search from ``t``; the first step is Newton's with ``slope``.

    Returns ``(t, h(t) - c, finished)`` per row. With ``prune``, finished rows are
    written out and, once they are at least half of the working set, dropped from
    it. After ``steps`` steps, unfinished rows return their next proposal (not
    evaluated: their ``h(t) - c`` is stale).
    """
    lo, hi, f_lo, f_hi = bracket
    t_out = torch.empty_like(t)
    f_out = torch.empty_like(t)
    done_out = torch.zeros_like(t, dtype=torch.bool)
    ids: Tensor | None = None  # working row -> output row (None: identity)
    t_prev: Tensor | None = None
    f_prev = above_prev = t
    f = t
    done = done_out
    for step in range(steps):
        active = x.shape[0]
        f = _box_value(x, t, lower, upper, work) - c
        above = f >= 0
        if t_prev is None:  # Newton's step with the given slope
            proposal = t + f / slope
            scale: Tensor | float = 1.0
        else:  # the secant of the last two points
            proposal = t - f * ((t - t_prev) / (f - f_prev))
            # Anderson-Bjorck: when the new point falls on the same side as the last
            # one, the end kept twice has its value scaled by 1 - f / f_prev (or 1/2)
            weight = 1.0 - f / f_prev
            weight = torch.where(weight > 0, weight, 0.5)
            scale = torch.where(above == above_prev, weight, 1.0)
        lo = torch.where(above, t, lo)
        hi = torch.where(above, hi, t)
        f_lo = torch.where(above, f, f_lo * scale)
        f_hi = torch.where(above, f_hi * scale, f)
        falsi = lo + f_lo * ((hi - lo) / (f_lo - f_hi))
        proposal = torch.where((proposal > lo) & (proposal < hi), proposal, falsi)
        inside = (proposal > lo) & (proposal < hi)
        if step % _BISECT_EVERY == _BISECT_EVERY - 1:
            inside = torch.zeros_like(inside)
        proposal = torch.where(inside, proposal, 0.5 * lo + 0.5 * hi)  # (no overflow)
        # finished: at the rounding of h, stalled, or a bracket of adjacent floats
        # (written so that a nan row counts as finished)
        done = (f.abs() <= rho) | (proposal == t) | ~(torch.nextafter(lo, hi) < hi)
        proposal = torch.where(done, t, proposal)
        t_prev, f_prev, above_prev = t, f, above
        if prune:
            finished = int(done.sum())
            if finished == active:
                break
            if 2 * finished >= active:
                _write(t_out, t, ids, done)
                _write(f_out, f, ids, done)
                _write(done_out, done, ids, done)
                keep = (~done).nonzero()[:, 0]
                ids = keep if ids is None else ids[keep]
                x, c, rho = _rows(x, keep), _take(c, keep), _take(rho, keep)
                proposal, t_prev, f_prev, f, slope = (
                    _rows(v, keep) for v in (proposal, t_prev, f_prev, f, slope)
                )
                lo, hi, f_lo, f_hi, above_prev = (
                    _rows(v, keep) for v in (lo, hi, f_lo, f_hi, above_prev)
                )
                done = _rows(done, keep)
                t = proposal
                continue
        t = proposal
    _write(t_out, t, ids, None)
    _write(f_out, f, ids, None)
    _write(done_out, done, ids, None)
    return t_out, f_out, done_out


def _box_start(
    x: Tensor,
    c: Tensor | float,
    lower: float,
    upper: float,
    bracket: tuple[Tensor, Tensor, Tensor, Tensor],
) -> tuple[Tensor, Tensor]:
    """Starting shift and slope: from a strided subsample, or the affine projection's."""
    n = x.shape[1]
    lo, hi = bracket[0], bracket[1]
    if n < _MIN_SUBSAMPLE:
        # exact for rows whose entries all stay free
        return (x.sum(-1, keepdim=True) - c) / n, torch.full_like(lo, float(n))
    sample = x[:, ::_STRIDE].contiguous()
    m = sample.shape[1]
    ratio = m / n
    c_sample = c * ratio
    sample_bracket = _box_bracket(sample, c_sample, lower, upper)
    work = sample.new_empty(min(sample.shape[0], _block_rows(sample)), m)
    t0 = (sample.sum(-1, keepdim=True) - c_sample) / m
    t0 = torch.fmin(torch.fmax(t0, sample_bracket[0]), sample_bracket[1])
    slope0 = torch.full_like(t0, float(m))
    t, _, _ = _box_secant(
        sample, c_sample, lower, upper, t0, slope0, sample_bracket, 0.0, _SAMPLE_STEPS, work, False
    )
    # Average slope of the subsample's h over t +- w, w of the order of the sampling
    # error of the root; it steers only the first step (a safeguarded one).
    spread = (hi - lo) - (upper - lower)  # max(x) - min(x), per row
    w = spread * (_SLOPE_WINDOW / math.sqrt(m))
    rise = _box_value(sample, t - w, lower, upper, work) - _box_value(
        sample, t + w, lower, upper, work
    )
    slope = rise / (2.0 * ratio * w)
    slope = torch.where((slope >= 1.0) & (slope <= n), slope, 1.0)  # also nan (w = 0, inf)
    return t, slope


def _box_adaptive(
    x: Tensor, c: Tensor | float, lower: float, upper: float, work: Tensor | None = None
) -> Tensor:
    """Exact shift by the safeguarded secant search with early exit (eager CPU)."""
    rows, n = x.shape
    if x.numel() <= _SMALL_ENTRIES:  # also every empty input
        return _box_small(x, c, lower, upper, work)
    bracket = _box_bracket(x, c, lower, upper)
    block = min(rows, _block_rows(x))
    work = x.new_empty(block, n) if work is None or block < rows else work
    eps = torch.finfo(x.dtype).eps
    scale_c = float(c.abs().max()) if isinstance(c, Tensor) else abs(c)
    magnitude = max(abs(lower), abs(upper))
    t, slope = _box_start(x, c, lower, upper, bracket)
    # About the rounding of h: of n entries within the bounds and the total, and of
    # x - t for one free entry. Every entry of the output at t is within |h(t) - c|
    # of the solution's, so rho also bounds the error where the search stops on it.
    row_scale = torch.maximum(bracket[0].abs(), bracket[1].abs())
    rho = 2.0 * eps * (n * magnitude + scale_c + row_scale)
    t = torch.fmin(torch.fmax(t, bracket[0]), bracket[1])  # also a nan start
    # totals on the boundary of feasibility: the bracket's end is the exact root
    t = torch.where(bracket[2] == 0, bracket[0], torch.where(bracket[3] == 0, bracket[1], t))
    t, f, done = _box_secant(x, c, lower, upper, t, slope, bracket, rho, _MAX_STEPS, work, True)
    if not bool(done.all()):
        # adversarial rows: finish exactly by sorting
        keep = (~done).nonzero()[:, 0]
        t[keep] = _box_sorted(_rows(x, keep), _take(c, keep), lower, upper)
        f = torch.where(done, f, 0.0)
    # Every entry of the output is within |h(t) - c| <= rho of the solution's. Where
    # that exceeds eps/2 max(|x|, |bounds|, |total|), one Newton step from t's
    # classification leaves only the rounding of h (divided by the free count), as t
    # lies on the root's linear piece or next to it. On narrow boxes few rows need
    # it (rho is small there): they are gathered.
    scale = torch.clamp_min(row_scale, max(magnitude, scale_c))
    need = f.abs() > 0.5 * eps * scale
    count = int(need.sum())
    if count > rows // 4:
        t = _box_newton_step(x, t, f, lower, upper, work)
    elif count > 0:
        keep = need.nonzero()[:, 0]
        t[keep] = _box_newton_step(
            _rows(x, keep), _rows(t, keep), _rows(f, keep), lower, upper, work
        )
    return t


def _box_newton_step(
    x: Tensor, t: Tensor, f: Tensor, lower: float, upper: float, work: Tensor
) -> Tensor:
    """``t + f / #free(t)`` with ``f = h(t) - c`` (``t`` itself where no entry is free)."""
    free = _box_free_count(x, t, lower, upper, work)
    return torch.where(free > 0, t + f / free.clamp_min(1.0), t)


def _box_evaluate(
    x: Tensor, t: Tensor, lower: float, upper: float, work: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """``(h(t), #at upper, #at lower)`` per row, in ``x``'s dtype, with one work buffer.

    ``#at upper`` counts an entry with ``x - t == upper`` exactly as one half: the
    counts only steer Newton's step and detect a change of classification.
    """
    n = x.shape[1]
    # sum of sign(x - t - upper) = #above - #below
    at_upper = (torch.sub(x, t + upper, out=work).sign_().sum(-1, keepdim=True) + n) * 0.5
    torch.sub(x, t, out=work).clamp_(lower, upper)
    value = work.sum(-1, keepdim=True)
    at_lower = n - work.sub_(lower).sign_().sum(-1, keepdim=True)
    return value, at_upper, at_lower


def _box_small(
    x: Tensor, c: Tensor | float, lower: float, upper: float, work: Tensor | None = None
) -> Tensor:
    """Exact shift on small inputs: a few bisection steps, then Newton's search.

    See Note [Box threshold on small inputs].
    """
    lo, hi, _, _ = _box_bracket(x, c, lower, upper)
    work = torch.empty_like(x) if work is None else work
    for _ in range(_SMALL_BISECTIONS):
        midpoint = 0.5 * lo + 0.5 * hi  # (no overflow)
        above = _box_value(x, midpoint, lower, upper, work) >= c
        lo = torch.where(above, midpoint, lo)
        hi = torch.where(above, hi, midpoint)
    return _box_newton(x, c, lower, upper, (lo, hi), work)


def _box_newton(
    x: Tensor,
    c: Tensor | float,
    lower: float,
    upper: float,
    bracket: tuple[Tensor, Tensor],
    work: Tensor,
) -> Tensor:
    """Exact shift by safeguarded Newton with early exit (eager CPU).

    Starts from the middle of ``bracket = (lo, hi)``, ``h(lo) >= c > h(hi)``.
    """
    rows, n = x.shape
    lo, hi = bracket
    tau_out = torch.empty_like(lo)
    if rows == 0:
        return tau_out
    t = 0.5 * lo + 0.5 * hi  # (no overflow)
    ids: Tensor | None = None
    finished = torch.zeros_like(lo, dtype=torch.bool)
    result = t
    newton_before = torch.zeros_like(finished)
    previous: tuple[Tensor, Tensor] | None = None
    for iteration in range(_MAX_STEPS):
        active = x.shape[0]
        value, at_upper, at_lower = _box_evaluate(x, t, lower, upper, work[:active])
        excess = value - c
        free = n - at_upper - at_lower
        above = excess >= 0
        lo = torch.where(above, t, lo)
        hi = torch.where(above, hi, t)
        newton = t + excess / free
        done = (excess == 0) | (newton == t) | ~(torch.nextafter(lo, hi) < hi)
        if previous is not None:
            done |= newton_before & (at_upper == previous[0]) & (at_lower == previous[1])
        done &= ~finished
        # the exact shift from the classification at t (t itself on a flat piece)
        result = torch.where(done, torch.where(free > 0, newton, t), result)
        finished = finished | done
        count = int(finished.sum())
        if count == active:
            _write(tau_out, result, ids, None)
            return tau_out
        use_newton = (free > 0) & (newton > lo) & (newton < hi)
        if iteration % _BISECT_EVERY == _BISECT_EVERY - 1:
            use_newton = torch.zeros_like(use_newton)
        # finished rows stay where they are
        midpoint = 0.5 * lo + 0.5 * hi  # (no overflow)
        t = torch.where(finished, t, torch.where(use_newton, newton, midpoint))
        newton_before = use_newton
        previous = (at_upper, at_lower)
        if 2 * count >= active and n >= _MIN_SUBSAMPLE:
            _write(tau_out, result, ids, finished)
            keep = (~finished).nonzero()[:, 0]
            ids = keep if ids is None else ids[keep]
            x, c, t = _rows(x, keep), _take(c, keep), _rows(t, keep)
            lo, hi, result = _rows(lo, keep), _rows(hi, keep), _rows(result, keep)
            newton_before = _rows(newton_before, keep)
            previous = (_rows(at_upper, keep), _rows(at_lower, keep))
            finished = _rows(finished, keep)
    # adversarial rows: finish exactly by sorting
    result = torch.where(finished, result, _box_sorted(x, c, lower, upper))
    _write(tau_out, result, ids, None)
    return tau_out


# ---------------------------------------------------------------------------
# exact sort-based searches (Note [Threshold search off eager CPU]); they live in
# sumto.functional, imported lazily because that module imports this one
# ---------------------------------------------------------------------------


def _simplex_sorted(x: Tensor, c: Tensor | float) -> tuple[Tensor, Tensor]:
    from sumto.functional import _simplex_threshold_sort

    support = _simplex_threshold_sort(x, c).to(x.dtype)
    count = support.sum(-1, keepdim=True).clamp_min(1.0)
    return ((x * support).sum(-1, keepdim=True) - c) / count, count


def _box_sorted(x: Tensor, c: Tensor | float, lower: float, upper: float) -> Tensor:
    from sumto.functional import _box_support_sort

    free_mask, upper_mask = _box_support_sort(x, c, lower, upper)
    free = free_mask.to(x.dtype)
    at_upper = upper_mask.to(x.dtype)
    at_lower = 1.0 - free - at_upper
    count = free.sum(-1, keepdim=True)
    fixed = upper * at_upper.sum(-1, keepdim=True) + lower * at_lower.sum(-1, keepdim=True)
    tau = ((x * free).sum(-1, keepdim=True) - (c - fixed)) / count.clamp_min(1.0)
    # With no free entry any shift between the two bound classes works: take the
    # smallest one that keeps every lower entry at the lower bound.
    flat = torch.where(at_lower > 0, x - lower, torch.full_like(x, -torch.inf))
    return torch.where(count > 0, tau, flat.amax(-1, keepdim=True))

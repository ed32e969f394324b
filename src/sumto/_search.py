"""Threshold searches: the shift ``tau`` of ``clamp(x - tau, lower, upper)`` per row.

The simplex, box and one-sided projections all have the form
``y = clamp(x - tau, l, u)`` with one scalar ``tau`` per row (last dim), the root of
``h(t) = sum_i clamp(x_i - t, l, u) = c``, a continuous, non-increasing, piecewise-
linear function. A search here returns ``tau`` and nothing else: the output, its
exact sum and its derivatives are assembled in :mod:`sumto._autograd`, which only
needs ``tau`` to classify every entry correctly up to the rounding of the entries
(Note [Sum refinement] there makes the sum exact from any such ``tau``).

Code paths per map: at most two searches and one assembly each.

=============  =============================================  ======================================
map            device-agnostic search (no host sync)          eager-CPU search, large inputs
=============  =============================================  ======================================
affine sum     none (closed form)                             none
one-sided      sort (Held/Duchi), :func:`_one_sided_sort`     pruned Newton, :func:`_simplex_pruned`
two-sided box  sorted breakpoints, :func:`_box_sort`          falsi then Newton, :func:`_box_newton`
per-entry box  sorted breakpoints, :func:`_box_sort_entries`  none
=============  =============================================  ======================================

The sort-based searches run wherever data-dependent control flow is not free: on
other devices, while ``torch.export``/``torch.jit.trace`` record, under ``torch.func``
transforms, and on small inputs, where they are fastest. Under ``torch.compile`` the
search with float bounds is one opaque operator, ``sumto::threshold`` (Note [The
search as an opaque operator under compile]), so compiled programs choose between
the searches at run time as eager code does. They run
in float64 (float32 on MPS): their prefix sums of long float32 rows would lose the
classification in narrow boxes. The Newton searches run on CPU in plain eager mode
on inputs of at least ``_LARGE`` entries (``_LARGE_BOX`` for two-sided boxes, whose
sort-based search does more per entry), where sorting costs more (``make bench``
prints the ratio per shape). :func:`forced` selects a search for
tests and benchmarks.

Note [Simplex threshold by Newton's method]
For a row ``x`` and ``c > 0``, ``tau`` is the root of the convex, strictly decreasing
(below ``max(x)``), piecewise-linear ``f(t) = sum_i max(x_i - t, 0) - c``, which lies
in ``[max(max(x) - c, (sum(x) - c) / n), max(x))``. A Newton step from a point ``p``
below the root, ``p + f(p) / #{x_i > p}``, stays below the root (the tangent of a
convex function lies below it), so Newton from a lower bound (Michelot's algorithm)
climbs monotonically and stops at the root as soon as the support ``{x_i > t}`` no
longer changes: at most ``n`` steps, a handful in practice. Each step is cheap on
CPU: counts are sums of ``sign(max(x - t, 0))`` in the row's float dtype (boolean
reductions are slow on CPU), and all full-size work reuses one buffer. Large inputs
with long rows (from ``_PRUNE_ENTRIES`` entries; below, the pruning's own operators
cost more than the passes it saves) are pruned first: split each row into ``_GROUP``
interleaved stripes and take the
elementwise max over stripes, ``m_j = max_s x[s * k + j]``. Every group contributes
at least ``max(m_j - t, 0)`` to ``f(t) + c``, so the root of the coarse problem on
``m`` (solved recursively) is a lower bound of ``tau``; groups whose max is below it
never enter the support, and the rest are gathered into a small dense matrix on
which Newton finishes.

Note [Box threshold by sorted breakpoints]
With sorted entries ``s`` and prefix sums ``P`` (``P_k`` the sum of the ``k``
smallest), ``h(t) = l K_l + u K_u + (P_{n - K_u} - P_{K_l}) - t (n - K_l - K_u)`` with
``K_l = #{x_i <= t + l}`` and ``K_u = #{x_i >= t + u}``, both found by binary search.
``h`` is evaluated at all ``2n`` breakpoints ``x_i - u`` and ``x_i - l``; the root lies
between the largest breakpoint with ``h >= c`` and the smallest with ``h < c`` (a max
and a min: the breakpoints need no sorting), where the classification is constant;
``tau`` follows from that classification in closed form.

Note [The search as an opaque operator under compile]
Traced by dynamo, a search can only be the sort (loop counts would be baked into
the graph), which costs many times Newton's method on long rows: a sparsemax
``Linear(1024, 1024)`` trained compiled was slower than eager. Registered with
``torch.library.custom_op`` and a fake kernel (a float64 ``tau`` of shape
``(..., 1)``), the search is opaque to compile: the graph calls it, and at run time
it is plain eager code that picks its search by device and size. ``tau`` needs no
derivative (the autograd node differentiates through the free set), so the operator
registers no autograd rule. It is not used under ``torch.export`` (an exported
program would then need sumto to load) or ``torch.func`` transforms (it has no
batching rule), nor with per-entry bounds (which have a single search).

Note [Box threshold with per-entry bounds]
With bounds ``l_i <= u_i`` per entry, entry ``i`` is at its upper bound for
``t < a_i = x_i - u_i`` and at its lower bound for ``t >= b_i = x_i - l_i``, so
``U(t) = {a_i > t}`` and ``L(t) = {b_i <= t}`` are disjoint (``a_i <= b_i``; an entry with
``l_i = u_i`` is in one of them for every ``t``). Sorting ``a`` (carrying ``u`` and ``x``)
and ``b`` (carrying ``l`` and ``x``) gives ``|U|``, ``|L|`` and their sums of bounds and
entries at any ``t`` by binary search and prefix sums, hence
``h(t) = sum_L l + sum_U u + sum_F x - t |F|``. Bounds enter only through the entries
at them, so a huge bound (an infinite one replaced by the largest value the set
allows) never cancels against the rest. The root is then found as with scalar
bounds: the last breakpoint with ``h >= c``, and ``tau`` in closed form from the
classification inside the next piece. This search serves every device and size: a
Newton search for per-entry bounds has not shown the speed that would earn a second path.

Note [Box threshold by Newton's method]
``h`` has slope ``-#free(t)``; Newton's step ``t + (h(t) - c) / #free(t)`` lands on the
root when ``t`` lies on the root's linear piece. Far from the root it does not help
where few entries are free (a narrow box: ``h`` is then close to a staircase, whose
local slope says little about where the root is), and a step that also counts the
entries at each bound costs three times the passes of one that only sums. So the
search first takes value-only steps of regula falsi with the Illinois rule inside a
bracket ``[lo, hi]`` with ``h(lo) >= c > h(hi)`` (from ``[min(x) - u, max(x) - l]``,
starting at the affine projection's shift, the root whenever every entry stays
free). A row stops them once ``|h(t) - c| <= (u - l) / 4``: breakpoints near the root
lie about ``(u - l) / (2 #free)`` apart and the root about ``|h(t) - c| / #free`` away,
so fewer than one breakpoint is then expected between ``t`` and the root, whatever
``#free`` is. Newton's steps follow, in the same bracket; a step that leaves it (and
every eighth step, which bisects) is replaced by the bracket's interpolation point.
A row is finished when a Newton step reached a point whose classification (the
counts at each bound, which move monotonically in ``t``, so equal counts mean equal
sets) equals the one it started from: ``tau`` is then Newton's step from it, exact up
to rounding. The value steps only choose where Newton starts, so the result is the
same with any number of them. Counts are sums of signs in the row's dtype; finished
rows are dropped once they are half of the working set.

Note [Box search in row blocks]
Each step of the box search makes several passes over the rows and a work buffer of
their size. Run on the whole input at once, the two no longer fit in the cache
when it holds more than a few MiB, and every pass then goes to memory; run on row
blocks of about ``_BLOCK_BYTES`` each (the search is per row), they stay in cache.
Blocks cost a few small operations per step each, which long blocks amortise.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Literal

import torch
from torch import Tensor

from sumto._compat import compiling_opaque, eager, wide_dtype

__all__: list[str] = []

Search = Literal["sort", "newton"]
Bound = float | Tensor

# Inputs of at least this many entries take the Newton searches on eager CPU: below
# it the sort (few operations) is fastest, above it the sort's O(n log n) work is.
_LARGE = 1 << 15
_LARGE_BOX = 1 << 14
# Stripe count of the coarse simplex problem; rows shorter than _MIN_PRUNE, and inputs
# of fewer than _PRUNE_ENTRIES entries, are not pruned.
_GROUP = 16
_MIN_PRUNE = 256
_PRUNE_ENTRIES = 1 << 19
# Rows still running after this many Newton steps (adversarial inputs) finish by sorting.
_MAX_STEPS = 64
# Value-only steps of the box search before its Newton steps (Note [Box threshold by Newton's method]).
_VALUE_STEPS = 12
# The box search runs on row blocks of about this many bytes (Note [Box search in row blocks]).
_BLOCK_BYTES = 1 << 22

_forced: Search | None = None


@contextlib.contextmanager
def forced(search: Search | None) -> Iterator[None]:
    """Run every search of the block with ``search`` (a test and benchmark hook).

    ``"newton"`` applies on eager CPU only; elsewhere the searches sort, as the
    automatic choice does.
    """
    global _forced
    before, _forced = _forced, search
    try:
        yield
    finally:
        _forced = before


def threshold(x: Tensor, total: Tensor | float, lower: Bound, upper: Bound) -> Tensor:
    """``tau`` of shape ``(..., 1)`` such that ``clamp(x - tau, lower, upper)`` sums to ``total``.

    Dispatches to :func:`one_sided` (``upper = inf``; ``lower = -inf`` by the mirror
    ``min(x - t, u) = -max(-x + t, -u)``) or :func:`box` (both bounds finite, floats
    or per-entry tensors broadcastable to ``x``). The
    sort-based searches return ``tau`` in the wide dtype (float64): rounded to a
    float32 ``x``'s dtype, a ``tau`` on the edge of a flat piece of ``h`` (every entry
    on a bound) could move an entry across its bound; the assembly subtracts it in
    two parts instead (Note [Shift in two parts] of ``sumto._autograd``).
    """
    if isinstance(lower, Tensor) or isinstance(upper, Tensor):
        return box(x, total, lower, upper)
    if compiling_opaque(x):  # Note [The search as an opaque operator under compile]
        column = total if isinstance(total, Tensor) else None
        scalar = 0.0 if isinstance(total, Tensor) else float(total)
        tau: Tensor = _threshold_op(x.detach(), column, scalar, lower, upper)
        return tau
    return _threshold(x, total, lower, upper)


def _threshold(x: Tensor, total: Tensor | float, lower: float, upper: float) -> Tensor:
    """:func:`threshold` with float bounds, in eager code."""
    if math.isinf(lower):
        return -one_sided(-x, -total, -upper)
    if math.isinf(upper):
        return one_sided(x, total, lower)
    return box(x, total, lower, upper)


@torch.library.custom_op("sumto::threshold", mutates_args=())
def _threshold_op(
    x: Tensor, total: Tensor | None, total_value: float, lower: float, upper: float
) -> Tensor:
    """:func:`threshold` as an operator: ``tau`` in the wide dtype (``total`` or ``total_value``)."""
    tau = _threshold(x, total if total is not None else total_value, lower, upper)
    return tau.to(wide_dtype(x.device))


@_threshold_op.register_fake
def _(x: Tensor, total: Tensor | None, total_value: float, lower: float, upper: float) -> Tensor:
    return x.new_empty((*x.shape[:-1], 1), dtype=wide_dtype(x.device))


def one_sided(x: Tensor, total: Tensor | float, lower: float) -> Tensor:
    """``tau`` of shape ``(..., 1)`` such that ``max(x - tau, lower)`` sums to ``total``.

    Args:
        x: Rows ``(..., n)``, float32 or float64, finite or ``-inf``.
        total: Float or tensor of shape ``(..., 1)``, ``total >= n * lower``.
        lower: Finite lower bound.

    Returns:
        ``tau`` in ``x``'s dtype or, from the sort, in the wide dtype (see
        :func:`threshold`), from the exact classification of every entry:
        ``(sum_F x - total + (n - |F|) lower) / |F|`` over the free entries ``F``,
        so its rounding is that of the output's entries, not of ``lower``.
    """
    with torch.no_grad():
        x = x.detach()
        if _use_newton(x):
            excess = total - x.shape[-1] * lower if lower != 0.0 else total
            tau = _simplex_newton_rows(x, excess)
            if lower == 0.0:
                return tau  # Newton's last step already solves the classification
            return _one_sided_polish(x, total, lower, tau - lower)
        # -inf entries sort last and only ever meet other -inf entries: no clamp needed
        return _one_sided_sort(x.to(wide_dtype(x.device)), _wide(total, x), lower)


def box(x: Tensor, total: Tensor | float, lower: Bound, upper: Bound) -> Tensor:
    """``tau`` of shape ``(..., 1)`` such that ``clamp(x - tau, lower, upper)`` sums to ``total``.

    Args:
        x: Rows ``(..., n)``, float32 or float64, without NaN.
        total: Float or tensor of shape ``(..., 1)``, ``sum(lower) <= total <= sum(upper)``.
        lower: Finite lower bound: a float, or a tensor of ``x``'s dtype broadcastable
            to ``x`` (one bound per entry).
        upper: Finite upper bound, ``upper >= lower``, likewise.

    Returns:
        ``tau`` as :func:`threshold` returns it; every entry is classified (at a bound
        or between) as in the exact solution, up to the rounding of the entries.
    """
    with torch.no_grad():
        x = x.detach()
        if isinstance(lower, Tensor) or isinstance(upper, Tensor):
            return _box_sort_entries(x, total, lower, upper)
        if _use_newton(x, _LARGE_BOX):
            return _box_newton_rows(x, total, lower, upper)
        return _box_sort(x, total, lower, upper)


def _use_newton(x: Tensor, large: int = _LARGE) -> bool:
    if _forced is not None:
        return _forced == "newton" and eager(x)
    return x.numel() >= large and eager(x)


def _one_sided_polish(x: Tensor, total: Tensor | float, lower: float, tau: Tensor) -> Tensor:
    """``tau`` recomputed from the classification at ``tau`` (float sign arithmetic, no bools)."""
    n = x.shape[-1]
    free = torch.sub(x, tau + lower).clamp_min_(0.0).sign_()
    count = free.sum(-1, keepdim=True)
    free_sum = free.mul_(x).sum(-1, keepdim=True)
    exact = (free_sum - total + (n - count) * lower) / count.clamp_min(1.0)
    return torch.where(count > 0, exact, tau)


def _wide(total: Tensor | float, x: Tensor) -> Tensor | float:
    return total.to(wide_dtype(x.device)) if isinstance(total, Tensor) else total


def _finite_wide(x: Tensor) -> Tensor:
    """``x`` in the wide dtype with infinities clamped to ``x``'s finite range.

    ``-inf`` entries then never enter the sums as ``inf - inf``.
    """
    big = torch.finfo(x.dtype).max
    return x.to(wide_dtype(x.device)).clamp(-big, big)


# ---------------------------------------------------------------------------
# sort-based searches (device-agnostic)
# ---------------------------------------------------------------------------


def _one_sided_sort(x: Tensor, c: Tensor | float, lower: float) -> Tensor:
    """Root of ``sum max(x - t, l) = c`` per row by sorting (Held et al. 1974, Duchi et al. 2008).

    With the ``k`` largest entries free, ``t_k = (css_k - c + (n - k) l) / k``; the
    free set is the largest ``k`` with ``u_k - t_k > l``.
    """
    n = x.shape[-1]
    u, _ = torch.sort(x, dim=-1, descending=True)
    k = torch.arange(1, n + 1, device=x.device, dtype=x.dtype)
    css = u.cumsum(-1) - c
    if lower != 0.0:
        css = css + (n - k) * lower
        u = u - lower
    rho = (u * k > css).sum(-1, keepdim=True).clamp_min(1)
    return css.gather(-1, rho - 1) / rho.to(x.dtype)


def _box_sort(x: Tensor, total: Tensor | float, lower: float, upper: float) -> Tensor:
    """Root of ``sum clamp(x - t, l, u) = c`` per row (Note [Box threshold by sorted breakpoints])."""
    xw = _finite_wide(x)
    c = _wide(total, x)
    n = x.shape[-1]
    s = torch.sort(xw, dim=-1)[0].contiguous()
    prefix = torch.cat([torch.zeros_like(s[..., :1]), s.cumsum(-1)], dim=-1)

    def classify(t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(K_l, K_u, sum of the free entries)`` at the points ``t``."""
        k_lower = torch.searchsorted(s, (t + lower).contiguous(), right=True)
        # disjoint even where t + lower and t + upper round to the same value
        first_upper = torch.searchsorted(s, (t + upper).contiguous(), right=False)
        k_upper = n - torch.maximum(first_upper, k_lower)
        free_sum = prefix.gather(-1, n - k_upper) - prefix.gather(-1, k_lower)
        return k_lower, k_upper, free_sum

    def fixed_mass(k_lower: Tensor, k_upper: Tensor) -> Tensor:
        return lower * k_lower.to(s.dtype) + upper * k_upper.to(s.dtype)

    breaks = torch.cat([s - upper, s - lower], dim=-1)
    k_lower, k_upper, free_sum = classify(breaks)
    free = (n - k_lower - k_upper).to(s.dtype)
    h = fixed_mass(k_lower, k_upper) + free_sum - breaks * free
    mid = _root_piece(breaks, h >= c)
    k_lower, k_upper, free_sum = classify(mid)
    count = (n - k_lower - k_upper).to(s.dtype)
    tau = (free_sum - (c - fixed_mass(k_lower, k_upper))) / count.clamp_min(1.0)
    # no free entry: every shift of the flat piece around mid gives the total
    return torch.where(count > 0, tau, mid)


def _root_piece(breaks: Tensor, above: Tensor) -> Tensor:
    """A point inside the linear piece of ``h`` that holds the root, per row.

    ``breaks`` are the breakpoints of ``h`` (any order) and ``above`` says where
    ``h >= c``. ``h`` is non-increasing, so the root lies between the largest
    breakpoint with ``h >= c`` (the smallest breakpoint if rounding left none, as when
    ``c`` is ``h``'s largest value) and the smallest one with ``h < c`` (beyond the
    largest breakpoint if none: ``h`` is flat there).
    """
    first = breaks.amin(-1, keepdim=True)
    left = torch.where(above, breaks, first).amax(-1, keepdim=True)
    right = torch.where(above, math.inf, breaks).amin(-1, keepdim=True)
    right = torch.where(right < math.inf, right, left + 1.0)
    return 0.5 * left + 0.5 * right


def _box_sort_entries(x: Tensor, total: Tensor | float, lower: Bound, upper: Bound) -> Tensor:
    """Root of ``sum clamp(x - t, l, u) = c`` per row, per-entry bounds.

    Note [Box threshold with per-entry bounds].
    """
    xw = _finite_wide(x)
    c = _wide(total, x)
    low = torch.as_tensor(lower, dtype=xw.dtype, device=xw.device).expand_as(xw)
    high = torch.as_tensor(upper, dtype=xw.dtype, device=xw.device).expand_as(xw)
    zero = torch.zeros_like(xw[..., :1])

    def ordered(breaks: Tensor, bound: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Sorted breakpoints and prefix sums (leading 0) of the bound and of ``x`` in their order."""
        s, order = torch.sort(breaks, dim=-1)
        bound_sums = torch.cat([zero, bound.gather(-1, order).cumsum(-1)], dim=-1)
        entry_sums = torch.cat([zero, xw.gather(-1, order).cumsum(-1)], dim=-1)
        return s.contiguous(), bound_sums, entry_sums

    a, upper_sums, x_by_a = ordered(xw - high, high)
    b, lower_sums, x_by_b = ordered(xw - low, low)
    x_sum = x_by_a[..., -1:]

    def h(t: Tensor) -> tuple[Tensor, Tensor]:
        """``(fixed mass + free sum - t |F|, |F|)`` at the points ``t``."""
        first_upper = torch.searchsorted(a, t.contiguous(), right=True)  # U = a[first_upper:]
        k_lower = torch.searchsorted(b, t.contiguous(), right=True)  # L = b[:k_lower]
        at_upper = upper_sums[..., -1:] - upper_sums.gather(-1, first_upper)
        at_lower = lower_sums.gather(-1, k_lower)
        free_sum = x_sum - (x_by_a[..., -1:] - x_by_a.gather(-1, first_upper))
        free_sum = free_sum - x_by_b.gather(-1, k_lower)
        count = (first_upper - k_lower).to(xw.dtype)
        return at_upper + at_lower + free_sum - t * count, count

    breaks = torch.cat([a, b], dim=-1)
    value, _ = h(breaks)
    mid = _root_piece(breaks, value >= c)
    value, count = h(mid)
    # h(mid) = fixed + free_sum - mid |F| and tau solves fixed + free_sum - tau |F| = c
    tau = mid + (value - c) / count.clamp_min(1.0)
    # no free entry: every shift of the flat piece around mid gives the total
    return torch.where(count > 0, tau, mid)


# ---------------------------------------------------------------------------
# Newton search with pruning (eager CPU): Note [Simplex threshold by Newton's method]
# ---------------------------------------------------------------------------


def _as_matrix(x: Tensor, total: Tensor | float) -> tuple[Tensor, Tensor | float]:
    """Rows ``(..., n)`` as a contiguous ``(R, n)`` matrix, a tensor total as an ``(R, 1)`` column."""
    matrix = x.reshape(-1, x.shape[-1]).contiguous()
    if isinstance(total, Tensor):
        total = total.to(x.dtype).expand(*x.shape[:-1], 1).reshape(-1, 1)
    return matrix, total


def _simplex_newton_rows(x: Tensor, c: Tensor | float) -> Tensor:
    return _simplex_pruned(*_as_matrix(x, c)).reshape(*x.shape[:-1], 1)


def _simplex_lower_bound(x: Tensor, c: Tensor | float) -> Tensor:
    """A lower bound of the root; 0 for an all ``-inf`` row (whose root is not finite)."""
    n = x.shape[1]
    top = x.amax(-1, keepdim=True) - c
    bound = torch.maximum((x.sum(-1, keepdim=True) - c) / n, top)
    return torch.where(bound > -math.inf, bound, 0.0)


def _simplex_pruned(x: Tensor, c: Tensor | float) -> Tensor:
    rows, n = x.shape
    if rows == 0 or n < _MIN_PRUNE or x.numel() < _PRUNE_ENTRIES:
        lo = _simplex_lower_bound(x, c) if rows > 0 else x.new_empty(0, 1)
        return _simplex_newton(x, c, lo)
    k = n // _GROUP
    head = x[:, : k * _GROUP].view(rows, _GROUP, k)
    tail = x[:, k * _GROUP :]
    group_max = head.amax(1)
    coarse = torch.cat([group_max, tail], 1) if tail.shape[1] > 0 else group_max
    # the coarse root is a lower bound of its own: no pass over x for another one
    lo = _simplex_pruned(coarse, c)
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


def _simplex_newton(x: Tensor, c: Tensor | float, lo: Tensor) -> Tensor:
    """Michelot/Newton steps from the lower bound ``lo`` until each row's support is stable.

    Finished rows are written out and, once they are at least half of the working
    set, dropped from it (a copy of the remaining rows, so not at every step). Rows
    still running after ``_MAX_STEPS`` steps finish by sorting.
    """
    tau = torch.empty_like(lo)
    work = torch.empty_like(x)
    ids = torch.arange(x.shape[0], device=x.device)  # working row -> output row
    t, previous = lo, None
    for _ in range(_MAX_STEPS):
        buffer = work[: x.shape[0]]
        torch.sub(x, t, out=buffer).clamp_min_(0.0)
        above = buffer.sum(-1, keepdim=True)
        count = buffer.sign_().sum(-1, keepdim=True)
        # count >= 1 below max(x); count = 0 only for a total of 0, where tau = max(x)
        step = torch.where(count > 0, torch.addcdiv(t, above - c, count.clamp_min(1.0)), t)
        done = ~(step > t)  # no progress; also stops rows with NaN entries
        if previous is not None:
            done |= count == previous
        finished = int(done.sum())
        if finished == x.shape[0]:
            tau[ids] = step
            return tau
        if 2 * finished >= x.shape[0]:
            tau[ids[done[:, 0]]] = step[done[:, 0]]
            keep = (~done[:, 0]).nonzero()[:, 0]
            ids, x, step, count = ids[keep], x[keep], step[keep], count[keep]
            c = c[keep] if isinstance(c, Tensor) else c
        # converged rows stay converged: at their root the step repeats the count
        t, previous = step, count
    tau[ids] = _one_sided_sort(_finite_wide(x), _wide(c, x), 0.0).to(x.dtype)
    return tau


# ---------------------------------------------------------------------------
# box: Newton's method with a bracket (eager CPU): Note [Box threshold by Newton's method]
# ---------------------------------------------------------------------------


def _box_newton_rows(x: Tensor, total: Tensor | float, lower: float, upper: float) -> Tensor:
    if x.numel() == 0:
        return x.new_empty(*x.shape[:-1], 1)
    matrix, c = _as_matrix(x, total)
    # Note [Box search in row blocks]
    step = max(1, _BLOCK_BYTES // (matrix.shape[1] * matrix.element_size()))
    work = torch.empty_like(matrix[:step])  # one buffer for every block
    taus = [
        _box_newton(
            matrix[i : i + step],
            c[i : i + step] if isinstance(c, Tensor) else c,
            lower,
            upper,
            work,
        )
        for i in range(0, matrix.shape[0], step)
    ]
    return torch.cat(taus).reshape(*x.shape[:-1], 1)


def _box_evaluate(
    x: Tensor, t: Tensor, lower: float, upper: float, work: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """``(h(t), #at upper, #at lower)`` per row, in ``x``'s dtype, in one work buffer.

    Counts come from sums of signs (boolean reductions are slow on CPU); an entry
    exactly on the upper bound counts one half, which only steers Newton's step.
    """
    n = x.shape[1]
    at_upper = (torch.sub(x, t + upper, out=work).sign_().sum(-1, keepdim=True) + n) * 0.5
    torch.sub(x, t, out=work).clamp_(lower, upper)
    value = work.sum(-1, keepdim=True)
    at_lower = n - work.sub_(lower).sign_().sum(-1, keepdim=True)
    return value, at_upper, at_lower


class _Bracket:
    """Per row: ``lo <= tau <= hi`` with ``f_lo = h(lo) - c >= 0 > f_hi = h(hi) - c``.

    Its interpolation point is regula falsi's with the Illinois rule: an end kept for
    a second step in a row has its ``f`` halved, so the kept end is not approached
    from one side only and the bracket shrinks superlinearly.
    """

    def __init__(self, lo: Tensor, hi: Tensor, f_lo: Tensor, f_hi: Tensor) -> None:
        self.lo, self.hi, self.f_lo, self.f_hi = lo, hi, f_lo, f_hi
        self.side = torch.zeros_like(lo)  # +1: lo moved last, -1: hi moved last

    def narrow(self, t: Tensor, excess: Tensor, moving: Tensor | None = None) -> None:
        """Replace the end on ``t``'s side by ``t``, where ``h(t) - c = excess``.

        Rows where ``moving`` is false are left as they are.
        """
        above = excess >= 0
        f_lo = torch.where(above, excess, torch.where(self.side < 0, 0.5 * self.f_lo, self.f_lo))
        f_hi = torch.where(above, torch.where(self.side > 0, 0.5 * self.f_hi, self.f_hi), excess)
        side = torch.where(above, 1.0, -1.0)
        lo = torch.where(above, t, self.lo)
        hi = torch.where(above, self.hi, t)
        if moving is not None:
            f_lo, f_hi = torch.where(moving, f_lo, self.f_lo), torch.where(moving, f_hi, self.f_hi)
            side = torch.where(moving, side, self.side)
            lo, hi = torch.where(moving, lo, self.lo), torch.where(moving, hi, self.hi)
        self.lo, self.hi, self.f_lo, self.f_hi, self.side = lo, hi, f_lo, f_hi, side

    def interpolate(self, bisect: bool = False) -> Tensor:
        """Regula falsi's point inside the bracket, or its midpoint (``bisect`` or degenerate)."""
        mid = 0.5 * self.lo + 0.5 * self.hi
        if bisect:
            return mid
        falsi = (self.lo * self.f_hi - self.hi * self.f_lo) / (self.f_hi - self.f_lo)
        return torch.where((falsi > self.lo) & (falsi < self.hi), falsi, mid)

    def keep(self, index: Tensor) -> None:
        self.lo, self.hi = self.lo[index], self.hi[index]
        self.f_lo, self.f_hi, self.side = self.f_lo[index], self.f_hi[index], self.side[index]


def _box_newton(x: Tensor, c: Tensor | float, lower: float, upper: float, work: Tensor) -> Tensor:
    """Regula falsi on values, then safeguarded Newton until each row's classification is stable.

    ``work`` is a buffer of at least ``x``'s rows.
    """
    rows, n = x.shape
    lo = x.amin(-1, keepdim=True) - upper  # h(lo) = n * upper >= c
    hi = x.amax(-1, keepdim=True) - lower  # h(hi) = n * lower <= c
    bracket = _Bracket(
        lo, hi, n * upper - c + torch.zeros_like(lo), n * lower - c + torch.zeros_like(hi)
    )
    # the affine projection's shift: the root whenever every entry stays free
    t = torch.minimum(torch.maximum((x.sum(-1, keepdim=True) - c) / n, lo), hi)
    work = work[:rows]
    near = 0.25 * (upper - lower)
    moving = torch.ones_like(t, dtype=torch.bool)
    for _ in range(_VALUE_STEPS):
        excess = torch.sub(x, t, out=work).clamp_(lower, upper).sum(-1, keepdim=True) - c
        bracket.narrow(t, excess, moving)
        moving &= excess.abs() > near
        if not bool(moving.any()):
            break
        t = torch.where(moving, bracket.interpolate(), t)
    tau = torch.empty_like(t)
    ids = torch.arange(rows, device=x.device)  # working row -> output row
    settled = torch.zeros_like(t, dtype=torch.bool)
    previous: tuple[Tensor, Tensor] | None = None
    newton_before = torch.zeros_like(settled)
    for step in range(_MAX_STEPS):
        value, at_upper, at_lower = _box_evaluate(x, t, lower, upper, work[: x.shape[0]])
        excess = value - c
        free = n - at_upper - at_lower
        bracket.narrow(t, excess)
        lo, hi = bracket.lo, bracket.hi
        newton = t + excess / free.clamp_min(1.0)
        # t's classification gives the root when Newton reached t from a point of the
        # same classification, or when its step (through free entries) stalls
        # at a bracket of adjacent floats the root's classification lies between its
        # ends: lo (h(lo) >= c) keeps the entries that are free there free, and the
        # assembly's sum refinement distributes the rest
        adjacent = ~(torch.nextafter(lo, hi) < hi)
        done = (excess == 0) | ((newton == t) & (free > 0)) | adjacent
        if previous is not None:
            done |= newton_before & (at_upper == previous[0]) & (at_lower == previous[1])
        done &= ~settled
        if bool(done.any()):
            result = torch.where(adjacent, lo, torch.where(free > 0, newton, t))
            tau[ids[done[:, 0]]] = result[done[:, 0]]
            settled |= done
        finished = int(settled.sum())
        if finished == x.shape[0]:
            return tau
        # every eighth step bisects, so that the bracket halves whatever else happens
        bisect = step % 8 == 7
        use_newton = (free > 0) & (newton > lo) & (newton < hi) & (not bisect)
        # settled rows stay where they are
        t = torch.where(settled, t, torch.where(use_newton, newton, bracket.interpolate(bisect)))
        previous, newton_before = (at_upper, at_lower), use_newton
        if 2 * finished >= x.shape[0]:
            keep = (~settled[:, 0]).nonzero()[:, 0]
            ids, x, t = ids[keep], x[keep], t[keep]
            bracket.keep(keep)
            previous = (at_upper[keep], at_lower[keep])
            newton_before, settled = newton_before[keep], settled[keep]
            c = c[keep] if isinstance(c, Tensor) else c
    tau[ids] = _box_sort(x, c, lower, upper).to(x.dtype)
    return tau

"""Constraint classes: one ``nn.Module`` parametrization per constrained set.

Each class holds configuration only; the maths lives in :mod:`sumto.functional`.
They plug into :func:`torch.nn.utils.parametrize.register_parametrization`, but the
helpers in :mod:`sumto.register` (``sum_to``, ``simplex``, ``box_sum``) are the
recommended entry point: they validate the tensor, initialise it exactly and make
plain checkpoints loadable.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from sumto import _checks
from sumto import functional as F
from sumto._compat import registering_by_torch, wide_dtype
from sumto.functional import Dim, Total

__all__ = ["AffineSum", "BoxSum", "Constraint", "Simplex"]

SimplexMethod = F.SimplexMethod
_SIMPLEX_METHODS = F.SIMPLEX_METHODS
RELU_EPS = F.RELU_EPS
# Format tag of a constraint's saved configuration ({"format", "class", "config"}).
EXTRA_STATE_FORMAT = "sumto.constraint/1"
# Key, in the state_dict metadata of the module owning a constrained tensor, of the
# saved configurations: {"parametrizations.<name>.<index>": {"format", "class", "config"}}.
# See Note [Constraint configuration in state_dict metadata].
CONFIG_METADATA_KEY = "sumto.constraints"
# A constraint's state_dict prefix inside a parametrization: "<owner prefix>parametrizations.<name>.<i>."
_IN_PARAMETRIZATION = re.compile(
    r"(?P<owner>(?:.*\.)?)(?P<rel>parametrizations\.[^.]+\.\d+)\.", re.DOTALL
)


def default_dims(ndim: int) -> tuple[int, ...]:
    """One sum per output unit: dims 1..ndim-1 for 2+ dims, dim 0 for 1-D (and 0-D) tensors."""
    return tuple(range(1, ndim)) if ndim >= 2 else (0,)


def _short(value: Any, limit: int = 200) -> str:
    """``repr(value)``, cut to ``limit`` characters (a saved ``A`` can be large)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _has_values(total: Tensor | float) -> bool:
    """False for a meta tensor total, whose values are checked when loaded."""
    return not (isinstance(total, Tensor) and total.is_meta)


def _save_config_hook(
    module: Constraint, state_dict: Any, prefix: str, local_metadata: Any
) -> None:
    """Write the configuration into the owning module's state_dict metadata.

    See Note [Constraint configuration in state_dict metadata]. A constraint that is
    not a parametrization (a submodule of its own) saves none: no pre-weights depend on it.
    """
    metadata = getattr(state_dict, "_metadata", None)
    match = _IN_PARAMETRIZATION.fullmatch(prefix)
    if not isinstance(metadata, dict) or match is None:
        return
    owner = metadata.get(match["owner"][:-1])
    if isinstance(owner, dict):
        owner.setdefault(CONFIG_METADATA_KEY, {})[match["rel"]] = module._saved_config()


def _load_entries_hook(
    module: Constraint,
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: Any,
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    """Validate the constraint's own checkpoint entries and drop a legacy ``_extra_state``.

    For a constraint registered with the sumto helpers, the owning module's hook has
    already checked everything before any tensor was copied; this one covers
    constraints loaded on their own or registered by other means.
    """
    legacy = state_dict.pop(prefix + "_extra_state", None)
    names = module._state_names()
    tensors = {n: state_dict[prefix + n] for n in names if prefix + n in state_dict}
    module._check_checkpoint(legacy, tensors, prefix[:-1])


def _accumulate_dtype(x: Tensor) -> torch.dtype:
    """Dtype used to *check* membership: float64 where the device supports it."""
    return wide_dtype(x.device)


class Constraint(nn.Module):
    """Base class of sumto constraints (use it for ``isinstance`` checks).

    A constraint maps unconstrained tensors onto its set (``forward``), inverts that
    map on the set (``right_inverse``), projects onto the set (``project``) and
    measures how far a tensor is from it (``violation``). Subclasses implement
    ``forward``, ``project``, ``violation``, ``_inverse`` and ``_bind_shape``.
    ``sample`` draws random points of the set (a subclass may override ``_sample``,
    whose default projects a Gaussian) and ``contains`` tests membership.

    Args:
        dim: Dim or tuple of dims each constraint slice spans; ``None`` means one
            slice per output unit (dims ``1..ndim-1``, or dim 0 for 1-D tensors).
    """

    def __init__(self, dim: Dim | None = None) -> None:
        super().__init__()
        self.dim: tuple[int, ...] | None = None if dim is None else F._check_dim_spec(dim)
        # Shape and dtype of the constrained tensor, recorded by the register helpers
        # so that assignments of a wrong shape fail instead of breaking later.
        self._shape: tuple[int, ...] | None = None
        self._dtype: torch.dtype | None = None
        # Device of the constrained tensor (the default device of ``sample``).
        self._device: torch.device | None = None
        # Note [Constraint configuration in state_dict metadata]
        self._register_state_dict_hook(_save_config_hook)  # type: ignore[no-untyped-call]
        self.register_load_state_dict_pre_hook(_load_entries_hook)  # type: ignore[no-untyped-call]

    # -- dims ---------------------------------------------------------------
    def dims(self, ndim: int) -> tuple[int, ...]:
        """The normalised dims constrained for a tensor with ``ndim`` dims.

        Raises:
            IndexError: If a configured dim is out of range for ``ndim``.
        """
        if self.dim is None:
            return default_dims(ndim)
        return F._normalize_dims(self.dim, ndim)

    # -- interface for subclasses -------------------------------------------
    def project(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        """Euclidean projection of ``x`` onto the set."""
        raise NotImplementedError

    def violation(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        """Largest deviation of ``x`` from the set (0-d tensor, 0 on the set)."""
        raise NotImplementedError

    def _inverse(self, value: Tensor) -> Tensor:  # pragma: no cover - abstract
        """Pre-weights whose ``forward`` is ``value`` (``value`` is on the set)."""
        raise NotImplementedError

    def _magnitude(self, x: Tensor) -> Tensor:
        """Largest slice magnitude sum|x| + |total|, the scale of rounding errors."""
        dims = self.dims(x.ndim)
        xa = x.detach().to(_accumulate_dtype(x)).abs()
        mag = xa.sum(dims, keepdim=True) if x.ndim > 0 else xa
        total = self._total_value(xa, dims)
        mag = mag + (total.abs() if isinstance(total, Tensor) else abs(total))
        return F._max_or_zero(mag)

    def _total_value(self, like: Tensor, dims: tuple[int, ...]) -> Tensor | float:
        return 0.0

    def _bind_shape(self, shape: tuple[int, ...]) -> None:
        """Validate the configuration against a tensor shape (IndexError/ValueError)."""
        self.dims(len(shape))

    @classmethod
    def _saved_kwargs(cls, kwargs: dict[str, Any], tensors: Mapping[str, Any]) -> dict[str, Any]:
        """Constructor arguments from a saved configuration and the checkpoint's tensors.

        ``kwargs`` is the configuration with its ``"tensor"`` values replaced by the
        tensors of those names; a subclass whose configuration names values held
        elsewhere in the state_dict (a learned parameter) fills them in here.
        """
        return kwargs

    def _config(self) -> dict[str, Any]:
        """Plain-Python configuration, saved in the state_dict metadata of the owning module."""
        return {"dim": None if self.dim is None else list(self.dim)}

    # -- checkpoints ----------------------------------------------------------
    # Note [Constraint configuration in state_dict metadata]
    # The configuration is saved beside the pre-weights (it lets ``sumto inspect``
    # rebuild a constraint from a state_dict, and refuses pre-weights loaded into a
    # differently configured constraint, whose meaning would silently change). It is
    # not a state_dict *entry* (torch's extra state): averaging code treats every entry
    # as a tensor (``for e, m in zip(ema_sd.values(), sd.values()): e.copy_(...)``, timm's
    # ModelEmaV2, ``{k: v.to(...)}``, safetensors) and fails on a dict. It lives in the
    # state_dict's ``_metadata``, the per-module dicts that ``state_dict()`` fills
    # (``version``) and ``load_state_dict`` hands to each module as ``local_metadata``:
    # plain Python data that survives ``torch.save``/``torch.load(weights_only=True)``,
    # ``copy.deepcopy`` and torch's prefix helpers. It is written into the entry of the
    # module that *owns* the constrained tensor, under CONFIG_METADATA_KEY, because
    # that module's load pre-hook runs before any of its tensors is copied and sees
    # only its own entry (the constraint is visited after the pre-weights). A state_dict
    # rebuilt as a plain dict has no ``_metadata``: it loads without the configuration
    # check, its tensor entries (totals) are still validated. Checkpoints of earlier
    # versions hold the same dicts as ``<...>.<index>._extra_state`` entries, which the
    # load hooks read and remove.

    def _saved_config(self) -> dict[str, Any]:
        """The configuration saved in state_dicts (plain Python, ``weights_only``-loadable)."""
        return {
            "format": EXTRA_STATE_FORMAT,
            "class": type(self).__name__,
            "config": self._config(),
        }

    def _state_names(self) -> list[str]:
        """Names of this constraint's own state_dict tensors (e.g. a tensor ``total``)."""
        names = [n for n, p in self._parameters.items() if p is not None]
        persistent = [
            n
            for n, b in self._buffers.items()
            if b is not None and n not in self._non_persistent_buffers_set
        ]
        return names + persistent

    def _check_checkpoint(self, saved: Any, tensors: Mapping[str, Any], where: str) -> None:
        """Validate what a checkpoint holds for this constraint; nothing is changed.

        The saved configuration must equal this one (only the checkpoint's tensors are
        loaded; configuration values are compared, so an invalid one such as a NaN
        total never matches). The checkpoint's tensors (a per-slice total) are checked
        as the constructor and registration check them, by building this constraint
        with them.

        Args:
            saved: The saved ``{"format", "class", "config"}``, or ``None`` when the
                checkpoint has none (then only its tensors are checked).
            tensors: The checkpoint's entries for this constraint's own tensors, by name.
            where: The constraint's state_dict prefix, to name it in messages.

        Raises:
            ValueError: If the saved class or configuration differs from this one, or a
                tensor is one the constructor refuses (non-finite, a simplex total
                <= 0, the wrong shape, an empty box, ...).
        """
        where = where or type(self).__name__
        if saved is not None:
            if not isinstance(saved, Mapping) or saved.get("format") != EXTRA_STATE_FORMAT:
                raise ValueError(
                    f"expected sumto constraint state {self._saved_config()} for {where!r}, "
                    f"got {_short(saved)}"
                )
            saved_class, config = saved.get("class"), saved.get("config")
            if saved_class != type(self).__name__ or config != self._config():
                raise ValueError(
                    f"expected a checkpoint saved with {type(self).__name__} "
                    f"{_short(self._config())}, got {saved_class} {_short(config)} for "
                    f"{where!r}: the pre-weights would change meaning; load into a model "
                    "built with the checkpoint's constraint"
                )
        for key, value in tensors.items():
            own = getattr(self, key)
            if not isinstance(value, Tensor):
                raise ValueError(
                    f"expected checkpoint entry {f'{where}.{key}'!r} to be a tensor, "
                    f"got {type(value).__name__}"
                )
            if tuple(value.shape) != tuple(own.shape):
                raise ValueError(
                    f"expected checkpoint entry {f'{where}.{key}'!r} of shape "
                    f"{tuple(own.shape)}, got shape {tuple(value.shape)}"
                )
        if tensors:
            self._check_rebuilt(tensors, where)

    def _check_rebuilt(self, tensors: Mapping[str, Tensor], where: str) -> None:
        """Build this constraint with the checkpoint's tensors: the constructor checks them.

        The class built is the nearest sumto class with its own constructor; a subclass
        with a configuration of its own is not rebuilt.
        """
        mro = type(self).__mro__
        config_owner = next(c for c in mro if "_config" in c.__dict__)
        cls: type[Constraint] | None = None
        for c in mro:
            own_init = "__init__" in c.__dict__
            if issubclass(c, Constraint) and c.__module__.startswith("sumto.") and own_init:
                cls = c
                break
        if cls is None or not issubclass(cls, config_owner):
            return
        kwargs: dict[str, Any] = {}
        for key, value in self._config().items():
            if isinstance(value, str) and value == "tensor":  # saved as a tensor entry
                value = tensors.get(key, self._buffers.get(key))
            elif key == "dim" and isinstance(value, list):
                value = tuple(value)
            kwargs[key] = value
        try:
            fresh = cls(**cls._saved_kwargs(kwargs, {**self._parameters, **tensors}))
            if self._shape is not None and self._dtype is not None:
                fresh._bind(torch.empty(self._shape, dtype=self._dtype, device="meta"))
        except (TypeError, ValueError, IndexError) as exc:
            names = ", ".join(repr(f"{where}.{key}") for key in tensors)
            raise ValueError(f"expected valid checkpoint entries {names}, got: {exc}") from exc

    # -- shared machinery ---------------------------------------------------
    def tolerance(self, x: Tensor) -> float:
        """Violation accepted as rounding error for ``x``'s dtype and magnitude.

        ``(4 + log2(n)) * eps(dtype) * max over slices of (sum|x| + |total|)``, the size
        of the rounding error of a pairwise sum of ``n`` entries.

        Raises:
            TypeError: If ``x`` is not a floating point tensor.
        """
        F._check_float_tensor(x)
        dims = self.dims(x.ndim)
        n = F._reduced_size(x.shape, dims)
        eps = torch.finfo(x.dtype).eps
        return float((4.0 + math.log2(max(n, 1))) * eps * self._magnitude(x))

    def _check_input(self, x: Tensor, registered_shape: bool = True) -> None:
        """Raise unless ``x`` is a floating point tensor the map can take.

        With ``registered_shape`` (``forward``), a registered constraint also requires
        the registered shape. Any other shape (an unregistered constraint, or
        ``project`` of another tensor) must have non-empty slices and fit the
        configuration (:meth:`_bind_shape`). For the registered shape only static
        metadata is read: no device sync, no graph break.

        # Note [Sharded views]
        FSDP1 with ``use_orig_params=True`` exposes, outside forward, a 1-D slice of
        its flat shard as the pre-weights; a sum over it looks right and is wrong.

        Raises:
            TypeError: If ``x`` is not a floating point tensor.
            IndexError: If a configured dim is out of range for ``x``.
            ValueError: If the shape is not the registered one, or a slice is empty.
        """
        F._check_float_tensor(x)
        shape = tuple(x.shape)
        if self._shape is not None and shape == self._shape:
            return  # validated at registration
        if registered_shape and self._shape is not None:
            raise ValueError(
                f"expected the constrained tensor to have its registered shape {self._shape}, "
                f"got shape {tuple(x.shape)}: a sharded view (FSDP1 exposes flat shards outside "
                "forward) cannot be constrained; read it inside forward or under "
                "FullyShardedDataParallel.summon_full_params"
            )
        if len(shape) > 0 and F._reduced_size(shape, self.dims(len(shape))) == 0:
            raise ValueError(
                f"expected at least one element in each constrained slice of x "
                f"(dim={self.dim}), got shape {shape}"
            )
        self._bind_shape(shape)  # the configuration against this shape (totals, sizes)

    def _bind(self, tensor: Tensor) -> None:
        """Record and validate the shape and dtype of the tensor being constrained."""
        F._check_float_tensor(tensor, "the constrained tensor")
        shape = tuple(tensor.shape)
        if len(shape) > 0 and F._reduced_size(shape, self.dims(len(shape))) == 0:
            raise ValueError(
                f"expected at least one element in each constrained slice, got shape {shape}"
            )
        with torch.device("cpu"):  # host-side checks, also under a meta default device
            self._bind_shape(shape)
        self._shape = shape
        self._dtype = tensor.dtype
        self._device = tensor.device

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> Constraint:
        """Convert buffers that define the set to wider dtypes only, never to narrower ones.

        # Note [Set-defining buffers never lose precision]
        ``model.to(torch.bfloat16)`` or ``model.half()`` would round a tensor total or
        a projection basis: the set itself would change, and stay changed after
        ``.float()``. Such buffers take the device of ``fn``'s result and the wider of
        their dtype and its dtype. The recorded dtype follows the pre-weights (``fn``
        converts them), so that assignments after ``.to(dtype)`` keep working.
        """
        buffers = {id(b) for b in self._buffers.values() if b is not None}

        def widen_only(t: Tensor) -> Tensor:
            if id(t) in buffers and t.is_floating_point():
                target = fn(t.new_empty(0))
                dtype = torch.promote_types(t.dtype, target.dtype)
                if t.is_meta and not target.is_meta:  # to_empty: no values to keep, loaded later
                    return torch.empty(t.shape, dtype=dtype, device=target.device)
                return t.to(device=target.device, dtype=dtype)
            return fn(t)

        if self._dtype is not None:
            self._dtype = fn(torch.empty(0, dtype=self._dtype)).dtype
        if self._device is not None:
            self._device = fn(torch.empty(0, dtype=self._dtype, device=self._device)).device
        return super()._apply(widen_only, recurse)  # type: ignore[no-any-return,no-untyped-call]

    def check_member(self, value: Tensor, what: str = "value") -> None:
        """Raise ValueError unless ``value`` has the bound shape and lies on the set.

        Args:
            value: Tensor to check.
            what: How to name ``value`` in the error message.

        Raises:
            TypeError: If ``value`` is not a floating point tensor.
            ValueError: If the shape differs from the constrained tensor's, the
                value is not finite, or it violates the constraint beyond
                :meth:`tolerance`.
        """
        F._check_float_tensor(value, what)
        if self._shape is not None and tuple(value.shape) != self._shape:
            raise ValueError(
                f"expected {what} of shape {self._shape}, got shape {tuple(value.shape)}"
            )
        if value.is_meta:
            return  # no values (a model built on the meta device): checked when loaded
        if value.numel() > 0 and not bool(torch.isfinite(value).all()):
            raise ValueError(f"expected a finite {what}, got non-finite entries")
        v = float(self.violation(value.detach()))
        tol = self.tolerance(value)
        if not v <= tol:
            raise ValueError(
                f"expected {what} to satisfy {self.__class__.__name__}({self.extra_repr()}) "
                f"within tolerance {tol:.3g}, got a violation of {v:.3g}"
            )

    def right_inverse(self, value: Tensor, what: str = "value") -> Tensor:
        """Pre-weights whose constrained value is ``value``; ValueError if off the set."""
        if self._shape is not None and not value.is_meta and registering_by_torch():
            # Note [Registration by torch utilities]
            # torch's transfer_parametrizations_and_params (and so prepare_qat) registers
            # a registered constraint again, on the target module's own tensor, then
            # replaces the target's pre-weights with the source's: that tensor's value
            # is discarded, so it is projected (as init="project", non-finite entries
            # read as 0) instead of refused. Assignments still require a value on the set.
            with torch.no_grad():
                value = torch.where(torch.isfinite(value), value, 0.0)
                if not float(self.violation(value)) <= self.tolerance(value):
                    value = self.project(value)
        self.check_member(value, what)
        if self._dtype is not None:
            value = value.to(self._dtype)
        return self._inverse(value)

    # -- random points and membership -------------------------------------------
    def sample(
        self,
        shape: Sequence[int] | int | None = None,
        *,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        r"""A random tensor on the set, e.g. to initialise a constrained weight.

        Every slice over the constrained dims is drawn independently:

        * :class:`Simplex` (every ``method``): uniform on the simplex, i.e.
          :math:`c\,\mathrm{Dirichlet}(1, \dots, 1)`, drawn as normalised exponentials
          :math:`c\,E_i / \sum_j E_j`, :math:`E_i = -\log U_i`. The draw has exact zeros
          with probability ~0 only (an underflow when rounding to ``dtype``), so softmax,
          which never reaches 0, maps its pre-weights back to it within rounding; a
          point with exact zeros is accepted too (its zeros come back eps-sized).
        * :class:`AffineSum` and :class:`sumto.LinearEquality`: standard Gaussian
          entries mapped onto the set by :meth:`project` (a Gaussian on the affine set,
          centred at its point nearest the origin).
        * :class:`BoxSum`: each entry drawn in its interval (uniform between two finite
          bounds, ``lower + E`` or ``upper - E`` with ``E`` ~ Exp(1) for one finite
          bound, standard Gaussian for none), then the slice mapped onto the sum by
          :meth:`project`. On the set, but *not* uniform on it: the projection puts
          positive mass on the faces where entries sit on a bound.
        * :class:`sumto.Transport`: per matrix, Sinkhorn's scaling of ``exp(Z)`` for
          standard normal ``Z``, rounded onto the set: an interior point spread around
          the centre of the polytope, not uniform on it.

        The draw is computed in float64 (float32 on MPS) and rounded to ``dtype``,
        then, for the projected draws, projected in ``dtype`` as :meth:`forward` does:
        the result passes :meth:`contains`, assignment, registration and checkpoint
        loading. The same ``generator`` state gives the same tensor.

        Args:
            shape: Shape of the tensor (an int means a 1-D tensor); ``None`` means the
                registered shape (the shape of the tensor the constraint was registered on).
            generator: Random number generator on ``device``; ``None`` uses torch's
                global one (like ``torch.rand``).
            dtype: Floating point dtype; ``None`` means the registered tensor's dtype,
                or ``torch.get_default_dtype()`` for an unregistered constraint.
            device: Device; ``None`` means the registered tensor's device, or torch's
                default device for an unregistered constraint.

        Returns:
            A tensor of ``shape``, ``dtype`` and ``device`` on the set (no gradient).

        Raises:
            TypeError: If ``shape``, ``dtype`` or ``generator`` has the wrong type.
            ValueError: If ``shape`` is ``None`` and no shape is registered, the set is
                empty or undefined for ``shape`` (an empty slice, a box too narrow for
                the total, slices without the ``n`` entries of ``A``), or ``generator``
                is on another device.
            IndexError: If a configured dim is out of range for ``shape``.

        Example:
            >>> import torch
            >>> from sumto import Simplex
            >>> c = Simplex(total=2.0)
            >>> w = c.sample((3, 4), generator=torch.Generator().manual_seed(0))
            >>> w.shape, bool((w >= 0).all()), c.contains(w)
            (torch.Size([3, 4]), True, True)
            >>> torch.allclose(w.sum(1), torch.full((3,), 2.0))
            True
        """
        size = self._sample_shape(shape)
        out_dtype = self._sample_dtype(dtype)
        out_device = self._sample_device(device)
        if generator is not None:
            if not isinstance(generator, torch.Generator):
                raise TypeError(
                    f"expected generator to be a torch.Generator, got {type(generator).__name__}"
                )
            if generator.device.type != out_device.type:
                raise ValueError(
                    f"expected a generator on device {out_device}, got one on {generator.device}"
                )
        with torch.device("cpu"):  # host-side checks, also under a meta default device
            self._check_input(torch.empty(size, dtype=out_dtype, device="meta"), False)
        with torch.no_grad():
            return self._sample(size, generator, out_dtype, out_device)

    def _sample(
        self,
        shape: tuple[int, ...],
        generator: torch.Generator | None,
        dtype: torch.dtype,
        device: torch.device,
    ) -> Tensor:
        """Standard Gaussian entries (drawn in float64) projected onto the set in ``dtype``."""
        z = torch.randn(shape, generator=generator, dtype=wide_dtype(device), device=device)
        return self.project(z.to(dtype))

    def _sample_shape(self, shape: Sequence[int] | int | None) -> tuple[int, ...]:
        if shape is None:
            if self._shape is None:
                raise ValueError(
                    "expected a shape to sample (the constraint is not registered on a tensor, "
                    f"so it has no shape of its own), got None for {type(self).__name__}"
                )
            return self._shape
        if isinstance(shape, int) and not isinstance(shape, bool):
            shape = (shape,)
        if not isinstance(shape, Sequence) or any(
            isinstance(s, bool) or not isinstance(s, int) for s in shape
        ):
            raise TypeError(f"expected shape to be a tuple of ints, got {shape!r}")
        if any(s < 0 for s in shape):
            raise ValueError(f"expected non-negative sizes in shape, got {tuple(shape)}")
        return tuple(shape)

    def _sample_dtype(self, dtype: torch.dtype | None) -> torch.dtype:
        if dtype is None:
            return self._dtype if self._dtype is not None else torch.get_default_dtype()
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"expected dtype to be a floating point torch.dtype, got {dtype!r}")
        return dtype

    def _sample_device(self, device: torch.device | str | None) -> torch.device:
        if device is None:
            if self._device is not None:
                return self._device
            return torch.get_default_device()
        if not isinstance(device, (torch.device, str)):
            raise TypeError(
                f"expected device to be a torch.device or a str, got {type(device).__name__}"
            )
        return torch.device(device)

    def contains(self, x: Tensor, atol: float | None = None) -> bool:
        """Whether ``x`` lies on the set: the right shape, finite, violation within ``atol``.

        The boolean form of :meth:`violation`. With the default ``atol`` it accepts
        exactly what assignment, registration and checkpoint loading accept, so
        :meth:`forward`, :meth:`project` and :meth:`sample` outputs are contained. It
        returns a Python ``bool``, so it synchronises with the device (and graph-breaks
        under ``torch.compile``): use it in checks and tests, not in hot paths.

        Args:
            x: Floating point tensor. A registered constraint requires its registered
                shape; an unregistered one any shape its configuration fits (the dims
                in range, non-empty slices, a total broadcastable to the slices, ``n``
                entries per slice for :class:`sumto.LinearEquality`).
            atol: Largest violation accepted; ``None`` means :meth:`tolerance` of
                ``x``, the rounding error of a sum in ``x``'s dtype.

        Returns:
            ``True`` if ``x`` is on the set within ``atol``, ``False`` otherwise (also for
            a wrong shape and for non-finite entries).

        Raises:
            TypeError: If ``x`` is not a floating point tensor or ``atol`` not a number.
            ValueError: If ``atol`` is negative or NaN, or ``x`` is a meta tensor (no values).

        Example:
            >>> import torch
            >>> from sumto import Simplex
            >>> c = Simplex()
            >>> c.contains(torch.tensor([0.25, 0.75])), c.contains(torch.tensor([1.5, -0.5]))
            (True, False)
            >>> c.contains(torch.tensor([0.5, 0.49]), atol=0.02)
            True
        """
        F._check_float_tensor(x)
        if atol is not None:
            atol = _checks.check_number(atol, "atol")
            if not atol >= 0.0:
                raise ValueError(f"expected atol >= 0, got {atol}")
        if x.is_meta:
            raise ValueError("expected x with values, got a meta tensor")
        if self._shape is not None and tuple(x.shape) != self._shape:
            return False
        try:
            with torch.device("cpu"):  # host-side checks, also under a meta default device
                self._check_input(x, registered_shape=False)
        except (IndexError, ValueError):
            return False  # the configuration does not fit this shape: no point of the set
        value = x.detach()
        if value.numel() > 0 and not bool(torch.isfinite(value).all()):
            return False
        tol = self.tolerance(value) if atol is None else atol
        return bool(float(self.violation(value)) <= tol)


class _TotalMixin(Constraint):
    """Holds ``total`` (a float, or a buffer for per-slice tensors)."""

    total: Tensor | float

    def __init__(self, total: Total, dim: Dim | None) -> None:
        super().__init__(dim)
        if isinstance(total, Tensor):
            # A meta total (a model built on the meta device) has no values yet: they are
            # checked when a checkpoint is loaded into it.
            checked = total.new_zeros(total.shape, device="cpu") if total.is_meta else total
            F._check_total(checked, tuple(total.shape), ())  # finiteness and dtype only
            t = total.detach().clone()
            if not t.dtype.is_floating_point:
                t = t.to(torch.get_default_dtype())
            self.register_buffer("total", t)
        else:
            F._check_total(total, (), ())
            self.total = float(total)

    def _total_value(self, like: Tensor, dims: tuple[int, ...]) -> Tensor | float:
        if isinstance(self.total, Tensor):
            return F._total_like(self.total, like, dims)
        return self.total

    def _bind(self, tensor: Tensor) -> None:
        super()._bind(tensor)
        if _has_values(self.total):
            F._check_total_range(self.total, F._compute_dtype(tensor.dtype))

    def _bind_shape(self, shape: tuple[int, ...]) -> None:
        dims = self.dims(len(shape))
        if isinstance(self.total, Tensor):
            F._broadcast_total_shape(tuple(self.total.shape), shape, dims)

    def _sum_violation(self, x: Tensor) -> Tensor:
        dims = self.dims(x.ndim)
        xc = x.to(F._compute_dtype(x.dtype))
        return F._sum_violation(xc, self._total_value(xc, dims), dims)

    def _config(self) -> dict[str, Any]:
        # A tensor total is saved as the buffer "total"; the config records only its kind.
        total = "tensor" if isinstance(self.total, Tensor) else self.total
        return {**super()._config(), "total": total}

    def _total_repr(self) -> str:
        if isinstance(self.total, Tensor):
            return f"total=Tensor(shape={tuple(self.total.shape)})"
        return f"total={self.total:g}"

    def extra_repr(self) -> str:
        return f"{self._total_repr()}, dim={self.dim}"


class AffineSum(_TotalMixin):
    r"""Affine sum constraint: entries of any sign whose sum over ``dim`` is ``total``.

    .. math::
        \mathcal{C} = \{ w : \textstyle\sum_{i \in \text{dim}} w_i = c \}

    ``forward`` is the Euclidean projection :math:`w = x - \bar{x} + c / n`, so it is
    the identity on the set (``right_inverse`` is the identity too) and never divides
    by a sum. Batched over the dims not in ``dim`` (one sum per slice).

    Args:
        total: Target sum ``c``: a float, or a tensor with one target per slice
            (broadcastable to the keepdim-reduced shape).
        dim: Dims of each sum; ``None`` means one sum per output unit.

    Raises:
        TypeError: If ``total`` or ``dim`` has the wrong type.
        ValueError: If ``total`` is not finite or ``dim`` repeats.

    Example:
        >>> import torch
        >>> from sumto import AffineSum
        >>> c = AffineSum(total=1.0)
        >>> w = c(torch.zeros(2, 3))
        >>> w
        tensor([[0.3333, 0.3333, 0.3333],
                [0.3333, 0.3333, 0.3333]])
        >>> float(c.violation(w)) < 1e-6
        True
    """

    def __init__(self, total: Total = 1.0, dim: Dim | None = None) -> None:
        super().__init__(total, dim)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        return self._project(x)

    def project(self, x: Tensor) -> Tensor:
        """Euclidean projection onto the set: ``x + (total - sum(x)) / n``."""
        self._check_input(x, registered_shape=False)
        return self._project(x)

    def _project(self, x: Tensor) -> Tensor:
        dims = self.dims(x.ndim)
        compute = F._compute_dtype(x.dtype)
        if compute == x.dtype:  # float32/float64: no casts
            return F._project_sum(x, self._total_value(x, dims), dims)
        xc = x.to(compute)
        return F._project_sum(xc, self._total_value(xc, dims), dims).to(x.dtype)

    def violation(self, x: Tensor) -> Tensor:
        """``max |sum(x) - total|`` over slices, a 0-d tensor."""
        F._check_float_tensor(x)
        return self._sum_violation(x)

    def _inverse(self, value: Tensor) -> Tensor:
        return value


# Note [Learned alpha and temperature]
# A learned alpha or temperature is a smooth map of an unconstrained parameter, so
# that any optimizer step (AdamW at a large learning rate included) keeps it in
# range: alpha = 1 + sigmoid(r) lies in (1, 2), between softmax and sparsemax, the
# range the entmax authors suggest for a learned alpha; log T = L tanh(r / L) with
# L = log(1e30) keeps T inside TEMPERATURE_RANGE and is T = exp(r) for |r| << L.
# Both are computed in the compute dtype (>= float32): a half precision parameter
# would overflow exp and round alpha to 1 or 2.
_LOG_T_LOW, _LOG_T_HIGH = (math.log(t) for t in _checks.TEMPERATURE_RANGE)
_LOG_T_CENTRE = 0.5 * (_LOG_T_LOW + _LOG_T_HIGH)
_LOG_T_HALF = 0.5 * (_LOG_T_HIGH - _LOG_T_LOW)


def _alpha_from_raw(raw: Tensor) -> Tensor:
    """alpha = 1 + sigmoid(r) (Note [Learned alpha and temperature])."""
    return 1.0 + torch.sigmoid(raw)


def _temperature_from_raw(raw: Tensor) -> Tensor:
    """T = exp(c + L tanh(r / L)) (Note [Learned alpha and temperature])."""
    return torch.exp(_LOG_T_CENTRE + _LOG_T_HALF * torch.tanh(raw / _LOG_T_HALF))


def _raw_from_temperature(temperature: float) -> float:
    return _LOG_T_HALF * math.atanh((math.log(temperature) - _LOG_T_CENTRE) / _LOG_T_HALF)


def _check_flag(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected {name} to be a bool, got {value!r}")
    return value


# Saved in the configuration in place of a learned value, which the state_dict holds.
_LEARNED = "learned"


class Simplex(_TotalMixin):
    r"""Simplex constraint: non-negative entries whose sum over ``dim`` is ``total``.

    .. math::
        \mathcal{C} = \{ w : w_i \ge 0,\ \textstyle\sum_{i \in \text{dim}} w_i = c \},
        \qquad c > 0

    Four maps from unconstrained pre-weights ``x``, all batched over the dims not in
    ``dim``:

    * ``"softmax"``: :math:`w = c\,\mathrm{softmax}(x / T)`. Smooth, never exactly
      zero; it saturates (zero gradient) for large logit gaps. Entries set to 0 are
      initialised at ``eps(dtype) * c`` (pre-weight ``T log eps``).
    * ``"sparsemax"``: :math:`w = P_{\mathcal{C}}(x / T)`, the Euclidean projection,
      with exact zeros; gradients vanish outside the support.
    * ``"entmax"``: :math:`w = c\,\mathrm{entmax}_\alpha(x / T)`
      (:func:`sumto.functional.entmax`), between softmax (:math:`\alpha = 1`) and
      sparsemax (:math:`\alpha = 2`): exact zeros for low pre-weights, smoother
      gradients than sparsemax on the support. Entries set to 0 are initialised a
      full threshold bracket below the support (pre-weight :math:`-T / (\alpha - 1)`).
    * ``"relu"``: BiFPN fast normalised fusion,
      :math:`w = c\,(\mathrm{relu}(x) + \epsilon / n) / (\sum_j \mathrm{relu}(x_j) + \epsilon)`
      with :math:`\epsilon = 10^{-4}`. BiFPN's ``relu(x) / (eps + sum relu(x))`` sums to
      ``S / (S + eps) < 1``; spreading the eps mass evenly makes the sum exact, at
      the cost of pulling entries towards ``c / n`` by a relative ``eps / (S + eps)``.
      When every pre-weight is <= 0 the weights are uniform (never NaN), and
      their gradient is zero.

    With ``learn_alpha=True`` (entmax), :math:`\alpha = 1 + \sigma(r)` for a learnable
    parameter ``alpha_raw`` (:math:`r`, unconstrained), so :math:`\alpha` stays in
    :math:`(1, 2)` under any optimizer step; it is a scalar, or one per slice when
    ``alpha`` is a tensor. With ``learn_temperature=True`` (softmax, sparsemax,
    entmax), :math:`T = \exp(L \tanh(r / L))`, :math:`L = \ln 10^{30}`, for a scalar
    learnable parameter ``temperature_raw``: :math:`T = e^r` for :math:`|r| \ll 69`, and
    :math:`T` never leaves :math:`(10^{-30}, 10^{30})`. The parameters live on this
    module: ``model.parameters()`` and the optimizer see them, and the state_dict
    holds them (``parametrizations.<name>.0.alpha_raw``). Their current values are
    :attr:`alpha` and :attr:`temperature`.

    Args:
        total: Target sum ``c > 0``: a float or a per-slice tensor.
        dim: Dims of each sum; ``None`` means one sum per output unit.
        method: ``"softmax"``, ``"sparsemax"``, ``"entmax"`` or ``"relu"``.
        temperature: ``T`` in ``[1e-30, 1e30]`` dividing the pre-weights (softmax,
            sparsemax and entmax); outside it ``x / T`` or ``T log(p)`` would overflow or
            vanish. With ``learn_temperature``, its initial value, strictly inside.
        alpha: Entmax's :math:`\alpha \ge 1` (``"entmax"`` only; default 1.5): a
            float, or a tensor with one :math:`\alpha` per slice (broadcastable to the
            keepdim-reduced shape). With ``learn_alpha``, its initial value, in
            :math:`(1, 2)`.
        learn_alpha: Learn :math:`\alpha` (``"entmax"`` only).
        learn_temperature: Learn :math:`T` (not with ``"relu"``, which has none).

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: If ``total <= 0``, ``temperature`` is outside its range, ``method`` is
            unknown, ``dim`` repeats, ``alpha`` is below 1 or given to another method
            than entmax, a learned initial value is outside its open range, or a
            learn flag is set for a method without that quantity.

    Example:
        >>> import torch
        >>> from sumto import Simplex
        >>> Simplex(method="sparsemax")(torch.tensor([2.0, 0.5, -1.0]))
        tensor([1., 0., 0.])
        >>> Simplex()(torch.zeros(4))
        tensor([0.2500, 0.2500, 0.2500, 0.2500])
        >>> Simplex(method="entmax", alpha=1.5)(torch.tensor([2.0, 1.0, -1.0]))
        tensor([0.8307, 0.1693, 0.0000])
        >>> learned = Simplex(method="entmax", learn_alpha=True, learn_temperature=True)
        >>> sorted(name for name, _ in learned.named_parameters())
        ['alpha_raw', 'temperature_raw']
    """

    alpha_raw: Tensor | None
    temperature_raw: Tensor | None

    def __init__(
        self,
        total: Total = 1.0,
        dim: Dim | None = None,
        method: SimplexMethod = "softmax",
        temperature: float = 1.0,
        alpha: float | Tensor | None = None,
        learn_alpha: bool = False,
        learn_temperature: bool = False,
    ) -> None:
        super().__init__(total, dim)
        if _has_values(self.total):
            F._check_positive(self.total, "total")
        if method not in _SIMPLEX_METHODS:
            raise ValueError(f"expected method to be one of {_SIMPLEX_METHODS}, got {method!r}")
        self.method: SimplexMethod = method
        self.learn_alpha = _check_flag(learn_alpha, "learn_alpha")
        self.learn_temperature = _check_flag(learn_temperature, "learn_temperature")
        self._temperature = _checks.check_temperature(temperature)
        self.alpha_raw = None
        self.temperature_raw = None
        if self.learn_temperature:
            if method == "relu":
                raise ValueError(
                    "expected method 'softmax', 'sparsemax' or 'entmax' with "
                    "learn_temperature=True, got 'relu', which has no temperature"
                )
            low, high = _checks.TEMPERATURE_RANGE
            if not low < self._temperature < high:
                raise ValueError(
                    f"expected a temperature strictly inside ({low:g}, {high:g}) with "
                    f"learn_temperature=True, got {temperature!r}"
                )
            raw = torch.tensor(_raw_from_temperature(self._temperature))
            self.temperature_raw = nn.Parameter(raw)
        self._alpha: float | None = None
        self._init_alpha(alpha)

    def _init_alpha(self, alpha: float | Tensor | None) -> None:
        if self.method != "entmax":
            if alpha is not None or self.learn_alpha:
                given = "learn_alpha=True" if alpha is None else f"alpha={_short(alpha)}"
                raise ValueError(
                    f"expected alpha and learn_alpha only with method='entmax', got {given} "
                    f"with method={self.method!r}"
                )
            return
        if alpha is None:
            alpha = F.DEFAULT_ALPHA
        # no slice shape yet: the shape is checked at registration (_bind_shape)
        if isinstance(alpha, Tensor):
            checked = alpha.new_ones(alpha.shape, device="cpu") if alpha.is_meta else alpha
            F._check_alpha(checked, tuple(alpha.shape), ())
            value: Tensor = alpha.detach().clone()
            if not value.dtype.is_floating_point:
                value = value.to(torch.get_default_dtype())
        else:
            F._check_alpha(alpha, (), ())
            self._alpha = float(alpha)
            value = torch.tensor(self._alpha)
        if self.learn_alpha:
            if not value.is_meta and not bool(((value > 1) & (value < 2)).all()):
                raise ValueError(
                    f"expected alpha strictly inside (1, 2) with learn_alpha=True (alpha = "
                    f"1 + sigmoid(alpha_raw)), got {_short(alpha)}"
                )
            self._alpha = None
            self.alpha_raw = nn.Parameter(torch.logit(value - 1.0))
        elif isinstance(alpha, Tensor):
            # A buffer named "alpha", read through the property below (register_buffer
            # refuses a name the class defines): the state_dict entry is "alpha".
            self._buffers["alpha"] = value

    # -- the current alpha and temperature -------------------------------------
    @property
    def alpha(self) -> float | Tensor | None:
        """Entmax's current alpha: a float, a tensor (per slice, or learned), or ``None``.

        A learned alpha is ``1 + sigmoid(alpha_raw)``, differentiable; ``None`` for
        the other methods.
        """
        if self.alpha_raw is not None:
            return _alpha_from_raw(self.alpha_raw)
        return self._buffers.get("alpha", self._alpha)

    @property
    def temperature(self) -> float | Tensor:
        """The current temperature: a float, or ``exp(L tanh(temperature_raw / L))``."""
        if self.temperature_raw is not None:
            return _temperature_from_raw(self.temperature_raw)
        return self._temperature

    def _map_args(self, like: Tensor, dims: tuple[int, ...]) -> tuple[Tensor | float, ...]:
        """(temperature, alpha) as :func:`sumto.functional._simplex_rows` takes them."""
        temperature: Tensor | float = self._temperature
        if self.temperature_raw is not None:
            temperature = _temperature_from_raw(self.temperature_raw.to(like.dtype))
        if self.method != "entmax":
            return temperature, F.DEFAULT_ALPHA
        alpha: Tensor | float | None
        if self.alpha_raw is not None:
            alpha = _alpha_from_raw(self.alpha_raw.to(like.dtype))
        else:
            alpha = self.alpha
        assert alpha is not None  # set for entmax by the constructor
        return temperature, F._alpha_rows(alpha, like, dims)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        dims = self.dims(x.ndim)
        xc = x.to(F._compute_dtype(x.dtype))
        total = self._total_value(xc, dims)
        args = self._map_args(xc, dims)
        return F._apply_rows(x, total, dims, F._simplex_rows, self.method, *args)

    def project(self, x: Tensor) -> Tensor:
        """Euclidean projection onto the simplex (exact zeros), whatever the method."""
        self._check_input(x, registered_shape=False)
        dims = self.dims(x.ndim)
        total = self._total_value(x.to(F._compute_dtype(x.dtype)), dims)
        return F._apply_rows(x, total, dims, F._project_simplex_rows)

    def violation(self, x: Tensor) -> Tensor:
        """Largest of ``max |sum(x) - total|`` and ``max(-x)`` (0 on the set)."""
        F._check_float_tensor(x)
        negative = F._max_or_zero(-x.to(F._compute_dtype(x.dtype))).clamp_min(0.0)
        return torch.maximum(self._sum_violation(x), negative)

    def _inverse(self, value: Tensor) -> Tensor:
        dims = self.dims(value.ndim)
        vc = value.to(F._compute_dtype(value.dtype))
        total = self._total_value(vc, dims)
        with torch.no_grad():
            args = self._map_args(vc, dims)
        return F._apply_rows(value, total, dims, F._simplex_inverse, self.method, *args)

    def _bind_shape(self, shape: tuple[int, ...]) -> None:
        super()._bind_shape(shape)
        alpha = self.alpha_raw if self.alpha_raw is not None else self._buffers.get("alpha")
        if alpha is not None:
            F._alpha_view_shape(tuple(alpha.shape), shape, self.dims(len(shape)))

    def _config(self) -> dict[str, Any]:
        temperature = _LEARNED if self.learn_temperature else self._temperature
        config = {**super()._config(), "method": self.method, "temperature": temperature}
        # Keys only where they differ from the defaults: checkpoints saved before they
        # existed have the same configuration.
        if self.method == "entmax":
            if self.learn_alpha:
                config["alpha"] = _LEARNED
            else:
                config["alpha"] = "tensor" if "alpha" in self._buffers else self._alpha
        if self.learn_alpha:
            config["learn_alpha"] = True
        if self.learn_temperature:
            config["learn_temperature"] = True
        return config

    @classmethod
    def _saved_kwargs(cls, kwargs: dict[str, Any], tensors: Mapping[str, Any]) -> dict[str, Any]:
        """Learned values from the checkpoint's parameters: their constructor checks them."""
        kwargs = dict(kwargs)
        with torch.no_grad():
            raw = tensors.get("alpha_raw")
            if kwargs.get("alpha") == _LEARNED and isinstance(raw, Tensor):
                kwargs["alpha"] = _alpha_from_raw(raw.detach().double().cpu())
            raw = tensors.get("temperature_raw")
            if kwargs.get("temperature") == _LEARNED and isinstance(raw, Tensor):
                value = _temperature_from_raw(raw.detach().double().cpu())
                kwargs["temperature"] = float(value) if value.numel() == 1 else value
        return kwargs

    def extra_repr(self) -> str:
        s = f"{self._total_repr()}, dim={self.dim}, method={self.method!r}"
        if self.learn_temperature:
            s += ", learn_temperature=True"
        elif self._temperature != 1.0:
            s += f", temperature={self._temperature:g}"
        if self.method == "entmax":
            fixed = self._buffers.get("alpha")
            if self.learn_alpha:
                s += ", learn_alpha=True"
            elif fixed is not None:
                s += f", alpha=Tensor(shape={tuple(fixed.shape)})"
            else:
                s += f", alpha={self._alpha:g}"
        return s

    def _sample(
        self,
        shape: tuple[int, ...],
        generator: torch.Generator | None,
        dtype: torch.dtype,
        device: torch.device,
    ) -> Tensor:
        r"""Uniform on the simplex: :math:`c\,E_i / \sum_j E_j`, :math:`E_i = -\log U_i` i.i.d.

        ``U`` is uniform on ``(0, 1]`` (``1 - torch.rand``), drawn and normalised in
        float64, so ``E`` is finite and zero only for ``U = 1`` (probability 2^-53);
        the same point whatever the method, whose inverse maps accept it.
        """
        wide = wide_dtype(device)
        u = torch.rand(shape, generator=generator, dtype=wide, device=device)
        e = -torch.log1p(-u)  # -log(1 - u), Exp(1) distributed, finite since u < 1
        dims = self.dims(len(shape))
        s = e.sum(dims, keepdim=True) if len(shape) > 0 else e
        n = F._reduced_size(shape, dims)
        # s == 0 only if every u of the slice is 0: the uniform point, not 0 / 0
        p = torch.where(s > 0, e / s.clamp_min(torch.finfo(wide).tiny), 1.0 / n)
        total = self._total_value(p, dims)
        return (p * total).to(dtype)


class BoxSum(_TotalMixin):
    r"""Box-bounded sum: ``lower <= w_i <= upper`` and the sum over ``dim`` is ``total``.

    .. math::
        \mathcal{C} = \{ w : l \le w_i \le u,\ \textstyle\sum_{i \in \text{dim}} w_i = c \}

    ``forward`` is the Euclidean projection :math:`\operatorname{clamp}(x - \tau, l, u)`,
    so it is the identity on the set; entries on a bound get zero gradient. The
    bounds may be per entry (:math:`l_i \le w_i \le u_i`: a cap per asset, a minimum
    weight per input), given as tensors broadcastable to the constrained tensor;
    they are then buffers, saved in the state_dict, and never rounded to a narrower
    dtype. Batched over the dims not in ``dim``.

    Args:
        total: Target sum ``c``: a float or a per-slice tensor.
        dim: Dims of each sum; ``None`` means one sum per output unit.
        lower: Lower bound ``l`` (may be ``-inf``), or a tensor of per-entry bounds.
        upper: Upper bound ``u`` (may be ``inf``), or a tensor of per-entry bounds.
            Tensor bounds may hold infinite entries on one side only.

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: If a bound is NaN, ``lower > upper`` (for some entry), or tensor
            bounds hold infinities on both sides; at registration, if a bound does not
            broadcast to the tensor's shape or a slice's set is empty
            (``sum(lower) > total`` or ``sum(upper) < total``).

    Example:
        >>> import torch
        >>> from sumto import BoxSum
        >>> BoxSum(total=1.0, lower=-0.5, upper=0.8)(torch.tensor([3.0, 0.0, 0.0]))
        tensor([0.8000, 0.1000, 0.1000])
        >>> capped = BoxSum(total=1.0, lower=0.0, upper=torch.tensor([0.5, 0.3, 0.4]))
        >>> capped(torch.tensor([3.0, 2.0, 0.0]))
        tensor([0.5000, 0.3000, 0.2000])
    """

    lower: Tensor | float
    upper: Tensor | float

    def __init__(
        self,
        total: Total = 1.0,
        dim: Dim | None = None,
        lower: float | Tensor = -math.inf,
        upper: float | Tensor = math.inf,
    ) -> None:
        super().__init__(total, dim)
        if not isinstance(lower, Tensor) and not isinstance(upper, Tensor):
            F._check_bounds(lower, upper)
            self.lower = float(lower)
            self.upper = float(upper)
            return
        F._check_bound_tensors(lower, upper)
        for name, bound in (("lower", lower), ("upper", upper)):
            if isinstance(bound, Tensor):
                b = bound.detach().clone()
                if not b.dtype.is_floating_point:
                    b = b.to(torch.get_default_dtype())
                self.register_buffer(name, b)
            else:
                setattr(self, name, float(bound))

    def _bind_shape(self, shape: tuple[int, ...]) -> None:
        super()._bind_shape(shape)
        dims = self.dims(len(shape))
        if not _has_values(self.total):
            return
        if isinstance(self.lower, Tensor) or isinstance(self.upper, Tensor):
            if _has_values(self.lower) and _has_values(self.upper):
                F._check_box_entries(self.total, shape, dims, self.lower, self.upper)
            return
        F._check_box(self.total, F._reduced_size(shape, dims), self.lower, self.upper)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        return self.project(x)

    def project(self, x: Tensor) -> Tensor:
        """Euclidean projection onto the box-bounded sum set."""
        self._check_input(x, registered_shape=False)
        dims = self.dims(x.ndim)
        total = self._total_value(x.to(F._compute_dtype(x.dtype)), dims)
        return F._project_box(x, total, dims, self.lower, self.upper)

    def violation(self, x: Tensor) -> Tensor:
        """Largest of ``max |sum(x) - total|``, ``max(lower - x)`` and ``max(x - upper)``."""
        F._check_float_tensor(x)
        xc = x.to(F._compute_dtype(x.dtype))
        below = F._max_or_zero(self.lower - xc).clamp_min(0.0)
        above = F._max_or_zero(xc - self.upper).clamp_min(0.0)
        return torch.maximum(self._sum_violation(x), torch.maximum(below, above))

    def _inverse(self, value: Tensor) -> Tensor:
        return value

    def _config(self) -> dict[str, Any]:
        # tensor bounds are saved as the buffers "lower"/"upper"; the config records their kind
        bounds = {
            name: "tensor" if isinstance(bound, Tensor) else bound
            for name, bound in (("lower", self.lower), ("upper", self.upper))
        }
        return {**super()._config(), **bounds}

    def extra_repr(self) -> str:
        bounds = [
            f"{name}=Tensor(shape={tuple(b.shape)})" if isinstance(b, Tensor) else f"{name}={b:g}"
            for name, b in (("lower", self.lower), ("upper", self.upper))
        ]
        return f"{super().extra_repr()}, {', '.join(bounds)}"

    def _sample(
        self,
        shape: tuple[int, ...],
        generator: torch.Generator | None,
        dtype: torch.dtype,
        device: torch.device,
    ) -> Tensor:
        """Independent entries in the box, then the slices projected onto the set.

        Each entry is drawn from its interval ``[lower, upper]``: uniform when both
        bounds are finite, ``lower + E`` or ``upper - E`` (``E`` ~ Exp(1)) when only
        one is, standard Gaussian when neither is (then the draw is
        :class:`AffineSum`'s). The point of the box is then mapped onto the sum by
        :meth:`project`, the Euclidean projection ``clamp(x - tau, lower, upper)``.
        The result is on the set but *not* uniform on it: the projection puts
        positive mass on the faces where entries sit on a bound. The bounds enter
        only through elementwise tensor operations, so bounds broadcastable to the
        tensor work too.
        """
        wide = wide_dtype(device)
        z = torch.randn(shape, generator=generator, dtype=wide, device=device)
        u = torch.rand(shape, generator=generator, dtype=wide, device=device)
        lower = torch.as_tensor(self.lower, dtype=wide, device=device)
        upper = torch.as_tensor(self.upper, dtype=wide, device=device)
        has_lower, has_upper = torch.isfinite(lower), torch.isfinite(upper)
        e = -torch.log1p(-u)  # Exp(1), finite since u < 1
        # lower (1 - u) + upper u: no overflow for bounds near the dtype's range
        x = torch.where(has_lower & has_upper, lower * (1.0 - u) + upper * u, z)
        x = torch.where(has_lower & ~has_upper, lower + e, x)
        x = torch.where(~has_lower & has_upper, upper - e, x)
        big = torch.finfo(dtype).max  # a bound beyond dtype's range bounds none of its values
        return self.project(x.clamp(-big, big).to(dtype))

"""Helpers that register a constraint on ``module.<name>`` and return the module.

They wrap :func:`torch.nn.utils.parametrize.register_parametrization` and add what it
lacks for sum constraints: the tensor is validated (tied and shared objects are
refused), its value is projected onto the set (or set exactly from ``init``) *before*
the inverse map runs, later assignments are checked, and a load-state-dict pre-hook
validates checkpoints before anything is copied and lets plain checkpoints (key
``<name>``) load into the constrained module. The documentation's Pitfalls page lists
what torch's parametrizations do not do for you.
"""

from __future__ import annotations

import copy
import gc
import math
import sys
import weakref
from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from sumto._compat import inject_property
from sumto.constraints import (
    CONFIG_METADATA_KEY,
    AffineSum,
    BoxSum,
    Constraint,
    Simplex,
    SimplexMethod,
)
from sumto.functional import Dim, Total
from sumto.step import _projected_report

__all__ = ["bake", "box_sum", "check", "constrain", "simplex", "sum_to"]

# "project": the current value projected onto the set; "sample": a random point of the
# set (Constraint.sample); a tensor: that exact constrained value.
Init = Literal["project", "sample"] | Tensor


def _check_module(module: nn.Module) -> None:
    if not isinstance(module, nn.Module):
        raise TypeError(f"expected module to be an nn.Module, got {type(module).__name__}")


def _plain_tensor(module: nn.Module, name: str) -> Tensor:
    _check_module(module)
    if not isinstance(name, str):
        raise TypeError(f"expected name to be a str, got {type(name).__name__}")
    if parametrize.is_parametrized(module, name):
        raise ValueError(
            f"expected {type(module).__name__}.{name} to have no parametrization yet, got "
            f"{[type(p).__name__ for p in _plist(module, name)]}; "
            "call sumto.bake(module) or parametrize.remove_parametrizations first"
        )
    tensor = getattr(module, name, None)
    if not isinstance(tensor, Tensor):
        names = [n for n, _ in module.named_parameters(recurse=False)]
        names += [n for n, _ in module.named_buffers(recurse=False)]
        raise KeyError(
            f"expected name to be a parameter or buffer of {type(module).__name__} "
            f"(one of {names}), got {name!r}"
        )
    if isinstance(tensor, nn.parameter.UninitializedParameter):
        raise ValueError(
            f"expected an initialised tensor, got an uninitialised {name!r}: run one forward "
            "pass of the lazy module before constraining it"
        )
    return tensor


# Constraints registered by `constrain`: constraint -> (weak owner, tensor name).
_REGISTERED: Any = weakref.WeakKeyDictionary()


def _registered_on(constraint: Constraint) -> str | None:
    """``"<Class>.<name>"`` if ``constraint`` is still registered on a tensor, else ``None``."""
    entry = _REGISTERED.get(constraint)
    owner = entry[0]() if entry is not None else None
    if owner is None or not parametrize.is_parametrized(owner, entry[1]):
        return None
    if not any(p is constraint for p in _plist(owner, entry[1])):
        return None  # baked or removed since
    return f"{type(owner).__name__}.{entry[1]}"


def _check_not_registered(constraint: Constraint) -> None:
    where = _registered_on(constraint)
    if where is not None:
        raise ValueError(
            f"expected a constraint object that constrains no other tensor, got one already "
            f"registered on {where}: a constraint is a module with one owner (a shared one "
            "is saved twice and breaks FSDP wrapping, and each tensor records its own shape); "
            "pass a new constraint per tensor, e.g. copy.deepcopy(constraint)"
        )


def _refcount_baseline() -> int:
    """``sys.getrefcount`` of a parameter held by one module and one local variable."""
    probe = nn.Module()
    tensor = nn.Parameter(torch.zeros(()))
    probe.register_parameter("probe", tensor)
    return sys.getrefcount(tensor)


_BASELINE: list[int] = []


def _other_holders(module: nn.Module, name: str, tensor: Tensor, refcount: int) -> list[str]:
    """Other names under which a module holds ``tensor`` (tied weights), for messages.

    ``refcount`` is ``sys.getrefcount(tensor)`` measured where ``tensor`` is a local
    variable: searching every object for referrers is slow, so it is done only when
    something besides the module refers to the tensor (another module, an optimizer,
    a variable of the caller).
    """
    found = [
        f"{key!r} of the same module"
        for key, value in (*module._parameters.items(), *module._buffers.items())
        if value is tensor and key != name
    ]
    if not _BASELINE:
        _BASELINE.append(_refcount_baseline())
    if refcount <= _BASELINE[0]:
        return found
    own = (module._parameters, module._buffers)
    for holder in gc.get_referrers(tensor):
        if not isinstance(holder, dict) or any(holder is d for d in own):
            continue
        keys = [k for k, v in holder.items() if v is tensor]
        if not keys:
            continue
        for referrer in gc.get_referrers(holder):
            other = _module_with_state(referrer, holder)
            if other is not None:
                found += [f"{k!r} of another {other}" for k in keys]
                break
    return found


def _module_with_state(referrer: Any, state: dict[str, Any]) -> str | None:
    """Class name of the module whose ``_parameters``/``_buffers`` is ``state``, if any."""
    if isinstance(referrer, nn.Module):
        is_state = referrer._parameters is state or referrer._buffers is state
        return type(referrer).__name__ if is_state else None
    if isinstance(referrer, dict) and (
        referrer.get("_parameters") is state or referrer.get("_buffers") is state
    ):
        owners = [m for m in gc.get_referrers(referrer) if isinstance(m, nn.Module)]
        return type(owners[0]).__name__ if owners else "module"
    return None


def _check_untied(module: nn.Module, name: str, tensor: Tensor, refcount: int) -> None:
    holders = _other_holders(module, name, tensor, refcount)
    if holders:
        owner = type(module).__name__
        raise ValueError(
            f"expected {owner}.{name} to be held by this module alone, got a tensor also held "
            f"as {', '.join(holders)} (tied weights, e.g. dec.weight = enc.weight): "
            "constraining one holder would untie them, the other reading the unconstrained "
            f"pre-weights. Untie them (give the other its own nn.Parameter), constrain "
            f"{owner}.{name}, then tie the other to the constrained weight with "
            f"torch.nn.utils.parametrize.transfer_parametrizations_and_params(<this module>, "
            f"<other module>, {name!r})"
        )


def constrain(
    module: nn.Module, name: str, constraint: Constraint, init: Init = "project"
) -> nn.Module:
    """Register any sumto ``constraint`` on ``module.<name>`` with exact initialisation.

    This is what :func:`sum_to`, :func:`simplex` and :func:`box_sum` call; use it for
    a constraint object you built yourself.

    Args:
        module: Module owning the tensor.
        name: Name of a parameter or buffer of ``module``.
        constraint: A :class:`sumto.Constraint` instance (not shared with another tensor).
        init: ``"project"`` keeps the current value if it already satisfies the
            constraint and otherwise projects it onto the set; ``"sample"`` replaces
            it by a random point of the set, ``constraint.sample(shape, dtype=...,
            device=...)`` of the tensor's shape, dtype and device, drawn with torch's
            global generator (seed it with ``torch.manual_seed``, as for
            ``nn.init``); a tensor sets that exact constrained value. On the meta
            device nothing is checked or set: call ``to_empty`` and load a checkpoint.

    Returns:
        ``module``, with ``module.<name>`` constrained.

    Raises:
        KeyError: If ``module`` has no tensor called ``name``.
        IndexError: If the constraint's dims are out of range for the tensor.
        TypeError: If the tensor is not floating point or an argument has the wrong type.
        ValueError: If the tensor is already parametrized or also held by another
            module (tied weights), the constraint object is already registered on
            another tensor, the constraint's set is empty for this shape, or ``init``
            has the wrong shape or violates the constraint.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import sumto
        >>> lin = sumto.constrain(nn.Linear(3, 2), "weight", sumto.AffineSum(total=2.0))
        >>> torch.allclose(lin.weight.sum(1), torch.full((2,), 2.0))
        True
    """
    if not isinstance(constraint, Constraint):
        raise TypeError(
            f"expected constraint to be a sumto.Constraint, got {type(constraint).__name__}"
        )
    _check_not_registered(constraint)
    tensor = _plain_tensor(module, name)
    refcount = sys.getrefcount(tensor)  # measured as in _refcount_baseline
    _check_untied(module, name, tensor, refcount)
    constraint._bind(tensor)
    with torch.no_grad():
        if isinstance(init, str) and init == "project":
            value = tensor.detach()
            if value.is_meta:
                pass  # no values yet: to_empty and a checkpoint load set them
            elif value.numel() > 0 and not bool(torch.isfinite(value).all()):
                raise ValueError(
                    f"expected a finite {type(module).__name__}.{name} to project with "
                    "init='project', got non-finite entries; pass init=<a value on the set>"
                )
            elif not float(constraint.violation(value)) <= constraint.tolerance(value):
                value = constraint.project(value)
                # Named here: right_inverse would only say "value" (e.g. a box projection
                # of huge entries loses the sum to rounding).
                what = f"{type(module).__name__}.{name} projected with init='project'"
                constraint.check_member(value, what)
        elif isinstance(init, str) and init == "sample":
            value = tensor.detach()
            if not value.is_meta:  # no values on the meta device, as for "project"
                value = constraint.sample(value.shape, dtype=value.dtype, device=value.device)
        elif isinstance(init, Tensor):
            constraint.check_member(init.detach(), "init")
            value = init.detach().to(device=tensor.device, dtype=tensor.dtype)
        else:
            raise ValueError(f"expected init to be 'project', 'sample' or a tensor, got {init!r}")
        # Pre-weights computed here, on the set: right_inverse never sees the raw init
        # (a softmax right_inverse of a mostly negative weight gives dead pre-weights).
        tensor.copy_(value)
    parametrize.register_parametrization(module, name, constraint)
    _REGISTERED[constraint] = (weakref.ref(module), name)
    _install_load_hook(module)
    _install_copy_hooks(module)
    return module


def sum_to(
    module: nn.Module,
    name: str = "weight",
    total: Total = 1.0,
    dim: Dim | None = None,
    init: Init = "project",
) -> nn.Module:
    r"""Constrain ``module.<name>`` to entries of any sign summing to ``total``.

    .. math::
        \{ w : \textstyle\sum_{i \in \text{dim}} w_i = c \}

    Registers :class:`sumto.AffineSum`; one sum per slice over ``dim``
    (default: per output unit, e.g. each row of a Linear weight or each filter of a
    Conv weight). Use it for kernels such as ``[[0,-1,0],[-1,5,-1],[0,-1,0]]``.

    Args:
        module: Module owning the tensor.
        name: Parameter or buffer name.
        total: Target sum: a float or a tensor with one target per slice.
        dim: Dims of each sum; ``None`` means one sum per output unit.
        init: ``"project"``, ``"sample"`` or an exact constrained value (see
            :func:`constrain`).

    Returns:
        ``module``.

    Raises:
        KeyError, IndexError, TypeError, ValueError: As :func:`constrain`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import sumto
        >>> conv = sumto.sum_to(nn.Conv2d(1, 1, 3, bias=False))
        >>> k = torch.tensor([[0.0, -1, 0], [-1, 5, -1], [0, -1, 0]]).view(1, 1, 3, 3)
        >>> conv.weight = k
        >>> torch.equal(conv.weight, k)
        True
    """
    return constrain(module, name, AffineSum(total=total, dim=dim), init)


def simplex(
    module: nn.Module,
    name: str = "weight",
    total: Total = 1.0,
    dim: Dim | None = None,
    method: SimplexMethod = "softmax",
    temperature: float = 1.0,
    init: Init = "project",
    *,
    alpha: float | Tensor | None = None,
    learn_alpha: bool = False,
    learn_temperature: bool = False,
) -> nn.Module:
    r"""Constrain ``module.<name>`` to non-negative entries summing to ``total``.

    .. math::
        \{ w : w_i \ge 0,\ \textstyle\sum_{i \in \text{dim}} w_i = c \}

    Registers :class:`sumto.Simplex` with the given ``method`` (``"softmax"``,
    ``"sparsemax"``, ``"entmax"`` or ``"relu"``). One sum per slice over ``dim``.
    Learned ``alpha`` and temperature are parameters of the constraint, under
    ``module.parametrizations.<name>[0]``: create the optimizer after this call.

    Args:
        module: Module owning the tensor.
        name: Parameter or buffer name.
        total: Target sum ``c > 0``.
        dim: Dims of each sum; ``None`` means one sum per output unit.
        method: Map from pre-weights to the simplex.
        temperature: Softmax/sparsemax/entmax temperature ``T > 0`` (with
            ``learn_temperature``, its initial value).
        init: ``"project"``, ``"sample"`` or an exact constrained value (see
            :func:`constrain`).
        alpha: Entmax's ``alpha >= 1`` (default 1.5): a float or a per-slice tensor
            (with ``learn_alpha``, its initial value, in ``(1, 2)``).
        learn_alpha: Learn ``alpha = 1 + sigmoid(r)`` (entmax only).
        learn_temperature: Learn the temperature (see :class:`sumto.Simplex`).

    Returns:
        ``module``.

    Raises:
        KeyError, IndexError, TypeError, ValueError: As :func:`constrain`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import sumto
        >>> lin = sumto.simplex(nn.Linear(4, 2), init=torch.full((2, 4), 0.25))
        >>> lin.weight
        tensor([[0.2500, 0.2500, 0.2500, 0.2500],
                [0.2500, 0.2500, 0.2500, 0.2500]], grad_fn=<...>)
        >>> _ = torch.manual_seed(0)
        >>> mix = sumto.simplex(nn.Linear(4, 2), init="sample")  # uniform on the simplex
        >>> bool((mix.weight > 0).all()), torch.allclose(mix.weight.sum(1), torch.ones(2))
        (True, True)
        >>> mix = sumto.simplex(nn.Linear(4, 2), method="entmax", learn_alpha=True)
        >>> "parametrizations.weight.0.alpha_raw" in dict(mix.named_parameters())
        True
    """
    constraint = Simplex(
        total=total,
        dim=dim,
        method=method,
        temperature=temperature,
        alpha=alpha,
        learn_alpha=learn_alpha,
        learn_temperature=learn_temperature,
    )
    return constrain(module, name, constraint, init)


def box_sum(
    module: nn.Module,
    name: str = "weight",
    total: Total = 1.0,
    dim: Dim | None = None,
    lower: float | Tensor = -math.inf,
    upper: float | Tensor = math.inf,
    init: Init = "project",
) -> nn.Module:
    r"""Constrain ``module.<name>`` to entries in ``[lower, upper]`` summing to ``total``.

    .. math::
        \{ w : l \le w_i \le u,\ \textstyle\sum_{i \in \text{dim}} w_i = c \}

    Registers :class:`sumto.BoxSum`. One sum per slice over ``dim``.

    Args:
        module: Module owning the tensor.
        name: Parameter or buffer name.
        total: Target sum.
        dim: Dims of each sum; ``None`` means one sum per output unit.
        lower: Lower bound of every entry, or a tensor of per-entry lower bounds
            broadcastable to the tensor's shape.
        upper: Upper bound of every entry, or per-entry upper bounds likewise.
        init: ``"project"``, ``"sample"`` or an exact constrained value (see
            :func:`constrain`).

    Returns:
        ``module``.

    Raises:
        KeyError, IndexError, TypeError: As :func:`constrain`.
        ValueError: As :func:`constrain`, and when the bounds make the set empty.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import sumto
        >>> lin = sumto.box_sum(nn.Linear(4, 3), lower=-0.5, upper=1.0)
        >>> bool((lin.weight >= -0.5).all() and (lin.weight <= 1.0).all())
        True
    """
    return constrain(module, name, BoxSum(total=total, dim=dim, lower=lower, upper=upper), init)


# ---------------------------------------------------------------------------
# checkpoints, baking and checking
# ---------------------------------------------------------------------------


def _plist(module: nn.Module, name: str) -> Any:
    """The ParametrizationList of ``module.<name>``."""
    plists: Any = module.parametrizations
    return plists[name]


def _sumto_names(module: nn.Module) -> list[str]:
    """Names of the tensors of ``module`` (not its children) with a sumto constraint."""
    if not parametrize.is_parametrized(module):
        return []
    plists: Any = module.parametrizations
    return [name for name, plist in plists.items() if any(isinstance(p, Constraint) for p in plist)]


def _check_checkpoint_entries(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any
) -> None:
    """Validate every sumto entry of the checkpoint for ``module``; nothing is copied.

    Reads the configurations from the module's state_dict metadata (or from the
    ``_extra_state`` entries of older checkpoints, which are removed), see
    Note [Constraint configuration in state_dict metadata].
    """
    metadata = local_metadata if isinstance(local_metadata, Mapping) else {}
    saved_configs = metadata.get(CONFIG_METADATA_KEY, {})
    if not isinstance(saved_configs, Mapping):
        raise ValueError(
            f"expected the saved sumto configurations of {prefix[:-1] or 'the module'!r} to "
            f"be a dict, got {type(saved_configs).__name__}"
        )
    # torch writes "version" into the metadata of every module it saves: a state_dict
    # with metadata but no configuration for a constraint was saved without it.
    saved_with_metadata = "version" in metadata
    for name in _sumto_names(module):
        plist = _plist(module, name)
        original_key = f"{prefix}parametrizations.{name}.original"
        original = state_dict.get(original_key)
        shape = plist[0]._shape if isinstance(plist[0], Constraint) else None
        if isinstance(original, Tensor) and shape is not None and tuple(original.shape) != shape:
            raise ValueError(
                f"expected checkpoint entry {original_key!r} of shape {shape}, got shape "
                f"{tuple(original.shape)}"
            )
        for index, p in enumerate(plist):
            if not isinstance(p, Constraint):
                continue
            rel = f"parametrizations.{name}.{index}"
            legacy = state_dict.pop(f"{prefix}{rel}._extra_state", None)
            saved = saved_configs.get(rel, legacy)
            if saved is None and saved_with_metadata and original_key in state_dict:
                raise ValueError(
                    f"expected checkpoint entry {original_key!r} saved with "
                    f"{type(p).__name__}({p.extra_repr()}), got pre-weights saved without a "
                    "sumto constraint (another parametrization): they would change meaning; "
                    "load into a model built like the one saved"
                )
            keys = {n: f"{prefix}{rel}.{n}" for n in p._state_names()}
            tensors = {n: state_dict[key] for n, key in keys.items() if key in state_dict}
            p._check_checkpoint(saved, tensors, prefix + rel)


def _load_checkpoint_hook(
    module: nn.Module,
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: Any,
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    """Validate the sumto entries, then route plain ``<name>`` entries through ``right_inverse``.

    A load pre-hook of the module owning the constrained tensors: it runs before any
    tensor of the module (its own and its parametrizations') is copied, so a refused
    load leaves them all as they were. The parametrizations' own state (configuration,
    tensor totals) is absent from a plain checkpoint: the module's current one is used.
    """
    _check_checkpoint_entries(module, state_dict, prefix, local_metadata)
    for name in _sumto_names(module):
        plain_key = prefix + name
        original_key = f"{prefix}parametrizations.{name}.original"
        if plain_key not in state_dict or original_key in state_dict:
            continue
        value = state_dict.pop(plain_key)
        plist = _plist(module, name)
        for key, own in plist.state_dict().items():
            if key != "original":
                state_dict.setdefault(f"{prefix}parametrizations.{name}.{key}", own)
        with torch.no_grad():
            for p in reversed(plist):
                if isinstance(p, Constraint):
                    value = p.right_inverse(value, f"checkpoint entry {plain_key!r}")
                else:
                    value = p.right_inverse(value)
        state_dict[original_key] = value


def _install_load_hook(module: nn.Module) -> None:
    if not getattr(module, "_sumto_load_hook_installed", False):
        module.register_load_state_dict_pre_hook(_load_checkpoint_hook)  # type: ignore[no-untyped-call]
        object.__setattr__(module, "_sumto_load_hook_installed", True)


def _refuse_pickle(self: nn.Module) -> Any:
    names = [f"{type(self).__name__}.{name}" for name in _sumto_names(self)]
    raise RuntimeError(
        f"expected a module without sumto parametrizations to pickle, got {names}: "
        "torch.save(model), pickle and copy.copy cannot serialize parametrized modules. "
        "Save model.state_dict() and load it into a model built with the same constraints, "
        "or call sumto.bake(model) first to save a plain module (copy.deepcopy works)"
    )


def _deepcopy_with_own_class(self: nn.Module, memo: dict[int, Any]) -> nn.Module:
    """``copy.deepcopy`` of a parametrized module whose copy gets its own class.

    # Note [Copies of parametrized modules]
    torch's injected class is shared by a module and its deep copies, and its
    properties key ``parametrize.cached()`` on the *source* module (a closure): a copy
    read inside ``cached()`` returns the source's weight, and ``bake(copy)`` deletes
    the source's properties. The copy gets a sibling class with properties of its own.
    """
    existing = memo.get(id(self))
    if existing is not None:
        return existing  # type: ignore[no-any-return]
    cls = type(self)
    replica = cls.__new__(cls)
    memo[id(self)] = replica
    replica.__dict__ = copy.deepcopy(self.__dict__, memo)
    plists: Any = self.parametrizations
    names = list(plists.keys())
    own = {k: v for k, v in cls.__dict__.items() if k not in (*names, "__dict__", "__weakref__")}
    replica.__class__ = type(cls.__name__, cls.__bases__, own)
    for name in names:
        inject_property(replica, name)
        for p in _plist(replica, name):
            if isinstance(p, Constraint):
                _REGISTERED[p] = (weakref.ref(replica), name)
    return replica


def _install_copy_hooks(module: nn.Module) -> None:
    """Pickling names ``state_dict`` and ``sumto.bake``; deep copies get their own class."""
    cls = type(module)  # the Parametrized<Class> torch made for this module alone
    if cls.__dict__.get("__getstate__") is _refuse_pickle:
        return
    setattr(cls, "__getstate__", _refuse_pickle)  # noqa: B010
    if "__deepcopy__" in cls.__dict__:  # torch's default one: the class has no own
        setattr(cls, "__deepcopy__", _deepcopy_with_own_class)  # noqa: B010


def bake(module: nn.Module) -> nn.Module:
    """Remove every sumto parametrization in the module tree, keeping the constrained values.

    Each constrained tensor becomes a plain ``nn.Parameter`` (the same object, so an
    optimizer holding it keeps working) with its current constrained value: use it
    before export or to save a plain checkpoint (key ``<name>``).

    Args:
        module: Root of the module tree.

    Returns:
        ``module``.

    Raises:
        TypeError: If ``module`` is not an ``nn.Module``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import sumto
        >>> lin = sumto.bake(sumto.simplex(nn.Linear(3, 2)))
        >>> sorted(lin.state_dict())
        ['bias', 'weight']
    """
    _check_module(module)
    for sub in module.modules():
        for name in _sumto_names(sub):
            parametrize.remove_parametrizations(sub, name, leave_parametrized=True)
    return module


def check(module: nn.Module) -> dict[str, float]:
    """Max violation of every sumto-constrained tensor in the module tree.

    Parameters kept on a set by :func:`sumto.project_on_step` are included while
    their projection is active.

    Non-finite tensors are reported as ``nan`` (any NaN entry) or ``inf``.

    Args:
        module: Root of the module tree.

    Returns:
        ``{qualified tensor name: max violation}``; 0.0 means exactly on the set.

    Raises:
        TypeError: If ``module`` is not an ``nn.Module``.

    Example:
        >>> from torch import nn
        >>> import sumto
        >>> model = nn.Sequential(sumto.sum_to(nn.Linear(3, 2)))
        >>> {k: v < 1e-6 for k, v in sumto.check(model).items()}
        {'0.weight': True}
    """
    _check_module(module)
    report: dict[str, float] = {}
    with torch.no_grad():
        for prefix, sub in module.named_modules():
            for name in _sumto_names(sub):
                plist = _plist(sub, name)
                value = plist.original
                # FSDP2 (DTensor): check the whole tensor, never a shard (a collective).
                full_tensor = getattr(value, "full_tensor", None)
                if callable(full_tensor):
                    value = full_tensor()
                worst = 0.0
                for p in plist:
                    value = p(value)
                    if isinstance(p, Constraint):
                        if not bool(torch.isfinite(value).all()):
                            worst = math.nan if bool(torch.isnan(value).any()) else math.inf
                            break
                        worst = max(worst, float(p.violation(value)))
                report[f"{prefix}.{name}" if prefix else name] = worst
    report.update(_projected_report(module))  # parameters managed by project_on_step
    return report

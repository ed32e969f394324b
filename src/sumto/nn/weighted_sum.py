"""``WeightedSum``: learnable fusion of K tensors with simplex or affine mixing weights."""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.parameter import UninitializedBuffer, UninitializedParameter, is_lazy

from sumto import functional as F
from sumto._compat import along_first_dim, is_compiling, own_parameter
from sumto.constraints import _SIMPLEX_METHODS, AffineSum, Simplex, SimplexMethod
from sumto.nn._weighted_sum_function import weighted_sum
from sumto.register import _install_load_hook, constrain

__all__ = ["WeightedSum"]

WeightKind = Literal["simplex", "affine"]
Inputs = Sequence[Tensor] | Tensor | Mapping[str, Tensor]
_WEIGHT_KINDS = ("simplex", "affine")
_ORIGINAL = "parametrizations.weights.original"
# Keys of the module's entry in ``state_dict()._metadata``: plain str/int values, so
# they survive torch.save and torch.load(weights_only=True) and stay out of values().
_NAMES_KEY = "sumto_names"
_COUNT_KEY = "sumto_num_inputs"
_LAYER_NORM_KEY = "sumto_layer_norm"
_DROPOUT_KEY = "sumto_dropout"
_TRAINABLE_KEY = "sumto_trainable"
# Added to the variance of each input before the square root (AllenNLP ScalarMix's value).
_LAYER_NORM_EPS = 1e-12
# Serialises the lazy sizing of every WeightedSum: several threads may make a lazy
# module's first call at once, and sizing registers a parametrization (not atomic).
_LAZY_INIT_LOCK = threading.Lock()


class WeightedSum(LazyModuleMixin, nn.Module):
    r"""Learnable weighted sum of K tensors whose mixing weights satisfy a sum constraint.

    .. math::
        y = \gamma \sum_{k=1}^{K} w_k\, x_k + b, \qquad
        w \in \{ w : w_k \ge 0,\ \textstyle\sum_k w_k = 1 \}\ (\text{simplex})
        \ \text{or}\ \{ w : \textstyle\sum_k w_k = 1 \}\ (\text{affine})

    with a learnable scalar :math:`\gamma` (``scale=True``, else 1) and bias :math:`b`
    (``bias=True``, else 0). The weights are a :class:`sumto.Simplex` or
    :class:`sumto.AffineSum` parametrization over K (key
    ``parametrizations.weights.original`` in the state_dict), so ``init`` is exact.
    With ``channels=C`` there is one weight vector per channel, shape ``(K, C)``,
    each column summing to 1, broadcast along ``channel_dim`` of the inputs.
    Batched: the inputs may have any shape, shared by all K of them.

    In eager mode the sum runs through a custom autograd function that reads each
    input once and allocates only the output (no ``torch.stack``); its backward
    allocates only the gradients it returns (plus one input-sized scratch buffer when
    the weights vary per channel or per row) and is itself differentiable (double
    backward). Without autograd recording (``torch.no_grad``, ``torch.inference_mode``)
    the same one-pass sum runs without the function. Under ``torch.compile`` and
    ``torch.func`` transforms (``grad``,
    ``vmap``, ``jvp``, ``jacrev``, ``jacfwd``) and forward-mode AD the same sum runs as
    plain ops. The sum never synchronises with the device, so the module runs under
    ``torch.compile(fullgraph=True)``; the one host read is the eager-mode check of a
    ``mask`` (see :meth:`forward`). float16/bfloat16 inputs are accumulated in float32
    (one float32 buffer of the output's size) and returned in their dtype.

    Missing inputs (a ``dict`` with a subset of ``names``, or ``mask``) get weight 0
    and the present weights are renormalised per row: simplex weights are rescaled to
    sum to 1 (for ``method="softmax"`` this is the masked softmax of the pre-weights;
    for ``"sparsemax"``, whose present weights may all be exactly 0, the present
    pre-weights are projected onto the simplex, a masked sparsemax); affine weights
    are shifted by spreading the deficit :math:`1 - \sum_{k \in P} w_k` equally over
    the present set :math:`P`. Masked inputs are still read (multiplied by 0), so they
    must be finite; a ``dict`` subset reads only the inputs it holds. Under
    ``torch.compile`` each distinct set of dict keys is compiled once (dynamo guards on
    the keys of a dict argument; the default limit is 8 recompilations): with inputs
    that vary from call to call, pass all of them with a ``mask``, which compiles once.
    After :func:`sumto.bake` the pre-weights are gone and subsets renormalise the baked
    weights: the same result for ``"softmax"`` (up to rounding), ``"relu"`` and
    ``"affine"``; for ``"sparsemax"`` the present baked weights are projected onto the
    simplex, the same result when every present input has a nonzero weight.

    Lazy sizing: with neither ``num_inputs``, ``names`` nor ``init``, K is taken from
    the first call, following :class:`torch.nn.modules.lazy.LazyModuleMixin`: the
    weights are an ``UninitializedParameter`` until then, so create the optimizer
    *after* the first call (or a dry run). A later call with another K raises
    ValueError. A state_dict of a sized module loads into an unsized one. The first
    call may come from several threads at once: one sizes the module, the others wait.

    Checkpoints: ``state_dict()`` records K, ``names``, ``layer_norm``, ``dropout`` and
    ``trainable`` in its ``_metadata`` (plain strings, numbers and bools, kept by
    ``torch.save`` and ``torch.load(weights_only=True)``; no extra state_dict entry).
    Loading a checkpoint whose names are in another order puts its weights in this
    module's order; other names, another K or another ``layer_norm`` (weights learned
    for other inputs) raise ValueError before any tensor of this module changes.
    ``dropout`` and ``trainable`` may differ: they do not change what the weights
    mean. A checkpoint without this metadata loads positionally.

    Args:
        num_inputs: K, the number of inputs; ``None`` to take it from ``names``,
            ``init`` or the first call.
        names: Names of the K inputs, enabling ``dict`` inputs (and subsets of them).
        weights: ``"simplex"`` (non-negative, sum 1) or ``"affine"`` (any sign, sum 1).
        method: Map of :class:`sumto.Simplex` (``"softmax"``, ``"sparsemax"`` or
            ``"relu"``); only ``"softmax"`` (the default, unused) with ``"affine"``.
        init: K initial constrained weights, set exactly, shape ``(K,)`` or
            ``(K, C)``; default uniform ``1/K``. Softmax maps a 0 entry to
            ``eps(dtype)``, its closest reachable value.
        scale: Learn a scalar :math:`\gamma` (initialised to 1) multiplying the sum.
        bias: Learn a bias added after the sum: a scalar, or one per channel.
        channels: C, to learn one weight vector per channel (shape ``(K, C)``).
        channel_dim: Dim of each input holding the C channels.
        init_logits: K initial pre-weights (ScalarMix's ``initial_scalar_parameters``),
            shape ``(K,)`` or ``(K, C)``, set as the parametrization's unconstrained
            tensor: the weights are their softmax (their sparsemax, relu map or
            affine projection for the other maps). Exclusive with ``init``.
        trainable: ``False`` fixes the weights: their pre-weights are a buffer,
            saved in the state_dict under the same key but not in ``parameters()``
            (``scale`` and ``bias``, if asked for, still learn). Checkpoints of
            trainable and fixed modules load into each other.
        layer_norm: Normalise each input before mixing, as ScalarMix's
            ``do_layer_norm``: ``(x_k - mean_k) / sqrt(var_k + 1e-12)`` with the
            mean and (biased) variance of input k over all its elements, or over the
            positions of ``layer_norm_mask`` (see :meth:`forward`). The normalisation
            is folded into the sum (no normalised copy of the inputs); an input with
            no position left in the mask contributes 0.
        dropout: Layer dropout (UDify's ``ScalarMixWithDropout``): in training mode
            each input is left out of a call with probability ``dropout`` and the
            weights of the others are renormalised, as for ``mask``; a row whose
            inputs are all left out keeps one of them, chosen at random. No effect
            in eval mode. In ``[0, 1)``.

    Attributes:
        weights: The current constrained weights, shape ``(K,)`` or ``(K, C)``
            (an ``UninitializedParameter`` until a lazy module's first call).
        scale: The scalar :math:`\gamma`, or ``None``.
        bias: The bias, shape ``()`` or ``(C,)``, or ``None``.
        num_inputs: K, or ``None`` until a lazy module's first call.
        names: The input names, or ``None``.
        trainable: Whether the weights learn.
        layer_norm: Whether each input is normalised before mixing.
        dropout: The layer dropout probability.

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: If ``num_inputs`` < 1, ``names`` are empty or repeated, K from
            ``num_inputs``, ``names``, ``init`` and ``init_logits`` disagree,
            ``weights``/``method`` is unknown, ``channels`` < 1, ``init`` has the
            wrong shape or is off the set, both ``init`` and ``init_logits`` are
            given, ``init_logits`` has the wrong shape or a non-finite entry, or
            ``dropout`` is outside ``[0, 1)``.

    Example:
        >>> import torch
        >>> import sumto
        >>> mix = sumto.WeightedSum(3, init=[0.2, 0.3, 0.5])
        >>> mix.weights
        tensor([0.2000, 0.3000, 0.5000], grad_fn=<...>)
        >>> xs = [torch.full((2, 4), float(k)) for k in range(3)]
        >>> mix(xs)
        tensor([[1.3000, 1.3000, 1.3000, 1.3000],
                [1.3000, 1.3000, 1.3000, 1.3000]], grad_fn=<...>)
        >>> named = sumto.WeightedSum(names=["a", "b", "c"], init=[0.2, 0.3, 0.5])
        >>> named({"a": xs[0], "c": xs[2]})[0, 0]  # (0.2 * 0 + 0.5 * 2) / 0.7
        tensor(1.4286, grad_fn=<...>)

        AllenNLP's ``ScalarMix(3, do_layer_norm=True, initial_scalar_parameters=s,
        trainable=False)`` with layer dropout:

        >>> mix = sumto.WeightedSum(
        ...     init_logits=[0.0, 1.0, 2.0], trainable=False, layer_norm=True, dropout=0.2
        ... )
        >>> mix.weights
        tensor([0.0900, 0.2447, 0.6652])
        >>> list(mix.parameters())
        []
        >>> hidden = [torch.randn(2, 5, 8) for _ in range(3)]  # (batch, time, features)
        >>> tokens = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
        >>> mix(hidden, layer_norm_mask=tokens).shape
        torch.Size([2, 5, 8])
    """

    weights: Tensor
    scale: Tensor | None
    bias: Tensor | None

    def __init__(
        self,
        num_inputs: int | None = None,
        *,
        names: Sequence[str] | None = None,
        weights: WeightKind = "simplex",
        method: SimplexMethod = "softmax",
        init: Sequence[float] | Tensor | None = None,
        scale: bool = False,
        bias: bool = False,
        channels: int | None = None,
        channel_dim: int = 1,
        init_logits: Sequence[float] | Tensor | None = None,
        trainable: bool = True,
        layer_norm: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.kind: WeightKind = _check_kind(weights, method)
        self.method: SimplexMethod = method
        self.names: tuple[str, ...] | None = _check_names(names)
        self.channels: int | None = _check_channels(channels)
        if isinstance(channel_dim, bool) or not isinstance(channel_dim, int):
            raise TypeError(f"expected channel_dim to be an int, got {channel_dim!r}")
        self.channel_dim = channel_dim
        flags = (("scale", scale), ("bias", bias), ("trainable", trainable))
        for flag_name, flag in (*flags, ("layer_norm", layer_norm)):
            if not isinstance(flag, bool):
                raise TypeError(f"expected {flag_name} to be a bool, got {flag!r}")
        self.trainable = trainable
        self.layer_norm = layer_norm
        self.dropout = _check_dropout(dropout)
        if init is not None and init_logits is not None:
            raise ValueError(
                "expected at most one of init (weights) and init_logits (pre-weights), got both"
            )
        init_value = _check_init(init, channels)
        logits = _check_init(init_logits, channels, "init_logits")
        if logits is not None and not bool(torch.isfinite(logits).all()):
            raise ValueError(f"expected finite init_logits, got {init_logits!r}")
        self.num_inputs: int | None = _resolve_count(
            num_inputs, self.names, init_value if logits is None else logits, logits is not None
        )

        _install_load_hook(self)  # before any load: hooks cannot be added during one
        self._register_state_dict_hook(_save_names_hook)  # type: ignore[no-untyped-call]
        if self.num_inputs is None:
            if trainable:
                self.weights = UninitializedParameter()
            else:
                self.register_buffer("weights", UninitializedBuffer())
        else:
            self._create_weights(self.num_inputs, init_value, logits)
        self.scale = nn.Parameter(torch.ones(())) if scale else None
        bias_shape = () if channels is None else (channels,)
        self.bias = nn.Parameter(torch.zeros(bias_shape)) if bias else None
        # Whether a call without masks is the plain softmax mix (see forward); the
        # weights' Simplex keeps its default temperature 1.
        self._lean = (
            self.kind == "simplex"
            and method == "softmax"
            and channels is None
            and not (scale or bias or layer_norm)
        )

    # -- sizing ---------------------------------------------------------------
    def _create_weights(self, k: int, init: Tensor | None, logits: Tensor | None = None) -> None:
        """Register the constrained ``(K,)`` or ``(K, C)`` weights with value ``init``.

        ``logits``, if given, are set as the pre-weights after registration.
        """
        shape = (k,) if self.channels is None else (k, self.channels)
        current = own_parameter(self, "weights")
        if current is None:
            current = dict(self.named_buffers(recurse=False)).get("weights")
        if isinstance(current, (UninitializedParameter, UninitializedBuffer)):
            current.materialize(shape)  # keeps the placeholder's device and dtype
        elif self.trainable:
            self.weights = nn.Parameter(torch.empty(shape))
        else:
            # A buffer: in the state_dict under the same key, never in parameters().
            self.register_buffer("weights", torch.empty(shape))
        if init is None:
            value = torch.full(shape, 1.0 / k)
        elif init.ndim == 1 and self.channels is not None:
            value = init.unsqueeze(1).expand(shape)
        else:
            value = init
        if tuple(value.shape) != shape:
            raise ValueError(f"expected init of shape {shape} for K={k}, got {tuple(value.shape)}")
        constraint: Simplex | AffineSum
        if self.kind == "simplex":
            constraint = Simplex(dim=0, method=self.method)
        else:
            constraint = AffineSum(dim=0)
        constrain(self, "weights", constraint, init=value)
        self.num_inputs = k
        if logits is not None:
            pre = self._pre_weights_tensor()
            with torch.no_grad():
                pre.copy_(logits.unsqueeze(1).expand(shape) if logits.ndim < len(shape) else logits)

    def initialize_parameters(
        self, inputs: Inputs, mask: Tensor | None = None, *, layer_norm_mask: Tensor | None = None
    ) -> None:
        """Size the weights from the first call's inputs (LazyModuleMixin hook).

        Args:
            inputs: The first call's inputs; K is their number.
            mask: Unused.
            layer_norm_mask: Unused.

        Raises:
            TypeError: If ``inputs`` is not a list, tuple or stacked tensor.
            ValueError: If there are no inputs.
        """
        if self.num_inputs is not None:
            return
        if isinstance(inputs, Tensor):
            if inputs.ndim == 0:
                raise ValueError("expected a stacked tensor of shape (K, ...), got a 0-d tensor")
            k = inputs.shape[0]
        elif isinstance(inputs, (list, tuple)):
            k = len(inputs)
        else:
            raise TypeError(_inputs_type_message(inputs, self.names))
        if k < 1:
            raise ValueError("expected at least one input to size the weights, got none")
        with torch.no_grad():
            self._create_weights(k, None)

    def _infer_parameters(
        self, module: nn.Module, args: Any, kwargs: dict[str, Any] | None = None
    ) -> None:
        """LazyModuleMixin's forward pre-hook, run once by one thread at a time.

        A thread that waited while another sized the module finds the hook removed
        and returns; the module it then runs is fully sized.
        """
        with _LAZY_INIT_LOCK:
            if not hasattr(module, "_initialize_hook"):
                return
            # kwargs only from the torch versions that register the hook with_kwargs.
            extra = () if kwargs is None else (kwargs,)
            super()._infer_parameters(module, args, *extra)  # type: ignore[misc]

    def _lazy_load_hook(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: Any,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        """Size an unsized module from a checkpoint (constrained or baked plain key)."""
        if self.num_inputs is not None:
            return
        for key in (prefix + _ORIGINAL, prefix + "weights"):
            value = state_dict.get(key)
            if isinstance(value, Tensor) and value.ndim >= 1 and not is_lazy(value):
                if value.shape[0] < 1:
                    raise ValueError(
                        f"expected checkpoint entry {key!r} with K >= 1 rows, one per input, "
                        f"got shape {tuple(value.shape)}"
                    )
                with torch.no_grad():
                    self._create_weights(value.shape[0], None)
                return

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        """Check the checkpoint's names and K, realign its weights, then load.

        Runs before this module's hooks and tensors (and its parametrization, a
        child): a refused checkpoint changes none of them.
        """
        _align_checkpoint(self, state_dict, prefix, local_metadata)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    # -- forward ----------------------------------------------------------------
    def forward(
        self,
        inputs: Inputs,
        mask: Tensor | None = None,
        *,
        layer_norm_mask: Tensor | None = None,
    ) -> Tensor:
        """Weighted sum of the inputs.

        Args:
            inputs: A list/tuple of K tensors of identical shape, one tensor of shape
                ``(K, ...)`` stacked along dim 0, or (with ``names``) a dict
                name -> tensor holding all names or a subset of them.
            mask: Optional bool tensor ``(K,)`` or ``(B, K)`` (``B`` = size of the
                inputs' dim 0): False marks an absent input, per row. In eager mode a
                row with no input present raises ValueError, which reads the mask on
                the host (a device sync for an accelerator mask); compiled code skips
                that check and gives such a row all-zero weights (output = bias).
            layer_norm_mask: Optional bool tensor of the inputs' shape without the
                last dim (e.g. ``(batch, time)`` for ``(batch, time, features)``
                inputs), True at real positions, with ``layer_norm=True`` only: the
                mean and variance of each input are taken over the True positions
                (all features), as ScalarMix's ``mask``. All positions are normalised.

        Returns:
            Tensor of the inputs' shape and dtype.

        Raises:
            KeyError: If a dict key is not one of ``names``.
            TypeError: If ``inputs``, ``mask`` or ``layer_norm_mask`` has the wrong type
                or dtype.
            IndexError: If ``channel_dim`` is out of range for the inputs.
            ValueError: If the number of inputs differs from K, their shapes or
                devices differ, the channel size is not C, ``mask`` has the wrong
                shape, or (eager mode) a mask row has no input present, or
                ``layer_norm_mask`` is given without ``layer_norm=True``, has the
                wrong shape or another device.
        """
        if (
            self._lean
            and mask is None
            and layer_norm_mask is None
            and isinstance(inputs, (list, tuple))
            and len(inputs) == self.num_inputs
            and not (self.training and self.dropout > 0.0)
        ):
            # The plain softmax mix of all K inputs: the same checks and sum as below,
            # without the steps that options and masks need (tiny mixes are overhead).
            _check_same(inputs, None)
            pre = self._pre_weights()
            if pre is not None:
                w = torch.softmax(pre, 0)
                acc = F._compute_dtype(inputs[0].dtype)
                return weighted_sum(w if w.dtype == acc else w.to(acc), inputs)
        tensors, present = self._parse_inputs(inputs)
        if isinstance(tensors, Tensor):
            shape, device = tuple(tensors.shape[1:]), tensors.device
            dtype = tensors.dtype
        else:
            first = tensors[0]
            shape, device, dtype = tuple(first.shape), first.device, first.dtype
        channel_dim = self._channel_dim(shape)
        row_mask = None if mask is None else self._check_mask(mask, shape, device, present)
        if self.dropout > 0.0 and self.training:
            count = self.num_inputs if present is None else len(present)
            row_mask = _drop_inputs(count, row_mask, self.dropout, device)  # type: ignore[arg-type]
        coefficients = self._coefficients(present, row_mask, dtype)
        coefficients = self._broadcast_coefficients(coefficients, row_mask, shape, channel_dim)
        bias = self.bias
        if bias is not None and bias.ndim == 1:
            view = [1] * len(shape)
            view[channel_dim] = bias.shape[0]
            bias = bias.reshape(view)
        if self.layer_norm:
            ln_mask = self._check_layer_norm_mask(layer_norm_mask, shape, device)
            coefficients, bias = _fold_layer_norm(coefficients, bias, tensors, ln_mask)
        elif layer_norm_mask is not None:
            raise ValueError(
                "expected layer_norm_mask only with layer_norm=True, got a mask for a "
                "WeightedSum with layer_norm=False"
            )
        return weighted_sum(coefficients, tensors, bias)

    def _parse_inputs(self, inputs: Inputs) -> tuple[Sequence[Tensor] | Tensor, list[int] | None]:
        """Validate the inputs: (the tensors or stacked tensor, present indices or None)."""
        k = self.num_inputs
        if k is None:  # only reachable when forward is called without the lazy hook
            raise ValueError("expected a sized WeightedSum, got one whose K is not set yet")
        present: list[int] | None = None
        if isinstance(inputs, (list, tuple)):
            if len(inputs) != k:
                raise ValueError(
                    f"expected {k} inputs, got {len(inputs)}; {_leave_out_hint(k, self.names)}"
                )
            tensors: Sequence[Tensor] = inputs
        elif isinstance(inputs, Mapping) and self.names is not None:
            unknown = [key for key in inputs if key not in self.names]
            if unknown:
                raise KeyError(f"expected input names among {list(self.names)}, got {unknown!r}")
            if len(inputs) == 0:
                raise ValueError(
                    f"expected at least one of the inputs {list(self.names)}, got {{}}"
                )
            present = [i for i, name in enumerate(self.names) if name in inputs]
            tensors = [inputs[self.names[i]] for i in present]
            if len(present) == k:
                present = None
        elif isinstance(inputs, Tensor):
            if inputs.ndim == 0 or inputs.shape[0] != k:
                raise ValueError(
                    f"expected a stacked tensor of shape ({k}, ...), got shape "
                    f"{tuple(inputs.shape)}; {_leave_out_hint(k, self.names)}"
                )
            F._check_float_tensor(inputs, "the stacked inputs")
            return inputs, None
        else:
            raise TypeError(_inputs_type_message(inputs, self.names))
        _check_same(tensors, present)
        return tensors, present

    def _channel_dim(self, shape: tuple[int, ...]) -> int:
        """Normalised channel dim for inputs of ``shape`` (-1 when not per-channel)."""
        if self.channels is None:
            return -1
        ndim = len(shape)
        if not -ndim <= self.channel_dim < ndim:
            raise IndexError(
                f"expected channel_dim in range [{-ndim}, {ndim - 1}] for inputs of shape "
                f"{shape}, got {self.channel_dim}"
            )
        dim = self.channel_dim % ndim
        if shape[dim] != self.channels:
            raise ValueError(
                f"expected inputs with {self.channels} channels along dim {self.channel_dim}, "
                f"got shape {shape}"
            )
        return dim

    def _check_mask(
        self, mask: Tensor, shape: tuple[int, ...], device: torch.device, present: list[int] | None
    ) -> Tensor:
        """Validate ``mask`` and restrict it to the present inputs: (K',) or (B, K')."""
        k = self.num_inputs
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            got = f"dtype {mask.dtype}" if isinstance(mask, Tensor) else type(mask).__name__
            raise TypeError(f"expected mask to be a bool tensor, got {got}")
        if mask.ndim == 2 and len(shape) == 0:
            raise ValueError(
                f"expected a mask of shape ({k},) for 0-d inputs, got {tuple(mask.shape)}"
            )
        batch = shape[0] if len(shape) > 0 else None
        if not (mask.shape == (k,) or (mask.ndim == 2 and mask.shape == (batch, k))):
            raise ValueError(
                f"expected mask of shape ({k},) or ({batch}, {k}) for inputs of shape {shape}, "
                f"got shape {tuple(mask.shape)}"
            )
        if mask.ndim == 2 and self.channels is not None and self._channel_dim(shape) == 0:
            raise ValueError(
                "expected channel_dim != 0 with a per-row (B, K) mask (both index dim 0), "
                f"got channel_dim={self.channel_dim}"
            )
        if mask.device != device:
            raise ValueError(f"expected mask on the inputs' device {device}, got {mask.device}")
        if present is not None:
            mask = torch.stack([mask[..., i] for i in present], dim=-1)
        # Note [Empty mask rows]: detecting a row with no input present needs the mask's
        # values on the host. Eager mode checks it (a device sync when the mask lives on
        # an accelerator); compiled code skips the check, and such a row gets all-zero
        # weights (the output is the bias), never NaN.
        if not is_compiling():
            rows = mask.any(-1)
            if not bool(rows.all()):
                where = "" if mask.ndim == 1 else f" (row {int(torch.nonzero(~rows)[0, 0])})"
                raise ValueError(
                    f"expected at least one input present in every mask row, got none{where}"
                )
        return mask

    def _check_layer_norm_mask(
        self, mask: Tensor | None, shape: tuple[int, ...], device: torch.device
    ) -> Tensor | None:
        """Validate ``layer_norm_mask``: a bool tensor of the inputs' shape without the last dim."""
        if mask is None:
            return None
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            got = f"dtype {mask.dtype}" if isinstance(mask, Tensor) else type(mask).__name__
            raise TypeError(f"expected layer_norm_mask to be a bool tensor, got {got}")
        if len(shape) == 0:
            raise ValueError(
                "expected inputs with at least 1 dim for layer_norm_mask, got 0-d inputs"
            )
        if tuple(mask.shape) != shape[:-1]:
            raise ValueError(
                f"expected layer_norm_mask of shape {shape[:-1]} (the inputs' shape {shape} "
                f"without the last dim), got shape {tuple(mask.shape)}"
            )
        if mask.device != device:
            raise ValueError(
                f"expected layer_norm_mask on the inputs' device {device}, got {mask.device}"
            )
        return mask

    # -- weights --------------------------------------------------------------
    def _coefficients(
        self, present: list[int] | None, mask: Tensor | None, input_dtype: torch.dtype
    ) -> Tensor:
        """Weights times scale, shape (K',), (K', C), (K', B) or (K', B, C)."""
        if present is not None or mask is not None:
            w = self._renormalised(present, mask)
        elif self.kind == "simplex" and self.method == "softmax":
            pre = self._pre_weights()
            # The softmax straight from the pre-weights: the map the parametrization
            # computes, without its per-call checks (the weights of tiny mixes).
            w = self.weights if pre is None else torch.softmax(pre, 0)
        else:
            w = self.weights
        acc = F._compute_dtype(input_dtype)
        if w.dtype != acc:
            w = w.to(acc)
        scale = self.scale
        if scale is not None:
            w = w * (scale if scale.dtype == acc else scale.to(acc))
        return w

    def _pre_weights(self) -> Tensor | None:
        """The softmax/sparsemax pre-weights, or None (relu, affine, or baked weights)."""
        if self.kind != "simplex" or self.method == "relu":
            return None
        plists: Any = getattr(self, "parametrizations", None)
        if plists is None or "weights" not in plists:  # after sumto.bake
            return None
        original: Tensor = plists["weights"].original
        return original

    def _pre_weights_tensor(self) -> Tensor:
        """The parametrization's unconstrained tensor (a parameter, or a buffer if frozen)."""
        plists: Any = self.parametrizations
        original: Tensor = plists.weights.original
        return original

    def _renormalised(self, present: list[int] | None, mask: Tensor | None) -> Tensor:
        """Weights of the present inputs, renormalised; laid out (K', [B], [C])."""
        # softmax and sparsemax renormalise from the pre-weights, relu and affine from
        # the constrained weights. A baked module has only the constrained weights:
        # its softmax weights are rescaled (the masked softmax of the pre-weights,
        # exactly) and its sparsemax weights projected (see the class docstring).
        pre = self._pre_weights()
        source = self.weights if pre is None else pre
        if present is not None:
            source = torch.stack([source[i] for i in present])
        count = source.shape[0]
        # Layout (rows, K', columns): rows are mask rows, columns are channels.
        x = source.to(F._compute_dtype(source.dtype)).reshape(1, count, -1)
        m = None if mask is None else mask.reshape(-1, count, 1)
        if self.kind == "affine":
            out = _shift_affine(x, m)
        elif self.method == "relu" or (self.method == "softmax" and pre is None):
            out = _rescale(x, m)
        elif self.method == "softmax":
            out = _masked_softmax(x, m)
        else:
            out = _masked_sparsemax(x, m)
        out = out.transpose(0, 1)  # (K', rows, columns)
        if mask is None or mask.ndim == 1:
            out = out.squeeze(1)
        return out.reshape(count, *out.shape[1:-1], *source.shape[1:])

    def _broadcast_coefficients(
        self, w: Tensor, mask: Tensor | None, shape: tuple[int, ...], channel_dim: int
    ) -> Tensor:
        """View (K', [B], [C]) weights as (K', *w_shape) aligned with the inputs."""
        per_row = mask is not None and mask.ndim == 2
        if not per_row and self.channels is None:
            return w
        view = [1] * len(shape)
        if per_row:
            view[0] = shape[0]
        if self.channels is not None:
            view[channel_dim] = self.channels
        return w.reshape(w.shape[0], *view)

    def extra_repr(self) -> str:
        k = "?" if self.num_inputs is None else str(self.num_inputs)
        parts = [f"num_inputs={k}", f"weights={self.kind!r}"]
        if self.kind == "simplex":
            parts.append(f"method={self.method!r}")
        if self.names is not None:
            parts.append(f"names={list(self.names)}")
        if self.channels is not None:
            parts.append(f"channels={self.channels}, channel_dim={self.channel_dim}")
        if self.scale is not None:
            parts.append("scale=True")
        if self.bias is not None:
            parts.append("bias=True")
        if not self.trainable:
            parts.append("trainable=False")
        if self.layer_norm:
            parts.append("layer_norm=True")
        if self.dropout > 0.0:
            parts.append(f"dropout={self.dropout:g}")
        return ", ".join(parts)


# ---------------------------------------------------------------------------
# renormalisation over the present inputs, layout (rows, K', columns), reduce dim 1
# ---------------------------------------------------------------------------


def _masked_softmax(logits: Tensor, mask: Tensor | None) -> Tensor:
    """Softmax over dim 1 of the present entries; 0 for absent ones and empty rows."""
    if mask is None:
        return torch.softmax(logits, dim=1)
    masked = torch.where(mask, logits, -math.inf)
    peak = masked.detach().amax(1, keepdim=True)
    peak = torch.where(torch.isfinite(peak), peak, 0.0)
    e = torch.exp(masked - peak)
    total = e.sum(1, keepdim=True)
    return e / torch.where(total > 0, total, 1.0)


def _masked_sparsemax(pre: Tensor, mask: Tensor | None) -> Tensor:
    """Euclidean projection of the present pre-weights onto the simplex (dim 1)."""
    rows = pre.transpose(1, 2)  # (rows, columns, K')
    if mask is None:
        return F._project_simplex_rows(rows, 1.0).transpose(1, 2)
    m = mask.transpose(1, 2)
    rows = rows.expand(m.shape[0], -1, -1)
    # An absent entry set below (min present - total - 1) is never in the support,
    # whose threshold is at least (max present - total).
    low = torch.where(m, rows, math.inf).detach().amin(-1, keepdim=True) - 2.0
    low = torch.where(torch.isfinite(low), low, 0.0)
    projected = F._project_simplex_rows(torch.where(m, rows, low), 1.0)
    return torch.where(m, projected, 0.0).transpose(1, 2)


def _rescale(w: Tensor, mask: Tensor | None) -> Tensor:
    """Present positive weights divided by their sum (0 for empty rows)."""
    if mask is not None:
        w = torch.where(mask, w, 0.0)
    total = w.sum(1, keepdim=True)
    return w / torch.where(total > 0, total, 1.0)


def _shift_affine(w: Tensor, mask: Tensor | None) -> Tensor:
    """Spread the deficit 1 - sum(present) equally over the present weights."""
    if mask is None:
        return w + (1.0 - w.sum(1, keepdim=True)) / w.shape[1]
    present = torch.where(mask, w, 0.0)
    count = mask.sum(1, keepdim=True).clamp_min(1).to(w.dtype)
    shifted = w + (1.0 - present.sum(1, keepdim=True)) / count
    return torch.where(mask, shifted, 0.0)


def _drop_inputs(count: int, mask: Tensor | None, p: float, device: torch.device) -> Tensor:
    """Layer dropout: ``mask`` (or all present) with each input dropped with probability ``p``.

    One uniform draw per input for the whole call. A row left with no input keeps the
    present input whose draw came closest to being kept (uniformly random among them),
    so no row loses all of its inputs; no value is read on the host.
    """
    u = torch.rand(count, device=device)
    keep = u >= p
    if mask is None:
        return torch.where(keep.any(), keep, u == u.amax())
    u_present = torch.where(mask, u, -1.0)
    best = (u_present == u_present.amax(-1, keepdim=True)) & mask
    kept = keep & mask
    return torch.where(kept.any(-1, keepdim=True), kept, best)


def _moments(x: Tensor, dims: tuple[int, ...], mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Mean and ``1 / sqrt(var + eps)`` of ``x`` over ``dims`` and the True positions of ``mask``.

    ``mask`` broadcasts against ``x``; the count is the number of True positions
    times the size of the last dim (ScalarMix's ``num_elements_not_masked``). With no
    position left the inverse deviation is 0: that input then contributes nothing.
    """
    if mask is None:
        var, mean = torch.var_mean(x, dim=dims, correction=0)
        return mean, torch.rsqrt(var + _LAYER_NORM_EPS)
    count = mask.sum(dtype=x.dtype) * x.shape[-1]
    safe = count.clamp_min(1.0)
    mean = torch.where(mask, x, 0.0).sum(dims, keepdim=True) / safe
    var = torch.where(mask, x - mean, 0.0).square().sum(dims) / safe
    inv_std = torch.where(count > 0, torch.rsqrt(var + _LAYER_NORM_EPS), 0.0)
    return mean.reshape(var.shape), inv_std


def _layer_norm_stats(
    tensors: Sequence[Tensor] | Tensor, mask: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Mean and inverse deviation of every input, shape (K',), in the compute dtype."""
    acc = F._compute_dtype(tensors[0].dtype if not isinstance(tensors, Tensor) else tensors.dtype)
    if isinstance(tensors, Tensor) and tensors.ndim >= 2:
        x = tensors if tensors.dtype == acc else tensors.to(acc)
        dims = tuple(range(1, x.ndim))
        m = None if mask is None else mask.unsqueeze(-1).unsqueeze(0)
        return _moments(x, dims, m)
    xs = along_first_dim(tensors) if isinstance(tensors, Tensor) else tensors
    m = None if mask is None else mask.unsqueeze(-1)
    parts = [_moments(x if x.dtype == acc else x.to(acc), tuple(range(x.ndim)), m) for x in xs]
    return torch.stack([mean for mean, _ in parts]), torch.stack([inv for _, inv in parts])


def _fold_layer_norm(
    coefficients: Tensor,
    bias: Tensor | None,
    tensors: Sequence[Tensor] | Tensor,
    mask: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """Fold the normalisation of every input into the mix's coefficients and bias.

    ``sum_k c_k (x_k - m_k) / s_k = sum_k (c_k / s_k) x_k - sum_k c_k m_k / s_k``: the
    normalised inputs are never materialised, and the one-pass sum still applies.
    """
    mean, inv_std = _layer_norm_stats(tensors, mask)
    view = (coefficients.shape[0],) + (1,) * (coefficients.ndim - 1)
    scaled = coefficients * inv_std.reshape(view)
    shift = (scaled * mean.reshape(view)).sum(0)
    return scaled, -shift if bias is None else bias - shift


# ---------------------------------------------------------------------------
# construction-time validation
# ---------------------------------------------------------------------------


def _check_kind(weights: str, method: str) -> WeightKind:
    if weights not in _WEIGHT_KINDS:
        raise ValueError(f"expected weights to be one of {_WEIGHT_KINDS}, got {weights!r}")
    # entmax weights would need a masked entmax to renormalise over present inputs
    methods = tuple(m for m in _SIMPLEX_METHODS if m != "entmax")
    if method not in methods:
        raise ValueError(f"expected method to be one of {methods}, got {method!r}")
    if weights == "affine" and method != "softmax":
        raise ValueError(
            f"expected method='softmax' (the default, unused) with weights='affine', got {method!r}"
        )
    return weights  # type: ignore[return-value]


def _check_names(names: Sequence[str] | None) -> tuple[str, ...] | None:
    if names is None:
        return None
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise TypeError(f"expected names to be a sequence of str, got {names!r}")
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"expected names to be a sequence of str, got {name!r} in {names!r}")
    if len(names) == 0:
        raise ValueError("expected at least one name, got an empty sequence")
    if len(set(names)) != len(names):
        repeated = sorted({n for n in names if list(names).count(n) > 1})
        raise ValueError(f"expected distinct names, got repeated {repeated}")
    return tuple(names)


def _check_channels(channels: int | None) -> int | None:
    if channels is None:
        return None
    if isinstance(channels, bool) or not isinstance(channels, int):
        raise TypeError(f"expected channels to be an int or None, got {channels!r}")
    if channels < 1:
        raise ValueError(f"expected channels >= 1, got {channels}")
    return channels


def _check_init(
    init: Sequence[float] | Tensor | None, channels: int | None, name: str = "init"
) -> Tensor | None:
    if init is None:
        return None
    if isinstance(init, Tensor):
        value = init.detach()
    elif isinstance(init, Sequence) and not isinstance(init, str):
        try:
            value = torch.tensor(init, dtype=torch.float64)
        except (TypeError, ValueError) as error:
            raise TypeError(f"expected {name} to be a sequence of floats, got {init!r}") from error
    else:
        raise TypeError(f"expected {name} to be a sequence of floats or a tensor, got {init!r}")
    if not value.dtype.is_floating_point:
        value = value.to(torch.float64)
    expected = "(K,)" if channels is None else f"(K,) or (K, {channels})"
    ok = value.ndim == 1 or (
        channels is not None and value.ndim == 2 and value.shape[1] == channels
    )
    if not ok or value.shape[0] == 0:
        raise ValueError(f"expected {name} of shape {expected}, got shape {tuple(value.shape)}")
    return value


def _check_dropout(dropout: float) -> float:
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)):
        raise TypeError(f"expected dropout to be a float, got {dropout!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"expected dropout in [0, 1), got {dropout!r}")
    return float(dropout)


def _resolve_count(
    num_inputs: int | None, names: tuple[str, ...] | None, init: Tensor | None, logits: bool
) -> int | None:
    if num_inputs is not None:
        if isinstance(num_inputs, bool) or not isinstance(num_inputs, int):
            raise TypeError(f"expected num_inputs to be an int or None, got {num_inputs!r}")
        if num_inputs < 1:
            raise ValueError(f"expected num_inputs >= 1, got {num_inputs}")
    counts = {
        "num_inputs": num_inputs,
        "len(names)": None if names is None else len(names),
        ("len(init_logits)" if logits else "len(init)"): None if init is None else init.shape[0],
    }
    given = {key: value for key, value in counts.items() if value is not None}
    if len(set(given.values())) > 1:
        raise ValueError(f"expected one number of inputs K, got {given}")
    return next(iter(given.values()), None)


def _leave_out_hint(k: int, names: tuple[str, ...] | None) -> str:
    """How to call a module of K inputs with some of them missing."""
    if names is not None:
        subset = f"pass a dict with a subset of names {list(names)}"
    else:
        subset = "build WeightedSum(names=[...]) and pass a dict of the present inputs"
    return f"to leave inputs out, {subset}, or pass all {k} with mask= (False = missing)"


def _inputs_type_message(inputs: object, names: tuple[str, ...] | None) -> str:
    expected = "a list or tuple of tensors, a stacked tensor"
    expected += " or a dict name -> tensor" if names is not None else " (a dict needs names=...)"
    return f"expected inputs to be {expected}, got {type(inputs).__name__}"


def _check_same(tensors: Sequence[Tensor], present: list[int] | None) -> None:
    """Every input a floating tensor with the first one's shape, dtype and device."""
    first = tensors[0]
    if isinstance(first, Tensor) and first.dtype.is_floating_point:
        shape, dtype, device = first.shape, first.dtype, first.device
        for t in tensors:
            if not (
                isinstance(t, Tensor)
                and t.shape == shape
                and t.dtype == dtype
                and t.device == device
            ):
                break
        else:
            return
    # Some input differs: find and name it.
    labels = [str(i) for i in (present or range(len(tensors)))]
    for label, t in zip(labels, tensors, strict=True):
        F._check_float_tensor(t, f"input {label}")
    shapes = [tuple(t.shape) for t in tensors]
    if any(s != shapes[0] for s in shapes):
        raise ValueError(f"expected inputs of identical shape, got shapes {shapes}")
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) > 1:
        raise TypeError(
            f"expected inputs of one dtype, got dtypes {[str(t.dtype) for t in tensors]}"
        )
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(
            f"expected inputs on one device, got devices {[str(t.device) for t in tensors]}"
        )


# ---------------------------------------------------------------------------
# checkpoints: input names and K in the state_dict's metadata
# ---------------------------------------------------------------------------


def _save_names_hook(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any]
) -> None:
    """Record K and the names in this module's ``_metadata`` entry (no state_dict value)."""
    if not isinstance(module, WeightedSum):  # registered by WeightedSum.__init__ only
        return
    if module.num_inputs is not None:
        local_metadata[_COUNT_KEY] = module.num_inputs
    if module.names is not None:
        local_metadata[_NAMES_KEY] = list(module.names)
    local_metadata[_LAYER_NORM_KEY] = module.layer_norm
    local_metadata[_DROPOUT_KEY] = module.dropout
    local_metadata[_TRAINABLE_KEY] = module.trainable


def _align_checkpoint(
    module: WeightedSum, state_dict: dict[str, Any], prefix: str, metadata: dict[str, Any]
) -> None:
    """Refuse a checkpoint of other inputs; put the weights of renamed ones in this order.

    A checkpoint without the metadata (saved before it existed, or a hand-made dict)
    loads positionally. Names are compared when both sides have them, K whenever
    both are known (an unsized module takes K from the checkpoint).
    """
    saved_names = metadata.get(_NAMES_KEY)
    saved_k = metadata.get(_COUNT_KEY)
    where = f"WeightedSum {prefix[:-1]!r}" if prefix else "WeightedSum"
    saved_norm = metadata.get(_LAYER_NORM_KEY)
    if saved_norm is not None and saved_norm is not module.layer_norm:
        # The weights were learned for (un)normalised inputs: another function.
        raise ValueError(
            f"expected a checkpoint of {where} with layer_norm={module.layer_norm}, "
            f"got layer_norm={saved_norm!r}"
        )
    if saved_names is None and saved_k is None:
        return
    if saved_names is not None and not (
        isinstance(saved_names, (list, tuple)) and all(isinstance(n, str) for n in saved_names)
    ):
        raise ValueError(f"expected checkpoint input names as a list of str, got {saved_names!r}")
    if saved_k is not None and (isinstance(saved_k, bool) or not isinstance(saved_k, int)):
        raise ValueError(f"expected the checkpoint's number of inputs as an int, got {saved_k!r}")
    own = None if module.names is None else list(module.names)
    theirs = None if saved_names is None else list(saved_names)
    if own is not None and theirs is not None:
        if sorted(own) != sorted(theirs):
            raise ValueError(
                f"expected a checkpoint of {where} with input names {own} (in any order), "
                f"got input names {theirs}"
            )
        if own != theirs:
            _permute_weights(state_dict, prefix, [theirs.index(name) for name in own])
        return
    k = module.num_inputs
    if saved_k is not None and k is not None and saved_k != k:
        raise ValueError(
            f"expected a checkpoint of {where} with K={k} inputs{_named(own)}, "
            f"got K={saved_k}{_named(theirs)}"
        )


def _named(names: list[str] | None) -> str:
    return "" if names is None else f" named {names}"


def _permute_weights(state_dict: dict[str, Any], prefix: str, order: list[int]) -> None:
    """Replace the checkpoint's weights (pre-weights or baked) by their rows in ``order``.

    New tensors in the load's own copy of the dict: the caller's checkpoint is unchanged.
    A tensor of another shape is left for torch's own size check to report.
    """
    for key in (prefix + _ORIGINAL, prefix + "weights"):
        value = state_dict.get(key)
        if isinstance(value, Tensor) and value.ndim >= 1 and value.shape[0] == len(order):
            index = torch.tensor(order, device=value.device)
            state_dict[key] = value.index_select(0, index)

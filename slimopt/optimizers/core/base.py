"""``SlimOptimizer``: what every slimopt optimizer shares, whatever its matrix rule.

- hyperparameter validation at construction and for every added group (clear ``ValueError``s);
- a stable integer key per parameter (for counter-based randomness, see ``rng``);
- the **dense AdamW fallback**: parameters the matrix rule does not take (not 2-D, or in a group
  with ``dense=True``) get AdamW from the shared Adam functions, so each optimizer is a one-line
  replacement for AdamW;
- the **non-finite gradient policy**: with ``nonfinite="skip"`` (default) a parameter whose
  gradient holds NaN or Inf is left untouched for that step (weights, state, step count) and
  ``state["nonfinite_skips"]`` counts it; ``"raise"`` raises ``FloatingPointError``; ``"off"``
  skips the check (it costs one fused norm and one host sync per group);
- **all-or-nothing steps**: ``step()`` first checks everything that can raise (each group's
  hyperparameters as they are now, e.g. after a scheduler set them; that each gradient belongs to
  a parameter, is dense and, with ``"raise"``, finite), then updates: a step that raises has
  changed nothing. ``add_param_group`` and ``load_state_dict`` likewise check before changing;
- **float16 parameters** are refused unless the rule they get keeps no squared-gradient
  statistics in float16 (``takes_float16``): Adam-style second moments underflow there and turn
  finite gradients into NaN weights, as with ``torch.optim.AdamW``;
- lazy state creation, or all at once with ``init_state()`` (also on the meta device);
- **low-precision moments** (``state_dtype``, ``state_precision.py``): the state keys a class
  lists in ``moment_keys`` are stored in bfloat16 or int8; around a parameter's update they are
  decoded into float32 work tensors under their usual keys (``_open_moments``), so the rules
  read and write ``state["exp_avg"]`` as ever, and encoded back after (``_close_moments``). The
  dense AdamW step decodes in bounded chunks (``DENSE_CHUNK`` elements), so that the transient
  float32 copies stay small however large an embedding is;
- a **public seam for distributed engines** (``slimopt.distributed`` uses nothing else):
  ``param_key``/``adopt_key`` (stand-in tensors such as master copies step under their
  parameter's key), ``check_options``, ``step_params`` (whole matrices stepped with the
  single-process code) and ``attach_step_router`` (groups an engine steps itself).

A subclass lists its hyperparameters with their defaults in its ``__init__`` and passes them on as
``super().__init__(params, locals())`` (``hyperparameters.py``: the defaults are written only
there); it implements ``takes_matrix_rule``, ``_init_matrix_state`` and ``_matrix_step``.
"""
from __future__ import annotations

import contextlib
import logging
import sys
import warnings

import torch
from torch.optim import Optimizer

from . import state_checks, state_precision
from .adam import adamw_steps_
from .group_keys import check_known_keys, resolve_aliases
from .hyperparameters import document, option_defaults, split_arguments
from .keys import fresh_key, keys_for
from .naming import split_named_embeddings
from .validation import (check_adam_group, check_bool, check_choice, check_gradient, check_int,
                         check_listed_once, check_parameter, is_dtensor)

logger = logging.getLogger("slimopt")

NONFINITE_MODES = ("skip", "raise", "off")
#: group options newer than some checkpoints, and the value an older checkpoint meant
ADDED_OPTIONS = {"maximize": False}
#: top-level key of ``state_dict()`` naming the ``state_dtype`` its moments are stored in
STATE_DTYPE_KEY = "slimopt_state_dtype"
#: most elements of low-precision dense moments decoded at once in the dense AdamW step (a
#: multiple of the int8 block and of the stochastic rounding's slice): 2 x 16 MiB of float32
DENSE_CHUNK = 1 << 22
FLOAT16_ADVICE = ("use bfloat16, float32 or float64 parameters, or float32 master weights with "
                  "torch.autocast(dtype=torch.float16)")
UNNAMED_ADVICE = ("pass names: {cls}(model.named_parameters(), ...), or groups from "
                  "slimopt.param_groups(model), or a 'param_names' list in each group")


def _caller_level() -> int:
    """The ``stacklevel`` (for a warning in the calling function) of the first frame outside
    slimopt's optimizers and ``torch.optim``: the call that built the optimizer or added the
    group."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__", "").startswith(
            ("slimopt.optimizers.", "torch.optim.")):
        frame, level = frame.f_back, level + 1
    return level


@contextlib.contextmanager
def negated_gradients(params):
    """``maximize``: each parameter's ``.grad`` replaced by its negation for the duration (the
    caller's gradient tensors are left untouched and restored after)."""
    saved = [(p, p.grad) for p in params if p.grad is not None]
    for p, grad in saved:
        p.grad = torch.neg(grad)
    try:
        yield
    finally:
        for p, grad in saved:
            p.grad = grad


class SlimOptimizer(Optimizer):
    #: the method's options (keyword-only hyperparameters) and their defaults: read from the
    #: subclass's ``__init__`` signature, never written by hand
    option_defaults: dict = {}
    #: meaning and valid range of the class's own ``__init__`` arguments, for its docstring's
    #: ``Args:`` block (``hyperparameters.ARGUMENT_DOCS`` has the shared ones)
    argument_docs: dict = {}
    #: whether betas[1] = 1 is allowed (AdaGrad-style sums; the dense AdamW path then skips
    #: its second-moment bias correction, which would be 0)
    beta2_may_be_one: bool = False
    #: state keys a rule adds after the state is created (absent from a fresh state)
    optional_state_keys: frozenset = frozenset()
    #: group options newer than some checkpoints, and the value such a checkpoint meant
    added_options: dict = ADDED_OPTIONS
    #: state entries held as 0-d tensors on the device (no host sync at a step) and saved as
    #: Python numbers (torch's load would cast a tensor to the parameter's dtype, bfloat16 too)
    scalar_state_keys: frozenset = frozenset()
    #: the state keys holding moments, stored in ``state_dtype`` (``state_precision.py``), each
    #: with what its values may be (``SIGNED`` or ``NONNEGATIVE``: the int8 map it gets); the
    #: dense AdamW's two moments here, a rule adds its own
    moment_keys: dict = {"exp_avg": state_precision.SIGNED,
                         "exp_avg_sq": state_precision.NONNEGATIVE}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.option_defaults = option_defaults(cls)
        if "__init__" in cls.__dict__:
            cls.__doc__ = document(cls)

    def __init__(self, params, arguments: dict):
        """``arguments``: the subclass ``__init__``'s arguments by name, its ``locals()`` taken as
        its first statement (``self``, ``params`` and ``__class__`` are passed over). Every
        hyperparameter becomes a group default; ``seed``, ``nonfinite``, ``compile`` and
        ``state_dtype`` hold optimizer-wide."""
        if not isinstance(arguments, dict):
            raise TypeError(f"{type(self).__name__} declares no hyperparameters: a slimopt "
                            "optimizer lists them in its own __init__ and passes them on as "
                            "super().__init__(params, locals()) (see GaLore)")
        defaults, wide = split_arguments(arguments, self.option_defaults)
        nonfinite, seed = wide.get("nonfinite", "skip"), wide.get("seed", 0)
        check_choice("nonfinite", nonfinite, NONFINITE_MODES)
        check_int("seed", seed, 0)
        check_bool("compile", wide.get("compile", False))
        state_dtype = wide.get("state_dtype", "float32")
        state_precision.check_state_dtype(state_dtype)
        #: how the moments are stored: "float32" (as the rules keep them), "bfloat16" or "int8"
        self.state_dtype = state_dtype
        self._opened: dict[int, tuple] = {}
        self._param_keys: dict[torch.Tensor, int] = {}
        self._param_names: dict[torch.Tensor, str] = {}
        self._warned_unnamed = False
        self._described = False
        self._state_alias: dict[torch.Tensor, torch.Tensor] = {}
        self._step_router = None
        self._constructed = False
        self.nonfinite = nonfinite
        self.seed = int(seed)
        #: whether the matrix rule's batched step is compiled (the rules that have one)
        self.compile = wide.get("compile", False)
        super().__init__(params, defaults)
        self._constructed = True
        self.route_sharded_parameters()
        from ...integrations import bypass  # refuse a DeepSpeed run that dropped this optimizer
        bypass.watch(self)

    # ------------------------------------------------------------------ subclass hooks
    def check_group(self, group: dict) -> None:
        """Validate the method's own hyperparameters of ``group``. Also run at every step (a
        scheduler may have changed them) and on load: cheap, no side effects."""

    def check_group_params(self, group: dict) -> None:
        """Validate ``group``'s parameters for the method (once, when the group is added)."""

    def takes_float16(self, param: torch.Tensor, group: dict) -> bool:
        """Whether the rule ``param`` gets is safe in float16 (none that keeps Adam-style
        squared-gradient statistics is)."""
        return False

    def takes_matrix_rule(self, param: torch.Tensor, group: dict) -> bool:
        raise NotImplementedError

    def draws_randomly(self, group: dict) -> bool:
        """Whether the matrix rule of ``group`` makes random draws (seeded by parameter keys)."""
        return False

    def _init_matrix_state(self, param: torch.Tensor, group: dict, state: dict) -> None:
        raise NotImplementedError

    def _matrix_step(self, param: torch.Tensor, group: dict, state: dict) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ set-up
    def add_param_group(self, param_group: dict) -> None:
        """torch's, with slimopt's checks; a refused group leaves the optimizer as it was. A key
        the optimizer does not know is refused (``ValueError`` listing its options);
        galore-torch's ``update_proj_gap`` and ``proj_type="std"`` are read as slimopt's. In a
        group of named parameters that says neither ``rank`` nor ``dense`` (the one-line swap
        ``Cls(model.named_parameters())``), embeddings and output heads, told by name, move to a
        dense group of their own, added right after it (``split_named_embeddings``)."""
        if isinstance(param_group, dict):
            param_group = resolve_aliases(param_group, self.defaults)
            check_known_keys(param_group, self.defaults, type(self).__name__)
        embeddings = None
        if isinstance(param_group, dict) and "params" in param_group \
                and not isinstance(param_group["params"], (torch.Tensor, set)):
            param_group["params"] = list(param_group["params"])
            check_listed_once(param_group["params"])
            embeddings = split_named_embeddings(param_group)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self.check_options(group)
            for p in group["params"]:
                check_parameter(p)
                self._check_float16(p, group)
            self.check_group_params(group)
            if self._constructed:
                self._check_sharding_unchanged(group)
            keys = keys_for(group, self._taken_keys())
        except BaseException:
            self.param_groups.pop()
            raise
        names = group.get("param_names") or [None] * len(keys)
        for p, key, name in zip(group["params"], keys, names):
            self._param_keys[p] = key
            if name is not None:
                self._param_names[p] = name
        self._warn_if_unnamed(group)
        if self._constructed and getattr(self._step_router, "add_group", None) is not None:
            self._step_router.add_group(self, group)
        if embeddings is not None:
            self.add_param_group(embeddings)

    def _taken_keys(self) -> dict:
        """The keys of the optimizer's parameters, each with what holds it (for messages)."""
        return {k: repr(self._param_names[p]) if p in self._param_names
                else f"a parameter of shape {tuple(p.shape)}" for p, k in self._param_keys.items()}

    def _warn_if_unnamed(self, group: dict) -> None:
        """Warn once per optimizer when a rule with random draws gets unnamed parameters."""
        if self._warned_unnamed or "param_names" in group or not self.draws_randomly(group):
            return
        if any(self.takes_matrix_rule(p, group) for p in group["params"]):
            self._warned_unnamed = True
            warnings.warn(
                f"{type(self).__name__} draws random bases seeded by each parameter's key, and its "
                "parameters have no names: their keys then depend on what this process created "
                "before, so the draws change with how the model is split over optimizers or "
                f"processes; {UNNAMED_ADVICE.format(cls=type(self).__name__)}", UserWarning,
                stacklevel=_caller_level())

    def _check_sharding_unchanged(self, group: dict) -> None:
        """A group added after construction is sharded (DTensor) exactly when the optimizer's
        parameters are: the FSDP2 router is chosen at construction."""
        sharded = getattr(self._step_router, "add_group", None) is not None
        if any(is_dtensor(p) != sharded for p in group["params"]):
            raise TypeError(
                f"{type(self).__name__}: add_param_group mixes FSDP2 (DTensor) and plain "
                "parameters with the optimizer's own; give all of a model's parameters to one "
                "optimizer, sharded with torch.distributed.fsdp.fully_shard or not at all")

    def check_options(self, group: dict) -> None:
        """Validate every option of ``group`` (the shared AdamW ones, ``dense``, then the
        method's own, ``check_group``); ``group["params"]`` may be stand-ins (meta tensors of the
        parameters' shapes). Raises ``ValueError``; changes nothing."""
        check_adam_group(group, self.beta2_may_be_one)
        check_bool("dense", group["dense"])
        self.check_group(group)

    # ------------------------------------------------------------------ distributed seam
    def param_key(self, tensor: torch.Tensor) -> int | None:
        """The stable integer key of parameter ``tensor`` (or of a stand-in adopted with
        ``adopt_key``): it names the parameter's state in checkpoints and seeds its random draws.
        None for a tensor the optimizer does not know."""
        return self._param_keys.get(tensor)

    def adopt_key(self, alias: torch.Tensor, key: int | None = None,
                  state_of: torch.Tensor | None = None) -> int:
        """Let ``alias`` (a master copy, or a whole matrix gathered on its owner rank) step as the
        parameter of key ``key``: same key, so the same random draws and checkpoint entry.
        ``key=None`` gives ``alias`` a new key of its own. ``state_of``: a parameter whose state
        entry ``alias`` uses (so the state stays keyed by the parameter, as
        ``torch.distributed.checkpoint`` expects); by default ``alias`` has its own entry.
        Returns the key."""
        if key is None:
            key = fresh_key()
        self._param_keys[alias] = key
        if state_of is not None:
            self._state_alias[alias] = state_of
        return key

    def swap_parameter(self, old: torch.Tensor, new: torch.Tensor) -> None:
        """``new`` took ``old``'s place in a group (a framework swapped the tensors after the
        optimizer was built, as accelerate's FSDP2 prepare does): it takes ``old``'s key and
        name, and ``old`` is forgotten (so it can be freed)."""
        self._param_keys[new] = self._param_keys.pop(old)
        name = self._param_names.pop(old, None)
        if name is not None:
            self._param_names[new] = name

    def route_sharded_parameters(self) -> None:
        """Attach the FSDP2 router (``slimopt.distributed.fsdp.FSDPRouter``) when the parameters
        are DTensors and no router is attached; done at construction, and by
        ``slimopt.integrations`` after a framework sharded the parameters in place."""
        if self._step_router is None and any(
                is_dtensor(p) for g in self.param_groups for p in g["params"]):
            from ...distributed.fsdp import FSDPRouter
            self.attach_step_router(FSDPRouter(self))

    def step_params(self, group: dict, finite: dict | None = None) -> None:
        """One step, with the single-process code, of the tensors of ``group``: a dict with a
        param group's options whose ``params`` are the tensors to update, each a parameter or a
        stand-in adopted with ``adopt_key`` (a whole matrix and its ``.grad``). Without
        ``finite`` the gradients are checked first (the non-finite policy applies); an engine
        that decided finiteness across ranks passes its flags (tensor -> bool). A group that
        must be stepped as one unit (``zero_unit="group"``) is passed whole."""
        self._step_group(group, finite)

    def attach_step_router(self, router) -> None:
        """Hand the groups ``router.routes(group)`` accepts to ``router`` (an engine adapter:
        ``slimopt.distributed.deepspeed.ZeroBridge``, attached by ``slimopt.launch.initialize``,
        or ``slimopt.distributed.fsdp.FSDPRouter``, attached at construction when the parameters
        are FSDP2 DTensors): ``step()`` calls ``router.step_group(self, group, finite)`` for
        them after the checks. A router with ``checks_gradients`` checks its groups itself
        (``finite`` is None; with ``nonfinite="raise"``, ``router.raise_if_nonfinite(self,
        groups)`` runs first); otherwise ``finite`` holds the flags of the usual checks, which
        ``router.agree(flags)`` (if present) makes every rank's. ``load_state_dict`` is the
        router's, and so is ``state_dict`` if it has one; ``router.add_group(self, group)`` (if
        present) plans a group added later. Refused with low-precision states
        (``check_sharding_engine``)."""
        self.check_sharding_engine(type(router).__name__)
        self._step_router = router

    def check_sharding_engine(self, engine: str) -> None:
        """Raise a ``ValueError`` if a sharding engine (DeepSpeed ZeRO-1/2/3, FSDP2; ``engine``
        names it) cannot step this optimizer: with low-precision states (``state_dtype``), whose
        moments the engine bridges would shard and checkpoint as float32 tensors of their own
        layout. Engines call it before they are built; ``attach_step_router`` calls it too."""
        if self.state_dtype != "float32":
            raise ValueError(
                f"{type(self).__name__}(state_dtype={self.state_dtype!r}) cannot be stepped by a "
                f"sharding engine ({engine}): the bridges shard and checkpoint the moments as "
                "float32 tensors. Use state_dtype='float32' there, or low-precision states in "
                "one process or under DDP (torchrun without --deepspeed)")

    @property
    def step_router(self):
        """The router attached with ``attach_step_router``, or None."""
        return self._step_router

    def _check_float16(self, p: torch.Tensor, group: dict) -> None:
        if p.dtype == torch.float16 and not self.takes_float16(p, group):
            raise ValueError(
                f"{type(self).__name__}: float16 parameters are not supported (one of shape "
                f"{tuple(p.shape)}): the rule it gets keeps squared-gradient statistics, which "
                "underflow in float16 and turn finite gradients into NaN weights (as in "
                f"torch.optim.AdamW); {FLOAT16_ADVICE}")

    def _fresh_state(self, p: torch.Tensor, group: dict, key: int) -> dict:
        state = {"step": 0, "nonfinite_skips": 0, "key": key}
        if self.takes_matrix_rule(p, group):
            self._init_matrix_state(p, group, state)
        elif state_precision.kept_low(p.shape, self.state_dtype):  # no float32 copy, ever
            for name in ("exp_avg", "exp_avg_sq"):
                state.update(state_precision.zeros(name, p.shape, p.device, self.state_dtype))
        else:
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        for name in self.moment_keys:  # a matrix rule's moments
            moment = state.get(name)
            if moment is not None and state_precision.kept_low(moment.shape, self.state_dtype):
                del state[name]
                state.update(state_precision.zeros(name, moment.shape, moment.device,
                                                   self.state_dtype))
        return state

    @staticmethod
    def _work_dtype(p: torch.Tensor) -> torch.dtype:
        """The dtype a parameter's maths runs in (and low-precision moments are decoded into):
        float64 for float64 parameters, float32 otherwise."""
        return torch.float64 if p.dtype == torch.float64 else torch.float32

    # ------------------------------------------------------------------ low-precision moments

    def _low_moments(self, state: dict) -> list:
        """``(index, key, sign)`` of the moments of ``state`` stored in low precision."""
        if self.state_dtype == "float32":
            return []
        return [(i, key, sign) for i, (key, sign) in enumerate(self.moment_keys.items())
                if state_precision.stored_names(key, self.state_dtype)[0] in state]

    def _open_moments(self, p: torch.Tensor, state: dict) -> None:
        """Decode the low-precision moments of ``state`` into work tensors under their usual
        keys (``_close_moments`` stores them back); nothing with ``state_dtype="float32"``."""
        low = self._low_moments(state)
        if not low or id(state) in self._opened:
            return
        work = self._work_dtype(p)
        for _, key, sign in low:
            stored = state[state_precision.stored_names(key, self.state_dtype)[0]]
            state[key] = state_precision.decode(state, key, self.state_dtype, sign,
                                                work).view(stored.shape)
        self._opened[id(state)] = (state, low)

    def _close_moments(self, state: dict) -> None:
        """Encode the work tensors ``_open_moments`` put in ``state`` back into their stored
        form (stochastic rounding seeded by the parameter's key and step) and drop them."""
        opened = self._opened.pop(id(state), None)
        if opened is None:
            return
        for index, key, sign in opened[1]:
            state_precision.encode_(state, key, self.state_dtype, sign, state.pop(key),
                                    (self.seed, state["key"], state["step"], index))

    @contextlib.contextmanager
    def _moments_decoded(self, *pairs):
        """``_open_moments`` for each ``(param, state)`` of ``pairs`` for the duration, then
        ``_close_moments``: what a rule stepping parameters one by one (or a pair) wraps its
        update in."""
        for p, state in pairs:
            self._open_moments(p, state)
        try:
            yield
        finally:
            for _, state in pairs:
                self._close_moments(state)

    def _close_all_moments(self) -> None:
        """Close every state still open (after an update that raised: the state keeps its
        stored form)."""
        for state, _ in list(self._opened.values()):
            self._close_moments(state)

    def _init_state(self, p: torch.Tensor, group: dict) -> dict:
        state = self.state[self._state_alias.get(p, p)]
        if not state:
            state.update(self._fresh_state(p, group, self._param_keys[p]))
        return state

    @torch.no_grad()
    def init_state(self) -> None:
        """Allocate every parameter's state now (it is otherwise created at its first step).

        Works on the meta device, which is how ``benchmarks/memory.py`` counts state bytes for
        models that do not fit in memory.
        """
        for group in self.param_groups:
            for p in group["params"]:
                self._init_state(p, group)

    # ------------------------------------------------------------------ step
    def _finite_flags(self, params) -> dict:
        """Whether each parameter's gradient is finite, computed for all of ``params`` together:
        one fused norm per gradient and a single host sync, not one per parameter (a gradient
        whose float32 norm overflows, entries beyond ~1e19, counts as non-finite too)."""
        if self.nonfinite == "off":
            return {}
        grads = [p for p in params if p.grad is not None and not p.grad.is_meta
                 and p.grad.layout == torch.strided and not p.grad.is_complex()]
        if not grads:
            return {}
        local = [p.grad.to_local() if is_dtensor(p.grad) else p.grad for p in grads]
        flags = torch.stack([n.float() for n in torch._foreach_norm(local)]).isfinite()
        agree = getattr(self._step_router, "agree", None)
        if agree is not None:  # sharded gradients: every rank decides on the whole gradient
            flags = agree(flags)
        return dict(zip(grads, flags.tolist()))

    def _check_groups_now(self) -> None:
        """Every group's hyperparameters as they are now (a scheduler may have set them)."""
        for index, group in enumerate(self.param_groups):
            try:
                self.check_options(group)
            except KeyError as err:
                raise ValueError(f"{type(self).__name__}: parameter group {index} lacks the "
                                 f"option {err}") from None
            except ValueError as err:
                raise ValueError(f"{type(self).__name__}: parameter group {index}: {err} (checked "
                                 "at step time: set after construction, e.g. by a learning-rate "
                                 "scheduler?)") from None

    def _check_gradients(self, group: dict) -> dict:
        """Everything about ``group``'s gradients that can raise, before any update; returns the
        finiteness flags of ``_finite_flags``."""
        return self._check_finite(self._checked_params(group))

    def _checked_params(self, group: dict) -> list:
        """The parameters of ``group`` that have a gradient, each checked (raises on the first
        that cannot be stepped)."""
        params = [p for p in group["params"] if p.grad is not None]
        for p in params:
            if p not in self._param_keys:
                raise RuntimeError(
                    f"{type(self).__name__} was handed a tensor of shape {tuple(p.shape)} that is "
                    "not one of its parameters: either DeepSpeed ZeRO replaced the parameters by "
                    "flat shards (a matrix rule would silently become a vector rule) or a "
                    "framework swapped them after the optimizer was built (accelerate's FSDP2 "
                    "prepare does). With deepspeed.initialize use slimopt.launch.initialize; with "
                    "HF Trainer use slimopt.integrations.transformers.SlimoptTrainer; with "
                    "accelerate use slimopt.integrations.accelerate.prepare(accelerator, ...) in "
                    "place of accelerator.prepare(...).")
            check_gradient(p.grad, p.shape)
            self._check_float16(p, group)
            if p.is_meta or p.grad.is_meta:
                raise ValueError(
                    f"{type(self).__name__}: a parameter of shape {tuple(p.shape)} (or its "
                    "gradient) is on the meta device, which holds no values: step() needs real "
                    "tensors (init_state() works on meta; materialize the model first, e.g. "
                    "model.to_empty(device=...))")
        return params

    def _check_finite(self, params: list) -> dict:
        """``_finite_flags`` of ``params`` (one host sync for all of them), raising with
        ``nonfinite="raise"`` if one is not finite."""
        finite = self._finite_flags(params)
        if self.nonfinite == "raise":
            bad = [p for p, ok in finite.items() if not ok]
            if bad:
                raise FloatingPointError(
                    f"{type(self).__name__}: non-finite gradient for a parameter of shape "
                    f"{tuple(bad[0].shape)} at step {self.state.get(bad[0], {}).get('step', 0)} "
                    f"({len(bad)} parameter(s)); nothing was updated")
        return finite

    def _prepare_step(self) -> list:
        """All checks of a step, before anything changes: per group, the flags of
        ``_check_gradients`` (None for a group the step router checks itself, per unit). The
        finiteness of every gradient the optimizer checks itself is read back in one host sync
        per step."""
        self._check_groups_now()
        router = self._step_router
        own = [router is not None and router.routes(g) and router.checks_gradients
               for g in self.param_groups]
        bridged = [g for g, r in zip(self.param_groups, own) if r]
        if bridged and self.nonfinite == "raise":
            router.raise_if_nonfinite(self, bridged)  # every rank decides together
        checked = [None if r else self._checked_params(g) for g, r in zip(self.param_groups, own)]
        finite = self._check_finite([p for params in checked if params for p in params])
        return [None if params is None else finite for params in checked]

    @staticmethod
    def _skip_nonfinite(state: dict, finite: bool) -> bool:
        """Count and skip a non-finite gradient (``"raise"`` has raised already)."""
        if not finite:
            state["nonfinite_skips"] += 1
        return not finite

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        router = self._step_router
        checked = self._prepare_step()
        if not self._described:
            self._described = True
            if logger.isEnabledFor(logging.INFO):
                logger.info("%s parameters:\n%s", type(self).__name__, self.describe())
        for group, finite in zip(self.param_groups, checked):
            if router is not None and router.routes(group):
                router.step_group(self, group, finite)
            else:
                self._step_group(group, finite)
        return loss

    def _step_group(self, group: dict, finite: dict | None = None) -> None:
        """One step for ``group``. ``finite``: the flags of ``_check_gradients``; without them
        (``step_params``: an engine's call, one unit at a time) the group is checked here first."""
        if finite is None:
            finite = self._check_gradients(group)
        view = group
        if isinstance(group["lr"], torch.Tensor):  # read once: the rules take a Python float
            view = dict(group, lr=float(group["lr"]))
        try:
            if group.get("maximize", False):
                with negated_gradients(group["params"]):
                    self._update_group(view, finite)
            else:
                self._update_group(view, finite)
        finally:
            self._close_all_moments()

    def _update_group(self, group: dict, finite: dict) -> None:
        """Update every parameter of the checked ``group`` (a subclass may treat a group as a
        unit); a parameter whose gradient is not ``finite`` is skipped and counted."""
        dense = []
        for p, state in self._to_step(group, finite):
            if self.takes_matrix_rule(p, group):
                with self._moments_decoded((p, state)):
                    self._matrix_step(p, group, state)
            else:
                dense.append((p, state))
        self._dense_steps(group, dense)

    def _to_step(self, group: dict, finite: dict):
        """``(param, state)`` for each parameter of ``group`` that steps now: it has a gradient,
        and a finite one (a non-finite one is counted and skipped); its state is created here."""
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self._init_state(p, group)
            if not self._skip_nonfinite(state, finite.get(p, True)):
                yield p, state

    def _dense_steps(self, group: dict, dense: list) -> None:
        """AdamW for the ``(param, state)`` pairs of ``group``, exactly as ``torch.optim.AdamW``
        up to float rounding (torch's fused kernel, one call per device, dtype and step count).
        Low-precision moments are stepped in chunks of at most ``DENSE_CHUNK`` elements
        (``_dense_chunks``), each decoded, stepped and encoded back before the next."""
        beta1, beta2 = group["betas"]
        hyper = dict(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                     weight_decay=group["weight_decay"])
        batches: dict[tuple, list] = {}
        for p, state in dense:
            state["step"] += 1
            batches.setdefault((p.device, p.dtype, state["step"]), []).append((p, state))
        for (_, _, step), batch in batches.items():
            if self.state_dtype == "float32":
                adamw_steps_([p for p, _ in batch], [p.grad for p, _ in batch],
                             [s["exp_avg"] for _, s in batch],
                             [s["exp_avg_sq"] for _, s in batch], step, **hyper)
                continue
            for chunk in self._dense_chunks(batch):
                work = [self._dense_piece(*piece) for piece in chunk]
                adamw_steps_(*(list(column) for column in zip(*work)), step, **hyper)
                for (p, state, start, _), (_, _, m, v) in zip(chunk, work):
                    self._store_dense_piece(state, start, {"exp_avg": m, "exp_avg_sq": v})

    def _dense_chunks(self, batch: list):
        """Lists of pieces ``(param, state, start, stop)`` (elements of the flattened parameter)
        of at most ``DENSE_CHUNK`` low-precision elements together: a parameter with
        low-precision moments and more elements is cut into pieces of ``DENSE_CHUNK``; one whose
        moments are not low (1-D) is one piece and costs no decoding."""
        chunk, size = [], 0
        for p, state in batch:
            if not self._low_moments(state):
                chunk.append((p, state, 0, p.numel()))
                continue
            if not p.is_contiguous():
                raise ValueError(
                    f"{type(self).__name__}(state_dtype={self.state_dtype!r}): a parameter of "
                    f"shape {tuple(p.shape)} is not contiguous; the chunked AdamW step of "
                    "low-precision moments needs contiguous parameters (call .contiguous() on "
                    "it before building the optimizer)")
            for start in range(0, p.numel(), DENSE_CHUNK):
                stop = min(start + DENSE_CHUNK, p.numel())
                if size + stop - start > DENSE_CHUNK and chunk:
                    yield chunk
                    chunk, size = [], 0
                chunk.append((p, state, start, stop))
                size += stop - start
        if chunk:
            yield chunk

    def _dense_piece(self, p, state, start, stop) -> tuple:
        """``(param, grad, exp_avg, exp_avg_sq)`` of a piece: flat views of the parameter and
        its gradient and the decoded moments (the whole tensors for moments kept as they are)."""
        if not self._low_moments(state):
            return p, p.grad, state["exp_avg"], state["exp_avg_sq"]
        work = self._work_dtype(p)
        moments = [state_precision.decode(state, key, self.state_dtype, self.moment_keys[key],
                                          work, start, stop) for key in ("exp_avg", "exp_avg_sq")]
        return (p.view(-1)[start:stop], p.grad.reshape(-1)[start:stop], *moments)

    def _store_dense_piece(self, state: dict, start: int, moments: dict) -> None:
        """Encode a stepped piece's ``moments`` (key -> values) back (nothing for moments kept as
        they are)."""
        for index, key, sign in self._low_moments(state):
            state_precision.encode_(state, key, self.state_dtype, sign, moments[key],
                                    (self.seed, state["key"], state["step"], index), start)

    # ------------------------------------------------------------------ state
    def state_dict(self):
        """torch's, with the class marker; a step router's own if it has one (the ZeRO bridge's
        per-rank share)."""
        save = getattr(self._step_router, "state_dict", None)
        if save is not None:
            return save(self)
        state = super().state_dict()
        state["state"] = {index: self._scalars_as_numbers(entry)
                          for index, entry in state["state"].items()}
        state[state_checks.CLASS_KEY] = type(self).__name__
        if self.state_dtype != "float32":  # a float32 state is saved as before the option
            state[STATE_DTYPE_KEY] = self.state_dtype
        return state

    def _scalars_as_numbers(self, entry: dict) -> dict:
        """``entry`` with its ``scalar_state_keys`` tensors as Python numbers (a copy if any)."""
        keys = [k for k in self.scalar_state_keys if torch.is_tensor(entry.get(k))]
        return {**entry, **{k: entry[k].item() for k in keys}} if keys else entry

    def load_state_dict(self, state_dict):
        """torch's, after ``check_state_dict``: a state that does not fit is refused with a
        ``ValueError`` and the optimizer is left as it was."""
        state_dict = self._with_added_options(state_dict)
        if self._step_router is not None:
            return self._step_router.load_state_dict(self, state_dict)
        self.check_state_dict(state_dict)
        if self.state_dtype == "float32":
            return super().load_state_dict(state_dict)
        # torch's load casts every floating tensor of the state to its parameter's dtype (and
        # uint8 codes to float): the stored moments are set aside and put back as they are
        names = {n for key in self.moment_keys
                 for n in state_precision.stored_names(key, self.state_dtype)}
        kept, stored = {}, {}
        for index, entry in state_dict["state"].items():
            kept[index] = {k: v for k, v in entry.items() if k not in names}
            stored[index] = {k: v for k, v in entry.items() if k in names}
        super().load_state_dict(dict(state_dict, state=kept))
        for saved, group in zip(state_dict["param_groups"], self.param_groups):
            for index, p in zip(saved["params"], group["params"]):
                for name, tensor in stored.get(index, {}).items():
                    self.state[p][name] = tensor.to(p.device)

    def _with_added_options(self, state_dict):
        """A state saved before an option existed (``added_options``) gets the value that state
        meant (a copy; the caller's dict is left as it is)."""
        added = {k: v for k, v in self.added_options.items() if k in self.defaults}
        groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
        if not isinstance(groups, list) or not any(
                isinstance(g, dict) and not added.keys() <= g.keys() for g in groups):
            return state_dict
        groups = [{**added, **g} if isinstance(g, dict) else g for g in groups]
        return dict(state_dict, param_groups=groups)

    # ------------------------------------------------------------------ checkpoints
    def expected_state(self, group: dict) -> list:
        """The fresh state of each parameter of ``group`` (meta tensors: shapes only), what a
        loaded state must match; ``group["params"]`` may be any tensors of the parameters'
        shapes and dtypes (the ZeRO bridge can pass its own)."""
        metas = [torch.empty(p.shape, dtype=p.dtype, device="meta") for p in group["params"]]
        meta_group = dict(group, params=metas)
        return [self._fresh_state(m, meta_group, 0) for m in metas]

    def check_state_dict(self, state_dict) -> None:
        """Raise a ``ValueError`` naming what does not fit if ``state_dict`` (a plain, non-ZeRO
        ``state_dict()``) cannot be loaded into this optimizer: another class or format, invalid
        or missing group options, parameter states of other shapes or keys. Changes nothing.
        A state without the class marker (older slimopt) is checked on everything else."""
        name = type(self).__name__
        state_checks.check_format(state_dict, name)
        saved_groups, state = state_dict["param_groups"], state_dict["state"]
        state_checks.check_group_layout(saved_groups, self.param_groups)
        state_checks.check_param_indices(state, saved_groups)
        for index, saved in enumerate(saved_groups):
            # torch's __setstate__ (every load_state_dict, accelerate's wrapper) adds
            # defaults['differentiable'] without adding it to the groups
            state_checks.check_group_options(saved, set(self.defaults) - {"differentiable"},
                                             index)
        # after the checks that tell another optimizer's state (which has no marker either)
        saved_dtype = state_dict.get(STATE_DTYPE_KEY, "float32")
        if saved_dtype != self.state_dtype:
            raise ValueError(
                f"this optimizer state was saved with state_dtype={saved_dtype!r}; this {name} "
                f"has state_dtype={self.state_dtype!r}. Resume with {name}(..., "
                f"state_dtype={saved_dtype!r}): slimopt does not convert stored moments on load "
                "(a conversion would silently change the run you resume)")
        for index, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            check_known_keys(saved, self.defaults, name, f"group {index} of the state: ")
            merged = dict(saved, params=group["params"])
            try:
                self.check_options(merged)
            except ValueError as err:
                raise ValueError(f"{name}: group {index} of the state: {err}") from None
            expected = self.expected_state(merged)
            for i, (k, p) in enumerate(zip(saved["params"], group["params"])):
                if k in state:
                    where = f"parameter {k} (group {index}, shape {tuple(p.shape)})"
                    state_checks.check_param_state(state[k], expected[i],
                                                   self.optional_state_keys, where)
                    state_checks.check_stored_dtypes(state[k], expected[i], where)

    # ------------------------------------------------------------------ diagnostics
    def matrix_rule_name(self, group: dict) -> str:
        """What ``describe`` calls the rule of the parameters ``takes_matrix_rule`` accepts."""
        return type(self).__name__

    def describe(self) -> str:
        """A plain-text table, one row per parameter: its name (``-`` if unknown), shape, dtype,
        the rule it gets (the method's matrix rule, or ``AdamW (dense)``), its rank and group
        index. Logged once (``logging.getLogger("slimopt")``, INFO) at the first step."""
        rows = [("name", "shape", "dtype", "rule", "rank", "group")]
        for index, group in enumerate(self.param_groups):
            for p in group["params"]:
                matrix = self.takes_matrix_rule(p, group)
                rank = group.get("rank") if matrix and group.get("rank") is not None else "-"
                rows.append((self._param_names.get(p, "-"), "x".join(map(str, p.shape)) or "()",
                             str(p.dtype).replace("torch.", ""),
                             self.matrix_rule_name(group) if matrix else "AdamW (dense)",
                             str(rank), str(index)))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def nonfinite_skips(self) -> int:
        """Parameter updates skipped so far because their gradient held NaN or Inf."""
        return sum(s.get("nonfinite_skips", 0) for s in self.state.values())

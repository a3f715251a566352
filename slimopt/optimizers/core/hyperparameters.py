"""An optimizer's hyperparameters, written once: in its ``__init__`` signature.

Every slimopt optimizer lists each hyperparameter with its default in its ``__init__`` (as torch's
optimizers do) and hands its arguments on as ``locals()``; everything else is derived from that
signature, so no default is written twice:

- the group defaults ``SlimOptimizer.__init__`` gives torch (``split_arguments``);
- ``option_defaults``, the keyword-only hyperparameters: the method's own options;
- the ``Args:`` block of the class docstring (``document``): one entry per argument, its default
  read from the signature, its meaning and valid range from ``ARGUMENT_DOCS`` or the class's
  ``argument_docs``.
"""
from __future__ import annotations

import inspect
import re
import textwrap

#: arguments that hold for the whole optimizer, not per parameter group
OPTIMIZER_WIDE = ("seed", "nonfinite", "compile", "state_dtype")
#: names in an ``__init__``'s ``locals()`` that are not hyperparameters
_NOT_HYPERPARAMETERS = ("self", "params", "__class__")

#: an interval or pair such as ``[0, 1)`` or ``(0.9, 0.999)``, kept on one line in the docstring
_INTERVAL = re.compile(r"([\[(][^\s\[\]()]*), ([^\s\[\]()]*[\])])")

#: meaning and valid range of the arguments several optimizers share (a class's
#: ``argument_docs`` adds its own and may reword these)
ARGUMENT_DOCS = {
    "lr": "learning rate, a finite number >= 0 or a 0-d floating tensor holding one (torch's "
          "compiled-step recipe; read once per step)",
    "maximize": "True: ascend, each rule applied to the negated gradient (torch's flag)",
    "rank": "subspace rank r, an int >= 1; None (in a group): dense AdamW for it. A matrix with "
            "rank >= its smaller side gets dense AdamW (one warning per group)",
    "update_interval": "steps between basis changes, an int >= 1",
    "betas": "(beta1, beta2), the moments' decay rates, each in [0, 1)",
    "eps": "term added to the denominator, a finite number >= 1.175e-38 (the smallest normal "
           "float32)",
    "weight_decay": "decoupled weight decay as AdamW's (W <- (1 - lr wd) W), a finite number >= 0",
    "scale": "GaLore's alpha, the factor on the projected update, a finite number > 0",
    "moment_rule": "what the moments do when the basis changes: 'keep', 'reset' or 'transport' "
                   "(rotated into the new basis)",
    "recovery": "Fira's recovery scaling of the out-of-subspace residual, True or False",
    "residual": "the residual recovery scales: 'orthogonal' ((I - S S^T) G, the paper's) or "
                "'scaled' (G - scale S S^T G, the public codes')",
    "limiter": "Fira's norm-growth limiter zeta, a finite number >= 1",
    "svd": "how the top-r singular vectors are found: 'exact' (torch.linalg.svd) or "
           "'randomized' (Halko et al., a Gaussian sketch of r + max(10, r/4) columns and 2 power "
           "iterations: 2-6x faster when r + r/4 is well below the smaller side; README, "
           "\"Step time\")",
    "stagger_refresh": "True: each matrix's basis refreshes shifted by (its key mod "
                       "update_interval) steps, spreading the refreshes over the interval; False: "
                       "all on the same steps, as in the papers",
    "seed": "seed of the counter-based random bases, an int >= 0",
    "compile": "True: the element-wise part of the low-rank matrices' batched step (moments, "
               "directions, recovery factors) is compiled with torch.compile at the first "
               "steps (README, \"Step time\"); False: eager",
    "state_dtype": "how the moments are stored: 'float32' (in the parameter's dtype, as "
                   "before the option), 'bfloat16' (stochastic rounding) or 'int8' (bitsandbytes' "
                   "block-wise quantization, a scale per 256 elements); 1-D moments stay as they "
                   "are (README, \"Low-precision states\")",
    "nonfinite": "a parameter whose gradient holds NaN or Inf: 'skip' (left untouched, counted), "
                 "'raise' (FloatingPointError, nothing updated) or 'off' (no check)",
}


def init_arguments(cls) -> list[inspect.Parameter]:
    """The parameters of ``cls.__init__`` after ``self`` and ``params``."""
    return list(inspect.signature(cls.__init__).parameters.values())[2:]


def option_defaults(cls) -> dict:
    """The keyword-only hyperparameters of ``cls.__init__`` (its options) and their defaults."""
    return {p.name: p.default for p in init_arguments(cls)
            if p.kind is p.KEYWORD_ONLY and p.name not in OPTIMIZER_WIDE}


def split_arguments(arguments: dict, options) -> tuple[dict, dict]:
    """``(group defaults, optimizer-wide arguments)`` from an ``__init__``'s ``locals()``: the
    group defaults in signature order, ``dense=False`` before the ``options``."""
    hyper = {k: v for k, v in arguments.items() if k not in _NOT_HYPERPARAMETERS}
    wide = {k: hyper.pop(k) for k in OPTIMIZER_WIDE if k in hyper}
    if isinstance(hyper.get("betas"), list):
        hyper["betas"] = tuple(hyper["betas"])
    plain = {k: v for k, v in hyper.items() if k not in options}
    own = {k: v for k, v in hyper.items() if k in options}
    return {**plain, "dense": False, **own}, wide


def document(cls) -> str:
    """``cls.__doc__`` with an ``Args:`` block for ``cls.__init__``: one entry per argument,
    ``name (default: value): meaning and valid range``, wrapped to two lines or so."""
    docs = _argument_docs(cls)
    lines = ["params: the parameters, or parameter groups (dicts) whose entries override the "
             "defaults below"]
    for p in init_arguments(cls):
        text = docs.get(p.name, "")
        lines.append(f"{p.name} (default: {p.default!r}){': ' + text if text else ''}")
    wrapped = (textwrap.fill(_INTERVAL.sub("\\1,\xa0\\2", line), 96, subsequent_indent="    ")
               for line in lines)
    body = "\n".join(wrapped).replace("\xa0", " ")
    head = inspect.cleandoc(cls.__doc__ or "")
    return f"{head}\n\nArgs:\n{textwrap.indent(body, '    ')}\n"


def undocumented(cls) -> list[str]:
    """The arguments of ``cls.__init__`` its ``Args:`` block gives no meaning for."""
    docs = _argument_docs(cls)
    return [p.name for p in init_arguments(cls) if p.name not in docs]


def _argument_docs(cls) -> dict:
    """``ARGUMENT_DOCS`` updated by the ``argument_docs`` of ``cls`` and its bases (the nearest
    wins)."""
    docs = dict(ARGUMENT_DOCS)
    for klass in reversed(cls.__mro__):
        docs.update(klass.__dict__.get("argument_docs", {}))
    return docs

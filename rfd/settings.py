"""Typed settings shared by the front ends (train.py, evaluate.py, ``python -m rfd.analysis``).

One way to refuse bad input: :class:`UsageError` is the only exception for it, :func:`run_cli`
prints it (and the library's ``ValueError`` / missing data / parser errors) as one
``error: <message>`` line on stderr with exit status 2, and :class:`OneLineParser` is an
``argparse`` parser that raises it instead of printing usage.

One check per value: each checker below (:func:`integer`, :func:`number`, :func:`choice`, ...)
coerces and validates one value, the same whether it comes from YAML or from a flag, and raises
:class:`BadValue` saying what is allowed; callers name the key and where the value came from.

Evaluation settings: :class:`EvalSettings` lists every field with its help, flag and checker;
:func:`load_eval_settings` merges defaults ← ``configs/eval.yaml`` (or ``--eval-config`` /
``--grid FILE``) ← flags, then checks the fields against each other. :func:`spec_of` /
:func:`spec_hash` fingerprint the fields that decide the numbers. Nothing here writes files.

Config files: bare names resolve under ``configs/`` (:func:`resolve_config_path`); YAML is data
(:func:`read_yaml_mapping`, ``yaml.safe_load``). These live here rather than in :mod:`rfd.runs`
because :mod:`rfd.runs` needs :class:`UsageError` and an import cycle is not allowed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, NoReturn

import yaml

from rfd.models import REPO_ROOT

CONFIG_DIR = REPO_ROOT / "configs"
DEFAULT_EVAL = CONFIG_DIR / "eval.yaml"
WANDB_MODES = ("offline", "online", "disabled")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")
MODEL_KEYS = ("config", "checkpoint", "name", "tag")

Check = Callable[[Any], Any]


# --------------------------------------------------------------------------- errors and exit


class UsageError(Exception):
    """Bad user input: printed as one ``error:`` line, exit status 2."""


class BadValue(argparse.ArgumentTypeError):
    """A value its checker refuses; the message says what is allowed and what was given.

    It is an ``argparse.ArgumentTypeError``, so checkers serve directly as ``type=`` of flags.
    """


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors raise :class:`UsageError` instead of printing usage."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def first_line(e: BaseException) -> str:
    """The first non-empty line of an exception's message (its type name if it has none)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


class Interrupted(BaseException):
    """SIGTERM or SIGINT arrived. A BaseException, so that nothing on the way (Lightning turns a
    KeyboardInterrupt into ``sys.exit(1)``) swallows it, while ``finally`` blocks and the
    evaluation's record flush still run."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _interrupt(signum: int, frame: Any) -> None:
    raise Interrupted(signum)


def keep_freed_memory() -> bool:
    """Let glibc's allocator keep freed memory for reuse instead of returning it to the OS.

    By default glibc hands large freed blocks back (``munmap`` or a heap trim) and the next
    allocation of the same size faults its pages in again. A CPU forward allocates and frees the
    same activation buffers every batch: on the embedded default's benchmark grid, 33 s of the
    process's 214 s of CPU time went to the kernel faulting pages in. Keeping freed memory (mmap
    threshold at its 32 MiB maximum, no trimming below 1 GiB of free heap) made the forward 25%
    faster and the whole grid about as much (``make bench``). The price is resident memory that
    stays at its peak, which a long-running evaluation reaches anyway. PyTorch's CPU tuning guide gets the same
    effect by preloading jemalloc or tcmalloc, which a running process cannot do.

    Returns:
        Whether the settings were applied (False off glibc, e.g. macOS, musl or Windows).
    """
    import ctypes

    if not sys.platform.startswith("linux"):
        return False
    try:  # the process's own symbols: libc is loaded already (find_library would spawn ldconfig)
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 1 << 30))


def run_cli(main: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> int:
    """Run ``main(argv)``; bad input becomes one ``error:`` line on stderr and exit status 2.

    Bad input is a :class:`UsageError`, a ``ValueError`` (the library's checks), a
    ``FileNotFoundError`` (``rfd.data.DataMissingError`` is one: its message says how to get the
    data) or a parser's ``argparse.ArgumentError`` (jsonargparse's too). Anything else is a bug and
    keeps its traceback. SIGTERM and SIGINT end the run with 143 / 130 and one line saying how to
    resume (a scheduler must not read an interrupted run as a success).
    """
    import signal

    keep_freed_memory()
    handlers = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            handlers[sig] = signal.signal(sig, _interrupt)
        except ValueError:  # not the main thread: leave the signals alone
            pass
    try:
        main(argv)
    except argparse.ArgumentError as e:  # messages of nested parsers span lines
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    except (UsageError, ValueError, FileNotFoundError) as e:
        print(f"error: {first_line(e)}", file=sys.stderr)
        return 2
    except Interrupted as e:
        name = signal.Signals(e.signum).name
        cmd = " ".join([Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)])
        print(
            f"error: interrupted by {name}; finished work is saved; run `python {cmd}` again to "
            "resume",
            file=sys.stderr,
        )
        return 128 + e.signum
    finally:
        for sig, h in handlers.items():
            signal.signal(sig, h)
    return 0


# --------------------------------------------------------------------------- config files


def resolve_config_path(value: str | Path) -> str:
    """A config given as a bare name (``cifar10_vit.yaml`` or ``cifar10_vit``) resolves under configs/."""
    p = Path(value)
    if p.is_file():
        return str(p)
    for cand in (CONFIG_DIR / p, CONFIG_DIR / f"{value}.yaml", Path("configs") / p):
        if cand.is_file():
            return str(cand)
    names = sorted(q.name for q in CONFIG_DIR.glob("*.yaml"))
    raise UsageError(f"config {str(value)!r} not found; available in configs/: {', '.join(names)}")


def resolve_config_args(argv: list[str]) -> list[str]:
    """Rewrite every ``--config X`` / ``--config=X`` so bare names find configs/X."""
    out: list[str] = []
    it = iter(range(len(argv)))
    for i in it:
        a = argv[i]
        if a == "--config" and i + 1 < len(argv):
            out += [a, resolve_config_path(argv[i + 1])]
            next(it, None)
        elif a.startswith("--config="):
            out.append("--config=" + resolve_config_path(a.split("=", 1)[1]))
        else:
            out.append(a)
    return out


def read_yaml_mapping(path: str | Path, what: str = "settings") -> dict[str, Any]:
    """A YAML file holding a mapping (an empty file is ``{}``), read as data with ``safe_load``."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror or type(e).__name__}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or first_line(e)
        raise UsageError(f"{path} is not valid YAML: {problem}{at}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(
            f"{path} must hold a mapping of {what} (key: value), got a {type(data).__name__}"
        )
    return data


# --------------------------------------------------------------------------- value checkers


def _checker(check: Check, name: str, options: Callable[[], Sequence[str]] | None = None) -> Check:
    check.__name__ = check.__qualname__ = name
    if options is not None:
        check.options = options  # type: ignore[attr-defined]
    return check


def _as_int(v: Any) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, str) and re.fullmatch(r"\s*[+-]?\d+\s*", v):
        return int(v)
    return None


def _as_float(v: Any) -> float | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return None
    return None


def integer(minimum: int | None = None) -> Check:
    """An integer >= ``minimum`` (any integer without one; a flag's text or a YAML int; not a
    bool, float or list)."""
    bound = "" if minimum is None else f" >= {minimum}"

    def check(v: Any) -> int:
        n = _as_int(v)
        if n is None or (minimum is not None and n < minimum):
            raise BadValue(f"must be an integer{bound} (got {v!r})")
        return n

    return _checker(check, f"integer{bound.replace(' ', '')}")


def number(
    *, gt: float | None = None, ge: float | None = None, lt: float | None = None,
    le: float | None = None,
) -> Check:  # fmt: skip
    """A finite number within the given bounds (``gt``/``ge`` below, ``lt``/``le`` above)."""
    lo = f"({gt:g}" if gt is not None else f"[{ge:g}" if ge is not None else None
    hi = f"{lt:g})" if lt is not None else f"{le:g}]" if le is not None else None
    if lo and hi:
        bounds = f"in {lo}, {hi}"
    else:
        bounds = " and ".join(
            f"{op} {b:g}"
            for op, b in ((">", gt), (">=", ge), ("<", lt), ("<=", le))
            if b is not None
        )

    def check(v: Any) -> float:
        x = _as_float(v)
        if x is None or not math.isfinite(x):
            raise BadValue(f"must be a finite number {bounds} (got {v!r})".replace("  ", " "))
        if (
            (gt is not None and not x > gt)
            or (ge is not None and not x >= ge)
            or (lt is not None and not x < lt)
            or (le is not None and not x <= le)
        ):
            raise BadValue(f"must be {bounds} (got {v!r})")
        return x

    return _checker(check, "number")


def choice(options: Callable[[], Sequence[str]]) -> Check:
    """One of ``options()`` (a YAML int such as ``precision: 32`` counts as its text)."""

    def check(v: Any) -> str:
        allowed = list(options())
        text = str(v) if isinstance(v, int) and not isinstance(v, bool) else v
        if not isinstance(text, str) or text not in allowed:
            raise BadValue(f"must be one of {', '.join(allowed)} (got {v!r})")
        return text

    return _checker(check, "choice", options)


def boolean(v: Any) -> bool:
    """``true`` or ``false`` (flags set it through ``--x`` / ``--no-x``)."""
    if not isinstance(v, bool):
        raise BadValue(f"must be true or false (got {v!r})")
    return v


def text(v: Any) -> str:
    """A non-empty string."""
    if not isinstance(v, str) or not v.strip():
        raise BadValue(f"must be a non-empty string (got {v!r})")
    return v


def optional(check: Check) -> Check:
    """``None`` (YAML ``null``, flag text ``null`` or ``none``) or a value ``check`` accepts."""

    def opt(v: Any) -> Any:
        if v is None or (isinstance(v, str) and v.strip().lower() in ("null", "none")):
            return None
        return check(v)

    return _checker(opt, f"optional {check.__name__}", getattr(check, "options", None))


def like(default: Any) -> Check | None:
    """The checker for a value that replaces ``default``, chosen by the default's type: a bool
    takes true/false, an int an integer (not 2.5, not a bool), a float a finite number, a string
    a non-empty string; None (a default of any other type, or none) leaves the value to its user.

    Hyperparameters and defense options have no declared types, only defaults; typing an override
    from its default refuses ``steps=2.5`` or ``p_init=abc`` before the run folder exists, where
    the attack would otherwise truncate, coerce or crash on it minutes later.
    """
    if isinstance(default, bool):  # before int: a bool is an int
        return boolean
    if isinstance(default, int):
        return integer()
    if isinstance(default, float):
        return number()
    if isinstance(default, str):
        return text
    return None


def items(v: Any) -> list[Any]:
    """A list given as a list, a comma-separated string or a single scalar; never empty."""
    if isinstance(v, str):
        out: list[Any] = [t.strip() for t in v.split(",") if t.strip()]
    elif isinstance(v, (list, tuple)):
        out = list(v)
    elif v is None or isinstance(v, Mapping):
        raise BadValue(f"must be a list or a comma-separated string (got {v!r})")
    else:
        out = [v]
    if not out:
        raise BadValue(f"must not be empty (got {v!r})")
    return out


def list_of(check: Check) -> Check:
    """Several values (see :func:`items`), each accepted by ``check``."""

    def many(v: Any) -> list[Any]:
        return [check(x) for x in items(v)]

    return _checker(many, f"list of {check.__name__}", getattr(check, "options", None))


class Names(list):
    """A list of registry names that remembers which ones came from ``all`` (``implied``): a
    cross-field check may drop those (an attack without the chosen norm) but must refuse a name
    the user wrote."""

    implied: frozenset[str] = frozenset()


def registry_names(kind: str, registry: Callable[[], Mapping[str, Any]]) -> Check:
    """Names from a registry (one, several or ``all``, which expands in registry order)."""

    def check(v: Any) -> list[str]:
        known = list(registry())
        out = Names()
        written = set()
        for item in items(v):
            for name in known if item == "all" else [item]:
                if name not in known:
                    raise BadValue(
                        f"unknown {kind} {name!r}; valid {kind}s: {', '.join(known)}, all"
                    )
                if item != "all":
                    written.add(name)
                if name not in out:
                    out.append(name)
        out.implied = frozenset(out) - written
        return out

    return _checker(check, f"{kind} names", lambda: [*registry(), "all"])


def layer_names(v: Any) -> str | list[str]:
    """One layer name (a string) or several (a list); ``auto`` lets the defense choose."""
    names = [text(x) for x in items(v)]
    return names[0] if len(names) == 1 else names


def device_count(v: Any) -> int | str:
    """A positive number of devices, or ``auto``."""
    if v == "auto":
        return v
    n = _as_int(v)
    if n is None or n < 1:
        raise BadValue(f"must be a positive integer or auto (got {v!r})")
    return n


def model_entries(v: Any) -> list[dict[str, str]]:
    """Models to evaluate: a list of ``{config, checkpoint, name}`` (a bare string is a config)."""
    out = []
    for m in items(v):
        if isinstance(m, str):
            m = {"config": m}
        if not isinstance(m, Mapping):
            raise BadValue(f"must be a list of {{{', '.join(MODEL_KEYS)}}} mappings (got {m!r})")
        unknown = sorted(str(k) for k in m if k not in MODEL_KEYS)
        if unknown:
            raise BadValue(f"has unknown model key(s) {unknown}; allowed: {', '.join(MODEL_KEYS)}")
        bad = [k for k, x in m.items() if x is not None and not isinstance(x, str)]
        if bad:
            raise BadValue(f"{bad[0]} must be a string (got {m[bad[0]]!r})")
        out.append({k: x for k, x in m.items() if x is not None})
    return out


def _param_overrides(
    v: Any, names: Sequence[str], what: str, wildcard: bool = True
) -> dict[str, dict[str, Any]]:
    """``{name or "*": {key: value}}``, or ``[NAME.]KEY=VALUE`` texts (values read as YAML)."""
    if v is None:
        return {}
    texts = [v] if isinstance(v, str) else v if isinstance(v, list) else None
    if texts is not None and all(isinstance(x, str) for x in texts):  # from --*-param flags
        parsed: dict[str, dict[str, Any]] = {}
        for item in texts:
            key, sep, value = item.partition("=")
            name, _, param = key.strip().rpartition(".")
            if not sep or not param or (not wildcard and not name):
                form = f"[{what.upper()}.]" if wildcard else f"{what.upper()}."
                raise BadValue(f"expects {form}KEY=VALUE (got {item!r})")
            try:
                parsed.setdefault(name or "*", {})[param] = yaml.safe_load(value)
            except yaml.YAMLError:
                raise BadValue(f"has an unreadable value in {item!r}") from None
        v = parsed
    if not isinstance(v, Mapping):
        raise BadValue(f"must map {what} names (or '*') to {{parameter: value}} (got {v!r})")
    out = {}
    for name, params in v.items():
        if (name != "*" or not wildcard) and name not in names:
            valid = ", ".join([*names, "*"] if wildcard else names)
            raise BadValue(f"names unknown {what} {name!r}; valid: {valid}")
        if not isinstance(params, Mapping) or not all(isinstance(k, str) for k in params):
            raise BadValue(f"[{name!r}] must map parameter names to values (got {params!r})")
        out[name] = dict(params)
    return out


def _typed(
    out: dict[str, dict[str, Any]], defaults: Callable[[str, str], list[Any]], keep_none: bool
) -> dict[str, dict[str, Any]]:
    """Check every value of ``out`` against the type of its default(s) (:func:`like`); a key with
    no default is left for the caller's own check (which names the valid keys)."""
    for name, params in out.items():
        for key, value in params.items():
            if value is None and keep_none:
                continue
            checks = [c for c in map(like, defaults(name, key)) if c is not None]
            try:  # "*": the type of every attack that takes the key
                checked = [check(value) for check in checks]
            except BadValue as e:
                raise BadValue(f"{key if name == '*' else f'{name}.{key}'} {e}") from None
            if checked:
                params[key] = checked[0]
    return out


def attack_param_overrides(v: Any) -> dict[str, dict[str, Any]]:
    """``{attack or "*": {hyperparameter: value}}``, or ``[ATTACK.]KEY=VALUE`` texts (values read
    as YAML). Each value must have the type of the attack's default for that key (``*``: of every
    attack that takes it); None keeps the default. The keys themselves, and each attack's ranges,
    are checked against the attack classes once the norm is known (:func:`load_eval_settings`)."""
    from rfd.attacks import ATTACKS

    def defaults(name: str, key: str) -> list[Any]:
        classes = ATTACKS.values() if name == "*" else [ATTACKS[name]]
        return [d[key] for c in classes for d in c.defaults.values() if key in d]

    return _typed(_param_overrides(v, list(ATTACKS), "attack"), defaults, keep_none=True)


# constructor arguments of a defense that evaluate.py sets itself (not --defense-param options)
_RESERVED = frozenset({"self", "model", "seed", "nu", "layers", "data"})


def defense_config(defense: str) -> dict[str, Any]:
    """The defaults of ``configs/defense/<defense>.yaml`` (a ``NoiseDefense`` callback config)."""
    path = CONFIG_DIR / "defense" / f"{defense}.yaml"
    return dict(read_yaml_mapping(path).get("init_args") or {}) if path.is_file() else {}


def _constructor_options(defense: str) -> dict[str, Any]:
    """The options a defense's constructor takes (keywords evaluate.py does not set itself),
    with their defaults (None where it has none)."""
    import inspect

    from rfd.defenses import DEFENSES

    sig = inspect.signature(DEFENSES[defense].__init__).parameters
    kinds = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return {k: None if p.default is inspect.Parameter.empty else p.default
            for k, p in sig.items() if k not in _RESERVED and p.kind in kinds}  # fmt: skip


def defense_defaults(defense: str) -> dict[str, Any]:
    """A defense's options as it is built when nothing overrides them: its constructor's
    defaults, under ``configs/defense/<defense>.yaml``'s ``options``."""
    return {**_constructor_options(defense), **(defense_config(defense).get("options") or {})}


def defense_param_overrides(v: Any) -> dict[str, dict[str, Any]]:
    """``{defense: {option: value}}`` or ``DEFENSE.KEY=VALUE`` texts: options of the defense's
    constructor (they override ``configs/defense/<name>.yaml``'s ``options``). Each key must be a
    keyword the defense's constructor takes, each value of the type of that option's default
    (:func:`defense_defaults`); the constructor checks the ranges."""
    from rfd.defenses import DEFENSES

    out = _param_overrides(v, list(DEFENSES), "defense", wildcard=False)
    for name, params in out.items():
        allowed = list(_constructor_options(name))
        for key in params:
            if key not in allowed:
                raise BadValue(
                    f"has unknown {name} option {key!r}; allowed: {', '.join(allowed) or 'none'}"
                )
    defaults = {name: defense_defaults(name) for name in out}
    return _typed(out, lambda name, key: [defaults[name].get(key)], keep_none=False)


def _norms() -> Sequence[str]:
    from rfd.attacks import NORMS

    return NORMS


def _criteria() -> Sequence[str]:
    from rfd.attacks import CRITERIA

    return CRITERIA


def _success_rules() -> Sequence[str]:
    from rfd.attacks import SUCCESS_RULES

    return SUCCESS_RULES


def _precisions() -> Sequence[str]:
    from rfd.defenses import PRECISIONS

    return PRECISIONS


def _defenses() -> Mapping[str, Any]:
    from rfd.defenses import DEFENSES

    return DEFENSES


def _attacks() -> Mapping[str, Any]:
    from rfd.attacks import ATTACKS

    return ATTACKS


# --------------------------------------------------------------------------- evaluation settings


def _setting(
    default: Any, check: Check, help: str, *, semantic: bool = True, flag: str | None = "",
    metavar: str | None = None,
) -> Any:  # fmt: skip
    """A field with its help, flag (``""``: derived from the name, ``None``: no flag of its own),
    checker and whether it decides the numbers (``semantic``: part of the spec fingerprint)."""
    meta = {"check": check, "help": help, "semantic": semantic, "flag": flag, "metavar": metavar}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: json.loads(json.dumps(default)), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class EvalSettings:
    """Everything that decides an evaluation, and how it runs. Field names are the YAML keys;
    flags are ``--field-name``. ``spec_of`` keeps the fields marked semantic."""

    models: list[dict[str, str]] = _setting(
        [{"config": "fmnist_default.yaml"}], model_entries,
        "models: list of {config, checkpoint, name} (flags: --config / --checkpoint)", flag=None,
    )  # fmt: skip
    defense: list[str] = _setting(
        ["none", "input", "feature"], registry_names("defense", _defenses),
        "one, several (comma) or all of: {choices}", metavar="NAMES",
    )  # fmt: skip
    attack: list[str] = _setting(
        ["square"], registry_names("attack", _attacks),
        "one, several (comma) or all of: {choices}", metavar="NAMES",
    )  # fmt: skip
    n_images: int = _setting(100, integer(1), "class-balanced test images (paper: 1000)")
    batch_size: int = _setting(
        256, integer(1), "rows per forward batch (results do not depend on it)", semantic=False
    )
    queries: list[int] = _setting(
        [1000], list_of(integer(1)), "query budget(s), e.g. 1000 or 1000,10000", metavar="N[,N]"
    )
    norm: str = _setting("linf", choice(_norms), "threat model: {choices}")
    eps: float | None = _setting(
        None, optional(number(gt=0)),
        "perturbation radius in [0, 1] pixel units (null: the default for the image size)",
    )  # fmt: skip
    eot: int = _setting(1, integer(1), "EOT samples per query (each charged)")
    criterion: str = _setting("vote", choice(_criteria), "success criterion: {choices}")
    success: str = _setting(
        "any", choice(_success_rules),
        "which fooling queries count: {choices} (improved: only those that also lower the "
        "attack's incumbent loss, the paper code's rule)",
    )  # fmt: skip
    nu: float | None = _setting(
        None, optional(number(ge=0)), "noise std (skips calibration; clears --target-drop)"
    )
    target_drop: float | None = _setting(
        0.02, optional(number(gt=0, lt=1)), "calibrate nu to this clean-accuracy drop"
    )
    layers: str | list[str] = _setting(
        "penultimate", layer_names, "layer name(s) for feature noise (comma), or auto"
    )
    seed: int = _setting(0, integer(0), "seed of images, attacks and defense noise")
    n_calibration: int = _setting(1000, integer(1), "calibration images (disjoint from eval)")
    n_clean_passes: int = _setting(5, integer(1), "noisy passes for the defended clean accuracy")
    attack_params: dict[str, dict[str, Any]] = _setting(
        {}, attack_param_overrides,
        "attack hyperparameter (repeatable), e.g. square.p_init=0.1, or p_init=0.1 for every "
        "attack that takes it",
        flag="--attack-param", metavar="[ATTACK.]KEY=VALUE",
    )  # fmt: skip
    defense_params: dict[str, dict[str, Any]] = _setting(
        {}, defense_param_overrides,
        "defense option (repeatable), e.g. smoothing.sigma=0.12 or magnet.fpr=0.005; overrides "
        "configs/defense/<name>.yaml",
        flag="--defense-param", metavar="DEFENSE.KEY=VALUE",
    )  # fmt: skip
    paper: bool = _setting(False, boolean, "put the paper's numbers beside ours")
    precision: str | None = _setting(
        None, optional(choice(_precisions)),
        "forward precision: {choices} (default: 32 on CPU, chosen for the GPU)",
    )  # fmt: skip
    channels_last: bool = _setting(False, boolean, "channels-last memory format for forwards")
    compile: bool = _setting(False, boolean, "torch.compile the model")
    bpda: bool = _setting(
        True, boolean,
        "white-box attacks pass a defense's declared surrogate (the identity) in place of its "
        "non-differentiable part (BPDA); --no-bpda differentiates through it as implemented",
    )  # fmt: skip
    # how, not what: excluded from the spec fingerprint
    run_dir: str | None = _setting(
        None, optional(text), "run folder (default: runs/eval/<name>-<settings hash>)",
        semantic=False,
    )  # fmt: skip
    wandb: str = _setting(
        "offline", choice(lambda: WANDB_MODES), "W&B logging: {choices}", semantic=False
    )
    accelerator: str = _setting(
        "auto", choice(lambda: ACCELERATORS), "Lightning accelerator: {choices}", semantic=False
    )
    devices: int | str = _setting(
        1, device_count, "devices per node, or auto (GPUs: DDP spreads images)", semantic=False
    )
    overwrite: bool = _setting(
        False, boolean, "replace results of other settings in the run folder", semantic=False
    )
    train_if_missing: bool = _setting(
        True, boolean, "train the embedded default when its checkpoint is missing", semantic=False
    )


NON_SEMANTIC = tuple(f.name for f in fields(EvalSettings) if not f.metadata["semantic"])
_FIELDS = {f.name: f for f in fields(EvalSettings)}


def _flag(f: Any) -> str | None:
    flag = f.metadata["flag"]
    return "--" + f.name.replace("_", "-") if flag == "" else flag


def eval_parser() -> OneLineParser:
    """The flags of ``python evaluate.py`` (each field's flag, plus --eval-config/--config/
    --checkpoint). Flags left out are absent from the namespace (nothing is defaulted here)."""
    ap = OneLineParser(
        prog="evaluate.py",
        description="Attack defended models and report robust accuracy in the paper's layout. "
        "Settings: configs/eval.yaml (or --eval-config FILE), then these flags.",
        argument_default=argparse.SUPPRESS,
    )
    ap.add_argument(
        "--eval-config", "--grid", dest="eval_config", metavar="FILE",
        help="eval YAML (default configs/eval.yaml; bare names resolve in configs/)",
    )  # fmt: skip
    ap.add_argument(
        "--config", help="training config of the model (bare names resolve in configs/)"
    )
    ap.add_argument(
        "--checkpoint",
        help="model weights (default: runs/<run_name>/best.ckpt of --config; alone: the run "
        "folder's config.yaml or the checkpoint's hyperparameters)",
    )
    for f in fields(EvalSettings):
        flag = _flag(f)
        if flag is None:
            continue
        check, help_ = f.metadata["check"], f.metadata["help"]
        if "{choices}" in help_:
            help_ = help_.format(choices=", ".join(check.options()))
        kwargs: dict[str, Any] = {"dest": f.name, "help": help_}
        if check is boolean:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["metavar"] = f.metadata["metavar"] or f.name.upper()
            if f.name in ("attack_params", "defense_params"):
                kwargs["action"] = "append"
        ap.add_argument(flag, **kwargs)
    return ap


def _assign(s: EvalSettings, key: str, value: Any, where: str) -> None:
    """Check ``value`` with the field's one checker and set it; errors name key and source."""
    try:
        setattr(s, key, _FIELDS[key].metadata["check"](value))
    except BadValue as e:
        msg = str(e)
        raise UsageError(f"{key}{' ' if msg.startswith('must') else ': '}{msg} ({where})") from None


def load_eval_settings(argv: Sequence[str] | None = None) -> EvalSettings:
    """Defaults ← configs/eval.yaml (or ``--eval-config`` / ``--grid`` FILE) ← flags, checked.

    Raises:
        UsageError: an unknown flag or key, a value its field refuses, or fields that do not fit
            together; one line naming the key and where it came from.
    """
    args = vars(eval_parser().parse_args(list(sys.argv[1:] if argv is None else argv)))
    s = EvalSettings()
    where: dict[str, str] = {}
    eval_config = args.pop("eval_config", None)
    path = Path(resolve_config_path(eval_config)) if eval_config else DEFAULT_EVAL
    if eval_config or path.is_file():
        for key, value in read_yaml_mapping(path, "evaluation settings").items():
            if key not in _FIELDS:
                raise UsageError(
                    f"unknown key {key!r} in {path}; allowed keys: {', '.join(_FIELDS)}"
                )
            _assign(s, key, value, f"in {path}")
            where[key] = f"in {path}"
    model = {k: args.pop(k) for k in ("config", "checkpoint") if k in args}
    if model:
        _assign(s, "models", [model], "from --config/--checkpoint")
        where["models"] = "from --config/--checkpoint"
    if "nu" in args and "target_drop" in args:
        raise UsageError("give --nu (a fixed noise std) or --target-drop (calibrate nu), not both")
    for key, value in args.items():
        before = getattr(s, key)
        _assign(s, key, value, f"from {_flag(_FIELDS[key])}")
        where[key] = f"from {_flag(_FIELDS[key])}"
        if key in ("attack_params", "defense_params"):  # flags add to the file's parameters
            now = getattr(s, key)
            setattr(s, key, {a: {**before.get(a, {}), **now.get(a, {})}
                             for a in dict.fromkeys([*before, *now])})  # fmt: skip
    if "nu" in args and s.nu is not None:
        s.target_drop = None  # a fixed nu on the command line replaces calibration
    _check_together(s, where)
    return s


def validate(s: EvalSettings) -> EvalSettings:
    """Check (and normalize) settings built in Python, as :func:`load_eval_settings` does."""
    for f in fields(EvalSettings):
        _assign(s, f.name, getattr(s, f.name), "in EvalSettings")
    _check_together(s, {})
    return s


def _check_together(s: EvalSettings, where: dict[str, str]) -> None:
    """The checks that need several fields: norm vs attacks, eps vs norm, queries vs eot,
    hyperparameters vs the attacks and norm."""
    from rfd.attacks import ATTACKS, check_eps, make_attack

    def at(key: str) -> str:
        return f" ({where.get(key, 'default')})"

    implied = getattr(s.attack, "implied", frozenset())
    if implied:  # "all" means every attack that supports the chosen norm
        s.attack = Names(a for a in s.attack if a not in implied or s.norm in ATTACKS[a].norms)
        s.attack.implied = implied
    for a in s.attack:
        if s.norm not in ATTACKS[a].norms:
            raise UsageError(
                f"attack {a!r} does not support norm {s.norm!r}; it supports "
                f"{', '.join(ATTACKS[a].norms)}{at('norm')}"
            )
    if s.eps is not None and s.norm == "linf":  # L2 needs the image size: checked with the model
        try:
            check_eps(s.eps, s.norm, ())
        except ValueError as e:
            raise UsageError(f"{e}{at('eps')}") from None
    if max(s.queries) < s.eot:
        raise UsageError(
            f"queries: the largest budget ({max(s.queries)}) must be >= eot ({s.eot}), since every "
            f"query costs eot forwards{at('queries')}"
        )
    for key in s.attack_params.get("*", {}):
        if not any(key in c.defaults.get(s.norm, {}) for c in ATTACKS.values()):
            raise UsageError(
                f"attack_params: no attack takes hyperparameter {key!r} for norm {s.norm}"
                f"{at('attack_params')}"
            )
    for a in dict.fromkeys([*s.attack, *(x for x in s.attack_params if x != "*")]):
        if s.norm in ATTACKS[a].norms:
            try:
                make_attack(a, s.norm, **attack_params_for(s, a))
            except (ValueError, TypeError) as e:
                raise UsageError(f"attack_params: {first_line(e)}{at('attack_params')}") from None


def attack_params_for(s: EvalSettings, attack: str) -> dict[str, Any]:
    """An attack's hyperparameters: ``configs/attack/<attack>.yaml[norm]`` ← ``attack_params["*"]``
    (the keys this attack takes) ← ``attack_params[attack]``; the class fills the rest."""
    from rfd.attacks import ATTACKS

    path = CONFIG_DIR / "attack" / f"{attack}.yaml"
    base = read_yaml_mapping(path, "norm: hyperparameters").get(s.norm) if path.is_file() else None
    if not isinstance(base, (Mapping, type(None))):
        raise UsageError(f"{path}: {s.norm} must map hyperparameter names to values")
    takes = ATTACKS[attack].defaults.get(s.norm, {})
    star = {k: v for k, v in s.attack_params.get("*", {}).items() if k in takes}
    return {**(base or {}), **star, **s.attack_params.get(attack, {})}


def spec_of(s: EvalSettings) -> dict[str, Any]:
    """The settings that decide the numbers (every field but :data:`NON_SEMANTIC`)."""
    d = asdict(s)
    for k in NON_SEMANTIC:
        d.pop(k)
    return d


def repo_path(path: str | Path) -> str:
    """``path`` resolved, relative to the repository root when inside it: one spelling per file
    (``fmnist_default``, ``configs/fmnist_default.yaml`` and its absolute path are one model)."""
    p = Path(path).resolve()
    try:
        return str(p.relative_to(REPO_ROOT.resolve()))
    except ValueError:
        return str(p)


def spec_hash(spec: dict[str, Any]) -> str:
    """A short, order-independent fingerprint of a spec (names run folders)."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:8]


# at most this many DDP processes per CPU core: beyond it gloo's start-up times out on a loaded
# machine, and nothing is gained (a 64-process run on 2 cores hung for minutes before this check)
CPU_PROCESSES_PER_CORE = 2


def check_machine(accelerator: str, devices: int | str) -> None:
    """Refuse an accelerator this machine lacks, or more devices than it has, before anything is
    written (Lightning would only fail once the Trainer starts, after the run folder exists)."""
    import importlib.util
    import os

    import torch

    cuda = torch.cuda.is_available()
    if accelerator in ("gpu", "cuda") and not cuda:
        raise UsageError(
            f"accelerator {accelerator}: this machine has no CUDA GPU; use --accelerator cpu or auto"
        )
    if accelerator == "mps" and not torch.backends.mps.is_available():
        raise UsageError("accelerator mps: this machine has no Apple GPU; use cpu or auto")
    if accelerator == "tpu" and importlib.util.find_spec("torch_xla") is None:
        raise UsageError("accelerator tpu: torch_xla is not installed; use cpu or auto")
    if not isinstance(devices, int) or accelerator in ("mps", "tpu"):
        return
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and cuda):
        have, what = torch.cuda.device_count(), "CUDA GPUs"
    else:
        have = (os.cpu_count() or 1) * CPU_PROCESSES_PER_CORE
        what = f"CPU processes ({CPU_PROCESSES_PER_CORE} per core)"
    if devices > have:
        raise UsageError(f"devices={devices}, but this machine allows at most {have} {what}")


def check_writable(folder: Path, flag: str) -> None:
    """Refuse an output folder that is a file or lies under a folder we cannot write."""
    import os

    folder = Path(folder)
    probe = folder
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise UsageError(f"{flag} {folder}: {probe} is a file, not a folder")
    if probe.is_dir() and not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {folder}: {probe} is not writable")

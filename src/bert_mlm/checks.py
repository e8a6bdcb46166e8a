"""Every setting checked once, at the start, before anything is built or written: each
config group against the typed arguments of what it builds (its `_target_`), whose
ranges are declared there as pydantic types; also the devices asked for, and the files
data=text needs. A bad value ends as one UserError that names the key, e.g.
`model.lr=-1: input should be greater than 0`."""

import functools
import inspect
import re
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

import lightning as L
from hydra.errors import InstantiationException
from hydra.utils import get_object
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, FilePath, NonNegativeFloat, NonNegativeInt,
                      PositiveInt, TypeAdapter, ValidationError, create_model)

from bert_mlm import launch
from bert_mlm.checkpoints import last_checkpoint
from bert_mlm.corpus import check_files
from bert_mlm.errors import UserError, find_cause
from bert_mlm.module import VAL_METRICS
from bert_mlm.schedule import NO_END
from bert_mlm.vocab import VocabSize

Probability = Annotated[float, Field(ge=0, le=1)]
# A count (int) or a share of the whole (float up to 1), as Lightning's limit_* take.
CountOrShare = NonNegativeInt | Probability


def _duration(text: str) -> str:
    if not re.fullmatch(r"\d+:\d\d:\d\d:\d\d", text.strip()):  # as Lightning's Timer reads it
        raise ValueError("a duration is written DD:HH:MM:SS, e.g. 00:12:00:00")
    return text


def _own_sampler(use: bool) -> bool:
    if not use:
        raise ValueError("the training data is shared out between ranks by its own sampler (order.py), "
                         "which this does not change: leave it out")
    return use


TimedeltaKey = Literal["weeks", "days", "hours", "minutes", "seconds", "milliseconds", "microseconds"]
Duration = Annotated[str, AfterValidator(_duration)] | dict[TimedeltaKey, NonNegativeFloat]  # dict: timedelta's arguments

# Ranges that the Lightning classes we configure leave out of their annotations (they check
# some of them later, with a traceback, others never). Each replaces that argument's annotation.
LIGHTNING_RANGES: dict[type, dict[str, Any]] = {
    L.Trainer: {
        "devices": PositiveInt | Literal[-1, "auto"] | Annotated[list[NonNegativeInt], Field(min_length=1)],
        "num_nodes": PositiveInt,
        "max_steps": Annotated[int, Field(ge=-1)],  # -1: no limit
        "max_epochs": Annotated[int, Field(ge=-1)] | None,
        "min_steps": NonNegativeInt | None,
        "min_epochs": NonNegativeInt | None,
        "max_time": Duration | None,
        # batches, a share of an epoch, or a time
        "val_check_interval": PositiveInt | Annotated[float, Field(gt=0, le=1)] | Duration | None,
        "check_val_every_n_epoch": PositiveInt | None,
        "log_every_n_steps": PositiveInt | None,
        "accumulate_grad_batches": PositiveInt,
        "gradient_clip_val": NonNegativeFloat | None,
        "gradient_clip_algorithm": Literal["norm", "value"] | None,
        "num_sanity_val_steps": Annotated[int, Field(ge=-1)] | None,  # -1: all
        "limit_train_batches": PositiveInt | Annotated[float, Field(gt=0, le=1)] | None,  # 0 would train nothing
        "limit_val_batches": CountOrShare | None,
        "limit_test_batches": CountOrShare | None,
        "limit_predict_batches": CountOrShare | None,
        "overfit_batches": CountOrShare,
        "fast_dev_run": bool | NonNegativeInt,
        "reload_dataloaders_every_n_epochs": NonNegativeInt,
        "use_distributed_sampler": Annotated[bool, AfterValidator(_own_sampler)],
    },
    ModelCheckpoint: {
        "save_top_k": Annotated[int, Field(ge=-1)],  # -1: all
        "every_n_train_steps": NonNegativeInt | None,  # 0: off
        "every_n_epochs": NonNegativeInt | None,
        "mode": Literal["min", "max"],
    },
    TQDMProgressBar: {"refresh_rate": NonNegativeInt, "process_position": NonNegativeInt},  # 0: no bar
}

# Arbitrary classes (a Strategy, a tokenizer) are checked with isinstance; `model_` is a
# pydantic prefix that Lightning's `model_registry` would otherwise trip over.
_PYDANTIC = ConfigDict(arbitrary_types_allowed=True, protected_namespaces=())


class TokenizerKeys(BaseModel):
    train: bool = False
    vocab_size: VocabSize = 30522
    min_frequency: PositiveInt = 2


class RunKeys(BaseModel):
    """The keys of conf/train.yaml itself; the groups are checked against their targets."""

    model_config = ConfigDict(extra="ignore")
    # L.seed_everything's range: it replaces any other seed by 0, with only a warning.
    seed: Annotated[int, Field(ge=0, lt=2**32)] = 0
    ckpt_path: Literal["last"] | FilePath | None = None
    overwrite: bool = False
    prepare_only: bool = False
    tokenizer: TokenizerKeys = TokenizerKeys()


def check_config(cfg: DictConfig) -> None:
    """Raises UserError for the first value in `cfg` outside its declared type or range.
    Values that do not resolve here (`${hydra:...}` outside a Hydra run) are left out."""
    check_values("", RunKeys, _values(cfg, keys=RunKeys.model_fields))
    for path, node in _targets(cfg):
        try:
            target = get_object(node._target_)
        except Exception as err:
            raise UserError(f"{path}._target_={node._target_} cannot be imported: {err}") from err
        model = _signature_model(target)
        if model is None:  # no signature to check against (a builtin such as timedelta)
            continue
        values = _values(node)
        if target is L.Trainer and values.get("precision") == "mixed":  # ours, not Lightning's
            values["precision"] = launch.precision("mixed", values.get("accelerator", "auto"))
        check_values(f"{path}.", model, values)
    _check_checkpoints(cfg)
    _check_end(cfg.get("trainer") or {}, OmegaConf.select(cfg, "data.streaming", default=False))
    if cfg.get("data"):
        check_files(cfg.data.get("corpus", "pydocs"), cfg.data.get("train_files"), cfg.data.get("val_files"))
    if cfg.get("trainer"):
        launch.check_devices(cfg.trainer.get("accelerator", "auto"), cfg.trainer.get("devices"))


def _check_end(trainer: DictConfig, streaming: bool) -> None:
    """Refuses a run that would not end, or end only when an epoch of unknown length does."""
    if trainer.get("max_steps", -1) > 0 or trainer.get("max_time") is not None:
        return
    if streaming:
        raise UserError("data.streaming=true reads a stream of unknown length: set trainer.max_steps "
                        "(or a time budget, trainer.max_time)")
    if (trainer.get("max_epochs") or -1) < 0:
        raise UserError(NO_END)


def _check_checkpoints(cfg: DictConfig) -> None:
    """The checkpoint callbacks write into the run folder's checkpoints/, where resuming
    (ckpt_path=last), the resume command and the guard against a second run look, and watch
    a metric that validation logs (else Lightning stops at the first validation, unsaved)."""
    try:
        folder = last_checkpoint(cfg.output_dir).parent.resolve()
    except OmegaConfBaseException:  # not resolvable outside a Hydra run
        return
    callbacks = cfg.get("callbacks") or {}
    for name in ("checkpoint", "last"):
        dirpath = OmegaConf.select(cfg, f"callbacks.{name}.dirpath", default=None)
        if callbacks.get(name) is not None and (dirpath is None or Path(dirpath).resolve() != folder):
            raise UserError(f"callbacks.{name}.dirpath={_shown(dirpath)}: checkpoints go in the run folder's "
                            "checkpoints/, where resuming and the guard against overwriting a run look; to put "
                            "them elsewhere, put the whole run there (hydra.run.dir=...)")
    monitor = OmegaConf.select(cfg, "callbacks.checkpoint.monitor", default=None)
    if callbacks.get("checkpoint") is not None and monitor is not None and monitor not in VAL_METRICS:
        raise UserError(f"callbacks.checkpoint.monitor={monitor}: validation logs no such metric; "
                        f"use one of {', '.join(VAL_METRICS)}")


def check_values(prefix: str, model: type[BaseModel], values: dict[str, Any]) -> None:
    """Raises UserError for the first of `values` that `model` refuses, named `prefix` + key."""
    try:
        model.model_validate(values)
    except ValidationError as err:
        raise UserError(_message(prefix, err.errors(include_url=False), values)) from err


@contextmanager
def building(group: str, node: DictConfig | None = None) -> Iterator[None]:
    """Turns what a library raises while `group` is built from `node` into a UserError that
    names the group and, where the message shows it, the key."""
    try:
        yield
    except Exception as err:
        if find_cause(err, UserError):  # ours already says what to change
            raise
        inner = err
        while isinstance(inner, InstantiationException) and inner.__cause__ is not None:
            inner = inner.__cause__  # Hydra's wrapper: the library's own exception is inside
        message = " ".join(str(inner).split()) or type(inner).__name__
        raise UserError(f"{_where(group, node, message)}: {message}") from err


def _where(group: str, node: DictConfig | None, message: str) -> str:
    """`group.key=value` for the key the message is about (`key=...` first), else `group`."""
    keys = [k for k in (node or {}) if k != "_target_" and re.search(rf"\b{re.escape(str(k))}\b", message)]
    keys.sort(key=lambda k: f"{k}=" not in message)
    if not keys:
        return group
    return f"{group}.{keys[0]}={_shown(_values(node).get(keys[0]))}"


def _targets(node: DictConfig | ListConfig, path: str = "") -> Iterator[tuple[str, DictConfig]]:
    """Every node with a `_target_` (outside Hydra's own), with its dotted path."""
    if isinstance(node, DictConfig) and "_target_" in node:
        yield path, node
    items = node.items_ex(resolve=False) if isinstance(node, DictConfig) else enumerate(node)
    for key, child in items:
        if isinstance(child, (DictConfig, ListConfig)) and not (path == "" and key == "hydra"):
            yield from _targets(child, f"{path}.{key}" if path else str(key))


def _is_target(value: Any) -> bool:
    """A node built by its own `_target_`, or a list of them: checked on its own."""
    if isinstance(value, ListConfig):
        return any(_is_target(v) for v in value)
    return isinstance(value, DictConfig) and "_target_" in value


def _values(node: DictConfig, keys: typing.Container[str] | None = None) -> dict[str, Any]:
    """The node's values (those of `keys`) as plain Python, without `_target_`, nested
    targets, and values that do not resolve here."""
    values = {}
    for key in node:
        if key == "_target_" or (keys is not None and key not in keys):
            continue
        try:
            value = node[key]
            if _is_target(value):
                continue
            if isinstance(value, (DictConfig, ListConfig)):
                value = OmegaConf.to_container(value, resolve=True)
        except OmegaConfBaseException:
            continue
        values[str(key)] = value
    return values


@functools.cache
def _signature_model(target: Callable) -> type[BaseModel] | None:
    """A pydantic model of `target`'s arguments, their annotations as types. Every field
    is optional: arguments that code fills in (a tokenizer) are not in the config."""
    try:
        parameters = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return None
    try:
        hints = typing.get_type_hints(target.__init__ if inspect.isclass(target) else target, include_extras=True)
    except Exception:  # annotations that name what cannot be imported here: unchecked
        hints = {}
    ranges = next((r for cls, r in LIGHTNING_RANGES.items() if inspect.isclass(target) and issubclass(target, cls)), {})
    fields, extra = {}, "forbid"
    for name, p in parameters.items():
        if p.kind == p.VAR_KEYWORD:
            extra = "allow"
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or name.startswith("_"):
            continue
        annotation = ranges.get(name, hints.get(name, Any))
        fields[name] = (_known(annotation), None if p.default is p.empty else p.default)
    return create_model(f"{target.__name__}Arguments", __config__=ConfigDict(**_PYDANTIC, extra=extra), **fields)


def _known(annotation: Any) -> Any:
    """The annotation where pydantic can check it, else Any."""
    try:
        TypeAdapter(annotation, config=_PYDANTIC)
    except Exception:
        return Any
    return annotation


def _message(prefix: str, errors: list[dict], values: dict[str, Any]) -> str:
    """`key=value: reason` for the first key that failed. A value outside a union fails in
    each branch: branches that took its type but not its range say more than the others."""
    key_path = _key_path(errors[0]["loc"], values)
    errors = [e for e in errors if _key_path(e["loc"], values) == key_path]
    in_range = [e for e in errors if not e["type"].endswith(("_type", "_parsing", "_from_float", "instance_of"))]
    reasons = []
    for e in in_range or errors:
        reason = str(e["ctx"]["error"]) if e["type"] == "value_error" else e["msg"]
        reason = reason[0].lower() + reason[1:]
        if reasons:  # "input should be A or B", not "input should be A or input should be B"
            reason = reason.removeprefix("input should be ")
        if reason not in reasons and f"input should be {reason}" not in reasons:
            reasons.append(reason)
    value = functools.reduce(lambda v, k: v.get(k) if isinstance(v, dict) else None, key_path, values)
    if reasons == ["input should be a valid list"]:  # data.train_files=a.txt: the brackets left out
        reasons = [f"input should be a list: [{_shown(value)}]"]
    return f"{prefix}{'.'.join(key_path)}={_shown(value)}: {' or '.join(reasons)}"


def _key_path(loc: tuple, values: dict[str, Any]) -> tuple[str, ...]:
    """The config keys in a pydantic error location (which also holds list indices and
    union branch names)."""
    path, value = [], values
    for part in loc:
        if not (isinstance(value, dict) and part in value):
            break
        path.append(part)
        value = value[part]
    return tuple(path) or tuple(str(part) for part in loc[:1])


def _shown(value: Any) -> str:
    """A value as it is written on the command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ",".join(_shown(v) for v in value) + "]"
    return str(value)

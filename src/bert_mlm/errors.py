"""Bad input the user can fix, and how it is told: one `error:` line and a non-zero exit."""

import os
import re
import sys
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

import hydra._internal.utils as hydra_utils  # (Hydra 1.3) run_and_report: see config_errors_in_one_line
from hydra.errors import ConfigCompositionException, OverrideParseException


class UserError(Exception):
    """Bad input the user can fix. `python -m train` prints it as one `error:` line."""


def causes(err: BaseException | None) -> Iterator[BaseException]:
    """`err`, then what it was raised from or in handling of, and so on: libraries (Hydra's
    instantiate, datasets) wrap what they catch."""
    while err is not None:
        yield err
        err = err.__cause__ or err.__context__


def find_cause(err: BaseException | None, kind: type | tuple[type, ...]) -> BaseException | None:
    """`err` or the first of its causes that is a `kind`."""
    return next((e for e in causes(err) if isinstance(e, kind)), None)


def refuse(err: UserError | str, code: int = 2) -> NoReturn:
    print(f"error: {err}", file=sys.stderr)
    sys.exit(code)


# The Hydra plugins of pyproject.toml's optional extras: their configs, and the option of ours that uses each.
EXTRAS = {"hydra/launcher/joblib": ("hydra/launcher=parallel", "parallel"),
          "hydra/launcher/submitit_slurm": ("hydra/launcher=slurm", "slurm"),
          "hydra/sweeper/optuna": ("hparams_search=optuna", "sweep")}


def config_error_line(err: Exception) -> str:
    """Hydra's message for a command line it could not compose (an unknown key or option, bad
    override syntax, an option whose plugin is not installed), as one line."""
    text = str(err).split("\nConfig search path:")[0]
    plugin = re.search(r"Could not (?:load|find) '(hydra/(?:launcher|sweeper)/[^/']+)'", text)
    if plugin and plugin[1] in EXTRAS:
        option, extra = EXTRAS[plugin[1]]
        return f"{option} needs the {extra} extra, which is not installed: pip install -e \".[{extra}]\""
    if "Primary config directory not found" in text:  # conf/ is beside src/, in the clone
        return ("the configs (conf/) were not found: a plain `pip install .` copies src/ only; "
                "install the clone with `pip install -e .` instead")
    if unknown := re.search(r"Could not override '(.+)'\.\nTo append to your config use (\S+)", text):
        return (f"{unknown[1]} is not a setting: check its spelling (python -m train --cfg job lists them), "
                f"or add it with {unknown[2]}")
    if missing := re.search(r"Could not find '(.+)/([^/]+)'\n\nAvailable options in '.+':\n(.*)", text, re.S):
        return f"{missing[1]}={missing[2]} is not one of the options: {', '.join(missing[3].split())}"
    lines = (line.strip() for line in text.splitlines() if not line.startswith("See https://hydra.cc"))
    return "on the command line: " + " ".join(line for line in lines if line)


def config_errors_in_one_line() -> None:
    """A command line Hydra cannot compose ends like any bad input: one `error:` line, status 2
    (Hydra prints its message over several lines, with a note on HYDRA_FULL_ERROR, status 1)."""
    report = hydra_utils.run_and_report

    def run_and_report(func: Callable[[], Any]) -> Any:
        def composing() -> Any:
            try:
                return func()
            except (ConfigCompositionException, OverrideParseException) as err:
                if os.environ.get("HYDRA_FULL_ERROR") == "1":
                    raise
                refuse(config_error_line(err))

        return report(composing)

    hydra_utils.run_and_report = run_and_report

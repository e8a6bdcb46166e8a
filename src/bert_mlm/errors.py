"""Bad input the user can fix, and how it is told: one `error:` line and a non-zero exit."""

import sys
from collections.abc import Iterator
from typing import NoReturn


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

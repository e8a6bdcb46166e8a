"""Bad input the user can fix, and how it is told: one `error:` line and a non-zero exit."""

import sys
from typing import NoReturn


class UserError(Exception):
    """Bad input the user can fix. `python -m train` prints it as one `error:` line."""


def find_cause(err: BaseException | None, kind: type | tuple[type, ...]) -> BaseException | None:
    """`err` or the first of its causes that is a `kind`: libraries wrap what they catch."""
    while err is not None and not isinstance(err, kind):
        err = err.__cause__ or err.__context__
    return err


def refuse(err: UserError | str, code: int = 2) -> NoReturn:
    print(f"error: {err}", file=sys.stderr)
    sys.exit(code)

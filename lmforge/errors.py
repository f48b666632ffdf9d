"""The one error type users see, and the wrapper that turns it into a one-line message and exit code."""

from __future__ import annotations

import errno
import sys
from collections.abc import Callable
from typing import NoReturn


class LmforgeError(Exception):
    """A problem the user can act on: bad params, bad input data, a failed expectation.

    The message is one line and names the file, key or expectation at fault.
    """

    exit_code = 2


class ParamsError(LmforgeError):
    """params.yaml (or a profile overlay) does not match the schema."""


class DataError(LmforgeError):
    """An input file or dataset is missing, unreadable or malformed."""


class TransientError(LmforgeError):
    """A server could not be reached or answered with an error (a 5xx, a 403, a timeout): try again later.

    Orchestration retries exit 75 (EX_TEMPFAIL); nothing that depends on the answer is decided meanwhile.
    """

    exit_code = 75


class ValidationFailed(LmforgeError):
    """A Great Expectations expectation failed and `validate.on_failure` is `fail`."""

    exit_code = 3


def is_retried(code: int) -> bool:
    """The exit-code contract: a transient failure (75) or a death by signal (a killed process: -9 from
    Python's subprocess or DVC, 137 from a shell) is retried. 2 (params, input) and 3 (an expectation)
    are the user's to fix, and any other code is a bug (a traceback exits 1): it would only fail again."""
    return code == TransientError.exit_code or code < 0 or 128 < code <= 128 + 64


class Follower(Exception):
    """Raised by a rank other than 0 of a multi-device stage once it has trained (lmforge/distributed.py):
    rank 0 records the run and writes the stage's outputs."""


# A disk that cannot take the write: full, over quota, read-only, or not ours to write. Retrying cannot help
# until someone frees space or fixes the permission, so these are the user's to fix (exit 2), in one line.
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


def cannot_write(path: object, error: OSError) -> LmforgeError:
    """A write that the disk refused, as one line naming the path."""
    return LmforgeError(f"{path}: cannot write: {error.strerror or error} (errno {error.errno})")


def fail(error: LmforgeError) -> NoReturn:
    """Print `error` as one line on stderr and exit with its code."""
    from lmforge.credentials import masked

    message = masked(" ".join(str(error).split()))  # one line, whatever the message held; no password in it
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(error.exit_code)


def run_main(main: Callable[[], object]) -> None:
    """Run a stage's `main`, turning an LmforgeError into a one-line error and a non-zero exit."""
    try:
        main()
    except LmforgeError as error:
        fail(error)
    except OSError as error:
        if error.errno not in DISK_ERRNOS:
            raise
        fail(cannot_write(error.filename or "an output", error))

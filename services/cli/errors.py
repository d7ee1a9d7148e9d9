"""How the command line ends: one table from error kinds to exit statuses, and the runner of a
command that applies it.

Commands raise; they do not print their own errors. A CurateError ends the command with
`curate: <message>` on stderr (no traceback) and its kind's exit status; anything else is a bug
and keeps its traceback.
"""

import argparse
import sys

from schemas.errors import CurateError, ErrorKind, InputError

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it

# What the user can fix by changing the command (its flags, names, paths, registrations or
# models) is a usage error; what went wrong with the data or the machinery is a failure.
EXIT_STATUS: dict[ErrorKind, int] = {
    ErrorKind.INPUT: EXIT_USAGE,
    ErrorKind.NOT_FOUND: EXIT_USAGE,
    ErrorKind.CONFLICT: EXIT_USAGE,
    ErrorKind.MODEL: EXIT_USAGE,
    ErrorKind.DATA: EXIT_FAILED,
    ErrorKind.INTERNAL: EXIT_FAILED,
}


class UsageError(InputError):
    """A problem with the command line itself (a flag value, a combination, a missing thing it
    names) that no library call reports."""

    code = "usage"


def run_command(args: argparse.Namespace) -> int:
    """Run the parsed command (`args.func`) and return its exit status."""
    try:
        return args.func(args)
    except CurateError as error:
        print(f"curate: {error}", file=sys.stderr)
        return EXIT_STATUS[error.kind]
    except KeyboardInterrupt:
        print("curate: interrupted; re-run the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED

"""Running a command-line entry point: expected errors (`InputError`, a missing file, an unknown
`--config.key`) print one line `error: <what is wrong>` and exit 2; `--debug` shows the traceback instead."""

from __future__ import annotations

import re
import sys
from collections.abc import Callable

from absl import app, flags

from m3d_jax.errors import InputError

_DEBUG = flags.DEFINE_bool("debug", False, "show tracebacks instead of one-line errors")


def volume_size(values: list[str], flag: str) -> tuple[int, int, int]:
    """A D,H,W list flag as three positive integers; anything else is an InputError naming the flag."""
    try:
        size = tuple(int(value) for value in values)
    except ValueError:
        size = ()
    if len(size) != 3 or min(size) < 1:
        raise InputError(f"--{flag}={','.join(values)}: expected three positive integers D,H,W")
    return size


def fail(message: str) -> None:
    """Prints `error: message` to stderr and exits 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _debugging(argv: list[str]) -> bool:
    return any(arg in ("--debug", "--debug=true", "--debug=True", "--debug=1") for arg in argv)


def _override_error(argv: list[str], error: Exception) -> str:
    """One line for a failed `--config.key=value` override: the flag, and ml_collections' own suggestion."""
    text = str(error).strip("'\"").replace("\\'", "'")
    key = re.search(r"'?([^'\n]+)'?", text)
    suggestion = re.search(r'Did you mean "([^"]+)"', text)
    culprit = next((arg.split("=", 1)[0] for arg in argv if key and arg.startswith("--")
                    and arg.split("=", 1)[0].split(".")[-1] == key.group(1)), None)
    if culprit is None:
        return f"bad --config override ({type(error).__name__}: {text.splitlines()[0] if text else error})"
    hint = f"; did you mean {culprit.rsplit('.', 1)[0]}.{suggestion.group(1)}?" if suggestion else ""
    return f"{culprit}: the config has no such key{hint}"


def _config_file_error(argv: list[str], error: OSError) -> str:
    path = next((arg.split("=", 1)[1] for arg in sys.argv if arg.startswith("--config=")), "the --config file")
    reason = [line.strip() for line in str(error).splitlines() if line.strip()][-1]
    return f"{path}: cannot load the config ({reason})"


def _parse_flags(argv: list[str]) -> list[str]:
    try:
        return flags.FLAGS(argv)
    except flags.Error as error:
        if _debugging(argv):
            raise
        fail(str(error))
    except (AttributeError, KeyError, ValueError, TypeError) as error:  # a --config.key override
        if _debugging(argv):
            raise
        fail(_override_error(argv, error))


def run(main: Callable[[list[str]], None]) -> None:
    """`absl.app.run(main)` with one-line errors for bad input."""

    def guarded(argv: list[str]) -> None:
        if _DEBUG.value:
            main(argv)
            return
        try:
            main(argv)
        except InputError as error:
            fail(str(error))
        except FileNotFoundError as error:
            fail(f"{error.filename}: no such file or folder" if error.filename else str(error))
        except OSError as error:
            if "Failed loading config file" not in str(error):  # ml_collections reports a bad file when it is read
                raise
            fail(_config_file_error(argv, error))

    app.run(guarded, flags_parser=_parse_flags)

"""The base of every expected error: bad input from the user (a file, a folder, a config key), whose message
names what is wrong. Entry points print these as one line (`m3d_jax.cli`); anything else is a bug."""


class InputError(ValueError):
    """Bad input; the message names the file or key and the problem, and says what to do where it can."""


def first_line(error: BaseException) -> str:
    """"<ErrorType>: <first non-blank line of its message>", for one-line reports of a library's error."""
    text = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class VolumeError(InputError):
    """A volume (file or DICOM series folder) is missing, unreadable or has the wrong shape or values."""


class RecordError(InputError):
    """A data record cannot be turned into a sample; the message names the file and the problem."""


class ConfigError(InputError):
    """A config value or key is wrong (unknown key, wrong type, a batch the mesh does not divide)."""

"""The one exception type the CLI turns into a one-line message and exit code 2."""


class UserError(Exception):
    """Bad input or an impossible setting: the message names the file/line or the option."""

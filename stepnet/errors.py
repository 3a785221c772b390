"""One base class for mistakes a user can fix: the CLI prints them in one line and exits 2."""


class UserError(Exception):
    """Bad input from the user (arguments, files, data): reported in one line, exit code 2."""

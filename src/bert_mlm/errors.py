class UserError(Exception):
    """Bad input the user can fix. `python -m train` prints it as one `error:` line."""

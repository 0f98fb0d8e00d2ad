"""Errors a user can fix by changing what they passed; front ends print them as one line."""


class UserError(ValueError):
    """Bad input: a missing path, a file that is not a model, an out-of-range setting."""

"""The one exception type the CLI turns into a one-line error and a non-zero exit."""


class JpruneError(ValueError):
    """Bad input from the user: a path, a model, a text or an option jprune cannot use."""

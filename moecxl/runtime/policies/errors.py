"""The policies' one error type (its own module so rules, sources and records share it without a cycle)."""


class PolicyError(ValueError):
    """Unknown policy name or option, or an object that is not a policy; the message names the value."""

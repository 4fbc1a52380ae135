"""Errors a site raises to its own users (owners, scientists) with a clear message."""


class ProvisioningError(RuntimeError):
    """A site could not be set up; nothing of it was left running."""


class AuthenticationError(PermissionError):
    """Wrong email or password for a site."""


class RequestNotFoundError(LookupError):
    """No request with that id at that site."""

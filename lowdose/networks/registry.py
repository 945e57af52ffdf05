"""The registry of networks by short name: ``build_network(name, **kwargs)`` builds the class registered as ``name``.

A network module registers its class with ``@register_network(name)``; this module imports no network, so
network modules depend on it and never on the ``lowdose.networks`` package. The package imports every network
module, which fills the registry.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..errors import LowdoseError

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


class UnknownNetworkError(LowdoseError, KeyError):
    """A network name that is not registered; the message lists the names that are."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0])


def register_network(name: str):
    """Class decorator: make ``build_network(name, ...)`` construct this class."""

    def decorator(cls):
        taken = _REGISTRY.get(name)
        # The same class seen again (a module reload) may re-register; another class may not.
        if taken is not None and (taken.__module__, taken.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"network name {name!r} is already registered to {taken.__qualname__}")
        _REGISTRY[name] = cls
        return cls

    return decorator


def available_networks() -> list[str]:
    """The registered network names, sorted."""
    return sorted(_REGISTRY)


def build_network(name: str, **kwargs) -> nn.Module:
    """Construct the network registered as ``name`` with the constructor arguments ``kwargs``."""
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise UnknownNetworkError(
            f"unknown network {name!r}; available networks: {', '.join(available_networks())}"
        ) from None
    return cls(**kwargs)

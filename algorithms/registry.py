"""One registry shape for every algorithm family: config class -> builder.

A family's configs share a base class whose ``DISCRIMINATOR`` names the field that tells the
methods apart in a spec (``name``, ``method``, ``scheme``, ``kind``); each method's config class
pins that field to one literal value, which is the method's key here. A builder takes the typed,
already validated config and the runtime objects the family needs (parameters, a model, the
number of workers, ...) and passes the config's fields on: defaults and bounds live in the config
only. No torch import here, so that families can register from modules that load torch lazily.
"""

from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar, get_args

from pydantic import BaseModel

ConfigT = TypeVar("ConfigT", bound=BaseModel)
BuiltT = TypeVar("BuiltT")
Builder = Callable[..., BuiltT]


def discriminator_value(config_cls: type[BaseModel], field: str) -> str:
    """The one literal value ``config_cls`` pins its discriminator ``field`` to."""
    info = config_cls.model_fields.get(field)
    values = get_args(info.annotation) if info is not None else ()
    if len(values) != 1 or not isinstance(values[0], str):
        raise TypeError(f"{config_cls.__name__}.{field} must be a Literal of one string to be registered")
    return values[0]


class Registry(Generic[ConfigT, BuiltT]):
    """``register(ConfigCls)`` (a decorator, or ``register(ConfigCls, builder)``), ``build(cfg, *runtime)``."""

    def __init__(self, family: str, base: type[ConfigT]) -> None:
        self.family = family
        self.base = base
        discriminator = getattr(base, "DISCRIMINATOR", None)
        if not isinstance(discriminator, str):
            raise TypeError(f"{base.__name__} must declare DISCRIMINATOR, the field that names a method")
        self.key: str = discriminator
        self._entries: dict[str, tuple[type[ConfigT], Builder[BuiltT]]] = {}

    def register(self, config_cls: type[ConfigT], builder: Builder[BuiltT] | None = None) -> Any:
        """Add ``config_cls`` with its builder; a key registered twice is an error."""
        if builder is None:
            def decorate(fn: Builder[BuiltT]) -> Builder[BuiltT]:
                self.register(config_cls, fn)
                return fn

            return decorate
        if not issubclass(config_cls, self.base):
            raise TypeError(f"{config_cls.__name__} is not a {self.base.__name__}")
        name = discriminator_value(config_cls, self.key)
        if name in self._entries:
            raise ValueError(f"{self.family} {name!r} is already registered "
                             f"(by {self._entries[name][0].__name__})")
        self._entries[name] = (config_cls, builder)
        return builder

    def names(self) -> list[str]:
        return sorted(self._entries)

    def config_classes(self) -> list[type[ConfigT]]:
        return [self._entries[name][0] for name in self.names()]

    def __iter__(self) -> Iterator[type[ConfigT]]:
        return iter(self.config_classes())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def _entry(self, name: str) -> tuple[type[ConfigT], Builder[BuiltT]]:
        if name not in self._entries:
            raise ValueError(f"unknown {self.family} {name!r}; known: {', '.join(self.names())}")
        return self._entries[name]

    def config(self, name: str, **fields: Any) -> ConfigT:
        """The typed config of method ``name`` with ``fields`` (validated once, by pydantic)."""
        config_cls, _ = self._entry(name)
        return config_cls.model_validate({self.key: name, **fields})

    def build(self, cfg: ConfigT, *runtime: Any, **options: Any) -> BuiltT:
        """The method ``cfg`` configures, given the family's runtime objects (and keyword options
        of the run, such as PEFT's ``task_type``, which are not the method's hyperparameters)."""
        config_cls, builder = self._entry(getattr(cfg, self.key))
        if not isinstance(cfg, config_cls):
            raise TypeError(f"{self.family} {getattr(cfg, self.key)!r} is configured by "
                            f"{config_cls.__name__}, not {type(cfg).__name__}")
        return builder(cfg, *runtime, **options)

    def build_named(self, name: str, *runtime: Any, **fields: Any) -> BuiltT:
        """``build(config(name, **fields), *runtime)``: for tests, benchmarks and scripts."""
        return self.build(self.config(name, **fields), *runtime)


def fields_of(cfg: BaseModel, *, exclude: set[str] | frozenset[str] = frozenset()) -> dict[str, Any]:
    """The config's fields as keyword arguments (the discriminator and ``exclude`` left out)."""
    key = getattr(type(cfg), "DISCRIMINATOR", None)
    skip = set(exclude) | ({key} if isinstance(key, str) else set())
    return {name: getattr(cfg, name) for name in type(cfg).model_fields if name not in skip}

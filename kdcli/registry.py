"""Entry-point discovery for methods, models and data sets.

Built-ins register through the same entry-point groups as third-party
packages.  Loading is isolated per plugin: one that fails to import is
recorded with its error and only matters when somebody asks for it by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from kdcli.errors import KdcliError, unknown_name
from kdcli.method import API_VERSION, Method

METHODS_GROUP = "kdcli.methods"
MODELS_GROUP = "kdcli.models"
DATASETS_GROUP = "kdcli.datasets"


@dataclass(frozen=True)
class Plugin:
    """One entry point: its name, where it comes from, and how loading it went."""

    name: str
    value: str
    distribution: str
    loaded: Any = None
    error: str | None = None


def _distribution_name(entry_point: EntryPoint) -> str:
    dist = getattr(entry_point, "dist", None)
    return dist.name if dist is not None else "unknown"


def _load(entry_point: EntryPoint) -> Plugin:
    distribution = _distribution_name(entry_point)
    try:
        loaded = entry_point.load()
    except Exception as exc:  # a broken plugin must not break kdcli: report it instead
        return Plugin(entry_point.name, entry_point.value, distribution, error=f"{type(exc).__name__}: {exc}")
    return Plugin(entry_point.name, entry_point.value, distribution, loaded=loaded)


@cache
def _entry_points(group: str) -> tuple[EntryPoint, ...]:
    unique: dict[tuple[str, str, str], EntryPoint] = {}
    for entry_point in entry_points(group=group):
        unique.setdefault((entry_point.name, entry_point.value, _distribution_name(entry_point)), entry_point)
    return tuple(unique.values())


def _resolve(group: str, kind: str, name: str) -> Plugin:
    matches = [ep for ep in _entry_points(group) if ep.name == name]
    if not matches:
        raise unknown_name(kind, name, sorted({ep.name for ep in _entry_points(group)}))
    if len(matches) > 1:
        sources = " and ".join(f"{_distribution_name(ep)} ({ep.value})" for ep in matches)
        raise KdcliError(f"{kind} {name!r} is registered twice: by {sources}; uninstall one of them")
    plugin = _load(matches[0])
    if plugin.error is not None:
        raise KdcliError(f"{kind} {name!r} from {plugin.distribution} failed to load: {plugin.error}")
    return plugin


def _check_method(plugin: Plugin) -> type[Method]:
    method = plugin.loaded
    if not (isinstance(method, type) and issubclass(method, Method)):
        raise KdcliError(f"method {plugin.name!r} from {plugin.distribution} is not a kdcli.method.Method subclass")
    wanted, offered = API_VERSION.split(".")[0], str(method.api_version).split(".")[0]
    if wanted != offered:
        raise KdcliError(
            f"method {plugin.name!r} from {plugin.distribution} targets plugin API {method.api_version}, "
            f"this kdcli provides {API_VERSION}; upgrade the plugin or kdcli"
        )
    return method


def get_method(name: str) -> type[Method]:
    return _check_method(_resolve(METHODS_GROUP, "method", name))


def method_plugins() -> list[Plugin]:
    """Every registered method, loaded and checked; failures carry their error."""
    plugins = []
    for entry_point in _entry_points(METHODS_GROUP):
        plugin = _load(entry_point)
        if plugin.error is None:
            try:
                _check_method(plugin)
            except KdcliError as exc:
                plugin = Plugin(plugin.name, plugin.value, plugin.distribution, error=str(exc))
        plugins.append(plugin)
    return sorted(plugins, key=lambda plugin: plugin.name)


@cache
def load_model_plugins() -> tuple[Plugin, ...]:
    """Import every ``kdcli.models`` entry point so its models join timm's registry."""
    return tuple(_load(entry_point) for entry_point in _entry_points(MODELS_GROUP))


def get_dataset_builder(name: str) -> Any:
    return _resolve(DATASETS_GROUP, "data set", name).loaded


def dataset_names() -> list[str]:
    return sorted({entry_point.name for entry_point in _entry_points(DATASETS_GROUP)})

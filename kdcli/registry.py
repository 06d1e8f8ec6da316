"""Entry-point discovery for methods, models, data sets and loggers.

Built-ins register through the same entry-point groups as third-party
packages.  Loading is isolated per plugin: one that fails to import is
recorded with its error and only matters when somebody asks for it by name.
A name registered by two distributions is an error naming both; a method
built for an incompatible plugin API is reported with both versions.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, replace
from functools import cache
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING, Any

from kdcli.defaults import API_VERSION
from kdcli.errors import KdcliError, one_line, unknown_name
from kdcli.plugin_source import MethodFacts, read_method_facts

if TYPE_CHECKING:  # kdcli.method imports torch: `kdcli methods list` reads plugins without it
    from kdcli.loggers import RunLogger
    from kdcli.method import Method

METHODS_GROUP = "kdcli.methods"
MODELS_GROUP = "kdcli.models"
DATASETS_GROUP = "kdcli.datasets"
LOGGERS_GROUP = "kdcli.loggers"
ROLES = frozenset({"teach", "distill"})


@dataclass(frozen=True)
class Plugin:
    """One entry point: its name, where it comes from, and how loading it went."""

    name: str
    value: str
    distribution: str
    version: str = ""
    loaded: Any = None
    error: str | None = None
    facts: MethodFacts | None = None  # a method's listing facts (read from its source, or from the loaded class)


def _distribution(entry_point: EntryPoint) -> tuple[str, str]:
    dist = getattr(entry_point, "dist", None)
    if dist is None:
        return "unknown", ""
    return dist.name or "unknown", dist.version or ""


def _load(entry_point: EntryPoint) -> Plugin:
    distribution, version = _distribution(entry_point)
    plugin = Plugin(entry_point.name, entry_point.value, distribution, version)
    try:
        loaded = entry_point.load()
    except (Exception, SystemExit) as exc:  # a broken plugin, even one calling sys.exit, must not end kdcli: report it
        return replace(plugin, error=f"{type(exc).__name__}: {one_line(str(exc))}")
    return replace(plugin, loaded=loaded)


@cache
def _entry_points(group: str) -> tuple[EntryPoint, ...]:
    # The same distribution can be visible twice on sys.path (e.g. an editable install
    # plus a build directory); only different sources count as duplicates.
    unique: dict[tuple[str, str, str], EntryPoint] = {}
    for entry_point in entry_points(group=group):
        unique.setdefault((entry_point.name, entry_point.value, _distribution(entry_point)[0]), entry_point)
    return tuple(unique.values())


def clear_caches() -> None:
    """Forget what was discovered, so plugins installed since (or put on sys.path) are seen."""
    importlib.invalidate_caches()
    _entry_points.cache_clear()
    load_model_plugins.cache_clear()


def _registered_twice(kind: str, name: str, matches: list[EntryPoint]) -> str:
    # Sorted: the order entry points are found in follows the file system's directory order.
    ordered = sorted(matches, key=lambda ep: (_distribution(ep)[0], ep.value))
    sources = " and ".join(f"{_distribution(ep)[0]} ({ep.value})" for ep in ordered)
    return f"{kind} {name!r} is registered twice: by {sources}; uninstall one of them"


def _resolve(group: str, kind: str, name: str) -> Plugin:
    matches = [ep for ep in _entry_points(group) if ep.name == name]
    if not matches:
        raise unknown_name(kind, name, sorted({ep.name for ep in _entry_points(group)}))
    if len(matches) > 1:
        raise KdcliError(_registered_twice(kind, name, matches))
    plugin = _load(matches[0])
    if plugin.error is not None:
        raise KdcliError(f"{kind} {name!r} from {plugin.distribution} failed to load: {plugin.error}")
    return plugin


def _parse_api_version(version: object) -> tuple[int, int] | None:
    major, _, minor = str(version).partition(".")
    if not (major.isdigit() and (minor or "0").isdigit()):
        return None
    return int(major), int(minor or 0)


def api_version_problem(offered: object) -> str | None:
    """Why a plugin built for API ``offered`` cannot run here, or None if it can.

    Same major version, and a minor version no newer than ours: minor versions
    only add to the API, so a plugin for 1.0 runs on 1.3 but not the reverse.
    """
    ours, theirs = _parse_api_version(API_VERSION), _parse_api_version(offered)
    if theirs is None:
        return f"declares plugin API {offered!r}, which is not MAJOR.MINOR"
    assert ours is not None
    if theirs[0] == ours[0] and theirs[1] <= ours[1]:
        return None
    upgrade = "kdcli" if theirs > ours else "the plugin (or use an older kdcli)"
    porting = PORTING.get((theirs[0], ours[0]), "")
    return f"targets plugin API {offered}, this kdcli provides {API_VERSION}; upgrade {upgrade}{porting}"


# What porting a plugin from one major API version to the next takes, in a few words.
PORTING: dict[tuple[int, int], str] = {
    (2, 3): (
        " (API 3: a method is an nn.Module that runs the student through self.student_logits(...) and keeps banks as "
        "buffers; docs/plugins.md has the steps)"
    ),
}


def _check_method(plugin: Plugin) -> type[Method]:
    from kdcli.method import Method, MethodParams

    method = plugin.loaded
    where = f"method {plugin.name!r} from {plugin.distribution}"
    if not (isinstance(method, type) and issubclass(method, Method)):
        raise KdcliError(f"{where} is not a kdcli.method.Method subclass")
    if problem := _facts_problem(method.api_version, method.roles):
        raise KdcliError(f"{where}{problem}")
    if not (isinstance(method.Params, type) and issubclass(method.Params, MethodParams)):
        raise KdcliError(f"{where}: Params must be a kdcli.method.MethodParams subclass")
    return method


def _facts_problem(api_version: object, roles: frozenset[str]) -> str | None:
    """Why a method with these declared facts cannot run here (to follow its name), or None."""
    if problem := api_version_problem(api_version):
        return f" {problem}"
    if not roles or not set(roles) <= ROLES:
        return f": roles must be a non-empty subset of {sorted(ROLES)}, not {sorted(roles)}"
    return None


def check_method_name(name: str) -> None:
    """An unknown method name is a usage error, found from the entry points alone (nothing is imported)."""
    known = sorted({ep.name for ep in _entry_points(METHODS_GROUP)})
    if name not in known:
        raise unknown_name("method", name, known)


def get_method(name: str) -> type[Method]:
    return _check_method(_resolve(METHODS_GROUP, "method", name))


def _checked(plugin: Plugin) -> Plugin:
    if plugin.error is None:
        try:
            method = _check_method(plugin)
        except KdcliError as exc:
            return replace(plugin, loaded=None, error=str(exc))
        return replace(plugin, facts=MethodFacts(str(method.api_version), frozenset(method.roles), method.teacher_use, method.summary))
    return plugin


def _listed(entry_point: EntryPoint, *, check: bool) -> Plugin:
    """One method for the listing: read from its source when that tells all the listing shows (and ``check`` is
    off), else imported and checked, so a plugin that cannot be read that way still shows its error."""
    facts = None if check else read_method_facts(entry_point.value)
    if facts is None or _facts_problem(facts.api_version, facts.roles):
        return _checked(_load(entry_point))
    return Plugin(entry_point.name, entry_point.value, *_distribution(entry_point), facts=facts)


def method_plugins(*, check: bool = True) -> list[Plugin]:
    """Every registered method name, with its facts; failures and duplicates carry their error.

    ``check=False`` reads a plugin's facts from its source where it can (no import, so no torch): a plugin
    whose source reads well but whose import fails is then only caught by ``check`` or by using it."""
    by_name: dict[str, list[EntryPoint]] = {}
    for entry_point in _entry_points(METHODS_GROUP):
        by_name.setdefault(entry_point.name, []).append(entry_point)
    plugins = []
    for name, matches in sorted(by_name.items()):
        if len(matches) == 1:
            plugins.append(_listed(matches[0], check=check))
        else:
            sources = ", ".join(_distribution(ep)[0] for ep in matches)
            values = ", ".join(ep.value for ep in matches)
            plugins.append(Plugin(name, values, sources, error=_registered_twice("method", name, matches)))
    return plugins


@cache
def load_model_plugins() -> tuple[Plugin, ...]:
    """Import every ``kdcli.models`` entry point so its models join timm's registry."""
    return tuple(_load(entry_point) for entry_point in _entry_points(MODELS_GROUP))


def model_plugin_failures() -> list[str]:
    """``NAME from DIST: ERROR`` for each model plugin that failed to import."""
    return [f"{p.name} from {p.distribution}: {p.error}" for p in load_model_plugins() if p.error is not None]


def get_dataset_builder(name: str) -> Any:
    return _resolve(DATASETS_GROUP, "data set", name).loaded



def check_logger_names(names: list[str]) -> None:
    """Unknown logger names are a usage error, found before anything is written (nothing is imported)."""
    known = sorted({ep.name for ep in _entry_points(LOGGERS_GROUP)})
    for name in names:
        if name not in known:
            raise unknown_name("logger", name, known)


def get_logger(name: str) -> type[RunLogger]:
    """The ``kdcli.loggers`` plugin class registered as ``name`` (importing it may fail: callers isolate that)."""
    from kdcli.loggers import RunLogger

    plugin = _resolve(LOGGERS_GROUP, "logger", name)
    if not (isinstance(plugin.loaded, type) and issubclass(plugin.loaded, RunLogger)):
        raise KdcliError(f"logger {name!r} from {plugin.distribution} is not a kdcli.loggers.RunLogger subclass")
    return plugin.loaded

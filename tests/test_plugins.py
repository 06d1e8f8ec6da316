"""The plugin ecosystem: the installed example package (DKD), broken plugins, API versions, duplicates.

Temporary distributions are ``*.dist-info`` folders with an ``entry_points.txt``
in a directory put on ``sys.path``, exactly what pip leaves behind; the
registry's caches are cleared before and after, so each test sees only them.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest

from conftest import TINY, run_cli
from kdcli import registry
from test_bad_input import assert_clean_error

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "kdcli-dkd"


class Distributions:
    """Writes installed-looking distributions (and their modules) into one sys.path entry."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def add(self, name: str, entry_points: dict[str, dict[str, str]], modules: dict[str, str] | None = None) -> None:
        dist_info = self.root / f"{name.replace('-', '_')}-0.3.dist-info"
        dist_info.mkdir()
        (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.3\n")
        sections = [
            "\n".join([f"[{group}]", *(f"{entry} = {target}" for entry, target in entries.items())])
            for group, entries in entry_points.items()
        ]
        (dist_info / "entry_points.txt").write_text("\n\n".join(sections) + "\n")
        for module, source in (modules or {}).items():
            (self.root / f"{module}.py").write_text(source)
        registry.clear_caches()


@pytest.fixture
def distributions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Distributions]:
    site = tmp_path / "site"
    site.mkdir()
    with monkeypatch.context() as patch:
        patch.syspath_prepend(str(site))
        registry.clear_caches()
        yield Distributions(site)
    registry.clear_caches()  # sys.path is restored: forget the temporary plugins


def listed_methods() -> dict[str, dict]:
    listing = run_cli("methods", "list", "--json")
    assert listing.exit_code == 0, listing
    return {row["name"]: row for row in listing.json()}


# -- the example package, installed into the venv -------------------------------------


def test_example_package_is_installed_and_listed() -> None:
    try:
        version("kdcli-dkd")
    except PackageNotFoundError:
        pytest.fail("examples/kdcli-dkd is not installed: `make install` (or pip install -e examples/kdcli-dkd)")
    dkd = listed_methods()["dkd-example"]  # its own name beside the built-in dkd
    assert (dkd["distribution"], dkd["roles"], dkd["teacher"], dkd["error"]) == ("kdcli-dkd", ["distill"], "required", None)
    assert "Decoupled" in dkd["summary"]
    table = run_cli("methods", "list")
    assert table.exit_code == 0 and "kdcli-dkd" in table.stdout
    params = {row["name"]: row["default"] for row in run_cli("methods", "show", "dkd-example", "--json").json()["params"]}
    assert params == {"alpha": 1.0, "beta": 8.0, "temperature": 4.0, "ce_weight": 1.0, "warmup_epochs": 20}


def test_distill_with_the_example_dkd(teacher_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "dkd"
    result = run_cli(
        "distill", "--teacher", teacher_run / "last.safetensors", "--method", "dkd-example", "--model", "cifar_resnet8",
        "--epochs", 2, "--set", "method.warmup_epochs=2", "--out", out, "--json", *TINY,
    )
    assert result.exit_code == 0, result
    summary = result.json()
    assert summary["method"] == "dkd-example" and set(summary["final_epoch"]["loss"]) == {"ce", "tckd", "nckd", "total"}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [record["method"]["kd_weight"] for record in records] == [0.5, 1.0]
    assert all(record["loss"]["nckd"] > 0 and record["loss"]["tckd"] >= 0 for record in records)
    assert json.loads((out / "config.json").read_text())["method"]["beta"] == 8.0


# -- plugins that must not break kdcli ------------------------------------------------


def test_broken_plugins_are_reported_but_harmless(distributions: Distributions, teacher_run: Path, tmp_path: Path) -> None:
    distributions.add(
        "kdcli-broken",
        {
            "kdcli.methods": {"broken": "kdcli_broken_method:Broken"},
            "kdcli.models": {"broken_zoo": "kdcli_broken_no_such_module"},
            "kdcli.datasets": {"broken_data": "kdcli_broken_method:missing"},
        },
        {"kdcli_broken_method": "raise RuntimeError('plugin exploded on import')\n"},
    )
    methods = listed_methods()
    assert methods["broken"]["distribution"] == "kdcli-broken" and "plugin exploded on import" in methods["broken"]["error"]
    assert methods["kd"]["error"] is None and methods["standard"]["error"] is None
    table = run_cli("methods", "list")
    assert table.exit_code == 0 and "unusable" in table.stdout and "kdcli-broken" in table.stdout
    assert run_cli("methods", "show", "kd").exit_code == 0
    assert run_cli("eval", teacher_run / "last.safetensors", "--json").exit_code == 0

    assert_clean_error(run_cli("methods", "show", "broken"), 1, "'broken' from kdcli-broken failed to load", "exploded")
    unknown_model = run_cli("teach", "--model", "broken_net", "--out", tmp_path / "r", *TINY)
    assert_clean_error(unknown_model, 2, "unknown model 'broken_net'", "broken_zoo from kdcli-broken", "ModuleNotFoundError")
    assert_clean_error(run_cli("teach", "--data", "broken_data", "--out", tmp_path / "r"), 1, "data set 'broken_data'", "failed to load")
    assert not (tmp_path / "r").exists()


def test_the_listing_read_from_source_matches_the_imported_plugins() -> None:
    from kdcli.method import Method
    from kdcli.plugin_source import METHOD_DEFAULTS

    assert METHOD_DEFAULTS == {name: getattr(Method, name) for name in METHOD_DEFAULTS}
    fast, checked = (run_cli("methods", "list", *flags, "--json") for flags in ([], ["--check"]))
    assert fast.exit_code == checked.exit_code == 0
    assert fast.json() == checked.json() and len(fast.json()) >= 8


def test_a_plugin_that_reads_well_but_fails_to_import_is_caught_by_check(distributions: Distributions) -> None:
    source = "import kdcli_no_such_dependency\nfrom kdcli.method import Method\n\nclass Fine(Method):\n    summary = 'looks fine'\n"
    distributions.add("kdcli-late", {"kdcli.methods": {"late": "kdcli_late_method:Fine"}}, {"kdcli_late_method": source})
    assert listed_methods()["late"]["summary"] == "looks fine"  # read from its source: not imported
    checked = {row["name"]: row for row in run_cli("methods", "list", "--check", "--json").json()}
    assert "kdcli_no_such_dependency" in checked["late"]["error"]
    assert_clean_error(run_cli("methods", "show", "late"), 1, "'late' from kdcli-late failed to load")


INCOMPATIBLE = '''
from kdcli.method import Method

class FromTheFuture(Method):
    api_version = "4.0"
    summary = "built for an API kdcli does not provide"

class FromThePast(Method):
    api_version = "1.0"
    summary = "built for plugin API 1: teacher_logits(inputs), a teacher module"

class FromVersion2(Method):
    api_version = "2.1"
    summary = "built for plugin API 2: the student called directly, state by hand"

class WrongRoles(Method):
    roles = frozenset({"distill", "fly"})

NotAMethod = object
'''


def test_incompatible_plugins_are_reported(distributions: Distributions, teacher_run: Path, tmp_path: Path) -> None:
    targets = {"future": "FromTheFuture", "past": "FromThePast", "two": "FromVersion2", "flying": "WrongRoles", "plain": "NotAMethod"}
    distributions.add("kdcli-odd", {"kdcli.methods": {name: f"kdcli_odd_methods:{cls}" for name, cls in targets.items()}},
                      {"kdcli_odd_methods": INCOMPATIBLE})
    methods = listed_methods()
    assert "targets plugin API 4.0, this kdcli provides 3.0; upgrade kdcli" in methods["future"]["error"]
    assert "targets plugin API 1.0, this kdcli provides 3.0; upgrade the plugin" in methods["past"]["error"]
    assert "targets plugin API 2.1, this kdcli provides 3.0; upgrade the plugin" in methods["two"]["error"]
    assert "self.student_logits" in methods["two"]["error"]  # what porting a 2.x plugin takes
    assert "\n" not in methods["past"]["error"] and "\n" not in methods["two"]["error"]
    assert "roles must be" in methods["flying"]["error"] and "not a kdcli.method.Method subclass" in methods["plain"]["error"]
    result = run_cli("distill", "--method", "future", "--teacher", teacher_run / "last.safetensors", "--out", tmp_path / "s")
    assert_clean_error(result, 1, "method 'future' from kdcli-odd targets plugin API 4.0")
    result = run_cli("distill", "--method", "past", "--teacher", teacher_run / "last.safetensors", "--out", tmp_path / "s")
    assert_clean_error(result, 1, "method 'past' from kdcli-odd targets plugin API 1.0, this kdcli provides 3.0")
    result = run_cli("distill", "--method", "two", "--teacher", teacher_run / "last.safetensors", "--out", tmp_path / "s")
    assert_clean_error(result, 1, "method 'two' from kdcli-odd targets plugin API 2.1, this kdcli provides 3.0")
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize(
    ("ours", "theirs", "problem"),
    [
        ("1.0", "1.0", None),
        ("1.3", "1.0", None),  # minor versions only add: an older plugin still runs
        ("1.3", "1.4", "upgrade kdcli"),
        ("2.0", "1.0", "upgrade the plugin"),
        ("1.0", "one", "not MAJOR.MINOR"),
    ],
)
def test_api_version_rule(monkeypatch: pytest.MonkeyPatch, ours: str, theirs: str, problem: str | None) -> None:
    monkeypatch.setattr(registry, "API_VERSION", ours)
    found = registry.api_version_problem(theirs)
    assert found is None if problem is None else problem in found


def test_duplicate_names_name_both_distributions(distributions: Distributions, teacher_run: Path, tmp_path: Path) -> None:
    distributions.add("kdcli-twin-a", {"kdcli.methods": {"twin": "kdcli_plugins.kd:HintonKD", "kd": "kdcli_plugins.kd:HintonKD"}})
    distributions.add("kdcli-twin-b", {"kdcli.methods": {"twin": "kdcli_plugins.standard:Standard"}})
    methods = listed_methods()
    assert "registered twice: by kdcli-twin-a (kdcli_plugins.kd:HintonKD) and kdcli-twin-b" in methods["twin"]["error"]
    assert "kdcli" in methods["kd"]["error"] and "kdcli-twin-a" in methods["kd"]["error"]
    assert methods["standard"]["error"] is None
    result = run_cli("distill", "--method", "twin", "--teacher", teacher_run / "last.safetensors", "--out", tmp_path / "s")
    assert_clean_error(result, 1, "method 'twin' is registered twice", "kdcli-twin-a", "kdcli-twin-b")
    assert not (tmp_path / "s").exists()


# -- the house rule: plugins import only the plugin API -------------------------------

PLUGIN_SOURCES = sorted((ROOT / "plugins").glob("*.py")) + sorted((EXAMPLE / "src" / "kdcli_dkd").glob("*.py"))
ALLOWED_KDCLI_MODULES = {"kdcli.method", "kdcli.losses", "kdcli.noise", "kdcli.loggers"}  # kdcli.loggers: logger plugins


@pytest.mark.parametrize("source", PLUGIN_SOURCES, ids=lambda path: f"{path.parent.name}/{path.name}")
def test_plugins_import_only_the_plugin_api(source: Path) -> None:
    imported = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            imported.add(node.module)
    internal = {name for name in imported if name == "kdcli" or name.startswith("kdcli.")}
    assert internal <= ALLOWED_KDCLI_MODULES, f"{source.name} imports {sorted(internal - ALLOWED_KDCLI_MODULES)}"

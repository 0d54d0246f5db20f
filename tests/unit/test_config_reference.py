"""docs/configuration.md is generated from the settings classes: it must be current and complete,
and it must not carry secrets or the home folder of the machine that generated it."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from loopline.settings import ServiceSettings, env_var_name
from scripts import config_reference as reference

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The page depends on code only, never on the LOOPLINE_ variables of the shell running it."""
    for name in [n for n in os.environ if n.startswith("LOOPLINE_")]:
        monkeypatch.delenv(name)


@pytest.fixture(scope="module")
def page() -> str:
    return reference.render(ServiceSettings, reference.service_sections())


def test_committed_page_is_current(page: str) -> None:
    committed = reference.OUTPUT.read_text(encoding="utf-8")
    assert committed == page, (
        "docs/configuration.md is stale: run `python scripts/config_reference.py` and commit it"
    )


def test_check_fails_on_a_stale_page(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stale = tmp_path / "configuration.md"
    stale.write_text("# Configuration reference\n", encoding="utf-8")
    assert reference.main(["--check", "--output", str(stale)]) == 1
    assert "stale" in capsys.readouterr().err
    assert reference.main(["--output", str(stale)]) == 0
    assert reference.main(["--check", "--output", str(stale)]) == 0


def test_every_field_of_every_settings_class_appears(page: str) -> None:
    shared = [n for n, i in ServiceSettings.model_fields.items() if i.validation_alias]
    expected = [env_var_name(ServiceSettings, name) for name in shared]
    for section in reference.service_sections():
        cls = section.settings
        expected += [env_var_name(cls, name) for name in cls.model_fields if name not in shared]
    missing = [name for name in expected if f"| `{name}` |" not in page]
    assert not missing


def test_shared_variables_are_listed_once_for_the_services() -> None:
    shared = reference.shared_rows(ServiceSettings)
    names = {row[0] for row in shared}
    assert names >= {"LOOPLINE_REDIS_URL", "LOOPLINE_MLFLOW_URI", "LOOPLINE_ADMIN_TOKEN"}
    for section in reference.service_sections():
        rows = reference.section_rows(section.settings, shared)
        if issubclass(section.settings, ServiceSettings):
            assert not names & {row[0] for row in rows}, section.title


def test_overridden_defaults_are_the_services_own(page: str) -> None:
    for variable, port in [
        ("LOOPLINE_ROUTER_PORT", 8000),
        ("LOOPLINE_INFERENCE_PORT", 8001),
        ("LOOPLINE_TRAINER_PORT", 8002),
        ("LOOPLINE_MONITOR_PORT", 8003),
    ]:
        assert f"| `{variable}` | integer (>= 0, <= 65535) | `{port}` |" in page


def test_settings_classes_in_the_code_are_all_documented() -> None:
    """A new settings class in loopline/ or services/ must be added to the generator."""
    documented = {"ServiceSettings"} | {
        section.settings.__name__ for section in reference.service_sections()
    }
    found: set[str] = set()
    for folder in ("loopline", "services"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.ClassDef) and any(
                    getattr(base, "id", getattr(base, "attr", "")).endswith("Settings")
                    for base in node.bases
                ):
                    found.add(node.name)
    assert found - documented == set(), "add these to service_sections() in the generator"


class SecretSettings(ServiceSettings):
    """A service whose secret has a default, which the page must still not show."""

    model_config = SettingsConfigDict(env_prefix="LOOPLINE_SECRETIVE_")

    password: SecretStr = Field(default=SecretStr("hunter2-in-the-docs"), description="Secret.")


def test_secrets_show_no_value(page: str) -> None:
    section = reference.Service("Secretive", SecretSettings, "secretive", "secretive.md")
    text = reference.render(ServiceSettings, [section], cli=False)
    assert "hunter2" not in text
    assert "| `LOOPLINE_SECRETIVE_PASSWORD` | secret | `set (secret, not shown)` |" in text
    assert "| `LOOPLINE_ADMIN_TOKEN` | secret | `unset` |" in page


def test_no_home_folder_of_this_machine(page: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if Path.home() != Path("/"):
        assert str(Path.home()) + "/" not in page
    assert reference.HOME_PLACEHOLDER not in page
    assert (
        "| `LOOPLINE_MLFLOW_URI` | string (non-empty) | `sqlite:///~/.loopline/mlflow.db` |" in page
    )
    assert "`~/.loopline/cache`" in page
    # Another user on another machine generates the same page.
    monkeypatch.setenv("HOME", "/home/someone-else")
    assert reference.render(ServiceSettings, reference.service_sections()) == page

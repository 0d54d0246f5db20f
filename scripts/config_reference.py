"""Write docs/configuration.md from the settings classes and the `loopline` command's options.

    python scripts/config_reference.py           # rewrite docs/configuration.md
    python scripts/config_reference.py --check   # exit 1 if the committed file is stale

The page is generated, never edited by hand, so it cannot drift from the code: every row comes
from a field's type, default and `Field(description=...)`. Defaults are rendered for any reader,
not for the machine that ran the script: factories run with a placeholder home, shown as `~`, and
secrets never show a value.
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import json
import os
import sys
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import annotated_types
from pydantic import SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined
from pydantic_settings import BaseSettings

from loopline.settings import ServiceSettings, env_var_name

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "docs" / "configuration.md"
# Stands in for the home folder while default factories run; rendered as `~`.
HOME_PLACEHOLDER = "/__loopline_home__"


@dataclass(frozen=True)
class Service:
    """One section of the page: a service's settings class and how that service is started."""

    title: str
    settings: type[BaseSettings]
    start: str
    page: str | None


def service_sections() -> list[Service]:
    """The services in the order of the architecture picture: router, worker, trainer, monitor."""
    from services.inference.settings import InferenceSettings
    from services.launcher.settings import LauncherSettings
    from services.monitor.settings import MonitorSettings
    from services.router.settings import RouterSettings
    from services.trainer.settings import TrainerSettings

    return [
        Service("Router", RouterSettings, "loopline serve router", "router.md"),
        Service("Inference worker", InferenceSettings, "loopline serve inference", "inference.md"),
        Service("Trainer", TrainerSettings, "loopline serve trainer", "trainer.md"),
        Service("Monitor", MonitorSettings, "loopline serve monitor", "monitor.md"),
        Service("Local launcher", LauncherSettings, "loopline up", None),
    ]


@contextlib.contextmanager
def placeholder_home() -> Iterator[None]:
    """Run default factories as if the home folder were HOME_PLACEHOLDER (Path.home reads it)."""
    saved = {name: os.environ.get(name) for name in ("HOME", "USERPROFILE")}
    os.environ["HOME"] = os.environ["USERPROFILE"] = HOME_PLACEHOLDER
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def is_shared(info: FieldInfo) -> bool:
    """Shared fields carry an explicit alias: one variable for the whole stack."""
    return isinstance(info.validation_alias, str)


def is_secret(annotation: object) -> bool:
    return annotation is SecretStr or SecretStr in typing.get_args(annotation)


# --- types -------------------------------------------------------------------------------------

SCALARS: dict[object, str] = {
    str: "string",
    int: "integer",
    float: "number",
    bool: "boolean",
    Path: "path",
    SecretStr: "secret",
}


def type_name(annotation: object) -> str:
    """A reader's name for a field type: `integer`, `JSON list of string`, `one of a, b`."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return "one of " + ", ".join(str(arg) for arg in args)
    if origin in (types.UnionType, typing.Union):
        return " or ".join(type_name(arg) for arg in args if arg is not type(None))
    if origin is list:
        return "JSON list of " + type_name(args[0]).removeprefix("one of ")
    if origin is dict:
        return "JSON object"
    return SCALARS.get(annotation, getattr(annotation, "__name__", str(annotation)))


def bounds(info: FieldInfo) -> str:
    """The field's numeric and length limits, e.g. ` (>= 0, <= 65535)`."""
    signs = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    limits: list[str] = []
    for item in info.metadata:
        for attribute, sign in signs.items():
            value = getattr(item, attribute, None)
            if value is not None:
                limits.append(f"{sign} {value:g}")
        if isinstance(item, annotated_types.MinLen) and item.min_length > 0:
            limits.append("non-empty")
    return f" ({', '.join(limits)})" if limits else ""


# --- defaults ----------------------------------------------------------------------------------


def show(value: object) -> str:
    """A default as it would be written in the environment variable."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, enum.Enum):
        return show(value.value)
    if isinstance(value, list | dict | tuple):
        return json.dumps(value)
    text = str(value)
    return text.replace(HOME_PLACEHOLDER, "~") if text else '""'


def default(info: FieldInfo) -> str:
    if is_secret(info.annotation):
        return "unset" if info.default is None else "set (secret, not shown)"
    if info.default_factory is not None:
        with placeholder_home():
            return show(info.default_factory())  # type: ignore[call-arg]
    return "required" if info.default is PydanticUndefined else show(info.default)


# --- tables ------------------------------------------------------------------------------------


def cell(text: str) -> str:
    return " ".join(text.replace("|", "\\|").split())


Row = tuple[str, str, str, str]


def table(rows: list[Row], second: str = "type") -> list[str]:
    lines = [f"| variable | {second} | default | description |", "| --- | --- | --- | --- |"]
    for variable, kind, value, description in rows:
        lines.append(f"| `{variable}` | {cell(kind)} | `{cell(value)}` | {cell(description)} |")
    return lines


def row(cls: type[BaseSettings], name: str, info: FieldInfo) -> Row:
    kind = type_name(info.annotation) + bounds(info)
    return (env_var_name(cls, name), kind, default(info), info.description or "")


def shared_rows(shared: type[BaseSettings]) -> list[Row]:
    """The fields every service reads under one name (they carry an explicit alias)."""
    return [row(shared, n, i) for n, i in shared.model_fields.items() if is_shared(i)]


def section_rows(cls: type[BaseSettings], shared: list[Row]) -> list[Row]:
    """Every field of `cls` except the shared ones it reads with the shared meaning."""
    rows = [row(cls, name, info) for name, info in cls.model_fields.items()]
    return [r for r in rows if r not in shared]


def command_options(documented: set[str]) -> list[Row]:
    """Options of the `loopline` command that read an environment variable of their own."""
    import typer

    from services.cli.main import app

    found: dict[str, tuple[str, str, str, list[str]]] = {}

    # Typer vendors its own copy of click, so its objects are read by their attributes.
    def walk(command: Any, path: tuple[str, ...]) -> None:
        for param in command.params:
            envvar = param.envvar if isinstance(param.envvar, str) else None
            if param.param_type_name == "option" and envvar and envvar not in documented:
                flag = "/".join(param.opts + param.secondary_opts)
                entry = found.setdefault(envvar, (flag, show(param.default), param.help or "", []))
                # Name the top-level command only: `loopline experiments` covers its subcommands.
                where = " ".join(path[:2])
                if where not in entry[3]:
                    entry[3].append(where)
        for name in sorted(getattr(command, "commands", {})):
            walk(command.commands[name], (*path, name))

    walk(typer.main.get_command(app), ("loopline",))
    return [
        (envvar, f"`{flag}` of " + ", ".join(f"`{p}`" for p in paths), value, help_text)
        for envvar, (flag, value, help_text, paths) in sorted(found.items())
    ]


# --- the page ----------------------------------------------------------------------------------

INTRO = """\
# Configuration reference

<!-- Generated by scripts/config_reference.py from the settings classes; do not edit by hand.
     Regenerate: python scripts/config_reference.py. `make test` fails when this file is stale. -->

Every Loopline service reads its settings once, at startup, from environment variables (nothing
is read at import time). The names follow three rules:

- **Shared infrastructure keeps one name across the stack**: `LOOPLINE_REDIS_URL`,
  `LOOPLINE_MLFLOW_URI`, `LOOPLINE_ADMIN_TOKEN`, `LOOPLINE_LOG_LEVEL`, `LOOPLINE_LOG_JSON`. One
  environment file configures every service.
- **Everything else carries the service's prefix**, `LOOPLINE_<SERVICE>_<FIELD>`:
  `LOOPLINE_ROUTER_PORT`, `LOOPLINE_INFERENCE_MAX_BATCH_SIZE`, ... so several services can share a
  host and an environment. The `loopline serve ...` flags set the same fields.
- **The `loopline` command's own options** (where to find a router, a trainer, a monitor; the
  `loopline train` flags) read the variables in the last table.

Lists and objects are JSON (`LOOPLINE_ROUTER_WORKERS='["triton:8001"]'`); booleans accept
`true`/`false`, `1`/`0`, `yes`/`no`. An invalid value stops the service before it opens a port,
naming the variable; secrets are never echoed. A default under `~` is the home folder of the user
running the service.
"""


def render(shared: type[BaseSettings], sections: list[Service], cli: bool = True) -> str:
    """The whole page: shared settings once, then every service's own, then the CLI's."""
    common = shared_rows(shared)
    lines = [INTRO, "## Shared by every service", "", *table(common)]
    for service in sections:
        prefix = str(service.settings.model_config.get("env_prefix", ""))
        link = f", behaviour in [{service.page}]({service.page})" if service.page else ""
        lines += [
            "",
            f"## {service.title}",
            "",
            f"`{service.start}` (`{service.settings.__name__}`); variables `{prefix}*`{link}.",
            "",
            *table(section_rows(service.settings, common)),
        ]
    if cli:
        lines += [
            "",
            "## The `loopline` command",
            "",
            "Options that read a variable of their own; the shared variables above apply too",
            "(the CLI sends `LOOPLINE_ADMIN_TOKEN` as its bearer token). An unset `loopline train`",
            "option takes the recipe's default ([training.md](training.md)).",
            "",
            *table(command_options({r[0] for r in common}), second="option"),
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the page is stale")
    parser.add_argument("--output", type=Path, default=OUTPUT, help="the page to write or check")
    args = parser.parse_args(argv)
    output: Path = args.output
    shown = output.relative_to(ROOT) if output.is_relative_to(ROOT) else output
    text = render(ServiceSettings, service_sections())
    if args.check:
        current = output.read_text(encoding="utf-8") if output.exists() else ""
        if current != text:
            print(f"{shown} is stale: run python scripts/config_reference.py", file=sys.stderr)
            return 1
        return 0
    output.write_text(text, encoding="utf-8")
    print(f"wrote {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

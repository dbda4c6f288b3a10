"""The config document: where it comes from, its sections, and the resolved :class:`Config`.

Top-level sections: ``server`` (settings, see :mod:`aioserver.options`), ``workflow``
(see :mod:`aioserver.workflow.spec`), and pipeline sections: a built-in's name or a dotted
path to a class, mapping to its keyword arguments, as in txtai.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import yaml

from .errors import ConfigError
from .options import Settings, resolve_settings
from .workflow import Workflow
from .workflow.actions import ActionResolver, is_pipeline_name
from .workflow.safeopen import SafeOpen, parse_safeopen
from .workflow.spec import parse_workflows

DEFAULT_SOURCE = "<embedded default config>"
INLINE_SOURCE = "<inline config>"
SECTIONS = ("server", "workflow", "safeopen")


@dataclass(frozen=True, slots=True)
class Config:
    """Everything the app needs, resolved and validated; :func:`create_app` reads nothing else."""

    settings: Settings = field(default_factory=Settings)
    workflows: Mapping[str, Workflow] = field(default_factory=dict)
    source: str = INLINE_SOURCE
    origins: Mapping[str, str] = field(default_factory=dict)  # setting name -> where it came from
    safeopen: SafeOpen = field(default_factory=SafeOpen)  # what workflows may open


def read_document(location: str | None) -> tuple[dict[str, Any], str]:
    """The parsed YAML and a name for it: the embedded default, a file, or inline YAML (as txtai)."""
    if location is None:
        text, source = resources.files(__package__).joinpath("default.yml").read_text("utf-8"), DEFAULT_SOURCE
    elif os.path.exists(location) or "\n" not in location and ": " not in location:
        source = location
        try:
            with open(location, encoding="utf-8") as file:
                text = file.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(location, None, f"cannot read config: {getattr(exc, 'strerror', None) or exc}") from None
    else:
        text, source = location, INLINE_SOURCE

    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(source, None, f"invalid YAML{where}: {getattr(exc, 'problem', None) or exc}") from None
    if document is None:
        document = {}
    if not isinstance(document, dict):
        raise ConfigError(source, None, "expected a mapping of sections at the top level")
    return document, source


def build_config(
    document: Mapping[str, Any],
    source: str,
    cli: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
) -> Config:
    """Validate a parsed document against the command line and environment; build the Config."""
    pipelines = {}
    for name, section in document.items():
        if name in SECTIONS:
            continue
        if not isinstance(name, str) or not is_pipeline_name(name):
            raise ConfigError(
                source,
                str(name),
                f"unknown section; expected {', '.join(SECTIONS)}, a built-in pipeline or a dotted path to a class",
            )
        pipelines[name] = section

    server = document.get("server") or {}
    if not isinstance(server, Mapping):
        raise ConfigError(source, "server", "expected a mapping of options")
    settings, origins = resolve_settings(cli or {}, env or {}, server, source)
    safeopen = parse_safeopen(document.get("safeopen"), source)
    workflows = parse_workflows(document.get("workflow"), ActionResolver(pipelines, source), source, safeopen)
    return Config(settings=settings, workflows=workflows, source=source, origins=origins, safeopen=safeopen)


def load_config(
    location: str | None = None,
    cli: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
) -> Config:
    """Read and build a Config; ``location`` is a path, inline YAML, or None for the default."""
    document, source = read_document(location)
    return build_config(document, source, cli, env)

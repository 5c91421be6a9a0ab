"""The workspace settings file ``DIR/fleet.toml``, as a typed dataclass with validation."""

from __future__ import annotations

import datetime as dt
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from fleet.kernel.durations import format_duration, parse_positive_duration
from fleet.kernel.errors import FleetError, WorkspaceError
from fleet.kernel.identity import validate_trust_domain
from fleet.kernel.keys import KeyType

CONFIG_VERSION = 1


@dataclass(frozen=True, slots=True)
class FleetConfig:
    """What ``fleet init`` decided for the workspace; later commands read it back."""

    trust_domain: str = "fleet.local"
    key_type: KeyType = KeyType.EC_P256  # devices' default
    ca_key_type: KeyType | None = None  # root and issuing CAs; None: key_type
    broker_key_type: KeyType | None = None  # the broker's certificate; None: the CA's
    device_valid_for: dt.timedelta = dt.timedelta(days=90)
    crl_valid_for: dt.timedelta = dt.timedelta(days=7)
    crl_url: str | None = None

    @property
    def authority_key_type(self) -> KeyType:
        """The key type of the root and issuing CAs (``ca_key_type``, or ``key_type``)."""
        return self.ca_key_type or self.key_type

    def to_toml(self) -> str:
        fleet: dict[str, Any] = {
            "version": CONFIG_VERSION,
            "trust_domain": self.trust_domain,
            "key_type": self.key_type.value,
            "device_valid_for": format_duration(self.device_valid_for),
            "crl_valid_for": format_duration(self.crl_valid_for),
        }
        if self.crl_url:
            fleet["crl_url"] = self.crl_url
        if self.ca_key_type is not None:
            fleet["ca_key_type"] = self.ca_key_type.value
        if self.broker_key_type is not None:
            fleet["broker_key_type"] = self.broker_key_type.value
        return tomli_w.dumps({"fleet": fleet})

    @classmethod
    def load(cls, path: Path) -> FleetConfig:
        """Read and validate ``path``; errors name the file and the field."""
        try:
            document = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise WorkspaceError(
                f"{path}: missing; run 'fleet init' to create the workspace"
            ) from None
        except tomllib.TOMLDecodeError as exc:
            raise WorkspaceError(f"{path}: not valid TOML ({exc})") from exc
        section = document.get("fleet")
        if not isinstance(section, dict):
            raise WorkspaceError(f"{path}: missing the [fleet] table")
        fields = {
            "version",
            "trust_domain",
            "key_type",
            "ca_key_type",
            "broker_key_type",
            "device_valid_for",
            "crl_valid_for",
            "crl_url",
        }
        unknown = sorted(set(section) - fields)
        if unknown:
            raise WorkspaceError(
                f"{path}: unknown field fleet.{unknown[0]}; known: {', '.join(sorted(fields))}"
            )
        defaults = cls()
        try:
            return cls(
                trust_domain=validate_trust_domain(
                    _str(section, "trust_domain", defaults.trust_domain)
                ),
                key_type=KeyType.parse(_str(section, "key_type", defaults.key_type.value)),
                ca_key_type=_key_type(section, "ca_key_type"),
                broker_key_type=_key_type(section, "broker_key_type"),
                device_valid_for=_duration(section, "device_valid_for", defaults.device_valid_for),
                crl_valid_for=_duration(section, "crl_valid_for", defaults.crl_valid_for),
                crl_url=section.get("crl_url") or None,
            )
        except FleetError as exc:
            raise WorkspaceError(f"{path}: {exc}") from exc


def _str(section: dict[str, Any], field: str, default: str) -> str:
    value = section.get(field, default)
    if not isinstance(value, str):
        raise WorkspaceError(f"field fleet.{field} must be a string, not {type(value).__name__}")
    return value


def _key_type(section: dict[str, Any], field: str) -> KeyType | None:
    return KeyType.parse(_str(section, field, "")) if field in section else None


def _duration(section: dict[str, Any], field: str, default: dt.timedelta) -> dt.timedelta:
    if field not in section:
        return default
    try:
        return parse_positive_duration(_str(section, field, ""))
    except FleetError as exc:
        raise WorkspaceError(f"field fleet.{field}: {exc}") from exc

"""The OpenAPI 3.1 description of the admin API (served at ``GET /openapi.json``)."""

from __future__ import annotations

from typing import Any


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_ERRORS = {
    "400": _json(_ref("Error"), "a field is wrong; 'field' names it"),
    "403": _json(_ref("Error"), "the client certificate is not an admin certificate"),
}
_NOT_FOUND = {"404": _json(_ref("Error"), "no such device or claim")}
_CONFLICT = {"409": _json(_ref("Error"), "the id or name is taken")}
_DURATION = {"type": "string", "pattern": r"^\d+(\.\d+)?(ms|s|m|h|d)?$", "examples": ["90d"]}
_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}

OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "mtls-fleet admin API",
        "version": "1",
        "description": "Devices and claims of one fleet. Mutual TLS: the client presents a "
        "certificate of this fleet with the admin role (DIR/admin/); no passwords.",
    },
    "components": {
        "securitySchemes": {"mutualTLS": {"type": "mutualTLS"}},
        "schemas": {
            "Error": {
                "type": "object",
                "required": ["error", "status"],
                "properties": {
                    "error": {"type": "string"},
                    "status": {"type": "integer"},
                    "field": {"type": "string", "description": "the request field at fault"},
                },
            },
            "Device": {
                "type": "object",
                "properties": {
                    "id": {"type": "string"},
                    "serial": {"type": "string"},
                    "tier": {"enum": ["bronze", "silver", "gold"]},
                    "env": {"enum": ["prod", "dev"]},
                    "status": {"enum": ["active", "revoked", "expired", "not-yet-valid"]},
                    "key_type": {"type": "string"},
                    "not_before": {"type": "string", "format": "date-time"},
                    "not_after": {"type": "string", "format": "date-time"},
                    "days_left": {"type": "number"},
                    "expiring_soon": {"type": "boolean"},
                    "revoked_at": {"type": ["string", "null"], "format": "date-time"},
                    "revocation_reason": {"type": ["string", "null"]},
                    "cert_path": {"type": "string"},
                    "key_path": {"type": ["string", "null"]},
                },
            },
            "Claim": {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "tier": {"type": "string"},
                    "env": {"type": "string"},
                    "allow_ids": {"type": "string"},
                    "uses": {"type": "integer"},
                    "max_uses": {"type": "integer"},
                    "device_valid_for_seconds": {"type": "number"},
                    "not_after": {"type": "string", "format": "date-time"},
                    "status": {"enum": ["active", "revoked", "expired", "exhausted"]},
                    "serial": {"type": "string"},
                },
            },
        },
    },
    "security": [{"mutualTLS": []}],
    "paths": {
        "/v1/devices": {
            "get": {
                "summary": "List devices (fleet inventory)",
                "parameters": [
                    {"name": "status", "in": "query", "schema": {"type": "string"}},
                    {"name": "expiring_within", "in": "query", "schema": _DURATION},
                ],
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "properties": {"devices": {"type": "array", "items": _ref("Device")}},
                        },
                        "the devices",
                    ),
                    **_ERRORS,
                },
            },
            "post": {
                "summary": "Provision devices with fleet-made keys, or sign one device's CSR",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "additionalProperties": False,
                                "properties": {
                                    "count": {"type": "integer", "minimum": 1, "maximum": 1000},
                                    "prefix": {"type": "string"},
                                    "tier": {"enum": ["bronze", "silver", "gold"]},
                                    "env": {"enum": ["prod", "dev"]},
                                    "valid_for": _DURATION,
                                    "key_type": {
                                        "enum": ["ec-p256", "ec-p384", "rsa2048", "rsa3072"]
                                    },
                                    "id": {"type": "string", "description": "with csr"},
                                    "csr": {
                                        "type": "string",
                                        "description": "PEM CSR; the device keeps its key",
                                    },
                                },
                            }
                        }
                    },
                },
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "properties": {
                                "devices": {"type": "array", "items": {"type": "string"}},
                                "certificate": {
                                    "type": "string",
                                    "description": "PEM chain, for a CSR",
                                },
                            },
                        },
                        "the new devices, all or none",
                    ),
                    **_ERRORS,
                    **_CONFLICT,
                },
            },
        },
        "/v1/devices/{id}": {
            "get": {
                "summary": "One device with its certificate, history and enrollment (fleet show)",
                "parameters": [_ID],
                "responses": {"200": _json(_ref("Device"), "the device"), **_ERRORS, **_NOT_FOUND},
            }
        },
        "/v1/devices/{id}/revoke": {
            "post": {
                "summary": "Revoke a device (or only its superseded certificates) and publish a CRL",
                "parameters": [_ID],
                "requestBody": {
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "additionalProperties": False,
                                "properties": {
                                    "reason": {"type": "string", "examples": ["key-compromise"]},
                                    "superseded_only": {"type": "boolean"},
                                },
                            }
                        }
                    }
                },
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "properties": {
                                "id": {"type": "string"},
                                "revoked_serials": {"type": "array", "items": {"type": "string"}},
                                "crl_number": {"type": ["integer", "null"]},
                            },
                        },
                        "what was revoked (nothing, if it already was)",
                    ),
                    **_ERRORS,
                    **_NOT_FOUND,
                },
            }
        },
        "/v1/claims": {
            "get": {
                "summary": "List claims",
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "properties": {"claims": {"type": "array", "items": _ref("Claim")}},
                        },
                        "the claims",
                    ),
                    **_ERRORS,
                },
            },
            "post": {
                "summary": "Create a claim; the answer carries its bundle (cert, key, root)",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "additionalProperties": False,
                                "required": ["name"],
                                "properties": {
                                    "name": {"type": "string"},
                                    "max_uses": {
                                        "type": "integer",
                                        "minimum": 1,
                                        "maximum": 1000000,
                                    },
                                    "valid_for": _DURATION,
                                    "allow_ids": {"type": "string", "examples": ["sensor-*"]},
                                    "tier": {"enum": ["bronze", "silver", "gold"]},
                                    "env": {"enum": ["prod", "dev"]},
                                    "device_valid_for": _DURATION,
                                },
                            }
                        }
                    },
                },
                "responses": {"200": _json(_ref("Claim"), "the claim"), **_ERRORS, **_CONFLICT},
            },
        },
        "/v1/claims/{id}/revoke": {
            "post": {
                "summary": "Revoke a claim: no more enrollments; enrolled devices are unaffected",
                "parameters": [_ID],
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "properties": {
                                "name": {"type": "string"},
                                "revoked": {"type": "boolean"},
                            },
                        },
                        "revoked now (false: it already was)",
                    ),
                    **_ERRORS,
                    **_NOT_FOUND,
                },
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "This document",
                "responses": {"200": {"description": "the OpenAPI schema"}},
            }
        },
    },
}

"""The base error of Switchboard services and the few errors shared between them."""

from __future__ import annotations


class ServiceError(Exception):
    """Base of every error a Switchboard service raises on purpose."""


class ConfigError(ServiceError):
    """Configuration is missing or out of range; the message names the field."""


class NatsServerError(ServiceError):
    """The embedded nats-server could not be found or started."""

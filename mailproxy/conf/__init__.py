"""The configuration layer: nginx's syntax and mail directives in, frozen settings out."""

from .lexer import ConfigError
from .load import check, load_config
from .settings import DEFAULT_CONF_PATH, AuthHttpUrl, Config, Listen, MainSettings, ServerSettings

__all__ = ["ConfigError", "check", "load_config", "DEFAULT_CONF_PATH", "AuthHttpUrl", "Config", "Listen",
           "MainSettings", "ServerSettings"]

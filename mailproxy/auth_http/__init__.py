"""The auth_http exchange: request builder, reply parser and decision (sans-IO), and the gevent client."""

from .response import AuthError, AuthFail, AuthHttpError, AuthOk, AuthReply, AuthRetry, decide

__all__ = ["AuthError", "AuthFail", "AuthHttpError", "AuthOk", "AuthReply", "AuthRetry", "decide"]

"""The auth_http exchange: request builder, reply parser and decision (sans-IO), and the client on the worker's loop."""

from .response import AuthError, AuthFail, AuthHttpError, AuthOk, AuthReply, AuthRetry, decide

__all__ = ["AuthError", "AuthFail", "AuthHttpError", "AuthOk", "AuthReply", "AuthRetry", "decide"]

"""DRF authentication by proxy API key, sent in `x-api-key` or as a Bearer token."""

from rest_framework import authentication, exceptions, permissions
from rest_framework.request import Request

from proxy_site.errors import INVALID_KEY_MESSAGE
from proxy_site.middleware import key_prefix_var

from .models import APIKey
from .ratelimits import check_failed_attempts, record_failed_attempt
from .services import find_usable_key


def _header_key(request: Request) -> str | None:
    header_key = request.headers.get("x-api-key", "").strip()
    return header_key or None


def _bearer_key(request: Request) -> str | None:
    scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return None


class APIKeyAuthentication(authentication.BaseAuthentication):
    """Authenticate a request by its proxy API key.

    Every kind of failure (malformed, unknown, revoked, expired) raises the same
    error, so a client cannot learn which part of a key was wrong. A failure
    gets 403 because `authenticate_header` returns nothing.
    """

    def read_key(self, request: Request) -> str | None:
        """Return the key from `x-api-key`, or else from `Authorization: Bearer`."""
        return _header_key(request) or _bearer_key(request)

    def authenticate(self, request: Request) -> tuple[None, APIKey] | None:
        raw_key = self.read_key(request)
        if raw_key is None:
            return None
        # An address that sent too many wrong keys is refused before its key
        # is looked at, so that a right guess cannot succeed either.
        check_failed_attempts(request._request)
        api_key = find_usable_key(raw_key)
        if api_key is None:
            record_failed_attempt(request._request)
            raise exceptions.AuthenticationFailed(
                INVALID_KEY_MESSAGE, code="invalid_api_key"
            )
        key_prefix_var.set(api_key.prefix)
        return (None, api_key)


class BearerAPIKeyAuthentication(APIKeyAuthentication):
    """The same check, responding with 401 and `WWW-Authenticate: Bearer`.

    `Authorization: Bearer` is the header that OpenAI's SDKs send, so its key
    is the one checked when a request carries both.
    """

    def read_key(self, request: Request) -> str | None:
        return _bearer_key(request) or _header_key(request)

    def authenticate_header(self, request: Request) -> str:
        return 'Bearer realm="api"'


class HasAPIKey(permissions.BasePermission):
    message = INVALID_KEY_MESSAGE
    code = "invalid_api_key"

    def has_permission(self, request: Request, view) -> bool:
        return isinstance(request.auth, APIKey)

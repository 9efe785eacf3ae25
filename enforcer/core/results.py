"""Result codes of the session API (SPEC.md), each mapped to an exception class.

The HRESULT values are the documented ones; the control API reports both the
name and the value so that callers in any language can match on either.
"""

from __future__ import annotations

from typing import ClassVar

S_OK = 0x00000000
S_FALSE = 0x00000001


class SessionApiError(Exception):
    """Base class: an API call failed with an HRESULT."""

    name: ClassVar[str] = "E_FAIL"
    hresult: ClassVar[int] = 0x80004005

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "hresult": f"0x{self.hresult:08X}", "message": self.message}


class InvalidArgument(SessionApiError):
    name = "E_INVALIDARG"
    hresult = 0x80070057


class NotFound(SessionApiError):
    name = "NOT_FOUND"
    hresult = 0x80070490


class Terminating(SessionApiError):
    name = "FWX_E_TERMINATING"
    hresult = 0xC0040001


class PolicyRulesDenied(SessionApiError):
    name = "FWX_E_POLICY_RULES_DENIED"
    hresult = 0xC004000D


class NetworkRulesDenied(SessionApiError):
    name = "FWX_E_NETWORK_RULES_DENIED"
    hresult = 0xC0040012


class IsBusy(SessionApiError):
    name = "FWX_E_IS_BUSY"
    hresult = 0xC0040011


ERRORS: dict[str, type[SessionApiError]] = {
    cls.name: cls
    for cls in (SessionApiError, InvalidArgument, NotFound, Terminating, PolicyRulesDenied,
                NetworkRulesDenied, IsBusy)
}

"""Which exchange may arrive in which IKE SA state — rules as data (STYLE: h11/h2).

Everything that decides whether a message is acceptable lives here, and this
file does not know which side we are. RFC 7296 §1.2–1.4, as seen by one IKE SA
(https://www.rfc-editor.org/rfc/rfc7296#section-1.2)::

      Initiator                         Responder
      -------------------------------------------------------------------
      HDR, SAi1, KEi, Ni  -->                                     §1.2
                          <--  HDR, SAr1, KEr, Nr, [CERTREQ]
         INIT_SENT                         HALF_OPEN
      HDR, SK {IDi, [IDr,] AUTH, SAi2, TSi, TSr}  -->
                          <--  HDR, SK {IDr, AUTH, SAr2, TSi, TSr}
         AUTH_SENT  ─────────────────────────►  ESTABLISHED
      HDR, SK {SA, Ni, [KEi], [N(REKEY_SA)], TSi, TSr}  -->       §1.3.1/1.3.3
                          <--  HDR, SK {SA, Nr, [KEr], TSi, TSr}
      HDR, SK {SA, Ni, KEi}  -->  (IKE SA rekey)                  §1.3.2
                          <--  HDR, SK {SA, Nr, KEr}
         ESTABLISHED ──► REKEYED (old SA, until its DELETE)      §2.18
      HDR, SK {[N,] [D,] [CP,] ...}  -->                          §1.4
                          <--  HDR, SK {[N,] [D,] [CP], ...}
         D(IKE): ──► CLOSED; ours: DELETING ──► CLOSED

Requests absent from :data:`REQUESTS` and responses absent from
:data:`RESPONSES` are the protocol errors: the connection rejects them in one
place. Handlers raise an :class:`IkeError` subclass whose ``notify`` is the
Notify to answer with (§2.21), caught once and turned into the response.
"""

from __future__ import annotations

from enum import Enum

from control.ike.payloads import ExchangeType, Notify


class IkeState(Enum):
    INIT_SENT = "init_sent"
    """Initiator: IKE_SA_INIT sent."""
    HALF_OPEN = "half_open"
    """Responder: IKE_SA_INIT answered, IKE_AUTH not yet seen (counted, timed out)."""
    AUTH_SENT = "auth_sent"
    """Initiator: IKE_AUTH sent."""
    ESTABLISHED = "established"
    REKEYED = "rekeyed"
    """Replaced by a new IKE SA (§2.18); waits for / sends its DELETE."""
    DELETING = "deleting"
    """We sent DELETE for it; waits for the response or gives up."""
    CLOSED = "closed"


E = ExchangeType
S = IkeState

REQUESTS: dict[tuple[IkeState, ExchangeType], str] = {
    (S.HALF_OPEN, E.IKE_AUTH): "on_ike_auth",
    (S.ESTABLISHED, E.CREATE_CHILD_SA): "on_create_child_sa",
    (S.ESTABLISHED, E.INFORMATIONAL): "on_informational",
    (S.REKEYED, E.CREATE_CHILD_SA): "on_busy",
    (S.REKEYED, E.INFORMATIONAL): "on_informational",
    (S.DELETING, E.CREATE_CHILD_SA): "on_busy",
    (S.DELETING, E.INFORMATIONAL): "on_informational",
}
"""(state, exchange of a request from the peer) → handler name."""

RESPONSES: dict[tuple[IkeState, ExchangeType], str] = {
    (S.INIT_SENT, E.IKE_SA_INIT): "on_init_response",
    (S.AUTH_SENT, E.IKE_AUTH): "on_auth_response",
    (S.ESTABLISHED, E.CREATE_CHILD_SA): "on_create_child_sa_response",
    (S.ESTABLISHED, E.INFORMATIONAL): "on_informational_response",
    (S.REKEYED, E.CREATE_CHILD_SA): "on_create_child_sa_response",
    (S.REKEYED, E.INFORMATIONAL): "on_informational_response",
    (S.DELETING, E.INFORMATIONAL): "on_informational_response",
    (S.DELETING, E.CREATE_CHILD_SA): "on_create_child_sa_response",
}
"""(state, exchange of our outstanding request) → handler for its response."""


class IkeError(Exception):
    """A request we refuse; ``notify`` is the error Notify of the response (§2.21)."""

    notify: Notify = Notify.INVALID_SYNTAX

    def __init__(self, reason: str = "", data: bytes = b"") -> None:
        super().__init__(reason or self.notify.name)
        self.reason = reason or self.notify.name.lower()
        self.data = data


class InvalidSyntax(IkeError):
    notify = Notify.INVALID_SYNTAX


class UnsupportedCriticalPayload(IkeError):
    notify = Notify.UNSUPPORTED_CRITICAL_PAYLOAD


class NoProposalChosenError(IkeError):
    notify = Notify.NO_PROPOSAL_CHOSEN


class InvalidKePayload(IkeError):
    """Data is the group we want, 2 octets (§3.10.1)."""

    notify = Notify.INVALID_KE_PAYLOAD


class AuthenticationFailedError(IkeError):
    notify = Notify.AUTHENTICATION_FAILED


class TsUnacceptable(IkeError):
    notify = Notify.TS_UNACCEPTABLE


class TemporaryFailure(IkeError):
    notify = Notify.TEMPORARY_FAILURE


class ChildSaNotFound(IkeError):
    notify = Notify.CHILD_SA_NOT_FOUND


class NoAdditionalSas(IkeError):
    notify = Notify.NO_ADDITIONAL_SAS


class Dropped(Exception):
    """Silently discard the message; ``trigger`` is the counted reason (a label)."""

    def __init__(self, trigger: str) -> None:
        super().__init__(trigger)
        self.trigger = trigger

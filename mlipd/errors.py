"""Typed errors. Each has a stable ``code`` that becomes a wire error at a boundary."""

from __future__ import annotations

from collections.abc import Mapping


class MlipdError(Exception):
    """Base of every mlipd error; ``code`` is stable and travels on the wire."""

    code = "internal"


class ProtocolError(MlipdError):
    """Bad bytes or messages in the wrong order: the connection is dropped."""

    code = "protocol"


class ConnectionClosed(ProtocolError):
    """The peer closed the connection (a 0-byte read)."""

    code = "closed"


class ValidationError(MlipdError):
    """A structure or request that cannot be computed (bad shape, NaN, ...)."""

    code = "bad_input"


class UnknownSpecies(ValidationError):
    code = "unknown_species"


class TooLarge(ValidationError):
    code = "too_large"


class SetupError(MlipdError):
    """Raised before serving: unknown model, missing package, bad option."""

    code = "setup"


class UnknownModel(SetupError):
    code = "unknown_model"


class ModelUnavailable(SetupError):
    code = "model_unavailable"


class CalculationFailed(MlipdError):
    """Raised during a computation: error reply, the server keeps serving."""

    code = "calculation"


class DeadlineExceeded(CalculationFailed):
    """The request's deadline passed (queued too long, or the engine took too long)."""

    code = "deadline"


class Busy(MlipdError):
    """The server cannot take the request now (queue full, shutting down)."""

    code = "busy"


class Cancelled(MlipdError):
    """The request was not computed: its client cancelled it (``cancel`` op) or its
    connection closed before its turn."""

    code = "cancelled"


class ServerUnavailable(MlipdError):
    """Nothing answers at the endpoint, or the server went silent (heartbeat timeout)."""

    code = "unavailable"


_BY_CODE: dict[str, type[MlipdError]] = {
    cls.code: cls
    for cls in (
        MlipdError,
        ProtocolError,
        ConnectionClosed,
        ValidationError,
        UnknownSpecies,
        TooLarge,
        SetupError,
        UnknownModel,
        ModelUnavailable,
        CalculationFailed,
        DeadlineExceeded,
        Busy,
        Cancelled,
        ServerUnavailable,
    )
}


def error_to_wire(e: BaseException) -> dict[str, str]:
    code = e.code if isinstance(e, MlipdError) else "internal"
    return {"code": code, "message": str(e) or type(e).__name__}


def error_from_wire(d: Mapping[str, str]) -> MlipdError:
    return _BY_CODE.get(str(d.get("code")), MlipdError)(str(d.get("message", "")))

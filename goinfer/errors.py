"""Error codes shared by both tiers, and the exception models raise to choose one.

The names, numbers and meanings are go-infer's `ErrCode` section, so that clients written for
go-infer keep parsing our answers. Codes goinfer added for behaviour go-infer lacks sit in their
own block below and are documented in config/settings.yaml.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ErrorCode:
    """One entry of the `ErrCode` settings section: the number clients see and its message."""

    code: int
    msg: str


# go-infer's codes, keyed by their settings.yaml names.
GO_INFER_ERROR_CODES: dict[str, ErrorCode] = {
    "QueueTimeout": ErrorCode(9997, "queue timeout"),
    "InferFail": ErrorCode(9998, "infer fail"),
    "UnknownApi": ErrorCode(9999, "unknown api"),
    "ApiEntryFail": ErrorCode(9701, "api entry fail"),
    "SendMsgFail": ErrorCode(9702, "send message fail"),
    "RecvMsgFail": ErrorCode(9703, "receive message fail"),
    "UnknownApiPath": ErrorCode(9709, "unknown path"),
    "SignFail": ErrorCode(9800, "验签失败"),
    "SignFail1": ErrorCode(9801, "缺少参数"),
    "SignFail2": ErrorCode(9802, "时间戳错误"),
    "SignFail3": ErrorCode(9803, "签名算法错误"),
    "SignFail5": ErrorCode(9805, "AppId错误"),
    "SignFail6": ErrorCode(9806, "版本号错误"),
}

# Codes for what go-infer does not do (it has no body limit and no such checks).
GOINFER_ERROR_CODES: dict[str, ErrorCode] = {
    "QueueFull": ErrorCode(9704, "queue full, try again later"),
    "DeadLettered": ErrorCode(9705, "request set aside after failing in several workers"),
    "BodyTooLarge": ErrorCode(9710, "request body too large"),
    "MethodNotAllowed": ErrorCode(9711, "method not allowed, use POST"),
    "BodyTimeout": ErrorCode(9712, "request body not received in time"),
    "Replayed": ErrorCode(9807, "request already received"),
    # Bodies costly to check are checked in check processes, a bounded number at once
    # (API.MaxUnverified, API.MaxUnverifiedPerClient); past the bound a request is refused at once.
    "TooManyUnverified": ErrorCode(9713, "too many unverified requests in progress, try again later"),
    # Each model's api_entry runs in a bounded thread pool (API.ApiEntryThreads, API.MaxWaitingApiEntries).
    "ApiEntryBusy": ErrorCode(9714, "api entry busy, try again later"),
    # Asynchronous jobs (POST /goinfer/jobs<api_path>): one that waited past Server.JobTimeout, and
    # one that is unknown, expired from Redis, or another appId's (the same answer for all three).
    "JobExpired": ErrorCode(9715, "job expired before a worker took it"),
    "JobNotFound": ErrorCode(9716, "job not found"),
}

DEFAULT_ERROR_CODES: dict[str, ErrorCode] = {**GO_INFER_ERROR_CODES, **GOINFER_ERROR_CODES}


class ApiError(Exception):
    """Raise from `api_entry` or `infer` to answer the client with your own code.

    go-infer models returned `{"code": N}` beside an error; this is the Python spelling of that.
    The client sees `code` and the tier's failure prefix (ApiEntryFail or InferFail) before `msg`.
    """

    def __init__(self, code: int, msg: str) -> None:
        if isinstance(code, bool) or not isinstance(code, int):
            raise TypeError(f"ApiError code must be an int, got {code!r}")
        if code == 0:
            raise ValueError("ApiError code 0 means success; use a non-zero code")
        super().__init__(code, msg)
        self.code = code
        self.msg = str(msg)

    def __str__(self) -> str:
        return f"{self.code}: {self.msg}"

"""The refusal a request handler raises: answered to the requester as an error reply with a
CUDA result code, never logged as a broker fault."""
from __future__ import annotations


class _Refused(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = int(code)
        self.message = message

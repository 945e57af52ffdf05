"""What the server says to a client: one-line JSON errors without file-system paths or tracebacks."""

from __future__ import annotations

import json
import re

# An absolute path with at least one folder (not preceded by a word character, so 1/4 and URLs survive).
_PATH = re.compile(r"(?<![\w:/.~-])(?:~)?/(?:[^\s/'\"`,;:()\[\]{}<>]+/)+[^\s/'\"`,;:()\[\]{}<>]*")
_TEMP_NAME = re.compile(r"\btmp[\w-]{6,}(?:\.[\w.]+)?")


def scrub(text: str) -> str:
    """``text`` without file-system paths or temporary file names (for messages sent to a client)."""
    return _TEMP_NAME.sub("<file>", _PATH.sub("<path>", text))


def user_message(exc: BaseException) -> str:
    """The first line of an error, as a client may see it."""
    problem = getattr(exc, "problem", None)  # CTInputError/CTOutputError: the problem without the path
    text = problem if isinstance(problem, str) else str(exc)
    return scrub(text.strip().splitlines()[0] if text.strip() else type(exc).__name__)


def json_error(status: int, detail: str, headers: dict | None = None):
    """A JSON error response ``{"detail": ...}``."""
    from fastapi.responses import JSONResponse  # the CLI imports this module; FastAPI only in the server

    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


async def send_json(send, status: int, payload: dict, headers: list | None = None) -> None:
    """Send a whole JSON response on a raw ASGI channel."""
    body = json.dumps(payload).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def too_large_detail(size: int | None, limit: int) -> dict:
    mb = limit / 1024 / 1024
    said = f" ({size / 1024 / 1024:.1f} MB)" if size is not None else ""
    return {
        "detail": f"the upload{said} is larger than this server's limit of {mb:g} MB "
        "(start the server with a larger --max-upload-mb, or send a smaller volume)"
    }


def internal_detail(reference: str) -> dict:
    return {"detail": f"internal server error (reference {reference}); the server log has the details"}

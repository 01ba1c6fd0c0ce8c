"""User-facing errors.

Every refusal that the user can fix raises `UpcycleError` with one sentence that names the
fix. The CLI turns it into that sentence on stderr and exit code 2, without a traceback unless
`--debug` is given. Programming errors stay ordinary exceptions.
"""

from __future__ import annotations


class UpcycleError(Exception):
    """A refusal caused by the user's input; the message says how to fix it."""

    exit_code = 2


def describe_validation_error(error: Exception, where: str) -> str:
    """One sentence from a pydantic ValidationError: where, which field, what is wrong."""
    errors = error.errors() if hasattr(error, "errors") else []
    if not errors:
        return f"{where}: {error}"
    first = errors[0]
    location = ".".join(str(part) for part in first.get("loc", ()) if part != "__root__")
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if first.get("type") == "extra_forbidden":
        message = "unknown key; remove it or check its spelling against the documented keys"
    elif first.get("type") == "missing":
        message = "required key is missing; add it"
    elif first.get("type") != "value_error" and ";" not in message:
        # pydantic's own wording says what is wrong; add the value and what to do
        message = f"{message}, got {_short(first.get('input'))}; change the value"
    section = location.rsplit(".", 1)[-1]
    if section and message.startswith(f"{section}: "):  # a section's check that names itself
        message = message[len(section) + 2 :]
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    field = f" {location}:" if location else ""
    return f"{where}:{field} {message}{more}"


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def validated(model_cls, data, where: str):
    """Validate `data` into the pydantic `model_cls`, turning failures into an UpcycleError."""
    from pydantic import ValidationError

    if not isinstance(data, dict):
        raise UpcycleError(f"{where} must be a mapping of keys to values; check the file's structure")
    try:
        return model_cls.model_validate(data)
    except ValidationError as error:
        raise UpcycleError(describe_validation_error(error, where)) from error

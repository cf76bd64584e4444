"""A config that fails validation, said in one line per fault, naming the key.

pydantic's own text spreads a fault over several lines with URLs; users of `kvmesh up
--config`, `kvmesh models add` and the MeshAdmin service get ``models.1.engine.foo:
Extra inputs are not permitted`` instead.
"""

from __future__ import annotations

from pydantic import ValidationError


def key_of(loc: tuple[int | str, ...]) -> str:
    """A pydantic error location as the key path a user writes (``models.0.workers``)."""
    return ".".join(str(part) for part in loc) or "(top level)"


def fault_lines(exc: ValidationError) -> list[str]:
    """One ``key: problem (got value)`` line per fault."""
    lines = []
    for error in exc.errors(include_url=False):
        message = error["msg"].removeprefix("Value error, ")
        got = "" if error["type"] == "missing" or isinstance(error.get("input"), dict) \
            else f" (got {error.get('input')!r})"
        lines.append(f"{key_of(error['loc'])}: {message}{got}")
    return lines


def describe(exc: ValidationError, what: str = "config") -> str:
    """The whole fault list under a heading."""
    lines = fault_lines(exc)
    return f"invalid {what} ({len(lines)} error{'s' if len(lines) != 1 else ''}):\n" + \
        "\n".join(f"  {line}" for line in lines)

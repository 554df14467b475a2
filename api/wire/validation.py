"""Declarative request validation: pydantic models whose errors become our 400s.

Every wire format declares its request bodies as `WireModel` subclasses (api/wire/schemas.py). The
same classes validate requests and generate the OpenAPI document (api/openapi.py), so the
documentation cannot drift from what the routes accept.

Validation is strict, as the hand-written checks before it were: a string is never coerced to a
number, a boolean is not an integer, an integer is a valid number, NaN and infinities are refused.
As in JSON Schema, a number with no fractional part is an integer (`3.0` is 3). A JSON null counts
as an absent field, and the document says so: every optional field's schema admits null.

Checks that a route makes itself (with a message of its own) are declared in the document too, with
`declares(...)` on a field or `document_rules` on a model, so that the document never admits a body
the route refuses. The first problem found becomes an `InvalidRequest` whose
`param` is the client's own field path (`temperature`, `messages[0].role`, `params.temp`) and whose
message reads like `'temp' must be between 0 and 2`.
"""

from __future__ import annotations

import json
import re
import types
from collections.abc import Callable
from typing import Annotated, Any, ClassVar, TypeVar, Union, get_args, get_origin

import annotated_types
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    ValidationError,
    WrapValidator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import CoreSchema, PydanticCustomError

from api.errors import InvalidRequest

M = TypeVar("M", bound=BaseModel)

_CUSTOM = "wire"
"""Error type of our own checks; the message is the predicate after the field name."""


_ANNOTATIONS = frozenset({"title", "description", "default", "examples", "deprecated"})
NULL: dict[str, Any] = {"type": "null"}
NOT_NULL: dict[str, Any] = {"not": NULL}
NO_VALUE: dict[str, Any] = {"not": {}}
"""Declared on an optional field (which the document also lets be null): only null is accepted, or
leaving the field out. For a field a route refuses in any form, but names in its 400."""


def _or_null(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema`, or null."""
    core = {key: value for key, value in schema.items() if key not in _ANNOTATIONS}
    if not core or NULL in core.get("anyOf", []):
        return schema  # admits null already
    if set(core) == {"anyOf"}:
        return {**schema, "anyOf": [*core["anyOf"], NULL]}
    return {**{key: value for key, value in schema.items() if key in _ANNOTATIONS}, "anyOf": [core, NULL]}


def _document_the_wire_rules(schema: dict[str, Any], model: type[BaseModel]) -> None:
    """Make a model's JSON schema say what parsing it does beyond the fields' types: an optional
    field may be null (`_read_as_json_means_it`), and the model's own cross-field rules."""
    required = set(schema.get("required", ()))
    properties = schema.get("properties", {})
    for name, prop in properties.items():
        if name not in required:
            properties[name] = _or_null(prop)
    schema.update(getattr(model, "document_rules", {}))


def _integral(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


class WireModel(BaseModel):
    """Base of every request body: strict types, nulls are absent, unknown fields are ignored."""

    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False, protected_namespaces=(),
                              json_schema_extra=_document_the_wire_rules)

    document_rules: ClassVar[dict[str, Any]] = {}
    """JSON Schema keywords for the rules the route checks across fields (with its own messages)."""

    @model_validator(mode="before")
    @classmethod
    def _read_as_json_means_it(cls, data: Any) -> Any:
        """A null is an absent field, and a number without a fraction is an integer (3.0 is 3):
        JSON has one kind of number, and JSON Schema's "integer" is that. A float field takes the
        integer as the same number; a fraction (3.5) stays a float, which an integer field refuses."""
        if isinstance(data, dict):
            return {key: _integral(value) for key, value in data.items() if value is not None}
        return data


def fail(predicate: str) -> PydanticCustomError:
    """An error for the current field: the message is `'<field>' <predicate>`."""
    return PydanticCustomError(_CUSTOM, "{predicate}", {"predicate": predicate})


def expect(description: str) -> WrapValidator:
    """Collapse every error inside a field (a union's members, a list's items) into one:
    `'<field>' must be <description>`. The field's JSON schema stays that of its type."""

    def validate(value: Any, handler: Callable[[Any], Any]) -> Any:
        try:
            return handler(value)
        except ValidationError:
            raise fail(f"must be {description}") from None

    return WrapValidator(validate)


class declares:  # noqa: N801 - reads as an annotation: Annotated[str, declares(maxLength=0)]
    """JSON Schema keywords added to a field's schema, for a check the route makes in code (with a
    message of its own) that the type alone does not show."""

    def __init__(self, **keywords: Any) -> None:
        self.keywords = keywords

    def __get_pydantic_json_schema__(self, core_schema: CoreSchema, handler: GetJsonSchemaHandler) -> dict[str, Any]:
        return {**handler(core_schema), **self.keywords}

    # Annotated metadata must be hashable (typing deduplicates unions)
    def __hash__(self) -> int:
        return hash(json.dumps(self.keywords, sort_keys=True))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, declares) and other.keywords == self.keywords

    def __repr__(self) -> str:
        return f"declares({self.keywords!r})"


WHITESPACE = "".join(character for character in map(chr, range(0x3001)) if character.isspace())
"""Every character str.isspace() counts (none lies above U+3000), spelled out: `\\s` means three
different sets in Python's, ECMA 262's and Rust's regular expressions, and a JSON Schema pattern must
mean to every validator what it means here."""
NON_BLANK_PATTERN = f"[^{WHITESPACE}]"
"""Somewhere, a character that is not white space (a JSON Schema pattern is not anchored)."""
_NON_BLANK = re.compile(NON_BLANK_PATTERN)


def _not_blank(value: str) -> str:
    if not _NON_BLANK.search(value):
        raise fail("must not be empty")
    return value


NonBlank = Annotated[str, Field(min_length=1), AfterValidator(_not_blank), declares(pattern=NON_BLANK_PATTERN)]
"""A string with at least one non-space character."""


def parse(model: type[M], body: dict[str, Any]) -> M:
    """Validate a JSON object against `model`; the first problem becomes a 400 naming the field."""
    try:
        return model.model_validate(body)
    except ValidationError as error:
        raise _invalid_request(model, error.errors(include_url=False)[0]) from None


# -- turning a pydantic error into our message


def field_path(loc: tuple[int | str, ...]) -> str:
    """('messages', 0, 'role') -> 'messages[0].role'"""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


_KINDS = {
    "string_type": "a string", "bool_type": "a boolean", "int_type": "an integer", "int_from_float": "an integer",
    "float_type": "a number", "finite_number": "a finite number", "list_type": "an array", "dict_type": "an object",
    "model_type": "an object", "model_attributes_type": "an object",
}


def _number(value: object) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _bounds_text(bounds: dict[str, object]) -> str:
    low = f"greater than {_number(bounds['gt'])}" if "gt" in bounds else None
    high = f"less than {_number(bounds['lt'])}" if "lt" in bounds else None
    if "ge" in bounds and "le" in bounds:
        return f"between {_number(bounds['ge'])} and {_number(bounds['le'])}"
    if "ge" in bounds:
        low = f"at least {_number(bounds['ge'])}"
    if "le" in bounds:
        high = f"at most {_number(bounds['le'])}"
    return " and ".join(part for part in (low, high) if part)


def _predicate(kind: str, error: dict[str, Any], bounds: dict[str, object]) -> str:
    ctx = error.get("ctx") or {}
    if kind == _CUSTOM:
        return str(ctx.get("predicate", error["msg"]))
    if kind == "missing":
        return "is required"
    if kind in _KINDS:
        return f"must be {_KINDS[kind]}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return "must be " + _bounds_text(bounds or ctx)
    if kind == "literal_error":
        return f"must be {ctx.get('expected')}"
    if kind == "too_short":
        return f"must have at least {ctx.get('min_length')} item(s)"
    if kind == "too_long":
        return f"must have at most {ctx.get('max_length')} item(s)"
    if kind == "string_too_short":
        return "must not be empty" if ctx.get("min_length") == 1 else f"must be at least {ctx.get('min_length')} characters long"
    if kind == "string_too_long":
        return f"must be at most {ctx.get('max_length')} characters long"
    return f"is invalid: {error['msg']}"


def _invalid_request(model: type[BaseModel], error: dict[str, Any]) -> InvalidRequest:
    loc = tuple(error["loc"])
    param = field_path(loc) or None
    predicate = _predicate(error["type"], error, _field_bounds(model, loc))
    if param is None:
        return InvalidRequest(f"the request body {predicate}")
    return InvalidRequest(f"'{param}' {predicate}", param=param)


# -- finding a field's declared bounds, so "between 0 and 2" can name both ends


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for arg in get_args(annotation) for model in _models_in(arg)]


def _constraints(annotation: Any, metadata: list[Any]) -> dict[str, object]:
    found: dict[str, object] = {}
    for item in metadata:
        if isinstance(item, FieldInfo):
            found.update(_constraints(None, item.metadata))
        elif isinstance(item, annotated_types.Interval):
            found.update({key: value for key in ("gt", "ge", "lt", "le") if (value := getattr(item, key)) is not None})
        elif isinstance(item, (annotated_types.Gt, annotated_types.Ge, annotated_types.Lt, annotated_types.Le)):
            key = type(item).__name__.lower()
            found[key] = getattr(item, key)
    if annotation is not None:
        origin = get_origin(annotation)
        if origin is Annotated:
            found.update(_constraints(None, list(annotation.__metadata__)))
        elif origin in (Union, types.UnionType):
            for arg in get_args(annotation):
                found.update(_constraints(arg, []))
    return found


def _field_bounds(model: type[BaseModel], loc: tuple[int | str, ...]) -> dict[str, object]:
    current: list[type[BaseModel]] = [model]
    info: FieldInfo | None = None
    for part in loc:
        if isinstance(part, int):
            continue
        info = next((candidate.model_fields[part] for candidate in current if part in candidate.model_fields), None)
        if info is None:
            return {}
        current = _models_in(info.annotation)
    if info is None:
        return {}
    return _constraints(info.annotation, list(info.metadata))

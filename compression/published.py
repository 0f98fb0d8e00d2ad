"""A directory of published super weights, shipped as data with its sources.

A coordinate is `layers[layer].mlp.down_proj.weight[row, col]`: `layer` counts decoder blocks from 0, `row` is
the hidden (output) channel, `col` the intermediate (input) channel, as Hugging Face transformers stores the
weight ([hidden, intermediate]). The entries live in `data/published_super_weights.json`, each with the
architecture it applies to and where it was published. This module reads them, picks the entry for a model's
config.json, says where detection agrees with it, and parses and bounds-checks the CLI form `L:ROW:COL,...`.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

from .errors import UserError

DATA_FILE = "published_super_weights.json"
SPEC_FORM = "LAYER:ROW:COL[,LAYER:ROW:COL...] of whole numbers >= 0, e.g. '1:788:2427,1:1384:2427'"
_WHOLE_NUMBER = re.compile(r"[+-]?\d+")


class CoordinateSpecError(UserError):
    """A super-weight list that is not of the form LAYER:ROW:COL,..."""


class CoordinateOutOfRangeError(UserError):
    """A declared super weight lies outside the model's down-projections."""


class MalformedDirectoryError(ValueError):
    """The published-super-weights JSON breaks its own format: a bug in the shipped data, not the user's input."""


class Located(Protocol):
    """Anything with a down-projection coordinate: a `Coordinate`, or a detected super weight."""

    layer: int
    row: int
    col: int


@dataclass(frozen=True, order=True)
class Coordinate:
    """`layers[layer].mlp.down_proj.weight[row, col]`: row = hidden channel, col = intermediate channel."""

    layer: int
    row: int
    col: int

    @classmethod
    def of(cls, located: Located) -> Coordinate:
        return cls(located.layer, located.row, located.col)

    def __str__(self) -> str:
        return f"layer {self.layer} [{self.row}, {self.col}]"


@dataclass(frozen=True)
class Source:
    citation: str
    where: str  # the table, section or symbol inside the source, e.g. "Table 2"
    url: str

    def __str__(self) -> str:
        return f"{self.citation}, {self.where}"


@dataclass(frozen=True)
class Dispute:
    """Another source puts the published coordinate `published` at `alternative`."""

    published: Coordinate
    alternative: Coordinate
    source: Source
    note: str


@dataclass(frozen=True)
class Architecture:
    """The config.json values an entry applies to; `vocab_size=None` leaves the vocabulary unchecked."""

    model_type: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    vocab_size: int | None = None

    def agrees(self, config: Mapping[str, Any]) -> bool:
        """True when every value given here equals the config's (top-level keys of a HF config.json)."""
        return all(config.get(key) == value for key, value in dataclasses.asdict(self).items() if value is not None)


@dataclass(frozen=True)
class PublishedEntry:
    """The super weights published for one model (and the models named with it), with their source."""

    id: str
    names: tuple[str, ...]  # Hugging Face repo ids and plain short names
    architecture: Architecture
    coordinates: tuple[Coordinate, ...]
    source: Source
    disputes: tuple[Dispute, ...] = ()
    note: str = ""

    def has_name(self, name: str) -> bool:
        """Case-insensitive, on the last path component: a repo id, a short name or a local directory."""
        return _name_key(name) in {_name_key(n) for n in self.names}

    def dispute_of(self, coordinate: Coordinate) -> Dispute | None:
        return next((d for d in self.disputes if d.published == coordinate), None)

    def dispute_for_alternative(self, coordinate: Coordinate) -> Dispute | None:
        return next((d for d in self.disputes if d.alternative == coordinate), None)


@dataclass(frozen=True)
class Agreement:
    """Detection against a published entry: each published coordinate with whether detection found it, and
    the detected coordinates the entry does not publish."""

    entry: PublishedEntry
    published: tuple[tuple[Coordinate, bool], ...]
    unpublished: tuple[Coordinate, ...]

    @property
    def exact(self) -> bool:
        """Detection found every published coordinate and nothing else."""
        return all(found for _, found in self.published) and not self.unpublished

    def describe(self) -> str:
        """One line per coordinate, e.g. "layer 1 [788, 2427]: published, detected"."""
        lines = []
        for coordinate, found in self.published:
            dispute = self.entry.dispute_of(coordinate)
            aside = f" (disputed: {dispute.source} gives {dispute.alternative})" if dispute else ""
            lines.append(f"{coordinate}: published, {'detected' if found else 'not detected'}{aside}")
        for coordinate in self.unpublished:
            dispute = self.entry.dispute_for_alternative(coordinate)
            aside = f" ({dispute.source} gives it in place of {dispute.published})" if dispute else ""
            lines.append(f"{coordinate}: detected, not published{aside}")
        return "\n".join(lines)


def load_directory(path: Path | None = None) -> list[PublishedEntry]:
    """Every entry of the directory, validated.

    Args:
        path: a JSON file of the same format; by default the one shipped in `compression/data/`.

    Raises:
        MalformedDirectoryError: naming the file and the entry (by id, else by position) and what is wrong.
    """
    where = str(path) if path is not None else DATA_FILE
    if path is not None:
        text = path.read_text(encoding="utf-8")
    else:
        text = resources.files(__package__).joinpath("data").joinpath(DATA_FILE).read_text(encoding="utf-8")
    try:
        document = json.loads(text)
    except json.JSONDecodeError as e:
        raise MalformedDirectoryError(f"{where}: not valid JSON: {e}") from e
    raw_entries = document.get("entries") if isinstance(document, dict) else None
    if not isinstance(raw_entries, list) or not raw_entries:
        raise MalformedDirectoryError(f"{where}: expected an object with a non-empty 'entries' list")
    entries = [_entry(raw, index, where) for index, raw in enumerate(raw_entries)]
    _check_unique(entries, where)
    return entries


def match(
    config: Mapping[str, Any], name: str | None = None, entries: Sequence[PublishedEntry] | None = None
) -> PublishedEntry | None:
    """The directory's entry for a model, or None.

    The rule: an entry is a candidate when every architecture value it gives (model_type, hidden_size,
    intermediate_size, num_hidden_layers, and vocab_size where known) equals the config's. Among candidates,
    the one that has `name` among its names wins (case-insensitive, on the last path component, so
    "meta-llama/Meta-Llama-3-8B", "Meta-Llama-3-8B" and "/models/meta-llama-3-8b/" all name one entry).
    Failing that, a lone candidate is returned: a fine-tune or a copy under another name usually keeps its
    base's super weights, and `agreement` then shows whether this one did. Several candidates and no name
    among them is ambiguous and gives None: Llama-7B and Llama-2-7B have equal configs (llama, hidden 4096,
    intermediate 11008, 32 layers, vocab 32000) and different super weights, so only the name can choose,
    and without a name there is no match. A name alone never matches: other sizes mean another model.

    Args:
        config: a Hugging Face config.json as a dict (top-level keys).
        name: the repo id or local path the model came from, if known.
        entries: the directory to search; by default `load_directory()`.
    """
    entries = load_directory() if entries is None else entries
    candidates = [e for e in entries if e.architecture.agrees(config)]
    if name:
        named = [e for e in candidates if e.has_name(name)]
        if named:
            return named[0]
    return candidates[0] if len(candidates) == 1 else None


def agreement(entry: PublishedEntry, found: Iterable[Located]) -> Agreement:
    """Compare detected super weights with a published entry.

    Args:
        entry: the published entry, e.g. from `match`.
        found: the detected coordinates (a `Coordinate` or anything with layer, row and col).
    """
    detected = {Coordinate.of(c) for c in found}
    published = tuple((c, c in detected) for c in entry.coordinates)
    unpublished = tuple(sorted(detected - set(entry.coordinates)))
    return Agreement(entry, published, unpublished)


def parse_coordinates(spec: str) -> list[Coordinate]:
    """Parse the CLI form `LAYER:ROW:COL,LAYER:ROW:COL`, e.g. "1:788:2427,1:1384:2427".

    Args:
        spec: comma-separated coordinates; spaces around numbers and commas are allowed.

    Raises:
        CoordinateSpecError: naming the malformed, negative or repeated piece and showing the expected form.
    """
    if not spec.strip():
        raise CoordinateSpecError(f"no super weights given: expected {SPEC_FORM}")
    coordinates: list[Coordinate] = []
    for piece in spec.split(","):
        coordinate = _parse_piece(piece.strip(), spec)
        if coordinate in coordinates:
            raise CoordinateSpecError(f"super weight {piece.strip()!r} ({coordinate}) is given twice in {spec!r}")
        coordinates.append(coordinate)
    return coordinates


def check_fits(coordinates: Iterable[Located], num_layers: int, hidden: int, intermediate: int) -> None:
    """Raise unless every coordinate lies inside a model of these sizes (down_proj.weight is [hidden, intermediate]).

    Raises:
        CoordinateOutOfRangeError: listing each coordinate outside the model and which part of it is out.
    """
    misfits = []
    for c in map(Coordinate.of, coordinates):
        reasons = [
            f"{axis} {value} not in 0-{size - 1}"
            for axis, value, size in (("layer", c.layer, num_layers), ("row", c.row, hidden),
                                      ("col", c.col, intermediate))
            if not 0 <= value < size
        ]
        if reasons:
            misfits.append(f"{c} ({', '.join(reasons)})")
    if misfits:
        raise CoordinateOutOfRangeError(
            f"super weight outside this model: {'; '.join(misfits)}. The model has {num_layers} layers and "
            f"down_proj.weight of [{hidden}, {intermediate}]: were these coordinates published for another model?"
        )


def _parse_piece(piece: str, spec: str) -> Coordinate:
    def bad(why: str) -> CoordinateSpecError:
        return CoordinateSpecError(f"bad super weight {piece!r} in {spec!r}: {why}; expected {SPEC_FORM}")

    if not piece:
        raise bad("empty (a stray comma?)")
    parts = [part.strip() for part in piece.split(":")]
    if len(parts) != 3:
        raise bad(f"{len(parts)} number{'s' if len(parts) != 1 else ''} where LAYER:ROW:COL takes 3")
    values = []
    for axis, part in zip(("LAYER", "ROW", "COL"), parts):
        if not _WHOLE_NUMBER.fullmatch(part):
            raise bad(f"{axis} {part!r} is not a whole number")
        if int(part) < 0:
            raise bad(f"{axis} {part} is negative")
        values.append(int(part))
    return Coordinate(*values)


def _name_key(name: str) -> str:
    return name.strip().replace("\\", "/").rstrip("/").rsplit("/", 1)[-1].lower()


# Reading the JSON: each helper raises MalformedDirectoryError with the field; `_entry` adds the entry's label.


def _text(obj: Mapping[str, Any], key: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value.strip():
        raise MalformedDirectoryError(f"{key!r} must be a non-empty string, not {value!r}")
    return value


def _whole(obj: Mapping[str, Any], key: str, minimum: int) -> int:
    value = obj.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise MalformedDirectoryError(f"{key!r} must be a whole number >= {minimum}, not {value!r}")
    return value


def _object(obj: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = obj.get(key)
    if not isinstance(value, dict):
        raise MalformedDirectoryError(f"{key!r} must be an object, not {value!r}")
    return value


def _list(obj: Mapping[str, Any], key: str) -> list[Any]:
    value = obj.get(key)
    if not isinstance(value, list) or not value:
        raise MalformedDirectoryError(f"{key!r} must be a non-empty list, not {value!r}")
    return value


def _coordinate(raw: Any) -> Coordinate:
    if not isinstance(raw, dict):
        raise MalformedDirectoryError(f"a coordinate must be an object with layer, row and col, not {raw!r}")
    return Coordinate(_whole(raw, "layer", 0), _whole(raw, "row", 0), _whole(raw, "col", 0))


def _source(raw: Mapping[str, Any]) -> Source:
    return Source(_text(raw, "citation"), _text(raw, "where"), _text(raw, "url"))


def _architecture(raw: Mapping[str, Any]) -> Architecture:
    unknown = set(raw) - {f.name for f in dataclasses.fields(Architecture)}
    if unknown:  # a misspelt key would silently skip a check
        raise MalformedDirectoryError(f"unknown architecture field(s) {sorted(unknown)}")
    return Architecture(
        model_type=_text(raw, "model_type"),
        hidden_size=_whole(raw, "hidden_size", 1),
        intermediate_size=_whole(raw, "intermediate_size", 1),
        num_hidden_layers=_whole(raw, "num_hidden_layers", 1),
        vocab_size=_whole(raw, "vocab_size", 1) if "vocab_size" in raw else None,
    )


def _disputes(raw_coordinates: list[Any], coordinates: Sequence[Coordinate]) -> tuple[Dispute, ...]:
    disputes = []
    for raw, coordinate in zip(raw_coordinates, coordinates):
        if "disputed" in raw:
            d = _object(raw, "disputed")
            alternative = _coordinate(_object(d, "alternative"))
            disputes.append(Dispute(coordinate, alternative, _source(_object(d, "source")), _text(d, "note")))
    return tuple(disputes)


def _entry(raw: Any, index: int, where: str) -> PublishedEntry:
    has_id = isinstance(raw, dict) and isinstance(raw.get("id"), str)
    label = f"{where}, entry {raw['id']!r}" if has_id else f"{where}, entry #{index}"
    try:
        if not isinstance(raw, dict):
            raise MalformedDirectoryError("an entry must be an object")
        names = _list(raw, "names")
        if not all(isinstance(n, str) and n.strip() for n in names):
            raise MalformedDirectoryError(f"'names' must hold non-empty strings, not {names!r}")
        raw_coordinates = _list(raw, "super_weights")
        coordinates = tuple(_coordinate(c) for c in raw_coordinates)
        if len(set(coordinates)) != len(coordinates):
            raise MalformedDirectoryError("a super weight is listed twice")
        note = raw.get("note", "")
        if not isinstance(note, str):
            raise MalformedDirectoryError(f"'note' must be a string, not {note!r}")
        entry = PublishedEntry(
            id=_text(raw, "id"),
            names=tuple(names),
            architecture=_architecture(_object(raw, "architecture")),
            coordinates=coordinates,
            source=_source(_object(raw, "source")),
            disputes=_disputes(raw_coordinates, coordinates),
            note=note,
        )
        a = entry.architecture
        alternatives = [d.alternative for d in entry.disputes]
        check_fits([*coordinates, *alternatives], a.num_hidden_layers, a.hidden_size, a.intermediate_size)
    except (MalformedDirectoryError, CoordinateOutOfRangeError) as e:
        raise MalformedDirectoryError(f"{label}: {e}") from e
    return entry


def _check_unique(entries: Sequence[PublishedEntry], where: str) -> None:
    """Ids and names (by last path component) must each belong to one entry, or `match` could not choose."""
    owners: dict[str, str] = {}
    for entry in entries:
        for key in {entry.id.lower(), *map(_name_key, entry.names)}:
            if owners.setdefault(key, entry.id) != entry.id:
                raise MalformedDirectoryError(f"{where}, entry {entry.id!r}: the name {key!r} also names "
                                              f"{owners[key]!r}")

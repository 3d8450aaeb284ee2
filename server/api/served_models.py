"""Model names: the ids a request may send in `model`, and the looping settings each stands for.

A client that can set nothing but `model` (lm-eval's log-likelihood requests, most chat UIs)
still chooses its compute: `ID@T12` runs recurrence depth 12, `ID@NAME` runs the preset NAME
(`--preset NAME=JSON`). Several aliases (`--served-model-name a b`) answer alike, as vLLM's do.
Fields a request sets itself win over what its model name stands for.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from parcae_serve.server.api.protocol import RecurrenceExitSpec
from parcae_serve.server.engine.kv_cache import LoopSlotPolicy

DEPTH_NAME = re.compile(r"T([1-9][0-9]{0,5})")
LISTED_DEPTH_MULTIPLES = (1, 2, 4)  # @T<n> listed in /v1/models for n = 1, 2, 4 and k * mu


class LoopingFields(BaseModel):
    """The request fields a model name can stand for (what a preset's JSON may hold)."""

    model_config = ConfigDict(extra="forbid")
    recurrence_depth: int | None = Field(default=None, ge=1)
    recurrence_exit: RecurrenceExitSpec | None = None
    recurrence_warm_start: bool | None = None
    kv_policy: str | None = None

    @field_validator("kv_policy")
    @classmethod
    def _known_policy(cls, value: str | None) -> str | None:
        if value is not None:
            LoopSlotPolicy.parse(value)  # ValueError with the accepted forms
        return value

    def given(self) -> dict:
        return self.model_dump(exclude_none=True)


class UnknownModel(LookupError):
    """The name is none of the served ids (404 model_not_found)."""


def parse_presets(items: list[str]) -> dict[str, LoopingFields]:
    """`NAME=JSON` items (the --preset flag) -> presets; ValueError names the bad one."""
    presets = {}
    for item in items:
        name, _, spec = item.partition("=")
        name = name.strip()
        if not name or "@" in name or DEPTH_NAME.fullmatch(name):
            raise ValueError(f"{item!r}: the name must be non-empty, without '@', and "
                             "not of the form T<n> (those names are depths)")  # fmt: skip
        try:
            presets[name] = LoopingFields.model_validate_json(spec)
        except ValidationError as err:
            raise ValueError(f"{name}: {err.errors()[0]['msg']} "
                             f"at {'.'.join(map(str, err.errors()[0]['loc']))}") from None  # fmt: skip
    return presets


@dataclass
class ServedModels:
    aliases: list[str]  # the first is the primary id
    default_depth: int
    max_depth: int
    mean_recurrence: int
    presets: dict[str, LoopingFields] = field(default_factory=dict)

    @property
    def primary(self) -> str:
        return self.aliases[0]

    def check_presets(self, can_auto: bool, can_learn: bool, kv_policy: LoopSlotPolicy) -> None:
        """Refuse, at start-up, a preset every request would get a 400 for; `kv_policy`: the
        server's, which a preset's may not need more cache slots than."""
        for name, preset in self.presets.items():
            depth, rule = preset.recurrence_depth, preset.recurrence_exit
            if depth is not None and depth > self.max_depth:
                raise ValueError(
                    f"--preset {name}: depth {depth} exceeds --max-depth {self.max_depth}"
                )
            runs_at = depth or self.default_depth
            own = None if preset.kv_policy is None else LoopSlotPolicy.parse(preset.kv_policy)
            if own is not None and not own.fits_within(kv_policy, runs_at):
                raise ValueError(
                    f"--preset {name}: kv_policy {own} needs more cache slots at depth {runs_at} "
                    f"than the server's {kv_policy} (--kv-policy)"
                )
            if rule is not None and rule.criterion == "auto" and not can_auto:
                raise ValueError(
                    f"--preset {name}: criterion auto needs calibration.json's frontier"
                )
            if rule is not None and rule.criterion == "learned" and not can_learn:
                raise ValueError(f"--preset {name}: criterion learned needs an exit probe")

    def resolve(self, name: str | None) -> LoopingFields:
        """The looping fields `name` stands for; UnknownModel if it is not served. `ID@T<n>`
        beyond --max-depth resolves (the request's depth check refuses it with 400)."""
        if name is None or name in self.aliases:
            return LoopingFields()
        base, at, suffix = name.rpartition("@")
        if not at or base not in self.aliases:
            raise UnknownModel(name)
        if match := DEPTH_NAME.fullmatch(suffix):
            return LoopingFields(recurrence_depth=int(match[1]))
        if suffix in self.presets:
            return self.presets[suffix]
        raise UnknownModel(name)

    def describe(self, name: str) -> tuple[str, str | None, dict] | None:
        """(id, parent, settings) of any name a request may use, listed or not (`alias@T<n>`
        up to --max-depth, `alias@preset`); None for a name requests are refused."""
        for entry in self.listed():
            if entry[0] == name:
                return entry
        try:
            fields = self.resolve(name)
        except UnknownModel:
            return None
        if (fields.recurrence_depth or 0) > self.max_depth:
            return None
        return name, name.rpartition("@")[0], fields.given()

    def listed(self) -> list[tuple[str, str | None, dict]]:
        """(id, parent, settings) of every name /v1/models lists: the aliases, each preset, and
        `@T<n>` for typical depths (any n up to --max-depth works)."""
        out: list[tuple[str, str | None, dict]] = [
            (alias, None, {"recurrence_depth": self.default_depth}) for alias in self.aliases
        ]
        for name, preset in self.presets.items():
            out.append((f"{self.primary}@{name}", self.primary, preset.given()))
        mu = self.mean_recurrence
        depths = sorted({*LISTED_DEPTH_MULTIPLES, mu, 2 * mu, 4 * mu})
        for depth in (d for d in depths if d <= self.max_depth):
            out.append((f"{self.primary}@T{depth}", self.primary, {"recurrence_depth": depth}))
        return out

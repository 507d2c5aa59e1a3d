"""The model registry: one JSON spec per known model in ``models/registry/``.

The exporter package reaches that folder through the ``registry`` link next to this
module (a symlink in the repository; a copy in built wheels), so
``m3-export BAAI/bge-small-en-v1.5 OUT`` needs no flags: kind, pooling,
normalisation, query instruction, max length and variants come from the spec. A spec's
``kind`` is one of the contract's ``KINDS`` and its ``outputs`` are that kind's outputs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from m3_runtime.contract import KINDS, VARIANTS

REGISTRY = Path(__file__).resolve().parent / "registry"


@dataclass(frozen=True)
class ModelSpec:
    hub_id: str
    family: str
    kind: str
    outputs: tuple[str, ...]
    pooling: str
    normalize: bool
    query_instruction: str | None
    max_length: int
    hidden_size: int
    recommended_variants: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(
                f"spec {self.hub_id}: kind must be one of {', '.join(map(repr, KINDS))}, got {self.kind!r}"
            )
        if self.outputs != KINDS[self.kind].outputs:
            raise ValueError(
                f"spec {self.hub_id}: outputs {list(self.outputs)} are not a {self.kind} model's "
                f"{list(KINDS[self.kind].outputs)}"
            )
        if self.pooling not in ("cls", "mean"):
            raise ValueError(f"spec {self.hub_id}: pooling must be 'cls' or 'mean', got {self.pooling!r}")
        bad = [v for v in self.recommended_variants if v not in VARIANTS]
        if bad:
            raise ValueError(f"spec {self.hub_id}: unknown variants {bad}")


def known_models() -> dict[str, ModelSpec]:
    """Specs keyed by lower-case hub id."""
    specs = {}
    for path in sorted(REGISTRY.glob("*.json")):
        raw = json.loads(path.read_text(encoding="utf-8"))
        spec = ModelSpec(
            **{**raw, "outputs": tuple(raw["outputs"]), "recommended_variants": tuple(raw["recommended_variants"])}
        )
        specs[spec.hub_id.lower()] = spec
    return specs


def find_spec(src: str) -> ModelSpec | None:
    return known_models().get(src.strip().lower())

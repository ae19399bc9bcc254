"""The stage names in their fixed run order: read by the config schema and by the stage registry."""

from __future__ import annotations

STAGES: tuple[str, ...] = ("sft", "eval", "merge", "infer")

"""The runtimes the pipeline knows, and the npm package each one ships as."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Provider:
    id: str
    npm_package: str


BUILTIN_PROVIDERS: tuple[Provider, ...] = (
    Provider("claude_code", "@anthropic-ai/claude-code"),
    Provider("codex", "@openai/codex"),
    Provider("gemini_cli", "@google/gemini-cli"),
)

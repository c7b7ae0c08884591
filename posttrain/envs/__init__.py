"""Environments for multi-turn RL: the `Environment` protocol (base.py), tools (tools.py), the
built-in tool-calling environment (tool_env.py) and the sessions the rollout driver steps
(session.py)."""

from posttrain.envs.base import Environment, resolve_environment
from posttrain.envs.session import EnvRunner, EnvSession
from posttrain.envs.tools import BUILTIN_TOOLS, call_tool, parse_tool_call, resolve_tool

__all__ = [
    "BUILTIN_TOOLS",
    "EnvRunner",
    "EnvSession",
    "Environment",
    "call_tool",
    "parse_tool_call",
    "resolve_environment",
    "resolve_tool",
]

"""Shared base config: every key and its default (kept in jaxdiff/defaults.py, so the installed package has it).
Experiments start from `get_config()` here and override only what differs."""

from jaxdiff.defaults import get_config

__all__ = ["get_config"]

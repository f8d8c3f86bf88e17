"""``saescope scope``: SAEs on every layer and site of a model in one command (Gemma Scope's whole-model suite).

- :mod:`~saescope.scope.config` — :class:`ScopeConfig`, ``--layers`` parsing, Gemma Scope 2's target-L0 ladder
- :mod:`~saescope.scope.run` — the stages: check, stream or cache, train, evaluate, dashboards, report, export
- :mod:`~saescope.scope.report` — the by-layer figures, table and index
"""

from saescope.scope.config import ScopeConfig, ladder_l0, parse_layers
from saescope.scope.run import run_scope

__all__ = ["ScopeConfig", "ladder_l0", "parse_layers", "run_scope"]

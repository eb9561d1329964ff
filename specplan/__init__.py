"""specplan: plan, simulate and run offloaded speculative LLM inference.

The distribution maps the repository's top-level folders (``simulator/``,
``planner/``, ``runtime/``, ``hwprofiles/``) to subpackages of ``specplan``.
Installed (wheel or editable) that mapping is done by the installer; when the
source tree itself is first on ``sys.path`` (``python -m ...`` from the repo root)
the loop below lets ``specplan.simulator`` resolve to the sibling folder.
"""

from pathlib import Path as _Path

__version__ = "0.1.0"

_SUBPACKAGES = ("simulator", "planner", "runtime", "hwprofiles")
_root = _Path(__file__).resolve().parent.parent
if (_root / "pyproject.toml").is_file() and all((_root / s / "__init__.py").is_file() for s in _SUBPACKAGES):
    __path__.append(str(_root))  # type: ignore[name-defined]

"""Imported first by ``llamactl``: msgspec without typing_extensions, about 10 ms less start-up.

msgspec uses typing_extensions only for ``get_type_hints``, ``Required`` and
``NotRequired``, which ``typing`` has, identical, on Python 3.11 and later, and
falls back to them when that import fails; typing_extensions itself imports
``inspect``. The import is blocked only while msgspec is being imported, and
not at all in a process that has either module already.
"""

from __future__ import annotations

import sys

if "msgspec" not in sys.modules and "typing_extensions" not in sys.modules:
    sys.modules["typing_extensions"] = None  # type: ignore[assignment]
    try:
        import msgspec  # noqa: F401
    finally:
        del sys.modules["typing_extensions"]

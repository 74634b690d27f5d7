"""mkdocs hooks: show the docstrings' Sphinx roles as plain code in the API reference.

The docstrings are written for ``help()`` and Sphinx (``:meth:`load```), which
mkdocstrings leaves as text; this drops the role and keeps the code.
"""

from __future__ import annotations

import re
from typing import Any

_ROLE = re.compile(r":(?:py:)?(?:meth|class|attr|func|exc|data|mod|obj|const):(<code>)~?")


def on_page_content(html: str, **_: Any) -> str:
    return _ROLE.sub(r"\1", html)

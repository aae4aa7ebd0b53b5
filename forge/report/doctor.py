"""The pre-flight section of ``forge report``: the checks ``forge train`` ran (``doctor.json``).

Read as plain JSON here (the report needs nothing from :mod:`forge.doctor`), one table row per
check, FAIL and WARN first in colour.

Example:
    >>> doctor_section(Path("outputs/demo"))   # '' when the run recorded no checks
    '<h2>Pre-flight checks</h2><table>...'
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from forge.core.paths import DOCTOR_FILE

_COLOURS = {"OK": "#2ca02c", "WARN": "#ff7f0e", "FAIL": "#d62728"}


def doctor_section(run_dir: str | Path) -> str:
    """HTML for the run's ``doctor.json``, or ``""`` when it has none (or it cannot be read)."""
    try:
        checks = json.loads((Path(run_dir) / DOCTOR_FILE).read_text(encoding="utf-8"))["checks"]
    except (OSError, ValueError, KeyError, TypeError):
        return ""
    esc = html.escape
    rows = []
    for check in checks:
        status = str(check.get("status", ""))
        colour = _COLOURS.get(status, "#222")
        details = "".join(f"<br><code>{esc(str(d))}</code>" for d in check.get("details") or [])
        rows.append(f"<tr><td style='color:{colour};font-weight:bold'>{esc(status)}</td>"
                    f"<td>{esc(str(check.get('name', '')))}</td>"
                    f"<td>{esc(str(check.get('message', '')))}{details}</td></tr>")
    return (f"<h2 id='doctor'>Pre-flight checks</h2><p>From <code>{DOCTOR_FILE}</code>: what "
            "<code>forge train</code> checked before it loaded the model.</p>"
            f"<table><tr><th>status</th><th>check</th><th>finding</th></tr>{''.join(rows)}</table>")

"""AlphaEdit (Fang et al., ICLR 2025): MEMIT-seq under the null-space projection (projection.py).

Without the projection (`--no-project`) it is MEMIT-seq; with it, the same closed form every
method gets under `--project`. Followed: AlphaEdit/AlphaEdit_main.py L130-148 (jianghoucheng/AlphaEdit).
"""

from __future__ import annotations

from .base import Method
from .memit import sequential_ridge_solve

METHODS = (
    Method("alphaedit", "AlphaEdit: MEMIT-seq with the update projected onto the null space of the preserved keys (Fang et al. 2025)",
           "AlphaEdit/AlphaEdit_main.py L130-148 (jianghoucheng/AlphaEdit)", sequential_ridge_solve,
           projected_by_default=True, reads_preserved=True),
)

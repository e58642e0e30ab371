"""GitHub tables from pandas frames, for the README's rendered blocks."""
from __future__ import annotations

from typing import Any

import pandas as pd


def _escape_pipes(value: Any) -> Any:
    return value.replace("|", r"\|") if isinstance(value, str) else value


def markdown_table(frame: pd.DataFrame, index: bool = True) -> str:
    """A GitHub table of ``frame``; a ``|`` in a cell, label or axis name is escaped, since a
    bare one ends the cell there (``dorefa | pact | lsq`` would show as ``dorefa``). Cells are
    written as they are (``"4.30"`` stays ``4.30``, not ``4.3``)."""
    frame = (frame.map(_escape_pipes).rename(index=_escape_pipes, columns=_escape_pipes)
             .rename_axis(index=_escape_pipes, columns=_escape_pipes))
    return frame.to_markdown(index=index, disable_numparse=True)

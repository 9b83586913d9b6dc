"""Reading build context back: the pipelines and the tasks of one pipeline, as dataframes."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from ..config import Config, load_config
from ..errors import QueryError
from ..query import query

if TYPE_CHECKING:
    import pandas as pd

_PIPELINE_ID = re.compile(r"^[0-9a-zA-Z_-]{1,64}$")


def list_pipelines(limit: int = 50, config: Config | None = None) -> pd.DataFrame:
    """Recorded pipeline invocations, newest first, with task counts by status."""
    return query(
        "SELECT p.pipeline_id, p.tool, datetime(p.started, 'unixepoch', 'localtime') AS started, "
        "round(coalesce(p.ended, p.started) - p.started, 3) AS seconds, p.status, p.exit_code, "
        "count(t.task) AS tasks, "
        "sum(t.status = 'executed') AS executed, sum(t.status = 'up-to-date') AS up_to_date, "
        "sum(t.status = 'failed') AS failed, p.argv "
        "FROM pipelines p LEFT JOIN tasks t ON t.pipeline_id = p.pipeline_id "
        "GROUP BY p.pipeline_id ORDER BY p.started DESC LIMIT ?",
        (limit,),
        config=config or load_config(),
    )


def resolve_pipeline(pipeline: str | None, config: Config) -> str:
    """The full id of the pipeline ``pipeline`` (an id or unique prefix); the latest when None.

    :raises QueryError: when there is no such pipeline or the prefix is ambiguous.
    """
    if pipeline is None:
        frame = query("SELECT pipeline_id FROM pipelines ORDER BY started DESC LIMIT 1", config=config)
        if frame.empty:
            raise QueryError("No pipeline recorded yet; run 'doit' or 'make' in a project set up with 'flordb-build init'.")
        return str(frame.iloc[0, 0])
    if not _PIPELINE_ID.match(pipeline):
        raise QueryError(f"'{pipeline}' is not a pipeline id; list them with 'flordb-build pipelines'.")
    frame = query(
        "SELECT pipeline_id FROM pipelines WHERE substr(pipeline_id, 1, ?) = ? LIMIT 3",
        (len(pipeline), pipeline),
        config=config,
    )
    if frame.empty:
        raise QueryError(f"No pipeline '{pipeline}'; list them with 'flordb-build pipelines'.")
    if len(frame) > 1:
        raise QueryError(f"Pipeline id prefix '{pipeline}' is ambiguous; give more characters.")
    return str(frame.iloc[0, 0])


def list_tasks(pipeline: str | None = None, config: Config | None = None) -> pd.DataFrame:
    """The tasks of one pipeline (the latest by default) in the order they finished."""
    config = config or load_config()
    pipeline_id = resolve_pipeline(pipeline, config)
    return query(
        "SELECT t.task, t.status, round(t.seconds, 3) AS seconds, t.reason, "
        "substr(t.error, 1, instr(t.error || char(10), char(10)) - 1) AS error, "
        "(SELECT count(*) FROM runs r WHERE r.pipeline_id = t.pipeline_id AND r.task = t.task) AS runs "
        "FROM tasks t WHERE t.pipeline_id = ? ORDER BY t.ended, t.task",
        (pipeline_id,),
        config=config,
    )

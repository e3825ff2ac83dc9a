"""Studies: every combination of students, teachers, methods and seeds, stored run by run and resumable.

The parts: :mod:`.config` (the typed config and the runs it plans), :mod:`.sources` (where the
images come from), :mod:`.store` (the SQLite file), :mod:`.runner` (planning, the search, recording),
:mod:`.executors` (in this process, or on Ray), :mod:`.export` (CSV, JSONL, DataFrame) and :mod:`.compare` (two
methods head to head).
"""

from ..data.base import stratified_split
from .config import DataConfig, MethodConfig, SearchConfig, StudyConfig
from .plan import CONTROL_PREFIX, RunSpec, setting_label
from .executors import LocalExecutor, RayExecutor, RunOutcome, execute_run
from .compare import compare_methods
from .export import LEADING_COLUMNS, compare_with_controls, failed_runs, flat_row, load_records, load_results, records_to_csv
from .runner import Study
from .sources import DATA_SOURCES, StudyData, register_data_source
from .store import CONFIG_FILE, DB_FILE, LABELS_KEY, LOCK_FILE, PHASES, PREDICTIONS_DIR, STATUSES, StudyError, StudyStore, study_records

__all__ = [
    "CONFIG_FILE", "CONTROL_PREFIX", "DATA_SOURCES", "DB_FILE", "DataConfig", "LABELS_KEY", "LEADING_COLUMNS", "LOCK_FILE", "LocalExecutor",
    "MethodConfig", "PHASES", "PREDICTIONS_DIR", "RayExecutor", "RunOutcome", "RunSpec", "STATUSES", "SearchConfig", "Study", "StudyConfig",
    "StudyData", "StudyError", "StudyStore", "compare_methods", "compare_with_controls", "execute_run", "failed_runs", "flat_row", "load_records", "load_results",
    "records_to_csv", "register_data_source", "setting_label", "stratified_split", "study_records",
]

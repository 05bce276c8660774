"""Training monitors: per-step values computed in the jitted step (``step_metrics``), the
loop's ``Monitor`` (records, streaming AUC, timing split, anomaly action), and the writers
(JSONL, TensorBoard)."""

from jaxrec.monitoring.auc import binned_auc, tie_bound
from jaxrec.monitoring.hot_rows import hot_row_share
from jaxrec.monitoring.memory import memory_in_use
from jaxrec.monitoring.monitor import AnomalyStop, Monitor, MonitorOptions
from jaxrec.monitoring.step_metrics import StepMonitors
from jaxrec.monitoring.writers import JsonlWriter, TensorBoardWriter, Writers

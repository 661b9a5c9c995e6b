"""Tracking: the only code that talks to MLflow.

- `tracking.store`: where runs go (embedded SQLite default or an http(s) server), experiments, the
  sweep's parent run, finding a job's run, closing runs of killed workers.
- `tracking.tracker.JobTracker`: used inside a worker to log one job (step curves, params, metrics,
  system metrics, datasets, predictions, the adapter), then register the adapter.
- `tracking.registry`: a registered model per task, the `champion` alias, `promote`, and
  `load_adapter_model`, the one function that loads a logged adapter back into a PeftModel.
- `tracking.report`: the leaderboard, plots and the study's heuristics analysis (`loraland report`); its charts
  are drawn by `tracking.charts`.
- `tracking.cards`: the task card a fine-tune's run publishes (its task entry, input fields, evaluation rows), which
  the page reads.
- `tracking.heuristics`: task-complexity heuristics (pure functions).
- `tracking.ui`: `loraland ui` (the MLflow UI on the embedded store).
- `tracking.server`: `mlflow server` processes: the command, start, wait for `/health`, stop the whole tree.
- `tracking.retry`: retries with exponential back-off (tenacity) around every tracking call.

Submodules are imported on demand (MLflow takes seconds to import); nothing is re-exported here.
"""

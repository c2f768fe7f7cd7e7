"""A training run's directory as a transaction.

- `directory`: the files of a run, their names and the states they add up to;
- `lock`: one writer per run directory;
- `metrics_file`: metrics.jsonl, appended per record, kept up to the checkpoint on resume;
- `resume`: what a `--resume` may change and what it may not;
- `transaction`: one run's writes, from the checks to the published adapter;
- `disk`: a full disk as a one-line error.

The modules are imported by name (`from lora_dpo.run.directory import RunDirectory`): this
package imports nothing itself, so `report` and `merge` can ask a RunDirectory without
pulling in the training stack.
"""

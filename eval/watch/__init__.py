"""Samples and benchmark scores for every checkpoint of a training run, computed off the training GPUs, at any size:

    [torchrun --nproc-per-node K] -m eval.watch --run-dir R --task shapes [eval.generate flags] [scorer flags]
        [--interval S] [--until-step N | --once] [--text-tokenizer T --image-tokenizer I] [--stale-after S]

For each new complete checkpoint (`training.checkpoint.complete_checkpoints`, oldest step first):
1. rank 0 claims it and exports its EMA weights to an official T2I folder under `<run_dir>/watch/<task>/step_X/model`
   through the engine that wrote it (`EngineBase.export_checkpoint`: megatron's streaming export, DeepSpeed's
   model + EMA), in a child process (megatron's tools start their own process group; the memory goes back after);
   the tokenizers are the run config's `model.text_tokenizer` / `model.image_tokenizer` unless flags name others;
2. every rank generates its share of the task's fixed prompt set with per-image seeds (`eval.generate.generate`,
   in-process; the generation flags are eval.generate's, resolved for the exported folder);
3. rank 0 scores it with the benchmark's own scorer (`Benchmark.score`, the `BENCHMARKS` registry), draws a captioned
   grid `<run_dir>/samples/watch_<step>.png`, logs both to the run's wandb run, then appends the row
   `{"step": S, "watch/score": ..., "watch/checkpoint": "step_X", "watch/task": ..., "watch/<metric>": ...}` to
   `<run_dir>/metrics.jsonl` with one `os.write` on an O_APPEND descriptor (the trainer appends there too; on NFS,
   appends from two machines are not atomic with each other: keep the run folder on a filesystem that honours
   O_APPEND, or read the watcher's rows from the wandb run), and deletes the scratch folder.

Resuming: the metrics.jsonl row is the record that a checkpoint is done, checked before evaluating it, so a watcher
killed at any point and started again never evaluates a checkpoint twice (one watcher per run and task: it holds
`<run_dir>/watch/<task>/.lock`, which the kernel drops however it dies); an export it finished (`model/`, renamed
into place when complete) and the prompts it generated are reused. A checkpoint whose export or scoring fails is
printed, counted and listed in `<run_dir>/watch/<task>/failed.jsonl`, and not retried (delete its line to retry).

Keeping checkpoints (training.checkpoint_readers): rank 0 registers in `<run_dir>/watch/readers/<task>.json` with a
heartbeat; the trainer's keep-last-N keeps every checkpoint this watcher has not exported yet while the heartbeat is
younger than `--stale-after` (a dead watcher is ignored after that), and deletion is race-free with the claim this
watcher makes before it reads a checkpoint. Only the shared filesystem connects the two (a DeepSpeed run's model is
built from its dataset's manifest, so that node reads `data.data_dir` too): the watcher may run on another node
(`python -m cluster.slurm|k8s|ray_cluster watch`).

wandb: the same run id (`<run_dir>/wandb_id.txt`, written by training/logger.py) and project, mode as the run's
`logging.wandb` ("auto": online with WANDB_API_KEY, else offline). A second process cannot append to a run another
process holds open: resume="allow" alone makes the two writers' `_step` counters collide, and `wandb.log(step=S)`
below the trainer's current step is dropped. So online the watcher joins in wandb's "shared" mode (made for several
writers of one run: `x_primary=False` leaves the run's files and config to the trainer, `x_update_finish_state=False`
leaves its state alone, `x_label="watch"`), offline it writes its own offline run folder under the same id under
`<run_dir>/watch/<task>/wandb/` (`wandb sync` uploads it into the run with the trainer's). Either way the rows carry
`watch/step` and `define_metric("watch/*", step_metric="watch/step")` plots them at the checkpoint's step, whatever
`_step` wandb gives them. Each checkpoint is one short init / log / finish, so its entry is on disk (or sent) before
its metrics.jsonl row: a crash in between at most repeats it, and offline not even that (the offline folder of
that step is read back first). Shared mode accepts no `step=` argument, hence `watch/step` rather than `step=`.
"""

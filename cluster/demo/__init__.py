"""`make demo`: the whole system end to end on the built-in shapes data, on one machine (2 CPU cores suffice).

Each stage runs a real entry point exactly as a user runs it on a cluster (a subprocess per stage):

  data       python -m data_pipeline.shapes                     captioned 32x32 shape scenes as webdataset tars
  tokenizer  torchrun --nproc-per-node N -m training.train      tiny binary tokenizer (model.kind=tokenizer), DeepSpeed
  text       models.t2i.text_tokenizer.build_chat_tokenizer     small BPE with the Qwen3 special tokens
  tokenize   python -m data_pipeline.tokenize                   Ray Data job on a local Ray -> binary-token shards
  train      torchrun --nproc-per-node N -m training.train      tiny text-to-image BitDance, P=4, DeepSpeed
  sample     torchrun --nproc-per-node N -m eval.generate       the shapes-benchmark prompts
  score      eval.shapes_seeds.score_seeds                      per-tag accuracy next to chance and the ceiling
  report     <out>/report.md                                    scores, sample grid, loss curve, figures, timings

N is one process per GPU (NCCL; training in bf16 under ZeRO-1), else 2 CPU processes (gloo; the YAMLs' fp32).
With `distill=true` three more stages distil the P=4 model into a P=16 student and add a teacher-vs-student table
(time per image and score). With `finetune=true` the base data holds out `finetune_concept` (a colour-shape pair) and
five more stages teach it back by LoRA and by full fine-tuning, with a base / LoRA / full table (the concept's score,
the other tags', trainable parameters, seconds). The score is the mean and spread over `seeds` benchmark seeds, next
to chance and to the image tokenizer's ceiling. Re-running reuses finished stages; a stage whose settings or inputs
changed runs again (from scratch), and an interrupted training stage resumes from its last checkpoint.

Modules: `config` (DemoConfig), `launch` (processes and GPU settings of this machine), `stage` (a stage and how it
runs a command), `stages` (the base stages), `distill` (the distillation stages), `finetune` (the fine-tuning
stages), `runner` (fingerprints, reuse, the run), `report` (<out>/report.md); `__main__` is
`python -m cluster.demo KEY=VALUE ...`.
"""

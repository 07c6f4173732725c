"""Memory and layout planner for the megatron text-to-image model: per-stage GPU memory and estimated step time of
every TP/PP/VPP/recompute layout a cluster allows, and the `torchrun` command of the fastest layout that fits.

    python -m cluster.plan --model 14B-16x --gpus 64 --gpu-mem 141 --token-budget 37376 [--gpus-per-node 8]
        [--micro-batches N] [--top K] [--markdown]
    python -m cluster.plan --report cluster/PLAN_14B.md     # the 14B tables: 8 x H200 and H100 nodes, fine-tuning
    python -m cluster.plan --finetune lora|head [--lora-rank R] [--offload none|optimizer|params] [--gpus N]
        [--gpu-mem GiB] [--zero-stage S]                     # fine-tuning memory per GPU and in host memory

`memory`: what one GPU of each pipeline stage holds (weights, gradients, optimizer and EMA shards, activations, the
heads, backward working memory); `search`: the candidate layouts (the engine's own `ParallelSettings`, uneven
`pp_layers` splits included, checked by `validate_parallel` and the loop's `grad_accumulation`) and the step time;
`report`: the tables, the best layout's command and cluster/PLAN_14B.md; `finetune`: a LoRA / head-only / full
fine-tuning run under the DeepSpeed engine (frozen base, ZeRO, CPU offload), `finetune_report` its tables;
`inference`: sampling memory; `__main__`: the command line.
"""

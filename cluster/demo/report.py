"""The demo's report: <out>/report.md with the per-tag scores next to chance, a captioned sample grid, the loss
curves, the tokenizer's reconstruction quality, throughput, stage timings and where the wandb offline run lives."""

from __future__ import annotations

import json
from pathlib import Path

from eval.plots import line_plot, read_metrics
from eval.report import captioned_grid
from eval.shapes_seeds import benchmark_section, fmt, mean_sd


def graded_cells(samples: Path, limit: int) -> list[tuple[Path, str]]:
    """First-image cells of the first `limit` prompts, spread over the tags, captioned with the scorer's verdict."""
    verdict = {}
    results = samples / "shapes_results.jsonl"
    if results.is_file():
        for line in results.read_text().splitlines():
            r = json.loads(line)
            verdict[(r["index"], r["sample"])] = r["correct"]
    by_tag: dict[str, list[tuple[Path, str]]] = {}
    for meta in sorted(samples.glob("*/metadata.jsonl")):
        spec = json.loads(meta.read_text().splitlines()[0])
        mark = {True: "[pass] ", False: "[fail] "}.get(verdict.get((int(meta.parent.name), 0)), "")
        by_tag.setdefault(spec.get("tag", ""), []).append((meta.parent / "samples" / "0000.png", mark + spec["prompt"]))
    cells, k = [], 0
    while len(cells) < limit and any(k < len(v) for v in by_tag.values()):
        cells += [v[k] for v in by_tag.values() if k < len(v)]
        k += 1
    return cells[:limit]


def distill_section(cfg, ev: dict, done: dict) -> list[str]:
    """Teacher vs student: AR steps, time per image (latency and batched; one process, same prompts and settings)
    and score."""
    rows, teacher = ev["rows"], ev["rows"]["teacher"]
    batched = ev["batches"]["throughput"]
    lines = [
        "## Distillation",
        "",
        f"The P={teacher['P']} model distilled into a P={rows['student']['P']} student "
        f"({cfg.distill_steps} steps from the teacher's weights, `model.init_from`; "
        f"{done['distill']['seconds']:.0f} s). Time per image: {ev['speed_images']} prompts sampled and decoded "
        f"by each model in one process ({max(1, cfg.nproc)} threads), {cfg.sampling.steps} head steps, CFG; "
        f"latency one image at a time (the paper's seconds per image), batched {batched} images per call. "
        "Score: the benchmark above, same seeds.",
        "",
        f"| model | P | AR steps per image | latency s / image | speed | s / image, batch {batched} | speed | "
        "score (mean ± sd) | score vs teacher |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in rows.items():
        ratio = r["score"] / teacher["score"] if teacher["score"] else float("nan")
        lines.append(
            f"| {name} | {r['P']} | {r['ar_steps']} | {r['s_per_image']:.4f} | "
            f"{teacher['s_per_image'] / r['s_per_image']:.2f}x | {r['s_per_image_batched']:.4f} | "
            f"{teacher['s_per_image_batched'] / r['s_per_image_batched']:.2f}x | {mean_sd(r['score'], r['sd'])} | "
            f"{ratio:.0%} |"
        )
    lines += [
        "",
        f"Target: >= 3x faster ({'met' if ev['speedup'] >= 3 else 'not met'}: {ev['speedup']:.2f}x latency; "
        f"{ev['speedup_batched']:.2f}x at batch {batched}, where the CPU is compute-bound and the head's work per "
        "token does not depend on P) with >= 90% of the teacher's score "
        f"({'met' if ev['score_ratio'] >= 0.9 else 'not met'}: {ev['score_ratio']:.0%}).",
        "",
    ]
    return lines


FT_STAGES = ("ft_data", "ft_tokenize", "ft_lora", "ft_full", "ft_eval")  # the stages finetune=true adds


def finetune_section(cfg, ev: dict, done: dict) -> list[str]:
    """Base vs LoRA vs full fine-tune on the held-out concept: its score, every other tag's, trainable parameters and
    stage seconds; then the acceptance figures."""
    rows, concept = ev["rows"], ev["concept"]
    tags = list(rows["base"]["per_tag"])
    other = {m: sum(r["per_tag"].values()) / len(tags) for m, r in rows.items()}
    runs = {"base": "train", "lora": "ft_lora", "full": "ft_full"}  # the stage that trained each row
    params = {m: done[s]["result"].get("trainable_params") for m, s in runs.items()}
    seconds = {m: done[s]["seconds"] for m, s in runs.items()}
    names = {"base": "base (concept held out)", "lora": f"LoRA r={cfg.finetune_lora_rank}", "full": "full fine-tune"}
    lines = [
        "## Fine-tuning a held-out concept",
        "",
        f"The concept is **{concept}**; the base's text-to-image data holds out every **{ev['held_out']}** object "
        "(the image tokenizer learns from every scene), so the base cannot compose the concept from what it saw (with "
        "the pair alone held out it draws it from its colour and shape seen apart). "
        f"{cfg.finetune_samples} scenes with the concept as their subject, mixed 50/50 with the base tokens, teach "
        f"it to the base export in {cfg.finetune_steps} steps: LoRA adapters (`finetune.method=lora`, sampled "
        "unmerged with `eval.generate --lora`) and, for comparison, full fine-tuning on the same data and steps. "
        f"Concept score: {rows['base']['concept']['prompts']} prompts naming it (one, two, three of it, and as the "
        f"subject of a relation; colours checked), at every benchmark seed (chance {ev['concept_chance']:.3f}); the "
        f"other columns: the benchmark's prompts of the same seeds that do not name {ev['held_out']} ('other tags': "
        "their mean).",
        "",
        f"| model | {concept} (mean ± sd) | " + " | ".join(tags) + " | other tags | trainable params | stage s |",
        "| --- " * (len(tags) + 5) + "|",
    ]
    for m, r in rows.items():
        cells = " | ".join(fmt(r["per_tag"][t], ".3f") for t in tags)
        c = r["concept"]
        n = f"{params[m]:,}" if params[m] else "all (trained from scratch)"
        lines.append(
            f"| {names[m]} | {mean_sd(c['score'], c['sd'])} | {cells} | {other[m]:.3f} | {n} | {seconds[m]:.0f} |"
        )
    base, lora = rows["base"]["concept"]["score"], rows["lora"]["concept"]["score"]
    chance_ok = lora >= 2 * ev["concept_chance"]
    change = other["lora"] / other["base"] - 1 if other["base"] else float("nan")
    added = sum(done[s]["seconds"] for s in FT_STAGES)
    lines += [
        "",
        f"Targets: the adapter at least doubles the concept's score ({'met' if lora >= 2 * base else 'not met'}: "
        f"{base:.3f} -> {lora:.3f}) and reaches 2x chance ({'met' if chance_ok else 'not met'}); "
        f"the other tags lose at most 10% relative ({'met' if change >= -0.1 else 'not met'}: {change:+.1%}); "
        f"the added stages take at most 4 minutes ({'met' if added <= 240 else 'not met'}: {added:.0f} s).",
        "",
    ]
    return lines


def watch_section(rows: list[dict], cfg) -> list[str]:
    """The checkpoint watcher's score of every checkpoint (`python -m eval.watch` beside the training run)."""
    if not rows:
        return []
    lines = [
        f"Checkpoint watcher (`python -m eval.watch`, beside the training run): the shapes benchmark on "
        f"{cfg.watch_per_tag} prompts per tag, one image each, at every checkpoint (grids: `t2i/samples/watch_*.png`; "
        "scores in metrics.jsonl and the wandb run):",
        "",
        "| step | " + " | ".join(str(r["step"]) for r in rows) + " |",
        "| --- | " + " | ".join("---" for _ in rows) + " |",
        "| score | " + " | ".join(fmt(r["score"], ".3f") for r in rows) + " |",
        "",
    ]
    return lines


def _wandb_run(run_dir: Path) -> str:
    runs = sorted((run_dir / "wandb").glob("offline-run-*")) + sorted((run_dir / "wandb").glob("run-*"))
    return str(runs[-1]) if runs else "none (logging.wandb disabled)"


def write_demo_report(cfg, out: Path, done: dict[str, dict]) -> Path:
    res = {name: d["result"] for name, d in done.items()}
    score, tok, train = res["score"], res["tokenizer"], res["train"]
    lines = [
        "# BitDance demo report",
        "",
        f"Text-to-image BitDance (`{Path(cfg.t2i_config).name}`, P=4 next-patch decoding) trained on "
        f"{res['data']['samples']} generated {res['data']['size']} shape scenes, end to end on this machine. "
        "Re-create with `make demo` (finished stages are reused).",
        "",
    ]
    lines += benchmark_section(score, cfg.images_per_prompt, cfg.sampling)
    cells = graded_cells(out / "samples" / "seed_0", cfg.grid_images)
    if cells:
        captioned_grid(cells, columns=6).save(out / "samples_grid.png")
        lines += [
            "## Samples",
            "",
            "First image of each prompt, with the scorer's verdict:",
            "",
            "![samples](samples_grid.png)",
            "",
        ]
    curves = read_metrics(out / "t2i" / "metrics.jsonl", ("loss", "loss/vision", "loss/text_ce", "val/loss"))
    line_plot(
        curves,
        out / "loss_curve.png",
        title="text-to-image loss (0.01 x text CE + vision; val/loss: held-out set), log scale",
        log_y=True,
    )
    tok_curves = read_metrics(out / "tokenizer" / "metrics.jsonl", ("loss/rec",))
    line_plot(tok_curves, out / "tokenizer_curve.png", title="tokenizer L1 reconstruction loss, log scale", log_y=True)
    lines += [
        "## Training",
        "",
        "![loss curve](loss_curve.png)",
        "",
        f"Final loss {fmt(train['final_loss'], '.4f')} after {train['steps']} steps on {cfg.nproc} processes; "
        f"held-out validation loss {fmt(train.get('val_loss'), '.4f')} ({res['tokenize'].get('val_samples', 0)} "
        f"samples held out at tokenization, evaluated {train.get('val_steps', 0)} times).",
        "",
        *watch_section(train.get("watch", []), cfg),
        "![tokenizer curve](tokenizer_curve.png)",
        "",
        f"Binary tokenizer ({tok['steps']} steps): held-out reconstruction "
        f"**PSNR {fmt(tok['psnr'], '.2f')} dB**, "
        f"SSIM {fmt(tok['ssim'], '.4f')}.",
        "",
    ]
    tk, sm = done["tokenize"], done["sample"]
    lines += [
        "## Throughput (this machine)",
        "",
        "| stage | figure |",
        "| --- | --- |",
        f"| text-to-image training | {fmt(train['tokens_per_s'], '.0f')} tokens/s, "
        f"{fmt(train['samples_per_s'], '.1f')} images/s ({cfg.nproc} processes) |",
        f"| Ray tokenization | {fmt(res['tokenize']['samples'] / tk['seconds'], '.1f')} images/s "
        f"(whole stage, Ray start included) |",
        f"| tokenizer training | {fmt(tok['steps'] / done['tokenizer']['seconds'], '.2f')} steps/s (whole stage) |",
        f"| sampling (P=4, {cfg.sampling.steps} head steps, CFG) | {fmt(res['sample']['images_per_s'], '.2f')} "
        f"images/s over {cfg.nproc} processes; {fmt(sm['seconds'], '.1f')} s |",
        "",
    ]
    if "distill_eval" in res:
        lines += distill_section(cfg, res["distill_eval"], done)
    if "ft_eval" in res:
        lines += finetune_section(cfg, res["ft_eval"], done)
    lines += ["## Stage timings", "", "| stage | seconds | |", "| --- | --- | --- |"]
    for name, d in done.items():
        lines.append(f"| {name} | {d['seconds']:.1f} | {'reused from an earlier run' if d.get('reused') else ''} |")
    lines += [f"| **total** | **{sum(d['seconds'] for d in done.values()):.1f}** | |", ""]
    lines += [
        "## Where things are",
        "",
        f"- wandb offline run: `{_wandb_run(out / 't2i')}` (upload with `wandb sync <dir>`); tokenizer run: "
        f"`{_wandb_run(out / 'tokenizer')}`",
        f"- metrics: `{out / 't2i' / 'metrics.jsonl'}`; checkpoints: `{out / 't2i' / 'checkpoints'}`",
        f"- exported model (official T2I folder layout): `{train['export']}`",
        f"- binary-token shards: `{res['tokenize']['tokens']}`; samples and per-image verdicts: "
        f"`{out / 'samples'}`; stage logs: `{out / 'logs'}`",
        "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path

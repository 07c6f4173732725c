"""Parquet files (`--source parquet`): one shard per `.parquet`, a sample per row (an image column of bytes or Hugging
Face `{"bytes", "path"}` structs, a caption column, optional numeric score columns)."""

from __future__ import annotations

from collections.abc import Iterator

from data_pipeline.sources.base import InputShard, RawSample, Source
from data_pipeline.sources.samples import captioned


class ParquetSource(Source):
    looks_for = ".parquet files"
    scores_need_columns = True

    def list_shards(self) -> list[InputShard]:
        return self.shard_per_file(".parquet")

    def iter_samples(self, shard: InputShard, need_caption: bool) -> Iterator[RawSample]:
        import pyarrow.parquet as pq

        cfg = self.cfg
        try:
            pf = pq.ParquetFile(shard.path, filesystem=self.fs)
            columns = [cfg.image_column, cfg.caption_column, *cfg.score_columns]
            missing = set(columns) - set(pf.schema_arrow.names)
            if missing:
                have = pf.schema_arrow.names
                raise ValueError(
                    f"columns {sorted(missing)} not in {have}; set --image-column/--caption-column/--score-columns"
                )
            row = 0
            for batch in pf.iter_batches(columns=columns, batch_size=256):
                cells = [batch.column(i).to_pylist() for i in range(len(columns))]
                for image, caption, *numbers in zip(*cells, strict=True):
                    if isinstance(image, dict):  # Hugging Face datasets' Image feature: {"bytes", "path"}
                        image = image.get("bytes")
                    key = f"{shard.name}/{row:08d}"
                    row += 1
                    if not image:
                        yield RawSample(key, error="missing_image")
                    elif len(image) > cfg.max_member_bytes:
                        yield RawSample(
                            key, error="member_too_large", detail=f"{len(image)} bytes > {cfg.max_member_bytes}"
                        )
                    elif caption is None:
                        yield RawSample(key, error="missing_caption")
                    else:
                        scores = {c: float(v) for c, v in zip(cfg.score_columns, numbers, strict=True) if v is not None}
                        yield captioned(key, image, str(caption), None, True, scores)
        except (OSError, ValueError) as e:
            yield RawSample(shard.name, error="unreadable_shard", detail=f"{type(e).__name__}: {e}")

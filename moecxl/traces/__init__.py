"""Router traces: the schema, `collect` (prefill forwards + greedy `generate`), reading, and statistics.

One module per concept: `schema` (the row schema, reading and validating a trace directory), `plan`
(documents cut into framed prompts), `collector` (a model's routing over a batch as rows), `collection`
(`collect`: shards, metadata, resuming), `statistics` (popularity, entropies, reuse), `plots` (figures and
`stats`), `cli`. The names below are this package's API; import them from `moecxl.traces`.

    python -m moecxl.traces collect --model DIR --corpus mixed --split test --tokens 100000 --out DIR
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m moecxl.traces collect ... --data-parallel 8
    python -m moecxl.traces stats DIR --out DIR
"""

from moecxl.traces.cli import main
from moecxl.traces.collection import RUN_ONLY_ARGS, collect, layer_names, model_hash, sketch_projection
from moecxl.traces.plan import TraceSeq, plan_sequences
from moecxl.traces.plots import plot_stats, stats
from moecxl.traces.schema import (
    METADATA,
    PHASES,
    REQUIRED_METADATA,
    SCHEMA_VERSION,
    SHARD_GLOB,
    TraceError,
    TraceSet,
    features,
    read_metadata,
    read_traces,
    rows_table,
)
from moecxl.traces.statistics import (
    compute_stats,
    conditional_entropy_bits,
    entropy_bits,
    layer_entropies,
    popularity,
    previous_token,
    reuse_distances,
    routing_entropy,
    set_symbols,
    temporal_entropies,
    transition_matrix,
    tv_distance,
)

__all__ = [
    "METADATA",
    "PHASES",
    "REQUIRED_METADATA",
    "RUN_ONLY_ARGS",
    "SCHEMA_VERSION",
    "SHARD_GLOB",
    "TraceError",
    "TraceSeq",
    "TraceSet",
    "collect",
    "compute_stats",
    "conditional_entropy_bits",
    "entropy_bits",
    "features",
    "layer_entropies",
    "layer_names",
    "main",
    "model_hash",
    "plan_sequences",
    "plot_stats",
    "popularity",
    "previous_token",
    "read_metadata",
    "read_traces",
    "reuse_distances",
    "routing_entropy",
    "rows_table",
    "set_symbols",
    "sketch_projection",
    "stats",
    "temporal_entropies",
    "transition_matrix",
    "tv_distance",
]

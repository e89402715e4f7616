"""Defaults shared by the CLI, the server and the benchmarks, in one place (no heavy imports: the CLI reads
them to build its options)."""

# The compaction method /v1/compact, on-the-fly compaction, `kvcat compact` and the demo use unless told
# otherwise. AM-HAK-fast: the document's salient sentences fill every head's slots besides sinks and the last
# tokens, in about 1.6x the prefill's time; "am-hak" reconstructs the whole document for its keys (about 5x
# the prefill's time). The tune-split figures: benchmarks/NOTES.md.
DEFAULT_METHOD = "am-hak-fast"

# The Attention Matching methods, drawn bold and compared against the rest in every benchmark.
AM_METHODS = ("am-hak", "am-hak-fast", "am-omp", "am-omp-fast")

# The model every command and benchmark uses unless told otherwise: small enough for a 2-core CPU.
DEFAULT_MODEL = "smollm2-135m"

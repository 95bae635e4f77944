import os

# pyarrow's default allocator (mimalloc) keeps what it frees: preprocess's anonymous memory
# grew by about 10 KB per image with it (benchmarks/scale.py; 2 KB with the system allocator).
# Read when pyarrow first allocates, so it is set before anything imports it.
os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")

from pipeline.cli import main  # noqa: E402

raise SystemExit(main())

"""Speed measurements, each run from the project root as `python -m benchmarks.<name>` (see `benchmarks/README.md`).

Nothing is fetched from a hub: the benchmarks' models are the catalogue's local ones or random weights, so the package
turns the Hugging Face Hub client offline before any benchmark imports it (it reads the variable at import).
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

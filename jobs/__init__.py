"""What runs on a worker: catalogue, configs, prompts, data, 4-bit QLoRA training, evaluation."""

import logging

# bitsandbytes' CPU backend looks for an optional kernel package (a Hub download) at import and logs a warning when it
# is not installed; the plain CPU kernels it falls back to are what we use, so the warning is noise on every CPU run.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
# transformers 5 installs `kernels`, which that look-up then asks; offline it warns that it skips a publisher trust
# check.
logging.getLogger("kernels").setLevel(logging.ERROR)

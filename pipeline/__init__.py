"""Fine-tuning, evaluation, merging, inference and serving of vision-language models (`python -m pipeline`)."""

import logging

# bitsandbytes (model.quantization; peft imports it whenever it is installed) looks for an optional CPU kernel
# on the hub at import, through the `kernels` package, and both warn when it cannot be had (offline: always);
# bitsandbytes then runs its own CPU code, so neither warning is anything a user can act on. Errors still show.
for _name in ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub"):
    logging.getLogger(_name).setLevel(logging.ERROR)

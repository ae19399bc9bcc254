"""Fine-tuning, evaluation, merging, inference and serving of vision-language models (`python -m pipeline`)."""

import logging

# bitsandbytes (model.quantization; peft imports it whenever it is installed) looks for an optional CPU kernel
# on the hub at import and warns when it cannot have it; it then runs its own CPU code, so the warning is
# nothing a user can act on offline. Its errors still show.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

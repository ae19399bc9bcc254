"""MiniCPM-V-2: the project's own implementation (modeling, tokenizer, processor, template, generation,
checkpoint layout, tiny twin) behind the family interface (`family.MiniCPMV2`)."""

"""Model families. ``qlora_ext.models.llama2`` holds the Llama-2 builders."""

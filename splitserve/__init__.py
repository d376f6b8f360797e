"""splitserve: disaggregated prefill/decode serving for code LLMs."""

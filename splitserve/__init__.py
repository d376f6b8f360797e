"""splitserve: disaggregated prefill/decode serving for GPTBigCode code models."""

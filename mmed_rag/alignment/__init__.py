"""RAG-based preference tuning (RAG-PT): preference pairs and two-stage DPO with LoRA."""

"""Training stages shared by supervised fine-tuning and RAG-PT's DPO: resumable, checked, published whole."""

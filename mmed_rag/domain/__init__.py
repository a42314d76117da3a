"""Domain identification: which modality an image is, so it is routed to the right retriever."""

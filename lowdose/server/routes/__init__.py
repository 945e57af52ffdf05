"""lowdose's own HTTP routes: inference, fine-tuning, the DICOMweb proxy (each checks what it is sent)."""
